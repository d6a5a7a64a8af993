"""Where inference runs and in which dtype: --device and --dtype of evaluate.py and generate.py.

auto picks the precision training's `optim.precision=auto` picks on the same hardware: bf16
where CUDA reports bf16 support, fp32 on CPUs (which emulate bf16 matmuls many times slower).
An explicit bf16 on a CPU is honoured: slow, but the numbers are bf16's.
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from ..engine.cli import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_argument(text: str) -> str:
    """argparse `type=` of --device: auto, cpu, cuda or cuda:N."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def resolve_device(name: str) -> torch.device:
    """auto: this process's GPU (cuda:LOCAL_RANK under a launcher) when CUDA is available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    device = torch.device(name)
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA device that supports it, else fp32."""
    if name not in DTYPE_CHOICES:
        raise UsageError(f"--dtype {name}: expected one of {', '.join(DTYPE_CHOICES)}")
    bf16_here = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16_here else torch.float32
    if name == "bf16" and device.type == "cuda" and not bf16_here:
        raise UsageError(f"--dtype bf16: {device} does not support bf16 (use --dtype fp32)")
    return DTYPES[name]


def add_placement_arguments(parser: argparse.ArgumentParser, zero3: bool = True) -> None:
    """--dtype and --device (and, `zero3`, --ds_config and the launcher's --local_rank): how the
    evaluation commands place the model."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="model precision (default auto: bf16 on a GPU that supports it, else fp32)",
    )
    parser.add_argument(
        "--device",
        type=device_argument,
        default="auto",
        help="auto, cpu, cuda or cuda:N (default auto: the GPU if there is one)"
        + ("; auto under ZeRO-3" if zero3 else ""),
    )
    if zero3:
        parser.add_argument("--ds_config", help="DeepSpeed JSON: ZeRO-3 partitions the model across ranks")
        parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def placement(dtype: str, device: str, zero3: bool) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the model. Under ZeRO-3 DeepSpeed puts every rank on its own
    accelerator (auto resolves to that one), so an explicit device would contradict it."""
    if zero3 and device != "auto":
        raise UsageError(
            f"--device {device}: under ZeRO-3 (--ds_config) DeepSpeed places each rank on its own device; "
            "leave --device auto"
        )
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype spelling of a torch dtype (what report.json records)."""
    return next(name for name, value in DTYPES.items() if value == dtype)
