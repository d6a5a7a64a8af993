"""Source adapters: one per raw format, each yielding `(task, file, line, Example | BadRow)`.

A recipe source spec is a dict whose `type` picks the adapter below; its other keys are the
adapter's own (see each module's docstring). Paths are relative to the build's data root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..examples import BuildError
from .alpaca import read_alpaca
from .dolly import read_dolly
from .embedded import read_embedded
from .hf import read_hf
from .icliniq import read_icliniq
from .webgpt import read_clapnq, read_webgpt

ADAPTERS = {
    "alpaca": read_alpaca,  # Auto-CoT, CodeAlpaca, any alpaca .json/.jsonl/.parquet
    "icliniq": read_icliniq,
    "dolly": read_dolly,
    "webgpt": read_webgpt,
    "clapnq": read_clapnq,
    "hf": read_hf,  # datasets.load_dataset(...)
    "embedded": read_embedded,  # the generated default corpus
}


def read_source(spec: dict, task: str, root: Path, tasks: list[str]) -> Iterator[tuple]:
    """Rows of one source spec; a missing file or unknown type is a `BuildError` (not a bad row)."""
    adapter = ADAPTERS.get(spec.get("type"))
    if adapter is None:
        raise BuildError(f"task {task}: unknown source type {spec.get('type')!r} (known: {sorted(ADAPTERS)})")
    for key in ("path", "answers", "docs_webgpt", "docs_human"):
        if key in spec and not (root / spec[key]).is_file():
            raise BuildError(f"task {task}: source file not found: {root / spec[key]}")
    return adapter(spec, task, root, tasks)
