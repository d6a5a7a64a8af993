"""Dolly (JSONL {id, instruction, text, decoded}): `text` is the human response.

`decoded` is another model's output for the same instruction: it must never reach training, so
it is not read at all. The file lacks Dolly's `context`, so `input` is empty.
"""

from __future__ import annotations

from pathlib import Path

from ..examples import BadRow, get_str, make_example
from .files import iter_records


def read_dolly(spec: dict, task: str, root: Path, tasks: list[str]):
    path = root / spec["path"]
    for line, record in iter_records(path):
        if not isinstance(record, BadRow):
            try:
                record = make_example(
                    task, get_str(record, "instruction"), "", get_str(record, "text"), str(path), line
                )
            except BadRow as bad:
                record = bad
        yield task, str(path), line, record
