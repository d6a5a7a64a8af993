"""DeepSpeed JSON configs: checked-in files passed as they are, "auto" filled from the YAML.

Only the fields that the experiment config owns may be "auto". A field given as a number in the
JSON must agree with the YAML and the world size: a disagreement is an error naming both, never
silently rewritten (DeepSpeed would otherwise train with a batch size nobody asked for).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .train_config import ConfigError, TrainConfig


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path}: no such file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--ds_config {path}: invalid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object")
    return config


def _fill(node: dict, key: str, value: Any, where: str, source: str) -> None:
    """Set node[key] when it is "auto" or absent; otherwise insist that it equals `value`."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
        return
    if (
        isinstance(value, float)
        and isinstance(current, (int, float))
        and abs(current - value) <= 1e-12 * max(1.0, abs(value))
    ):
        return
    if current != value:
        raise ConfigError(
            f"DeepSpeed config {where}={current!r} disagrees with {source}={value!r}: "
            'set one of them to the other (or "auto")'
        )


def resolve_ds_config(raw: dict[str, Any], cfg: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config this run uses: `raw` with every "auto" filled, consistency checked."""
    ds = copy.deepcopy(raw)
    optim = cfg.optim
    _fill(
        ds,
        "train_micro_batch_size_per_gpu",
        optim.micro_batch_size,
        "train_micro_batch_size_per_gpu",
        "optim.micro_batch_size",
    )
    _fill(ds, "gradient_accumulation_steps", optim.grad_accum, "gradient_accumulation_steps", "optim.grad_accum")
    global_batch = optim.micro_batch_size * optim.grad_accum * world_size
    _fill(
        ds,
        "train_batch_size",
        global_batch,
        "train_batch_size",
        "optim.micro_batch_size x optim.grad_accum x world size "
        f"({optim.micro_batch_size} x {optim.grad_accum} x {world_size})",
    )
    _fill(ds, "gradient_clipping", optim.grad_clip, "gradient_clipping", "optim.grad_clip")
    bf16_section = ds.setdefault("bf16", {})
    _fill(bf16_section, "enabled", bf16, "bf16.enabled", f"optim.precision={optim.precision!r} on this hardware")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(
            "DeepSpeed config fp16.enabled=true: HyCAM trains in bf16 or fp32 (fp16 loss scaling is not supported here)"
        )
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value, source in (
            ("lr", optim.lr, "optim.lr"),
            ("betas", list(optim.betas), "optim.betas"),
            ("eps", optim.eps, "optim.eps"),
            ("weight_decay", optim.weight_decay, "optim.weight_decay"),
        ):
            _fill(params, key, value, f"optimizer.params.{key}", source)
    scheduler = ds.get("scheduler")
    if scheduler is not None:
        params = scheduler.setdefault("params", {})
        if scheduler.get("type") == "WarmupCosineLR":
            _fill(params, "total_num_steps", optim.max_steps, "scheduler.params.total_num_steps", "optim.max_steps")
            _fill(
                params,
                "warmup_num_steps",
                optim.warmup_steps,
                "scheduler.params.warmup_num_steps",
                "optim.warmup_steps",
            )
            _fill(params, "cos_min_ratio", optim.min_lr_ratio, "scheduler.params.cos_min_ratio", "optim.min_lr_ratio")
    check_types(ds)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f'DeepSpeed config {leftover}="auto": hycam-ds does not know how to fill it; give a value')
    check_with_deepspeed(ds)
    return ds


# DeepSpeed's config model class -> the JSON section it reads.
_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16"}


def check_with_deepspeed(ds: dict[str, Any]) -> None:
    """DeepSpeed reads the resolved config with its own config model now, not after the model is
    loaded: a field it refuses (zero_optimization.stage 7, an unknown key) is a ConfigError naming
    it."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    # The batch sizes were checked against the world size above; DeepSpeed would recheck them
    # against the world size it sees in this process (1 before the process group exists).
    readable = {k: v for k, v in copy.deepcopy(ds).items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(readable)
    except ValidationError as err:
        section = _SECTIONS.get(err.title, err.title)
        first = err.errors()[0]
        field = ".".join([section, *(str(part) for part in first["loc"])])
        raise ConfigError(f"DeepSpeed config {field}: {first['msg']} (got {first.get('input')!r})") from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"DeepSpeed config: {' '.join(str(err).split()) or type(err).__name__}") from None


def check_types(ds: dict[str, Any]) -> None:
    """An optimizer or scheduler type DeepSpeed does not know, and a warm-up it rejects."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    optimizer = (ds.get("optimizer") or {}).get("type")
    if optimizer is not None:
        if optimizer.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, optimizer):
            raise ConfigError(
                f"DeepSpeed config optimizer.type: {optimizer!r} is neither a DeepSpeed optimizer "
                f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class"
            )
    scheduler = ds.get("scheduler") or {}
    kind = scheduler.get("type")
    if kind is not None and kind not in VALID_LR_SCHEDULES and not hasattr(torch.optim.lr_scheduler, kind):
        raise ConfigError(
            f"DeepSpeed config scheduler.type: {kind!r} is neither a DeepSpeed schedule "
            f"({', '.join(VALID_LR_SCHEDULES)}) nor a torch.optim.lr_scheduler class"
        )
    warmup = scheduler.get("params", {}).get("warmup_num_steps")
    if kind == "WarmupCosineLR" and isinstance(warmup, int) and warmup < 1:
        raise ConfigError(f"optim.warmup_steps: {warmup}: DeepSpeed's WarmupCosineLR needs at least 1 warm-up step")


def _find_auto(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif node == "auto":
        return prefix.rstrip(".")
    return None


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
