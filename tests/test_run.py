"""The run() and stream_from() wrappers against real commands, and docker unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import backup_before_apply as bba
from conftest import REPO, run_tool, write_module


def test_run_returns_output():
    assert bba.run(["sh", "-c", "echo out; echo err >&2"]).stdout == b"out\n"


def test_run_failure_carries_command_and_stderr_tail():
    with pytest.raises(bba.CommandError) as info:
        bba.run(["sh", "-c", "for i in 1 2 3 4 5 6 7; do echo line$i >&2; done; exit 3"])
    message = str(info.value)
    assert message.startswith("`sh -c ")
    assert "exited 3: line3 | line4 | line5 | line6 | line7" in message and "line2" not in message
    assert info.value.returncode == 3


def test_run_missing_program_is_one_clear_error():
    with pytest.raises(bba.BackupError, match="no-such-program-xyz: command not found on PATH"):
        bba.run(["no-such-program-xyz"])


def test_run_timeout():
    with pytest.raises(bba.CommandError, match="timed out"):
        bba.run(["sleep", "5"], timeout=0.2)


def test_run_logs_command_at_debug_with_secrets_masked(caplog):
    caplog.set_level("DEBUG", logger=bba.PROG)
    bba.run(["env", "-e", "TOKEN=s.secret", "true"], check=False)
    assert "$ env -e 'TOKEN=***' true" in caplog.messages
    assert "s.secret" not in caplog.text
    assert bba.mask_argv(["docker", "exec", "-e", "VAULT_TOKEN", "c"]) == "docker exec -e VAULT_TOKEN c"


def test_stream_from_checks_exit_status_like_pipefail():
    with bba.stream_from(["sh", "-c", "printf abc"]) as pipe:
        assert pipe.read() == b"abc"
    with pytest.raises(bba.CommandError, match="exited 4: bad"):
        with bba.stream_from(["sh", "-c", "printf abc; echo bad >&2; exit 4"]) as pipe:
            assert pipe.read() == b"abc"


def test_stream_from_consumer_failure_kills_child():
    with pytest.raises(ValueError):
        with bba.stream_from(["sh", "-c", "yes"]) as pipe:
            pipe.read(10)
            raise ValueError


def test_stream_from_child_silent_past_its_timeout_is_killed():
    started = time.monotonic()
    with pytest.raises(bba.CommandError, match="timed out"):
        with bba.stream_from(["sh", "-c", "echo start; exec sleep 60"], timeout=1) as pipe:
            assert pipe.read(6) == b"start\n"
            pipe.read()  # blocks until the watchdog kills the silent child
    assert time.monotonic() - started < 15


def test_stream_from_slow_but_steady_child_is_not_killed():
    with bba.stream_from(["sh", "-c", "for i in 1 2 3 4; do echo $i; sleep 0.5; done"], timeout=1.5) as pipe:
        assert pipe.read() == b"1\n2\n3\n4\n"


def test_stream_to_fd_writes_past_this_process_and_checks_the_exit_status(tmp_path):
    with open(tmp_path / "out", "wb") as out:
        bba.stream_to_fd(["sh", "-c", "printf abc; printf def"], out.fileno())
    assert (tmp_path / "out").read_bytes() == b"abcdef"
    with open(tmp_path / "out", "wb") as out, pytest.raises(bba.CommandError, match="exited 4: bad"):
        bba.stream_to_fd(["sh", "-c", "printf abc; echo bad >&2; exit 4"], out.fileno())


def test_stream_to_fd_idle_timeout_counts_what_the_child_writes(tmp_path):
    """A direct child's liveness is its write count (/proc/<pid>/io): steady writes live on, silence is killed."""
    with open(tmp_path / "out", "wb") as out:
        bba.stream_to_fd(["sh", "-c", "for i in 1 2 3 4; do echo $i; sleep 0.5; done"], out.fileno(), timeout=1.5)
    assert (tmp_path / "out").read_bytes() == b"1\n2\n3\n4\n"
    started = time.monotonic()
    with open(tmp_path / "out", "wb") as out, pytest.raises(bba.CommandError, match="timed out"):
        bba.stream_to_fd(["sh", "-c", "echo start; exec sleep 60"], out.fileno(), timeout=1)
    assert time.monotonic() - started < 15 and (tmp_path / "out").read_bytes() == b"start\n"


def test_stream_into_child_that_stops_reading_is_killed():
    with pytest.raises(bba.CommandError, match="timed out"):
        with bba.stream_into(["sleep", "60"], timeout=1) as stream:
            for _ in range(64):
                stream.pipe.write(b"x" * (1 << 20))  # fills the pipe, then blocks until the child is killed


def test_kill_exec_kills_every_marked_process_on_this_host():
    """What a timed-out `docker exec` started on a local engine: found by its token, children included."""
    token = f"BBA_EXEC={os.urandom(8).hex()}"
    name, value = token.split("=")
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"], env={**os.environ, name: value})
    time.sleep(0.3)
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _environ_has(p, token)]
    assert len(children) >= 2  # the shell and its sleeps
    bba.kill_exec(["docker", "exec", "-e", token, "some-container", "sh"])
    proc.wait(timeout=10)
    time.sleep(0.2)
    assert [p for p in os.listdir("/proc") if p.isdigit() and _environ_has(p, token)] == []


