"""End to end, under faults: signals at every stage, a second Ctrl-C, concurrent runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TOOL, run_tool, write_module


def start(engine, platform, module, backup_dir, *args):
    return subprocess.Popen(
        [sys.executable, str(TOOL), module, "--platform-root", str(platform), "--backup-dir", str(backup_dir), "--allow-ci", *args],
        env=engine.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_line(proc, needle: str) -> list[str]:
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never appeared: {''.join(seen)}")


def leftovers(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def big_postgres(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "postgres")
    engine.run_postgres("postgres", user="postgres", password="pw")
    engine.docker("exec", "postgres", "psql", "-q", "-U", "postgres", "-c",
                  "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g * 3)::text) AS pad FROM generate_series(1, 1500000) g")
    return engine, platform


def test_e2e_sigint_during_dump_stream(big_postgres, tmp_path):
    engine, platform = big_postgres
    backup_dir = tmp_path / "b"
    proc = start(engine, platform, "postgres", backup_dir, "--compress-level", "9")
    wait_for_line(proc, "dumping with pg_dumpall")
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "backup-before-apply: error: interrupted by SIGINT; cleaned up, no backup written"
    assert leftovers(backup_dir) == []
    assert engine.inspect("postgres")["State"]["Running"] is True
    assert run_tool("postgres", "--platform-root", str(platform), "--backup-dir", str(backup_dir), env=engine.env).returncode == 0  # lock released


def test_e2e_sigterm_during_bgsave_polling(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "redis")
    engine.run_redis("redis")
    engine.docker("exec", "redis", "redis-cli", "EVAL", "for i=1,1500000 do redis.call('SET', 'key:' .. i, i) end", "0")
    backup_dir = tmp_path / "b"
    proc = start(engine, platform, "redis", backup_dir)
    wait_for_line(proc, "waiting for it to finish")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err.strip().splitlines()[-1]
    assert leftovers(backup_dir) == []
    assert engine.inspect("redis")["State"]["Running"] is True


@pytest.fixture
def busy_kuma(docker_engine, tmp_path):
    """Module kuma with 96 MiB of incompressible data: an archive at level 9 takes seconds."""
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "kuma")
    data = tmp_path / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(os.urandom(96 << 20))
    engine.run_container("kuma", "-v", f"{data}:/data")
    return engine, platform


def test_e2e_second_ctrl_c_does_not_skip_unpause(busy_kuma, tmp_path):
    engine, platform = busy_kuma
    backup_dir = tmp_path / "b"
    proc = start(engine, platform, "kuma", backup_dir, "--pause", "--compress-level", "9")
    wait_for_line(proc, "archiving /data")
    assert engine.inspect("kuma")["State"]["Paused"] is True
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    state = engine.inspect("kuma")["State"]
    assert state["Running"] is True and state["Paused"] is False
    assert leftovers(backup_dir) == []


def test_e2e_concurrent_runs_same_module_wait_then_refuse_other_modules_proceed(busy_kuma, tmp_path):
    """The lock is held here, as a run holds it (flock, its pid written): no race with how fast a real run ends."""
    import fcntl

    engine, platform = busy_kuma
    write_module(platform, "other")
    engine.run_container("other", "-v", "other:/data")
    backup_dir = tmp_path / "b"
    backup_dir.mkdir(mode=0o700)
    with open(backup_dir / ".kuma.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        started = time.monotonic()
        second = run_tool("kuma", "--platform-root", str(platform), "--backup-dir", str(backup_dir), "--lock-timeout", "1", env=engine.env)
        assert time.monotonic() - started >= 1  # it waited for the lock before giving up
        assert second.returncode == 3
        assert second.stderr.strip().splitlines()[-1] == "backup-before-apply: refused: another backup of 'kuma' is running (pid 4242; lock .kuma.lock)"
        parallel = run_tool("other", "--platform-root", str(platform), "--backup-dir", str(backup_dir), env=engine.env)
        assert parallel.returncode == 0, parallel.stderr
        waiting = start(engine, platform, "kuma", backup_dir, "--lock-timeout", "60")
        time.sleep(1)
        assert waiting.poll() is None  # still waiting for the lock
    _, err = waiting.communicate(timeout=300)  # the lock released: it goes on
    assert waiting.returncode == 0, err


def test_e2e_killed_run_leaves_no_stale_lock_or_partial(busy_kuma, tmp_path):
    engine, platform = busy_kuma
    backup_dir = tmp_path / "b"
    proc = start(engine, platform, "kuma", backup_dir, "--compress-level", "9")
    wait_for_line(proc, "archiving /data")
    proc.kill()
    proc.wait()
    assert any(n.endswith(".partial") for n in leftovers(backup_dir))  # SIGKILL: nothing could clean up
    again = run_tool("kuma", "--platform-root", str(platform), "--backup-dir", str(backup_dir), env=engine.env)
    assert again.returncode == 0, again.stderr
    assert "removing kuma-" in again.stderr and "left by an interrupted run" in again.stderr
    assert not any(n.endswith(".partial") for n in leftovers(backup_dir))


def test_e2e_container_paused_by_someone_else(docker_engine, tmp_path):
    engine = docker_engine
    platform = tmp_path / "platform"
    write_module(platform, "kuma")
    engine.run_container("kuma", "-v", "kuma:/data")
    engine.docker("exec", "kuma", "sh", "-c", "echo x > /data/x")
    engine.docker("pause", "kuma")
    common = ("kuma", "--platform-root", str(platform), "--backup-dir", str(tmp_path / "b"))
    refused = run_tool(*common, "--pause", env=engine.env)
    assert refused.returncode == 3
    assert "already paused by someone else; refusing to pause/unpause it" in refused.stderr.strip().splitlines()[-1]
    assert engine.inspect("kuma")["State"]["Paused"] is True  # never unpaused by us
    plain = run_tool(*common, env=engine.env)
    assert plain.returncode == 0, plain.stderr
    assert "is paused by someone else; it stays paused" in plain.stderr
    assert engine.inspect("kuma")["State"]["Paused"] is True
    engine.docker("unpause", "kuma")
