"""HyCAM modules of one decoder layer, and the wrapper that puts them on its attention module
(or, site="ffn", on its MLP).

    A      = SiLU(x W_shared) + sum_k p_k SiLU(scale * B_k(N_k(A_k(x))))
    h_out  = h_att + h_att * A                  (site="attention", the paper)
    h_out  = h_att + (h_in + h_att) * A         (site="residual", the authors' code: after the
                                                 layer adds h_in, that is (h_in + h_att)(1 + A))
    h_out  = h_mlp + h_mlp * A                  (site="ffn": the MLP's output instead of h_att)
x is the wrapped module's input (the normalised hidden state), p the router's weights.
reference.py states the same plainly; the modules here compute it through hycam_ds.kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_gemm
from ..kernels.modulation import ProjectionLayout, infer_layer, modulate_layer
from .config import HyCAMConfig
from .router import NoiseState, gumbel_noise, routing_mode


@dataclass
class HyCAMState:
    """What all HyCAM layers of one model share: the noise source, the token mask of the current
    forward (for the balance loss and statistics), and whether training forwards record modulation
    magnitudes (telemetry; an eval-mode forward never does: at a decoding step their reductions
    cost a tenth of HyCAM's time)."""

    config: HyCAMConfig
    noise: NoiseState = field(default_factory=NoiseState)
    token_mask: torch.Tensor | None = None
    record_stats: bool = True
    disabled: bool = False


class HyCAMModulation(nn.Module):
    """Shared CAM + N_s low-rank specialised CAMs (stacked, computed batched) + router.

    All parameters belong directly to this module (no submodules): ZeRO-3 gathers a module's own
    parameters when its forward runs, and the forward reads them all at once. The three
    projections of x (W_shared, every A_k, the router) are one matmul over concatenated weights:
    small-output GEMMs ([d, N_s*r], [d, N_s]) run far below peak on their own.
    """

    def __init__(self, hidden_size: int, config: HyCAMConfig, state: HyCAMState, layer_index: int):
        super().__init__()
        n, r, d = config.num_specialized, config.rank, hidden_size
        self.config = config
        self.layer_index = layer_index
        self.shared_weight = nn.Parameter(torch.empty(d, d)) if config.shared else None
        self.shared_bias = nn.Parameter(torch.empty(d)) if config.shared and config.bias else None
        experts = n > 0
        self.spec_a = nn.Parameter(torch.empty(n * r, d)) if experts else None  # rows [k*r, (k+1)*r): A_k
        self.spec_n = nn.Parameter(torch.empty(n, r, r)) if experts else None
        self.spec_b = nn.Parameter(torch.empty(n, r, d)) if experts else None
        self.router_weight = nn.Parameter(torch.empty(n, d)) if experts else None
        self.router_bias = nn.Parameter(torch.empty(n)) if experts and config.bias else None
        object.__setattr__(self, "_state", state)  # plain attribute: not a submodule, not saved
        self.layout = ProjectionLayout(d, n, r, config.shared) if experts else None
        self._last_routing: tuple | None = None  # (weights, probs, proj, token shape): last_routing
        self.last_magnitudes: dict[str, torch.Tensor | None] = {}
        self.reset_parameters()

    @property
    def last_routing(self) -> dict[str, torch.Tensor]:
        """The last forward's routing, shaped like its tokens [..., N_s]: "weights" (what mixed the
        experts), "probs" (softmax of the logits, for the balance loss), "logits"; {} before any
        forward, and without experts."""
        if self._last_routing is None:
            return {}
        weights, probs, proj, routed = self._last_routing
        return {
            "weights": weights.view(routed),
            "probs": probs.view(routed),
            "logits": self.layout.logits(proj).view(routed),
        }

    def _shared_only(self, x: torch.Tensor, h_att: torch.Tensor, target: torch.Tensor, record: bool) -> torch.Tensor:
        """The shared CAM alone (num_specialized=0): no experts to route."""
        d = h_att.shape[-1]
        shared = F.silu(cpu_gemm.linear(x.reshape(-1, d), self.shared_weight, self.shared_bias))
        self.last_magnitudes = (
            {"shared_magnitude": shared.detach().abs().mean().float(), "specialized_magnitude": None} if record else {}
        )
        return torch.addcmul(h_att.reshape(-1, d), target.reshape(-1, d), shared).view(h_att.shape)

    def router_parameters(self) -> list[nn.Parameter]:
        """The router's weight and bias (empty without experts)."""
        return [p for p in (self.router_weight, self.router_bias) if p is not None]

    def reset_parameters(self) -> None:
        """SLoRA init: A_k and N_k as nn.Linear (kaiming-uniform, a=sqrt(5)); B_k and W_shared zero,
        so that A = SiLU(0) = 0 and the adapted model equals the backbone at step 0. The router
        is initialised as nn.Linear, its bias zero."""
        if self.spec_a is not None:
            d, r = self.spec_a.shape[1], self.config.rank
            nn.init.uniform_(self.spec_a, -1 / math.sqrt(d), 1 / math.sqrt(d))
            nn.init.uniform_(self.spec_n, -1 / math.sqrt(r), 1 / math.sqrt(r))
            nn.init.uniform_(self.router_weight, -1 / math.sqrt(d), 1 / math.sqrt(d))
        for p in (self.spec_b, self.shared_weight, self.shared_bias, self.router_bias):
            if p is not None:
                nn.init.zeros_(p)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d] -> one [T, C] tensor holding x W_shared, every A_k x and the router logits side
        by side (self.layout). One GEMM over concatenated weights: small-output GEMMs
        ([d, N_s*r], [d, N_s]) run far below peak on their own. On CPU the GEMMs run on oneDNN
        (cpu_gemm.py: torch's default BLAS takes its AVX2 path on AMD CPUs). A few rows
        (decoding) take one product per weight instead, their outputs side by side without the
        padding: concatenating the weights would copy all of them at every call, as many bytes
        as the products read."""
        pairs = [(self.shared_weight, self.shared_bias), (self.spec_a, None), (self.router_weight, self.router_bias)]
        if x.shape[0] <= cpu_gemm.FEW_ROWS:
            return torch.cat([F.linear(x, w, b) for w, b in pairs if w is not None], dim=1)
        weights = [w for w, _ in pairs if w is not None]
        layout = self.layout
        pad = layout.width - layout.logit_col - layout.experts  # zero rows: their columns are never read
        if pad:
            weights.append(x.new_zeros(pad, x.shape[-1]))
        bias = None
        if self.config.bias:
            parts = [self.shared_bias, x.new_zeros(self.spec_a.shape[0]), self.router_bias, x.new_zeros(pad)]
            bias = torch.cat([b for b in parts if b is not None])
        return cpu_gemm.linear(x, torch.cat(weights), bias)

    def forward(self, x: torch.Tensor, h_att: torch.Tensor, h_in: torch.Tensor | None = None) -> torch.Tensor:
        """h_out = h_att + target * A (module docstring), computed by the fast paths of hycam_ds.kernels.

        The plain statement of this function is hycam_ds.modeling.reference.reference_modulation
        (the paper's equation, a loop over the experts, plain autograd); tests hold this forward,
        its routing weights and its gradients equal to it.

        A decoding step (a few token rows) costs about as much in Python around the kernel as in
        the kernel itself, so that path touches as little as it can: parameters read from
        _parameters (not through nn.Module.__getattr__), tensors handed over unflattened, the
        routing views of last_routing built only when someone reads them."""
        cfg, state = self.config, self._state
        record = state.record_stats and self.training
        target = h_att + h_in if cfg.site == "residual" else h_att
        if self.layout is None:  # shared CAM alone: no experts to route
            return self._shared_only(x, h_att, target, record)
        d = h_att.shape[-1]
        rows = h_att.numel() // d
        hard, sample = routing_mode(cfg, self.training)
        noise = None
        if sample:
            generator = state.noise.generator(self.layer_index, h_att.device)
            noise = gumbel_noise((rows, self.layout.experts), generator, h_att.device)
        stats: dict | None = {} if record else None
        params = self._parameters
        inferred = None
        if rows <= cpu_gemm.FEW_ROWS:  # decoding: one call of the fused kernel, where it applies
            weights = (
                params.get("shared_weight"),
                params.get("shared_bias"),
                params["spec_a"],
                params["router_weight"],
                params.get("router_bias"),
            )
            inferred = infer_layer(
                x, h_att, target, weights, params["spec_n"], params["spec_b"], noise, cfg.tau, cfg.scaling, hard, stats
            )
        if inferred is None:
            proj = self._project(x.reshape(-1, d))
            out, weights, probs = modulate_layer(
                h_att.reshape(-1, d),
                target.reshape(-1, d),
                proj,
                self.layout,
                params["spec_n"],
                params["spec_b"],
                noise,
                cfg.tau,
                cfg.scaling,
                hard,
                stats,
            )
            out = out.view(h_att.shape)
        else:
            out, weights, probs, proj = inferred
        # Plain attributes, set past nn.Module.__setattr__: its checks cost as much as the kernel
        # itself at a decoding step.
        self.__dict__["_last_routing"] = (weights, probs, proj, (*h_att.shape[:-1], -1))
        self.__dict__["last_magnitudes"] = stats or {}
        return out


class LayerInputTap(nn.Module):
    """Wraps a decoder layer's input norm to hand its input (h_in) to the HyCAM attention wrapper.

    Needed only for site="residual". It sits inside the decoder layer, so gradient checkpointing,
    which re-runs the layer's submodules in backward, refreshes it together with the attention."""

    def __init__(self, norm: nn.Module, attention: "HyCAMAttention"):
        super().__init__()
        self.base_layer = norm
        object.__setattr__(self, "_attention", attention)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._attention.layer_input = hidden_states
        return self.base_layer(hidden_states, *args, **kwargs)


class HyCAMAttention(nn.Module):
    """Wraps any family's attention module (or, site="ffn", its MLP): calls it first, then
    modulates its output. Its input, as the module receives it, is x."""

    def __init__(self, base_layer: nn.Module, hycam: HyCAMModulation, state: HyCAMState):
        super().__init__()
        self.base_layer = base_layer
        self.hycam = hycam
        object.__setattr__(self, "_state", state)  # shared by all layers; read for disable_hycam
        self.layer_input: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = self.base_layer(*args, **kwargs)
        h_att = out[0] if isinstance(out, tuple) else out
        h_in = self.layer_input
        if h_in is not None:  # do not keep the tensor alive past the forward
            self.layer_input = None
        if self._state.disabled:  # the untouched backbone, for comparisons (hycam_ds.disable_hycam)
            return out
        if self._state.config.site == "residual" and h_in is None:
            raise RuntimeError("HyCAM site='residual' needs the layer input, but the input-norm tap did not run")
        h_out = self.hycam(x, h_att, h_in)
        return (h_out, *out[1:]) if isinstance(out, tuple) else h_out

    def __getattr__(self, name: str):
        # Code that reads attributes of the attention module (layer_idx, config, is_causal, ...)
        # keeps working on the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
