"""Token router: Gumbel-softmax weights over the specialised modules, and its noise source.

The Gumbel noise is drawn from a generator re-seeded from (seed, forward count, layer) at every
call rather than from one running generator. Two reasons: gradient checkpointing re-runs the
attention forward in backward and must see the same noise (the global RNG is restored by
torch.utils.checkpoint, a private generator would not be); and the whole noise state is then two
integers, which a checkpoint saves and restores exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import HyCAMConfig

_SEED_STRIDE = 1_000_003  # a prime, so (forward count, layer) pairs never collide across layers


@dataclass
class NoiseState:
    """Shared by all layers of one model. `forward_count` advances once per model forward."""

    seed: int = 0
    forward_count: int = 0

    def generator(self, layer_index: int, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * _SEED_STRIDE + self.forward_count) * 4099 + layer_index)
        return generator


def gumbel_noise(shape: torch.Size, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    exponential = (-torch.log(uniform.clamp_min(tiny))).clamp_min(tiny)
    return -torch.log(exponential)


class Router(nn.Module):
    """logits = x W_r (+ b): one score per specialised module, per token."""

    def __init__(self, hidden_size: int, config: HyCAMConfig):
        super().__init__()
        self.proj = nn.Linear(hidden_size, config.num_specialized, bias=config.bias)
        self.config = config

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, noise: NoiseState, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Returns (routing weights [T, N] in x's dtype, router logits [T, N] in fp32, hard)."""
        cfg = self.config
        logits = self.proj(x).float()
        mode = cfg.routing if self.training else {"softmax": "soft", "argmax": "hard", "sample": cfg.routing}[cfg.eval_routing]
        sample = self.training or cfg.eval_routing == "sample"
        scores = logits
        if sample:
            generator = noise.generator(layer_index, logits.device)
            scores = logits + gumbel_noise(logits.shape, generator, logits.device)
        weights = F.softmax(scores / cfg.tau, dim=-1)
        return weights.to(x.dtype), logits, mode == "hard"
