"""Normalised examples and the accounting of rows that could not become one.

Every source adapter turns its raw records into `Example`s or raises `BadRow`; the build
counts each bad row by reason with its file and line (`RowReport`), and `--strict` turns the
first one into a `BuildError` carrying that same message.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

# The closed list of reasons a row can be dropped for. `too_long` and `prompt_too_long` come
# from the over-long policy, not from bad input, so `--strict` does not stop on them.
BAD_INPUT_REASONS = (
    "malformed_json",  # the line (or file) is not valid JSON
    "invalid_utf8",  # bytes that are not UTF-8
    "not_object",  # the line (or list element) is valid JSON but not an object: a list, number, string, null
    "missing_field",  # a required field is absent
    "null_field",  # a required field is null
    "wrong_type",  # a field is present with a value of the wrong type (a number where text belongs, ...)
    "empty_response",  # the output is empty or whitespace
    "empty_prompt",  # instruction and input are both empty
    "unknown_task",  # the row names a task that the recipe does not list
    "oversized_row",  # the example's text exceeds the recipe's max_row_bytes (never silently truncated)
    "duplicate",  # same task, instruction, input and output as an earlier row (recipe dedupe: true)
)
POLICY_REASONS = ("too_long", "prompt_too_long")


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalised example: the common form of all five tasks (alpaca fields + task)."""

    task: str
    instruction: str
    input: str
    output: str
    source: str = ""  # file (or generator) it came from, for reports
    line: int = 0  # 1-based line (or record number) in `source`


class BadRow(Exception):
    """Raised by an adapter for a record that cannot become an `Example`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in BAD_INPUT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BuildError(RuntimeError):
    """A build that must stop (strict mode, bad recipe, missing file)."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (OSError: its file name and reason)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def get_str(record: Any, key: str, required: bool = True, default: str = "") -> str:
    """Field `key` of a raw record as a string, raising the `BadRow` that says why it is not one."""
    if not isinstance(record, dict):
        raise BadRow("wrong_type", f"row is a {type(record).__name__}, not an object")
    if key not in record or record[key] is None:
        if required:
            raise BadRow("missing_field" if key not in record else "null_field", key)
        return default
    value = record[key]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key} is {type(value).__name__}")
    return check_utf8(value, key)


def check_utf8(value: str, key: str) -> str:
    """Sources decode with `surrogateescape`, so undecodable bytes surface here as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow("invalid_utf8", f"{key} at character {err.start}") from None
    return value


def make_example(task: str, instruction: str, inp: str, output: str, source: str, line: int) -> Example:
    """Build an `Example` after the checks every task shares (non-empty response and prompt)."""
    if not output.strip():
        raise BadRow("empty_response")
    if not instruction.strip() and not inp.strip():
        raise BadRow("empty_prompt")
    return Example(task, instruction.strip(), inp.strip(), output.strip(), source, line)


@dataclasses.dataclass
class TaskCounts:
    """Per-task counters that end up in the manifest."""

    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict = dataclasses.field(default_factory=collections.Counter)
    shortest: Optional[int] = None
    """Tokens of the task's shortest example before any cut (for the error when seq_len holds none)."""


class RowReport:
    """Counts rows per task and keeps every bad row with its file and line."""

    def __init__(self, tasks: list[str], strict: bool = False):
        self.strict = strict
        self.tasks = {name: TaskCounts() for name in tasks}
        self.bad_rows: list[dict] = []

    def read(self, task: str) -> None:
        self.tasks[task].rows_read += 1

    def bad(self, task: str, source: str, line: int, reason: str, detail: str = "") -> None:
        """Record a row dropped for bad input; in strict mode stop right here with its location."""
        message = f"{source}:{line}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BuildError(f"bad row (strict): {message}")
        self.tasks[task].dropped[reason] += 1
        self.bad_rows.append({"task": task, "file": source, "line": line, "reason": reason, "detail": detail})

    def policy_drop(self, task: str, reason: str) -> None:
        assert reason in POLICY_REASONS, reason
        self.tasks[task].dropped[reason] += 1

    def describe(self, task: str) -> str:
        """The task's counts in words: `12 rows read, 0 kept, dropped: malformed_json 7, invalid_utf8 5`."""
        c = self.tasks[task]
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(c.dropped.items()))
        return f"{c.rows_read} rows read, {c.kept} kept" + (f", dropped: {dropped}" if dropped else "")

    def summary(self) -> dict:
        return {
            name: {
                "rows_read": c.rows_read,
                "kept": c.kept,
                "truncated": c.truncated,
                "dropped": dict(sorted(c.dropped.items())),
            }
            for name, c in self.tasks.items()
        }
