PYTHON ?= python3
export PYTHON

.PHONY: test unit fuzz lint demo deps bench bench-sizes

# Everything: unit tests, run() against real commands, end to end on a private dockerd.
test: deps
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

# Without a Docker engine (the end-to-end file is left out).
unit: deps
	$(PYTHON) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_e2e.py

# The property tests (hypothesis) with random seeds and 20 times the examples (FUZZ_SCALE),
# before a release; `make test` runs them with a fixed seed.
fuzz: deps
	HYPOTHESIS_PROFILE=fuzz $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_yaml.py tests/test_hostile.py tests/test_tar.py tests/test_confined.py

lint:
	$(PYTHON) -m pip install -q ruff mypy
	$(PYTHON) -m ruff check backup_before_apply.py tests bench
	$(PYTHON) -m mypy --strict --ignore-missing-imports backup_before_apply.py

# A private dockerd with example services from examples/platform: --list and --coverage, then
# a real backup of every running class A, B and E module into ./demo-backups in one run, --check,
# three drills, a --restore of uptime-kuma after a simulated bad apply, and what --prune would remove.
demo: deps
	$(PYTHON) tests/sandbox.py demo

deps:
	@sh .ci/deps

# The tool against the shell pipelines it replaces, in the same run (ratios, MB/s, RSS, phases),
# and against itself with its hand-written parts swapped for the standard library's; also the
# shell pipelines reading their output back as they write it, as the tool's verification does,
# and those doing the tool's whole job on the archive (fidelity flags, read-back, sha256, sync).
# BENCH_SMALL_FILES (default 100000), BENCH_MB (default 512), BENCH_WIDE_FILES (one directory,
# default 300000), BENCH_PG_ROWS (default 2000000) and BENCH_RUNS (default 3) set the size; about
# 20 minutes on 2 cores at the defaults.
bench: deps
	$(PYTHON) bench/bench.py

# The mixed tree at SIZES MiB (default 512 1024 2048), the tool against tar | zstd, alternating,
# 5 runs each: what a backup costs per MiB and what does not grow with the size (about 4 minutes).
SIZES ?= 512 1024 2048
bench-sizes: deps
	$(PYTHON) bench/sizes.py $(SIZES)
