"""The real entry point, end to end: 2 ranks under the deepspeed launcher with ZeRO-3 on CPU,
telemetry, checkpoints, exported adapter, exact resume, and ZeRO-3 partitioning."""

import json
import math
import re

import pytest
import torch
from run_helpers import quick_args, run_train, train_losses

import hycam_ds as H
from hycam_ds.modeling.backbones import build_backbone

REQUIRED_TAGS = {
    "train/loss",
    "train/lm_loss",
    "train/balance_loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "routing/layer_0/expert_0",
    "routing/layer_0/entropy",
    "routing/layer_0/top_0",
    "modulation/layer_0/shared",
    "modulation/layer_0/specialized",
    "train/task/arithmetic/loss",
    "eval/loss",
    "eval/arithmetic/ppl",
    "eval/retrieval/loss",
}


@pytest.mark.distributed
def test_two_rank_zero3_run_and_exact_resume(tmp_path, embedded_data):
    common = dict(steps=6, **{"checkpoint.save_every": 2, "logging.eval_every": 3})
    straight = tmp_path / "straight"
    result = run_train(quick_args(straight, embedded_data, **common), nprocs=2)
    assert "terminate called" not in result.stderr + result.stdout, "unclean exit of the process group"

    losses = train_losses(straight)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in losses)
    # TensorBoard event files hold the tags; metrics.jsonl the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert REQUIRED_TAGS <= tags, f"missing TensorBoard tags: {sorted(REQUIRED_TAGS - tags)}"
    assert "train/weights_checksum" not in tags, "a debugging aid, off unless logging.weights_checksum=true"
    assert "eval/routing_heatmap" in events.Tags()["images"]
    assert list((straight / "plots").glob("routing_heatmap_step_*.png"))
    # Config and DeepSpeed JSON saved; checkpoints complete, pointer last, keep_last respected.
    resolved = json.loads((straight / "ds_config.json").read_text())
    assert resolved["train_batch_size"] == 2 * 1 * 2 and resolved["zero_optimization"]["stage"] == 3
    assert (straight / "checkpoints/latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]
    # The exported adapter loads into a fresh copy of the backbone and changes its output.
    vocab = json.loads((straight / "adapter/manifest.json").read_text())
    model = build_backbone("small-llama", 3000).eval()
    ids = torch.randint(0, 3000, (1, 12))
    before = model(ids).logits
    H.load_adapter(model, straight / "adapter")
    assert not torch.allclose(model(ids).logits, before)
    assert vocab["backbone"]["model_type"] == "llama"

    # Exact resume: stop at step 3 (after its checkpoint), resume=auto, finish: same losses bit for bit.
    resumed = tmp_path / "resumed"
    run_train(quick_args(resumed, embedded_data, **common, **{"optim.stop_at_step": 3}), nprocs=2)
    assert [s for s, _ in train_losses(resumed)] == [1, 2, 3]
    resume = {"checkpoint.resume": "auto", "logging.progress": "true"}
    result = run_train(quick_args(resumed, embedded_data, **common, **resume), nprocs=2)
    assert "resumed from step 3" in result.stderr + result.stdout
    assert train_losses(resumed) == losses
    # Output to a file or pipe (a batch job's log): progress as lines, never a carriage-return bar.
    assert "\r" not in result.stderr + result.stdout
    assert re.search(r"train hycam: 6/6 \(100%\) \[.*step.*\]", result.stderr + result.stdout)


@pytest.mark.distributed
def test_zero3_partitions_the_backbone(tmp_path, embedded_data):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(
        quick_args(one, embedded_data, steps=2, **{"checkpoint.export_adapter": "false", "logging.eval_every": 0}),
        nprocs=1,
    )
    run_train(
        quick_args(two, embedded_data, steps=2, **{"checkpoint.export_adapter": "false", "logging.eval_every": 0}),
        nprocs=2,
    )
    single = json.loads((one / "partition.json").read_text())["frozen_bytes_per_rank"]
    double = json.loads((two / "partition.json").read_text())["frozen_bytes_per_rank"]
    assert len(single) == 1 and len(double) == 2
    for per_rank in double:
        assert 0.45 <= per_rank / single[0] <= 0.55, (single, double)


@pytest.mark.distributed
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, embedded_data):
    import time

    started = time.perf_counter()
    result = run_train(
        quick_args(tmp_path / "run", embedded_data, steps=6),
        nprocs=2,
        check=False,
        env={"HYCAM_FAULT": "raise:rank=1:step=2", "HYCAM_DIST_TIMEOUT_S": "30"},
    )
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "injected failure on rank 1 at step 2" in result.stderr + result.stdout
    assert elapsed < 90, f"the job took {elapsed:.0f}s to end after a rank failed"
