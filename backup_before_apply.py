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
import json
import logging
import os
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
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
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

# Every procedure name classes.toml may use (PROCEDURES, below, maps each to its function).
PROCEDURE_NAMES = (
    "mounted-archive",
    "pg-dumpall",
    "redis-bgsave",
    "vault-raft-snapshot",
    "mc-mirror",
    "search-engine",
    "compose-root-archive",
)

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

RESTORE_PLACEHOLDERS = ("backup", "manifest", "module", "container", "image")


# --------------------------------------------------------------------------- errors


class BackupError(Exception):
    """A failure the operator must see as one line; exit_code says which kind."""

    exit_code = EXIT_FAILED


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
        status = "timed out" if returncode is None else f"exited {returncode}"
        detail = " | ".join(self.stderr_tail) or "no output on stderr"
        super().__init__(f"`{mask_argv(argv)}` {status}: {detail}")


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
    is missing, CommandError if it exits non-zero (with check) or runs past timeout.
    """
    LOG.debug("$ %s", mask_argv(argv))
    RUN_COUNTS[os.path.basename(argv[0])] += 1
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False, env=_child_env(secrets), cwd=cwd)
    except FileNotFoundError:
        raise BackupError(f"{argv[0]}: command not found on PATH") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, exc.stderr or b"") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


@dataclasses.dataclass
class Stream:
    """One end of a streaming child: `pipe` to read or write; stderr once it has exited."""

    pipe: IO[bytes]
    stderr: bytes = b""


@contextlib.contextmanager
def _streaming(argv: list[str], *, into: bool, timeout: float | None, secrets: dict[str, str] | None, check: bool,
               stdin: IO[bytes] | None = None) -> Iterator[Stream]:
    LOG.debug("$ %s", mask_argv(argv))
    RUN_COUNTS[os.path.basename(argv[0])] += 1
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if into else (stdin if stdin is not None else subprocess.DEVNULL),
                stdout=out if into else subprocess.PIPE,
                stderr=err,
                env=_child_env(secrets),
            )
        except FileNotFoundError:
            raise BackupError(f"{argv[0]}: command not found on PATH") from None
        pipe = proc.stdin if into else proc.stdout
        assert pipe is not None
        _grow_pipe(pipe.fileno())
        stream = Stream(pipe)
        try:
            try:
                yield stream
                if not into:
                    while pipe.read(COPY_CHUNK):
                        pass  # tar readers stop before the trailing padding; let the child finish
            finally:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise CommandError(argv, None, err.read()) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        stream.stderr = err.read()
        if check and returncode != 0:
            raise CommandError(argv, returncode, stream.stderr)


@contextlib.contextmanager
def stream_from(argv: list[str], *, timeout: float | None = None, secrets: dict[str, str] | None = None) -> Iterator[IO[bytes]]:
    """Yield the stdout of argv as a binary stream; check its exit status at the end.

    The sibling of run() for output too large to hold in memory. Like `set -o pipefail`,
    a non-zero exit fails the whole step even if the stream looked complete. Raise
    CommandError on failure; the child is killed if the consumer fails first.
    """
    with _streaming(argv, into=False, timeout=timeout, secrets=secrets, check=True) as stream:
        yield stream.pipe


@contextlib.contextmanager
def stream_into(argv: list[str], *, timeout: float | None = None, secrets: dict[str, str] | None = None, check: bool = True) -> Iterator[Stream]:
    """Yield a Stream whose pipe is the stdin of argv; its stderr is kept for the caller.

    Raise CommandError (with check) if the child exits non-zero once stdin is closed.
    """
    with _streaming(argv, into=True, timeout=timeout, secrets=secrets, check=check) as stream:
        yield stream


def docker(args: list[str], *, timeout: float, check: bool = True, secrets: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run one docker CLI command through run()."""
    return run(["docker", *args], timeout=timeout, check=check, secrets=secrets)


def exec_argv(container: str, argv: list[str], *, secrets: dict[str, str] | None = None, stdin: bool = False) -> list[str]:
    """Return `docker exec` argv for a command in container; secrets are passed by name.

    Never `-t`: a TTY rewrites line endings and corrupts binary streams.
    """
    names = [flag for name in sorted(secrets or {}) for flag in ("-e", name)]
    return ["docker", "exec", *(["-i"] if stdin else []), *names, container, *argv]


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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Operator-tunable settings; classes.toml < environment < command line."""

    platform_root: str = DEFAULT_PLATFORM_ROOT
    backup_dir: str = ""  # empty: <platform_root>/backups
    docker_timeout: float = 60.0
    pause_timeout: float = 1800.0
    lock_timeout: float = 0.0
    compression: str = "gzip"
    compress_level: int = 6
    zstd_level: int = 2
    gzip_tool: str = "auto"
    snapshot_timeout: float = 600.0
    drill_timeout: float = 300.0
    space_margin_mb: float = 256.0
    redis_password_env: str = "REDIS_PASSWORD"  # noqa: S105 (a variable name, not a password)


DEFAULT_SETTINGS = Settings()

# setting -> (environment variable, command-line flag or ""); its type is the default's in Settings
SETTING_SOURCES: dict[str, tuple[str, str]] = {
    "platform_root": ("PLATFORM_ROOT", "--platform-root"),
    "backup_dir": ("BACKUP_DIR", "--backup-dir"),
    "docker_timeout": ("BBA_DOCKER_TIMEOUT", "--docker-timeout"),
    "pause_timeout": ("BBA_PAUSE_TIMEOUT", "--pause-timeout"),
    "lock_timeout": ("BBA_LOCK_TIMEOUT", "--lock-timeout"),
    "compression": ("BBA_COMPRESSION", "--compression"),
    "compress_level": ("BBA_COMPRESS_LEVEL", "--compress-level"),
    "zstd_level": ("BBA_ZSTD_LEVEL", "--zstd-level"),
    "gzip_tool": ("BBA_GZIP_TOOL", ""),
    "snapshot_timeout": ("BBA_SNAPSHOT_TIMEOUT", "--snapshot-timeout"),
    "drill_timeout": ("BBA_DRILL_TIMEOUT", "--drill-timeout"),
    "space_margin_mb": ("BBA_SPACE_MARGIN_MB", "--space-margin-mb"),
    "redis_password_env": ("BBA_REDIS_PASSWORD_ENV", ""),
}
SETTING_CHOICES: dict[str, tuple[str, ...]] = {"compression": ("gzip", "zstd"), "gzip_tool": ("auto", "pigz", "zlib")}
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "docker_timeout": (1, 86400),
    "pause_timeout": (1, 86400),
    "lock_timeout": (0, 86400),
    "compress_level": (1, 9),
    "zstd_level": (1, 19),
    "snapshot_timeout": (1, 86400),
    "drill_timeout": (1, 86400),
    "space_margin_mb": (0, 1 << 30),
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


CLASS_KEYS = {"title": str, "patterns": list, "procedure": str, "fallback": str, "restore": str, "default": bool, "options": dict}
# Options a procedure takes from [classes.X.options]: name -> (type, default).
PROCEDURE_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "vault-raft-snapshot": {"token_env": (str, "VAULT_TOKEN"), "vault_addr": (str, "")},
    "mc-mirror": {"alias_env": (str, "MINIO_MC_ALIAS")},
    "search-engine": {"meilisearch_dump": (bool, False), "meilisearch_url": (str, "http://127.0.0.1:7700")},
    "compose-root-archive": {"compose_root": (str, "")},
}
CLASS_REQUIRED = ("title", "patterns", "procedure", "fallback", "restore")
NO_FALLBACK = "none"


def check_setting(name: str, value: Any, where: str) -> Any:
    """Return value converted to the setting's type. Raise UsageError naming where."""
    kind = type(getattr(DEFAULT_SETTINGS, name))
    try:
        if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if name in SETTING_CHOICES and converted not in SETTING_CHOICES[name]:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(SETTING_CHOICES[name])}")
    if name in SETTING_LIMITS:
        low, high = SETTING_LIMITS[name]
        if not low <= converted <= high:
            raise UsageError(f"{where}: {value!r} is outside {low:g}..{high:g}")
    return converted


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
        if table["procedure"] not in PROCEDURE_NAMES:
            raise UsageError(f"{where}.procedure: unknown procedure {table['procedure']!r} (known: {', '.join(PROCEDURE_NAMES)})")
        if table["fallback"] not in (*PROCEDURE_NAMES, NO_FALLBACK):
            raise UsageError(f"{where}.fallback: unknown procedure {table['fallback']!r} (known: {', '.join(PROCEDURE_NAMES)}, none)")
        known = PROCEDURE_OPTIONS.get(table["procedure"], {})
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
_DQ_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\", "/": "/", " ": " ", "e": "\x1b"}


@dataclasses.dataclass
class _Line:
    number: int
    indent: int
    text: str


