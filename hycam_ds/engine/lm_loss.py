"""LM losses of packed rows: the one place where labels are shifted, documents kept apart, losses
summed per task and turned into perplexity."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from ..kernels.cross_entropy import CHUNK_ELEMENTS, chunk_tokens, linear_cross_entropy, rows_cross_entropy
from ..modeling.injection import FAMILY_LAYOUTS, routed_layers
from .distributed import all_reduce_max, all_reduce_sum
from .routing_tally import RoutingTally


def packed_token_losses(
    model, batch: dict[str, torch.Tensor], device, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [B, L-1] in fp32 with 0 where there is no loss, bool mask of loss tokens [B, L-1]).

    Rows come from data_pipeline's reader: a block-diagonal causal mask and per-document
    positions keep packed documents from seeing each other (sdpa / eager attention).
    The loss of the response tokens alone is made chunk by chunk of tokens (hycam_ds.kernels.
    cross_entropy): with a plain output head (loss_head) the logits never exist, otherwise the
    model's logits are upcast one chunk at a time. Nothing of size tokens x vocabulary is fp32."""
    from data_pipeline import block_causal_mask

    labels = batch["labels"][:, 1:]
    mask = labels != -100
    # Which tokens carry a loss is read from the batch on the host, before it moves: indexing
    # with a mask on an accelerator would wait for it.
    selected = mask.flatten().nonzero().squeeze(1)
    rows, targets = selected + selected // labels.shape[1], labels.flatten()[selected]
    batch = {k: v.to(device) for k, v in batch.items()}
    selected, rows, targets = selected.to(device), rows.to(device), targets.to(device)
    inputs = dict(
        input_ids=batch["input_ids"],
        attention_mask=block_causal_mask(batch["segment_ids"]),
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    head = loss_head(model)
    if head is None:
        logits = model(**inputs).logits
        chunk = chunk_tokens(logits.shape[-1], chunk_elements)
        token_losses = rows_cross_entropy(logits.reshape(-1, logits.shape[-1]), rows, targets, chunk)
    else:
        with _head_makes_losses(head, rows, targets, chunk_elements) as made:
            output = model(**inputs)
        token_losses = output.logits  # made[0] as ZeRO-3's hooks hand it on (they gather the head for backward)
        if len(made) != 1 or token_losses.shape != made[0].shape or token_losses.data_ptr() != made[0].data_ptr():
            raise RuntimeError(
                f"{type(getattr(model, 'module', model)).__name__} changes what its output head returns (a "
                "logit cap or scale?): its loss cannot be made inside the head; loss_head must leave this family out"
            )
    losses = torch.zeros(mask.numel(), dtype=torch.float32, device=token_losses.device)
    return losses.index_copy(0, selected, token_losses).view(mask.shape), mask.to(device)


def loss_head(model) -> torch.nn.Linear | None:
    """The output head of `model` (a DeepSpeed engine, a PEFT model or a transformers causal LM)
    when the loss may be made from its input: a family of FAMILY_LAYOUTS (their logits are the
    head's output, unchanged) and a plain bias-free nn.Linear (not a LoRA-wrapped head). Else None."""
    model = getattr(model, "module", model)
    if getattr(getattr(model, "config", None), "model_type", None) not in FAMILY_LAYOUTS:
        return None
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or "forward" in vars(head):
        return None
    return head


@contextlib.contextmanager
def _head_makes_losses(head: torch.nn.Linear, rows: torch.Tensor, targets: torch.Tensor, chunk_elements: int):
    """For one forward, `head` returns the losses of the tokens at `rows` of its input [B, L, H]
    instead of logits. It is still the head module that runs, so ZeRO-3 gathers its weight around
    this call and before its backward, as for the plain projection."""
    made: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        chosen = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        made.append(
            linear_cross_entropy(chosen, head.weight, targets, chunk_tokens(head.weight.shape[0], chunk_elements))
        )
        return made[-1]

    head.forward = forward
    try:
        yield made
    finally:
        del head.forward


def add_task_sums(sums: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> None:
    """Adds each task's loss sum and loss-token count of one batch to `sums` [n_tasks, 2] (float64).
    `losses` and `mask` as packed_token_losses returns them; `task_ids` the batch's [B, L]. With
    `sums` on the losses' device nothing here waits for the device (no mask indexing, no bincount)."""
    tasks = torch.where(mask, task_ids[:, 1:].to(mask.device), 0).flatten()
    values = torch.stack([torch.where(mask, losses.detach(), 0.0).double(), mask.double()], dim=-1)
    sums.index_add_(0, tasks.to(sums.device), values.flatten(0, 1).to(sums.device))


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
    with_routing: bool = True,
) -> tuple[torch.Tensor, RoutingTally | None]:
    """Sum of response-token losses and token counts per task ([n_tasks, 2], reduced over ranks),
    and for HyCAM how each routed layer treated each task's tokens (reduced). Every rank runs the
    same number of forwards (ZeRO-3 gathers parameters collectively): one with fewer batches runs
    padding. with_routing=False: losses only (e.g. with HyCAM switched off)."""
    rounds = all_reduce_max(len(batches))
    layers = routed_layers(module) if with_routing else []
    n_experts = layers[0].config.num_specialized if layers else 0  # not the weight's shape: ZeRO-3 partitions it
    sums = torch.zeros(n_tasks, 2, dtype=torch.float64)
    tally = RoutingTally(len(layers), n_tasks, n_experts)
    with torch.no_grad():
        for i in progress(range(rounds), desc="perplexity", leave=False):
            real = i < len(batches)
            batch = batches[i] if real else padding_batch(batch_size, seq_len)
            losses, mask = packed_token_losses(forward, batch, device)
            if not real:
                continue
            add_task_sums(sums, losses, mask, batch["task_ids"])
            task_ids = batch["task_ids"].reshape(-1)
            for index, layer in enumerate(layers):
                tally.add(index, layer.last_routing["weights"].reshape(-1, n_experts), task_ids)
    sums = all_reduce_sum(sums)
    return sums, tally.reduce() if layers else None
