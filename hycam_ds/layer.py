"""HyCAM modules of one decoder layer, and the wrapper that puts them on its attention module.

    A      = SiLU(x W_shared) + sum_k p_k SiLU(scale * B_k(N_k(A_k(x))))
    h_out  = h_att + h_att * A                  (site="attention", the paper)
    h_out  = h_att + (h_in + h_att) * A         (site="residual", the authors' code: after the
                                                 layer adds h_in, that is (h_in + h_att)(1 + A))
x is the attention module's input (the normalised hidden state), p the router's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import HyCAMConfig
from .modulation import modulate
from .router import NoiseState, Router


@dataclass
class HyCAMState:
    """What all HyCAM layers of one model share: the noise source, the token mask of the current
    forward (for the balance loss and statistics), and whether to record modulation magnitudes."""

    config: HyCAMConfig
    noise: NoiseState = field(default_factory=NoiseState)
    token_mask: torch.Tensor | None = None
    record_stats: bool = True


class HyCAMModulation(nn.Module):
    """Shared CAM + N_s low-rank specialised CAMs (stacked, computed batched) + router."""

    def __init__(self, hidden_size: int, config: HyCAMConfig, state: HyCAMState, layer_index: int):
        super().__init__()
        n, r = config.num_specialized, config.rank
        self.config = config
        self.layer_index = layer_index
        self.shared = nn.Linear(hidden_size, hidden_size, bias=config.bias) if config.shared else None
        # Expert k's A_k is columns [k*r, (k+1)*r) of spec_a: one matmul gives every expert's A_k x.
        self.spec_a = nn.Parameter(torch.empty(hidden_size, n * r))
        self.spec_n = nn.Parameter(torch.empty(n, r, r))
        self.spec_b = nn.Parameter(torch.empty(n, r, hidden_size))
        self.router = Router(hidden_size, config)
        object.__setattr__(self, "_state", state)  # plain attribute: not a submodule, not saved
        self.last_routing: dict[str, torch.Tensor] = {}
        self.last_magnitudes: dict[str, torch.Tensor | None] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SLoRA init: A_k and N_k as nn.Linear (kaiming-uniform, a=sqrt(5)); B_k and W_shared zero,
        so that A = SiLU(0) = 0 and the adapted model equals the backbone at step 0."""
        hidden, nr = self.spec_a.shape
        n, r, _ = self.spec_n.shape
        nn.init.uniform_(self.spec_a, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        nn.init.uniform_(self.spec_n, -1 / math.sqrt(r), 1 / math.sqrt(r))
        nn.init.zeros_(self.spec_b)
        if self.shared is not None:
            nn.init.zeros_(self.shared.weight)
            if self.shared.bias is not None:
                nn.init.zeros_(self.shared.bias)
        self.router.reset_parameters()

    def forward(self, x: torch.Tensor, h_att: torch.Tensor, h_in: torch.Tensor | None = None) -> torch.Tensor:
        cfg, state = self.config, self._state
        shape = h_att.shape
        x2 = x.reshape(-1, shape[-1])
        weights, logits, hard = self.router(x2, state.noise, self.layer_index)
        self.last_routing = {"weights": weights.view(*shape[:-1], -1), "logits": logits.view(*shape[:-1], -1)}
        u = self.shared(x2) if self.shared is not None else None
        mid = (x2 @ self.spec_a).view(x2.shape[0], cfg.num_specialized, cfg.rank)
        mid = torch.einsum("tnr,nrs->tns", mid, self.spec_n)
        h2 = h_att.reshape(-1, shape[-1])
        target = h2 if cfg.site == "attention" else h2 + h_in.reshape(-1, shape[-1])
        stats: dict | None = {} if state.record_stats else None
        out = h2 + modulate(target, u, mid, self.spec_b, weights, cfg.scaling, hard, stats)
        self.last_magnitudes = stats or {}
        return out.view(shape)


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
    """Wraps any family's attention module: calls it first, then modulates its output."""

    def __init__(self, base_layer: nn.Module, hycam: HyCAMModulation):
        super().__init__()
        self.base_layer = base_layer
        self.hycam = hycam
        self.layer_input: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = self.base_layer(*args, **kwargs)
        h_att = out[0] if isinstance(out, tuple) else out
        h_in, self.layer_input = self.layer_input, None  # do not keep the tensor alive past the forward
        if self.hycam.config.site == "residual" and h_in is None:
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
