"""Helpers for tests that run the real entry points: plain python for 1 rank, the deepspeed
launcher for more."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nobody listens on now (a random one can collide with another job's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nprocs=1, timeout=600, check=True, env=None):
    """Run launch/train.py as users do; returns the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYCAM_DIST_TIMEOUT_S": "120", **(env or {})}
    if nprocs == 1:
        cmd = [sys.executable, str(REPO / "launch/train.py"), *args]
    else:
        port = str(free_port())
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(nprocs),
            "--master_port",
            port,
            str(REPO / "launch/train.py"),
            *args,
        ]
    result = run_in_own_group(cmd, cwd=REPO, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}\n"
            f"--- stdout ---\n{result.stdout[-3000:]}"
        )
    return result


def run_in_own_group(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a new session; on timeout the whole group is killed (the deepspeed
    launcher's children included, which a plain timeout would leave running as orphans)."""
    # A crash in native code (a signal) prints nothing of its own: faulthandler prints the Python
    # stack of every thread to stderr, so a failure is never just an exit status.
    env = {**(kwargs.pop("env", None) or os.environ), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def train_losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/lm_loss"]) for r in rows if r["kind"] == "train"]


def quick_args(run_dir, data_dir, steps=6, **extra):
    args = [
        f"run_dir={run_dir}",
        f"data.dir={data_dir}",
        f"optim.max_steps={steps}",
        "optim.warmup_steps=1",
        "logging.progress=false",
        "optim.micro_batch_size=2",
    ]
    return args + [f"{k}={v}" for k, v in extra.items()]


def run_checked(cmd, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """A command run from the repository with one thread, in its own process group; it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    result = run_in_own_group(cmd, timeout=timeout, cwd=REPO, env=env, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n--- stderr ---\n{result.stderr[-5000:]}\n"
        f"--- stdout ---\n{result.stdout[-2000:]}"
    )
    return result
