"""Checkpoint save and resume at scale, simulated on one machine: hycam-ds's checkpoints against
DeepSpeed's own save_checkpoint / load_checkpoint of the same engine, in one run, as ratios.

    .venv/bin/python benchmarks/bench_checkpoint_scale.py [--mb-per-rank 150] [--ranks 1,2,3] [--repeats 3]
    .venv/bin/python benchmarks/bench_checkpoint_scale.py --short      # seconds: the test suite's run

Each rank is a process (gloo) holding a ZeRO-3 DeepSpeed engine over a stack of linear layers whose
trainable parameters give about --mb-per-rank MB of checkpoint per rank (fp32 master weights and two
Adam moments: 12 bytes per parameter of the rank's partition), after one optimizer step. The size
per rank is fixed, so the total grows with the ranks.

    DeepSpeed save     engine.save_checkpoint (returns when the bytes are in the page cache)
    ... + fsync        the same, then each rank fsyncs the files it wrote (durable, as ours)
    ours, save         the trainer's save: DeepSpeed's save through the hashing checkpoint engine
                       (each rank hashes and fsyncs what it writes), the rank files, the parts
                       gathered, rank 0's manifest, rename and pointer (checkpointing.publish)
    ours, durable=false  the same without the fsyncs (checkpoint.durable=false)
    DeepSpeed resume   engine.load_checkpoint on a fresh engine
    ours, resume       the trainer's resume: each rank maps, checks and screens its share, rank 0
                       lists the directory, DeepSpeed loads the screened objects
    before             the scheme ours replaced: rank 0 hashed every rank's files at save (sha256);
                       at resume every rank hashed the whole checkpoint and screened every .pt file,
                       then DeepSpeed read its own files again

Times are the job's (the slowest rank, between barriers), medians over --repeats, the sides
rotating which goes first. Files stay in the page cache between writing and reading, for every
side alike. The last columns are the manifest's checksum (XXH3-128) and sha256 alone over one rank's
files (read from the page cache): the least that a manifest of each kind adds to a resume.
"""

from __future__ import annotations

import argparse
import contextlib
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
from hycam_ds.engine import checksums  # noqa: E402
from hycam_ds.engine.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from hycam_ds.engine.train_config import TrainConfig  # noqa: E402

BYTES_PER_PARAMETER = 12  # fp32 master weight + Adam's two moments
SIDES = ["ds", "ours", "before"]
SAVE_ONLY = ["ds_durable", "ours_fast"]  # the same saves, with and without fsync: no resume of their own


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


def ours_save(engine, root: Path, step: int, rank: int, durable: bool = True) -> None:
    stage = ckpt.staging_dir(root, step)
    if rank == 0:
        stage.mkdir(parents=True)
    torch.distributed.barrier()
    part = shares.save_engine(engine, stage, fsync=durable)
    part.update(ckpt.write_rank_files(stage, rank, {"step": step} if rank == 0 else None))
    merged = shares.gather_parts(part)
    if rank == 0:
        ckpt.publish(root, step, keep_last=10**6, files=merged, durable=durable)


def ds_durable_save(engine, directory: Path, rank: int) -> None:
    """DeepSpeed's save, then each rank fsyncs the files it wrote: the same durability as ours."""
    engine.save_checkpoint(str(directory), tag=ckpt.ENGINE_TAG, exclude_frozen_parameters=True)
    for path in sorted((directory / ckpt.ENGINE_TAG).glob(f"*rank_{rank}_*")):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def recording(algorithm: str):
    """Manifests written and checked with `algorithm` (the scheme before recorded sha256)."""
    recorded, checksums.RECORDED = checksums.RECORDED, algorithm
    try:
        yield
    finally:
        checksums.RECORDED = recorded


