#!/usr/bin/env python3
"""The mixed tree at several sizes: the tool against `tar | zstd` (or `tar | pigz`), alternating.

    python3 bench/sizes.py [--compression zstd|gzip] [--runs 5] 512 2048

Separates what a backup costs per MiB from what does not grow with the size (the start-up, and
the work per file on the tree's 20,000 small files, whose number the builder keeps): a least
squares line through the medians of each size, for the tool and for the shell pipeline. Builds the tree with `make bench`'s builder in
a volume of the private test engine (tests/sandbox.py), one size after the other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]
from bench import build_tree, run_variants  # noqa: E402
from sandbox import Sandbox  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="+", type=int, help="sizes of the mixed tree, in MiB (at least two)")
    parser.add_argument("--compression", choices=("zstd", "gzip"), default="zstd")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if len(args.sizes) < 2:
        parser.error("give at least two sizes: the line through them separates the rate from what does not grow with the size")
    level = tomllib.loads((REPO / "classes.toml").read_text())["settings"]["zstd_level"]
    compressor = f"zstd -T0 -{level} -q" if args.compression == "zstd" else "pigz -6"
    suffix = "zst" if args.compression == "zstd" else "gz"
    work = Path(tempfile.mkdtemp(prefix="bba-sizes-", dir="/var/tmp"))
    box = Sandbox().start()
    rows: list[tuple[int, float, float]] = []
    try:
        platform = work / "platform"
        (platform / "modules" / "kuma").mkdir(parents=True)
        (platform / "modules" / "kuma" / "module.yaml").write_text("spec:\n  runtime:\n    statefulness: stateful\n")
        for size in args.sizes:
            box.docker("volume", "create", f"sizes-{size}")
            data = Path(json.loads(box.docker("volume", "inspect", f"sizes-{size}").stdout)[0]["Mountpoint"])
            print(f"sizes: building a {size} MiB mixed tree", file=sys.stderr)
            build_tree(data, size)
            box.docker("rm", "-f", "kuma", check=False)
            box.run_container("kuma", "-v", f"sizes-{size}:/data")
            subprocess.run(["tar", "-cf", "/dev/null", "-C", str(data), "."], check=True)  # warm the cache for both
            shell = ["bash", "-o", "pipefail", "-c", f"tar -cf - -C {data} . | {compressor} > {work / 'shell'}/x.tar.{suffix}"]
            tool = [sys.executable, str(REPO / "backup_before_apply.py"), "kuma", "--platform-root", str(platform), "--allow-ci",
                    "--backup-dir", str(work / "tool"), "--compression", args.compression]
            medians = run_variants({"shell": (shell, box.env, work / "shell"), "tool": (tool, box.env, work / "tool")}, args.runs)
            rows.append((size, medians["tool"]["wall"], medians["shell"]["wall"]))
            box.docker("rm", "-f", "kuma")
            box.docker("volume", "rm", f"sizes-{size}")
    finally:
        box.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| mixed tree | tool ({args.compression}) | tar \\| {compressor.split()[0]} | ratio |\n|---|---|---|---|")
    for size, tool, shell in rows:
        print(f"| {size} MiB | {tool:.2f} s | {shell:.2f} s | {tool / shell:.2f} |")
    sizes = [size for size, _, _ in rows]
    tool_fit = statistics.linear_regression(sizes, [tool for _, tool, _ in rows])
    shell_fit = statistics.linear_regression(sizes, [shell for _, _, shell in rows])
    print(f"\nleast squares over the sizes: per MiB, the tool {tool_fit.slope * 1000:.2f} ms and the shell {shell_fit.slope * 1000:.2f} ms "
          f"({tool_fit.slope / shell_fit.slope:.2f}x); what does not grow with the size, the tool {tool_fit.intercept:.2f} s and the shell "
          f"{shell_fit.intercept:.2f} s (the start-up, and the work per file on the tree's 20,000 small files, a number that stays the same)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
