"""The modulation alone: forward + backward of one layer's HyCAM after its joint projection
(routing, the N_k products, the modulation: hycam_ds.kernels.modulation.modulate_layer), fused CPU kernel
vs torch ops, in one process, alternating, medians and ratios.

    .venv/bin/python benchmarks/bench_modulation.py [--rows 2048 --hidden 512 --experts 5 --rank 8]

Inputs as the layer hands them over: the joint projection [T, C] holding u, every A_k x and the
router logits; Gumbel noise; the target is its own residual (site="attention"); the gradient
reaches the routing weights and probabilities as the balance loss sends it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hycam_ds.kernels import fused_cpu, modulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="tokens per layer call (batch x seq)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if fused_cpu.load() is None:
        raise SystemExit("the fused CPU kernel could not be built here (see the warning above)")
    g = torch.Generator().manual_seed(0)
    t, n, r, d = args.rows, args.experts, args.rank, args.hidden
    layout = modulation.ProjectionLayout(d, n, r, shared=True)
    proj = torch.randn(t, layout.width, generator=g).requires_grad_()
    target = torch.randn(t, d, generator=g).requires_grad_()
    spec_n = (torch.randn(n, r, r, generator=g) * 0.3).requires_grad_()
    spec_b = (torch.randn(n, r, d, generator=g) * 0.3).requires_grad_()
    noise = torch.randn(t, n, generator=g)
    grads = (
        torch.randn(t, d, generator=g),
        torch.randn(t, n, generator=g) * 1e-3,
        torch.randn(t, n, generator=g) * 1e-3,
    )

    def step(hard: bool) -> float:
        start = time.perf_counter()
        out, weights, probs = modulation.modulate_layer(
            target, target, proj, layout, spec_n, spec_b, noise, 0.5, 0.5, hard
        )
        torch.autograd.grad((out, weights, probs), (proj, target, spec_n, spec_b), grads)
        return time.perf_counter() - start

    rows = [
        ("fused CPU kernel", "1", False),
        ("torch ops", "0", False),
        ("fused CPU kernel, hard", "1", True),
        ("torch ops, hard", "0", True),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for repeat in range(args.repeats + 3):  # alternating: noise hits both alike; 3 warm-up rounds
        for name, flag, hard in rows:
            os.environ["HYCAM_FUSED_CPU"] = flag
            elapsed = step(hard)
            if repeat >= 3:
                times[name].append(elapsed)
    print(
        f"\nmodulation forward + backward, T={t}, d={d}, N_s={n}, r={r}, fp32, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    print("| implementation | ms | vs torch ops |")
    print("|---|---|---|")
    for name, _, hard in rows:
        base = statistics.median(times["torch ops, hard" if hard else "torch ops"])
        ms = statistics.median(times[name])
        print(f"| {name} | {ms * 1e3:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
