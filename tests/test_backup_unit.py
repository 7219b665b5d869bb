"""The backup command end to end in-process, with only `run` faked (no Docker needed).

Mounts point at real directories under tmp_path, so the archive, the private files,
the guards and the cleanup are all real; only docker's answers are canned.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

import backup_before_apply as bba
from conftest import fake_container, write_module


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    volume = tmp_path / "volumes" / "kuma" / "_data"
    (volume / "sub").mkdir(parents=True)
    (volume / "kuma.db").write_bytes(b"sqlite" * 1000)
    (volume / "sub" / "secret").write_text("s")
    os.chown(volume / "sub", 102, 105)
    os.chmod(volume / "sub", 0o2750)
    os.symlink("kuma.db", volume / "link")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "app.ini").write_text("[x]\n")
    localtime = tmp_path / "localtime"
    localtime.write_text("tz")
    return {"volume": volume, "conf": conf, "localtime": localtime}


def mounts(data: dict[str, Path]) -> list[dict]:
    return [
        {"Type": "volume", "Name": "kuma", "Source": str(data["volume"]), "Destination": "/app/data", "RW": True},
        {"Type": "bind", "Source": str(data["conf"]), "Destination": "/app/conf", "RW": True},
        {"Type": "bind", "Source": str(data["localtime"]), "Destination": "/etc/tz", "RW": True},
        {"Type": "bind", "Source": "/usr", "Destination": "/usr", "RW": False},
        {"Type": "tmpfs", "Source": "", "Destination": "/run", "RW": True},
        {"Type": "bind", "Source": "/var/run/docker.sock", "Destination": "/var/run/docker.sock", "RW": True},
    ]


@pytest.fixture
def kuma(platform, data, fake_docker):
    write_module(platform, "kuma")
    return fake_docker(fake_container("kuma", mounts(data), labels={"com.docker.compose.service": "kuma"}))


def backup(platform: Path, backup_dir: Path, *extra: str, env: dict[str, str] | None = None) -> int:
    return bba.main(["kuma", "--platform-root", str(platform), "--backup-dir", str(backup_dir), *extra], env=env or {})


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_backup_writes_private_archive_and_manifest(platform, tmp_path, kuma, capsys):
    backup_dir = tmp_path / "new" / "backups"
    assert backup(platform, backup_dir) == 0
    out = capsys.readouterr().out.splitlines()
    archive, manifest = Path(out[0]), Path(out[1])
    assert archive.name.startswith("kuma-") and archive.name.endswith(".tar.gz")
    assert manifest.name == archive.name.replace(".tar.gz", ".manifest.json")
    assert stat.S_IMODE(os.stat(backup_dir).st_mode) == 0o700
    for path in (archive, manifest):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in backup_dir.iterdir()) == sorted([archive.name, manifest.name, ".kuma.lock"])

    got = members(archive)
    assert set(got) == {"app/conf", "app/conf/app.ini", "app/data", "app/data/kuma.db", "app/data/link", "app/data/sub", "app/data/sub/secret"}
    assert (got["app/data/sub"].uid, got["app/data/sub"].gid, got["app/data/sub"].mode) == (102, 105, 0o2750)
    assert got["app/data/sub"].uname == "" and got["app/data/link"].linkname == "kuma.db"

    doc = json.loads(manifest.read_text())
    assert doc["module"] == "kuma" and doc["class"] == "E" and doc["procedure"] == "mounted-archive"
    assert doc["container"]["resolved_by"] == "compose label com.docker.compose.service"
    assert doc["bytes"] == archive.stat().st_size
    import hashlib
    assert doc["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert doc["verification"] == {"gzip_complete": True, "tar_readable": True, "members": 7,
                                   "listing": "every mount's entries, files and bytes read back as written; its listing digest taken from the archive"}
    assert {m["destination"] for m in doc["mounts"]} == {"/app/data", "/app/conf"}
    skipped = {m["destination"]: m["reason"] for m in doc["skipped_mounts"]}
    assert skipped == {"/etc/tz": "single-file bind", "/usr": "read-only", "/run": "tmpfs mount", "/var/run/docker.sock": "docker socket"}
    assert str(archive) in doc["restore"] and "{backup}" not in doc["restore"]


def test_backup_files_are_private_even_with_permissive_umask(platform, tmp_path, kuma, capsys):
    old = os.umask(0)
    try:
        assert backup(platform, tmp_path / "parent" / "b") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "parent").stat().st_mode) == 0o700  # parents the tool creates too
    assert stat.S_IMODE((tmp_path / "parent" / "b").stat().st_mode) == 0o700
    for path in (tmp_path / "parent" / "b").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_backup_json_output_is_the_manifest(platform, tmp_path, kuma, capsys):
    assert backup(platform, tmp_path / "b", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["module"] == "kuma" and Path(doc["backup_path"]).is_file() and Path(doc["manifest_path"]).is_file()


def test_backup_dry_run_touches_nothing_and_prints_plan(platform, tmp_path, kuma, capsys):
    backup_dir = tmp_path / "b"
    assert backup(platform, backup_dir, "--dry-run", "--pause") == 0
    assert not backup_dir.exists()
    out = capsys.readouterr().out
    assert "would run: docker pause kuma" in out and "would run: docker unpause kuma" in out
    assert f"would write: {backup_dir}/kuma-" in out and ".tar.gz.partial (mode 0600" in out
    assert "pause" not in kuma.subcommands() and "unpause" not in kuma.subcommands()


def test_backup_pause_pauses_then_unpauses(platform, tmp_path, kuma, capsys):
    assert backup(platform, tmp_path / "b", "--pause") == 0
    subs = kuma.subcommands()
    assert subs.index("pause") < subs.index("unpause") and subs.count("unpause") == 1
    manifest = json.loads(next((tmp_path / "b").glob("*.manifest.json")).read_text())
    assert manifest["paused"] is True and manifest["paused_seconds"] is not None


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str = "64k"):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_backup_disk_full_removes_partial_unpauses_and_exits_1(platform, tmp_path, data, kuma, capsys):
    (data["volume"] / "big").write_bytes(os.urandom(512 * 1024))  # incompressible, > 64k
    with tiny_filesystem(tmp_path / "full") as backup_dir:
        assert backup(platform, backup_dir, "--pause", "--no-space-check") == 1
        assert [p.name for p in backup_dir.iterdir()] == [".kuma.lock"]
    err = capsys.readouterr().err
    assert f"no space left on the filesystem of {backup_dir}" in err
    assert err.strip().splitlines()[-1].startswith("backup-before-apply: error: ")
    assert kuma.subcommands().count("unpause") == 1


def test_backup_failing_with_a_staging_copy_it_cannot_remove_ends_with_its_own_error(platform, tmp_path, data, kuma, capsys, monkeypatch):
    """A full disk while staging, then a staging directory that will not go (busy): the error is the full disk; the next run removes it."""
    (data["volume"] / "big").write_bytes(os.urandom(512 * 1024))  # incompressible, > 64k
    real_rmdir, busy = os.rmdir, [True]

    def rmdir(name, dir_fd=None):
        if busy[0] and str(name).endswith(".pause-staging"):
            raise OSError(16, "Device or resource busy")
        real_rmdir(name, dir_fd=dir_fd)

    monkeypatch.setattr(bba.os, "rmdir", rmdir)
    with tiny_filesystem(tmp_path / "full") as backup_dir:
        assert backup(platform, backup_dir, "--pause", "--no-space-check") == 1
        busy[0] = False
        staging = [p.name for p in backup_dir.iterdir() if p.name.endswith(".pause-staging")]
        assert len(staging) == 1 and os.listdir(backup_dir / staging[0]) == []  # emptied, not removed
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1] == (f"backup-before-apply: error: no space left on the filesystem of {backup_dir}/{staging[0]} (No space left on device); "
                             "partial backup removed")
        assert (f"backup-before-apply: warning: cannot remove {backup_dir}/{staging[0]}: Device or resource busy; "
                "the next run of this module removes what is left") in lines
        assert kuma.subcommands().count("unpause") == 1
        (data["volume"] / "big").unlink()
        assert backup(platform, backup_dir, "--pause", "--no-space-check") == 0
        assert f"removing {staging[0]}/ left by an interrupted run" in capsys.readouterr().err
        assert not [p for p in backup_dir.iterdir() if p.name.endswith("-staging")]


@pytest.mark.parametrize(("compression", "tool"), [("gzip", "zlib"), ("gzip", "pigz"), ("zstd", "zstd")])
def test_backup_disk_full_with_more_than_the_pipes_hold_fails_fast(platform, tmp_path, data, kuma, capsys, compression, tool):
    """The compressor's output outgrows its pipes after the disk is full: the archiver must not wait on it for ever."""
    (data["volume"] / "big").write_bytes(os.urandom(16 << 20))  # incompressible: far more than the 1 MiB pipes

    def hung(signum, frame):
        raise AssertionError("the backup hung after the disk filled up")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with tiny_filesystem(tmp_path / "full") as backup_dir:
            env = {"BBA_COMPRESSION": compression, "BBA_GZIP_TOOL": tool if compression == "gzip" else "auto"}
            assert backup(platform, backup_dir, "--no-space-check", env=env) == 1
            assert [p.name for p in backup_dir.iterdir()] == [".kuma.lock"]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"backup-before-apply: error: no space left on the filesystem of {backup_dir} (No space left on device); partial backup removed")


