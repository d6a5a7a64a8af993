"""LM losses of packed rows: the one place where labels are shifted, documents kept apart, losses
summed per task and turned into perplexity."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling.injection import routed_layers
from .distributed import all_reduce_max, all_reduce_sum


def packed_token_losses(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B, L-1] with 0 where there is no loss, bool mask of loss tokens [B, L-1]).

    Rows come from data_pipeline's reader: a block-diagonal causal mask and per-document
    positions keep packed documents from seeing each other (sdpa / eager attention)."""
    from data_pipeline import block_causal_mask

    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=block_causal_mask(batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp_min(0), reduction="none")
    mask = labels != -100
    return losses * mask, mask


def add_task_sums(sums: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> None:
    """Adds each task's loss sum and loss-token count of one batch to `sums` [n_tasks, 2] (float64).
    `losses` and `mask` as packed_token_losses returns them; `task_ids` the batch's [B, L]."""
    tasks = task_ids[:, 1:].to(losses.device)[mask]
    n_tasks = sums.shape[0]
    sums[:, 0] += torch.bincount(tasks, weights=losses.detach()[mask].double(), minlength=n_tasks).cpu()
    sums[:, 1] += torch.bincount(tasks, minlength=n_tasks).double().cpu()


def perplexity(loss_sum: float, tokens: float) -> float:
    """exp(mean token NLL); inf when there are no tokens."""
    if tokens <= 0:
        return float("inf")
    return math.exp(min(loss_sum / tokens, 700.0))


def padding_batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Padding only (no loss tokens): what a rank with fewer batches runs to keep step with the others."""
    zeros = torch.zeros((batch_size, seq_len), dtype=torch.int64)
    return {
        "input_ids": zeros,
        "labels": torch.full_like(zeros, -100),
        "position_ids": zeros,
        "segment_ids": zeros,
        "task_ids": torch.full_like(zeros, -1),
    }


def task_losses(
    forward,
    module,
    batches: list[dict],
    n_tasks: int,
    batch_size: int,
    seq_len: int,
    device,
    progress: Callable = lambda it, **kw: it,
) -> tuple[torch.Tensor, dict[int, np.ndarray] | None]:
    """Sum of response-token losses and token counts per task ([n_tasks, 2], reduced over ranks),
    and for HyCAM the task x expert mean routing weight per layer. Every rank runs the same number
    of forwards (ZeRO-3 gathers parameters collectively): one with fewer batches runs padding."""
    rounds = all_reduce_max(len(batches))
    layers = routed_layers(module)
    n_experts = layers[0].config.num_specialized if layers else 0  # not the weight's shape: ZeRO-3 partitions it
    sums = torch.zeros(n_tasks, 2, dtype=torch.float64)
    routing = torch.zeros(len(layers), n_tasks, n_experts + 1, dtype=torch.float64)
    with torch.no_grad():
        for i in progress(range(rounds), desc="perplexity", leave=False):
            real = i < len(batches)
            batch = batches[i] if real else padding_batch(batch_size, seq_len)
            losses, mask = packed_token_losses(forward, batch, device)
            if not real:
                continue
            add_task_sums(sums, losses, mask, batch["task_ids"])
            task_ids = batch["task_ids"].reshape(-1)
            keep = task_ids >= 0
            for index, layer in enumerate(layers):
                weights = layer.last_routing["weights"].detach().reshape(-1, n_experts).double().cpu()
                routing[index, :, :-1].index_add_(0, task_ids[keep], weights[keep])
                routing[index, :, -1] += torch.bincount(task_ids[keep], minlength=n_tasks).double()
    sums = all_reduce_sum(sums)
    if not layers:
        return sums, None
    routing = all_reduce_sum(routing)
    return sums, {
        index: (routing[index, :, :-1] / routing[index, :, -1:].clamp_min(1)).numpy() for index in range(len(layers))
    }
