"""The standard-library module.yaml reader: what hand-written YAML holds, and what it rejects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backup_before_apply as bba
from conftest import examples


def parse(text: str):
    return bba.parse_yaml(text, "module.yaml")[0]


def test_parse_yaml_nested_maps_lists_comments_quotes_returns_values():
    doc = parse(
        """# leading comment
---
apiVersion: v1   # trailing comment
metadata:
  id: "uptime-kuma"
  owner: 'ops # not a comment'
  url: http://host:3001/path#frag
  labels: {tier: "2", compose: apps}

spec:
  runtime:
    statefulness: stateful
    ports: [3001, "3002", 'x']
  volumes:
    - name: data
      mount: /app/data
    - name: conf
      mount: /app/conf
      options:
        - ro
  dependencies:
  - caddy
  - postgres
  nothing:
  empty: []
  flags: {a: true, b: false, c: ~, d: null}
  numbers: [1, -2, 3.5, 0x10]
"""
    )
    assert doc["metadata"] == {
        "id": "uptime-kuma",
        "owner": "ops # not a comment",
        "url": "http://host:3001/path#frag",
        "labels": {"tier": "2", "compose": "apps"},
    }
    assert doc["spec"]["runtime"] == {"statefulness": "stateful", "ports": [3001, "3002", "x"]}
    assert doc["spec"]["volumes"] == [
        {"name": "data", "mount": "/app/data"},
        {"name": "conf", "mount": "/app/conf", "options": ["ro"]},
    ]
    assert doc["spec"]["dependencies"] == ["caddy", "postgres"]
    assert doc["spec"]["nothing"] is None
    assert doc["spec"]["empty"] == []
    assert doc["spec"]["flags"] == {"a": True, "b": False, "c": None, "d": None}
    assert doc["spec"]["numbers"] == [1, -2, 3.5, "0x10"]


def test_parse_yaml_block_scalars_keep_text():
    doc = parse(
        "a: |\n  line one\n    indented\n  line three\n\nb: >-\n  folded\n  text\n\n  new para\nc: |-\n  x\nd: after\n"
    )
    assert doc["a"] == "line one\n  indented\nline three\n"
    assert doc["b"] == "folded text\nnew para"
    assert doc["c"] == "x"
    assert doc["d"] == "after"


def test_parse_yaml_double_quoted_escapes_decoded():
    doc = parse('a: "tab\\there \\"q\\" \\u00e9 \\\\"\nb: \'it\'\'s\'\n')
    assert doc == {"a": 'tab\there "q" é \\', "b": "it's"}


def test_parse_yaml_nested_sequences_of_sequences():
    assert parse("a:\n  - - x\n    - y\n  - - z\n") == {"a": [["x", "y"], ["z"]]}


def test_parse_yaml_key_lines_recorded():
    _, lines = bba.parse_yaml("metadata:\n  id: x\nspec:\n  runtime:\n    statefulness: stateful\n", "f")
    assert lines[("spec", "runtime", "statefulness")] == 5
    assert lines[("metadata", "id")] == 2


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("a: 1\na: 2\n", 2, "duplicate key 'a'"),
        ("a:\n\tb: 1\n", 2, "tab character"),
        ("a: &anchor x\n", 1, "anchors"),
        ("a: *alias\n", 1, "anchors"),
        ("a: !!str x\n", 1, "tags"),
        ("a: x\n---\nb: y\n", 2, "second YAML document"),
        ('a: "unterminated\n', 1, "unterminated"),
        ("a: [1, 2\n", 1, "unclosed"),
        ("a: b: c\n", 1, "unexpected ':'"),
        ("a:\n  b: 1\n   c: 2\n", 3, "unexpected ':'"),
        ("- x\n- y\nkey: 1\n", 3, "unexpected"),
        ("a: 1\n  b: 2\n", 2, "unexpected ':'"),
        ("a:\n  b: 1\n c: 2\n", 3, "unexpected indentation"),
        ("just a string without key\n", 1, "expected 'key: value'"),
        ("a: {x: 1, x: 2}\n", 1, "duplicate key 'x'"),
        ('a: "bad \\q escape"\n', 1, "unknown escape"),
        ("a:\n  - x\n  y: 1\n", 3, "expected"),
    ],
)
def test_parse_yaml_rejects_with_file_and_line(text, line, why):
    with pytest.raises(bba.YamlError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"module.yaml:{line}: "), message
    assert why in message


# ---------------------------------------------------------------- properties

_plain = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "null", "yes", "no", "on", "off")
)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
_values = st.recursive(
    st.one_of(_plain, _text, st.integers(-10**6, 10**6), st.booleans()),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4),
        st.dictionaries(_plain, children, min_size=1, max_size=4),
    ),
    max_leaves=15,
)


def _dump(value, indent=0):
    """A hand-written-style block YAML emitter, to check the reader against."""
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                out.append(f"{pad}{key}:\n{_dump(item, indent + 2)}")
            else:
                out.append(f"{pad}{key}: {_scalar(item)}  # note")
        return "\n".join(out)
    out = []
    for item in value:
        if isinstance(item, (dict, list)):
            body = _dump(item, indent + 2)
            out.append(f"{pad}- {body.lstrip()}")
        else:
            out.append(f"{pad}- {_scalar(item)}")
    return "\n".join(out)


def _scalar(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=examples(300))
@given(st.dictionaries(_plain, _values, min_size=1, max_size=5))
def test_parse_yaml_roundtrips_generated_documents(doc):
    assert parse(_dump(doc) + "\n") == doc


@settings(max_examples=examples(500))
@given(st.text(max_size=200))
def test_parse_yaml_arbitrary_text_returns_or_raises_yaml_error(text):
    try:
        parse(text)
    except bba.YamlError as exc:
        assert str(exc).startswith("module.yaml:")


# ---------------------------------------------------------------- only what the tool reads

MODULE_WITH_JUNK = """%YAML 1.2
---
# a hand-written module.yaml, as found in the wild
apiVersion: platform/v1
defaults: &defaults
  restart: unless-stopped
  labels: [a, b]
