"""Per-token cross-entropy, chunk by chunk of tokens: the values and gradients of
`F.cross_entropy(logits.float(), targets, reduction="none")` without a [tokens, vocabulary] tensor
in fp32, whatever the number of tokens.

- `linear_cross_entropy(hidden, weight, targets)`: the logits `hidden @ weight.T` of an output
  head are made one chunk at a time and never exist whole;
- `rows_cross_entropy(logits, rows, targets)`: some rows of logits a model already made, each chunk
  upcast to fp32 on its own.

Each chunk computes its logits in the inputs' dtype and upcasts them, as the plain formula does;
its gradient is cast back to that dtype before it meets the weight, as autograd does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (tokens x vocabulary): 64 MB in fp32, of which about three buffers live at once.
Large enough that each chunk's head product is an efficient matrix product on an accelerator."""


def chunk_tokens(vocab_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk for this vocabulary."""
    return max(1, elements // max(vocab_size, 1))


def _nll(logits32: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """(per-token NLL, d NLL / d logits or None) of one chunk of fp32 logits."""
    log_probs = torch.log_softmax(logits32, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    if not with_grad:
        return nll, None
    grad = log_probs.exp_()  # softmax, in the log-probabilities' memory
    grad.scatter_add_(1, targets[:, None], torch.full_like(nll[:, None], -1.0))
    return nll, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        # A frozen head (adapters, LoRA): d loss / d hidden is made here while each chunk's logits
        # exist, and backward only scales it by the incoming gradient, so the head's product is not
        # recomputed. A trained head needs that gradient for d loss / d weight: backward recomputes.
        ctx.early = needs_hidden and not needs_weight
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.early else None
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            losses[part], grad = _nll(F.linear(hidden[part], weight).float(), targets[part], ctx.early)
            if ctx.early:
                grad_hidden[part] = grad.to(hidden.dtype) @ weight
        ctx.chunk = chunk
        if ctx.early:
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.early:
            (grad_hidden,) = ctx.saved_tensors
            return (grad_hidden * grad_losses[:, None]).to(grad_hidden.dtype), None, None, None
        hidden, weight, targets = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # Summed over chunks in fp32: a bf16 running sum would round once per chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            _, grad = _nll(F.linear(hidden[part], weight).float(), targets[part], True)
            grad = (grad * grad_losses[part, None]).to(hidden.dtype)
            if needs_hidden:
                grad_hidden[part] = grad @ weight
            if needs_weight and grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.t(), hidden[part])  # in place: no [V, H] temporary
            elif needs_weight:
                grad_weight += grad.t() @ hidden[part]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-token NLL [N] (fp32) of the head `weight` [V, H] on `hidden` [N, H], for `targets` [N]:
    `F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")`."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        losses[part] = _nll(F.linear(hidden[part], weight).float(), targets[part], False)[0]
    return losses


class _RowsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, targets, chunk):
        losses = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, rows.shape[0], chunk):
            part = slice(start, start + chunk)
            losses[part] = _nll(logits.index_select(0, rows[part]).float(), targets[part], False)[0]
        ctx.chunk = chunk
        ctx.save_for_backward(logits, rows, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, rows, targets = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            _, grad = _nll(logits.index_select(0, rows[part]).float(), targets[part], True)
            grad_logits.index_copy_(0, rows[part], (grad * grad_losses[part, None]).to(logits.dtype))
        return grad_logits, None, None, None


def rows_cross_entropy(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Per-token NLL [N] (fp32) of the rows `rows` [N] (distinct) of `logits` [M, V], for `targets`
    [N]: `F.cross_entropy(logits[rows].float(), targets, reduction="none")`."""
    chunk = chunk or chunk_tokens(logits.shape[1])
    if torch.is_grad_enabled() and logits.requires_grad:
        return _RowsCrossEntropy.apply(logits, rows, targets, chunk)
    losses = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        losses[part] = _nll(logits.index_select(0, rows[part]).float(), targets[part], False)[0]
    return losses
