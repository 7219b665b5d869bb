#!/usr/bin/env python3
"""`make bench`: the tool against the shell pipelines it replaces, in the same run.

Builds data of a stated size in real volumes on the private test engine (tests/sandbox.py),
then runs each variant several times, alternating, and prints the median wall time as a
ratio against the shell baseline, MB/s, the tool's own peak RSS (from its --debug line),
the output size, the docker calls of `--list` over 50 modules, and whether each target of
issue 6 holds; then zstd levels 1-3 against gzip -6 on four kinds of data (the evidence for
zstd's default level). Sizes: BENCH_MB (class E tree, default 2048: the 2 GiB of the issue's
measurements; smaller trees weigh the tool's fixed start-up costs more) and BENCH_PG_ROWS
(class A database, default 2,000,000 rows, about 230 MB of SQL); BENCH_RUNS (default 3).
Absolute times on shared machines are noise; the ratios are the result.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
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


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int | None]:
    """Run argv; return (wall seconds, the tool's own peak RSS in MiB from its --debug line, or None)."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False)
        elapsed = time.monotonic() - started
        err.seek(0)
        text = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"bench: {argv} failed ({proc.returncode}): {text[-2000:]}")
    peak = re.search(r"peak memory: this process (\d+) MiB", text)
    return elapsed, int(peak.group(1)) if peak else None


def run_variants(variants: dict[str, tuple[list[str], dict[str, str], Path]], runs: int) -> dict[str, dict[str, float]]:
    """Run every variant `runs` times, rotating the order; return medians (peak RSS: the maximum) and sizes."""
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
            results[name]["rss"] += [rss] if rss is not None else []
            results[name]["size"].append(size)
            print(f"  run {rep + 1}: {name}: {wall:.1f}s", file=sys.stderr)
            shutil.rmtree(out_dir, ignore_errors=True)
    return {
        name: {"wall": statistics.median(r["wall"]), "size": statistics.median(r["size"]), "rss": max(r["rss"], default=-1)}
        for name, r in results.items()
    }


def table(title: str, baseline: str, medians: dict[str, dict[str, float]], data_bytes: int) -> list[str]:
    base = medians[baseline]["wall"]
    lines = [f"### {title}", "", "| variant | wall ratio vs baseline | MB/s | peak RSS of the tool | output |", "|---|---|---|---|---|"]
    for name, m in medians.items():
        rss = f"{m['rss']:.0f} MiB" if m["rss"] >= 0 else "-"
        label = name.replace("|", "\\|")  # a shell pipe inside a table cell
        lines.append(f"| {label} | {m['wall'] / base:.2f} | {data_bytes / MB / m['wall']:.1f} | {rss} | {m['size'] / MB:.1f} MiB |")
    return [*lines, ""]


def level_table(corpora: dict[str, list[str]], work: Path, env: dict[str, str]) -> list[str]:
    """zstd levels 1-3 and gzip -6 on each corpus (a tar stream made by argv): size, and CPU seconds against level 3.

    Each compressor reads the same tar file, twice, alternating; the lower CPU time of the two counts.
    """
    lines = ["### zstd levels on other data", "",
             "| data | tar size | zstd -1 | zstd -2 | zstd -3 | gzip -6 (pigz) |", "|---|---|---|---|---|---|"]
    source = work / "corpus.tar"
    for name, argv in corpora.items():
        with open(source, "wb") as fh:
            subprocess.run(argv, stdout=fh, env=env, check=True)
        compressors = {"zstd -1": ["zstd", "-1", "-T0"], "zstd -2": ["zstd", "-2", "-T0"], "zstd -3": ["zstd", "-3", "-T0"], "gzip -6 (pigz)": ["pigz", "-6"]}
        cpu: dict[str, list[float]] = {label: [] for label in compressors}
        size: dict[str, int] = {}
        for _ in range(2):
            for label, command in compressors.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                with open(source, "rb") as src, open(work / "corpus.out", "wb") as out:
                    subprocess.run([*command, "-q", "-c"], stdin=src, stdout=out, check=True)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[label].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                size[label] = (work / "corpus.out").stat().st_size
        level3 = min(cpu["zstd -3"])
        cells = [f"{size[label] / MB:.0f} MiB, CPU {min(cpu[label]) / level3:.2f}" for label in compressors]
        lines.append(f"| {name} | {source.stat().st_size / MB:.0f} MiB | " + " | ".join(cells) + " |")
    source.unlink(missing_ok=True)
    (work / "corpus.out").unlink(missing_ok=True)
    return [*lines, "", "CPU: user+sys seconds of the compressor, as a multiple of zstd -3's on the same data.", ""]


