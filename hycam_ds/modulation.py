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


def _l2_cache_elements(default: int = 1 << 18) -> int:
    """fp32 elements that fill one core's L2 cache (Linux sysfs), else 256K (1 MiB)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        return max(1 << 14, int(text.rstrip("KM")) * scale // 4)
    except (OSError, ValueError, IndexError):
        return default


# Elements per chunk of the [N_s, rows, d] expert tensor on CPU: one chunk fills a core's L2, so
# the elementwise passes and the small matmuls over it stay in cache. Measured per layer at
# T=2048, d=512, N_s=5 on a 1 MiB-L2 EPYC: 29 ms at 192K-512K elements, 37 ms at 1M, 43 ms at 2M,
# 35 ms at 64K (loop overhead). Accelerators take the whole tensor in one launch.
_CPU_CHUNK_ELEMENTS = _l2_cache_elements()


def _row_chunk(rows: int, experts: int, hidden: int, device: torch.device) -> int:
    if device.type != "cpu":
        return rows
    return max(1, min(rows, _CPU_CHUNK_ELEMENTS // (experts * hidden)))


def _expert_outputs(mid: torch.Tensor, scaled_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, N, r] x [N, r, d] -> (SiLU(z), sigmoid(z)), each [N, T, d], z = mid_k (scale * B_k)."""
    z = torch.bmm(mid.transpose(0, 1), scaled_b)
    sig = torch.sigmoid(z)
    return z.mul_(sig), sig


def _specialised_mix(mid, spec_b, weights, scale, one_hot):
    """sum_k w_k SiLU(scale * mid_k B_k) -> [T, d]."""
    if one_hot:
        # Only the selected expert contributes: mask the low-rank activations and run a single
        # [T, N*r] x [N*r, d] matmul instead of materialising every expert's output.
        masked = (mid * weights.unsqueeze(-1)).flatten(1)
        return F.silu((masked @ spec_b.flatten(0, 1)).mul_(scale), inplace=True)
    rows, experts = mid.shape[0], mid.shape[1]
    step = _row_chunk(rows, experts, spec_b.shape[-1], mid.device)
    scaled_b = spec_b * scale
    mid_by_expert = mid.transpose(0, 1)
    out = mid.new_empty(rows, 1, spec_b.shape[-1])
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        experts_out = F.silu(torch.bmm(mid_by_expert[:, chunk], scaled_b), inplace=True)  # [N, t, d]
        torch.bmm(weights[chunk].unsqueeze(1), experts_out.transpose(0, 1), out=out[chunk])
    return out.squeeze(1)


def _backward_rows(grad_out, target, u, mid, spec_b, scaled_b, weights, scale):
    """Gradients for one chunk of token rows; spec_b's gradient is returned for summation."""
    experts, sig = _expert_outputs(mid, scaled_b)  # recomputed: nothing [N, T, d] was saved
    modulation = torch.einsum("tn,ntd->td", weights, experts)
    grad_u = None
    if u is not None:
        sig_u = torch.sigmoid(u)
        modulation.addcmul_(u, sig_u)
    grad_target = grad_out * modulation
    grad_modulation = grad_out * target
    if u is not None:
        # SiLU'(u) = sig(u) * (1 + u * (1 - sig(u)))
        grad_u = torch.addcmul(sig_u, sig_u, u * (1 - sig_u)).mul_(grad_modulation)
    grad_weights = (experts * grad_modulation).sum(-1).t()  # 4x faster than the equivalent bmm on CPU
    # SiLU'(z) = sig + SiLU(z) * (1 - sig), computed in place over the expert outputs.
    grad_z = experts.addcmul_(experts, sig, value=-1).add_(sig)
    grad_z.mul_(grad_modulation.unsqueeze(0)).mul_((weights.t() * scale).unsqueeze(-1))
    grad_b = torch.bmm(mid.permute(1, 2, 0), grad_z)  # [N, r, T] x [N, T, d]
    grad_mid = torch.bmm(grad_z, spec_b.transpose(1, 2)).transpose(0, 1)  # [T, N, r]
    return grad_target, grad_u, grad_mid, grad_b, grad_weights


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
        u = u if ctx.has_shared else None
        rows = target.shape[0]
        step = _row_chunk(rows, mid.shape[1], target.shape[1], target.device)
        grads = [torch.empty_like(target), torch.empty_like(u) if u is not None else None, torch.empty_like(mid), None, torch.empty_like(mix_weights)]
        scaled_b = spec_b * ctx.scale
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            part = _backward_rows(grad_out[chunk], target[chunk], None if u is None else u[chunk], mid[chunk], spec_b, scaled_b, mix_weights[chunk], ctx.scale)
            for index, value in enumerate(part):
                if index == 3:
                    grads[3] = value if grads[3] is None else grads[3].add_(value)
                elif value is not None:
                    grads[index][chunk] = value
        grad_target, grad_u, grad_mid, grad_b, grad_weights = grads
        return grad_target, grad_u, grad_mid, grad_b, grad_weights, None, None, None


def modulate(target, u, mid, spec_b, weights, scale: float, hard: bool, stats: dict | None = None):
    """Token rows: target [T, d], u [T, d] or None, mid [T, N, r], spec_b [N, r, d], weights [T, N]."""
    return _ModulateFn.apply(target, u, mid, spec_b, weights, scale, hard, stats)
