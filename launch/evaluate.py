"""Evaluate a backbone plus what was trained on it, per task, on the held-out split.

    python launch/evaluate.py --run-dir runs/default --out runs/default/eval
    python launch/evaluate.py --backbone PATH --adapter DIR --data DIR --out DIR [--general-text ../shared/data/general]
    python launch/evaluate.py --run-dir runs/default --out DIR --dtype bf16 --device cuda:1
    deepspeed --num_gpus 2 launch/evaluate.py --ds_config ds_configs/zero3.json --run-dir RUN --out DIR

Per task: perplexity on response tokens, and BLEU-4 / ROUGE-L of batched greedy generations
(KV cache, deterministic routing) against the references; perplexity on general text with the
adaptation and for the untouched backbone (knowledge retention). Writes report.json, report.md,
task_metrics.png and (HyCAM) routing_heatmap.png. Under ZeRO-3 the model is partitioned across
ranks, examples are split across ranks and the results reduced: the numbers equal one process's.
The model runs in --dtype (auto: bf16 on a GPU that supports it, fp32 on CPU; report.json
records it), the DeepSpeed config's bf16 section following it under ZeRO-3.
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
from hycam_ds.eval.precision import add_placement_arguments, placement
from hycam_ds.eval.recipe import evaluate, model_spec, write
from hycam_ds.eval.settings import EvalSettings

DEFAULTS = EvalSettings()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a launch/train.py run directory: backbone, adapter and data from it")
    parser.add_argument("--backbone", help="Hugging Face backbone directory, .gguf file or hub id")
    parser.add_argument("--backbone-name", help="or a backbone built in code (hycam_ds.modeling.backbones) ...")
    parser.add_argument("--backbone-seed", type=int, default=0, help="... with this initialisation seed")
    parser.add_argument("--adapter", help="HyCAM or PEFT LoRA adapter directory")
    parser.add_argument("--full-model", help="a fully fine-tuned model directory (instead of backbone + adapter)")
    parser.add_argument("--data", help="a data_pipeline build directory")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--split", default=DEFAULTS.split)
    parser.add_argument(
        "--max-examples",
        type=int,
        default=DEFAULTS.max_examples_per_task,
        help="generations per task (0 = no generation)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument(
        "--max-ppl-rows",
        type=int,
        default=DEFAULTS.max_ppl_rows,
        help="packed rows of the split for perplexity (default: all)",
    )
    parser.add_argument(
        "--general-text", default=DEFAULTS.general_text, help="directory of .txt files for knowledge retention"
    )
    parser.add_argument("--general-tokens", type=int, default=DEFAULTS.general_max_tokens)
    add_placement_arguments(parser)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before anything loads."""
    for option, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--general-tokens", args.general_tokens),
    ):
        if value < 1:
            raise UsageError(f"{option}: expected >= 1, got {value}")
    if args.max_examples is not None and args.max_examples < 0:
        raise UsageError(f"--max-examples: expected >= 0 (0: no generation), got {args.max_examples}")
    if args.max_ppl_rows is not None and args.max_ppl_rows < 1:
        raise UsageError(f"--max-ppl-rows: expected >= 1, got {args.max_ppl_rows}")
    if args.general_text is not None and not Path(args.general_text).is_dir():
        raise UsageError(f"--general-text {args.general_text}: no such directory (of .txt files)")
    if args.ds_config is not None and not Path(args.ds_config).is_file():
        raise UsageError(f"--ds_config {args.ds_config}: no such file")
    # CUDA missing, or a device for ranks the deepspeed launcher places (--ds_config) itself
    placement(args.dtype, args.device, zero3=args.ds_config is not None)
    if args.run_dir is not None and not Path(args.run_dir).is_dir():
        raise UsageError(f"--run-dir {args.run_dir}: no such directory")
    if args.data is not None and not (Path(args.data) / "manifest.json").is_file():
        raise UsageError(f"--data {args.data}: holds no data build (no manifest.json)")


def resolve(args: argparse.Namespace):
    """(ModelSpec, data dir, tokenizer) from --run-dir or the explicit flags; clear errors otherwise."""
    if not args.run_dir and not args.data:
        raise UsageError("--data (or --run-dir) is required")
    if not (args.run_dir or args.backbone or args.backbone_name or args.full_model):
        raise UsageError("give --backbone, --backbone-name, --full-model or --run-dir")
    spec, data_dir, tokenizer = model_spec(
        args.run_dir,
        backbone=args.backbone,
        backbone_name=args.backbone_name,
        backbone_seed=args.backbone_seed,
        adapter=args.adapter,
        full_model=args.full_model,
        # a run names its own tokenizer; a backbone built in code tokenises as the data build did
        tokenizer=None if (args.run_dir or args.full_model or args.backbone) else str(Path(args.data) / "tokenizer"),
    )
    return spec, Path(args.data) if args.data else data_dir, tokenizer


def settings_from(args: argparse.Namespace) -> EvalSettings:
    return EvalSettings(
        split=args.split,
        max_examples_per_task=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_ppl_rows=args.max_ppl_rows,
        general_text=args.general_text,
        general_max_tokens=args.general_tokens,
        dtype=args.dtype,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> int:
    return run_main("evaluate.py", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    from data_pipeline.progress import progress

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs one line per scorer
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rank = 0
    if args.ds_config or "RANK" in os.environ:
        rank, _ = init_process_group()
    with process_group_left_on_exit(agreed=USER_ERRORS):
        spec, data_dir, tokenizer = resolve(args)
        ds_config = json.loads(Path(args.ds_config).read_text()) if args.ds_config else None
        shown = partial(progress, disable=rank != 0 or args.no_progress)
        result = evaluate(spec, data_dir, tokenizer, settings_from(args), ds_config, Path(args.out), shown)
        if rank == 0:
            print(write(result, Path(args.out)))
        leave_process_group(wait_for_all=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