def verdict(what: str, value: float, target: str, met: bool) -> str:
    shown = f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"
    return f"| {what} | {shown} | {target} | {'met' if met else 'NOT MET'} |"


def main() -> int:
    size_mb = int(os.environ.get("BENCH_MB", "2048"))
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
        common = ["--platform-root", str(platform), "--allow-ci", "--debug", "--no-space-check"]  # --debug: the tool's peak RSS
        no_pigz = {**env, "BBA_GZIP_TOOL": "zlib"}

        def tool(module: str, out: Path, *extra: str, environment: dict[str, str] = env) -> tuple[list[str], dict[str, str], Path]:
            return ([*TOOL, module, *common, "--backup-dir", str(out), *extra], environment, out)

        def shell(command: str, out: Path) -> tuple[list[str], dict[str, str], Path]:
            return (["bash", "-o", "pipefail", "-c", command], env, out)

        tree = f"-C {data} ."
        e_base, e_zlib, e_default = "shell: tar -czf (gzip -6)", "tool, gzip -6, standard library", "tool, default (gzip -6 via pigz)"
        level = tomllib.loads((REPO / "classes.toml").read_text())["settings"]["zstd_level"]  # the tool's default, as shipped
        e_zstd, e_zstd3 = f"tool, zstd (its default level, {level})", "tool, zstd -3, for reference"
        variants_e = {
            e_base: shell(f"tar -czf {work / 'e-shell'}/kuma.tar.gz {tree}", work / "e-shell"),
            e_zlib: tool("kuma", work / "e-zlib", "--compress-level", "6", environment=no_pigz),
            e_default: tool("kuma", work / "e-pigz"),
            e_zstd: tool("kuma", work / "e-zstd", "--compression", "zstd"),
            e_zstd3: tool("kuma", work / "e-zstd3", "--compression", "zstd", "--zstd-level", "3"),
            "shell, for reference: tar -cf - | pigz -6": shell(f"tar -cf - {tree} | pigz -6 > {work / 'e-shell-pigz'}/kuma.tar.gz", work / "e-shell-pigz"),
            f"shell, for reference: tar -cf - | zstd -{level} -T0": shell(f"tar -cf - {tree} | zstd -{level} -T0 -q > {work / 'e-shell-zstd'}/kuma.tar.zst", work / "e-shell-zstd"),
            "shell, for reference: tar -cf - | zstd -3 -T0": shell(f"tar -cf - {tree} | zstd -3 -T0 -q > {work / 'e-shell-zstd3'}/kuma.tar.zst", work / "e-shell-zstd3"),
        }
        print("bench: class E", file=sys.stderr)
        medians_e = run_variants(variants_e, runs)
        report += table(f"Class E: a {data_bytes / MB:.0f} MiB mixed tree (text, random blobs, 20,000 small files)", e_base, medians_e, data_bytes)

        print(f"bench: class A, loading {pg_rows} rows", file=sys.stderr)
        box.run_postgres("postgres", user="postgres", password="bench")
        box.docker("exec", "postgres", "psql", "-q", "-U", "postgres", "-c",
                   f"CREATE TABLE events AS SELECT g AS id, now() - g * interval '1 second' AS at, md5(g::text) || ' ' || repeat('payload ', 6) AS body "
                   f"FROM generate_series(1, {pg_rows}) g")
        dump = "docker exec postgres pg_dumpall -U postgres --clean --if-exists"
        dump_bytes = int(subprocess.run(["bash", "-o", "pipefail", "-c", f"{dump} | wc -c"], env=env, capture_output=True, text=True, check=True).stdout)
        a_base = "shell: docker exec pg_dumpall, piped to gzip -6"
        variants_a = {
            a_base: shell(f"{dump} | gzip -6 > {work / 'a-shell'}/pg.sql.gz", work / "a-shell"),
            e_zlib: tool("postgres", work / "a-zlib", "--compress-level", "6", environment=no_pigz),
            e_default: tool("postgres", work / "a-pigz"),
            e_zstd: tool("postgres", work / "a-zstd", "--compression", "zstd"),
            "shell, for reference: piped to pigz -6": shell(f"{dump} | pigz -6 > {work / 'a-shell-pigz'}/pg.sql.gz", work / "a-shell-pigz"),
        }
        medians_a = run_variants(variants_a, runs)
        report += table(f"Class A: pg_dumpall of a database giving {dump_bytes / MB:.0f} MiB of SQL", a_base, medians_a, dump_bytes)

        print("bench: zstd levels on other data", file=sys.stderr)
        box.docker("exec", "postgres", "psql", "-q", "-U", "postgres", "-c", "CHECKPOINT")
        corpora = {
            "the class E tree above": ["tar", "-cf", "-", "-C", str(data), "."],
            "the PostgreSQL data directory above": ["docker", "exec", "postgres", "tar", "-cf", "-", "-C", "/var/lib/postgresql/data", "."],
            "the Python standard library (text)": ["tar", "-cf", "-", "-C", sysconfig.get_paths()["stdlib"], "."],
            "shared libraries (binaries)": ["tar", "-cf", "-", "-C", next(p for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib") if os.path.isdir(p)), "."],
        }
        report += level_table(corpora, work, env)

        for i in range(48):
            box.run_container(f"mod{i:02d}", "-v", f"m{i}:/data")
        listing = subprocess.run([*TOOL, "--list", "--platform-root", str(platform), "--allow-ci", "--debug"], env=env,
                                 capture_output=True, text=True, check=True)
        calls = next(line for line in listing.stderr.splitlines() if "programs run:" in line).split("programs run: ", 1)[1]
        docker_calls = int(re.search(r"docker (\d+)x", calls).group(1))  # type: ignore[union-attr]
        report += ["### `--list` over 50 modules", "", f"programs run: {calls}", ""]

        def ratio(medians: dict[str, dict[str, float]], name: str, base: str) -> float:
            return medians[name]["wall"] / medians[base]["wall"]

        peak = max(m["rss"] for medians in (medians_e, medians_a) for m in medians.values())
        report += [
            "### Targets (issue 6)", "", "| target | measured | wanted | |", "|---|---|---|---|",
            verdict("class E, gzip -6, standard library, vs tar -czf", ratio(medians_e, e_zlib, e_base), "<= 1.05", ratio(medians_e, e_zlib, e_base) <= 1.05),
            verdict("class E, default (pigz), vs tar -czf", ratio(medians_e, e_default, e_base), "<= 0.60", ratio(medians_e, e_default, e_base) <= 0.6),
            verdict("class E, zstd (default level), vs tar -czf", ratio(medians_e, e_zstd, e_base), "<= 0.125 (8x)", ratio(medians_e, e_zstd, e_base) <= 0.125),
            verdict("class A, gzip -6, standard library, vs the shell", ratio(medians_a, e_zlib, a_base), "<= 1.05", ratio(medians_a, e_zlib, a_base) <= 1.05),
            verdict("class A, default (pigz), vs the shell", ratio(medians_a, e_default, a_base), "<= 1.05", ratio(medians_a, e_default, a_base) <= 1.05),
            verdict("peak RSS of the tool, MiB, any variant", peak, "<= 64", peak <= 64),
            verdict("docker calls of --list over 50 modules", docker_calls, "<= 5", docker_calls <= 5),
            "",
        ]
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(report)
    print(text)
    (REPO / "bench" / "last-results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