def test_backup_unpause_failure_is_loud(platform, tmp_path, kuma, capsys):
    kuma.fail_on["unpause"] = "Error response from daemon: boom"
    assert backup(platform, tmp_path / "b", "--pause") == 1
    assert "container kuma is STILL PAUSED; run `docker unpause kuma` now" in capsys.readouterr().err
    assert not list((tmp_path / "b").glob("*.tar.gz"))


def test_backup_unpause_timing_out_says_still_paused(platform, tmp_path, kuma, capsys):
    kuma.hang_on.add("unpause")
    assert backup(platform, tmp_path / "b", "--pause") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("backup-before-apply: error: container kuma is STILL PAUSED; run `docker unpause kuma` now (")
    assert "timed out" in last
    assert not list((tmp_path / "b").glob("*.tar.gz"))


def stalling_pigz(tmp_path, monkeypatch) -> None:
    real = shutil.which("pigz")
    fake_program(tmp_path, monkeypatch, "pigz", f"#!/bin/sh\nsleep 3\nexec {real} \"$@\"\n")  # a compressor that stalls


def no_room_to_stage(monkeypatch, backup_dir: Path, free: int) -> None:
    """The backup's filesystem has room for the archive, not for a staging copy besides it."""
    real = os.statvfs

    def statvfs(path):
        found = real(path)
        if Path(path) not in (backup_dir, backup_dir.parent):
            return found
        return os.statvfs_result((*found[:4], free // found.f_frsize, *found[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_backup_pause_lasts_only_while_the_data_is_read(platform, tmp_path, data, kuma, capsys, monkeypatch):
    """--pause stages an uncompressed copy, unpauses, then compresses: a compressor slower than pause_timeout does not matter."""
    (data["volume"] / "big").write_bytes(os.urandom(8 << 20))
    stalling_pigz(tmp_path, monkeypatch)
    started = time.monotonic()
    assert backup(platform, tmp_path / "b", "--pause", "--pause-timeout", "1", env={"BBA_GZIP_TOOL": "pigz"}) == 0
    assert time.monotonic() - started > 3
    manifest = json.loads(next((tmp_path / "b").glob("*.manifest.json")).read_text())
    assert manifest["pause_mode"] == "staged" and manifest["paused_seconds"] < 1
    assert kuma.subcommands().count("unpause") == 1
    assert not list((tmp_path / "b").glob(".*staging*"))


def test_backup_pause_without_room_to_stage_pauses_the_whole_run_and_says_so(platform, tmp_path, data, kuma, capsys, monkeypatch):
    (data["volume"] / "big").write_bytes(os.urandom(8 << 20))
    no_room_to_stage(monkeypatch, tmp_path / "b", free=12 << 20)  # the 8 MiB archive fits once, not twice
    assert backup(platform, tmp_path / "b", "--pause", "--space-margin-mb", "1") == 0
    err = capsys.readouterr().err
    assert "--pause: no room for a staging copy: " in err and "kuma stays PAUSED for the whole backup, compression included" in err
    manifest = json.loads(next((tmp_path / "b").glob("*.manifest.json")).read_text())
    assert manifest["pause_mode"].startswith("whole run (no room for a staging copy: ")


def test_backup_pause_longer_than_pause_timeout_is_unpaused_and_discarded(platform, tmp_path, data, kuma, capsys, monkeypatch):
    (data["volume"] / "big").write_bytes(os.urandom(8 << 20))  # more than the pipes hold, so the archive waits on the compressor
    stalling_pigz(tmp_path, monkeypatch)
    no_room_to_stage(monkeypatch, tmp_path / "b", free=12 << 20)  # so the pause lasts the whole run, compression included
    started = time.monotonic()
    code = backup(platform, tmp_path / "b", "--pause", "--pause-timeout", "1", "--space-margin-mb", "1", env={"BBA_GZIP_TOOL": "pigz"})
    assert code == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("backup-before-apply: error: container kuma stayed paused for pause_timeout (1s); "
                                            "it was unpaused and the archive, no longer a frozen copy, was discarded")
    assert kuma.subcommands().count("unpause") == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".kuma.lock"]


def test_main_debug_failure_keeps_the_error_line_last(platform, tmp_path, kuma, capsys):
    kuma.fail_on["info"] = "\n".join(f"daemon says {i}" for i in range(9))
    assert backup(platform, tmp_path / "b", "--debug") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("backup-before-apply: error: `docker info --format '{{json .}}'` exited 1: daemon says 4 | ")
    assert "backup-before-apply: daemon says 0" in lines  # the whole stderr, before the error line
    assert any("programs run: docker" in line for line in lines[:-1])


def test_backup_refuses_container_paused_by_someone_else(platform, tmp_path, data, fake_docker, capsys):
    write_module(platform, "kuma")
    fake = fake_docker(fake_container("kuma", mounts(data), paused=True))
    assert backup(platform, tmp_path / "b", "--pause") == 3
    assert "already paused by someone else" in capsys.readouterr().err
    assert "pause" not in fake.subcommands() and "unpause" not in fake.subcommands()


def test_backup_stopped_container_archives_data_at_rest(platform, tmp_path, data, fake_docker, capsys):
    write_module(platform, "kuma")
    fake = fake_docker(fake_container("kuma", mounts(data), running=False))
    assert backup(platform, tmp_path / "b", "--pause") == 0
    assert "is not running (exited); its data is at rest" in capsys.readouterr().err
    assert "pause" not in fake.subcommands()


def test_backup_no_writable_mounts_fails(platform, tmp_path, fake_docker, capsys):
    write_module(platform, "kuma")
    fake_docker(fake_container("kuma", [{"Type": "bind", "Source": "/usr", "Destination": "/usr", "RW": False}]))
    assert backup(platform, tmp_path / "b") == 1
    assert "has no writable mounts to archive" in capsys.readouterr().err


def test_backup_ambiguous_container_exits_2_and_writes_nothing(platform, tmp_path, data, fake_docker, capsys):
    write_module(platform, "kuma")
    labels = {"com.docker.compose.service": "kuma"}
    fake_docker(fake_container("kuma-1", mounts(data), labels=labels), fake_container("kuma-2", mounts(data), labels=labels))
    assert backup(platform, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "kuma-1, kuma-2" in err and len(err.strip().splitlines()) == 2  # the class line, then the error
    assert not (tmp_path / "b").exists()


def test_backup_existing_partial_is_stale_and_removed(platform, tmp_path, kuma, capsys):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir(mode=0o700)
    stale = backup_dir / "kuma-20200101T000000Z.tar.gz.partial"
    stale.write_text("half")
    other = backup_dir / "kuma-extra-20200101T000000Z.tar.gz.partial"
    other.write_text("another module's")
    assert backup(platform, backup_dir) == 0
    assert not stale.exists() and other.exists()


# ---------------------------------------------------------------- guards


def test_main_under_ci_refuses_with_exit_3(platform, tmp_path, kuma, capsys):
    assert backup(platform, tmp_path / "b", env={"CI": "true"}) == 3
    assert capsys.readouterr().err.strip() == (
        "backup-before-apply: refused: CI is set: this tool is run by an operator, never by a CI runner (override: --allow-ci)"
    )
    assert not (tmp_path / "b").exists()
    assert backup(platform, tmp_path / "b", env={"GITHUB_ACTIONS": "true"}) == 3
    assert backup(platform, tmp_path / "b", env={"CI": "false"}) == 0
    assert backup(platform, tmp_path / "c", "--allow-ci", env={"CI": "true"}) == 0


def test_main_not_root_refuses_with_exit_3(platform, tmp_path, kuma, capsys, monkeypatch):
    monkeypatch.setattr(bba.os, "geteuid", lambda: 1000)
    assert backup(platform, tmp_path / "b") == 3
    assert "must run as root" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    backup(platform, tmp_path / "b", "--allow-non-root")
    assert "must run as root" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../x", "/etc", "x/../../etc", "UPPER", "a b", "ünï", ".."])
def test_main_invalid_module_id_exit_2_before_touching_anything(tmp_path, bad, capsys):
    backup_dir = tmp_path / "b"
    assert bba.main(["--platform-root", str(tmp_path), "--backup-dir", str(backup_dir), "--", bad], env={}) == 2
    assert "invalid module id" in capsys.readouterr().err
    assert not backup_dir.exists()


def test_main_leading_dash_id_is_usage_error(capsys):
    assert bba.main(["-x"], env={}) == 2
    assert bba.main(["--", "-x"], env={}) == 2
    assert "invalid module id '-x'" in capsys.readouterr().err


def test_main_unknown_module_exit_2(platform, tmp_path, capsys):
    assert backup(platform, tmp_path / "b") == 2
    assert "unknown module 'kuma'" in capsys.readouterr().err


def test_main_stateless_module_refused(platform, tmp_path, capsys):
    write_module(platform, "kuma", statefulness="stateless")
    assert backup(platform, tmp_path / "b") == 3
    assert "is stateless" in capsys.readouterr().err


def test_main_usage_errors_exit_2(capsys):
    assert bba.main([], env={}) == 2
    assert bba.main(["x", "--list"], env={}) == 2
    assert bba.main(["--list", "--pause"], env={}) == 2
    assert bba.main(["--list", "--bogus"], env={}) == 2
    assert bba.main(["--lis"], env={}) == 2  # no abbreviations
    assert bba.main(["x", "--procedure", "nope"], env={}) == 2
    err = capsys.readouterr().err
    assert ("give exactly one of MODULE_ID [MODULE_ID ...], --list, --coverage, --check MODULE_ID, --prune [MODULE_ID ...], "
            "--verify FILE, --drill FILE or --restore FILE (got MODULE_ID, --list)") in err
    assert "--pause applies to a backup, not to --list" in err


def test_main_version(capsys):
    assert bba.main(["--version"], env={}) == 0
    assert bba.__version__ in capsys.readouterr().out


def test_main_malformed_classes_exit_2(platform, tmp_path, kuma, capsys):
    bad = tmp_path / "classes.toml"
    bad.write_text("[classes\n")
    assert backup(platform, tmp_path / "b", "--classes", str(bad)) == 2
    assert f"{bad}: malformed TOML" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["symlink", "group-writable", "other-owner", "file"])
def test_backup_dir_unsafe_refused_exit_3(platform, tmp_path, kuma, capsys, problem):
    backup_dir = tmp_path / "b"
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    if problem == "symlink":
        backup_dir.symlink_to(real)
    elif problem == "file":
        backup_dir.write_text("")
    else:
        backup_dir.mkdir(mode=0o700)
        if problem == "group-writable":
            os.chmod(backup_dir, 0o770)
        else:
            os.chown(backup_dir, 12345, 12345)
    assert backup(platform, backup_dir) == 3
    assert "refused: backup directory" in capsys.readouterr().err
    assert list(real.iterdir()) == []
    if backup_dir.is_dir() and not backup_dir.is_symlink():
        assert list(backup_dir.iterdir()) == []


def test_backup_dir_readable_by_others_is_tightened(platform, tmp_path, kuma, capsys):
    backup_dir = tmp_path / "b"
    backup_dir.mkdir(mode=0o755)
    os.chmod(backup_dir, 0o755)
    assert backup(platform, backup_dir) == 0
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert "tightened to 0700" in capsys.readouterr().err


# ---------------------------------------------------------------- partial files and locks


def open_dir(path: Path) -> int:
    path.mkdir(mode=0o700, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_partial_file_removed_on_error_and_commit_never_overwrites(tmp_path):
    fd = open_dir(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with bba.PartialFile(fd, "x.tar.gz", tmp_path / "d") as out:
            out.write(b"data")
            assert (tmp_path / "d" / "x.tar.gz.partial").exists()
            raise RuntimeError("boom")
    assert list((tmp_path / "d").iterdir()) == []
    (tmp_path / "d" / "x.tar.gz").write_text("old")
    with pytest.raises(bba.BackupError, match="refusing to overwrite"):
        with bba.PartialFile(fd, "x.tar.gz", tmp_path / "d") as out:
            out.write(b"new")
            out.commit()
    assert (tmp_path / "d" / "x.tar.gz").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.tar.gz"]


def test_partial_file_planted_symlink_is_not_followed(tmp_path):
    fd = open_dir(tmp_path / "d")
    target = tmp_path / "target"
    target.write_text("precious")
    (tmp_path / "d" / "x.partial").symlink_to(target)
    with pytest.raises(bba.RefusedError, match="already exists"):
        with bba.PartialFile(fd, "x", tmp_path / "d"):
            pass
    assert target.read_text() == "precious"


def test_partial_file_hashes_while_writing(tmp_path):
    import hashlib
    fd = open_dir(tmp_path / "d")
    with bba.PartialFile(fd, "x", tmp_path / "d") as out:
        out.write(b"abc")
        out.write(b"def")
        path = out.commit()
    assert out.sha256.hexdigest() == hashlib.sha256(b"abcdef").hexdigest() and out.size == 6
    assert path.read_bytes() == b"abcdef" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_module_lock_second_holder_refused_with_pid(tmp_path):
    fd = open_dir(tmp_path / "d")
    with bba.module_lock(fd, "kuma", 0):
        other = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
        with pytest.raises(bba.RefusedError, match=rf"another backup of 'kuma' is running \(pid {os.getpid()}"):
            with bba.module_lock(other, "kuma", 0.3):
                pass
        with bba.module_lock(other, "other-module", 0):
            pass  # different modules proceed in parallel
    with bba.module_lock(fd, "kuma", 0):
        pass  # released


def test_module_lock_left_by_killed_process_does_not_block(tmp_path):
    fd = open_dir(tmp_path / "d")
    subprocess.run(
        ["python3", "-c", f"import fcntl,os; f=os.open('{tmp_path}/d/.kuma.lock', os.O_RDWR|os.O_CREAT); "
         "fcntl.flock(f, fcntl.LOCK_EX); os.write(f, b'999999'); os.kill(os.getpid(), 9)"],
    )
    with bba.module_lock(fd, "kuma", 0):
        assert (tmp_path / "d" / ".kuma.lock").read_text().strip() == str(os.getpid())


def test_scan_tar_walks_the_rdb_members_it_is_asked_to_and_detects_truncation():
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        for name, body in (("data/dump.rdb", b"REDIS0010\xfa"), ("data/other", b"abc"), ("data/x.rdb", b"not an rdb")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    assert bba.scan_tar(io.BytesIO(data))["members"] == 3
    found = bba.scan_tar(io.BytesIO(data), rdb=bba.is_rdb_name)
    assert found["members"] == 3 and set(found["rdb"]) == {"data/dump.rdb", "data/x.rdb"}
    assert "cut short" in found["rdb"]["data/dump.rdb"]["error"] and found["rdb"]["data/dump.rdb"]["version"] == 10
    assert "no REDIS magic" in found["rdb"]["data/x.rdb"]["error"]
    with pytest.raises(bba.BackupError, match="not a complete tar.gz"):
        bba.scan_tar(io.BytesIO(data[:-10]), rdb=bba.is_rdb_name)


def test_scan_sql_requires_trailer_and_size():
    body = b"--\n-- PostgreSQL database cluster dump\n--\n" + b"SET x = 1;\n" * 40 + bba.PG_TRAILER + b"\n--\n\n"
    assert bba.scan_sql(io.BytesIO(gzip.compress(body)))["sql_bytes"] == len(body)
    with pytest.raises(bba.BackupError, match="no trailer line"):
        bba.scan_sql(io.BytesIO(gzip.compress(body[:-30])))
    with pytest.raises(bba.BackupError, match="too small"):
        bba.scan_sql(io.BytesIO(gzip.compress(bba.PG_TRAILER)))
    with pytest.raises(bba.BackupError, match="not a complete gzip stream"):
        bba.scan_sql(io.BytesIO(gzip.compress(body)[:-8]))


# ---------------------------------------------------------------- engine replies


def test_parse_info_reads_fields_and_skips_sections():
    info = bba.parse_info("# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:1\r\n\r\n# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\n")
    assert info == {"loading": "0", "rdb_bgsave_in_progress": "1", "db0": "keys=3,expires=0,avg_ttl=0"}


@pytest.mark.parametrize("reply", ["ERR unknown command 'BGSAVE'", "NOAUTH Authentication required.", "NOPERM this user has no permissions", ""])
def test_redis_cli_error_replies_raise_although_exit_status_is_0(monkeypatch, reply):
    monkeypatch.setattr(bba, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 0, reply.encode() + b"\n", b""))
    with pytest.raises(bba.RedisReplyError):
        bba.redis_cli(bba.RedisTarget("c", {}), "BGSAVE", timeout=1)


def test_redis_target_password_from_operator_env_then_container_env_never_in_argv(monkeypatch):
    container = fake_container("cache")
    container["Config"]["Env"] = ["REDIS_PASSWORD=from-container", "OTHER=x"]
    settings = bba.Settings()
    assert bba.redis_target(container, settings, {"REDIS_PASSWORD": "from-operator"}).secrets == {"REDISCLI_AUTH": "from-operator"}
    target = bba.redis_target(container, settings, {})
    assert target.secrets == {"REDISCLI_AUTH": "from-container"}
    argv = bba.exec_argv("cache", ["redis-cli", "PING"], secrets=target.secrets)
    mark = bba.exec_mark(argv)
    assert mark is not None and mark.startswith("BBA_EXEC=")
    assert argv == ["docker", "exec", "-e", mark, "-e", "REDISCLI_AUTH", "cache", "redis-cli", "PING"]
    assert bba.exec_container(argv) == "cache"
    assert "from-container" not in " ".join(argv)


def fake_program(tmp_path: Path, monkeypatch, name: str, script: str) -> None:
    """Put a shell script called name first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_backup_compressor_dying_midway_names_it(platform, tmp_path, data, kuma, capsys, monkeypatch):
    (data["volume"] / "big").write_bytes(os.urandom(16 << 20))
    fake_program(tmp_path, monkeypatch, "zstd", "head -c 4096 >/dev/null\necho 'zstd: simulated crash' >&2\nexit 3")
    assert backup(platform, tmp_path / "b", "--compression", "zstd") == 1
    assert [p.name for p in (tmp_path / "b").iterdir()] == [".kuma.lock"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "backup-before-apply: error: `zstd -2 -T0 -q -c` exited 3: zstd: simulated crash")


@pytest.mark.parametrize(("error", "line"), [
    (OSError(5, "Input/output error", "/var/lib/docker/volumes/kuma/_data/kuma.db"),
     "error: /var/lib/docker/volumes/kuma/_data/kuma.db: Input/output error"),
    (KeyError("boom"), "error: internal error, a bug (run with --debug for the traceback): KeyError: 'boom'"),
])
def test_backup_unexpected_error_is_one_line_and_leaves_nothing(platform, tmp_path, kuma, capsys, monkeypatch, error, line):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(bba, "archive_items", failing)
    assert backup(platform, tmp_path / "b") == 1
    assert [p.name for p in (tmp_path / "b").iterdir()] == [".kuma.lock"]
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"backup-before-apply: {line}" and "Traceback" not in err


@pytest.mark.parametrize("compressor", ["zstd", "pigz", "zlib"])
def test_backup_verification_sees_what_the_compressor_wrote(platform, tmp_path, data, kuma, capsys, monkeypatch, compressor):
    """A compressor that writes a cut-short stream: the in-flight verification refuses it, nothing is published."""
    (data["volume"] / "big").write_bytes(os.urandom(1 << 20))
    if compressor == "zlib":
        real = bba._deflate_block
        monkeypatch.setattr(bba, "_deflate_block", lambda block, window, level, last: real(block, window, level, last)[:-100] if last else real(block, window, level, last))
    else:
        fake_program(tmp_path, monkeypatch, compressor, f"{shutil.which(compressor)} \"$@\" | head -c 300000")
    env = {"BBA_COMPRESSION": "zstd" if compressor == "zstd" else "gzip", "BBA_GZIP_TOOL": compressor if compressor != "zstd" else "auto"}
    assert backup(platform, tmp_path / "b", env=env) == 1
    assert [p.name for p in (tmp_path / "b").iterdir()] == [".kuma.lock"]
    fmt = "tar.zst" if compressor == "zstd" else "tar.gz"
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"backup-before-apply: error: archive is not a complete {fmt} (")


def test_stream_verifier_stops_the_writer_once_the_scan_has_failed():
    def scan(fh):
        fh.read(10)
        raise bba.BackupError("archive is not a complete tar.gz (bad)")

    verifier = bba.StreamVerifier(scan)
    verifier.feed(b"x" * 10)
    deadline = time.monotonic() + 10
    while verifier.error is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the scan fails on its thread, which then keeps draining the pipe
    with pytest.raises(bba.BackupError, match="bad"):
        verifier.feed(b"more")
    with pytest.raises(bba.BackupError, match="bad"):
        verifier.finish()


def test_pg_target_uses_container_user_and_password_by_name():
    container = fake_container("db")
    container["Config"]["Env"] = ["POSTGRES_USER=appadmin", "POSTGRES_PASSWORD=pw"]
    target = bba.pg_target(container)
    assert (target.user, target.secrets) == ("appadmin", {"PGPASSWORD": "pw"})
    assert bba.pg_target(fake_container("db2")).user == "postgres"


def test_backup_manifest_write_failure_removes_the_backup(platform, tmp_path, kuma, capsys):
    """Disk full exactly at the manifest: the archive must not stay behind looking finished."""
    assert backup(platform, tmp_path / "probe") == 0
    size = next((tmp_path / "probe").glob("*.tar.gz")).stat().st_size
    capsys.readouterr()
    with tiny_filesystem(tmp_path / "full", size="256k") as backup_dir:
        block = os.statvfs(backup_dir).f_frsize
        room = (size + block - 1) // block * block + block  # the archive, and the lock file's pid
        filler = backup_dir / "filler"
        free = os.statvfs(backup_dir).f_bavail * block
        filler.write_bytes(b"\0" * (free - room))
        assert backup(platform, backup_dir, "--no-space-check") == 1
        assert sorted(p.name for p in backup_dir.iterdir()) == [".kuma.lock", "filler"]
    assert "no space left" in capsys.readouterr().err


def test_main_pause_with_pg_dumpall_is_usage_error(platform, tmp_path, fake_docker, capsys):
    write_module(platform, "postgres")
    fake = fake_docker(fake_container("postgres"))
    assert bba.main(["postgres", "--pause", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b")], env={}) == 2
    assert "--pause does not apply to pg-dumpall" in capsys.readouterr().err
    assert "pause" not in fake.subcommands()


def test_free_space_check_walks_the_mounts_only_when_all_the_space_used_around_them_may_not_fit(platform, tmp_path, data, kuma, capsys, monkeypatch):
    walked: list[str] = []
    real = bba.tree_size
    monkeypatch.setattr(bba, "tree_size", lambda path: walked.append(path) or real(path))
    assert backup(platform, tmp_path / "b") == 0
    err = capsys.readouterr().err
    assert walked == [] and "(at most: all the space used on the filesystem(s) of the mounts, which fits, so the mounts were not walked)" in err
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    monkeypatch.setattr(bba, "used_on_filesystems", lambda paths: free)  # no room for it and the margin
    assert backup(platform, tmp_path / "b") == 0
    assert data["volume"].resolve() in {Path(p).resolve() for p in walked} and "(size of the mounted data)" in capsys.readouterr().err


def test_backup_refused_before_touching_anything_when_space_is_short(platform, tmp_path, data, kuma, capsys):
    (data["volume"] / "big").write_bytes(os.urandom(300 * 1024))
    with tiny_filesystem(tmp_path / "small", size="1m") as backup_dir:
        assert backup(platform, backup_dir, "--pause", "--space-margin-mb", "1") == 3
        assert list(backup_dir.iterdir()) == []
        err = capsys.readouterr().err
        assert re.search(r"refused: not enough space for kuma: about 3\d\d\.\d KiB \(size of the mounted data\) plus a 1\.0 MiB margin", err)
        assert "pause" not in kuma.subcommands()
        assert backup(platform, backup_dir, "--space-margin-mb", "0") == 0  # it fits without the margin


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize(("fmt", "tool"), [("gzip", "zlib"), ("gzip", "pigz"), ("zstd", "zstd")])
def test_compressing_round_trip_hashes_what_is_written(tmp_path, fmt, tool):
    import hashlib
    if shutil.which(tool if tool != "zlib" else "true") is None:
        pytest.fail(f"{tool} is not installed (.ci/deps installs it)")
    fd = open_dir(tmp_path / "d")
    payload = os.urandom(300_000) + b"text " * 100_000
    compression = bba.Compression(fmt, 3, tool)
    with bba.PartialFile(fd, "x", tmp_path / "d") as out:
        with bba.compressing(out, compression) as packed:
            for i in range(0, len(payload), 65536):
                packed.write(payload[i:i + 65536])
        path = out.commit()
    assert out.sha256.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as fh, bba.decompressing(fh, f"tar.{bba.COMPRESSION_SUFFIX[fmt]}") as raw:
        assert raw.read() == payload


def test_decompressing_damaged_zstd_is_a_backup_error(tmp_path):
    path = tmp_path / "x.zst"
    path.write_bytes(subprocess.run(["zstd", "-c", "-q"], input=b"data" * 1000, capture_output=True, check=True).stdout[:-6])
    with pytest.raises(bba.BackupError, match="not a complete zstd stream"):
        with open(path, "rb") as fh, bba.decompressing(fh, "sql.zst") as raw:
            raw.read()


def test_choose_compression_defaults_and_overrides(monkeypatch):
    settings = bba.Settings()
    assert bba.choose_compression(settings).format == "gzip" and bba.choose_compression(settings).level == 6
    assert bba.choose_compression(bba.Settings(gzip_tool="zlib")).tool == "zlib"
    assert bba.choose_compression(bba.Settings(compression="zstd")) == bba.Compression("zstd", 2, "zstd")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert bba.choose_compression(settings).tool == "zlib"  # no pigz on PATH: the standard library
    with pytest.raises(bba.UsageError, match="needs the zstd program"):
        bba.choose_compression(bba.Settings(compression="zstd"))


def test_backup_zstd_archive_verifies(platform, tmp_path, kuma, capsys):
    assert backup(platform, tmp_path / "b", "--compression", "zstd", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backup_path"].endswith(".tar.zst") and doc["format"] == "tar.zst"
    assert doc["compression"] == {"format": "zstd", "level": 2, "tool": "zstd"} and doc["verification"]["zstd_complete"] is True
    assert bba.main(["--verify", doc["backup_path"]], env={}) == 0
    listing = subprocess.run(["tar", "--zstd", "-tf", doc["backup_path"]], capture_output=True, text=True, check=True).stdout
    assert "app/data/kuma.db" in listing


def test_list_uses_few_docker_calls_and_reports_them(platform, fake_docker, capsys):
    for i in range(50):
        write_module(platform, f"mod{i:02d}")
    fake = fake_docker(*[fake_container(f"mod{i:02d}") for i in range(50)])
    assert bba.main(["--list", "--platform-root", str(platform), "--debug"], env={}) == 0
    assert fake.subcommands().count("inspect") == 1 and len(fake.calls) <= 5


def test_backup_final_names_planted_as_symlinks_are_never_written_through(platform, tmp_path, kuma, capsys):
    import datetime
    backup_dir = tmp_path / "b"
    backup_dir.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("do not touch")
    now = datetime.datetime.now(datetime.UTC)
    for second in range(0, 8):
        stamp = bba.utc_timestamp(now + datetime.timedelta(seconds=second))
        (backup_dir / f"kuma-{stamp}.tar.gz").symlink_to(target)
    assert backup(platform, backup_dir) == 1
    assert "keep existing; refusing to overwrite" in capsys.readouterr().err
    assert target.read_text() == "do not touch"
    assert all(p.is_symlink() for p in backup_dir.iterdir() if p.name.endswith(".tar.gz"))


@pytest.mark.parametrize(("compression", "command"), [("gzip", "gunzip -c"), ("zstd", "zstd -dc")])
def test_backup_restore_notes_decompress_with_the_backups_own_compression(platform, tmp_path, kuma, capsys, compression, command):
    assert backup(platform, tmp_path / "b", "--compression", compression, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert f"{command} {doc['backup_path']} | docker run --rm -i --cap-add SYS_ADMIN --volumes-from kuma" in doc["restore"]
    assert ("zstd" in doc["restore"]) is (compression == "zstd") and ("gunzip" in doc["restore"]) is (compression == "gzip")
    assert "{" not in doc["restore"]  # every placeholder filled in


def test_backup_dir_made_meanwhile_by_another_run_is_used(tmp_path, monkeypatch):
    """Several modules with --jobs into a new backup directory: each run finds it missing, one makes it first."""
    real_mkdir = os.mkdir

    def raced(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, mode, dir_fd=dir_fd)  # the other run
        raise FileExistsError(17, "File exists", name)

    monkeypatch.setattr(bba.os, "mkdir", raced)
    fd = bba.ensure_backup_dir(tmp_path / "new" / "backups", create=True)
    assert fd is not None
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "backups").st_mode) == 0o700


@pytest.mark.parametrize("fmt", ["tar.gz", "tar.zst"])
def test_mc_mirror_restore_reads_the_objects_in_the_pass_that_unpacks_or_copies_the_archive(tmp_path, fmt):
    """Class D's restore reads its archive once (besides --verify): the listing comes from the unpacking or the copy."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("buckets/docs/a.pdf", b"a" * 3000), ("buckets/docs/sub/b.txt", b"b"), ("buckets/photos/2024/c.jpg", os.urandom(70000)),
                           ("metadata/local-cluster-metadata.zip", b"zip")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        empty = tarfile.TarInfo("buckets/empty")
        empty.type = tarfile.DIRTYPE
        tar.addfile(empty)
    plain = out.getvalue()
    compress = ["gzip", "-c"] if fmt == "tar.gz" else ["zstd", "-q", "-c"]
    archive = tmp_path / f"minio.{fmt}"
    archive.write_bytes(subprocess.run(compress, input=plain, capture_output=True, check=True).stdout)
    wanted = {"docs": {"a.pdf": 3000, "sub/b.txt": 1}, "photos": {"2024/c.jpg": 70000}, "empty": {}}

    copied = io.BytesIO()
    found = bba.backup_objects(archive, fmt, copy_to=copied)
    assert found.objects == wanted and found.metadata == ["metadata/local-cluster-metadata.zip"]
    assert copied.getvalue() == plain  # the whole stream, end-of-archive blocks and padding included, once

    found = bba.backup_objects(archive, fmt, unpack_to=str(tmp_path / "staging"))
    assert found.objects == wanted
    assert (tmp_path / "staging" / "buckets" / "photos" / "2024" / "c.jpg").stat().st_size == 70000
    assert (tmp_path / "staging" / "metadata" / "local-cluster-metadata.zip").read_bytes() == b"zip"
