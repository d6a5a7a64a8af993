"""One training step of HyCAM vs the frozen backbone, PEFT LoRA and the authors' expert loop.

    .venv/bin/python benchmarks/bench_hycam_step.py [--hidden 512 --layers 8 --seq 512 --batch 4 --steps 7]

Forward + backward + AdamW step on the trainable parameters of a random Llama (hidden 512,
8 layers, fp32). Variants run round-robin in one process, so machine noise hits all of them
alike; the table prints medians and ratios to the frozen backbone. "Saved activations" are the
bytes autograd keeps for backward (unique storages, parameters excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import hycam_ds as H
from hycam_ds.backbones import build_backbone
from hycam_ds.injection import hycam_layers
from hycam_ds.layer import HyCAMAttention


class AuthorsLoopModulation(nn.Module):
    """HyCAM as the authors' code computes it: one nn.Linear triple per expert in a Python loop,
    every expert's output stacked to [T, N_s, d], hard one-hot Gumbel weights, weighted sum."""

    def __init__(self, hidden: int, config: H.HyCAMConfig):
        super().__init__()
        n, r = config.num_specialized, config.rank
        self.config = config
        self.shared = nn.Linear(hidden, hidden, bias=False)
        self.lora_a = nn.ModuleList(nn.Linear(hidden, r, bias=False) for _ in range(n))
        self.lora_n = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(n))
        self.lora_b = nn.ModuleList(nn.Linear(r, hidden, bias=False) for _ in range(n))
        self.router = nn.Linear(hidden, n, bias=False)
        for b in self.lora_b:
            nn.init.zeros_(b.weight)
        nn.init.zeros_(self.shared.weight)

    def forward(self, x, h_att, h_in=None):
        weights = F.gumbel_softmax(self.router(x), tau=self.config.tau, hard=True)
        experts = [F.silu(self.config.scaling * b(n(a(x)))) for a, n, b in zip(self.lora_a, self.lora_n, self.lora_b)]
        specialised = (torch.stack(experts, dim=-2) * weights.unsqueeze(-1)).sum(-2)
        return h_att + h_att * (F.silu(self.shared(x)) + specialised)


def build_variant(name: str, args) -> tuple[nn.Module, list[nn.Parameter]]:
    model = build_backbone("bench-llama", args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           intermediate_size=int(args.hidden * 2.75))
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "frozen backbone":
        model.enable_input_require_grads()  # backward still runs through every layer
        return model, []
    if name == "PEFT LoRA r=8 (q,k,v,o)":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return model, [p for p in model.parameters() if p.requires_grad]
    routing = "hard" if "hard" in name else "soft"
    experts = 0 if name.startswith("shared CAM alone") else 5
    H.apply_hycam(model, H.HyCAMConfig(routing=routing, num_specialized=experts))
    H.set_record_stats(model, False)
    if name.startswith("authors"):
        for module in model.modules():
            if isinstance(module, HyCAMAttention):
                module.hycam = AuthorsLoopModulation(args.hidden, module.hycam.config)
        return model, [p for n, p in model.named_parameters() if ".hycam." in n]
    return model, H.hycam_parameters(model)


def saved_activation_bytes(model, ids) -> int:
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
        if hycam_layers(model):
            loss = loss + 0.01 * H.balance_loss(model)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def one_step(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    if hycam_layers(model):
        loss = loss + 0.01 * H.balance_loss(model)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = ["frozen backbone", "PEFT LoRA r=8 (q,k,v,o)", "authors' loop (hard Gumbel)", "hycam-ds soft (paper)", "hycam-ds hard",
             "shared CAM alone (the floor: no experts)"]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    variants = {}
    for name in names:
        model, params = build_variant(name, args)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        total = sum(p.numel() for p in model.parameters())
        variants[name] = dict(model=model, optimizer=optimizer, times=[], trainable=sum(p.numel() for p in params) / total)
    for name, v in variants.items():
        v["saved"] = saved_activation_bytes(v["model"], ids)
    for round_index in range(args.warmup + args.steps):  # round-robin: noise hits every variant alike
        for v in variants.values():
            elapsed = one_step(v["model"], v["optimizer"], ids)
            if round_index >= args.warmup:
                v["times"].append(elapsed)
    base = variants["frozen backbone"]
    base_time, base_saved = statistics.median(base["times"]), base["saved"]
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, "
          f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"| variant | trainable | step (s) | step vs frozen | saved activations (MB) | vs frozen |")
    print("|---|---|---|---|---|---|")
    for name, v in variants.items():
        t = statistics.median(v["times"])
        print(f"| {name} | {v['trainable']:.2%} | {t:.3f} | {t / base_time:.2f}x | {v['saved'] / 2**20:.0f} | {v['saved'] / base_saved:.2f}x |")
    ours = statistics.median(variants["hycam-ds soft (paper)"]["times"])
    loop = statistics.median(variants["authors' loop (hard Gumbel)"]["times"])
    memory = variants["hycam-ds soft (paper)"]["saved"] / variants["authors' loop (hard Gumbel)"]["saved"]
    print(f"\nhycam-ds soft vs the authors' loop: {ours / loop:.2f}x time, {memory:.2f}x saved activations")


if __name__ == "__main__":
    main()
