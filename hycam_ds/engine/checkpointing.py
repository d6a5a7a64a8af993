"""Atomic, complete checkpoints of a DeepSpeed run, and finding the latest one.

    run_dir/checkpoints/
        step_00000050/          a complete checkpoint (only complete ones carry this name)
            engine/             DeepSpeed's files (trainable parameters, optimizer, scheduler)
            trainer_state.json  step, world size, data reader position, Gumbel noise counters, config
            rng/rank_00000.json python, numpy and torch RNG states of each rank
            manifest.json       size and checksum (checksums.py) of every file above, written last
        latest                  the name of the newest complete checkpoint, replaced atomically

Every rank writes into `.staging-step_XXXXXXXX` and hashes the files it wrote (checkpoint_shares);
after a barrier rank 0 merges the ranks' parts into the manifest, renames the directory into place
and only then moves the `latest` pointer. A kill at any moment leaves either the previous checkpoint
as latest or the new one complete. DeepSpeed's own `latest` file is never written (it is written
before the shards). Resuming, each rank checks the files it loads against the manifest before
anything is deserialised, and rank 0 refuses a file the manifest does not name; `verify` checks a
whole checkpoint in one process.

Resuming says what to do when it cannot: a `latest` that is missing, names a deleted checkpoint
or one that fails its manifest check is an error naming the newest intact checkpoint and the
override that resumes from it (`checkpoint.resume=RUN/checkpoints/step_XXXXXXXX`); a configuration
that differs from the checkpoint's in what shapes the model or gives the state its meaning
(`config_changes`) is refused, naming each field old -> new, before anything is loaded. The number
of ranks may change (resharding).
"""

from __future__ import annotations

import base64
import errno
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..modeling.fileio import replace_directory, write_bytes_atomic, write_json_atomic, write_text_atomic
from . import checksums

CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
POINTER = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
ENGINE_TAG = "engine"
SCRATCH_PREFIX = ".universal-"  # a checkpoint converted for another world size, while it loads (resharding)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or found; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    return root / f".staging-{checkpoint_name(step)}"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as JSON-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def write_rank_files(stage: Path, rank: int, trainer_state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """What every rank adds beside DeepSpeed's files: its RNG state (and, rank 0, the trainer state).
    Returns their manifest entries."""
    files = {f"rng/rank_{rank:05d}.json": rng_state()}
    if trainer_state is not None:
        files[TRAINER_STATE] = trainer_state
    part = {}
    for rel, value in files.items():
        data = json.dumps(value, indent=2, sort_keys=True).encode()
        write_bytes_atomic(stage / rel, data)
        part[rel] = checksums.entry_of_bytes(data)
    return part


def publish(
    root: Path,
    step: int,
    keep_last: int,
    on_point: Callable[[str], None] = lambda point: None,
    files: dict[str, dict[str, Any]] | None = None,
    durable: bool = True,
) -> Path:
    """Rank 0, after every rank finished writing the staging directory: manifest, rename, pointer, prune.
    `files` are the manifest entries the ranks computed for the files they wrote (their parts,
    merged); a file no part names is hashed here (and, `durable`, fsynced: the ranks fsynced
    theirs). `on_point(name)` is called between the stages (fault-injection tests kill the process
    there)."""
    stage, final = staging_dir(root, step), root / checkpoint_name(step)
    named = dict(files or {})
    entries = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = str(path.relative_to(stage))
        entry = named.pop(rel, None)
        if entry is None:
            entry = checksums.entry_of_file(path, fsync=durable)
        elif entry["bytes"] != path.stat().st_size:
            raise OSError(errno.EIO, "its size is not what its rank wrote", str(path))
        entries[rel] = entry
    if named:  # a rank hashed a file that is gone: as if its write had failed
        missing = stage / sorted(named)[0]
        raise FileNotFoundError(errno.ENOENT, "written by a rank, missing from the staging directory", str(missing))
    write_json_atomic(stage / MANIFEST, {"step": step, "files": entries})
    on_point("manifest")
    # the files are durable already, each made so by the rank that wrote it (or durable=False);
    # a checkpoint of the same step from an earlier attempt is replaced whole
    replace_directory(stage, final, fsync=False)
    on_point("published")
    _write_pointer(root, final.name)
    prune(root, keep_last)
    return final


def _write_pointer(root: Path, name: str) -> None:
    write_text_atomic(root / POINTER, name + "\n")


def prune(root: Path, keep_last: int) -> None:
    """Delete old complete checkpoints beyond keep_last, and the leftovers of killed saves and conversions."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in [*root.glob(".staging-*"), *root.glob(f"{SCRATCH_PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def inside(checkpoint: Path, rel: str) -> Path:
    """The file `rel` of a checkpoint; a name that leads outside the checkpoint is refused."""
    path = (checkpoint / rel).resolve()
    if not path.is_relative_to(checkpoint.resolve()):
        raise CheckpointError(f"{checkpoint / MANIFEST}: file {rel!r} points outside the checkpoint")
    return path


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    """The manifest of a checkpoint, its entries well formed and inside the checkpoint (nothing hashed)."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(checksums.algorithm(meta) for meta in files.values()):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (no files with bytes and a checksum)")
    for rel in files:
        inside(checkpoint, rel)
    return manifest


def check_listing(checkpoint: Path, manifest: dict[str, Any]) -> None:
    """Refuse a file the manifest does not name (planted?): a listing, nothing is read."""
    present = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST}
    unexpected = sorted(present - set(manifest["files"]))
    if unexpected:
        raise CheckpointError(f"{checkpoint / unexpected[0]}: file not in the checkpoint manifest (planted?)")


def verify(checkpoint: Path) -> dict[str, Any]:
    """Check a whole checkpoint against its manifest in this process; returns the manifest or raises
    CheckpointError. (Resuming, each rank checks only its share: checkpoint_shares.verify_share.)"""
    manifest = read_manifest(checkpoint)
    for rel, meta in manifest["files"].items():
        path = inside(checkpoint, rel)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if not checksums.file_matches(meta, path):
            raise CheckpointError(f"{path}: does not match the checkpoint manifest (damaged or modified)")
    check_listing(checkpoint, manifest)
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """The step_XXXXXXXX directories under `root`, oldest first (a name only complete ones get)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name))