metadata:
  id: uptime-kuma
  description: a long description that goes on
    over several lines, as plain text does,
    with a colon:at the end of a word and "quotes
  owner: *defaults
  notes: "a quoted string
    that continues: metadata:
    id: not-this-one"
  tags: !!set {? a, ? b}
  lifecycle: active
  links:
    - {name: docs, url: "http://x/y#z"}
    - [multi,
       line, flow]
  script: |
    \tindented with a tab, inside a block scalar
    statefulness: stateless
spec:
  service:
    <<: *defaults
  runtime:
    extra: {a: 1,
      b: [2, 3]}
    statefulness: stateful
    ? complex key
    : value
    container: uptime-kuma
    weird: 'it''s
      fine'
  ports: [3001]
  ports: [3002]
...
"""


def test_read_module_skips_what_it_does_not_read(platform):
    path = platform / "modules" / "uptime-kuma" / "module.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(MODULE_WITH_JUNK.replace("\n", "\r\n"))
    module = bba.read_module(path)
    assert (module.id, module.lifecycle, module.statefulness, module.container) == ("uptime-kuma", "active", "stateful", "uptime-kuma")


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("metadata:\n  id: a\nmetadata:\n  id: b\n", 3, "duplicate key 'metadata'"),
        ("spec:\n  runtime:\n    statefulness: &s stateful\n", 3, "anchors, aliases and tags are not supported on spec.runtime.statefulness"),
        ("spec:\n  runtime:\n    statefulness: !!str stateful\n", 3, "anchors, aliases and tags"),
        ("x: &d {statefulness: stateless}\nspec:\n  runtime:\n    <<: *d\n", 4, "a merge key (<<) in spec.runtime makes"),
        ("metadata:\n  id: a\n---\nmetadata:\n  id: b\n", 3, "a second YAML document"),
        ("metadata:\n  id: a\n...\nmore: 1\n", 4, "content after the document end marker"),
        ("spec:\n\truntime: {}\n", 2, "tab character in indentation"),
    ],
)
def test_read_module_rejects_only_what_makes_its_keys_ambiguous(text, line, why):
    with pytest.raises(bba.YamlError) as info:
        bba.parse_yaml(text, "module.yaml", bba.MODULE_KEYS)
    assert str(info.value).startswith(f"module.yaml:{line}: ") and why in str(info.value)


try:
    import yaml  # a development dependency (.ci/deps), never needed by the tool
except ImportError:  # pragma: no cover
    yaml = None

_junk_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x85\u2028\u2029\ufeff"), max_size=40)
_junk = st.recursive(
    st.one_of(_junk_text, st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_junk_text, children, max_size=4)),
    max_leaves=12,
)
_value = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\ufeff"), min_size=1, max_size=30)
_PATHS = (("metadata", "id"), ("metadata", "lifecycle"), ("spec", "runtime", "statefulness"), ("spec", "runtime", "container"))


def _wanted(doc, path):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return "(absent)"
        doc = doc[key]
    return doc


@settings(max_examples=examples(400))
@given(
    values=st.tuples(*[st.one_of(st.none(), _value) for _ in _PATHS]),
    junk=st.lists(st.tuples(st.sampled_from([(), ("metadata",), ("spec",), ("spec", "runtime")]), _junk_text, _junk), max_size=8),
    shared=_junk,
    style=st.fixed_dictionaries({
        "default_flow_style": st.sampled_from([False, None, True]),
        "width": st.sampled_from([12, 40, 1000]),
        "allow_unicode": st.booleans(),
        "explicit_start": st.booleans(),
        "explicit_end": st.booleans(),
        "default_style": st.sampled_from([None, '"', "'"]),
        "indent": st.sampled_from([2, 3, 4]),
    }),
)
def test_parse_yaml_reads_the_four_keys_as_pyyaml_does_whatever_else_the_file_holds(values, junk, shared, style):
    from hypothesis import assume

    from conftest import in_ci
    if yaml is None:
        if in_ci():
            pytest.fail("CI=true and PyYAML is missing (.ci/deps installs it)")
        pytest.skip("PyYAML is not installed")
    doc: dict = {"metadata": {}, "spec": {"runtime": {}}}
    for path, value in zip(_PATHS, values):
        if value is not None:
            assume(bba._plain_value(value) == value and value.strip() == value)
            _place(doc, path, value)
    for where, key, value in junk:
        parent = doc
        for part in where:
            parent = parent[part]
        if key not in ("metadata", "spec", "runtime", "id", "lifecycle", "statefulness", "container", "<<"):
            parent[key] = value
    if isinstance(shared, (list, dict)):
        doc["first"] = shared
        doc["spec"]["again"] = shared  # the same object twice: PyYAML writes an anchor and an alias
    text = yaml.safe_dump(doc, sort_keys=False, **style)
    expected = yaml.safe_load(text)
    found, _ = bba.parse_yaml(text, "module.yaml", bba.MODULE_KEYS)
    for path in _PATHS:
        assert _wanted(found, path) == _wanted(expected, path), (path, text)


def _place(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value
