"""The paper's equation written plainly: the executable specification of HyCAM.

For one decoder layer, with x [..., d] the attention module's input (the normalised hidden state),
h_att [..., d] its output and h_in [..., d] the layer's input:

    logits = x W_router^T (+ b_router)                                     [..., N]
    p      = softmax((logits + g) / tau)     g: Gumbel noise (training), else 0
    mix    = p (soft routing), or one_hot(argmax p) with straight-through gradients (hard routing)
    A      = SiLU(x W_shared^T (+ b_shared)) + sum_k mix_k SiLU(scale * ((x A_k^T) N_k) B_k)
    h_out  = h_att + h_att * A                       site="attention" (the paper)
    h_out  = h_att + (h_in + h_att) * A              site="residual" (the authors' code)
    h_out  = h_mlp + h_mlp * A                       site="ffn" (the MLP's output; x its normalised input)

with the parameters of HyCAMModulation: W_shared = shared_weight [d, d] (applied as nn.Linear,
x W^T), A_k = rows k*r..(k+1)*r of spec_a [N*r, d] (also x A_k^T), N_k = spec_n[k] [r, r] and
B_k = spec_b[k] [r, d] (applied as x N_k and x B_k), W_router = router_weight [N, d];
scale = config.scaling = alpha / rank. The shared term is absent when config.shared is False,
the specialised sum and the router when config.num_specialized is 0.

Plain torch on purpose: no chunking, no custom autograd, no fused projection, a loop over the
experts. Every fast path (hycam_ds.kernels: the torch-ops autograd function, the fused CPU kernel,
the oneDNN projection) is tested against these functions, values and gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .layer import HyCAMModulation


def reference_routing(logits: torch.Tensor, noise: torch.Tensor | None, tau: float, hard: bool = False):
    """Router logits [..., N] -> (mix, weights, probs):

        weights = softmax((logits + noise) / tau),  probs = softmax(logits),
        mix     = weights (soft), or one_hot(argmax weights) + (weights - weights.detach()) (hard):
                  exactly the one-hot in value, the gradient of weights in backward (straight-through).

    mix multiplies the experts' outputs; weights and probs are what the balance loss reads."""
    scores = logits if noise is None else logits + noise.to(logits.dtype)
    weights, probs = F.softmax(scores / tau, dim=-1), F.softmax(logits, dim=-1)
    mix = weights
    if hard:
        one_hot = F.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
        mix = one_hot + (weights - weights.detach())
    return mix, weights, probs


def reference_equation(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    h_att: torch.Tensor,
    h_in: torch.Tensor | None = None,
    *,
    tau: float,
    scale: float,
    site: str = "attention",
    noise: torch.Tensor | None = None,
    hard: bool = False,
):
    """h_out = h_att + target * A for one layer (equation in the module docstring), from its parameters
    by name (those of HyCAMModulation.named_parameters(): shared_weight, shared_bias, spec_a, spec_n,
    spec_b, router_weight, router_bias; absent names are absent terms). target = h_att for
    site="attention" (and h_mlp for site="ffn", which passes the MLP's output as h_att), h_in + h_att
    for site="residual". noise: Gumbel noise [..., N] or None.

    Returns (h_out, weights, probs); weights and probs are None without experts."""
    shared_weight, spec_a = params.get("shared_weight"), params.get("spec_a")
    a = torch.zeros_like(h_att)
    if shared_weight is not None:
        a = a + F.silu(F.linear(x, shared_weight, params.get("shared_bias")))
    weights = probs = None
    if spec_a is not None and spec_a.shape[0] > 0:
        spec_n, spec_b = params["spec_n"], params["spec_b"]
        logits = F.linear(x, params["router_weight"], params.get("router_bias"))
        mix, weights, probs = reference_routing(logits, noise, tau, hard)
        rank = spec_n.shape[1]
        for k in range(spec_n.shape[0]):
            a_k = spec_a[k * rank : (k + 1) * rank]  # [r, d], applied as x A_k^T
            z_k = ((x @ a_k.t()) @ spec_n[k]) @ spec_b[k]
            a = a + mix[..., k : k + 1] * F.silu(scale * z_k)
    if site in ("attention", "ffn"):  # the wrapped module's own output
        target = h_att
    elif site == "residual":
        if h_in is None:
            raise ValueError("reference_equation: site='residual' needs h_in, the layer's input")
        target = h_in + h_att
    else:
        raise ValueError(f"reference_equation: unknown site {site!r}")
    return h_att + target * a, weights, probs


