"""save_adapter / load_adapter: HyCAM weights as safetensors + config JSON + checksummed manifest.

Layout of an adapter directory:
    adapter.safetensors   the HyCAM tensors, named as in the model (never a pickle)
    hycam_config.json     the HyCAMConfig
    manifest.json         format, backbone description, tensor shapes, sha256 of both files above
The directory is written next to its destination and renamed into place, so a reader sees either
the previous adapter or the complete new one, never a mixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import HyCAMConfig
from .fileio import atomic_directory, sha256_file
from .injection import apply_hycam, decoder_layers, has_hycam, hycam_named_parameters, hycam_state

FORMAT = "hycam-adapter/1"
WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE = "adapter.safetensors", "hycam_config.json", "manifest.json"
# Fields that change the tensors' shapes or meaning; the rest (tau, balance_weight, eval_routing,
# seed, ...) may legitimately differ between training and use.
_STRUCTURAL_FIELDS = ("num_specialized", "rank", "alpha", "shared", "bias", "site")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded into this model: the message says why."""


def _backbone_description(model: nn.Module) -> dict[str, object]:
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": len(decoder_layers(model)),
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every HyCAM tensor, keyed by parameter name."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in hycam_named_parameters(model)}


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the model's HyCAM adapter to `directory` atomically. `tensors` overrides the values
    read from the model (the trainer passes tensors gathered from ZeRO-3 partitions)."""
    model = getattr(model, "module", model)
    config = hycam_state(model).config
    expected = {name: p for name, p in hycam_named_parameters(model)}
    tensors = (
        adapter_state_dict(model) if tensors is None else {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    )
    missing = sorted(set(expected) - set(tensors))
    if missing or not tensors:
        raise AdapterError(
            f"refusing to write a partial adapter: {len(missing)} HyCAM tensors missing, e.g. {missing[:3]}"
        )
    empty = [name for name, t in tensors.items() if t.numel() == 0]
    if empty:
        raise AdapterError(
            f"refusing to write an empty adapter: {len(empty)} tensors have no elements (e.g. {empty[0]}); "
            "under ZeRO-3 gather them first (deepspeed.zero.GatheredParameters)"
        )
    destination = Path(directory)
    with atomic_directory(destination, is_adapter_dir, "a HyCAM adapter") as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(config.to_json())
        manifest = {
            "format": FORMAT,
            "backbone": _backbone_description(model),
            "tensors": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                for name, t in sorted(tensors.items())
            },
            "sha256": {
                WEIGHTS_FILE: sha256_file(staging / WEIGHTS_FILE),
                CONFIG_FILE: sha256_file(staging / CONFIG_FILE),
            },
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return destination


def is_adapter_dir(directory: Path) -> bool:
    """Whether `directory` holds a HyCAM adapter (its manifest names the format) and nothing else."""
    manifest = Path(directory) / MANIFEST_FILE
    try:
        ours = json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
    return ours and {p.name for p in Path(directory).iterdir()} <= {WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE}


def read_adapter(directory: str | os.PathLike) -> tuple[HyCAMConfig, dict[str, torch.Tensor], dict]:
    """Verify and read an adapter directory: (config, tensors, manifest). Raises AdapterError."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AdapterError(f"{directory}: not a HyCAM adapter (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{manifest_path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise AdapterError(f"{manifest_path}: format {found!r}, expected {FORMAT!r}")
    for key in ("sha256", "backbone", "tensors"):
        if not isinstance(manifest.get(key), dict):
            raise AdapterError(f"{manifest_path}: field {key!r} is missing or not an object")
    if set(manifest["backbone"]) != {"model_type", "hidden_size", "num_hidden_layers"}:
        raise AdapterError(f"{manifest_path}: field 'backbone' must name model_type, hidden_size and num_hidden_layers")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        path = directory / name
        if not path.is_file():
            raise AdapterError(f"{path}: missing")
        actual, recorded = sha256_file(path), manifest["sha256"].get(name)
        if actual != recorded:
            raise AdapterError(
                f"{path}: checksum mismatch (sha256 {actual[:12]}..., manifest says {str(recorded)[:12]}...): "
                "the file is damaged or was modified"
            )
    try:
        config = HyCAMConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (ValueError, TypeError) as err:
        raise AdapterError(f"{directory / CONFIG_FILE}: invalid HyCAM config: {err}") from None
    tensors = load_file(str(directory / WEIGHTS_FILE))  # safetensors: plain bytes, nothing executed
    return config, tensors, manifest


def load_adapter(model: nn.Module, directory: str | os.PathLike, config_overrides: dict | None = None) -> nn.Module:
    """Load an adapter into `model`. A model without HyCAM gets it applied with the saved config
    (optionally overriding non-structural fields such as eval_routing). Refuses a different
    backbone, a structurally different HyCAM config, or tensors of other names or shapes."""
    config, tensors, manifest = read_adapter(directory)
    if config_overrides:
        config = HyCAMConfig.from_dict({**config.to_dict(), **config_overrides})
    target = getattr(model, "module", model)
    saved_backbone, this_backbone = manifest["backbone"], _backbone_description(target)
    if saved_backbone != this_backbone:
        raise AdapterError(
            f"{directory}: adapter was trained for backbone {saved_backbone}, this model is {this_backbone}"
        )
    if not has_hycam(target):
        apply_hycam(target, config)
    current = hycam_state(target).config
    differing = [f for f in _STRUCTURAL_FIELDS if getattr(current, f) != getattr(config, f)]
    if differing:
        detail = ", ".join(f"{f}: model {getattr(current, f)!r} vs adapter {getattr(config, f)!r}" for f in differing)
        raise AdapterError(f"{directory}: HyCAM config mismatch ({detail})")
    params = dict(hycam_named_parameters(target))
    if set(params) != set(tensors):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise AdapterError(f"{directory}: tensor names differ (unexpected {extra[:3]}, missing {missing[:3]})")
    for name, value in tensors.items():
        expected_shape = tuple(
            getattr(params[name], "ds_shape", params[name].shape)
        )  # ZeRO-3 keeps the full shape there
        if tuple(value.shape) != expected_shape:
            raise AdapterError(
                f"{directory}: tensor {name} has shape {tuple(value.shape)}, the model expects {expected_shape}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return model
