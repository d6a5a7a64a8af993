"""launch/slurm/train.sbatch on a real local SLURM cluster: a 2-task job completes, a
preempted job checkpoints, requeues and resumes, a job with a failing rank fails fast.

The entry point is TRAIN_ENTRY (default launch/train.py, the real trainer);
TRAIN_ENTRY=tests/slurm/standin_train.py runs the same tests against the stand-in.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
LOCAL_CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
pytestmark = pytest.mark.slurm

ENTRY = os.environ.get("TRAIN_ENTRY", "launch/train.py")
STANDIN = ENTRY.endswith("standin_train.py")
INJECT = Path(__file__).resolve().parent / "inject"
# Small runs: a few steps of the embedded default on 2 CPU ranks.
MAX_STEPS = int(os.environ.get("HYCAM_TEST_SLURM_STEPS", "30"))
JOB_TIMEOUT = float(os.environ.get("HYCAM_TEST_SLURM_JOB_TIMEOUT", "400"))


def _job_env(cluster, run_dir: Path, **extra) -> dict:
    env = dict(
        cluster.env, TRAIN_ENTRY=ENTRY, HYCAM_REPO=str(REPO), HYCAM_RUN_DIR=str(run_dir), HYCAM_DIST_TIMEOUT_S="120"
    )
    if STANDIN:  # the stand-in ignores the DeepSpeed config; any file satisfies the check
        env["HYCAM_DS_CONFIG"] = str(SBATCH_SCRIPT)
    env.update(extra)
    return env


def _fault_env(kind: str) -> dict:
    """Rank 1 raises (or hangs) once training is under way: the trainer's own fault hook
    (HYCAM_FAULT), or for the stand-in a sitecustomize that does it from outside."""
    if not STANDIN:
        return {"HYCAM_FAULT": f"{kind}:rank=1:step=2"}
    return {
        "HYCAM_TEST_FAIL_RANK": "1",
        "HYCAM_TEST_FAIL_MODE": kind,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(INJECT), os.environ.get("PYTHONPATH")])),
    }


def _submit(cluster, tmp_path, env, *args, steps=MAX_STEPS) -> str:
    """sbatch train.sbatch: options starting with "--" go to sbatch, the rest to the trainer."""
    if not (REPO / ENTRY).exists():
        pytest.fail(f"TRAIN_ENTRY {ENTRY} does not exist")
    options = {"--ntasks-per-node": "2", "--gres": "gpu:2", "--cpus-per-task": "1", "--time": "20"}
    options.update(a.split("=", 1) for a in args if a.startswith("--"))
    overrides = [a for a in args if not a.startswith("--")]
    return cluster.sbatch(
        *(f"{key}={value}" for key, value in options.items()),
        f"--output={tmp_path}/job-%j.out",
        f"--chdir={REPO}",
        str(SBATCH_SCRIPT),
        f"optim.max_steps={steps}",
        "logging.progress=false",
        *overrides,
        env=env,
    )


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # The trainer also writes evaluation rows ("kind": "eval") and names the loss train/loss.
    return [
        {"step": r["step"], "loss": r.get("loss", r.get("train/loss"))}
        for r in rows
        if r.get("kind", "train") == "train"
    ]


def _log(tmp_path, job_id) -> str:
    path = Path(tmp_path) / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: str) -> bool:
    """A live process (an exited daemon not yet reaped by init is a zombie: not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_local_cluster_start_is_idempotent(slurm_cluster):
    t0 = time.monotonic()
    slurm_cluster.run("bash", str(LOCAL_CLUSTER), "start")
    assert time.monotonic() - t0 < 15
    status = slurm_cluster.run("bash", str(LOCAL_CLUSTER), "status")
    assert "slurmd node1: running" in status.stdout and "node node2: idle" in status.stdout


def test_two_task_job_completes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = _submit(slurm_cluster, tmp_path, _job_env(slurm_cluster, run_dir))
    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    print(f"\n2-task job {job}: {info['JobState']} in {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["NumTasks"] == "2"
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1)), log
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert "preflight: all 2 ranks reachable" in log
    # Both ranks trained: the logged loss of every step is reduced over the 2 ranks.
    if STANDIN:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(len(r["rank_losses"]) == 2 for r in rows)
    else:
        assert re.search(r"ZeRO stage 3, \w+, world 2", log), log
        ds_config = json.loads((run_dir / "ds_config.json").read_text())
        assert (
            ds_config["train_batch_size"]
            == 2 * ds_config["train_micro_batch_size_per_gpu"] * ds_config["gradient_accumulation_steps"]
        )
    assert (run_dir / "checkpoints" / "latest").exists()
    assert info["Restarts"] == "0"  # a normal end does not requeue


