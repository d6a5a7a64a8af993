"""Backbones named as users name them: hub ids `org/name[@revision]` (read from a real Hugging Face
cache layout, offline), and local directories, through every entry point: the data build,
training, evaluation, generation and estimate.py. Nothing rewrites an id into a path."""

import json
import os
import subprocess
import sys

import pytest
from run_helpers import REPO, quick_args, run_in_own_group, run_train

from data_pipeline.pretrained import PretrainedRef, PretrainedRefError, parse_pretrained

ORG, NAME, REVISION = "hycam-test", "tiny-llama", "0123456789abcdef0123456789abcdef01234567"
HUB_ID = f"{ORG}/{NAME}"


def test_parse_pretrained_forms(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert parse_pretrained(model_dir) == PretrainedRef(str(model_dir.resolve()))
    gguf = parse_pretrained(tmp_path / "m.Q4_1.gguf")
    assert gguf.name_or_path == str(tmp_path.resolve()) and gguf.kwargs() == {"gguf_file": "m.Q4_1.gguf"}
    assert str(gguf) == str(tmp_path.resolve() / "m.Q4_1.gguf")
    hub = parse_pretrained("Qwen/Qwen2.5-0.5B@v1.0")
    assert (hub.name_or_path, hub.kwargs(), str(hub)) == (
        "Qwen/Qwen2.5-0.5B",
        {"revision": "v1.0"},
        "Qwen/Qwen2.5-0.5B@v1.0",
    )
    assert parse_pretrained("meta-llama/Llama-3.2-1B").kwargs() == {}
    for bad in ("", "./missing", "/no/such/dir", "a/b/c", "org/name@", "x.gguf", "org/na me"):
        with pytest.raises(PretrainedRefError):
            parse_pretrained(bad)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PretrainedRefError, match="a file, not a model directory"):
        parse_pretrained(tmp_path / "notes.txt")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, embedded_data):
    """HF_HOME holding `hycam-test/tiny-llama` exactly as a hub download leaves it:
    hub/models--ORG--NAME/{blobs, snapshots/REV, refs/main}, snapshot files linked to blobs."""
    import hashlib

    from data_pipeline import load_tokenizer
    from hycam_ds.modeling.backbones import build_backbone

    home = tmp_path_factory.mktemp("hf_home")
    staging = tmp_path_factory.mktemp("staging")
    tokenizer = load_tokenizer(embedded_data / "tokenizer")
    build_backbone("tiny-llama", len(tokenizer), seed=5).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    repo = home / "hub" / f"models--{ORG}--{NAME}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for path in staging.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return home


def offline_env(home):
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_entry(cmd, env, timeout=600):
    result = run_in_own_group([sys.executable, *cmd], timeout=timeout, cwd=REPO, env={**os.environ, **env})
    assert result.returncode == 0, f"{cmd} exited {result.returncode}\n{result.stderr[-4000:]}"
    return result


def test_hub_id_through_build_train_evaluate_generate(tmp_path, hub_cache):
    env = offline_env(hub_cache)
    data = tmp_path / "data"
    run_entry(
        [
            "-m",
            "data_pipeline",
            "build",
            "--recipe",
            "data_pipeline/recipes/embedded.yaml",
            "--out",
            str(data),
            "--tokenizer",
            HUB_ID,
            "--seq-len",
            "128",
            "--no-progress",
        ],
        env,
    )
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["source"] == HUB_ID  # recorded as written, not as a path

    run = tmp_path / "run"
    run_train(
        quick_args(run, data, steps=2, **{"model.path": f"{HUB_ID}@{REVISION}", "logging.eval_every": 0}), env=env
    )
    info = json.loads((run / "run_info.json").read_text())
    assert info["model"]["path"] == f"{HUB_ID}@{REVISION}" and info["tokenizer"] == f"{HUB_ID}@{REVISION}"
    assert (run / "adapter" / "adapter.safetensors").is_file()

    report_dir = tmp_path / "eval"
    run_entry(
        [
            "launch/evaluate.py",
            "--run-dir",
            str(run),
            "--out",
            str(report_dir),
            "--max-examples",
            "2",
            "--max-new-tokens",
            "4",
            "--no-progress",
        ],
        env,
    )
    report = json.loads((report_dir / "report.json").read_text())
    assert report["model"]["backbone_path"] == f"{HUB_ID}@{REVISION}" and report["tasks"]

    out = run_entry(
        [
            "launch/generate.py",
            "--backbone",
            HUB_ID,
            "--adapter",
            str(run / "adapter"),
            "--max-new-tokens",
            "4",
            "Add 2 and 3.",
        ],
        env,
    )
    assert ">>> Add 2 and 3." in out.stdout

    estimate = run_entry(
        ["launch/estimate.py", "--config", HUB_ID, "--num-nodes", "1", "--gpus-per-node", "1", "--json"], env
    )
    assert json.loads(estimate.stdout)["model_type"] == "llama"


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, hub_cache, embedded_data):
    result = run_train(
        quick_args(tmp_path / "run", embedded_data, steps=2, **{"model.path": "hycam-test/absent"}),
        env=offline_env(hub_cache),
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # refused while the configuration is checked, before any data build: its config cannot be read
    assert result.stderr.startswith(
        "train.py: invalid configuration: model.path: hycam-test/absent: cannot load its config"
    )
    assert "HF_HUB_OFFLINE" in result.stderr and "Traceback" not in result.stderr


def test_config_rejects_a_path_that_is_not_a_backbone(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/train.py", f"model.path={tmp_path}/missing/model"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "model.path" in result.stderr and "no such directory" in result.stderr
