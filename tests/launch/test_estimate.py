"""launch/estimate.py run as a user runs it (a subprocess) on the shipped real-model configs.

The parameter counts computed on the meta device match the published sizes of the real models
(Llama-3.1-8B 8.03B, Llama-3.1-70B 70.6B, Qwen2.5-0.5B 0.49B, Mistral-7B-v0.3 7.25B): a wrong
field in a hand-written config.json (vocab, intermediate size, tied embeddings) would miss by
far more than 1%. Each run takes ~3 s (imports); the file stays well under a minute.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "estimate.py"
CONFIGS = ROOT / "launch" / "model_configs"

# Published totals, rounded as the model cards give them. The exact safetensors totals are
# 8,030,261,248 / 70,553,706,496 / 494,032,768 / 7,248,023,552.
KNOWN_SIZES = {
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "qwen2.5-0.5b": 0.49e9,
    "mistral-7b-v0.3": 7.25e9,
}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def hycam_per_layer(d: int, n: int, r: int, shared: bool) -> int:
    """shared d*d, spec_a N*r*d, spec_n N*r*r, spec_b N*r*d, router N*d (no biases: bias=False)."""
    return (d * d if shared else 0) + n * r * d + n * r * r + n * r * d + n * d


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_counts_match_known_sizes_and_formula(name):
    report = run_json("--config", str(CONFIGS / name / "config.json"), "--num-nodes", "2", "--gpus-per-node", "4")
    assert abs(report["backbone_params"] - KNOWN_SIZES[name]) / KNOWN_SIZES[name] < 0.01, report["backbone_params"]
    d, layers = report["hidden_size"], report["num_hidden_layers"]
    assert report["trainable_params"] == layers * hycam_per_layer(d, 5, 8, shared=True)
    assert report["total_gpus"] == 8
    none_none = report["memory"][0]
    assert (none_none["offload_param"], none_none["offload_optimizer"]) == ("none", "none")
    # the frozen backbone's bf16 shard is 2 bytes/param over all 8 GPUs
    assert none_none["gpu_backbone_bytes"] == 2 * report["backbone_params"] // 8
    assert (
        none_none["gpu_total_bytes"]
        == none_none["gpu_backbone_bytes"] + none_none["gpu_gather_bytes"] + none_none["gpu_hycam_deepspeed_bytes"]
    )


def test_directory_text_output_and_hycam_options():
    result = run(
        "--config",
        str(CONFIGS / "qwen2.5-0.5b"),
        "--gpus-per-node",
        "1",
        "--num-specialized",
        "3",
        "--rank",
        "4",
        "--no-shared",
    )
    assert result.returncode == 0, result.stderr
    expected = 24 * hycam_per_layer(896, 3, 4, shared=False)
    assert f"{expected:,}" in result.stdout
    assert "activations" in result.stdout and "bf16" in result.stdout  # the assumptions are stated


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run("--config", str(missing))
    assert result.returncode != 0
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_invalid_json_is_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    result = run("--config", str(bad))
    assert result.returncode != 0
    assert str(bad) in result.stderr and "Traceback" not in result.stderr


def test_unsupported_model_type_is_clear(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_layer": 2,
                "n_embd": 64,
                "n_head": 4,
                "vocab_size": 50257,
            }
        )
    )
    result = run("--config", str(gpt2))
    assert result.returncode != 0
    assert "model_type='gpt2'" in result.stderr and str(gpt2 / "config.json") in result.stderr
    assert "Traceback" not in result.stderr
