"""The attention mask that keeps packed documents apart."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L], True = may attend: causal and within the same document.

    Padding (segment 0) attends only to itself, so no query row is fully masked (SDPA would
    return NaN for it). Pass it as `attention_mask` with `attn_implementation="sdpa"` together
    with the per-document `position_ids`.
    """
    import torch  # here, not at the top: the data build and its CLI never need torch

    seg = segment_ids
    length = seg.shape[-1]
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=seg.device)
    keep = same & causal & ((seg[:, :, None] != 0) | eye)
    return keep[:, None]
