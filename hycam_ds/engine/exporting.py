"""Export what a run trained: gathered from ZeRO-3 partitions, written by rank 0 only.

Every rank must call `export_trained` (the gather is a collective). Refuses to write an
adapter whose tensors are empty or missing (a ZeRO-3 partition saved without gathering).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..modeling.adapter_io import save_adapter
from ..modeling.injection import hycam_named_parameters

log = logging.getLogger(__name__)


def _gathered(params, stage3: bool):
    if not stage3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def export_trained(model, method: str, directory: Path, stage3: bool, is_writer: bool, tokenizer=None) -> Path | None:
    """Write what `method` trained of `model` to `directory`: HyCAM/CAM an adapter (save_adapter),
    LoRA a PEFT adapter, full the whole model plus `tokenizer`. Every rank calls it (under ZeRO-3
    the gather is a collective); only `is_writer` writes. Returns the directory on the writer."""
    if method in ("hycam", "cam"):
        named = list(hycam_named_parameters(model))
        with _gathered([p for _, p in named], stage3):
            if is_writer:
                tensors = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in named}
                save_adapter(model, directory, tensors=tensors)
    elif method == "lora":
        with _gathered([p for p in model.parameters() if p.requires_grad], stage3):  # PEFT trains exactly its adapter
            if is_writer:
                model.save_pretrained(str(directory), safe_serialization=True)
    else:  # full fine-tuning: the whole model, as a Hugging Face checkpoint
        with _gathered(list(model.parameters()), stage3):
            if is_writer:
                state = {n: p.detach().cpu().clone() for n, p in model.state_dict().items()}
                model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(directory))
    if is_writer:
        log.info("exported %s weights to %s", method, directory)
        return directory
    return None
