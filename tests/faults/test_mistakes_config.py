"""User mistakes in configurations and command lines: each one, typed as a user would, ends in one
line naming the field or file, exit status 2, before any data is built or model loaded, and
nothing already on disk (a previous run, the data build) changes."""

import json

import pytest
from mistake_helpers import REPO, refused, run_entry, tree_digest

pytestmark = pytest.mark.faults

ITEM = "user mistakes: configs and command lines"


@pytest.fixture(scope="module")
def world(embedded_data, tmp_path_factory):
    """A previous run's directory, the data build, and bad inputs a user may point at."""
    root = tmp_path_factory.mktemp("mistakes")
    run = root / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text('{"step": 2}')
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    (run / "config.json").write_text("{}")
    no_config = root / "no_config"
    no_config.mkdir()
    (no_config / "tokenizer.json").write_text("{}")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "tokenizer.json").write_text("{}")
    zero3 = json.loads((REPO / "ds_configs/zero3.json").read_text())
    for name, change in (
        ("stage7", lambda c: c["zero_optimization"].update(stage=7)),
        ("unknown_key", lambda c: c["zero_optimization"].update(bogus=1)),
        ("optimizer_typo", lambda c: c["optimizer"].update(type="AdamWW")),
    ):
        config = json.loads(json.dumps(zero3))
        change(config)
        (root / f"{name}.json").write_text(json.dumps(config))
    (root / "broken.json").write_text('{"zero_optimization": {"stage": 3,}')
    (root / "broken.yaml").write_text("optim:\n  lr: [1e-3\n")
    (root / "twice.yaml").write_text("optim:\n  lr: 1.0e-3\noptim:\n  max_steps: 5\n")
    (root / "general_elsewhere").mkdir()
    (root / "general_elsewhere" / "notes.txt").write_text("my notes\n")
    (root / "texts").mkdir()
    (root / "texts" / "story.txt").write_text("Once upon a time there was a tokenizer.\n")
    return {
        "root": root,
        "run": run,
        "data": embedded_data,
        "no_config": no_config,
        "no_tokenizer": no_tokenizer,
        "gpt2": gpt2,
    }


def _train(world, *overrides, ds_config=None, config=None):
    args = ["launch/train.py", f"run_dir={world['run']}", f"data.dir={world['data']}", "checkpoint.resume=auto"]
    if ds_config:
        args += ["--ds_config", ds_config]
    if config:
        args += ["--config", config]
    return run_entry(args + list(overrides))


