"""Resuming a checkpoint under another number of ranks (a SLURM job requeued onto fewer or more nodes).

What depends on the world size, and how each part crosses over:

- ZeRO's partitions of the trainable parameters' fp32 master weights and Adam moments: DeepSpeed's
  own universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal) merges them, parameter
  by parameter, into a scratch directory beside the checkpoint (`.universal-step_XXXXXXXX`, removed
  once loaded); DeepSpeed loads it with "checkpoint": {"load_universal": true}, each rank taking its
  slice of every parameter. Rank 0 converts while the others wait: a checkpoint holds the trainable
  parameters only (the frozen backbone comes from model.path), so this takes seconds.
- The data reader's position counts samples of the one global stream, whatever the world size: it is
  restored as saved, and the new ranks split each global batch among themselves.
- python / numpy / torch RNG states: rank r restores rank r's saved state when the old job had a
  rank r; a rank it did not have is seeded from (optim.seed, r, step) (`new_rank_seed`).
- HyCAM's Gumbel noise: every rank keeps its own seed (rank_noise_seed) and continues from the
  highest counter the old ranks reached (under ZeRO-3 all ranks run every forward, so the counters
  are equal), so no rank draws noise it drew before.

The language-model loss does not depend on the world size when the global batch (micro batch x
grad_accum x world size) is the same; only the router noise, drawn per rank, does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .checkpointing import ENGINE_TAG, SCRATCH_PREFIX


def scratch_dir(checkpoint: Path) -> Path:
    """Where `checkpoint` converted for another world size is written while it loads: beside it, on
    the file system every rank reads the checkpoint from."""
    return checkpoint.parent / f"{SCRATCH_PREFIX}{checkpoint.name}"


def universal_load(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a job that loads a converted (universal) checkpoint."""
    ds = copy.deepcopy(ds_config)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def convert(checkpoint: Path, scratch: Path) -> Path:
    """Rank 0: DeepSpeed's files of `checkpoint` (verified and screened by the caller) converted into
    `scratch`, replacing what an earlier, killed attempt left there. Returns the directory to load
    with tag ENGINE_TAG."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(scratch, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint / ENGINE_TAG),
        output_folder=str(scratch / ENGINE_TAG),
        # in this process: worker processes forked from a rank of a process group are not safe
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO-1/2 conversion wants a marker Megatron-style trainers write
    )
    chatter = io.StringIO()  # its progress bars and prints: one log line says it instead
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal.main(args)
    return scratch


def new_rank_seed(seed: int, rank: int, step: int) -> int:
    """The python / numpy / torch seed of a rank the checkpoint has no RNG state for: a stream no
    rank of this run has used, the same on every attempt."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def noise_counter(saved_counts: list[int], rank: int, same_world: bool) -> int:
    """The Gumbel noise counter of `rank` after resuming: its own at the same world size, else the
    highest any old rank reached."""
    return saved_counts[rank] if same_world else max(saved_counts)
