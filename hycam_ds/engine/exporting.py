"""Export what a run trained: gathered from ZeRO-3 partitions, written by rank 0 only.

Every rank must call `export_trained` (the gather is a collective). Refuses to write an
adapter whose tensors are empty or missing (a ZeRO-3 partition saved without gathering).
The destination is replaced only when it is absent, empty, or holds a previous export (a HyCAM
adapter manifest, a PEFT adapter_config.json, a Hugging Face config.json), never anything else;
every kind is written beside it and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..modeling.adapter_io import FORMAT, MANIFEST_FILE, save_adapter
from ..modeling.fileio import replace_directory
from ..modeling.injection import hycam_named_parameters
from .distributed import all_reduce_max
from .run_dir import RunDirError

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
HF_CONFIG = "config.json"


def _gathered(params, stage3: bool):
    if not stage3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def is_previous_export(directory: Path) -> bool:
    """Whether `directory` holds what an export writes: a HyCAM adapter (its manifest names the
    format), a PEFT adapter (adapter_config.json) or a Hugging Face model (config.json)."""
    manifest = directory / MANIFEST_FILE
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return (directory / PEFT_CONFIG).is_file() or (directory / HF_CONFIG).is_file()


def check_export_destination(directory: Path) -> None:
    """RunDirError unless `directory` is absent, an empty directory or a previous export."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise RunDirError(f"{directory}: exists and is not a directory; refusing to replace it with the export")
    if directory.is_dir() and any(directory.iterdir()) and not is_previous_export(directory):
        raise RunDirError(
            f"{directory}: holds files that are not a previous export (no HyCAM manifest.json, {PEFT_CONFIG} "
            f"or {HF_CONFIG}); refusing to replace it: move them elsewhere, then resume with checkpoint.resume=auto"
        )


def _write_beside(directory: Path, write) -> None:
    """`write(staging)` into a directory beside `directory`, then renamed into its place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from the other users of a shared run directory
    try:
        write(staging)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_trained(model, method: str, directory: Path, stage3: bool, is_writer: bool, tokenizer=None) -> Path | None:
    """Write what `method` trained of `model` to `directory`: HyCAM/CAM an adapter (save_adapter),
    LoRA a PEFT adapter, full the whole model plus `tokenizer`. Every rank calls it (under ZeRO-3
    the gather is a collective); only `is_writer` writes. Returns the directory on the writer."""
    directory = Path(directory)
    refusal = None
    if is_writer:
        try:
            check_export_destination(directory)
        except RunDirError as err:
            refusal = err
    if all_reduce_max(int(refusal is not None)):  # every rank learns it before the gather
        if refusal is not None:
            raise refusal
        raise RunDirError(f"{directory}: the export was refused on the writing rank")
    if method in ("hycam", "cam"):
        named = list(hycam_named_parameters(model))
        with _gathered([p for _, p in named], stage3):
            if is_writer:
                tensors = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in named}
                save_adapter(model, directory, tensors=tensors)
    elif method == "lora":
        with _gathered([p for p in model.parameters() if p.requires_grad], stage3):  # PEFT trains exactly its adapter
            if is_writer:
                _write_beside(directory, lambda out: model.save_pretrained(str(out), safe_serialization=True))
    else:  # full fine-tuning: the whole model, as a Hugging Face checkpoint
        with _gathered(list(model.parameters()), stage3):
            if is_writer:
                state = {n: p.detach().cpu().clone() for n, p in model.state_dict().items()}

                def write(out: Path) -> None:
                    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(str(out))

                _write_beside(directory, write)
    if is_writer:
        log.info("exported %s weights to %s", method, directory)
        return directory
    return None
