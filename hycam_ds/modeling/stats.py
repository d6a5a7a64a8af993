"""routing_stats: what the router did in the last forward, per layer, for logs and dashboards."""

from __future__ import annotations

import torch
from torch import nn

from .injection import hycam_layers
from .losses import masked_mean, resolve_token_mask


def routing_stats(model: nn.Module, token_mask=None, segment_ids=None) -> list[dict[str, object]]:
    """Per layer: `expert_prob` (mean routing weight per expert), `entropy` (mean entropy of the
    router's softmax, nats), `top_fraction` (fraction of tokens whose top expert is k),
    `shared_magnitude` / `specialized_magnitude` (mean |A_shared|, mean |sum_k p_k A_spec_k|).
    Padding tokens are excluded as in balance_loss. Values are floats / lists of floats."""
    model = getattr(model, "module", model)
    out = []
    with torch.no_grad():
        for layer in hycam_layers(model):
            if not layer.last_routing:
                continue
            weights = layer.last_routing["weights"].detach().float()
            probs = layer.last_routing["probs"].detach().float()
            mask = resolve_token_mask(model, weights.shape[:-1], token_mask, segment_ids)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1, keepdim=True)
            top = torch.nn.functional.one_hot(weights.argmax(-1), weights.shape[-1]).float()
            magnitudes = {k: (None if v is None else float(v)) for k, v in layer.last_magnitudes.items()}
            out.append(
                {
                    "layer": layer.layer_index,
                    "expert_prob": masked_mean(weights, mask).tolist(),
                    "entropy": float(masked_mean(entropy, mask)[0]),
                    "top_fraction": masked_mean(top, mask).tolist(),
                    "shared_magnitude": magnitudes.get("shared_magnitude"),
                    "specialized_magnitude": magnitudes.get("specialized_magnitude"),
                }
            )
    return out
