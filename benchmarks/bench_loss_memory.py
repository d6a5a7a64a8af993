"""Extra peak memory and time of the LM loss, forward + backward, with a 128k vocabulary: the formula
packed_token_losses had (the logits of every position, then `logits[:, :-1].float()` and
cross-entropy over them at once) against the one it has (engine.lm_loss with
hycam_ds.kernels.cross_entropy: the output head projects the loss tokens only, chunk by chunk).

    .venv/bin/python benchmarks/bench_loss_memory.py [--batch 4 --seq 1024 --vocab 128256 --hidden 576]

The model is a Llama of SmolLM2-135M's width with one decoder layer and a 128k vocabulary, fp32,
frozen but for its final norm, so the gradient flows back through the hidden states as it does
to an adapter. Rows are packed: two documents each, the first part of each a prompt without loss.
Each variant runs in a fresh process (a peak is per process); its peak is the resident set's high
water mark (Linux VmHWM, reset after set-up) minus the resident set before the step, with glibc
returning freed blocks at once (MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live
tensors. "The loss's extra" subtracts the peak of the same step without an output head.
A variant that needs more than --max-extra-gb stops with an allocation error (a shared machine's
OOM killer would pick the largest process, often not this one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline import block_causal_mask  # noqa: E402
from hycam_ds.engine.lm_loss import packed_token_losses  # noqa: E402
from hycam_ds.modeling.backbones import build_backbone  # noqa: E402

VARIANTS = {
    "backbone": "backbone alone (no output head)",
    "before": "before: every position's logits, upcast to fp32 at once",
    "after": "after: loss tokens only, chunk by chunk",
}


def packed_batch(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    half = args.seq // 2
    segments = torch.cat([torch.full((args.batch, half), 1), torch.full((args.batch, args.seq - half), 2)], 1)
    positions = torch.cat([torch.arange(half), torch.arange(args.seq - half)]).expand(args.batch, -1).contiguous()
    labels = ids.clone()
    for start, end in ((0, half), (half, args.seq)):
        prompt = round((end - start) * (1 - args.response_fraction))
        labels[:, start : start + prompt] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segment_ids": segments}


def build_model(args):
    model = build_backbone(
        "tiny-llama",
        args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 3 or 1,
    ).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(args.train_head)
    return model


def forward_inputs(batch):
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=block_causal_mask(batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    )


def step_backbone(model, batch) -> None:
    model.model(**forward_inputs(batch)).last_hidden_state.sum().backward()


def step_before(model, batch) -> None:
    """The formula packed_token_losses had, as it was."""
    logits = model(**forward_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    mask = labels != -100
    del logits
    ((losses * mask).sum() / mask.sum()).backward()


def step_after(model, batch) -> None:
    losses, mask = packed_token_losses(model, batch, "cpu")
    (losses.sum() / mask.sum()).backward()


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def run_variant(args) -> None:
    """In the child: set up, cap the address space, run the step; one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    model, batch = build_model(args), packed_batch(args)
    step = {"backbone": step_backbone, "before": step_before, "after": step_after}[args.variant]
    cap = _status_kib("VmSize") * 1024 + int(args.max_extra_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    exact = _reset_peak()
    before = _status_kib("VmRSS") * 1024
    seconds = []
    for repeat in range(args.repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step(model, batch)
        seconds.append(time.perf_counter() - start)
        if repeat == 0:  # the first step's peak: later ones may reuse what it left
            peak = (_status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    print(json.dumps({"extra": peak - before, "seconds": statistics.median(seconds), "exact": exact}))


def measure(name: str, args) -> dict:
    argv = sys.argv[1:]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--variant", name], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(
            f"{VARIANTS[name]}: failed (over --max-extra-gb {args.max_extra_gb}?)\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--response-fraction", type=float, default=1.0, help="share of each document with a loss")
    parser.add_argument("--train-head", action="store_true", help="the output head trains too (full fine-tuning)")
    parser.add_argument("--repeats", type=int, default=1, help="steps per variant (time: their median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-extra-gb", type=float, default=12.0, help="address space a variant may add")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    results = {name: measure(name, args) for name in VARIANTS}
    loss_tokens = int((packed_batch(args)["labels"][:, 1:] != -100).sum())
    print(
        f"\nLM loss forward + backward: {args.batch} x {args.seq} tokens ({loss_tokens} with a loss), vocabulary "
        f"{args.vocab}, hidden {args.hidden}, fp32, head {'trained' if args.train_head else 'frozen'}, "
        f"{args.threads} thread(s)"
    )
    if not all(r["exact"] for r in results.values()):
        print("(no /proc/self/clear_refs here: peaks include the set-up's)")
    print("| variant | peak over the step's start, MB | the loss's extra, MB | s |")
    print("|---|---|---|---|")
    base = results["backbone"]["extra"]
    for name, label in VARIANTS.items():
        extra = results[name]["extra"]
        loss = "" if name == "backbone" else f"{(extra - base) / 2**20:.0f}"
        print(f"| {label} | {extra / 2**20:.0f} | {loss} | {results[name]['seconds']:.2f} |")
    before, after = results["before"], results["after"]
    ratio = (after["extra"] - base) / max(before["extra"] - base, 1)
    print(f"the loss's extra peak memory, after / before: {ratio:.3f}x")
    print(f"time of the step, after / before: {after['seconds'] / before['seconds']:.2f}x")


if __name__ == "__main__":
    main()
