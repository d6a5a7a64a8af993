"""A stand-in for launch/train.py with the same contract, for testing the SLURM machinery.

    python tests/slurm/standin_train.py --ds_config X [--config Y] run_dir=D optim.max_steps=N
        checkpoint.save_every=K checkpoint.resume=auto [data.dir=P]

One process per rank (torch.distributed over gloo, rendezvous from the environment),
rank 0 writes RUN_DIR/metrics.jsonl ({"step", "loss", "rank_losses"}), checkpoints under
RUN_DIR/checkpoints/step_XXXXXXXX/ with the pointer RUN_DIR/checkpoints/latest, logs
"resumed from step N". On a preemption warning every rank stops at the same step, saves,
requeues, exits 0. STANDIN_STEP_SECONDS (0.3) slows steps down so a test can signal a running job.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hycam_ds.engine.distributed import init_timeout, preflight
from hycam_ds.engine.preemption import PreemptionGuard

log = logging.getLogger("standin")


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = {
        "run_dir": "runs/standin",
        "optim.max_steps": "20",
        "checkpoint.save_every": "10",
        "checkpoint.resume": "none",
        "data.dir": "",
    }
    for item in args.overrides:  # keys it does not use (logging.*, ...) are accepted and ignored
        key, _, value = item.partition("=")
        cfg[key] = value
    return cfg


def save(run_dir: Path, step: int, weight: torch.Tensor, rank: int) -> None:
    ckpt = run_dir / "checkpoints"
    final = ckpt / f"step_{step:08d}"
    if rank == 0:
        tmp = ckpt / f".tmp_step_{step:08d}"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "weight": weight}, tmp / "state.pt")
        os.replace(tmp, final) if not final.exists() else None
        (ckpt / "latest.tmp").write_text(final.name)
        os.replace(ckpt / "latest.tmp", ckpt / "latest")  # the pointer is written last
    if dist.is_initialized():
        dist.barrier()


def main(argv) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", timeout=init_timeout())
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    preflight(timeout_s=float(os.environ.get("HYCAM_PREFLIGHT_TIMEOUT_S", "60")))
    guard = PreemptionGuard()

    run_dir = Path(cfg["run_dir"])
    max_steps, save_every = int(cfg["optim.max_steps"]), int(cfg["checkpoint.save_every"])
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.3"))
    torch.manual_seed(0)
    weight = torch.ones(4)
    step = 0
    pointer = run_dir / "checkpoints" / "latest"
    if cfg["checkpoint.resume"] == "auto" and pointer.exists():
        state = torch.load(run_dir / "checkpoints" / pointer.read_text().strip() / "state.pt")
        step, weight = state["step"], state["weight"]
        print(f"rank {rank}: resumed from step {step}", flush=True)

    while step < max_steps:
        time.sleep(step_seconds)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step * world + rank))
        loss = ((x @ weight) ** 2).mean()
        losses = torch.zeros(world)
        losses[rank] = loss.item()
        if dist.is_initialized():
            dist.all_reduce(losses)
        weight = weight * 0.95
        step += 1
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": losses.mean().item(), "rank_losses": losses.tolist()}) + "\n")
        if guard.should_stop():
            save(run_dir, step, weight, rank)
            print(f"rank {rank}: preempted, checkpoint at step {step}", flush=True)
            guard.requeue()
            break
        if step % save_every == 0 or step == max_steps:
            save(run_dir, step, weight, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    print(f"rank {rank}: done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
