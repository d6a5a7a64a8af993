"""Fault injection for the fault-tolerance tests: failures at exact points of a real run.

Set HYCAM_FAULT to `kind:key=value:...` (several separated by `,`), e.g.
    HYCAM_FAULT=raise:rank=1:step=2         rank 1 raises at the start of step 2
    HYCAM_FAULT=kill:rank=1:step=4          rank 1 is SIGKILLed at the start of step 4
    HYCAM_FAULT=hang:rank=1:step=2          rank 1 sleeps forever at the start of step 2
    HYCAM_FAULT=kill_save:rank=0:step=4:point=published   SIGKILL inside the save of step 4
    HYCAM_FAULT=nan_loss:step=3             the loss of step 3 becomes NaN (every rank)
    HYCAM_FAULT=nan_grad:rank=0:step=3      a gradient of step 3 becomes inf on one rank
    HYCAM_FAULT=sigint:rank=0:step=3        a Ctrl-C typed in the terminal at the start of step 3: SIGINT
                                            to the whole foreground process group (launcher and ranks)
    HYCAM_FAULT=sigint_twice:rank=0:step=3  two Ctrl-Cs in a row (the second aborts)
    HYCAM_FAULT=disk_full:step=4:point=engine   the save of step 4 fails with ENOSPC at that point
`rank` omitted = every rank. Unset (always, outside tests) = no effect and no cost.
Save points: engine (DeepSpeed files written), rank_files (RNG/trainer state written),
manifest (manifest written, not yet renamed), published (renamed, pointer not yet moved).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

ENV = "HYCAM_FAULT"


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None
    step: int | None
    point: str | None


def _parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *pairs = item.split(":")
        values = dict(pair.split("=", 1) for pair in pairs)
        faults.append(
            Fault(
                kind,
                int(values["rank"]) if "rank" in values else None,
                int(values["step"]) if "step" in values else None,
                values.get("point"),
            )
        )
    return faults


_FAULTS = _parse(os.environ.get(ENV, ""))


def active(kind: str, rank: int, step: int, point: str | None = None) -> bool:
    return any(
        f.kind == kind and f.rank in (None, rank) and f.step in (None, step) and f.point in (None, point)
        for f in _FAULTS
    )


def at_step_start(rank: int, step: int) -> None:
    """Called by every rank at the start of each step (step = the step about to run, 1-based)."""
    if not _FAULTS:
        return
    if active("raise", rank, step):
        raise RuntimeError(f"injected failure on rank {rank} at step {step} ({ENV})")
    if active("kill", rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if active("hang", rank, step):
        while True:
            time.sleep(3600)
    for kind, count in (("sigint", 1), ("sigint_twice", 2)):
        if active(kind, rank, step):
            for _ in range(count):
                os.killpg(os.getpgrp(), signal.SIGINT)  # the handler runs before the next one is sent


def at_save_point(rank: int, step: int, point: str, writing_to: str) -> None:
    """Called by each rank between the stages of a save; `writing_to` is the directory being written."""
    if not _FAULTS:
        return
    if active("kill_save", rank, step, point):
        os.kill(os.getpid(), signal.SIGKILL)
    if active("disk_full", rank, step, point):  # as a full file system raises it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), writing_to)
