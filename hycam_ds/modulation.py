"""The fused HyCAM modulation: target * A with A = SiLU(u) + sum_k w_k SiLU(scale * B_k mid_k).

Why a custom autograd function: the specialised part needs every expert's output per token,
a [N_s, T, d] tensor. Letting autograd keep it (and its SiLU input, and the weighted copy) for
backward is what made HyCAM cost 1.3x a frozen step and 1.8x its activation memory in the
authors' formulation (see ../shared/notes/hycam-performance.md). Here forward builds that tensor
transiently and backward recomputes it from the tiny low-rank activations `mid` ([T, N_s, r]):
the recomputation costs T * N_s * r * d multiply-adds, a few percent of the shared d x d
projection. What is saved per token is only u (the shared pre-activation), the modulated target
and the low-rank activations.

Two kernels compute the elementwise part (everything except the small batched matmuls):
"eager" (in-place PyTorch ops, several passes over [N_s, t, d]) and "compiled" (the same maths
through torch.compile: one fused loop per output, nothing [N_s, t, d] written but the gradient
the matmuls need). See `set_kernel`.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Token rows per chunk of the [N_s, rows, d] expert tensor: about 1M elements on CPU, so each
# chunk's elementwise passes stay in cache (measured 1.4x faster backward than whole tensors at
# T=2048, d=512); accelerators have the bandwidth to take the whole tensor in one launch.
_CPU_CHUNK_ELEMENTS = 1 << 20

KERNELS = ("auto", "eager", "compiled")
# "auto" compiles once a call's expert tensor is this large: compiling costs a few seconds once
# per process (then it is cached on disk), which only pays off on real work, not on tiny models.
_AUTO_COMPILE_ELEMENTS = 1 << 21
_kernel = os.environ.get("HYCAM_KERNEL", "auto")
_compiled: dict[str, object] = {}
_compile_failed = False


def set_kernel(name: str) -> None:
    """Choose how the elementwise part of the modulation runs (also: env HYCAM_KERNEL).

    "auto" (default): compiled when a layer's expert tensor has >= 2M elements (real models),
    eager below; "compiled": always torch.compile; "eager": never. Both give the same values to
    float rounding. If compiling fails (no C++ compiler, unsupported device), HyCAM warns once and
    runs eager."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"HyCAM kernel must be one of {KERNELS}, got {name!r}")
    _kernel = name


def _use_compiled(expert_elements: int) -> bool:
    if _compile_failed or _kernel == "eager":
        return False
    if _kernel not in KERNELS:
        raise ValueError(f"HYCAM_KERNEL must be one of {KERNELS}, got {_kernel!r}")
    return _kernel == "compiled" or expert_elements >= _AUTO_COMPILE_ELEMENTS


