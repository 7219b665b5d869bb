"""End to end on a real engine: xattrs, ACLs, capabilities, holes and deep paths survive a backup,
its drill and its restore notes; --pause freezes the container only while the data is read.

The source volume is built as test_fidelity builds its tree; what comes back is compared with
it by that file's lstat walk (owners, modes, mtimes, contents, xattrs, allocated blocks).
"""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import run_backup, run_tool, write_module
from test_fidelity import CAP_NET_RAW, build_tree, walk

import backup_before_apply as bba

NOTES_TAR = "tar --xattrs --xattrs-include='*' --acls --numeric-owner -xpf - -C /"


def mountpoint(engine, volume: str) -> Path:
    return Path(json.loads(engine.docker("volume", "inspect", volume).stdout)[0]["Mountpoint"])


def keeper_module(engine, tmp_path: Path, *, deep: bool = True):
    """Module "keeper": a container whose volume at /data holds what test_fidelity's tree holds."""
    platform = tmp_path / "platform"
    write_module(platform, "keeper")
    engine.docker("volume", "create", "keeper-data")
    build_tree(mountpoint(engine, "keeper-data"), deep=deep)
    engine.run_container("keeper", "-v", "keeper-data:/data")
    return engine, platform


@pytest.fixture
def vault_like(docker_engine, tmp_path):
    return keeper_module(docker_engine, tmp_path)


def entries(archive: str) -> dict[str, bba.TarEntry]:
    with open(archive, "rb") as fh, bba.decompressing(fh, "tar.gz") as raw:
        return {entry.name: entry for _, entry in bba.tar_entries(raw)}


def test_e2e_xattrs_acls_capabilities_and_holes_survive_backup_drill_and_restore_notes(vault_like, tmp_path):
    engine, platform = vault_like
    proc = run_backup(engine, platform, "keeper", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    archive, manifest = proc.stdout.split()
    doc = json.loads(Path(manifest).read_text())
    assert "socket ignored: /data/s.sock" in doc["warnings"] and "socket ignored: /data/s.sock" in proc.stderr
    assert doc["contents"]["sockets_ignored"] == 1
    assert Path(archive).stat().st_size < 20 << 20  # 420 MiB apparent, a few MiB of data

    verify = run_tool("--verify", archive, env=engine.env)
    assert verify.returncode == 0 and "listing" in verify.stdout, verify.stdout + verify.stderr
    drill = run_tool("--drill", archive, env=engine.env, timeout=600)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "restored with " in drill.stdout and "--xattrs --xattrs-include='*' --acls" in drill.stdout

    # The restore notes, followed literally, into a fresh volume; then everything compared with the source.
    assert NOTES_TAR in doc["restore"]
    engine.docker("volume", "create", "keeper-restored")
    engine.run_container("keeper-restored", "-v", "keeper-restored:/data")
    unpacked = subprocess.run(["gunzip", "-c", archive], capture_output=True, check=True).stdout
    assert "docker run --rm -i --cap-add SYS_ADMIN --volumes-from keeper" in doc["restore"]  # trusted.* xattrs need it
    engine.docker("run", "--rm", "-i", "--cap-add", "SYS_ADMIN", "--network", "none", "-v", "/usr:/usr:ro", "--volumes-from", "keeper-restored",
                  "bba-base:latest", *shlex.split(NOTES_TAR), input=unpacked)
    before, after = walk(mountpoint(engine, "keeper-data")), walk(mountpoint(engine, "keeper-restored"))
    assert before.pop("s.sock")[0] == stat.S_IFSOCK
    assert after == before


def test_e2e_pause_freezes_only_while_the_data_is_read(vault_like, tmp_path):
    engine, platform = vault_like
    plain = run_backup(engine, platform, "keeper", tmp_path / "plain")
    paused = run_backup(engine, platform, "keeper", tmp_path / "paused", "--pause")
    assert plain.returncode == 0 and paused.returncode == 0, paused.stderr
    doc = json.loads(Path(paused.stdout.split()[1]).read_text())
    assert doc["pause_mode"] == "staged" and doc["paused_seconds"] < doc["timings"]["duration_seconds"]
    assert engine.inspect("keeper")["State"]["Paused"] is False
    assert sorted(p.name for p in (tmp_path / "paused").iterdir() if p.name.startswith(".")) == [".keeper.lock"]
    assert doc["mounts"] == json.loads(Path(plain.stdout.split()[1]).read_text())["mounts"]  # the same entries, holes and xattrs


def test_e2e_docker_cp_keeps_the_capability_docker_sends(vault_like, tmp_path):
    """docker cp sends security.capability (and no other xattr); the archive keeps it, and --drill restores it."""
    engine, platform = vault_like
    engine.docker("exec", "keeper", "sh", "-c", "rm -rf /data/d[d]*")  # the deep path: docker cp cannot read it (README)
    proc = run_backup(engine, platform, "keeper", tmp_path / "b", "--via-docker")
    assert proc.returncode == 0, proc.stderr
    archive = proc.stdout.split()[0]
    assert "socket ignored: /data/s.sock" in proc.stderr  # docker cp leaves it out; find inside the container sees it
    assert entries(archive)["data/d/f"].xattrs == {"security.capability": CAP_NET_RAW}
    drill = run_tool("--drill", archive, env=engine.env, timeout=600)
    assert drill.returncode == 0, drill.stdout + drill.stderr
