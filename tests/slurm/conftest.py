"""A real single-machine SLURM cluster for the `slurm` tests, started once per session.

The cluster (one controller, two nodes) gets its own state directory and free ports, so it runs beside any other local
cluster on the machine (a developer's, another test session's) and is stopped at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
# Two nodes (two slurmd on this machine) so that a multi-node job can be tried as well.
NODES = 2
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    env: dict  # environment for client commands and submitted jobs (SLURM_CONF, ...)
    state_dir: Path
    start_seconds: float

    def run(self, *cmd, check=True, timeout=60, env=None) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{cmd} failed ({out.returncode}): {out.stderr}{out.stdout}")
        return out

    def sbatch(self, *args, env=None) -> str:
        out = self.run("sbatch", "--parsable", *args, env=env)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float, until=FINAL_STATES, poll=0.5) -> dict:
        """Poll `scontrol show job` until JobState is in `until`; fail with the job's fields."""
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not in {sorted(until)} after {timeout}s: {info}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and runs slurmd)")
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    if not have_slurm and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm/munge are not installed and apt-get is not available to install them")
    state_dir = tmp_path_factory.mktemp("slurm-state")
    env = dict(
        os.environ,
        LOCAL_SLURM_DIR=str(state_dir),
        LOCAL_SLURM_CTLD_PORT=str(_free_port()),
        LOCAL_SLURM_SLURMD_PORT=str(_free_port()),
        LOCAL_SLURM_GPUS="2",
        LOCAL_SLURM_NODES=str(NODES),
    )
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local_cluster.sh start failed:\n{out.stderr}\n{out.stdout}")
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    cluster = Cluster(env=env, state_dir=state_dir, start_seconds=time.monotonic() - t0)
    print(f"\nlocal SLURM cluster up in {cluster.start_seconds:.1f}s ({state_dir})")
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop"], env=env, capture_output=True, timeout=180)
