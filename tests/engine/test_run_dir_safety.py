"""One run per run directory, and run directories that stand on their own: the lock (a second job
refused naming the holder, a stale lock taken over), refusing a directory that holds a run unless
the job continues it or starts it over (archived, never deleted), the resume checks' messages, the
export guard, Ctrl-C in the preemption guard, and a run directory moved elsewhere (with its data
build gone) that still evaluates and generates."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import REPO, quick_args, run_in_own_group, run_train

from hycam_ds.engine import checkpointing as ckpt
from hycam_ds.engine.run_dir import (
    LOCK_FILE,
    RunDir,
    RunDirBusy,
    RunDirError,
    RunInfo,
    claim_run_dir,
)
from hycam_ds.engine.train_config import ConfigError, TrainConfig, load_train_config


def _digest(root: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _previous_run(run: Path, checkpoint: bool = True) -> Path:
    """A run directory as an earlier training leaves it (a real checkpoint layout, tiny files)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text('{"run_dir": "x"}')
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\x00event")
    if checkpoint:
        _checkpoint(run, 2)
    return run


def _checkpoint(run: Path, step: int, config: dict | None = None) -> Path:
    root = run / "checkpoints"
    stage = ckpt.staging_dir(root, step)
    (stage / "engine").mkdir(parents=True)
    (stage / "engine" / "weights.bin").write_bytes(os.urandom(64))
    state = {"step": step, "world_size": 1, "config": config or {}}
    (stage / "trainer_state.json").write_text(json.dumps(state))
    return ckpt.publish(root, step, keep_last=10)


# ---------------------------------------------------------------------- the lock
HOLD = """
import sys, time
from hycam_ds.engine.run_dir import RunDir, claim_run_dir
claim = claim_run_dir(RunDir(sys.argv[1]), "none", False)
print("held", flush=True)
time.sleep(600)
"""


