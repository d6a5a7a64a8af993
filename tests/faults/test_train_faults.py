"""Fault battery, trainer side: kill -9 of a rank, kill during checkpoint save, NaN/inf steps,
hostile checkpoint files, a hanging rank. Every case runs the real launch/train.py with 2 ranks
under the deepspeed launcher (ZeRO-3, CPU). `--runslow` runs the long variants (20+ trials)."""

import json
import os
import pickle
import random
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import quick_args, run_train

pytestmark = [pytest.mark.faults, pytest.mark.distributed]
STEPS, SAVE_EVERY = 8, 2


def _records(run_dir):
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _trace(run_dir):
    return [(r["step"], r["train/lm_loss"], r["data/batch_fingerprint"]) for r in _records(run_dir)]


def _args(run_dir, data_dir, **extra):
    # tiny-llama: a trial's time is then mostly process start-up, so the long variants stay affordable
    return quick_args(
        run_dir,
        data_dir,
        steps=STEPS,
        **{
            "checkpoint.save_every": SAVE_EVERY,
            "logging.eval_every": 0,
            "checkpoint.export_adapter": "false",
            "model.name": "tiny-llama",
            **extra,
        },
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, embedded_data):
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    run_train(_args(run_dir, embedded_data), nprocs=2)
    trace = _trace(run_dir)
    assert [s for s, _, _ in trace] == list(range(1, STEPS + 1))
    return trace


def _trials(request, short, long):
    return long if request.config.getoption("--runslow") else short


@pytest.mark.timeout(3600)  # the long variant: 20 trials of two 2-rank runs each
def test_kill_rank_at_random_steps_then_resume_is_exact(request, tmp_path, embedded_data, baseline, fault_table):
    rng = random.Random(7)
    trials = _trials(request, 2, 20)
    passed = 0
    for trial in range(trials):
        run_dir = tmp_path / f"kill{trial}"
        rank, step = rng.randint(0, 1), rng.randint(2, STEPS)
        killed = run_train(
            _args(run_dir, embedded_data), nprocs=2, check=False, env={"HYCAM_FAULT": f"kill:rank={rank}:step={step}"}
        )
        assert killed.returncode != 0, f"trial {trial}: the job survived a SIGKILL of rank {rank}"
        run_train(_args(run_dir, embedded_data, **{"checkpoint.resume": "auto"}), nprocs=2)
        trace = _trace(run_dir)
        assert trace == baseline, f"trial {trial} (kill rank {rank} at step {step}): resumed losses or batches differ"
        passed += 1
    fault_table.append(
        {
            "item": "1 kill -9 of a rank",
            "case": "random rank and step, then resume=auto",
            "trials": trials,
            "passed": passed,
            "detail": "per-step losses bit-identical, batch fingerprints identical (no sample repeated or skipped)",
        }
    )


SAVE_POINTS = [(1, "engine"), (0, "rank_files"), (0, "manifest"), (0, "published")]


