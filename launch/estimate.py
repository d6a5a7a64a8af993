"""Size a HyCAM run on a real backbone before submitting it: parameter counts and ZeRO-3 memory.

    python launch/estimate.py --config launch/model_configs/llama-3.1-8b/config.json \
        --num-nodes 1 --gpus-per-node 8 [--num-specialized 5] [--rank 8] [--no-shared] [--json]

Only the backbone's config is read (a config.json file, a directory holding one, a .gguf file's
metadata, or a hub id's config from the local Hugging Face cache): the model is built
on the meta device, so a 70B backbone costs no memory here. HyCAM is applied with the project's
own `apply_hycam`, so the trainable count is the one the trainer will see.

Memory is model states only (weights, gradients, optimizer states), per the DeepSpeed ZeRO-3
estimator; activations are not included. The backbone is frozen, which DeepSpeed's estimator
does not model (it assumes every parameter trains), so the figures are split: the estimator is
applied to the HyCAM parameters alone, and the frozen backbone adds its bf16 weights partitioned
over all GPUs plus one gathered module.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

# The estimate reads a hub id from the local cache only (HF_HUB_OFFLINE=0 lets it download the
# config): a mistyped path must be an error, not a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory
import hycam_ds as H  # noqa: E402
from data_pipeline.pretrained import PretrainedRef, PretrainedRefError, parse_pretrained  # noqa: E402
from hycam_ds.modeling.layer import HyCAMModulation  # noqa: E402

BYTES_PER_FROZEN_PARAM = 2  # bf16 backbone weights
GIB = 2**30

# The offload settings a ZeRO-3 HyCAM run can use, as (offload_param, offload_optimizer). All with
# zero_init: the trainer loads the backbone inside deepspeed.zero.Init, so no rank ever builds the
# whole model (DeepSpeed's zero_init=0 rows describe a model built whole on every rank).
OFFLOAD_OPTIONS = [("none", "none"), ("none", "cpu"), ("cpu", "cpu")]

ASSUMPTIONS = [
    "model states only: activations, the KV of long sequences and framework/CUDA overheads are not included",
    (
        "frozen backbone weights in bf16 (2 bytes/param), partitioned over all GPUs "
        "(or over the nodes' CPU memory with offload_param=cpu)"
    ),
    (
        "HyCAM parameters train with Adam in mixed precision "
        "(bf16 weight and grad, fp32 master weight, momentum, variance): "
        "DeepSpeed's estimator, 18 bytes/param partitioned plus 4 bytes/param of the largest HyCAM layer, "
        "1.5x buffer factor on CPU"
    ),
    (
        "one backbone module gathered at a time (2 bytes/param of the largest, usually the embedding or LM head); "
        "stage3_prefetch_bucket_size / stage3_max_live_parameters in the DeepSpeed config can keep more gathered"
    ),
    (
        "zero_init: the backbone is loaded inside deepspeed.zero.Init; "
        "CPU memory to read checkpoint shards is not included"
    ),
]


class EstimateError(Exception):
    """A problem with the inputs, reported as one line naming the file."""


def resolve_config_path(path: str) -> Path | PretrainedRef:
    """A config.json file, or a backbone as training names it (directory, .gguf file, hub id)."""
    candidate = Path(path)
    if candidate.is_file() and candidate.suffix != ".gguf":
        return candidate
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate / "config.json"
    try:
        ref = parse_pretrained(path)
    except PretrainedRefError as error:
        raise EstimateError(
            f"{error} (pass a config.json file, a directory holding one, a .gguf file or a hub id)"
        ) from None
    if ref.gguf_file is None and candidate.is_dir():
        raise EstimateError(f"{candidate}: no config.json in this directory")
    return ref


def load_backbone_config(path: Path | PretrainedRef) -> PretrainedConfig:
    """Validate a JSON file ourselves first: transformers' errors for a broken file do not name it."""
    if isinstance(path, PretrainedRef):  # a .gguf file or a hub id (the local cache: HF_HUB_OFFLINE)
        try:
            return AutoConfig.from_pretrained(path.name_or_path, **path.kwargs())
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EstimateError(f"{path}: transformers cannot read its config ({str(error).splitlines()[0]})") from None
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EstimateError(f"{path}: not a readable JSON config ({error})") from error
    if not isinstance(values, dict) or "model_type" not in values:
        raise EstimateError(f"{path}: no 'model_type' field; is this a Hugging Face config.json?")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, TypeError) as error:
        raise EstimateError(f"{path}: transformers cannot read this config ({error})") from error


