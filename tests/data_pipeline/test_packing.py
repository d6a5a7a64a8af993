"""Packing: best-fit-decreasing, the block-causal mask, and document isolation in a real model."""

from __future__ import annotations

import math
import random

import pytest
import torch

from data_pipeline import ShardReader, block_causal_mask, load_manifest
from data_pipeline.packing import best_fit_decreasing


def test_best_fit_decreasing_places_everything_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(3000)] + [rng.randint(1, 60) for _ in range(3000)]
    rows = best_fit_decreasing(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 512) * 1.02
    assert rows == best_fit_decreasing(lengths, 512)  # deterministic
    with pytest.raises(ValueError):
        best_fit_decreasing([513], 512)


def test_best_fit_picks_the_tightest_row():
    # rows after the first three items have 10 and 30 free; an item of 10 must close the first
    rows = best_fit_decreasing([90, 70, 10], 100)
    assert rows == [[0, 2], [1]]


def test_block_causal_mask():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0, 0]])
    m = block_causal_mask(seg)[0, 0]
    assert m.shape == (7, 7) and m.dtype == torch.bool
    assert m[1, 0] and not m[0, 1]  # causal within a document
    assert not m[2, 1] and m[4, 2]  # no attention across documents
    assert m[5, 5] and not m[5, 4] and not m[6, 5]  # padding attends only to itself
    assert m.any(dim=-1).all()  # no fully masked row (SDPA would give NaN)


def test_packed_row_logits_equal_each_document_alone(embedded_build):
    """Document isolation: a packed row through a real Llama (sdpa) with the block mask and
    per-document positions gives, for every document, the logits of that document run alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    manifest = load_manifest(embedded_build)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=manifest["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    reader = ShardReader(embedded_build, split="eval", micro_batch_size=2, drop_last=False)
    batch = next(iter(reader))
    assert (batch["segment_ids"].max(dim=1).values >= 2).all()  # rows really hold several documents
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=block_causal_mask(batch["segment_ids"]),
        ).logits
        checked = 0
        for b in range(batch["input_ids"].shape[0]):
            for doc in range(1, int(batch["segment_ids"][b].max()) + 1):
                where = (batch["segment_ids"][b] == doc).nonzero().squeeze(1)
                alone = model(input_ids=batch["input_ids"][b, where][None]).logits[0]
                torch.testing.assert_close(packed[b, where], alone, atol=1e-5, rtol=1e-4)
                checked += 1
        assert checked >= 4
        # and the mask matters: without it the second document sees the first
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        where = (batch["segment_ids"][0] == 2).nonzero().squeeze(1)
        assert (leaky[0, where] - packed[0, where]).abs().max() > 1e-3