class _YamlReader:
    """The block-style YAML that people write by hand in module.yaml.

    Handles comments, plain/single/double-quoted scalars, nested maps, block sequences
    (also at the parent key's indentation), one-line flow collections, and literal and
    folded block scalars. Rejects tabs in indentation, duplicate keys, anchors, aliases,
    tags, multi-line flow or quoted scalars and several documents, each with file:line.
    """

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.raw = text.split("\n")
        self.pos = 0
        self.in_document = False  # a '---' before the first content line is allowed
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
        return _Line(index + 1, len(raw) - len(body), text)

    def peek(self) -> _Line | None:
        while self.pos < len(self.raw):
            line = self._structural(self.pos)
            if line is not None:
                if self.in_document and line.indent == 0 and line.text in ("---", "..."):
                    raise self.fail(line.number, "a second YAML document in one file is not supported")
                return line
            self.pos += 1
        return None

    # -- document

    def document(self) -> Any:
        line = self.peek()
        if line is not None and line.indent == 0 and line.text.startswith("---"):
            if line.text != "---":
                raise self.fail(line.number, "content after '---' is not supported")
            self.pos += 1
        self.in_document = True
        line = self.peek()
        if line is None:
            return None
        if line.indent != 0:
            raise self.fail(line.number, "the document must start at column 1")
        value = self.block(0, ())
        leftover = self.peek()
        if leftover is not None:
            raise self.fail(leftover.number, "unexpected indentation or content")
        return value

    def block(self, indent: int, path: tuple[str, ...]) -> Any:
        line = self.peek()
        assert line is not None and line.indent == indent
        if line.text == "-" or line.text.startswith("- "):
            return self.sequence(indent, path)
        return self.mapping(indent, path)

    def mapping(self, indent: int, path: tuple[str, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (line := self.peek()) is not None and line.indent == indent:
            if line.text == "-" or line.text.startswith("- "):
                raise self.fail(line.number, "a list item where a 'key: value' line was expected")
            match = _KEY_RE.match(line.text)
            if not match:
                raise self.fail(line.number, f"expected 'key: value', got {line.text!r}")
            key = str(self.scalar(match["key"], line.number, is_key=True))
            if key in result:
                raise self.fail(line.number, f"duplicate key {key!r} (first on line {self.key_lines[(*path, key)]})")
            self.key_lines[(*path, key)] = line.number
            self.pos += 1
            result[key] = self.value_after_key(match["rest"], line, (*path, key))
        line = self.peek()
        if line is not None and line.indent > indent:
            raise self.fail(line.number, "unexpected indentation")
        return result

    def value_after_key(self, rest: str, line: _Line, path: tuple[str, ...]) -> Any:
        if rest:
            if rest[0] in "|>":
                return self.block_scalar(rest, line)
            return self.inline(rest, line.number)
        nxt = self.peek()
        if nxt is None:
            return None
        if nxt.indent > line.indent:
            return self.block(nxt.indent, path)
        if nxt.indent == line.indent and (nxt.text == "-" or nxt.text.startswith("- ")):
            return self.sequence(line.indent, path)
        return None

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
                items.append(self.block(nxt.indent, item_path) if nxt is not None and nxt.indent > indent else None)
            elif _KEY_RE.match(rest) or rest == "-" or rest.startswith("- "):
                # "- key: value" (or "- - item"): the item is a block whose first line
                # starts at the column of "key"; the line is re-read with that indentation.
                column = indent + len(line.text) - len(rest)
                self.raw[self.pos] = " " * column + self.raw[self.pos][column:]
                items.append(self.block(column, item_path))
            elif rest[0] in "|>":
                self.pos += 1
                items.append(self.block_scalar(rest, line))
            else:
                self.pos += 1
                items.append(self.inline(rest, line.number))
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

    def inline(self, text: str, number: int) -> Any:
        if text[0] in "[{":
            value, end = self.flow(text, 0, number)
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

    def flow(self, text: str, i: int, number: int) -> tuple[Any, int]:
        """Parse a flow collection starting at text[i]; return (value, index after it)."""
        opener = text[i]
        closer = "]" if opener == "[" else "}"
        items: list[Any] = []
        mapping: dict[str, Any] = {}
        i += 1
        while True:
            i = _skip_spaces(text, i)
            if i >= len(text):
                raise self.fail(number, f"unclosed {opener!r} (multi-line flow collections are not supported)")
            if text[i] == closer:
                return (items if opener == "[" else mapping), i + 1
            if text[i] in "[{":
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
                if key is None or i >= len(text) or text[i] != ":":
                    raise self.fail(number, "expected 'key: value' inside {...}")
                name = str(self.scalar(key, number, is_key=True))
                if name in mapping:
                    raise self.fail(number, f"duplicate key {name!r}")
                i = _skip_spaces(text, i + 1)
                if i < len(text) and text[i] in "[{":
                    mapping[name], i = self.flow(text, i, number)
                else:
                    token, i = _flow_token(text, i)
                    mapping[name] = self.scalar(token, number) if token else None
            else:
                items.append(value if key is None else self.scalar(key, number))
            i = _skip_spaces(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
            elif i < len(text) and text[i] != closer:
                raise self.fail(number, f"expected ',' or {closer!r} in flow collection")


def _strip_comment(text: str) -> str:
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and not (quote == '"' and _escaped(text, i)):
                quote = ""
        elif ch in "\"'" and (i == 0 or text[i - 1] in " \t:[{,-"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i]
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


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Return the document in text and the line of every mapping key (by key path).

    Raise YamlError with filename:line if the text holds anything the reader would
    have to guess at.
    """
    reader = _YamlReader(text, filename)
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
    doc, lines = parse_yaml(text.removeprefix("\ufeff"), str(yaml_path))
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
    read-only mounts, tmpfs, the docker socket, kernel filesystems, single-file binds.
    """
    included: list[MountPlan] = []
    skipped: list[tuple[str, str]] = []
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
    """Return the apparent size in bytes of the files under path (hard links once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                if st.st_nlink > 1:
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
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
def module_lock(dir_fd: int, module_id: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on <backup-dir>/.<module>.lock for the whole run.

    The kernel drops an flock when its holder dies, so a killed run never leaves a stale
    lock. Raise RefusedError naming the holder's pid if the lock stays taken past timeout.
    """
    name = f".{module_id}.lock"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                    raise RefusedError(f"another backup of {module_id!r} is running (pid {holder}; lock {name})") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_partials(dir_fd: int, module_id: str) -> None:
    """Remove <module>-*.partial left by a killed run; only called under the module lock."""
    stale = re.compile(re.escape(module_id) + r"-[0-9]{8}T[0-9]{6}Z\.[a-z.]+\.partial")  # incl. class G's .pgdump.sql.gz
    for name in os.listdir(dir_fd):
        if stale.fullmatch(name):
            LOG.warning("removing %s left by an interrupted run", name)
            os.unlink(name, dir_fd=dir_fd)


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
    """Writes everything to a pipe's fd (a compressor's stdin)."""

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
    RUN_COUNTS[argv[0]] += 1
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
            proc.kill()
            returncode = proc.wait()
            pump.thread.join()
            if pump.error is not None and isinstance(exc, OSError):
                raise pump.error from None  # the broken pipe came from stopping the compressor for this
            if isinstance(exc, BrokenPipeError):
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
    """Checks a backup from the bytes as they are written, on a second core.

    The bytes go into a pipe whose other end scan reads on a thread; for zstd that end is
    the stdin of the `zstd -d` child itself, so the bytes never pass through Python again.
    Reading the file back just after writing it would read the page cache, not the disk,
    so this gives the same assurance without a second pass over the data.
    """

    def __init__(self, scan: Callable[[IO[bytes]], dict[str, Any]]) -> None:
        read_end, self.fd = os.pipe()  # the pipe's size bounds what is in flight: constant memory
        _grow_pipe(self.fd)
        self.source = os.fdopen(read_end, "rb")
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(scan,), daemon=True)
        self.thread.start()

    def _run(self, scan: Callable[[IO[bytes]], dict[str, Any]]) -> None:
        try:
            self.result = scan(self.source)
        except BaseException as exc:  # re-raised by finish()
            self.error = exc
        finally:
            with contextlib.suppress(OSError, ValueError):
                while os.read(self.source.fileno(), COPY_CHUNK):
                    pass  # keep taking bytes until the writer is done, so that it never blocks
            self.source.close()

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
    """A path in the container to archive, where to read it, and the mount it counts under."""

    path: str
    host: str | None  # a readable host path, or None to stream it with docker cp
    group: str
    prefix: str = ""  # put in the archive under prefix + path (class G keeps containers apart)
    container: str | None = None  # the container to docker cp from, when not the job's


def locate(path: str, mounts: list[MountPlan]) -> ArchiveItem:
    """Return how to read a container path: through the mount that holds it, if any."""
    holders = [m for m in mounts if _inside(path, [m.destination])]
    if not holders:
        return ArchiveItem(path, None, path)
    mount = max(holders, key=lambda m: len(m.destination))
    rel = os.path.relpath(path, mount.destination)
    host = None if mount.via != "host" else (mount.source if rel == "." else os.path.join(mount.source, rel))
    return ArchiveItem(path, host, mount.destination)


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


def _tar_field(value: int, digits: int) -> bytes:
    # tarfile.itn for GNU_FORMAT: octal while it fits, else GNU base-256.
    if 0 <= value < 1 << (3 * (digits - 1)):
        return b"%0*o\0" % (digits - 1, value)
    limit = 1 << (8 * (digits - 1))
    if not -limit <= value < limit:
        raise ValueError(f"{value} does not fit in a {digits}-byte tar field")
    return (b"\x80" if value >= 0 else b"\xff") + (value % limit).to_bytes(digits - 1, "big")


def _tar_block(name: bytes, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, linkname: bytes, devices: bytes) -> bytes:
    block = b"".join((
        name[:100].ljust(100, b"\0"), _tar_field(mode & 0o7777, 8), _tar_field(uid, 8), _tar_field(gid, 8),
        _tar_field(size, 12), _tar_field(mtime, 12), b"        ", kind, linkname[:100].ljust(100, b"\0"),
        tarfile.GNU_MAGIC, b"\0" * 64, devices, b"\0" * 167,
    ))
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


def _tar_long_name(name: bytes, kind: bytes) -> bytes:
    payload = name + b"\0"
    return _tar_block(b"././@LongLink", kind, 0, 0, 0, len(payload), 0, b"", b"\0" * 16) + payload + b"\0" * (-len(payload) % 512)


def tar_header(entry: TarEntry) -> bytes:
    """Return the GNU tar header block(s) of entry: what tarfile writes for it in GNU_FORMAT.

    Names longer than 100 bytes get GNU long-name blocks first. Raise ValueError if a
    number does not fit even in base-256.
    """
    name = (entry.name + "/" if entry.kind == tarfile.DIRTYPE else entry.name).encode("utf-8", "surrogateescape")
    linkname = entry.linkname.encode("utf-8", "surrogateescape")
    devices = (_tar_field(entry.devmajor, 8) + _tar_field(entry.devminor, 8)) if entry.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE) else b"\0" * 16
    head = b""
    if len(linkname) > 100:
        head += _tar_long_name(linkname, tarfile.GNUTYPE_LONGLINK)
    if len(name) > 100:
        head += _tar_long_name(name, tarfile.GNUTYPE_LONGNAME)
    return head + _tar_block(name, entry.kind, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime, linkname, devices)


SMALL_FILE = 256 << 10  # read into the write buffer; bigger files go to the sink in pieces, or by sendfile


class TarWriter:
    """Writes a GNU tar stream to a StreamSink in large writes.

    Byte for byte what tarfile writes in GNU_FORMAT, without its per-member costs
    (a TarInfo copy, a member list that grows with every file, a write per header). Small
    files are gathered into one buffer; bigger ones are sent by the kernel when the sink is
    a pipe, and read a megabyte at a time otherwise.
    """

    def __init__(self, sink: StreamSink, progress: Progress | None = None) -> None:
        self.sink, self.progress = sink, progress
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
        self.offset += count
        if self.progress is not None:
            self.progress.add(count)

    def add(self, entry: TarEntry) -> None:
        """Write an entry that has no data (a directory, link, device or fifo)."""
        self._emit(tar_header(entry))

    def add_file(self, entry: TarEntry, fd: int) -> bool:
        """Write a regular file from fd, exactly entry.size bytes.

        Return False if the file was shorter than entry.size (it shrank while it was read):
        the rest is zeros, as GNU tar does when a "file changed as we read it".
        """
        self._emit(tar_header(entry))
        left = entry.size
        if left <= SMALL_FILE:
            while left:
                data = os.read(fd, left)
                if not data:
                    break
                self.buffer += data
                left -= len(data)
        else:
            self.flush()
            while left:
                if self.sink.fd is not None:
                    sent = os.sendfile(self.sink.fd, fd, None, min(left, 64 * COPY_CHUNK))
                    self._done(sent)
                else:
                    data = os.read(fd, min(left, COPY_CHUNK))
                    sent = len(data)
                    if sent:
                        self.sink.write(data)
                        self._done(sent)
                if not sent:
                    break
                left -= sent
        return self._end_member(entry, left)

    def add_stream(self, entry: TarEntry, source: IO[bytes]) -> bool:
        """Write a regular file read from source; like add_file, False if it was short."""
        self._emit(tar_header(entry))
        left = entry.size
        while left and (data := source.read(min(left, COPY_CHUNK))):
            self._emit(data)
            left -= len(data)
        return self._end_member(entry, left)

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
_LISTING_KIND = {tarfile.LNKTYPE: "h", tarfile.REGTYPE: "f", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l"}


@dataclasses.dataclass
class ArchiveStats:
    """What went into an archive, per mount and in total.

    listing_sha256 is an order-independent digest (a sum of per-entry hashes) of every
    entry's name, type, mode, owner, size and link target, so that a drill can compare a
    restored tree with the backup without holding the file list in memory.
    """

    members: int = 0
    files: int = 0
    data_bytes: int = 0
    per_mount: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

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
        line = f"{entry.name}\0{kind}\0{entry.mode & 0o7777:o}\0{entry.uid}\0{entry.gid}\0{entry.size if kind == 'f' else ''}\0{entry.linkname if kind == 'l' else ''}"
        digest = int.from_bytes(hashlib.sha256(line.encode("utf-8", "surrogateescape")).digest(), "big")
        tally["listing_sha256"] = (tally["listing_sha256"] + digest) % _LISTING_MODULUS

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            group: {**tally, "listing_sha256": f"{tally['listing_sha256']:064x}"}
            for group, tally in self.per_mount.items()
        }


def _forget_members(tar: tarfile.TarFile) -> None:
    # tarfile keeps every member it has read (~0.5 KiB each; not in the typed API);
    # dropping them keeps memory constant whatever the number of files.
    tar.members.clear()  # type: ignore[attr-defined]


def _inside(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never follow a swapped-in symlink, never wait on a fifo


def entry_for(path: str, name: str, st: os.stat_result, hard_links: dict[tuple[int, int], str]) -> TarEntry | None:
    """Return the archive entry of path from its stat, or None for a socket.

    Like TarFile.gettarinfo, without its user/group name lookups (owners are numeric
    here), remembering inodes only for files with more than one link (constant memory).
    """
    mode = st.st_mode
    entry = TarEntry(name, tarfile.REGTYPE, stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime))
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
        entry.kind, entry.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(mode):
        entry.kind = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        entry.kind = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return entry


def archive_from_host(tar: TarWriter, item: ArchiveItem, nested: list[str], stats: ArchiveStats) -> None:
    """Add the host path of an item to tar under its path in the container.

    Regular files are opened without following symlinks and described from the open
    file, so that a file swapped for a link between the listing and the read cannot put
    a host file into the backup. Raise BackupError if the item's own path is gone: a
    backup without a whole mount must not look finished.
    """
    assert item.host is not None
    if not os.path.lexists(item.host):
        raise BackupError(f"source of {item.path} vanished: {item.host} does not exist")
    hard_links: dict[tuple[int, int], str] = {}
    stack = [(item.host, item.path.strip("/"))]
    while stack:
        path, rel = stack.pop()
        if nested and "/" + rel != item.path and _inside("/" + rel, nested):
            continue  # archived on its own, as a mount of its own
        name = item.prefix + rel
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                entry = entry_for(path, name, st, hard_links)
                if entry is not None:
                    tar.add(entry)
            else:
                entry = _add_host_file(tar, path, name, hard_links, stats)
        except FileNotFoundError:
            stats.warnings.append(f"vanished while archiving: /{name}")
            continue
        if entry is None:
            continue  # sockets and other types tar cannot hold
        stats.count(item.group, entry)
        if entry.kind == tarfile.DIRTYPE:
            try:
                names = sorted(os.listdir(path), reverse=True)
            except FileNotFoundError:
                continue
            stack.extend((f"{path}/{n}", f"{rel}/{n}") for n in names)


def _add_host_file(tar: TarWriter, path: str, name: str, hard_links: dict[tuple[int, int], str], stats: ArchiveStats) -> TarEntry | None:
    try:
        fd = os.open(path, _OPEN_FILE)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):
            raise
        stats.warnings.append(f"replaced by a link or socket while archiving, left out: /{name}")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            stats.warnings.append(f"replaced by a non-regular file while archiving, left out: /{name}")
            return None
        entry = entry_for(path, name, st, hard_links)
        assert entry is not None
        if entry.kind == tarfile.LNKTYPE:
            tar.add(entry)
        elif not tar.add_file(entry, fd):
            stats.warnings.append(f"file changed as we read it: /{name}")
        return entry
    finally:
        os.close(fd)


