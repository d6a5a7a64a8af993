"""Ctrl-C during training: every rank stops at the same step, a checkpoint is written, rank 0 says
where and how to resume (exit 4 without a launcher), and the resumed run reproduces the
uninterrupted run's per-step losses exactly. A second Ctrl-C aborts at once (exit 130).

At 2 ranks the Ctrl-C is what a terminal sends: SIGINT to the whole foreground process group (the
deepspeed launcher and both ranks; the launcher then also sends each rank SIGTERM), injected by
rank 0 at the start of a step (HYCAM_FAULT=sigint). At 1 rank, without a launcher, the test sends
it from outside while the run trains."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import REPO, quick_args, run_train

pytestmark = [pytest.mark.faults]
STEPS = 8
MESSAGE = re.compile(
    r"train\.py: interrupted by Ctrl-C at step (\d+) of \d+; checkpoint saved in (\S+); to resume, run (.+)$",
    re.MULTILINE,
)


def _args(run_dir, data_dir, steps=STEPS, **extra):
    return quick_args(
        run_dir,
        data_dir,
        steps=steps,
        **{
            "checkpoint.save_every": 4,
            "logging.eval_every": 0,
            "logging.eval_batches": 1,
            "checkpoint.export_adapter": "false",
            "model.name": "tiny-llama",
            **extra,
        },
    )


def _trace(run_dir):
    """(step, lm loss) of the last record of each train step (a resumed run rewrites those after its checkpoint)."""
    by_step = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            by_step[record["step"]] = record["train/lm_loss"]
    return sorted(by_step.items())


def _no_traceback_of_ours(output: str) -> bool:
    """No traceback through the project's code (the deepspeed launcher's own process prints one for
    its KeyboardInterrupt: that is DeepSpeed's runner, not a rank)."""
    return not re.search(r'File "[^"]*(launch/train\.py|hycam_ds/)', output)


def _checkpoint_at(run_dir, step):
    from hycam_ds.engine import checkpointing as ckpt

    latest = ckpt.resolve_checkpoint(Path(run_dir), "auto")
    assert latest is not None and latest.name == f"step_{step:08d}", latest
    ckpt.verify(latest)
    return latest


@pytest.fixture(scope="module")
def baseline_two(tmp_path_factory, embedded_data):
    run_dir = tmp_path_factory.mktemp("ctrlc2") / "straight"
    run_train(_args(run_dir, embedded_data), nprocs=2)
    return _trace(run_dir)


@pytest.mark.distributed
def test_ctrl_c_at_two_ranks_saves_the_agreed_step_and_resumes_exactly(
    tmp_path, embedded_data, baseline_two, fault_table
):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = run_train(
        _args(run_dir, embedded_data), nprocs=2, check=False, env={"HYCAM_FAULT": "sigint:rank=0:step=3"}
    )
    output = result.stdout + result.stderr
    found = MESSAGE.findall(result.stderr)
    assert len(found) == 1, f"one message from rank 0 expected:\n{result.stderr[-4000:]}"
    step, where, command = found[0]
    assert int(step) == 3 and Path(where).name == "step_00000003"
    assert command.endswith("checkpoint.resume=auto") and "launch/train.py" in command
    assert "rank 0: preemption warning" in output and "rank 1: preemption warning" in output
    assert _no_traceback_of_ours(output), output[-4000:]
    _checkpoint_at(run_dir, 3)
    assert [s for s, _ in _trace(run_dir)] == [1, 2, 3]
    stopped = time.perf_counter() - started
    resumed = run_train(_args(run_dir, embedded_data, **{"checkpoint.resume": "auto"}), nprocs=2)
    assert "resumed from step 3" in resumed.stdout + resumed.stderr
    assert _trace(run_dir) == baseline_two, "resumed losses differ from the uninterrupted run"
    fault_table.append(
        {
            "item": "10 Ctrl-C",
            "case": "SIGINT to the launcher's process group at step 3, 2 ranks, then resume=auto",
            "trials": 1,
            "passed": 1,
            "detail": (
                f"both ranks stopped at step 3, checkpoint step_00000003 verified, one line naming it and the "
                f"resume command ({stopped:.0f} s); resumed losses bit-identical"
            ),
        }
    )


def _popen_train(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYCAM_DIST_TIMEOUT_S": "120"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch/train.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(process, run_dir, step, timeout=300):
    deadline = time.monotonic() + timeout
    metrics = Path(run_dir) / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step} (exit {process.poll()})")


def _finish(process, timeout=300):
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise


def test_ctrl_c_at_one_rank_from_outside_then_resume_is_exact(tmp_path, embedded_data, fault_table):
    steps = 12
    straight = tmp_path / "straight"
    run_train(_args(straight, embedded_data, steps=steps), nprocs=1)
    run_dir = tmp_path / "run"
    process = _popen_train(_args(run_dir, embedded_data, steps=steps))
    _wait_for_step(process, run_dir, 2)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal ...
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGTERM)  # ... and the SIGTERM a launcher sends after it: not a second Ctrl-C
    _, stderr = _finish(process)
    assert process.returncode == 4, stderr[-4000:]
    found = MESSAGE.findall(stderr)
    assert len(found) == 1, stderr[-4000:]
    step, where, command = int(found[0][0]), Path(found[0][1]), found[0][2]
    assert command.startswith("python ") and command.endswith("checkpoint.resume=auto")
    assert "Traceback" not in stderr
    _checkpoint_at(run_dir, step)
    assert where.name == f"step_{step:08d}" and 2 <= step <= steps
    run_train(_args(run_dir, embedded_data, steps=steps, **{"checkpoint.resume": "auto"}), nprocs=1)
    assert _trace(run_dir) == _trace(straight), "resumed losses differ from the uninterrupted run"
    fault_table.append(
        {
            "item": "10 Ctrl-C",
            "case": "SIGINT (then SIGTERM) from outside, 1 process, then resume=auto",
            "trials": 1,
            "passed": 1,
            "detail": f"exit 4 at step {step}, checkpoint verified, one line; resumed losses bit-identical",
        }
    )


def test_second_ctrl_c_aborts_at_once_without_a_traceback(tmp_path, embedded_data, fault_table):
    run_dir = tmp_path / "run"
    result = run_train(
        _args(run_dir, embedded_data, **{"checkpoint.save_every": 2}),
        nprocs=1,
        check=False,
        env={"HYCAM_FAULT": "sigint_twice:step=4"},
    )
    assert result.returncode == 130, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert "second Ctrl-C: aborted without a checkpoint" in result.stderr
    assert not MESSAGE.search(result.stderr)
    _checkpoint_at(run_dir, 2)  # the last periodic checkpoint is intact and still the latest
    fault_table.append(
        {
            "item": "10 Ctrl-C",
            "case": "a second Ctrl-C during the step that the first one stops",
            "trials": 1,
            "passed": 1,
            "detail": "exit 130 at once, no traceback, latest still the previous complete checkpoint",
        }
    )
