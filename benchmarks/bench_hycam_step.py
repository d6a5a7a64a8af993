"""One training step of HyCAM vs the frozen backbone, PEFT LoRA and the authors' algorithm.

    .venv/bin/python benchmarks/bench_hycam_step.py [--hidden 512 --layers 8 --seq 512 --batch 4 --steps 7]

Forward + backward + AdamW step on the trainable parameters of a random Llama (hidden 512,
8 layers, fp32). Variants run round-robin in one process, so machine noise hits all of them
alike; the table prints medians and ratios to the frozen backbone. "Saved activations" are the
bytes autograd keeps for backward (unique storages, parameters excluded).

Two stand-ins for the authors' algorithm: their code's arithmetic step for step, and a simplified
expert loop (faster than theirs: it stacks experts on a middle dim). Two rows show what hycam-ds's
CPU paths buy: "torch ops" switches its fused CPU kernel off (HYCAM_FUSED_CPU=0), "projection on
torch's GEMM" runs its joint projection on torch's default BLAS instead of oneDNN
(HYCAM_ONEDNN_LINEAR=0; see hycam_ds/cpu_gemm.py). Every other row (the backbone itself, LoRA,
the authors' code) runs on torch's defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import hycam_ds as H
from hycam_ds.modeling.backbones import build_backbone
from hycam_ds.modeling.injection import hycam_layers
from hycam_ds.modeling.layer import HyCAMAttention


class AuthorsLoopModulation(nn.Module):
    """HyCAM's experts in a Python loop, simplified: one nn.Linear triple per expert, every
    expert's output stacked to [T, N_s, d], hard one-hot Gumbel weights, weighted sum."""

    def __init__(self, hidden: int, config: H.HyCAMConfig, router_bias: bool = False):
        super().__init__()
        n, r = config.num_specialized, config.rank
        self.config = config
        self.shared = nn.Linear(hidden, hidden, bias=False)
        self.lora_a = nn.ModuleList(nn.Linear(hidden, r, bias=False) for _ in range(n))
        self.lora_n = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(n))
        self.lora_b = nn.ModuleList(nn.Linear(r, hidden, bias=False) for _ in range(n))
        self.router = nn.Linear(hidden, n, bias=router_bias)
        for b in self.lora_b:
            nn.init.zeros_(b.weight)
        nn.init.zeros_(self.shared.weight)

    def experts(self, x):
        return [F.silu(self.config.scaling * b(n(a(x)))) for a, n, b in zip(self.lora_a, self.lora_n, self.lora_b)]

    def forward(self, x, h_att, h_in=None):
        weights = F.gumbel_softmax(self.router(x), tau=self.config.tau, hard=True)
        specialised = (torch.stack(self.experts(x), dim=-2) * weights.unsqueeze(-1)).sum(-2)
        return h_att + h_att * (F.silu(self.shared(x)) + specialised)


class AuthorsCodeModulation(AuthorsLoopModulation):
    """The decoder-layer arithmetic of the authors' public code (Applied-Machine-Learning-Lab/HyCAM,
    self_utils.py), step for step: the normalised input is cloned, the router has a bias, the
    expert outputs are stacked on the LAST dim ([T, d, N_s]) and summed over it, and the
    residual stream is modulated, (h_in + h_att) * (1 + A). Returned here as
    h_att + (h_in + h_att) * A because the decoder layer adds h_in afterwards: the same number of
    [T, d] passes as their (h_in + h_att) * (SiLU(.) + 1 + specialised)."""

    def __init__(self, hidden: int, config: H.HyCAMConfig):
        super().__init__(hidden, config, router_bias=True)

    def forward(self, x, h_att, h_in=None):
        attn_input = x.clone()
        rows = attn_input.reshape(-1, attn_input.shape[-1])
        weights = F.gumbel_softmax(self.router(rows), tau=self.config.tau, hard=True)
        specialised = (torch.stack(self.experts(rows), dim=-1) * weights.unsqueeze(1)).sum(-1).view_as(h_att)
        return torch.addcmul(h_att, h_in + h_att, F.silu(self.shared(attn_input)) + specialised)


