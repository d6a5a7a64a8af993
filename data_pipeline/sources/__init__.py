"""Source adapters: one per raw format, each yielding `(task, file, line, Example | BadRow)`.

A recipe source spec is a dict whose `type` picks the adapter below; its other keys are the
adapter's own (`SPEC_KEYS`; see each module's docstring). Paths are relative to the build's data
root. `spec_problem` checks a spec when the recipe is loaded, so a typo'd key, an unknown type or
an unsupported file type stops the build before it reads anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterator, Optional

from ..embedded import GENERATORS
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

# type -> (required keys, optional keys) of its spec, besides `type`
SPEC_KEYS = {
    "alpaca": (("path",), ("fields", "default_instruction", "task_field")),
    "icliniq": (("path",), ("fields", "default_instruction", "task_field")),
    "dolly": (("path",), ()),
    "webgpt": (("answers",), ("docs_webgpt", "docs_human")),
    "clapnq": (("path",), ()),
    "hf": (("dataset",), ("data_files", "name", "split", "fields")),
    "embedded": (("generator", "count"), ("seed",)),
}
FILE_KEYS = ("path", "answers", "docs_webgpt", "docs_human")
"""Spec keys naming one file relative to the data root (`hf`'s `data_files` may name several)."""
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")
"""What `files.iter_records` reads."""


def source_files(spec: dict) -> list[str]:
    """The files a source spec reads, as written (relative to the data root unless absolute)."""
    files = [spec[key] for key in FILE_KEYS if isinstance(spec.get(key), str)]
    data_files = spec.get("data_files")
    files += [data_files] if isinstance(data_files, str) else [f for f in data_files or [] if isinstance(f, str)]
    return files


def spec_problem(spec: Any) -> Optional[str]:
    """What is wrong with a source spec (one phrase), or None."""
    if not isinstance(spec, dict):
        return f"a source must be a mapping with a `type`, not {spec!r}"
    kind = spec.get("type")
    if kind not in ADAPTERS:
        return f"unknown source type {kind!r} (known: {sorted(ADAPTERS)})"
    required, optional = SPEC_KEYS[kind]
    known = ("type", *required, *optional)
    for key in spec:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            return f"unknown key {key!r} for a {kind} source (known: {list(known)}){hint}"
    for key in required:
        if spec.get(key) is None:
            return f"a {kind} source needs `{key}`"
    if kind == "webgpt" and not (spec.get("docs_webgpt") or spec.get("docs_human")):
        return "a webgpt source needs docs_webgpt and/or docs_human (the quotes its answers cite)"
    for key in ("default_instruction", "task_field", "dataset", "name", "split"):
        if key in spec and not isinstance(spec[key], str):
            return f"{key} must be text, not {spec[key]!r}"
    for key in FILE_KEYS:
        if key in spec:
            problem = _file_problem(key, spec[key])
            if problem:
                return problem
    data_files = spec.get("data_files")
    if data_files is not None and not (
        isinstance(data_files, str) or (isinstance(data_files, list) and all(isinstance(f, str) for f in data_files))
    ):
        return f"data_files must be a path or a list of paths, not {data_files!r}"
    fields = spec.get("fields")
    if fields is not None and not (
        isinstance(fields, dict)
        and set(fields) <= {"instruction", "input", "output"}
        and all(isinstance(v, str) for v in fields.values())
    ):
        return f"fields must map instruction/input/output to column names, not {fields!r}"
    if kind == "embedded":
        if spec["generator"] not in GENERATORS:
            return f"unknown embedded generator {spec['generator']!r} (known: {sorted(GENERATORS)})"
        if isinstance(spec["count"], bool) or not isinstance(spec["count"], int) or spec["count"] < 1:
            return f"count must be a positive integer, not {spec['count']!r}"
        if isinstance(spec.get("seed", 0), bool) or not isinstance(spec.get("seed", 0), int):
            return f"seed must be an integer, not {spec['seed']!r}"
    return None


def _file_problem(key: str, value: Any) -> Optional[str]:
    if not isinstance(value, str) or not value.strip():
        return f"{key} must be a file path, not {value!r}"
    if Path(value).suffix.lower() not in FILE_SUFFIXES:
        return f"{key} {value}: unsupported file type (read: {', '.join(FILE_SUFFIXES)})"
    return None


def read_source(spec: dict, task: str, root: Path, tasks: list[str]) -> Iterator[tuple]:
    """Rows of one source spec; a missing file or unknown type is a `BuildError` (not a bad row)."""
    adapter = ADAPTERS.get(spec.get("type"))
    if adapter is None:
        raise BuildError(f"task {task}: unknown source type {spec.get('type')!r} (known: {sorted(ADAPTERS)})")
    for key in FILE_KEYS:
        if key in spec and not (root / spec[key]).is_file():
            raise BuildError(f"task {task}: source file not found: {root / spec[key]}")
    return adapter(spec, task, root, tasks)
