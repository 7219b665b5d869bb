"""Before-apply discipline on a real engine: --coverage, --check, --prune, several modules in one run, health.

Every verdict here is checked against what the engine and the backup directory really hold,
not against what the tool printed about itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOOL, run_backup, run_tool, write_module
from test_e2e_fidelity import mountpoint


def notes_module(engine, platform: Path, module_id: str, *, statefulness: str = "stateful", files: int = 3, health: bool = False) -> None:
    """A module whose container keeps a few files in the volume <id>-data at /data."""
    write_module(platform, module_id, statefulness=statefulness)
    engine.docker("volume", "create", f"{module_id}-data")
    for i in range(files):
        (mountpoint(engine, f"{module_id}-data") / f"note-{i}.txt").write_text(f"note {i} of {module_id}\n" * 100)
    healthcheck = ["--health-cmd", "test -d /data", "--health-interval", "1s", "--health-retries", "1"] if health else []
    engine.run_container(module_id, "-v", f"{module_id}-data:/data", *healthcheck)


def test_e2e_coverage_finds_uncovered_declared_stateless_and_unused_volumes(docker_engine, tmp_path):
    engine, platform = docker_engine, tmp_path / "platform"
    notes_module(engine, platform, "wiki")                                   # covered
    notes_module(engine, platform, "renderer", statefulness="stateless")     # says stateless, holds data
    notes_module(engine, platform, "proxy", statefulness="stateless", files=0)  # stateless and empty
    engine.docker("volume", "create", "orphan-data")
    (mountpoint(engine, "orphan-data") / "state.db").write_bytes(os.urandom(50000))
    engine.run_container("orphan", "-v", "orphan-data:/var/lib/orphan")        # no module at all
    engine.docker("volume", "create", "left-behind")                         # no container
    (mountpoint(engine, "left-behind") / "old.db").write_bytes(b"x" * 9000)

    proc = run_tool("--coverage", "--platform-root", str(platform), "--debug", env=engine.env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.index("UNCOVERED") < text.index("DECLARED STATELESS") < text.index("UNUSED VOLUMES") < text.index("covered: a stateful")
    # ps, inspect, info, volume ls, volume inspect (DOCKER_HOST is set: no context inspect), whatever the number of modules;
    # du for the four mounts holding data, none for the empty one
    assert "programs run: docker 5x, du 4x" in proc.stderr, proc.stderr

    rows = json.loads(run_tool("--coverage", "--json", "--platform-root", str(platform), env=engine.env).stdout)
    by_where = {(r["container"], r["destination"] or r["volume"]): r for r in rows}
    assert by_where[("orphan", "/var/lib/orphan")]["status"] == "uncovered" and by_where[("orphan", "/var/lib/orphan")]["module"] is None
    assert by_where[("orphan", "/var/lib/orphan")]["bytes"] >= 50000 and by_where[("orphan", "/var/lib/orphan")]["volume"] == "orphan-data"
    assert by_where[("renderer", "/data")]["status"] == "declared-stateless" and by_where[("renderer", "/data")]["module"] == "renderer"
    assert by_where[("proxy", "/data")]["status"] == "stateless-empty"
    assert by_where[("wiki", "/data")]["status"] == "covered" and by_where[("wiki", "/data")]["module"] == "wiki"
    assert by_where[("wiki", "/data")]["procedure"] == "mounted-archive" and by_where[("renderer", "/data")]["procedure"] is None
    assert by_where[(None, "left-behind")]["status"] == "unused-volume" and by_where[(None, "left-behind")]["bytes"] >= 9000
    assert not any(r["destination"] == "/usr" for r in rows)  # read-only: not state


def check(engine, platform: Path, backup_dir: Path, module_id: str, *args: str, ci: bool = False):
    """--check as an apply pipeline runs it: under CI=true, without --allow-ci."""
    env = {**engine.env, "CI": "true"} if ci else engine.env
    return subprocess.run([sys.executable, str(TOOL), "--check", module_id, "--platform-root", str(platform), "--backup-dir", str(backup_dir),
                           *args], env=env, capture_output=True, text=True, timeout=120)


def test_e2e_check_gate_fails_before_passes_after_and_fails_on_a_corrupted_or_old_backup(docker_engine, tmp_path):
    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    notes_module(engine, platform, "wiki")

    before = check(engine, platform, backups, "wiki", ci=True)
    assert before.returncode == 1 and before.stderr.strip().splitlines()[-1] == f"backup-before-apply: error: no backup of wiki in {backups}"
    assert run_backup(engine, platform, "wiki", backups).returncode == 0
    after = check(engine, platform, backups, "wiki", ci=True)
    assert after.returncode == 0, after.stderr
    assert after.stdout.startswith("ok  wiki: ") and "passes every --verify check" in after.stdout
    as_json = json.loads(check(engine, platform, backups, "wiki", "--json", ci=True).stdout)
    assert as_json["passed"] is True and as_json["reason"] is None and all(c["passed"] for c in as_json["checks"])

    time.sleep(2.1)
    old = check(engine, platform, backups, "wiki", "--max-age", "1s", ci=True)
    assert old.returncode == 1 and "more than --max-age 1s" in old.stderr

    newest = run_backup(engine, platform, "wiki", backups).stdout.split()[0]
    data = bytearray(Path(newest).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(newest).write_bytes(bytes(data))
    corrupted = check(engine, platform, backups, "wiki", ci=True)
    assert corrupted.returncode == 1 and "fails --verify (sha256" in corrupted.stderr and Path(newest).name in corrupted.stderr

    safety = run_backup(engine, platform, "wiki", backups).stdout.split()[1]  # marked as a restore's safety backup: not one to count
    doc = json.loads(Path(safety).read_text())
    Path(safety).write_text(json.dumps({**doc, "taken_before_restore": {"restoring": newest}}))
    still = check(engine, platform, backups, "wiki", ci=True)
    assert still.returncode == 1 and Path(newest).name in still.stderr and Path(safety).name not in still.stderr

    assert check(engine, platform, backups, "nope", ci=True).returncode == 2  # an unknown module is bad input, not "no backup"
    bad_age = check(engine, platform, backups, "wiki", "--max-age", "soon", ci=True)
    assert bad_age.returncode == 2 and "'soon' is not a duration" in bad_age.stderr
    ci_backup = subprocess.run([sys.executable, str(TOOL), "wiki", "--platform-root", str(platform), "--backup-dir", str(backups)],
                               env={**engine.env, "CI": "true"}, capture_output=True, text=True, timeout=120)
    assert ci_backup.returncode == 3  # taking a backup stays refused under CI


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith(".") or p.name.endswith(("-staging", ".partial")))


def test_e2e_prune_lists_then_deletes_oldest_pairs_and_never_the_newest_good_backup(docker_engine, tmp_path):
    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    notes_module(engine, platform, "wiki")
    written = [run_backup(engine, platform, "wiki", backups).stdout.split() for _ in range(3)]
    assert all(len(pair) == 2 for pair in written)
    (backups / ".wiki-20200101T000000Z.tar-staging").mkdir()  # left by a killed run
    (backups / "wiki-20200101T000000Z.manifest.json").write_text("{}")  # a manifest of nothing
    everything = names(backups)

    listed = run_tool("--prune", "wiki", "--keep", "1", "--older-than", "0s", "--backup-dir", str(backups), env=engine.env)
    assert listed.returncode == 0, listed.stderr
    assert names(backups) == everything  # a dry run by default
    expected = sorted([*written[0], *written[1], str(backups / ".wiki-20200101T000000Z.tar-staging"),
                       str(backups / "wiki-20200101T000000Z.manifest.json")])
    assert sorted(listed.stdout.split()) == expected
    assert "nothing was removed: add --delete" in listed.stderr

    young = run_tool("--prune", "wiki", "--keep", "1", "--backup-dir", str(backups), env=engine.env)  # the default older_than, 30d
    assert sorted(young.stdout.split()) == sorted([str(backups / ".wiki-20200101T000000Z.tar-staging"), str(backups / "wiki-20200101T000000Z.manifest.json")])

    deleted = run_tool("--prune", "wiki", "--keep", "1", "--older-than", "0s", "--delete", "--json", "--backup-dir", str(backups), env=engine.env)
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(r["path"] for r in json.loads(deleted.stdout)) == expected
    assert names(backups) == sorted(Path(p).name for p in written[2])

    # The newest backup is damaged: retention keeps the newest that passes --verify, whatever --keep says.
    newer = run_backup(engine, platform, "wiki", backups).stdout.split()
    Path(newer[0]).write_bytes(b"damaged")
    everything_but_newest = run_tool("--prune", "--keep", "0", "--older-than", "0s", "--delete", "--backup-dir", str(backups), env=engine.env)
    assert everything_but_newest.returncode == 0, everything_but_newest.stderr
    assert names(backups) == sorted(Path(p).name for p in written[2])
    assert run_tool("--verify", written[2][0], env=engine.env).returncode == 0

    ci = subprocess.run([sys.executable, str(TOOL), "--prune", "--backup-dir", str(backups)], env={**engine.env, "CI": "true"},
                        capture_output=True, text=True, timeout=60)
    assert ci.returncode == 3


def test_e2e_several_modules_one_failing_give_both_results_and_a_non_zero_exit(docker_engine, tmp_path):
    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    notes_module(engine, platform, "wiki")
    notes_module(engine, platform, "forum")
    write_module(platform, "ghost")  # stateful, and no container: fails with exit 1

    for jobs in ("1", "3"):
        proc = run_backup(engine, platform, "wiki", backups / jobs, "ghost", "forum", "--jobs", jobs)
        assert proc.returncode == 1, proc.stderr
        paths = [line for line in proc.stdout.splitlines() if line.startswith("/")]
        assert sorted(Path(p).name.split("-2")[0] for p in paths) == ["forum", "forum", "wiki", "wiki"]
        assert all(Path(p).exists() for p in paths)
        table = proc.stdout[proc.stdout.index("MODULE"):].splitlines()
        assert [line.split()[0] for line in table[1:4]] == ["wiki", "ghost", "forum"]  # in the order given
        assert table[1].endswith("s  ok") and "s  exit 1: error: module 'ghost': no container found (tried" in table[2]
        assert table[-1] == "2 of 3 module(s) backed up and verified"
        assert "backup-before-apply[ghost]: error: module 'ghost': no container found" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "backup-before-apply: error: 1 of 3 module(s) failed: ghost (summary above)"

    as_json = run_backup(engine, platform, "wiki", backups / "j", "ghost", "--json")
    docs = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and docs[0]["module"] == "wiki" and docs[0]["class"] == "E"
    assert docs[1] == {"module": "ghost", "exit_status": 1, "error": docs[1]["error"]} and "no container found" in docs[1]["error"]
    plans = run_backup(engine, platform, "wiki", backups / "d", "forum", "--dry-run", "--json")
    assert plans.returncode == 0 and [p["module"] for p in json.loads(plans.stdout)] == ["wiki", "forum"]
    text = run_backup(engine, platform, "wiki", backups / "d", "forum", "--dry-run")
    assert text.returncode == 0 and text.stdout.count("read: ") >= 2 and text.stdout.rstrip().endswith("2 of 2 module(s) planned")
    assert not (backups / "d").exists()


def test_e2e_prune_retention_per_class_from_classes_toml(docker_engine, tmp_path):
    from conftest import REPO

    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    notes_module(engine, platform, "wiki")
    written = [run_backup(engine, platform, "wiki", backups).stdout.split() for _ in range(3)]
    classes = tmp_path / "classes.toml"
    classes.write_text((REPO / "classes.toml").read_text().replace("default = true\n", 'default = true\nkeep = 2\nolder_than = "0s"\n'))
    by_class = run_tool("--prune", "--classes", str(classes), "--backup-dir", str(backups), env=engine.env)
    assert by_class.returncode == 0, by_class.stderr
    assert sorted(by_class.stdout.split()) == sorted(written[0])  # class E keeps 2, whatever their age
    overridden = run_tool("--prune", "--keep", "1", "--classes", str(classes), "--backup-dir", str(backups), env=engine.env)
    assert sorted(overridden.stdout.split()) == sorted([*written[0], *written[1]])  # the command line beats the class
    bad = classes.read_text().replace('older_than = "0s"', 'older_than = "soon"')
    classes.write_text(bad)
    refused = run_tool("--prune", "--classes", str(classes), "--backup-dir", str(backups), env=engine.env)
    assert refused.returncode == 2 and f"{classes}: classes.E.older_than: 'soon' is not a duration" in refused.stderr


def test_e2e_health_before_and_after_in_the_manifest_and_in_list(docker_engine, tmp_path):
    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    notes_module(engine, platform, "wiki", health=True)
    deadline = time.monotonic() + 60
    while engine.inspect("wiki")["State"].get("Health", {}).get("Status") != "healthy":
        assert time.monotonic() < deadline, "the healthcheck never passed"
        time.sleep(0.5)
    proc = run_backup(engine, platform, "wiki", backups)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(Path(proc.stdout.split()[1]).read_text())
    assert doc["health"] == {"before": {"state": "running", "health": "healthy"}, "after": {"state": "running", "health": "healthy"}}
    listing = run_tool("--list", "--platform-root", str(platform), env=engine.env)
    assert "HEALTH" in listing.stdout.splitlines()[0]
    assert [line.split()[4:6] for line in listing.stdout.splitlines() if line.strip().startswith("wiki ")] == [["running", "healthy"]]

    notes_module(engine, platform, "forum")  # no healthcheck: none recorded, nothing to warn about
    plain = json.loads(Path(run_backup(engine, platform, "forum", backups).stdout.split()[1]).read_text())
    assert plain["health"] == {"before": {"state": "running", "health": None}, "after": {"state": "running", "health": None}}


@pytest.mark.parametrize("flag", [["--max-age", "1h"], ["--keep", "2"], ["--delete"], ["--jobs", "2"]])
def test_discipline_flags_belong_to_their_mode(flag):
    proc = run_tool("wiki", *flag)
    assert proc.returncode == 2 and "applies to" in proc.stderr


def test_health_after_warns_loudly_when_a_healthy_container_is_not_healthy_any_more(monkeypatch):
    import subprocess as sp
    from types import SimpleNamespace

    import backup_before_apply as bba

    states = iter([{"Status": "running", "Health": {"Status": "unhealthy"}}, {"Status": "running", "Health": {"Status": "healthy"}}])
    monkeypatch.setattr(bba, "docker", lambda args, **_: sp.CompletedProcess(args, 0, json.dumps(next(states)).encode(), b""))
    job = SimpleNamespace(container="wiki", settings=bba.Settings(), health={"before": {"state": "running", "health": "healthy"}})
    result = SimpleNamespace(warnings=[])
    assert bba.health_after(job, result) == {"state": "running", "health": "unhealthy"}
    assert result.warnings == ["CONTAINER wiki WAS healthy BEFORE THE BACKUP AND IS unhealthy NOW: check the service before the apply"]
    result.warnings.clear()
    assert bba.health_after(job, result) == {"state": "running", "health": "healthy"} and result.warnings == []


def test_e2e_several_modules_interrupted_every_run_cleans_up_and_none_starts_after(docker_engine, tmp_path):
    import signal

    engine, platform, backups = docker_engine, tmp_path / "platform", tmp_path / "b"
    for module_id in ("wiki", "forum", "board"):
        notes_module(engine, platform, module_id)
        (mountpoint(engine, f"{module_id}-data") / "big.bin").write_bytes(os.urandom(96 << 20))  # time enough to be interrupted
    child = subprocess.Popen([sys.executable, str(TOOL), "wiki", "forum", "board", "--jobs", "2", "--platform-root", str(platform),
                              "--backup-dir", str(backups), "--allow-ci"], env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None
    seen = []
    for line in child.stderr:
        seen.append(line)
        if "archiving /data" in line:
            child.send_signal(signal.SIGINT)  # to the parent only: it passes it on to the runs in progress
            break
    out, rest = child.communicate(timeout=300)
    err = "".join(seen) + rest
    assert child.returncode == 130, err
    assert "board" in out and "not started (interrupted)" in out  # the summary, and the third never started
    assert "backup-before-apply[wiki]: error: interrupted by SIGINT" in err or "backup-before-apply[forum]: error: interrupted by SIGINT" in err
    assert err.strip().splitlines()[-1].endswith("the runs still going were interrupted too and cleaned up (the summary above)")
    left = [p.name for p in backups.iterdir() if not p.name.endswith(".lock")] if backups.exists() else []
    assert not any(name.endswith(".partial") or "staging" in name for name in left), left
    assert all(name.endswith((".tar.gz", ".manifest.json")) for name in left), left