AUTHORS_CODE = "authors' code (loop, stack on last dim, residual site)"
AUTHORS_LOOP = "expert loop, simplified (stack [T, N_s, d])"
TORCH_OPS = "hycam-ds soft, torch ops (HYCAM_FUSED_CPU=0)"
TORCH_GEMM = "hycam-ds soft, projection on torch's GEMM (HYCAM_ONEDNN_LINEAR=0)"
# Environment per variant, read by hycam-ds at every call: these rows switch one CPU path off.
VARIANT_ENV = {TORCH_OPS: {"HYCAM_FUSED_CPU": "0"}, TORCH_GEMM: {"HYCAM_ONEDNN_LINEAR": "0"}}


def build_variant(name: str, args) -> tuple[nn.Module, list[nn.Parameter]]:
    model = build_backbone(
        "bench-llama",
        args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=int(args.hidden * 2.75),
    )
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "frozen backbone":
        model.enable_input_require_grads()  # backward still runs through every layer
        return model, []
    if name == "PEFT LoRA r=8 (q,k,v,o)":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        return model, [p for p in model.parameters() if p.requires_grad]
    routing = "hard" if "hard" in name else "soft"
    experts = 0 if name.startswith("shared CAM alone") else 5
    stand_in = {AUTHORS_CODE: AuthorsCodeModulation, AUTHORS_LOOP: AuthorsLoopModulation}.get(name)
    # The authors' code modulates the residual stream: site="residual" makes the wrapper hand over h_in.
    site = "residual" if stand_in is AuthorsCodeModulation else "attention"
    H.apply_hycam(model, H.HyCAMConfig(routing=routing, num_specialized=experts, site=site))
    H.set_record_stats(model, False)
    if stand_in is not None:
        for module in model.modules():
            if isinstance(module, HyCAMAttention):
                module.hycam = stand_in(args.hidden, module.hycam.config)
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
    names = [
        "frozen backbone",
        "PEFT LoRA r=8 (q,k,v,o)",
        AUTHORS_CODE,
        AUTHORS_LOOP,
        "hycam-ds soft (paper)",
        "hycam-ds hard",
        TORCH_OPS,
        TORCH_GEMM,
        "shared CAM alone (the floor: no experts)",
    ]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    variants = {}
    for name in names:
        model, params = build_variant(name, args)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        total = sum(p.numel() for p in model.parameters())
        env = {"HYCAM_FUSED_CPU": "1", "HYCAM_ONEDNN_LINEAR": "1", **VARIANT_ENV.get(name, {})}
        variants[name] = dict(
            model=model, optimizer=optimizer, times=[], trainable=sum(p.numel() for p in params) / total, env=env
        )
    for v in variants.values():
        os.environ.update(v["env"])
        v["saved"] = saved_activation_bytes(v["model"], ids)
    for round_index in range(args.warmup + args.steps):  # round-robin: noise hits every variant alike
        for v in variants.values():
            os.environ.update(v["env"])
            elapsed = one_step(v["model"], v["optimizer"], ids)
            if round_index >= args.warmup:
                v["times"].append(elapsed)
    base = variants["frozen backbone"]
    base_time, base_saved = statistics.median(base["times"]), base["saved"]
    print(
        f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, fp32, "
        f"{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up"
    )
    print("| variant | trainable | step (s) | step vs frozen | saved activations (MB) | vs frozen |")
    print("|---|---|---|---|---|---|")
    for name, v in variants.items():
        t = statistics.median(v["times"])
        print(
            f"| {name} | {v['trainable']:.2%} | {t:.3f} | {t / base_time:.2f}x | "
            f"{v['saved'] / 2**20:.0f} | {v['saved'] / base_saved:.2f}x |"
        )
    ours = variants["hycam-ds soft (paper)"]
    for label, name in (("the authors' code", AUTHORS_CODE), ("the simplified expert loop", AUTHORS_LOOP)):
        other = variants[name]
        print(
            f"hycam-ds soft vs {label}: "
            f"{statistics.median(ours['times']) / statistics.median(other['times']):.2f}x time, "
            f"{ours['saved'] / other['saved']:.2f}x saved activations"
        )


if __name__ == "__main__":
    main()
