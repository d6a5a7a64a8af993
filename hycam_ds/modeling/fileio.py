"""Durable, atomic file writes and checksums: the one implementation adapters, checkpoints, run
directories and reports use (data_pipeline keeps its own: it imports nothing of hycam_ds).

A reader sees either the previous file or directory or the complete new one, never a mixture:
everything is written beside its destination, fsynced, and renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class UnsafeOutputError(ValueError):
    """A destination that holds something other than the output it would be replaced with."""


def check_replaceable(destination: Path, is_own_output: Callable[[Path], bool], what: str) -> None:
    """Raise UnsafeOutputError unless `destination` is absent, an empty directory, or holds `what`
    (as `is_own_output` recognises it): replacing it must never delete anything else."""
    destination = Path(destination)
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise UnsafeOutputError(f"{destination}: exists and is not a directory; refusing to replace it with {what}")
    if destination.is_dir() and any(destination.iterdir()) and not is_own_output(destination):
        raise UnsafeOutputError(
            f"{destination}: holds files that are not {what}; refusing to replace it "
            "(choose another directory, or empty this one yourself)"
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(directory: Path) -> None:
    """Make every file below `directory` durable (before a rename publishes them)."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, value: Any) -> None:
    """JSON, indented and key-sorted, replaced atomically."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def replace_directory(staging: Path, destination: Path, fsync: bool = True) -> None:
    """Publish a complete `staging` directory as `destination` (replacing an existing one whole).
    fsync=False: the caller has made the files durable already, or chose not to."""
    if fsync:
        fsync_tree(staging)
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, retired)
        os.replace(staging, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, destination)


@contextlib.contextmanager
def atomic_directory(
    destination: str | os.PathLike, is_own_output: Callable[[Path], bool], what: str
) -> Iterator[Path]:
    """Yields an empty staging directory beside `destination`; when the block ends without an
    exception it becomes `destination`, otherwise it is removed and `destination` is untouched.
    `destination` is replaced only if it is absent, empty or `is_own_output` (check_replaceable)."""
    destination = Path(destination)
    check_replaceable(destination, is_own_output, what)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        replace_directory(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
