"""iCliniq medical QA (JSONL): the patient's question is in `input`, `instruction` is empty."""

from __future__ import annotations

from pathlib import Path

from .alpaca import read_alpaca

# The instruction the dataset's README suggests for its empty `instruction` field.
DOCTOR_INSTRUCTION = "If you are a doctor, please answer the medical questions based on the patient's description."


def read_icliniq(spec: dict, task: str, root: Path, tasks: list[str]):
    return read_alpaca({"default_instruction": DOCTOR_INSTRUCTION, **spec}, task, root, tasks)
