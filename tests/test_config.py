"""classes.toml: loading, validation errors that name file and key, class matching."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import backup_before_apply as bba
from conftest import REPO

MINIMAL = """
[classes.A]
title = "PostgreSQL"
patterns = ["postgres", "*postgres"]
procedure = "pg-dumpall"
fallback = "none"
restore = "psql"

[classes.E]
title = "Mounted"
patterns = []
procedure = "mounted-archive"
fallback = "none"
default = true
restore = "tar"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "classes.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("module_id", "letter"),
    [
        ("agaria-postgres", "G"),
        ("agaria-redis", "G"),
        ("honcho-postgres", "A"),
        ("foo-postgres", "A"),
        ("postgres", "A"),
        ("redis", "B"),
        ("infisical-redis", "B"),
        ("vault", "C"),
        ("minio", "D"),
        ("karakeep-meilisearch", "F"),
        ("searxng", "F"),
        ("uptime-kuma", "E"),
        ("anything-else", "E"),
    ],
)
def test_classify_shipped_table_matches_origin(config, module_id, letter):
    assert bba.classify(module_id, config)[0].letter == letter


def test_load_config_shipped_file_every_class_has_restore_notes(config):
    assert sorted(config.classes) == list("ABCDEFG")
    assert config.default_class.letter == "E"
    for cls in config.classes.values():
        assert cls.restore.count("\n") >= 1, cls.letter
        assert cls.procedure in bba.PROCEDURES


def test_classify_exact_beats_glob_and_longer_glob_beats_shorter(tmp_path):
    config = bba.load_config(write(tmp_path, MINIMAL + """
[classes.G]
title = "Agaria"
patterns = ["agaria-po*"]
procedure = "compose-root-archive"
fallback = "mounted-archive"
restore = "x"
"""))
    assert bba.classify("agaria-postgres", config)[0].letter == "G"  # 9 literal characters beat 8
    assert bba.classify("x-postgres", config) == (config.classes["A"], "*postgres")
    assert bba.classify("postgres", config) == (config.classes["A"], "postgres")
    assert bba.classify("other", config) == (config.classes["E"], "(default)")