def _environ_has(pid: str, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return token.encode() in fh.read().split(b"\0")
    except OSError:
        return False


def test_run_command_error_keeps_the_whole_stderr_for_before_the_error_line():
    with pytest.raises(bba.CommandError) as info:
        bba.run(["sh", "-c", "for i in $(seq 1 12); do echo line$i >&2; done; exit 2"])
    assert info.value.details[0] == "line1" and info.value.details[-1] == "line12"
    assert "\n" not in str(info.value)


def test_list_without_docker_prints_static_audit(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    proc = run_tool("--list", "--platform-root", str(REPO / "examples/platform"), env=env)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "docker is not reachable" in line]
    assert len(warnings) == 1
    assert "uptime-kuma" in proc.stdout and "docker not reachable" in proc.stdout
    assert "A  PostgreSQL [pg-dumpall]" in proc.stdout


def test_backup_docker_binary_missing_exit_1(tmp_path):
    write_module(tmp_path, "kuma")
    env = {"PATH": str(tmp_path / "empty-bin"), "HOME": str(tmp_path)}
    proc = run_tool("kuma", "--platform-root", str(tmp_path), "--backup-dir", str(tmp_path / "b"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "backup-before-apply: error: docker: command not found on PATH"
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_list_malformed_module_exit_2_names_file_line(tmp_path):
    write_module(tmp_path, "good")
    bad = write_module(tmp_path, "bad", yaml="metadata:\n  id: bad\n  id: again\n")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    proc = run_tool("--list", "--platform-root", str(tmp_path), env=env)
    assert proc.returncode == 2
    assert f"{bad}:3: duplicate key 'id' (first on line 2)" in proc.stderr
    assert "good" in proc.stdout


def test_tool_imports_without_side_effects():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import backup_before_apply, os; print(oct(os.umask(0o22)))"
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], env={"CI": "true", "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "0o22" and out.stderr == ""


PARENT_SLOW_TO_REAP = """
import os, signal, subprocess, sys, time
log = sys.argv[1]
def stopped(signum, frame):
    with open(log, "a") as fh:
        fh.write(f"stopped {time.monotonic()}\\n")
    os._exit(1)
signal.signal(signal.SIGTERM, stopped)
child = subprocess.Popen(["sleep", "60"])
with open(log, "a") as fh:
    fh.write("started\\n")
time.sleep(2.5)  # a parent busy elsewhere: its killed child stays a zombie meanwhile
child.wait()
with open(log, "a") as fh:
    fh.write(f"reaped {time.monotonic()}\\n")
time.sleep(60)
"""


def test_kill_exec_never_stops_a_parent_before_it_has_reaped_its_killed_child(tmp_path):
    """Were the parent stopped first, the zombie would go to the container's PID 1 (a postmaster restarts the cluster)."""
    token = f"BBA_EXEC={os.urandom(8).hex()}"
    name, value = token.split("=")
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SLOW_TO_REAP, str(log)], env={**os.environ, name: value})
    while not log.exists() or "started" not in log.read_text():
        time.sleep(0.05)
    reaper = threading.Thread(target=proc.wait)  # as the engine reaps what it exec'd
    reaper.start()
    bba.kill_exec(["docker", "exec", "-e", token, "c", "x"])
    reaper.join(timeout=30)
    events = dict(line.split() for line in log.read_text().splitlines() if line != "started")
    assert float(events["stopped"]) >= float(events["reaped"])


@pytest.mark.parametrize("status", [0, 3])
def test_exit_now_fails_a_run_whose_output_could_not_be_written(monkeypatch, capfd, status):
    class Full:
        def flush(self) -> None:
            raise OSError(28, "No space left on device")

    ended: list[int] = []
    monkeypatch.setattr(bba.sys, "stdout", Full())
    monkeypatch.setattr(bba.os, "_exit", ended.append)
    bba.exit_now(status)
    assert ended == [status or bba.EXIT_FAILED]
    assert capfd.readouterr().err == "backup-before-apply: error: the output could not be written: No space left on device\n"


def test_the_script_ends_with_its_status_and_all_its_output(tmp_path, capsys):
    # exit_now() skips the interpreter's teardown: what was printed must still all be there.
    assert bba.main(["--help"]) == 0
    in_process = capsys.readouterr().out
    proc = subprocess.run([sys.executable, str(REPO / "backup_before_apply.py"), "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == in_process and len(proc.stdout) > 4096
    proc = subprocess.run([sys.executable, str(REPO / "backup_before_apply.py"), "--platform-root", str(tmp_path), "../x"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == bba.EXIT_USAGE and proc.stderr.strip().splitlines()[-1].startswith("backup-before-apply: error:")
