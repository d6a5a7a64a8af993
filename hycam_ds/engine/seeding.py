"""The seeds of a run: Python, NumPy and torch per rank, and each rank's own Gumbel noise."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_noise_seed(seed: int, rank: int) -> int:
    """The Gumbel noise seed of one data-parallel rank: every rank draws its own noise."""
    return seed + 7919 * rank
