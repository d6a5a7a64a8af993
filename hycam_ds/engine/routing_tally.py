"""How the routed layers treated each task's tokens, summed over batches and ranks.

Per routed layer and task: the token count, the summed routing weights (for the mean routing
vector), the summed per-token routing entropy, and how many tokens each expert was the top choice
for. Sums, not means, so that ranks and batches add up exactly (one all-reduce at the end).
"""

from __future__ import annotations

import numpy as np
import torch

from .distributed import all_reduce_sum


class RoutingTally:
    def __init__(self, n_layers: int, n_tasks: int, n_experts: int):
        self.n_layers, self.n_tasks, self.n_experts = n_layers, n_tasks, n_experts
        self.weights = torch.zeros(n_layers, n_tasks, n_experts, dtype=torch.float64)
        self.top = torch.zeros(n_layers, n_tasks, n_experts, dtype=torch.float64)
        self.entropy = torch.zeros(n_layers, n_tasks, dtype=torch.float64)
        self.tokens = torch.zeros(n_layers, n_tasks, dtype=torch.float64)

    def add(self, layer: int, weights: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Tokens of one forward at `layer`: routing weights [N, E] and task ids [N] (negative =
        padding, left out)."""
        keep = task_ids >= 0
        weights, tasks = weights.detach().double().cpu()[keep], task_ids[keep]
        self.weights[layer].index_add_(0, tasks, weights)
        top = torch.nn.functional.one_hot(weights.argmax(-1), self.n_experts).double()
        self.top[layer].index_add_(0, tasks, top)
        self.entropy[layer].index_add_(0, tasks, -(weights * weights.clamp_min(1e-30).log()).sum(-1))
        self.tokens[layer] += torch.bincount(tasks, minlength=self.n_tasks).double()

    def reduce(self) -> "RoutingTally":
        """Collective: the sums of every rank (in place); returns self."""
        parts = (self.weights, self.top, self.entropy, self.tokens)
        total = all_reduce_sum(torch.cat([p.flatten() for p in parts]))
        offset = 0
        for part in parts:
            part.copy_(total[offset : offset + part.numel()].view_as(part))
            offset += part.numel()
        return self

    def _per_token(self, sums: torch.Tensor) -> np.ndarray:
        count = self.tokens.clamp_min(1)
        return (sums / (count[..., None] if sums.dim() == 3 else count)).numpy()

    def mean_routing(self) -> np.ndarray:
        """[layers, tasks, experts]: the mean routing vector of each task at each layer."""
        return self._per_token(self.weights)

    def top_share(self) -> np.ndarray:
        """[layers, tasks, experts]: the share of each task's tokens whose top expert is k."""
        return self._per_token(self.top)

    def mean_entropy(self) -> np.ndarray:
        """[layers, tasks]: the mean per-token routing entropy (nats)."""
        return self._per_token(self.entropy)

    def by_layer(self) -> dict[int, np.ndarray]:
        """{layer: task x expert mean routing weight}: what reports draw as heatmaps."""
        means = self.mean_routing()
        return {index: means[index] for index in range(self.n_layers)}