def build_meta_model(config: PretrainedConfig, hycam_config: H.HyCAMConfig, path: Path) -> torch.nn.Module:
    """The backbone and its HyCAM modules on the meta device: shapes only, no memory.

    apply_hycam creates its parameters with torch.empty and then moves them to the backbone's
    device; under the meta device context they are never allocated on the CPU at all."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        try:
            H.apply_hycam(model, hycam_config)
        except ValueError as error:
            raise EstimateError(f"{path}: {error}") from error
    return model


def largest_module_params(modules) -> int:
    """Parameters a module owns directly: the unit ZeRO-3 gathers (as DeepSpeed's estimator counts)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in modules), default=0)


def count_parameters(model: torch.nn.Module) -> dict[str, Any]:
    # model.parameters() yields a tied parameter once (Qwen2.5-0.5B ties embedding and LM head).
    # DeepSpeed's model_to_params de-duplicates by data_ptr, which is 0 for every meta tensor, so
    # its all_live estimator cannot be used on a meta model: the counts are made here instead.
    hycam_ids = {id(p) for p in H.hycam_parameters(model, trainable_only=False)}
    backbone = sum(p.numel() for p in model.parameters() if id(p) not in hycam_ids)
    trainable = sum(p.numel() for p in H.hycam_parameters(model))
    hycam_layers = [m for m in model.modules() if isinstance(m, HyCAMModulation)]
    backbone_modules = [m for m in model.modules() if not isinstance(m, HyCAMModulation)]
    per_layer = {name: p.numel() for name, p in hycam_layers[0].named_parameters()}
    return {
        "backbone_params": backbone,
        "hycam_params": sum(p.numel() for p in model.parameters() if id(p) in hycam_ids),
        "trainable_params": trainable,
        "trainable_percent_of_backbone": 100.0 * trainable / backbone,
        "hycam_layers": len(hycam_layers),
        "hycam_params_per_layer": per_layer,
        "largest_backbone_module_params": largest_module_params(backbone_modules),
        "largest_hycam_module_params": largest_module_params(hycam_layers),
    }


def deepspeed_estimator():
    """DeepSpeed's ZeRO-3 estimator, imported with stdout pointed at stderr: its logger binds
    stdout when created and warns about the accelerator on import, and stdout must carry only
    the report (--json output has to parse)."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    return estimate_zero3_model_states_mem_needs


def memory_rows(counts: dict[str, Any], num_nodes: int, gpus_per_node: int) -> list[dict[str, Any]]:
    """Bytes per GPU and per node CPU for each offload option.

    estimate_zero3_model_states_mem_needs is the function behind DeepSpeed's
    estimate_zero3_model_states_mem_needs_all_cold (which only prints); calling it directly gives
    the same figures as numbers."""
    estimate_zero3_model_states_mem_needs = deepspeed_estimator()
    total_gpus = num_nodes * gpus_per_node
    backbone_bytes = BYTES_PER_FROZEN_PARAM * counts["backbone_params"]
    gather_gpu = BYTES_PER_FROZEN_PARAM * counts["largest_backbone_module_params"]
    rows = []
    for offload_param, offload_optimizer in OFFLOAD_OPTIONS:
        hycam_cpu, hycam_gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=counts["trainable_params"],
            largest_layer_params=counts["largest_hycam_module_params"],
            num_gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            cpu_offload=offload_optimizer == "cpu",
            cpu_offload_params=offload_param == "cpu",
            zero_init=True,
        )
        on_gpu = offload_param == "none"
        backbone_gpu = backbone_bytes // total_gpus if on_gpu else 0
        backbone_cpu = 0 if on_gpu else backbone_bytes // num_nodes
        rows.append(
            {
                "offload_param": offload_param,
                "offload_optimizer": offload_optimizer,
                "gpu_backbone_bytes": backbone_gpu,
                "gpu_gather_bytes": gather_gpu,
                "gpu_hycam_deepspeed_bytes": hycam_gpu,
                "gpu_total_bytes": backbone_gpu + gather_gpu + hycam_gpu,
                "cpu_backbone_bytes": backbone_cpu,
                "cpu_hycam_deepspeed_bytes": hycam_cpu,
                "cpu_total_bytes": backbone_cpu + hycam_cpu,
            }
        )
    return rows


def full_finetune_reference(counts: dict[str, Any], num_nodes: int, gpus_per_node: int) -> dict[str, int]:
    """What DeepSpeed's estimator says if every backbone parameter trained (no offload): the
    figure one gets by running the estimator on the backbone as is, for comparison."""
    estimate_zero3_model_states_mem_needs = deepspeed_estimator()
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=counts["backbone_params"],
        largest_layer_params=counts["largest_backbone_module_params"],
        num_gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    return {"gpu_bytes": gpu, "cpu_bytes": cpu}


def estimate(config_path: str, hycam_config: H.HyCAMConfig, num_nodes: int, gpus_per_node: int) -> dict[str, Any]:
    path = resolve_config_path(config_path)
    config = load_backbone_config(path)
    counts = count_parameters(build_meta_model(config, hycam_config, path))
    return {
        "config": str(path),
        "model_type": config.model_type,
        "architectures": getattr(config, "architectures", None),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "hycam": {
            "num_specialized": hycam_config.num_specialized,
            "rank": hycam_config.rank,
            "shared": hycam_config.shared,
            "bias": hycam_config.bias,
        },
        "num_nodes": num_nodes,
        "gpus_per_node": gpus_per_node,
        "total_gpus": num_nodes * gpus_per_node,
        **counts,
        "memory": memory_rows(counts, num_nodes, gpus_per_node),
        "full_finetune_deepspeed": full_finetune_reference(counts, num_nodes, gpus_per_node),
        "assumptions": ASSUMPTIONS,
    }


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_report(report: dict[str, Any]) -> str:
    hycam = report["hycam"]
    per_layer = " + ".join(f"{name} {n:,}" for name, n in report["hycam_params_per_layer"].items())
    nodes = report["num_nodes"]
    lines = [
        f"config     {report['config']}",
        (
            f"backbone   {report['model_type']} {report['architectures']}: {report['num_hidden_layers']} layers, "
            f"hidden {report['hidden_size']}, vocab {report['vocab_size']}"
        ),
        (
            f"HyCAM      num_specialized={hycam['num_specialized']} rank={hycam['rank']} "
            f"shared={hycam['shared']} bias={hycam['bias']}"
        ),
        f"hardware   {nodes} node(s) x {report['gpus_per_node']} GPU(s) = {report['total_gpus']} GPU(s)",
        "",
        f"backbone parameters (frozen)   {report['backbone_params']:>16,}  {_billions(report['backbone_params'])}",
        (
            f"HyCAM parameters (trainable)   {report['trainable_params']:>16,}  "
            f"{_billions(report['trainable_params'])} = {report['trainable_percent_of_backbone']:.2f}% of the backbone"
        ),
        f"  per layer ({report['hycam_layers']} layers): {per_layer}",
        "",
        "ZeRO-3 model-state memory, GiB (zero_init=1). Per GPU: frozen bf16 backbone shard + largest",
        "gathered backbone module + DeepSpeed estimator on the HyCAM params. Per node CPU: offloaded",
        "backbone + DeepSpeed estimator on the HyCAM params.",
        (
            "offload_param offload_optim | GPU: backbone   gather  HyCAM(DS)    TOTAL "
            "| CPU/node: backbone HyCAM(DS)    TOTAL"
        ),
    ]
    for row in report["memory"]:
        lines.append(
            f"{row['offload_param']:>13} {row['offload_optimizer']:>13} |    "
            f"{_gib(row['gpu_backbone_bytes'])} {_gib(row['gpu_gather_bytes'])}   "
            f"{_gib(row['gpu_hycam_deepspeed_bytes'])} {_gib(row['gpu_total_bytes'])} |"
            f"         {_gib(row['cpu_backbone_bytes'])}  "
            f"{_gib(row['cpu_hycam_deepspeed_bytes'])} {_gib(row['cpu_total_bytes'])}"
        )
    full = report["full_finetune_deepspeed"]
    lines += [
        (
            "For comparison, DeepSpeed's estimator for full fine-tuning of the backbone (no offload): "
            f"{full['gpu_bytes'] / GIB:.2f} GiB per GPU, {full['cpu_bytes'] / GIB:.2f} GiB CPU per node."
        ),
        "",
        "Assumptions:",
        *(f"  - {a}" for a in report["assumptions"]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a backbone's config.json, a directory holding one, a .gguf file or a hub id org/name[@revision]",
    )
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--num-specialized", type=int, default=H.HyCAMConfig.num_specialized)
    parser.add_argument("--rank", type=int, default=H.HyCAMConfig.rank)
    parser.add_argument("--no-shared", action="store_true", help="specialised modules only (HyCAMConfig.shared=False)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.num_nodes < 1 or args.gpus_per_node < 1:
        parser.error("--num-nodes and --gpus-per-node must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        hycam_config = H.HyCAMConfig(num_specialized=args.num_specialized, rank=args.rank, shared=not args.no_shared)
        report = estimate(args.config, hycam_config, args.num_nodes, args.gpus_per_node)
    except (EstimateError, ValueError) as error:
        print(f"estimate.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