def test_two_node_job_completes(slurm_cluster, tmp_path):
    """One rank on each of two nodes: MASTER_ADDR is the first node, found by its NodeAddr."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = _submit(
        slurm_cluster,
        tmp_path,
        _job_env(slurm_cluster, run_dir),
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gres=gpu:1",
        steps=12,
    )
    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    print(f"\n2-node job {job}: {info['JobState']} in {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["NodeList"] == "node[1-2]" and "on 2 node(s)" in log
    assert [m["step"] for m in _metrics(run_dir)] == list(range(1, 13)), log
    assert "preflight: all 2 ranks reachable (127.0.0.1:" in log


@pytest.mark.faults
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, fault_table):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = _submit(slurm_cluster, tmp_path, _job_env(slurm_cluster, run_dir), f"checkpoint.save_every={10 * MAX_STEPS}")
    # Warn the job once it is a few steps in (and well before its end).
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(_metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, _log(tmp_path, job)
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, job)
        time.sleep(0.2)
    steps_before_signal = len(_metrics(run_dir))
    assert steps_before_signal < MAX_STEPS - 2, "the job ran too fast to be preempted mid-run"
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
    t_signal = time.monotonic()

    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    print(
        f"\npreempted job {job}: {info['JobState']} in {time.monotonic() - t0:.1f}s "
        f"(signal after {t_signal - t0:.1f}s at step {steps_before_signal})"
    )
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log  # requeued exactly once; the second end did not requeue

    # Every rank stopped at the same step.
    stops = re.findall(r"rank (\d+): preemption warning \([^)]*\): stopping at step check (\d+)", log)
    assert sorted(r for r, _ in stops) == ["0", "1"], log
    assert len({check for _, check in stops}) == 1, stops

    # Resumed from the checkpoint written at the preemption.
    resumed = {int(n) for n in re.findall(r"resumed from step (\d+)", log)}
    assert len(resumed) == 1, log
    (resume_step,) = resumed
    assert steps_before_signal <= resume_step < MAX_STEPS
    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert sorted(set(steps)) == list(range(1, MAX_STEPS + 1)), steps  # same final step count
    assert steps[-1] == MAX_STEPS
    # Steps done after the checkpoint and redone after the resume: at most one.
    assert len(steps) - MAX_STEPS <= 1, steps
    assert all(math.isfinite(m["loss"]) for m in metrics)
    fault_table.append(
        {
            "item": "3 preemption (real local SLURM)",
            "case": "scancel --batch --signal=USR1 mid-run",
            "trials": 1,
            "passed": 1,
            "detail": f"both ranks stopped at the same step, requeued once, resumed from step {resume_step}, "
            f"{MAX_STEPS}/{MAX_STEPS} steps, {len(steps) - MAX_STEPS} step redone",
        }
    )


def test_cancel_checkpoints_and_does_not_requeue(slurm_cluster, tmp_path):
    """`scancel` sends SIGTERM: the ranks save at the next step, and the job stays CANCELLED."""
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, _job_env(slurm_cluster, run_dir), f"checkpoint.save_every={10 * MAX_STEPS}")
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(_metrics(run_dir)) < 3:
        assert time.monotonic() < deadline, _log(tmp_path, job)
        time.sleep(0.2)
    slurm_cluster.run("scancel", job)
    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    time.sleep(3)  # a requeue would show at once
    info = slurm_cluster.job(job)
    log = _log(tmp_path, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert "preemption warning (SIGTERM)" in log
    assert (run_dir / "checkpoints" / "latest").exists(), log


def test_failing_rank_ends_the_job_quickly(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = _job_env(slurm_cluster, run_dir, **_fault_env("raise"))
    t0 = time.monotonic()
    job = _submit(slurm_cluster, tmp_path, env, steps=100 * MAX_STEPS)
    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    elapsed = time.monotonic() - t0
    first_step = len(_metrics(run_dir))
    print(f"\nfailing-rank job {job}: {info['JobState']} in {elapsed:.1f}s ({first_step} steps logged)")
    assert info["JobState"] == "FAILED", log
    assert "injected failure on rank 1" in log, log
    assert info["Restarts"] == "0"
    # Ended by --kill-on-bad-exit within seconds of the failure, not by a collective timeout.
    assert first_step < 100 * MAX_STEPS
    assert elapsed < 120 + (0 if STANDIN else 120), log


def test_hanging_rank_ends_the_job_within_the_timeout(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    timeout_s = 20
    env = _job_env(slurm_cluster, run_dir, HYCAM_DIST_TIMEOUT_S=str(timeout_s), **_fault_env("hang"))
    t0 = time.monotonic()
    job = _submit(slurm_cluster, tmp_path, env, steps=100 * MAX_STEPS)
    info = slurm_cluster.wait(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    print(
        f"\nhanging-rank job {job}: {info['JobState']} in {time.monotonic() - t0:.1f}s "
        f"(collective timeout {timeout_s}s)"
    )
    if STANDIN:
        assert "injected hang on rank 1" in log
    # Rank 0's collective times out, it exits non-zero, and srun kills the stopped rank.
    assert info["JobState"] == "FAILED", log
    assert time.monotonic() - t0 < 4 * timeout_s + (0 if STANDIN else 120), log


def test_second_cluster_starts_idempotently_and_stops_only_its_own_daemons(slurm_cluster, tmp_path):
    state = tmp_path / "second"
    env = dict(
        slurm_cluster.env,
        LOCAL_SLURM_DIR=str(state),
        LOCAL_SLURM_CTLD_PORT=str(_free_port()),
        LOCAL_SLURM_SLURMD_PORT=str(_free_port()),
    )
    env.pop("SLURM_CONF")
    env["LOCAL_SLURM_NODES"] = "1"
    pidfiles = [state / "run" / "slurmctld.pid", state / "run" / "slurmd-localhost.pid"]
    try:
        t0 = time.monotonic()
        slurm_cluster.run("bash", str(LOCAL_CLUSTER), "start", env=env)
        started = time.monotonic() - t0
        pids = [p.read_text().strip() for p in pidfiles]
        slurm_cluster.run("bash", str(LOCAL_CLUSTER), "start", env=env)  # again: nothing restarted
        assert [p.read_text().strip() for p in pidfiles] == pids
        print(f"\nsecond local cluster up in {started:.1f}s")
    finally:
        slurm_cluster.run("bash", str(LOCAL_CLUSTER), "stop", env=env)
    assert not any(_running(pid) for pid in pids)
    status = slurm_cluster.run("bash", str(LOCAL_CLUSTER), "status", env=env, check=False)
    assert status.returncode != 0 and "slurmd localhost: stopped" in status.stdout
    # The session's cluster is untouched.
    assert slurm_cluster.run("bash", str(LOCAL_CLUSTER), "status").returncode == 0
