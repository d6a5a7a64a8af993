"""The embedded default corpus as a source: examples generated in memory, no files."""

from __future__ import annotations

from pathlib import Path

from ..embedded import generate
from ..examples import BadRow, make_example


def read_embedded(spec: dict, task: str, root: Path, tasks: list[str]):
    """Spec keys: `generator` (one of embedded.GENERATORS), `count`, `seed`."""
    source = f"embedded:{spec['generator']}"
    rows = generate(spec["generator"], spec["count"], spec.get("seed", 0))
    for line, (instruction, inp, output) in enumerate(rows, start=1):
        try:
            example = make_example(task, instruction, inp, output, source, line)
        except BadRow as bad:
            example = bad
        yield task, source, line, example
