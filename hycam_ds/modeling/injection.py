"""apply_hycam: one injection mechanism for every supported family, keyed by config.model_type."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import HyCAMConfig
from .layer import HyCAMAttention, HyCAMModulation, HyCAMState, LayerInputTap


@dataclass(frozen=True)
class FamilyLayout:
    """Where a family keeps what HyCAM wraps, as attribute paths."""

    layers: str = "model.layers"
    """Dotted path from the causal LM to the ModuleList of decoder layers."""
    attention: str = "self_attn"
    """Attribute of a decoder layer holding its self-attention module."""
    input_norm: str = "input_layernorm"
    """Attribute of a decoder layer holding the norm applied before attention (for site=residual)."""
    mlp: str = "mlp"
    """Attribute of a decoder layer holding its feed-forward block (for site=ffn)."""

    def wrapped(self, site: str) -> str:
        """The attribute of a decoder layer whose module HyCAM wraps at `site`."""
        return self.mlp if site == "ffn" else self.attention


# The one table of per-family knowledge. A family whose decoder layer is
# `h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))` with these
# names needs only a row here.
FAMILY_LAYOUTS: dict[str, FamilyLayout] = {
    "llama": FamilyLayout(),
    "mistral": FamilyLayout(),
    "qwen2": FamilyLayout(),
    "qwen3": FamilyLayout(),
}

_STATE_ATTR = "_hycam_state"


def _resolve(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def family_layout(model: nn.Module) -> FamilyLayout:
    """The FAMILY_LAYOUTS row of this model's config.model_type; a clear error for other families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILY_LAYOUTS:
        raise ValueError(
            f"HyCAM does not support model_type={model_type!r}; supported: {sorted(FAMILY_LAYOUTS)}. "
            "A family with the same decoder layout needs one row in hycam_ds.modeling.injection.FAMILY_LAYOUTS."
        )
    return FAMILY_LAYOUTS[model_type]


def _capture_token_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Model pre-forward hook: remember the 2-D padding mask of this forward (if any) and advance
    the Gumbel noise counter. Runs once per model forward, never in checkpoint re-computation."""
    state: HyCAMState = getattr(module, _STATE_ATTR)
    mask = kwargs.get("attention_mask")
    state.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    state.noise.forward_count += 1


def apply_hycam(model: nn.Module, config: HyCAMConfig | None = None) -> nn.Module:
    """Wrap every decoder layer's attention (config.site="ffn": its MLP) of a Hugging Face causal LM
    with HyCAM, in place.

    Freezes the whole backbone; only HyCAM parameters (the router's too, unless
    config.train_router is False) are trainable. Returns the same model object."""
    config = config or HyCAMConfig()
    if hasattr(model, _STATE_ATTR):
        raise ValueError("apply_hycam: this model already carries HyCAM modules")
    layout = family_layout(model)
    hidden_size = model.config.hidden_size
    for param in model.parameters():
        param.requires_grad_(False)
    reference = next(model.parameters())
    state = HyCAMState(config=config)
    state.noise.seed = config.seed
    for index, layer in enumerate(decoder_layers(model)):
        hycam = HyCAMModulation(hidden_size, config, state, layer_index=index)
        # Created on the backbone's device in fp32 then cast: training keeps master weights in the
        # dtype the trainer chooses (DeepSpeed casts under bf16); eval-only users get matching dtypes.
        hycam.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        site = layout.wrapped(config.site)
        wrapper = HyCAMAttention(getattr(layer, site), hycam, state)
        wrapper.train(layer.training)  # new modules start in train mode; follow the model's mode
        setattr(layer, site, wrapper)
        if config.site == "residual":
            setattr(layer, layout.input_norm, LayerInputTap(getattr(layer, layout.input_norm), wrapper))
        for param in hycam.parameters():
            param.requires_grad_(True)
        for param in hycam.router_parameters():
            param.requires_grad_(config.train_router)
    object.__setattr__(model, _STATE_ATTR, state)
    model.register_forward_pre_hook(_capture_token_mask, with_kwargs=True)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, found through its family's layout."""
    return _resolve(model, family_layout(model).layers)


def has_hycam(model: nn.Module) -> bool:
    """Whether apply_hycam has run on this model (or on the model a DeepSpeed engine wraps)."""
    return hasattr(getattr(model, "module", model), _STATE_ATTR)


def hycam_state(model: nn.Module) -> HyCAMState:
    model = getattr(model, "module", model)  # a DeepSpeed engine or DDP wraps the model
    if not hasattr(model, _STATE_ATTR):
        raise ValueError("this model carries no HyCAM modules: call apply_hycam(model, config) first")
    return getattr(model, _STATE_ATTR)


def hycam_layers(model: nn.Module) -> list[HyCAMModulation]:
    return [m for m in model.modules() if isinstance(m, HyCAMModulation)]


def routed_layers(model: nn.Module) -> list[HyCAMModulation]:
    """The HyCAM layers that route tokens over specialised modules (none for the shared CAM alone)."""
    return [layer for layer in hycam_layers(model) if layer.router_weight is not None]


def has_router(model: nn.Module) -> bool:
    """Whether the model carries HyCAM layers with a router (HyCAM; not CAM alone, LoRA or full)."""
    return bool(routed_layers(model))


def hycam_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every HyCAM parameter, by its name in the model (trainable or not)."""
    for name, module in model.named_modules():
        if isinstance(module, HyCAMModulation):
            for pname, param in module.named_parameters():
                yield f"{name}.{pname}", param


def hycam_parameters(model: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    """The parameters the optimiser should see: HyCAM's, trainable ones by default."""
    return [p for _, p in hycam_named_parameters(model) if p.requires_grad or not trainable_only]


def set_noise_seed(model: nn.Module, seed: int) -> None:
    """Seed the Gumbel noise (the trainer offsets it by data-parallel rank) and restart its counter."""
    state = hycam_state(model)
    state.noise.seed, state.noise.forward_count = seed, 0


def noise_state_dict(model: nn.Module) -> dict[str, int]:
    noise = hycam_state(model).noise
    return {"seed": noise.seed, "forward_count": noise.forward_count}


def load_noise_state_dict(model: nn.Module, values: dict[str, int]) -> None:
    noise = hycam_state(model).noise
    noise.seed, noise.forward_count = int(values["seed"]), int(values["forward_count"])


@contextlib.contextmanager
def disable_hycam(model: nn.Module):
    """Within the block the model computes exactly its backbone (HyCAM skipped in every layer)."""
    state = hycam_state(model)
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous


def set_record_stats(model: nn.Module, enabled: bool) -> None:
    """Record shared/specialised modulation magnitudes in training forwards (two reductions per
    layer; eval-mode forwards never record them)."""
    hycam_state(model).record_stats = enabled
