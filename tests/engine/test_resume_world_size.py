"""Resuming at another world size, as a SLURM job requeued onto fewer or more nodes does, through the
real entry point (checkpoint.resume=auto): a checkpoint saved at N ranks continues at M ranks. The
global batch is kept equal (micro batch 2 x grad_accum x world size), so the data stream continues
where it stopped (the batch fingerprints of every step equal the uninterrupted run's: no row repeated
or skipped) and the LM loss of the resumed steps equals the uninterrupted run's at M ranks up to the
order of fp32 reductions. method=cam: HyCAM's shared CAM, no router, hence no per-rank noise."""

import json
import math
from pathlib import Path

import pytest
from run_helpers import quick_args, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(3600)]  # 2 launches per test, 2 more in the fixture
STEPS, STOP = 6, 3
FINGERPRINT_MOD = 2**24  # each rank's fingerprint is reduced mod 2**24 before the sum over ranks
LOSS_RTOL = 1e-4  # fp32 reduction order (gradient all-reduce vs accumulation), compounded over a few steps


def _args(run_dir, data_dir, world, global_batch=4, ds_config="zero3.json", **extra):
    return ["--ds_config", f"ds_configs/{ds_config}"] + quick_args(
        run_dir,
        data_dir,
        steps=STEPS,
        **{
            "optim.grad_accum": global_batch // (2 * world),
            "model.name": "tiny-llama",
            "method": "cam",
            "logging.eval_every": 0,
            "checkpoint.export_adapter": "false",
            "logging.weights_checksum": "true",  # the weights after each step, compared below
            **extra,
        },
    )


def _trace(run_dir):
    """(step, lm loss, batch fingerprint mod 2**24, sum of the trainable weights) of the last record
    of each step."""
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            by_step[record["step"]] = record
    return [
        (
            s,
            by_step[s]["train/lm_loss"],
            int(by_step[s]["data/batch_fingerprint"]) % FINGERPRINT_MOD,
            by_step[s]["train/weights_checksum"],
        )
        for s in sorted(by_step)
    ]


def _resume_across(tmp_path, data, before, after, global_batch=4, ds_config="zero3.json"):
    run_dir = tmp_path / f"resume_{before}_to_{after}"
    stop, resume = {"optim.stop_at_step": STOP}, {"checkpoint.resume": "auto"}
    run_train(_args(run_dir, data, before, global_batch, ds_config, **stop), nprocs=before)
    result = run_train(_args(run_dir, data, after, global_batch, ds_config, **resume), nprocs=after)
    output = result.stdout + result.stderr
    assert f"resumed from step {STOP}" in output and f"saved with {before} ranks, resharded for {after}" in output
    assert f"world size {before} -> {after}" in output, "the change of world size is announced"
    assert not list((run_dir / "checkpoints").glob(".universal-*")), "the converted checkpoint was left behind"
    return _trace(run_dir)


def _assert_continues(resumed, straight, weights_from=1):
    assert [s for s, *_ in resumed] == list(range(1, STEPS + 1))
    assert [f for _, _, f, _ in resumed] == [f for _, _, f, _ in straight], "a row was repeated or skipped"
    for (step, loss, _, weights), (_, expected, _, expected_weights) in zip(resumed, straight):
        assert math.isclose(loss, expected, rel_tol=LOSS_RTOL), (step, loss, expected)
        # the weights after each step: a resume that lost the Adam moments or the master weights shows here
        if step >= weights_from:
            assert math.isclose(weights, expected_weights, rel_tol=LOSS_RTOL, abs_tol=1e-9), (step, weights)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_data):
    """The uninterrupted runs at 1 and 2 ranks, same global batch."""
    root = tmp_path_factory.mktemp("straight")
    traces = {}
    for world in (1, 2):
        run_train(_args(root / f"world{world}", embedded_data, world), nprocs=world)
        traces[world] = _trace(root / f"world{world}")
    _assert_continues(traces[2], traces[1])  # the setup itself: same rows, same losses at either world size
    return traces


def _row(fault_table, before, after, detail=""):
    fault_table.append(
        {
            "item": "12 requeued on another allocation",
            "case": f"checkpoint of {before} ranks resumed at {after} (resume=auto){detail}",
            "trials": 1,
            "passed": 1,
            "detail": f"same rows (batch fingerprints), losses and weights of the uninterrupted {after}-rank run",
        }
    )


def test_two_ranks_resume_at_one(tmp_path, embedded_data, straight, fault_table):
    _assert_continues(_resume_across(tmp_path, embedded_data, 2, 1), straight[1])
    _row(fault_table, 2, 1)


def test_one_rank_resumes_at_two(tmp_path, embedded_data, straight, fault_table):
    _assert_continues(_resume_across(tmp_path, embedded_data, 1, 2), straight[2])
    _row(fault_table, 1, 2)


@pytest.mark.slow
def test_two_ranks_resume_at_three(tmp_path, embedded_data, fault_table):
    """More ranks than before, none of the old ranks' ZeRO partitions lining up with the new ones."""
    straight = tmp_path / "straight3"
    run_train(_args(straight, embedded_data, 3, global_batch=12), nprocs=3)
    _assert_continues(_resume_across(tmp_path, embedded_data, 2, 3, global_batch=12), _trace(straight))
    _row(fault_table, 2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3_offload.json"])
def test_other_zero_configs_resume_at_another_world_size(tmp_path, embedded_data, ds_config, fault_table):
    """ZeRO-2 (parameters replicated, optimizer state partitioned) and ZeRO-3 with the optimizer on the
    CPU. The weights are compared after the resume only: under ZeRO-2 every rank holds every
    parameter, and train/weights_checksum sums them over the ranks."""
    straight = tmp_path / "straight1"
    run_train(_args(straight, embedded_data, 1, ds_config=ds_config), nprocs=1)
    resumed = _resume_across(tmp_path, embedded_data, 2, 1, ds_config=ds_config)
    _assert_continues(resumed, _trace(straight), weights_from=STOP + 1)
    _row(fault_table, 2, 1, f", {ds_config}")
