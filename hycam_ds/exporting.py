"""Export what a run trained: gathered from ZeRO-3 partitions, written by rank 0 only.

Every rank must call `export_trained` (the gather is a collective). Refuses to write an
adapter whose tensors are empty or missing (a ZeRO-3 partition saved without gathering).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from .adapter_io import save_adapter
from .injection import hycam_named_parameters

log = logging.getLogger("hycam_ds.exporting")


def _gathered(params, stage3: bool):
    if not stage3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def export_trained(trainer, directory: Path) -> Path | None:
    model, stage3 = trainer.model, trainer.ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    method = trainer.cfg.method
    if method in ("hycam", "cam"):
        named = list(hycam_named_parameters(model))
        with _gathered([p for _, p in named], stage3):
            if trainer.rank == 0:
                tensors = {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in named}
                save_adapter(model, directory, tensors=tensors)
    elif method == "lora":
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        with _gathered(params, stage3):
            if trainer.rank == 0:
                model.save_pretrained(str(directory), safe_serialization=True)
    else:  # full fine-tuning: the whole model, as a Hugging Face checkpoint
        with _gathered(list(model.parameters()), stage3):
            if trainer.rank == 0:
                state = {n: p.detach().cpu().clone() for n, p in model.state_dict().items()}
                model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
                trainer.tokenizer.save_pretrained(str(directory))
    if trainer.rank == 0:
        log.info("exported %s weights to %s", method, directory)
        return directory
    return None
