"""Constants and helpers shared by the data pipeline tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_RECIPE = str(REPO / "data_pipeline" / "recipes" / "embedded.yaml")
HYCAM5_RECIPE = str(REPO / "data_pipeline" / "recipes" / "hycam5.yaml")
SHARED_DATA = Path(os.environ.get("HYCAM_SHARED_DATA", REPO.parent / "shared" / "data"))


def write_recipe(path: Path, tasks: dict, **extra) -> str:
    """A recipe YAML with `tasks` = {name: [source specs]}; returns its path."""
    import yaml

    recipe = {
        "name": "t",
        "seq_len": 128,
        "splits": {"train": 0.8, "eval": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 400},
        **extra,
        "tasks": [{"name": n, "sources": s} for n, s in tasks.items()],
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)
