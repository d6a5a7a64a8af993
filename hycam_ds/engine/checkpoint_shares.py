"""Each rank's share of a checkpoint: the files it writes and hashes when saving, the files it
verifies, screens and loads when resuming. No rank hashes or reads another rank's ZeRO partition.

Who a file belongs to (`owner`): DeepSpeed names its per-rank files `..zero_pp_rank_<r>_..`, the
RNG states are `rng/rank_<r>.json`; every other file (trainer_state.json, DeepSpeed's recovery
scripts, ZeRO-2's model-states file) is shared, written by rank 0 and small.

Saving: while DeepSpeed saves, its checkpoint engine is wrapped (`HashingWrites`): each file is
hashed as torch.save hands its bytes to the disk and fsynced by the rank that wrote it
(`checkpoint.durable`), so nothing is read back. Each rank's part of the manifest ({path: {bytes,
checksum}}) is gathered on rank 0, which merges the parts (`checkpointing.publish`).

Resuming: each rank checks the files it loads against the manifest through a read-only mapping
(`verify_share`: the pages come into the page cache once, with no copy), then unpickles a .pt file
with weights_only=True from there, as DeepSpeed's own load would read it. weights_only admits
tensors and three plain-data DeepSpeed classes only, so a pickle naming anything else is refused
unexecuted. DeepSpeed is then handed these screened objects instead of reading the files itself
(`ScreenedLoads`): it never unpickles a file with weights_only=False. Rank 0 also lists the
directory and refuses a file the manifest does not name (`checkpointing.check_listing`).
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from . import checksums
from .checkpointing import ENGINE_TAG, TRAINER_STATE, CheckpointError, inside
from .distributed import gather_to_rank0

_RANK_FILES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rng/rank_(\d+)\.json$"))


def owner(rel: str) -> int | None:
    """The rank a checkpoint file (path relative to the checkpoint) belongs to; None for a shared file."""
    for pattern in _RANK_FILES:
        match = pattern.search(rel)
        if match:
            return int(match.group(1))
    return None


def writer(rel: str, world: int) -> int:
    """The rank that hashes a file at save: its owner, rank 0 for shared files (and for any file of
    a rank this job does not have, which only a leftover could be)."""
    rank = owner(rel)
    return rank if rank is not None and rank < world else 0


def share(files: Iterable[str], rank: int, world_changed: bool = False) -> list[str]:
    """The files `rank` verifies (and loads) when resuming: its own, and the shared ones it reads
    (trainer_state.json, a shared .pt of DeepSpeed's); rank 0 also every other shared file. After a
    change of world size rank 0 takes every file (it converts them) and the others no DeepSpeed file."""

    def wanted(rel: str) -> bool:
        who = owner(rel)
        if rank == 0 and (world_changed or who is None):
            return True
        if world_changed and rel.startswith(f"{ENGINE_TAG}/"):
            return False
        if who is None:
            return rel == TRAINER_STATE or rel.endswith(".pt")
        return who == rank

    return sorted(rel for rel in files if wanted(rel))


# ------------------------------------------------------------------ saving
class HashingWrites:
    """Stands in for DeepSpeed's checkpoint engine while it saves into `stage` (a context manager):
    DeepSpeed's own engine serialises each file into a `_HashingFile`, which hashes the bytes as they
    pass on their way to the disk; the writing rank then fsyncs the file. `files` is this rank's part
    of the manifest."""

    def __init__(self, engine, stage: Path, fsync: bool = True):
        self.engine, self.stage, self.fsync = engine, Path(stage).resolve(), fsync
        self.files: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> HashingWrites:
        self.inner = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = self
        return self

    def __exit__(self, *exc) -> None:
        self.engine.checkpoint_engine = self.inner

    def save(self, state_dict, path) -> None:
        rel = str(Path(path).resolve().relative_to(self.stage))
        if not isinstance(self.inner, TorchCheckpointEngine):  # an engine of its own (asynchronous, remote)
            self.inner.save(state_dict, path)
            self.files[rel] = checksums.entry_of_file(Path(path), fsync=self.fsync)
            return
        with open(path, "wb") as f:
            hashing = _HashingFile(f)
            self.inner.save(state_dict, hashing)  # torch.save into a file object: tensors arrive as memoryviews
            f.flush()
            if self.fsync:  # the rank that wrote a file makes it durable (on a shared file system too)
                os.fsync(f.fileno())
        self.files[rel] = checksums.entry(hashing.size, hashing.digest.hexdigest())

    def __getattr__(self, name):
        if name == "inner":  # not entered yet
            raise AttributeError(name)
        return getattr(self.inner, name)


class _HashingFile:
    """A file object for torch.save that hashes each buffer as it writes it. XXH3 hashes a buffer
    in a fraction of the time its write takes; writing on another thread meanwhile was slower and
    less steady here (a thread hand-off per tensor, and the two competing for the cache)."""

    def __init__(self, file):
        self.file = file
        self.digest, self.size = checksums.new_hasher(), 0

    def write(self, data) -> int:
        self.file.write(data)
        self.digest.update(data)
        nbytes = memoryview(data).nbytes
        self.size += nbytes
        return nbytes

    def flush(self) -> None:
        self.file.flush()


def save_engine(engine, stage: Path, fsync: bool = True) -> dict[str, dict[str, Any]]:
    """DeepSpeed's save of this rank's files into `stage` (tag ENGINE_TAG, trainable parameters only),
    hashed as written (and fsynced); returns this rank's part of the manifest."""
    with HashingWrites(engine, stage, fsync) as written:
        engine.save_checkpoint(str(stage), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    return written.files


def gather_parts(part: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Collective: every rank's part of the manifest, merged on rank 0 (None on the others)."""
    parts = gather_to_rank0(part)
    return None if parts is None else {rel: entry for each in parts for rel, entry in each.items()}


# ------------------------------------------------------------------ resuming
def screen(path: Path) -> Any:
    """Unpickle a .pt file admitting plain tensor data only, and the three plain-data classes
    DeepSpeed's checkpoints hold besides (an enum, the loss scale, ZeRO-1/2's (numel, start) pairs);
    anything else is refused unexecuted. The tensors own their memory (not mmap=True: optimizer
    state left mapping a checkpoint file would keep it on disk after it is pruned)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not plain data, do not hand it on
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused, not plain tensor data ({reason})") from None


def verify_share(checkpoint: Path, manifest: dict[str, Any], rels: Iterable[str]) -> dict[str, Any]:
    """Each file of `rels` checked against the manifest (size and checksum, over a read-only mapping
    of the file), then a .pt file screened (`screen`). Returns {rel: the unpickled object of a .pt
    file, the bytes of any other}."""
    loaded = {}
    for rel in rels:
        meta, path = manifest["files"][rel], inside(checkpoint, rel)
        try:
            matches, small = _check_mapped(path, meta, keep=not rel.endswith(".pt"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing from checkpoint") from None
        if not matches:
            raise CheckpointError(f"{path}: does not match the checkpoint manifest (damaged or modified)")
        loaded[rel] = screen(path) if rel.endswith(".pt") else small
    return loaded


def _check_mapped(path: Path, meta: dict[str, Any], keep: bool) -> tuple[bool, bytes | None]:
    """(whether the file matches its manifest entry, its bytes if `keep`). Hashed through a
    read-only mapping: the pages come into the page cache, where the unpickling finds them, and are
    not copied (reading them into a fresh buffer first cost as much as DeepSpeed's whole load)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return checksums.bytes_match(meta, b""), b"" if keep else None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return checksums.bytes_match(meta, mapped), bytes(mapped) if keep else None


def screen_directory(directory: Path) -> dict[str, Any]:
    """Every .pt file below `directory` screened ({path: object}); for files this job wrote itself
    (a converted checkpoint), which have no manifest."""
    return {str(p.resolve()): screen(p) for p in sorted(Path(directory).rglob("*.pt"))}


def load_engine(engine, directory: Path, screened: dict[str, Any]) -> None:
    """DeepSpeed's load of `directory` (tag ENGINE_TAG), handed the screened objects ({absolute path:
    object}) instead of reading its files."""
    with ScreenedLoads(engine, screened):
        engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=False)


def screened_objects(checkpoint: Path, loaded: dict[str, Any]) -> dict[str, Any]:
    """The unpickled .pt files of verify_share's result, keyed as DeepSpeed names them (absolute paths)."""
    return {str(inside(checkpoint, rel)): value for rel, value in loaded.items() if rel.endswith(".pt")}


class ScreenedLoads:
    """Stands in for DeepSpeed's checkpoint engine while it loads (a context manager): `objects`
    ({absolute path: object}) are what verify_share or screen_directory screened; any other file
    DeepSpeed asks for is refused rather than read."""

    def __init__(self, engine, objects: dict[str, Any]):
        self.engine, self.objects = engine, objects

    def __enter__(self) -> ScreenedLoads:
        self.inner = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = self
        return self

    def __exit__(self, *exc) -> None:
        self.engine.checkpoint_engine = self.inner
        self.objects = {}

    def load(self, path, map_location=None) -> Any:
        try:
            return self.objects[str(Path(path).resolve())]
        except KeyError:
            raise CheckpointError(f"{path}: DeepSpeed asked for a file this rank did not verify") from None

    def __getattr__(self, name):
        if name == "inner":  # not entered yet
            raise AttributeError(name)
        return getattr(self.inner, name)
