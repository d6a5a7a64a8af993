"""Greedy generation with a HyCAM adapter vs the bare backbone: tokens/s and the time ratio.

    .venv/bin/python benchmarks/bench_generation.py [--backbone runs/backbones/smollm2-135m-instruct]
    .venv/bin/python benchmarks/bench_generation.py --backbone-name tiny-llama --new-tokens 8 --rounds 1

The same prompts, one at a time (batch 1: the per-token cost of the modulation at its worst),
greedy with the KV cache, a fixed number of new tokens (EOS does not stop early, so both models
generate the same count). The HyCAM model is the backbone's modules copied around the very same
weight tensors (one copy in memory, as a user holds it: two copies would compete for the CPU's
caches and measure that), with HyCAM applied and every adapter weight random (nonzero
modulation). Backbone and HyCAM take turns prompt by prompt, in an order that flips each round,
so machine noise hits both alike. The ratios are total HyCAM time over total backbone time, in
wall-clock time and in this process's CPU time: on a machine shared with other jobs the second
is the steadier (waiting for a core counts in neither model's favour), and with --threads 1 it
measures the same work.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import hycam_ds as H
from hycam_ds.eval.precision import DTYPE_CHOICES, dtype_name, resolve_dtype
from hycam_ds.modeling.backbones import build_backbone
from hycam_ds.modeling.injection import hycam_layers

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Add 17 and 25, then multiply the result by 3.",
]


def load_backbone(args, dtype: torch.dtype):
    """(backbone in eval mode, tokenised prompts)."""
    if args.backbone_name:
        model = build_backbone(args.backbone_name, args.vocab, dtype=dtype)
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, args.vocab, (1, 16 + 8 * i), generator=generator) for i in range(len(PROMPTS))]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.backbone, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.backbone)
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            for text in PROMPTS
        ]
    return model.eval(), prompts


def with_random_hycam(backbone, seed: int):
    """`backbone`'s modules copied around its own tensors, carrying HyCAM (paper defaults) with every
    adapter weight random."""
    same_tensors = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    model = H.apply_hycam(copy.deepcopy(backbone, memo=same_tensors), H.HyCAMConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in hycam_layers(model):
            for p in layer.parameters():
                # Small enough to keep the model's text coherent, large enough to change it.
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one greedy generation."""
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start, time.process_time() - start_cpu
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="runs/backbones/smollm2-135m-instruct", help="Hugging Face directory")
    parser.add_argument("--backbone-name", help="or a small backbone built in code (e.g. tiny-llama), random prompts")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary of --backbone-name")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: fp32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the prompts, after one warm-up pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    backbone, prompts = load_backbone(args, dtype)
    models = {"backbone": backbone, "hycam": with_random_hycam(backbone, seed=1)}
    H.set_record_stats(models["hycam"], False)
    wall, cpu = {name: 0.0 for name in models}, {name: 0.0 for name in models}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        order = list(models) if round_index % 2 == 0 else list(reversed(models))
        for ids in prompts:
            for name in order:
                elapsed, elapsed_cpu = timed_generate(models[name], ids, args.new_tokens)
                if round_index > 0:
                    wall[name] += elapsed
                    cpu[name] += elapsed_cpu
    tokens = args.rounds * len(prompts) * args.new_tokens
    print(
        f"\ngreedy generation, {args.backbone_name or args.backbone}, {dtype_name(dtype)}, batch 1, "
        f"{len(prompts)} prompts x {args.new_tokens} new tokens x {args.rounds} rounds, KV cache, "
        f"{args.threads} threads"
    )
    print("| model | tokens/s | time vs backbone | CPU time vs backbone |")
    print("|---|---|---|---|")
    for name in models:
        print(
            f"| {name} | {tokens / wall[name]:.1f} | {wall[name] / wall['backbone']:.3f}x | "
            f"{cpu[name] / cpu['backbone']:.3f}x |"
        )
    print(
        f"HyCAM / backbone time ratio: {wall['hycam'] / wall['backbone']:.3f}x "
        f"(CPU time: {cpu['hycam'] / cpu['backbone']:.3f}x)"
    )


if __name__ == "__main__":
    main()
