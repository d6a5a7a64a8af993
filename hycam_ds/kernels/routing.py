"""Routing weights from router logits: the torch-ops twin of the fused kernel's route_rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(logits: torch.Tensor, noise: torch.Tensor | None, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, N] (fp32) -> (weights = softmax((logits + noise) / tau), probs = softmax(logits)).

    probs are the noise-free router distribution the balance loss and the statistics read. The
    fused CPU kernel computes the same two per token row (csrc/modulate_cpu.cpp, route_rows)."""
    scores = logits if noise is None else logits + noise
    return F.softmax(scores / tau, dim=-1), F.softmax(logits, dim=-1)
