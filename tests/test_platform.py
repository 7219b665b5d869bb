"""module.yaml semantics, module ids, discovery, and the example platform."""

from __future__ import annotations

import pytest

import backup_before_apply as bba
from conftest import REPO, write_module


@pytest.mark.parametrize("module_id", ["uptime-kuma", "a", "0day", "x.y_z-1", "a" * 128])
def test_validate_module_id_accepts_plain_ids(module_id):
    assert bba.validate_module_id(module_id) == module_id


@pytest.mark.parametrize(
    "module_id",
    ["../x", "/etc", "..", ".hidden", "a/b", "Upper", "with space", "-dash", "ünï", "a\nb", "x\n", "", "a" * 129, "x/../../etc"],
)
def test_validate_module_id_rejects_unsafe_ids(module_id):
    with pytest.raises(bba.UsageError, match="invalid module id"):
        bba.validate_module_id(module_id)


def test_read_module_defaults_lifecycle_active_and_finds_runbook(platform):
    path = write_module(platform, "kuma", yaml="spec:\n  runtime:\n    statefulness: stateful\n", runbook="docker logs kuma\n")
    module = bba.read_module(path)
    assert (module.id, module.lifecycle, module.statefulness, module.container) == ("kuma", "active", "stateful", None)
    assert module.runbook == path.with_name("runbook.md")


def test_read_module_missing_statefulness_is_undeclared(platform):
    module = bba.read_module(write_module(platform, "x", yaml="metadata:\n  id: x\n"))
    assert module.statefulness == bba.UNDECLARED


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("metadata:\n  id: other\n", ":2: metadata.id: 'other' does not match its directory name 'mod'"),
        ("metadata:\n  lifecycle: retired\n", ":2: metadata.lifecycle: expected one of active, parked, sunset, non-canonical, got 'retired'"),
        ("spec:\n  runtime:\n    statefulness: maybe\n", ":3: spec.runtime.statefulness: expected one of stateful, stateless, got 'maybe'"),
        ("spec:\n  runtime:\n    container: 'bad name'\n", ":3: spec.runtime.container: expected a container name"),
        ("- a\n- b\n", ": expected a mapping at the top level"),
        ("metadata:\n  id: [x]\n", ":2: metadata.id: expected a string"),
    ],
)
def test_read_module_bad_values_name_file_line_and_key(platform, yaml, message):
    path = write_module(platform, "mod", yaml=yaml)
    with pytest.raises(bba.UsageError) as info:
        bba.read_module(path)
    assert str(info.value) == f"{path}{message}" or str(info.value).startswith(f"{path}{message}")


def test_read_module_binary_garbage_and_huge_files_rejected(platform):
    path = write_module(platform, "bin", yaml="")
    path.write_bytes(b"a: 1\n\x00\x01\x02")
    with pytest.raises(bba.UsageError, match=r"module.yaml:2: NUL byte"):
        bba.read_module(path)
    path.write_bytes(b"a: 1\nb: \xff\xfe\n")
    with pytest.raises(bba.UsageError, match=r"module.yaml:2: not UTF-8"):
        bba.read_module(path)
    path.write_bytes(b"# pad\n" * 200_000)
    with pytest.raises(bba.UsageError, match="larger than 1024 KiB"):
        bba.read_module(path)


def test_load_module_unknown_and_invalid(platform):
    with pytest.raises(bba.UsageError, match="unknown module 'nope'"):
        bba.load_module(platform, "nope")
    with pytest.raises(bba.UsageError, match="invalid module id"):
        bba.load_module(platform, "../../etc")


def test_load_module_platform_without_modules_dir(tmp_path):
    with pytest.raises(bba.UsageError, match="modules: no such directory"):
        bba.load_module(tmp_path, "x")


def test_discover_modules_collects_errors_and_skips_dirs_without_yaml(platform):
    write_module(platform, "good")
    write_module(platform, "bad", yaml="spec:\n  runtime: {}\nspec: {}\n")
    (platform / "modules" / "empty").mkdir()
    modules, errors = bba.discover_modules(platform)
    assert [m.id for m in modules] == ["good"]
    assert len(errors) == 1 and "bad/module.yaml:3: duplicate key 'spec'" in errors[0]


def test_example_platform_covers_every_class(config):
    modules, errors = bba.discover_modules(REPO / "examples" / "platform")
    assert errors == []
    assert len(modules) >= 14
    stateful = [m for m in modules if m.statefulness == "stateful"]
    assert {bba.classify(m.id, config)[0].letter for m in stateful} == set("ABCDEFG")
    ids = {m.id for m in modules}
    assert {"agaria-postgres", "agaria-redis", "karakeep-meilisearch", "searxng", "vault", "minio", "uptime-kuma"} <= ids
    assert {m.lifecycle for m in modules} >= {"active", "parked", "sunset", "non-canonical"}
    assert any(m.statefulness == "stateless" for m in modules)
    assert all(m.runbook for m in modules)