def _call_compiled(name: str, fn, eager_fn, *args):
    """Run torch.compile(fn) on args; on a compile failure warn once and use eager_fn from then on."""
    global _compile_failed
    if _compile_failed:
        return eager_fn(*args)
    if name not in _compiled:
        # dynamic: the row count varies (chunks, batch shapes) and must not trigger recompiles.
        _compiled[name] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[name](*args)
    except Exception as error:  # noqa: BLE001 - any backend failure: fall back, never lose the step
        _compile_failed = True
        logger.warning("HyCAM: torch.compile of the modulation kernel failed (%s: %s); running eager kernels",
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return eager_fn(*args)


def _row_chunk(rows: int, experts: int, hidden: int, device: torch.device) -> int:
    if device.type != "cpu":
        return rows
    return max(1, min(rows, _CPU_CHUNK_ELEMENTS // (experts * hidden)))


# ---- forward elementwise part: z [N, t, d] (= scale * mid_k B_k), weights [t, N] -> target * A

def _mix_eager(z, weights, u, target, want_stats: bool):
    spec = torch.bmm(weights.unsqueeze(1), F.silu(z, inplace=True).transpose(0, 1)).squeeze(1)
    shared = None if u is None else F.silu(u)
    modulation = spec if shared is None else spec + shared
    if not want_stats:
        return target * modulation, None, None
    return target * modulation, spec.abs().sum(), None if shared is None else shared.abs().sum()


def _mix_math(z, weights, u, target, want_stats: bool):
    spec = (F.silu(z) * weights.t().unsqueeze(-1)).sum(0)
    shared = None if u is None else F.silu(u)
    modulation = spec if shared is None else spec + shared
    if not want_stats:
        return target * modulation, None, None
    return target * modulation, spec.abs().sum(), None if shared is None else shared.abs().sum()


# ---- backward elementwise part -> grad_target, grad_u, grad_weights [t, N], grad_z [N, t, d]

def _mix_backward_eager(z, weights, u, target, grad_out, scale):
    sig = torch.sigmoid(z)
    experts = z.mul_(sig)  # SiLU(z), in place over the recomputed z
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
    return grad_target, grad_u, grad_weights, grad_z


def _mix_backward_math(z, weights, u, target, grad_out, scale: float):
    sig = torch.sigmoid(z)
    experts = z * sig
    weights_by_expert = weights.t().unsqueeze(-1)
    modulation = (experts * weights_by_expert).sum(0)
    grad_u = None
    if u is not None:
        sig_u = torch.sigmoid(u)
        modulation = modulation + u * sig_u
        grad_u = grad_out * target * sig_u * (1 + u * (1 - sig_u))
    grad_modulation = grad_out * target
    grad_weights = (experts * grad_modulation).sum(-1).t()
    grad_z = (sig + experts * (1 - sig)) * grad_modulation * (weights_by_expert * scale)
    return grad_out * modulation, grad_u, grad_weights, grad_z


def _mix(z, weights, u, target, want_stats, total_rows):
    if _use_compiled(z.shape[0] * total_rows * z.shape[2]):
        return _call_compiled("forward", _mix_math, _mix_eager, z, weights, u, target, want_stats)
    return _mix_eager(z, weights, u, target, want_stats)


def _mix_backward(z, weights, u, target, grad_out, scale, total_rows):
    if _use_compiled(z.shape[0] * total_rows * z.shape[2]):
        return _call_compiled("backward", _mix_backward_math, _mix_backward_eager, z, weights, u, target, grad_out, scale)
    return _mix_backward_eager(z, weights, u, target, grad_out, scale)


class _ModulateFn(torch.autograd.Function):
    """target * (SiLU(u) + sum_k w_k SiLU(scale * mid_k B_k)), rows are tokens.

    hard=True: forward uses the exact one-hot of argmax(weights); backward hands the gradient of
    those one-hot weights straight through to `weights` (the straight-through estimator).
    """

    @staticmethod
    def forward(ctx, target, u, mid, spec_b, weights, scale, hard, stats):
        rows, experts, hidden = mid.shape[0], mid.shape[1], spec_b.shape[-1]
        mix_weights = weights
        if hard:
            mix_weights = F.one_hot(weights.argmax(-1), experts).to(weights.dtype)
            # Only the selected expert contributes: mask the low-rank activations and run a single
            # [T, N*r] x [N*r, d] matmul instead of materialising every expert's output.
            masked = (mid * mix_weights.unsqueeze(-1)).flatten(1)
            spec = F.silu((masked @ spec_b.flatten(0, 1)).mul_(scale), inplace=True)
            shared = F.silu(u) if u is not None else None
            out = target * (spec if shared is None else spec + shared)
            spec_sum = spec.abs().sum() if stats is not None else None
            shared_sum = shared.abs().sum() if stats is not None and shared is not None else None
        else:
            step = _row_chunk(rows, experts, hidden, mid.device)
            scaled_b = spec_b * scale
            mid_by_expert = mid.transpose(0, 1)
            out = torch.empty_like(target)
            spec_sum = shared_sum = None
            for start in range(0, rows, step):
                chunk = slice(start, start + step)
                z = torch.bmm(mid_by_expert[:, chunk], scaled_b)  # [N, t, d]
                out[chunk], spec_part, shared_part = _mix(z, weights[chunk], None if u is None else u[chunk], target[chunk],
                                                          stats is not None, rows)
                if spec_part is not None:
                    spec_sum = spec_part if spec_sum is None else spec_sum + spec_part
                if shared_part is not None:
                    shared_sum = shared_part if shared_sum is None else shared_sum + shared_part
        if stats is not None:
            count = rows * hidden
            stats["shared_magnitude"] = None if shared_sum is None else (shared_sum / count).detach().float()
            stats["specialized_magnitude"] = (spec_sum / count).detach().float()
        ctx.scale = scale
        ctx.has_shared = u is not None
        ctx.save_for_backward(target, u if u is not None else target.new_empty(0), mid, spec_b, mix_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        target, u, mid, spec_b, mix_weights = ctx.saved_tensors
        u = u if ctx.has_shared else None
        rows = target.shape[0]
        step = _row_chunk(rows, mid.shape[1], target.shape[1], target.device)
        grad_target, grad_mid, grad_weights = torch.empty_like(target), torch.empty_like(mid), torch.empty_like(mix_weights)
        grad_u = torch.empty_like(u) if u is not None else None
        grad_b = None
        scaled_b = spec_b * ctx.scale
        mid_by_expert = mid.transpose(0, 1)
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            z = torch.bmm(mid_by_expert[:, chunk], scaled_b)  # recomputed: nothing [N, T, d] was saved
            part = _mix_backward(z, mix_weights[chunk], None if u is None else u[chunk], target[chunk],
                                 grad_out[chunk], ctx.scale, rows)
            grad_target[chunk], grad_u_part, grad_weights[chunk], grad_z = part
            if grad_u is not None:
                grad_u[chunk] = grad_u_part
            chunk_grad_b = torch.bmm(mid_by_expert[:, chunk].transpose(1, 2), grad_z)  # [N, r, t] x [N, t, d]
            grad_b = chunk_grad_b if grad_b is None else grad_b.add_(chunk_grad_b)
            grad_mid[chunk] = torch.bmm(grad_z, spec_b.transpose(1, 2)).transpose(0, 1)  # [t, N, r]
        return grad_target, grad_u, grad_mid, grad_b, grad_weights, None, None, None


def modulate(target, u, mid, spec_b, weights, scale: float, hard: bool, stats: dict | None = None):
    """Token rows: target [T, d], u [T, d] or None, mid [T, N, r], spec_b [N, r, d], weights [T, N]."""
    return _ModulateFn.apply(target, u, mid, spec_b, weights, scale, hard, stats)
