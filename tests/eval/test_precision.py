"""Evaluation and generation at a chosen precision (hycam_ds.eval.precision, load_model's dtype):
auto is fp32 on CPU, bf16 is honoured there and really makes every parameter bf16 (a HyCAM or
LoRA adapter cast on loading), and the DeepSpeed inference config's bf16 section follows it."""

import json

import pytest
import torch

import hycam_ds as H
from hycam_ds.engine.cli import UsageError
from hycam_ds.eval.loading import ModelSpec, load_model, zero3_inference_config
from hycam_ds.eval.precision import dtype_name, placement, resolve_dtype
from hycam_ds.modeling.backbones import build_backbone

VOCAB = 97
REPO_ZERO3 = "ds_configs/zero3.json"


def test_auto_is_fp32_on_cpu_and_explicit_values_are_honoured():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert placement("auto", "cpu", zero3=False) == (cpu, torch.float32)
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float32) == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="--device cuda:1: CUDA is not available"):
        placement("auto", "cuda:1", zero3=False)
    assert placement("auto", "auto", zero3=False)[0] == torch.device("cpu")


def test_an_explicit_device_under_zero3_is_a_usage_error():
    with pytest.raises(UsageError, match="--device cpu: under ZeRO-3"):
        placement("auto", "cpu", zero3=True)


@pytest.mark.parametrize("enabled", ["auto", True, False])
def test_zero3_inference_config_follows_the_dtype(enabled):
    from pathlib import Path

    raw = json.loads((Path(__file__).resolve().parents[2] / REPO_ZERO3).read_text())
    raw["bf16"] = {"enabled": enabled}
    for dtype, expected in ((torch.bfloat16, True), (torch.float32, False)):
        config = zero3_inference_config(raw, dtype)
        assert config["bf16"] == {"enabled": expected}
        assert set(config) == {"zero_optimization", "bf16", "train_micro_batch_size_per_gpu"}
    assert raw["bf16"] == {"enabled": enabled}, "the caller's config is left as it was"


def _hycam_adapter(directory):
    """A HyCAM adapter with every weight random (nonzero modulation), saved from an fp32 model."""
    model = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in H.hycam_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    H.save_adapter(model, directory)
    return dict(H.hycam_named_parameters(model))


def test_bf16_loads_every_parameter_in_bf16_and_stays_close_to_fp32(tmp_path):
    saved = _hycam_adapter(tmp_path / "adapter")
    spec = ModelSpec(backbone_name="tiny-llama", vocab_size=VOCAB, adapter=str(tmp_path / "adapter"))
    fp32, _ = load_model(spec, torch.float32)
    bf16, _ = load_model(spec, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for name, p in H.hycam_named_parameters(bf16):
        assert torch.equal(p, saved[name].to(torch.bfloat16)), name
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits32, logits16 = fp32(ids).logits, bf16(ids).logits.float()
        with H.disable_hycam(bf16):
            backbone16 = bf16(ids).logits.float()
    # bf16 keeps 8 significant bits: logits of order 1 move by a few 1e-2 through two layers.
    torch.testing.assert_close(logits16, logits32, atol=0.05, rtol=0.05)
    assert (logits16 - backbone16).abs().max() > 0.1, "the adapter modulates in bf16 too"
    # Greedy decoding in bf16 with the KV cache runs the few-rows path at every step.
    prompt = ids[:, :5]
    out = bf16.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 11)


def test_a_lora_adapter_follows_the_backbone_dtype(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build_backbone("tiny-llama", VOCAB), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    spec = ModelSpec(backbone_name="tiny-llama", vocab_size=VOCAB, adapter=str(tmp_path / "lora"))
    model, _ = load_model(spec, torch.bfloat16)
    assert spec.kind() == "lora"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
