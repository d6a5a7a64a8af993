"""Each rank's share of a checkpoint: the files it writes and hashes when saving, the files it
verifies, screens and loads when resuming. No rank hashes or reads another rank's ZeRO partition.

Who a file belongs to (`owner`): DeepSpeed names its per-rank files `..zero_pp_rank_<r>_..`, the
RNG states are `rng/rank_<r>.json`; every other file (trainer_state.json, DeepSpeed's recovery
scripts, ZeRO-2's model-states file) is shared, written by rank 0 and small.

Saving: while DeepSpeed saves, its checkpoint engine is wrapped (`HashingWrites`): each file is
hashed as torch.save hands its bytes to the disk and fsynced by the rank that wrote it, so nothing
is read back. Each rank's part of the manifest ({path: {bytes, checksum}}) is gathered on rank 0, which
merges the parts (`checkpointing.publish`).

Resuming: each rank reads the files it loads once each (`verify_share`): the bytes are checked
against the manifest and a .pt file is unpickled with weights_only=True, which admits tensors and
three plain-data DeepSpeed classes only, so a pickle naming anything else is refused unexecuted. DeepSpeed
is then handed these screened objects instead of reading the files itself (`ScreenedLoads`): it
never unpickles a file with weights_only=False, and nothing can change between the check and the
load. Rank 0 also lists the directory and refuses a file the manifest does not name
(`checkpointing.check_listing`).
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from . import checksums
from .checkpointing import ENGINE_TAG, TRAINER_STATE, CheckpointError, inside
from .distributed import gather_to_rank0

_OVERLAP_BYTES = 1 << 20
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

    def __init__(self, engine, stage: Path):
        self.engine, self.stage = engine, Path(stage).resolve()
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
            self.files[rel] = checksums.entry_of_file(Path(path))
            return
        with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
            hashing = _HashingFile(f, pool)
            self.inner.save(state_dict, hashing)  # torch.save into a file object: tensors arrive as memoryviews
            f.flush()
            os.fsync(f.fileno())  # the rank that wrote a file makes it durable (on a shared file system too)
        self.files[rel] = checksums.entry(hashing.size, hashing.digest.hexdigest())

    def __getattr__(self, name):
        if name == "inner":  # not entered yet
            raise AttributeError(name)
        return getattr(self.inner, name)


class _HashingFile:
    """A file object for torch.save: each buffer is written by `pool`'s thread while this one hashes
    it (both release the GIL), so hashing costs no pass of its own over the bytes."""

    def __init__(self, file, pool: ThreadPoolExecutor):
        self.file, self.pool = file, pool
        self.digest, self.size = checksums.new_hasher(), 0

    def write(self, data) -> int:
        nbytes = memoryview(data).nbytes
        if nbytes < _OVERLAP_BYTES:  # the pickle's small pieces: a thread would cost more than it saves
            self.file.write(data)
            self.digest.update(data)
        else:
            written = self.pool.submit(self.file.write, data)
            self.digest.update(data)
            written.result()
        self.size += nbytes
        return nbytes

    def flush(self) -> None:
        self.file.flush()


def save_engine(engine, stage: Path) -> dict[str, dict[str, Any]]:
    """DeepSpeed's save of this rank's files into `stage` (tag ENGINE_TAG, trainable parameters only),
    hashed as written; returns this rank's part of the manifest."""
    with HashingWrites(engine, stage) as written:
        engine.save_checkpoint(str(stage), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    return written.files


def gather_parts(part: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Collective: every rank's part of the manifest, merged on rank 0 (None on the others)."""
    parts = gather_to_rank0(part)
    return None if parts is None else {rel: entry for each in parts for rel, entry in each.items()}


# ------------------------------------------------------------------ resuming
def screen(path: Path, data: bytes | memoryview) -> Any:
    """Unpickle a .pt file's bytes admitting plain tensor data only, and the three plain-data classes
    DeepSpeed's checkpoints hold besides (an enum, the loss scale, ZeRO-1/2's (numel, start) pairs);
    anything else is refused unexecuted."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not plain data, do not hand it on
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused, not plain tensor data ({reason})") from None


def verify_share(checkpoint: Path, manifest: dict[str, Any], rels: Iterable[str]) -> dict[str, Any]:
    """Read each file of `rels` once: its size and checksum must match the manifest, and a .pt file
    must pass `screen` (a thread hashes the bytes while they are unpickled; a mismatch is reported
    first). Returns {rel: the unpickled object of a .pt file, the bytes of any other}."""
    loaded = {}
    with ThreadPoolExecutor(1) as pool:
        for rel in rels:
            meta, path = manifest["files"][rel], inside(checkpoint, rel)
            try:
                data, matches = _read_checking(path, meta, pool)
            except FileNotFoundError:
                raise CheckpointError(f"{path}: missing from checkpoint") from None
            value, refusal = data, None
            if rel.endswith(".pt"):
                try:
                    value = screen(path, data)
                except CheckpointError as err:
                    refusal = err
            if not matches.result():
                raise CheckpointError(f"{path}: does not match the checkpoint manifest (damaged or modified)")
            if refusal is not None:
                raise refusal
            loaded[rel] = value
    return loaded


def _read_checking(path: Path, meta: dict[str, Any], pool: ThreadPoolExecutor) -> tuple[bytes, Future]:
    """A file's bytes, read whole (one allocation, no copy after), and the future of whether they
    match `meta`, computed by `pool`'s thread while the caller unpickles them (hashing releases the GIL)."""
    data = path.read_bytes()
    return data, pool.submit(checksums.bytes_match, meta, data)


def screen_directory(directory: Path) -> dict[str, Any]:
    """Every .pt file below `directory` screened ({path: object}); for files this job wrote itself
    (a converted checkpoint), which have no manifest."""
    return {str(p.resolve()): screen(p, p.read_bytes()) for p in sorted(Path(directory).rglob("*.pt"))}


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
