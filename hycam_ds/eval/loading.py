"""Load a backbone plus what was trained on it (HyCAM or LoRA adapter, or a fully fine-tuned
model) for evaluation and generation, in one process or partitioned by ZeRO-3 across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers.integrations import HfDeepSpeedConfig

from ..engine.ds_config import zero_stage
from ..engine.methods import load_pretrained_model
from ..engine.run_dir import RunDir, RunDirError
from ..modeling.adapter_io import MANIFEST_FILE, load_adapter
from ..modeling.backbones import build_backbone
from ..modeling.injection import set_record_stats


@dataclass
class ModelSpec:
    backbone_path: Optional[str] = None
    """A Hugging Face backbone directory or hub id."""
    backbone_name: Optional[str] = None
    """Or a backbone built in code (hycam_ds.modeling.backbones), with `backbone_seed` and `vocab_size`."""
    backbone_seed: int = 0
    vocab_size: Optional[int] = None
    adapter: Optional[str] = None
    """A HyCAM adapter (save_adapter) or a PEFT LoRA adapter directory."""
    full_model: Optional[str] = None
    """A fully fine-tuned model directory (replaces the backbone)."""

    @classmethod
    def from_run_dir(cls, run_dir: Path, vocab_size: int) -> "ModelSpec":
        """The run's backbone and export; RunDirError when the run has exported nothing (yet)."""
        layout = RunDir(run_dir)
        info = layout.read_info()
        adapter, full = info.adapter or str(layout.adapter), info.method == "full"
        if not Path(adapter).is_dir() or not any(Path(adapter).iterdir()):
            raise RunDirError(
                f"{adapter}: no adapter: the run {run_dir} has not finished, or ran with "
                "checkpoint.export_adapter=false; finish it (launch/train.py with its config and "
                f"run_dir={run_dir} checkpoint.resume=auto checkpoint.export_adapter=true) and try again"
            )
        model = info.model
        return cls(
            backbone_path=model["path"],
            backbone_name=None if model["path"] else model["name"],
            backbone_seed=model["seed"],
            vocab_size=vocab_size,
            adapter=None if full else adapter,
            full_model=adapter if full else None,
        )

    def kind(self) -> str:
        if self.full_model:
            return "full"
        if self.adapter is None:
            return "backbone"
        return "hycam" if (Path(self.adapter) / MANIFEST_FILE).is_file() else "lora"


def zero3_inference_config(ds_config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A training DeepSpeed config reduced to what inference in `dtype` needs (no optimizer, no
    scheduler). Its bf16 section follows `dtype`, whatever the training file said: ZeRO-3 builds
    and keeps the partitioned parameters in the precision that section names."""
    keep = {k: v for k, v in ds_config.items() if k == "zero_optimization"}
    keep["train_micro_batch_size_per_gpu"] = 1
    keep["bf16"] = {**ds_config.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    return keep


def load_model(
    spec: ModelSpec,
    dtype: torch.dtype = torch.float32,
    ds_config: Optional[dict] = None,
    attn: str = "sdpa",
    device: torch.device | str = "cpu",
):
    """Returns (model in eval mode, keepalive), every parameter in `dtype` (a HyCAM adapter is cast
    to it on loading). Without ZeRO-3 the model is moved to `device`. Under ZeRO-3 (`ds_config`
    stage 3) the returned model is a DeepSpeed engine's module, partitioned across ranks on the
    devices DeepSpeed chose; keep `keepalive` referenced."""
    stage3 = bool(ds_config) and zero_stage(ds_config) == 3
    ds_config = zero3_inference_config(ds_config, dtype) if stage3 else None
    hf_ds = None
    source = spec.full_model or spec.backbone_path
    if source is not None:
        hf_ds = HfDeepSpeedConfig(ds_config) if stage3 else None  # from_pretrained builds it partitioned
        model = load_pretrained_model(source, dtype, attn)
    else:  # built whole, exactly as the trainer built it (hycam_ds.engine.methods.BackboneLoader)
        model = build_backbone(
            spec.backbone_name, spec.vocab_size, seed=spec.backbone_seed, dtype=dtype, attn_implementation=attn
        )
    kind = spec.kind()
    if kind == "hycam":
        load_adapter(model, spec.adapter)
        set_record_stats(model, False)  # modulation magnitudes are training telemetry
    elif kind == "lora":
        from peft import PeftModel

        # The LoRA weights in the backbone's dtype, as training under bf16 ran them (PEFT would
        # otherwise keep them in fp32 beside a bf16 backbone).
        model = PeftModel.from_pretrained(model, spec.adapter, autocast_adapter_dtype=False)
    model.eval()
    engine = None
    if hf_ds is None:
        model.to(device)
    else:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        model = engine.module
    return model, (hf_ds, engine)
