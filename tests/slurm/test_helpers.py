"""The SLURM machinery without a cluster: rank mapping, sbatch checks, preflight, the guard.

Fast (seconds): these run in the default suite, on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hycam_ds.engine.preemption import PreemptionGuard

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RANK_ENV = REPO / "launch" / "slurm" / "rank_env.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


def _fake_scontrol(tmp_path: Path) -> Path:
    """A `scontrol` on PATH that expands node lists and records requeue calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "show hostnames" ]; then echo ${FAKE_FIRST_HOST:-node-a}; echo node-b; exit 0; fi\n'
        'if [ "$1 $2" = "show node" ]; then echo "NodeName=$3 NodeAddr=10.9.8.7 State=IDLE"; exit 0; fi\n'
        f'echo "$@" >> {tmp_path}/scontrol.calls\n'
    )
    script.chmod(0o755)
    return bindir


def _rank_env(tmp_path, **env):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    base["PATH"] = f"{_fake_scontrol(tmp_path)}:{base['PATH']}"
    base.update(env)
    out = subprocess.run(["bash", str(RANK_ENV), "env"], env=base, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


SLURM_TASK = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "node-[a-b]",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}


def test_rank_env_maps_slurm_variables(tmp_path):
    env = _rank_env(tmp_path, **SLURM_TASK)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    # The first host of the node list; "node-a" does not resolve here: SLURM's NodeAddr for it.
    assert env["MASTER_ADDR"] == "10.9.8.7"
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)
    assert env["LOCAL_WORLD_SIZE"] == "4"


def test_rank_env_uses_the_first_host_name_when_it_resolves(tmp_path):
    env = _rank_env(tmp_path, **SLURM_TASK, FAKE_FIRST_HOST="localhost")
    assert env["MASTER_ADDR"] == "localhost"


def test_rank_env_keeps_values_a_launcher_set(tmp_path):
    env = _rank_env(
        tmp_path, **SLURM_TASK, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.0.0.9", MASTER_PORT="29500"
    )
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "2", "0")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "29500")


def test_rank_env_outside_slurm_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(RANK_ENV), "true"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "srun" in out.stderr


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("TRAIN_ENTRY", "nope/train.py", "TRAIN_ENTRY 'nope/train.py' not found"),
        ("HYCAM_DS_CONFIG", "nope.json", "HYCAM_DS_CONFIG 'nope.json' not found"),
        ("HYCAM_CONFIG", "nope.yaml", "HYCAM_CONFIG 'nope.yaml' not found"),
        ("HYCAM_DATA_DIR", "/nonexistent", "HYCAM_DATA_DIR '/nonexistent' is not a directory"),
    ],
)
def test_sbatch_checks_settings_before_starting_ranks(tmp_path, setting, value, message):
    (tmp_path / "train.py").write_text("")
    (tmp_path / "ds.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID="7",
        SLURM_SUBMIT_DIR=str(tmp_path),
        TRAIN_ENTRY="train.py",
        HYCAM_DS_CONFIG="ds.json",
        HYCAM_RUN_DIR=str(tmp_path / "run"),
    )
    env[setting] = value
    out = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr


def test_sbatch_rejects_positional_arguments(tmp_path):
    (tmp_path / "train.py").write_text("")
    (tmp_path / "ds.json").write_text("{}")
    env = dict(
        os.environ,
        SLURM_JOB_ID="7",
        SLURM_SUBMIT_DIR=str(tmp_path),
        TRAIN_ENTRY="train.py",
        HYCAM_DS_CONFIG="ds.json",
        HYCAM_RUN_DIR=str(tmp_path / "run"),
    )
    out = subprocess.run(["bash", str(SBATCH), "configs/x.yaml"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "not a key=value override" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(mode: str, extra_env=None, timeout=60):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            HYCAM_DIST_TIMEOUT_S="30",
            **(extra_env or {}),
        )
        env.pop("SLURM_JOB_ID", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "dist_worker.py"), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.distributed
def test_preflight_passes_when_every_rank_is_there():
    codes, outs = _run_two_ranks("preflight_ok")
    assert codes == [0, 0], outs


@pytest.mark.distributed
def test_preflight_names_the_missing_rank():
    codes, outs = _run_two_ranks("preflight_missing")
    assert codes[0] == 3, outs
    line = next(output_line for output_line in outs[0].splitlines() if output_line.startswith("PREFLIGHT_ERROR"))
    assert "rank(s) 1 of world size 2" in line


@pytest.mark.distributed
def test_guard_stops_every_rank_at_the_same_step():
    codes, outs = _run_two_ranks("guard_agree")
    assert codes == [0, 0], outs
    results = [
        json.loads(next(output_line for output_line in out.splitlines() if output_line.startswith("{"))) for out in outs
    ]
    assert results[0]["stopped_at"] == results[1]["stopped_at"] == 5
    assert all(r["preempted"] for r in results)


def test_guard_single_process_and_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path)}:{os.environ['PATH']}")
    for var in ("RANK", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    with PreemptionGuard() as guard:
        assert not guard.should_stop() and not guard.preempted
        guard.requeue()  # outside SLURM: logged no-op
        assert not (tmp_path / "scontrol.calls").exists()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.signal_received == signal.SIGUSR1
        assert guard.should_stop() and guard.preempted
        monkeypatch.setenv("SLURM_JOB_ID", "99")
        guard.requeue()
        assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "99"]
        monkeypatch.setenv("RANK", "1")
        guard.requeue()  # not rank 0: nothing more
        assert (tmp_path / "scontrol.calls").read_text().count("requeue") == 1
    assert signal.getsignal(signal.SIGUSR1) is not guard._on_signal  # handlers restored


def test_guard_stops_but_does_not_requeue_on_sigterm(tmp_path, monkeypatch):
    """SIGTERM is what `scancel` sends: checkpoint and stop, but the job must not come back."""
    monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path)}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.preempted
        guard.requeue()
        assert not (tmp_path / "scontrol.calls").exists()