def entry_of(member: tarfile.TarInfo, name: str, linkname: str) -> TarEntry:
    """Return the archive entry of a member read from a tar stream, under name and linkname."""
    regular = member.isreg()
    return TarEntry(name, tarfile.REGTYPE if regular else member.type, member.mode, member.uid, member.gid, int(member.mtime),
                    member.size if regular else 0, linkname, member.devmajor, member.devminor)


def archive_through_docker(tar: TarWriter, container: str, item: ArchiveItem, nested: list[str], stats: ArchiveStats, timeout: float) -> None:
    """Stream a container path out with `docker cp` and add it under the same path.

    Works with any engine the docker CLI reaches (remote DOCKER_HOST, rootless), and
    keeps the owners as the container sees them (as numbers: names on this host mean
    nothing in the container, like tar --numeric-owner).
    """
    # `docker cp C:/a/b -` names entries "b", "b/x": rebase them on "a".
    parent = posixpath.dirname(item.path.rstrip("/")).strip("/")
    with stream_from(["docker", "cp", f"{container}:{item.path}", "-"], timeout=timeout) as pipe:
        with tarfile.open(fileobj=pipe, mode="r|") as source:
            for member in source:
                name = posixpath.normpath(posixpath.join(parent, member.name)).lstrip("/")
                if "/" + name != item.path and _inside("/" + name, nested):
                    continue
                linkname = member.linkname
                if member.islnk():
                    linkname = item.prefix + posixpath.normpath(posixpath.join(parent, linkname)).lstrip("/")
                entry = entry_of(member, item.prefix + name, linkname)
                if member.isreg():
                    data = source.extractfile(member)
                    assert data is not None
                    if not tar.add_stream(entry, data):
                        stats.warnings.append(f"file cut short in the docker cp stream: /{entry.name}")
                else:
                    tar.add(entry)
                _forget_members(source)
                stats.count(item.group, entry)


def archive_items(tar: TarWriter, container: str, items: list[ArchiveItem], skipped: list[str], stats: ArchiveStats, timeout: float) -> None:
    """Add every item to tar; a path that is its own item (or skipped) is not repeated."""
    for item in items:
        # Only paths of the same container (same prefix) can hide inside each other.
        paths = [i.path for i in items if i.prefix == item.prefix] + (skipped if not item.prefix else [])
        nested = [p for p in paths if p != item.path and _inside(p, [item.path])]
        LOG.info("archiving %s via %s", item.path, "host path " + item.host if item.host else "docker cp")
        if item.host is not None:
            archive_from_host(tar, item, nested, stats)
        else:
            archive_through_docker(tar, item.container or container, item, nested, stats, timeout)


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for big numbers
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class _TarInput:
    """The decompressed tar stream of a scan: exact reads for headers, skips for data.

    From a pipe (the zstd -d child) data is skipped with splice(2) into /dev/null, so a
    verification never copies the archive's contents into the process; from any other
    stream it is read into one reused buffer.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.fd: int | None = None
        self.null: int | None = None
        self.buffer = memoryview(bytearray(COPY_CHUNK))
        if isinstance(raw, io.BufferedReader) and stat.S_ISFIFO(os.fstat(raw.fileno()).st_mode):
            self.fd = raw.fileno()  # nothing was read through raw's own buffer yet
            self.null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def read(self, size: int) -> bytes:
        if self.fd is None:
            return self.raw.read(size)
        data = os.read(self.fd, size)
        while data and len(data) < size:  # a pipe hands over what it has
            more = os.read(self.fd, size - len(data))
            if not more:
                break
            data += more
        return data

    def skip(self, size: int) -> int:
        """Skip up to size bytes (to the end of the stream if size < 0); return how many were there."""
        done = 0
        while size < 0 or done < size:
            want = COPY_CHUNK if size < 0 else min(size - done, COPY_CHUNK)
            if self.fd is not None and self.null is not None:
                got = os.splice(self.fd, self.null, want)
            else:
                got = self.raw.readinto(self.buffer[:want])  # type: ignore[attr-defined]
            if not got:
                break
            done += got
        return done

    def close(self) -> None:
        if self.null is not None:
            os.close(self.null)
            self.null = None


def scan_tar(fh: IO[bytes], fmt: str = "tar.gz", *, rdb_member: str | None = None) -> dict[str, Any]:
    """Read a compressed tar to its end and return what it holds. Raise BackupError if it is not complete.

    The compressed stream must be complete (gzip CRC and length trailer, zstd frame) and
    the tar well-formed to its end-of-archive marker: every header's checksum, every
    member's data present. Headers are walked directly (tarfile parses every field of
    every header, which costs as much as writing the archive); with rdb_member, that
    member must start with the RDB magic.
    """
    members = 0
    rdb_magic = None
    long_name: bytes | None = None
    try:
        with decompressing(fh, fmt) as raw, contextlib.closing(_TarInput(raw)) as tar:
            while True:
                header = tar.read(512)
                if len(header) < 512:
                    raise BackupError("the tar stream ends before its end-of-archive marker")
                if header == _ZERO_BLOCK:
                    break
                chksum = header[148:156]
                if _tar_number(chksum) != sum(header) - sum(chksum) + 256:
                    raise BackupError(f"tar header {members + 1} has a bad checksum")
                size, kind = _tar_number(header[124:136]), header[156:157]
                blocks = (size + 511) // 512 * 512
                if kind in (b"L", b"K", b"x", b"g"):  # a long name or extended header, not a member
                    data = tar.read(blocks)
                    if len(data) < blocks:
                        raise BackupError("the tar stream ends inside an extended header")
                    long_name = data[:size].rstrip(b"\0") if kind == b"L" else long_name
                    continue
                members += 1
                if kind in (b"1", b"2", b"5", b"3", b"4", b"6"):
                    blocks = 0  # links, directories, devices and fifos have no data
                first = b""
                if rdb_member is not None:
                    name = long_name or (header[345:500].rstrip(b"\0") + b"/" if header[345:346] != b"\0" else b"") + header[:100].rstrip(b"\0")
                    if name.decode("utf-8", "surrogateescape") == rdb_member:
                        first = tar.read(min(blocks, 512))
                        rdb_magic = first[:5] == REDIS_RDB_MAGIC
                long_name = None
                if len(first) + tar.skip(blocks - len(first)) < blocks:
                    raise BackupError(f"the tar stream ends inside member {members}")
            tar.skip(-1)  # the rest of the record and the compressor's trailer
    except BackupError as exc:
        raise BackupError(f"archive is not a complete {fmt} ({exc})") from None
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise BackupError(f"archive is not a complete {fmt} ({exc})") from None
    result: dict[str, Any] = {f"{compression_of(fmt)}_complete": True, "tar_readable": True, "members": members}
    if rdb_member is not None:
        if rdb_magic is None:
            raise BackupError(f"archive has no {rdb_member}")
        if not rdb_magic:
            raise BackupError(f"{rdb_member} does not start with the RDB magic 'REDIS'")
        result["rdb_magic"] = True
    return result


def scan_sql(fh: IO[bytes], fmt: str = "sql.gz") -> dict[str, Any]:
    """Read a compressed pg_dumpall script to its end and return its checks.

    Raise BackupError if the compressed stream is incomplete, the dump's trailer line is
    missing, or the dump is too small to be a cluster dump.
    """
    size = 0
    tail = b""
    try:
        with decompressing(fh, fmt) as raw:
            while chunk := raw.read(COPY_CHUNK):
                size += len(chunk)
                tail = (tail + chunk)[-PG_TAIL_BYTES:]
    except (OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"dump is not a complete {compression_of(fmt)} stream ({exc})") from None
    return {**check_sql_dump(size, tail), f"{compression_of(fmt)}_complete": True}


def check_sql_dump(size: int, tail: bytes) -> dict[str, Any]:
    """Return the checks of a dump from its size and last bytes. Raise BackupError if one fails."""
    if PG_TRAILER not in tail:
        raise BackupError(f"dump has no trailer line {PG_TRAILER.decode()!r}: pg_dumpall did not finish")
    if size < PG_MIN_DUMP_BYTES:
        raise BackupError(f"dump is only {size} bytes: too small to be a cluster dump")
    return {"trailer": True, "sql_bytes": size}


# --------------------------------------------------------------------------- class procedures


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
    secondary: str | None = None
    compression: Compression = Compression("gzip", 6, "zlib")
    estimated_bytes: int | None = None  # from the free-space check, for the progress ETA  # class G: the procedure the module's own kind also needs

    @property
    def basename(self) -> str:
        return f"{self.module.id}-{self.timestamp}"

    @property
    def container(self) -> str:
        return self.resolution.name


@dataclasses.dataclass
class BackupResult:
    """What a procedure wrote and proved."""

    path: Path
    format: str  # "tar.gz" or "sql.gz"
    size: int
    sha256: str
    verification: dict[str, Any]
    contents: dict[str, Any]
    warnings: list[str]
    archived: list[str] = dataclasses.field(default_factory=list)
    paused_seconds: float | None = None
    fallback: dict[str, str] | None = None
    server: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def paused(container: str, timeout: float) -> Iterator[float]:
    """Freeze the container for the duration of the block and always unpause it.

    Yields the monotonic time the pause began. The unpause is attempted even if the pause
    command itself was interrupted (the daemon may have paused the container anyway).
    Raise BackupError loudly if the container could not be unpaused, with the command to
    run by hand.
    """
    started = time.monotonic()
    try:
        docker(["pause", container], timeout=timeout)
        LOG.warning("container %s is PAUSED for the archive", container)
        yield started
    finally:
        with signals_deferred():
            proc = docker(["unpause", container], timeout=timeout, check=False)
            if proc.returncode != 0 and b"is not paused" not in proc.stderr:
                detail = CommandError(["docker", "unpause", container], proc.returncode, proc.stderr)
                raise BackupError(f"container {container} is STILL PAUSED; run `docker unpause {container}` now ({detail})")
            LOG.info("container %s unpaused after %.1fs", container, time.monotonic() - started)


def write_archive(
    job: BackupJob,
    dir_fd: int,
    items: list[ArchiveItem],
    *,
    rdb_member: str | None = None,
    before_commit: Callable[[dict[str, Any]], None] | None = None,
) -> BackupResult:
    """Archive items into <module>-<ts>.tar.gz (paused with --pause), verify it as written, publish it.

    before_commit may add to the verification results or raise to discard the archive.
    """
    stats = ArchiveStats()
    skipped = [d for d, _ in job.skipped]
    paused_seconds = None
    fmt = "tar." + job.compression.suffix
    with PartialFile(dir_fd, f"{job.basename}.{fmt}", job.backup_dir) as out, \
            verifying(out, lambda fh: scan_tar(fh, fmt, rdb_member=rdb_member)) as verified, \
            contextlib.closing(Progress("archive", job.estimated_bytes)) as progress:
        pause = paused(job.container, job.settings.docker_timeout) if job.pause else contextlib.nullcontext(None)
        with pause as pause_started:
            with compressing(out, job.compression) as packed:
                tar = TarWriter(packed, progress)
                archive_items(tar, job.container, items, skipped, stats, job.settings.pause_timeout)
                tar.close()
            if pause_started is not None:
                paused_seconds = round(time.monotonic() - pause_started, 3)
        verification = verified()
        if verification["members"] != stats.members:
            raise BackupError(f"verification failed: archive holds {verification['members']} entries, {stats.members} were written")
        if stats.files == 0:
            stats.warnings.append("the archived paths hold no regular files: this archive contains directories only")
        if before_commit is not None:
            before_commit(verification)
        path = out.commit()
    return BackupResult(
        path=path,
        format=fmt,
        size=out.size,
        sha256=out.sha256.hexdigest(),
        verification=verification,
        contents={"members": stats.members, "files": stats.files, "data_bytes": stats.data_bytes, "per_mount": stats.summary()},
        warnings=stats.warnings,
        archived=[i.path for i in items],
        paused_seconds=paused_seconds,
    )


def procedure_mounted_archive(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class E: archive every writable mount into <module>-<ts>.tar.gz, then verify it."""
    if not job.mounts:
        raise BackupError(f"container {job.container} has no writable mounts to archive; nothing would be backed up")
    items = [ArchiveItem(m.destination, m.source if m.via == "host" else None, m.destination) for m in job.mounts]
    return write_archive(job, dir_fd, items)


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


