"""Fixtures of the data pipeline tests: one embedded build per session, real data when present."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_helpers import EMBEDDED_RECIPE, SHARED_DATA

from data_pipeline import BuildConfig, build_dataset


@pytest.fixture(scope="session")
def embedded_build(tmp_path_factory) -> Path:
    """The embedded default built with a tokenizer trained here (what the demo does)."""
    out = tmp_path_factory.mktemp("embedded") / "build"
    build_dataset(BuildConfig(recipe=EMBEDDED_RECIPE, out=str(out), train_tokenizer=True, progress=False))
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a skip: users do not have it, CI here does."""
    if not (SHARED_DATA / "tasks").is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA
