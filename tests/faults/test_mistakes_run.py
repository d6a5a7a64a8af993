"""User mistakes on the run side, typed as a user would through the real entry points (launch/train.py,
launch/evaluate.py, launch/generate.py): a second job on a run directory, a run directory that holds
another run, is empty, a file or read-only, resuming from a deleted, damaged or mismatched checkpoint,
evaluating or generating from a run that has no adapter, no run_info.json or whose data build is
gone, a full disk at a checkpoint, an export over someone's files. Each ends with the exit status
named, one line on stderr naming the problem and what to do, and nothing already on disk changed
(sha256 of every file of the run directory and of the data build, before and after)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mistake_helpers import REPO, refused, run_entry, tree_digest

pytestmark = pytest.mark.faults

ITEM = "user mistakes: runs"
TRAIN_ARGS = [
    "model.name=tiny-llama",
    "optim.max_steps=2",
    "optim.warmup_steps=1",
    "optim.micro_batch_size=2",
    "checkpoint.save_every=1",
    "logging.eval_every=0",
    "logging.eval_batches=1",
    "logging.progress=false",
]


def _train(run, data, *overrides, env=None):
    return run_entry(["launch/train.py", f"run_dir={run}", f"data.dir={data}", *TRAIN_ARGS, *overrides], env=env)


@pytest.fixture(scope="module")
def finished_run(embedded_data, tmp_path_factory):
    """A completed 2-step run: checkpoints step_1 and step_2, its tokenizer and adapter."""
    run = tmp_path_factory.mktemp("mistakes_run") / "run"
    done = _train(run, embedded_data)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    return run


@pytest.fixture
def world(finished_run, embedded_data, tmp_path):
    """A private copy of the finished run (each case may damage it), and the shared data build."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return {"run": run, "data": embedded_data, "root": tmp_path}


def _drop_latest(w):
    shutil.rmtree(w["run"] / "checkpoints" / "step_00000002")


def _truncate_latest(w):
    target = next((w["run"] / "checkpoints" / "step_00000002" / "engine").rglob("*optim_states.pt"))
    target.write_bytes(target.read_bytes()[:100])


def _forget_data(w):
    info = json.loads((w["run"] / "run_info.json").read_text())
    info["data_dir"] = str(w["root"] / "removed_data_cache")
    (w["run"] / "run_info.json").write_text(json.dumps(info))


def _old_style_without_data(w):
    """A run directory from before runs kept their tokenizer, whose data build (and tokenizer) is gone."""
    info = json.loads((w["run"] / "run_info.json").read_text())
    info.pop("tokenizer_dir")
    info.update(data_dir=str(w["root"] / "gone"), tokenizer=str(w["root"] / "gone" / "tokenizer"))
    (w["run"] / "run_info.json").write_text(json.dumps(info))
    shutil.rmtree(w["run"] / "tokenizer")


def _no_run_info(w):
    (w["run"] / "run_info.json").unlink()


def _no_adapter(w):
    shutil.rmtree(w["run"] / "adapter")


def _foreign_adapter(w):
    shutil.rmtree(w["run"] / "adapter")
    (w["run"] / "adapter").mkdir()
    (w["run"] / "adapter" / "notes.md").write_text("my own notes, not an export\n")


def _evaluate(w, *extra):
    return run_entry(
        ["launch/evaluate.py", "--run-dir", w["run"], "--out", w["root"] / "eval", "--max-examples", "1", *extra]
    )


def _generate(w):
    return run_entry(["launch/generate.py", "--run-dir", w["run"], "--max-new-tokens", "4", "Add 2 and 3."])


def _latest_override(w, step):
    return f"checkpoint.resume={w['run']}/checkpoints/step_{step:08d}"


CASES = [
    # (case, prepare(world), command(world), words of the one-line message (may use the world))
    (
        "second training into a finished run, no resume",
        None,
        lambda w: _train(w["run"], w["data"]),
        lambda w: ("already holds a run", "checkpoint.resume=auto", "checkpoint.overwrite=true"),
    ),
    (
        "empty run_dir",
        None,
        lambda w: _train("", w["data"]),
        lambda w: ("run_dir", "empty"),
    ),
    (
        "run_dir is a file",
        lambda w: (w["root"] / "notes.txt").write_text("mine\n"),
        lambda w: _train(w["root"] / "notes.txt", w["data"]),
        lambda w: ("is a file",),
    ),
    (
        "run_dir inside a file",
        lambda w: (w["root"] / "notes.txt").write_text("mine\n"),
        lambda w: _train(w["root"] / "notes.txt" / "run", w["data"]),
        lambda w: ("cannot write there", "not a directory"),
    ),
    (
        "overwrite and resume together",
        None,
        lambda w: _train(w["run"], w["data"], "checkpoint.overwrite=true", "checkpoint.resume=auto"),
        lambda w: ("checkpoint.overwrite=true", "checkpoint.resume=auto", "choose one"),
    ),
    (
        "resume=auto, newest checkpoint deleted",
        _drop_latest,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto"),
        lambda w: ("no such checkpoint", _latest_override(w, 1)),
    ),
    (
        "resume=auto, newest checkpoint truncated",
        _truncate_latest,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto"),
        lambda w: ("does not match the checkpoint manifest", _latest_override(w, 1)),
    ),
    (
        "resume=auto, latest pointer deleted",
        lambda w: (w["run"] / "checkpoints" / "latest").unlink(),
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto"),
        lambda w: ("latest: missing", _latest_override(w, 2)),
    ),
    (
        "resume with hycam.num_specialized changed",
        None,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto", "hycam.num_specialized=3"),
        lambda w: ("another configuration", "hycam.num_specialized 5 -> 3"),
    ),
    (
        "resume with another method",
        None,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto", "method=lora"),
        lambda w: ("another configuration", "method 'hycam' -> 'lora'"),
    ),
    (
        "resume with another backbone",
        None,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto", "model.name=small-llama"),
        lambda w: ("another configuration", "model.name 'tiny-llama' -> 'small-llama'"),
    ),
    (
        "resume from another run's checkpoint",
        lambda w: shutil.copytree(w["run"], w["root"] / "other"),
        lambda w: _train(w["run"], w["data"], f"checkpoint.resume={w['root']}/other/checkpoints/step_00000002"),
        lambda w: ("not a checkpoint directory of this run",),
    ),
    (
        "export over a foreign adapter/ directory",
        _foreign_adapter,
        lambda w: _train(w["run"], w["data"], "checkpoint.resume=auto"),
        lambda w: ("not a previous export", "refusing"),
    ),
    (
        "evaluate a run without adapter",
        _no_adapter,
        _evaluate,
        lambda w: ("no adapter", "checkpoint.resume=auto"),
    ),
    (
        "generate from a run without adapter",
        _no_adapter,
        _generate,
        lambda w: ("no adapter", "checkpoint.resume=auto"),
    ),
    (
        "evaluate a run without run_info.json",
        _no_run_info,
        _evaluate,
        lambda w: ("run_info.json", "no such file"),
    ),
    (
        "generate from a run without run_info.json",
        _no_run_info,
        _generate,
        lambda w: ("run_info.json", "no such file"),
    ),
    (
        "evaluate after the data cache was removed",
        _forget_data,
        _evaluate,
        lambda w: ("data build is gone", "--data"),
    ),
    (
        "evaluate an older run whose data (and tokenizer) were removed",
        _old_style_without_data,
        _evaluate,
        lambda w: ("tokenizer", "is gone"),
    ),
]


@pytest.mark.parametrize("case,prepare,command,words", CASES, ids=[c[0] for c in CASES])
def test_run_mistake_is_one_line_and_changes_nothing(world, case, prepare, command, words, fault_table):
    if prepare is not None:
        prepare(world)
    listing = set(os.listdir(REPO))
    before = tree_digest(world["root"], world["data"])
    proc = command(world)
    expected = words(world)
    ok = refused(proc, *expected)
    unchanged = tree_digest(world["root"], world["data"]) == before and set(os.listdir(REPO)) == listing
    fault_table.append(
        {
            "item": ITEM,
            "case": case,
            "trials": 1,
            "passed": int(ok and unchanged),
            "detail": "exit 2, one line naming it and what to do, nothing on disk changed",
        }
    )
    assert ok, f"exit {proc.returncode}, expected one line with {expected}:\n{proc.stderr[-3000:]}"
    assert unchanged, "a refused command changed files"


def test_a_second_job_on_a_run_dir_in_use_is_refused_naming_the_holder(world, fault_table):
    from hycam_ds.engine.run_dir import RunDir, claim_run_dir

    claim = claim_run_dir(RunDir(world["run"]), "auto", False)  # this test process is the running training
    try:
        before = tree_digest(world["run"], world["data"])
        proc = _train(world["run"], world["data"], "checkpoint.resume=auto")
        ok = refused(proc, "in use by another training", f"pid {os.getpid()}")
        unchanged = tree_digest(world["run"], world["data"]) == before
    finally:
        claim.release()
    fault_table.append(
        {
            "item": ITEM,
            "case": "second job on a run directory in use",
            "trials": 1,
            "passed": int(ok and unchanged),
            "detail": "exit 2 at once naming the holder's pid, host and start; the holder's files untouched",
        }
    )
    assert ok, proc.stderr[-3000:]
    assert unchanged


def _read_only(path: Path):
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i: no way to make a directory read-only here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_run_dir_is_refused(world, fault_table):
    before = tree_digest(world["run"], world["data"])
    undo = _read_only(world["run"])
    try:
        proc = _train(world["run"], world["data"], "checkpoint.resume=auto")
    finally:
        undo()
    ok = refused(proc, "cannot write there", str(world["run"]))
    unchanged = tree_digest(world["run"], world["data"]) == before
    fault_table.append(
        {
            "item": ITEM,
            "case": "read-only run directory",
            "trials": 1,
            "passed": int(ok and unchanged),
            "detail": "exit 2, one line naming it, before anything is loaded",
        }
    )
    assert ok, proc.stderr[-3000:]
    assert unchanged


def test_disk_full_at_a_checkpoint_keeps_the_previous_one_latest(world, fault_table):
    """A full file system while the step-4 checkpoint is written: the job ends (exit 2) with one
    line saying so, and the step-2 checkpoint it resumed from is still latest, intact, byte for byte."""
    from hycam_ds.engine import checkpointing as ckpt

    checkpoints = world["run"] / "checkpoints"
    before = tree_digest(checkpoints, world["data"])
    proc = _train(
        world["run"],
        world["data"],
        "checkpoint.resume=auto",
        "optim.max_steps=4",
        "checkpoint.save_every=0",
        env={"HYCAM_FAULT": "disk_full:step=4:point=rank_files"},
    )
    own = [line for line in proc.stderr.splitlines() if line.startswith("train.py:")]
    ok = (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and len(own) == 1
        and re.search(r"checkpoint of step 4 not written \(.*No space left on device\)", own[0]) is not None
        and f"the latest checkpoint is still {checkpoints / 'step_00000002'}" in own[0]
    )
    intact = (
        tree_digest(checkpoints, world["data"]) == before
        and ckpt.resolve_checkpoint(world["run"], "auto").name == "step_00000002"
        and not list(checkpoints.glob(".staging-*"))
    )
    ckpt.verify(checkpoints / "step_00000002")
    fault_table.append(
        {
            "item": ITEM,
            "case": "disk full while writing a checkpoint (ENOSPC injected)",
            "trials": 1,
            "passed": int(ok and intact),
            "detail": "exit 2, one line; the previous checkpoint still latest and byte-identical, staging removed",
        }
    )
    assert ok, proc.stderr[-3000:]
    assert intact