# -- fallback and single files copied out of a container


def fall_back(job: BackupJob, dir_fd: int, reason: str, restore_hint: str = "") -> BackupResult:
    """Take the class's fallback (a mounted data archive) loudly, or fail if it has none."""
    if job.cls.fallback != "mounted-archive":
        raise BackupError(f"{job.procedure} is not possible ({reason}) and class {job.cls.letter} has no fallback")
    hint = f"; {restore_hint}" if restore_hint else ""
    LOG.warning("%s NOT POSSIBLE (%s): FALLING BACK to a live copy of the mounted data%s", job.procedure.upper(), reason, hint)
    result = procedure_mounted_archive(job, dir_fd)
    result.fallback = {"procedure": "mounted-archive", "reason": reason}
    result.warnings.insert(0, f"fallback to mounted-archive: {reason}{hint}")
    return result


def copy_out_file(job: BackupJob, dir_fd: int, path: str, suffix: str, scan: Callable[[IO[bytes]], dict[str, Any]],
                  before_commit: Callable[[dict[str, Any]], None] | None = None) -> BackupResult:
    """Copy one file out of the container (docker cp) into <module>-<ts><suffix>, scan it, publish it."""
    name = job.basename + suffix
    with PartialFile(dir_fd, name, job.backup_dir) as out:
        with stream_from(["docker", "cp", f"{job.container}:{path}", "-"], timeout=job.settings.pause_timeout) as pipe:
            with tarfile.open(fileobj=pipe, mode="r|") as tar:
                member = tar.next()
                if member is None or not member.isreg():
                    raise BackupError(f"{job.container}:{path} is not a regular file")
                source = tar.extractfile(member)
                assert source is not None
                while chunk := source.read(COPY_CHUNK):
                    out.write(chunk)
        with out.reopen_for_reading() as fh:
            verification = scan(fh)
        if before_commit is not None:
            before_commit(verification)
        result_path = out.commit()
    return BackupResult(
        path=result_path, format=suffix.lstrip("."), size=out.size, sha256=out.sha256.hexdigest(),
        verification=verification, contents={"source": f"{job.container}:{path}"}, warnings=[], archived=[path],
    )


def read_tar_gz_files(fh: IO[bytes], wanted: Callable[[str], bool]) -> tuple[dict[str, int], dict[str, str], dict[str, bytes]]:
    """Read a tar.gz to its end: sizes and sha256 of every file, and the bytes of small wanted ones.

    Raise BackupError if it is not a complete tar.gz.
    """
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    try:
        with decompressing(fh, "tar.gz") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    digest = hashlib.sha256()
                    keep = wanted(member.name) and member.size <= COPY_CHUNK
                    while chunk := extracted.read(COPY_CHUNK):
                        digest.update(chunk)
                        if keep:
                            kept[member.name] = kept.get(member.name, b"") + chunk
                    sizes[member.name], digests[member.name] = member.size, digest.hexdigest()
                _forget_members(tar)
            while raw.read(COPY_CHUNK):
                pass
    except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
        raise BackupError(f"not a complete tar.gz ({exc})") from None
    return sizes, digests, kept


# -- class C: Vault


def scan_vault_snapshot(fh: IO[bytes]) -> dict[str, Any]:
    """Check a raft snapshot: a complete gzip'd tar whose SHA256SUMS match its members."""
    sizes, digests, kept = read_tar_gz_files(fh, lambda name: name == "SHA256SUMS")
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


