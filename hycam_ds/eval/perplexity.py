"""Perplexity beyond the training loss: which packed rows of a split are measured, and general
text (knowledge retention). Every rank runs the same number of forwards (ZeRO-3 gathers
parameters collectively) and the sums are reduced; with one process it is plain PyTorch."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..engine.distributed import all_reduce_max, all_reduce_sum, rank_and_world
from ..engine.lm_loss import packed_token_losses, perplexity
from .settings import EvalSettings


def ppl_batches(batches: list, settings: EvalSettings, world: int) -> list:
    """The batches a rank evaluates for perplexity under `settings.max_ppl_rows`."""
    if settings.max_ppl_rows is None:
        return batches
    rows_per_rank = -(-settings.max_ppl_rows // world)
    return batches[: -(-rows_per_rank // settings.batch_size)]


def general_text_blocks(tokenizer, text_dir: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the sorted .txt files, as [blocks, seq_len] rows."""
    ids: list[int] = []
    for path in sorted(Path(text_dir).rglob("*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                ids.extend(tokenizer.encode(line.strip(), add_special_tokens=False) + [tokenizer.eos_token_id])
            if len(ids) >= max_tokens:
                break
        if len(ids) >= max_tokens:
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise ValueError(f"{text_dir}: fewer than {seq_len} tokens of text")
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.int64).view(blocks, seq_len)


def general_perplexity(model, blocks: torch.Tensor, batch_size: int, device) -> float:
    """Perplexity of contiguous text blocks, split across ranks, reduced. Each block is one document
    whose every next token is scored, through the training loss's path (no fp32 logits)."""
    rank, world = rank_and_world()
    mine = blocks[rank::world]
    calls = all_reduce_max(math.ceil(len(mine) / batch_size))
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for call in range(calls):
            chunk = mine[call * batch_size : (call + 1) * batch_size]
            real = len(chunk) > 0
            losses, mask = packed_token_losses(model, text_batch(chunk if real else blocks[:1]), device)
            if real:
                sums += torch.tensor([float(losses.double().sum()), float(mask.sum())], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    return perplexity(float(sums[0]), float(sums[1]))


def text_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Blocks of text [B, L] as packed rows of one document each, every token a target."""
    positions = torch.arange(blocks.shape[1]).expand_as(blocks)
    return {"input_ids": blocks, "labels": blocks, "position_ids": positions, "segment_ids": torch.ones_like(blocks)}