def reference_modulation(
    layer: "HyCAMModulation",
    x: torch.Tensor,
    h_att: torch.Tensor,
    h_in: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    hard: bool = False,
):
    """What HyCAMModulation.forward(x, h_att, h_in) computes, written plainly: reference_equation
    on the layer's parameters with its config's tau, scaling (alpha / rank) and site.

    noise and hard are the routing mode the layer chose (hycam_ds.modeling.router.routing_mode:
    Gumbel noise [..., N] drawn in training, none in eval by default). Returns (h_out, weights,
    probs) shaped like the layer's output and its last_routing["weights"], ["probs"]."""
    cfg = layer.config
    return reference_equation(
        dict(layer.named_parameters()),
        x,
        h_att,
        h_in,
        tau=cfg.tau,
        scale=cfg.scaling,
        site=cfg.site,
        noise=noise,
        hard=hard,
    )


def reference_balance_loss(weights: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None):
    """One layer's auxiliary load-balancing term (a model's balance loss sums it over layers):

        L = sum_k mean_t(weights_tk) * mean_t(probs_tk)

    weights, probs [..., N]: the routing weights used and softmax(logits); the means run over the
    tokens where mask [...] is True (all tokens without a mask)."""
    weights, probs = weights.reshape(-1, weights.shape[-1]), probs.reshape(-1, probs.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        weights, probs = weights[keep], probs[keep]
    return (weights.mean(0) * probs.mean(0)).sum()


def reference_modulate(residual, target, u, mid, spec_b, weights, scale: float, hard: bool):
    """What hycam_ds.kernels.modulation.modulate computes, with plain autograd. Token rows:

        residual + target * (SiLU(u) + sum_k mix_k SiLU(scale * mid_k B_k))

    residual, target [T, d]; u = x W_shared^T [T, d] or None; mid_k = (x A_k^T) N_k, mid [T, N, r];
    spec_b [N, r, d]; weights [T, N]; mix = weights, or their one-hot argmax, straight-through (hard)."""
    if hard:
        one_hot = F.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
        weights = one_hot + (weights - weights.detach())
    experts = F.silu(scale * torch.einsum("tnr,nrd->tnd", mid, spec_b))
    a = (weights.unsqueeze(-1) * experts).sum(1)
    if u is not None:
        a = a + F.silu(u)
    return residual + target * a


def reference_modulate_layer(
    residual, target, proj, layout, spec_n, spec_b, noise, tau: float, scale: float, hard: bool
):
    """What hycam_ds.kernels.modulation.modulate_layer computes, written plainly: routing, the N_k
    products and reference_modulate, from the layer's joint projection proj [T, C] whose columns
    are [u = x W_shared^T (layout.hidden, if layout.shared) | A_k x for all k (N * r) | logits (N) | padding].

    Returns (residual + target * A, weights, probs)."""
    low_col = layout.hidden if layout.shared else 0
    logit_col = low_col + layout.experts * layout.rank
    u = proj[:, : layout.hidden] if layout.shared else None
    low_rank, logits = proj[:, low_col:logit_col], proj[:, logit_col : logit_col + layout.experts]
    _, weights, probs = reference_routing(logits, noise, tau)
    mid = torch.einsum("tnr,nrs->tns", low_rank.reshape(-1, layout.experts, layout.rank), spec_n)
    return reference_modulate(residual, target, u, mid, spec_b, weights, scale, hard), weights, probs
