"""Atomic, complete checkpoints of a DeepSpeed run, and finding the latest one.

    run_dir/checkpoints/
        step_00000050/          a complete checkpoint (only complete ones carry this name)
            engine/             DeepSpeed's files (trainable parameters, optimizer, scheduler)
            trainer_state.json  step, data reader position, Gumbel noise counter, config
            rng/rank_00000.json python, numpy and torch RNG states of each rank
            manifest.json       size and sha256 of every file above, written last
        latest                  the name of the newest complete checkpoint, replaced atomically

Every rank writes into `.staging-step_XXXXXXXX`; after a barrier rank 0 hashes the files,
writes the manifest, renames the directory into place and only then moves the `latest`
pointer. A kill at any moment leaves either the previous checkpoint as latest or the new one
complete. DeepSpeed's own `latest` file is never written (it is written before the shards).
Loading verifies the manifest first: a truncated or modified file is refused before anything
is deserialised, so a planted file is never unpickled.

Resuming says what to do when it cannot: a `latest` that is missing, names a deleted checkpoint
or one that fails its manifest check is an error naming the newest intact checkpoint and the
override that resumes from it (`checkpoint.resume=RUN/checkpoints/step_XXXXXXXX`); a configuration
that differs from the checkpoint's in what shapes the model or gives the state its meaning
(`config_changes`) is refused, naming each field old -> new, before anything is loaded.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..modeling.fileio import replace_directory, sha256_file, write_json_atomic, write_text_atomic

CHECKPOINT_NAME = re.compile(r"^step_(\d{8})$")
POINTER = "latest"
MANIFEST = "manifest.json"
ENGINE_TAG = "engine"


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


def write_rank_files(stage: Path, rank: int, trainer_state: dict[str, Any] | None) -> None:
    """What every rank adds beside DeepSpeed's files: its RNG state (and, rank 0, the trainer state)."""
    (stage / "rng").mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage / "rng" / f"rank_{rank:05d}.json", rng_state())
    if trainer_state is not None:
        write_json_atomic(stage / "trainer_state.json", trainer_state)


def publish(root: Path, step: int, keep_last: int, on_point: Callable[[str], None] = lambda point: None) -> Path:
    """Rank 0, after every rank finished writing the staging directory: manifest, rename, pointer, prune.
    `on_point(name)` is called between the stages (fault-injection tests kill the process there)."""
    stage, final = staging_dir(root, step), root / checkpoint_name(step)
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "files": {str(p.relative_to(stage)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    write_json_atomic(stage / MANIFEST, manifest)
    on_point("manifest")
    replace_directory(stage, final)  # a checkpoint of the same step from an earlier attempt is replaced whole
    on_point("published")
    _write_pointer(root, final.name)
    prune(root, keep_last)
    return final


def _write_pointer(root: Path, name: str) -> None:
    write_text_atomic(root / POINTER, name + "\n")


def prune(root: Path, keep_last: int) -> None:
    """Delete old complete checkpoints beyond keep_last, and staging leftovers of killed saves."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def verify(checkpoint: Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; returns the manifest or raises CheckpointError."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    for rel, meta in manifest.get("files", {}).items():
        path = (checkpoint / rel).resolve()
        if not path.is_relative_to(checkpoint.resolve()):
            raise CheckpointError(f"{manifest_path}: file {rel!r} points outside the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: does not match the checkpoint manifest (damaged or modified)")
    present = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST}
    unexpected = sorted(present - set(manifest.get("files", {})))
    if unexpected:
        raise CheckpointError(f"{checkpoint / unexpected[0]}: file not in the checkpoint manifest (planted?)")
    return manifest


def check_pickles_are_data(checkpoint: Path) -> None:
    """DeepSpeed loads its files with torch.load(weights_only=False), which runs any code a pickle
    names. Before it does, every .pt file must load with weights_only=True, allowing only the two
    plain-data DeepSpeed classes its checkpoints hold; anything else is refused unexecuted."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    for path in sorted(checkpoint.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means: not plain data, do not hand it on
            reason = str(err).strip().splitlines()[0][:200]
            raise CheckpointError(f"{path}: refused, not plain tensor data ({reason})") from None


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
        raise CheckpointError(f"{err}; {resume_hint(run_dir, checkpoint)}") from None


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
