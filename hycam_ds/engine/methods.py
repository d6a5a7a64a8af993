"""Backbone loading (ZeRO-3-partitioned from the start) and the adaptation methods compared.

hycam  the paper: HyCAM on every attention module, backbone frozen
cam    the shared CAM alone (HyCAMConfig(num_specialized=0)), backbone frozen
lora   PEFT LoRA on q, k, v, o, backbone frozen
full   every backbone parameter trains
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from ..modeling.backbones import backbone_config as small_backbone_config
from ..modeling.backbones import build_backbone
from ..modeling.injection import FAMILY_LAYOUTS, apply_hycam, hycam_parameters
from .ds_config import zero_stage
from .train_config import ConfigError, TrainConfig, effective_hycam_config


def load_pretrained_model(ref: str, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """`from_pretrained` of a local directory, a .gguf file (dequantised to `dtype`) or a hub id."""
    from data_pipeline.pretrained import cannot_load, parse_pretrained

    source = parse_pretrained(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.name_or_path, dtype=dtype, attn_implementation=attn_implementation, **source.kwargs()
        )
    except OSError as err:
        raise cannot_load(source, "model", err) from None
    if source.gguf_file is not None:
        # transformers marks a model loaded from GGUF as quantised, although its weights are now
        # plain `dtype` tensors: unmarked, it trains, exports and saves like any other.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


# What a local Hugging Face directory must hold for a model and its tokenizer to load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spm.model", "vocab.txt")


def backbone_config(ref: str):
    """The config of a backbone reference, read alone (config.json, the GGUF header, or the hub or its
    offline cache): no weights are loaded. Raises PretrainedRefError naming what is missing."""
    from transformers import AutoConfig

    from data_pipeline.pretrained import PretrainedRefError, cannot_load, parse_pretrained

    source = parse_pretrained(ref)
    if source.gguf_file is None and source.is_local:
        directory = Path(source.name_or_path)
        if not (directory / "config.json").is_file():
            raise PretrainedRefError(
                f"{ref}: no config.json: not a Hugging Face model directory (save_pretrained writes one)"
            )
        if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
            raise PretrainedRefError(
                f"{ref}: holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
                "save the tokenizer beside the model"
            )
    try:
        return AutoConfig.from_pretrained(source.name_or_path, **source.kwargs())
    except OSError as err:
        raise cannot_load(source, "config", err) from None
    except ValueError as err:  # an unknown model_type in config.json
        raise PretrainedRefError(f"{ref}: {' '.join(str(err).split())[:300]}") from None


def check_backbone(cfg: TrainConfig) -> None:
    """Before any data build or model load: the backbone exists and holds what loading needs, is a
    family HyCAM wraps (hycam, cam), and has every module lora.target_modules names (lora; checked
    on a skeleton of the model on the meta device). Raises ConfigError."""
    from data_pipeline.pretrained import PretrainedRefError

    if cfg.model.path is not None:
        try:
            config = backbone_config(cfg.model.path)
        except PretrainedRefError as err:
            raise ConfigError(f"model.path: {err}") from None
        if cfg.method in ("hycam", "cam") and config.model_type not in FAMILY_LAYOUTS:
            raise ConfigError(
                f"model.path: {cfg.model.path} is a {config.model_type!r} model; HyCAM wraps "
                f"{sorted(FAMILY_LAYOUTS)} (a family with the same decoder layout needs one row in "
                "hycam_ds.modeling.injection.FAMILY_LAYOUTS)"
            )
    else:
        config = small_backbone_config(cfg.model.name, vocab_size=cfg.data.vocab_size)
    if cfg.method == "lora":
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        check_lora_targets(skeleton, list(cfg.lora.target_modules))


def check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Every entry of lora.target_modules must name a module of the backbone (PEFT silently skips
    entries that match nothing as long as one matches)."""
    leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [
        t
        for t in targets
        if t not in leaves and not any(n == t or n.endswith(f".{t}") for n, _ in model.named_modules())
    ]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} match no module of the backbone; its linear layers are {sorted(leaves)}"
        )


class BackboneLoader:
    """Loads the backbone. A Hugging Face one is built inside `deepspeed.zero.Init` under ZeRO-3
    (transformers does so while an HfDeepSpeedConfig is alive, kept here as long as the model),
    so no rank ever holds it whole. A small backbone built in code is built whole and partitioned
    by `deepspeed.initialize`: its random init must not depend on the world size, so that one
    process can evaluate exactly what N ranks trained."""

    def __init__(self, ds_config: dict[str, Any]):
        self.stage3 = zero_stage(ds_config) == 3
        self.ds_config = ds_config
        self._hf_ds_config = None

    def load(self, cfg: TrainConfig, vocab_size: int | None, dtype: torch.dtype) -> PreTrainedModel:
        model_cfg = cfg.model
        if model_cfg.path is not None:
            if self.stage3:
                self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
            return load_pretrained_model(model_cfg.path, dtype, model_cfg.attn_implementation)
        if vocab_size is None:
            raise ValueError("a backbone built in code needs the tokenizer's vocabulary size")
        return build_backbone(
            model_cfg.name,
            vocab_size,
            seed=model_cfg.seed,
            dtype=dtype,
            attn_implementation=model_cfg.attn_implementation,
        )


def adapt(model: PreTrainedModel, cfg: TrainConfig) -> tuple[nn.Module, list[nn.Parameter]]:
    """Apply the configured method; returns (model to train, its trainable parameters)."""
    if cfg.method in ("hycam", "cam"):
        apply_hycam(model, effective_hycam_config(cfg))
        params = hycam_parameters(model)
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, list(cfg.lora.target_modules))
        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
    elif cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
    else:  # validated earlier; kept for readers of this function
        raise ValueError(f"method {cfg.method!r}")
    if cfg.model.gradient_checkpointing:
        # Non-reentrant: the reentrant variant runs forward without autograd, which would cut
        # the router off from the balance loss (hycam_ds.modeling.losses says so if it happens).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return model, params


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitions report their full size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
