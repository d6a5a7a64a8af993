"""The fused HyCAM modulation: target * A with A = SiLU(u) + sum_k w_k SiLU(scale * B_k mid_k).

Why a custom autograd function: the specialised part needs every expert's output per token,
a [N_s, T, d] tensor. Letting autograd keep it (and its SiLU input, and the weighted copy) for
backward is what made HyCAM cost 1.3x a frozen step and 1.8x its activation memory in the
authors' formulation (see ../shared/notes/hycam-performance.md). Here forward builds that tensor
transiently and backward recomputes it from the tiny low-rank activations `mid` ([T, N_s, r]):
the recomputation costs T * N_s * r * d multiply-adds, a few percent of the shared d x d
projection. What is saved per token is only u (the shared pre-activation), the modulated target
and the low-rank activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _silu_grad(z: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    # d/dz [z * sigmoid(z)] = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    return sig * (1 + z * (1 - sig))


def _expert_preactivations(mid: torch.Tensor, spec_b: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, N, r] x [N, r, d] -> [N, T, d]: every expert's pre-activation, one batched matmul."""
    return torch.bmm(mid.transpose(0, 1), spec_b).mul_(scale)


def _specialised_mix(mid, spec_b, weights, scale, one_hot):
    """sum_k w_k SiLU(scale * mid_k B_k) -> [T, d]."""
    if one_hot:
        # Only the selected expert contributes: mask the low-rank activations and run a single
        # [T, N*r] x [N*r, d] matmul instead of materialising every expert's output.
        masked = (mid * weights.unsqueeze(-1)).flatten(1)
        return F.silu(masked @ spec_b.flatten(0, 1) * scale)
    experts = F.silu(_expert_preactivations(mid, spec_b, scale))
    return experts.mul_(weights.t().unsqueeze(-1)).sum(0)


class _ModulateFn(torch.autograd.Function):
    """target * (SiLU(u) + sum_k w_k SiLU(scale * mid_k B_k)), rows are tokens.

    hard=True: forward uses the exact one-hot of argmax(weights); backward hands the gradient of
    those one-hot weights straight through to `weights` (the straight-through estimator).
    """

    @staticmethod
    def forward(ctx, target, u, mid, spec_b, weights, scale, hard, stats):
        mix_weights = weights
        if hard:
            mix_weights = F.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
        spec = _specialised_mix(mid, spec_b, mix_weights, scale, one_hot=hard)
        shared = F.silu(u) if u is not None else None
        if stats is not None:
            stats["shared_magnitude"] = shared.detach().abs().mean().float() if shared is not None else None
            stats["specialized_magnitude"] = spec.detach().abs().mean().float()
        modulation = spec if shared is None else spec.add_(shared)
        ctx.scale = scale
        ctx.has_shared = u is not None
        ctx.save_for_backward(target, u if u is not None else target.new_empty(0), mid, spec_b, mix_weights)
        return target * modulation

    @staticmethod
    def backward(ctx, grad_out):
        target, u, mid, spec_b, mix_weights = ctx.saved_tensors
        scale = ctx.scale
        z = _expert_preactivations(mid, spec_b, scale)  # [N, T, d], recomputed
        sig = torch.sigmoid(z)
        experts = z * sig
        modulation = torch.einsum("tn,ntd->td", mix_weights, experts)
        grad_u = None
        if ctx.has_shared:
            sig_u = torch.sigmoid(u)
            modulation += u * sig_u
        grad_target = grad_out * modulation
        grad_modulation = grad_out * target
        if ctx.has_shared:
            grad_u = grad_modulation * _silu_grad(u, sig_u)
        grad_weights = torch.einsum("ntd,td->tn", experts, grad_modulation)
        grad_z = _silu_grad(z, sig).mul_(grad_modulation.unsqueeze(0)).mul_(mix_weights.t().unsqueeze(-1))
        grad_z.mul_(scale)
        grad_b = torch.bmm(mid.permute(1, 2, 0), grad_z)  # [N, r, T] x [N, T, d]
        grad_mid = torch.bmm(grad_z, spec_b.transpose(1, 2)).transpose(0, 1)  # [T, N, r]
        return grad_target, grad_u, grad_mid, grad_b, grad_weights, None, None, None


def modulate(target, u, mid, spec_b, weights, scale: float, hard: bool, stats: dict | None = None):
    """Token rows: target [T, d], u [T, d] or None, mid [T, N, r], spec_b [N, r, d], weights [T, N]."""
    return _ModulateFn.apply(target, u, mid, spec_b, weights, scale, hard, stats)
