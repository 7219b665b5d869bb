"""Shared fixtures: the tool as a module, a fake `run` for unit tests, a real engine for e2e."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Property tests: `make test` runs them derandomized (a fixed seed per test, no example
# database), so that CI cannot fail at random; `make fuzz` runs them with random seeds and
# FUZZ_SCALE times the examples, before a release.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FUZZ_SCALE = int(os.environ.get("FUZZ_SCALE", "20")) if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1


def examples(count: int) -> int:
    """Return how many examples a property test runs: count, or FUZZ_SCALE times as many under `make fuzz`."""
    return count * FUZZ_SCALE
TOOL = REPO / "backup_before_apply.py"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import backup_before_apply as bba  # noqa: E402
from sandbox import EngineUnavailable, Sandbox  # noqa: E402


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in bba.CI_FALSE_VALUES


# --------------------------------------------------------------------------- platform trees


def write_module(root: Path, module_id: str, yaml: str | None = None, runbook: str | None = None, **fields: str) -> Path:
    """Write modules/<id>/module.yaml (and runbook.md) under root; return the yaml path."""
    directory = root / "modules" / module_id
    directory.mkdir(parents=True, exist_ok=True)
    if yaml is None:
        container = f"\n    container: {fields['container']}" if "container" in fields else ""
        yaml = (
            f"metadata:\n  id: {module_id}\n  lifecycle: {fields.get('lifecycle', 'active')}\n"
            f"spec:\n  runtime:\n    statefulness: {fields.get('statefulness', 'stateful')}{container}\n"
        )
    (directory / "module.yaml").write_text(yaml)
    if runbook is not None:
        (directory / "runbook.md").write_text(runbook)
    return directory / "module.yaml"


@pytest.fixture
def platform(tmp_path: Path) -> Path:
    root = tmp_path / "platform"
    (root / "modules").mkdir(parents=True)
    return root


@pytest.fixture
def config() -> bba.Config:
    return bba.load_config(REPO / "classes.toml")


# --------------------------------------------------------------------------- fake docker (unit tier)


def fake_container(name: str, mounts: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
                   running: bool = True, paused: bool = False) -> dict[str, Any]:
    status = "paused" if paused else "running" if running else "exited"
    return {
        "Id": (name.encode().hex() + "0" * 64)[:64],
        "Name": "/" + name,
        "Image": "sha256:" + "ab" * 32,
        "Config": {"Image": "example/image:1", "Labels": labels or {}},
        "State": {"Status": status, "Running": running or paused, "Paused": paused},
        "Mounts": mounts or [],
    }


REAL_RUN = bba.run


class FakeDocker:
    """Stands in for `run` only: answers the docker CLI calls the tool makes (other programs run for real)."""

    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.containers = containers
        self.calls: list[list[str]] = []
        self.fail_on: dict[str, str] = {}
        self.hang_on: set[str] = set()  # subcommands that run past their timeout

    def __call__(self, argv: list[str], *, check: bool = True, timeout: float | None = None, input: bytes | None = None, secrets=None, cwd=None):
        if argv[0] != "docker":  # a host tool (du, GNU tar): the real thing
            return REAL_RUN(argv, check=check, timeout=timeout, input=input, secrets=secrets, cwd=cwd)
        self.calls.append(argv)
        bba.count_run("docker")  # as the real run() counts
        sub = argv[1]
        if sub in self.hang_on:
            raise bba.CommandError(argv, None, b"")
        if sub in self.fail_on:
            if check:
                raise bba.CommandError(argv, 1, self.fail_on[sub])
            return subprocess.CompletedProcess(argv, 1, b"", self.fail_on[sub].encode())
        if sub == "ps":
            out = "\n".join(c["Id"] for c in self.containers)
        elif sub == "inspect":
            refs = [a for i, a in enumerate(argv[2:], 2) if not a.startswith("--") and argv[i - 1] not in ("--type", "--format")]
            found = [c for c in self.containers if c["Id"] in refs or c["Name"].lstrip("/") in refs]
            if "--format" in argv:  # the one format the tool asks for: {{json .State}}
                if not found:
                    raise bba.CommandError(argv, 1, "Error: No such container")
                out = json.dumps(found[0]["State"])
            else:
                out = json.dumps(found)
        elif sub == "info":
            out = json.dumps({"ServerVersion": "99.0-fake", "SecurityOptions": ["name=seccomp"]})
        elif sub == "context":
            out = json.dumps("unix:///var/run/docker.sock")
        elif sub in ("pause", "unpause"):
            out = argv[2]
        else:
            raise AssertionError(f"unexpected docker call {argv}")
        return subprocess.CompletedProcess(argv, 0, out.encode(), b"")

    def subcommands(self) -> list[str]:
        return [c[1] for c in self.calls]


@pytest.fixture
def fake_docker(monkeypatch: pytest.MonkeyPatch):
    def install(*containers: dict[str, Any]) -> FakeDocker:
        fake = FakeDocker(list(containers))
        monkeypatch.setattr(bba, "run", fake)
        monkeypatch.delenv("DOCKER_HOST", raising=False)
        return fake
    return install


# --------------------------------------------------------------------------- real engine (e2e tier)


@pytest.fixture(scope="session")
def engine():
    try:
        box = Sandbox().start()
    except EngineUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true and no Docker engine: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    yield box
    box.stop()


@pytest.fixture
def docker_engine(engine: Sandbox):
    """The session's engine, emptied of containers and volumes after each test."""
    yield engine
    engine.remove_all_containers()


def run_tool(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the tool as a subprocess, as an operator would (with --allow-ci: tests run under CI)."""
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--allow-ci"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


class ArgvWatcher:
    """Samples every process's argv (/proc/*/cmdline) while a run goes on, looking for a secret."""

    def __init__(self, *secrets: str) -> None:
        self.secrets = [s.encode() for s in secrets]
        self.hits: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/cmdline", "rb") as fh:
                            cmdline = fh.read()
                    except OSError:
                        continue
                    if any(s in cmdline for s in self.secrets):
                        self.hits.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
            self.samples += 1

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_backup(engine, platform: Path, module: str, backup_dir: Path, *args: str, extra_env: dict[str, str] | None = None):
    """Back up module of platform on engine into backup_dir, as an operator would."""
    env = {**engine.env, **(extra_env or {})}
    return run_tool(module, "--platform-root", str(platform), "--backup-dir", str(backup_dir), *args, env=env)
