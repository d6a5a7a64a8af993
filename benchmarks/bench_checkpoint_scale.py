"""Checkpoint save and resume at scale, simulated on one machine: hycam-ds's checkpoints against
DeepSpeed's own save_checkpoint / load_checkpoint of the same engine, in one run, as ratios.

    .venv/bin/python benchmarks/bench_checkpoint_scale.py [--mb-per-rank 150] [--ranks 1,2,3] [--repeats 3]
    .venv/bin/python benchmarks/bench_checkpoint_scale.py --short      # seconds: the test suite's run

Each rank is a process (gloo) holding a ZeRO-3 DeepSpeed engine over a stack of linear layers whose
trainable parameters give about --mb-per-rank MB of checkpoint per rank (fp32 master weights and two
Adam moments: 12 bytes per parameter of the rank's partition), after one optimizer step. The size
per rank is fixed, so the total grows with the ranks.

    DeepSpeed save     engine.save_checkpoint
    ours, save         the trainer's save: DeepSpeed's save through the hashing checkpoint engine
                       (each rank hashes and fsyncs what it writes), the rank files, the parts
                       gathered, rank 0's manifest, rename and pointer (checkpointing.publish)
    DeepSpeed resume   engine.load_checkpoint on a fresh engine
    ours, resume       the trainer's resume: each rank reads, hashes and screens its share once,
                       rank 0 lists the directory, DeepSpeed loads the screened objects

Times are the job's (the slowest rank, between barriers), medians over --repeats, the two sides
alternating. Files stay in the page cache between writing and reading, for both sides alike. The
last column is sha256 alone over one rank's files (read from the page cache): the least any
sha256 manifest adds, against which to read the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hycam_ds.engine import checkpoint_shares as shares  # noqa: E402
from hycam_ds.engine import checkpointing as ckpt  # noqa: E402
from hycam_ds.engine.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from hycam_ds.engine.train_config import TrainConfig  # noqa: E402
from hycam_ds.modeling.fileio import sha256_file  # noqa: E402

BYTES_PER_PARAMETER = 12  # fp32 master weight + Adam's two moments


def build_engine(layers: int, hidden: int, ds_config: dict):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(hidden, hidden, bias=False) for _ in range(layers)])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    loss = engine(torch.randn(1, hidden)).square().mean()  # one step, so the Adam moments exist
    engine.backward(loss)
    engine.step()
    return engine


def timed(action) -> float:
    """Seconds of `action` for the whole job: from a barrier to the last rank's end."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    action()
    dist.barrier()
    return time.perf_counter() - start


def ours_save(engine, root: Path, step: int, rank: int) -> None:
    stage = ckpt.staging_dir(root, step)
    if rank == 0:
        stage.mkdir(parents=True)
    torch.distributed.barrier()
    part = shares.save_engine(engine, stage)
    part.update(ckpt.write_rank_files(stage, rank, {"step": step} if rank == 0 else None))
    merged = shares.gather_parts(part)
    if rank == 0:
        ckpt.publish(root, step, keep_last=10**6, files=merged)


def hash_files(paths: list[Path]) -> None:
    for path in paths:
        sha256_file(path)


def ds_resume(engine, directory: Path) -> None:
    engine.load_checkpoint(str(directory), tag="engine", load_module_strict=False)


def ours_resume(engine, checkpoint: Path, rank: int) -> None:
    manifest = ckpt.read_manifest(checkpoint)
    loaded = shares.verify_share(checkpoint, manifest, shares.share(manifest["files"], rank))
    if rank == 0:
        ckpt.check_listing(checkpoint, manifest)
    shares.load_engine(engine, checkpoint, shares.screened_objects(checkpoint, loaded))


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch calls, every step
    from hycam_ds.engine.distributed import init_process_group

    init_process_group()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # after its import, which sets the level
    cfg = TrainConfig()
    cfg.optim.micro_batch_size, cfg.optim.grad_accum = 1, 1
    ds_config = resolve_ds_config(load_ds_config(REPO / "ds_configs/zero3.json"), cfg, world, bf16=False)
    layers = max(1, round(args.mb_per_rank * 1e6 * world / (BYTES_PER_PARAMETER * args.hidden**2)))
    root = Path(out) / f"world{world}"
    times: dict[str, list[float]] = {"ds_save": [], "our_save": [], "ds_resume": [], "our_resume": [], "sha256": []}
    engine = build_engine(layers, args.hidden, ds_config)
    sizes = []
    for r in range(args.repeats):
        ds_dir, ours_root = root / f"ds{r}", root / "ours"
        saves = [
            ("ds_save", partial(engine.save_checkpoint, str(ds_dir), tag="engine", exclude_frozen_parameters=True)),
            ("our_save", partial(ours_save, engine, ours_root, r, rank)),
        ]
        for name, action in saves if r % 2 == 0 else saves[::-1]:
            times[name].append(timed(action))
        ours_ckpt = ours_root / ckpt.checkpoint_name(r)
        resumes = [
            ("ds_resume", partial(ds_resume, directory=ds_dir)),
            ("our_resume", partial(ours_resume, checkpoint=ours_ckpt, rank=rank)),
        ]
        for name, action in resumes if r % 2 == 0 else resumes[::-1]:
            fresh = build_engine(layers, args.hidden, ds_config)  # ZeRO-3 loads into an engine that has not saved
            times[name].append(timed(partial(action, fresh)))
            fresh.destroy()
        mine = sorted((ds_dir / "engine").glob(f"*rank_{rank}_*"))
        sizes = [p.stat().st_size for p in mine]
        times["sha256"].append(timed(partial(hash_files, mine)))  # sha256 alone: the floor under a sha256 manifest
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    result = {"world": world, "layers": layers, "bytes_per_rank": sum(sizes), "times": times}
    if rank == 0:
        (Path(out) / f"result{world}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    engine.destroy()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb-per-rank", type=float, default=150.0, help="checkpoint megabytes per rank")
    parser.add_argument("--ranks", default="1,2,3", help="world sizes to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024, help="width of the square linear layers")
    parser.add_argument("--short", action="store_true", help="2 MB per rank, 1 and 2 ranks, one repeat")
    args = parser.parse_args()
    if args.short:
        args.mb_per_rank, args.ranks, args.repeats, args.hidden = 2.0, "1,2", 1, 128
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_", dir=os.environ.get("BENCH_DIR")) as out:
        for world in map(int, args.ranks.split(",")):
            mp.start_processes(worker, args=(world, free_port(), args, out), nprocs=world, start_method="spawn")
            rows.append(json.loads((Path(out) / f"result{world}.json").read_text()))
    print(f"checkpoint save and resume, ZeRO-3, {os.cpu_count()} CPU cores, medians of {args.repeats}")
    print("the size per rank is fixed: a job's time should not grow with its ranks (while each has a core)")
    print()
    print(
        "| ranks | MB per rank | DeepSpeed save s | ours s | ratio | DeepSpeed resume s | ours s | ratio "
        "| sha256 of a rank's files s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = {name: statistics.median(values) for name, values in row["times"].items()}
        print(
            f"| {row['world']} | {row['bytes_per_rank'] / 1e6:.0f} | {t['ds_save']:.2f} | {t['our_save']:.2f} | "
            f"{t['our_save'] / t['ds_save']:.2f}x | {t['ds_resume']:.2f} | {t['our_resume']:.2f} | "
            f"{t['our_resume'] / t['ds_resume']:.2f}x | {t['sha256']:.2f} |"
        )


if __name__ == "__main__":
    main()
