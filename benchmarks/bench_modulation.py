"""The modulation alone: forward + backward of one layer's HyCAM modulation, fused CPU kernel vs
torch ops (hycam_ds/modulation.py), in one process, alternating, medians and ratios.

    .venv/bin/python benchmarks/bench_modulation.py [--rows 2048 --hidden 512 --experts 5 --rank 8]

Inputs as the layer hands them over: u and the target are row-strided column slices of one
wider tensor; the target is its own residual (site="attention").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from hycam_ds import fused_cpu, modulation


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
    joint = torch.randn(t, 2 * d, generator=g).requires_grad_()
    mid = torch.randn(t, n, r, generator=g).requires_grad_()
    spec_b = (torch.randn(n, r, d, generator=g) * 0.3).requires_grad_()
    weights = torch.softmax(torch.randn(t, n, generator=g), -1).requires_grad_()
    grad_out = torch.randn(t, d, generator=g)

    def step(hard: bool) -> float:
        start = time.perf_counter()
        u, target = joint[:, :d], joint[:, d:]
        out = modulation.modulate(target, target, u, mid, spec_b, weights, 0.5, hard)
        torch.autograd.grad(out, (joint, mid, spec_b, weights), grad_out)
        return time.perf_counter() - start

    rows = [("fused CPU kernel", "1", False), ("torch ops", "0", False),
            ("fused CPU kernel, hard", "1", True), ("torch ops, hard", "0", True)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for repeat in range(args.repeats + 3):  # alternating: noise hits both alike; 3 warm-up rounds
        for name, flag, hard in rows:
            os.environ["HYCAM_FUSED_CPU"] = flag
            elapsed = step(hard)
            if repeat >= 3:
                times[name].append(elapsed)
    print(f"\nmodulation forward + backward, T={t}, d={d}, N_s={n}, r={r}, fp32, {args.threads} threads, "
          f"median of {args.repeats}")
    print("| implementation | ms | vs torch ops |")
    print("|---|---|---|")
    for name, _, hard in rows:
        base = statistics.median(times["torch ops, hard" if hard else "torch ops"])
        ms = statistics.median(times[name])
        print(f"| {name} | {ms * 1e3:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