@pytest.mark.timeout(3600)
def test_kill_during_checkpoint_save_never_resumes_from_a_partial_checkpoint(
    request, tmp_path, embedded_data, baseline, fault_table
):
    from hycam_ds.engine import checkpointing as ckpt

    cases = (
        SAVE_POINTS
        if not request.config.getoption("--runslow")
        else [
            (rank, point, step)
            for step in (4, 6)
            for rank in (0, 1)
            for point in ("engine", "rank_files", "manifest", "published")
            if not (rank == 1 and point in ("manifest", "published"))
        ]
        + [(0, p, 2) for p in ("engine", "rank_files", "manifest", "published")]
        + [(1, "engine", 2), (1, "rank_files", 2), (1, "engine", 8), (0, "manifest", 8)]
    )
    passed = 0
    for trial, case in enumerate(cases):
        rank, point, step = (*case, 4) if len(case) == 2 else case
        run_dir = tmp_path / f"save{trial}"
        killed = run_train(
            _args(run_dir, embedded_data),
            nprocs=2,
            check=False,
            env={"HYCAM_FAULT": f"kill_save:rank={rank}:step={step}:point={point}"},
        )
        assert killed.returncode != 0
        root = run_dir / "checkpoints"
        latest = ckpt.resolve_checkpoint(run_dir, "auto")
        expected_previous = None if step == SAVE_EVERY else f"step_{step - SAVE_EVERY:08d}"
        if expected_previous is None:
            assert latest is None, f"{point}: a partial first checkpoint became latest"
        else:
            assert latest.name == expected_previous, (point, latest)
            ckpt.verify(latest)  # the previous complete checkpoint is intact
        run_train(_args(run_dir, embedded_data, **{"checkpoint.resume": "auto"}), nprocs=2)
        assert _trace(run_dir) == baseline, f"kill in save ({point}, rank {rank}, step {step}): resumed run differs"
        assert not list(root.glob(".staging-*")), "temporary directories left after the next successful save"
        passed += 1
    fault_table.append(
        {
            "item": "2 kill during checkpoint save",
            "case": "SIGKILL at engine / rank_files / manifest / published",
            "trials": len(cases),
            "passed": passed,
            "detail": (
                "latest always a complete checkpoint (the previous one); resumed losses identical; "
                "no .staging-* left"
            ),
        }
    )


@pytest.mark.parametrize(
    "fault,precision",
    [("nan_loss:step=3", "fp32"), ("nan_grad:rank=0:step=3", "fp32"), ("nan_grad:rank=1:step=3", "bf16")],
)
def test_non_finite_step_is_skipped_on_every_rank(tmp_path, embedded_data, fault, precision, fault_table):
    extra = {"optim.precision": precision, "logging.weights_checksum": "true"}
    steps = STEPS if precision == "fp32" else 4
    result = run_train(
        quick_args(
            tmp_path / "run",
            embedded_data,
            steps=steps,
            **{"checkpoint.save_every": 0, "logging.eval_every": 0, "checkpoint.export_adapter": "false", **extra},
        ),
        nprocs=2,
        env={"HYCAM_FAULT": fault},
    )
    output = result.stdout + result.stderr
    assert (
        "rank 0: step 3 skipped" in output and "rank 1: step 3 skipped" in output
    ), "both ranks must detect it at the same step"
    records = {r["step"]: r for r in _records(tmp_path / "run")}
    assert records[3]["train/step_skipped"] == 1.0 and records[3]["train/skipped_steps"] == 1
    assert (
        records[3]["train/weights_checksum"] == records[2]["train/weights_checksum"]
    ), "the bad step changed the weights"
    assert (
        records[4]["train/weights_checksum"] != records[3]["train/weights_checksum"]
    ), "training must continue after it"
    assert all(records[s]["train/step_skipped"] == 0.0 for s in records if s != 3)
    fault_table.append(
        {
            "item": "7 NaN / inf",
            "case": f"{fault} ({precision})",
            "trials": 1,
            "passed": 1,
            "detail": "skipped on both ranks at step 3, weights unchanged, counted in train/skipped_steps",
        }
    )