def newest_intact(root: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint under `root` that verifies against its manifest (other than `exclude`)."""
    for candidate in reversed(complete_checkpoints(root)):
        if exclude is not None and candidate.resolve() == exclude.resolve():
            continue
        try:
            verify(candidate)
        except (CheckpointError, OSError, KeyError, TypeError):
            continue
        return candidate
    return None


def resume_hint(run_dir: Path, exclude: Path | None = None) -> str:
    """What to type instead: the override that resumes from the newest intact checkpoint, or how to start over."""
    intact = newest_intact(Path(run_dir) / "checkpoints", exclude)
    if intact is None:
        return "no intact checkpoint is left: start over with checkpoint.overwrite=true (the run's files are archived)"
    override = f"checkpoint.resume={Path(run_dir) / 'checkpoints' / intact.name}"
    return f"the newest intact checkpoint is {intact.name}: resume from it with {override}"


def resolve_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`resume`: none | auto (the pointer of run_dir/checkpoints, None if there is no checkpoint at
    all) | a path. A path must be a checkpoint directory inside run_dir/checkpoints, never elsewhere.
    A pointer that is missing while checkpoints exist, or that names a checkpoint that is gone, is
    an error naming the newest intact checkpoint and the override that resumes from it."""
    root = (run_dir / "checkpoints").resolve()
    if resume == "none":
        return None
    if resume == "auto":
        pointer = root / POINTER
        if not pointer.is_file():
            if complete_checkpoints(root):
                raise CheckpointError(f"{pointer}: missing although {root} holds checkpoints; {resume_hint(run_dir)}")
            return None
        name = pointer.read_text().strip()
        if not CHECKPOINT_NAME.match(name):
            raise CheckpointError(f"{pointer}: names {name!r}, not a checkpoint of this run; {resume_hint(run_dir)}")
        candidate = root / name
    else:
        candidate = Path(resume).resolve()
        if candidate.parent != root or not CHECKPOINT_NAME.match(candidate.name):
            raise CheckpointError(
                f"checkpoint.resume={resume!r}: not a checkpoint directory of this run ({root}/step_XXXXXXXX)"
            )
    if not candidate.is_dir():
        raise CheckpointError(f"{candidate}: no such checkpoint (deleted?); {resume_hint(run_dir, candidate)}")
    return candidate


def verify_for_resume(run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """verify(), with the way out in the message when the checkpoint is damaged."""
    try:
        return verify(checkpoint)
    except CheckpointError as err:
        raise with_way_out(run_dir, checkpoint, err) from None


def with_way_out(run_dir: Path, checkpoint: Path, err: CheckpointError) -> CheckpointError:
    """`err` with the override that resumes from the newest intact checkpoint other than `checkpoint`."""
    return CheckpointError(f"{err}; {resume_hint(run_dir, checkpoint)}")


# ------------------------------------------------------------------ resuming under another configuration
# What a checkpoint cannot be resumed under when it changes: the model (shapes, the frozen weights),
# the method and its settings, the data and how it is read, the precision of the saved state.
# hycam.eval_routing only acts at evaluation; model.name and model.seed only name a backbone built
# in code, the data recipe's settings only a build from the recipe; the rest (optim.*: the schedule,
# model.gradient_checkpointing, ...) may change, with a warning; logging.*, checkpoint.* and
# run_dir (a moved run directory) silently.
_FIXED = {
    "method",
    "model.path",
    "model.name",
    "model.seed",
    "data.dir",
    "data.recipe",
    "data.data_root",
    "data.seq_len",
    "data.vocab_size",
    "data.template",
    "data.task_sampling",
    "data.temperature",
    "data.seed",
    "optim.precision",
}
_SILENT = ("run_dir", "logging.", "checkpoint.")


def run_changes(state: dict[str, Any], current: dict[str, Any], world: int, stage: int) -> tuple[list[str], list[str]]:
    """(fixed, allowed) as config_changes returns them, for what a checkpoint's trainer state records
    beside the config: the ZeRO stage (fixed: one stage's files are not the other's), the world
    size and the global batch (allowed: the partitions are resharded, the data stream continues).
    `current` is this job's config (to_dict()); a checkpoint that predates a field is not compared on it."""
    fixed, allowed = [], []
    old_stage = state.get("zero_stage")
    if old_stage is not None and old_stage != stage:
        fixed.append(f"ZeRO stage {old_stage} -> {stage} (--ds_config)")
    old_world = state.get("world_size", world)
    if old_world != world:
        allowed.append(f"world size {old_world} -> {world}")
    old_optim, new_optim = (state.get("config") or {}).get("optim") or {}, current["optim"]
    if "micro_batch_size" in old_optim and "grad_accum" in old_optim:
        old_batch = old_optim["micro_batch_size"] * old_optim["grad_accum"] * old_world
        new_batch = new_optim["micro_batch_size"] * new_optim["grad_accum"] * world
        if old_batch != new_batch:
            allowed.append(f"global batch {old_batch} -> {new_batch} rows per step")
    return fixed, allowed


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _fixed(key: str, current: dict[str, Any]) -> bool:
    """Whether a change of `key` makes the checkpoint unusable, for the configuration `current` (flat)."""
    built_in_code = current.get("model.path") is None
    from_recipe = current.get("data.dir") is None
    if key.startswith("hycam."):
        return current["method"] in ("hycam", "cam") and key != "hycam.eval_routing"
    if key.startswith("lora."):
        return current["method"] == "lora"
    if key in ("model.name", "model.seed"):
        return built_in_code
    if key in ("data.recipe", "data.data_root", "data.seq_len"):
        return from_recipe
    if key == "data.vocab_size":
        return from_recipe and built_in_code
    if key == "data.temperature":
        return current.get("data.task_sampling") == "temperature"
    return key in _FIXED


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(fixed, allowed): the settings that differ between a checkpoint's config and this job's, each
    as "field old -> new". `fixed` ones make the checkpoint unusable; `allowed` ones (the schedule)
    deserve a warning. Silent ones (logging, checkpointing, run_dir) are in neither, and so are
    fields only one side has (added to or removed from the config since the checkpoint was saved)."""
    old, new = _flatten(saved), _flatten(current)
    fixed, allowed = [], []
    for key in sorted(set(old) & set(new)):
        if key.startswith(_SILENT) or old.get(key) == new.get(key):
            continue
        change = f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        (fixed if _fixed(key, new) else allowed).append(change)
    return fixed, allowed