CASES = [
    # (case, command, words the one-line message must contain)
    ("optim.lr=.nan", lambda w: _train(w, "optim.lr=.nan"), ("optim.lr", "finite")),
    ("optim.max_steps=lots", lambda w: _train(w, "optim.max_steps=lots"), ("optim.max_steps", "integer")),
    ("a typo'd key", lambda w: _train(w, "optim.lrr=0.1"), ("optim.lrr",)),
    ("method=foo", lambda w: _train(w, "method=foo"), ("method",)),
    ("model.path without config.json", lambda w: _train(w, f"model.path={w['no_config']}"), ("config.json",)),
    ("model.path without tokenizer", lambda w: _train(w, f"model.path={w['no_tokenizer']}"), ("tokenizer",)),
    ("model.path of an unsupported family", lambda w: _train(w, f"model.path={w['gpt2']}"), ("gpt2", "model.path")),
    ("model.path that does not exist", lambda w: _train(w, "model.path=./no/such/model"), ("model.path",)),
    (
        "lora.target_modules with a typo",
        lambda w: _train(w, "method=lora", "lora.target_modules=[qproj,v_proj]"),
        ("lora.target_modules", "qproj"),
    ),
    ("optim.warmup_steps=0", lambda w: _train(w, "optim.warmup_steps=0"), ("optim.warmup_steps",)),
    (
        "ds_config zero_optimization.stage 7",
        lambda w: _train(w, ds_config=str(w["root"] / "stage7.json")),
        ("zero_optimization.stage",),
    ),
    (
        "ds_config unknown ZeRO key",
        lambda w: _train(w, ds_config=str(w["root"] / "unknown_key.json")),
        ("zero_optimization.bogus",),
    ),
    (
        "ds_config optimizer type typo",
        lambda w: _train(w, ds_config=str(w["root"] / "optimizer_typo.json")),
        ("optimizer.type", "AdamWW"),
    ),
    ("ds_config not JSON", lambda w: _train(w, ds_config=str(w["root"] / "broken.json")), ("invalid JSON",)),
    ("ds_config missing", lambda w: _train(w, ds_config="ds_configs/zero9.json"), ("--ds_config", "zero9")),
    ("--config missing", lambda w: _train(w, config="launch/configs/nope.yaml"), ("--config", "nope.yaml")),
    ("--config not YAML", lambda w: _train(w, config=str(w["root"] / "broken.yaml")), ("invalid YAML",)),
    (
        "two optim: blocks in one YAML",
        lambda w: _train(w, config=str(w["root"] / "twice.yaml")),
        ("duplicate", "optim"),
    ),
    ("data.vocab_size=10", lambda w: _train(w, "data.dir=null", "data.vocab_size=10"), ("data.vocab_size",)),
    (
        "hycam5 recipe without a data root",
        lambda w: _train(w, "data.dir=null", "data.recipe=data_pipeline/recipes/hycam5.yaml"),
        ("data_root",),
    ),
    ("data.dir without a build", lambda w: _train(w, f"data.dir={w['root']}"), ("data.dir", "manifest.json")),
    (
        "checkpoint.resume=a missing path",
        lambda w: _train(w, "checkpoint.resume=/no/such/ckpt"),
        ("checkpoint.resume",),
    ),
    (
        "evaluate --run-dir missing",
        lambda w: run_entry(["launch/evaluate.py", "--run-dir", w["root"] / "nope", "--out", w["root"] / "e"]),
        ("--run-dir",),
    ),
    (
        "evaluate --general-text missing",
        lambda w: run_entry(
            [
                "launch/evaluate.py",
                "--run-dir",
                w["run"],
                "--out",
                w["root"] / "e",
                "--general-text",
                w["root"] / "no_text",
            ]
        ),
        ("--general-text",),
    ),
    (
        "evaluate without --data or --run-dir",
        lambda w: run_entry(["launch/evaluate.py", "--backbone-name", "tiny-llama", "--out", w["root"] / "e"]),
        ("--data",),
    ),
    (
        "evaluate --batch-size abc",
        lambda w: run_entry(
            ["launch/evaluate.py", "--run-dir", w["run"], "--out", w["root"] / "e", "--batch-size", "abc"]
        ),
        ("--batch-size",),
    ),
    (
        "evaluate --dtype fp16",
        lambda w: run_entry(["launch/evaluate.py", "--run-dir", w["run"], "--out", w["root"] / "e", "--dtype", "fp16"]),
        ("--dtype", "fp16"),
    ),
    (
        "evaluate --device tpu",
        lambda w: run_entry(["launch/evaluate.py", "--run-dir", w["run"], "--out", w["root"] / "e", "--device", "tpu"]),
        ("--device", "tpu"),
    ),
    (
        "evaluate --device cuda:99",
        lambda w: run_entry(
            ["launch/evaluate.py", "--run-dir", w["run"], "--out", w["root"] / "e", "--device", "cuda:99"]
        ),
        ("--device cuda:99",),
    ),
    (
        "evaluate --device cpu under ZeRO-3",
        lambda w: run_entry(
            [
                "launch/evaluate.py",
                "--run-dir",
                w["run"],
                "--out",
                w["root"] / "e",
                "--ds_config",
                "ds_configs/zero3.json",
                "--device",
                "cpu",
            ]
        ),
        ("--device", "ZeRO-3"),
    ),
    (
        "generate --dtype half",
        lambda w: run_entry(["launch/generate.py", "--run-dir", w["run"], "--dtype", "half", "hello"]),
        ("--dtype", "half"),
    ),
    (
        "generate --device gpu",
        lambda w: run_entry(["launch/generate.py", "--run-dir", w["run"], "--device", "gpu", "hello"]),
        ("--device", "gpu"),
    ),
    (
        "generate --max-new-tokens -1",
        lambda w: run_entry(["launch/generate.py", "--run-dir", w["run"], "--max-new-tokens", "-1", "hello"]),
        ("--max-new-tokens",),
    ),
    (
        "compare unknown method",
        lambda w: run_entry(
            [
                "launch/compare.py",
                "--backbone-name",
                "tiny-llama",
                "--out",
                w["root"] / "c",
                "--methods",
                "backbone,hycamm",
            ]
        ),
        ("hycamm",),
    ),
    (
        "compare --lrs malformed",
        lambda w: run_entry(
            ["launch/compare.py", "--backbone-name", "tiny-llama", "--out", w["root"] / "c", "--lrs", "hycam=fast"]
        ),
        ("--lrs",),
    ),
    (
        "pretrain --out onto someone's files",
        lambda w: run_entry(
            ["launch/pretrain.py", "--out", w["root"] / "general_elsewhere", "--text-dir", w["root"] / "texts"]
            + ["--minutes", "0.01"]
        ),
        ("refusing", "general_elsewhere"),
    ),
]


@pytest.mark.parametrize("case,command,words", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_and_changes_nothing(world, case, command, words, fault_table):
    before = tree_digest(world["run"], world["data"], world["root"])
    proc = command(world)
    ok = refused(proc, *words) and tree_digest(world["run"], world["data"], world["root"]) == before
    fault_table.append(
        {
            "item": ITEM,
            "case": case,
            "trials": 1,
            "passed": int(ok),
            "detail": "exit 2, one line naming it, nothing on disk changed",
        }
    )
    assert refused(proc, *words), f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert tree_digest(world["run"], world["data"], world["root"]) == before, f"{case} changed files on disk"
