"""The router's auxiliary load-balancing loss, read from the layers after a forward.

    L_bal = sum_layers sum_k mean_t(p_tk) * mean_t(softmax(logits_t)_k)

p are the routing weights actually used (Gumbel-softmax in training), the means run over the
real tokens of the batch: padding (attention_mask == 0, or segment id 0 in packed rows) is
excluded, because padding routing says nothing about balance and would bias it.
"""

from __future__ import annotations

import torch
from torch import nn

from .injection import hycam_layers, hycam_state, routed_layers


def resolve_token_mask(model: nn.Module, tokens_shape: torch.Size, token_mask=None, segment_ids=None):
    """The [B, T] bool mask of real tokens: explicit mask > segment ids > the forward's 2-D
    attention mask (its last T columns, since generate() passes the whole history) > None."""
    if token_mask is None and segment_ids is not None:
        token_mask = segment_ids > 0
    if token_mask is None:
        token_mask = hycam_state(model).token_mask
    if token_mask is None:
        return None
    token_mask = token_mask[..., -tokens_shape[-1] :].bool()
    if token_mask.shape != tokens_shape:
        raise ValueError(
            f"token mask of shape {tuple(token_mask.shape)} does not match the tokens {tuple(tokens_shape)}"
        )
    return token_mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all leading (token) dims of [..., N]; only rows where mask is True."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is None:
        return flat.mean(0)
    keep = mask.reshape(-1).to(flat.dtype).unsqueeze(-1)
    return (flat * keep).sum(0) / keep.sum().clamp_min(1)


def balance_loss(model: nn.Module, token_mask=None, segment_ids=None) -> torch.Tensor:
    """Auxiliary loss of the last forward, summed over layers (a scalar tensor with gradient)."""
    all_layers = hycam_layers(getattr(model, "module", model))
    routed = routed_layers(getattr(model, "module", model))
    if all_layers and not routed:
        return torch.zeros((), device=all_layers[0].shared_weight.device)  # shared CAM alone: nothing to balance
    layers = [layer for layer in routed if layer.last_routing]
    if not layers:
        raise RuntimeError("balance_loss: no HyCAM forward has run yet")
    total = None
    for layer in layers:
        weights = layer.last_routing["weights"].float()
        if (
            torch.is_grad_enabled()
            and layer.training
            and layer.router_weight.requires_grad
            and not weights.requires_grad
        ):
            raise RuntimeError(
                "balance_loss: the routing of the last forward carries no gradient. Reentrant gradient "
                "checkpointing (use_reentrant=True) runs the forward without autograd, so the router "
                "could not learn from this loss: enable checkpointing with use_reentrant=False."
            )
        probs = layer.last_routing["probs"]  # softmax(logits), computed with the routing (fused on CPU)
        mask = resolve_token_mask(model, weights.shape[:-1], token_mask, segment_ids)
        term = (masked_mean(weights, mask) * masked_mean(probs, mask)).sum()
        total = term if total is None else total + term
    return total