def _holder(run: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_job_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        before = (run / LOCK_FILE).read_text()
        with pytest.raises(RunDirBusy, match=rf"in use by another training \(pid {holder.pid} on "):
            claim_run_dir(RunDir(run), "none", False)
        assert (run / LOCK_FILE).read_text() == before, "a refused job touched the lock"
    finally:
        holder.kill()  # dies holding it: the file stays, the kernel drops the flock
        holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"):
        claim = claim_run_dir(RunDir(run), "none", False)
    assert f"took over the lock left by pid {holder.pid}" in caplog.text
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    claim.release()
    assert not (run / LOCK_FILE).exists(), "a released lock leaves nothing behind"
    claim_run_dir(RunDir(run), "none", False).release()  # and can be taken again


# ---------------------------------------------------------------------- a directory that holds a run
def test_a_run_dir_holding_a_run_is_refused_and_left_as_it_was(tmp_path):
    run = _previous_run(tmp_path / "run")
    before = _digest(run)
    with pytest.raises(RunDirError, match="already holds a run") as err:
        claim_run_dir(RunDir(run), "none", False)
    message = str(err.value)
    assert "checkpoint.resume=auto" in message and "checkpoint.overwrite=true" in message
    assert "metrics.jsonl to step 2" in message and "step_00000002" in message
    assert _digest(run) == before and not (run / LOCK_FILE).exists()


def test_overwrite_archives_the_previous_run_whole(tmp_path):
    run = _previous_run(tmp_path / "run")
    (run / "slurm.out").write_text("not the run's: stays where it is\n")
    before = _digest(run)
    claim = claim_run_dir(RunDir(run), "none", True)
    assert _digest(run) == {**before, LOCK_FILE: _digest(run)[LOCK_FILE]}, "nothing moves before the commit"
    archived = claim.commit()
    claim.release()
    assert archived.parent == run / "archive" and sorted(os.listdir(run)) == ["archive", "slurm.out"]
    moved = {f"archive/{archived.name}/{k}": v for k, v in before.items() if k != "slurm.out"}
    assert _digest(run) == {**moved, "slurm.out": before["slurm.out"]}, "every file kept, byte for byte"


def test_resume_auto_archives_an_attempt_that_died_before_its_first_checkpoint(tmp_path):
    run = _previous_run(tmp_path / "run", checkpoint=False)
    claim = claim_run_dir(RunDir(run), "auto", False)
    assert claim.archive_reason is not None and "no checkpoint" in claim.archive_reason
    archived = claim.commit()
    claim.release()
    assert (archived / "metrics.jsonl").is_file() and not (run / "metrics.jsonl").exists()


def test_resume_auto_with_a_checkpoint_keeps_everything(tmp_path):
    run = _previous_run(tmp_path / "run")
    before = _digest(run)
    claim = claim_run_dir(RunDir(run), "auto", False)
    assert claim.archive_reason is None and claim.commit() is None
    claim.release()
    assert _digest(run) == before


def test_unusable_run_dirs_and_settings(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    with pytest.raises(RunDirError, match="is a file"):
        claim_run_dir(RunDir(a_file), "none", False)
    with pytest.raises(RunDirError, match="cannot write there"):
        claim_run_dir(RunDir(a_file / "run"), "none", False)
    assert a_file.read_text() == "mine\n"
    with pytest.raises(ConfigError, match="choose one"):
        load_train_config(None, [f"run_dir={tmp_path / 'new'}", "checkpoint.resume=auto", "checkpoint.overwrite=true"])
    assert not (tmp_path / "new").exists()
    for empty in ("", "'  '"):
        with pytest.raises(ConfigError, match="run_dir: empty"):
            load_train_config(None, [f"run_dir={empty}"])


def _read_only(path: Path):
    """Make `path` read-only for this process (root ignores mode bits: the immutable attribute)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i: no way to make a directory read-only here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_run_dir_is_refused_untouched(tmp_path):
    run = _previous_run(tmp_path / "run")
    before = _digest(run)
    undo = _read_only(run)
    try:
        with pytest.raises(RunDirError, match="cannot write there"):
            claim_run_dir(RunDir(run), "auto", False)
    finally:
        undo()
    assert _digest(run) == before


# ---------------------------------------------------------------------- run_info.json paths
def test_run_info_names_what_is_inside_the_run_relative_to_it(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / "tokenizer").mkdir(parents=True)
    run.write_info(
        RunInfo(
            data_dir=run.relative(tmp_path / "data"),
            tokenizer="/somewhere/tokenizer",
            tokenizer_dir=run.relative(run.tokenizer),
            adapter=run.relative(run.adapter),
        )
    )
    raw = json.loads(run.run_info.read_text())
    assert raw["tokenizer_dir"] == "tokenizer" and raw["adapter"] == "adapter"
    assert raw["data_dir"] == str((tmp_path / "data").absolute())
    moved = RunDir(shutil.move(str(run.path), str(tmp_path / "elsewhere")))
    info = moved.read_info()
    assert (
        info.tokenizer_dir == str(moved.path.absolute() / "tokenizer") and info.tokenizer_source() == info.tokenizer_dir
    )
    assert info.adapter == str(moved.path.absolute() / "adapter")
    # A run_info.json written before the run kept its own tokenizer: absolute paths, read as they are.
    old = RunDir(tmp_path / "old")
    old.path.mkdir()
    old.run_info.write_text(json.dumps({"data_dir": "/data/x", "tokenizer": "/data/x/tokenizer"}))
    info = old.read_info()
    assert (info.data_dir, info.tokenizer_source(), info.adapter) == ("/data/x", "/data/x/tokenizer", None)


# ---------------------------------------------------------------------- resume checks
def test_a_missing_or_damaged_latest_names_the_newest_intact_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _checkpoint(run, step)
    newest = run / "checkpoints" / "step_00000006"
    (newest / "engine" / "weights.bin").write_bytes(b"truncated")
    with pytest.raises(ckpt.CheckpointError, match="damaged") as err:
        ckpt.verify_for_resume(run, ckpt.resolve_checkpoint(run, "auto"))
    assert f"checkpoint.resume={run}/checkpoints/step_00000004" in str(err.value)
    shutil.rmtree(newest)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint") as err:
        ckpt.resolve_checkpoint(run, "auto")
    assert f"checkpoint.resume={run}/checkpoints/step_00000004" in str(err.value)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing although") as err:
        ckpt.resolve_checkpoint(run, "auto")
    assert "step_00000004" in str(err.value)
    for old in (2, 4):
        shutil.rmtree(run / "checkpoints" / f"step_{old:08d}" / "engine")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint is left.*checkpoint.overwrite=true"):
        ckpt.resolve_checkpoint(run, "auto")


def test_config_changes_refuse_shapes_and_meaning_and_allow_the_schedule():
    saved = TrainConfig().to_dict()
    current = TrainConfig().to_dict()
    current["hycam"]["num_specialized"] = 3
    current["optim"]["lr"] = 1e-4
    current["optim"]["max_steps"] = 999
    current["logging"]["log_every"] = 7
    current["run_dir"] = "/moved/here"
    fixed, allowed = ckpt.config_changes(saved, current)
    assert fixed == ["hycam.num_specialized 5 -> 3"]
    assert allowed == ["optim.lr 0.002 -> 0.0001", "optim.max_steps 300 -> 999"]
    current = TrainConfig().to_dict()
    current.update(method="lora")
    current["lora"]["r"] = 4
    current["data"]["seq_len"] = 64
    current["hycam"]["tau"] = 2.0  # not lora's business
    fixed, _ = ckpt.config_changes(saved, current)
    assert fixed == ["data.seq_len 256 -> 64", "lora.r 8 -> 4", "method 'hycam' -> 'lora'"]
    del saved["hycam"]["seed"]  # a field added since the checkpoint was written: not a change
    assert ckpt.config_changes(saved, TrainConfig().to_dict()) == ([], [])


# ---------------------------------------------------------------------- export guard
def test_export_replaces_only_a_previous_export(tmp_path):
    from hycam_ds.engine.exporting import check_export_destination

    check_export_destination(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_export_destination(tmp_path / "empty")
    for marker in ("adapter_config.json", "config.json"):
        (tmp_path / marker).mkdir()
        (tmp_path / marker / marker).write_text("{}")
        check_export_destination(tmp_path / marker)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirError, match="not a previous export"):
        check_export_destination(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        check_export_destination(tmp_path / "file")


# ---------------------------------------------------------------------- Ctrl-C in the guard
GUARD = """
import os, signal, sys
from hycam_ds.engine.preemption import PreemptionGuard
guard = PreemptionGuard()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGTERM)   # what the deepspeed launcher sends after a Ctrl-C
assert guard.should_stop() and guard.interrupted and not guard.requeue_requested
print("stopped", flush=True)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGINT)
    print("still running", flush=True)
