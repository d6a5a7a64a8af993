"""Invalid experiment settings are rejected before any model or data is loaded, naming the field."""

import json
import time

import pytest
from run_helpers import REPO, run_train

from hycam_ds.engine.ds_config import load_ds_config, resolve_ds_config
from hycam_ds.engine.train_config import ConfigError, TrainConfig, load_train_config

INVALID = [
    (["unknown_top=1"], "unknown key unknown_top"),
    (["optim.lrr=0.1"], "unknown key optim.lrr"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.lr=-1"], "optim.lr: expected > 0"),
    (["optim.max_steps=2.5"], "optim.max_steps: expected an integer"),
    (["optim.max_steps=0"], "optim.max_steps: expected > 0"),
    (["optim.micro_batch_size=0"], "optim.micro_batch_size"),
    (["optim.grad_accum=true"], "optim.grad_accum: expected an integer"),
    (["optim.warmup_steps=500"], "optim.warmup_steps"),
    (["optim.stop_at_step=999"], "optim.stop_at_step"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9, x]"], "optim.betas[1]: expected a number"),
    (["optim.precision=fp16"], "optim.precision"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    (["method=adapterx"], "method"),
    (["model.name=gpt-5"], "model.name"),
    (["model.path=/nonexistent/backbone"], "model.path"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation"),
    (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing: expected true/false"),
    (["data.dir=/nonexistent/data"], "data.dir"),
    (["data.recipe=/nonexistent/recipe.yaml"], "data.recipe"),
    (["data.data_root=/nonexistent/root"], "data.data_root"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data.task_sampling=random"], "data.task_sampling"),
    (["data.template=chatml"], "data.template: 'chatml' is not one of"),
    (["data.template=chat"], "data.template: chat renders with the backbone tokenizer's chat template"),
    (["hycam.tau=0"], "hycam.tau=0.0: expected a temperature > 0"),
    (["hycam.routing=top2"], "hycam.routing: 'top2' is not one of"),
    (["hycam.num_specialized=-2"], "hycam.num_specialized=-2: expected an integer >= 0"),
    (["hycam.site=mlp"], "hycam.site"),
    (["hycam.num_specialized=0", "hycam.shared=false"], "hycam: num_specialized=0 with shared=False leaves no"),
    (["hycam.rank=x"], "hycam.rank: expected an integer"),
    (["logging.collapse_threshold=1.5"], "logging.collapse_threshold"),
    (["logging.log_every=0"], "logging.log_every"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume"),
    (["checkpoint.save_every=-1"], "checkpoint.save_every"),
    (["lora.r=0"], "lora.r"),
    (["lora.target_modules=q_proj"], "lora.target_modules: expected a list"),
    (["optim=3"], "optim: expected a mapping"),
    (["optim.lr"], "is not key=value"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[o[0] for o, _ in INVALID])
def test_invalid_override_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_train_config(None, overrides)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_train_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate"):
        load_train_config(typo)


def test_yaml_and_overrides_compose():
    cfg = load_train_config(REPO / "launch/configs/embedded.yaml", ["optim.lr=5e-4", "hycam.num_specialized=3"])
    assert cfg.optim.lr == 5e-4 and cfg.hycam.num_specialized == 3
    assert load_train_config(None, ["method=cam"]).hycam.num_specialized == 0


def test_data_template_is_part_of_the_data_cache_key():
    from hycam_ds.engine.trainer import data_cache_key

    cfg = TrainConfig()
    plain = data_cache_key(cfg)
    cfg.data.template = "chat"
    chat = data_cache_key(cfg)
    cfg.data.template = "alpaca"
    assert len({plain, chat, data_cache_key(cfg)}) == 3  # a build with another template never reuses a cached one


def test_ds_batch_sizes_must_agree_with_yaml_and_world_size():
    raw = load_ds_config(REPO / "ds_configs/zero3.json")
    cfg = TrainConfig()
    resolved = resolve_ds_config(raw, cfg, world_size=4, bf16=False)
    assert resolved["train_batch_size"] == cfg.optim.micro_batch_size * cfg.optim.grad_accum * 4
    assert resolved["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert resolved["scheduler"]["params"]["total_num_steps"] == cfg.optim.max_steps
    for key, value, field in (
        ("train_batch_size", 999, "train_batch_size"),
        ("train_micro_batch_size_per_gpu", 7, "optim.micro_batch_size"),
        ("gradient_accumulation_steps", 3, "optim.grad_accum"),
        ("gradient_clipping", 5.0, "optim.grad_clip"),
    ):
        with pytest.raises(ConfigError, match=field):
            resolve_ds_config({**raw, key: value}, cfg, world_size=4, bf16=False)
    with pytest.raises(ConfigError, match="bf16.enabled"):
        resolve_ds_config({**raw, "bf16": {"enabled": True}}, cfg, world_size=1, bf16=False)
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config({**raw, "fp16": {"enabled": True}}, cfg, world_size=1, bf16=False)
    with pytest.raises(ConfigError, match="zero_optimization.sub_group_size"):
        resolve_ds_config(
            {**raw, "zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, cfg, world_size=1, bf16=False
        )


def test_entry_point_rejects_before_loading_anything(tmp_path):
    started = time.perf_counter()
    result = run_train([f"run_dir={tmp_path}/run", "optim.micro_batch_size=zero"], check=False)
    assert result.returncode == 2
    assert "optim.micro_batch_size: expected an integer" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for an invalid configuration"
    bad_json = tmp_path / "ds.json"
    bad_json.write_text(json.dumps({"train_batch_size": 3, "zero_optimization": {"stage": 3}}))
    result = run_train(
        ["--ds_config", str(bad_json), f"run_dir={tmp_path}/run2", "optim.micro_batch_size=2"], check=False
    )
    assert result.returncode == 2 and "train_batch_size=3 disagrees" in result.stderr
    assert time.perf_counter() - started < 120
