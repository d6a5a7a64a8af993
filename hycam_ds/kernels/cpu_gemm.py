"""The layer's joint projection x W^T + b on CPU through oneDNN instead of torch's default BLAS.

Why: torch's CPU builds run fp32 matmuls on MKL, which on AMD CPUs takes its AVX2 code path and
so leaves half of a 512-bit FMA unit idle; oneDNN (shipped inside torch) dispatches on the CPU's
features rather than its vendor and runs the projection's three GEMMs about twice as fast there
(docs/performance.md). On Intel CPUs both libraries reach AVX-512 peak, so nothing is lost there.

A few rows (decoding: one token per sequence) take F.linear too: the product is then a
matrix-vector one, bound by reading the weight, where vector width gains nothing and oneDNN's
per-call preparation of the weight costs more than the product (docs/performance.md).

Full fp32 arithmetic (oneDNN's default strict math mode): the results match torch's matmul to
rounding (tested), deterministically for a given thread count. Accelerators, other dtypes,
torch builds without oneDNN or HYCAM_ONEDNN_LINEAR=0 take F.linear; if the oneDNN call itself
fails, one warning names the cause and F.linear takes over for good.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_broken = False

FEW_ROWS = 16
"""Inputs of at most this many rows take F.linear (module docstring)."""


def enabled() -> bool:
    return os.environ.get("HYCAM_ONEDNN_LINEAR", "1") != "0"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, k] times weight [n, k] transposed (+ bias): strided views are fine, no copies."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _ProjectionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)  # grad W
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_linear(grad.t(), x.t(), None)  # grad^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not _broken
        and enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] > FEW_ROWS
        and torch.backends.mkldnn.is_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, k]: through oneDNN on CPU in fp32, else F.linear itself."""
    global _broken
    if _applies(x, weight):
        try:
            return _ProjectionFn.apply(x, weight, bias)
        except (RuntimeError, AttributeError) as exc:  # an op missing from this torch build, an unsupported layout
            _broken = True
            logger.warning(
                "oneDNN linear unavailable (%s: %s); HyCAM's projection uses F.linear",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
    return F.linear(x, weight, bias)