def procedure_vault_raft_snapshot(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class C: `vault operator raft snapshot save` in the container, copied out as <module>-<ts>.snap.

    Falls back to the mounted data archive, loudly, without a token or when the snapshot
    fails (sealed, not raft, permission).
    """
    hint = "a live copy of Vault's storage is consistent only with Vault stopped or paused (--pause)"
    options = job.cls.options
    token = job.env.get(options["token_env"])
    if not token:
        return fall_back(job, dir_fd, f"no {options['token_env']} in the environment", hint)
    require_running(job, "a raft snapshot")
    addr = options["vault_addr"] or container_env(job.resolution.container).get("VAULT_ADDR") or "http://127.0.0.1:8200"
    secrets = {"VAULT_TOKEN": token, "VAULT_ADDR": addr}
    tmp = f"/tmp/bba-{job.basename}.snap"
    try:
        try:
            run(exec_argv(job.container, ["vault", "operator", "raft", "snapshot", "save", tmp], secrets=secrets),
                timeout=job.settings.pause_timeout, secrets=secrets)
        except CommandError as exc:
            return fall_back(job, dir_fd, f"vault operator raft snapshot save failed: {' | '.join(exc.stderr_tail[-2:]) or exc}", hint)

        def inspect(verification: dict[str, Any]) -> None:
            proc = run(exec_argv(job.container, ["vault", "operator", "raft", "snapshot", "inspect", tmp], secrets=secrets),
                       timeout=job.settings.pause_timeout, secrets=secrets, check=False)
            if proc.returncode == 127:
                verification["vault_inspect"] = "not available in the container's vault CLI"
            elif proc.returncode != 0:
                raise BackupError(f"vault operator raft snapshot inspect failed: {CommandError([], proc.returncode, proc.stderr)}")
            else:
                verification["vault_inspect"] = "ok"

        result = copy_out_file(job, dir_fd, tmp, ".snap", scan_vault_snapshot, before_commit=inspect)
    finally:
        with signals_deferred():
            run(exec_argv(job.container, ["rm", "-f", tmp]), timeout=job.settings.docker_timeout, check=False)
    result.contents["vault_addr"] = addr
    return result


# -- class D: MinIO

MINIO_HINT = "MinIO supports restoring backend files only onto the same release and drive layout, with the server stopped"


def mc_json_lines(proc: subprocess.CompletedProcess[bytes], what: str) -> list[dict[str, Any]]:
    """Return the JSON objects mc printed one per line. Raise BackupError on any error line.

    mc mirror goes on after a per-object error, so every line is read, and the exit
    status is checked too.
    """
    records, errors = [], []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
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
            records.append(record)
    if errors:
        raise BackupError(f"{what}: {len(errors)} error(s), first: {errors[0]}")
    if proc.returncode != 0:
        raise CommandError(proc.args if isinstance(proc.args, list) else [what], proc.returncode, proc.stderr)
    return records


def procedure_mc_mirror(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class D: `mc mirror --preserve` of every bucket of the alias, plus the bucket metadata export.

    mc runs on this host when it is there, else inside the container; objects are staged
    in a private directory inside the backup directory, archived into one tar.gz, and the
    staging is removed whatever happens. Falls back to the mounted data archive, loudly,
    without an alias or without mc.
    """
    alias_env = job.cls.options["alias_env"]
    alias = job.env.get(alias_env, "")
    if not alias:
        return fall_back(job, dir_fd, f"no {alias_env} in the environment", MINIO_HINT)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise UsageError(f"{alias_env}={alias!r} is not an mc alias name")
    host_key = f"MC_HOST_{alias}"
    secrets = {host_key: job.env[host_key]} if job.env.get(host_key) else {}
    inside = f"/tmp/bba-{job.basename}"
    host_mc = shutil.which("mc")
    if host_mc and b"Midnight" in run([host_mc, "--version"], check=False, timeout=job.settings.docker_timeout).stdout:
        host_mc = None  # Debian's mc is Midnight Commander
    if host_mc is None:
        require_running(job, "mc inside the container")
        probe = run(exec_argv(job.container, ["mc", "--version"]), check=False, timeout=job.settings.docker_timeout)
        if probe.returncode != 0:
            return fall_back(job, dir_fd, "mc is neither on this host nor in the container", MINIO_HINT)

    def mc(args: list[str], cwd: str) -> subprocess.CompletedProcess[bytes]:
        if host_mc:
            return run([host_mc, *args], check=False, timeout=job.settings.pause_timeout, secrets=secrets, cwd=cwd)
        return run(["docker", "exec", "-w", cwd, *exec_argv(job.container, ["mc", *args], secrets=secrets)[2:]],
                   check=False, timeout=job.settings.pause_timeout, secrets=secrets)

    staging_name = f".{job.basename}.mc-staging"
    os.mkdir(staging_name, 0o700, dir_fd=dir_fd)
    staging = job.backup_dir / staging_name
    try:
        work = str(staging) if host_mc else inside
        if host_mc:
            for sub in ("buckets", "metadata"):
                os.mkdir(staging / sub, 0o700)
        else:
            run(exec_argv(job.container, ["mkdir", "-p", f"{inside}/buckets", f"{inside}/metadata"]), timeout=job.settings.docker_timeout)
        listing = mc_json_lines(mc(["ls", "--json", alias], work), f"mc ls {alias}")
        bucket_names = [r["key"].rstrip("/") for r in listing if r.get("type") == "folder"]
        LOG.info("mc alias %s (mc %s): buckets %s", alias, "on this host" if host_mc else "in the container", ", ".join(bucket_names) or "none")
        objects: dict[str, int] = {}
        for bucket in bucket_names:
            lines = mc_json_lines(mc(["mirror", "--preserve", "--json", f"{alias}/{bucket}", f"{work}/buckets/{bucket}"], work), f"mc mirror {alias}/{bucket}")
            objects[bucket] = sum(1 for r in lines if r.get("target"))
        export = mc(["admin", "cluster", "bucket", "export", alias, "--json"], f"{work}/metadata")
        try:
            mc_json_lines(export, "mc admin cluster bucket export")
            bucket_export = "ok"
        except BackupError as exc:
            bucket_export = f"not available: {exc}"
            LOG.warning("bucket metadata not exported (%s); objects only", exc)
        if not host_mc:
            with stream_from(["docker", "cp", f"{job.container}:{inside}/.", "-"], timeout=job.settings.pause_timeout) as pipe:
                with tarfile.open(fileobj=pipe, mode="r|") as tar:
                    for member in tar:
                        _forget_members(tar)
                        target = os.path.normpath(os.path.join(staging, member.name))
                        if not _inside(target, [str(staging)]) or member.issym() or member.islnk():
                            raise BackupError(f"mc staging copy: unexpected entry {member.name!r}")
                        if member.isdir():
                            os.makedirs(target, mode=0o700, exist_ok=True)
                        elif member.isreg():
                            source = tar.extractfile(member)
                            assert source is not None
                            with open(target, "xb") as fh:
                                shutil.copyfileobj(source, fh, COPY_CHUNK)
                            os.utime(target, (member.mtime, member.mtime))
        items = [ArchiveItem(f"/{b}", str(staging / "buckets" / b), f"buckets/{b}", prefix="buckets/")
                 for b in bucket_names if (staging / "buckets" / b).is_dir()]
        items += [ArchiveItem(f"/{name}", str(staging / "metadata" / name), f"metadata/{name}", prefix="metadata/")
                  for name in sorted(os.listdir(staging / "metadata"))]
        if not items:
            raise BackupError(f"mc alias {alias} has no buckets: nothing would be backed up")
        result = write_archive(job, dir_fd, items)
    finally:
        with signals_deferred():
            shutil.rmtree(staging, ignore_errors=True)
            if not host_mc:
                run(exec_argv(job.container, ["rm", "-rf", inside]), timeout=job.settings.docker_timeout, check=False)
    result.contents["groups"] = result.contents.pop("per_mount")
    result.contents.update({"alias": alias, "mc": "host" if host_mc else "container", "bucket_export": bucket_export})
    result.counts = {"objects": objects}
    return result


# -- class F: search engines (Meilisearch, SearXNG)

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
    url = job.cls.options["meilisearch_url"].rstrip("/") + route
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
    try:
        result = copy_out_file(job, dir_fd, path, ".dump", scan_meilisearch_dump)
    finally:
        # The dump was made for this backup only; leave the engine's disk as it was.
        with signals_deferred():
            run(exec_argv(job.container, ["rm", "-f", path]), timeout=job.settings.docker_timeout, check=False)
    result.contents.update({"engine": "meilisearch", "task_uid": uid, "dump_uid": dump_uid})
    result.timings["dump_seconds"] = round(time.monotonic() - started, 3)
    return result


def scan_meilisearch_dump(fh: IO[bytes]) -> dict[str, Any]:
    """Check a Meilisearch dump: a complete gzip'd tar with its metadata.json."""
    sizes, _, kept = read_tar_gz_files(fh, lambda name: name.lstrip("./") == "metadata.json")
    if not kept:
        raise BackupError("dump has no metadata.json")
    try:
        metadata = json.loads(next(iter(kept.values())))
    except ValueError:
        raise BackupError("dump metadata.json is not JSON") from None
    return {"gzip_complete": True, "tar_readable": True, "members": len(sizes), "dump_version": metadata.get("dumpVersion")}


def searxng_config(job: BackupJob, dir_fd: int) -> BackupResult:
    """SearXNG: its state is its configuration (settings.yml, limiter.toml); caches are skipped."""
    config, skipped = [], []
    for mount in job.mounts:
        holds_config = mount.via == "host" and any(os.path.exists(os.path.join(mount.source, f)) for f in ("settings.yml", "limiter.toml"))
        if mount.destination.rstrip("/") == "/etc/searxng" or holds_config:
            config.append(mount)
        else:
            skipped.append((mount.destination, "not SearXNG configuration (cache or runtime data)"))
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
    if kind == "meilisearch" and job.cls.options["meilisearch_dump"]:
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


# -- class A: PostgreSQL

PG_TRAILER = b"-- PostgreSQL database cluster dump complete"
PG_TAIL_BYTES = 4096
PG_MIN_DUMP_BYTES = 256
# One query per database: exact row counts of every table (query_to_xml runs a count(*)
# per table inside the same statement) and the number of large objects.
PG_CENSUS_SQL = """
SELECT json_build_object(
  'tables', coalesce((
    SELECT json_object_agg(format('%I.%I', n.nspname, c.relname),
      (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname), false, true, '')))[1]::text::bigint)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  ), '{}'::json),
  'large_objects', (SELECT count(*) FROM pg_largeobject_metadata))
"""
PG_SERVER_SQL = """
SELECT json_build_object(
  'version', current_setting('server_version'),
  'databases', (SELECT coalesce(json_agg(datname ORDER BY datname), '[]'::json) FROM pg_database WHERE datallowconn AND NOT datistemplate))
"""


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


def pg_json(target: PgTarget, database: str, sql: str, timeout: float) -> Any:
    """Return the single JSON value sql produces in database."""
    argv = exec_argv(target.container, ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", target.user, "-d", database, "-c", sql], secrets=target.secrets)
    proc = run(argv, timeout=timeout, secrets=target.secrets)
    return parse_json(proc.stdout, f"psql in {target.container}")


def pg_census(target: PgTarget, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (server, counts): the server version and, per database, tables, rows and large objects."""
    server = pg_json(target, "postgres", PG_SERVER_SQL, timeout)
    version = server["version"]
    counts: dict[str, Any] = {}
    for database in server["databases"]:
        found = pg_json(target, database, PG_CENSUS_SQL, timeout)
        tables = dict(sorted(found["tables"].items()))
        counts[database] = {
            "tables": len(tables),
            "rows": sum(tables.values()),
            "large_objects": found["large_objects"],
            "row_counts": tables,
        }
    return {"engine": "postgresql", "version": version, "user": target.user}, counts


def dump_cluster(job: BackupJob, target: PgTarget, out: PartialFile) -> int:
    """Stream pg_dumpall through gzip into out; return the SQL bytes. Raise BackupError if incomplete."""
    argv = exec_argv(target.container, ["pg_dumpall", "-U", target.user, "--clean", "--if-exists"], secrets=target.secrets)
    size, tail = 0, b""
    LOG.info("dumping with pg_dumpall into %s.partial", out.path)
    with compressing(out, job.compression) as packed, contextlib.closing(Progress("pg_dumpall", job.estimated_bytes)) as progress:
        with stream_from(argv, timeout=job.settings.pause_timeout, secrets=target.secrets) as pipe:
            while chunk := pipe.read(COPY_CHUNK):
                packed.write(chunk)
                progress.add(len(chunk))
                size += len(chunk)
                tail = (tail + chunk)[-PG_TAIL_BYTES:]
    check_sql_dump(size, tail)
    return size


def procedure_pg_dumpall(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class A: pg_dumpall of the whole cluster, streamed into <module>-<ts>.sql.gz, verified."""
    require_running(job, "pg_dumpall")
    target = pg_target(job.resolution.container)
    server, counts = pg_census(target, job.settings.docker_timeout)
    LOG.info(
        "PostgreSQL %s, user %s: %s", server["version"], target.user,
        ", ".join(f"{db} ({c['tables']} tables, {c['rows']} rows)" for db, c in counts.items()) or "no databases",
    )
    fmt = "sql." + job.compression.suffix
    with PartialFile(dir_fd, f"{job.basename}.{fmt}", job.backup_dir) as out, verifying(out, lambda fh: scan_sql(fh, fmt)) as verified:
        size = dump_cluster(job, target, out)
        verification = verified()
        if verification["sql_bytes"] != size:
            raise BackupError(f"verification failed: the file holds {verification['sql_bytes']} bytes of SQL, {size} were written")
        path = out.commit()
    return BackupResult(
        path=path, format=fmt, size=out.size, sha256=out.sha256.hexdigest(), verification=verification,
        contents={"sql_bytes": size, "databases": len(counts)}, warnings=[], server=server, counts=counts,
    )


# -- class B: Redis

REDIS_RDB_MAGIC = b"REDIS"
REDIS_ERROR_RE = re.compile(r"^(ERR|NOAUTH|NOPERM|WRONGPASS|WRONGTYPE|BUSY|LOADING|MISCONF|READONLY|MASTERDOWN|OOM|NOSCRIPT)\b")


class RedisReplyError(BackupError):
    """Redis answered with an error (renamed command, ACL, auth)."""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """How to reach Redis inside a container."""

    container: str
    secrets: dict[str, str]


def redis_target(container: dict[str, Any], settings: Settings, env: dict[str, str]) -> RedisTarget:
    """Return the Redis of a container, with its password from the operator's environment,
    else from the container's own, passed to redis-cli as REDISCLI_AUTH by name."""
    name = settings.redis_password_env
    password = env.get(name) or container_env(container).get(name)
    return RedisTarget(container_name(container), {"REDISCLI_AUTH": password} if password else {})


def redis_cli(target: RedisTarget, *args: str, timeout: float) -> str:
    """Return redis-cli's reply. Raise RedisReplyError when Redis answers with an error.

    redis-cli exits 0 on error replies, so the reply itself is checked.
    """
    proc = run(exec_argv(target.container, ["redis-cli", "--no-auth-warning", *args], secrets=target.secrets), timeout=timeout, secrets=target.secrets)
    reply = proc.stdout.decode("utf-8", "replace").strip()
    if REDIS_ERROR_RE.match(reply) or not reply:
        raise RedisReplyError(f"redis {' '.join(args[:2])}: {reply.splitlines()[0] if reply else 'no reply'}")
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


def redis_bgsave(target: RedisTarget, timeout: float, docker_timeout: float) -> dict[str, Any]:
    """Run BGSAVE (BGSAVE SCHEDULE while an AOF rewrite runs) and wait for it to succeed.

    Success means rdb_bgsave_in_progress:0, rdb_last_bgsave_status:ok and a LASTSAVE newer
    than the one before. Raise RedisReplyError if Redis refuses the command, BackupError
    if the save fails or takes longer than timeout.
    """
    before = redis_lastsave(target, docker_timeout)
    # LASTSAVE has one-second resolution: start only once the server's clock is past it.
    while int(redis_cli(target, "TIME", timeout=docker_timeout).split()[0]) <= before:
        time.sleep(0.1)
    started = time.monotonic()
    info = parse_info(redis_cli(target, "INFO", "persistence", timeout=docker_timeout))
    command = ["BGSAVE", "SCHEDULE"] if info.get("aof_rewrite_in_progress") == "1" else ["BGSAVE"]
    reply = redis_cli(target, *command, timeout=docker_timeout)
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
        if time.monotonic() - started > timeout:
            raise BackupError(f"redis BGSAVE did not finish within {timeout:g}s (snapshot_timeout)")
        time.sleep(0.2)
    if info.get("rdb_last_bgsave_status") != "ok":
        raise BackupError(f"redis BGSAVE finished with rdb_last_bgsave_status:{info.get('rdb_last_bgsave_status')}")
    return {"command": " ".join(command), "lastsave_before": before, "lastsave_after": after, "seconds": round(time.monotonic() - started, 3)}


def redis_config(target: RedisTarget, timeout: float) -> dict[str, str]:
    """Return dir, dbfilename, appendonly and appenddirname (CONFIG GET)."""
    config: dict[str, str] = {}
    for key in ("dir", "dbfilename", "appendonly", "appenddirname"):
        lines = redis_cli(target, "CONFIG", "GET", key, timeout=timeout).splitlines()
        if len(lines) >= 2 and lines[0] == key:
            config[key] = lines[1]
    if "dir" not in config or "dbfilename" not in config:
        raise RedisReplyError("redis CONFIG GET dir/dbfilename gave no answer")
    return config


def procedure_redis_bgsave(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class B: BGSAVE, then archive the RDB file (and the AOF directory when on), verified.

    Falls back to the mounted data archive, loudly, when Redis refuses BGSAVE or CONFIG
    (renamed command, ACL).
    """
    require_running(job, "BGSAVE")
    target = redis_target(job.resolution.container, job.settings, job.env)
    timeout = job.settings.docker_timeout
    server = {"engine": "redis", "version": parse_info(redis_cli(target, "INFO", "server", timeout=timeout)).get("redis_version", "unknown")}
    counts = redis_keyspace(target, timeout)
    LOG.info("Redis %s: %s", server["version"], ", ".join(f"{db} {n} keys" for db, n in counts.items()) or "no keys")
    try:
        bgsave = redis_bgsave(target, job.settings.snapshot_timeout, timeout)
        config = redis_config(target, timeout)
    except RedisReplyError as exc:
        if job.cls.fallback != "mounted-archive":
            raise
        result = fall_back(job, dir_fd, str(exc), "restore it with Redis stopped")
        result.server, result.counts = server, counts
        return result
    LOG.info("BGSAVE done in %.1fs (LASTSAVE %d -> %d)", bgsave["seconds"], bgsave["lastsave_before"], bgsave["lastsave_after"])
    rdb = posixpath.join(config["dir"], config["dbfilename"])
    paths = [rdb]
    aof = config.get("appendonly") == "yes"
    if aof:
        paths.append(posixpath.join(config["dir"], config.get("appenddirname") or "appendonlydir"))
    before = parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout))
    if aof and before.get("aof_rewrite_in_progress") != "0":
        raise BackupError("an AOF rewrite is running; its directory cannot be copied consistently now (try again shortly)")

    def check_copy(verification: dict[str, Any]) -> None:
        after = parse_info(redis_cli(target, "INFO", "persistence", timeout=timeout))
        if aof and (after.get("aof_rewrite_in_progress") != "0" or after.get("aof_rewrites") != before.get("aof_rewrites")):
            raise BackupError("an AOF rewrite ran during the copy; no backup written (try again)")
        check = run(exec_argv(job.container, ["redis-check-rdb", rdb]), timeout=job.settings.pause_timeout, check=False)
        if check.returncode in (126, 127) or b"executable file not found" in check.stderr:
            verification["redis_check_rdb"] = "not available in the container"
        elif check.returncode != 0:
            last = (check.stdout + check.stderr).decode(errors="replace").strip().splitlines()[-1:]
            raise BackupError(f"redis-check-rdb {rdb} failed in {job.container}: {' '.join(last)}")
        else:
            verification["redis_check_rdb"] = "ok"

    result = write_archive(job, dir_fd, [locate(p, job.mounts) for p in paths], rdb_member=rdb.lstrip("/"), before_commit=check_copy)
    result.server, result.counts = server, counts
    result.contents.update({"rdb": rdb, "appendonly": aof, "bgsave": bgsave})
    result.timings["bgsave_seconds"] = bgsave["seconds"]
    return result


# -- class G: a module with its own compose root (Agaria)

AGARIA_FOLLOW_UP = "Agaria-specific follow-up required"
COMPOSE_DUMP_SUFFIX = ".pgdump.sql"


def compose_labels(container: dict[str, Any]) -> dict[str, str]:
    return dict(container.get("Config", {}).get("Labels") or {})


def procedure_compose_root_archive(job: BackupJob, dir_fd: int) -> BackupResult:
    """Class G: the compose root and the mounted data of every container of its compose project.

    One archive: compose-root/<path>, containers/<name>/<mount>/..., and for a module that
    is also PostgreSQL (agaria-postgres) dumps/pg_dumpall.sql.gz; for one that is also
    Redis (agaria-redis) a BGSAVE first. Falls back to the module's mounted data when the
    compose root cannot be read from here.
    """
    LOG.warning("%s (origin table, class %s)", AGARIA_FOLLOW_UP, job.cls.letter)
    labels = compose_labels(job.resolution.container)
    root = job.cls.options["compose_root"] or labels.get("com.docker.compose.project.working_dir", "")
    project = labels.get("com.docker.compose.project")
    if not root:
        reason = f"no compose root: no com.docker.compose.project.working_dir label and no classes.{job.cls.letter}.options.compose_root"
    elif not job.engine.local or job.engine.rootless:
        reason = f"compose root {root} is on the engine's host ({job.engine.endpoint}), not readable from here"
    elif not os.path.isdir(root):
        reason = f"compose root {root} does not exist on this host"
    else:
        reason = ""
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
            items.append(ArchiveItem(config_file, config_file, "compose-root/" + config_file.strip("/"), prefix="compose-root/"))
    names = []
    for container in sorted(members, key=container_name):
        name = container_name(container)
        names.append(name)
        for mount in plan_mounts(container, read_on_host=True)[0]:
            prefix = f"containers/{name}/"
            host = mount.source if mount.via == "host" else None
            items.append(ArchiveItem(mount.destination, host, prefix + mount.destination.strip("/"), prefix=prefix, container=name))
    LOG.info("compose project %s: root %s, containers %s", project or "(none)", root, ", ".join(names))

    details: dict[str, Any] = {"compose_root": root, "compose_project": project, "containers": names, "follow_up": AGARIA_FOLLOW_UP,
                               "also": job.secondary}
    server: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        if job.secondary == "pg-dumpall":
            require_running(job, "pg_dumpall")
            target = pg_target(job.resolution.container)
            server, counts = pg_census(target, job.settings.docker_timeout)
            inner = f"pg_dumpall.sql.{job.compression.suffix}"
            dump = stack.enter_context(PartialFile(dir_fd, f"{job.basename}{COMPOSE_DUMP_SUFFIX}.{job.compression.suffix}", job.backup_dir))
            details["sql_bytes"] = dump_cluster(job, target, dump)
            dump.close()
            partial = str(job.backup_dir / dump.partial)
            items.append(ArchiveItem("/" + inner, partial, "dumps/" + inner, prefix="dumps/"))
        elif job.secondary == "redis-bgsave":
            require_running(job, "BGSAVE")
            target_redis = redis_target(job.resolution.container, job.settings, job.env)
            counts = redis_keyspace(target_redis, job.settings.docker_timeout)
            details["bgsave"] = redis_bgsave(target_redis, job.settings.snapshot_timeout, job.settings.docker_timeout)
        result = write_archive(job, dir_fd, items)
    result.contents.update(details)
    result.contents["groups"] = result.contents.pop("per_mount")
    result.server, result.counts = server, counts
    result.warnings.append(AGARIA_FOLLOW_UP)
    return result


PROCEDURES = {
    "mounted-archive": procedure_mounted_archive,
    "pg-dumpall": procedure_pg_dumpall,
    "redis-bgsave": procedure_redis_bgsave,
    "vault-raft-snapshot": procedure_vault_raft_snapshot,
    "search-engine": procedure_search_engine,
    "compose-root-archive": procedure_compose_root_archive,
    "mc-mirror": procedure_mc_mirror,
}
# Backups that are one engine-made file, checked by its own structure.
SINGLE_FILE_SCANS: dict[str, Callable[[IO[bytes]], dict[str, Any]]] = {
    "snap": scan_vault_snapshot,
    "dump": scan_meilisearch_dump,
}


# --------------------------------------------------------------------------- manifest and --verify

MANIFEST_SUFFIX = ".manifest.json"
BACKUP_SUFFIXES = (".tar.gz", ".sql.gz", ".tar.zst", ".sql.zst", ".snap", ".dump")


def restore_notes(cls: BackupClass, values: dict[str, str]) -> str:
    """Return the class's restore notes with {backup}, {module}, ... filled in."""
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
    }
    per_mount = result.contents.get("per_mount", {})
    return {
        "tool": PROG,
        "tool_version": __version__,
        "module": job.module.id,
        "lifecycle": job.module.lifecycle,
        "class": job.cls.letter,
        "class_title": job.cls.title,
        "procedure": result.fallback["procedure"] if result.fallback else job.procedure,
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
        "paused": job.pause,
        "paused_seconds": result.paused_seconds,
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
    for suffix in BACKUP_SUFFIXES:
        if name.endswith(suffix):
            return path, path.with_name(name[: -len(suffix)] + MANIFEST_SUFFIX)
    raise UsageError(f"{path}: not a backup of this tool (expected *{', *'.join(BACKUP_SUFFIXES)} or *{MANIFEST_SUFFIX})")


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


def verify_backup(path: Path) -> list[tuple[str, bool, str]]:
    """Return (check, passed, detail) for every check of a backup against its manifest."""
    backup, doc = load_manifest(path)
    checks: list[tuple[str, bool, str]] = []
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
            recorded = doc.get("verification", {})
            if str(doc.get("format")).startswith("sql."):
                found = scan_sql(fh, doc["format"])
                expected = recorded.get("sql_bytes")
                checks.append(("structure", found["sql_bytes"] == expected, f"complete {compression_of(doc['format'])}, dump trailer present, {found['sql_bytes']} bytes of SQL (manifest {expected})"))
            elif doc.get("format") in SINGLE_FILE_SCANS:
                found = SINGLE_FILE_SCANS[doc["format"]](fh)
                same = found["members"] == recorded.get("members")
                checks.append(("structure", same, f"complete gzip, tar readable, {found['members']} members (manifest {recorded.get('members')})"))
            else:
                rdb = doc.get("contents", {}).get("rdb")
                fmt = str(doc.get("format", "tar.gz"))
                found = scan_tar(fh, fmt, rdb_member=rdb.lstrip("/") if rdb else None)
                expected = doc.get("verification", {}).get("members")
                detail = f"complete {compression_of(fmt)}, tar readable, {found['members']} entries (manifest {expected})" + (", RDB magic ok" if rdb else "")
                checks.append(("structure", found["members"] == expected, detail))
    except BackupError as exc:
        checks.append(("structure", False, str(exc)))
    return checks


# --------------------------------------------------------------------------- --drill

PG_HARMLESS_ERRORS = (
    # pg_dumpall --clean drops and recreates every role; the one psql is connected as
    # cannot be dropped and so already exists (PostgreSQL docs, pg_dumpall "Notes").
    re.compile(r"current user cannot be dropped"),
    re.compile(r'role "(?P<role>[^"]+)" already exists'),
)
DRILL_NEVER_STARTED = "/bba-drill-never-started"
DRILL_LISTING_MAX = 40


class DrillContainer:
    """A throwaway container cloned from a module's container, on fresh volumes.

    Same image, user, command and environment (passed by name), the live container's
    read-only binds, no network, and a new volume at every writable mount, so nothing
    of the live service is touched. The container and its volumes are removed on exit,
    whatever happened.
    """

    def __init__(self, doc: dict[str, Any], live: dict[str, Any] | None, settings: Settings) -> None:
        self.doc = doc
        self.live = live
        self.settings = settings
        self.name = f"bba-drill-{doc['module']}-{os.urandom(4).hex()}"
        self.volumes: list[str] = []
        self.created = False
        self.secrets: dict[str, str] = {}

    def __enter__(self) -> DrillContainer:
        return self

    def create(self, *, start: bool) -> None:
        timeout = self.settings.docker_timeout
        image = self.doc["container"].get("image_id") or self.doc["container"]["image"]
        argv = ["create", "--name", self.name, "--network", "none", "--label", f"bba-drill={self.doc['module']}"]
        destinations = [m["destination"] for m in self.doc.get("mounts", [])]
        command: list[str] = []
        if self.live is not None:
            config = self.live.get("Config", {})
            if config.get("User"):
                argv += ["--user", config["User"]]
            if config.get("WorkingDir"):
                argv += ["--workdir", config["WorkingDir"]]
            for name, value in container_env(self.live).items():
                if name.startswith("DOCKER_"):
                    LOG.warning("drill: %s is not passed to the throwaway container (it would redirect the docker CLI)", name)
                    continue
                self.secrets[name] = value
                argv += ["-e", name]
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
        docker([*argv, image, *command], timeout=timeout, secrets=self.secrets)
        self.created = True
        LOG.info("drill: throwaway container %s from %s", self.name, image)

    def copy_in(self, backup: Path) -> None:
        """Extract a tar backup into the container's volumes (docker cp keeps owners)."""
        with open(backup, "rb") as fh, decompressing(fh, self.doc["format"]) as gz:
            with stream_into(["docker", "cp", "-", f"{self.name}:/"], timeout=self.settings.drill_timeout) as stream:
                while chunk := gz.read(COPY_CHUNK):
                    stream.pipe.write(chunk)

    def start(self) -> None:
        docker(["start", self.name], timeout=self.settings.docker_timeout)

    def wait_until(self, probe: Any, what: str) -> None:
        """Call probe() until it returns true; raise BackupError if the container dies or time runs out."""
        deadline = time.monotonic() + self.settings.drill_timeout
        while True:
            with contextlib.suppress(BackupError):
                if probe():
                    return
            state = parse_json(docker(["inspect", "--format", "{{json .State}}", self.name], timeout=self.settings.docker_timeout).stdout, "docker inspect")
            if not state.get("Running"):
                logs = docker(["logs", "--tail", "5", self.name], timeout=self.settings.docker_timeout, check=False)
                tail = (logs.stdout + logs.stderr).decode(errors="replace").strip().replace("\n", " | ")
                raise BackupError(f"drill: throwaway container exited ({state.get('Status')}) before {what}: {tail}")
            if time.monotonic() > deadline:
                raise BackupError(f"drill: {what} did not happen within {self.settings.drill_timeout:g}s (drill_timeout)")
            time.sleep(0.3)

    def __exit__(self, *exc_info: object) -> None:
        with signals_deferred():
            if self.created:
                docker(["rm", "-f", "-v", self.name], timeout=self.settings.docker_timeout, check=False)
            for volume in self.volumes:
                docker(["volume", "rm", "-f", volume], timeout=self.settings.docker_timeout, check=False)


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


def compare(label: str, expected: Any, found: Any, lines: list[str]) -> bool:
    same = bool(expected == found)
    shown = [v[:16] + "..." if isinstance(v, str) and len(v) == 64 else v for v in (found, expected)]
    lines.append(f"  {label}: {shown[0]} {'=' if same else '!='} {shown[1]}{'' if same else '   <- DIFFERS'}")
    return same


def drill_archive(doc: dict[str, Any], backup: Path, box: DrillContainer, engine: EngineInfo, lines: list[str]) -> int:
    """Class E (and archive fallbacks): restore into fresh volumes, compare entries per mount."""
    box.create(start=False)
    box.copy_in(backup)
    differences = 0
    read_on_host = engine.local and not engine.rootless
    clone = parse_json(docker(["inspect", box.name], timeout=box.settings.docker_timeout).stdout, "docker inspect")[0]
    restored_mounts = {m.destination: m for m in plan_mounts(clone, read_on_host=read_on_host)[0]}
    for mount in doc.get("mounts", []):
        if mount["destination"] not in doc.get("archived_paths", [mount["destination"]]):
            continue
        restored = restored_mounts[mount["destination"]]
        via_host = mount.get("read_via") == "host" and restored.via == "host"
        stats = ArchiveStats()
        item = ArchiveItem(restored.destination, restored.source if via_host else None, restored.destination)
        others = [m["destination"] for m in doc["mounts"] if m["destination"] != mount["destination"]]
        archive_items(TarWriter(_NullWriter()), box.name, [item], others, stats, box.settings.drill_timeout)
        found = stats.summary().get(mount["destination"], {})
        lines.append(f"{mount['destination']} (restored, read via {'host path' if via_host else 'docker cp'}):")
        for key in ("members", "files", "bytes", "listing_sha256"):
            differences += not compare(key, mount.get(key), found.get(key), lines)
    return differences


class _NullWriter(StreamSink):
    """A sink that drops everything (the drill re-reads restored trees and keeps only their digests)."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)


def drill_postgres(doc: dict[str, Any], backup: Path, box: DrillContainer, lines: list[str]) -> int:
    """Class A: load the dump into a fresh server from the same image, compare every count."""
    if box.live is None:
        raise BackupError(f"drill: container {doc['container']['name']} is gone; its image, command and environment are needed to start PostgreSQL")
    box.create(start=True)
    box.start()
    target = dataclasses.replace(pg_target(box.live), container=box.name)
    box.wait_until(lambda: pg_json(target, "postgres", "SELECT to_json(1)", box.settings.docker_timeout) == 1, "PostgreSQL accepted connections")
    argv = exec_argv(box.name, ["psql", "-X", "-q", "-U", target.user, "-d", "postgres"], secrets=target.secrets, stdin=True)
    with open(backup, "rb") as fh, decompressing(fh, doc["format"]) as gz:
        with stream_into(argv, timeout=box.settings.drill_timeout, secrets=target.secrets, check=False) as stream:
            while chunk := gz.read(COPY_CHUNK):
                stream.pipe.write(chunk)
    errors = [line for line in stream.stderr.decode("utf-8", "replace").splitlines() if re.search(r"\b(ERROR|FATAL|PANIC):", line)]
    unexpected = [
        e for e in errors
        if not any((m := p.search(e)) and (m.groupdict().get("role") in (None, target.user)) for p in PG_HARMLESS_ERRORS)
    ]
    lines.append(f"psql: {len(errors)} error(s) while loading, {len(errors) - len(unexpected)} known to be harmless")
    if unexpected:
        raise BackupError(f"drill failed: psql reported {len(unexpected)} unexpected error(s), first: {unexpected[0].strip()}")
    server, counts = pg_census(target, box.settings.docker_timeout)
    differences = 0
    lines.append(f"server {server['version']} (backup taken from {(doc.get('server') or {}).get('version')})")
    expected_counts = doc.get("counts") or {}
    for database in sorted(set(expected_counts) | set(counts)):
        want, got = expected_counts.get(database, {}), counts.get(database, {})
        lines.append(f"database {database}:")
        for key in ("tables", "rows", "large_objects"):
            differences += not compare(key, want.get(key), got.get(key), lines)
        for table in sorted(set(want.get("row_counts", {})) | set(got.get("row_counts", {}))):
            if want.get("row_counts", {}).get(table) != got.get("row_counts", {}).get(table):
                differences += not compare(f"rows in {table}", want.get("row_counts", {}).get(table), got.get("row_counts", {}).get(table), lines)
    return differences


def drill_redis(doc: dict[str, Any], backup: Path, box: DrillContainer, settings: Settings, env: dict[str, str], lines: list[str]) -> int:
    """Class B: start Redis from the same image on the restored files, compare keys per database."""
    if box.live is None:
        raise BackupError(f"drill: container {doc['container']['name']} is gone; its image, command and environment are needed to start Redis")
    box.create(start=True)
    box.copy_in(backup)
    box.start()
    target = dataclasses.replace(redis_target(box.live, settings, env), container=box.name)
    box.wait_until(lambda: parse_info(redis_cli(target, "INFO", "persistence", timeout=settings.docker_timeout)).get("loading") == "0", "Redis loaded its data")
    aof = (doc.get("contents") or {}).get("appendonly")
    lines.append(f"loaded from {'the AOF (it takes precedence over the RDB)' if aof else 'the RDB file'}")
    found = redis_keyspace(target, settings.docker_timeout)
    differences = 0
    for db in sorted(set(doc.get("counts") or {}) | set(found)):
        differences += not compare(f"{db} keys", (doc.get("counts") or {}).get(db), found.get(db), lines)
    return differences


DRILL_ENGINE_NOTES = {
    "snap": "Vault is not started for a drill: structure, SHA256SUMS and contents listing only; "
            "restore with `vault operator raft snapshot restore`",
    "dump": "Meilisearch is not started for a drill: structure and contents listing only; "
            "restore by starting Meilisearch with --import-dump",
}


def drill_listing(doc: dict[str, Any], backup: Path, lines: list[str]) -> int:
    """Engine-made single files (C, F dumps): check structure and list the contents."""
    fmt = doc["format"]
    lines.append(DRILL_ENGINE_NOTES[fmt])
    with open(backup, "rb") as fh:
        sizes, _, _ = read_tar_gz_files(fh, lambda name: False)
    for name in sorted(sizes)[:DRILL_LISTING_MAX]:
        lines.append(f"  {sizes[name]:>12}  {name}")
    if len(sizes) > DRILL_LISTING_MAX:
        lines.append(f"  ... and {len(sizes) - DRILL_LISTING_MAX} more")
    return int(not compare("members", doc.get("verification", {}).get("members"), len(sizes), lines))


def drill_groups(doc: dict[str, Any], backup: Path, lines: list[str]) -> int:
    """Archives of several sources (G's compose project): re-read and compare every group."""
    groups = doc.get("contents", {}).get("groups") or {}
    lines.append("structure and contents listing only: every group of the archive re-read and compared with the manifest")
    if doc.get("contents", {}).get("follow_up"):
        lines.append(doc["contents"]["follow_up"])
    stats = ArchiveStats()
    prefixes = sorted(groups, key=len, reverse=True)
    try:
        with open(backup, "rb") as fh, decompressing(fh, doc["format"]) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                name = member.name.rstrip("/")
                group = next((p for p in prefixes if name == p or name.startswith(p + "/")), "(outside every group)")
                stats.count(group, entry_of(member, name, member.linkname))
                _forget_members(tar)
    except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
        raise BackupError(f"drill: {backup.name} is not a complete {doc['format']} ({exc})") from None
    found = stats.summary()
    differences = 0
    for group in sorted(set(groups) | set(found)):
        lines.append(f"{group}:")
        for key in ("members", "files", "bytes", "listing_sha256"):
            differences += not compare(key, groups.get(group, {}).get(key), found.get(group, {}).get(key), lines)
    return differences


def drill_backup(path: Path, settings: Settings, env: dict[str, str], out: IO[str]) -> int:
    """Restore a backup into a throwaway container and compare it with its manifest.

    Return EXIT_OK if everything matches. Raise BackupError if the restore fails or
    anything differs; the throwaway container and volumes are always removed.
    """
    backup, doc = load_manifest(path)
    for check, passed, detail in verify_backup(backup):
        if not passed:
            raise BackupError(f"drill refused: {backup.name} fails --verify ({check}: {detail})")
    procedure = doc.get("procedure")
    lines = [f"drill of {backup.name} (class {doc.get('class')}, {procedure})"]
    if doc.get("format") in SINGLE_FILE_SCANS:
        differences = drill_listing(doc, backup, lines)
    elif doc.get("contents", {}).get("groups"):
        differences = drill_groups(doc, backup, lines)
    else:
        engine = engine_info(settings.docker_timeout)
        live = live_container(doc, settings.docker_timeout)
        with DrillContainer(doc, live, settings) as box:
            if procedure == "pg-dumpall":
                differences = drill_postgres(doc, backup, box, lines)
            elif procedure == "redis-bgsave":
                differences = drill_redis(doc, backup, box, settings, env, lines)
            else:
                lines.append("(archive: restored into fresh volumes, then every entry's name, type, mode, owner and size compared)")
                differences = drill_archive(doc, backup, box, engine, lines)
            lines.insert(1, f"throwaway container {box.name} (removed afterwards), image {doc['container'].get('image')}")
    out.write("\n".join(lines) + "\n")
    if differences:
        raise BackupError(f"drill failed: {differences} difference(s) between the restored data and the manifest")
    if doc.get("format") in SINGLE_FILE_SCANS or doc.get("contents", {}).get("groups"):
        out.write("drill passed: structure and contents match the manifest (nothing was started)\n")
    else:
        out.write("drill passed: the restored data matches the manifest\n")
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

    What depends on the engine's answers (Redis's data dir, the buckets, a Meilisearch
    dump uid) is shown as <placeholders>.
    """
    name = job.container
    tmp = f"/tmp/bba-{job.basename}"
    fallback = f"fallback: {job.cls.fallback or 'none'}"
    packed = job.compression.suffix
    suffix, checks = f".tar.{packed}", f"{job.compression.format} complete, tar readable, entry count"
    steps: list[str] = []
    archive_mounts = job.procedure == "mounted-archive"
    if job.procedure == "pg-dumpall":
        suffix, checks = f".sql.{packed}", f"{job.compression.format} complete, trailer line present, size"
        pg = pg_target(job.resolution.container)
        psql = mask_argv(exec_argv(name, ["psql", "-X", "-A", "-t", "-q", "-U", pg.user, "-d", "<each database>", "-c", "<census query>"], secrets=pg.secrets))
        dump = mask_argv(exec_argv(name, ["pg_dumpall", "-U", pg.user, "--clean", "--if-exists"], secrets=pg.secrets))
        steps += [f"run: {psql}", f"run: {dump} | {job.compression.tool} -{job.compression.level} > <backup>.partial (mode 0600)"]
    elif job.procedure == "redis-bgsave":
        cli = mask_argv(exec_argv(name, ["redis-cli", "--no-auth-warning"], secrets=redis_target(job.resolution.container, job.settings, job.env).secrets))
        for command in ("INFO keyspace", "LASTSAVE", "BGSAVE", "INFO persistence (until the save is done)", "CONFIG GET dir dbfilename appendonly appenddirname"):
            steps.append(f"run: {cli} {command}")
        steps.append(f"archive: <dir>/<dbfilename> and, with appendonly, <dir>/<appenddirname> ({fallback})")
        checks += ", RDB magic, redis-check-rdb"
    elif job.procedure == "vault-raft-snapshot":
        suffix, checks = ".snap", "gzip'd tar, SHA256SUMS, vault operator raft snapshot inspect"
        token_env = job.cls.options["token_env"]
        if job.env.get(token_env):
            vault = ["-e", "VAULT_ADDR", "-e", "VAULT_TOKEN", name, "vault", "operator", "raft", "snapshot"]
            steps += [f"run: docker exec {shlex.join([*vault, 'save', tmp + '.snap'])}", f"run: docker exec {shlex.join([*vault, 'inspect', tmp + '.snap'])}",
                      f"run: docker cp {name}:{tmp}.snap - > <backup>.partial", f"run: docker exec {name} rm -f {tmp}.snap"]
        else:
            steps.append(f"fall back: no {token_env} in the environment ({fallback})")
            archive_mounts = True
    elif job.procedure == "mc-mirror":
        alias = job.env.get(job.cls.options["alias_env"])
        if alias:
            where = "mc (on this host if it is there, else docker exec -w <dir> " + name + " mc)"
            steps += [f"run: {where} ls --json {alias}", f"run: {where} mirror --preserve --json {alias}/<bucket> <staging>/buckets/<bucket>",
                      f"run: {where} admin cluster bucket export {alias} --json",
                      f"stage in: {job.backup_dir}/.{job.basename}.mc-staging (0700, removed afterwards)"]
        else:
            steps.append(f"fall back: no {job.cls.options['alias_env']} in the environment ({fallback})")
            archive_mounts = True
    elif job.procedure == "search-engine":
        kind = search_engine_kind(job)
        if kind == "meilisearch" and job.cls.options["meilisearch_dump"]:
            suffix, checks = ".dump", "gzip'd tar with metadata.json"
            url = job.cls.options["meilisearch_url"]
            steps += [f"run: docker exec -i {name} curl -K - (POST {url}/dumps; key on stdin)", f"run: ... GET {url}/tasks/<uid> until succeeded",
                      f"run: docker cp {name}:<workdir>/dumps/<dumpUid>.dump - > <backup>.partial", f"run: docker exec {name} rm -f <that dump>"]
        else:
            steps.append(f"archive ({kind}): {'configuration mounts only (/etc/searxng)' if kind == 'searxng' else 'the mounted data'}")
            archive_mounts = True
    elif job.procedure == "compose-root-archive":
        labels = compose_labels(job.resolution.container)
        root = job.cls.options["compose_root"] or labels.get("com.docker.compose.project.working_dir", "<none: fallback>")
        steps.append(f"read: compose root {root} -> compose-root/")
        steps.append(f"read: the mounts of every container of compose project {labels.get('com.docker.compose.project', '<none>')} -> containers/<name>/")
        if job.secondary:
            steps.append(f"also take: {job.secondary} of {name} ({'dumps/pg_dumpall.sql.gz' if job.secondary == 'pg-dumpall' else 'BGSAVE first'})")
    if archive_mounts:
        for mount in job.mounts:
            steps.append(f"read: {mount.source} -> {mount.destination} ({mount.type})" if mount.via == "host" else f"run: docker cp {name}:{mount.destination} -")
    if job.pause and suffix.startswith(".tar."):
        steps = [f"run: docker pause {name}", *steps, f"run: docker unpause {name}"]
    final = job.backup_dir / (job.basename + suffix)
    steps = [step.replace("<backup>", str(final)) for step in steps]
    compressed = suffix.startswith((".tar.", ".sql."))
    steps.append(f"write: {final}.partial (mode 0600{f', {job.compression.tool} level {job.compression.level}' if compressed else ''})")
    return [*steps, f"verify: {checks}", f"rename: {final}", f"write: {job.backup_dir / (job.basename + MANIFEST_SUFFIX)}"]


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


def estimate_size(job: BackupJob) -> tuple[int | None, str]:
    """Return (bytes, how) the backup may need before compression, or (None, why not).

    Uncompressed sizes: a deliberate over-estimate, so that a nearly full disk is found
    before anything is touched rather than halfway through.
    """
    if job.procedure == "pg-dumpall" and job.resolution.container.get("State", {}).get("Running"):
        target = pg_target(job.resolution.container)
        size = pg_json(target, "postgres", "SELECT to_json(coalesce(sum(pg_database_size(datname)), 0)) FROM pg_database", job.settings.docker_timeout)
        return int(size), "pg_database_size of every database"
    if job.procedure == "redis-bgsave" and job.resolution.container.get("State", {}).get("Running"):
        with contextlib.suppress(BackupError):
            redis = redis_target(job.resolution.container, job.settings, job.env)
            info = parse_info(redis_cli(redis, "INFO", "memory", timeout=job.settings.docker_timeout))
            if info.get("used_memory_dataset", "").isdigit():
                return int(info["used_memory_dataset"]), "Redis used_memory_dataset"
    mounts = [m for m in job.mounts if m.via == "host"]
    if job.mounts and len(mounts) == len(job.mounts):
        return sum(tree_size(m.source) for m in mounts), "size of the mounted data"
    return None, "the mounted data is not readable from this host"


def check_free_space(job: BackupJob) -> None:
    """Refuse (exit 3) before touching the container when the backup may not fit."""
    needed, how = estimate_size(job)
    job.estimated_bytes = needed
    if needed is None:
        LOG.info("free space not checked: %s", how)
        return
    probe = job.backup_dir
    while not probe.exists():
        probe = probe.parent
    fs = os.statvfs(probe)
    free = fs.f_bavail * fs.f_frsize
    margin = int(job.settings.space_margin_mb * (1 << 20))
    LOG.info("estimated size %s (%s); %s free on the filesystem of %s", human_size(needed), how, human_size(free), job.backup_dir)
    if free < needed + margin:
        raise RefusedError(
            f"not enough space for {job.module.id}: about {human_size(needed)} ({how}) plus a {human_size(margin)} margin "
            f"needed, {human_size(free)} free on the filesystem of {job.backup_dir} (override: --no-space-check)"
        )


def cmd_backup(args: argparse.Namespace, config: Config, settings: Settings, out: IO[str], env: dict[str, str]) -> int:
    """Back up one module; print the written paths (or the manifest with --json)."""
    platform_root = Path(settings.platform_root)
    module = load_module(platform_root, args.module)
    if module.statefulness == "stateless":
        raise RefusedError(f"module {module.id!r} is stateless ({module.yaml_path}: spec.runtime.statefulness); nothing to back up")
    if module.statefulness == UNDECLARED:
        LOG.warning("%s does not declare spec.runtime.statefulness; backing up anyway", module.yaml_path)
    cls, pattern = classify(module.id, config)
    procedure = args.procedure or cls.procedure
    LOG.info("module %s: class %s (%s), matched by %s, procedure %s", module.id, cls.letter, cls.title, pattern, procedure)
    if args.pause and procedure == "pg-dumpall":
        raise UsageError("--pause does not apply to pg-dumpall: the dump needs the server answering (it is consistent without a pause)")

    timeout = settings.docker_timeout
    containers = list_containers(timeout)
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

    engine = engine_info(timeout)
    read_on_host = engine.local and not engine.rootless and not args.via_docker
    mounts, skipped = plan_mounts(resolution.container, read_on_host=read_on_host)
    for dest, reason in skipped:
        LOG.info("skipping mount %s: %s", dest, reason)

    backup_dir = Path(settings.backup_dir or platform_root / "backups").absolute()
    job = BackupJob(module, cls, procedure, resolution, engine, settings, mounts, skipped, backup_dir, utc_timestamp(), pause, env, containers)
    job.compression = choose_compression(settings)
    if procedure == "compose-root-archive":
        also = classify(module.id, config, exclude=cls.letter)[0].procedure
        job.secondary = also if also in ("pg-dumpall", "redis-bgsave") else None
    if args.dry_run:
        ensure_backup_dir(backup_dir, create=False)
        print_plan(job, out, args.json)
        return EXIT_OK
    if not args.no_space_check:
        check_free_space(job)

    dir_fd = ensure_backup_dir(backup_dir, create=True)
    assert dir_fd is not None
    try:
        with module_lock(dir_fd, module.id, settings.lock_timeout):
            remove_stale_partials(dir_fd, module.id)
            job.timestamp = free_timestamp(dir_fd, module.id, (*BACKUP_SUFFIXES, MANIFEST_SUFFIX))
            started = datetime.datetime.now(datetime.UTC)
            result = PROCEDURES[procedure](job, dir_fd)
            finished = datetime.datetime.now(datetime.UTC)
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
        containers = list_containers(settings.docker_timeout)
        engine = engine_info(settings.docker_timeout)
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
    lines = [f"  {'MODULE':<30} {'LIFECYCLE':<13} {'CONTAINER (RULE)':<44} {'STATE':<10} {'DATA':>10}"]
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
            where, state = "?", "?"
        elif row.container:
            where, state = f"{row.container} ({_short_rule(row.resolved_by)})", row.state or "?"
        else:
            where, state = f"- ({row.unresolved})", "-"
        size = human_size(row.data_bytes) if row.container and row.statefulness != "stateless" else ""
        mark = "  <- first candidate (active, running, class E)" if row.first_candidate else ""
        lines.append(f"  {row.module:<30} {row.lifecycle:<13} {where:<44.44} {state:<10} {size:>10}{mark}")
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
    parser.add_argument("module", nargs="?", help="module id (directory under <platform-root>/modules)")
    parser.add_argument("--list", action="store_true", help="audit every module instead of backing one up")
    parser.add_argument("--verify", metavar="FILE", type=Path, help="re-check a backup against its manifest")
    parser.add_argument("--drill", metavar="FILE", type=Path, help="restore a backup into a throwaway container and compare")
    parser.add_argument("--dry-run", action="store_true", help="print every command and path; change nothing")
    parser.add_argument("--container", metavar="NAME", help="use this container instead of resolving one")
    parser.add_argument("--pause", action="store_true", help="freeze the container while archiving (always unpaused)")
    parser.add_argument("--procedure", choices=sorted(PROCEDURES), help="override the class's procedure")
    parser.add_argument("--via-docker", action="store_true", help="read mounts with docker cp even when the host paths are readable")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--platform-root", metavar="DIR", help=f"platform checkout (env PLATFORM_ROOT, default {DEFAULT_PLATFORM_ROOT})")
    parser.add_argument("--backup-dir", metavar="DIR", help="where backups go (env BACKUP_DIR, default <platform-root>/backups)")
    parser.add_argument("--classes", metavar="FILE", type=Path, default=DEFAULT_CLASSES, help="class table (default: classes.toml beside this script)")
    parser.add_argument("--docker-timeout", metavar="SECONDS", help="timeout of each short docker call (env BBA_DOCKER_TIMEOUT)")
    parser.add_argument("--pause-timeout", metavar="SECONDS", help="timeout of a streamed copy (env BBA_PAUSE_TIMEOUT)")
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
    args = parser.parse_args(argv)
    modes = [name for name, given in (("MODULE_ID", args.module), ("--list", args.list), ("--verify", args.verify), ("--drill", args.drill)) if given]
    if len(modes) != 1:
        raise UsageError(f"give exactly one of MODULE_ID, --list, --verify FILE or --drill FILE (got {', '.join(modes) or 'none'})")
    if not args.module:
        for flag in ("dry_run", "pause", "container", "procedure", "via_docker"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to a backup, not to {modes[0]}")
    if args.module is not None:
        validate_module_id(args.module)
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


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        return f"{PROG}: {prefix}{record.getMessage()}"


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
        needs_root = bool(args.drill) or bool(args.module and not args.dry_run)
        check_guards(env, os.geteuid(), allow_ci=args.allow_ci, allow_non_root=args.allow_non_root, needs_root=needs_root)
        config = load_config(args.classes)
        settings = resolve_settings(config, args, env)
        if args.list:
            return cmd_list(args, config, settings, sys.stdout)
        if args.verify:
            return cmd_verify(args.verify, args.json, sys.stdout)
        if args.drill:
            return drill_backup(args.drill, settings, env, sys.stdout)
        return cmd_backup(args, config, settings, sys.stdout, env)
    except Interrupted as exc:
        LOG.error("%s; cleaned up, no backup written", exc)
        return 128 + exc.signum
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {failure_line(exc)}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, BackupError) else EXIT_FAILED
    finally:
        if RUN_COUNTS:
            LOG.debug("programs run: %s", ", ".join(f"{name} {count}x" for name, count in sorted(RUN_COUNTS.items())))
            LOG.debug("peak memory: this process %d MiB, largest program it ran %d MiB",
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >> 10)
        for signum, old in old_handlers.items():
            signal.signal(signum, old)
        os.umask(old_umask)
        LOG.removeHandler(handler)
        LOG.propagate = old_propagate


def failure_line(exc: Exception) -> str:
    """Return the one stderr line (after the program name) that reports exc."""
    if isinstance(exc, BackupError):
        return f"{'refused' if isinstance(exc, RefusedError) else 'error'}: {exc}"
    if isinstance(exc, OSError):
        # One nobody anticipated (an I/O error reading a volume, say): still one line that
        # names the file; the partial backup is already gone.
        where = f"{os.fsdecode(exc.filename)}: " if isinstance(exc.filename, (str, bytes)) else ""
        return f"error: {where}{exc.strerror or exc}"
    return f"error: internal error, a bug (run with --debug for the traceback): {type(exc).__name__}: {exc}"


def _in_main_thread() -> bool:
    import threading

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


if __name__ == "__main__":
    sys.exit(main())
