"""A private Docker engine for the end-to-end tests and `make demo`.

Starts Debian's dockerd on its own socket, data root and exec root (no bridge, no
iptables, vfs storage), so it never touches a system engine, and imports a tiny base
image: no registry is reachable here, so containers run the host's own binaries through
a read-only bind of /usr. Run as a script: `python3 tests/sandbox.py demo`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BASE_IMAGE = "bba-base:latest"
# Users whose data directories the base image pre-owns, as the real images do.
SERVICE_DIRS = {
    "/var/lib/postgresql": ("postgres", 0o755),
    "/var/lib/postgresql/data": ("postgres", 0o700),
    "/var/run/postgresql": ("postgres", 0o2775),
    "/data": ("redis", 0o755),
}
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1:] or ["/usr/lib/postgresql/15/bin"]
PG_PATH = f"{PG_BIN[0]}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the official postgres image's entrypoint does, reduced: initdb on the first start
# with POSTGRES_USER and POSTGRES_PASSWORD, then postgres in the foreground. The password
# goes through a file, never through argv.
PG_START = (
    'set -e; D=/var/lib/postgresql/data; if [ ! -s "$D/PG_VERSION" ]; then '
    'printf "%s" "$POSTGRES_PASSWORD" > /tmp/pw; '
    'initdb -D "$D" -U "${POSTGRES_USER:-postgres}" --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 >/dev/null; '
    'rm -f /tmp/pw; fi; exec postgres -D "$D" -c listen_addresses=localhost'
)
# Redis configured as the common images do, the password in a config file (not argv).
REDIS_START = (
    'set -e; umask 077; { echo "bind 127.0.0.1"; echo "dir /data"; echo "appendonly ${REDIS_APPENDONLY:-no}"; '
    'if [ -n "$REDIS_PASSWORD" ]; then echo "requirepass $REDIS_PASSWORD"; fi; '
    'if [ -n "$REDIS_EXTRA" ]; then echo "$REDIS_EXTRA"; fi; } > /tmp/redis.conf; '
    "exec redis-server /tmp/redis.conf"
)


class EngineUnavailable(RuntimeError):
    """dockerd is not installed or did not start."""


class Sandbox:
    """A dockerd of our own; stop() kills it and removes all of its state."""

    def __init__(self) -> None:
        # Short path: the containerd socket lives under the exec root (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="bba-", dir="/tmp"))
        self.root.chmod(0o755)
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        return env

    def docker(self, *args: str, check: bool = True, input: bytes | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        raw = subprocess.run(["docker", *args], env={**self.env, **(env_extra or {})}, input=input, capture_output=True, timeout=300)
        proc = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def start(self) -> Sandbox:
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
        if dockerd is None:
            raise EngineUnavailable("dockerd is not installed (apt-get install docker.io)")
        if os.geteuid() != 0:
            raise EngineUnavailable("a private dockerd needs root")
        with open(self.root / "dockerd.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    dockerd, "-H", self.host,
                    "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "x"),
                    "--pidfile", str(self.root / "dockerd.pid"),
                    "--bridge=none", "--iptables=false", "--ip6tables=false",
                    "--storage-driver=vfs",
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.docker("version", check=False).returncode == 0:
                self._import_base_image()
                return self
            time.sleep(0.3)
        tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise EngineUnavailable(f"dockerd did not start: {tail}")

    def _import_base_image(self) -> None:
        rootfs = self.root / "rootfs"
        (rootfs / "etc").mkdir(parents=True)
        rootfs.chmod(0o755)  # a 0700 top makes every non-root container fail: "sh: not found"
        for name in ("passwd", "group"):
            shutil.copy(f"/etc/{name}", rootfs / "etc" / name)
        for name in ("bin", "lib", "lib64", "sbin"):
            (rootfs / name).symlink_to(f"usr/{name}")
        for name in ("usr", "tmp", "var/run", "run", "root", "home"):
            (rootfs / name).mkdir(parents=True, exist_ok=True)
        (rootfs / "tmp").chmod(0o1777)
        users = _passwd()
        for path, (user, mode) in SERVICE_DIRS.items():
            target = rootfs / path.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            uid, gid = users.get(user, (0, 0))
            os.chown(target, uid, gid)
            target.chmod(mode)
        archive = self.root / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".")
        self.docker("import", str(archive), BASE_IMAGE)

    def run_container(self, name: str, *args: str, command: tuple[str, ...] = ("sleep", "infinity"), user: str | None = None) -> str:
        """Start a container of the base image with the host's /usr; return its id."""
        argv = ["run", "-d", "--name", name, "--network", "none", "-v", "/usr:/usr:ro", *args]
        if user:
            argv += ["--user", user]
        return self.docker(*argv, BASE_IMAGE, *command).stdout.strip()

    def run_postgres(self, name: str, *args: str, user: str = "postgres", password: str = "secret", volume: str | None = None) -> str:
        """Start PostgreSQL (the host's binaries) as the official image would; wait until it answers."""
        cid = self.run_container(
            name, "-e", f"POSTGRES_USER={user}", "-e", f"POSTGRES_PASSWORD={password}", "-e", f"PATH={PG_PATH}",
            "-v", f"{volume or name + '-data'}:/var/lib/postgresql/data", *args, command=("sh", "-c", PG_START), user="postgres",
        )
        self.wait_for(name, ["psql", "-U", user, "-d", "postgres", "-Atc", "select 1"])
        return cid

    def run_redis(self, name: str, *args: str, password: str = "", appendonly: bool = False, volume: str | None = None, extra: str = "") -> str:
        """Start Redis (the host's binaries) with its data in a volume at /data; wait until it answers."""
        cid = self.run_container(
            name, "-e", f"REDIS_PASSWORD={password}", "-e", f"REDIS_APPENDONLY={'yes' if appendonly else 'no'}", "-e", f"REDIS_EXTRA={extra}",
            "-v", f"{volume or name + '-data'}:/data", *args, command=("sh", "-c", REDIS_START), user="redis",
        )
        self.wait_for(name, ["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG'])
        return cid

    def wait_for(self, name: str, probe: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.docker("exec", name, *probe, check=False).returncode != 0:
            if time.monotonic() > deadline:
                logs = self.docker("logs", name, check=False)
                raise RuntimeError(f"{name} did not become ready: {logs.stdout[-1000:]} {logs.stderr[-1000:]}")
            time.sleep(0.2)

    def inspect(self, name: str) -> dict:
        return json.loads(self.docker("inspect", name).stdout)[0]

    def remove_all_containers(self) -> None:
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", "-v", *ids, check=False)
        self.docker("volume", "prune", "-f", check=False)
        for vol in self.docker("volume", "ls", "-q").stdout.split():
            self.docker("volume", "rm", "-f", vol, check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.remove_all_containers()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _unmount_under(self.root)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], capture_output=True)  # any depth: shutil.rmtree recurses


def _passwd() -> dict[str, tuple[int, int]]:
    users = {}
    with open("/etc/passwd") as fh:
        for line in fh:
            parts = line.split(":")
            if len(parts) > 3:
                users[parts[0]] = (int(parts[2]), int(parts[3]))
    return users


def _unmount_under(root: Path) -> None:
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1] for line in fh if line.split()[1].startswith(str(root) + "/")]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


