"""Evaluate a backbone plus what was trained on it, per task, on the held-out split.

    python launch/evaluate.py --run-dir runs/default --out runs/default/eval
    python launch/evaluate.py --backbone PATH --adapter DIR --data DIR --out DIR [--general-text ../shared/data/general]
    deepspeed --num_gpus 2 launch/evaluate.py --ds_config ds_configs/zero3.json --run-dir RUN --out DIR

Per task: perplexity on response tokens, and BLEU-4 / ROUGE-L of batched greedy generations
(KV cache, deterministic routing) against the references; perplexity on general text with the
adaptation and for the untouched backbone (knowledge retention). Writes report.json, report.md,
task_metrics.png and (HyCAM) routing_heatmap.png. Under ZeRO-3 the model is partitioned across
ranks, examples are split across ranks and the results reduced: the numbers equal one process's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import torch

from hycam_ds.evaluation import (EvalSettings, gather_generations, general_perplexity, general_text_blocks, generate_texts,
                                 generation_examples, generation_scores, ppl_batches, task_losses)
from hycam_ds.inference import ModelSpec, load_model
from hycam_ds.text_metrics import perplexity

log = logging.getLogger("evaluate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a launch/train.py run directory: backbone, adapter and data from it")
    parser.add_argument("--backbone", help="Hugging Face backbone directory or hub id")
    parser.add_argument("--backbone-name", help="or a backbone built in code (hycam_ds.backbones) ...")
    parser.add_argument("--backbone-seed", type=int, default=0, help="... with this initialisation seed")
    parser.add_argument("--adapter", help="HyCAM or PEFT LoRA adapter directory")
    parser.add_argument("--full-model", help="a fully fine-tuned model directory (instead of backbone + adapter)")
    parser.add_argument("--data", help="a data_pipeline build directory")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int, default=32, help="generations per task (0 = no generation)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-ppl-rows", type=int, default=None, help="packed rows of the split for perplexity (default: all)")
    parser.add_argument("--general-text", help="directory of .txt files for knowledge retention")
    parser.add_argument("--general-tokens", type=int, default=40_000)
    parser.add_argument("--ds_config", help="DeepSpeed JSON: ZeRO-3 partitions the model across ranks")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace):
    """(ModelSpec, data dir, tokenizer) from --run-dir or the explicit flags; clear errors otherwise."""
    from data_pipeline import load_tokenizer

    if args.run_dir:
        info = json.loads((Path(args.run_dir) / "run_info.json").read_text())
        data_dir = Path(args.data or info["data_dir"])
        tokenizer = load_tokenizer(info["tokenizer"])
        return ModelSpec.from_run_dir(Path(args.run_dir), len(tokenizer)), data_dir, tokenizer
    if not args.data:
        sys.exit("evaluate.py: --data (or --run-dir) is required")
    data_dir = Path(args.data)
    tokenizer = load_tokenizer(args.full_model or args.backbone or str(data_dir / "tokenizer"))
    if not (args.backbone or args.backbone_name or args.full_model):
        sys.exit("evaluate.py: give --backbone, --backbone-name, --full-model or --run-dir")
    spec = ModelSpec(backbone_path=args.backbone, backbone_name=args.backbone_name, backbone_seed=args.backbone_seed,
                     vocab_size=len(tokenizer), adapter=args.adapter, full_model=args.full_model)
    return spec, data_dir, tokenizer


def backbone_view(model, kind: str):
    """A context in which `model` computes its untouched backbone (None when that needs another model)."""
    import hycam_ds as H

    if kind == "hycam":
        return H.disable_hycam(model)
    if kind == "lora":
        return model.disable_adapter()
    if kind == "backbone":
        return contextlib.nullcontext()
    return None


def evaluate(args, spec: ModelSpec, data_dir: Path, tokenizer, rank: int, world: int) -> dict:
    from data_pipeline import ShardReader, tokenizer_fingerprint
    from tqdm import tqdm

    ds_config = json.loads(Path(args.ds_config).read_text()) if args.ds_config else None
    model, keepalive = load_model(spec, ds_config=ds_config)
    device = next(model.parameters()).device
    synced = world > 1 and ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    progress = partial(tqdm, disable=rank != 0 or args.no_progress)
    settings = EvalSettings(split=args.split, max_examples_per_task=args.max_examples or None, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, max_ppl_rows=args.max_ppl_rows, general_text=args.general_text,
                            general_max_tokens=args.general_tokens)
    reader = ShardReader(data_dir, args.split, rank, world, settings.batch_size, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), drop_last=False)
    sums, routing = task_losses(model, model, ppl_batches(list(reader), settings, world), len(reader.tasks), settings.batch_size, reader.seq_len, device, progress)
    tasks = {t: {"ppl": perplexity(float(sums[i, 0]), float(sums[i, 1])), "loss_tokens": int(sums[i, 1])} for i, t in enumerate(reader.tasks)}
    if args.max_examples:
        examples = generation_examples(data_dir, args.split, reader.tasks, settings.max_examples_per_task)
        generations = gather_generations(generate_texts(model, tokenizer, examples, settings, device, synced, progress))
        for task, scores in generation_scores(generations, examples, reader.tasks).items():
            tasks[task].update(scores)
        if rank == 0:
            samples = [{"task": reader.tasks[examples[i]["task_id"]], "hypothesis": h, "reference": r} for i, h, r in generations[:50]]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "samples.json").write_text(json.dumps(samples, indent=2))
    report = {"split": args.split, "model": {"kind": spec.kind(), **{k: v for k, v in vars(spec).items()}}, "tasks": tasks, "world_size": world,
              "max_ppl_rows": settings.max_ppl_rows}
    if settings.general_text:
        blocks = general_text_blocks(tokenizer, settings.general_text, settings.general_max_tokens, settings.general_seq_len)
        adapted = general_perplexity(model, blocks, settings.batch_size, device)
        view = backbone_view(model, spec.kind())
        if view is not None:
            with view:
                original = general_perplexity(model, blocks, settings.batch_size, device)
        else:  # a fully fine-tuned model: load the backbone it started from
            base, base_keepalive = load_model(ModelSpec(backbone_path=spec.backbone_path, backbone_name=spec.backbone_name,
                                                        backbone_seed=spec.backbone_seed, vocab_size=spec.vocab_size), ds_config=ds_config)
            original = general_perplexity(base, blocks, settings.batch_size, device)
        report["general_text"] = {"ppl": adapted, "backbone_ppl": original, "tokens": int(blocks.numel()), "source": settings.general_text}
    del keepalive
    return {"report": report, "routing": routing}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs one line per scorer
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rank, world = 0, 1
    if args.ds_config or "RANK" in os.environ:
        import deepspeed

        from hycam_ds.trainer import ensure_distributed_env

        ensure_distributed_env()
        deepspeed.init_distributed()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    spec, data_dir, tokenizer = resolve(args)
    result = evaluate(args, spec, data_dir, tokenizer, rank, world)
    if rank == 0:
        from hycam_ds.reporting import averages, markdown_table, write_report

        report = result["report"]
        report["average"] = averages(report["tasks"])
        write_report(report, Path(args.out), result["routing"])
        print(markdown_table(report))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
