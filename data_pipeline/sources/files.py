"""Raw record readers that keep line numbers: JSONL, JSON arrays and Parquet.

Each yields `(line, record)` where `record` is the parsed object or a `BadRow` saying why the
line could not be parsed, so the adapter above never needs its own error handling for I/O.
Bytes are decoded with `surrogateescape`: invalid UTF-8 then shows up as lone surrogates, which
`examples.check_utf8` reports for the exact field, instead of the whole file failing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Union

from ..examples import BadRow, BuildError

Record = Union[dict, list, str, int, float, None, BadRow]
_DECODER = json.JSONDecoder()


def iter_jsonl(path: Path) -> Iterator[tuple[int, Record]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, BadRow("invalid_utf8", f"byte {err.start}")
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as err:
                yield lineno, BadRow("malformed_json", err.msg)


def iter_json_array(path: Path) -> Iterator[tuple[int, Record]]:
    """Elements of a top-level JSON list, each with the line where it starts.

    A syntax error stops the file (JSON cannot resynchronise) and is reported at its line.
    """
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    pos, line, n = _skip_ws(text, 0), 1, len(text)
    line += text.count("\n", 0, pos)
    if pos >= n or text[pos] != "[":
        yield line, BadRow("malformed_json", "file is not a JSON list")
        return
    pos += 1
    last = pos
    while True:
        pos = _skip_ws(text, pos)
        if pos < n and text[pos] == "]":
            return
        line += text.count("\n", last, pos)
        last = pos
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield err.lineno, BadRow("malformed_json", err.msg)
            return
        yield line, obj
        pos = _skip_ws(text, end)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos >= n or text[pos] != "]":
            line += text.count("\n", last, pos)
            yield line, BadRow("malformed_json", "expected ',' or ']' after an element")
            return


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_parquet(path: Path) -> Iterator[tuple[int, Record]]:
    """Rows of a Parquet file; the 'line' is the 1-based row number. A file that is not Parquet (or
    is damaged) stops the build: unlike a bad JSON line, nothing after the damage can be read."""
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: not Parquet, or damaged
        where = f" after row {row}" if row else ""
        raise BuildError(f"{path}: not a readable Parquet file{where}: {' '.join(str(err).split())}") from None


def iter_records(path: Path) -> Iterator[tuple[int, Union[dict, BadRow]]]:
    """Pick the reader by extension: .jsonl/.ndjson, .json (a list, or JSON lines), .parquet.

    Every record of every format is an object: valid JSON of another kind (a list, number,
    string or null) becomes a `not_object` BadRow here, so adapters only ever see dicts.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = iter_jsonl(path)
    elif suffix == ".parquet":
        records = iter_parquet(path)
    elif suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        records = iter_json_array(path) if head.startswith(b"[") else iter_jsonl(path)
    else:
        raise BuildError(f"unsupported file type {path} (expected .json, .jsonl, .ndjson or .parquet)")
    return _objects_only(records)


def _objects_only(records: Iterator[tuple[int, Record]]) -> Iterator[tuple[int, Union[dict, BadRow]]]:
    for line, record in records:
        if not isinstance(record, (dict, BadRow)):
            record = BadRow("not_object", f"row is {'null' if record is None else type(record).__name__}")
        yield line, record