# --------------------------------------------------------------------------- demo

DEMO_SERVICES = {
    # module id -> docker run arguments; the compose label is how most modules resolve.
    "uptime-kuma": ["--label", "com.docker.compose.service=uptime-kuma", "-v", "demo-kuma:/app/data"],
    "forgejo": ["--label", "com.docker.compose.service=forgejo", "-v", "demo-forgejo:/data", "-v", "{bind}:/etc/forgejo"],
    "n8n": ["-v", "demo-n8n:/home/node/.n8n"],
    "searxng": ["--label", "com.docker.compose.service=searxng", "-v", "{bind}:/etc/searxng"],
}
DEMO_PASSWORD = "demo-only-password"  # a sandbox secret; the tool never puts it in argv


def demo() -> int:
    """Start the sandbox, run example services, audit them, back up and drill them, roll one back after a bad apply."""
    repo = Path(__file__).resolve().parent.parent
    tool = [sys.executable, str(repo / "backup_before_apply.py")]
    out = repo / "demo-backups"
    print("demo: starting a private dockerd under /tmp (nothing touches a system engine)", file=sys.stderr)
    box = Sandbox().start()
    try:
        for module, args in DEMO_SERVICES.items():
            bind = box.root / "binds" / module
            bind.mkdir(parents=True)
            (bind / "settings.yml").write_text(f"# {module} settings\nsecret_key: demo-only\n")
            box.run_container(module, *[a.replace("{bind}", str(bind)) for a in args])
            box.docker("exec", module, "sh", "-c", f"mkdir -p /data /app/data; head -c 200000 /dev/urandom > /tmp/x; for d in /app/data /data /home/node/.n8n; do [ -d $d ] && cp /tmp/x $d/{module}.db; done; true")
        box.run_postgres("postgres", "--label", "com.docker.compose.service=postgres", user="platform", password=DEMO_PASSWORD)
        for sql in ("CREATE DATABASE app", "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g"):
            box.docker("exec", "postgres", "psql", "-q", "-U", "platform", "-d", "postgres" if "DATABASE" in sql else "app", "-c", sql)
        box.run_redis("redis", password=DEMO_PASSWORD, appendonly=True)
        script = "".join(f"SET session:{i} {i}\n" for i in range(1000)).encode()
        box.docker("exec", "-i", "-e", "REDISCLI_AUTH", "redis", "redis-cli", input=script, env_extra={"REDISCLI_AUTH": DEMO_PASSWORD})

        # The tool refuses to run under CI; the demo is a sandbox, so it says so explicitly.
        common = ["--platform-root", str(repo / "examples/platform"), "--backup-dir", str(out), "--allow-ci"]
        print("\n$ backup_before_apply.py --list", file=sys.stderr)
        subprocess.run([*tool, "--list", *common], env=box.env, check=True)
        listing = json.loads(subprocess.run([*tool, "--list", "--json", "-q", *common], env=box.env, check=True, capture_output=True, text=True).stdout)
        targets = [r["module"] for r in listing if r["class_letter"] in ("A", "B", "E") and r["statefulness"] == "stateful" and r["running"]]
        print("\n$ backup_before_apply.py --coverage", file=sys.stderr)
        subprocess.run([*tool, "--coverage", *common], env=box.env, check=True)
        print(f"\n$ backup_before_apply.py {' '.join(targets)} --jobs 2", file=sys.stderr)
        proc = subprocess.run([*tool, *targets, "--jobs", "2", *common, "-q"], env=box.env, capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:
            raise SystemExit(f"demo: the backups failed (exit {proc.returncode}):\n{proc.stderr}")
        paths = [line for line in proc.stdout.splitlines() if line.startswith("/") and not line.endswith(".manifest.json")]
        written = {module: next(p for p in paths if Path(p).name.startswith(f"{module}-2")) for module in targets}
        print("\n$ backup_before_apply.py --check uptime-kuma --max-age 1h   # what an apply pipeline asks", file=sys.stderr)
        subprocess.run([*tool, "--check", "uptime-kuma", "--max-age", "1h", *common], env=box.env, check=True)
        for module in ("postgres", "redis", "uptime-kuma"):
            print(f"\n$ backup_before_apply.py --drill {written[module]}", file=sys.stderr)
            subprocess.run([*tool, "--drill", written[module], "--allow-ci", "-q"], env=box.env, check=True)
        # A bad apply on uptime-kuma, then the rollback.
        bad_apply = "rm -f /app/data/uptime-kuma.db; echo 'written by a bad apply' > /app/data/broken.txt"
        print(f"\n$ docker exec uptime-kuma sh -c {bad_apply!r}   # a bad apply", file=sys.stderr)
        box.docker("exec", "uptime-kuma", "sh", "-c", bad_apply)
        print(f"\n$ backup_before_apply.py --restore {written['uptime-kuma']} --yes", file=sys.stderr)
        subprocess.run([*tool, "--restore", written["uptime-kuma"], "--yes", *common, "-q"], env=box.env, check=True)
        back = box.docker("exec", "uptime-kuma", "ls", "/app/data").stdout.split()
        if "uptime-kuma.db" not in back or "broken.txt" in back:
            raise SystemExit(f"demo: the restore did not put /app/data back: {back}")
        print("\n$ backup_before_apply.py --prune --keep 1 --older-than 0s   # what retention would remove (nothing is, without --delete)", file=sys.stderr)
        subprocess.run([*tool, "--prune", "--keep", "1", "--older-than", "0s", *common], env=box.env, check=True)
        print(f"\ndemo: {len(targets)} backups in {out}, 3 of them drilled, uptime-kuma rolled back after a bad apply:", file=sys.stderr)
        subprocess.run(["ls", "-l", str(out)], check=True)
        return 0
    finally:
        box.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["demo"]:
        sys.exit("usage: sandbox.py demo")
    sys.exit(demo())
