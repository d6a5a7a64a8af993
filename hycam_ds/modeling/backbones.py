"""Small backbones built in code (no download): the embedded default and the tests' tiny models.

Each entry is the config of a real family (llama, mistral, qwen2, qwen3) at a size this machine
trains in minutes; `build_backbone(name, vocab_size)` returns a randomly initialised causal LM.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_COMMON = dict(attn_implementation="sdpa", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=2048)

SMALL_BACKBONES: dict[str, dict[str, Any]] = {
    # For unit tests: a forward takes milliseconds.
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny-mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny-qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # The embedded default's backbone: ~3.5M parameters with a 4k vocabulary; trains at a few
    # thousand tokens/s on 2 CPU cores.
    "small-llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    # The training-step benchmark's backbone (benchmarks/bench_hycam_step.py): hidden 512, 8 layers.
    "bench-llama": dict(
        model_type="llama",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
}


def backbone_config(name: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    if name not in SMALL_BACKBONES:
        raise ValueError(f"unknown small backbone {name!r}; known: {sorted(SMALL_BACKBONES)}")
    values = {**_COMMON, **SMALL_BACKBONES[name], "vocab_size": vocab_size, **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def build_backbone(
    name: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised small causal LM, deterministic for a given seed."""
    config = backbone_config(name, vocab_size, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
