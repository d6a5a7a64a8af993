"""hycam-ds: HyCAM (Hybrid Contextual Attention Modulation) for frozen Hugging Face causal LMs.

Core API (torch + transformers only; no DeepSpeed, no files of the data pipeline):
    HyCAMConfig, apply_hycam, hycam_parameters, balance_loss, routing_stats,
    save_adapter, load_adapter
"""

from .modeling.adapter_io import AdapterError, load_adapter, read_adapter, save_adapter
from .modeling.config import HyCAMConfig
from .modeling.injection import (
    FAMILY_LAYOUTS,
    apply_hycam,
    disable_hycam,
    hycam_named_parameters,
    hycam_parameters,
    load_noise_state_dict,
    noise_state_dict,
    set_noise_seed,
    set_record_stats,
)
from .modeling.losses import balance_loss
from .modeling.stats import routing_stats

__all__ = [
    "AdapterError",
    "FAMILY_LAYOUTS",
    "HyCAMConfig",
    "apply_hycam",
    "balance_loss",
    "disable_hycam",
    "hycam_named_parameters",
    "hycam_parameters",
    "load_adapter",
    "load_noise_state_dict",
    "noise_state_dict",
    "read_adapter",
    "routing_stats",
    "save_adapter",
    "set_noise_seed",
    "set_record_stats",
]
