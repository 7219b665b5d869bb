#!/usr/bin/env python3
"""`make bench`: the tool against the shell pipelines it replaces, in the same run.

Builds data of a stated size in real volumes on the private test engine (tests/sandbox.py),
then runs each variant several times, alternating, and prints the median wall time as a
ratio against the shell baseline, MB/s, the tool's peak RSS, the output size, and the
docker calls of `--list` over 50 modules. Sizes: BENCH_MB (class E tree, default 256) and
BENCH_PG_ROWS (class A database, default 2,000,000 rows, about 200 MB of SQL); BENCH_RUNS
(default 3). Absolute times on shared machines are noise; the ratios are the result.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]
from sandbox import Sandbox  # noqa: E402

TOOL = [sys.executable, str(REPO / "backup_before_apply.py")]
MB = 1 << 20


def build_tree(root: Path, size_mb: int) -> int:
    """A mixed tree: 40% log-like text, 40% random blobs, 20% in 20,000 small files."""
    root.mkdir(parents=True, exist_ok=True)
    text_line = b"2026-11-28T10:52:35Z level=info service=kuma msg=\"check ok\" latency_ms=%d target=https://example.internal/%d\n"
    text_total = size_mb * MB * 4 // 10
    with open(root / "app.log", "wb") as fh:
        written, i = 0, 0
        while written < text_total:
            chunk = b"".join(text_line % (i + k, (i + k) % 997) for k in range(2000))
            fh.write(chunk)
            written += len(chunk)
            i += 2000
    blobs = root / "blobs"
    blobs.mkdir()
    for n in range(max(1, size_mb * 4 // 10 // 16)):
        (blobs / f"blob{n:04d}.bin").write_bytes(os.urandom(16 * MB))
    small = root / "small"
    per_file = max(1, size_mb * MB * 2 // 10 // 20000)
    for d in range(100):
        sub = small / f"d{d:02d}"
        sub.mkdir(parents=True)
        for f in range(200):
            (sub / f"f{f:03d}.json").write_bytes((b'{"id": %d, "v": "' % f) + os.urandom(per_file // 2).hex().encode()[: per_file] + b'"}\n')
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run argv; return (wall seconds, peak RSS in KiB of the process itself)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"bench: {argv} failed ({proc.returncode}): {err[-2000:]}")
    return elapsed, usage.ru_maxrss


def run_variants(variants: dict[str, tuple[list[str], dict[str, str], Path]], runs: int) -> dict[str, dict[str, float]]:
    """Run every variant `runs` times, rotating the order; return medians and sizes."""
    results: dict[str, dict[str, list[float]]] = {name: {"wall": [], "rss": [], "size": []} for name in variants}
    names = list(variants)
    for rep in range(runs):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            argv, env, out_dir = variants[name]
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True, mode=0o700)
            wall, rss = timed(argv, env)
            size = sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix in (".gz", ".zst"))
            results[name]["wall"].append(wall)
            results[name]["rss"].append(rss)
            results[name]["size"].append(size)
            print(f"  run {rep + 1}: {name}: {wall:.1f}s", file=sys.stderr)
    return {name: {key: statistics.median(values) for key, values in r.items()} for name, r in results.items()}


def table(title: str, baseline: str, medians: dict[str, dict[str, float]], data_bytes: int, is_tool: set[str]) -> list[str]:
    base = medians[baseline]["wall"]
    lines = [f"### {title}", "", "| variant | wall ratio vs baseline | MB/s | peak RSS | output |", "|---|---|---|---|---|"]
    for name, m in medians.items():
        rss = f"{m['rss'] / 1024:.0f} MiB" if name in is_tool else "-"
        lines.append(f"| {name} | {m['wall'] / base:.2f} | {data_bytes / MB / m['wall']:.1f} | {rss} | {m['size'] / MB:.1f} MiB |")
    return [*lines, ""]


def main() -> int:
    size_mb = int(os.environ.get("BENCH_MB", "256"))
    pg_rows = int(os.environ.get("BENCH_PG_ROWS", "2000000"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    work = Path(tempfile.mkdtemp(prefix="bba-bench-", dir="/var/tmp"))
    box = Sandbox().start()
    report = [f"`make bench` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}: medians of {runs} alternating runs", ""]
    try:
        platform = work / "platform"
        for module in ("kuma", "postgres", *[f"mod{i:02d}" for i in range(48)]):
            (platform / "modules" / module).mkdir(parents=True)
            (platform / "modules" / module / "module.yaml").write_text("spec:\n  runtime:\n    statefulness: stateful\n")
        box.docker("volume", "create", "bench-data")
        data = Path(json.loads(box.docker("volume", "inspect", "bench-data").stdout)[0]["Mountpoint"])
        print(f"bench: building a {size_mb} MB mixed tree", file=sys.stderr)
        data_bytes = build_tree(data, size_mb)
        box.run_container("kuma", "-v", "bench-data:/data")
        subprocess.run(["tar", "-cf", "/dev/null", "-C", str(data), "."], check=True)  # warm the cache for everyone
        env = {**box.env}
        common = ["--platform-root", str(platform), "--allow-ci", "-q", "--no-space-check"]
        no_pigz = {**env, "BBA_GZIP_TOOL": "zlib"}

        def tool(module: str, out: Path, *extra: str, environment: dict[str, str] = env) -> tuple[list[str], dict[str, str], Path]:
            return ([*TOOL, module, *common, "--backup-dir", str(out), *extra], environment, out)

        def shell(command: str, out: Path) -> tuple[list[str], dict[str, str], Path]:
            return (["bash", "-o", "pipefail", "-c", command], env, out)

        variants_e = {
            "shell: tar -czf (gzip -6)": shell(f"tar -czf {work / 'e-shell'}/kuma.tar.gz -C {data} .", work / "e-shell"),
            "tool, gzip -6, standard library": tool("kuma", work / "e-zlib", "--compress-level", "6", environment=no_pigz),
            "tool, default (gzip -6 via pigz)": tool("kuma", work / "e-pigz"),
            "tool, zstd -3": tool("kuma", work / "e-zstd", "--compression", "zstd"),
        }
        print("bench: class E", file=sys.stderr)
        medians_e = run_variants(variants_e, runs)
        report += table(f"Class E: a {data_bytes / MB:.0f} MiB mixed tree (text, random blobs, 20,000 small files)",
                        "shell: tar -czf (gzip -6)", medians_e, data_bytes, set(list(variants_e)[1:]))

        print(f"bench: class A, loading {pg_rows} rows", file=sys.stderr)
        box.run_postgres("postgres", user="postgres", password="bench")
        box.docker("exec", "postgres", "psql", "-q", "-U", "postgres", "-c",
                   f"CREATE TABLE events AS SELECT g AS id, now() - g * interval '1 second' AS at, md5(g::text) || ' ' || repeat('payload ', 6) AS body "
                   f"FROM generate_series(1, {pg_rows}) g")
        dump_bytes = int(subprocess.run(["bash", "-o", "pipefail", "-c", "docker exec postgres pg_dumpall -U postgres | wc -c"], env=env,
                                        capture_output=True, text=True, check=True).stdout)
        variants_a = {
            "shell: docker exec pg_dumpall, piped to gzip -6": shell(
                f"docker exec postgres pg_dumpall -U postgres --clean --if-exists | gzip -6 > {work / 'a-shell'}/pg.sql.gz", work / "a-shell"),
            "tool, gzip -6, standard library": tool("postgres", work / "a-zlib", "--compress-level", "6", environment=no_pigz),
            "tool, default (gzip -6 via pigz)": tool("postgres", work / "a-pigz"),
            "tool, zstd -3": tool("postgres", work / "a-zstd", "--compression", "zstd"),
        }
        medians_a = run_variants(variants_a, runs)
        report += table(f"Class A: pg_dumpall of a database giving {dump_bytes / MB:.0f} MiB of SQL",
                        "shell: docker exec pg_dumpall, piped to gzip -6", medians_a, dump_bytes, set(list(variants_a)[1:]))

        for i in range(48):
            box.run_container(f"mod{i:02d}", "-v", f"m{i}:/data")
        listing = subprocess.run([*TOOL, "--list", "--platform-root", str(platform), "--allow-ci", "--debug"], env=env,
                                 capture_output=True, text=True, check=True)
        calls = next(line for line in listing.stderr.splitlines() if "programs run:" in line).split("programs run: ", 1)[1]
        report += ["### `--list` over 50 modules", "", f"programs run: {calls}", ""]
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(report)
    print(text)
    (REPO / "bench" / "last-results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