def test_classify_equally_specific_globs_of_two_classes_is_an_error(tmp_path):
    config = bba.load_config(write(tmp_path, MINIMAL + """
[classes.B]
title = "Redis"
patterns = ["foopostg*"]
procedure = "redis-bgsave"
fallback = "mounted-archive"
restore = "x"
"""))
    with pytest.raises(bba.UsageError, match=r"equally specific patterns of two classes: classes\.A '\*postgres', classes\.B 'foopostg\*'"):
        bba.classify("foopostgres", config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[classes.A\n", "malformed TOML"),
        ("", "no backup classes defined"),
        ("[bogus]\n", "unknown top-level key 'bogus'"),
        (MINIMAL.replace('procedure = "pg-dumpall"', 'procedure = "magic"'), "classes.A.procedure: unknown procedure 'magic'"),
        (MINIMAL.replace('procedure = "pg-dumpall"\n', ""), "classes.A: missing key 'procedure'"),
        (MINIMAL.replace('patterns = ["postgres", "*postgres"]', "patterns = 5"), "classes.A.patterns: expected list, got int"),
        (MINIMAL.replace('patterns = ["postgres", "*postgres"]', 'patterns = [""]'), "classes.A.patterns: expected a list of non-empty strings"),
        (MINIMAL.replace('title = "PostgreSQL"', 'title = "PostgreSQL"\ncolour = "red"'), "classes.A.colour: unknown key"),
        (MINIMAL.replace('fallback = "none"\nrestore = "psql"', 'restore = "psql"'), "classes.A: missing key 'fallback'"),
        (MINIMAL.replace('fallback = "none"\nrestore = "psql"', 'fallback = "tar"\nrestore = "psql"'), "classes.A.fallback: unknown procedure 'tar'"),
        (MINIMAL.replace("default = true\n", ""), "exactly one class must set default = true (found 0"),
        (MINIMAL.replace('patterns = []', 'patterns = ["postgres"]'), "'postgres' is already listed in classes.A"),
        (MINIMAL.replace("[classes.E]", "[classes.e1]"), "classes.e1: class names are single capital letters"),
        ("[settings]\ndocker_timeout = \"soon\"\n" + MINIMAL, "settings.docker_timeout: expected a finite number, got 'soon'"),
        ("[settings]\ndocker_timeout = inf\n" + MINIMAL, "settings.docker_timeout: expected a finite number, got inf"),
        ("[settings]\ndocker_timeout = nan\n" + MINIMAL, "settings.docker_timeout: expected a finite number, got nan"),
        ("[settings]\ncompress_level = inf\n" + MINIMAL, "settings.compress_level: expected an integer, got inf"),
        ("[settings]\ncompress_level = nan\n" + MINIMAL, "settings.compress_level: expected an integer, got nan"),
        ("[settings]\ncompress_level = 6.5\n" + MINIMAL, "settings.compress_level: expected an integer, got 6.5"),
        ("[settings]\ncompress_level = 1e300\n" + MINIMAL, "settings.compress_level: 1e+300 is outside 1..9"),
        ("[settings]\nzstd_level = 99999999999999999999\n" + MINIMAL, "settings.zstd_level: 99999999999999999999 is outside 1..19"),
        ("[settings]\ncompress_level = 11\n" + MINIMAL, "settings.compress_level: 11 is outside 1..9"),
        ("[settings]\nbackup_dirs = \"/x\"\n" + MINIMAL, "settings.backup_dirs: unknown setting"),
    ],
)
def test_load_config_bad_file_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(bba.UsageError) as info:
        bba.load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_load_config_missing_file_is_usage_error(tmp_path):
    with pytest.raises(bba.UsageError, match="classes file not found"):
        bba.load_config(tmp_path / "nope.toml")


def test_resolve_settings_flag_beats_env_beats_file(tmp_path):
    config = bba.load_config(write(tmp_path, "[settings]\ndocker_timeout = 5\nbackup_dir = \"/from/file\"\n" + MINIMAL))
    args = bba.parse_args(["--list"])
    assert bba.resolve_settings(config, args, {}).docker_timeout == 5
    assert bba.resolve_settings(config, args, {}).backup_dir == "/from/file"
    env = {"BBA_DOCKER_TIMEOUT": "7", "BACKUP_DIR": "/from/env", "PLATFORM_ROOT": "/p"}
    settings = bba.resolve_settings(config, args, env)
    assert (settings.docker_timeout, settings.backup_dir, settings.platform_root) == (7, "/from/env", "/p")
    args = bba.parse_args(["--list", "--docker-timeout", "9", "--backup-dir", "/from/flag"])
    settings = bba.resolve_settings(config, args, env)
    assert (settings.docker_timeout, settings.backup_dir) == (9, "/from/flag")


def test_resolve_settings_bad_env_value_names_variable(config):
    with pytest.raises(bba.UsageError, match="environment BBA_COMPRESS_LEVEL: expected an integer, got 'max'"):
        bba.resolve_settings(config, bba.parse_args(["--list"]), {"BBA_COMPRESS_LEVEL": "max"})


def test_default_classes_path_is_beside_the_script():
    assert bba.DEFAULT_CLASSES == REPO / "classes.toml"


def test_readme_annotated_settings_match_the_shipped_classes_toml():
    """The README's annotated [settings] block must not drift from the file it annotates."""
    block = re.search(r"## classes\.toml, annotated\s+```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block is not None, "README has no annotated classes.toml block"
    annotated = tomllib.loads(block.group(1))["settings"]
    shipped = tomllib.loads((REPO / "classes.toml").read_text())["settings"]
    assert annotated == shipped
