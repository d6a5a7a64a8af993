"""Per-token LM losses of packed rows: the one place where labels are shifted and documents kept apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def packed_token_losses(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B, L-1] with 0 where there is no loss, bool mask of loss tokens [B, L-1]).

    Rows come from data_pipeline's reader: a block-diagonal causal mask and per-document
    positions keep packed documents from seeing each other (sdpa / eager attention)."""
    from data_pipeline import block_causal_mask

    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=block_causal_mask(batch["segment_ids"]),
                   position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    mask = labels != -100
    return losses * mask, mask
