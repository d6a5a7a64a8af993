"""HyCAMConfig: every hyperparameter of the HyCAM modules, documented where declared.

The defaults are the paper's (arXiv 2510.17705). The authors' public code differs in several
places; `HyCAMConfig.authors_code()` reproduces it as a named preset, never as the default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Routing = Literal["soft", "hard"]
EvalRouting = Literal["softmax", "argmax", "sample"]
Site = Literal["attention", "residual", "ffn"]

_CHOICES = {
    "routing": ("soft", "hard"),
    "eval_routing": ("softmax", "argmax", "sample"),
    "site": ("attention", "residual", "ffn"),
}


@dataclass
class HyCAMConfig:
    num_specialized: int = 5
    """N_s: number of specialised low-rank CAM modules (experts) mixed by the router.
    0 = the shared CAM alone (the "cam" baseline: no experts, no router, no balance loss)."""

    rank: int = 8
    """r: rank of each specialised module (A_k: d->r, N_k: r->r, B_k: r->d)."""

    alpha: float = 32.0
    """Scaling numerator: the specialised pre-activation is multiplied by alpha / rank
    (32 / 8 = 4, the value hard-coded in the authors' code)."""

    tau: float = 0.5
    """Gumbel-softmax temperature of the router during training."""

    routing: Routing = "soft"
    """Training-time routing: "soft" = Gumbel-softmax weights over all experts (the paper);
    "hard" = one-hot top expert of the Gumbel sample with straight-through gradients."""

    eval_routing: EvalRouting = "softmax"
    """Routing in eval mode: "softmax" = noise-free softmax(logits / tau) (deterministic, default);
    "argmax" = deterministic one-hot top expert; "sample" = keep the training-time Gumbel sampling
    (the authors' code, non-deterministic)."""

    shared: bool = True
    """Include the shared full-rank CAM, SiLU(x W_shared). Off = specialised modules only."""

    bias: bool = False
    """Give the shared projection and the router a bias (zero-initialised)."""

    balance_weight: float = 0.01
    """Weight of the auxiliary load-balancing loss added to the LM loss by the trainer."""

    site: Site = "attention"
    """Where the modulation applies. "attention" = the paper: h_att + h_att * A.
    "residual" = the authors' code: (h_in + h_att) * (1 + A), h_in being the layer's input.
    "ffn" = beyond the paper: the MLP's output, h_mlp + h_mlp * A, A computed from the MLP's
    normalised input (the same modules, wrapped around the MLP instead of the attention)."""

    train_router: bool = True
    """Train the router. False freezes it at its random init, as the authors' code does."""

    seed: int = 0
    """Seed of the Gumbel noise generator (offset by the data-parallel rank in the trainer)."""

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"HyCAMConfig.{name}={value!r}: expected one of {allowed}")
        for name, low in (("num_specialized", 0), ("rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HyCAMConfig.{name}={value!r}: expected an integer >= {low}")
        if self.num_specialized == 0 and not self.shared:
            raise ValueError("HyCAMConfig: num_specialized=0 with shared=False leaves no modulation at all")
        if not self.tau > 0:
            raise ValueError(f"HyCAMConfig.tau={self.tau!r}: expected a temperature > 0")
        if self.balance_weight < 0:
            raise ValueError(f"HyCAMConfig.balance_weight={self.balance_weight!r}: expected >= 0")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def authors_code(cls, **overrides: Any) -> "HyCAMConfig":
        """The behaviour of the authors' public code, for comparisons: residual site, hard
        one-hot Gumbel routing in training and at inference, untrained router, no balance loss."""
        preset = dict(site="residual", routing="hard", eval_routing="sample", train_router=False, balance_weight=0.0)
        preset.update(overrides)
        return cls(**preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HyCAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"HyCAMConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)
