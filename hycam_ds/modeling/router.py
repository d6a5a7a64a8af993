"""Token routing: Gumbel-softmax weights over the specialised modules, and its noise source.

The Gumbel noise is drawn from a generator re-seeded from (seed, forward count, layer) at every
call rather than from one running generator. Two reasons: gradient checkpointing re-runs the
attention forward in backward and must see the same noise (the global RNG is restored by
torch.utils.checkpoint, a private generator would not be); and the whole noise state is then two
integers, which a checkpoint saves and restores exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def routing_mode(config: HyCAMConfig, training: bool) -> tuple[bool, bool]:
    """(hard, sample): whether the routing weights are mixed as a one-hot, and whether Gumbel noise
    is drawn. Training: config.routing, sampled. Eval: per config.eval_routing, noise-free
    softmax by default."""
    if training:
        return config.routing == "hard", True
    mode = {"softmax": "soft", "argmax": "hard", "sample": config.routing}[config.eval_routing]
    return mode == "hard", config.eval_routing == "sample"
