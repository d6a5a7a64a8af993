"""The checksum a checkpoint manifest records for each file, and checking a file against it.

A checkpoint's manifest guards against torn, truncated and damaged files: a save killed midway, a
disk or a network file system that loses bytes. It is not a defence against someone who can write
to the run directory (they can rewrite the manifest as well); what may be unpickled is decided by
the weights_only screen (checkpoint_shares.screen). So the checksum is XXH3-128 (xxHash), about six
times as fast as sha256 on one core: at every save and resume each rank hashes its whole share of
the optimizer state, and sha256 alone took as long as DeepSpeed's whole resume of the same bytes.

Manifests written before the change record sha256; they are still checked, with sha256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

import xxhash

RECORDED = "xxh3_128"
"""The key (and algorithm) new manifest entries carry beside "bytes"."""

ALGORITHMS: dict[str, Callable[[], Any]] = {RECORDED: xxhash.xxh3_128, "sha256": hashlib.sha256}
"""Every algorithm a manifest entry may name, newest first."""

_BLOCK = 4 << 20


def new_hasher() -> Any:
    """An incremental hasher of the recorded algorithm (update(), hexdigest())."""
    return ALGORITHMS[RECORDED]()


def entry(size: int, hexdigest: str) -> dict[str, Any]:
    """A manifest entry for a file of `size` bytes whose recorded checksum is `hexdigest`."""
    return {"bytes": size, RECORDED: hexdigest}


def entry_of_bytes(data: bytes | memoryview) -> dict[str, Any]:
    hasher = new_hasher()
    hasher.update(data)
    return entry(memoryview(data).nbytes, hasher.hexdigest())


def entry_of_file(path: Path, fsync: bool = False) -> dict[str, Any]:
    """The manifest entry of a file on disk, read in blocks; fsync: made durable too."""
    return entry(Path(path).stat().st_size, _hash_file(path, RECORDED, fsync))


def algorithm(meta: Any) -> Optional[str]:
    """The algorithm a manifest entry records (None if it is not a well-formed entry)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int):
        return None
    return next((name for name in ALGORITHMS if isinstance(meta.get(name), str)), None)


def bytes_match(meta: dict[str, Any], data: bytes | memoryview) -> bool:
    """Whether `data` is the file the well-formed entry `meta` describes."""
    name = algorithm(meta)
    hasher = ALGORITHMS[name]()
    hasher.update(data)
    return memoryview(data).nbytes == meta["bytes"] and hasher.hexdigest() == meta[name]


def file_matches(meta: dict[str, Any], path: Path) -> bool:
    """Whether the file at `path` is the one the well-formed entry `meta` describes."""
    name = algorithm(meta)
    return Path(path).stat().st_size == meta["bytes"] and _hash_file(path, name) == meta[name]


def _hash_file(path: Path, name: str, fsync: bool = False) -> str:
    hasher = ALGORITHMS[name]()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            hasher.update(block)
        if fsync:
            os.fsync(f.fileno())
    return hasher.hexdigest()
