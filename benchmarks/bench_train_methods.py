"""Training-step throughput of hycam vs lora vs full vs the frozen backbone, and peak memory per
rank under ZeRO-3 at 1 and 2 ranks, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_train_methods.py [--steps 8] [--seq-len 256] [--batch 4]

Part 1 runs in this process, without DeepSpeed, on the same small Llama and the same packed
batches of the embedded corpus (forward + backward + AdamW on the trainable parameters),
round-robin so machine noise hits every method alike. Part 2 runs the real entry point
(launch/train.py, ZeRO-3) with 1 and 2 ranks and reads each rank's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hycam_ds as H  # noqa: E402
from data_pipeline import BuildConfig, ShardReader, block_causal_mask, build_dataset, load_tokenizer  # noqa: E402
from hycam_ds.modeling.backbones import build_backbone  # noqa: E402


def make_variant(name: str, vocab: int):
    model = build_backbone("small-llama", vocab)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "frozen backbone":
        model.enable_input_require_grads()
        return model, []
    if name == "hycam":
        H.apply_hycam(model, H.HyCAMConfig())
        H.set_record_stats(model, False)
        return model, H.hycam_parameters(model)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        return model, [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(True)
    return model, list(model.parameters())


def step(model, optimizer, batch, hycam: bool) -> float:
    start = time.perf_counter()
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=block_causal_mask(batch["segment_ids"]),
        position_ids=batch["position_ids"],
    ).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100)
    if hycam:
        loss = loss + 0.01 * H.balance_loss(model, segment_ids=batch["segment_ids"])
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def throughput(data_dir: Path, args) -> None:
    vocab = len(load_tokenizer(data_dir / "tokenizer"))
    reader = iter(ShardReader(data_dir, "train", micro_batch_size=args.batch, seed=0))
    batches = [next(reader) for _ in range(args.steps + 2)]
    tokens = [int((b["segment_ids"] > 0).sum()) for b in batches]
    names = ["frozen backbone", "hycam", "lora", "full"]
    variants = {}
    for name in names:
        model, params = make_variant(name, vocab)
        variants[name] = (model, torch.optim.AdamW(params, lr=1e-4) if params else None, [])
    for i, batch in enumerate(batches):
        for name, (model, optimizer, times) in variants.items():
            elapsed = step(model, optimizer, batch, name == "hycam")
            if i >= 2:
                times.append(tokens[i] / elapsed)
    base = statistics.median(variants["frozen backbone"][2])
    print(
        f"\nsmall-llama ({sum(p.numel() for p in variants['full'][0].parameters()) / 1e6:.1f}M parameters), "
        f"batch {args.batch} x seq {args.seq_len} packed, fp32, median of {args.steps} steps"
    )
    print("| method | tokens/s | vs frozen backbone |")
    print("|---|---|---|")
    for name, (_, _, rates) in variants.items():
        rate = statistics.median(rates)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")


def zero3_memory(data_dir: Path, args) -> None:
    rows = {}
    for ranks in (1, 2):
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-zero3-{ranks}-"))
        overrides = [
            f"run_dir={run_dir}",
            f"data.dir={data_dir}",
            "optim.max_steps=4",
            "optim.warmup_steps=1",
            "logging.eval_every=0",
            "checkpoint.save_every=0",
            "checkpoint.export_adapter=false",
            "logging.progress=false",
        ]
        entry = [str(REPO / "launch/train.py"), "--ds_config", str(REPO / "ds_configs/zero3.json"), *overrides]
        cmd = (
            [sys.executable, *entry]
            if ranks == 1
            else [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", *entry]
        )
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        info = json.loads((run_dir / "partition.json").read_text())
        rows[ranks] = (max(info["peak_rss_bytes_per_rank"]), max(info["frozen_bytes_per_rank"]))
    print("\nZeRO-3 (launch/train.py, hycam), per rank")
    print("| ranks | peak RSS (MB) | frozen backbone held (MB) | backbone vs 1 rank |")
    print("|---|---|---|---|")
    for ranks, (rss, frozen) in rows.items():
        print(f"| {ranks} | {rss / 2**20:.0f} | {frozen / 2**20:.1f} | {frozen / rows[1][1]:.2f}x |")
    print("(peak RSS is dominated by the Python/torch/DeepSpeed runtime at this model size)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-data-")) / "embedded"
    build_dataset(
        BuildConfig(
            recipe=str(REPO / "data_pipeline/recipes/embedded.yaml"),
            out=str(data_dir),
            train_tokenizer=True,
            seq_len=args.seq_len,
            progress=False,
        )
    )
    throughput(data_dir, args)
    zero3_memory(data_dir, args)


if __name__ == "__main__":
    main()
