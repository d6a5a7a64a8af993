"""Fixtures of the evaluation tests: one tiny HyCAM run trained on the embedded default."""

import sys

import pytest
from run_helpers import run_checked


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 12-step HyCAM run of the embedded default (its data build under the same root)."""
    root = tmp_path_factory.mktemp("evalrun")
    run_checked(
        [
            sys.executable,
            "launch/train.py",
            f"run_dir={root}/run",
            f"data.cache_dir={root}/data",
            "data.seq_len=128",
            "optim.max_steps=12",
            "optim.warmup_steps=1",
            "optim.lr=5e-3",
            "logging.eval_every=0",
            "logging.progress=false",
        ]
    )
    return root / "run"
