#!/usr/bin/env python3
"""backup-before-apply: take a verified, private backup of one stateful service.

An operator runs this by hand, as root, on a Docker host right before a risky change to a
stateful module of the platform. Given a module id it reads the platform checkout
(modules/<id>/module.yaml), decides the module's backup class from classes.toml, finds
the module's container through the docker CLI, writes a private timestamped backup (0600,
created under a .partial name and renamed only once complete and verified) plus a
manifest that says how to restore it. ``--list`` audits every module of the platform.
The service keeps running: nothing is stopped or restarted, and ``--pause`` always
unpauses. Standard library only; see README.md for the contract and the class table.
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import array
import bisect
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import gzip
import hashlib
import io
import itertools
import json
import logging
import math
import os
import pickle
import posixpath
import queue
import re
import resource
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
import traceback
import typing
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

# --------------------------------------------------------------------------- constants

PROG = "backup-before-apply"
LOG = logging.getLogger(PROG)

EXIT_OK = 0
EXIT_FAILED = 1  # the backup failed at run time
EXIT_USAGE = 2  # bad usage or bad input
EXIT_REFUSED = 3  # refused by a safety guard

DEFAULT_PLATFORM_ROOT = "/opt/pdurlej-platform"
DEFAULT_CLASSES = Path(__file__).resolve().with_name("classes.toml")

MODULE_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")  # fullmatch: "$" would let "x\n" through
MODULE_ID_MAX = 128
MODULE_YAML_MAX_BYTES = 1 << 20

LIFECYCLES = ("active", "parked", "sunset", "non-canonical")
STATEFULNESS = ("stateful", "stateless")
UNDECLARED = "undeclared"

# Variables that CI runners set; the tool never runs automatically.
CI_ENV_VARS = (
    "CI",
    "GITHUB_ACTIONS",
    "GITEA_ACTIONS",
    "FORGEJO_ACTIONS",
    "GITLAB_CI",
    "JENKINS_URL",
    "BUILDKITE",
    "CIRCLECI",
    "TRAVIS",
    "DRONE",
    "WOODPECKER_CI",
    "TEAMCITY_VERSION",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ID",
    "RUNNER_TRACKING_ID",
)
CI_FALSE_VALUES = ("", "0", "false", "no", "off")

# Bind destinations that hold one host file for the container's benefit, not its state.
HOST_FILE_DESTINATIONS = frozenset(
    {"/etc/localtime", "/etc/timezone", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
)
VIRTUAL_FS_ROOTS = ("/proc", "/sys", "/dev")

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
COPY_CHUNK = 1 << 20
WRITEBACK_EVERY = 32 << 20
STDERR_TAIL_LINES = 5
STDERR_DETAIL_LINES = 50  # printed before the error line when a child said more than its tail
WARNINGS_PER_KIND = 50  # entries named per kind of warning ("vanished while archiving"); the rest are counted

RESTORE_PLACEHOLDERS = ("backup", "manifest", "module", "container", "image", "decompress")


# --------------------------------------------------------------------------- errors


class BackupError(Exception):
    """A failure the operator must see as one line; exit_code says which kind.

    details are lines printed before that line (a child's whole stderr, every psql error),
    so that the error line stays one line and the last one.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class UsageError(BackupError):
    """Bad usage or bad input: unknown module, invalid id, malformed config."""

    exit_code = EXIT_USAGE


class RefusedError(BackupError):
    """A safety guard refused to go on."""

    exit_code = EXIT_REFUSED


class CommandError(BackupError):
    """An external command failed; carries the command and the tail of its stderr."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: bytes | str) -> None:
        if isinstance(stderr, bytes):
            stderr = stderr.decode("utf-8", "replace")
        lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = lines[-STDERR_TAIL_LINES:]
        status = "timed out (killed)" if returncode is None else f"exited {returncode}"
        detail = " | ".join(self.stderr_tail) or "no output on stderr"
        shown = lines[-STDERR_DETAIL_LINES:] if len(lines) > len(self.stderr_tail) else []
        super().__init__(f"`{mask_argv(argv)}` {status}: {detail}", shown)


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) asked the run to stop; cleanup still runs.

    A BaseException so that no `except Exception` on the way up can swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# --------------------------------------------------------------------------- run() and docker

# Programs run in this process, by name: `--debug` reports the docker calls of a run.
RUN_COUNTS: Counter[str] = Counter()
PHASES: dict[str, float] = {}  # seconds per phase of a run, for --debug's "where the time went" (README, Performance)
VERIFICATION_CPU: list[float] = []  # CPU seconds of each in-flight verification process (its decompressor included), for --debug
_TALLY = threading.Lock()  # RUN_COUNTS and PHASES are added to from helper threads too (docker info beside docker ps)


def count_run(program: str) -> None:
    """Count one run of program for --debug's "programs run"."""
    with _TALLY:
        RUN_COUNTS[program] += 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the time the block takes to PHASES[name]."""
    started = time.monotonic()
    try:
        yield
    finally:
        with _TALLY:
            PHASES[name] = PHASES.get(name, 0.0) + time.monotonic() - started


_SECRET_ARG_RE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*=)(?P<value>.+)$")


def mask_argv(argv: list[str]) -> str:
    """Return argv as a shell line with any NAME=value after -e/--env masked.

    Secrets travel by name only (`docker exec -e NAME`); this is the safety net if a
    value ever slips into argv.
    """
    masked: list[str] = []
    after_env = False
    for arg in argv:
        if after_env and (match := _SECRET_ARG_RE.match(arg)):
            arg = match["key"] + "***"
        after_env = arg in ("-e", "--env")
        masked.append(arg)
    return shlex.join(masked)


def _child_env(secrets: dict[str, str] | None) -> dict[str, str] | None:
    # Secrets reach docker through its environment and are named in argv (`-e NAME`),
    # so they never show up in /proc/*/cmdline or in a log line.
    return None if not secrets else {**os.environ, **secrets}


# Every `docker exec` carries BBA_EXEC=<random token> in its environment. Killing the docker
# client leaves what it started running inside the container (moby/moby#9098: a pg_dumpall
# still queued on a lock, a redis-cli of a paused server); the token finds those processes
# and their children, which inherit it, on this host or inside the container.
EXEC_MARK = "BBA_EXEC"
KILL_ROUNDS = 100  # of 0.1 s: how long the bottom-up kill waits for parents to reap
ENGINE_LOCAL: bool | None = None  # set by engine_info(): whether the engine's processes are this host's

# Stopped bottom-up (SIGTERM, then SIGKILL), and only while each process's own (marked)
# parent is alive to reap it.
# A process orphaned first is adopted by the container's PID 1, and when PID 1 is the
# postmaster (as in the official postgres image) any child of its dying by a signal is
# taken for a crashed backend: every connection is dropped and the cluster goes through
# crash recovery (postmaster.c, CleanupBackend). The exec'd process itself is reaped by
# the engine, outside the container.
_KILL_TREE_SH = """m="$1"; seen=""; i=0
while [ $i -lt KILL_ROUNDS ]; do i=$((i+1)); mine=""
  for d in /proc/[0-9]*; do grep -qs "$m" "$d/environ" && mine="$mine ${d#/proc/}"; done
  z=""; for p in $seen; do [ -d "/proc/$p" ] && z="$z $p"; done
  if [ -n "$z" ]; then sleep 1; for p in $z; do kill -9 "$p" 2>/dev/null; done; sleep 0.1; continue; fi
  [ -z "$mine" ] && exit 0; seen=""
  for p in $mine; do leaf=1
    for q in $mine; do [ "$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$q/status" 2>/dev/null)" = "$p" ] && leaf=0; done
    [ $leaf = 1 ] && kill -15 "$p" 2>/dev/null && seen="$seen $p"
  done; sleep 0.1
done; exit 1""".replace("KILL_ROUNDS", str(KILL_ROUNDS))


def exec_mark(argv: list[str]) -> str | None:
    """Return the BBA_EXEC=<token> of a `docker exec` argv built by exec_argv, or None."""
    if argv[:2] != ["docker", "exec"]:
        return None
    return next((arg for arg in argv if arg.startswith(EXEC_MARK + "=")), None)


def _marked_here(token: bytes) -> dict[int, int]:
    """Return {pid: parent pid} of the processes on this host whose environment holds token."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if token not in fh.read().split(b"\0"):
                        continue
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    found[int(entry)] = int(fh.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return found


def _kill_tree_here(token: bytes) -> bool:
    """Stop the marked processes of this host bottom-up; return False if none were found here.

    Each leaf first gets SIGTERM (pg_dump then cancels its query on the server and exits),
    and SIGKILL after a second if it is still there.
    """
    signalled: dict[int, float] = {}
    found_any = False
    for _ in range(KILL_ROUNDS):
        marked = _marked_here(token)
        # A stopped process that is still there but no longer shows the token is a zombie its
        # parent has not reaped yet: nothing above it may be stopped until it is gone.
        dying = [pid for pid in signalled if pid not in marked and os.path.exists(f"/proc/{pid}")]
        if not marked and not dying:
            return found_any
        found_any = True
        if not dying:
            parents = set(marked.values())
            for pid in (pid for pid in marked if pid not in parents):
                first = signalled.setdefault(pid, time.monotonic())
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM if time.monotonic() - first < 1 else signal.SIGKILL)
        time.sleep(0.1)
    LOG.warning("processes started in the container (%s) did not go away; see `docker top`", token.decode())
    return True


def kill_exec(argv: list[str]) -> None:
    """Kill what a `docker exec` argv started inside its container, wherever the engine runs.

    A local engine's processes are found in this host's /proc by their token; for a remote
    engine a short `docker exec ... sh` does the same inside the container. Either way
    children go before their parents, so that no process is ever orphaned to the
    container's PID 1.
    """
    mark = exec_mark(argv)
    if mark is None or _kill_tree_here(mark.encode()):
        return
    if ENGINE_LOCAL and os.geteuid() == 0:
        return  # this host's /proc shows every process of a local engine: nothing is left
    with contextlib.suppress(BackupError):
        run(["docker", "exec", exec_container(argv), "sh", "-c", _KILL_TREE_SH, "sh", mark], check=False, timeout=30)


def exec_container(argv: list[str]) -> str:
    """Return the container a `docker exec` argv (as exec_argv builds it) runs in."""
    i = 2
    while argv[i].startswith("-"):
        i += 1 if argv[i] == "-i" else 2
    return argv[i]


def run(
    argv: list[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    input: bytes | None = None,
    secrets: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv (never through a shell) and return the completed process.

    secrets are added to the child's environment only. Raise BackupError if the program
    is missing, CommandError if it exits non-zero (with check) or runs past timeout; a
    `docker exec` that times out or is interrupted is also killed inside its container.
    """
    LOG.debug("$ %s", mask_argv(argv))
    count_run(os.path.basename(argv[0]))
    try:
        with phase(f"{os.path.basename(argv[0])} calls"):
            proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False, env=_child_env(secrets), cwd=cwd)
    except FileNotFoundError:
        raise BackupError(f"{argv[0]}: command not found on PATH") from None
    except subprocess.TimeoutExpired as exc:
        kill_exec(argv)
        raise CommandError(argv, None, exc.stderr or b"") from None
    except BaseException:
        with signals_deferred():
            kill_exec(argv)
        raise
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


@dataclasses.dataclass
class Stream:
    """One end of a streaming child: `pipe` to read or write; stderr once it has exited."""

    pipe: IO[bytes]
    stderr: bytes = b""
    returncode: int | None = None


class _Watched(io.RawIOBase):
    """A streaming child's pipe that notes when bytes last moved, for the idle watchdog.

    Reads return what has arrived (like os.read), so a slow but steady child counts as
    alive; tarfile and the copy loops read until they have what they need.
    """

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe = pipe
        self.fd = pipe.fileno()
        self.last = time.monotonic()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def readinto(self, buffer: Any) -> int:
        count = os.readv(self.fd, [buffer])
        self.last = time.monotonic()
        return count

    def read(self, size: int = -1) -> bytes:
        if size >= 0:
            data = os.read(self.fd, size)
            self.last = time.monotonic()
            return data
        chunks = []
        while chunk := self.read(COPY_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]
            self.last = time.monotonic()
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.pipe.close()
        super().close()


class _Written:
    """When a child writing straight into an fd (not through this process) last wrote: its write(2) count in /proc/<pid>/io."""

    def __init__(self, pid: int) -> None:
        self.path = f"/proc/{pid}/io"
        self.wrote = -1
        self._last = time.monotonic()

    @property
    def last(self) -> float:
        try:
            with open(self.path, "rb") as fh:
                wrote = int(next(line for line in fh if line.startswith(b"wchar:")).split()[1])
        except (OSError, StopIteration, ValueError):
            return time.monotonic()  # exited, or its counters are hidden (hidepid): only its exit ends the wait
        if wrote != self.wrote:
            self.wrote, self._last = wrote, time.monotonic()
        return self._last


class _Watchdog:
    """Kills a streaming child (and what it started in a container) once its pipe has been idle too long."""

    def __init__(self, proc: subprocess.Popen[bytes], argv: list[str], pipe: _Watched | _Written, timeout: float | None) -> None:
        self.proc, self.argv, self.pipe, self.timeout = proc, argv, pipe, timeout
        self.fired = False
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if timeout is not None:
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()

    def _watch(self) -> None:
        assert self.timeout is not None
        while not self.done.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.pipe.last > self.timeout:
                self.fired = True
                LOG.debug("no data for %gs: killing `%s`", self.timeout, mask_argv(self.argv))
                with contextlib.suppress(OSError):
                    self.proc.kill()
                kill_exec(self.argv)
                return

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()


@contextlib.contextmanager
def _streaming(argv: list[str], *, into: bool, timeout: float | None, secrets: dict[str, str] | None, check: bool,
               stdin: IO[bytes] | None = None, stdout: int | None = None, cwd: str | None = None,
               own_session: bool = False) -> Iterator[Stream]:
    # stdout: an fd (a compressor's stdin) the child writes into directly; the caller then
    # has nothing to read, and the child is waited for as the context ends, the idle
    # timeout counting what it writes (/proc/<pid>/io).
    LOG.debug("$ %s", mask_argv(argv))
    count_run(os.path.basename(argv[0]))
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if into else (stdin if stdin is not None else subprocess.DEVNULL),
                stdout=out if into else (stdout if stdout is not None else subprocess.PIPE),
                stderr=err,
                env=_child_env(secrets),
                cwd=cwd,
                start_new_session=own_session,  # a terminal's Ctrl-C then reaches this process only, which decides
            )
        except FileNotFoundError:
            raise BackupError(f"{argv[0]}: command not found on PATH") from None
        raw = proc.stdin if into else proc.stdout
        activity: _Watched | _Written
        if raw is None:
            activity = _Written(proc.pid)
            pipe: Any = None
        else:
            _grow_pipe(raw.fileno())
            activity = _Watched(raw)
            # Without a timeout (zstd -d for a verification) the plain pipe keeps its splice(2) path.
            pipe = activity if timeout is not None else raw
        watchdog = _Watchdog(proc, argv, activity, timeout)
        stream = Stream(typing.cast(IO[bytes], pipe))
        try:
            try:
                yield stream
                if pipe is not None and not into:
                    while pipe.read(COPY_CHUNK):
                        pass  # tar readers stop before the trailing padding; let the child finish
            finally:
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError):
                        pipe.close()
            returncode = proc.wait(timeout=timeout if pipe is not None else None)  # a direct child: the watchdog times it
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kill_exec(argv)
            err.seek(0)
            raise CommandError(argv, None, err.read()) from None
        except BaseException as exc:
            with signals_deferred():
                proc.kill()
                proc.wait()
                watchdog.stop()
                if not watchdog.fired:
                    kill_exec(argv)
            if watchdog.fired and isinstance(exc, (OSError, BackupError, tarfile.TarError, EOFError)):
                err.seek(0)
                raise CommandError(argv, None, err.read()) from None  # the pipe broke because the watchdog killed it
            raise
        finally:
            watchdog.stop()
        err.seek(0)
        stream.stderr, stream.returncode = err.read(), returncode
        if watchdog.fired:
            raise CommandError(argv, None, stream.stderr)
        if check and returncode != 0:
            raise CommandError(argv, returncode, stream.stderr)


@contextlib.contextmanager
def stream_from(argv: list[str], *, timeout: float | None = None, secrets: dict[str, str] | None = None) -> Iterator[IO[bytes]]:
    """Yield the stdout of argv as a binary stream; check its exit status at the end.

    The sibling of run() for output too large to hold in memory. timeout is an idle
    timeout: a child that sends nothing for that long is hung, and it is killed (inside
    its container too). Like `set -o pipefail`, a non-zero exit fails the whole step even
    if the stream looked complete. Raise CommandError on failure or timeout; the child is
    killed if the consumer fails first.
    """
    with _streaming(argv, into=False, timeout=timeout, secrets=secrets, check=True) as stream:
        yield stream.pipe


def stream_to_fd(argv: list[str], fd: int, *, timeout: float | None = None, secrets: dict[str, str] | None = None) -> None:
    """Run argv with its stdout on fd (a compressor's stdin), so that its output never passes through this process.

    Return when it has exited. timeout is an idle timeout, as for stream_from, on what the
    child writes. Raise CommandError as stream_from does.
    """
    with _streaming(argv, into=False, stdout=fd, timeout=timeout, secrets=secrets, check=True):
        pass


@contextlib.contextmanager
def stream_into(argv: list[str], *, timeout: float | None = None, secrets: dict[str, str] | None = None, check: bool = True,
                own_session: bool = False) -> Iterator[Stream]:
    """Yield a Stream whose pipe is the stdin of argv; its stderr is kept for the caller.

    timeout is an idle timeout, as for stream_from. Raise CommandError (with check) if the
    child exits non-zero once stdin is closed, or on timeout. own_session keeps the child
    out of the terminal's process group (a load that must not be cut by Ctrl-C).
    """
    with _streaming(argv, into=True, timeout=timeout, secrets=secrets, check=check, own_session=own_session) as stream:
        yield stream


def docker(args: list[str], *, timeout: float, check: bool = True, secrets: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run one docker CLI command through run()."""
    return run(["docker", *args], timeout=timeout, check=check, secrets=secrets)


def exec_argv(container: str, argv: list[str], *, secrets: dict[str, str] | None = None, stdin: bool = False,
              workdir: str | None = None) -> list[str]:
    """Return `docker exec` argv for a command in container; secrets are passed by name.

    Never `-t`: a TTY rewrites line endings and corrupts binary streams. The BBA_EXEC
    token lets run() and the streams kill what the command started if it hangs.
    """
    names = [flag for name in sorted(secrets or {}) for flag in ("-e", name)]
    options = [*(["-i"] if stdin else []), *(["-w", workdir] if workdir else [])]
    return ["docker", "exec", *options, "-e", f"{EXEC_MARK}={os.urandom(8).hex()}", *names, container, *argv]


def parse_json(data: bytes, what: str) -> Any:
    """Return the JSON document in data. Raise BackupError naming what it came from."""
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackupError(f"{what}: output is not JSON ({exc})") from None


def list_containers(timeout: float) -> list[dict[str, Any]]:
    """Return `docker inspect` objects for every container, running or not.

    One `docker ps` and one batched `docker inspect`, whatever the number of modules.
    """
    ids = docker(["ps", "--all", "--quiet", "--no-trunc"], timeout=timeout).stdout.split()
    if not ids:
        return []
    argv = ["inspect", "--type", "container", *[i.decode() for i in ids]]
    proc = docker(argv, timeout=timeout, check=False)
    if proc.returncode != 0:
        # A container removed between ps and inspect fails the whole call but the
        # others are still printed; anything else is a real failure.
        if not proc.stdout.strip().startswith(b"["):
            raise CommandError(["docker", *argv], proc.returncode, proc.stderr)
        LOG.debug("docker inspect: %s", proc.stderr.decode("utf-8", "replace").strip())
    found = parse_json(proc.stdout, "docker inspect")
    return [c for c in found if isinstance(c, dict)]


def containers_and_engine(timeout: float) -> tuple[list[dict[str, Any]], EngineInfo]:
    """Return list_containers() and engine_info(); the engine is asked in a thread of its own meanwhile.

    The calls do not depend on each other, so their waits overlap (each is a docker client
    start and a round trip to the engine, tens of milliseconds). An error of either is raised.
    """
    answer: list[EngineInfo | BaseException] = []

    def ask() -> None:
        try:
            answer.append(engine_info(timeout))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            answer.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        containers = list_containers(timeout)
    except BaseException:
        thread.join(1)  # the error at hand goes first: a docker info hanging with the engine is left to its own timeout
        raise
    thread.join()  # bounded by the timeout of its own docker calls
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return containers, answer[0]


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What decides how mounted data is read: on the host, or through docker."""

    version: str
    endpoint: str
    local: bool
    rootless: bool


def engine_info(timeout: float) -> EngineInfo:
    """Return the engine's version and whether its host paths are this host's paths."""
    info = parse_json(docker(["info", "--format", "{{json .}}"], timeout=timeout).stdout, "docker info")
    endpoint = os.environ.get("DOCKER_HOST", "")
    if not endpoint:
        proc = docker(["context", "inspect", "--format", "{{json .Endpoints.docker.Host}}"], timeout=timeout)
        endpoint = str(parse_json(proc.stdout, "docker context inspect"))
    security = " ".join(str(opt) for opt in info.get("SecurityOptions") or [])
    global ENGINE_LOCAL
    ENGINE_LOCAL = endpoint.startswith("unix://")
    return EngineInfo(
        version=str(info.get("ServerVersion", "unknown")),
        endpoint=endpoint,
        local=endpoint.startswith("unix://"),
        rootless="rootless" in security,
    )


# --------------------------------------------------------------------------- config (classes.toml)


@dataclasses.dataclass(frozen=True)
class BackupClass:
    """One row of the class table."""

    letter: str
    title: str
    patterns: tuple[str, ...]
    procedure: str
    fallback: str | None
    restore: str
    default: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    keep: int | None = None  # --prune: the class's own retention, else [settings]'s
    older_than: str | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Operator-tunable settings; classes.toml < environment < command line."""

    platform_root: str = DEFAULT_PLATFORM_ROOT
    backup_dir: str = ""  # empty: <platform_root>/backups
    docker_timeout: float = 60.0
    pause_timeout: float = 1800.0
    stream_timeout: float = 600.0
    lock_timeout: float = 0.0
    compression: str = "gzip"
    compress_level: int = 6
    zstd_level: int = 2
    gzip_tool: str = "auto"
    snapshot_timeout: float = 600.0
    drill_timeout: float = 300.0
    space_margin_mb: float = 256.0
    redis_password_env: str = "REDIS_PASSWORD"  # noqa: S105 (a variable name, not a password)
    redis_user_env: str = "REDIS_USERNAME"
    keep: int = 5  # --prune: backups kept per module whatever their age
    older_than: str = "30d"  # --prune: only backups older than this are removed


DEFAULT_SETTINGS = Settings()

# setting -> (environment variable, command-line flag or ""); its type is the default's in Settings
SETTING_SOURCES: dict[str, tuple[str, str]] = {
    "platform_root": ("PLATFORM_ROOT", "--platform-root"),
    "backup_dir": ("BACKUP_DIR", "--backup-dir"),
    "docker_timeout": ("BBA_DOCKER_TIMEOUT", "--docker-timeout"),
    "pause_timeout": ("BBA_PAUSE_TIMEOUT", "--pause-timeout"),
    "stream_timeout": ("BBA_STREAM_TIMEOUT", "--stream-timeout"),
    "lock_timeout": ("BBA_LOCK_TIMEOUT", "--lock-timeout"),
    "compression": ("BBA_COMPRESSION", "--compression"),
    "compress_level": ("BBA_COMPRESS_LEVEL", "--compress-level"),
    "zstd_level": ("BBA_ZSTD_LEVEL", "--zstd-level"),
    "gzip_tool": ("BBA_GZIP_TOOL", ""),
    "snapshot_timeout": ("BBA_SNAPSHOT_TIMEOUT", "--snapshot-timeout"),
    "drill_timeout": ("BBA_DRILL_TIMEOUT", "--drill-timeout"),
    "space_margin_mb": ("BBA_SPACE_MARGIN_MB", "--space-margin-mb"),
    "redis_password_env": ("BBA_REDIS_PASSWORD_ENV", ""),
    "redis_user_env": ("BBA_REDIS_USER_ENV", ""),
    "keep": ("", "--keep"),  # also per class (classes.X.keep), which the command line overrides
    "older_than": ("", "--older-than"),
}
DURATION_SETTINGS = ("older_than",)
SETTING_CHOICES: dict[str, tuple[str, ...]] = {"compression": ("gzip", "zstd"), "gzip_tool": ("auto", "pigz", "zlib")}
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "docker_timeout": (1, 86400),
    "pause_timeout": (1, 86400),
    "stream_timeout": (1, 86400),
    "lock_timeout": (0, 86400),
    "compress_level": (1, 9),
    "zstd_level": (1, 19),
    "snapshot_timeout": (1, 86400),
    "drill_timeout": (1, 86400),
    "space_margin_mb": (0, 1 << 30),
    "keep": (0, 100000),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """classes.toml, read and validated."""

    path: Path
    settings: Settings
    classes: dict[str, BackupClass]

    @property
    def default_class(self) -> BackupClass:
        return next(c for c in self.classes.values() if c.default)


CLASS_KEYS = {"title": str, "patterns": list, "procedure": str, "fallback": str, "restore": str, "default": bool, "options": dict,
              "keep": int, "older_than": str}
CLASS_REQUIRED = ("title", "patterns", "procedure", "fallback", "restore")
NO_FALLBACK = "none"


def check_setting(name: str, value: Any, where: str) -> Any:
    """Return value converted to the setting's type. Raise UsageError naming where.

    An integer setting takes an integer only (6, "6"; not 6.5, inf or nan); a number of
    seconds takes any finite number.
    """
    kind = type(getattr(DEFAULT_SETTINGS, name))
    try:
        if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = kind(int(value) if kind is int and isinstance(value, float) else value)
        if kind is float and not math.isfinite(converted):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a finite number" if kind is float else "a string"
        raise UsageError(f"{where}: expected {what}, got {value!r}") from None
    if name in SETTING_CHOICES and converted not in SETTING_CHOICES[name]:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(SETTING_CHOICES[name])}")
    if name in SETTING_LIMITS:
        low, high = SETTING_LIMITS[name]
        if not low <= converted <= high:
            raise UsageError(f"{where}: {value!r} is outside {low:g}..{high:g}")
    if name in DURATION_SETTINGS:
        parse_duration(converted, where)
    return converted


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, where: str) -> int:
    """Return the seconds of a duration written 90s, 30m, 2h or 1d. Raise UsageError naming where."""
    found = re.fullmatch(r"([0-9]{1,9})([smhd])", text.strip())
    if not found:
        raise UsageError(f"{where}: {text!r} is not a duration (a whole number and s, m, h or d: 90s, 30m, 2h, 1d)")
    return int(found.group(1)) * DURATION_UNITS[found.group(2)]


def format_age(seconds: float) -> str:
    """Return an age as an operator reads it: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def load_config(path: Path) -> Config:
    """Return the validated class table and settings from classes.toml.

    Raise UsageError naming the file and the key if it is missing, malformed or
    incomplete.
    """
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{path}: classes file not found (use --classes FILE)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None

    unknown = set(doc) - {"settings", "classes"}
    if unknown:
        raise UsageError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (expected [settings], [classes.*])")
    raw_settings = doc.get("settings", {})
    if not isinstance(raw_settings, dict):
        raise UsageError(f"{path}: [settings] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw_settings.items():
        if key not in SETTING_SOURCES:
            raise UsageError(f"{path}: settings.{key}: unknown setting (known: {', '.join(SETTING_SOURCES)})")
        values[key] = check_setting(key, value, f"{path}: settings.{key}")
    settings = Settings(**values)

    raw_classes = doc.get("classes")
    if not isinstance(raw_classes, dict) or not raw_classes:
        raise UsageError(f"{path}: [classes.*]: no backup classes defined")
    classes: dict[str, BackupClass] = {}
    exact_owner: dict[str, str] = {}
    for letter, table in raw_classes.items():
        where = f"{path}: classes.{letter}"
        if not re.fullmatch(r"[A-Z]", letter):
            raise UsageError(f"{where}: class names are single capital letters")
        if not isinstance(table, dict):
            raise UsageError(f"{where}: must be a table")
        for key, value in table.items():
            if key not in CLASS_KEYS:
                raise UsageError(f"{where}.{key}: unknown key (known: {', '.join(CLASS_KEYS)})")
            if not isinstance(value, CLASS_KEYS[key]):
                raise UsageError(f"{where}.{key}: expected {CLASS_KEYS[key].__name__}, got {type(value).__name__}")
        for key in CLASS_REQUIRED:
            if key not in table:
                raise UsageError(f"{where}: missing key {key!r}")
        patterns = table["patterns"]
        if not all(isinstance(p, str) and p.strip() for p in patterns):
            raise UsageError(f"{where}.patterns: expected a list of non-empty strings")
        for pattern in patterns:
            if not _is_glob(pattern):
                if pattern in exact_owner:
                    raise UsageError(f"{where}.patterns: {pattern!r} is already listed in classes.{exact_owner[pattern]}")
                exact_owner[pattern] = letter
        known_names = ", ".join(sorted(PROCEDURES))
        if table["procedure"] not in PROCEDURES:
            raise UsageError(f"{where}.procedure: unknown procedure {table['procedure']!r} (known: {known_names})")
        if table["fallback"] not in (*PROCEDURES, NO_FALLBACK):
            raise UsageError(f"{where}.fallback: unknown procedure {table['fallback']!r} (known: {known_names}, none)")
        known = PROCEDURES[table["procedure"]].options
        options = {name: default for name, (_, default) in known.items()}
        for name, value in table.get("options", {}).items():
            if name not in known:
                raise UsageError(f"{where}.options.{name}: unknown option for {table['procedure']} (known: {', '.join(known) or 'none'})")
            if not isinstance(value, known[name][0]):
                raise UsageError(f"{where}.options.{name}: expected {known[name][0].__name__}, got {type(value).__name__}")
            options[name] = value
        classes[letter] = BackupClass(
            letter=letter,
            title=table["title"],
            patterns=tuple(patterns),
            procedure=table["procedure"],
            fallback=None if table["fallback"] == NO_FALLBACK else table["fallback"],
            restore=table["restore"].strip(),
            default=table.get("default", False),
            options=options,
            keep=check_setting("keep", table["keep"], f"{where}.keep") if "keep" in table else None,
            older_than=check_setting("older_than", table["older_than"], f"{where}.older_than") if "older_than" in table else None,
        )
    defaults = [c.letter for c in classes.values() if c.default]
    if len(defaults) != 1:
        raise UsageError(f"{path}: exactly one class must set default = true (found {len(defaults)}: {', '.join(defaults) or 'none'})")
    return Config(path=path, settings=settings, classes=classes)


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def classify(module_id: str, config: Config, exclude: str | None = None) -> tuple[BackupClass, str]:
    """Return the class of a module and the pattern that decided it.

    An exact name beats any glob; among globs the one with the most literal characters
    wins (`agaria-*` over `*`); no match gives the default class. exclude leaves one
    class out (what else is agaria-postgres? A). Raise UsageError if two classes tie.
    """
    config = dataclasses.replace(config, classes={k: v for k, v in config.classes.items() if k != exclude})
    for cls in config.classes.values():
        if module_id in cls.patterns:
            return cls, module_id
    best: list[tuple[int, BackupClass, str]] = []
    for cls in config.classes.values():
        for pattern in cls.patterns:
            if _is_glob(pattern) and fnmatch.fnmatchcase(module_id, pattern):
                score = len(re.sub(r"\[[^\]]*\]|[*?]", "", pattern))
                best.append((score, cls, pattern))
    if not best:
        return config.default_class, "(default)"
    top = max(score for score, _, _ in best)
    winners = [(cls, pattern) for score, cls, pattern in best if score == top]
    if len({cls.letter for cls, _ in winners}) > 1:
        listed = ", ".join(f"classes.{cls.letter} {pattern!r}" for cls, pattern in winners)
        raise UsageError(f"{config.path}: module {module_id!r} matches equally specific patterns of two classes: {listed}")
    return winners[0]


# --------------------------------------------------------------------------- platform audit (module.yaml)


class YamlError(UsageError):
    """module.yaml holds something the reader cannot read without guessing."""


_PLAIN_INT_RE = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_PLAIN_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_KEY_RE = re.compile(r"""^(?P<key>"(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s"'#\-?:,\[\]{}&*!|>%@`][^:]*?|-[^\s:][^:]*?)\s*:(?:\s+|$)(?P<rest>.*)$""")
_DQ_ESCAPES = {"n": "\n", "t": "\t", "\t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\", "/": "/", " ": " ", "e": "\x1b", "a": "\a",
               "b": "\b", "v": "\v", "f": "\f", "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}


@dataclasses.dataclass
class _Line:
    number: int
    indent: int
    text: str


# The keys the tool reads from module.yaml; the rest of the file is skipped, not judged.
MODULE_KEYS: dict[str, Any] = {"metadata": {"id": None, "lifecycle": None}, "spec": {"runtime": {"statefulness": None, "container": None}}}


class _YamlReader:
    """The block-style YAML that people write by hand in module.yaml.

    Handles comments, plain/single/double-quoted scalars (also over several lines),
    nested maps, block sequences (also at the parent key's indentation), flow
    collections (also over several lines), literal and folded block scalars, a leading
    `---` with directives before it and a closing `...`. Rejects, with file:line, tabs in
    indentation, duplicate keys, anchors, aliases, tags and several documents.

    With wanted (a tree of keys, None for a leaf), only the paths to those keys are read,
    strictly: the value of any other key is skipped whatever it holds (anchors, tags,
    long strings, things this reader does not parse), and only what makes a wanted key
    ambiguous is an error: a duplicate of it, a merge key (<<) beside it, an anchor, alias
    or tag on it, a second document.
    """

    def __init__(self, text: str, filename: str, wanted: dict[str, Any] | None = None) -> None:
        self.filename = filename
        self.raw = text.split("\n")
        self.pos = 0
        self.in_document = False  # a '---' before the first content line is allowed
        self.ended = False  # a '...' ended the document
        self.wanted = wanted
        self.key_lines: dict[tuple[str, ...], int] = {}

    def fail(self, number: int, why: str) -> YamlError:
        return YamlError(f"{self.filename}:{number}: {why}")

    # -- lines

    def _structural(self, index: int) -> _Line | None:
        """Return raw line index without its comment, or None if it is blank."""
        raw = self.raw[index]
        body = raw.lstrip(" ")
        text = _strip_comment(body.lstrip("\t")).rstrip()
        if not text:
            return None
        if body.startswith("\t"):
            raise self.fail(index + 1, "tab character in indentation (YAML allows spaces only)")
        while text.startswith("-\t"):  # a tab after a sequence dash separates, as a space does
            text = "- " + text[2:].lstrip("\t")
        return _Line(index + 1, len(raw) - len(body), text)

    def peek(self) -> _Line | None:
        while self.pos < len(self.raw) and not self.ended:
            line = self._structural(self.pos)
            if line is not None:
                if self.in_document and line.indent == 0 and line.text.split(" ", 1)[0] in ("---", "..."):
                    if line.text.startswith("---"):
                        raise self.fail(line.number, "a second YAML document in one file is not supported")
                    self.ended = True
                    return None
                return line
            self.pos += 1
        return None

    # -- document

    def document(self) -> Any:
        while (line := self.peek()) is not None and line.indent == 0 and line.text.startswith("%"):
            self.pos += 1  # a directive (%YAML 1.2); the '---' it needs comes next
        line = self.peek()
        if line is not None and line.indent == 0 and line.text.split(" ", 1)[0] == "---":
            if line.text == "---":
                self.pos += 1
            else:  # "--- {...}" or "--- text": the document starts on the marker's line
                raw = self.raw[self.pos]
                self.raw[self.pos] = raw[3:].lstrip(" ")
        self.in_document = True
        line = self.peek()
        if line is None:
            return None
        if line.indent != 0:
            raise self.fail(line.number, "the document must start at column 1")
        if line.text[0] in "[{":
            self.pos += 1
            value = self.inline(self._whole(line.text, line), line.number, self.wanted)
        else:
            value = self.block(0, (), self.wanted)
        leftover = self.peek()
        if leftover is not None:
            raise self.fail(leftover.number, "unexpected indentation or content")
        if self.ended:
            self.pos += 1
            self.ended = False
            after = self.peek()
            if after is not None:
                raise self.fail(after.number, "content after the document end marker '...'")
        return value

    def block(self, indent: int, path: tuple[str, ...], wanted: dict[str, Any] | None) -> Any:
        line = self.peek()
        assert line is not None and line.indent == indent
        if line.text == "-" or line.text.startswith("- "):
            return self.sequence(indent, path)
        return self.mapping(indent, path, wanted)

    def mapping(self, indent: int, path: tuple[str, ...], wanted: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self.peek()) is not None and line.indent == indent:
            if line.text == "-" or line.text.startswith("- "):
                raise self.fail(line.number, "a list item where a 'key: value' line was expected")
            match = _KEY_RE.match(line.text)
            if wanted is not None and (match is None or self._key_name(match["key"], line.number) not in wanted):
                self._skip_entry(line, match, wanted, path)
                continue
            if not match:
                raise self.fail(line.number, f"expected 'key: value', got {line.text!r}")
            key = str(self.scalar(match["key"], line.number, is_key=True))
            if key in result:
                raise self.fail(line.number, f"duplicate key {key!r} (first on line {self.key_lines[(*path, key)]})")
            self.key_lines[(*path, key)] = line.number
            self.pos += 1
            inner = wanted[key] if wanted is not None else None
            if wanted is not None and match["rest"][:1] in ("&", "*", "!"):
                raise self.fail(line.number, f"anchors, aliases and tags are not supported on {'.'.join((*path, key))}, a key this tool reads")
            result[key] = self.value_after_key(match["rest"], line, (*path, key), inner)
        line = self.peek()
        if line is not None and line.indent > indent:
            raise self.fail(line.number, "unexpected indentation")
        return result

    def _key_name(self, text: str, number: int) -> str | None:
        try:
            return str(self.scalar(text, number, is_key=True))
        except YamlError:
            return None  # not a name this reader needs, whatever it is

    def _skip_entry(self, line: _Line, match: re.Match[str] | None, wanted: dict[str, Any], path: tuple[str, ...]) -> None:
        """Move past a key this reader does not need, and all of its value, whatever that holds."""
        raw = self.raw[line.number - 1]
        if line.text == "?" or line.text.startswith(("? ", "?\t")):  # a complex key, then ": value" at the same indentation
            if line.text[1:].strip() in wanted:
                raise self.fail(line.number, f"a complex key (?) naming {line.text[1:].strip()!r}, a key this tool reads, is not supported")
            self.pos = line.number
            self._skip_value(line.indent, raw[line.indent + 1:], allow_sequence=False, complex_key=True)
            return
        if match is None:
            match = re.match(r"(?P<key>.+?)\s*:(?:\s+|$)(?P<rest>.*)$", line.text)
            if match is None:
                raise self.fail(line.number, f"expected 'key: value', got {line.text!r}")
        key = match["key"].strip()
        if key == "<<":
            raise self.fail(line.number, f"a merge key (<<) in {'.'.join(path) or 'the document'} makes the keys this tool reads there ambiguous")
        self.pos = line.number
        # Only properties (an anchor, a tag) on the key's line: the value, maybe a block sequence at the key's
        # own indentation, starts on the next line.
        bare = not re.sub(r"(?:^|\s)[&!]\S*", "", match["rest"]).strip()
        self._skip_value(line.indent, raw[line.indent + match.start("rest"):], allow_sequence=bare)

    def _skip_value(self, owner: int, first: str, *, allow_sequence: bool, complex_key: bool = False) -> None:
        """Skip the value that starts with first (the rest of its key's line) and the lines that belong to it.

        A value ends at the first line back at its key's indentation or less (a block
        sequence may sit at the key's own indentation), unless that line is inside a quoted
        scalar, a flow collection or a block scalar that is still open.
        """
        lexer = _SkipLexer()
        block, plain = lexer.value(first, 0, owner)
        while self.pos < len(self.raw):
            raw = self.raw[self.pos]
            if lexer.open():
                lexer.continuation(raw)
                self.pos += 1
                continue
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                self.pos += 1
                continue
            indent = len(raw) - len(raw.lstrip(" "))
            if complex_key and indent == owner and (stripped == ":" or stripped[:2] in (": ", ":\t")):
                complex_key = False  # the value of the complex key: part of this entry
                block, plain = lexer.value(raw, indent + 1, owner)
                self.pos += 1
                continue
            if indent <= owner and not (allow_sequence and indent == owner and (stripped == "-" or stripped[:2] in ("- ", "-\t"))):
                return
            if block is not None and indent > block or plain is not None and indent > plain:
                self.pos += 1  # the lines of a block scalar, the continuation of a plain one
                continue
            block, plain = lexer.line(raw, indent)
            self.pos += 1

    def value_after_key(self, rest: str, line: _Line, path: tuple[str, ...], wanted: dict[str, Any] | None = None) -> Any:
        if rest:
            if rest[0] in "|>":
                return self.block_scalar(rest, line)
            if rest[0] in "[{\"'":
                return self.inline(self._whole(rest, line), line.number, wanted)
            return self.inline(self._continue_plain(rest, line.indent), line.number)
        nxt = self.peek()
        if nxt is None:
            return None
        if nxt.indent > line.indent:
            return self.block(nxt.indent, path, wanted)
        if nxt.indent == line.indent and (nxt.text == "-" or nxt.text.startswith("- ")):
            return self.sequence(line.indent, path)
        return None

    def _whole(self, rest: str, line: _Line) -> str:
        """Return a quoted scalar or flow collection that starts in rest, as one line, with the lines it goes on over.

        rest is the end of line's text; self.pos is the line after it. Line breaks fold as
        YAML folds them: into a space, an empty line inside a quoted scalar into a newline,
        and a backslash ending a line of a double-quoted scalar joins the next line directly.
        """
        raw = self.raw[line.number - 1]
        lexer = _SkipLexer()
        pieces = [raw[line.indent + len(line.text) - len(rest):]]  # the same place in the raw line, comment included
        lexer.value(pieces[0], 0, line.indent)
        states = [lexer.quote]
        while lexer.open():
            if self.pos >= len(self.raw):
                raise self.fail(line.number, f"unclosed {rest[0]!r} (a flow collection that never ends)" if rest[0] in "[{" else "unterminated quoted string")
            pieces.append(self.raw[self.pos])
            lexer.continuation(self.raw[self.pos])
            states.append(lexer.quote)
            self.pos += 1
        if len(pieces) == 1:
            return rest
        text, breaks, direct = "", 0, False
        for index, piece in enumerate(pieces):
            inside_before = bool(states[index - 1]) if index else False
            body = piece if index == 0 else piece.lstrip(" \t") if inside_before else piece.strip(" \t")
            if states[index]:  # the line ends inside a quoted scalar: a backslash there, or trailing blanks, are folding
                body = body.rstrip(" \t") if not (states[index] == '"' and _escaped_break(body)) else body.rstrip(" \t")[:-1]
            if index and inside_before and not body and states[index]:
                breaks += 1
                continue
            if index:
                text += "" if direct else ("\n" * breaks if breaks and inside_before else " ")
            text += body
            breaks = 0
            direct = states[index] == '"' and _escaped_break(piece.rstrip("\n"))
        tail = lexer.after
        return text[:len(text) - len(tail)] + _strip_comment(tail).rstrip() if tail and text.endswith(tail) else text.rstrip()

    def _continue_plain(self, text: str, owner: int) -> str:
        """Return a plain scalar joined with its continuation lines (more indented than owner), folded."""
        parts, breaks = [text], 0
        while self.pos < len(self.raw):
            raw = self.raw[self.pos]
            stripped = raw.strip()
            if not stripped:
                breaks += 1
                self.pos += 1
                continue
            indent = len(raw) - len(raw.lstrip(" "))
            if indent <= owner or stripped.startswith("#"):
                break
            content = _strip_comment(stripped).rstrip()
            if ": " in content or content.endswith(":"):
                raise self.fail(self.pos + 1, f"unexpected ':' in {content!r} (quote the value)")
            parts.append(("\n" * breaks) if breaks else " ")
            parts.append(content)
            breaks = 0
            self.pos += 1
            if content != stripped:
                break  # a comment ends a plain scalar
        return "".join(parts)

    def sequence(self, indent: int, path: tuple[str, ...]) -> list[Any]:
        items: list[Any] = []
        while (line := self.peek()) is not None and line.indent == indent:
            if not (line.text == "-" or line.text.startswith("- ")):
                break
            item_path = (*path, str(len(items)))
            rest = line.text[1:].lstrip(" ")
            if not rest:
                self.pos += 1
                nxt = self.peek()
                items.append(self.block(nxt.indent, item_path, None) if nxt is not None and nxt.indent > indent else None)
            elif _KEY_RE.match(rest) or rest == "-" or rest.startswith("- "):
                # "- key: value" (or "- - item"): the item is a block whose first line
                # starts at the column of "key"; the line is re-read with that indentation.
                column = indent + len(line.text) - len(rest)
                self.raw[self.pos] = " " * column + self.raw[self.pos][column:]
                items.append(self.block(column, item_path, None))
            elif rest[0] in "|>":
                self.pos += 1
                items.append(self.block_scalar(rest, line))
            elif rest[0] in "[{\"'":
                self.pos += 1
                items.append(self.inline(self._whole(rest, line), line.number))
            else:
                self.pos += 1
                items.append(self.inline(self._continue_plain(rest, indent), line.number))
        return items

    def block_scalar(self, header: str, line: _Line) -> str:
        match = re.fullmatch(r"([|>])([-+]?)([1-9]?)([-+]?)", header)
        if not match:
            raise self.fail(line.number, f"malformed block scalar header {header!r}")
        style, chomp = match[1], match[2] or match[4]
        self.pos = line.number  # the line after the header
        body: list[str] = []
        block_indent = line.indent + int(match[3]) if match[3] else None
        while self.pos < len(self.raw):
            raw = self.raw[self.pos]
            if not raw.strip():
                body.append("")
                self.pos += 1
                continue
            indent = len(raw) - len(raw.lstrip(" "))
            if block_indent is None:
                if indent <= line.indent:
                    break
                block_indent = indent
            if indent < block_indent:
                break
            body.append(raw[block_indent:])
            self.pos += 1
        trailing = 0
        while body and body[-1] == "":
            body.pop()
            trailing += 1
        text = "\n".join(body) if style == "|" else _fold(body)
        if not text or chomp == "-":
            return text
        return text + "\n" * (1 + trailing if chomp == "+" else 1)

    # -- scalars and flow collections

    def inline(self, text: str, number: int, wanted: dict[str, Any] | None = None) -> Any:
        if text[0] in "[{":
            value, end = self.flow(text, 0, number, wanted)
            if text[end:].strip():
                raise self.fail(number, f"unexpected text after flow collection: {text[end:].strip()!r}")
            return value
        return self.scalar(text, number)

    def scalar(self, text: str, number: int, *, is_key: bool = False) -> Any:
        text = text.strip()
        if text[:1] in ("&", "*", "!"):
            raise self.fail(number, f"anchors, aliases and tags are not supported: {text!r}")
        if text.startswith('"'):
            if len(text) < 2 or not text.endswith('"') or _dq_end(text) != len(text) - 1:
                raise self.fail(number, "unterminated or multi-line double-quoted string")
            return self.unescape(text[1:-1], number)
        if text.startswith("'"):
            if len(text) < 2 or not text.endswith("'") or "'" in text[1:-1].replace("''", ""):
                raise self.fail(number, "unterminated or multi-line single-quoted string")
            return text[1:-1].replace("''", "'")
        if text[:1] in ("@", "`", "%"):
            raise self.fail(number, f"a plain scalar cannot start with {text[0]!r}")
        if ": " in text or text.endswith(":"):
            raise self.fail(number, f"unexpected ':' in {text!r} (quote the value)")
        if is_key:
            return text
        return _plain_value(text)

    def unescape(self, body: str, number: int) -> str:
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            code = body[i + 1 : i + 2]
            if code in _DQ_ESCAPES:
                out.append(_DQ_ESCAPES[code])
                i += 2
            elif code in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[code]
                digits = body[i + 2 : i + 2 + width]
                if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.fail(number, f"bad escape \\{code}{digits}")
                out.append(chr(int(digits, 16)))
                i += 2 + width
            else:
                raise self.fail(number, f"unknown escape \\{code} in double-quoted string")
        return "".join(out)

    def flow(self, text: str, i: int, number: int, wanted: dict[str, Any] | None = None) -> tuple[Any, int]:
        """Parse a flow collection starting at text[i]; return (value, index after it).

        With wanted, a mapping keeps only those keys (the values of the others are skipped
        whatever they hold) and a sequence is skipped: nothing the tool reads is in it.
        """
        opener = text[i]
        closer = "]" if opener == "[" else "}"
        if wanted is not None and opener == "[":
            return [], _skip_flow_value(text, i)
        items: list[Any] = []
        mapping: dict[str, Any] = {}
        i += 1
        while True:
            i = _skip_spaces(text, i)
            if i >= len(text):
                raise self.fail(number, f"unclosed {opener!r} (a flow collection that never ends)")
            if text[i] == closer:
                return (items if opener == "[" else mapping), i + 1
            if wanted is not None and text[i:i + 2] in ("? ", "?\t"):
                i = _skip_spaces(text, i + 2)  # an explicit key, as PyYAML writes long ones
            if text[i] in "[{":
                if wanted is not None:
                    i = _skip_flow_value(text, _skip_flow_value(text, i) if opener == "{" else i)
                    i = _skip_flow_entry_end(text, i, closer, number, self)
                    continue
                value, i = self.flow(text, i, number)
                key = None
            else:
                token, i = _flow_token(text, i)
                if not token:
                    raise self.fail(number, f"unexpected {text[i]!r} in flow collection")
                key = token
                value = None
            i = _skip_spaces(text, i)
            if opener == "{":
                name = (self._key_name(key, number) if wanted is not None else str(self.scalar(key, number, is_key=True))) if key is not None else None
                if wanted is not None and (name not in wanted or i >= len(text) or text[i] != ":"):
                    if name == "<<":
                        raise self.fail(number, "a merge key (<<) in a mapping this tool reads makes its keys ambiguous")
                    i = _skip_flow_value(text, i + 1) if i < len(text) and text[i] == ":" else i
                    i = _skip_flow_entry_end(text, i, closer, number, self)
                    continue
                if key is None or i >= len(text) or text[i] != ":":
                    raise self.fail(number, "expected 'key: value' inside {...}")
                assert name is not None
                if name in mapping:
                    raise self.fail(number, f"duplicate key {name!r}")
                i = _skip_spaces(text, i + 1)
                inner = wanted[name] if wanted is not None else None
                if i < len(text) and text[i] in "[{":
                    mapping[name], i = self.flow(text, i, number, inner)
                else:
                    token, i = _flow_token(text, i)
                    mapping[name] = self.scalar(token, number) if token else None
            else:
                items.append(value if key is None else self.scalar(key, number))
            i = _skip_flow_entry_end(text, i, closer, number, self)


def _skip_flow_entry_end(text: str, i: int, closer: str, number: int, reader: _YamlReader) -> int:
    i = _skip_spaces(text, i)
    if i < len(text) and text[i] == ",":
        return i + 1
    if i < len(text) and text[i] != closer:
        raise reader.fail(number, f"expected ',' or {closer!r} in flow collection")
    return i


def _skip_flow_value(text: str, i: int) -> int:
    """Return the index after the flow value at text[i] (a quoted or plain scalar, a nested collection), not parsing it."""
    i = _skip_spaces(text, i)
    while text[i:i + 1] in ("&", "!"):  # properties: an anchor, a tag
        while i < len(text) and text[i] not in " ,]}":
            i += 1
        i = _skip_spaces(text, i)
    if i >= len(text):
        return i
    if text[i] in "[{":
        lexer = _SkipLexer()  # the one rule for where a quoted scalar begins
        lexer.value(text, i, 0)
        return len(text) if lexer.open() else len(text) - len(lexer.after)
    _, end = _flow_token(text, i)
    return end


class _SkipLexer:
    """Just enough of YAML's lexing to find where a value the reader skips ends.

    It tracks a quoted scalar or flow collection that is still open across lines, and says
    of each line whether its last value opens a block scalar or a plain scalar whose
    continuation lines follow, and at which indentation they must stay deeper than.
    """

    def __init__(self) -> None:
        self.quote = ""  # '"' or "'" while inside a quoted scalar
        self.depth = 0  # open [ and { of a flow collection
        self.after = ""  # what followed the value once it closed
        self.expect = False  # the next line of an open flow collection starts where a value may begin

    def open(self) -> bool:
        return bool(self.quote) or self.depth > 0

    def line(self, raw: str, indent: int) -> tuple[int | None, int | None]:
        """Scan one line of structure; return (block owner, plain owner) for the lines after it."""
        i = indent
        owner = indent
        while raw[i:i + 2] in ("- ", "-\t") or raw[i:].rstrip() == "-":
            owner = i
            i += 2
            while i < len(raw) and raw[i] in " \t":
                i += 1
        if raw[i:i + 2] in ("? ", "?\t") or raw[i:i + 2] == ": ":
            i += 2
        end = _key_end(raw, i)
        if end is not None:
            owner, i = i, end
        return self.value(raw, i, owner)

    def value(self, raw: str, i: int, owner: int) -> tuple[int | None, int | None]:
        """Scan a value from raw[i]; return (block owner, plain owner) as line() does."""
        while i < len(raw) and raw[i] in " \t":
            i += 1
        while raw[i:i + 1] in ("&", "!"):  # properties: an anchor, a tag
            while i < len(raw) and raw[i] not in " \t":
                i += 1
            while i < len(raw) and raw[i] in " \t":
                i += 1
        if i >= len(raw) or raw[i] == "#":
            return None, None
        if raw[i] in "|>":
            return owner, None
        if raw[i] in "\"'[{":
            self._scan(raw, i, value_start=True)
            rest = self.after.lstrip(" \t")
            if not self.open() and rest[:1] == ":" and rest[1:2] in ("", " ", "\t"):
                return self.value(rest, 1, owner)  # it was the key of a compact mapping: its value follows
            return None, None
        if raw[i] == "*":
            return None, None
        return None, owner

    def continuation(self, raw: str) -> None:
        """Scan a line inside an open quoted scalar or flow collection."""
        self._scan(raw, 0, value_start=self.expect)

    def _scan(self, raw: str, i: int, *, value_start: bool) -> None:
        # expect: at a place where a flow scalar may begin (after [ { , ? or a ": "), so a quote opens one;
        # in the middle of a plain scalar that runs over lines, a quote is just a character.
        expect = value_start
        while i < len(raw):
            ch = raw[i]
            if self.quote:
                end = _quote_end(raw, i, self.quote)
                if end < 0:
                    break  # the quoted scalar goes on over the next line
                self.quote, expect, i = "", False, end + 1
                if not self.depth:
                    self.after = raw[i:]
                    return
                continue
            if ch in " \t":
                i += 1
                continue
            if ch == "#" and (i == 0 or raw[i - 1] in " \t"):
                break
            if expect and ch in "\"'":
                self.quote = ch
                i += 1
                continue
            if ch in "[{" and (expect or self.depth):
                self.depth += 1
                expect = True
                i += 1
                continue
            elif self.depth and ch in "]}":
                self.depth -= 1
                if not self.depth:
                    self.after = raw[i + 1:]
                    self.expect = False
                    return
            elif self.depth and (ch == "," or ch in "?:" and raw[i + 1:i + 2] in ("", " ", "\t")):
                expect = True
                i += 1
                continue
            elif self.depth and ch in "&!" and expect:
                while i < len(raw) and raw[i] not in " \t,]}":
                    i += 1
                continue
            expect = False
            i += 1
        self.expect = expect if self.depth and not self.quote else False


def _quote_end(text: str, i: int, quote: str) -> int:
    """Return the index of the quote that closes a quoted scalar whose text goes on at text[i], or -1 if the line ends first.

    Inside double quotes a backslash escapes the next character; inside single quotes ''
    is a quote.
    """
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i
        i += 1
    return -1


def _key_end(raw: str, i: int) -> int | None:
    """Return the index after 'key:' if a block mapping key starts at raw[i], else None."""
    if i >= len(raw) or raw[i] in "[{#&*!|>%@`?" or raw[i] == "-" and raw[i + 1:i + 2] in ("", " ", "\t"):
        return None  # a flow collection, a comment, a property, a block scalar, an indicator: not a key
    if raw[i] in "\"'":
        j = _quote_end(raw, i + 1, raw[i])
        rest = raw[j + 1:].lstrip(" \t") if j >= 0 else ""
        return len(raw) - len(rest) + 1 if rest[:1] == ":" and rest[1:2] in ("", " ", "\t") else None
    j = i
    while j < len(raw):
        if raw[j] == ":" and raw[j + 1:j + 2] in ("", " ", "\t"):
            return j + 1
        if raw[j] == "#" and raw[j - 1] in " \t":
            return None
        j += 1
    return None


def _escaped_break(piece: str) -> bool:
    stripped = piece.rstrip(" \t")
    return stripped.endswith("\\") and _escaped(stripped, len(stripped))


def _strip_comment(text: str) -> str:
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if quote == "'" and ch == "'" and text[i + 1:i + 2] == "'":
                i += 1  # '' is a quote inside a single-quoted string
            elif ch == quote and not (quote == '"' and _escaped(text, i)):
                quote = ""
        elif ch in "\"'" and (i == 0 or text[i - 1] in " \t:[{,-"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i]
        i += 1
    return text


def _escaped(text: str, i: int) -> bool:
    backslashes = 0
    while i > 0 and text[i - 1] == "\\":
        backslashes += 1
        i -= 1
    return backslashes % 2 == 1


def _dq_end(text: str) -> int:
    for i in range(1, len(text)):
        if text[i] == '"' and not _escaped(text, i):
            return i
    return -1


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] == " ":
        i += 1
    return i


def _flow_token(text: str, i: int) -> tuple[str, int]:
    """Return the scalar token at text[i] (quoted or plain) and the index after it."""
    if i < len(text) and text[i] in "\"'":
        quote = text[i]
        j = i + 1
        while j < len(text):
            if text[j] == quote and not (quote == '"' and _escaped(text, j)):
                if quote == "'" and text[j + 1 : j + 2] == "'":
                    j += 2
                    continue
                return text[i : j + 1], j + 1
            j += 1
        return text[i:], len(text)
    j = i
    while j < len(text) and text[j] not in ",]}" and not (text[j] == ":" and text[j + 1 : j + 2] in (" ", "")):
        j += 1
    return text[i:j].strip(), j


def _fold(lines: list[str]) -> str:
    out = ""
    for index, line in enumerate(lines):
        if index == 0:
            out = line
        elif line == "" or lines[index - 1] == "":
            out += "\n" + line if line else ""
        else:
            out += " " + line
    return out


def _plain_value(text: str) -> Any:
    if text in ("~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    if _PLAIN_INT_RE.match(text):
        return int(text)
    if _PLAIN_FLOAT_RE.match(text) and any(c.isdigit() for c in text):
        return float(text)
    return text


def parse_yaml(text: str, filename: str, wanted: dict[str, Any] | None = None) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Return the document in text and the line of every mapping key (by key path).

    With wanted, only those keys are read (see _YamlReader). Raise YamlError with
    filename:line if the text holds anything the reader would have to guess at.
    """
    reader = _YamlReader(text, filename, wanted)
    return reader.document(), reader.key_lines


@dataclasses.dataclass(frozen=True)
class Module:
    """What the tool needs from modules/<id>/module.yaml."""

    id: str
    yaml_path: Path
    statefulness: str
    lifecycle: str
    container: str | None
    runbook: Path | None


def validate_module_id(module_id: str) -> str:
    """Return module_id. Raise UsageError unless it is a plain, safe module id."""
    if len(module_id) > MODULE_ID_MAX or not MODULE_ID_RE.fullmatch(module_id):
        raise UsageError(
            f"invalid module id {module_id!r}: expected lowercase letters, digits, '.', '_', '-' "
            f"(at most {MODULE_ID_MAX}, starting with a letter or digit)"
        )
    return module_id


def read_module(yaml_path: Path) -> Module:
    """Return the module described by yaml_path. Raise UsageError naming file:line."""
    try:
        with open(yaml_path, "rb") as fh:
            data = fh.read(MODULE_YAML_MAX_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{yaml_path}: cannot read: {exc.strerror}") from None
    if len(data) > MODULE_YAML_MAX_BYTES:
        raise UsageError(f"{yaml_path}: larger than {MODULE_YAML_MAX_BYTES // 1024} KiB; not a module.yaml")
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise UsageError(f"{yaml_path}:{line}: NUL byte; not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{yaml_path}:{line}: not UTF-8 text") from None
    doc, lines = parse_yaml(text.removeprefix("\ufeff"), str(yaml_path), MODULE_KEYS)
    if not isinstance(doc, dict):
        raise UsageError(f"{yaml_path}: expected a mapping at the top level")

    def get(*path: str) -> tuple[Any, str]:
        node: Any = doc
        for key in path:
            if not isinstance(node, dict):
                return None, where(path)
            node = node.get(key)
        return node, where(path)

    def where(path: tuple[str, ...]) -> str:
        for depth in range(len(path), 0, -1):
            if path[:depth] in lines:
                return f"{yaml_path}:{lines[path[:depth]]}: {'.'.join(path)}"
        return f"{yaml_path}: {'.'.join(path)}"

    dir_name = yaml_path.parent.name
    module_id, at = get("metadata", "id")
    if module_id is None:
        module_id = dir_name
    elif not isinstance(module_id, str):
        raise UsageError(f"{at}: expected a string, got {module_id!r}")
    elif module_id != dir_name:
        raise UsageError(f"{at}: {module_id!r} does not match its directory name {dir_name!r}")
    try:
        validate_module_id(module_id)
    except UsageError as exc:
        raise UsageError(f"{at}: {exc}") from None

    statefulness, at = get("spec", "runtime", "statefulness")
    if statefulness is None:
        statefulness = UNDECLARED
    elif statefulness not in STATEFULNESS:
        raise UsageError(f"{at}: expected one of {', '.join(STATEFULNESS)}, got {statefulness!r}")
    lifecycle, at = get("metadata", "lifecycle")
    if lifecycle is None:
        lifecycle = "active"
    elif lifecycle not in LIFECYCLES:
        raise UsageError(f"{at}: expected one of {', '.join(LIFECYCLES)}, got {lifecycle!r}")
    container, at = get("spec", "runtime", "container")
    if container is not None and (not isinstance(container, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", container)):
        raise UsageError(f"{at}: expected a container name, got {container!r}")
    runbook = yaml_path.with_name("runbook.md")
    return Module(
        id=module_id,
        yaml_path=yaml_path,
        statefulness=statefulness,
        lifecycle=lifecycle,
        container=container,
        runbook=runbook if runbook.is_file() else None,
    )


def modules_dir(platform_root: Path) -> Path:
    """Return <platform_root>/modules. Raise UsageError if it is not there."""
    path = platform_root / "modules"
    if not path.is_dir():
        raise UsageError(f"{path}: no such directory; is {platform_root} a platform checkout? (set --platform-root or PLATFORM_ROOT)")
    return path


def load_module(platform_root: Path, module_id: str) -> Module:
    """Return one module by id. Raise UsageError if the id is invalid or unknown."""
    validate_module_id(module_id)
    yaml_path = modules_dir(platform_root) / module_id / "module.yaml"
    if not yaml_path.is_file():
        raise UsageError(f"unknown module {module_id!r}: {yaml_path} does not exist")
    return read_module(yaml_path)


def discover_modules(platform_root: Path) -> tuple[list[Module], list[str]]:
    """Return every readable module under platform_root and one error line per bad one."""
    modules: list[Module] = []
    errors: list[str] = []
    for entry in sorted(modules_dir(platform_root).iterdir()):
        yaml_path = entry / "module.yaml"
        if not yaml_path.is_file():
            LOG.debug("%s: no module.yaml, skipped", entry)
            continue
        try:
            modules.append(read_module(yaml_path))
        except UsageError as exc:
            errors.append(str(exc))
    return modules, errors


# --------------------------------------------------------------------------- container resolution

RUNBOOK_DOCKER_RE = re.compile(r"\bdocker\s+(exec|logs|inspect|restart)\b([^\n`|;&]*)")
# Options of each subcommand that take a separate value (docker CLI reference); the
# container name is the first word after the options.
RUNBOOK_OPTS_WITH_VALUE = {
    "exec": frozenset({"-e", "--env", "--env-file", "-u", "--user", "-w", "--workdir", "--detach-keys"}),
    "logs": frozenset({"-n", "--tail", "--since", "--until"}),
    "inspect": frozenset({"-f", "--format", "--type"}),
    "restart": frozenset({"-t", "--time", "-s", "--signal"}),
}


class AmbiguousContainer(UsageError):
    """Two or more containers fit the same rule; the operator must pick one."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


class ContainerNotFound(BackupError):
    """No rule found a container for the module."""


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The container a module resolved to, and the rule that decided it."""

    container: dict[str, Any]
    rule: str

    @property
    def name(self) -> str:
        return container_name(self.container)

    @property
    def state(self) -> str:
        return str(self.container.get("State", {}).get("Status", "unknown"))


def container_name(container: dict[str, Any]) -> str:
    return str(container.get("Name", "")).lstrip("/")


def runbook_container_names(text: str) -> list[str]:
    """Return container names that runbook text uses in docker exec/logs/inspect/restart."""
    names: list[str] = []
    for match in RUNBOOK_DOCKER_RE.finditer(text):
        try:
            words = shlex.split(match[2], comments=True)
        except ValueError:
            words = match[2].split()
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
            elif word.startswith("-"):
                skip_next = word in RUNBOOK_OPTS_WITH_VALUE[match[1]]
            else:
                if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", word) and word not in names:
                    names.append(word)
                break
    return names


def resolve_container(module: Module, containers: list[dict[str, Any]], explicit: str | None = None) -> Resolution:
    """Return the module's container and the rule that found it.

    Rules, in order: --container; module.yaml spec.runtime.container; compose label
    com.docker.compose.service == id; a container named exactly the id; names used by
    docker exec/logs/inspect/restart lines of runbook.md. Raise AmbiguousContainer if a
    rule finds several, ContainerNotFound if the first two name a missing container or no
    rule finds one.
    """
    by_name = {container_name(c): c for c in containers}

    if explicit is not None:
        found = by_name.get(explicit) or _by_id_prefix(containers, explicit)
        if found is None:
            raise ContainerNotFound(f"--container {explicit}: no such container")
        return Resolution(found, "--container")
    if module.container is not None:
        if module.container not in by_name:
            raise ContainerNotFound(f"{module.yaml_path}: spec.runtime.container {module.container!r}: no such container")
        return Resolution(by_name[module.container], "module.yaml spec.runtime.container")

    labelled = [c for c in containers if (c.get("Config", {}).get("Labels") or {}).get("com.docker.compose.service") == module.id]
    if labelled:
        return _one(module, labelled, "compose label com.docker.compose.service")
    if module.id in by_name:
        return Resolution(by_name[module.id], "container name")
    if module.runbook is not None:
        try:
            text = module.runbook.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise BackupError(f"{module.runbook}: cannot read: {exc.strerror}") from None
        named = [by_name[n] for n in runbook_container_names(text) if n in by_name]
        if named:
            return _one(module, named, f"runbook {module.runbook.name}")
    raise ContainerNotFound(
        f"module {module.id!r}: no container found (tried spec.runtime.container, compose label, "
        f"container name, runbook.md); pass --container NAME"
    )


def _by_id_prefix(containers: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    if len(prefix) < 12 or not re.fullmatch(r"[0-9a-f]+", prefix):
        return None
    hits = [c for c in containers if str(c.get("Id", "")).startswith(prefix)]
    return hits[0] if len(hits) == 1 else None


def _one(module: Module, candidates: list[dict[str, Any]], rule: str) -> Resolution:
    if len(candidates) > 1:
        names = sorted(container_name(c) for c in candidates)
        raise AmbiguousContainer(f"module {module.id!r}: {len(names)} containers match by {rule}: {', '.join(names)}; pass --container NAME", names)
    return Resolution(candidates[0], rule)


# --------------------------------------------------------------------------- mounts and sizes


@dataclasses.dataclass(frozen=True)
class MountPlan:
    """One mount of the container and how it will be read."""

    destination: str
    type: str
    source: str
    name: str | None
    via: str  # "host": read the host path; "docker": stream with docker cp


def plan_mounts(container: dict[str, Any], *, read_on_host: bool) -> tuple[list[MountPlan], list[tuple[str, str]]]:
    """Return the mounts to archive and the (destination, reason) of every skipped one.

    Archived: named volumes and read-write bind mounts of directories. Skipped:
    read-only mounts, tmpfs (`--mount type=tmpfs` and `--tmpfs`, which docker inspect
    lists apart), the docker socket, kernel filesystems, single-file binds (a remote
    engine's are found while archiving).
    """
    included: list[MountPlan] = []
    skipped: list[tuple[str, str]] = []
    listed = {str(m.get("Destination", "")) for m in container.get("Mounts") or []}
    for dest in sorted((container.get("HostConfig") or {}).get("Tmpfs") or {}):
        if dest not in listed:
            skipped.append((dest, "tmpfs mount"))
    for mount in sorted(container.get("Mounts") or [], key=lambda m: str(m.get("Destination", ""))):
        kind = str(mount.get("Type", ""))
        dest = str(mount.get("Destination", ""))
        source = str(mount.get("Source", ""))
        reason = None
        if kind not in ("volume", "bind"):
            reason = f"{kind} mount"
        elif not mount.get("RW", False):
            reason = "read-only"
        elif dest in HOST_FILE_DESTINATIONS:
            reason = "host file"
        elif _inside(source, list(VIRTUAL_FS_ROOTS)) or _inside(dest, list(VIRTUAL_FS_ROOTS)):
            reason = "kernel filesystem"
        elif source.endswith("docker.sock") or dest.endswith("docker.sock"):
            reason = "docker socket"
        elif read_on_host and os.path.lexists(source) and not os.path.isdir(source):
            reason = "single-file bind"
        if reason:
            skipped.append((dest, reason))
            continue
        # A local source that is gone is read "on the host" so that it fails loudly: through
        # docker cp the container would still show the deleted directory, empty.
        readable = os.path.isdir(source) and os.access(source, os.R_OK | os.X_OK)
        via = "host" if read_on_host and (readable or not os.path.lexists(source)) else "docker"
        included.append(MountPlan(dest, kind, source, mount.get("Name"), via))
    return included, skipped


def tree_size(path: str) -> int:
    """Return the bytes the files under path take on disk, hard links once: a sparse file counts its data, not its holes.

    `du -s -B1 -x` where it is there (C, a fraction of a walk in Python on 100,000 files:
    README, "Where the time goes"): allocated blocks, a deliberate over-estimate for small
    files. Otherwise the walk below. A 200 GiB hole must not make the free-space check
    refuse a volume holding 1 MiB.
    """
    argv = du_argv([path])
    if argv is not None:
        with contextlib.suppress(BackupError, ValueError, IndexError):
            proc = run(argv, timeout=3600, check=False)
            if proc.returncode in (0, 1):  # 1: something unreadable, the rest counted
                return du_total(proc.stdout)
    return _tree_size_walk(path)


def du_argv(paths: list[str]) -> list[str] | None:
    """Return the du command that measures paths together (allocated bytes, one filesystem each), or None without du."""
    du = shutil.which("du")
    return [du, "-s", "-B1", "-x", "-c", "--", *paths] if du is not None else None


def du_total(out: bytes) -> int:
    """Return the total of du_argv's output: its last line, "<bytes>\ttotal". Raise ValueError or IndexError if there is none."""
    return int(out.split()[-2])


def _tree_size_walk(path: str) -> int:
    # Without du: what du -s -x measures, the archive's way. Directory fds (no path length
    # limit, no recursion), one listing batch at a time, nothing followed through a link,
    # other filesystems (nested mounts, measured on their own) left out.
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        top = os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW)  # a mount's source is followed as docker followed it
    except OSError:
        return 0
    _raise_open_file_limit()
    device = os.fstat(top).st_dev
    try:
        frames: list[tuple[int, Names]] = [(top, _entries(top))]
    except BaseException as exc:
        os.close(top)
        if isinstance(exc, OSError):
            return 0  # an unreadable top directory: nothing counted, as du counts it
        raise
    try:
        while frames:
            fd, names = frames[-1]
            try:
                more = bool(names)  # a big directory's next batch is read here
            except OSError:
                more = False
            if not more:
                frames.pop()
                _close_frame(fd, names)
                continue
            name, _ = names.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    try:
                        frames.append((child, _entries(child)))
                    except BaseException:
                        os.close(child)
                        raise
            except OSError:
                continue  # gone or unreadable: counted as nothing, as du counts it
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                if st.st_nlink > 1:
                    seen.add((st.st_dev, st.st_ino))
                total += min(st.st_size, st.st_blocks * 512)
    finally:
        for fd, names in frames:
            _close_frame(fd, names)
    return total


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- backup directory, lock, partial files


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_backup_dir(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid():
        raise RefusedError(f"backup directory {path} is owned by uid {st.st_uid}, not by the running user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise RefusedError(f"backup directory {path} is group/world writable (mode {stat.S_IMODE(st.st_mode):04o}); fix with chmod 0700")


def ensure_backup_dir(path: Path, *, create: bool) -> int | None:
    """Return an O_DIRECTORY fd of the private backup directory (None if create is false).

    With create, missing directories are made 0700 one at a time, each opened with
    O_NOFOLLOW relative to its parent's fd, so a directory the tool creates cannot be
    swapped for a symlink on the way. Raise RefusedError if the backup directory is a
    symlink or not a directory, is not owned by the running user, or is group/world
    writable.
    """
    missing: list[str] = []
    existing = path
    while not os.path.lexists(existing):
        missing.insert(0, existing.name)
        existing = existing.parent
    if not missing:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise RefusedError(f"backup directory {path} is a symlink; refusing to write through it")
        if not stat.S_ISDIR(st.st_mode):
            raise RefusedError(f"backup directory {path} exists and is not a directory")
        _check_backup_dir(path, st)
    if not create:
        if missing:
            LOG.info("would create %s (mode 0700)", path)
        return None
    try:
        # Directories that already existed above the backup directory are the operator's
        # (/opt may well be a symlink); from the first one the tool creates, none is followed.
        fd = os.open(existing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if missing else os.open(path, _DIR_FLAGS)
        for name in missing:
            with contextlib.suppress(FileExistsError):  # made meanwhile by another run (several modules with --jobs): opened as it is
                os.mkdir(name, 0o700, dir_fd=fd)
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RefusedError(f"backup directory {path} became a symlink while it was being opened") from None
        raise BackupError(f"cannot create or open backup directory {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    try:
        _check_backup_dir(path, st)
    except RefusedError:
        os.close(fd)
        raise
    if stat.S_IMODE(st.st_mode) & 0o077:
        LOG.warning("backup directory %s was mode %04o; tightened to 0700", path, stat.S_IMODE(st.st_mode))
        os.fchmod(fd, 0o700)
    return fd


@contextlib.contextmanager
def module_lock(dir_fd: int, module_id: str, timeout: float) -> Iterator[bool]:
    """Hold an exclusive flock on <backup-dir>/.<module>.lock for the whole run; yield whether it had to be waited for.

    The kernel drops an flock when its holder dies, so a killed run never leaves a stale
    lock. Raise RefusedError naming the holder's pid if the lock stays taken past timeout.
    """
    name = f".{module_id}.lock"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = True
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    raise RefusedError(f"another backup of {module_id!r} is running (pid {holder}; lock {name})") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield waited
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT/SIGTERM/SIGHUP so that cleanup cannot be cut short by a second one."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class PartialFile:
    """A private new file written as <name>.partial and published as <name> on commit().

    Created with O_EXCL|O_NOFOLLOW and mode 0600 from its first byte, relative to the
    backup directory's fd; sha256 and size are computed while writing. On any exit
    without commit() the partial file is removed. commit() never replaces an existing
    file: it hard-links the partial to the final name, which fails if the name exists.
    """

    def __init__(self, dir_fd: int, name: str, dir_path: Path) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.partial = name + ".partial"
        self.dir_path = dir_path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.advised = 0  # bytes written when writeback was last started
        self.committed = False
        self.tee: Callable[[bytes | bytearray | memoryview], None] | None = None  # also hands every byte written to a verifier
        self.progress: Progress | None = None  # counts what is written, where nothing upstream can (a dump piped into pigz)
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        return self.dir_path / self.name

    def __enter__(self) -> PartialFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.partial, flags, 0o600, dir_fd=self.dir_fd)
        except FileExistsError:
            raise RefusedError(f"{self.dir_path / self.partial} already exists; refusing to reuse it") from None
        self._file = os.fdopen(fd, "wb", buffering=0)
        return self

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self._file is not None
        if not data:
            return 0  # zlib often has no output yet for a chunk it was given
        try:
            _write_all(self._file.fileno(), data)
        except OSError as exc:
            raise _write_error(exc, self.dir_path) from None
        self.sha256.update(data)
        self.size += len(data)
        if self.size - self.advised >= WRITEBACK_EVERY:
            # Start writing back what is written and drop it from the page cache: a backup
            # must not push the services' own data out of memory, and on the machines
            # measured, a write that lets dirty pages pile up costs 2-3x the time and CPU
            # of one that hands them to the disk as it goes (the final fsync then waits
            # for little).
            self.advised = self.size
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if self.tee is not None:
            self.tee(data)
        if self.progress is not None:
            self.progress.add(len(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """Flush and close the partial file without publishing it (it is removed on exit)."""
        assert self._file is not None
        self._file.close()

    def reopen_for_reading(self) -> IO[bytes]:
        """Return a new read handle on the partial file (for verification before commit)."""
        fd = os.open(self.partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        return os.fdopen(fd, "rb")

    def commit(self) -> Path:
        assert self._file is not None
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise _write_error(exc, self.dir_path) from None
        self._file.close()
        try:
            os.link(self.partial, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise BackupError(f"{self.path} appeared while writing; refusing to overwrite it") from None
        self.committed = True
        os.unlink(self.partial, dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        if self.committed:
            return
        with signals_deferred():
            if self._file is not None and not self._file.closed:
                self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial, dir_fd=self.dir_fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    # A write may be short (a nearly full disk, a pipe): loop, so that the next write
    # reports ENOSPC or EPIPE instead of bytes being dropped in silence.
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _write_error(exc: OSError, dir_path: Path) -> BackupError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BackupError(f"no space left on the filesystem of {dir_path} ({os.strerror(exc.errno)}); partial backup removed")
    return BackupError(f"writing to {dir_path} failed: {exc.strerror}")


# --------------------------------------------------------------------------- compression

COMPRESSION_SUFFIX = {"gzip": "gz", "zstd": "zst"}


@dataclasses.dataclass(frozen=True)
class Compression:
    """How backups are compressed: the format, its level, and the program doing it."""

    format: str  # "gzip" or "zstd"
    level: int
    tool: str  # "zlib" (the standard library), "pigz" or "zstd"

    @property
    def suffix(self) -> str:
        return COMPRESSION_SUFFIX[self.format]


def choose_compression(settings: Settings) -> Compression:
    """Return the compression the settings ask for. Raise UsageError if its program is missing.

    gzip (the default, as the origin table asks) uses pigz when it is on PATH (same
    format, every core) unless gzip_tool says otherwise; zstd is an opt-in through the
    zstd binary.
    """
    if settings.compression == "zstd":
        if not shutil.which("zstd"):
            raise UsageError("compression = zstd needs the zstd program on PATH (apt-get install zstd)")
        return Compression("zstd", settings.zstd_level, "zstd")
    if settings.gzip_tool == "pigz" and not shutil.which("pigz"):
        raise UsageError("gzip_tool = pigz but pigz is not on PATH (apt-get install pigz)")
    use_pigz = settings.gzip_tool == "pigz" or (settings.gzip_tool == "auto" and shutil.which("pigz") is not None)
    return Compression("gzip", settings.compress_level, "pigz" if use_pigz else "zlib")


def compression_of(fmt: str) -> str:
    """Return "gzip" or "zstd" for a backup format such as "tar.zst"."""
    return "zstd" if fmt.endswith(".zst") else "gzip"


class Progress:
    """One updating stderr line for a stage (bytes, rate, ETA); silent unless stderr is a terminal."""

    def __init__(self, stage: str, total: int | None) -> None:
        self.stage, self.total = stage, total
        self.enabled = sys.stderr.isatty() and LOG.isEnabledFor(logging.INFO)
        self.done = 0
        self.started = self.last = time.monotonic()
        self.shown = False

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self.render(now)

    def render(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-6)
        line = f"{PROG}: {self.stage}: {human_size(self.done)}"
        if self.total:
            left = max(self.total - self.done, 0)
            line += f" of ~{human_size(self.total)}, {rate / (1 << 20):.1f} MiB/s, ETA {left / rate if rate else 0:.0f}s"
        else:
            line += f", {rate / (1 << 20):.1f} MiB/s"
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.render(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Pump:
    """Copies a child's stdout into a writer on a thread (so sha256 is taken as it is written).

    on_error runs when the copy fails (a full disk): it stops the child, so that whoever
    feeds the child sees a broken pipe instead of waiting on it for ever.
    """

    def __init__(self, source: IO[bytes], sink: Any, *, close_sink: bool = False, on_error: Callable[[], None] | None = None) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(source, sink, close_sink, on_error), daemon=True)
        self.thread.start()

    def _run(self, source: IO[bytes], sink: Any, close_sink: bool, on_error: Callable[[], None] | None) -> None:
        try:
            while chunk := source.read(COPY_CHUNK):
                sink.write(chunk)
        except BaseException as exc:  # re-raised by the main thread
            self.error = exc
            if on_error is not None:
                on_error()
        finally:
            if close_sink:
                with contextlib.suppress(OSError):
                    sink.close()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class StreamSink:
    """Where a stream being backed up goes: write() hands bytes on.

    fd, when it is not None, is a pipe the stream may also be written to directly, so
    that the kernel can send file data into it (os.sendfile) without a copy through Python.
    """

    fd: int | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError


class _PipeWriter(StreamSink):
    """Writes everything to an fd: a compressor's stdin, or --pause's staging file (big files reach both by sendfile)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self.fd is not None
        _write_all(self.fd, data)
        return len(data)


GZIP_BLOCK = 256 << 10  # pigz uses 128 KiB; bigger blocks hold more memory in flight, smaller ones cost more interpreter time
GZIP_WINDOW = 32 << 10


def _deflate_block(block: bytes, window: bytes, level: int, last: bool) -> bytes:
    # Raw deflate primed with the 32 KiB that precede the block (the decompressor has them
    # in its window), ended on a byte boundary so that the next block can follow.
    if window:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, window)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL)
    return compressor.compress(block) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _GzipThreads(StreamSink):
    """gzip by the standard library on every core, the way pigz does it.

    Each 256 KiB block is deflated on a worker thread (zlib releases the interpreter lock
    while it deflates), primed with the last 32 KiB before it, so the output is as small as
    one stream's; a writer thread writes the blocks in order as one gzip member, whose
    CRC-32 and length are taken as the blocks are handed in. gunzip, tar and Python read it
    as any other .gz. Blocks in flight are bounded: memory stays constant.
    """

    def __init__(self, out: Any, level: int, workers: int) -> None:
        self.out, self.level = out, level
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip")
        self.blocks: queue.Queue[concurrent.futures.Future[bytes] | None] = queue.Queue(maxsize=workers + 2)
        self.pending = bytearray()
        self.window = b""
        self.crc, self.length = 0, 0
        self.error: BaseException | None = None
        self.closed = False
        out.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03")  # gzip magic, deflate, no name, no mtime, Unix
        self.writer = threading.Thread(target=self._write_in_order, daemon=True)
        self.writer.start()

    def _write_in_order(self) -> None:
        try:
            while (block := self.blocks.get()) is not None:
                self.out.write(block.result())
            self.out.write(struct.pack("<II", self.crc, self.length & 0xFFFFFFFF))
        except BaseException as exc:  # re-raised by write() or close()
            self.error = exc
            while self.blocks.get() is not None:
                pass  # keep taking blocks, so that the writer never blocks

    def _submit(self, block: bytes, last: bool) -> None:
        self.crc = zlib.crc32(block, self.crc)
        self.length += len(block)
        self.blocks.put(self.pool.submit(_deflate_block, block, self.window, self.level, last))
        self.window = block[-GZIP_WINDOW:] if len(block) >= GZIP_WINDOW else (self.window + block)[-GZIP_WINDOW:]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is not None:
            raise self.error
        if not self.pending and len(data) == GZIP_BLOCK:
            self._submit(bytes(data), last=False)  # a whole block: one copy
            return len(data)
        self.pending += data
        while len(self.pending) >= GZIP_BLOCK:
            with memoryview(self.pending) as view:
                block = bytes(view[:GZIP_BLOCK])
            del self.pending[:GZIP_BLOCK]
            self._submit(block, last=False)
        return len(data)

    def close(self) -> None:
        """Deflate what is left, write the gzip trailer. Raise what the writer thread met."""
        if not self.closed:
            self.closed = True
            try:
                if self.error is None:
                    self._submit(bytes(self.pending), last=True)
            finally:
                self.blocks.put(None)
                self.writer.join()
                self.pool.shutdown(cancel_futures=True)
        if self.error is not None:
            raise self.error


def gzip_workers() -> int:
    """Return how many threads deflate in parallel: the cores this process may run on, up to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _grow_pipe(fd: int) -> None:
    # A 64 KiB pipe makes the two ends take turns; 1 MiB (the default pipe-max-size)
    # lets the producer run ahead while the consumer compresses.
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, COPY_CHUNK)


@contextlib.contextmanager
def compressing(out: Any, compression: Compression) -> Iterator[StreamSink]:
    """Yield a sink whose bytes reach out compressed; check the compressor at the end.

    Raise CommandError if pigz or zstd exits non-zero, or what writing out raised.
    """
    if compression.tool == "zlib":
        gz = _GzipThreads(out, compression.level, gzip_workers())
        try:
            yield gz
        except BaseException:
            with contextlib.suppress(BaseException):
                gz.close()
            raise
        gz.close()
        return
    level = f"-{compression.level}"
    argv = ["pigz", level, "-c"] if compression.tool == "pigz" else ["zstd", level, "-T0", "-q", "-c"]
    LOG.debug("$ %s", shlex.join(argv))
    count_run(argv[0])
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdin is not None and proc.stdout is not None
        _grow_pipe(proc.stdin.fileno())
        _grow_pipe(proc.stdout.fileno())
        pump = _Pump(proc.stdout, out, on_error=proc.kill)
        try:
            yield _PipeWriter(proc.stdin.fileno())  # proc.stdin's own buffer stays empty
            proc.stdin.close()
            returncode = proc.wait()
            pump.join()
        except BaseException as exc:
            stopped_by_itself = proc.poll()
            proc.kill()
            returncode = proc.wait()
            pump.thread.join()
            if pump.error is not None and isinstance(exc, (OSError, CommandError)):
                # The broken pipe (or a dump that died of it, writing into the compressor) came from stopping the compressor for this.
                raise pump.error from None
            if isinstance(exc, BrokenPipeError) or (stopped_by_itself not in (None, 0) and isinstance(exc, CommandError)):
                err.seek(0)
                raise CommandError(argv, returncode, err.read()) from None  # the compressor stopped reading: say why
            raise
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.stdout.close()
        if returncode != 0:
            err.seek(0)
            raise CommandError(argv, returncode, err.read())


@contextlib.contextmanager
def decompressing(fh: IO[bytes], fmt: str) -> Iterator[IO[bytes]]:
    """Yield the decompressed bytes of a backup file of format fmt (gzip or zstd).

    Raise BackupError if the compressed stream is damaged or incomplete.
    """
    if compression_of(fmt) == "gzip":
        with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
            yield typing.cast(IO[bytes], gz)
        return
    try:
        if _has_fd(fh):
            with _streaming(["zstd", "-d", "-c", "-q"], into=False, timeout=None, secrets=None, check=True, stdin=fh) as stream:
                yield stream.pipe
            return
        read_end, write_end = os.pipe()
        _grow_pipe(write_end)
        with os.fdopen(read_end, "rb") as source, os.fdopen(write_end, "wb") as sink:
            feeder = _Pump(fh, sink, close_sink=True)
            try:
                with _streaming(["zstd", "-d", "-c", "-q"], into=False, timeout=None, secrets=None, check=True, stdin=source) as stream:
                    yield stream.pipe
            finally:
                with contextlib.suppress(OSError):
                    source.close()
                feeder.thread.join()
    except CommandError as exc:
        raise BackupError(f"not a complete zstd stream ({' | '.join(exc.stderr_tail) or exc})") from None


def _has_fd(fh: Any) -> bool:
    try:
        fh.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


class StreamVerifier:
    """Checks a backup from the bytes as they are written, in a process of its own (a second core).

    The bytes go into a pipe whose other end scan reads in a child forked for it; for zstd
    that end is the stdin of the `zstd -d` child itself, so the bytes never pass through
    Python again. A process, not a thread: reading back a tar of small files is as much
    Python work per file as writing it, and two threads would take turns on one interpreter
    lock (README, "Where the time goes"). The child sends its result (or its one-line
    error) back through a second pipe, and keeps taking bytes until the writer is done, so
    that the writer never blocks. Reading the file back just after writing it would read
    the page cache, not the disk, so this gives the same assurance without a second pass.
    """

    def __init__(self, scan: Callable[[IO[bytes]], dict[str, Any]]) -> None:
        read_end, self.fd = os.pipe()  # the pipe's size bounds what is in flight: constant memory
        _grow_pipe(self.fd)
        answer_read, answer_write = os.pipe()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 warns on fork() beside threads; the child runs no thread's code
            self.pid = os.fork()
        if self.pid == 0:
            _verifier_child(scan, read_end, self.fd, answer_write)
        os.close(read_end)
        os.close(answer_write)
        self.thread = threading.Thread(target=self._wait, args=(answer_read,), daemon=True)
        self.thread.start()

    def _wait(self, answer: int) -> None:
        # Blocks on the answer pipe (without the interpreter lock) until the child reports.
        with os.fdopen(answer, "rb") as fh:
            data = fh.read()
        try:
            kind, value = pickle.loads(data)  # noqa: S301 - from our own forked child, through a pipe only it holds
        except Exception:  # noqa: BLE001 - a child that died without answering
            kind, value = "error", "the verification process died without an answer"
        if kind == "ok":
            self.result = value
        else:
            self.error = BackupError(value)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hand data to the scan. Raise what the scan met, if it has failed already: the backup
        is lost, and stopping now spares the rest of a long archive."""
        if self.error is not None:
            raise self.error
        try:
            _write_all(self.fd, data)
        except BrokenPipeError:
            pass  # the scan has failed already; finish() reports why

    def finish(self) -> dict[str, Any]:
        self.stop()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the scan sees the end of the stream
            self.fd = -1
            self.thread.join()
            with contextlib.suppress(ChildProcessError):
                usage = os.wait4(self.pid, 0)[2]  # its CPU time, and that of the zstd -d it ran
                VERIFICATION_CPU.append(usage.ru_utime + usage.ru_stime)


def _verifier_child(scan: Callable[[IO[bytes]], dict[str, Any]], read_end: int, write_end: int, answer: int) -> None:
    """The forked verifier: scan the stream, send (kind, value) back, drain the rest, exit without running the parent's cleanup."""
    try:
        os.close(write_end)  # else the stream would never end
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles a Ctrl-C; this child ends when the stream does
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        source = os.fdopen(read_end, "rb")
        try:
            outcome: tuple[str, Any] = ("ok", scan(source))
        except BackupError as exc:
            outcome = ("error", str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as the failed check it is
            outcome = ("error", f"the verification failed: {type(exc).__name__}: {exc}")
        _write_all(answer, pickle.dumps(outcome))
        os.close(answer)
        with contextlib.suppress(OSError, ValueError):
            while os.read(source.fileno(), COPY_CHUNK):
                pass
    finally:
        os._exit(0)


@contextlib.contextmanager
def verifying(out: Any, scan: Callable[[IO[bytes]], dict[str, Any]]) -> Iterator[Callable[[], dict[str, Any]]]:
    """Yield a function that returns scan's checks of everything written to out meanwhile."""
    verifier = StreamVerifier(scan)
    out.tee = verifier.feed
    try:
        yield verifier.finish
    finally:
        out.tee = None
        verifier.stop()


# --------------------------------------------------------------------------- archive writers


@dataclasses.dataclass(frozen=True)
class ArchiveItem:
    """A path in the container to archive, where to read it, and the group it counts under.

    host is a directory on this host to start from (a mount's source, followed as docker
    followed it when it mounted it); rel are the names under it, each opened without
    following a symlink; None streams the path with docker cp instead, which resolves it
    inside the container.
    """

    path: str
    host: str | None
    group: str
    prefix: str = ""  # put in the archive under prefix + path (class G keeps containers apart)
    container: str | None = None  # the container to docker cp from, when not the job's
    rel: tuple[str, ...] = ()
    kind: str = "path"  # "volume" or "bind" for a whole mount: a bind found to be one file is skipped
    pid: int = 0  # the running container's pid: a mount's host directory must be the one it sees


def mount_item(mount: MountPlan, *, pid: int = 0, prefix: str = "", container: str | None = None) -> ArchiveItem:
    """Return the archive item of a whole mount, read on this host or through docker cp as planned."""
    return ArchiveItem(mount.destination, mount.source if mount.via == "host" else None, prefix + mount.destination.strip("/") if prefix else mount.destination,
                       prefix=prefix, container=container, kind=mount.type, pid=pid)


def locate(path: str, mounts: list[MountPlan]) -> ArchiveItem:
    """Return how to read a path a service reported (Redis's dir): inside the mount that holds it, if any.

    The path is read on this host only when every directory between the mount and it is a
    plain directory there; a symlink on the way (the container controls what is in its
    mounts) sends it through docker cp, which resolves it inside the container.
    """
    holders = [m for m in mounts if _inside(path, [m.destination])]
    if not holders:
        return ArchiveItem(path, None, path)
    mount = max(holders, key=lambda m: len(m.destination))
    rel = tuple(part for part in posixpath.relpath(path, mount.destination).split("/") if part not in ("", "."))
    if mount.via != "host" or ".." in rel:
        return ArchiveItem(path, None, mount.destination, rel=rel)
    try:
        fd = os.open(mount.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return ArchiveItem(path, mount.source, mount.destination, rel=rel)  # fails loudly when it is read
    try:
        for name in rel[:-1]:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                LOG.info("%s: %s is %s inside mount %s; reading it through docker cp, inside the container", path, name,
                         _what_is(fd, name), mount.destination)
                return ArchiveItem(path, None, mount.destination, rel=rel)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return ArchiveItem(path, mount.source, mount.destination, rel=rel)


@dataclasses.dataclass(slots=True)
class TarEntry:
    """One archive entry: what its tar header says (owners as numbers, whole-second mtime)."""

    name: str  # in the archive, without a leading or trailing "/"
    kind: bytes  # tarfile.REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE, CHRTYPE, BLKTYPE or FIFOTYPE
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0  # regular files only
    linkname: str = ""  # symlink target, or the first name of a hard-linked file
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None  # every extended attribute (ACLs and capabilities are xattrs too)
    sparse: tuple[tuple[int, int], ...] | None = None  # a sparse file's data regions (offset, length); size stays the apparent size

    def stored(self) -> int:
        """Return the bytes of data the archive holds for this entry (a sparse file's data regions only)."""
        return sum(length for _, length in self.sparse) if self.sparse is not None else self.size


def _tar_field(value: int, digits: int) -> bytes:
    # tarfile.itn for GNU_FORMAT: octal while it fits, else GNU base-256.
    if 0 <= value < 1 << (3 * (digits - 1)):
        return b"%0*o\0" % (digits - 1, value)
    limit = 1 << (8 * (digits - 1))
    if not -limit <= value < limit:
        raise ValueError(f"{value} does not fit in a {digits}-byte tar field")
    return (b"\x80" if value >= 0 else b"\xff") + (value % limit).to_bytes(digits - 1, "big")


_OCTAL_7, _OCTAL_11 = 1 << 21, 1 << 33  # what 7 and 11 octal digits hold
_NO_DEVICES, _NO_TAIL = b"\0" * 16, b"\0" * 167
_GNU_MIDDLE = tarfile.GNU_MAGIC + b"\0" * 64  # magic, then empty user and group names (owners are numeric)
_FIXED_SUM = sum(_GNU_MIDDLE) + 8 * ord(" ")  # the checksum counts its own field as spaces


def _tar_block(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, linkname: bytes, devices: bytes,
               tail: bytes = _NO_TAIL) -> bytes:
    name, linkname = name[:100], linkname[:100]
    if 0 <= uid < _OCTAL_7 and 0 <= gid < _OCTAL_7 and 0 <= size < _OCTAL_11 and 0 <= mtime < _OCTAL_11:
        numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode & 0o7777, uid, gid, size, mtime)  # the common case, in one go
    else:
        numbers = _tar_field(mode & 0o7777, 8) + _tar_field(uid, 8) + _tar_field(gid, 8) + _tar_field(size, 12) + _tar_field(mtime, 12)
    checksum = sum(name) + sum(numbers) + kind[0] + _FIXED_SUM
    if linkname:
        checksum += sum(linkname)
    if devices is not _NO_DEVICES:
        checksum += sum(devices)
    if tail is not _NO_TAIL:
        checksum += sum(tail)
    return b"".join((name.ljust(100, b"\0"), numbers, b"%06o\0 " % checksum, kind, linkname.ljust(100, b"\0"), _GNU_MIDDLE, devices, tail))


def _tar_long_name(name: bytes, kind: bytes) -> bytes:
    payload = name + b"\0"
    return _tar_block(b"././@LongLink", kind, 0, 0, 0, len(payload), 0, b"", b"\0" * 16) + payload + b"\0" * (-len(payload) % 512)


def pax_record(key: bytes, value: bytes) -> bytes:
    """Return one pax extended header record, "<length> key=value\\n", its length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    digits = 1
    while len(str(len(body) + digits)) != digits:
        digits += 1
    return b"%d" % (len(body) + digits) + body


_ACL_TAGS = {0x01: "user", 0x02: "user", 0x04: "group", 0x08: "group", 0x10: "mask", 0x20: "other"}
ACL_XATTRS = {"system.posix_acl_access": "SCHILY.acl.access", "system.posix_acl_default": "SCHILY.acl.default"}


def acl_text(raw: bytes) -> str | None:
    """Return a POSIX ACL xattr in the text form GNU tar stores (numeric ids), or None if it is not one."""
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != 2:
        return None
    lines = []
    for offset in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        if tag not in _ACL_TAGS:
            return None
        qualifier = str(ident) if tag in (0x02, 0x08) else ""
        lines.append(f"{_ACL_TAGS[tag]}:{qualifier}:{'r' if perm & 4 else '-'}{'w' if perm & 2 else '-'}{'x' if perm & 1 else '-'}\n")
    return "".join(lines)


def _pax_header(entry: TarEntry) -> bytes:
    # Extended attributes as GNU tar --xattrs --xattrs-include='*' --acls stores them: every
    # xattr as SCHILY.xattr.<name> (raw value), and an ACL also as SCHILY.acl.* text.
    assert entry.xattrs is not None
    records = []
    for key, value in sorted(entry.xattrs.items()):
        records.append(pax_record(b"SCHILY.xattr." + key.encode("utf-8", "surrogateescape"), value))
        if key in ACL_XATTRS and (text := acl_text(value)) is not None:
            records.append(pax_record(ACL_XATTRS[key].encode(), text.encode()))
    payload = b"".join(records)
    return _tar_block(b"././@PaxHeader", tarfile.XHDTYPE, 0o644, 0, 0, len(payload), 0, b"", b"\0" * 16) + payload + b"\0" * (-len(payload) % 512)


def _sparse_fields(regions: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(_tar_field(offset, 12) + _tar_field(length, 12) for offset, length in regions)


def _sparse_tail(entry: TarEntry) -> tuple[bytes, bytes]:
    # The old GNU sparse member ('S'): four regions in the header, 21 in each extension block
    # after it, and the apparent size in realsize; GNU tar --sparse writes it in GNU format.
    assert entry.sparse is not None
    regions = entry.sparse
    first, rest = regions[:4], regions[4:]
    tail = (b"\0" * 41 + _sparse_fields(first).ljust(96, b"\0") + (b"\1" if rest else b"\0")
            + _tar_field(entry.size, 12) + b"\0" * 17)
    blocks = []
    while rest:
        chunk, rest = rest[:21], rest[21:]
        blocks.append(_sparse_fields(chunk).ljust(504, b"\0") + (b"\1" if rest else b"\0") + b"\0" * 7)
    return tail, b"".join(blocks)


def tar_header(entry: TarEntry) -> bytes:
    """Return the tar header block(s) of entry: what tarfile writes for it in GNU_FORMAT, plus what it leaves out.

    Names longer than 100 bytes get GNU long-name blocks first. Extended attributes go in a
    pax extended header before the entry, and a sparse file is an old GNU sparse member (its
    map in the header and extension blocks after it), as GNU tar writes both. Raise
    ValueError if a number does not fit even in base-256.
    """
    name = (entry.name + "/" if entry.kind == tarfile.DIRTYPE else entry.name).encode("utf-8", "surrogateescape")
    linkname = entry.linkname.encode("utf-8", "surrogateescape")
    devices = (_tar_field(entry.devmajor, 8) + _tar_field(entry.devminor, 8)) if entry.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else _NO_DEVICES
    head = b""
    if entry.xattrs:
        head += _pax_header(entry)
    if len(linkname) > 100:
        head += _tar_long_name(linkname, tarfile.GNUTYPE_LONGLINK)
    if len(name) > 100:
        head += _tar_long_name(name, tarfile.GNUTYPE_LONGNAME)
    if entry.sparse is not None:
        tail, extension = _sparse_tail(entry)
        return head + _tar_block(name, tarfile.GNUTYPE_SPARSE, entry.mode, entry.uid, entry.gid, entry.stored(), entry.mtime, linkname,
                                 devices, tail) + extension
    return head + _tar_block(name, entry.kind, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime, linkname, devices)


SMALL_FILE = 256 << 10  # read into the write buffer; bigger files go to the sink in pieces, or by sendfile


class TarWriter:
    """Writes a GNU tar stream to a StreamSink in large writes.

    Byte for byte what tarfile writes in GNU_FORMAT for an entry without xattrs or holes
    (and what GNU tar writes for those), without its per-member costs (a TarInfo copy, a
    member list that grows with every file, a write per header): README, "Where the time
    goes", says what that saves. Small
    files are gathered into one buffer; bigger ones are sent by the kernel when the sink is
    a pipe, and read a megabyte at a time otherwise.
    """

    def __init__(self, sink: StreamSink, progress: Progress | None = None, check: Callable[[], None] | None = None) -> None:
        self.sink, self.progress = sink, progress
        self.check = check or (lambda: None)  # raises to stop the archive (a pause past its limit)
        self.buffer = bytearray()
        self.offset = 0  # bytes of the tar stream so far

    def _emit(self, data: bytes | bytearray) -> None:
        self.buffer += data
        if len(self.buffer) >= COPY_CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.sink.write(self.buffer)
            self._done(len(self.buffer))
            self.buffer = bytearray()

    def _done(self, count: int) -> None:
        self.check()
        self.offset += count
        if self.progress is not None:
            self.progress.add(count)

    def add(self, entry: TarEntry) -> None:
        """Write an entry that has no data (a directory, link, device or fifo)."""
        self.check()
        self._emit(tar_header(entry))

    def add_file(self, entry: TarEntry, fd: int) -> bool:
        """Write a regular file from fd, exactly entry.size bytes.

        Return False if the file was shorter than entry.size (it shrank while it was read):
        the rest is zeros, as GNU tar does when a "file changed as we read it".
        """
        self._emit(tar_header(entry))
        if entry.sparse is None:
            left = self._copy(fd, None, entry.size)
        else:
            left = 0
            for offset, length in entry.sparse:  # each data region; a short one is padded, and so are those after it
                short = self._copy(fd, offset, length)
                if short:
                    self._emit(b"\0" * short)
                    left += short
            self._emit(b"\0" * (-entry.stored() % 512))
            return left == 0
        return self._end_member(entry, left)

    def _copy(self, fd: int, offset: int | None, size: int) -> int:
        """Copy size bytes of fd (from offset, or from where it is); return how many it did not have."""
        left = size
        if left <= SMALL_FILE:
            while left:
                data = os.read(fd, left) if offset is None else os.pread(fd, left, offset + size - left)
                if not data:
                    break
                self.buffer += data
                left -= len(data)
            return left
        self.flush()
        while left:
            at = None if offset is None else offset + size - left
            if self.sink.fd is not None:
                sent = os.sendfile(self.sink.fd, fd, at, min(left, 64 * COPY_CHUNK))
                self._done(sent)
            else:
                data = os.read(fd, min(left, COPY_CHUNK)) if at is None else os.pread(fd, min(left, COPY_CHUNK), at)
                sent = len(data)
                if sent:
                    self.sink.write(data)
                    self._done(sent)
            if not sent:
                break
            left -= sent
        return left

    def add_stream(self, entry: TarEntry, source: TarReader | IO[bytes]) -> bool:
        """Write a regular file read from source; like add_file, False if it was short."""
        self._emit(tar_header(entry))
        left = entry.stored()
        while left and (data := source.read(min(left, COPY_CHUNK))):
            self._emit(data)
            left -= len(data)
        self._emit(b"\0" * (left + (-entry.stored() % 512)))
        return left == 0

    def _end_member(self, entry: TarEntry, left: int) -> bool:
        # Zeros for the left bytes a short file did not give, then up to the next 512-byte block.
        self._emit(b"\0" * (left + (-entry.size % 512)))
        return left == 0

    def close(self) -> None:
        """Write the end-of-archive marker, pad to a whole 10 KiB record, flush."""
        self._emit(b"\0" * 1024)
        self._emit(b"\0" * (-(self.offset + len(self.buffer)) % tarfile.RECORDSIZE))
        self.flush()


_LISTING_MODULUS = 1 << 256
_LISTING_KEYS = ("members", "files", "bytes", "listing_sha256")  # what a manifest records per mount, and what is compared
_LISTING_KIND = {tarfile.LNKTYPE: "h", tarfile.REGTYPE: "f", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l"}


@dataclasses.dataclass
class ArchiveStats:
    """What went into an archive, per mount and in total.

    listing_sha256 is an order-independent digest (a sum of per-entry hashes) of every
    entry's name, type, mode, owner, size, link target, extended attributes (ACLs and
    capabilities among them) and sparse map, so that --verify and a drill can compare an
    archive or a restored tree with the backup without holding the file list in memory.
    An entry with neither xattrs nor holes hashes as it did before they were kept.
    """

    members: int = 0
    files: int = 0
    data_bytes: int = 0
    per_mount: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    sockets: int = 0  # left out, as GNU tar leaves them out ("socket ignored"), and said so
    warned: dict[str, int] = dataclasses.field(default_factory=dict)  # warnings of each kind so far
    unlisted: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> where in warnings its "N more" line is
    listing: bool = True  # False: counts only (the archive writer: the digest is taken from the archive as it is read back)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # mounts found to be single files
    inventories: dict[str, str] = dataclasses.field(default_factory=dict)  # group -> what the docker cp inventory found

    def warn(self, what: str, path: str) -> None:
        """Say what happened to the entry at path ("vanished while archiving", ...), in the warnings.

        Past WARNINGS_PER_KIND of one kind the rest are counted on one line: a session store
        whose clean-up runs during the walk can lose thousands of files, and each would be a
        line on stderr and in the manifest, held in memory until the end.
        """
        count = self.warned[what] = self.warned.get(what, 0) + 1
        if count <= WARNINGS_PER_KIND:
            self.warnings.append(f"{what}: {path}")
            return
        if what not in self.unlisted:
            self.unlisted[what] = len(self.warnings)
            self.warnings.append("")
        self.warnings[self.unlisted[what]] = f"{what}: {count - WARNINGS_PER_KIND} more, not listed"

    def count(self, group: str, entry: TarEntry) -> None:
        self.members += 1
        tally = self.per_mount.get(group)
        if tally is None:
            tally = self.per_mount[group] = {"members": 0, "files": 0, "bytes": 0, "listing_sha256": 0}
        tally["members"] += 1
        kind = _LISTING_KIND.get(entry.kind, "o")
        if kind == "f":
            self.files += 1
            self.data_bytes += entry.size
            tally["files"] += 1
            tally["bytes"] += entry.size
        if not self.listing:
            return
        line = f"{entry.name}\0{kind}\0{entry.mode & 0o7777:o}\0{entry.uid}\0{entry.gid}\0{entry.size if kind == 'f' else ''}\0{entry.linkname if kind == 'l' else ''}"
        if entry.xattrs:
            line += "\0x:" + ",".join(f"{key}={value.hex()}" for key, value in sorted(entry.xattrs.items()))
        if entry.sparse is not None:
            line += "\0s:" + ",".join(f"{offset}+{length}" for offset, length in entry.sparse)
        tally["listing_sha256"] += int.from_bytes(hashlib.sha256(line.encode("utf-8", "surrogateescape")).digest(), "big")  # mod 2**256 at the end

    def summary(self) -> dict[str, dict[str, Any]]:
        if not self.listing:
            return {group: {k: v for k, v in tally.items() if k != "listing_sha256"} for group, tally in self.per_mount.items()}
        return {
            group: {**tally, "listing_sha256": f"{tally['listing_sha256'] % _LISTING_MODULUS:064x}"}
            for group, tally in self.per_mount.items()
        }


def _inside(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never follow a swapped-in symlink, never wait on a fifo


@dataclasses.dataclass
class ArchiveRules:
    """What an archive leaves out besides nested mounts, and how long a stream may stall.

    The backup directory is never archived (by its device and inode on this host, by its
    container paths in a docker cp stream); exclude gives a reason to leave a file out
    (Redis's half-written temp-*.rdb); every docker cp stream of a running container is
    compared with a `find` inventory taken inside it.
    """

    timeout: float = 600.0
    backup_dir: tuple[int, int] | None = None
    backup_dir_paths: tuple[str, ...] = ()
    exclude: Callable[[str], str | None] | None = None
    inventory: bool = True


def entry_for(name: str, st: os.stat_result, hard_links: dict[tuple[int, int], str], linkname: str = "") -> TarEntry | None:
    """Return the archive entry of a file from its stat, or None for a socket.

    Like TarFile.gettarinfo, without its user/group name lookups (owners are numeric
    here), remembering inodes only for files with more than one link (constant memory).
    linkname is a symlink's target.
    """
    mode = st.st_mode
    entry = TarEntry(name, tarfile.REGTYPE, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns // 1_000_000_000)  # floored, as GNU tar
    if stat.S_ISREG(mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in hard_links:
            entry.kind, entry.linkname = tarfile.LNKTYPE, hard_links[key]
        else:
            entry.size = st.st_size
            if st.st_nlink > 1:
                hard_links[key] = name
    elif stat.S_ISDIR(mode):
        entry.kind = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        entry.kind, entry.linkname = tarfile.SYMTYPE, linkname
    elif stat.S_ISFIFO(mode):
        entry.kind = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        entry.kind = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return entry


def read_xattrs(target: int | str) -> dict[str, bytes] | None:
    """Return every extended attribute of an open fd or (not followed) a path, or None if it has none.

    All namespaces root may read: user, trusted, security (file capabilities) and system
    (POSIX ACLs), as GNU tar --xattrs --xattrs-include='*' stores them. A filesystem
    without xattrs, or a file gone meanwhile, has none.
    """
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    found: dict[str, bytes] = {}
    for key in names:
        try:
            found[key] = os.getxattr(target, key) if follow else os.getxattr(target, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):  # removed between the list and the read
                raise
    return found or None


def sparse_map(fd: int, size: int) -> tuple[tuple[int, int], ...] | None:
    """Return the data regions of a file with holes, found with SEEK_DATA/SEEK_HOLE, or None if it has none.

    As GNU tar's map: (offset, length) of each region, then an empty region at the end of
    the file. A filesystem without SEEK_DATA reports no holes.
    """
    regions: list[tuple[int, int]] = []
    position = 0
    try:
        while position < size:
            try:
                data = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            if data >= size:
                break
            position = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            regions.append((data, position - data))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    if regions == [(0, size)]:
        return None
    return (*regions, (size, 0))


def _raise_open_file_limit() -> None:
    # The walk holds one directory fd per level of depth; a 4 KiB path can be 2,000 deep.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 16, hard))


def _open_item_root(item: ArchiveItem) -> int:
    """Open the directory that holds the item on this host (the item itself for a whole mount).

    A whole mount's own source is followed as docker followed it (a bind of a symlink mounts
    the directory it points to); every name under it is opened without following a link.
    """
    assert item.host is not None
    try:
        fd = os.open(item.host, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackupError(f"source of {item.path} vanished: {item.host} does not exist") from None
    except NotADirectoryError:
        raise BackupError(f"source of {item.path} is not a directory: {item.host}") from None
    try:
        if item.pid and not item.rel:
            _check_mounted_here(item, fd)
        for name in item.rel[:-1]:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                raise BackupError(f"{item.path}: {name!r} inside {item.host} turned into {_what_is(fd, name)} while the backup ran; "
                                  "nothing outside the mount is read") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _what_is(dir_fd: int, name: str) -> str:
    """Say what name in dir_fd is, when it is not the plain directory expected."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return "a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a directory"


def _check_mounted_here(item: ArchiveItem, fd: int) -> None:
    # The directory read on this host must be the one the container has at its destination:
    # a bind of a symlink that now points elsewhere, or a source replaced since the container
    # started, would otherwise be archived in the mount's name.
    try:
        seen = os.stat(f"/proc/{item.pid}/root{item.path}")
    except OSError as exc:
        LOG.debug("%s: cannot compare with the container's own view (%s)", item.path, exc.strerror)
        return
    here = os.fstat(fd)
    if (seen.st_dev, seen.st_ino) != (here.st_dev, here.st_ino):
        raise BackupError(f"{item.host} is not the directory mounted at {item.path} in the container "
                          "(a symlinked or replaced source?); refusing to archive it in the mount's name")


def archive_from_host(tar: TarWriter, item: ArchiveItem, nested: list[str], stats: ArchiveStats, rules: ArchiveRules | None = None) -> None:
    """Add the host path of an item to tar under its path in the container.

    The walk goes by directory file descriptors, every name opened relative to its parent
    without following a symlink, so nothing the container swaps in (a directory turned into
    a link mid-walk, a link planted in a mount) can make it read outside the mount, and no
    host path length limit applies. Regular files are described from the open file. Raise
    BackupError if the item's own path is gone: a backup without a whole mount must not look
    finished.
    """
    rules = rules or ArchiveRules()
    _raise_open_file_limit()
    hard_links: dict[tuple[int, int], str] = {}
    frames: list[tuple[int, Names, str]] = []  # (directory fd, (name, kind) still to visit, its path in the container)
    parent = _open_item_root(item)
    top = item.path.strip("/")
    st: os.stat_result | None
    try:
        try:
            if item.rel:
                try:
                    st = os.stat(item.rel[-1], dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    raise BackupError(f"source of {item.path} vanished: {item.rel[-1]} is not in {item.host}") from None
                _visit(tar, item, parent, item.rel[-1], top, st, nested, stats, rules, hard_links, frames)
            else:
                _visit(tar, item, None, parent, top, os.fstat(parent), nested, stats, rules, hard_links, frames)
        finally:
            if not frames or frames[0][0] != parent:
                os.close(parent)  # unless the walk goes on from it
        while frames:
            fd, names, rel = frames[-1]
            if not names:
                frames.pop()
                _close_frame(fd, names)
                continue
            name, kind = names.pop()
            st = None
            if kind == "o":  # neither a directory nor a regular file by its directory entry: described by lstat
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    stats.warn("vanished while archiving", f"/{rel}/{name}")
                    continue
            _visit(tar, item, fd, name, f"{rel}/{name}", st, nested, stats, rules, hard_links, frames, kind)
    finally:
        for fd, names, _ in frames:
            _close_frame(fd, names)


DIRECTORY_BATCH = 10_000  # entries of one directory held at once (about 1.5 MiB): memory stays constant in a directory of millions


def _entries(fd: int) -> Names:
    """Return (name, kind) of every entry of an open directory, to be popped in name order.

    kind comes from the directory entry itself ("d", "f", or "o" for anything else or
    unknown), so that a file or directory costs no lstat: it is opened and described from
    the open file. A directory of DIRECTORY_BATCH entries or more is not held whole: it is
    handed out a batch at a time from its open listing (_Listing), in the order the
    filesystem lists it, as GNU tar archives every directory.
    """
    listing = os.scandir(fd)
    try:
        found = _listing_batch(listing)
        if len(found) == DIRECTORY_BATCH:
            return _Listing(listing, found)
    except BaseException:
        listing.close()
        raise
    listing.close()
    found.sort(reverse=True)
    return found


def _listing_batch(listing: _OpenListing) -> list[tuple[str, str]]:
    """Return the next DIRECTORY_BATCH entries (or what is left) of an open listing, reversed: popped in the listing's order."""
    found = []
    for entry in listing:
        found.append((entry.name, _entry_kind(entry)))
        if len(found) == DIRECTORY_BATCH:
            break
    found.reverse()
    return found


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """Return "d" (directory), "f" (regular file) or "o" (anything else, or unknown) from a directory entry, never following a link."""
    with contextlib.suppress(OSError):
        return "d" if entry.is_dir(follow_symlinks=False) else "f" if entry.is_file(follow_symlinks=False) else "o"
    return "o"


class _OpenListing(typing.Protocol):
    """What os.scandir returns: an iterator of directory entries that holds a descriptor until closed."""

    def __iter__(self) -> Iterator[os.DirEntry[str]]: ...
    def __next__(self) -> os.DirEntry[str]: ...
    def close(self) -> None: ...


class _Listing:
    """The entries of a directory too big to hold whole, a batch at a time from its open listing (one more fd while it lasts).

    Like the list _entries returns for a smaller directory: true while entries are left,
    pop() hands out the next. close() (done by itself at the end) releases the listing.
    """

    def __init__(self, listing: _OpenListing, first: list[tuple[str, str]]) -> None:
        self.listing: _OpenListing | None = listing
        self.batch = first

    def __bool__(self) -> bool:
        if not self.batch and self.listing is not None:
            try:
                self.batch = _listing_batch(self.listing)
            finally:
                if not self.batch:
                    self.close()
        return bool(self.batch)

    def pop(self) -> tuple[str, str]:
        return self.batch.pop()

    def close(self) -> None:
        if self.listing is not None:
            self.listing.close()
            self.listing = None


Names = list[tuple[str, str]] | _Listing  # a directory's entries still to visit


def _close_frame(fd: int, names: Names) -> None:
    if isinstance(names, _Listing):
        names.close()
    os.close(fd)


def _visit(tar: TarWriter, item: ArchiveItem, parent: int | None, name: str | int, rel: str, st: os.stat_result | None, nested: list[str],
           stats: ArchiveStats, rules: ArchiveRules, hard_links: dict[tuple[int, int], str],
           frames: list[tuple[int, Names, str]], kind: str = "o") -> None:
    """Archive one entry; a directory is opened and pushed on frames to be walked next.

    name is the entry's name in the directory parent, or (parent None) an open fd of it;
    st its lstat, or None for a directory or regular file known by its directory entry (kind).
    """
    arcname = item.prefix + rel
    if kind == "d" if st is None else stat.S_ISDIR(st.st_mode):
        if nested and "/" + rel != item.path and _inside("/" + rel, nested):
            return  # archived on its own, as a mount of its own
        if isinstance(name, int):
            fd = name
        else:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                stats.warn("vanished while archiving", f"/{rel}")
                return
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                stats.warn("replaced by a link or a file while archiving, left out", f"/{rel}")
                return
        try:
            here = os.fstat(fd)
            if rules.backup_dir == (here.st_dev, here.st_ino):
                stats.warn("the backup directory itself is inside this mount and was left out", f"/{rel}")
                if not isinstance(name, int):
                    os.close(fd)
                return
            entry = entry_for(arcname, here, hard_links)
            assert entry is not None
            entry.xattrs = read_xattrs(fd)
            names = _entries(fd)
        except BaseException:
            if not isinstance(name, int):
                os.close(fd)  # the caller closes a directory it handed in
            raise
        frames.append((fd, names, rel))  # closed with the walk from here on, whatever happens
        tar.add(entry)
        stats.count(item.group, entry)
        return
    assert isinstance(name, str) and parent is not None
    if kind == "f" if st is None else stat.S_ISREG(st.st_mode):
        reason = rules.exclude(rel) if rules.exclude is not None else None
        if reason is not None:
            stats.warn("left out", f"/{rel} ({reason})")
            return
        entry = _add_host_file(tar, parent, name, arcname, hard_links, stats)
    else:
        assert st is not None  # kind "o" always comes with its lstat
        try:
            linkname = os.readlink(name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else ""
        except FileNotFoundError:
            stats.warn("vanished while archiving", f"/{rel}")
            return
        except OSError:
            stats.warn("replaced while archiving, left out", f"/{rel}")
            return
        entry = entry_for(arcname, st, hard_links, linkname)
        if entry is None:
            if stat.S_ISSOCK(st.st_mode):
                stats.sockets += 1
                stats.warn("socket ignored", f"/{rel}")
            else:
                stats.warn("file type tar cannot hold, left out", f"/{rel}")
            return
        if entry.kind != tarfile.LNKTYPE:
            entry.xattrs = read_xattrs(f"/proc/self/fd/{parent}/{name}")  # a link's own, never its target's
        tar.add(entry)
    if entry is not None:
        stats.count(item.group, entry)


def _add_host_file(tar: TarWriter, parent: int, name: str, arcname: str, hard_links: dict[tuple[int, int], str], stats: ArchiveStats) -> TarEntry | None:
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=parent)
    except FileNotFoundError:
        stats.warn("vanished while archiving", f"/{arcname}")
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        stats.warn("replaced by a link or socket while archiving, left out", f"/{arcname}")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            stats.warn("replaced by a non-regular file while archiving, left out", f"/{arcname}")
            return None
        entry = entry_for(arcname, st, hard_links)
        assert entry is not None
        if entry.kind == tarfile.LNKTYPE:
            tar.add(entry)
            return entry
        entry.xattrs = read_xattrs(fd)
        if st.st_blocks * 512 < st.st_size:
            entry.sparse = sparse_map(fd, st.st_size)
        if not tar.add_file(entry, fd):
            stats.warn("file changed as we read it", f"/{arcname}")
        return entry
    finally:
        os.close(fd)


def _docker_cp_entries(pipe: IO[bytes], what: str) -> Iterator[tuple[TarReader, TarEntry]]:
    """Yield the entries of a docker cp stream; one clear error if it holds no archive at all."""
    entries = tar_entries(pipe)
    try:
        first = next(entries, None)
    except BackupError as exc:
        raise BackupError(f"docker cp of {what} gave no archive ({exc}): a path docker cp cannot read (a tmpfs mount?)") from None
    if first is not None:
        yield first
        yield from entries


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def archive_through_docker(tar: TarWriter, container: str, item: ArchiveItem, nested: list[str], stats: ArchiveStats,
                           rules: ArchiveRules) -> None:
    """Stream a container path out with `docker cp` and add it under the same path.

    Works with any engine the docker CLI reaches (remote DOCKER_HOST, rootless), and
    keeps the owners as the container sees them (as numbers: names on this host mean
    nothing in the container, like tar --numeric-owner). docker cp is known to leave
    entries out without a word (a path too long in the engine's own view of the
    container), so what it sent is compared with a `find` inventory taken inside the
    container, before and after. A bind mount that turns out to be one file is skipped,
    as on a local engine.
    """
    before = _inventory(container, item, nested, rules, stats) if rules.inventory else None
    # `docker cp C:/a/b -` names entries "b", "b/x": rebase them on "a".
    parent = posixpath.dirname(item.path.rstrip("/")).strip("/")
    excluded = [p for p in rules.backup_dir_paths if _inside(p, [item.path])]
    archived = bytearray((len(before) + 7) // 8 if before is not None else 0)  # a bit per entry of before: in the stream
    first = True
    with stream_from(["docker", "cp", f"{container}:{item.path}", "-"], timeout=rules.timeout) as pipe:
        for source, member in _docker_cp_entries(pipe, f"{container}:{item.path}"):
            name = posixpath.normpath(posixpath.join(parent, member.name)).lstrip("/")
            if first and item.kind == "bind" and member.kind != tarfile.DIRTYPE:
                stats.skipped.append((item.path, "single-file bind"))
                LOG.info("skipping mount %s: single-file bind (found through docker cp)", item.path)
                return
            first = False
            if "/" + name != item.path and _inside("/" + name, nested):
                continue
            if excluded and _inside("/" + name, excluded):
                if "/" + name in excluded:
                    stats.warn("the backup directory itself is inside this mount and was left out", f"/{name}")
                continue
            if member.kind == tarfile.REGTYPE and rules.exclude is not None and (reason := rules.exclude(name)) is not None:
                stats.warn("left out", f"/{name} ({reason})")
                continue
            member.name = item.prefix + name
            if member.kind == tarfile.LNKTYPE:
                member.linkname = item.prefix + posixpath.normpath(posixpath.join(parent, member.linkname)).lstrip("/")
            if member.kind == tarfile.REGTYPE:
                if not tar.add_stream(member, source):
                    stats.warn("file cut short in the docker cp stream", f"/{member.name}")
            else:
                tar.add(member)
            stats.count(item.group, member)
            if before is not None:
                _mark(before, archived, _name_key(name))
    if before is not None:
        _compare_inventory(container, item, nested, rules, stats, before, archived)


# Every entry under a path, a socket marked "S" before its name (docker cp leaves sockets out, as GNU tar does).
_FIND_ENTRIES = ["-xdev", "(", "-type", "s", "-exec", "printf", "S%s\\000", "{}", "+", ")", "-o", "-print0"]


def _find_inside(container: str, item: ArchiveItem, rules: ArchiveRules, each: Callable[[str], None],
                 socket: Callable[[str], None] = lambda name: None) -> str | None:
    """Hand each entry `find -xdev` lists under the item inside the container to each (a socket to socket); return why it could not, or None."""
    argv = exec_argv(container, ["find", item.path, *_FIND_ENTRIES])
    try:
        with _streaming(argv, into=False, timeout=rules.timeout, secrets=None, check=False) as stream:
            tail = b""
            while chunk := stream.pipe.read(COPY_CHUNK):
                *names, tail = (tail + chunk).split(b"\0")
                for raw in names:
                    if raw.startswith(b"S/"):
                        socket(os.fsdecode(raw[1:]).lstrip("/"))
                    else:
                        each(os.fsdecode(raw).lstrip("/"))
    except BackupError as exc:
        return str(exc)
    if stream.returncode == 0:
        return None
    if stream.returncode in (126, 127) or b"executable file not found" in stream.stderr:
        return "no find in the container"
    if b"is not running" in stream.stderr or b"is paused" in stream.stderr:
        return "the container is not running"
    return " | ".join(stream.stderr.decode("utf-8", "replace").strip().splitlines()[-2:]) or f"find exited {stream.returncode}"


def _inventory(container: str, item: ArchiveItem, nested: list[str], rules: ArchiveRules, stats: ArchiveStats) -> array.array[int] | None:
    """Return the sorted name keys of every entry the container lists under the item, or None (and why, recorded)."""
    keys = NameKeys()

    def socket(name: str) -> None:
        if not _left_out(name, item, nested, rules):
            stats.warn("socket ignored", f"/{name}")
            stats.sockets += 1

    why = _find_inside(container, item, rules, lambda name: None if _left_out(name, item, nested, rules) else keys.add(_name_key(name)), socket)
    if why is not None:
        stats.inventories[item.group] = f"not taken: {why}"
        return None
    return keys.sorted()


def _left_out(name: str, item: ArchiveItem, nested: list[str], rules: ArchiveRules) -> bool:
    """Return whether an entry the container lists is left out of the archive on purpose (nested mount, backup directory, exclude)."""
    path = "/" + name
    if path != item.path and _inside(path, nested):
        return True
    if rules.backup_dir_paths and _inside(path, list(rules.backup_dir_paths)):
        return True
    return rules.exclude is not None and rules.exclude(name) is not None


def _mark(keys: array.array[int], marks: bytearray, key: int) -> None:
    """Set the bit in marks of every place key holds in the sorted keys (two names of one hash are both there)."""
    index = bisect.bisect_left(keys, key)
    while index < len(keys) and keys[index] == key:
        marks[index >> 3] |= 1 << (index & 7)
        index += 1


def _compare_inventory(container: str, item: ArchiveItem, nested: list[str], rules: ArchiveRules, stats: ArchiveStats,
                       before: array.array[int], archived: bytearray) -> None:
    """Fail if entries that find listed before the copy, and lists again after it, are not in the archive.

    archived holds a bit per key of before, set by _mark for each entry the docker cp stream held.
    """
    missing = {key for index, key in enumerate(before) if not archived[index >> 3] >> (index & 7) & 1}
    if not missing:
        stats.inventories[item.group] = f"find inside the container listed {len(before)} entries; every one is in the archive"
        return
    after = _inventory_names(container, item, rules, missing)
    if after is None or not after:
        stats.inventories[item.group] = (f"find inside the container listed {len(before)} entries; {len(missing)} of them were "
                                         "gone before the copy ended (deleted while copying)")
        return
    shown = ", ".join("/" + name for name in sorted(after)[:3])
    raise BackupError(f"docker cp left out {len(after)} entries of {item.path} that are in the container (first: {shown}); "
                      "not a complete backup", details=[f"not in the docker cp stream: /{name}" for name in sorted(after)[:STDERR_DETAIL_LINES]])


def _inventory_names(container: str, item: ArchiveItem, rules: ArchiveRules, wanted: set[int]) -> list[str] | None:
    # The second look: which of the missing entries are still there once the copy is done.
    found: list[str] = []
    why = _find_inside(container, item, rules, lambda name: found.append(name) if _name_key(name) in wanted else None)
    return found if why is None else None


class NameKeys:
    """Name keys gathered a 256th at a time by their first byte, to be sorted (for _sorted_has) without a list of them all.

    sorted() of a million keys builds a list of a million Python ints, 40 bytes each; kept
    here as 8 bytes each and sorted a part at a time (keys are hashes, so the parts are
    even), a million keys never take more than about 8 MiB: memory stays constant however
    many entries a mount or bucket holds.
    """

    def __init__(self) -> None:
        self.parts = [array.array("Q") for _ in range(256)]

    def add(self, key: int) -> None:
        self.parts[key >> 56].append(key)

    def sorted(self) -> array.array[int]:
        """Return every key added, in order (each part is released as soon as it is copied)."""
        ordered = array.array("Q")
        for number, part in enumerate(self.parts):
            ordered.extend(sorted(part))
            self.parts[number] = array.array("Q")
        return ordered


def sorted_keys(keys: Iterable[int]) -> array.array[int]:
    """Return keys sorted, as NameKeys sorts them."""
    gathered = NameKeys()
    for key in keys:
        gathered.add(key)
    return gathered.sorted()


def _sorted_has(keys: array.array[int], key: int) -> bool:
    index = bisect.bisect_left(keys, key)
    return index < len(keys) and keys[index] == key


def archive_items(tar: TarWriter, container: str, items: list[ArchiveItem], skipped: list[str], stats: ArchiveStats,
                  rules: ArchiveRules) -> None:
    """Add every item to tar; a path that is its own item (or skipped) is not repeated."""
    for item in items:
        # Only paths of the same container (same prefix) can hide inside each other.
        paths = [i.path for i in items if i.prefix == item.prefix] + (skipped if not item.prefix else [])
        nested = [p for p in paths if p != item.path and _inside(p, [item.path])]
        LOG.info("archiving %s via %s", item.path, "host path " + posixpath.join(item.host, *item.rel) if item.host else "docker cp")
        if item.host is not None:
            archive_from_host(tar, item, nested, stats, rules)
        else:
            archive_through_docker(tar, item.container or container, item, nested, stats, rules)


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for big numbers
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)  # "0000644\0", "  644 \0": the common forms, in one call
    except ValueError:
        text = field.split(b"\0", 1)[0].strip()  # something after the NUL
        return int(text, 8) if text else 0


def _header_numbers(header: bytes) -> tuple[int, int, int, int, int]:
    """Return a tar header's mode, uid, gid, size and mtime, whatever form each field takes."""
    return (_tar_number(header[100:108]), _tar_number(header[108:116]), _tar_number(header[116:124]),
            _tar_number(header[124:136]), _tar_number(header[136:148]))


def _checksum_ok(header: bytes) -> bool:
    """Say whether a tar header's checksum field holds the sum of its bytes, the field counted as spaces."""
    chksum = header[148:156]
    # With at most 256 bytes that are not NUL (most headers), the sum is below 65,521, the modulus
    # of Adler-32's low half, which is then exactly that sum plus one; zlib computes it 10x faster.
    total = (zlib.adler32(header) & 0xFFFF) - 1 if header.count(0) >= 256 else sum(header)
    return _tar_number(chksum) == total - sum(chksum) + 256


class _TarInput:
    """The decompressed tar stream of a scan: buffered reads for headers, skips for data.

    Headers and small members are cut from a buffer filled a chunk at a time (a tar of
    small files costs a read per chunk, not per header). What a skip needs beyond the
    buffer is, from a pipe (the zstd -d child), spliced into /dev/null, so a verification
    never copies a big file's contents into the process; from any other stream it is read
    into one reused buffer.
    """

    SPLICE_FROM = 4 * COPY_CHUNK  # skips at least this long go past the buffer

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.fd: int | None = None
        self.null: int | None = None
        self.scratch = memoryview(bytearray(COPY_CHUNK))
        self.data = b""  # what was read and not handed out yet: data[pos:]
        self.pos = 0
        if isinstance(raw, io.BufferedReader) and stat.S_ISFIFO(os.fstat(raw.fileno()).st_mode):
            self.fd = raw.fileno()  # nothing was read through raw's own buffer yet
            self.null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def _fill(self) -> bool:
        """Read the next chunk into the buffer (keeping what is left of it); return False at the end of the stream."""
        chunk = os.read(self.fd, COPY_CHUNK) if self.fd is not None else self.raw.read(COPY_CHUNK)
        if not chunk:
            return False
        self.data = self.data[self.pos:] + chunk if self.pos < len(self.data) else chunk
        self.pos = 0
        return True

    def read(self, size: int) -> bytes:
        """Return size bytes, or fewer only at the end of the stream."""
        while len(self.data) - self.pos < size and self._fill():
            pass
        data = self.data[self.pos:self.pos + size]
        self.pos += len(data)
        return data

    def skip(self, size: int) -> int:
        """Skip up to size bytes (to the end of the stream if size < 0); return how many were there."""
        buffered = len(self.data) - self.pos
        if 0 <= size <= buffered:
            self.pos += size
            return size
        if size >= 0 and size - buffered < self.SPLICE_FROM:
            while len(self.data) - self.pos < size and self._fill():
                pass
            done = min(size, len(self.data) - self.pos)
            self.pos += done
            return done
        done, self.data, self.pos = buffered, b"", 0
        while size < 0 or done < size:
            want = COPY_CHUNK if size < 0 else min(size - done, COPY_CHUNK)
            if self.fd is not None and self.null is not None:
                got = os.splice(self.fd, self.null, want)
            else:
                got = self.raw.readinto(self.scratch[:want])  # type: ignore[attr-defined]
            if not got:
                break
            done += got
        return done

    def close(self) -> None:
        if self.null is not None:
            os.close(self.null)
            self.null = None


_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


class TarReader:
    """The one tar reader of this tool: walks the headers of a tar stream and hands out each member's data.

    Reads what GNU tar, Go's archive/tar (docker cp), busybox and this tool write: ustar
    and GNU headers, GNU long names, pax extended headers (path, linkpath, size, owners,
    mtime, SCHILY.xattr.*) and old GNU sparse members. Every header's checksum is checked
    and every member's data must be there; BackupError otherwise. Entries come out as
    TarEntry, names without a trailing "/", a sparse file's data packed as stored (its map
    in entry.sparse), mtimes floored. Written for speed: tarfile parses every field of every
    header and keeps a TarInfo per member, which costs as much as writing the archive
    (README, "Where the time goes").
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.input = _TarInput(raw)
        self.members = 0
        self.left = 0  # data of the current member not read yet
        self.padding = 0

    def __iter__(self) -> Iterator[TarEntry]:
        names: dict[bytes, bytes] = {}  # what GNU long-name (L, K) and pax (x) headers say of the next member
        while True:
            self._skip_rest()
            header = self.input.read(512)
            if len(header) < 512:
                raise BackupError("the tar stream ends before its end-of-archive marker")
            if header == _ZERO_BLOCK:
                break
            if not _checksum_ok(header):
                raise BackupError(f"tar header {self.members + 1} has a bad checksum")
            kind = header[156:157]
            if kind in (b"L", b"K", b"x", b"g", b"X"):
                size = _tar_number(header[124:136])
                data = self.input.read((size + 511) // 512 * 512)
                if len(data) < size:
                    raise BackupError("the tar stream ends inside an extended header")
                if kind == b"L":
                    names[b"path"] = data[:size].split(b"\0", 1)[0]
                elif kind == b"K":
                    names[b"linkpath"] = data[:size].split(b"\0", 1)[0]
                elif kind in (b"x", b"X"):
                    names.update(_pax_records(data[:size]))
                continue
            self.members += 1
            entry = self._entry(header, kind, names)
            names = {}
            yield entry
        self._skip_rest()

    def _entry(self, header: bytes, kind: bytes, pax: dict[bytes, bytes]) -> TarEntry:
        name = header[:100].split(b"\0", 1)[0]
        if header[345] and header[257:263] == b"ustar\0":  # POSIX ustar: a prefix; GNU: atime there
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        linkname = header[157:257].split(b"\0", 1)[0] if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE) else b""
        if (header[107] | header[115] | header[123] | header[135] | header[147]) & 0xDF == 0:
            try:  # every field ends in a NUL or a space: octal, as GNU tar, Go and this tool write them
                mode, uid, gid = int(header[100:107], 8), int(header[108:115], 8), int(header[116:123], 8)
                size, mtime = int(header[124:135], 8), int(header[136:147], 8)
            except ValueError:  # another form ("644\0\0\0\0\0", base-256): the careful way
                mode, uid, gid, size, mtime = _header_numbers(header)
        else:
            mode, uid, gid, size, mtime = _header_numbers(header)
        entry = TarEntry(_name_text(name), tarfile.REGTYPE if kind in _REGULAR else kind, mode & 0o7777, uid, gid, mtime,
                         linkname=linkname.decode("utf-8", "surrogateescape") if linkname else "")
        if pax:  # what a pax or GNU long-name header says instead
            if b"path" in pax:
                entry.name = _name_text(pax[b"path"])
            if b"linkpath" in pax:
                entry.linkname = pax[b"linkpath"].decode("utf-8", "surrogateescape")
            if b"uid" in pax:
                entry.uid = int(pax[b"uid"])
            if b"gid" in pax:
                entry.gid = int(pax[b"gid"])
            if b"mtime" in pax:
                entry.mtime = math.floor(float(pax[b"mtime"]))
            if b"size" in pax:
                size = int(pax[b"size"])
            if b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax or b"GNU.sparse.size" in pax:
                raise BackupError(f"{entry.name}: a pax sparse file (GNU tar --format=posix --sparse); this reader takes old GNU sparse members only")
            xattrs = {key[13:].decode("utf-8", "surrogateescape"): value for key, value in pax.items() if key.startswith(b"SCHILY.xattr.")}
            entry.xattrs = xattrs or None
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            entry.devmajor, entry.devminor = _tar_number(header[329:337]), _tar_number(header[337:345])
        if kind == tarfile.GNUTYPE_SPARSE:
            entry.sparse = self._sparse_map(header)
            entry.size = _tar_number(header[483:495])
        elif entry.kind == tarfile.REGTYPE:
            entry.size = size
        self.left = 0 if kind in _NO_DATA else size
        self.padding = -self.left % 512
        return entry

    def _sparse_map(self, header: bytes) -> tuple[tuple[int, int], ...]:
        regions: list[tuple[int, int]] = []
        fields, more = header[386:482], header[482]
        while True:
            for at in range(0, len(fields), 24):
                if fields[at:at + 24].strip(b"\0"):
                    regions.append((_tar_number(fields[at:at + 12]), _tar_number(fields[at + 12:at + 24])))
            if not more:
                return tuple(regions)
            block = self.input.read(512)
            if len(block) < 512:
                raise BackupError("the tar stream ends inside a sparse map")
            fields, more = block[:504], block[504]

    def read(self, size: int) -> bytes:
        """Return up to size bytes of the current member's data (b"" at its end)."""
        size = min(size, self.left)
        data = self.input.read(size)
        if len(data) < size:
            raise BackupError(f"the tar stream ends inside member {self.members}")
        self.left -= size
        return data

    def _skip_rest(self) -> None:
        want = self.left + self.padding
        if want and self.input.skip(want) < want:
            raise BackupError(f"the tar stream ends inside member {self.members}")
        self.left = self.padding = 0

    def finish(self) -> None:
        """Read past the end-of-archive marker to the end of the stream (a record's padding, a compressor's trailer)."""
        self.input.skip(-1)

    def close(self) -> None:
        self.input.close()


def _name_text(name: bytes) -> str:
    text = name.decode("utf-8", "surrogateescape")
    return text.rstrip("/") or text


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    at = 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.find(b" ", at)
        try:
            length = int(data[at:space])
        except ValueError:
            raise BackupError(f"a pax extended header record is malformed: {data[at:at + 40]!r}") from None
        record = data[space + 1:at + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise BackupError(f"a pax extended header record is malformed: {data[at:at + 40]!r}")
        key, value = record[:-1].split(b"=", 1)
        records[key] = value
        at += length
    return records


def tar_entries(raw: IO[bytes]) -> Iterator[tuple[TarReader, TarEntry]]:
    """Yield every entry of a decompressed tar stream with its reader (to read the entry's data), then read to its end."""
    with contextlib.closing(TarReader(raw)) as tar:
        for entry in tar:
            yield tar, entry
        tar.finish()


class ArchiveGroups:
    """Says which group (mount) an archive name belongs to: the longest group path that holds it."""

    def __init__(self, groups: list[str]) -> None:
        self.keys = sorted(((group.strip("/"), group) for group in groups), key=lambda pair: -len(pair[0]))

    def of(self, name: str) -> str:
        for key, group in self.keys:
            if name == key or name.startswith(key + "/") or not key:
                return group
        return OUTSIDE_GROUPS


OUTSIDE_GROUPS = "(outside every group)"
KEEP_MAX = 64 << 10  # members a scan keeps whole (an AOF manifest); bigger ones are only measured


def scan_tar(fh: IO[bytes], fmt: str = "tar.gz", *, rdb: Callable[[str], bool] | None = None,
             keep: Callable[[str], bool] | None = None, groups: list[str] | None = None) -> dict[str, Any]:
    """Read a compressed tar to its end and return what it holds. Raise BackupError if it is not complete.

    The compressed stream must be complete (gzip CRC and length trailer, zstd frame) and
    the tar well-formed to its end-of-archive marker: every header's checksum, every
    member's data present. Members that rdb picks are walked as RDB files
    (result["rdb"][name]: read_rdb's answer, or its error); members that keep picks are
    measured (result["files"]) and, when small, kept (result["kept"]). With groups,
    result["per_mount"] holds, per group, what ArchiveStats counts of the entries under it,
    xattrs and sparse maps included, read back from the archive itself.
    """
    rdbs: dict[str, Any] = {}
    files: dict[str, int] = {}
    kept: dict[str, bytes] = {}
    stats = ArchiveStats()
    grouping = ArchiveGroups(groups) if groups is not None else None
    members = 0
    try:
        with decompressing(fh, fmt) as raw:
            for tar, entry in tar_entries(raw):
                members += 1
                if grouping is not None:
                    stats.count(grouping.of(entry.name), entry)
                if entry.kind != tarfile.REGTYPE or not tar.left:
                    continue
                if rdb is not None and rdb(entry.name):
                    rdbs[entry.name] = _scan_rdb_member(tar, tar.left)
                    rdbs[entry.name]["mtime"] = entry.mtime
                elif keep is not None and keep(entry.name):
                    files[entry.name] = entry.size
                    if entry.size <= KEEP_MAX:
                        kept[entry.name] = tar.read(entry.size)
    except BackupError as exc:
        raise BackupError(f"archive is not a complete {fmt} ({exc})") from None
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise BackupError(f"archive is not a complete {fmt} ({exc})") from None
    result: dict[str, Any] = {f"{compression_of(fmt)}_complete": True, "tar_readable": True, "members": members}
    if rdb is not None:
        result["rdb"] = rdbs
    if keep is not None:
        result.update(files=files, kept=kept)
    if grouping is not None:
        result["per_mount"] = stats.summary()
    return result


def _scan_rdb_member(tar: TarReader, size: int) -> dict[str, Any]:
    """Walk one RDB member of a tar stream; return what read_rdb found (or its error)."""
    reader = _RdbReader(tar.read, size)
    found: dict[str, Any] = {}
    try:
        read_rdb(reader, into=found)
        if reader.unread():
            raise RdbError(f"{reader.unread()} bytes follow the RDB's end marker")
    except RdbError as exc:
        found.update(error=str(exc), unknown="unknown to this tool" in str(exc))
    return found


def scan_sql(fh: IO[bytes], fmt: str = "sql.gz") -> dict[str, Any]:
    """Read a compressed pg_dumpall script to its end and return its checks and counts.

    The counts (per database: rows of every table, large objects) are read again from
    the file, independently of the stream that wrote it. Raise BackupError if the
    compressed stream is incomplete, the dump's trailer line is missing, or the dump is
    too small to be a cluster dump.
    """
    size = 0
    tail = b""
    census = DumpCensus()
    try:
        with decompressing(fh, fmt) as raw:
            while chunk := raw.read(COPY_CHUNK):
                size += len(chunk)
                census.feed(chunk)
                tail = (tail + chunk[-PG_TAIL_BYTES:])[-PG_TAIL_BYTES:]
    except (OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"dump is not a complete {compression_of(fmt)} stream ({exc})") from None
    return {**check_sql_dump(size, tail), f"{compression_of(fmt)}_complete": True, "counts": census.counts()}


def check_sql_dump(size: int, tail: bytes) -> dict[str, Any]:
    """Return the checks of a dump from its size and last bytes. Raise BackupError if one fails."""
    if PG_TRAILER not in tail:
        raise BackupError(f"dump has no trailer line {PG_TRAILER.decode()!r}: pg_dumpall did not finish")
    if size < PG_MIN_DUMP_BYTES:
        raise BackupError(f"dump is only {size} bytes: too small to be a cluster dump")
    return {"trailer": True, "sql_bytes": size}


# --------------------------------------------------------------------------- procedure registry


@dataclasses.dataclass
class BackupJob:
    """Everything a procedure needs to know, decided before anything is written."""

    module: Module
    cls: BackupClass
    procedure: str
    resolution: Resolution
    engine: EngineInfo
    settings: Settings
    mounts: list[MountPlan]
    skipped: list[tuple[str, str]]
    backup_dir: Path
    timestamp: str
    pause: bool
    env: dict[str, str]
    containers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    compression: Compression = Compression("gzip", 6, "zlib")
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the procedure's, with the class's values
    config: Config | None = None  # the class table, for a procedure that asks what else a module is (class G)
    estimated_bytes: int | None = None  # from the free-space check, for the progress ETA
    free_bytes: int | None = None  # free on the backup directory's filesystem, set by the free-space check before it asks for the estimate
    seen: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the estimate asked the server, for the run; emptied if the lock was waited for
    no_staging: str | None = None  # why --pause must freeze the container for the whole run (no room to stage a copy)
    before_restore: str | None = None  # the backup a --restore is about to put back (this is its safety backup)
    journal: CleanupJournal | None = None  # what a killed run would leave behind, for the next run to clean up
    rules: ArchiveRules = dataclasses.field(default_factory=ArchiveRules)
    health: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"before": ..., "after": ...}: container_health()

    @property
    def basename(self) -> str:
        return f"{self.module.id}-{self.timestamp}"

    @property
    def container(self) -> str:
        return self.resolution.name

    @property
    def pid(self) -> int:
        state = self.resolution.container.get("State") or {}
        return int(state.get("Pid") or 0) if state.get("Running") else 0


@dataclasses.dataclass
class BackupResult:
    """What a procedure wrote and proved."""

    path: Path
    format: str  # "tar.gz", "sql.zst", "snap", ...
    size: int
    sha256: str
    verification: dict[str, Any]
    contents: dict[str, Any]
    warnings: list[str]
    archived: list[str] = dataclasses.field(default_factory=list)
    paused_seconds: float | None = None
    pause_mode: str | None = None  # "staged" or "whole run (<why>)", with --pause
    fallback: dict[str, str] | None = None
    server: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A procedure's --dry-run: its own steps, the file it writes and what is checked before it is published."""

    steps: list[str]
    suffix: str
    checks: str


Check = tuple[str, bool, str]  # one line of --verify: (check, passed, detail)


@dataclasses.dataclass
class Drill:
    """A drill in progress: the backup, its manifest, and the comparison lines printed on stdout."""

    backup: Path
    doc: dict[str, Any]
    settings: Settings
    env: dict[str, str]
    lines: list[str] = dataclasses.field(default_factory=list)
    passed: str = "drill passed: the restored data matches the manifest"


@dataclasses.dataclass
class Restore:
    """A restore in progress: the backup, its manifest, the live container, and the report printed on stdout."""

    backup: Path
    doc: dict[str, Any]
    settings: Settings
    env: dict[str, str]
    container: dict[str, Any]  # docker inspect of the live container, as resolved now
    engine: EngineInfo
    lines: list[str] = dataclasses.field(default_factory=list)
    terminate_connections: bool = False  # class A: end other sessions on the databases the dump replaces
    force_vault: bool = False  # class C: `snapshot restore -force` (a snapshot of a cluster with other unseal keys)
    remove_extra: bool = False  # class D: remove objects the backup does not hold (created after it)
    via_docker: bool = False  # archives: put mounts back through the engine (docker cp), as on a remote engine
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the procedure's options, with the class's values

    @property
    def name(self) -> str:
        return container_name(self.container)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A procedure's estimate of a backup's size before compression, for the free-space check.

    bytes is None when it cannot be told (the check is skipped, saying why: how). A bound
    is an upper bound, not a size: it is checked against the free space but gives no ETA.
    """

    bytes: int | None
    how: str
    bound: bool = False

    def __str__(self) -> str:
        return f"at most: {self.how}" if self.bound else self.how


@dataclasses.dataclass(frozen=True)
class Procedure:
    """One way of taking a backup, registered under its name, answering everything the file asks of it.

    run takes, verifies and publishes the backup; plan is its --dry-run; estimate its size
    before compression (for the free-space check); suffixes the file names it may write;
    verify re-reads a file it wrote and checks it against its manifest; drill proves it by
    restoring it and returns the number of differences; options are what
    [classes.X.options] may set, with their defaults. pausable says whether --pause applies;
    owns_fallback that verify and drill also read this procedure's fallback backups (else
    the fallback procedure's own do); restore puts a module back to the backup on its
    live container and returns the number of differences found when comparing afterwards
    (None: this procedure's backups are restored by hand, from the restore notes), and
    restore_plan says what it would do; by_hand, asked of the procedure that took a backup
    before anything is touched, returns the exact steps of a backup --restore leaves to the
    operator (its first line says why; the restore is refused with exit 2), or None.
    """

    name: str
    run: Callable[[BackupJob, int], BackupResult]
    plan: Callable[[BackupJob], Plan]
    estimate: Callable[[BackupJob], Estimate]
    verify: Callable[[IO[bytes], dict[str, Any]], list[Check]]
    drill: Callable[[Drill], int]
    suffixes: tuple[str, ...]
    options: dict[str, tuple[type, Any]] = dataclasses.field(default_factory=dict)
    pausable: bool = True
    owns_fallback: bool = False
    restore: Callable[[Restore], int] | None = None
    restore_plan: Callable[[Restore], list[str]] | None = None  # restore's --dry-run: its steps
    restores_mounts: bool = False  # its restore puts archived mounts back (so --restore --via-docker applies to it)
    by_hand: Callable[[Restore], list[str] | None] | None = None


PROCEDURES: dict[str, Procedure] = {}


def register(procedure: Procedure) -> Procedure:
    """Add a procedure to the registry: classes.toml, --procedure, --dry-run, --verify and --drill find it there."""
    if procedure.name in PROCEDURES:
        raise ValueError(f"procedure {procedure.name!r} is registered twice")
    PROCEDURES[procedure.name] = procedure
    return procedure


def procedure_options(procedure: Procedure, cls: BackupClass) -> dict[str, Any]:
    """Return the procedure's options: its defaults, with the class's values when it is the class's procedure."""
    options = {name: default for name, (_, default) in procedure.options.items()}
    if cls.procedure == procedure.name:
        options.update(cls.options)
    return options


def procedure_for(doc: dict[str, Any], where: Path) -> Procedure:
    """Return the procedure that reads a backup: the one that took it, or its fallback's when that one does.

    Raise UsageError if the manifest names a procedure this tool does not have.
    """
    name = str(doc.get("procedure"))
    if name not in PROCEDURES:
        raise UsageError(f"{where}: procedure {name!r} is unknown to this version of {PROG} (known: {', '.join(sorted(PROCEDURES))})")
    procedure = PROCEDURES[name]
    fallback = (doc.get("fallback_used") or {}).get("procedure")
    if fallback and not procedure.owns_fallback and fallback in PROCEDURES:
        return PROCEDURES[fallback]
    return procedure


def backup_suffixes() -> tuple[str, ...]:
    """Return every file suffix a registered procedure may write, longest first."""
    found = {"." + suffix for procedure in PROCEDURES.values() for suffix in procedure.suffixes}
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


# --------------------------------------------------------------------------- shared by procedures: pause, archives, copies, fallbacks


class CleanupJournal:
    """<backup-dir>/.<module>.cleanup: what a run leaves outside the backup directory while it works.

    A temporary file in the container, a paused container: written down before it exists
    and struck off once it is gone, so that the next run of the module (under the same
    lock) cleans up after one that was killed, and says so.
    """

    def __init__(self, dir_fd: int, module_id: str) -> None:
        self.dir_fd, self.name = dir_fd, f".{module_id}.cleanup"
        self.entries: list[dict[str, str]] = []

    def _write(self) -> None:
        if not self.entries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.dir_fd)
            return
        temp = self.name + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=self.dir_fd)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.entries, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def add(self, **entry: str) -> dict[str, str]:
        self.entries.append(entry)
        self._write()
        return entry

    def done(self, entry: dict[str, str]) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            self._write()

    def replay(self, settings: Settings) -> None:
        """Clean up what a killed earlier run left, saying so; entries that cannot be cleaned stay for the next run."""
        try:
            with open(os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)) as fh:
                left = json.load(fh)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            LOG.warning("%s: unreadable (%s); removing it", self.name, exc)
            left = []
        kept = []
        for entry in left if isinstance(left, list) else []:
            if not isinstance(entry, dict) or not _clean_left_over(entry, settings):
                kept.append(entry)
        self.entries = kept
        self._write()


def _clean_left_over(entry: dict[str, str], settings: Settings) -> bool:
    """Undo one thing an interrupted run left; return True once nothing is left of it."""
    container, kind = entry.get("container", ""), entry.get("kind")
    try:
        state = parse_json(docker(["inspect", "--type", "container", "--format", "{{json .State}}", container],
                                  timeout=settings.docker_timeout).stdout, "docker inspect")
    except CommandError:
        return True  # the container is gone, and what was in it
    if kind == "paused":
        if state.get("Paused"):
            LOG.warning("container %s was left PAUSED by an interrupted run; unpausing it", container)
            docker(["unpause", container], timeout=settings.docker_timeout)
        return True
    if kind == "container-path":
        if not state.get("Running"):
            return False  # still there, and docker exec needs it running: the next run tries again
        LOG.warning("removing %s:%s left by an interrupted run", container, entry["path"])
        run(exec_argv(container, ["rm", "-rf", "--", entry["path"]]), timeout=settings.docker_timeout)
        return True
    return True


def remove_stale_partials(dir_fd: int, module_id: str) -> None:
    """Remove <module>-<ts>.*.partial files and .<module>-<ts>.*-staging directories left by a killed run.

    Only called under the module lock.
    """
    for name in os.listdir(dir_fd):
        left = _left_by_a_run(name, module_id)
        if left == "partial":
            LOG.warning("removing %s left by an interrupted run", name)
            os.unlink(name, dir_fd=dir_fd)
        elif left == "staging":
            LOG.warning("removing %s/ left by an interrupted run", name)
            remove_entry(dir_fd, name)


_PARTIAL_NAME = re.compile(r"(?P<module>.+)-[0-9]{8}T[0-9]{6}Z\.[a-z.]+\.partial")  # incl. class G's .pgdump.sql.gz
_STAGING_NAME = re.compile(r"\.(?P<module>.+)-[0-9]{8}T[0-9]{6}Z\.[a-z]+-staging")


def _left_by_a_run(name: str, module_id: str) -> str | None:
    """Return "partial" or "staging" for a name only a run of module_id makes, else None."""
    for kind, pattern in (("partial", _PARTIAL_NAME), ("staging", _STAGING_NAME)):
        found = pattern.fullmatch(name)
        if found and found["module"] == module_id:
            return kind
    return None


class Pause:
    """A container frozen with `docker pause` for the archive, and never for longer than limit.

    A timer unpauses it at limit even if the archive is stuck in a read; the archive then
    stops at its next entry (a copy that was not frozen throughout is not kept). A failed
    or timed-out unpause is reported at once as STILL PAUSED, with the command to run.
    """

    def __init__(self, container: str, docker_timeout: float, limit: float) -> None:
        self.container, self.docker_timeout, self.limit = container, docker_timeout, limit
        self.started = 0.0
        self.expired: str | None = None
        self.unpaused = False
        self.lock = threading.Lock()
        self.timer = threading.Timer(limit, self._expire)
        self.timer.daemon = True

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def check(self) -> None:
        """Raise BackupError once the pause has outlived its limit."""
        if self.expired is not None:
            raise BackupError(self.expired)

    def _expire(self) -> None:
        self.expired = (f"container {self.container} stayed paused for pause_timeout ({self.limit:g}s); it was unpaused "
                        "and the archive, no longer a frozen copy, was discarded")
        LOG.error("%s", self.expired)
        self.unpause()

    def unpause(self) -> str | None:
        """Unpause once; return None, or the STILL PAUSED line (already logged) if it failed."""
        with self.lock:
            if self.unpaused:
                return None
            try:
                proc = docker(["unpause", self.container], timeout=self.docker_timeout, check=False)
                detail: BackupError | None = None
                if proc.returncode != 0 and b"is not paused" not in proc.stderr:
                    detail = CommandError(["docker", "unpause", self.container], proc.returncode, proc.stderr)
            except BackupError as exc:  # timed out, or docker is gone
                detail = exc
            if detail is not None:
                message = f"container {self.container} is STILL PAUSED; run `docker unpause {self.container}` now ({detail})"
                LOG.error("%s", message)
                return message
            self.unpaused = True
            LOG.info("container %s unpaused after %.1fs", self.container, time.monotonic() - self.started)
            return None


@contextlib.contextmanager
def paused(container: str, docker_timeout: float, limit: float, journal: CleanupJournal | None = None) -> Iterator[Pause]:
    """Freeze the container for the duration of the block (at most limit seconds); always unpause it.

    The unpause is attempted even if the pause command itself was interrupted (the daemon
    may have paused the container anyway), and a run killed outright leaves a journal
    entry that makes the next run unpause it. Raise BackupError (STILL PAUSED, with the
    command to run by hand) if the container could not be unpaused.
    """
    pause = Pause(container, docker_timeout, limit)
    noted = journal.add(kind="paused", container=container) if journal is not None else None
    pause.started = time.monotonic()
    try:
        docker(["pause", container], timeout=docker_timeout)
        pause.timer.start()
        LOG.warning("container %s is PAUSED for the archive (at most %gs, pause_timeout)", container, limit)
        yield pause
    finally:
        with signals_deferred():
            pause.timer.cancel()
            message = pause.unpause()
            if message is not None:
                raise BackupError(message)
            if journal is not None and noted is not None:
                journal.done(noted)


def write_archive(
    job: BackupJob,
    dir_fd: int,
    items: list[ArchiveItem],
    *,
    scan: Callable[[IO[bytes], list[str]], dict[str, Any]] | None = None,
    before_commit: Callable[[dict[str, Any]], None] | None = None,
) -> BackupResult:
    """Archive items into <module>-<ts>.tar.gz (paused with --pause), verify it as written, publish it.

    The archive is read back as it is written: every group (mount) must hold there the
    entries, files and bytes read from the source, and the listing digest the manifest
    records (xattrs and sparse maps included) is taken from what was read back, the file
    itself, as --verify takes it again later. scan replaces the plain tar scan (class B reads the RDB files as
    they pass; it is given the groups); before_commit may add to the verification results
    or raise to discard the archive.
    """
    stats = ArchiveStats(listing=False)  # the listing digest is taken from the archive itself, as it is read back
    skipped = [d for d, _ in job.skipped]
    paused_seconds: float | None = None
    pause_mode: str | None = None
    fmt = "tar." + job.compression.suffix
    groups = list(dict.fromkeys(item.group for item in items))
    scanner = scan or (lambda fh, groups: scan_tar(fh, fmt, groups=groups))
    with PartialFile(dir_fd, f"{job.basename}.{fmt}", job.backup_dir) as out, \
            verifying(out, lambda fh: scanner(fh, groups)) as verified, \
            contextlib.closing(Progress("archive", job.estimated_bytes)) as progress, eta_from_du(job, progress):
        if job.pause and job.no_staging is None:
            with phase("archive: read, compress, write"):
                paused_seconds = _archive_staged(job, dir_fd, items, skipped, stats, out, progress)
            pause_mode = "staged"
        else:
            pause = paused(job.container, job.settings.docker_timeout, job.settings.pause_timeout, job.journal) if job.pause else contextlib.nullcontext(None)
            with pause as frozen, phase("archive: read, compress, write"):
                with compressing(out, job.compression) as packed:
                    tar = TarWriter(packed, progress, check=frozen.check if frozen is not None else None)
                    archive_items(tar, job.container, items, skipped, stats, job.rules)
                    tar.close()
                if frozen is not None:
                    frozen.check()
                    paused_seconds = frozen.seconds()
                    pause_mode = f"whole run ({job.no_staging})"
        with phase("verification (waiting for it)"):
            verification = verified()
        if verification["members"] != stats.members:
            raise BackupError(f"verification failed: archive holds {verification['members']} entries, {stats.members} were written")
        read_back = verification.pop("per_mount")
        differences = listing_differences(stats.summary(), read_back, keys=("members", "files", "bytes"))
        if differences:
            raise BackupError(f"verification failed: the archive as written does not hold what was read ({differences[0]})",
                              details=differences[1:STDERR_DETAIL_LINES])
        verification["listing"] = "every mount's entries, files and bytes read back as written; its listing digest taken from the archive"
        if stats.files == 0:
            stats.warnings.append("the archived paths hold no regular files: this archive contains directories only")
        for destination, reason in stats.skipped:
            job.skipped.append((destination, reason))
            job.mounts = [m for m in job.mounts if m.destination != destination]
        if before_commit is not None:
            before_commit(verification)
        with phase("fsync and publish"):
            path = out.commit()
    per_mount = read_back
    for group, found in stats.inventories.items():
        per_mount.setdefault(group, {})["inventory"] = found
        if found.startswith("not taken"):
            stats.warnings.append(f"{group} was read through docker cp and its entries could not be checked another way ({found}); "
                                  "docker cp can leave entries out without a word (README, Class E)")
    return BackupResult(
        path=path,
        format=fmt,
        size=out.size,
        sha256=out.sha256.hexdigest(),
        verification=verification,
        contents={"members": stats.members, "files": stats.files, "data_bytes": stats.data_bytes, "sockets_ignored": stats.sockets,
                  "per_mount": per_mount},
        warnings=stats.warnings,
        archived=[i.path for i in items if i.path not in {d for d, _ in stats.skipped}],
        paused_seconds=paused_seconds,
        pause_mode=pause_mode,
    )


def _archive_staged(job: BackupJob, dir_fd: int, items: list[ArchiveItem], skipped: list[str], stats: ArchiveStats,
                    out: PartialFile, progress: Progress) -> float:
    """--pause, the short way: the container is frozen only while its data is read; return how long it was.

    The mounts are read, uncompressed, into a private staging copy in the backup directory
    (.<module>-<ts>.pause-staging/, 0700, its file 0600; a plain tar is what GNU tar would
    read): then the container is unpaused, and the copy is compressed, verified and hashed
    as a direct archive is. The copy is removed whatever happens, and by the next run if
    this one is killed.
    """
    staging = f".{job.basename}.pause-staging"
    os.mkdir(staging, 0o700, dir_fd=dir_fd)
    try:
        staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            fd = os.open("archive.tar", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=staging_fd)
        finally:
            os.close(staging_fd)
        try:
            with paused(job.container, job.settings.docker_timeout, job.settings.pause_timeout, job.journal) as frozen:
                tar = TarWriter(_PipeWriter(fd), progress, check=frozen.check)
                try:
                    archive_items(tar, job.container, items, skipped, stats, job.rules)
                    tar.close()
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise _write_error(exc, job.backup_dir / staging) from None
                    raise
                frozen.check()
            seconds = frozen.seconds()
            LOG.info("staged %s of data in %.1fs paused; compressing it with the container running", human_size(tar.offset), seconds)
            with compressing(out, job.compression) as packed:
                offset = 0
                while chunk := os.pread(fd, COPY_CHUNK, offset):
                    packed.write(chunk)
                    offset += len(chunk)
            return seconds
        finally:
            os.close(fd)
    finally:
        with signals_deferred():
            remove_staging(dir_fd, staging)


def mount_items(job: BackupJob) -> list[ArchiveItem]:
    """Return an archive item for every planned mount of the job's container."""
    return [mount_item(m, pid=job.pid) for m in job.mounts]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """Return the container's configured environment (values stay in memory only)."""
    env: dict[str, str] = {}
    for entry in container.get("Config", {}).get("Env") or []:
        name, _, value = str(entry).partition("=")
        env[name] = value
    return env


def require_running(job: BackupJob, what: str) -> None:
    if not job.resolution.container.get("State", {}).get("Running"):
        raise BackupError(f"container {job.container} is {job.resolution.state}: {what} needs the server running")


def fall_back(job: BackupJob, dir_fd: int, reason: str, restore_hint: str = "") -> BackupResult:
    """Take the class's fallback procedure loudly, or fail if it has none."""
    fallback = PROCEDURES.get(job.cls.fallback or "")
    if fallback is None:
        raise BackupError(f"{job.procedure} is not possible ({reason}) and class {job.cls.letter} has no fallback")
    hint = f"; {restore_hint}" if restore_hint else ""
    LOG.warning("%s NOT POSSIBLE (%s): FALLING BACK to %s%s", job.procedure.upper(), reason, fallback.name, hint)
    result = fallback.run(job, dir_fd)
    result.fallback = {"procedure": fallback.name, "reason": reason}
    result.warnings.insert(0, f"fallback to {fallback.name}: {reason}{hint}")
    return result


def copy_out_file(job: BackupJob, dir_fd: int, path: str, suffix: str, scan: Callable[[IO[bytes]], dict[str, Any]],
                  before_commit: Callable[[dict[str, Any]], None] | None = None) -> BackupResult:
    """Copy one file out of the container (docker cp) into <module>-<ts><suffix>, scan it, publish it."""
    name = job.basename + suffix
    with PartialFile(dir_fd, name, job.backup_dir) as out:
        with stream_from(["docker", "cp", f"{job.container}:{path}", "-"], timeout=job.settings.stream_timeout) as pipe:
            entries = _docker_cp_entries(pipe, f"{job.container}:{path}")
            source, member = next(entries, (None, None))
            if source is None or member is None or member.kind != tarfile.REGTYPE or member.sparse is not None:
                raise BackupError(f"{job.container}:{path} is not a regular file")
            while chunk := source.read(COPY_CHUNK):
                out.write(chunk)
            for _ in entries:  # to the end of the stream: a complete archive
                pass
        with out.reopen_for_reading() as fh:
            verification = scan(fh)
        if before_commit is not None:
            before_commit(verification)
        result_path = out.commit()
    return BackupResult(
        path=result_path, format=suffix.lstrip("."), size=out.size, sha256=out.sha256.hexdigest(),
        verification=verification, contents={"source": f"{job.container}:{path}"}, warnings=[], archived=[path],
    )


@dataclasses.dataclass
class TarFiles:
    """What read_tar_gz_files found: per file its size, sha256 and lines, and the bytes of the small ones asked for."""

    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    digests: dict[str, str] = dataclasses.field(default_factory=dict)
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: dict[str, bytes] = dataclasses.field(default_factory=dict)


def read_tar_gz_files(fh: IO[bytes], wanted: Callable[[str], bool]) -> TarFiles:
    """Read a tar.gz to its end: size, sha256 and lines of every file, and the bytes of small wanted ones.

    Raise BackupError if it is not a complete tar.gz.
    """
    found = TarFiles()
    try:
        with decompressing(fh, "tar.gz") as raw:
            for tar, member in tar_entries(raw):
                if member.kind == tarfile.REGTYPE:
                    digest, lines = hashlib.sha256(), 0
                    keep = wanted(member.name) and member.size <= COPY_CHUNK
                    while chunk := tar.read(COPY_CHUNK):
                        digest.update(chunk)
                        lines += chunk.count(b"\n")
                        if keep:
                            found.kept[member.name] = found.kept.get(member.name, b"") + chunk
                    found.sizes[member.name], found.digests[member.name], found.lines[member.name] = member.size, digest.hexdigest(), lines
    except (BackupError, OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"not a complete tar.gz ({exc})") from None
    return found


# --------------------------------------------------------------------------- shared by drills

DRILL_NEVER_STARTED = "/bba-drill-never-started"
DRILL_LISTING_MAX = 40


class DrillContainer:
    """A throwaway container cloned from a module's container, on fresh volumes.

    Same image, user, command and environment, the live container's read-only binds, no
    network, and a new volume at every writable mount, so nothing of the live service is
    touched. The environment goes through a private env-file (0600, in a 0700 directory,
    removed afterwards): never through this host's docker process, where a container's
    PATH, LD_PRELOAD, HOME or proxy variables would change what the docker CLI does. The
    container, its volumes and the env-file are removed on exit, whatever happened.
    """

    def __init__(self, doc: dict[str, Any], live: dict[str, Any] | None, settings: Settings) -> None:
        self.doc = doc
        self.live = live
        self.settings = settings
        self.name = f"bba-drill-{doc['module']}-{os.urandom(4).hex()}"
        self.volumes: list[str] = []
        self.created = False
        self.private: str | None = None

    def __enter__(self) -> DrillContainer:
        return self

    def _env_file(self, env: dict[str, str]) -> str:
        self.private = tempfile.mkdtemp(prefix="bba-drill-")
        path = os.path.join(self.private, "env")
        lines = []
        for name, value in env.items():
            if "\n" in value or "\r" in value or "\0" in value or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
                LOG.warning("drill: %s is not passed to the throwaway container (an env-file cannot hold its value)", name)
                continue
            lines.append(f"{name}={value}\n")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(lines)
        return path

    def create(self, *, start: bool, extra_destinations: tuple[str, ...] = ()) -> None:
        timeout = self.settings.docker_timeout
        image = self.doc["container"].get("image_id") or self.doc["container"]["image"]
        argv = ["create", "--name", self.name, "--network", "none", "--label", f"bba-drill={self.doc['module']}"]
        destinations = [m["destination"] for m in self.doc.get("mounts", [])]
        destinations += [d for d in extra_destinations if d not in destinations]
        command: list[str] = []
        if self.live is not None:
            config = self.live.get("Config", {})
            if config.get("User"):
                argv += ["--user", config["User"]]
            if config.get("WorkingDir"):
                argv += ["--workdir", config["WorkingDir"]]
            env = container_env(self.live)
            if env:
                argv += ["--env-file", self._env_file(env)]
            for mount in self.live.get("Mounts") or []:
                if mount.get("Type") == "bind" and not mount.get("RW"):
                    argv += ["-v", f"{mount['Source']}:{mount['Destination']}:ro"]
                elif mount.get("Type") in ("volume", "bind") and mount["Destination"] not in destinations:
                    destinations.append(mount["Destination"])
            image_config = parse_json(docker(["image", "inspect", "--format", "{{json .Config}}", image], timeout=timeout).stdout, "docker image inspect")
            entrypoint = config.get("Entrypoint") or []
            if entrypoint != (image_config.get("Entrypoint") or []):
                argv += ["--entrypoint", entrypoint[0] if entrypoint else ""]
                command = entrypoint[1:]
            command += config.get("Cmd") or []
        if not start:
            argv += ["--entrypoint", DRILL_NEVER_STARTED] if self.live is None else []
        for index, destination in enumerate(destinations):
            volume = f"{self.name}-{index}"
            docker(["volume", "create", "--label", f"bba-drill={self.doc['module']}", volume], timeout=timeout)
            self.volumes.append(volume)
            argv += ["-v", f"{volume}:{destination}"]
        try:
            docker([*argv, image, *command], timeout=timeout)
        finally:
            self._remove_env_file()
        self.created = True
        LOG.info("drill: throwaway container %s from %s", self.name, image)

    def copy_in(self, backup: Path) -> None:
        """Extract a tar backup into the container's volumes (docker cp keeps owners)."""
        with open(backup, "rb") as fh, decompressing(fh, self.doc["format"]) as gz:
            with stream_into(["docker", "cp", "-", f"{self.name}:/"], timeout=self.settings.drill_timeout) as stream:
                while chunk := gz.read(COPY_CHUNK):
                    stream.pipe.write(chunk)

    def restore_mounts(self, backup: Path, destinations: list[str]) -> str:
        """Extract every archived mount into its fresh volume as the restore notes say; return how it was done.

        On a local engine with GNU tar on this host, each mount is extracted by GNU tar
        (xattrs, ACLs, capabilities, holes) straight into its volume's directory; otherwise
        through docker cp, which restores owners, modes and security.capability only, and
        writes holes as zeros.
        """
        engine = engine_info(self.settings.docker_timeout)
        tar = gnu_tar()
        if not engine.local or engine.rootless or tar is None:
            self.copy_in(backup)
            return ("restored through docker cp (" + ("the engine is not local" if tar else "no GNU tar on this host")
                    + "): xattrs other than security.capability, ACLs and holes are not restored that way")
        clone = parse_json(docker(["inspect", self.name], timeout=self.settings.docker_timeout).stdout, "docker inspect")[0]
        sources = {m.destination: m.source for m in plan_mounts(clone, read_on_host=True)[0]}
        for destination in destinations:
            extract_mount(backup, self.doc["format"], tar, sources[destination], destination, destinations, self.settings.drill_timeout)
        return f"restored with {tar} --xattrs --xattrs-include='*' --acls --numeric-owner into each fresh volume"

    def copy_in_tar(self, write: Callable[[TarWriter], None]) -> None:
        """Extract a tar stream that write() builds into the container's volumes."""
        with stream_into(["docker", "cp", "-", f"{self.name}:/"], timeout=self.settings.drill_timeout) as stream:
            tar = TarWriter(_FileSink(stream.pipe))
            write(tar)
            tar.close()

    def start(self) -> None:
        docker(["start", self.name], timeout=self.settings.docker_timeout)

    def logs(self) -> str:
        proc = docker(["logs", self.name], timeout=self.settings.docker_timeout, check=False)
        return (proc.stdout + proc.stderr).decode("utf-8", "replace")

    def wait_until(self, probe: Callable[[], bool], what: str) -> None:
        """Call probe() until it returns true; raise BackupError if the container dies or time runs out."""
        deadline = time.monotonic() + self.settings.drill_timeout
        while True:
            with contextlib.suppress(BackupError):
                if probe():
                    return
            state = parse_json(docker(["inspect", "--format", "{{json .State}}", self.name], timeout=self.settings.docker_timeout).stdout, "docker inspect")
            if not state.get("Running"):
                tail = " | ".join(self.logs().strip().splitlines()[-5:])
                raise BackupError(f"drill: throwaway container exited ({state.get('Status')}) before {what}: {tail}")
            if time.monotonic() > deadline:
                raise BackupError(f"drill: {what} did not happen within {self.settings.drill_timeout:g}s (drill_timeout)")
            time.sleep(0.3)

    def _remove_env_file(self) -> None:
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
            self.private = None

    def __exit__(self, *exc_info: object) -> None:
        with signals_deferred():
            self._remove_env_file()
            if self.created:
                docker(["rm", "-f", "-v", self.name], timeout=self.settings.docker_timeout, check=False)
            for volume in self.volumes:
                docker(["volume", "rm", "-f", volume], timeout=self.settings.docker_timeout, check=False)


def gnu_tar() -> str | None:
    """Return the path of GNU tar on this host, or None (busybox and bsdtar restore neither xattrs nor holes the same way)."""
    path = shutil.which("tar")
    if path is None:
        return None
    with contextlib.suppress(BackupError):
        if b"GNU tar" in run([path, "--version"], timeout=30).stdout:
            return path
    return None


def extract_mount(backup: Path, fmt: str, tar: str, directory: str, destination: str, archived: list[str], timeout: float) -> None:
    """Extract the mount at destination from a backup into directory with GNU tar (mounts nested in it left out)."""
    nested = [d for d in archived if d != destination and _inside(d, [destination])]
    with open(backup, "rb") as fh, decompressing(fh, fmt) as raw:
        with stream_into(gnu_tar_extract(tar, directory, destination, nested), timeout=timeout) as stream:
            while chunk := raw.read(COPY_CHUNK):
                stream.pipe.write(chunk)


def _transform_to_dot(member: str) -> str:
    # s<d>^<member, as a literal POSIX basic regex><d>.<d>S: the member's name becomes ".";
    # symlink targets (S) are left alone. The delimiter is a character the name does not hold.
    delimiter = next(c for c in "|,#:;%@!~=+\x01\x02" if c not in member)
    literal = re.sub(r"([\\.\[\]*^$])", r"\\\1", member)
    return f"s{delimiter}^{literal}{delimiter}.{delimiter}S"


def gnu_tar_extract(tar: str, directory: str, destination: str, nested: list[str]) -> list[str]:
    """Return GNU tar reading an archive on stdin and extracting the mount at destination into directory.

    The mount's own entry becomes the directory itself (its owner, mode and xattrs too);
    mounts nested in it are left for their own volumes.
    """
    member = destination.strip("/")
    return [tar, "--extract", "--file=-", f"--directory={directory}", "--same-permissions", "--same-owner", "--numeric-owner",
            "--xattrs", "--xattrs-include=*", "--acls", "--no-wildcards", "--anchored", f"--transform={_transform_to_dot(member)}",
            *(f"--exclude={d.strip('/')}" for d in nested), "--", member]


def live_container(doc: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Return `docker inspect` of the backed-up container (by id, then name), or None."""
    for ref in (doc["container"].get("id"), doc["container"].get("name")):
        if ref:
            proc = docker(["inspect", "--type", "container", ref], timeout=timeout, check=False)
            if proc.returncode == 0:
                found = parse_json(proc.stdout, "docker inspect")
                if found:
                    return dict(found[0])
    return None


def drill_container(drill: Drill, what: str) -> DrillContainer:
    """Return the throwaway container for a drill that starts the engine; raise BackupError if the live container is gone."""
    live = live_container(drill.doc, drill.settings.docker_timeout)
    if live is None and what:
        raise BackupError(f"drill: container {drill.doc['container']['name']} is gone; its image, command and environment are needed to start {what}")
    box = DrillContainer(drill.doc, live, drill.settings)
    drill.lines.append(f"throwaway container {box.name} (removed afterwards), image {drill.doc['container'].get('image')}")
    return box


def compare(label: str, expected: Any, found: Any, lines: list[str]) -> bool:
    same = bool(expected == found)
    shown = [v[:16] + "..." if isinstance(v, str) and len(v) == 64 else v for v in (found, expected)]
    lines.append(f"  {label}: {shown[0]} {'=' if same else '!='} {shown[1]}{'' if same else '   <- DIFFERS'}")
    return same


class _FileSink(StreamSink):
    """Writes to a file object (a watched pipe, whose idle watchdog must see every write)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.fh.write(data)
        return len(data)


class _NullWriter(StreamSink):
    """A sink that drops everything (the drill re-reads restored trees and keeps only their digests)."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)


def compare_restored_mounts(drill: Drill, box: DrillContainer, lines: list[str]) -> int:
    """Re-read every archived mount in the throwaway container and compare it with the manifest, per mount."""
    engine = engine_info(drill.settings.docker_timeout)
    doc = drill.doc
    differences = 0
    read_on_host = engine.local and not engine.rootless
    clone = parse_json(docker(["inspect", box.name], timeout=drill.settings.docker_timeout).stdout, "docker inspect")[0]
    restored_mounts = {m.destination: m for m in plan_mounts(clone, read_on_host=read_on_host)[0]}
    for mount in doc.get("mounts", []):
        if mount["destination"] not in doc.get("archived_paths", [mount["destination"]]):
            continue
        restored = restored_mounts[mount["destination"]]
        via_host = mount.get("read_via") == "host" and restored.via == "host"
        others = [m["destination"] for m in doc["mounts"] if m["destination"] != mount["destination"]]
        lines.append(f"{mount['destination']} (restored, read via {'host path' if via_host else 'docker cp'}):")
        differences += compare_mount(box.name, mount, restored.source if via_host else None, others, drill.settings.drill_timeout, lines)
    return differences


def compare_mount(container: str, recorded: dict[str, Any], source: str | None, others: list[str], timeout: float, lines: list[str]) -> int:
    """Read a mount again as a backup reads it (source on this host, else docker cp) and compare it with the manifest's record of it."""
    destination = recorded["destination"]
    stats = ArchiveStats()
    archive_items(TarWriter(_NullWriter()), container, [ArchiveItem(destination, source, destination)], others, stats,
                  ArchiveRules(timeout=timeout, inventory=False))
    found = stats.summary().get(destination, {})
    return sum(not compare(key, recorded.get(key), found.get(key), lines) for key in _LISTING_KEYS)


def drill_groups(drill: Drill) -> int:
    """Archives of several sources (D's buckets, G's compose project): re-read and compare every group."""
    doc, backup, lines = drill.doc, drill.backup, drill.lines
    groups = doc.get("contents", {}).get("groups") or {}
    lines.append("structure and contents listing only: every group of the archive re-read and compared with the manifest")
    if doc.get("contents", {}).get("follow_up"):
        lines.append(doc["contents"]["follow_up"])
    with open(backup, "rb") as fh:
        found = scan_tar(fh, doc["format"], groups=list(groups))["per_mount"]
    differences = 0
    for group in sorted(set(groups) | set(found)):
        lines.append(f"{group}:")
        for key in _LISTING_KEYS:
            differences += not compare(key, groups.get(group, {}).get(key), found.get(group, {}).get(key), lines)
    drill.passed = "drill passed: structure and contents match the manifest (nothing was started)"
    return differences


def drill_listing(drill: Drill, note: str) -> int:
    """Engine-made single files (C's snapshot, F's dump): check structure and list the contents."""
    drill.lines.append(note)
    with open(drill.backup, "rb") as fh:
        sizes = read_tar_gz_files(fh, lambda name: False).sizes
    for name in sorted(sizes)[:DRILL_LISTING_MAX]:
        drill.lines.append(f"  {sizes[name]:>12}  {name}")
    if len(sizes) > DRILL_LISTING_MAX:
        drill.lines.append(f"  ... and {len(sizes) - DRILL_LISTING_MAX} more")
    drill.passed = "drill passed: structure and contents match the manifest (nothing was started)"
    return int(not compare("members", drill.doc.get("verification", {}).get("members"), len(sizes), drill.lines))


def listing_differences(expected: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]],
                        keys: tuple[str, ...] = _LISTING_KEYS) -> list[str]:
    """Return a line per group and count where found differs from expected (empty when they agree)."""
    lines = []
    for group in sorted(set(expected) | set(found)):
        for key in keys:
            want, got = expected.get(group, {}).get(key), found.get(group, {}).get(key)
            if want != got:
                lines.append(f"{group}: {key} {got} where {want} was expected")
    return lines


def manifest_listing(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the per-group listing a manifest recorded (mounts, or D's and G's groups); empty for one that has none."""
    groups = (doc.get("contents") or {}).get("groups")
    if groups:
        return {group: tally for group, tally in groups.items() if "listing_sha256" in tally}
    archived = doc.get("archived_paths")
    return {m["destination"]: m for m in doc.get("mounts") or []
            if "listing_sha256" in m and (archived is None or m["destination"] in archived)}


def listing_check(found: dict[str, Any], expected: dict[str, dict[str, Any]]) -> list[Check]:
    """The --verify check that the archive's entries are, group by group, those the manifest recorded."""
    if not expected:
        return []
    differences = listing_differences(expected, found["per_mount"])
    detail = (f"{len(expected)} group(s): entries, owners, modes, sizes, xattrs and sparse maps as recorded" if not differences
              else "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else ""))
    return [("listing", not differences, detail)]


def verify_archive(fh: IO[bytes], doc: dict[str, Any]) -> list[Check]:
    """--verify of a tar archive: complete stream, every header, the entry count and per-mount listing of the manifest."""
    fmt = str(doc.get("format", "tar.gz"))
    expected_listing = manifest_listing(doc)
    found = scan_tar(fh, fmt, groups=list(expected_listing))
    expected = doc.get("verification", {}).get("members")
    return [("structure", found["members"] == expected, f"complete {compression_of(fmt)}, tar readable, {found['members']} entries (manifest {expected})"),
            *listing_check(found, expected_listing)]


def estimate_mounts(job: BackupJob) -> Estimate:
    """Return the size of the mounted data when every mount is readable on this host.

    When the space used on the filesystems holding the mounts, all of it, fits (a bound no
    mount can exceed), that is the answer and the mounts are not walked: on 100,000 small
    files the walk is 3% of a backup (README, "Where the time goes").
    """
    mounts = [m for m in job.mounts if m.via == "host"]
    if not job.mounts or len(mounts) != len(job.mounts):
        return Estimate(None, "the mounted data is not readable from this host")
    bound = used_on_filesystems([m.source for m in mounts])
    if bound is not None and job.free_bytes is not None and space_needed(job, bound, staging=job.pause) <= job.free_bytes:
        return Estimate(bound, "all the space used on the filesystem(s) of the mounts, which fits, so the mounts were not walked", bound=True)
    return Estimate(sum(tree_size(m.source) for m in mounts), "size of the mounted data")


@contextlib.contextmanager
def eta_from_du(job: BackupJob, progress: Progress) -> Iterator[None]:
    """Give a terminal's progress line its total once du has measured the mounts, beside the archive.

    Only when the free-space check did not walk them (a bound was enough): the walk is for
    the ETA alone, so no run without a terminal pays for it. du is killed if the archive
    is done first.
    """
    mounts = [m.source for m in job.mounts if m.via == "host"]
    argv = du_argv(mounts)
    if not progress.enabled or progress.total is not None or argv is None or not mounts or len(mounts) != len(job.mounts):
        yield
        return
    LOG.debug("$ %s", shlex.join(argv))
    count_run("du")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def measure() -> None:
        out = proc.communicate()[0]
        with contextlib.suppress(ValueError, IndexError):
            progress.total = du_total(out)

    thread = threading.Thread(target=measure, daemon=True)
    thread.start()
    try:
        yield
    finally:
        proc.kill()
        thread.join()


def used_on_filesystems(paths: list[str]) -> int | None:
    """Return the bytes used on the filesystems holding paths, each filesystem once; None if one cannot be asked."""
    used: dict[int, int] = {}
    try:
        for path in paths:
            fs = os.statvfs(path)
            used[os.stat(path).st_dev] = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    except OSError:
        return None
    return sum(used.values())


def plan_fallback(job: BackupJob, reason: str) -> Plan:
    """The --dry-run of a procedure that will fall back: the fallback's own plan, with why first."""
    fallback = PROCEDURES.get(job.cls.fallback or "")
    if fallback is None:
        return Plan([f"fail: {reason}; class {job.cls.letter} has no fallback"], "", "none")
    plan = fallback.plan(job)
    return dataclasses.replace(plan, steps=[f"fall back to {fallback.name}: {reason}", *plan.steps])


# --------------------------------------------------------------------------- class E: mounted data archive


def procedure_mounted_archive(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class E: archive every writable mount into <module>-<ts>.tar.gz, then verify it."""
    if not job.mounts:
        raise BackupError(f"container {job.container} has no writable mounts to archive; nothing would be backed up")
    return write_archive(job, dir_fd, mount_items(job))


def plan_mounted_archive(job: BackupJob) -> Plan:
    steps = [f"read: {m.source} -> {m.destination} ({m.type})" if m.via == "host"
             else f"run: docker cp {job.container}:{m.destination} - (and find {m.destination} inside the container, to compare)"
             for m in job.mounts]
    return Plan(steps, f".tar.{job.compression.suffix}", f"{job.compression.format} complete, tar readable, entry count")


def drill_mounted_archive(drill: Drill) -> int:
    """Restore the archive into fresh volumes of a throwaway container; compare every mount with the manifest."""
    with drill_container(drill, "") as box:
        box.create(start=False)
        how = box.restore_mounts(drill.backup, [m["destination"] for m in drill.doc.get("mounts", [])
                                                 if m["destination"] in drill.doc.get("archived_paths", [m["destination"]])])
        drill.lines.append(f"(archive {how}; then every entry's name, type, mode, owner, size, xattrs and sparse map compared)")
        return compare_restored_mounts(drill, box, drill.lines)


def restore_mounted_archive(job: Restore) -> int:
    """Class E and every archive fallback: make each archived mount hold exactly the archive's entries.

    The container is stopped; each mount's directory on this host is emptied (by directory
    descriptors, never following a link) and the mount extracted into it by GNU tar with the
    restore notes' flags (owners, modes, mtimes, links, xattrs, ACLs, holes); the container
    is started again if it was running; then every mount is read again as a backup reads it
    and compared with the manifest. On a remote or rootless engine, on a host without GNU
    tar, or with --via-docker, the mounts are put back through the engine instead
    (restore_through_engine).
    """
    doc, lines = job.doc, job.lines
    archived = [m["destination"] for m in doc.get("mounts", []) if m["destination"] in doc.get("archived_paths", [m["destination"]])]
    if not archived:
        raise UsageError(f"{job.backup.name} archives no mount; nothing to restore")
    tar = gnu_tar()
    why = ("--via-docker" if job.via_docker else "no GNU tar on this host" if tar is None
           else "the engine is not local: its volumes are not this host's directories" if not job.engine.local
           else "the engine is rootless: its volumes belong to another user namespace" if job.engine.rootless else "")
    if why:
        return restore_through_engine(job, archived, why)
    assert tar is not None
    live = {m.destination: m for m in plan_mounts(job.container, read_on_host=True)[0]}
    missing = [d for d in archived if d not in live or live[d].via != "host"]
    if missing:
        raise UsageError(f"container {job.name} has no writable mount readable on this host at {', '.join(missing)}; "
                         "the archive cannot be put back there")
    differences = 0
    with stopped(job):
        for destination in archived:
            source = live[destination].source
            LOG.warning("restoring %s: emptying %s, then extracting the archive into it", destination, source)
            empty_directory(source, [posixpath.relpath(d, destination) for d in archived if d != destination and _inside(d, [destination])])
            extract_mount(job.backup, doc["format"], tar, source, destination, archived, job.settings.stream_timeout)
            lines.append(f"restored {destination} into {source} ({tar} --xattrs --xattrs-include='*' --acls --numeric-owner)")
        for destination in archived:  # compared before the service starts and writes again
            recorded = next(m for m in doc["mounts"] if m["destination"] == destination)
            lines.append(f"{destination} (read again after the restore, before the service starts):")
            differences += compare_mount(job.name, recorded, live[destination].source, [d for d in archived if d != destination],
                                         job.settings.stream_timeout, lines)
    return differences


def restore_through_engine(job: Restore, archived: list[str], why: str) -> int:
    """Put the archived mounts back through the engine, where this host cannot write them (why says so).

    The container is stopped; each mount is emptied by a short-lived helper container of
    the module's own image (with the container's own mounts, so its binaries are those the
    service runs with), which mounts that one volume or bind a second time, alone (so nested
    mounts are not touched), and runs `find -mindepth 1 -delete` there as root; then the archive is
    streamed into `docker cp --archive - <container>:/` (owners, modes, mtimes, links and
    the xattrs docker sets); every mount is read again through docker cp and compared with
    the manifest before the service starts. An image without `find` cannot remove what
    the backup does not hold: refused before anything is touched. Holes come back as
    zeros (docker cp writes no sparse files: the comparison says so if the manifest has
    them), and docker sets a time before 1970 to the epoch.
    """
    doc, lines, settings = job.doc, job.lines, job.settings
    live = {m.destination: m for m in plan_mounts(job.container, read_on_host=False)[0]}
    missing = [d for d in archived if d not in live]
    if missing:
        raise UsageError(f"container {job.name} has no writable mount at {', '.join(missing)}; the archive cannot be put back there")
    image = str(job.container.get("Image") or (job.container.get("Config") or {}).get("Image") or "")
    helper = ["run", "--rm", "--network", "none", "--user", "0:0", "--volumes-from", job.name, "--entrypoint", "find"]
    probe = docker([*helper, image, "/", "-maxdepth", "0"], timeout=max(settings.docker_timeout, 60), check=False)
    if probe.returncode != 0:
        raise UsageError(f"restore of {job.backup.name} through the engine ({why}) refused: the image of {job.name} has no working `find` to empty "
                         f"its mounts with ({failure_text(probe)}); restore it by hand as the restore notes say")
    lines.append(f"through the engine ({why}): mounts emptied by a helper container of {job.name}'s image, the archive put back with docker cp "
                 "(holes written as zeros, times before 1970 set to the epoch)")
    differences = 0
    with stopped(job):
        for destination in archived:
            mount = live[destination]
            source = mount.name if mount.type == "volume" and mount.name else mount.source
            target = ",".join(_csv_field(f) for f in (f"type={mount.type}", f"source={source}", f"target={ENGINE_RESTORE_TARGET}"))
            LOG.warning("restoring %s: emptying it through a helper container", destination)
            docker([*helper, "--mount", target, image, ENGINE_RESTORE_TARGET, "-mindepth", "1", "-delete"], timeout=settings.stream_timeout)
        with open(job.backup, "rb") as fh, decompressing(fh, doc["format"]) as raw, \
                stream_into(["docker", "cp", "--archive", "-", f"{job.name}:/"], timeout=settings.stream_timeout) as stream:
            shutil.copyfileobj(raw, stream.pipe, COPY_CHUNK)
        lines.append(f"restored {', '.join(archived)} (docker cp --archive)")
        for destination in archived:
            recorded = next(m for m in doc["mounts"] if m["destination"] == destination)
            lines.append(f"{destination} (read again through docker cp after the restore, before the service starts):")
            differences += compare_mount(job.name, recorded, None, [d for d in archived if d != destination], settings.stream_timeout, lines)
    return differences


ENGINE_RESTORE_TARGET = "/.bba-restore-target"  # where the helper container mounts the one mount it empties


def _csv_field(field: str) -> str:
    # docker --mount reads its value as one CSV record: a field holding a comma or a quote is quoted.
    return '"' + field.replace('"', '""') + '"' if any(c in field for c in ',"') else field


def failure_text(proc: subprocess.CompletedProcess[bytes], last: int = 2) -> str:
    """Return the last lines of a failed command's stderr on one line, or its exit status."""
    text = " | ".join(proc.stderr.decode("utf-8", "replace").strip().splitlines()[-last:])
    return text or f"exit status {proc.returncode}"


def plan_restore_mounted_archive(job: Restore) -> list[str]:
    running = bool((job.container.get("State") or {}).get("Running"))
    archived = [m["destination"] for m in job.doc.get("mounts", []) if m["destination"] in job.doc.get("archived_paths", [m["destination"]])]
    engine = job.via_docker or not job.engine.local or job.engine.rootless or gnu_tar() is None
    if engine:
        return [f"check that {job.name}'s image has `find` (a helper container empties the mounts)",
                f"docker stop {job.name}" if running else f"leave {job.name} stopped, as it is",
                *[f"empty {d} with a helper container of the same image (find -mindepth 1 -delete)" for d in archived],
                f"docker cp --archive - {job.name}:/ < {job.backup.name}, decompressed",
                "read every restored mount again through docker cp and compare it with the manifest",
                *([f"docker start {job.name}, wait for its healthcheck"] if running else [])]
    return [f"docker stop {job.name}" if running else f"leave {job.name} stopped, as it is",
            *[f"empty {d} and extract it from {job.backup.name} with GNU tar" for d in archived],
            "read every restored mount again and compare it with the manifest",
            *([f"docker start {job.name}, wait for its healthcheck"] if running else [])]


def empty_directory(path: str, keep: list[str]) -> None:
    """Remove everything inside the directory path (not path itself), by directory descriptors, never following a link.

    keep: the paths (relative to path) of nested mounts. Their mount points stay with what is
    in them (another mount's contents, restored on its own), and so do the directories on the
    way to them, emptied of everything else.
    """
    spared: dict[str, set[str]] = {}  # a directory (relative path) -> its names that stay: a mount point, or a directory on the way to one
    for kept in keep:
        parts = [part for part in kept.split("/") if part]
        for depth, part in enumerate(parts):
            spared.setdefault("/".join(parts[:depth]), set()).add(part)
    _empty(_Emptying(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), "", ""), spared)


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove name in dir_fd, a directory with everything in it or anything else, never following a link; gone already is fine."""
    _empty(_Emptying(os.dup(dir_fd), "", "", subdirectories=[name], listed_out=True), {})  # dir_fd itself is not listed


def remove_staging(dir_fd: int, name: str) -> None:
    """Remove a run's staging tree as the run ends (from a finally), as remove_entry does.

    If the run is failing already, a staging tree that cannot be removed is a warning, so
    that the run's own error (a full disk, a lost container) stays the one it ends with; the
    next run of the module removes what is left. Otherwise raise what the removal raised
    (BackupError naming the entry): a run that cannot clean up after itself does not end well.
    """
    failing = sys.exc_info()[1]  # the error on its way through the finally that called this, if any
    try:
        remove_entry(dir_fd, name)
    except (BackupError, OSError) as exc:
        if failing is None:
            raise
        LOG.warning("%s; the next run of this module removes what is left", exc if isinstance(exc, BackupError) else
                    f"cannot remove {_fd_path(dir_fd)}/{name}: {exc.strerror or exc}")


@dataclasses.dataclass
class _Emptying:
    """A directory being emptied: its descriptor, its name in the one below it and its path from the top, the entries still to remove."""

    fd: int
    name: str
    path: str
    subdirectories: list[str] = dataclasses.field(default_factory=list)
    last: list[str] = dataclasses.field(default_factory=list)  # the names of the last batch, which must not come back
    listed_out: bool = False  # nothing more to list in it: what is left stays (or, at the top of remove_entry, is not this walk's)


def _empty(top: _Emptying, spared: dict[str, set[str]]) -> None:
    """Remove everything in the directory top.fd but what spared keeps (empty_directory); close top.fd.

    top.subdirectories are removed first, whole; with top.listed_out nothing else in top.fd
    is touched (remove_entry). A name listed as a directory and found to be something else
    is unlinked, never followed. Nothing is held whole and nothing recurses. A directory is listed DIRECTORY_BATCH names
    at a time, again from the start once a batch is removed, so that a directory of millions
    costs the memory of a batch. Going down keeps one descriptor per level on a list, not a
    Python frame, so that a tree deeper than the interpreter's recursion limit is emptied
    like any other: shutil.rmtree recurses, and stops with RecursionError at about 1,000
    levels on Python 3.11, with the tree half removed. Raise BackupError naming an entry
    that cannot be removed, or that is still there after it was.
    """
    stack = [top]
    try:
        while stack:
            here = stack[-1]
            if here.subdirectories:
                name = here.subdirectories.pop()
                path = f"{here.path}/{name}" if here.path else name
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=here.fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise _cannot_remove(here.fd, name, exc) from None
                    if path not in spared:
                        _unlink(here.fd, name)  # a directory when it was listed, something else now
                    continue
                stack.append(_Emptying(child, name, path))
                continue
            stays = spared.get(here.path, set())
            batch = []
            if not here.listed_out:
                with os.scandir(here.fd) as listing:
                    found = (entry for entry in listing if entry.name not in stays)
                    batch = [(entry.name, _entry_kind(entry) == "d") for entry in itertools.islice(found, DIRECTORY_BATCH)]
            if not batch:
                if stays and not here.listed_out:  # emptied but for what stays: now into the directories on the way to a mount
                    here.listed_out = True
                    here.subdirectories = sorted(name for name in stays if (f"{here.path}/{name}" if here.path else name) in spared)
                    continue
                stack.pop()
                os.close(here.fd)
                if stack and here.path not in spared:
                    _rmdir(stack[-1].fd, here.name)
                continue
            names = [name for name, _ in batch]
            if names == here.last:
                raise BackupError(f"{_fd_path(here.fd)}/{names[0]} is still there after it was removed; the directory cannot be emptied")
            here.last = names
            for name, is_directory in batch:
                if is_directory or not _unlink(here.fd, name):
                    here.subdirectories.append(name)
    finally:
        for frame in stack:
            os.close(frame.fd)


def _unlink(dir_fd: int, name: str) -> bool:
    """Remove name (anything but a directory) in dir_fd; return False if it is a directory. Gone already is fine."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    except OSError as exc:
        raise _cannot_remove(dir_fd, name, exc) from None
    return True


def _rmdir(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _cannot_remove(dir_fd, name, exc) from None


def _cannot_remove(dir_fd: int, name: str, exc: OSError) -> BackupError:
    return BackupError(f"cannot remove {_fd_path(dir_fd)}/{name}: {exc.strerror or exc}")


def _fd_path(fd: int) -> str:
    """Return the path of an open directory, for a message (what the kernel says it is)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"(directory descriptor {fd})"


register(Procedure(
    name="mounted-archive",
    run=procedure_mounted_archive,
    plan=plan_mounted_archive,
    estimate=estimate_mounts,
    verify=verify_archive,
    drill=drill_mounted_archive,
    suffixes=("tar.gz", "tar.zst"),
    restore=restore_mounted_archive,
    restore_plan=plan_restore_mounted_archive,
    restores_mounts=True,
))


# --------------------------------------------------------------------------- class A: PostgreSQL

PG_TRAILER = b"-- PostgreSQL database cluster dump complete"
PG_TAIL_BYTES = 4096
PG_MIN_DUMP_BYTES = 256
# Before the dump, one cheap catalog query: the server version, every database with what
# decides whether pg_dumpall can dump it, and their size (the free-space estimate). The
# counts themselves come from the dump stream (DumpCensus), in the dump's own snapshot.
PG_SERVER_SQL = """
SELECT json_build_object(
  'version', current_setting('server_version'),
  'databases', (SELECT coalesce(json_agg(json_build_object(
      'name', datname, 'connect', datallowconn, 'template', datistemplate, 'invalid', datconnlimit = -2) ORDER BY datname), '[]'::json)
    FROM pg_database),
  'bytes', (SELECT coalesce(sum(pg_database_size(datname)), 0) FROM pg_database WHERE datallowconn AND datconnlimit <> -2))
"""
# The drill's census of the restored server: exact row counts of every table (query_to_xml
# runs a count(*) per table inside the same statement) and the number of large objects.
# Tables that belong to an extension are left out: CREATE EXTENSION makes them, not the dump.
PG_CENSUS_SQL = """
SELECT json_build_object(
  'tables', coalesce((
    SELECT json_object_agg(format('%I.%I', n.nspname, c.relname),
      (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text::bigint)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
  ), '{}'::json),
  'large_objects', (SELECT count(*) FROM pg_largeobject_metadata))
"""


class DumpCensus:
    """What a pg_dumpall script holds, counted from its bytes as they pass.

    Per database (its `\\connect` line), the rows of every table's COPY block and the large
    objects. Only COPY statements under a TABLE DATA entry and lo_create calls under a BLOB
    entry count (pg_dump writes a "-- Name: ...; Type: ...;" header before every entry, and
    keeps newlines out of it), so a function body holding such a line changes nothing.
    The counts are the dump's own snapshot: a busy server's restore of this very file
    gives them back.
    """

    ANCHOR = re.compile(rb"^(?:-- (?:Data for )?Name: |COPY |\\connect |SELECT pg_catalog\.lo_create\()", re.M)
    TOC = re.compile(rb"-- (?:Data for )?Name: [^\n]*; Type: ([A-Z ]+); Schema: ")
    IDENT = rb'(?:"(?:[^"]|"")*"|[^\s".(]+)'
    COPY = re.compile(rb"COPY (" + IDENT + rb"\." + IDENT + rb')(?: \((?:[^"()]|"(?:[^"]|"")*")*\))? FROM stdin;\n', re.S)
    STATEMENT_MAX = 1 << 20  # a COPY statement (its identifiers) or a header line longer than this is not pg_dump's

    def __init__(self) -> None:
        self.databases: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] | None = None
        self.toc = b""
        self.table: str | None = None  # inside this table's COPY block
        self.rows = 0
        self.tail = b""  # outside COPY: an unfinished line; inside: the last bytes, for the end marker

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Count what data holds. Raise BackupError on what pg_dump does not write."""
        rest = bytes(data)
        while rest:
            rest = self._copy(rest) if self.table is not None else self._sql(rest)

    def _copy(self, data: bytes) -> bytes:
        # Rows end with "\n"; the block ends with a line "\.". A data line never is "\."
        # (a backslash in data is written "\\"), so the first "\n\.\n" ends the block.
        window = self.tail + data
        end = self._block_end(window)
        if end < 0:
            self.rows += data.count(b"\n")
            self.tail = window[-3:]
            return b""
        self.rows += window.count(b"\n", len(self.tail), end + 1)
        rest = data[end + 4 - len(self.tail):]
        assert self.table is not None
        database = self._database()
        database["row_counts"][self.table] = database["row_counts"].get(self.table, 0) + self.rows
        self.table, self.tail = None, b""
        return rest

    END_OF_COPY = b"\n\\.\n"

    @classmethod
    def _block_end(cls, window: bytes) -> int:
        r"""Return where the first "\n\.\n" in window starts, or -1.

        The backslashes are looked for first (memchr): COPY data has few (escapes such as
        \N), and window.find() of the four bytes would stop at every newline, one per row:
        0.12 s against 0.01 s of CPU over 228 MiB of dump. A block with many escapes falls
        back to find() after 64 of them.
        """
        pos = 0
        for _ in range(64):
            slash = window.find(b"\\", pos)
            if slash < 0:
                return -1
            if slash and window[slash - 1:slash + 3] == cls.END_OF_COPY:
                return slash - 1
            pos = slash + 1
        return window.find(cls.END_OF_COPY, pos)  # pos - 1 holds a backslash: no marker starts there

    def _sql(self, data: bytes) -> bytes:
        buf = self.tail + data
        self.tail = b""
        pos = 0
        while match := self.ANCHOR.search(buf, pos):
            start = match.start()
            kind = match.group(0)
            if kind == b"COPY " and self.toc == b"TABLE DATA":
                statement = self.COPY.match(buf, start)
                if statement is None:
                    if b" FROM stdin;\n" not in buf[start:start + self.STATEMENT_MAX] and len(buf) - start < self.STATEMENT_MAX:
                        self.tail = buf[start:]  # the statement goes on in the next chunk
                        return b""
                    raise BackupError(f"the dump holds a COPY statement this tool cannot read: {buf[start:start + 120]!r}")
                self.table = statement.group(1).decode("utf-8", "surrogateescape")
                self.rows, self.tail = 0, b"\n"
                return buf[statement.end():]
            end = buf.find(b"\n", start)
            if end < 0:
                if len(buf) - start > self.STATEMENT_MAX:
                    raise BackupError("the dump holds a line longer than 1 MiB where pg_dump writes a header")
                self.tail = buf[start:]
                return b""
            line = buf[start:end]
            if kind.startswith(b"-- "):
                toc = self.TOC.match(line)
                self.toc = toc.group(1) if toc else b""
            elif kind == b"\\connect ":
                name = connect_target(line[len(kind):].decode("utf-8", "surrogateescape"))
                self.current = self.databases.setdefault(name, {"large_objects": 0, "row_counts": {}})
            elif kind.startswith(b"SELECT") and self.toc in (b"BLOB", b"BLOB METADATA"):
                self._database()["large_objects"] += 1
            pos = end + 1
        last = buf.rfind(b"\n", pos)
        self.tail = buf[last + 1:] if last >= 0 else buf[pos:]
        if len(self.tail) > self.STATEMENT_MAX:
            self.tail = b""  # a long line of SQL text (a function body); no anchor can start inside it
        return b""

    def _database(self) -> dict[str, Any]:
        if self.current is None:
            raise BackupError("the dump holds data before any \\connect line; not a pg_dumpall script")
        return self.current

    def counts(self) -> dict[str, Any]:
        """Return, per database: tables, rows, large objects and the rows of every table."""
        if self.table is not None:
            raise BackupError(f"the dump ends inside the COPY block of {self.table}")
        return {
            name: {"tables": len(db["row_counts"]), "rows": sum(db["row_counts"].values()), "large_objects": db["large_objects"],
                   "row_counts": dict(sorted(db["row_counts"].items()))}
            for name, db in sorted(self.databases.items())
        }


def connect_target(text: str) -> str:
    """Return the database a pg_dump `\\connect` argument names.

    pg_dump writes a plain or double-quoted name (`postgres`, `"Caps"`), or, for a name that
    is not simple ASCII, `-reuse-previous=on "dbname='...'"` (appendPsqlMetaConnect).
    Raise BackupError for anything else.
    """
    text = text.strip()
    complex_form = text.startswith("-reuse-previous=on ")
    if complex_form:
        text = text[len("-reuse-previous=on "):]
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1].replace('""', '"')
    if not complex_form:
        return text
    match = re.fullmatch(r"dbname=(?:'((?:[^'\\]|\\.)*)'|(\S+))", text, re.S)
    if match is None:
        raise BackupError(f"the dump's \\connect line is not one pg_dump writes: {text[:120]!r}")
    return re.sub(r"\\(.)", r"\1", match[1], flags=re.S) if match[1] is not None else match[2]


@dataclasses.dataclass(frozen=True)
class PgTarget:
    """How to reach the PostgreSQL server inside a container."""

    container: str
    user: str
    secrets: dict[str, str]


def pg_target(container: dict[str, Any]) -> PgTarget:
    """Return the superuser and password of a postgres container, from its own environment."""
    env = container_env(container)
    secrets = {"PGPASSWORD": env["POSTGRES_PASSWORD"]} if env.get("POSTGRES_PASSWORD") else {}
    return PgTarget(container_name(container), env.get("POSTGRES_USER") or "postgres", secrets)


def pg_conninfo(database: str) -> str:
    """Return a libpq connection string naming database, quoted so that psql never parses the name itself.

    A database called `a=b` or `host=x` passed as `-d a=b` would be read as a connection
    string (libpq: a -d value holding "=" is one).
    """
    return "dbname='" + database.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pg_json(target: PgTarget, database: str, sql: str, timeout: float) -> Any:
    """Return the single JSON value sql produces in database."""
    return parse_json(pg_sql(target, database, sql, timeout), f"psql in {target.container}")


def pg_sql(target: PgTarget, database: str, sql: str, timeout: float) -> bytes:
    """Run one SQL statement in database with psql (stopping at the first error); return what it printed."""
    argv = exec_argv(target.container, ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", target.user,
                                        "-d", pg_conninfo(database), "-c", sql], secrets=target.secrets)
    return run(argv, timeout=timeout, secrets=target.secrets).stdout


def pg_server(target: PgTarget, timeout: float) -> dict[str, Any]:
    """Return the server version, every database of pg_database with its flags, and their size."""
    found = pg_json(target, "postgres", PG_SERVER_SQL, timeout)
    if not isinstance(found, dict) or not isinstance(found.get("databases"), list):
        raise BackupError(f"psql in {target.container}: unexpected answer to the catalog query")
    return found


def dumpable_databases(server: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Return (the databases pg_dumpall dumps, the invalid ones it skips). Raise BackupError for one it would silently leave out.

    pg_dumpall dumps every database that allows connections (template0 never does, by
    design; its contents are the pristine template). A database with ALLOW_CONNECTIONS
    false holding data would vanish from the backup without a word, so the backup fails
    naming it rather than change a setting of the live server. An invalid database (an
    interrupted DROP DATABASE, datconnlimit -2) cannot be connected to or restored.
    """
    dumpable, invalid, closed = [], [], []
    for db in server["databases"]:
        if db.get("invalid"):
            invalid.append(db["name"])
        elif db.get("connect"):
            dumpable.append(db["name"])
        elif db["name"] != "template0":
            closed.append(db["name"])
    if closed:
        quoted = ", ".join(repr(name) for name in closed)
        raise BackupError(
            f"database(s) {quoted} do not accept connections (ALLOW_CONNECTIONS false): pg_dumpall would leave them out of the "
            "backup without a word. Allow connections while the backup runs (ALTER DATABASE ... ALLOW_CONNECTIONS true), "
            "or drop them if they are not needed, then run again")
    return dumpable, invalid


def pg_census(target: PgTarget, databases: list[str], timeout: float) -> dict[str, Any]:
    """Return, per database, tables, rows per table and large objects counted in the server (the drill's side)."""
    counts: dict[str, Any] = {}
    for database in databases:
        found = pg_json(target, database, PG_CENSUS_SQL, timeout)
        tables = dict(sorted(found["tables"].items()))
        counts[database] = {"tables": len(tables), "rows": sum(tables.values()), "large_objects": found["large_objects"], "row_counts": tables}
    return counts


def pg_dumpall_argv(job: BackupJob, target: PgTarget, session: str = "<session>") -> list[str]:
    # --lock-wait-timeout: a table held by an ALTER makes pg_dump fail instead of waiting
    # (and queueing every later lock of that table behind its own request). PGAPPNAME names
    # the dump's sessions, so that a dump that is stopped can have them ended on the server.
    return exec_argv(target.container, ["pg_dumpall", "-U", target.user, "--clean", "--if-exists",
                                        f"--lock-wait-timeout={int(job.settings.docker_timeout * 1000)}"], secrets=dump_environment(target, session))


def dump_environment(target: PgTarget, session: str) -> dict[str, str]:
    """Return what a dump's docker exec passes by name: the password, and PGAPPNAME, which names its sessions."""
    return {**target.secrets, "PGAPPNAME": session}


def end_sessions(target: PgTarget, session: str, timeout: float) -> None:
    """End the server sessions of a dump that was stopped.

    A backend waiting on a lock does not notice that its client is gone (only
    client_connection_check_interval makes it look), so it would stay queued behind the
    lock and block every session queued after it.
    """
    if not re.fullmatch(r"bba-[0-9a-f]+", session):
        raise AssertionError(f"not a session name this tool made: {session!r}")
    sql = f"SELECT to_json(count(pg_terminate_backend(pid))) FROM pg_stat_activity WHERE application_name = '{session}'"  # noqa: S608 (hex only)
    with contextlib.suppress(BackupError):
        ended = pg_json(target, "postgres", sql, timeout)
        if ended:
            LOG.info("ended %s session(s) of the stopped dump on the server", ended)


def dump_cluster(job: BackupJob, target: PgTarget, out: PartialFile) -> dict[str, Any]:
    """Stream pg_dumpall through the compressor into out; return scan_sql's checks of the file as written.

    With pigz or zstd, pg_dumpall writes straight into the compressor (its output never
    passes through this process); the file is read back as it is written, in a process of
    its own, and what the checks say (SQL bytes, trailer, rows per table) is the file's:
    its compressed stream is complete and matches its own checksum (gzip's CRC-32 and
    length, zstd's content checksum) of what the compressor was given. Raise BackupError
    if the dump is incomplete.
    """
    session = f"bba-{os.urandom(6).hex()}"
    fmt = "sql." + job.compression.suffix
    argv, secrets = pg_dumpall_argv(job, target, session), dump_environment(target, session)
    LOG.info("dumping with pg_dumpall into %s.partial", out.path)
    try:
        with verifying(out, lambda fh: scan_sql(fh, fmt)) as verified:
            with contextlib.closing(Progress("pg_dumpall, compressed", None)) as progress:
                out.progress = progress
                try:
                    with compressing(out, job.compression) as packed:  # its exit waits for the last of the compressor's output
                        if packed.fd is not None:
                            stream_to_fd(argv, packed.fd, timeout=job.settings.stream_timeout, secrets=secrets)
                        else:
                            with stream_from(argv, timeout=job.settings.stream_timeout, secrets=secrets) as pipe:
                                while chunk := pipe.read(COPY_CHUNK):
                                    packed.write(chunk)
                finally:
                    out.progress = None
            return verified()
    except CommandError as exc:
        end_sessions(target, session, job.settings.docker_timeout)
        locked = next((line for line in exc.stderr_tail if "Query was: LOCK TABLE" in line), None)
        if locked and any("timeout" in line for line in exc.stderr_tail):
            table = locked.split("LOCK TABLE", 1)[1].split(" IN ", 1)[0].strip()
            raise BackupError(f"pg_dump could not lock {table} within {job.settings.docker_timeout:g}s (docker_timeout): another session holds it "
                              "(an ALTER TABLE, a VACUUM FULL, a long transaction); try again once it is done",
                              details=exc.details or exc.stderr_tail) from None
        raise
    except BaseException:
        with signals_deferred():
            end_sessions(target, session, job.settings.docker_timeout)
        raise


def check_databases(expected: list[str], counts: dict[str, Any]) -> list[str]:
    """Fail if a database pg_database lists (and pg_dumpall dumps) is not in the dump; return warnings for extra ones."""
    missing = sorted(set(expected) - set(counts))
    if missing:
        raise BackupError(f"database(s) {', '.join(repr(name) for name in missing)} listed by pg_database are not in the dump; "
                          "not a complete backup")
    return [f"database {name!r} is in the dump but was not listed before it (created meanwhile)" for name in sorted(set(counts) - set(expected))]


def procedure_pg_dumpall(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class A: pg_dumpall of the whole cluster, streamed into <module>-<ts>.sql.gz, verified and counted."""
    require_running(job, "pg_dumpall")
    target = pg_target(job.resolution.container)
    # The databases the dump is checked against are those of now, under the module's lock:
    # the size estimate's answer is used only if the lock was free (no other run, such as a
    # --restore, had it meanwhile); else they are read again.
    server = job.seen.pop("pg_server", None) or pg_server(target, job.settings.docker_timeout)
    expected, invalid = dumpable_databases(server)
    warnings = [f"database {name!r} is invalid (an interrupted DROP DATABASE): it cannot be dumped or restored; drop it" for name in invalid]
    LOG.info("PostgreSQL %s, user %s: databases %s", server["version"], target.user, ", ".join(expected))
    fmt = "sql." + job.compression.suffix
    with PartialFile(dir_fd, f"{job.basename}.{fmt}", job.backup_dir) as out:
        verification = dump_cluster(job, target, out)
        size, counts = verification["sql_bytes"], verification.pop("counts")
        warnings += check_databases(expected, counts)
        verification["databases"] = f"{len(expected)} listed by pg_database, all in the dump"
        path = out.commit()
    LOG.info("dumped: %s", ", ".join(f"{db} ({c['tables']} tables, {c['rows']} rows)" for db, c in counts.items()))
    return BackupResult(
        path=path, format=fmt, size=out.size, sha256=out.sha256.hexdigest(), verification=verification,
        contents={"sql_bytes": size, "databases": sorted(counts)}, warnings=warnings,
        server={"engine": "postgresql", "version": server["version"], "user": target.user}, counts=counts,
    )


def plan_pg_dumpall(job: BackupJob) -> Plan:
    pg = pg_target(job.resolution.container)
    psql = mask_argv(exec_argv(job.container, ["psql", "-X", "-A", "-t", "-q", "-U", pg.user, "-d", "dbname='postgres'", "-c", "<catalog query>"],
                               secrets=pg.secrets))
    dump = mask_argv(pg_dumpall_argv(job, pg))
    steps = [f"run: {psql}", "check: every database of pg_database accepts connections (else fail, naming it)",
             f"run: {dump} | {job.compression.tool} -{job.compression.level} > <backup>.partial (mode 0600), read back as written: COPY rows per database",
             "check: every database of pg_database is in the dump"]
    return Plan(steps, f".sql.{job.compression.suffix}", f"{job.compression.format} complete, trailer line present, size, counts read back")


def estimate_pg_dumpall(job: BackupJob) -> Estimate:
    if not job.resolution.container.get("State", {}).get("Running"):
        return Estimate(None, "the server is not running")
    server = job.seen["pg_server"] = pg_server(pg_target(job.resolution.container), job.settings.docker_timeout)
    return Estimate(int(server["bytes"]), "pg_database_size of every database")


def verify_pg_dumpall(fh: IO[bytes], doc: dict[str, Any]) -> list[Check]:
    """--verify of a dump: complete stream, trailer, size, and the counts read again from the file equal the manifest's."""
    fmt = str(doc.get("format", "sql.gz"))
    found = scan_sql(fh, fmt)
    expected = doc.get("verification", {}).get("sql_bytes")
    checks: list[Check] = [("structure", found["sql_bytes"] == expected,
                            f"complete {compression_of(fmt)}, dump trailer present, {found['sql_bytes']} bytes of SQL (manifest {expected})")]
    recorded = doc.get("counts") or {}
    same = found["counts"] == recorded
    rows = sum(c["rows"] for c in found["counts"].values())
    checks.append(("counts", same, f"{len(found['counts'])} databases, {rows} rows in COPY blocks" + ("" if same else ", the manifest says otherwise")))
    return checks


PG_HARMLESS_ERRORS = (
    # pg_dumpall --clean drops and recreates every role; the one psql is connected as
    # cannot be dropped and so already exists (PostgreSQL docs, pg_dumpall "Notes").
    re.compile(r"current user cannot be dropped"),
    re.compile(r'role "(?P<role>[^"]+)" already exists'),
)


def drill_pg_dumpall(drill: Drill) -> int:
    """Class A: load the dump into a fresh server from the same image, compare every count."""
    doc, lines = drill.doc, drill.lines
    with drill_container(drill, "PostgreSQL") as box:
        assert box.live is not None
        box.create(start=True)
        box.start()
        target = dataclasses.replace(pg_target(box.live), container=box.name)
        box.wait_until(lambda: pg_json(target, "postgres", "SELECT to_json(1)", drill.settings.docker_timeout) == 1, "PostgreSQL accepted connections")
        load_dump(target, drill.backup, doc["format"], drill.settings.drill_timeout, lines, "drill failed")
        restored = pg_server(target, drill.settings.docker_timeout)
        counts = pg_census(target, dumpable_databases(restored)[0], drill.settings.docker_timeout)
    lines.append(f"server {restored['version']} (backup taken from {(doc.get('server') or {}).get('version')})")
    return compare_counts(doc.get("counts") or {}, counts, lines)


def load_dump(target: PgTarget, backup: Path, fmt: str, timeout: float, lines: list[str], failed: str, own_session: bool = False) -> None:
    """Load a pg_dumpall script into target's server with psql, as the restore notes say (no ON_ERROR_STOP).

    Only the known-harmless errors are accepted (PG_HARMLESS_ERRORS); any other raises
    BackupError starting with failed, every such psql line in its details.
    """
    argv = exec_argv(target.container, ["psql", "-X", "-q", "-U", target.user, "-d", "postgres"], secrets=target.secrets, stdin=True)
    with open(backup, "rb") as fh, decompressing(fh, fmt) as raw:
        with stream_into(argv, timeout=timeout, secrets=target.secrets, check=False, own_session=own_session) as stream:
            while chunk := raw.read(COPY_CHUNK):
                stream.pipe.write(chunk)
    errors = [line for line in stream.stderr.decode("utf-8", "replace").splitlines() if re.search(r"\b(ERROR|FATAL|PANIC):", line)]
    unexpected = [
        e for e in errors
        if not any((m := p.search(e)) and (m.groupdict().get("role") in (None, target.user)) for p in PG_HARMLESS_ERRORS)
    ]
    lines.append(f"psql: {len(errors)} error(s) while loading, {len(errors) - len(unexpected)} known to be harmless")
    if unexpected:
        raise BackupError(f"{failed}: psql reported {len(unexpected)} unexpected error(s), first: {unexpected[0].strip()}",
                          details=[f"psql: {e.strip()}" for e in unexpected[:STDERR_DETAIL_LINES]])


def compare_counts(expected_counts: dict[str, Any], counts: dict[str, Any], lines: list[str]) -> int:
    """Compare, per database, tables, rows, large objects and every table's rows; return the number of differences."""
    differences = 0
    for database in sorted(set(expected_counts) | set(counts)):
        want, got = expected_counts.get(database, {}), counts.get(database, {})
        lines.append(f"database {database}:")
        for key in ("tables", "rows", "large_objects"):
            differences += not compare(key, want.get(key), got.get(key), lines)
        for table in sorted(set(want.get("row_counts", {})) | set(got.get("row_counts", {}))):
            if want.get("row_counts", {}).get(table) != got.get("row_counts", {}).get(table):
                differences += not compare(f"rows in {table}", want.get("row_counts", {}).get(table), got.get("row_counts", {}).get(table), lines)
    return differences


PG_SESSIONS_SQL = """
SELECT coalesce(json_agg(json_build_object('pid', pid, 'database', datname, 'user', usename, 'application', application_name,
                                           'client', coalesce(client_addr::text, 'local'), 'state', state) ORDER BY pid), '[]'::json)
FROM pg_stat_activity WHERE datname = ANY(%s) AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


def _sql_text_array(values: list[str]) -> str:
    """Return values as an SQL text[] of quoted literals (a name's ' doubled)."""
    return "ARRAY[" + ",".join("'" + value.replace("'", "''") + "'" for value in values) + "]::text[]"


def restore_pg_dumpall(job: Restore) -> int:
    """Class A: load the dump into the running server with psql, as the restore notes say, then compare the counts.

    The server must be running (the load needs it). A dump from a newer major version
    than the live server is refused with both named. Other sessions on the databases the
    dump replaces are listed; they are ended only with --terminate-connections (new
    connections to those databases are refused meanwhile, and allowed again whatever
    happens), otherwise the restore is refused naming them.
    """
    doc, lines, timeout = job.doc, job.lines, job.settings.docker_timeout
    if not (job.container.get("State") or {}).get("Running"):
        raise RefusedError(f"container {job.name} is not running: a dump is loaded into the running server; start it first")
    target = pg_target(job.container)
    live = pg_server(target, timeout)
    recorded = str((doc.get("server") or {}).get("version") or "")
    if _major(recorded) and _major(live["version"]) and _major(recorded) > _major(live["version"]):
        raise RefusedError(f"the dump is from PostgreSQL {recorded}, the live server is {live['version']}: a dump does not load "
                           "into an older major version")
    if _major(recorded) != _major(live["version"]):
        lines.append(f"loading a PostgreSQL {recorded} dump into {live['version']} (pg_dump output loads into newer majors)")
    replaced = [db for db in (doc.get("counts") or {}) if db not in ("postgres", "template1")]  # pg_dumpall --clean drops and recreates these
    sessions = pg_json(target, "postgres", PG_SESSIONS_SQL % _sql_text_array(list(doc.get("counts") or {})), timeout)
    if sessions and not job.terminate_connections:
        first = sessions[0]
        raise RefusedError(f"{len(sessions)} other session(s) on the databases the dump replaces, first: pid {first['pid']} "
                           f"({first['user']}@{first['database']}, {first['application'] or 'no application name'}, from {first['client']}); "
                           "stop their clients, or pass --terminate-connections",
                           details=[f"session: pid {s['pid']} {s['user']}@{s['database']} {s['application']!r} from {s['client']} ({s['state']})"
                                    for s in sessions[:STDERR_DETAIL_LINES]])
    closed: list[str] = []
    try:
        if sessions:
            for database in replaced:  # no new sessions while the old ones are ended and the database replaced
                pg_sql(target, "postgres", f"ALTER DATABASE {_pg_ident(database)} ALLOW_CONNECTIONS false", timeout)
                closed.append(database)
            databases = _sql_text_array(list(doc.get("counts") or {}))  # quoted as SQL literals
            ended = pg_json(target, "postgres", "SELECT to_json(count(pg_terminate_backend(pid))) FROM pg_stat_activity "  # noqa: S608
                            f"WHERE datname = ANY({databases}) AND pid <> pg_backend_pid() AND backend_type = 'client backend'", timeout)
            lines.append(f"ended {ended} other session(s) (--terminate-connections)")
        # An interrupt waits for the end of the load: a cluster whose template1 or databases were
        # dropped and not yet recreated is no state to leave (and the safety dump does not load into it).
        LOG.warning("loading %s into the server of %s with psql; an interrupt now takes effect once the load is done",
                    job.backup.name, job.name)
        with signals_deferred():
            load_dump(target, job.backup, doc["format"], job.settings.stream_timeout, lines, "the restore failed", own_session=True)
    finally:
        with signals_deferred():
            for database in closed:  # a database the load did not recreate (it failed first) accepts connections again
                with contextlib.suppress(BackupError):
                    pg_sql(target, "postgres", f"ALTER DATABASE {_pg_ident(database)} ALLOW_CONNECTIONS true", timeout)
    restored = pg_server(target, timeout)
    counts = pg_census(target, dumpable_databases(restored)[0], timeout)
    lines.append(f"server {restored['version']} (dump taken from {recorded or 'an unrecorded version'}); counted again in the server:")
    return compare_counts(doc.get("counts") or {}, counts, lines)


def plan_restore_pg_dumpall(job: Restore) -> list[str]:
    databases = ", ".join(job.doc.get("counts") or {}) or "(none recorded)"
    return [f"check the live server's version against the dump's ({(job.doc.get('server') or {}).get('version')})",
            f"list other sessions on {databases}: refuse, or end them with --terminate-connections",
            f"docker exec -i {job.name} psql -X -q -U {pg_target(job.container).user} -d postgres < the dump (its DROP/CREATE DATABASE included)",
            "count tables, rows and large objects per database in the server and compare them with the manifest"]


def _major(version: str) -> int:
    found = re.match(r"\s*(\d+)", version)
    return int(found.group(1)) if found else 0


def _pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


register(Procedure(
    name="pg-dumpall",
    run=procedure_pg_dumpall,
    plan=plan_pg_dumpall,
    estimate=estimate_pg_dumpall,
    verify=verify_pg_dumpall,
    drill=drill_pg_dumpall,
    suffixes=("sql.gz", "sql.zst"),
    pausable=False,  # the dump needs the server answering, and is consistent without a pause
    restore=restore_pg_dumpall,
    restore_plan=plan_restore_pg_dumpall,
))


# --------------------------------------------------------------------------- class B: Redis

# -- RDB files: walked to their end, keys counted per database

REDIS_RDB_MAGIC = b"REDIS"


class RdbError(BackupError):
    """An RDB file this tool cannot read to its end (truncated, damaged, or from a newer Redis)."""


class _RdbReader:
    """Exact reads from an RDB stream of known size (a tar member, a file), buffered: the walk reads a byte at a time."""

    def __init__(self, source: Callable[[int], bytes], size: int | None = None) -> None:
        self.source, self.left = source, size
        self.buffer, self.pos = b"", 0

    def _more(self) -> bool:
        want = COPY_CHUNK if self.left is None else min(COPY_CHUNK, self.left)
        data = self.source(want) if want > 0 else b""
        if not data:
            return False
        if self.left is not None:
            self.left -= len(data)
        self.buffer, self.pos = self.buffer[self.pos:] + data, 0
        return True

    def take(self, count: int) -> bytes:
        while len(self.buffer) - self.pos < count:
            if not self._more():
                raise RdbError("the RDB file ends before its end marker (cut short)")
        data = self.buffer[self.pos:self.pos + count]
        self.pos += count
        return data

    def byte(self) -> int:
        if self.pos >= len(self.buffer) and not self._more():
            raise RdbError("the RDB file ends before its end marker (cut short)")
        value = self.buffer[self.pos]
        self.pos += 1
        return value

    def skip(self, count: int) -> None:
        ready = len(self.buffer) - self.pos
        if count <= ready:
            self.pos += count
            return
        count -= ready
        self.buffer, self.pos = b"", 0
        while count > 0:
            want = min(count, COPY_CHUNK) if self.left is None else min(count, COPY_CHUNK, self.left)
            data = self.source(want) if want > 0 else b""
            if not data:
                raise RdbError("the RDB file ends before its end marker (cut short)")
            if self.left is not None:
                self.left -= len(data)
            count -= len(data)

    def unread(self) -> int:
        """Return how many bytes of the stream are left after what was read."""
        return len(self.buffer) - self.pos + (self.left or 0)

    def length(self) -> tuple[int, bool]:
        """Return (value, encoded): a length, or with encoded the kind of a specially encoded string."""
        first = self.byte()
        kind = first >> 6
        if kind == 0:
            return first & 0x3F, False
        if kind == 1:
            return ((first & 0x3F) << 8) | self.byte(), False
        if first == 0x80:
            return int.from_bytes(self.take(4), "big"), False
        if first == 0x81:
            return int.from_bytes(self.take(8), "big"), False
        if kind == 3:
            return first & 0x3F, True
        raise RdbError(f"bad length byte {first:#04x} in the RDB file")

    def string(self) -> bytes:
        count, encoded = self.length()
        if not encoded:
            return self.take(count)
        if count in (0, 1, 2):
            return str(int.from_bytes(self.take((1, 2, 4)[count]), "little", signed=True)).encode()
        if count == 3:
            packed, _ = self.length()
            size, _ = self.length()
            return lzf_decompress(self.take(packed), size)
        raise RdbError(f"unknown string encoding {count} in the RDB file")

    def skip_string(self) -> None:
        count, encoded = self.length()
        if not encoded:
            self.skip(count)
        elif count in (0, 1, 2):
            self.skip((1, 2, 4)[count])
        elif count == 3:
            packed, _ = self.length()
            self.length()
            self.skip(packed)
        else:
            raise RdbError(f"unknown string encoding {count} in the RDB file")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self.skip_string()


def lzf_decompress(data: bytes, size: int) -> bytes:
    """Return LZF-compressed data (how Redis stores long strings) decompressed. Raise RdbError if it is not."""
    out = bytearray()
    i = 0
    try:
        while i < len(data):
            ctrl = data[i]
            i += 1
            if ctrl < 32:
                out += data[i:i + ctrl + 1]
                i += ctrl + 1
                continue
            count = ctrl >> 5
            if count == 7:
                count += data[i]
                i += 1
            ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
            i += 1
            if ref < 0:
                raise IndexError
            for _ in range(count + 2):  # the copy may overlap what it writes
                out.append(out[ref])
                ref += 1
    except IndexError:
        raise RdbError("damaged LZF string in the RDB file") from None
    if len(out) != size:
        raise RdbError("damaged LZF string in the RDB file")
    return bytes(out)


def _skip_module_value(r: _RdbReader) -> None:
    # A module value annotated for readers without the module (RDB_TYPE_MODULE_2): opcodes to EOF.
    while (opcode := r.length()[0]) != 0:
        if opcode in (1, 2):
            r.length()
        elif opcode == 3:
            r.skip(4)
        elif opcode == 4:
            r.skip(8)
        elif opcode == 5:
            r.skip_string()
        else:
            raise RdbError(f"unknown module opcode {opcode} in the RDB file")


def _skip_stream(r: _RdbReader, kind: int) -> None:
    # Streams: listpacks, then metadata and consumer groups (rdb.c, RDB_TYPE_STREAM_LISTPACKS*).
    r.skip_strings(2 * r.length()[0])  # node keys and their listpacks
    for _ in range(3 + (5 if kind >= 19 else 0)):  # length, last id (ms, seq); first id, max deleted id, entries added
        r.length()
    for _ in range(r.length()[0]):  # consumer groups
        r.skip_string()
        r.length()
        r.length()
        if kind >= 19:
            r.length()  # entries read
        for _ in range(r.length()[0]):  # the group's pending entries: raw id, delivery time, delivery count
            r.skip(16 + 8)
            r.length()
        for _ in range(r.length()[0]):  # consumers: name, seen time, (active time), their pending ids
            r.skip_string()
            r.skip(16 if kind >= 21 else 8)
            r.skip(16 * r.length()[0])


def _skip_value(r: _RdbReader, kind: int) -> None:
    """Skip one value of RDB type kind (types 0-25: every type Redis wrote up to 8.0)."""
    if kind in (0, 9, 10, 11, 12, 13, 16, 17, 20, 23):  # a string, or one encoded blob (ziplist, intset, listpack)
        r.skip_string()
    elif kind in (1, 2, 14):  # list, set, quicklist of ziplists
        r.skip_strings(r.length()[0])
    elif kind == 4:  # hash table: field, value
        r.skip_strings(2 * r.length()[0])
    elif kind == 3:  # zset with scores as strings (253-255: nan, +inf, -inf, no digits follow)
        for _ in range(r.length()[0]):
            r.skip_string()
            size = r.byte()
            if size < 253:
                r.skip(size)
    elif kind == 5:  # zset with binary double scores
        for _ in range(r.length()[0]):
            r.skip_string()
            r.skip(8)
    elif kind == 18:  # quicklist 2: container kind, node
        for _ in range(r.length()[0]):
            r.length()
            r.skip_string()
    elif kind in (15, 19, 21):
        _skip_stream(r, kind)
    elif kind == 7:
        r.length()  # module id
        _skip_module_value(r)
    elif kind in (22, 24):  # hash with field TTLs (7.4): (minExpire), then TTL, field, value
        if kind == 24:
            r.skip(8)
        for _ in range(r.length()[0]):
            r.length()
            r.skip_strings(2)
    elif kind == 25:  # listpack hash with field TTLs: minExpire, then the listpack
        r.skip(8)
        r.skip_string()
    else:
        raise RdbError(f"value type {kind} is unknown to this tool (an RDB from a newer Redis, or a pre-release module type)")


def read_rdb(r: _RdbReader, expired_by: tuple[int, ...] = (), into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Walk an RDB file to its end marker and checksum; return what it holds.

    version, aux (redis-ver, ctime, aof-base, ...), functions (libraries), and per
    database keys, keys with a TTL, and for each time in expired_by (ms since the epoch)
    how many keys had expired by then. into, when given, receives version and aux as soon
    as they are read (they come first), so that a caller keeps them if the walk fails.
    Raise RdbError if it is not an RDB file, is cut short, or holds a type this tool does
    not know.
    """
    found = into if into is not None else {}
    magic = r.take(9)
    if magic[:5] != REDIS_RDB_MAGIC or not magic[5:].isdigit():
        raise RdbError("not an RDB file (no REDIS magic)")
    version = int(magic[5:])
    aux: dict[str, str] = {}
    found.update(version=version, aux=aux)
    dbs: dict[str, dict[str, Any]] = {}
    db = dbs.setdefault("db0", {"keys": 0, "expires": 0, "expired": [0] * len(expired_by)})
    functions = 0
    expire: int | None = None
    while (kind := r.byte()) != 0xFF:
        if kind == 0xFE:
            db = dbs.setdefault(f"db{r.length()[0]}", {"keys": 0, "expires": 0, "expired": [0] * len(expired_by)})
        elif kind == 0xFD:
            expire = int.from_bytes(r.take(4), "little") * 1000
        elif kind == 0xFC:
            expire = int.from_bytes(r.take(8), "little", signed=True)
        elif kind == 0xFA:
            key = r.string().decode("utf-8", "replace")
            aux[key] = r.string().decode("utf-8", "replace")
        elif kind == 0xFB:  # a hint of the database's size; the keys are counted one by one
            r.length()
            r.length()
        elif kind == 0xF9:  # LFU frequency
            r.skip(1)
        elif kind == 0xF8:  # LRU idle time
            r.length()
        elif kind == 0xF7:  # module auxiliary data: module id, when opcode, when, then its value
            r.length()
            r.length()
            r.length()
            _skip_module_value(r)
        elif kind == 0xF5:  # a function library
            r.skip_string()
            functions += 1
        elif kind == 0xF4:  # cluster slot sizes
            r.length()
            r.length()
            r.length()
        elif kind <= 25:
            r.skip_string()  # the key
            _skip_value(r, kind)
            db["keys"] += 1
            if expire is not None:
                db["expires"] += 1
                for i, when in enumerate(expired_by):
                    db["expired"][i] += expire <= when
            expire = None
        elif kind < 0xF0:
            raise RdbError(f"value type {kind} is unknown to this tool (an RDB from a newer Redis, or a pre-release module type)")
        else:
            raise RdbError(f"opcode {kind:#04x} is unknown to this tool (an RDB from a newer Redis)")
    if version >= 5:
        r.take(8)  # CRC64 of the file; redis-check-rdb verifies it where the container has it
    found.update(functions=functions, dbs={name: db for name, db in dbs.items() if db["keys"] or name != "db0"})
    return found


def rdb_counts(info: dict[str, Any]) -> dict[str, int]:
    """Return the keys per database of an RDB read by read_rdb, as INFO keyspace names them."""
    return {name: found["keys"] for name, found in sorted(info["dbs"].items(), key=lambda item: int(item[0][2:])) if found["keys"]}


REDIS_ERROR_RE = re.compile(r"^(ERR|NOAUTH|NOPERM|WRONGPASS|WRONGTYPE|BUSY|LOADING|MISCONF|READONLY|MASTERDOWN|OOM|NOSCRIPT)\b")
# Written by a save or an AOF rewrite still running: never data (rdb.c rdbSaveBackground, aof.c).
REDIS_TEMP_FILE = re.compile(r"temp-(?:[0-9]+\.rdb|rewriteaof-(?:bg-)?[0-9]+\.aof)")
REDIS_AOF_TROUBLE = ("short read", "Bad file format", "AOF loaded anyway", "Unrecoverable error", "truncated")


class RedisReplyError(BackupError):
    """Redis answered with an error (renamed command, ACL, auth)."""


class RedisLoginError(RedisReplyError):
    """Redis refused the credentials: no fallback helps, the operator must fix them."""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """How to reach Redis inside a container, and where its credentials came from (for a failed login)."""

    container: str
    secrets: dict[str, str]
    user: str = ""
    auth: str = "no password"


def redis_target(container: dict[str, Any], settings: Settings, env: dict[str, str]) -> RedisTarget:
    """Return the Redis of a container: its ACL user and password from the operator's environment, else
    from the container's own. The password reaches redis-cli as REDISCLI_AUTH, by name; the user name
    (not a secret) is its --user argument."""
    own = container_env(container)
    found: dict[str, str] = {}
    sources: list[str] = []
    for what, name in (("user", settings.redis_user_env), ("password", settings.redis_password_env)):
        if env.get(name):
            found[what] = env[name]
            sources.append(f"{what} from ${name} of the operator's environment")
        elif own.get(name):
            found[what] = own[name]
            sources.append(f"{what} from ${name} of the container's environment")
    auth = ", ".join(sources) or f"no ${settings.redis_user_env} or ${settings.redis_password_env} in either environment"
    password = found.get("password")
    return RedisTarget(container_name(container), {"REDISCLI_AUTH": password} if password else {}, found.get("user", ""), auth)


def redis_cli(target: RedisTarget, *args: str, timeout: float) -> str:
    """Return redis-cli's reply. Raise RedisReplyError when Redis answers with an error.

    redis-cli exits 0 on error replies, so the reply itself is checked.
    """
    user = ["--user", target.user] if target.user else []
    proc = run(exec_argv(target.container, ["redis-cli", "--no-auth-warning", *user, *args], secrets=target.secrets),
               timeout=timeout, secrets=target.secrets)
    reply = proc.stdout.decode("utf-8", "replace").strip()
    first = reply.splitlines()[0] if reply else "no reply"
    refused = next((line.split("AUTH failed:", 1)[1].strip() for line in proc.stderr.decode("utf-8", "replace").splitlines() if "AUTH failed:" in line), None)
    if refused or reply.startswith(("NOAUTH", "WRONGPASS")):
        raise RedisLoginError(f"redis login to {target.container} failed: {refused or first} ({target.auth})")
    if REDIS_ERROR_RE.match(reply) or not reply:
        raise RedisReplyError(f"redis {' '.join(args[:2])}: {first}")
    return reply


def parse_info(text: str) -> dict[str, str]:
    """Return the fields of an INFO reply."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("#"):
            fields[key] = value
    return fields


def redis_keyspace(target: RedisTarget, timeout: float) -> dict[str, int]:
    """Return the number of keys per database (INFO keyspace)."""
    counts = {}
    for db, value in parse_info(redis_cli(target, "INFO", "keyspace", timeout=timeout)).items():
        fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        counts[db] = int(fields.get("keys", 0))
    return counts


def redis_lastsave(target: RedisTarget, timeout: float) -> int:
    reply = redis_cli(target, "LASTSAVE", timeout=timeout)
    if not reply.isdigit():
        raise RedisReplyError(f"redis LASTSAVE: unexpected reply {reply[:80]!r}")
    return int(reply)


def redis_time(target: RedisTarget, timeout: float) -> float:
    """Return the server's clock (TIME), in seconds."""
    seconds, micros = redis_cli(target, "TIME", timeout=timeout).split()[:2]
    return int(seconds) + int(micros) / 1e6


def _wait_for_save(target: RedisTarget, deadline: float, timeout: float) -> None:
    while parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout)).get("rdb_bgsave_in_progress") == "1":
        if time.monotonic() > deadline:
            raise BackupError("a save already running in Redis did not finish within snapshot_timeout")
        time.sleep(0.2)


def redis_bgsave(target: RedisTarget, timeout: float, docker_timeout: float) -> dict[str, Any]:
    """Take this run's own BGSAVE (BGSAVE SCHEDULE while an AOF rewrite runs) and wait for it to succeed.

    A save already running (the server's own save policy, another tool) is not a reason
    to give up: it is waited out, then this run's own save is taken, so that the RDB is
    of now. Success means rdb_bgsave_in_progress:0, rdb_last_bgsave_status:ok and a
    LASTSAVE newer than the one before; not_before is the server's clock just before the
    save, which the RDB's own ctime must reach. Raise RedisReplyError if Redis refuses the
    command, BackupError if the save fails or takes longer than timeout.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if parse_info(redis_cli(target, "INFO", "persistence", timeout=docker_timeout)).get("rdb_bgsave_in_progress") == "1":
            LOG.warning("a save is already running in %s (not this run's): waiting for it, then taking this run's own", target.container)
            _wait_for_save(target, deadline, docker_timeout)
        before = redis_lastsave(target, docker_timeout)
        # LASTSAVE and ctime have one-second resolution: start only once the server's clock is past it.
        while (now := redis_time(target, docker_timeout)) < before + 1:
            if time.monotonic() > deadline:
                raise BackupError(f"the server's clock did not pass its LASTSAVE ({before}) within snapshot_timeout")
            time.sleep(0.1)
        info = parse_info(redis_cli(target, "INFO", "persistence", timeout=docker_timeout))
        command = ["BGSAVE", "SCHEDULE"] if info.get("aof_rewrite_in_progress") == "1" else ["BGSAVE"]
        try:
            reply = redis_cli(target, *command, timeout=docker_timeout)
        except RedisReplyError as exc:
            if "already in progress" not in str(exc) or time.monotonic() > deadline:
                raise
            continue  # another save started in between: wait for it, then take ours
        break
    if not reply.startswith("Background saving"):
        raise RedisReplyError(f"redis {' '.join(command)}: unexpected reply {reply[:80]!r}")
    LOG.info("%s: %s; waiting for it to finish", " ".join(command), reply)
    while True:
        info = parse_info(redis_cli(target, "INFO", "persistence", timeout=docker_timeout))
        after = redis_lastsave(target, docker_timeout)
        if info.get("rdb_bgsave_in_progress") == "0" and after > before:
            break
        if info.get("rdb_bgsave_in_progress") == "0" and info.get("rdb_last_bgsave_status") == "err":
            raise BackupError(f"redis BGSAVE failed in {target.container} (rdb_last_bgsave_status:err; see the container's log)")
        if time.monotonic() > deadline:
            raise BackupError(f"redis BGSAVE did not finish within {timeout:g}s (snapshot_timeout)")
        time.sleep(0.2)
    if info.get("rdb_last_bgsave_status") != "ok":
        raise BackupError(f"redis BGSAVE finished with rdb_last_bgsave_status:{info.get('rdb_last_bgsave_status')}")
    return {"command": " ".join(command), "lastsave_before": before, "lastsave_after": after, "not_before": int(now),
            "seconds": round(time.monotonic() - started, 3)}


def redis_config(target: RedisTarget, timeout: float) -> dict[str, str]:
    """Return dir, dbfilename, appendonly, appenddirname and appendfilename (CONFIG GET)."""
    config: dict[str, str] = {}
    for key in ("dir", "dbfilename", "appendonly", "appenddirname", "appendfilename"):
        lines = redis_cli(target, "CONFIG", "GET", key, timeout=timeout).splitlines()
        if len(lines) >= 2 and lines[0] == key:
            config[key] = lines[1]
    if "dir" not in config or "dbfilename" not in config:
        raise RedisReplyError("redis CONFIG GET dir/dbfilename gave no answer")
    return config


def redis_aof_path(version: str, directory: str, config: dict[str, str]) -> tuple[str, str]:
    """Return (kind, path) of the AOF: "dir" with its manifest since Redis 7, one "file" before."""
    name = config.get("appendfilename") or "appendonly.aof"
    if int((version.split(".") or ["0"])[0] or 0) >= 7:
        return "dir", posixpath.join(directory, config.get("appenddirname") or "appendonlydir")
    return "file", posixpath.join(directory, name)


def is_rdb_name(name: str) -> bool:
    base = posixpath.basename(name)
    return base.endswith(".rdb") and not REDIS_TEMP_FILE.fullmatch(base)


def is_aof_name(name: str) -> bool:
    """Whether a file is part of an AOF: appendonly.aof (before Redis 7), the files and manifest of an AOF directory."""
    return name.endswith((".aof", ".aof.manifest"))


def redis_exclude(name: str) -> str | None:
    """Leave out Redis's half-written temp files: a running save's temp-<pid>.rdb is never data."""
    return "written by a save still running, not data" if REDIS_TEMP_FILE.fullmatch(posixpath.basename(name)) else None


def scan_redis(fmt: str, aof_names: Callable[[str], bool]) -> Callable[[IO[bytes], list[str]], dict[str, Any]]:
    """Return the in-flight scan of a Redis archive: the tar checks, every RDB walked, AOF files measured."""
    return lambda fh, groups: scan_tar(fh, fmt, rdb=is_rdb_name, keep=aof_names, groups=groups)


def _aof_summary(verification: dict[str, Any], aof_path: str, kind: str) -> dict[str, Any] | None:
    """Return what the archive holds of the AOF: its files, their sizes, the base RDB's keys."""
    member = aof_path.lstrip("/")
    files = {name: size for name, size in verification.get("files", {}).items() if name == member or name.startswith(member + "/")}
    if not files:
        return None
    summary: dict[str, Any] = {"path": aof_path, "kind": kind, "files": dict(sorted(files.items()))}
    for name, data in verification.get("kept", {}).items():
        if name.startswith(member + "/") and name.endswith(".manifest"):
            summary["manifest"] = data.decode("utf-8", "replace").splitlines()
    bases = {name: info for name, info in verification.get("rdb", {}).items() if name.startswith(member + "/")}
    incr = sum(size for name, size in files.items() if name.endswith(".incr.aof"))
    summary["incr_bytes"] = incr
    if kind == "file":
        summary["incr_bytes"] = sum(files.values())
    for name, info in bases.items():
        if "error" not in info:
            summary["base"] = {"file": "/" + name, "ctime": int(info["aux"].get("ctime", 0) or 0), "keys": rdb_counts(info)}
    return summary


def _rdb_of_record(verification: dict[str, Any], rdb: str, not_before: int | None) -> tuple[dict[str, Any], list[str]]:
    """Return the walk of the archived RDB and warnings. Raise BackupError if it is not this run's or cannot be read."""
    info = verification.get("rdb", {}).get(rdb.lstrip("/"))
    if info is None:
        raise BackupError(f"the archive holds no {rdb}")
    warnings = []
    ctime = int((info.get("aux") or {}).get("ctime", 0) or 0)
    if "error" in info:
        if not info.get("unknown"):
            raise BackupError(f"the archived {rdb} cannot be read to its end: {info['error']}")
        warnings.append(f"{rdb}: {info['error']}; its keys were NOT counted from the file, so --drill cannot compare them")
    if not_before is not None and ctime < not_before:
        raise BackupError(f"the archived {rdb} is not the one this run's BGSAVE wrote (its ctime {ctime} is before the save "
                          f"started at {not_before}): something replaced it meanwhile; try again")
    return info, warnings


def procedure_redis_bgsave(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class B: BGSAVE, then archive the RDB file (and the AOF when on), verified and counted from the archive.

    Falls back to the mounted data archive, loudly, when Redis refuses BGSAVE or CONFIG
    (renamed command, ACL); the fallback's counts are those of the RDB it holds.
    """
    require_running(job, "BGSAVE")
    target = redis_target(job.resolution.container, job.settings, job.env)
    timeout = job.settings.docker_timeout
    server = {"engine": "redis", "version": parse_info(redis_cli(target, "INFO", "server", timeout=timeout)).get("redis_version", "unknown")}
    try:
        bgsave = redis_bgsave(target, job.settings.snapshot_timeout, timeout)
        config = redis_config(target, timeout)
    except RedisLoginError:
        raise
    except RedisReplyError as exc:
        result = redis_fallback(job, dir_fd, target, str(exc))
        result.server = server
        return result
    LOG.info("BGSAVE done in %.1fs (LASTSAVE %d -> %d)", bgsave["seconds"], bgsave["lastsave_before"], bgsave["lastsave_after"])
    rdb = posixpath.join(config["dir"], config["dbfilename"])
    aof = config.get("appendonly") == "yes"
    aof_kind, aof_path = redis_aof_path(server["version"], config["dir"], config)
    paths = [rdb, *([aof_path] if aof else [])]
    tmpfs = [d for d, reason in job.skipped if reason == "tmpfs mount" and _inside(config["dir"], [d])]
    if tmpfs:
        raise BackupError(f"Redis keeps its files in {config['dir']}, on a tmpfs mount ({tmpfs[0]}): there is no copy on disk to back up, "
                          "and docker cp cannot read tmpfs")
    before = parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout))
    if aof and before.get("aof_rewrite_in_progress") != "0":
        raise BackupError("an AOF rewrite is running; its directory cannot be copied consistently now (try again shortly)")
    found: dict[str, Any] = {}

    def check_copy(verification: dict[str, Any]) -> None:
        after = parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout))
        if aof and (after.get("aof_rewrite_in_progress") != "0" or after.get("aof_rewrites") != before.get("aof_rewrites")):
            raise BackupError("an AOF rewrite ran during the copy; no backup written (try again)")
        info, warnings = _rdb_of_record(verification, rdb, bgsave["not_before"])
        # Writes after this run's snapshot; unknown once another save (the server's own policy) came after it.
        changes = int(after.get("rdb_changes_since_last_save", "0") or 0) if redis_lastsave(target, timeout) == bgsave["lastsave_after"] else None
        found.update(info=info, warnings=warnings, changes=changes, aof=_aof_summary(verification, aof_path, aof_kind) if aof else None)
        check = run(exec_argv(job.container, ["redis-check-rdb", rdb]), timeout=job.settings.snapshot_timeout, check=False)
        if check.returncode in (126, 127) or b"executable file not found" in check.stderr:
            verification["redis_check_rdb"] = "not available in the container"
        elif check.returncode != 0:
            last = (check.stdout + check.stderr).decode(errors="replace").strip().splitlines()[-1:]
            raise BackupError(f"redis-check-rdb {rdb} failed in {job.container}: {' '.join(last)}")
        else:
            verification["redis_check_rdb"] = "ok"
        _record_rdb_checks(verification, rdb)

    items = [locate(p, job.mounts) for p in paths]
    fmt = "tar." + job.compression.suffix
    result = write_archive(job, dir_fd, items, scan=scan_redis(fmt, lambda name: name.startswith(aof_path.lstrip("/") + "/") or name == aof_path.lstrip("/")),
                           before_commit=check_copy)
    info = found["info"]
    counts = rdb_counts(info) if "error" not in info else None
    aof_summary = found["aof"]
    if aof_summary is not None:
        # With no write after the snapshot, the AOF holds exactly the RDB's dataset: its load must give the same keys.
        aof_summary["changes_after_snapshot"] = found["changes"]
        aof_summary["keys"] = counts if found["changes"] == 0 else None
    result.server, result.counts = server, counts
    result.warnings += found["warnings"]
    result.contents.update({"rdb": rdb, "rdb_file": _rdb_facts(info), "appendonly": aof, "aof": aof_summary, "bgsave": bgsave,
                            "counts_from": f"{rdb} as archived (written by this run's BGSAVE)"})
    result.timings["bgsave_seconds"] = bgsave["seconds"]
    return result


def _record_rdb_checks(verification: dict[str, Any], rdb: str) -> None:
    # What the scan found goes to the manifest's contents; the verification keeps its verdicts only.
    info = verification.get("rdb", {}).get(rdb.lstrip("/"), {})
    verification["rdb_magic"] = "error" not in info or bool(info.get("unknown"))
    verification["rdb_read"] = info.get("error", "to its end marker")
    for key in ("rdb", "files", "kept"):
        verification.pop(key, None)


def _rdb_facts(info: dict[str, Any]) -> dict[str, Any]:
    aux = info.get("aux") or {}
    return {"rdb_version": info.get("version"), "redis_version": aux.get("redis-ver"), "ctime": int(aux.get("ctime", 0) or 0), "mtime": info.get("mtime"),
            "keys": {name: db["keys"] for name, db in info.get("dbs", {}).items()},
            "expires": {name: db["expires"] for name, db in info.get("dbs", {}).items()}, "functions": info.get("functions", 0)}


def redis_fallback(job: BackupJob, dir_fd: int, target: RedisTarget, reason: str) -> BackupResult:
    """Class B's fallback: the whole mounts, counted from the RDB they hold, never from the live server.

    A half-written temp-*.rdb is left out; an archive with no RDB and no AOF is a failure,
    not a backup; the age of the data (the RDB's ctime, LASTSAVE) is recorded and printed.
    """
    if job.cls.fallback != "mounted-archive":
        raise BackupError(f"{job.procedure} is not possible ({reason}) and class {job.cls.letter} has no archive fallback")
    timeout = job.settings.docker_timeout
    dbfilename, preferred, lastsave, aof_on = "dump.rdb", "", None, None
    with contextlib.suppress(BackupError):
        config = redis_config(target, timeout)
        dbfilename, preferred = config["dbfilename"], posixpath.join(config["dir"], config["dbfilename"]).lstrip("/")
    with contextlib.suppress(BackupError):
        lastsave = redis_lastsave(target, timeout)
    with contextlib.suppress(BackupError):
        aof_on = parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout)).get("aof_enabled") == "1"
    hint = "restore it with Redis stopped"
    LOG.warning("REDIS-BGSAVE NOT POSSIBLE (%s): FALLING BACK to a live copy of the mounted data; %s", reason, hint)
    if not job.mounts:
        raise BackupError(f"container {job.container} has no writable mounts to archive; nothing would be backed up")
    job.rules.exclude = redis_exclude
    found: dict[str, Any] = {}

    def check(verification: dict[str, Any]) -> None:
        rdbs = sorted((name for name in verification.get("rdb", {}) if posixpath.basename(name) == dbfilename), key=lambda name: name != preferred)
        aofs = sorted(name for name in verification.get("files", {}) if is_aof_name(name))
        if not rdbs and not aofs:
            raise BackupError(f"the mounts of {job.container} hold no {dbfilename} and no AOF: this archive would not restore Redis; "
                              "no backup written")
        found["rdb"] = "/" + rdbs[0] if rdbs else None
        found["info"], found["warnings"] = _rdb_of_record(verification, found["rdb"], None) if rdbs else ({}, [])
        aof_dirs = sorted({posixpath.dirname(name) for name in aofs if name.endswith(".manifest")})
        found["aof"] = _aof_summary(verification, "/" + aof_dirs[0], "dir") if aof_dirs else (
            _aof_summary(verification, "/" + aofs[0], "file") if aofs else None)
        if found["rdb"]:
            _record_rdb_checks(verification, found["rdb"])
        for key in ("rdb", "files", "kept"):
            verification.pop(key, None)

    fmt = "tar." + job.compression.suffix
    result = write_archive(job, dir_fd, mount_items(job), scan=scan_redis(fmt, is_aof_name), before_commit=check)
    info = found["info"]
    counts = rdb_counts(info) if info and "error" not in info else None
    ctime = int((info.get("aux") or {}).get("ctime", 0) or 0) if info else 0
    mtime = f", file modified {_utc(info['mtime'])}" if info and info.get("mtime") else ""
    age = f"{found['rdb']} written at {_utc(ctime)} ({_age(ctime)} ago{mtime})" if ctime else "no RDB file"
    saved = f"; LASTSAVE {_utc(lastsave)}" if lastsave else ""
    warning = (f"FALLBACK: the archive holds {age}{saved}: writes made since then are NOT in this backup"
               + ("; Redis loads the archived AOF instead (appendonly yes)" if found["aof"] and aof_on else ""))
    LOG.warning("%s", warning)
    aof_summary = found["aof"]
    if aof_summary is not None:
        aof_summary["keys"] = aof_summary.get("base", {}).get("keys") if aof_summary.get("incr_bytes") == 0 else None
    result.fallback = {"procedure": "mounted-archive", "reason": reason}
    result.warnings[:0] = [f"fallback to mounted-archive: {reason}; {hint}", warning, *found["warnings"]]
    result.counts = counts
    result.contents.update({"rdb": found["rdb"], "rdb_file": _rdb_facts(info) if info else None, "appendonly": aof_on, "aof": aof_summary,
                            "lastsave": lastsave, "counts_from": f"{found['rdb']} as archived" if counts is not None else None})
    return result


def _utc(seconds: int | None) -> str:
    return datetime.datetime.fromtimestamp(seconds or 0, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: int) -> str:
    age = max(0, int(time.time()) - seconds)
    return f"{age // 86400}d {age % 86400 // 3600}h" if age >= 86400 else f"{age // 3600}h {age % 3600 // 60}m" if age >= 3600 else f"{age // 60}m {age % 60}s"


def plan_redis_bgsave(job: BackupJob) -> Plan:
    cli = mask_argv(exec_argv(job.container, ["redis-cli", "--no-auth-warning"], secrets=redis_target(job.resolution.container, job.settings, job.env).secrets))
    steps = [f"run: {cli} {command}" for command in (
        "INFO persistence (a save already running is waited out)", "LASTSAVE", "TIME", "BGSAVE",
        "INFO persistence (until this run's save is done)", "CONFIG GET dir dbfilename appendonly appenddirname appendfilename")]
    steps.append(f"archive: <dir>/<dbfilename> and, with appendonly, the AOF (fallback: {job.cls.fallback or 'none'}, counted from the RDB it holds)")
    checks = (f"{job.compression.format} complete, tar readable, entry count, the RDB read to its end and written by this BGSAVE (ctime), "
              "redis-check-rdb")
    return Plan(steps, f".tar.{job.compression.suffix}", checks)


def estimate_redis(job: BackupJob) -> Estimate:
    if job.resolution.container.get("State", {}).get("Running"):
        with contextlib.suppress(BackupError):
            redis = redis_target(job.resolution.container, job.settings, job.env)
            info = parse_info(redis_cli(redis, "INFO", "memory", timeout=job.settings.docker_timeout))
            if info.get("used_memory_dataset", "").isdigit():
                return Estimate(int(info["used_memory_dataset"]), "Redis used_memory_dataset")
    return estimate_mounts(job)


def verify_redis(fh: IO[bytes], doc: dict[str, Any]) -> list[Check]:
    """--verify of a Redis archive: the tar checks, and the RDB of record read again to the same keys per database."""
    fmt = str(doc.get("format", "tar.gz"))
    contents = doc.get("contents") or {}
    expected_listing = manifest_listing(doc)
    found = scan_tar(fh, fmt, rdb=is_rdb_name, groups=list(expected_listing))
    expected = doc.get("verification", {}).get("members")
    checks: list[Check] = [("structure", found["members"] == expected, f"complete {compression_of(fmt)}, tar readable, {found['members']} entries (manifest {expected})"),
                           *listing_check(found, expected_listing)]
    rdb = contents.get("rdb")
    if rdb:
        info = found["rdb"].get(rdb.lstrip("/"))
        if info is None:
            checks.append(("rdb", False, f"the archive holds no {rdb}"))
        elif "error" in info and not info.get("unknown"):
            checks.append(("rdb", False, f"{rdb}: {info['error']}"))
        else:
            keys = rdb_counts(info) if "error" not in info else None
            recorded = doc.get("counts")
            checks.append(("rdb", keys == recorded, f"{rdb} read to its end, keys {keys} (manifest {recorded})"))
    return checks


def _extract_member(backup: Path, fmt: str, member: str, into: str, dir_fd: int | None = None) -> TarEntry:
    """Copy one member of a tar backup into the file into (private, 0600, relative to dir_fd); return its entry (owner, mode)."""
    with open(backup, "rb") as fh, decompressing(fh, fmt) as raw:
        for tar, entry in tar_entries(raw):
            if entry.name == member and entry.kind == tarfile.REGTYPE:
                fd = os.open(into, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                with os.fdopen(fd, "wb") as out:
                    while chunk := tar.read(COPY_CHUNK):
                        out.write(chunk)
                return entry
    raise BackupError(f"{backup.name} holds no {member}")


def _expected_keys(rdb_file: str, loaded_at: float, load_seconds: float) -> dict[str, tuple[int, int]]:
    """Return, per database, the range of keys a server that loaded rdb_file must hold: less those expired since."""
    late, early = int(loaded_at * 1000), int((loaded_at - load_seconds - 1) * 1000)
    with open(rdb_file, "rb") as fh:
        info = read_rdb(_RdbReader(fh.read, os.fstat(fh.fileno()).st_size), (early, late))
    return {name: (db["keys"] - db["expired"][1], db["keys"] - db["expired"][0]) for name, db in info["dbs"].items() if db["keys"]}


def _compare_keys(label: str, expected: dict[str, tuple[int, int]], found: dict[str, int], lines: list[str]) -> int:
    differences = 0
    for db in sorted(set(expected) | set(found), key=lambda name: int(name[2:]) if name[2:].isdigit() else 0):
        low, high = expected.get(db, (0, 0))
        got = found.get(db, 0)
        if low <= got <= high:
            note = "" if low == high else f" (keys with a TTL expired since the backup: {high - got})"
            lines.append(f"  {db} keys: {got} = {high}{note}" if got == high else f"  {db} keys: {got} = {high} less {high - got} expired")
        else:
            differences += 1
            lines.append(f"  {db} keys: {got} != {low if low == high else f'{low}..{high}'}   <- DIFFERS ({label})")
    return differences


def _redis_loaded(box: DrillContainer, target: RedisTarget, settings: Settings) -> tuple[dict[str, int], float]:
    box.wait_until(lambda: parse_info(redis_cli(target, "INFO", "persistence", timeout=settings.docker_timeout)).get("loading") == "0",
                   "Redis loaded its data")
    return redis_keyspace(target, settings.docker_timeout), redis_time(target, settings.docker_timeout)


def drill_redis(drill: Drill) -> int:
    """Class B: start Redis from the same image on the restored files and compare keys per database.

    Pass 1 loads the RDB of record whatever appendonly says (an AOF directory naming a
    copy of it as its base, or the single AOF file replaced by it), and compares keys with
    those read from that very file, less keys whose TTL ran out since. Pass 2, when the
    archive holds an AOF, restores everything as the restore notes do and loads the AOF:
    its keys are compared when no write came after the snapshot, reported otherwise.
    """
    doc, lines, settings = drill.doc, drill.lines, drill.settings
    contents = doc.get("contents") or {}
    rdb, aof = contents.get("rdb"), contents.get("aof")
    differences = 0
    if rdb and doc.get("counts") is not None:
        with drill_container(drill, "Redis") as box, tempfile.TemporaryDirectory(prefix="bba-drill-") as private:
            copy = os.path.join(private, "rdb")
            member = _extract_member(drill.backup, doc["format"], rdb.lstrip("/"), copy)
            owner = (member.uid, member.gid)
            box.create(start=True)
            box.copy_in(drill.backup)
            if aof is not None or contents.get("appendonly"):
                _point_aof_at_rdb(box, copy, owner, aof, rdb, (doc.get("server") or {}).get("version", "7"))
            started = time.monotonic()
            box.start()
            target = dataclasses.replace(redis_target(box.live or {}, settings, drill.env), container=box.name)
            found, loaded_at = _redis_loaded(box, target, settings)
            lines.append(f"pass 1: Redis loaded {rdb} (the RDB of record), keys compared with those read from it:")
            differences += _compare_keys("RDB", _expected_keys(copy, loaded_at, time.monotonic() - started), found, lines)
    elif rdb:
        lines.append(f"pass 1 skipped: the keys of {rdb} were not counted at backup time ({(contents.get('rdb_file') or {}).get('error', 'unknown type')})")
    appendonly = contents.get("appendonly")
    if aof is not None and appendonly is False:
        lines.append(f"the archive also holds {aof['path']}; Redis ran with appendonly no, so a restore does not load it")
    elif aof is not None:
        with drill_container(drill, "Redis") as box:
            box.create(start=True)
            box.copy_in(drill.backup)
            box.start()
            target = dataclasses.replace(redis_target(box.live or {}, settings, drill.env), container=box.name)
            found, _ = _redis_loaded(box, target, settings)
            trouble = [line for line in box.logs().splitlines() if any(word in line for word in REDIS_AOF_TROUBLE)]
            lines.append(f"pass 2: Redis loaded the archived AOF ({aof['path']}), as a restore would:" if appendonly else
                         "pass 2: the whole archive restored as the restore notes say (whether Redis loads its AOF was not known at backup time):")
            if trouble:
                differences += 1
                lines.append(f"  the AOF did not load cleanly: {trouble[0].strip()}   <- DIFFERS")
            if appendonly and aof.get("keys") is not None:
                # An AOF replays keys whose TTL has passed and expires them afterwards: up to all of those may be gone.
                with_ttl = (contents.get("rdb_file") or {}).get("expires", {})
                differences += _compare_keys("AOF", {db: (n - with_ttl.get(db, 0), n) for db, n in aof["keys"].items()}, found, lines)
            else:
                why = (f"it holds {aof.get('changes_after_snapshot')} write(s) made after the RDB snapshot"
                       if aof.get("changes_after_snapshot") else "its writes after the RDB snapshot were not counted")
                lines.append(f"  keys {dict(sorted(found.items()))} (not compared: {why})")
    if not rdb and aof is None:
        raise BackupError("drill: the manifest names no RDB and no AOF in this archive")
    return differences


def _point_aof_at_rdb(box: DrillContainer, copy: str, owner: tuple[int, int], aof: dict[str, Any] | None, rdb: str, version: str) -> None:
    """Make the drill's Redis load the RDB of record even with appendonly yes.

    Redis 7 with appendonly yes loads only what its AOF manifest names, and with no AOF it
    starts EMPTY (and overwrites the RDB at its next save); an AOF manifest naming a copy of
    the RDB as its base makes it load exactly that file. Before Redis 7 the single AOF file
    is replaced by the RDB (an RDB is a valid AOF preamble). They belong to the RDB's owner,
    who must be able to write there.
    """
    uid, gid = owner
    directory = posixpath.dirname(rdb)
    kind, path = (aof["kind"], aof["path"]) if aof else redis_aof_path(version, directory, {})
    size = os.stat(copy).st_size
    with open(copy, "rb") as fh:
        def write(tar: TarWriter) -> None:
            now = int(time.time())
            if kind == "dir":
                manifest = b"file bba-drill.base.rdb seq 1 type b\n"
                tar.add(TarEntry(path.strip("/"), tarfile.DIRTYPE, 0o755, uid, gid, now))
                base = posixpath.join(path, "bba-drill.base.rdb").strip("/")
                tar.add_file(TarEntry(base, tarfile.REGTYPE, 0o644, uid, gid, now, size), fh.fileno())
                name = posixpath.join(path, posixpath.basename(_manifest_name(aof))).strip("/")
                tar.add_stream(TarEntry(name, tarfile.REGTYPE, 0o644, uid, gid, now, len(manifest)), io.BytesIO(manifest))
            else:
                tar.add_file(TarEntry(path.strip("/"), tarfile.REGTYPE, 0o644, uid, gid, now, size), fh.fileno())
        box.copy_in_tar(write)


def _manifest_name(aof: dict[str, Any] | None) -> str:
    for name in (aof or {}).get("files", {}):
        if str(name).endswith(".manifest"):
            return str(name)
    return "appendonly.aof.manifest"


def restore_redis(job: Restore) -> int:
    """Class B: put the RDB of record back in place of the live one, stopped, and make Redis load exactly it.

    Whatever appendonly says now: with appendonly yes, Redis 7 loads only what its AOF
    manifest names, and with no AOF it starts EMPTY; so the live AOF is replaced by an AOF
    directory whose manifest names a copy of the RDB as its base (before Redis 7 the single
    AOF file is replaced by the RDB, a valid AOF preamble). The backup's own AOF is not
    loaded: the RDB is the state the manifest counted. Redis must be running first (its
    config and version are asked); an RDB from a newer Redis than the live one is refused.
    Then keys per database are compared with those read from that RDB, less keys whose TTL
    ran out since.
    """
    doc, lines, timeout = job.doc, job.lines, job.settings.docker_timeout
    if doc.get("fallback_used"):
        return restore_mounted_archive(job)  # whole mounts: put back as class E, Redis stopped
    rdb = (doc.get("contents") or {}).get("rdb")
    if not rdb:
        raise UsageError(f"{job.backup.name} holds no RDB of record; restore it by hand as the notes say")
    if not (job.container.get("State") or {}).get("Running"):
        raise RefusedError(f"container {job.name} is not running: its Redis is asked for its config and version first; start it")
    target = redis_target(job.container, job.settings, job.env)
    live_version = parse_info(redis_cli(target, "INFO", "server", timeout=timeout)).get("redis_version", "unknown")
    recorded = str((doc.get("server") or {}).get("version") or "")
    if _major(recorded) and _major(live_version) and _major(recorded) > _major(live_version):
        raise RefusedError(f"the RDB is from Redis {recorded}, the live server is {live_version}: Redis does not load an RDB from a newer version")
    if _major(recorded) != _major(live_version):
        lines.append(f"loading a Redis {recorded} RDB into {live_version}")
    config = redis_config(target, timeout)
    live_rdb = posixpath.join(config["dir"], config["dbfilename"])
    if live_rdb != rdb:
        lines.append(f"the live server keeps its RDB at {live_rdb} (the backup's was {rdb}); it is put there")
    where = locate(config["dir"], plan_mounts(job.container, read_on_host=True)[0])
    if where.host is None or not job.engine.local or job.engine.rootless:
        raise UsageError(f"Redis's dir {config['dir']} is not in a mount readable on this host; restore it by hand as the notes say")
    appendonly = config.get("appendonly") == "yes"
    kind, aof_path = redis_aof_path(live_version, config["dir"], config)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bba-restore-") as private:
        copy = os.path.join(private, "rdb")
        member = _extract_member(job.backup, doc["format"], rdb.lstrip("/"), copy)  # put in place, then compared with
        with stopped(job), signals_deferred():  # the RDB and the AOF are swapped together: an interrupt waits for both
            directory = os.open(os.path.join(where.host, *where.rel), _DIR_FLAGS)
            try:
                _place_file(copy, directory, config["dbfilename"], member)
                lines.append(f"put {rdb} of the backup in place of {live_rdb}")
                if appendonly:
                    lines.append(_point_live_aof_at(copy, directory, posixpath.basename(aof_path), kind, config, member, private, aof_path))
            finally:
                os.close(directory)
            started = time.monotonic()  # stopped() starts the container again as the block ends; keys are compared after
        wait_until_loaded(job, target)
        found, loaded_at = redis_keyspace(target, timeout), redis_time(target, timeout)
        lines.append("Redis loaded the RDB of record; keys per database compared with those read from it:")
        return _compare_keys("restore", _expected_keys(copy, loaded_at, time.monotonic() - started), found, lines)


def _point_live_aof_at(copy: str, directory: int, name: str, kind: str, config: dict[str, str], member: TarEntry, private: str,
                       aof_path: str) -> str:
    """Replace the live AOF (name in directory) by one that loads exactly the RDB copy; return what was done."""
    remove_entry(directory, name)
    if kind != "dir":
        _place_file(copy, directory, name, member)
        return f"appendonly yes: {aof_path} replaced by that RDB (an RDB is a valid AOF preamble)"
    prefix = config.get("appendfilename") or "appendonly.aof"
    base = f"{prefix}.1.base.rdb"
    os.mkdir(name, 0o755, dir_fd=directory)
    os.chown(name, member.uid, member.gid, dir_fd=directory, follow_symlinks=False)
    aof_fd = os.open(name, _DIR_FLAGS, dir_fd=directory)
    try:
        _place_file(copy, aof_fd, base, member)
        manifest = os.path.join(private, "manifest")
        with open(manifest, "wb") as fh:
            fh.write(f"file {base} seq 1 type b\n".encode())
        _place_file(manifest, aof_fd, f"{prefix}.manifest", member)
    finally:
        os.close(aof_fd)
    return f"appendonly yes: {aof_path}/ replaced by a manifest naming a copy of that RDB as its base (Redis loads exactly it)"


def _place_file(source: str, dir_fd: int, name: str, entry: TarEntry) -> None:
    """Copy source into dir_fd as name, atomically (a temporary name, then rename), with entry's owner and mode."""
    temp = f".{name}.bba-restore"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dir_fd)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with open(source, "rb") as src:
            while chunk := src.read(COPY_CHUNK):
                _write_all(fd, chunk)
        os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode & 0o7777 or 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def wait_until_loaded(job: Restore, target: RedisTarget) -> None:
    """Wait until a restarted Redis answers and has finished loading its data."""
    deadline = time.monotonic() + job.settings.drill_timeout
    while True:
        with contextlib.suppress(BackupError):
            if parse_info(redis_cli(target, "INFO", "persistence", timeout=job.settings.docker_timeout)).get("loading") == "0":
                return
        if time.monotonic() > deadline:
            raise BackupError(f"Redis in {job.name} did not finish loading within {job.settings.drill_timeout:g}s (drill_timeout)")
        time.sleep(0.3)


def plan_restore_redis(job: Restore) -> list[str]:
    if job.doc.get("fallback_used"):
        return plan_restore_mounted_archive(job)
    rdb = (job.doc.get("contents") or {}).get("rdb")
    return ["ask the live Redis for its dir, dbfilename, appendonly and version (an RDB from a newer Redis is refused)",
            f"docker stop {job.name}",
            f"put {rdb} of the backup in place of the live RDB; with appendonly yes, replace the AOF by one naming a copy of it as its base",
            f"docker start {job.name}, wait until Redis has loaded",
            "compare keys per database with those read from that RDB (less keys whose TTL ran out since)"]


register(Procedure(
    name="redis-bgsave",
    run=procedure_redis_bgsave,
    plan=plan_redis_bgsave,
    estimate=estimate_redis,
    verify=verify_redis,
    drill=drill_redis,
    suffixes=("tar.gz", "tar.zst"),
    owns_fallback=True,  # its fallback archive is counted from the RDB it holds and drilled by starting Redis
    restore=restore_redis,
    restore_plan=plan_restore_redis,
))


# --------------------------------------------------------------------------- class C: Vault


def remove_in_container(job: BackupJob, path: str, noted: dict[str, str] | None) -> None:
    """Remove a temporary file or directory the run made in the container; strike it off the journal once gone."""
    with signals_deferred():
        proc = run(exec_argv(job.container, ["rm", "-rf", "--", path]), timeout=job.settings.docker_timeout, check=False)
        if proc.returncode == 0 and job.journal is not None and noted is not None:
            job.journal.done(noted)
        elif proc.returncode != 0:
            LOG.warning("could not remove %s:%s (the next run of %s tries again): %s", job.container, path, job.module.id,
                        proc.stderr.decode("utf-8", "replace").strip())


def note_in_container(job: BackupJob, path: str) -> dict[str, str] | None:
    """Write down a temporary path the run is about to make in the container (see CleanupJournal)."""
    return job.journal.add(kind="container-path", container=job.container, path=path) if job.journal is not None else None


def scan_vault_snapshot(fh: IO[bytes]) -> dict[str, Any]:
    """Check a raft snapshot: a complete gzip'd tar whose SHA256SUMS match its members."""
    found = read_tar_gz_files(fh, lambda name: name == "SHA256SUMS")
    sizes, digests, kept = found.sizes, found.digests, found.kept
    if "SHA256SUMS" not in kept:
        raise BackupError("snapshot has no SHA256SUMS member")
    listed = 0
    for line in kept["SHA256SUMS"].decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        digest, name = parts
        listed += 1
        if digests.get(name) != digest:
            raise BackupError(f"snapshot member {name} does not match its SHA256SUMS entry")
    if not listed:
        raise BackupError("snapshot SHA256SUMS lists no member")
    return {"gzip_complete": True, "tar_readable": True, "sha256sums": f"{listed} members match", "members": len(sizes)}


VAULT_HINT = "a live copy of Vault's storage is consistent only with Vault stopped or paused (--pause)"


def procedure_vault_raft_snapshot(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class C: `vault operator raft snapshot save` in the container, copied out as <module>-<ts>.snap.

    Falls back to the mounted data archive, loudly, without a token or when the snapshot
    fails (sealed, not raft, permission).
    """
    options = job.options
    token = job.env.get(options["token_env"])
    if not token:
        return fall_back(job, dir_fd, f"no {options['token_env']} in the environment", VAULT_HINT)
    require_running(job, "a raft snapshot")
    addr = options["vault_addr"] or container_env(job.resolution.container).get("VAULT_ADDR") or "http://127.0.0.1:8200"
    secrets = {"VAULT_TOKEN": token, "VAULT_ADDR": addr}
    tmp = f"/tmp/bba-{job.basename}.snap"
    noted = note_in_container(job, tmp)
    try:
        try:
            run(exec_argv(job.container, ["vault", "operator", "raft", "snapshot", "save", tmp], secrets=secrets),
                timeout=job.settings.snapshot_timeout, secrets=secrets)
        except CommandError as exc:
            return fall_back(job, dir_fd, f"vault operator raft snapshot save failed: {' | '.join(exc.stderr_tail[-2:]) or exc}", VAULT_HINT)

        def inspect(verification: dict[str, Any]) -> None:
            proc = run(exec_argv(job.container, ["vault", "operator", "raft", "snapshot", "inspect", tmp], secrets=secrets),
                       timeout=job.settings.snapshot_timeout, secrets=secrets, check=False)
            if proc.returncode == 127:
                verification["vault_inspect"] = "not available in the container's vault CLI"
            elif proc.returncode != 0:
                raise BackupError(f"vault operator raft snapshot inspect failed: {CommandError([], proc.returncode, proc.stderr)}")
            else:
                verification["vault_inspect"] = "ok"

        result = copy_out_file(job, dir_fd, tmp, ".snap", scan_vault_snapshot, before_commit=inspect)
    finally:
        remove_in_container(job, tmp, noted)
    result.contents["vault_addr"] = addr
    return result


def restore_vault(job: Restore) -> int:
    """Class C: `vault operator raft snapshot restore` of the snapshot, copied into the running container.

    The token reaches vault by name (VAULT_TOKEN), never in an argv; -force only with
    --force-vault (a snapshot of a cluster with other unseal keys). The snapshot is removed
    from the container whatever happens. A mounted-archive fallback is put back as class E.
    Vault has nothing to count: the report says the snapshot was accepted, not compared.
    """
    doc, lines, timeout = job.doc, job.lines, job.settings.docker_timeout
    if doc.get("fallback_used"):
        return restore_mounted_archive(job)
    token_env = str(job.options.get("token_env") or "VAULT_TOKEN")
    token = job.env.get(token_env)
    if not token:
        raise RefusedError(f"no {token_env} in the environment: a raft snapshot restore needs a token allowed to restore (root or "
                           "sys/storage/raft/snapshot-force)")
    if not (job.container.get("State") or {}).get("Running"):
        raise RefusedError(f"container {job.name} is not running: the snapshot is restored through the running, unsealed Vault")
    addr = str(job.options.get("vault_addr") or container_env(job.container).get("VAULT_ADDR") or (doc.get("contents") or {}).get("vault_addr")
               or "http://127.0.0.1:8200")
    secrets = {"VAULT_TOKEN": token, "VAULT_ADDR": addr}
    inside = f"/tmp/bba-restore-{os.urandom(4).hex()}.snap"
    copy_file_into(job.name, job.backup, inside, job.settings.stream_timeout)
    try:
        argv = ["vault", "operator", "raft", "snapshot", "restore", *(["-force"] if job.force_vault else []), inside]
        proc = run(exec_argv(job.name, argv, secrets=secrets), timeout=job.settings.snapshot_timeout, secrets=secrets, check=False)
        if proc.returncode != 0:
            why = failure_text(proc, last=3)
            hint = "; if the snapshot is of a cluster with other unseal keys, --force-vault passes -force" if not job.force_vault else ""
            raise BackupError(f"vault operator raft snapshot restore failed ({why}){hint}")
    finally:
        with signals_deferred():
            run(exec_argv(job.name, ["rm", "-f", "--", inside]), timeout=timeout, check=False)
    lines.append(f"vault operator raft snapshot restore{' -force' if job.force_vault else ''} accepted {job.backup.name} ({addr})")
    lines.append("Vault offers nothing to count: not compared; unseal with the source cluster's keys if it sealed, then check known secrets")
    return 0


def copy_file_into(container: str, source: Path, path: str, timeout: float) -> None:
    """Copy a file of this host into a container (running or not) at path, as root, mode 0600."""
    size = source.stat().st_size
    with open(source, "rb") as fh, stream_into(["docker", "cp", "-", f"{container}:{posixpath.dirname(path)}"], timeout=timeout) as stream:
        tar = TarWriter(_FileSink(stream.pipe))
        tar.add_file(TarEntry(posixpath.basename(path), tarfile.REGTYPE, 0o600, 0, 0, int(time.time()), size), fh.fileno())
        tar.close()


def plan_restore_vault(job: Restore) -> list[str]:
    if job.doc.get("fallback_used"):
        return plan_restore_mounted_archive(job)
    return [f"copy {job.backup.name} into {job.name}:/tmp (removed afterwards)",
            f"docker exec -e VAULT_TOKEN -e VAULT_ADDR {job.name} vault operator raft snapshot restore{' -force' if job.force_vault else ''} <it>",
            "report it (Vault offers nothing to count)"]


def plan_vault(job: BackupJob) -> Plan:
    token_env = job.options["token_env"]
    if not job.env.get(token_env):
        return plan_fallback(job, f"no {token_env} in the environment")
    name, tmp = job.container, f"/tmp/bba-{job.basename}.snap"
    vault = ["-e", "VAULT_ADDR", "-e", "VAULT_TOKEN", name, "vault", "operator", "raft", "snapshot"]
    steps = [f"run: docker exec {shlex.join([*vault, 'save', tmp])}", f"run: docker exec {shlex.join([*vault, 'inspect', tmp])}",
             f"run: docker cp {name}:{tmp} - > <backup>.partial", f"run: docker exec {name} rm -rf {tmp}"]
    return Plan(steps, ".snap", "gzip'd tar, SHA256SUMS, vault operator raft snapshot inspect")


def verify_snapshot(fh: IO[bytes], doc: dict[str, Any]) -> list[Check]:
    found = scan_vault_snapshot(fh)
    recorded = doc.get("verification", {}).get("members")
    return [("structure", found["members"] == recorded,
             f"complete gzip, tar readable, SHA256SUMS {found['sha256sums']}, {found['members']} members (manifest {recorded})")]


register(Procedure(
    name="vault-raft-snapshot",
    run=procedure_vault_raft_snapshot,
    plan=plan_vault,
    estimate=estimate_mounts,
    verify=verify_snapshot,
    restore=restore_vault,
    restore_plan=plan_restore_vault,
    drill=lambda drill: drill_listing(drill, "Vault is not started for a drill: structure, SHA256SUMS and contents listing only; "
                                             "restore with `vault operator raft snapshot restore`"),
    suffixes=("snap",),
    options={"token_env": (str, "VAULT_TOKEN"), "vault_addr": (str, "")},
))


# --------------------------------------------------------------------------- class D: MinIO

MINIO_HINT = "MinIO supports restoring backend files only onto the same release and drive layout, with the server stopped"


def mc_records(argv: list[str], what: str, timeout: float, secrets: dict[str, str], on_record: Callable[[dict[str, Any]], None],
               cwd: str | None = None) -> None:
    """Run mc with --json through the streaming helper, handing each object line to on_record as it comes.

    mc mirror goes on after a per-object error, so every line is read and any error line
    fails the step, as does the exit status. Raise BackupError on either.
    """
    errors: list[str] = []
    with _streaming(argv, into=False, timeout=timeout, secrets=secrets, check=False, cwd=cwd) as stream:
        tail = b""
        while chunk := stream.pipe.read(COPY_CHUNK):
            *lines, tail = (tail + chunk).split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise BackupError(f"{what}: output is not mc's --json lines: {line[:120]!r}") from None
                if record.get("status") == "error":
                    error = record.get("error") or {}
                    cause = (error.get("cause") or {}).get("message", "")
                    errors.append(f"{error.get('message', 'error')} {cause}".strip())
                else:
                    on_record(record)
    if errors:
        raise BackupError(f"{what}: {len(errors)} error(s), first: {errors[0]}")
    if stream.returncode != 0:
        raise CommandError(argv, stream.returncode, stream.stderr)


def procedure_mc_mirror(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class D: `mc mirror --preserve` of every bucket of the alias, plus the bucket metadata export.

    mc runs on this host when it is there, else inside the container; objects are staged
    in a private directory inside the backup directory, archived into one tar.gz, and the
    staging is removed whatever happens (by the next run, if this one is killed). Falls
    back to the mounted data archive, loudly, without an alias or without mc.
    """
    alias_env = job.options["alias_env"]
    alias = job.env.get(alias_env, "")
    if not alias:
        return fall_back(job, dir_fd, f"no {alias_env} in the environment", MINIO_HINT)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise UsageError(f"{alias_env}={alias!r} is not an mc alias name")
    host_key = f"MC_HOST_{alias}"
    secrets = {host_key: job.env[host_key]} if job.env.get(host_key) else {}
    inside = f"/tmp/bba-{job.basename}"
    host_mc = mc_on_this_host(job.settings.docker_timeout)
    if host_mc is None:
        require_running(job, "mc inside the container")
        probe = run(exec_argv(job.container, ["mc", "--version"]), check=False, timeout=job.settings.docker_timeout)
        if probe.returncode != 0:
            return fall_back(job, dir_fd, "mc is neither on this host nor in the container", MINIO_HINT)

    mc = mc_runner(job.container, host_mc, secrets, job.settings.stream_timeout)
    staging_name = f".{job.basename}.mc-staging"
    os.mkdir(staging_name, 0o700, dir_fd=dir_fd)
    staging = job.backup_dir / staging_name
    noted = None
    try:
        work = str(staging) if host_mc else inside
        if host_mc:
            for sub in ("buckets", "metadata"):
                os.mkdir(staging / sub, 0o700)
        else:
            noted = note_in_container(job, inside)
            run(exec_argv(job.container, ["mkdir", "-p", f"{inside}/buckets", f"{inside}/metadata"]), timeout=job.settings.docker_timeout)
        listing: list[dict[str, Any]] = []
        mc(["ls", "--json", alias], work, f"mc ls {alias}", listing.append)
        bucket_names = [r["key"].rstrip("/") for r in listing if r.get("type") == "folder"]
        LOG.info("mc alias %s (mc %s): buckets %s", alias, "on this host" if host_mc else "in the container", ", ".join(bucket_names) or "none")
        objects: dict[str, int] = {}
        listed: dict[str, array.array[int]] = {}
        for bucket in bucket_names:
            objects[bucket] = 0
            listed[bucket] = mc_listing(mc, alias, bucket, work)

            def count(record: dict[str, Any], bucket: str = bucket) -> None:
                objects[bucket] += bool(record.get("target"))

            mc(["mirror", "--preserve", "--json", f"{alias}/{bucket}", f"{work}/buckets/{bucket}"], work, f"mc mirror {alias}/{bucket}", count)
        try:
            mc(["admin", "cluster", "bucket", "export", alias, "--json"], f"{work}/metadata", "mc admin cluster bucket export", lambda record: None)
            bucket_export = "ok"
        except BackupError as exc:
            bucket_export = f"not available: {exc}"
            LOG.warning("bucket metadata not exported (%s); objects only", exc)
        if not host_mc:
            copy_staging_out(job, inside, staging)
        inventory = {bucket: check_mirrored(mc, alias, bucket, work, listed[bucket], staging / "buckets" / bucket) for bucket in bucket_names}
        items = [ArchiveItem(f"/{b}", str(staging / "buckets"), f"buckets/{b}", prefix="buckets/", rel=(b,))
                 for b in bucket_names if (staging / "buckets" / b).is_dir()]
        items += [ArchiveItem(f"/{name}", str(staging / "metadata"), f"metadata/{name}", prefix="metadata/", rel=(name,))
                  for name in sorted(os.listdir(staging / "metadata"))]
        if not items:
            raise BackupError(f"mc alias {alias} has no buckets: nothing would be backed up")
        result = write_archive(job, dir_fd, items)
    finally:
        with signals_deferred():
            remove_staging(dir_fd, staging_name)
            if not host_mc:
                remove_in_container(job, inside, noted)
    result.contents["groups"] = result.contents.pop("per_mount")
    result.contents.update({"alias": alias, "mc": "host" if host_mc else "container", "bucket_export": bucket_export, "inventory": inventory})
    result.counts = {"objects": objects}
    return result


McRunner = Callable[[list[str], str, str, Callable[[dict[str, Any]], None]], None]


def mc_runner(container: str, host_mc: str | None, secrets: dict[str, str], timeout: float) -> McRunner:
    """Return mc(args, cwd, what, on_record): mc on this host when there is one, else inside the container, reading --json lines."""
    def mc(args: list[str], cwd: str, what: str, on_record: Callable[[dict[str, Any]], None]) -> None:
        argv = [host_mc, *args] if host_mc else exec_argv(container, ["mc", *args], secrets=secrets, workdir=cwd)
        mc_records(argv, what, timeout, secrets, on_record, cwd=cwd if host_mc else None)
    return mc


def files_under(root: Path) -> Iterator[str]:
    """Yield the path under root of everything in it but directories, a directory listing at a time, never held whole.

    A root or folder that is not there holds nothing (a mirror of a bucket whose objects all
    failed to copy makes no folder for it); any other error is raised.
    """
    folders = [""]
    while folders:
        folder = folders.pop()
        try:
            listing = os.scandir(root / folder if folder else root)
        except FileNotFoundError:
            continue
        with listing:
            for entry in listing:
                name = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_dir(follow_symlinks=False):
                    folders.append(name)
                else:
                    yield name


def mc_listing(mc: McRunner, alias: str, bucket: str, cwd: str) -> array.array[int]:
    """Return the sorted keys (hashed) of every object `mc ls --recursive` lists in the bucket."""
    keys = NameKeys()
    mc(["ls", "--recursive", "--json", f"{alias}/{bucket}"], cwd, f"mc ls --recursive {alias}/{bucket}",
       lambda record: keys.add(_name_key(str(record.get("key", "")))) if record.get("type") == "file" else None)
    return keys.sorted()


def check_mirrored(mc: McRunner, alias: str, bucket: str, cwd: str, listed: array.array[int], mirrored: Path) -> str:
    """Fail if objects mc listed before the mirror, and lists again after it, are not in the mirror; return what was found.

    The mirror's own report cannot show an object it never saw; the listing is the bucket
    read a second way.
    """
    have = sorted_keys(_name_key(name) for name in files_under(mirrored))
    missing = {key for key in listed if not _sorted_has(have, key)}
    if missing:
        again: list[str] = []
        mc(["ls", "--recursive", "--json", f"{alias}/{bucket}"], cwd, f"mc ls --recursive {alias}/{bucket}",
           lambda record: again.append(str(record["key"])) if record.get("type") == "file" and _name_key(str(record.get("key", ""))) in missing else None)
        if again:
            raise BackupError(f"mc mirror left out {len(again)} objects of bucket {bucket} that are there (first: {', '.join(sorted(again)[:3])}); "
                              "not a complete backup")
    return f"mc ls listed {len(listed)} objects; every one that is still there was mirrored"


def restore_mc_mirror(job: Restore) -> int:
    """Class D: mirror every bucket of the backup back with mc, then import the bucket configuration; compare key by key.

    `mc mirror --preserve --overwrite` puts every object of the backup back (their times
    too); objects created after the backup are kept, and listed, unless --remove-extra
    adds --remove. Buckets the backup does not hold are left alone. mc runs on this host
    when it is there (the backup is unpacked into a private staging directory beside it),
    else inside the running container (the backup is copied into its /tmp). Afterwards
    `mc ls --recursive` of every bucket must list every object of the backup with its
    size: the server read a second way, not the mirror's own report.
    """
    doc, lines, settings = job.doc, job.lines, job.settings
    alias_env = str(job.options.get("alias_env") or "MINIO_MC_ALIAS")
    alias = job.env.get(alias_env, "")
    if not alias:
        raise RefusedError(f"no {alias_env} in the environment: the buckets are mirrored back through an mc alias, as they were backed up")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise UsageError(f"{alias_env}={alias!r} is not an mc alias name")
    recorded_alias = (doc.get("contents") or {}).get("alias")
    if recorded_alias and recorded_alias != alias:
        lines.append(f"restoring into alias {alias}; the backup was taken from alias {recorded_alias}")
    host_key = f"MC_HOST_{alias}"
    secrets = {host_key: job.env[host_key]} if job.env.get(host_key) else {}
    host_mc = mc_on_this_host(settings.docker_timeout)
    if host_mc is None and not (job.container.get("State") or {}).get("Running"):
        raise RefusedError(f"container {job.name} is not running and mc is not on this host: the buckets are mirrored back through MinIO's API")
    mc = mc_runner(job.name, host_mc, secrets, settings.stream_timeout)
    staging_name = f".{job.backup.name.split('.', 1)[0]}.restore-staging"  # removed by the next run if this one is killed
    inside = f"/tmp/bba-restore-{os.urandom(4).hex()}"
    dir_fd = os.open(job.backup.parent, _DIR_FLAGS)
    differences = 0
    try:
        if host_mc:
            os.mkdir(staging_name, 0o700, dir_fd=dir_fd)
            work = str(job.backup.parent / staging_name)
            wanted = backup_objects(job.backup, doc["format"], unpack_to=work)
        else:
            work = inside
            run(exec_argv(job.name, ["mkdir", "-m", "0700", inside]), timeout=settings.docker_timeout)
            with stream_into(["docker", "cp", "-", f"{job.name}:{inside}"], timeout=settings.stream_timeout) as stream:
                wanted = backup_objects(job.backup, doc["format"], copy_to=stream.pipe)
        buckets = sorted(set((doc.get("counts") or {}).get("objects") or {}) | set(wanted.objects))
        for bucket in buckets:
            if bucket not in wanted.objects:
                lines.append(f"bucket {bucket}: empty in the backup; its configuration import recreates it")
                continue
            flags = ["--preserve", "--overwrite", *(["--remove"] if job.remove_extra else []), "--json"]
            LOG.warning("mirroring %s back into %s/%s", bucket, alias, bucket)
            mc(["mirror", *flags, f"{work}/buckets/{bucket}", f"{alias}/{bucket}"], work, f"mc mirror into {alias}/{bucket}", lambda record: None)
            lines.append(f"mirrored {len(wanted.objects[bucket])} object(s) back into {alias}/{bucket} (mc mirror {' '.join(flags[:-1])})")
        if not wanted.metadata:
            lines.append(f"no bucket configuration in the backup (its export: {(doc.get('contents') or {}).get('bucket_export', 'unknown')}); "
                         "objects only")
        for name in wanted.metadata:
            try:
                mc(["admin", "cluster", "bucket", "import", alias, f"{work}/{name}", "--json"], work, "mc admin cluster bucket import", lambda record: None)
                lines.append(f"bucket configuration imported from {name}")
            except BackupError as exc:
                differences += 1
                lines.append(f"DIFFERENT: the bucket configuration was not imported ({exc}); the objects are back")
    finally:
        with signals_deferred():
            if host_mc:
                remove_staging(dir_fd, staging_name)
            else:
                run(exec_argv(job.name, ["rm", "-rf", "--", inside]), timeout=settings.docker_timeout, check=False)
            os.close(dir_fd)
    listing: list[dict[str, Any]] = []
    mc(["ls", "--json", alias], "/", f"mc ls {alias}", listing.append)
    others = sorted({r["key"].rstrip("/") for r in listing if r.get("type") == "folder"} - set(buckets))
    if others:
        lines.append(f"left alone, not in the backup: bucket(s) {', '.join(others)}")
    for bucket in buckets:
        differences += compare_bucket(mc, alias, bucket, wanted.objects.get(bucket, {}), job.remove_extra, lines)
    return differences


@dataclasses.dataclass
class BackupObjects:
    """What an mc-mirror backup holds: every object (key and size) per bucket, and its metadata files."""

    objects: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    metadata: list[str] = dataclasses.field(default_factory=list)

    def add(self, entry: TarEntry) -> TarEntry:
        top, _, rest = entry.name.partition("/")
        if top == "buckets" and entry.kind == tarfile.REGTYPE:
            bucket, _, key = rest.partition("/")
            self.objects.setdefault(bucket, {})[key] = entry.size
        elif top == "buckets" and entry.kind == tarfile.DIRTYPE and rest and "/" not in rest.rstrip("/"):
            self.objects.setdefault(rest.rstrip("/"), {})
        elif top == "metadata" and entry.kind == tarfile.REGTYPE:
            self.metadata.append(entry.name)
        return entry


def backup_objects(backup: Path, fmt: str, *, unpack_to: str | None = None, copy_to: IO[bytes] | None = None) -> BackupObjects:
    """Read the objects of an mc-mirror backup from the archive itself, in the pass that puts it where mc runs.

    unpack_to: the archive is unpacked there (plain directories and files only); copy_to:
    its whole tar stream is copied there as it is read (docker cp into the container).
    """
    found = BackupObjects()
    with open(backup, "rb") as fh, decompressing(fh, fmt) as raw:
        source = raw if copy_to is None else typing.cast(IO[bytes], _CopiedAsRead(raw, copy_to))
        entries = ((tar, found.add(entry)) for tar, entry in tar_entries(source))
        if unpack_to is not None:
            extract_plain(entries, unpack_to, str(backup))
        else:
            for _ in entries:  # to the end of the stream: the copy is whole
                pass
    return found


class _CopiedAsRead(io.RawIOBase):
    """A stream that writes every byte read from it to sink as well: reading it and copying it are one pass."""

    def __init__(self, source: IO[bytes], sink: IO[bytes]) -> None:
        self.source, self.sink = source, sink

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.source.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self.sink.write(memoryview(buffer)[:count])
        return int(count or 0)


def compare_bucket(mc: McRunner, alias: str, bucket: str, wanted: dict[str, int], removed_extra: bool, lines: list[str]) -> int:
    """List the bucket again and compare it with the backup's objects; return the number of differences."""
    now: dict[str, int] = {}
    mc(["ls", "--recursive", "--json", f"{alias}/{bucket}"], "/", f"mc ls --recursive {alias}/{bucket}",
       lambda record: now.__setitem__(str(record.get("key", "")), int(record.get("size") or 0)) if record.get("type") == "file" else None)
    missing = sorted(set(wanted) - set(now))
    resized = sorted(key for key in set(wanted) & set(now) if wanted[key] != now[key])
    extra = sorted(set(now) - set(wanted))
    differences = 0
    if missing:
        differences += 1
        lines.append(f"DIFFERENT: bucket {bucket}: {len(missing)} object(s) of the backup are not there (first: {', '.join(missing[:3])})")
    if resized:
        differences += 1
        lines.append(f"DIFFERENT: bucket {bucket}: {len(resized)} object(s) differ in size from the backup (first: {', '.join(resized[:3])})")
    if not missing and not resized:
        lines.append(f"bucket {bucket}: all {len(wanted)} object(s) of the backup listed by mc ls, with their sizes")
    if extra and removed_extra:
        differences += 1
        lines.append(f"DIFFERENT: bucket {bucket}: {len(extra)} object(s) not in the backup are still there (first: {', '.join(extra[:3])})")
    elif extra:
        lines.append(f"bucket {bucket}: {len(extra)} object(s) created after the backup kept (--remove-extra removes them): {', '.join(extra[:3])}"
                     + (" ..." if len(extra) > 3 else ""))
    return differences


def extract_plain(entries: Iterable[tuple[TarReader, TarEntry]], root: str, what: str) -> None:
    """Write the directories and regular files of a tar stream under root, 0700/0600, with their mtimes; refuse anything else."""
    for tar, member in entries:
        target = os.path.normpath(os.path.join(root, member.name))
        if not _inside(target, [root]) or member.kind not in (tarfile.DIRTYPE, tarfile.REGTYPE) or member.sparse is not None:
            raise BackupError(f"{what}: unexpected entry {member.name!r}")
        if member.kind == tarfile.DIRTYPE:
            os.makedirs(target, mode=0o700, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        with open(target, "xb") as out:
            while chunk := tar.read(COPY_CHUNK):
                out.write(chunk)
        os.utime(target, (member.mtime, member.mtime))


def plan_restore_mc_mirror(job: Restore) -> list[str]:
    alias = job.env.get(str(job.options.get("alias_env") or "MINIO_MC_ALIAS")) or "<alias>"
    buckets = ", ".join(sorted((job.doc.get("counts") or {}).get("objects") or {})) or "none"
    return [f"unpack {job.backup.name} where mc runs (this host's staging beside it, or {job.name}:/tmp), removed afterwards",
            f"mc mirror --preserve --overwrite{' --remove' if job.remove_extra else ''} every bucket of the backup ({buckets}) into {alias}/<bucket>",
            f"mc admin cluster bucket import {alias} <the backup's metadata export>",
            "mc ls --recursive every bucket: every object of the backup there with its size"
            + ("; nothing else" if job.remove_extra else "; objects created after the backup kept and listed")]


def mc_on_this_host(timeout: float) -> str | None:
    """Return the MinIO client on this host's PATH, or None (Debian's `mc` is Midnight Commander)."""
    found = shutil.which("mc")
    if found and b"Midnight" not in run([found, "--version"], check=False, timeout=timeout).stdout:
        return found
    return None


def copy_staging_out(job: BackupJob, inside: str, staging: Path) -> None:
    """Copy mc's staging directory out of the container into staging; refuse links and anything outside it."""
    with stream_from(["docker", "cp", f"{job.container}:{inside}/.", "-"], timeout=job.settings.stream_timeout) as pipe:
        extract_plain(_docker_cp_entries(pipe, f"{job.container}:{inside}"), str(staging), "mc staging copy")


def plan_mc_mirror(job: BackupJob) -> Plan:
    alias = job.env.get(job.options["alias_env"])
    if not alias:
        return plan_fallback(job, f"no {job.options['alias_env']} in the environment")
    where = "mc (on this host if it is there, else docker exec -w <dir> " + job.container + " mc)"
    steps = [f"run: {where} ls --json {alias}", f"run: {where} mirror --preserve --json {alias}/<bucket> <staging>/buckets/<bucket>",
             f"run: {where} admin cluster bucket export {alias} --json",
             f"stage in: {job.backup_dir}/.{job.basename}.mc-staging (0700, removed afterwards)"]
    return Plan(steps, f".tar.{job.compression.suffix}", f"{job.compression.format} complete, tar readable, entry count; every mc JSON line")


register(Procedure(
    name="mc-mirror",
    run=procedure_mc_mirror,
    plan=plan_mc_mirror,
    estimate=estimate_mounts,
    verify=verify_archive,
    drill=drill_groups,
    restore=restore_mc_mirror,
    restore_plan=plan_restore_mc_mirror,
    suffixes=("tar.gz", "tar.zst"),
    options={"alias_env": (str, "MINIO_MC_ALIAS")},
))


# --------------------------------------------------------------------------- class F: search engines (Meilisearch, SearXNG)

MEILI_TERMINAL = ("succeeded", "failed", "canceled")


def search_engine_kind(job: BackupJob) -> str:
    """Return "meilisearch", "searxng" or "unknown" from the module id, image and environment."""
    image = str(job.resolution.container.get("Config", {}).get("Image", "")).lower()
    env = container_env(job.resolution.container)
    if "meilisearch" in job.module.id or "meilisearch" in image or "MEILI_MASTER_KEY" in env:
        return "meilisearch"
    if "searxng" in job.module.id or "searxng" in image or "SEARXNG_SECRET" in env:
        return "searxng"
    return "unknown"


def meili_request(job: BackupJob, method: str, route: str, key: str) -> tuple[int, Any]:
    """Call the Meilisearch API from inside its container with curl; return (status, JSON body).

    The master key goes to curl in a config read from stdin (`curl -K -`), so it is in no
    process's argv, on this host or in the container.
    """
    url = job.options["meilisearch_url"].rstrip("/") + route
    config = f'url = "{url}"\nrequest = "{method}"\nsilent\nshow-error\nwrite-out = "\\n%{{http_code}}"\n'
    if key:
        quoted = key.replace("\\", "\\\\").replace('"', '\\"')
        config += f'header = "Authorization: Bearer {quoted}"\n'
    proc = run(exec_argv(job.container, ["curl", "-K", "-"], stdin=True), input=config.encode(), timeout=job.settings.docker_timeout)
    body, _, status = proc.stdout.decode("utf-8", "replace").rpartition("\n")
    if not status.strip().isdigit():
        raise BackupError(f"Meilisearch {method} {route}: no HTTP status in curl's output")
    try:
        return int(status), json.loads(body) if body.strip() else None
    except json.JSONDecodeError:
        raise BackupError(f"Meilisearch {method} {route}: HTTP {status}, body is not JSON") from None


def meilisearch_dump(job: BackupJob, dir_fd: int) -> BackupResult:
    """POST /dumps, wait for the task, copy <dumpUid>.dump out as <module>-<ts>.dump, verified."""
    env = container_env(job.resolution.container)
    key = env.get("MEILI_MASTER_KEY", "")
    before = meili_documents(job, key)
    status, task = meili_request(job, "POST", "/dumps", key)
    if status != 202 or not isinstance(task, dict) or "taskUid" not in task:
        message = task.get("message") if isinstance(task, dict) else task
        raise BackupError(f"Meilisearch refused the dump: HTTP {status}: {message}")
    uid = task["taskUid"]
    LOG.info("Meilisearch dump task %s enqueued", uid)
    started = time.monotonic()
    while True:
        status, task = meili_request(job, "GET", f"/tasks/{uid}", key)
        if status != 200 or not isinstance(task, dict):
            raise BackupError(f"Meilisearch GET /tasks/{uid}: HTTP {status}")
        if task.get("status") in MEILI_TERMINAL:
            break
        if time.monotonic() - started > job.settings.snapshot_timeout:
            raise BackupError(f"Meilisearch dump task {uid} still {task.get('status')} after {job.settings.snapshot_timeout:g}s (snapshot_timeout)")
        time.sleep(0.3)
    if task["status"] != "succeeded":
        error = task.get("error") or {}
        raise BackupError(f"Meilisearch dump task {uid} {task['status']}: {error.get('code', '')} {error.get('message', '')}".strip())
    dump_uid = (task.get("details") or {}).get("dumpUid")
    if not dump_uid or not re.fullmatch(r"[A-Za-z0-9_.-]+", dump_uid):
        raise BackupError(f"Meilisearch dump task {uid} succeeded without a usable dumpUid ({dump_uid!r})")
    workdir = job.resolution.container.get("Config", {}).get("WorkingDir") or "/meili_data"
    dump_dir = env.get("MEILI_DUMP_DIR") or "dumps/"
    path = posixpath.join(workdir, dump_dir, f"{dump_uid}.dump")
    noted = note_in_container(job, path)  # the dump was made for this backup only; leave the engine's disk as it was
    after = meili_documents(job, key)
    warnings: list[str] = []
    try:
        result = copy_out_file(job, dir_fd, path, ".dump", scan_meilisearch_dump,
                               before_commit=lambda verification: warnings.extend(check_dump_documents(verification["documents"], before, after)))
    finally:
        remove_in_container(job, path, noted)
    result.warnings += warnings
    result.counts = {"documents": result.verification["documents"]}
    result.contents.update({"engine": "meilisearch", "task_uid": uid, "dump_uid": dump_uid, "server_documents": before})
    result.timings["dump_seconds"] = round(time.monotonic() - started, 3)
    return result


def scan_meilisearch_dump(fh: IO[bytes]) -> dict[str, Any]:
    """Check a Meilisearch dump: a complete gzip'd tar with its metadata.json."""
    found = read_tar_gz_files(fh, lambda name: name.lstrip("./") == "metadata.json")
    if not found.kept:
        raise BackupError("dump has no metadata.json")
    try:
        metadata = json.loads(next(iter(found.kept.values())))
    except ValueError:
        raise BackupError("dump metadata.json is not JSON") from None
    documents = {m["index"]: found.lines[name] for name in found.lines if (m := MEILI_DOCUMENTS.fullmatch(name.lstrip("./")))}
    return {"gzip_complete": True, "tar_readable": True, "members": len(found.sizes), "dump_version": metadata.get("dumpVersion"),
            "documents": dict(sorted(documents.items()))}


MEILI_DOCUMENTS = re.compile(r"indexes/(?P<index>[^/]+)/documents\.jsonl")


def meili_documents(job: BackupJob, key: str) -> dict[str, int] | None:
    """Return the documents per index Meilisearch reports (GET /stats), or None if it does not answer."""
    status, stats = meili_request(job, "GET", "/stats", key)
    if status != 200 or not isinstance(stats, dict) or not isinstance(stats.get("indexes"), dict):
        return None
    return {uid: int(index.get("numberOfDocuments", 0)) for uid, index in sorted(stats["indexes"].items())}


def check_dump_documents(dumped: dict[str, int], before: dict[str, int] | None, after: dict[str, int] | None) -> list[str]:
    """Compare the documents of a dump with what Meilisearch reported before and after it; return warnings.

    An index whose count did not move while the dump was made must be in the dump whole:
    anything else fails the backup. A count that moved meanwhile is only a warning.
    """
    if before is None or after is None:
        return ["Meilisearch did not answer GET /stats: the dump's documents could not be compared with the server's"]
    warnings = []
    for index in sorted(set(before) | set(after) | set(dumped)):
        was, now, got = before.get(index), after.get(index), dumped.get(index, 0)
        if was is not None and was == now and got != was:
            raise BackupError(f"the dump holds {got} documents of index {index!r}, Meilisearch reports {was}: not a complete backup")
        if was != now:
            warnings.append(f"index {index!r} changed while it was dumped ({was} -> {now} documents); the dump holds {got}")
    return warnings


def searxng_mounts(job: BackupJob) -> tuple[list[MountPlan], list[tuple[str, str]]]:
    """Return SearXNG's configuration mounts (settings.yml, limiter.toml) and the others, skipped with the reason."""
    config, skipped = [], []
    for mount in job.mounts:
        holds_config = mount.via == "host" and any(os.path.exists(os.path.join(mount.source, f)) for f in ("settings.yml", "limiter.toml"))
        if mount.destination.rstrip("/") == "/etc/searxng" or holds_config:
            config.append(mount)
        else:
            skipped.append((mount.destination, "not SearXNG configuration (cache or runtime data)"))
    return config, skipped


def searxng_config(job: BackupJob, dir_fd: int) -> BackupResult:
    """SearXNG: its state is its configuration (settings.yml, limiter.toml); caches are skipped."""
    config, skipped = searxng_mounts(job)
    if not config:
        raise BackupError(f"container {job.container} has no SearXNG configuration mount (/etc/searxng with settings.yml)")
    LOG.info("SearXNG: backing up its configuration only (%s); skipped: %s", ", ".join(m.destination for m in config),
             ", ".join(d for d, _ in skipped) or "nothing")
    job.mounts, job.skipped = config, job.skipped + skipped
    result = procedure_mounted_archive(job, dir_fd)
    result.contents["engine"] = "searxng"
    return result


def procedure_search_engine(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class F: Meilisearch's dump API when enabled (else its mounted data), SearXNG's configuration."""
    kind = search_engine_kind(job)
    if kind == "searxng":
        return searxng_config(job, dir_fd)
    if kind == "meilisearch" and job.options["meilisearch_dump"]:
        require_running(job, "the dump API")
        return meilisearch_dump(job, dir_fd)
    if kind == "meilisearch":
        LOG.warning("Meilisearch dump API not enabled (classes.%s.options.meilisearch_dump); taking the mounted data archive, "
                    "as the origin table says until a dump is proven", job.cls.letter)
    else:
        LOG.warning("container %s is neither Meilisearch nor SearXNG; taking the mounted data archive", job.container)
    result = procedure_mounted_archive(job, dir_fd)
    result.contents["engine"] = kind
    return result


def plan_search_engine(job: BackupJob) -> Plan:
    kind = search_engine_kind(job)
    if kind == "meilisearch" and job.options["meilisearch_dump"]:
        name, url = job.container, job.options["meilisearch_url"]
        steps = [f"run: docker exec -i {name} curl -K - (POST {url}/dumps; key on stdin)", f"run: ... GET {url}/tasks/<uid> until succeeded",
                 f"run: docker cp {name}:<workdir>/dumps/<dumpUid>.dump - > <backup>.partial", f"run: docker exec {name} rm -rf <that dump>"]
        return Plan(steps, ".dump", "gzip'd tar with metadata.json")
    if kind == "searxng":
        config, skipped = searxng_mounts(job)
        steps = [f"read: {m.source} -> {m.destination} (SearXNG configuration)" for m in config]
        steps += [f"skip: {d} ({reason})" for d, reason in skipped]
        return Plan(steps, f".tar.{job.compression.suffix}", f"{job.compression.format} complete, tar readable, entry count")
    plan = plan_mounted_archive(job)
    return dataclasses.replace(plan, steps=[f"archive ({kind}): the mounted data", *plan.steps])


def verify_search_engine(fh: IO[bytes], doc: dict[str, Any]) -> list[Check]:
    if doc.get("format") != "dump":
        return verify_archive(fh, doc)
    found = scan_meilisearch_dump(fh)
    recorded = doc.get("verification", {}).get("members")
    return [("structure", found["members"] == recorded, f"complete gzip, tar readable, metadata.json, {found['members']} members (manifest {recorded})")]


def drill_search_engine(drill: Drill) -> int:
    if drill.doc.get("format") != "dump":
        return drill_mounted_archive(drill)
    return drill_listing(drill, "Meilisearch is not started for a drill: structure and contents listing only; "
                                "restore by starting Meilisearch with --import-dump")


def meilisearch_by_hand(job: Restore) -> list[str] | None:
    """A Meilisearch dump is loaded only by a server started on an empty database with --import-dump: the exact steps.

    None for an archive (SearXNG's configuration, Meilisearch's mounted data), which
    --restore puts back as class E.
    """
    if job.doc.get("format") != "dump":
        return None
    name = job.name
    config = job.container.get("Config") or {}
    image = config.get("Image") or "<its image>"
    workdir = config.get("WorkingDir") or "/meili_data"
    env = container_env(job.container)
    db = posixpath.join(workdir, env.get("MEILI_DB_PATH") or "data.ms")
    dump = posixpath.join(workdir, env.get("MEILI_DUMP_DIR") or "dumps/", f"restore-{job.backup.stem}.dump")
    key = " -e MEILI_MASTER_KEY" if "MEILI_MASTER_KEY" in env else ""
    counts = ", ".join(f"{index} {n}" for index, n in ((job.doc.get("counts") or {}).get("documents") or {}).items()) or "none recorded"
    return [
        "a Meilisearch dump is imported only by a server started on an empty database with --import-dump (Meilisearch docs, "
        "\"Import a dump\"), which this tool does not do to a live module",
        f"1. docker stop {name}",
        f"2. keep the current database aside: docker run --rm --volumes-from {name} --entrypoint mv {image} {db} {db}.before-restore",
        f"3. copy the dump in: docker cp {job.backup} {name}:{dump}",
        f"4. import it once, in the foreground, with the same key: MEILI_MASTER_KEY=<its key> docker run --rm -it --volumes-from {name}{key} "
        f"{image} meilisearch --db-path {db} --import-dump {dump}",
        "   wait until it logs that the server listens (the import is done), then stop it with Ctrl-C",
        f"5. docker start {name}; GET /stats must show the documents per index of \"counts\" in {job.backup.stem}{MANIFEST_SUFFIX}: {counts}",
        f"6. once the service is checked: docker exec {name} rm -rf {db}.before-restore {dump}",
        f"(to go back instead: docker stop {name}, move {db}.before-restore back to {db}, docker start {name})",
    ]


register(Procedure(
    name="search-engine",
    run=procedure_search_engine,
    plan=plan_search_engine,
    estimate=estimate_mounts,
    verify=verify_search_engine,
    drill=drill_search_engine,
    restore=restore_mounted_archive,
    restore_plan=plan_restore_mounted_archive,
    restores_mounts=True,
    by_hand=meilisearch_by_hand,
    suffixes=("dump", "tar.gz", "tar.zst"),
    options={"meilisearch_dump": (bool, False), "meilisearch_url": (str, "http://127.0.0.1:7700")},
))


# --------------------------------------------------------------------------- class G: a module with its own compose root (Agaria)

AGARIA_FOLLOW_UP = "Agaria-specific follow-up required"
COMPOSE_DUMP_SUFFIX = ".pgdump.sql"


def compose_labels(container: dict[str, Any]) -> dict[str, str]:
    return dict(container.get("Config", {}).get("Labels") or {})


def compose_secondary(job: BackupJob) -> str | None:
    """Return what else the module is (pg-dumpall for agaria-postgres, redis-bgsave for agaria-redis), or None."""
    if job.config is None:
        return None
    also = classify(job.module.id, job.config, exclude=job.cls.letter)[0].procedure
    return also if also in ("pg-dumpall", "redis-bgsave") else None


def compose_root(job: BackupJob) -> tuple[str, str]:
    """Return (the compose root, why it cannot be read here or "")."""
    root = job.options["compose_root"] or compose_labels(job.resolution.container).get("com.docker.compose.project.working_dir", "")
    if not root:
        return "", f"no compose root: no com.docker.compose.project.working_dir label and no classes.{job.cls.letter}.options.compose_root"
    if not job.engine.local or job.engine.rootless:
        return root, f"compose root {root} is on the engine's host ({job.engine.endpoint}), not readable from here"
    if not os.path.isdir(root):
        return root, f"compose root {root} does not exist on this host"
    return root, ""


def procedure_compose_root_archive(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class G: the compose root and the mounted data of every container of its compose project.

    One archive: compose-root/<path>, containers/<name>/<mount>/..., and for a module that
    is also PostgreSQL (agaria-postgres) dumps/pg_dumpall.sql.gz; for one that is also
    Redis (agaria-redis) a BGSAVE first. The origin's procedure is the archive: the dump and
    the BGSAVE are best effort, and when that server does not answer the archive is taken
    anyway, with a loud warning naming what is missing (recorded in the manifest). Falls
    back to the module's mounted data when the compose root cannot be read from here.
    """
    LOG.warning("%s (origin table, class %s)", AGARIA_FOLLOW_UP, job.cls.letter)
    labels = compose_labels(job.resolution.container)
    root, reason = compose_root(job)
    project = labels.get("com.docker.compose.project")
    if reason:
        result = fall_back(job, dir_fd, reason)
        result.warnings.append(AGARIA_FOLLOW_UP)
        return result

    members = [c for c in job.containers if project and compose_labels(c).get("com.docker.compose.project") == project]
    if not any(c.get("Id") == job.resolution.container.get("Id") for c in members):
        members.append(job.resolution.container)
    items = [ArchiveItem(root, root, "compose-root/" + root.strip("/"), prefix="compose-root/")]
    for config_file in labels.get("com.docker.compose.project.config_files", "").split(","):
        if config_file and not _inside(config_file, [root]) and os.path.isfile(config_file):
            items.append(ArchiveItem(config_file, os.path.dirname(config_file), "compose-root/" + config_file.strip("/"),
                                     prefix="compose-root/", rel=(os.path.basename(config_file),)))
    names = []
    for container in sorted(members, key=container_name):
        name = container_name(container)
        names.append(name)
        pid = int((container.get("State") or {}).get("Pid") or 0) if (container.get("State") or {}).get("Running") else 0
        for mount in plan_mounts(container, read_on_host=True)[0]:
            items.append(mount_item(mount, pid=pid, prefix=f"containers/{name}/", container=name))
    LOG.info("compose project %s: root %s, containers %s", project or "(none)", root, ", ".join(names))

    secondary = compose_secondary(job)
    details: dict[str, Any] = {"compose_root": root, "compose_project": project, "containers": names, "follow_up": AGARIA_FOLLOW_UP,
                               "also": secondary, "missing": []}
    server: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    warnings: list[str] = []
    rdb_member: str | None = None
    with contextlib.ExitStack() as stack:
        try:
            if secondary == "pg-dumpall":
                require_running(job, "pg_dumpall")
                target = pg_target(job.resolution.container)
                found = pg_server(target, job.settings.docker_timeout)
                expected, _ = dumpable_databases(found)
                inner = f"pg_dumpall.sql.{job.compression.suffix}"
                dump = stack.enter_context(PartialFile(dir_fd, f"{job.basename}{COMPOSE_DUMP_SUFFIX}.{job.compression.suffix}", job.backup_dir))
                verified = dump_cluster(job, target, dump)
                details["sql_bytes"], counts = verified["sql_bytes"], verified["counts"]
                warnings += check_databases(expected, counts)
                server = {"engine": "postgresql", "version": found["version"], "user": target.user}
                dump.close()
                items.append(ArchiveItem("/" + inner, str(job.backup_dir), "dumps/" + inner, prefix="dumps/", rel=(dump.partial,)))
            elif secondary == "redis-bgsave":
                require_running(job, "BGSAVE")
                target_redis = redis_target(job.resolution.container, job.settings, job.env)
                details["bgsave"] = redis_bgsave(target_redis, job.settings.snapshot_timeout, job.settings.docker_timeout)
                config = redis_config(target_redis, job.settings.docker_timeout)
                rdb_member = f"containers/{job.container}/" + posixpath.join(config["dir"], config["dbfilename"]).lstrip("/")
        except BackupError as exc:
            what = "the pg_dumpall of the cluster" if secondary == "pg-dumpall" else "a fresh BGSAVE (the RDB archived is the last one on disk)"
            missing = f"{what} of {job.container} is MISSING from this archive: {exc}"
            LOG.warning("%s", missing)
            details["missing"].append(missing)
            warnings.append(missing)
            counts = None
            rdb_member = None

        def count_rdb(verification: dict[str, Any]) -> None:
            # agaria-redis: the keys of the RDB its BGSAVE wrote, as archived, like class B.
            nonlocal counts
            info = verification.pop("rdb", {}).get(rdb_member or "")
            if rdb_member is None:
                return
            try:
                if info is None:
                    raise BackupError(f"the archive holds no {rdb_member}")
                found, notes = _rdb_of_record({"rdb": {rdb_member: info}}, "/" + rdb_member, details["bgsave"]["not_before"])
                counts = rdb_counts(found) if "error" not in found else None
                warnings.extend(notes)
            except BackupError as exc:
                missing = f"the keys of {job.container}'s RDB could not be counted from the archive: {exc}"
                LOG.warning("%s", missing)
                details["missing"].append(missing)
                warnings.append(missing)

        fmt = "tar." + job.compression.suffix
        scan = (lambda fh, groups: scan_tar(fh, fmt, rdb=lambda name: name == rdb_member, groups=groups)) if rdb_member else None
        result = write_archive(job, dir_fd, items, scan=scan, before_commit=count_rdb)
    result.contents.update(details)
    result.contents["groups"] = result.contents.pop("per_mount")
    result.server, result.counts = server, counts
    result.warnings += [*warnings, AGARIA_FOLLOW_UP]
    return result


def plan_compose_root(job: BackupJob) -> Plan:
    root, reason = compose_root(job)
    if reason:
        return plan_fallback(job, reason)
    labels = compose_labels(job.resolution.container)
    steps = [f"read: compose root {root} -> compose-root/",
             f"read: the mounts of every container of compose project {labels.get('com.docker.compose.project', '<none>')} -> containers/<name>/"]
    secondary = compose_secondary(job)
    if secondary:
        extra = f"dumps/pg_dumpall.sql.{job.compression.suffix}" if secondary == "pg-dumpall" else "BGSAVE first"
        steps.append(f"also take, best effort: {secondary} of {job.container} ({extra}; missing is recorded, not fatal)")
    return Plan(steps, f".tar.{job.compression.suffix}", f"{job.compression.format} complete, tar readable, entry count")


def compose_root_by_hand(job: Restore) -> list[str]:
    """Class G is never restored by this tool (the origin design defers it): the Agaria follow-up steps, filled in."""
    contents = job.doc.get("contents") or {}
    where = (f"compose root {contents['compose_root']}, containers {', '.join(contents.get('containers') or []) or 'none'}"
             if contents.get("compose_root") else "the module's mounted data (fallback: the compose root could not be read)")
    return [f"{AGARIA_FOLLOW_UP}: the origin design defers class G restores to Agaria's own steps",
            f"the archive holds {where}", *str(job.doc.get("restore", "")).strip().splitlines()]


register(Procedure(
    name="compose-root-archive",
    run=procedure_compose_root_archive,
    plan=plan_compose_root,
    estimate=estimate_mounts,
    verify=verify_archive,
    drill=drill_groups,
    by_hand=compose_root_by_hand,
    suffixes=("tar.gz", "tar.zst"),
    options={"compose_root": (str, "")},
))


# --------------------------------------------------------------------------- manifest and --verify

MANIFEST_SUFFIX = ".manifest.json"
DECOMPRESS = {"gzip": "gunzip -c", "zstd": "zstd -dc"}


def restore_notes(cls: BackupClass, values: dict[str, str]) -> str:
    """Return the class's restore notes with {backup}, {decompress}, {module}, ... filled in."""
    text = cls.restore
    for key in RESTORE_PLACEHOLDERS:
        text = text.replace("{" + key + "}", values.get(key, "{" + key + "}"))
    return text


def build_manifest(job: BackupJob, result: BackupResult, started: datetime.datetime, finished: datetime.datetime, manifest_path: Path) -> dict[str, Any]:
    """Return the manifest document of a finished backup (no secrets, ever)."""
    container = job.resolution.container
    values = {
        "backup": str(result.path),
        "manifest": str(manifest_path),
        "module": job.module.id,
        "container": job.container,
        "image": str(container.get("Config", {}).get("Image", "")),
        "decompress": DECOMPRESS[compression_of(result.format)],
    }
    per_mount = result.contents.get("per_mount", {})
    return {
        "tool": PROG,
        "tool_version": __version__,
        "module": job.module.id,
        "lifecycle": job.module.lifecycle,
        "class": job.cls.letter,
        "class_title": job.cls.title,
        "procedure": job.procedure,
        "configured_procedure": job.cls.procedure,
        "fallback_used": result.fallback,
        "container": {
            "name": job.container,
            "id": container.get("Id"),
            "resolved_by": job.resolution.rule,
            "state": job.resolution.state,
            "image": values["image"],
            "image_id": container.get("Image"),
            "user": container.get("Config", {}).get("User") or "",
        },
        "engine": {"version": job.engine.version, "endpoint": job.engine.endpoint, "rootless": job.engine.rootless},
        "server": result.server,
        "mounts": [
            {"destination": m.destination, "type": m.type, "source": m.source, "name": m.name, "read_via": m.via, **per_mount.get(m.destination, {})}
            for m in job.mounts
        ],
        "archived_paths": result.archived,
        "skipped_mounts": [{"destination": d, "reason": r} for d, r in job.skipped],
        "taken_before_restore": {"restoring": job.before_restore} if job.before_restore else None,
        "health": job.health,
        "paused": job.pause,
        "paused_seconds": result.paused_seconds,
        "pause_mode": result.pause_mode,
        "timings": {**result.timings, "duration_seconds": round((finished - started).total_seconds(), 3)},
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "backup_file": result.path.name,
        "format": result.format,
        "bytes": result.size,
        "sha256": result.sha256,
        "compression": dataclasses.asdict(job.compression) if result.format.startswith(("tar.", "sql.")) else None,
        "verification": result.verification,
        "contents": {k: v for k, v in result.contents.items() if k != "per_mount"},
        "counts": result.counts,
        "warnings": result.warnings,
        "restore": restore_notes(job.cls, values),
    }


def write_manifest(dir_fd: int, dir_path: Path, name: str, doc: dict[str, Any]) -> Path:
    """Write doc as <name> atomically, 0600, never replacing an existing file."""
    with PartialFile(dir_fd, name, dir_path) as out:
        out.write((json.dumps(doc, indent=2) + "\n").encode())
        return out.commit()


def backup_pair(path: Path) -> tuple[Path, Path]:
    """Return (backup, manifest) for a path naming either. Raise UsageError if it is neither."""
    name = path.name
    if name.endswith(MANIFEST_SUFFIX):
        return path, path  # the backup is named inside the manifest
    suffixes = backup_suffixes()
    for suffix in suffixes:
        if name.endswith(suffix):
            return path, path.with_name(name[: -len(suffix)] + MANIFEST_SUFFIX)
    raise UsageError(f"{path}: not a backup of this tool (expected *{', *'.join(suffixes)} or *{MANIFEST_SUFFIX})")


def load_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """Return (backup file, manifest) for a backup or manifest path. Raise UsageError if unreadable."""
    backup, manifest_path = backup_pair(path)
    try:
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{manifest_path}: manifest not found beside the backup") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{manifest_path}: not a readable manifest ({exc})") from None
    if not isinstance(doc, dict) or doc.get("tool") != PROG or not isinstance(doc.get("backup_file"), str):
        raise UsageError(f"{manifest_path}: not a manifest of {PROG}")
    if backup == manifest_path:
        backup = manifest_path.with_name(doc["backup_file"])
    elif doc["backup_file"] != backup.name:
        raise UsageError(f"{manifest_path}: describes {doc['backup_file']}, not {backup.name}")
    return backup, doc


def verify_backup(path: Path) -> list[Check]:
    """Return (check, passed, detail) for every check of a backup against its manifest.

    Size, privacy and sha256 for every backup; then the structural checks of the procedure
    that reads it (procedure_for), which re-read the file itself.
    """
    backup, doc = load_manifest(path)
    procedure = procedure_for(doc, backup)
    checks: list[Check] = []
    try:
        st = backup.stat()
    except FileNotFoundError:
        return [("file", False, f"{backup} does not exist")]
    checks.append(("size", st.st_size == doc.get("bytes"), f"{st.st_size} bytes, manifest says {doc.get('bytes')}"))
    mode = stat.S_IMODE(st.st_mode)
    checks.append(("private", mode & 0o077 == 0, f"mode {mode:04o}"))
    digest = hashlib.sha256()
    with open(backup, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
    checks.append(("sha256", digest.hexdigest() == doc.get("sha256"), f"{digest.hexdigest()[:16]}..., manifest {str(doc.get('sha256'))[:16]}..."))
    try:
        with open(backup, "rb") as fh:
            checks += procedure.verify(fh, doc)
    except BackupError as exc:
        checks.append(("structure", False, str(exc)))
    return checks


# --------------------------------------------------------------------------- --coverage


COVERAGE_ORDER = ("uncovered", "declared-stateless", "undeclared", "unused-volume", "covered", "stateless-empty")
COVERAGE_TITLES = {
    "uncovered": "UNCOVERED: no module backs these up",
    "declared-stateless": "DECLARED STATELESS, BUT HOLDING DATA: the module says stateless, nothing backs them up",
    "undeclared": "UNDECLARED: the module does not say whether it is stateful (--list), so nothing requires a backup",
    "unused-volume": "UNUSED VOLUMES: no container mounts them",
    "covered": "covered: a stateful module backs these up",
    "stateless-empty": "stateless and empty: nothing to back up",
}


@dataclasses.dataclass
class CoverageRow:
    """One writable mount of a container (or one volume no container uses) and who backs it up."""

    status: str
    module: str | None
    container: str | None
    destination: str | None
    volume: str | None
    source: str | None
    bytes: int | None
    procedure: str | None = None  # covered: how the module's class backs it up (which decides what of the mount it takes)


def cmd_coverage(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str]) -> int:
    """Every writable mount of every container, and every unused volume, with the module that backs it up, or none.

    Modules are resolved once for all containers, exactly as a backup resolves them, from
    the same two docker calls as --list; volumes take two more (`volume ls`, one batched
    `volume inspect`). A mount counts as a class E backup counts it (named volumes and
    read-write directory binds). Sizes (du) only where the data is on this host.
    """
    modules, errors = discover_modules(Path(settings.platform_root))
    timeout = settings.docker_timeout
    containers, engine = containers_and_engine(timeout)
    read_on_host = engine.local and not engine.rootless
    owner: dict[str, Module] = {}
    for module in modules:
        with contextlib.suppress(AmbiguousContainer, ContainerNotFound):
            container_id = str(resolve_container(module, containers).container.get("Id"))
            if container_id not in owner or owner[container_id].statefulness != "stateful":
                owner[container_id] = module
    rows: list[CoverageRow] = []
    used: set[str] = set()
    for container in sorted(containers, key=container_name):
        used.update(str(m.get("Name")) for m in container.get("Mounts") or [] if m.get("Type") == "volume")
        found = owner.get(str(container.get("Id")))
        for mount in plan_mounts(container, read_on_host=read_on_host)[0]:
            size, holds = _mount_contents(mount.source) if mount.via == "host" else (None, None)
            if found is None:
                status = "uncovered"
            elif found.statefulness == "stateful":
                status = "covered"
            elif found.statefulness == UNDECLARED:
                status = "undeclared"
            else:
                status = "stateless-empty" if holds is False else "declared-stateless"
            rows.append(CoverageRow(status, found.id if found else None, container_name(container), mount.destination,
                                    mount.name if mount.type == "volume" else None, mount.source, size,
                                    classify(found.id, config)[0].procedure if status == "covered" and found else None))
    names = docker(["volume", "ls", "--quiet"], timeout=timeout).stdout.decode("utf-8", "replace").split()
    unused = sorted(set(names) - used)
    if unused:
        volumes = parse_json(docker(["volume", "inspect", *unused], timeout=timeout).stdout, "docker volume inspect")
        for volume in volumes:
            mountpoint = str(volume.get("Mountpoint") or "")
            size = _mount_contents(mountpoint)[0] if read_on_host and mountpoint else None
            rows.append(CoverageRow("unused-volume", None, None, None, str(volume.get("Name")), mountpoint or None, size))
    rows.sort(key=lambda r: (COVERAGE_ORDER.index(r.status), r.container or "", r.destination or "", r.volume or ""))
    if args.json:
        out.write(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    else:
        out.write(format_coverage(rows, known_sizes=read_on_host))
    for error in errors:
        LOG.error("%s", error)
    if errors:
        raise UsageError(f"{len(errors)} module.yaml file(s) could not be read (listed above); their containers show as uncovered")
    return EXIT_OK


def _mount_contents(path: str) -> tuple[int | None, bool | None]:
    """Return (bytes on disk, whether it holds any entry) of a directory on this host; None for what cannot be read."""
    try:
        with os.scandir(path) as listing:
            holds = next(listing, None) is not None
    except OSError:
        return None, None
    return (tree_size(path) if holds else 0), holds


def format_coverage(rows: list[CoverageRow], *, known_sizes: bool) -> str:
    lines: list[str] = []
    for status in COVERAGE_ORDER:
        group = [r for r in rows if r.status == status]
        if not group:
            continue
        total = sum(r.bytes or 0 for r in group)
        lines += ["", f"{COVERAGE_TITLES[status]} ({len(group)}, {human_size(total) if known_sizes else 'sizes unknown: remote engine'})"]
        for row in group:
            where = f"{row.container}:{row.destination}" if row.container else "-"
            what = f"volume {row.volume}" if row.volume else f"bind {row.source}"
            size = human_size(row.bytes) if row.bytes is not None else "?"
            by = f" ({row.procedure})" if row.procedure else ""
            lines.append(f"  {where:<50} {what:<45.45} {size:>10}  {row.module or '(no module)'}{by}")
    counts = Counter(r.status for r in rows)
    lines += ["", ", ".join(f"{counts[s]} {s}" for s in COVERAGE_ORDER if counts[s]) or "no writable mounts and no volumes"]
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- --check and --prune: the backups already there


@dataclasses.dataclass
class BackupOnDisk:
    """One backup of a module in the backup directory, known by its manifest's name (newest first when sorted)."""

    module: str
    timestamp: str
    manifest: Path
    backup: Path | None = None  # the file the manifest names; None if the manifest cannot be read
    doc: dict[str, Any] | None = None
    problem: str = ""  # why the manifest is unusable, or the backup it names is missing

    @property
    def finished(self) -> datetime.datetime:
        with contextlib.suppress(TypeError, ValueError):
            return datetime.datetime.fromisoformat(str((self.doc or {})["finished_at"]))
        return datetime.datetime.strptime(self.timestamp, TIMESTAMP_FORMAT).replace(tzinfo=datetime.UTC)


def backup_directory(settings: Settings) -> Path:
    return Path(settings.backup_dir or Path(settings.platform_root) / "backups").absolute()


_BACKUP_NAME = re.compile(r"(?P<module>[a-z0-9][a-z0-9._-]*)-(?P<ts>[0-9]{8}T[0-9]{6}Z)(?P<suffix>\.[a-z.]+)")


def backups_on_disk(backup_dir: Path, module_id: str | None = None) -> tuple[list[BackupOnDisk], list[Path]]:
    """Return every backup (by its manifest) of module_id, or of every module, newest first; and backup files with no manifest.

    A manifest that cannot be read, or whose backup file is gone, is returned with its problem.
    """
    try:
        names = sorted(os.listdir(backup_dir))
    except FileNotFoundError:
        return [], []
    found: list[BackupOnDisk] = []
    named: set[str] = set()
    files: list[tuple[str, str, str]] = []
    for name in names:
        match = _BACKUP_NAME.fullmatch(name)
        if match is None or (module_id is not None and match["module"] != module_id):
            continue
        if match["suffix"] != MANIFEST_SUFFIX:
            files.append((name, match["module"], match["ts"]))
            continue
        item = BackupOnDisk(match["module"], match["ts"], backup_dir / name)
        try:
            item.backup, item.doc = load_manifest(item.manifest)
        except UsageError as exc:
            item.problem = str(exc)
        else:
            named.add(item.backup.name)
            if item.backup.parent != backup_dir or not item.backup.is_file():
                item.problem = f"its backup {item.backup.name} is missing"
        found.append(item)
    found.sort(key=lambda b: (b.timestamp, b.manifest.name), reverse=True)
    unnamed = [backup_dir / name for name, _, _ in files if name not in named and not name.endswith(".partial")]
    return found, unnamed


def newest_passing(backups: list[BackupOnDisk]) -> tuple[BackupOnDisk | None, list[str]]:
    """Return the newest backup that passes every --verify check, and why each newer one did not."""
    failures: list[str] = []
    for item in backups:
        if item.problem:
            failures.append(f"{item.manifest.name}: {item.problem}")
            continue
        failed = [f"{name}: {detail}" for name, passed, detail in verify_backup(item.manifest) if not passed]
        if not failed:
            return item, failures
        failures.append(f"{item.manifest.name}: fails --verify ({'; '.join(failed)})")
    return None, failures


def cmd_check(args: argparse.Namespace, settings: Settings, out: IO[str]) -> int:
    """The apply pipeline's gate: exit 0 only if the module's newest backup is fresh and passes every --verify check.

    Read-only (it takes no backup, ever, and may run under CI). The newest backup is the one
    that counts: an older good one does not make a broken newest one acceptable. Safety
    backups taken by --restore do not count.
    """
    module_id = args.check
    load_module(Path(settings.platform_root), module_id)  # an unknown module is bad input, not "no backup"
    max_age = parse_duration(args.max_age or "1h", "--max-age")
    backup_dir = backup_directory(settings)
    # A safety backup taken by --restore holds the state a rollback replaced: not one to roll back to after the next apply.
    backups = [b for b in backups_on_disk(backup_dir, module_id)[0] if not (b.doc or {}).get("taken_before_restore")]
    result: dict[str, Any] = {"module": module_id, "backup_dir": str(backup_dir), "max_age_seconds": max_age, "passed": False,
                              "backup": None, "age_seconds": None, "checks": []}
    why = ""
    if not backups:
        why = f"no backup of {module_id} in {backup_dir}"
    else:
        newest = backups[0]
        result["backup"] = str(newest.backup or newest.manifest)
        age = (datetime.datetime.now(datetime.UTC) - newest.finished).total_seconds()
        result["age_seconds"] = round(age)
        if newest.problem:
            why = f"the newest backup of {module_id} is unusable: {newest.manifest.name}: {newest.problem}"
        elif age > max_age:
            why = f"the newest backup of {module_id}, {newest.backup}, finished {format_age(age)} ago, more than --max-age {args.max_age or '1h'}"
        else:
            checks = verify_backup(newest.manifest)
            result["checks"] = [{"check": c, "passed": p, "detail": d} for c, p, d in checks]
            failed = [f"{c}: {d}" for c, p, d in checks if not p]
            if failed:
                why = f"the newest backup of {module_id}, {newest.backup}, fails --verify ({'; '.join(failed)})"
            else:
                result["passed"] = True
    if args.json:
        out.write(json.dumps({**result, "reason": why or None}, indent=2) + "\n")
    if why:
        raise BackupError(why)
    if not args.json:
        out.write(f"ok  {module_id}: {result['backup']} finished {format_age(result['age_seconds'])} ago "
                  f"(--max-age {args.max_age or '1h'}) and passes every --verify check\n")
    return EXIT_OK


@dataclasses.dataclass
class PruneItem:
    path: Path
    module: str
    reason: str
    is_tree: bool = False


def prune_plan(backup_dir: Path, module_id: str, keep: int, older_than: int, now: datetime.datetime) -> tuple[list[PruneItem], str]:
    """Return what retention removes of one module (each backup with its manifest), and which backup is protected.

    Removed: backups beyond the newest `keep` that finished more than older_than seconds ago,
    manifests whose backup is gone or that cannot be read, backup files without a manifest,
    and .partial files and staging left by killed runs. Never the newest backup that
    passes --verify, whatever the options.
    """
    backups, unnamed = backups_on_disk(backup_dir, module_id)
    protected, failures = newest_passing(backups)
    items: list[PruneItem] = []
    for rank, item in enumerate(backups):
        if item is protected:
            continue
        if item.problem:
            items.append(PruneItem(item.manifest, module_id, f"orphaned manifest: {item.problem}"))
            continue
        age = (now - item.finished).total_seconds()
        if rank >= keep and age > older_than:
            assert item.backup is not None
            reason = f"beyond the newest {keep}, finished {format_age(age)} ago"
            items += [PruneItem(item.backup, module_id, reason), PruneItem(item.manifest, module_id, reason)]
    items += [PruneItem(path, module_id, "backup file without a manifest (an unfinished run)") for path in unnamed]
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(backup_dir)):
            left = _left_by_a_run(name, module_id)
            if left:
                items.append(PruneItem(backup_dir / name, module_id, f"{left} left by a killed run", is_tree=left == "staging"))
    kept = f"{protected.backup} (newest passing --verify)" if protected else "none: no backup passes --verify" + (f" ({failures[0]})" if failures else "")
    return items, kept


def cmd_prune(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str]) -> int:
    """List (and with --delete remove) what retention removes, module by module, each under its lock."""
    backup_dir = backup_directory(settings)
    if not os.path.isdir(backup_dir):
        raise UsageError(f"backup directory {backup_dir} does not exist")
    modules = args.modules or sorted({m["module"] for name in os.listdir(backup_dir) for pattern in (_BACKUP_NAME, _STAGING_NAME)
                                      if (m := pattern.fullmatch(name))})
    now = datetime.datetime.now(datetime.UTC)
    dir_fd = ensure_backup_dir(backup_dir, create=True) if args.delete else None
    report: list[dict[str, Any]] = []
    try:
        for module_id in modules:
            cls = classify(module_id, config)[0]
            # settings hold classes.toml's [settings] with --keep/--older-than over them: a class's own values sit between
            keep = settings.keep if args.keep is not None or cls.keep is None else cls.keep
            older_than_text = settings.older_than if args.older_than is not None or cls.older_than is None else cls.older_than
            older_than = parse_duration(older_than_text, "older_than")
            lock = module_lock(dir_fd, module_id, settings.lock_timeout) if dir_fd is not None else contextlib.nullcontext()
            with lock:
                items, kept = prune_plan(backup_dir, module_id, keep, older_than, now)
                LOG.info("%s: keep %d, older than %s; kept: %s; %d to remove", module_id, keep, older_than_text, kept, len(items))
                for item in items:
                    if dir_fd is not None:
                        with signals_deferred():
                            if item.is_tree:
                                remove_entry(dir_fd, item.path.name)
                            else:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(item.path.name, dir_fd=dir_fd)
                    report.append({"path": str(item.path), "module": module_id, "reason": item.reason, "removed": dir_fd is not None})
                    if not args.json:
                        out.write(f"{item.path}\n")
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    LOG.info("%d path(s) %s%s", len(report), "removed" if args.delete else "would be removed",
             "" if args.delete or not report else " (nothing was removed: add --delete)")
    return EXIT_OK


# --------------------------------------------------------------------------- --drill


def drill_backup(path: Path, settings: Settings, env: dict[str, str], out: IO[str]) -> int:
    """Restore a backup the way its procedure says and compare it with its manifest.

    Return EXIT_OK if everything matches. Raise BackupError if the restore fails or
    anything differs; throwaway containers and volumes are always removed.
    """
    backup, doc = load_manifest(path)
    for check, passed, detail in verify_backup(backup):
        if not passed:
            raise BackupError(f"drill refused: {backup.name} fails --verify ({check}: {detail})")
    procedure = procedure_for(doc, backup)
    drill = Drill(backup, doc, settings, env, [f"drill of {backup.name} (class {doc.get('class')}, {doc.get('procedure')})"])
    try:
        differences = procedure.drill(drill)
    finally:
        out.write("\n".join(drill.lines) + "\n")
    if differences:
        raise BackupError(f"drill failed: {differences} difference(s) between the restored data and the manifest")
    out.write(drill.passed + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------- guards


def running_under_ci(env: dict[str, str]) -> str | None:
    """Return the name of the CI variable that is set, or None."""
    for name in CI_ENV_VARS:
        value = env.get(name)
        if value is not None and value.strip().lower() not in CI_FALSE_VALUES:
            return name
    return None


def check_guards(env: dict[str, str], euid: int, *, allow_ci: bool, allow_non_root: bool, needs_root: bool) -> None:
    """Raise RefusedError under a CI runner or (when needs_root) when not root."""
    ci_var = running_under_ci(env)
    if ci_var and not allow_ci:
        raise RefusedError(f"{ci_var} is set: this tool is run by an operator, never by a CI runner (override: --allow-ci)")
    if needs_root and euid != 0 and not allow_non_root:
        raise RefusedError(f"must run as root to read every mount (uid is {euid}; override: --allow-non-root)")


# --------------------------------------------------------------------------- commands


def utc_timestamp(now: datetime.datetime | None = None) -> str:
    """Return the UTC timestamp used in backup names, e.g. 20261128T105235Z."""
    return (now or datetime.datetime.now(datetime.UTC)).strftime(TIMESTAMP_FORMAT)


def free_timestamp(dir_fd: int, module_id: str, suffixes: tuple[str, ...]) -> str:
    """Return a timestamp whose backup names do not exist yet (waits into the next second)."""
    for _ in range(3):
        stamp = utc_timestamp()
        taken = False
        for suffix in suffixes:
            try:
                os.stat(f"{module_id}-{stamp}{suffix}", dir_fd=dir_fd, follow_symlinks=False)
                taken = True
            except FileNotFoundError:
                pass
        if not taken:
            return stamp
        time.sleep(1.05 - (time.time() % 1))
    raise BackupError(f"backup names for {module_id} at {stamp} keep existing; refusing to overwrite")


def plan_steps(job: BackupJob) -> list[str]:
    """Return every docker command and path a real run of job would use (--dry-run).

    The procedure's own plan, then what every backup does: the pause around an archive,
    the private partial file, the verification, the rename and the manifest. What depends
    on the engine's answers (Redis's data dir, the buckets, a Meilisearch dump uid) is
    shown as <placeholders>.
    """
    plan = PROCEDURES[job.procedure].plan(job)
    steps = list(plan.steps)
    if not plan.suffix:
        return steps
    if job.pause and plan.suffix.startswith(".tar."):
        staging = job.backup_dir / f".{job.basename}.pause-staging" / "archive.tar"
        steps = [f"run: docker pause {job.container} (at most {job.settings.pause_timeout:g}s)", *steps,
                 f"write: {staging} (uncompressed, mode 0600; without room for it the pause lasts the whole run)",
                 f"run: docker unpause {job.container}", f"compress: {staging}, then remove it"]
    final = job.backup_dir / (job.basename + plan.suffix)
    steps = [step.replace("<backup>", str(final)) for step in steps]
    compressed = plan.suffix.startswith((".tar.", ".sql."))
    steps.append(f"write: {final}.partial (mode 0600{f', {job.compression.tool} level {job.compression.level}' if compressed else ''})")
    return [*steps, f"verify: {plan.checks}", f"rename: {final}", f"write: {job.backup_dir / (job.basename + MANIFEST_SUFFIX)}"]


def print_plan(job: BackupJob, out: IO[str], as_json: bool) -> None:
    """Print the dry-run plan: `would ...` lines, or one JSON document."""
    steps = plan_steps(job)
    if as_json:
        doc = {
            "dry_run": True,
            "module": job.module.id,
            "class": job.cls.letter,
            "procedure": job.procedure,
            "container": job.container,
            "resolved_by": job.resolution.rule,
            "mounts": [dataclasses.asdict(m) for m in job.mounts],
            "skipped_mounts": [{"destination": d, "reason": r} for d, r in job.skipped],
            "steps": steps,
        }
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        for step in steps:
            out.write(f"would {step}\n")


WHOLE_RUN_RATE_MIB = 40  # what gzip -6 reaches on 2 cores (README, Performance): for the warning's estimate of a whole-run pause


def space_needed(job: BackupJob, size: int, *, staging: bool = False) -> int:
    """Return the free bytes a backup of size bytes (before compression) needs: with staging, --pause's copy too; the margin."""
    return size * (2 if staging else 1) + int(job.settings.space_margin_mb * (1 << 20))


def check_free_space(job: BackupJob) -> None:
    """Refuse (exit 3) before touching the container when the backup may not fit.

    The procedure's estimate is of the data before compression: a deliberate
    over-estimate, so that a nearly full disk is found before anything is touched rather
    than halfway through. With --pause the staging copy counts too; without room for it
    the container stays paused for the whole run, with a warning that says so.
    """
    probe = job.backup_dir
    while not probe.exists():
        probe = probe.parent
    fs = os.statvfs(probe)
    free = job.free_bytes = fs.f_bavail * fs.f_frsize
    estimate = PROCEDURES[job.procedure].estimate(job)
    needed, how = estimate.bytes, str(estimate)
    if needed is None:
        LOG.info("free space not checked: %s", how)
        return
    job.estimated_bytes = None if estimate.bound else needed  # a bound is no ETA
    margin = space_needed(job, 0)
    LOG.info("estimated size %s (%s); %s free on the filesystem of %s", human_size(needed), how, human_size(free), job.backup_dir)
    if free < space_needed(job, needed):
        raise RefusedError(
            f"not enough space for {job.module.id}: about {human_size(needed)} ({how}) plus a {human_size(margin)} margin "
            f"needed, {human_size(free)} free on the filesystem of {job.backup_dir} (override: --no-space-check)"
        )
    if job.pause and free < space_needed(job, needed, staging=True):
        job.no_staging = f"no room for a staging copy: {human_size(space_needed(job, needed, staging=True))} needed with it, {human_size(free)} free"
        LOG.warning("--pause: %s; %s stays PAUSED for the whole backup, compression included (about %.0fs at %d MiB/s, "
                    "at most pause_timeout %gs)", job.no_staging, job.container, needed / (WHOLE_RUN_RATE_MIB << 20),
                    WHOLE_RUN_RATE_MIB, job.settings.pause_timeout)


def cmd_backup(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str], env: dict[str, str]) -> int:
    """Back up one module; print the written paths (or the manifest with --json)."""
    platform_root = Path(settings.platform_root)
    module = load_module(platform_root, args.module)
    if module.statefulness == "stateless":
        raise RefusedError(f"module {module.id!r} is stateless ({module.yaml_path}: spec.runtime.statefulness); nothing to back up")
    if module.statefulness == UNDECLARED:
        LOG.warning("%s does not declare spec.runtime.statefulness; backing up anyway", module.yaml_path)
    cls, pattern = classify(module.id, config)
    procedure = PROCEDURES[args.procedure or cls.procedure]
    LOG.info("module %s: class %s (%s), matched by %s, procedure %s", module.id, cls.letter, cls.title, pattern, procedure.name)
    if args.pause and not procedure.pausable:
        raise UsageError(f"--pause does not apply to {procedure.name}: it needs the server answering (and is consistent without a pause)")

    timeout = settings.docker_timeout
    backup_dir = backup_directory(settings)
    if not args.dry_run:
        clean_up_after_killed_runs(backup_dir, module.id, settings)
    containers, engine = containers_and_engine(timeout)
    resolution = resolve_container(module, containers, args.container)
    LOG.info("container %s (%s), resolved by %s", resolution.name, resolution.state, resolution.rule)
    state = resolution.container.get("State", {})
    if state.get("Paused"):
        if args.pause:
            raise RefusedError(f"container {resolution.name} is already paused by someone else; refusing to pause/unpause it")
        LOG.warning("container %s is paused by someone else; it stays paused", resolution.name)
    pause = args.pause
    if pause and not state.get("Running"):
        LOG.warning("container %s is not running (%s); its data is at rest, no pause needed", resolution.name, resolution.state)
        pause = False

    read_on_host = engine.local and not engine.rootless and not args.via_docker
    mounts, skipped = plan_mounts(resolution.container, read_on_host=read_on_host)
    for dest, reason in skipped:
        LOG.info("skipping mount %s: %s", dest, reason)

    job = BackupJob(module, cls, procedure.name, resolution, engine, settings, mounts, skipped, backup_dir, utc_timestamp(), pause, env, containers,
                    compression=choose_compression(settings), options=procedure_options(procedure, cls), config=config)
    job.rules = ArchiveRules(timeout=settings.stream_timeout, backup_dir_paths=backup_dir_in_mounts(backup_dir, mounts))
    job.before_restore = getattr(args, "before_restore", None)
    job.health["before"] = container_health(resolution.container)
    if args.dry_run:
        ensure_backup_dir(backup_dir, create=False)
        print_plan(job, out, args.json)
        return EXIT_OK
    if not args.no_space_check:
        with phase("free-space walk"):
            check_free_space(job)

    dir_fd = ensure_backup_dir(backup_dir, create=True)
    assert dir_fd is not None
    try:
        with module_lock(dir_fd, module.id, settings.lock_timeout) as waited:
            if waited:
                job.seen.clear()  # another run had the module meanwhile: what the estimate saw may be gone
            here = os.fstat(dir_fd)
            job.rules.backup_dir = (here.st_dev, here.st_ino)
            job.journal = CleanupJournal(dir_fd, module.id)
            job.timestamp = free_timestamp(dir_fd, module.id, (*backup_suffixes(), MANIFEST_SUFFIX))
            started = datetime.datetime.now(datetime.UTC)
            result = procedure.run(job, dir_fd)
            finished = datetime.datetime.now(datetime.UTC)
            job.health["after"] = health_after(job, result)
            manifest_path = backup_dir / (job.basename + MANIFEST_SUFFIX)
            manifest = build_manifest(job, result, started, finished, manifest_path)
            try:
                write_manifest(dir_fd, backup_dir, manifest_path.name, manifest)
            except BaseException:
                # A backup without its manifest must not look finished.
                with signals_deferred():
                    os.unlink(result.path.name, dir_fd=dir_fd)
                raise
    finally:
        os.close(dir_fd)

    for warning in result.warnings:
        LOG.warning("%s", warning)
    checks = ", ".join(f"{k} {v}" for k, v in result.verification.items())
    LOG.info("backup verified: %s (%s, sha256 %s; %s)", result.path, human_size(result.size), result.sha256[:16], checks)
    LOG.info("restore notes (class %s):\n%s", cls.letter, manifest["restore"])
    if args.json:
        out.write(json.dumps({**manifest, "backup_path": str(result.path), "manifest_path": str(manifest_path)}, indent=2) + "\n")
    else:
        out.write(f"{result.path}\n{manifest_path}\n")
    return EXIT_OK


def container_health(container: dict[str, Any]) -> dict[str, Any]:
    """Return the container's state and Docker health ("healthy", "unhealthy", "starting", or None without a healthcheck)."""
    state = container.get("State") or {}
    return {"state": state.get("Status"), "health": (state.get("Health") or {}).get("Status")}


def health_after(job: BackupJob, result: BackupResult) -> dict[str, Any] | None:
    """Read the container's health again once the backup is taken; warn loudly if it was healthy and is not now."""
    proc = docker(["inspect", "--format", "{{json .State}}", job.container], timeout=job.settings.docker_timeout, check=False)
    if proc.returncode != 0:
        result.warnings.append(f"the container's health after the backup could not be read: {failure_text(proc)}")
        return None
    after = container_health({"State": parse_json(proc.stdout, "docker inspect")})
    before = job.health.get("before") or {}
    if before.get("health") == "healthy" and after["health"] != "healthy" or before.get("state") == "running" and after["state"] != "running":
        warning = (f"CONTAINER {job.container} WAS {before.get('health') or before.get('state')} BEFORE THE BACKUP AND IS "
                   f"{after['health'] or after['state']} NOW: check the service before the apply")
        result.warnings.append(warning)  # printed with the other warnings, and in the manifest
    return after


def clean_up_after_killed_runs(backup_dir: Path, module_id: str, settings: Settings) -> None:
    """Undo what a killed run of the module left (its journal, .partial files, staging), under its lock.

    Runs before the container is looked at, so that a container a killed run left paused
    is unpaused first rather than taken for one paused by someone else.
    """
    if not os.path.isdir(backup_dir):
        return  # no run of any module has written here yet
    with contextlib.suppress(OSError):
        if not [name for name in os.listdir(backup_dir) if name == f".{module_id}.cleanup" or _left_by_a_run(name, module_id)]:
            return  # nothing left over: touch nothing
    dir_fd = ensure_backup_dir(backup_dir, create=True)
    assert dir_fd is not None
    try:
        with module_lock(dir_fd, module_id, settings.lock_timeout):
            CleanupJournal(dir_fd, module_id).replay(settings)
            remove_stale_partials(dir_fd, module_id)
    finally:
        os.close(dir_fd)


def backup_dir_in_mounts(backup_dir: Path, mounts: list[MountPlan]) -> tuple[str, ...]:
    """Return the container paths at which the backup directory appears inside a mount (it is never archived)."""
    real = os.path.realpath(backup_dir)
    paths = []
    for mount in mounts:
        source = os.path.realpath(mount.source) if mount.source else ""
        if source and _inside(real, [source]):
            rel = os.path.relpath(real, source)
            paths.append(mount.destination if rel == "." else posixpath.join(mount.destination, rel))
    return tuple(paths)


# --------------------------------------------------------------------------- --restore


@contextlib.contextmanager
def stopped(job: Restore) -> Iterator[None]:
    """Stop the container for the block; start it again afterwards if it was running, whatever happened.

    A container that was stopped stays stopped. Once started, its healthcheck (if it has
    one) is waited for. Raise BackupError, naming the container's state, if it cannot be
    started again.
    """
    timeout = job.settings.docker_timeout
    state = job.container.get("State") or {}
    was_running = bool(state.get("Running"))
    if state.get("Paused"):
        raise RefusedError(f"container {job.name} is paused; unpause it (or find out who paused it) before a restore")
    try:
        if was_running:
            LOG.warning("stopping container %s for the restore", job.name)
            with signals_deferred():  # the daemon goes on stopping it if the CLI is cut short: the start below must follow
                docker(["stop", job.name], timeout=max(timeout, 60))
            job.lines.append(f"container {job.name} stopped")
        yield
    finally:
        if was_running:
            with signals_deferred():
                proc = docker(["start", job.name], timeout=timeout, check=False)
                if proc.returncode != 0:
                    raise BackupError(f"container {job.name} is STOPPED and did not start again: "
                                      f"{proc.stderr.decode('utf-8', 'replace').strip()}; run `docker start {job.name}`")
                job.lines.append(f"container {job.name} started again")
                health = wait_healthy(job.name, job.settings.drill_timeout, timeout)
                if health:
                    job.lines.append(f"container {job.name}: {health}")


def wait_healthy(name: str, limit: float, timeout: float) -> str:
    """Wait until a started container's healthcheck passes (if it has one); return what it said ("" without one)."""
    deadline = time.monotonic() + limit
    while True:
        state = parse_json(docker(["inspect", "--format", "{{json .State}}", name], timeout=timeout).stdout, "docker inspect")
        health = (state.get("Health") or {}).get("Status")
        if not state.get("Running"):
            raise BackupError(f"container {name} exited ({state.get('Status')}, exit code {state.get('ExitCode')}) after the restore")
        if health in (None, "healthy"):
            return f"healthcheck {health}" if health else ""
        if time.monotonic() > deadline:
            return f"healthcheck still {health} after {limit:g}s (drill_timeout)"
        time.sleep(0.5)


def cmd_restore(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str], env: dict[str, str]) -> int:
    """Put a module back to a backup: guards, confirmation, --verify, a safety backup, the procedure's restore, a report."""
    backup, doc = load_manifest(args.restore)
    procedure = procedure_for(doc, backup)
    module_id = validate_module_id(str(doc.get("module", "")))
    platform_root = Path(settings.platform_root)
    module = load_module(platform_root, module_id)
    timeout = settings.docker_timeout
    containers, engine = containers_and_engine(timeout)
    resolution = resolve_container(module, containers, args.container)
    container = resolution.container
    recorded = doc.get("container") or {}
    lines = [f"restore {backup} (module {module_id}, class {doc.get('class')}, {procedure.name}) onto container {resolution.name}"]
    if recorded.get("id") and container.get("Id") != recorded.get("id"):
        lines.append(f"the container was recreated since the backup ({str(recorded.get('id'))[:12]} then, {str(container.get('Id'))[:12]} now, "
                     f"image {container.get('Config', {}).get('Image')}): normal after an apply")
    backup_dir = backup.parent
    cls = config.classes.get(str(doc.get("class")))
    job = Restore(backup, doc, settings, env, container, engine, lines, terminate_connections=args.terminate_connections,
                  force_vault=args.force_vault, remove_extra=args.remove_extra, via_docker=args.via_docker, options=procedure_options(procedure, cls) if cls is not None else {})
    taken_by = PROCEDURES[str(doc.get("procedure"))]
    steps_by_hand = taken_by.by_hand(job) if taken_by.by_hand is not None else None
    if steps_by_hand:
        raise UsageError(f"--restore does not put {backup.name} back itself: {steps_by_hand[0]}; nothing was touched. The exact steps are above",
                         details=steps_by_hand[1:])
    if args.via_docker and not procedure.restores_mounts:
        raise UsageError(f"--restore --via-docker applies to archived mounts only "
                         f"({', '.join(p.name for p in PROCEDURES.values() if p.restores_mounts)}); "
                         f"{backup.name} is a {procedure.name} backup, put back its own way; nothing was touched")
    if procedure.restore is None:
        raise UsageError(f"{backup.name} was taken by {procedure.name}, whose backups --restore does not put back yet; "
                         "follow the restore notes above (also in its manifest)", details=str(doc.get("restore", "")).splitlines())
    if args.dry_run:
        steps = [f"verify {backup} as --verify does",
                 "skip the safety backup (--no-safety-backup)" if args.no_safety_backup else f"take a safety backup of {module_id} into {backup_dir}",
                 *(procedure.restore_plan(job) if procedure.restore_plan is not None else [f"restore with {procedure.name}"])]
        out.write("\n".join([*lines, *(f"would {step}" for step in steps)]) + "\n")
        return EXIT_OK
    confirm_restore(module_id, resolution.name, args.yes)
    failed = [(name, detail) for name, passed, detail in verify_backup(backup) if not passed]
    if failed:
        raise BackupError(f"{backup.name} fails --verify ({'; '.join(f'{n}: {d}' for n, d in failed)}); nothing was restored, "
                          "the container was not touched")
    lines.append("verified: every --verify check passed")
    safety = None
    if args.no_safety_backup:
        LOG.warning("--no-safety-backup: the current state of %s is NOT backed up; this restore cannot be undone", module_id)
        lines.append("NO safety backup (--no-safety-backup): this restore cannot be undone with --restore")
    else:
        safety = take_safety_backup(args, config, settings, env, module_id, resolution.name, backup)
        lines.append(f"safety backup of the state before the restore: {safety}")
    undo = f"python3 {Path(__file__).resolve()} --restore {safety}" if safety else "(none: no safety backup was taken)"
    dir_fd = ensure_backup_dir(backup_dir, create=True)  # it exists: this checks it is private, and opens it for the lock
    assert dir_fd is not None
    try:
        with module_lock(dir_fd, module_id, settings.lock_timeout):
            differences = procedure.restore(job)
    except BaseException as exc:
        for line in lines:
            LOG.info("%s", line)
        if safety is not None:
            LOG.error("the restore did not finish; the state before it is in %s; to go back to it: %s", safety, undo)
        if isinstance(exc, BackupError):
            exc.details = [*getattr(exc, "details", []), f"safety backup: {safety or 'none'}"]
        raise
    finally:
        os.close(dir_fd)
    lines.append(f"restored and compared: {'equal' if not differences else f'{differences} difference(s)'}")
    lines.append(f"to undo this restore: {undo}")
    if args.json:
        out.write(json.dumps({"backup": str(backup), "module": module_id, "container": resolution.name, "safety_backup": str(safety) if safety else None,
                              "differences": differences, "undo": undo if safety else None, "report": lines}, indent=2) + "\n")
    else:
        out.write("\n".join(lines) + "\n")
    if differences:
        raise BackupError(f"the restored data differs from the backup in {differences} check(s) (above); the safety backup is {safety}")
    return EXIT_OK


def confirm_restore(module_id: str, container: str, yes: bool) -> None:
    """Without --yes, the operator types the module id on the terminal; without a terminal, refuse (exit 3)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise RefusedError("a restore replaces live data: confirm it by typing the module id on a terminal, or pass --yes")
    sys.stderr.write(f"{PROG}: this stops {container} and replaces its data with the backup. Type the module id ({module_id}) to go on: ")
    sys.stderr.flush()
    if sys.stdin.readline().strip() != module_id:
        raise RefusedError("not confirmed; nothing was touched")


def take_safety_backup(args: argparse.Namespace, config: Config, settings: Settings, env: dict[str, str], module_id: str,
                       container: str, restoring: Path) -> Path:
    """Back up the module's current state with its normal procedure, marked as taken before a restore; return its path."""
    LOG.warning("taking a safety backup of %s before the restore", module_id)
    backup_args = argparse.Namespace(**{**vars(args), "module": module_id, "container": container, "dry_run": False, "pause": False,
                                        "procedure": None, "via_docker": False, "json": False, "before_restore": str(restoring)})
    written = io.StringIO()
    beside = dataclasses.replace(settings, backup_dir=str(restoring.parent))  # next to the backup it undoes
    try:
        cmd_backup(backup_args, config, beside, written, env)
    except BackupError as exc:
        raise BackupError(f"the safety backup failed, so the restore did not start: {failure_line(exc)}") from None
    return Path(written.getvalue().split()[0])


def cmd_verify(path: Path, as_json: bool, out: IO[str]) -> int:
    """Print every check of a backup against its manifest; raise BackupError if one fails."""
    checks = verify_backup(path)
    failed = [name for name, passed, _ in checks if not passed]
    if as_json:
        doc = {"backup": str(path), "passed": not failed, "checks": [{"check": c, "passed": p, "detail": d} for c, p, d in checks]}
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        for name, passed, detail in checks:
            out.write(f"{'ok  ' if passed else 'FAIL'}  {name:<10} {detail}\n")
    if failed:
        raise BackupError(f"verification of {path.name} failed: {', '.join(failed)}")
    return EXIT_OK


@dataclasses.dataclass
class AuditRow:
    """One module in the --list audit."""

    module: str
    statefulness: str
    lifecycle: str
    class_letter: str | None
    class_title: str | None
    procedure: str | None
    container: str | None = None
    resolved_by: str | None = None
    unresolved: str | None = None
    state: str | None = None
    running: bool | None = None
    health: str | None = None  # Docker's healthcheck status; None without a healthcheck
    data_bytes: int | None = None
    first_candidate: bool = False


def audit_rows(modules: list[Module], config: Config, containers: list[dict[str, Any]] | None, read_on_host: bool) -> list[AuditRow]:
    """Return one audit row per module; runtime fields stay None without docker."""
    rows: list[AuditRow] = []
    for module in modules:
        cls = classify(module.id, config)[0] if module.statefulness != "stateless" else None
        row = AuditRow(
            module=module.id,
            statefulness=module.statefulness,
            lifecycle=module.lifecycle,
            class_letter=cls.letter if cls else None,
            class_title=cls.title if cls else None,
            procedure=cls.procedure if cls else None,
        )
        if containers is not None:
            try:
                resolution = resolve_container(module, containers)
            except AmbiguousContainer as exc:
                row.unresolved = f"ambiguous: {', '.join(exc.names)}"
            except ContainerNotFound:
                row.unresolved = f"declared {module.container} not found" if module.container else "no container found"
            else:
                row.container, row.resolved_by, row.state = resolution.name, resolution.rule, resolution.state
                row.running = bool(resolution.container.get("State", {}).get("Running"))
                row.health = container_health(resolution.container)["health"]
                if module.statefulness != "stateless":
                    mounts, _ = plan_mounts(resolution.container, read_on_host=read_on_host)
                    if all(m.via == "host" for m in mounts):
                        row.data_bytes = sum(tree_size(m.source) for m in mounts)
        row.first_candidate = (
            module.statefulness == "stateful" and module.lifecycle == "active" and bool(row.running)
            and cls is not None and cls.default
        )
        rows.append(row)
    order = {letter: i for i, letter in enumerate(sorted(config.classes))}
    group = {"stateful": 0, UNDECLARED: 1, "stateless": 2}
    rows.sort(key=lambda r: (group[r.statefulness], order.get(r.class_letter or "", 99), r.module))
    return rows


def cmd_list(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str]) -> int:
    """Print the stateful audit of every module of the platform."""
    modules, errors = discover_modules(Path(settings.platform_root))
    containers: list[dict[str, Any]] | None
    read_on_host = False
    try:
        containers, engine = containers_and_engine(settings.docker_timeout)
        read_on_host = engine.local and not engine.rootless
    except BackupError as exc:
        containers = None
        LOG.warning("docker is not reachable, runtime columns are unknown: %s", exc)
    rows = audit_rows(modules, config, containers, read_on_host)
    if args.json:
        out.write(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    else:
        out.write(format_audit(rows, config, docker_known=containers is not None))
    for error in errors:
        LOG.error("%s", error)
    if errors:
        raise UsageError(f"{len(errors)} module.yaml file(s) could not be read (listed above)")
    return EXIT_OK


def format_audit(rows: list[AuditRow], config: Config, *, docker_known: bool) -> str:
    """Return the --list table: stateful modules grouped by class, then the rest."""
    lines = [f"  {'MODULE':<30} {'LIFECYCLE':<13} {'CONTAINER (RULE)':<44} {'STATE':<10} {'HEALTH':<10} {'DATA':>10}"]
    current = None
    for row in rows:
        if row.statefulness == "stateful":
            group = f"{row.class_letter}  {row.class_title} [{row.procedure}]"
        elif row.statefulness == UNDECLARED:
            group = f"statefulness undeclared (class {row.class_letter} if stateful)"
        else:
            group = "stateless (no backup needed)"
        if group != current:
            lines += ["", group]
            current = group
        if not docker_known:
            where, state, health = "?", "?", "?"
        elif row.container:
            where, state, health = f"{row.container} ({_short_rule(row.resolved_by)})", row.state or "?", row.health or "-"
        else:
            where, state, health = f"- ({row.unresolved})", "-", "-"
        size = human_size(row.data_bytes) if row.container and row.statefulness != "stateless" else ""
        mark = "  <- first candidate (active, running, class E)" if row.first_candidate else ""
        lines.append(f"  {row.module:<30} {row.lifecycle:<13} {where:<44.44} {state:<10} {health:<10} {size:>10}{mark}")
    stateful = [r for r in rows if r.statefulness == "stateful"]
    resolved = [r for r in stateful if r.container]
    running = [r for r in resolved if r.running]
    known = [r.data_bytes for r in resolved if r.data_bytes is not None]
    data = f"{human_size(sum(known))} of data"
    if docker_known and len(known) < len(resolved):
        data += f" ({len(resolved) - len(known)} not measurable from this host)"
    lines.append("")
    if docker_known:
        lines.append(f"{len(stateful)} stateful modules, {len(resolved)} resolved, {len(running)} running, {data}")
    else:
        lines.append(f"{len(stateful)} stateful modules; docker not reachable: containers, state and sizes unknown")
    firsts = [r.module for r in rows if r.first_candidate]
    if firsts:
        lines.append(f"low-blast first candidates: {', '.join(firsts)}")
    return "\n".join(lines) + "\n"


def _short_rule(rule: str | None) -> str:
    return {
        "module.yaml spec.runtime.container": "module.yaml",
        "compose label com.docker.compose.service": "compose label",
        "container name": "name",
    }.get(rule or "", rule or "")


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would sys.exit(2) from inside
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line. Raise UsageError on bad usage."""
    parser = _Parser(
        prog="backup_before_apply.py",
        allow_abbrev=False,
        description="Take a verified, private backup of one stateful module before a risky change (see README.md).",
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE_ID", help="module id(s) (directories under <platform-root>/modules)")
    parser.add_argument("--list", action="store_true", help="audit every module instead of backing one up")
    parser.add_argument("--coverage", action="store_true", help="list every writable mount and unused volume of the engine, and which module backs it up")
    parser.add_argument("--check", metavar="MODULE_ID", help="read-only gate: exit 0 only if the module's newest backup is fresh and passes --verify")
    parser.add_argument("--max-age", metavar="DURATION", help="with --check: how old the newest backup may be (90s, 30m, 2h, 1d; default 1h)")
    parser.add_argument("--prune", action="store_true", help="list (with --delete: remove) the backups retention would remove, of MODULE_ID(s) or all")
    parser.add_argument("--keep", metavar="N", help="with --prune: backups kept per module whatever their age (classes.toml keep)")
    parser.add_argument("--older-than", metavar="DURATION", help="with --prune: only older backups are removed (classes.toml older_than)")
    parser.add_argument("--delete", action="store_true", help="with --prune: remove what it lists")
    parser.add_argument("--jobs", metavar="N", type=int, default=1, help="with several MODULE_IDs: back up N modules at a time (default 1)")
    parser.add_argument("--verify", metavar="FILE", type=Path, help="re-check a backup against its manifest")
    parser.add_argument("--drill", metavar="FILE", type=Path, help="restore a backup into a throwaway container and compare")
    parser.add_argument("--restore", metavar="FILE", type=Path, help="put the module back to this backup (after a safety backup; asks first)")
    parser.add_argument("--yes", action="store_true", help="with --restore: do not ask for the module id on the terminal")
    parser.add_argument("--no-safety-backup", action="store_true", help="with --restore: do not back up the current state first")
    parser.add_argument("--terminate-connections", action="store_true", help="with --restore of class A: end other sessions on the databases replaced")
    parser.add_argument("--force-vault", action="store_true", help="with --restore of class C: vault operator raft snapshot restore -force")
    parser.add_argument("--remove-extra", action="store_true", help="with --restore of class D: remove objects created after the backup")
    parser.add_argument("--dry-run", action="store_true", help="print every command and path; change nothing")
    parser.add_argument("--container", metavar="NAME", help="use this container instead of resolving one")
    parser.add_argument("--pause", action="store_true", help="freeze the container while archiving (always unpaused)")
    parser.add_argument("--procedure", choices=sorted(PROCEDURES), help="override the class's procedure")
    parser.add_argument("--via-docker", action="store_true",
                        help="read (or, with --restore, write) mounts through docker cp even when the host paths are reachable")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--platform-root", metavar="DIR", help=f"platform checkout (env PLATFORM_ROOT, default {DEFAULT_PLATFORM_ROOT})")
    parser.add_argument("--backup-dir", metavar="DIR", help="where backups go (env BACKUP_DIR, default <platform-root>/backups)")
    parser.add_argument("--classes", metavar="FILE", type=Path, default=DEFAULT_CLASSES, help="class table (default: classes.toml beside this script)")
    parser.add_argument("--docker-timeout", metavar="SECONDS", help="timeout of each short docker call (env BBA_DOCKER_TIMEOUT)")
    parser.add_argument("--pause-timeout", metavar="SECONDS", help="longest a --pause may freeze the container (env BBA_PAUSE_TIMEOUT)")
    parser.add_argument("--stream-timeout", metavar="SECONDS", help="kill a dump or copy that sends nothing for this long (env BBA_STREAM_TIMEOUT)")
    parser.add_argument("--lock-timeout", metavar="SECONDS", help="wait this long for another run of the same module (env BBA_LOCK_TIMEOUT)")
    parser.add_argument("--compression", choices=("gzip", "zstd"), help="backup compression (env BBA_COMPRESSION; default gzip)")
    parser.add_argument("--compress-level", metavar="N", help="gzip level 1-9 (env BBA_COMPRESS_LEVEL)")
    parser.add_argument("--zstd-level", metavar="N", help="zstd level 1-19 (env BBA_ZSTD_LEVEL)")
    parser.add_argument("--snapshot-timeout", metavar="SECONDS", help="wait this long for a Redis BGSAVE or a Meilisearch dump (env BBA_SNAPSHOT_TIMEOUT)")
    parser.add_argument("--space-margin-mb", metavar="MB", help="free space to keep beyond the estimated backup size (env BBA_SPACE_MARGIN_MB)")
    parser.add_argument("--no-space-check", action="store_true", help="skip the free-space estimate before a backup")
    parser.add_argument("--drill-timeout", metavar="SECONDS", help="wait this long for a drill container to answer (env BBA_DRILL_TIMEOUT)")
    parser.add_argument("--allow-ci", action="store_true", help="run even though a CI variable is set")
    parser.add_argument("--allow-non-root", action="store_true", help="run a backup without root")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log every command")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--debug", action="store_true", help="like -v, and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args, rest = parser.parse_known_args(argv)
    unknown = [word for word in rest if word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.modules += rest  # MODULE_IDs after options: argparse takes only those before them as the positional
    args.module = args.modules[0] if len(args.modules) == 1 and not args.prune else None
    modes = [name for name, given in (("MODULE_ID", args.modules and not args.prune), ("--list", args.list), ("--coverage", args.coverage),
                                      ("--check", args.check), ("--prune", args.prune), ("--verify", args.verify), ("--drill", args.drill),
                                      ("--restore", args.restore)) if given]
    if len(modes) != 1:
        raise UsageError("give exactly one of MODULE_ID [MODULE_ID ...], --list, --coverage, --check MODULE_ID, --prune [MODULE_ID ...], "
                         f"--verify FILE, --drill FILE or --restore FILE (got {', '.join(modes) or 'none'})")
    for flag, owner in (("max_age", args.check), ("keep", args.prune), ("older_than", args.prune), ("delete", args.prune),
                        ("jobs", len(args.modules) > 1 and not args.prune)):
        value = getattr(args, flag)
        if (value != 1 if flag == "jobs" else value not in (None, False)) and not owner:
            raise UsageError(f"--{flag.replace('_', '-')} applies to {'--check' if flag == 'max_age' else 'several MODULE_IDs' if flag == 'jobs' else '--prune'}, "
                             f"not to {modes[0]}")
    if args.jobs < 1:
        raise UsageError(f"--jobs: expected a positive number of modules at a time, got {args.jobs}")
    if len(args.modules) > 1 and not args.prune:
        for flag in ("container", "procedure"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} names one module's container or procedure; give one MODULE_ID with it")
        if len(set(args.modules)) != len(args.modules):
            raise UsageError(f"MODULE_ID {next(m for m in args.modules if args.modules.count(m) > 1)!r} is given twice")
    if not args.restore:
        for flag in ("yes", "no_safety_backup", "terminate_connections", "force_vault", "remove_extra"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to --restore, not to {modes[0]}")
    else:
        for flag in ("pause", "procedure"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to a backup, not to --restore")
    if modes[0] != "MODULE_ID" and not args.restore:
        for flag in ("dry_run", "pause", "container", "procedure", "via_docker"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to a backup, not to {modes[0]}")
    for module_id in [*args.modules, *([args.check] if args.check else [])]:
        validate_module_id(module_id)
    return args


def resolve_settings(config: Config, args: argparse.Namespace, env: dict[str, str]) -> Settings:
    """Return the settings: classes.toml, then environment, then command line."""
    values = dataclasses.asdict(config.settings)
    for name, (env_name, flag) in SETTING_SOURCES.items():
        if env.get(env_name):
            values[name] = check_setting(name, env[env_name], f"environment {env_name}")
        flag_value = getattr(args, flag.lstrip("-").replace("-", "_")) if flag else None
        if flag_value is not None:
            values[name] = check_setting(name, flag_value, flag)
    return Settings(**values)


LOG_PREFIX = PROG  # backup-before-apply[<module>] in the run of one module among several
LAST_FAILURE = ""  # the last run_command's failure line, for the summary of several modules


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        return f"{LOG_PREFIX}: {prefix}{record.getMessage()}"


# --------------------------------------------------------------------------- several modules in one run


@dataclasses.dataclass
class ModuleRun:
    """One module's backup among several: a forked process of its own, its output kept in a private temporary file."""

    module: str
    pid: int
    result: IO[bytes]
    started: float
    exit_status: int | None = None
    seconds: float = 0.0
    outcome: dict[str, Any] = dataclasses.field(default_factory=dict)


def cmd_several(args: argparse.Namespace, config: Config, out: IO[str], env: dict[str, str]) -> int:
    """Back up several modules, one after another (or --jobs at a time), each in a process of its own; then a summary.

    Each run is exactly the run of one module (its own lock, guards, cleanup and exit
    status); its log lines carry the module's name. Every written path is printed as its
    run ends, then the summary table. Exit 0 only if every run succeeded, else the highest
    exit status among them. An interrupt reaches every run in progress (each cleans up as
    a run of one module does) and no run is started after it.
    """
    pending = list(args.modules)
    running: dict[int, ModuleRun] = {}
    done: list[ModuleRun] = []
    interrupted: Interrupted | None = None
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        try:
            while pending and len(running) < args.jobs and interrupted is None:
                module_id = pending.pop(0)
                result = tempfile.TemporaryFile()  # noqa: SIM115 - closed once the run has ended and its result is read
                pid = os.fork()
                if pid == 0:
                    _module_run_child(args, env, module_id, result)
                running[pid] = ModuleRun(module_id, pid, result, time.monotonic())
            if not running:
                break
            pid, status = os.wait()
        except Interrupted as exc:
            interrupted = exc
            for run_ in running.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run_.pid, exc.signum)
            continue
        except ChildProcessError:
            break
        finished = running.pop(pid)
        finished.exit_status = os.waitstatus_to_exitcode(status)
        if finished.exit_status < 0:
            finished.exit_status = 128 - finished.exit_status
        finished.seconds = time.monotonic() - finished.started
        finished.result.seek(0)
        with contextlib.suppress(ValueError):
            finished.outcome = json.loads(finished.result.read() or b"{}")
        finished.result.close()
        done.append(finished)
        if not args.json and finished.outcome.get("output"):
            out.write(finished.outcome["output"])
            out.flush()
    order = {module_id: i for i, module_id in enumerate(args.modules)}
    done.sort(key=lambda r: order[r.module])
    if args.json:
        docs = []
        for run_ in done:
            text = run_.outcome.get("output") or ""
            try:
                docs.append(json.loads(text) if text.strip() else {"module": run_.module, "exit_status": run_.exit_status,
                                                                 "error": run_.outcome.get("error") or "no output"})
            except ValueError:
                docs.append({"module": run_.module, "exit_status": run_.exit_status, "error": "output is not JSON"})
        docs += [{"module": m, "exit_status": None, "error": "not started: interrupted"} for m in pending]
        out.write(json.dumps(docs, indent=2) + "\n")
    else:
        out.write(format_summary(done, pending, config, args.dry_run))
    if interrupted is not None:
        raise interrupted
    worst = max((r.exit_status or 0 for r in done), default=EXIT_OK)
    if worst != EXIT_OK:
        failed = [r.module for r in done if r.exit_status]
        error = BackupError(f"{len(failed)} of {len(done)} module(s) failed: {', '.join(failed)} (summary above)")
        error.exit_code = worst
        raise error
    return EXIT_OK


def _module_run_child(args: argparse.Namespace, env: dict[str, str], module_id: str, result: IO[bytes]) -> None:
    """The forked run of one module: run it as a run of that module alone, write what it printed and how it ended, exit."""
    global LOG_PREFIX
    status = EXIT_FAILED
    try:
        LOG_PREFIX = f"{PROG}[{module_id}]"
        one = argparse.Namespace(**{**vars(args), "modules": [module_id], "module": module_id})
        printed = io.StringIO()
        status = run_command(one, env, printed)
        result.write(json.dumps({"output": printed.getvalue(), "error": LAST_FAILURE}).encode())
        result.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def format_summary(runs: list[ModuleRun], pending: list[str], config: Config, dry_run: bool) -> str:
    """Return the table printed after several modules: module, class, result, size, duration."""
    lines = ["", f"{'MODULE':<30} {'CLASS':<6} {'SIZE':>10} {'DURATION':>9}  RESULT"]
    for run_ in runs:
        text = run_.outcome.get("output") or ""
        manifest = next((Path(line) for line in text.splitlines() if line.endswith(MANIFEST_SUFFIX)), None)
        doc: dict[str, Any] = {}
        if manifest is not None:
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(manifest.read_text(encoding="utf-8"))
        letter = doc.get("class") or classify(run_.module, config)[0].letter
        if run_.exit_status == EXIT_OK:
            result = "planned (--dry-run)" if dry_run else "ok" + (f", {len(doc.get('warnings') or [])} warning(s)" if doc.get("warnings") else "")
        else:
            result = f"exit {run_.exit_status}: {run_.outcome.get('error') or 'no error line'}"
        size = human_size(int(doc["bytes"])) if doc.get("bytes") is not None else ""
        lines.append(f"{run_.module:<30} {letter:<6} {size:>10} {run_.seconds:>8.1f}s  {result}")
    lines += [f"{module_id:<30} {'':<6} {'':>10} {'':>9}  not started (interrupted)" for module_id in pending]
    ok = sum(r.exit_status == EXIT_OK for r in runs)
    lines.append(f"{ok} of {len(runs) + len(pending)} module(s) {'planned' if dry_run else 'backed up and verified'}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, *, env: dict[str, str] | None = None) -> int:
    """Run the command line; return the exit status."""
    env = dict(os.environ) if env is None else env
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    LOG.addHandler(handler)
    old_propagate, LOG.propagate = LOG.propagate, False
    LOG.setLevel(logging.DEBUG if args.verbose or args.debug else logging.WARNING if args.quiet else logging.INFO)
    old_umask = os.umask(0o077)
    RUN_COUNTS.clear()
    old_handlers = {}
    if _in_main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old_handlers[signum] = signal.signal(signum, _interrupt_once())
    try:
        return run_command(args, env, sys.stdout)
    finally:
        for signum, old in old_handlers.items():
            signal.signal(signum, old)
        os.umask(old_umask)
        LOG.removeHandler(handler)
        LOG.propagate = old_propagate


def run_command(args: argparse.Namespace, env: dict[str, str], out: IO[str]) -> int:
    """Run the parsed command, writing results to out; report any failure as its one stderr line; return the exit status."""
    global LAST_FAILURE
    LAST_FAILURE = ""
    try:
        backup = bool(args.modules) and not args.prune
        needs_root = bool(args.drill) or bool((backup or args.restore) and not args.dry_run) or bool(args.prune and args.delete)
        writes = bool(args.drill or args.restore or args.prune or (backup and not args.dry_run))  # read-only checks run anywhere, CI included
        check_guards(env, os.geteuid(), allow_ci=args.allow_ci or not writes, allow_non_root=args.allow_non_root, needs_root=needs_root)
        config = load_config(args.classes)
        settings = resolve_settings(config, args, env)
        if args.list:
            return cmd_list(args, config, settings, out)
        if args.coverage:
            return cmd_coverage(args, config, settings, out)
        if args.check:
            return cmd_check(args, settings, out)
        if args.prune:
            return cmd_prune(args, config, settings, out)
        if len(args.modules) > 1:
            return cmd_several(args, config, out, env)
        if args.verify:
            return cmd_verify(args.verify, args.json, out)
        if args.drill:
            return drill_backup(args.drill, settings, env, out)
        if args.restore:
            return cmd_restore(args, config, settings, out, env)
        return cmd_backup(args, config, settings, out, env)
    except Interrupted as exc:
        _log_run_summary()
        LAST_FAILURE = f"interrupted by {signal.Signals(exc.signum).name}"
        LOG.error("%s; %s", exc, "the restore stopped at a safe point: the container was returned to its state, the safety backup "
                  "and the command that puts it back are above" if args.restore else
                  "the runs still going were interrupted too and cleaned up (the summary above)" if len(args.modules) > 1 and not args.prune
                  else "cleaned up, no backup written")
        return 128 + exc.signum
    except Exception as exc:
        _log_run_summary()
        if args.debug:
            traceback.print_exc()
        for line in getattr(exc, "details", []):
            print(f"{LOG_PREFIX}: {line}", file=sys.stderr)
        LAST_FAILURE = failure_line(exc)
        print(f"{LOG_PREFIX}: {LAST_FAILURE}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, BackupError) else EXIT_FAILED
    finally:
        _log_run_summary()  # after a success; a failure has logged it before its error line


def _log_run_summary() -> None:
    # Before the error line, which must stay the last line on stderr.
    if RUN_COUNTS:
        LOG.debug("programs run: %s", ", ".join(f"{name} {count}x" for name, count in sorted(RUN_COUNTS.items())))
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        LOG.debug("peak memory: this process %d MiB, largest program it ran %d MiB", own.ru_maxrss >> 10, children.ru_maxrss >> 10)
        verification = sum(VERIFICATION_CPU)
        LOG.debug("CPU time: this process %.2fs, the in-flight verification %.2fs, the programs it ran %.2fs (compressor, docker, du)",
                  own.ru_utime + own.ru_stime, verification, children.ru_utime + children.ru_stime - verification)
        RUN_COUNTS.clear()
        VERIFICATION_CPU.clear()
    if PHASES:
        LOG.debug("where the time went: %s; the rest is start-up and Python", ", ".join(f"{name} {seconds:.2f}s" for name, seconds in PHASES.items()))
        PHASES.clear()


def failure_line(exc: Exception) -> str:
    """Return the one stderr line (after the program name) that reports exc; never more than one line."""
    return " | ".join(part.strip() for part in _failure_text(exc).splitlines() if part.strip())


def _failure_text(exc: Exception) -> str:
    if isinstance(exc, BackupError):
        return f"{'refused' if isinstance(exc, RefusedError) else 'error'}: {exc}"
    if isinstance(exc, OSError):
        # One nobody anticipated (an I/O error reading a volume, say): still one line that
        # names the file; the partial backup is already gone.
        where = f"{os.fsdecode(exc.filename)}: " if isinstance(exc.filename, (str, bytes)) else ""
        return f"error: {where}{exc.strerror or exc}"
    return f"error: internal error, a bug (run with --debug for the traceback): {type(exc).__name__}: {exc}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupt_once() -> Callable[[int, object], None]:
    """Return a signal handler that raises Interrupted the first time only.

    Later signals (a second Ctrl-C while cleanup runs) are reported, not raised, so they
    cannot cut the unpause, the removal of the partial file or the lock release short.
    """
    stopping: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if stopping:
            LOG.warning("%s received; still cleaning up after %s", signal.Signals(signum).name, signal.Signals(stopping[0]).name)
            return
        stopping.append(signum)
        raise Interrupted(signum)

    return handler


def exit_now(status: int) -> None:
    """Flush the standard streams and end the process without the interpreter's teardown.

    The teardown (a full garbage collection, then every module freed) took 30-40 ms of each
    run, measured with strace, for nothing: main() has closed what it opened and waited for
    what it started. Output that cannot be written (a full disk under `> file`) fails the run.
    """
    try:
        sys.stdout.flush()
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"{PROG}: error: the output could not be written: {exc.strerror or exc}\n".encode())
        status = status or EXIT_FAILED
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
