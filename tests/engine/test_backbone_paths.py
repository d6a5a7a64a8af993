"""The user's path: a Hugging Face backbone directory loaded with from_pretrained, partitioned by
ZeRO-3 as it loads, data tokenised with its own tokenizer; and the other DeepSpeed configs."""

import json

import pytest
from run_helpers import REPO, quick_args, run_train


@pytest.fixture(scope="module")
def local_backbone(tmp_path_factory, embedded_data):
    """A tiny Llama saved with save_pretrained beside the embedded tokenizer, as a hub download would be."""
    from data_pipeline import BuildConfig, build_dataset, load_tokenizer
    from hycam_ds.modeling.backbones import build_backbone

    root = tmp_path_factory.mktemp("backbone")
    tokenizer = load_tokenizer(embedded_data / "tokenizer")
    build_backbone("tiny-llama", len(tokenizer), seed=3).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data"
    build_dataset(
        BuildConfig(
            recipe=str(REPO / "data_pipeline/recipes/embedded.yaml"),
            out=str(data),
            tokenizer=str(root / "model"),
            seq_len=128,
            progress=False,
        )
    )
    return root / "model", data


@pytest.mark.distributed
def test_from_pretrained_backbone_under_zero3_two_ranks(tmp_path, local_backbone):
    model_dir, data = local_backbone
    run_train(
        quick_args(tmp_path / "run", data, steps=3, **{"model.path": str(model_dir), "logging.eval_every": 0}), nprocs=2
    )
    info = json.loads((tmp_path / "run/partition.json").read_text())
    assert info["zero_stage"] == 3 and len(info["frozen_bytes_per_rank"]) == 2
    run_info = json.loads((tmp_path / "run/run_info.json").read_text())
    assert (
        run_info["model"]["path"] == str(model_dir) and run_info["trainable_parameters"] < run_info["total_parameters"]
    )
    assert (tmp_path / "run/adapter/adapter.safetensors").is_file()


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3_offload.json"])
def test_other_deepspeed_configs_train(tmp_path, embedded_data, ds_config):
    run_train(
        [
            "--ds_config",
            str(REPO / "ds_configs" / ds_config),
            *quick_args(
                tmp_path / "run", embedded_data, steps=3, **{"logging.eval_every": 0, "model.name": "tiny-llama"}
            ),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
