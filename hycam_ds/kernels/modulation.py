"""The fused HyCAM modulation: residual + target * A, A = SiLU(u) + sum_k w_k SiLU(scale * B_k mid_k).

Why a custom autograd function: the specialised part needs every expert's output per token,
a [N_s, T, d] tensor. Letting autograd keep it (and its SiLU input, and the weighted copy) for
backward is what makes the authors' formulation slow and memory-hungry (docs/performance.md).
Here forward builds that tensor transiently and backward recomputes it from the tiny low-rank
activations `mid` ([T, N_s, r]): the recomputation costs T * N_s * r * d multiply-adds, a few
percent of the shared d x d projection. What is saved per token is only u (the shared
pre-activation), the modulated target and the low-rank activations.

`modulate_layer` takes everything after the layer's joint projection of x (u, every A_k x and
the router logits, side by side in one [T, C] tensor; see ProjectionLayout) and has two
implementations of the same function:
- on CPU in float32/float64, a fused C++ kernel (csrc/modulate_cpu.cpp, loaded by fused_cpu.py):
  routing, the N_k products, each chunk's small-K products and all elementwise work, forward and
  backward, with the projection's gradient written in place, column block by column block;
- elsewhere (accelerators, bf16/fp16, no compiler, HYCAM_FUSED_CPU=0) torch ops: softmax
  routing and an einsum for the N_k, then `modulate` (the custom function above, chunk by chunk).
Without autograd (evaluation, generation) the fused kernel runs without the custom function's
bookkeeping, and `infer_layer`, for decoding's few token rows, also computes the projection in
the same call. Tests hold every path to the plain statement, hycam_ds.modeling.reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused_cpu
from .routing import route


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
# the elementwise passes and the small matmuls over it stay in cache; much smaller chunks pay loop
# overhead (docs/performance.md). Accelerators take the whole tensor in one launch.
_CPU_CHUNK_ELEMENTS = _l2_cache_elements()


def _row_chunk(rows: int, experts: int, hidden: int, device: torch.device) -> int:
    if device.type != "cpu":
        return rows
    return max(1, min(rows, _CPU_CHUNK_ELEMENTS // (experts * hidden)))


def _soft_mix(mid_by_expert, scaled_b, weight_rows):
    """sum_k w_k SiLU(z_k) [t, d] for one chunk of rows, z_k = mid_k (scale B_k)."""
    experts_out = F.silu(torch.bmm(mid_by_expert, scaled_b), inplace=True)  # [N, t, d]
    return torch.bmm(weight_rows, experts_out.transpose(0, 1)).squeeze(1)


def _finish_rows(out, residual, target, u, spec, stats_sums):
    """out = residual + target * (spec + SiLU(u)); spec is consumed (it becomes A)."""
    if stats_sums is not None:
        stats_sums[1] += spec.abs().sum()
    if u is not None:
        shared = F.silu(u)
        if stats_sums is not None:
            stats_sums[0] += shared.abs().sum()
        spec.add_(shared)
    torch.addcmul(residual, target, spec, out=out)


def _backward_rows(grads, chunk, grad_out, target, u, mid_by_expert, spec_b, scaled_b, weights, scale):
    """Writes the gradients of one chunk of rows into `grads` (spec_b's is accumulated)."""
    grad_target, grad_u, grad_mid, grad_b, grad_weights = grads
    gm = grad_out * target  # d loss / d A
    z = torch.bmm(mid_by_expert, scaled_b)  # recomputed: nothing [N, T, d] was saved
    experts_out = F.silu(z)
    spec = torch.bmm(weights.unsqueeze(1), experts_out.transpose(0, 1)).squeeze(1)  # [t, d]
    grad_weights[:, chunk] = experts_out.mul_(gm).sum(-1)  # on CPU far cheaper than the equivalent bmm
    if u is not None:
        torch.ops.aten.silu_backward.grad_input(gm, u, grad_input=grad_u[chunk])
        spec.add_(F.silu(u))
    torch.mul(grad_out, spec, out=grad_target[chunk])
    # d loss / d z_k = w_k * scale * gm * SiLU'(z_k); SiLU' in one fused kernel.
    grad_z = torch.ops.aten.silu_backward(torch.mul(gm, (weights.t() * scale).unsqueeze(-1), out=experts_out), z)
    grad_b.baddbmm_(mid_by_expert.transpose(1, 2), grad_z)  # [N, r, t] x [N, t, d]
    grad_mid[:, chunk] = torch.bmm(grad_z, spec_b.transpose(1, 2))  # [N, t, r]


class _ModulateFn(torch.autograd.Function):
    """target * (SiLU(u) + sum_k w_k SiLU(scale * mid_k B_k)), rows are tokens.

    hard=True: forward uses the exact one-hot of argmax(weights); backward hands the gradient of
    those one-hot weights straight through to `weights` (the straight-through estimator).
    Both directions work chunk by chunk of token rows and write straight into their outputs: every
    temporary is chunk-sized and stays in cache (a whole-[T, d] temporary inside a training step
    costs fresh pages and a cold cache; docs/performance.md).
    """

    @staticmethod
    def forward(ctx, residual, target, u, mid, spec_b, weights, scale, hard, stats):
        rows, experts, hidden = mid.shape[0], mid.shape[1], spec_b.shape[-1]
        mix_weights = weights
        if hard:
            mix_weights = F.one_hot(weights.argmax(-1), experts).to(weights.dtype)
        stats_sums = None
        if stats is not None:
            stats_sums = [target.new_zeros((), dtype=torch.float32), target.new_zeros((), dtype=torch.float32)]
        if hard:
            out = torch.empty_like(target)
            # Only the selected expert contributes: mask the low-rank activations and run a single
            # [T, N*r] x [N*r, d] matmul instead of materialising every expert's output.
            masked = (mid * mix_weights.unsqueeze(-1)).flatten(1)
            spec = F.silu((masked @ spec_b.flatten(0, 1)).mul_(scale), inplace=True)
            _finish_rows(out, residual, target, u, spec, stats_sums)
        else:
            out = torch.empty_like(target)
            step = _row_chunk(rows, experts, hidden, mid.device)
            scaled_b = spec_b * scale
            mid_by_expert = mid.transpose(0, 1)
            weight_rows = weights.unsqueeze(1)
            for start in range(0, rows, step):
                chunk = slice(start, start + step)
                spec = _soft_mix(mid_by_expert[:, chunk], scaled_b, weight_rows[chunk])
                _finish_rows(
                    out[chunk], residual[chunk], target[chunk], None if u is None else u[chunk], spec, stats_sums
                )
        if stats is not None:
            count = rows * hidden
            stats["shared_magnitude"] = (stats_sums[0] / count) if u is not None else None
            stats["specialized_magnitude"] = stats_sums[1] / count
        ctx.scale = scale
        ctx.has_shared = u is not None
        ctx.save_for_backward(target, u if u is not None else target.new_empty(0), mid, spec_b, mix_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        target, u, mid, spec_b, mix_weights = ctx.saved_tensors
        u = u if ctx.has_shared else None
        rows, experts, rank = mid.shape
        step = _row_chunk(rows, experts, target.shape[1], target.device)
        grads = (
            torch.empty_like(target),
            torch.empty_like(u) if u is not None else None,
            mid.new_empty(experts, rows, rank),
            torch.zeros_like(spec_b),
            mix_weights.new_empty(experts, rows),
        )
        scaled_b = spec_b * ctx.scale
        mid_by_expert = mid.transpose(0, 1)
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            _backward_rows(
                grads,
                chunk,
                grad_out[chunk],
                target[chunk],
                None if u is None else u[chunk],
                mid_by_expert[:, chunk],
                spec_b,
                scaled_b,
                mix_weights[chunk],
                ctx.scale,
            )
        grad_target, grad_u, grad_mid, grad_b, grad_weights = grads
        return grad_out, grad_target, grad_u, grad_mid.transpose(0, 1), grad_b, grad_weights.t(), None, None, None


def modulate(residual, target, u, mid, spec_b, weights, scale: float, hard: bool, stats: dict | None = None):
    """residual + target * A. Token rows: residual, target [T, d], u [T, d] or None, mid [T, N, r],
    spec_b [N, r, d], weights [T, N]. Adding the residual here saves a [T, d] pass and temporary."""
    return _ModulateFn.apply(residual, target, u, mid, spec_b, weights, scale, hard, stats)


@dataclass(frozen=True)
class ProjectionLayout:
    """Where each part of a layer's joint projection of x sits among its columns:
    [u = x W_shared (hidden, if shared) | A_k x for all k (experts * rank) | router logits (experts) | zero padding]."""

    hidden: int
    experts: int
    rank: int
    shared: bool

    @property
    def u_col(self) -> int:
        return 0 if self.shared else -1

    @property
    def low_col(self) -> int:
        return self.hidden if self.shared else 0

    @property
    def logit_col(self) -> int:
        return self.low_col + self.experts * self.rank

    @property
    def width(self) -> int:
        """Columns with padding: a multiple of 8 (d + N_s*r + N_s is odd at the defaults; the CPU
        GEMMs run faster at a multiple of 8, docs/performance.md, and tensor cores want it on GPUs)."""
        return -(-(self.logit_col + self.experts) // 8) * 8

    def logits(self, proj: torch.Tensor) -> torch.Tensor:
        """The router logits [T, N]: a view of proj's columns."""
        start = self.logit_col
        return proj[:, start : start + self.experts]

    def split(self, proj: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(u or None, A_k x for all k [T, N*r], logits [T, N]): views of proj's columns."""
        u = proj[:, : self.hidden] if self.shared else None
        return u, proj[:, self.low_col : self.logit_col], proj[:, self.logit_col : self.logit_col + self.experts]


def _fused_forward(residual, target, proj, spec_n, spec_b, noise, layout, tau, scale, hard, stats):
    """The fused CPU kernel's forward: (out, weights, probs, mid, mix), statistics written to `stats`."""
    residual, target, proj = (fused_cpu.rows_contiguous(t) for t in (residual, target, proj))
    spec_n, spec_b = spec_n.contiguous(), spec_b.contiguous()
    noise = target.new_empty(0) if noise is None else noise.to(target.dtype).contiguous()
    out, weights, probs, mid, mix, shared_sum, spec_sum = fused_cpu.load().layer_forward(
        residual,
        target,
        proj,
        spec_n,
        spec_b,
        noise,
        layout.u_col,
        layout.low_col,
        layout.logit_col,
        float(tau),
        float(scale),
        bool(hard),
        _CPU_CHUNK_ELEMENTS,
    )
    _record_magnitudes(stats, shared_sum, spec_sum, target.numel(), layout.shared)
    return out, weights, probs, mid, mix


def _record_magnitudes(stats: dict | None, shared_sum, spec_sum, count: int, shared: bool) -> None:
    """The fused kernel's sums of |SiLU(u)| and |specialised part| as mean magnitudes in `stats`."""
    if stats is not None:
        stats["shared_magnitude"] = (shared_sum.float() / count) if shared else None
        stats["specialized_magnitude"] = spec_sum.float() / count


class _FusedLayerFn(torch.autograd.Function):
    """modulate_layer on the fused CPU kernel: one call forward, one backward, which writes the
    whole projection's gradient (no [T, C] concatenation of its column blocks afterwards)."""

    @staticmethod
    def forward(ctx, residual, target, proj, spec_n, spec_b, noise, layout, tau, scale, hard, stats):
        ctx.target_is_residual = residual is target  # site="attention": h_att's whole gradient is g * (1 + A)
        residual, target, proj = (fused_cpu.rows_contiguous(t) for t in (residual, target, proj))
        spec_n, spec_b = spec_n.contiguous(), spec_b.contiguous()
        out, weights, probs, mid, mix = _fused_forward(
            residual, target, proj, spec_n, spec_b, noise, layout, tau, scale, hard, stats
        )
        ctx.layout, ctx.tau, ctx.scale = layout, tau, scale
        ctx.save_for_backward(target, proj, spec_n, spec_b, mid, mix, weights, probs)
        return out, weights, probs

    @staticmethod
    def backward(ctx, grad_out, grad_weights, grad_probs):
        target, proj, spec_n, spec_b, mid, mix, weights, probs = ctx.saved_tensors
        layout, empty = ctx.layout, target.new_empty(0)
        grad_target, grad_proj, grad_n, grad_b = fused_cpu.load().layer_backward(
            grad_out,
            empty if grad_weights is None else grad_weights,
            empty if grad_probs is None else grad_probs,
            target,
            proj,
            spec_n,
            spec_b,
            mid,
            mix,
            weights,
            probs,
            layout.u_col,
            layout.low_col,
            layout.logit_col,
            float(ctx.tau),
            float(ctx.scale),
            _CPU_CHUNK_ELEMENTS,
            ctx.target_is_residual,
        )
        grad_residual = None if ctx.target_is_residual else grad_out
        return grad_residual, grad_target, grad_proj, grad_n, grad_b, None, None, None, None, None, None


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_NO_NOISE = torch.empty(0)  # what the kernel takes for "no Gumbel noise"


def infer_layer(
    x,
    residual,
    target,
    weights: tuple,
    spec_n,
    spec_b,
    noise,
    tau: float,
    scale: float,
    hard: bool,
    stats: dict | None = None,
):
    """The projection of x and modulate_layer in one call of the fused CPU kernel, for decoding (a
    few token rows, nothing needing a gradient). x, residual, target [..., d] as the model holds
    them; `weights`: (W_shared or None, its bias or None, every A_k stacked [N*r, d], the router's
    weight, its bias or None). Returns (out shaped like residual, and as token rows the routing
    weights, probs and proj, proj without padding columns); None where this path does not apply (an
    accelerator, bf16, a gradient to compute): then project and call modulate_layer."""
    if _needs_grad(x, residual, target, *weights, spec_n, spec_b):
        return None
    kernel = fused_cpu.kernel_for(x, residual, target, spec_b)
    if kernel is None:  # (a weight of another dtype or device than x: the kernel's own check says so)
        return None
    noise = _NO_NOISE if noise is None else noise.to(target.dtype).contiguous()
    out, routing, probs, proj, shared_sum, spec_sum = kernel.layer_infer(
        x, residual, target, *weights, spec_n, spec_b, noise, float(tau), float(scale), bool(hard), _CPU_CHUNK_ELEMENTS
    )
    _record_magnitudes(stats, shared_sum, spec_sum, target.numel(), weights[0] is not None)
    return out, routing, probs, proj


def modulate_layer(
    residual,
    target,
    proj,
    layout: ProjectionLayout,
    spec_n,
    spec_b,
    noise,
    tau: float,
    scale: float,
    hard: bool,
    stats: dict | None = None,
):
    """Everything of one layer's HyCAM after its joint projection of x. Token rows: residual,
    target [T, d]; proj [T, layout.width]; spec_n [N, r, r]; spec_b [N, r, d]; noise: Gumbel noise
    [T, N] (training) or None. Routing weights = softmax((logits + noise) / tau), mixed as they are
    (soft) or as the one-hot of their argmax with straight-through gradients (hard).

    Returns (residual + target * A [T, d], routing weights [T, N] (fp32 on torch ops), probs =
    softmax(logits) [T, N] for the balance loss); the last two carry gradients to the router."""
    if fused_cpu.usable(residual, target, proj, spec_b):
        if _needs_grad(residual, target, proj, spec_n, spec_b):
            return _FusedLayerFn.apply(residual, target, proj, spec_n, spec_b, noise, layout, tau, scale, hard, stats)
        # Inference: the same kernel without autograd's bookkeeping, which costs more than the
        # kernel itself when a decoding step hands over one token row.
        return _fused_forward(residual, target, proj, spec_n, spec_b, noise, layout, tau, scale, hard, stats)[:3]
    u, low_rank, logits = layout.split(proj)
    # Routing in at least fp32 (bf16 logits would round the softmax), in fp64 for fp64 inputs.
    weights, probs = route(logits.to(torch.promote_types(logits.dtype, torch.float32)), noise, tau)
    mid = torch.einsum("tnr,nrs->tns", low_rank.reshape(-1, layout.experts, layout.rank), spec_n)
    out = modulate(residual, target, u, mid, spec_b, weights.to(target.dtype), scale, hard, stats)
    return out, weights, probs
