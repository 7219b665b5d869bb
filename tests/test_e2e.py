"""End to end: the tool as a subprocess against a real dockerd with real containers.

The engine is private (tests/sandbox.py). Containers run the host's binaries from a
read-only /usr bind; their data lives in real named volumes and bind mounts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from pathlib import Path

import pytest

import backup_before_apply as bba
from conftest import run_backup, run_tool, write_module

SEED = (
    "set -e; mkdir -p /app/data/sub /app/data/empty /app/conf; "
    "echo hello > /app/data/kuma.db; head -c 300000 /dev/urandom > /app/data/blob.bin; "
    "echo s > /app/data/sub/secret; chown 102:105 /app/data/sub /app/data/sub/secret; "
    "chmod 2750 /app/data/sub; chmod 0640 /app/data/sub/secret; chmod 1777 /app/data/empty; "
    "ln -s kuma.db /app/data/link; ln /app/data/kuma.db /app/data/hard; "
    "echo '[x]' > /app/conf/app.ini; chown 1234:5678 /app/conf/app.ini; chmod 0604 /app/conf/app.ini; "
    "touch -d '2001-02-03 04:05:06' /app/data/kuma.db"
)
NOTES_TAR = "tar --xattrs --xattrs-include='*' --acls --numeric-owner -xpf - -C /"  # as the restore notes say
LISTING = "cd / && find app -mindepth 1 -printf '%p %U %G %m %y %s %l %T@\\n' | sort && find app -type f | sort | xargs sha256sum"


@pytest.fixture
def kuma(docker_engine, tmp_path):
    """Module kuma (class E): a named volume and a bind mount, found by compose label."""
    platform = tmp_path / "platform"
    write_module(platform, "kuma")
    conf = tmp_path / "conf"
    conf.mkdir()
    docker_engine.run_container(
        "apps-kuma-1", "--label", "com.docker.compose.service=kuma",
        "-v", "kuma-data:/app/data", "-v", f"{conf}:/app/conf", "-v", "/etc/hostname:/etc/hostname:ro",
    )
    docker_engine.docker("exec", "apps-kuma-1", "sh", "-c", SEED)
    return docker_engine, platform


def backup(engine, platform, backup_dir, *args):
    return run_backup(engine, platform, "kuma", backup_dir, *args)


def listing(engine, container: str) -> str:
    """Every entry with owner, mode, type, size, link target and mtime (whole seconds), and file hashes."""
    out = engine.docker("exec", container, "sh", "-c", LISTING).stdout
    return re.sub(r" (\d+)\.\d+$", r" \1", out, flags=re.M)


def state(engine, container: str) -> dict:
    return engine.inspect(container)["State"]


def test_e2e_class_e_backup_restores_identical_files_owners_modes(kuma, tmp_path):
    engine, platform = kuma
    backup_dir = tmp_path / "backups"
    proc = backup(engine, platform, backup_dir)
    assert proc.returncode == 0, proc.stderr
    archive, manifest = map(Path, proc.stdout.split())
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600 and stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert "resolved by compose label com.docker.compose.service" in proc.stderr
    assert state(engine, "apps-kuma-1")["Running"] is True
    doc = json.loads(manifest.read_text())
    assert [m["destination"] for m in doc["mounts"]] == ["/app/conf", "/app/data"]
    assert {"destination": "/etc/hostname", "reason": "read-only"} in doc["skipped_mounts"]

    # The restore notes of class E, followed exactly, into a container with empty mounts.
    restored_conf = tmp_path / "restored-conf"
    restored_conf.mkdir()
    engine.run_container("kuma-restored", "-v", "kuma-restored:/app/data", "-v", f"{restored_conf}:/app/conf")
    engine.docker("exec", "kuma-restored", "sh", "-c", "rm -rf /app/data/* /app/conf/*")
    assert f"gunzip -c {archive} | docker run --rm -i --cap-add SYS_ADMIN --volumes-from apps-kuma-1 \\\n" in json.loads(manifest.read_text())["restore"]
    import subprocess
    unpacked = subprocess.run(["gunzip", "-c", str(archive)], capture_output=True, check=True).stdout
    notes = json.loads(manifest.read_text())["restore"]
    assert NOTES_TAR in notes
    engine.docker("run", "--rm", "-i", "--cap-add", "SYS_ADMIN", "--network", "none", "-v", "/usr:/usr:ro", "--volumes-from", "kuma-restored",
                  "bba-base:latest", *shlex.split(NOTES_TAR), input=unpacked)
    original, restored = listing(engine, "apps-kuma-1"), listing(engine, "kuma-restored")
    assert "app/data/sub 102 105 2750 d" in original and "app/conf/app.ini 1234 5678 604 f" in original
    assert restored == original


def test_e2e_via_docker_gives_the_same_archive_contents(kuma, tmp_path):
    engine, platform = kuma
    host = backup(engine, platform, tmp_path / "b")
    through = backup(engine, platform, tmp_path / "b", "--via-docker", "--json")
    assert host.returncode == 0 and through.returncode == 0, through.stderr
    doc = json.loads(through.stdout)
    assert {m["read_via"] for m in doc["mounts"]} == {"docker"}
    import tarfile

    def contents(path):
        with tarfile.open(path) as tar:
            return sorted((m.name, m.uid, m.gid, m.mode, m.type, m.size, m.linkname, int(m.mtime)) for m in tar.getmembers())
    assert contents(host.stdout.split()[0]) == contents(doc["backup_path"])


def test_e2e_pause_leaves_container_running_and_unpaused(kuma, tmp_path):
    engine, platform = kuma
    before = state(engine, "apps-kuma-1")
    proc = backup(engine, platform, tmp_path / "b", "--pause", "--json")
    assert proc.returncode == 0, proc.stderr
    after = state(engine, "apps-kuma-1")
    assert after["Running"] is True and after["Paused"] is False and after["Pid"] == before["Pid"]
    doc = json.loads(proc.stdout)
    assert doc["paused"] is True and doc["paused_seconds"] >= 0
    assert "is PAUSED for the archive" in proc.stderr and "unpaused after" in proc.stderr


def test_e2e_pause_failure_midway_still_unpauses(kuma, tmp_path):
    engine, platform = kuma
    backup_dir = tmp_path / "full"
    backup_dir.mkdir(mode=0o700)
    import subprocess
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(backup_dir)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        proc = backup(engine, platform, backup_dir, "--pause", "--no-space-check")
        assert proc.returncode == 1
        assert f"no space left on the filesystem of {backup_dir}" in proc.stderr.splitlines()[-1]
        assert sorted(p.name for p in backup_dir.iterdir()) == [".kuma.lock"]
    finally:
        subprocess.run(["umount", str(backup_dir)], check=True)
    after = state(engine, "apps-kuma-1")
    assert after["Running"] is True and after["Paused"] is False


def test_e2e_stopped_container_backed_up_at_rest_and_left_stopped(kuma, tmp_path):
    engine, platform = kuma
    engine.docker("stop", "-t", "1", "apps-kuma-1")
    proc = backup(engine, platform, tmp_path / "b", "--pause")
    assert proc.returncode == 0, proc.stderr
    assert "is not running (exited)" in proc.stderr
    assert state(engine, "apps-kuma-1")["Running"] is False
    import tarfile
    with tarfile.open(proc.stdout.split()[0]) as tar:
        assert "app/data/kuma.db" in tar.getnames()


def test_e2e_ambiguous_container_exit_2_lists_both(kuma, tmp_path):
    engine, platform = kuma
    engine.run_container("apps-kuma-2", "--label", "com.docker.compose.service=kuma", "-v", "kuma-data:/app/data")
    proc = backup(engine, platform, tmp_path / "b")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "backup-before-apply: error: module 'kuma': 2 containers match by compose label "
        "com.docker.compose.service: apps-kuma-1, apps-kuma-2; pass --container NAME"
    )
    assert not (tmp_path / "b").exists()
    assert backup(engine, platform, tmp_path / "b", "--container", "apps-kuma-2").returncode == 0


def test_e2e_list_against_running_containers(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "kuma")
    write_module(platform, "named")
    write_module(platform, "declared", container="the-vault")
    write_module(platform, "from-runbook", runbook="```\ndocker logs --tail 20 rb-app\n```\n")
    write_module(platform, "stopped")
    write_module(platform, "parked-one", lifecycle="parked")
    write_module(platform, "postgres")
    write_module(platform, "web", statefulness="stateless")
    engine.run_container("apps-kuma-1", "--label", "com.docker.compose.service=kuma", "-v", "kuma:/data")
    engine.docker("exec", "apps-kuma-1", "sh", "-c", "head -c 100000 /dev/zero > /data/x")
    engine.run_container("named", "-v", "named:/data")
    engine.run_container("the-vault", "-v", "vault:/vault/data")
    engine.run_container("rb-app", "-v", "rb:/data")
    engine.run_container("parked-one", "-v", "parked:/data")
    engine.run_container("stopped", "-v", "stopped:/data")
    engine.docker("stop", "-t", "1", "stopped")
    common = ("--list", "--platform-root", str(platform))
    proc = run_tool(*common, "--json", env=engine.env)
    assert proc.returncode == 0, proc.stderr
    rows = {row["module"]: row for row in json.loads(proc.stdout)}
    assert [r["module"] for r in json.loads(proc.stdout)][-1] == "web"  # stateless last
    assert rows["kuma"]["resolved_by"] == "compose label com.docker.compose.service" and rows["kuma"]["running"] is True
    assert 100000 <= rows["kuma"]["data_bytes"] <= 100000 + 3 * 4096  # the blocks it takes on disk (du), its directory included
    assert rows["named"]["resolved_by"] == "container name"
    assert rows["declared"]["container"] == "the-vault" and rows["declared"]["class_letter"] == "E"
    assert rows["from-runbook"]["container"] == "rb-app" and rows["from-runbook"]["resolved_by"] == "runbook runbook.md"
    assert rows["stopped"]["running"] is False and rows["stopped"]["state"] == "exited"
    assert rows["postgres"]["class_letter"] == "A" and rows["postgres"]["unresolved"] == "no container found"
    firsts = {m for m, r in rows.items() if r["first_candidate"]}
    assert firsts == {"kuma", "named", "declared", "from-runbook"}

    text = run_tool(*common, "--debug", env=engine.env)
    assert text.returncode == 0
    calls = int(re.search(r"programs run: docker (\d+)x", text.stderr).group(1))
    assert calls <= 5  # one ps, one batched inspect, info, context: not one call per module
    assert "6 stateful modules" not in text.stdout
    total = bba.human_size(sum(r["data_bytes"] or 0 for r in rows.values() if r["statefulness"] != "stateless"))
    assert f"7 stateful modules, 6 resolved, 5 running, {total} of data" in text.stdout
    assert "low-blast first candidates: declared, from-runbook, kuma, named" in text.stdout


@pytest.mark.parametrize(("signame", "status"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)])
def test_e2e_signal_while_paused_cleans_up(kuma, tmp_path, signame, status):
    import signal
    import subprocess
    import sys

    from conftest import TOOL

    engine, platform = kuma
    conf = next(Path(m["Source"]) for m in engine.inspect("apps-kuma-1")["Mounts"] if m["Destination"] == "/app/conf")
    (conf / "big.bin").write_bytes(os.urandom(96 << 20))  # incompressible: the archive takes a while
    backup_dir = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), "kuma", "--platform-root", str(platform), "--backup-dir", str(backup_dir),
         "--pause", "--compress-level", "9", "--allow-ci"],
        env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "archiving /app/conf" in line:
            break
    assert state(engine, "apps-kuma-1")["Paused"] is True, "".join(seen)
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, "".join(seen) + err
    assert err.strip().splitlines()[-1] == f"backup-before-apply: error: interrupted by {signame}; cleaned up, no backup written"
    assert out == ""
    after = state(engine, "apps-kuma-1")
    assert after["Running"] is True and after["Paused"] is False
    assert sorted(p.name for p in backup_dir.iterdir()) == [".kuma.lock"]


def test_make_demo_backs_up_drills_and_rolls_back(engine):
    """`make demo`, the README's first command, end to end (its own private dockerd)."""
    import subprocess

    from conftest import REPO

    proc = subprocess.run(["make", "-s", "demo"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("drill passed: the restored data matches the manifest") == 3
    assert "low-blast first candidates: forgejo, uptime-kuma" in proc.stdout
    assert "demo: 5 backups in" in proc.stderr and "uptime-kuma rolled back after a bad apply" in proc.stderr
    assert "restored and compared: equal" in proc.stdout


def test_e2e_mount_source_vanished_exit_1_no_file(kuma, tmp_path):
    import shutil
    engine, platform = kuma
    conf = next(m["Source"] for m in engine.inspect("apps-kuma-1")["Mounts"] if m["Destination"] == "/app/conf")
    shutil.rmtree(conf)
    proc = backup(engine, platform, tmp_path / "b")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"backup-before-apply: error: source of /app/conf vanished: {conf} does not exist"
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".kuma.lock"]


def test_e2e_docker_daemon_unreachable_exit_1_one_line(kuma, tmp_path):
    engine, platform = kuma
    env = {**engine.env, "DOCKER_HOST": f"unix://{tmp_path}/gone.sock"}
    proc = run_tool("kuma", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"), env=env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("backup-before-apply: error: `docker ps --all --quiet --no-trunc` exited 1: ") and "gone.sock" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_e2e_files_never_readable_by_others_while_written(kuma, tmp_path):
    """Watch the backup directory during a large backup: no entry is ever group/other-accessible."""
    import subprocess
    import sys
    import threading

    from conftest import TOOL

    engine, platform = kuma
    conf = next(Path(m["Source"]) for m in engine.inspect("apps-kuma-1")["Mounts"] if m["Destination"] == "/app/conf")
    (conf / "big.bin").write_bytes(os.urandom(48 << 20))
    backup_dir = tmp_path / "b"
    seen: dict[str, set[int]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for path in [backup_dir, *(backup_dir.iterdir() if backup_dir.exists() else [])]:
                try:
                    seen.setdefault(path.name, set()).add(stat.S_IMODE(os.lstat(path).st_mode))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, str(TOOL), "kuma", "--platform-root", str(platform), "--backup-dir", str(backup_dir),
                               "--allow-ci", "-q"], env=engine.env, capture_output=True, text=True, timeout=300)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr
    assert any(name.endswith(".tar.gz.partial") for name in seen), seen.keys()  # the watch did see the file being written
    assert {mode & 0o077 for modes in seen.values() for mode in modes} == {0}, seen


def test_e2e_progress_line_only_on_a_terminal(kuma, tmp_path):
    import pty
    import subprocess
    import sys

    from conftest import TOOL

    engine, platform = kuma
    conf = next(Path(m["Source"]) for m in engine.inspect("apps-kuma-1")["Mounts"] if m["Destination"] == "/app/conf")
    (conf / "big.bin").write_bytes(os.urandom(64 << 20))
    argv = [sys.executable, str(TOOL), "kuma", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"),
            "--allow-ci", "--compress-level", "9"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env={**engine.env, "BBA_GZIP_TOOL": "zlib"}, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal
    assert "\r\x1b[Kbackup-before-apply: archive: " in terminal and "MiB/s, ETA " in terminal
    plain = backup(engine, platform, tmp_path / "b")
    assert plain.returncode == 0 and "\r" not in plain.stderr and "MiB/s" not in plain.stderr
