"""How a trained HyCAM run routes the tokens of any task: the tasks it trained on and any other.

    python launch/analyze_routing.py --run-dir runs/default --data runs/data/embedded-XXXX
    python launch/analyze_routing.py --run-dir RUN --data BUILD --data MY_TASK_BUILD --out DIR --max-rows 64
    deepspeed --num_gpus 2 launch/analyze_routing.py --ds_config ds_configs/zero3.json --run-dir RUN --data BUILD

Every --data is a data_pipeline build made with the run's tokenizer (its other tasks, a held-out
task, a user's own alpaca file through the generic source). Per task and routed layer: the mean
routing vector, the mean routing entropy, the share of tokens per top expert; the perplexity with
the adapter and with the untouched backbone; between tasks the Jensen-Shannon distance of their
mean routing vectors (per layer and averaged); for each task the run did not train on, the nearest
trained tasks. Writes report.json, report.md, routing_heatmap.png and routing_distance.png to --out
(default RUN/routing_analysis). Routing is deterministic; under ZeRO-3 the numbers equal one
process's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import torch

from hycam_ds.engine.cli import USER_ERRORS, Parser, UsageError, run_main
from hycam_ds.engine.distributed import init_process_group, leave_process_group, process_group_left_on_exit
from hycam_ds.engine.run_dir import RunDir
from hycam_ds.eval.precision import add_placement_arguments, placement
from hycam_ds.eval.recipe import run_model_spec
from hycam_ds.eval.routing_analysis import AnalysisError, analyze, write
from hycam_ds.eval.settings import EvalSettings

DEFAULTS = EvalSettings()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a launch/train.py run directory (method hycam)")
    parser.add_argument("--data", action="append", required=True, help="a data build to analyse; repeatable")
    parser.add_argument("--out", help="report directory (default: RUN/routing_analysis)")
    parser.add_argument("--split", default=DEFAULTS.split)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--max-rows", type=int, default=None, help="packed rows per build (default: all)")
    parser.add_argument(
        "--trained-tasks",
        help="comma-separated tasks the run trained on (default: the tasks of the run's own data build)",
    )
    add_placement_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before anything loads."""
    if not Path(args.run_dir).is_dir():
        raise UsageError(f"--run-dir {args.run_dir}: no such directory")
    for build in args.data:
        if not (Path(build) / "manifest.json").is_file():
            raise UsageError(f"--data {build}: holds no data build (no manifest.json)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.max_rows is not None and args.max_rows < 1:
        raise UsageError(f"--max-rows: expected >= 1, got {args.max_rows}")
    if args.ds_config is not None and not Path(args.ds_config).is_file():
        raise UsageError(f"--ds_config {args.ds_config}: no such file")
    placement(args.dtype, args.device, zero3=args.ds_config is not None)


def trained_tasks(args: argparse.Namespace) -> list[str]:
    """--trained-tasks, else the task names of the data build the run trained on."""
    if args.trained_tasks:
        return [t.strip() for t in args.trained_tasks.split(",") if t.strip()]
    info = RunDir(args.run_dir).read_info()
    manifest = Path(args.run_dir, info.data_dir) / "manifest.json"
    if not manifest.is_file():
        raise UsageError(
            f"{manifest}: the run's data build is gone, so which tasks it trained on is unknown; "
            "give --trained-tasks a,b,c"
        )
    return [task["name"] for task in json.loads(manifest.read_text())["tasks"]]


def main(argv: list[str] | None = None) -> int:
    return run_main("analyze_routing.py", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    from data_pipeline.progress import progress

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rank = 0
    if args.ds_config or "RANK" in os.environ:
        rank, _ = init_process_group()
    with process_group_left_on_exit(agreed=USER_ERRORS):
        spec, _, tokenizer = run_model_spec(Path(args.run_dir))
        settings = EvalSettings(
            split=args.split,
            batch_size=args.batch_size,
            max_ppl_rows=args.max_rows,
            dtype=args.dtype,
            device=args.device,
        )
        ds_config = json.loads(Path(args.ds_config).read_text()) if args.ds_config else None
        shown = partial(progress, disable=rank != 0 or args.no_progress)
        try:
            data = [Path(d) for d in args.data]
            result = analyze(spec, data, tokenizer, trained_tasks(args), settings, ds_config, shown)
        except AnalysisError as err:
            raise UsageError(str(err)) from None
        if rank == 0:
            print(write(result, Path(args.out) if args.out else Path(args.run_dir) / "routing_analysis"))
        leave_process_group(wait_for_all=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