def test_consecutive_bad_steps_stop_after_saving_the_last_good_weights(tmp_path, embedded_data, fault_table):
    from hycam_ds.engine import checkpointing as ckpt

    faults = ",".join(f"nan_loss:step={s}" for s in range(3, 9))
    result = run_train(
        quick_args(
            tmp_path / "run",
            embedded_data,
            steps=STEPS,
            **{
                "checkpoint.save_every": 0,
                "logging.eval_every": 0,
                "optim.max_bad_steps": 2,
                "logging.weights_checksum": "true",
            },
        ),
        nprocs=2,
        check=False,
        env={"HYCAM_FAULT": faults},
    )
    assert result.returncode == 3, result.stderr[-2000:]
    records = {r["step"]: r for r in _records(tmp_path / "run")}
    assert max(records) == 4 and records[4]["train/weights_checksum"] == records[2]["train/weights_checksum"]
    latest = ckpt.resolve_checkpoint(tmp_path / "run", "auto")
    assert latest.name == "step_00000004"
    ckpt.verify(latest)
    fault_table.append(
        {
            "item": "7 NaN / inf",
            "case": "2 consecutive non-finite steps (max_bad_steps=2)",
            "trials": 1,
            "passed": 1,
            "detail": "exit 3 at step 4 with a checkpoint of the last good weights",
        }
    )


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_checkpoint_files_are_never_executed(tmp_path, embedded_data, fault_table):
    import hashlib

    from hycam_ds.engine import checkpointing as ckpt

    run_dir = tmp_path / "run"
    run_train(_args(run_dir, embedded_data, **{"optim.max_steps": 2, "optim.warmup_steps": 1}), nprocs=1)
    checkpoint = ckpt.resolve_checkpoint(run_dir, "auto")
    marker = tmp_path / "pwned"
    engine_file = next((checkpoint / "engine").glob("*optim_states.pt"))
    engine_file.write_bytes(pickle.dumps(_Exploit(marker)))
    refused = 0
    # 1. the manifest catches the swap
    result = run_train(
        _args(run_dir, embedded_data, **{"optim.max_steps": 4, "checkpoint.resume": "auto"}), nprocs=1, check=False
    )
    refused += result.returncode != 0 and "does not match the checkpoint manifest" in result.stderr
    # 2. even with the manifest forged to match, the file is refused unexecuted (weights_only check)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    rel = str(engine_file.relative_to(checkpoint))
    manifest["files"][rel] = {
        "bytes": engine_file.stat().st_size,
        "sha256": hashlib.sha256(engine_file.read_bytes()).hexdigest(),
    }
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    result = run_train(
        _args(run_dir, embedded_data, **{"optim.max_steps": 4, "checkpoint.resume": "auto"}), nprocs=1, check=False
    )
    refused += result.returncode != 0 and "refused, not plain tensor data" in result.stderr
    assert not marker.exists(), "a pickle offered as a checkpoint was executed"
    # 3. a planted extra file
    (checkpoint / "engine" / "extra.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ckpt.CheckpointError, match="not in the checkpoint manifest"):
        ckpt.verify(checkpoint)
    refused += 1
    # 4. names and paths that escape the run directory
    (run_dir / "checkpoints" / "latest").write_text("../../../etc\n")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this run"):
        ckpt.resolve_checkpoint(run_dir, "auto")
    refused += 1
    for escape in ("/etc", str(run_dir / "checkpoints" / ".." / ".."), str(tmp_path)):
        with pytest.raises(ckpt.CheckpointError, match="not a checkpoint directory of this run"):
            ckpt.resolve_checkpoint(run_dir, escape)
        refused += 1
    assert refused == 7 and not marker.exists()
    fault_table.append(
        {
            "item": "8 hostile files",
            "case": "pickle as checkpoint (plain, forged manifest, planted), escaping pointer/paths",
            "trials": 7,
            "passed": refused,
            "detail": "all refused, exploit never ran",
        }
    )


def test_hanging_rank_ends_the_job_within_the_timeout(tmp_path, embedded_data, fault_table):
    started = time.perf_counter()
    result = run_train(
        _args(tmp_path / "run", embedded_data),
        nprocs=2,
        check=False,
        env={"HYCAM_FAULT": "hang:rank=1:step=3", "HYCAM_DIST_TIMEOUT_S": "20"},
    )
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert elapsed < 120, f"the job took {elapsed:.0f}s to end after a rank hung"
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"orphan processes: {leftovers}"
    fault_table.append(
        {
            "item": "9 rank dies or hangs",
            "case": "rank 1 hangs at step 3 (timeout 20 s)",
            "trials": 1,
            "passed": 1,
            "detail": f"job failed after {elapsed:.0f} s, no orphan processes",
        }
    )
