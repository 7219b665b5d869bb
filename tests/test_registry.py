"""The procedure registry: one object per procedure is everything the rest of the tool asks of it.

A toy procedure is registered here, with one classes.toml table naming it, and then backed
up, planned, verified and drilled through main() like any shipped class: nothing else in
the tool is edited for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

import pytest

import backup_before_apply as bba
from conftest import REPO, fake_container, write_module

TOY_TABLE = """
[classes.T]
title = "Toy"
patterns = ["toy"]
procedure = "toy-file"
fallback = "none"
options = { greeting = "hello from classes.toml" }
restore = "cat {backup}"
"""


def _toy_run(job: bba.BackupJob, dir_fd: int) -> bba.BackupResult:
    text = f"{job.options['greeting']} ({job.container})\n".encode()
    with bba.PartialFile(dir_fd, f"{job.basename}.toy", job.backup_dir) as out:
        out.write(text)
        with out.reopen_for_reading() as fh:
            verification = {"lines": len(fh.read().splitlines())}
        path = out.commit()
    return bba.BackupResult(path, "toy", out.size, out.sha256.hexdigest(), verification, {"greeting": job.options["greeting"]}, [])


def _toy_verify(fh: IO[bytes], doc: dict[str, Any]) -> list[bba.Check]:
    lines = len(fh.read().splitlines())
    return [("lines", lines == doc["verification"]["lines"], f"{lines} line(s)")]


def _toy_drill(drill: bba.Drill) -> int:
    text = drill.backup.read_text()
    return int(not bba.compare("greeting", drill.doc["contents"]["greeting"], text.split(" (")[0], drill.lines))


TOY = bba.Procedure(
    name="toy-file",
    run=_toy_run,
    plan=lambda job: bba.Plan([f"write: a greeting from {job.container}"], ".toy", "one line"),
    estimate=lambda job: bba.Estimate(64, "a greeting"),
    verify=_toy_verify,
    drill=_toy_drill,
    suffixes=("toy",),
    options={"greeting": (str, "hello")},
)


@pytest.fixture
def toy(tmp_path, platform, fake_docker):
    bba.register(TOY)
    classes = tmp_path / "classes.toml"
    classes.write_text((REPO / "classes.toml").read_text() + TOY_TABLE)
    write_module(platform, "toy")
    fake_docker(fake_container("toy"))
    try:
        yield classes
    finally:
        del bba.PROCEDURES["toy-file"]


def test_registry_toy_procedure_is_one_object_and_one_table(toy, platform, tmp_path, capsys):
    common = ["--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"), "--classes", str(toy)]
    assert bba.main(["toy", *common, "--dry-run"], env={}) == 0
    plan = capsys.readouterr().out
    assert "would write: a greeting from toy" in plan and ".toy.partial (mode 0600)" in plan and "would verify: one line" in plan

    assert bba.main(["toy", *common], env={}) == 0
    backup, manifest = map(Path, capsys.readouterr().out.split())
    assert backup.name.endswith(".toy") and backup.read_text() == "hello from classes.toml (toy)\n"
    doc = json.loads(manifest.read_text())
    assert doc["procedure"] == "toy-file" and doc["class"] == "T" and doc["restore"] == f"cat {backup}"
    assert doc["sha256"] == hashlib.sha256(backup.read_bytes()).hexdigest()

    assert bba.main(["--verify", str(backup), "--classes", str(toy)], env={}) == 0
    assert "ok    lines      1 line(s)" in capsys.readouterr().out
    assert bba.main(["--drill", str(manifest), "--classes", str(toy)], env={}) == 0
    out = capsys.readouterr().out
    assert "  greeting: hello from classes.toml = hello from classes.toml" in out and out.endswith("drill passed: the restored data matches the manifest\n")

    backup.write_text("tampered\n")
    assert bba.main(["--verify", str(backup)], env={}) == 1


def test_registry_procedure_option_defaults_apply_outside_its_class(toy, platform, tmp_path, capsys):
    """--procedure X on a module of another class takes X's defaults, not the class's options."""
    write_module(platform, "kuma")
    args = ["kuma", "--container", "toy", "--procedure", "toy-file", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"), "--classes", str(toy)]
    assert bba.main(args, env={}) == 0
    backup = Path(capsys.readouterr().out.split()[0])
    assert backup.read_text() == "hello (toy)\n"


def test_registry_every_shipped_procedure_is_complete_and_used_by_the_table(config):
    for name, procedure in bba.PROCEDURES.items():
        assert procedure.name == name and procedure.suffixes
        for option, (kind, default) in procedure.options.items():
            assert isinstance(default, kind), (name, option)
    used = {c.procedure for c in config.classes.values()} | {c.fallback for c in config.classes.values() if c.fallback}
    assert used == set(bba.PROCEDURES)


def test_registry_procedure_flag_with_another_classes_procedure_no_longer_crashes(platform, tmp_path, fake_docker, capsys):
    """--procedure search-engine on a class E module: its own option defaults (this was a KeyError)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "x").write_text("x")
    write_module(platform, "kuma")
    fake_docker(fake_container("kuma", [{"Type": "volume", "Name": "k", "Source": str(data), "Destination": "/data", "RW": True}]))
    args = ["kuma", "--procedure", "search-engine", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b")]
    assert bba.main(args, env={}) == 0, capsys.readouterr().err
    doc = json.loads(Path(capsys.readouterr().out.split()[1]).read_text())
    assert doc["procedure"] == "search-engine" and doc["contents"]["engine"] == "unknown"


def test_registry_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        bba.register(bba.PROCEDURES["mounted-archive"])


def test_registry_manifest_naming_an_unknown_procedure_is_a_usage_error(tmp_path, capsys):
    backup = tmp_path / "m-20260101T000000Z.tar.gz"
    backup.write_bytes(b"x")
    (tmp_path / "m-20260101T000000Z.manifest.json").write_text(json.dumps({"tool": bba.PROG, "backup_file": backup.name, "procedure": "gone"}))
    assert bba.main(["--verify", str(backup)], env={}) == 2
    assert "procedure 'gone' is unknown to this version" in capsys.readouterr().err
