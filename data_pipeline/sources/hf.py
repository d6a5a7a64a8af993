"""Any `datasets.load_dataset` spec (a hub id or a local builder/path) in alpaca form.

Spec keys: `dataset` (first argument of load_dataset, e.g. "json" or "tatsu-lab/alpaca"),
optional `data_files` (relative to the data root), `name`, `split` (default "train") and
`fields` (column renames, as for alpaca files). The 'line' of a row is its 1-based index.
"""

from __future__ import annotations

from pathlib import Path

from ..examples import BadRow, get_str, make_example
from .alpaca import FIELDS


def read_hf(spec: dict, task: str, root: Path, tasks: list[str]):
    import datasets  # heavy: imported only for recipes that use it

    kwargs = {}
    if spec.get("data_files") is not None:
        files = spec["data_files"]
        kwargs["data_files"] = [str(root / f) for f in files] if isinstance(files, list) else str(root / files)
    if spec.get("name"):
        kwargs["name"] = spec["name"]
    ds = datasets.load_dataset(spec["dataset"], split=spec.get("split", "train"), **kwargs)
    fields = {**FIELDS, **spec.get("fields", {})}
    source = f"datasets:{spec['dataset']}"
    for index, record in enumerate(ds, start=1):
        try:
            example = make_example(
                task,
                get_str(record, fields["instruction"]),
                get_str(record, fields["input"], required=False),
                get_str(record, fields["output"]),
                source,
                index,
            )
        except BadRow as bad:
            example = bad
        yield task, source, index, example
