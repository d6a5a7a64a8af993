"""Alpaca-form files ({instruction, input, output}): Auto-CoT, CodeAlpaca and any user file.

Options of a source spec (all optional except `path`):
  path: file (.json list, .jsonl, .parquet) relative to the data root
  fields: {instruction: ..., input: ..., output: ...}   rename columns of other layouts
  default_instruction: used when the instruction is empty (iCliniq has none)
  task_field: name of a per-row column holding the task (multi-task files); rows whose task the
              recipe does not list are counted as `unknown_task`
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..examples import BadRow, Example, get_str, make_example
from .files import iter_records

FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}


def read_alpaca(spec: dict, task: str, root: Path, tasks: list[str]) -> Iterator[tuple[str, str, int, object]]:
    path = root / spec["path"]
    fields = {**FIELDS, **spec.get("fields", {})}
    for line, record in iter_records(path):
        yield task, str(path), line, _convert(record, spec, fields, task, str(path), line, tasks)


def _convert(record, spec, fields, task, source, line, tasks) -> Example | BadRow:
    if isinstance(record, BadRow):
        return record
    try:
        row_task = task
        if spec.get("task_field"):
            row_task = get_str(record, spec["task_field"])
            if row_task not in tasks:
                raise BadRow("unknown_task", row_task)
        instruction = get_str(record, fields["instruction"], required="default_instruction" not in spec)
        if not instruction.strip():
            instruction = spec.get("default_instruction", instruction)
        inp = get_str(record, fields["input"], required=False)
        output = get_str(record, fields["output"])
        return make_example(row_task, instruction, inp, output, source, line)
    except BadRow as bad:
        return bad