@recording("sha256")
def before_save(engine, root: Path, step: int, rank: int) -> None:
    """The scheme this replaced: DeepSpeed's plain save, then rank 0 hashes every rank's files."""
    stage = ckpt.staging_dir(root, step)
    if rank == 0:
        stage.mkdir(parents=True)
    torch.distributed.barrier()
    engine.save_checkpoint(str(stage), tag=ckpt.ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    ckpt.write_rank_files(stage, rank, {"step": step} if rank == 0 else None)
    torch.distributed.barrier()
    if rank == 0:
        ckpt.publish(root, step, keep_last=10**6)  # no parts: hashes every file


@recording("sha256")
def before_resume(engine, checkpoint: Path) -> None:
    """The scheme this replaced: every rank hashes the whole checkpoint and screens every rank's .pt
    files, then DeepSpeed reads and unpickles its own files again."""
    ckpt.verify(checkpoint)
    for path in sorted(checkpoint.rglob("*.pt")):
        shares.screen(path)
    ds_resume(engine, checkpoint)


def hash_files(paths: list[Path], algorithm: str) -> None:
    with recording(algorithm):
        for path in paths:
            checksums.entry_of_file(path)


def ds_resume(engine, directory: Path) -> None:
    engine.load_checkpoint(str(directory), tag=ckpt.ENGINE_TAG, load_module_strict=False)


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
    times: dict[str, list[float]] = {f"{side}_{what}": [] for side in SIDES for what in ("save", "resume")}
    times.update({f"{side}_save": [] for side in SAVE_ONLY})
    times["checksum"], times["sha256"] = [], []
    engine = build_engine(layers, args.hidden, ds_config)
    sizes = []
    for r in range(args.repeats):
        dirs = {side: root / f"{side}{r}" for side in SIDES + SAVE_ONLY}
        saves = {
            "ds": partial(engine.save_checkpoint, str(dirs["ds"]), tag=ckpt.ENGINE_TAG, exclude_frozen_parameters=True),
            "ds_durable": partial(ds_durable_save, engine, dirs["ds_durable"], rank),
            "ours": partial(ours_save, engine, dirs["ours"], r, rank),
            "ours_fast": partial(ours_save, engine, dirs["ours_fast"], r, rank, durable=False),
            "before": partial(before_save, engine, dirs["before"], r, rank),
        }
        loaded = {"ds": dirs["ds"], **{side: dirs[side] / ckpt.checkpoint_name(r) for side in ("ours", "before")}}
        resumes = {
            "ds": partial(ds_resume, directory=loaded["ds"]),
            "ours": partial(ours_resume, checkpoint=loaded["ours"], rank=rank),
            "before": partial(before_resume, checkpoint=loaded["before"]),
        }
        order = SIDES[r % 3 :] + SIDES[: r % 3]  # each side goes first, second and third in turn
        save_order = list(saves)[r % len(saves) :] + list(saves)[: r % len(saves)]
        for side in save_order:
            times[f"{side}_save"].append(timed(saves[side]))
        for side in order:
            fresh = build_engine(layers, args.hidden, ds_config)  # ZeRO-3 loads into an engine that has not saved
            times[f"{side}_resume"].append(timed(partial(resumes[side], fresh)))
            fresh.destroy()
        mine = sorted((dirs["ds"] / ckpt.ENGINE_TAG).glob(f"*rank_{rank}_*"))
        sizes = [p.stat().st_size for p in mine]
        for algorithm, column in ((checksums.RECORDED, "checksum"), ("sha256", "sha256")):
            times[column].append(timed(partial(hash_files, mine, algorithm)))  # the floor under such a manifest
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
    print(f"checkpoint save and resume, ZeRO-3, {os.cpu_count()} CPU cores, medians of {args.repeats}, seconds")
    print("the size per rank is fixed: a job's time should not grow with its ranks (while each has a core)")
    t = [{name: statistics.median(values) for name, values in row["times"].items()} for row in rows]
    print()
    print("save: ours as DeepSpeed saves (checkpoint.durable=false: the bytes in the page cache) and as")
    print("the default saves (durable: every rank fsyncs its files), each against DeepSpeed doing the same")
    print(
        "| ranks | MB per rank | DeepSpeed save | ours, durable=false | ratio | DeepSpeed save + fsync "
        "| ours (default) | ratio | before: rank 0 hashes all | ratio |"
    )
    print("|---" * 10 + "|")
    for row, m in zip(rows, t):
        cells = [f"{row['world']}", f"{row['bytes_per_rank'] / 1e6:.0f}"]
        for mine, theirs in (("ours_fast", "ds"), ("ours", "ds_durable")):
            cells += [
                f"{m[theirs + '_save']:.2f}",
                f"{m[mine + '_save']:.2f}",
                f"{m[mine + '_save'] / m[theirs + '_save']:.2f}x",
            ]
        cells += [f"{m['before_save']:.2f}", f"{m['before_save'] / m['ds_durable_save']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        "| ranks | MB per rank | DeepSpeed resume | ours | ratio | before: every rank checks all | ratio "
        "| XXH3 of one rank's files | sha256 of them |"
    )
    print("|---" * 9 + "|")
    for row, m in zip(rows, t):
        ds, ours, old = m["ds_resume"], m["ours_resume"], m["before_resume"]
        cells = [
            f"{row['world']}",
            f"{row['bytes_per_rank'] / 1e6:.0f}",
            f"{ds:.2f}",
            f"{ours:.2f}",
            f"{ours / ds:.2f}x",
        ]
        cells += [f"{old:.2f}", f"{old / ds:.2f}x", f"{m['checksum']:.2f}", f"{m['sha256']:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
