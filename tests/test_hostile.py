"""Hostile input and the never-automatic promise: properties over ids, patterns, settings."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backup_before_apply as bba
from conftest import REPO, examples


@settings(max_examples=examples(1000))
@given(st.text(max_size=200))
def test_validate_module_id_accepts_only_safe_ids(text):
    try:
        assert bba.validate_module_id(text) == text
    except bba.UsageError as exc:
        assert "invalid module id" in str(exc)
        return
    # whatever is accepted is one plain path component
    assert "/" not in text and "\0" not in text and text not in (".", "..")
    assert not text.startswith(("-", ".")) and text == text.strip() and len(text) <= bba.MODULE_ID_MAX


@settings(max_examples=examples(500))
@given(st.text(max_size=60), st.lists(st.text(min_size=1, max_size=12), max_size=6))
def test_classify_returns_a_class_or_a_usage_error(module_id, patterns):
    config = bba.load_config(REPO / "classes.toml")
    classes = dict(config.classes)
    classes["Z"] = bba.BackupClass("Z", "fuzz", tuple(patterns), "mounted-archive", None, "x")
    config = bba.Config(config.path, config.settings, classes)
    try:
        cls, pattern = bba.classify(module_id, config)
    except bba.UsageError as exc:
        assert "equally specific patterns of two classes" in str(exc)
        return
    assert cls.letter in classes and (pattern == "(default)" or pattern in cls.patterns)


CLASSES_PART = "[classes.A]" + (REPO / "classes.toml").read_text().split("[classes.A]", 1)[1]


@settings(max_examples=examples(300))
@given(values=st.dictionaries(st.sampled_from(list(bba.SETTING_SOURCES)),
                              st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=10), st.integers(), st.floats(), st.booleans()), max_size=4))
def test_settings_values_are_checked_or_rejected_naming_file_and_key(values, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "classes.toml"
    path.write_text("[settings]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items()) + CLASSES_PART)
    try:
        config = bba.load_config(path)
    except bba.UsageError as exc:
        assert str(exc).startswith(f"{path}: settings.")
        return
    for key, kind in typing.get_type_hints(bba.Settings).items():  # the declared types, not the defaults the code goes by
        assert isinstance(getattr(config.settings, key), kind)


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value))
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # a JSON string is a TOML basic string, but for DEL


@pytest.mark.parametrize("variable", bba.CI_ENV_VARS)
def test_every_ci_variable_refuses(variable, capsys):
    assert bba.main(["--prune"], env={variable: "true"}) == 3
    assert f"refused: {variable} is set" in capsys.readouterr().err


def test_nothing_in_the_repository_schedules_the_tool():
    """No workflow, systemd unit, timer or cron entry anywhere invokes backup_before_apply."""
    suspicious = re.compile(r"(^|/)(\.github|\.gitea|\.forgejo|\.gitlab-ci\.yml|\.woodpecker|\.drone\.yml|Jenkinsfile)|\.(service|timer)$|cron", re.I)
    offenders = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith((".git/", "demo-backups/")) or "/__pycache__/" in f"/{rel}" or not path.is_file():
            continue
        if suspicious.search(rel) or rel not in ("tests/test_hostile.py",) and re.search(r"^\s*(@reboot|[*0-9/,-]+\s+[*0-9/,-]+\s+[*0-9/,-]+\s+[*0-9/,-]+\s+[*0-9/,-]+)\s+.*backup_before_apply",
                                                                path.read_text(errors="replace"), re.M):
            offenders.append(rel)
    assert offenders == []
    assert (REPO / ".ci" / "run").read_text().count("backup_before_apply") == 0


def test_tool_refuses_under_ci_by_default_even_as_a_subprocess():
    import subprocess
    import sys
    for argv in (["wiki"], ["--restore", "/nonexistent.tar.gz"], ["--prune"], ["--drill", "/nonexistent.tar.gz"]):
        proc = subprocess.run([sys.executable, str(REPO / "backup_before_apply.py"), *argv], env={"CI": "true", "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True)
        assert proc.returncode == 3 and proc.stdout == "", argv
        assert "this tool is run by an operator, never by a CI runner" in proc.stderr
    assert Path(REPO / "backup_before_apply.py").read_text().count("def main(") == 1