"""


@pytest.mark.parametrize("times", ["once", "twice"])
def test_ctrl_c_stops_and_a_second_one_aborts(times):
    done = subprocess.run(
        [sys.executable, "-c", GUARD, times], capture_output=True, text=True, cwd=REPO, env={**os.environ, "RANK": "0"}
    )
    assert "stopped" in done.stdout and "Ctrl-C: stopping after this step" in done.stderr
    if times == "once":
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode == 130 and "still running" not in done.stdout
        assert "second Ctrl-C: aborted" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------- a moved run directory
def _entry(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = run_in_own_group([sys.executable, *map(str, args)], timeout=600, cwd=REPO, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


MOVED_ARGS = {
    "model.name": "tiny-llama",
    "logging.eval_every": 0,
    "logging.eval_batches": 1,
    "checkpoint.save_every": 0,
}


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, embedded_data):
    """A 2-step run whose run directory and data build were both moved after training."""
    root = tmp_path_factory.mktemp("moved")
    data = root / "data"
    shutil.copytree(embedded_data, data)
    run = root / "first" / "run"
    run_train(quick_args(run, data, steps=2, **MOVED_ARGS), nprocs=1)
    info = json.loads((run / "run_info.json").read_text())
    assert info["tokenizer_dir"] == "tokenizer" and info["adapter"] == "adapter"
    moved = Path(shutil.move(str(run), str(root / "moved")))
    moved_data = Path(shutil.move(str(data), str(root / "data_moved")))  # the recorded data dir is gone
    return moved, moved_data


def test_a_moved_run_directory_whose_data_is_gone_still_evaluates_and_generates(tmp_path, moved_run):
    moved, moved_data = moved_run
    common = ["--max-examples", "1", "--max-new-tokens", "4", "--batch-size", "2", "--max-ppl-rows", "2"]
    _entry("launch/evaluate.py", "--run-dir", moved, "--data", moved_data, "--out", tmp_path, *common, "--no-progress")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["kind"] == "hycam" and report["model"]["adapter"] == str(moved.absolute() / "adapter")
    said = _entry("launch/generate.py", "--run-dir", moved, "--max-new-tokens", "4", "Add 2 and 3.")
    assert ">>> Add 2 and 3." in said.stdout


@pytest.mark.slow
def test_a_moved_run_resumes_from_its_moved_data(tmp_path, moved_run):
    """run_dir and data.dir both changed: the data is the same build (its manifest), so the resume is
    allowed, with a warning naming data.dir."""
    moved, moved_data = moved_run
    run = tmp_path / "run"
    shutil.copytree(moved, run)
    extra = {**MOVED_ARGS, "checkpoint.resume": "auto", "checkpoint.export_adapter": "false"}
    resumed = run_train(quick_args(run, moved_data, steps=3, **extra), nprocs=1)
    assert "resumed from step 2" in resumed.stderr and "data.dir" in resumed.stderr


@pytest.mark.distributed
def test_under_two_ranks_rank_0_decides_and_every_rank_hears_it(tmp_path, embedded_data):
    """Only rank 0 takes the lock; its refusal reaches rank 1, which exits quietly instead of waiting."""
    run = tmp_path / "run"
    claim = claim_run_dir(RunDir(run), "none", False)  # this process plays the running training
    try:
        # A rank 1 left waiting for a decision would hang past the test's own timeout (the collective
        # timeout is set longer): ending at all, with exit 2, is the proof it heard. No wall-time bound:
        # starting two ranks under load takes minutes here.
        refused = run_train(
            quick_args(run, embedded_data, steps=2, **{"model.name": "tiny-llama"}),
            nprocs=2,
            check=False,
            timeout=600,
            env={"HYCAM_DIST_TIMEOUT_S": "1200"},
        )
    finally:
        claim.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    ours = [line for line in refused.stderr.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and f"in use by another training (pid {os.getpid()} on " in ours[0], ours
    assert "Traceback" not in refused.stderr and "timed out" not in refused.stderr.lower()
