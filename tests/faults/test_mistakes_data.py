"""User mistakes on the data side, typed as a user would type them: every one run through the real
CLI (`python -m data_pipeline build ...`) ends with exit status 2 and one line on stderr naming the
file or field, and nothing already on disk (the data root, a previous build, a run directory, the
recipes) changes: every file's sha256 is the same before and after, and no file appears."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import BuildConfig, build_dataset
from data_pipeline.embedded import generate

# A case refused before the tokenizer is loaded takes < 1 s; one refused after it ~4 s of CPU (importing
# transformers, which imports torch), more in wall time on busy cores. The timeout guards against a hang.
pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
ITEM = "user mistakes: data builds"
# The build's progress on stderr, not a message: a tqdm bar on a terminal, timestamped lines otherwise.
PROGRESS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?read: +\d+")


def _rows(path: Path, generator: str, count: int) -> None:
    rows = generate(generator, count, 1)
    path.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in rows))


def _recipe(path: Path, tasks: dict, **extra) -> Path:
    """A recipe YAML written by hand, as a user would (so it can hold a duplicate key)."""
    lines = [f"name: {path.stem}"] + [f"{k}: {v}" for k, v in extra.items()]
    lines += ["tokenizer: {vocab_size: 400}", "tasks:"]
    for name, source in tasks.items():
        lines += [f"  - name: {name}", f"    sources: [{source}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _specials_only_tokenizer(out: Path) -> None:
    """A tokenizer whose vocabulary holds only <unk> and </s>: every word encodes to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(str(out))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data root of small task files (good and bad), recipes, a previous build, a run directory."""
    root = tmp_path_factory.mktemp("mistakes_data")
    data, recipes = root / "data", root / "recipes"
    data.mkdir(), recipes.mkdir()
    _rows(data / "a.jsonl", "arithmetic", 60)
    _rows(data / "c.jsonl", "code", 40)
    (data / "empty.jsonl").write_bytes(b"")
    (data / "rand.jsonl").write_bytes(hashlib.sha256(b"seed").digest() * 200)  # 6.4 KB of noise
    (data / "junk.jsonl").write_bytes(b'{"instruction": "x"}\n[1, 2]\nnot json\n{"output": ""}\n')
    (data / "p.parquet").write_bytes(hashlib.sha256(b"parquet").digest() * 60)
    unreadable = data / "u.jsonl"
    if os.geteuid() == 0:  # root reads any file mode: a file whose read fails (EIO) stands in
        unreadable.symlink_to("/proc/self/mem")
    else:
        unreadable.write_text("{}\n")
        unreadable.chmod(0)
    good = {"a": "{type: alpaca, path: a.jsonl}", "c": "{type: alpaca, path: c.jsonl}"}
    _recipe(recipes / "good.yaml", good, seq_len=128)
    _recipe(recipes / "typo.yaml", good, seq_lenn=128)
    _recipe(recipes / "wrong_type.yaml", good, seq_len="lots")
    _recipe(recipes / "bool.yaml", good, dedupe="'no'")
    _recipe(recipes / "template.yaml", good, template="chatml")
    _recipe(recipes / "duplicate.yaml", good, seq_len="128\nsplits: {train: 0.8, eval: 0.2}\nseq_len: 256")
    _recipe(recipes / "source_type.yaml", {"a": "{type: alpacca, path: a.jsonl}"})
    _recipe(recipes / "missing.yaml", {"a": "{type: alpaca, path: missing.jsonl}"})
    _recipe(recipes / "junk.yaml", {"a": good["a"], "j": "{type: alpaca, path: junk.jsonl}"})
    _recipe(recipes / "no_train.yaml", {"a": good["a"]}, splits="{train: 0.001, eval: 0.999}")
    for name in ("empty", "rand", "u", "p"):
        suffix = ".parquet" if name == "p" else ".jsonl"
        _recipe(recipes / f"{name}.yaml", {"a": f"{{type: alpaca, path: {name}{suffix}}}"})

    build = root / "build"
    build_dataset(
        BuildConfig(
            recipe=str(recipes / "good.yaml"), out=str(build), data_root=str(data), train_tokenizer=True, progress=False
        )
    )
    noted = root / "noted_build"
    shutil.copytree(build, noted)
    (noted / "notes.md").write_text("my notes on this build\n")

    run = root / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text('{"step": 2}')
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter.safetensors").write_bytes(b"\0" * 64)
    (run / "run_info.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "notes.txt").write_text("a file, not a directory\n")
    (root / "no_vocab").mkdir()
    (root / "no_vocab" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    _specials_only_tokenizer(root / "specials_only")
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (a symlink counts as its target's name, never followed)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            digest[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def build_cli(root: Path, *args: str, recipe: str = "good", data_root: bool = True) -> subprocess.CompletedProcess:
    """`python -m data_pipeline build --recipe ... [--data-root ...] args...` from the repository."""
    command = [sys.executable, "-m", "data_pipeline", "build", "--recipe", str(root / "recipes" / f"{recipe}.yaml")]
    command += ["--data-root", str(root / "data")] if data_root else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        command + [str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _out(root: Path, name: str = "new_build") -> str:
    return str(root / name)


CASES = [
    # (case, arguments after --recipe/--data-root given the world's root, recipe, words the line must hold)
    ("--out is the data root", lambda w: ["--out", w / "data", "--train-tokenizer"], "good", ("--out", "data root")),
    ("--out is a file", lambda w: ["--out", w / "notes.txt", "--train-tokenizer"], "good", ("notes.txt", "a file")),
    (
        "--out is an ancestor of the data root",
        lambda w: ["--out", w, "--train-tokenizer"],
        "good",
        ("--out", "contains the data root"),
    ),
    (
        "--out is an input file",
        lambda w: ["--out", w / "data" / "a.jsonl", "--train-tokenizer"],
        "good",
        ("--out", "a.jsonl"),
    ),
    (
        "--out is a run directory",
        lambda w: ["--out", w / "run", "--train-tokenizer"],
        "good",
        ("--out", "not a data_pipeline build", "checkpoints/"),
    ),
    (
        "--out is the recipe's directory",
        lambda w: ["--out", w / "recipes", "--train-tokenizer"],
        "good",
        ("--out", "holds the recipe"),
    ),
    (
        "--out is a build holding someone's notes",
        lambda w: ["--out", w / "noted_build", "--train-tokenizer"],
        "good",
        ("--out", "notes.md", "did not write"),
    ),
    (
        "--out is the build whose tokenizer it reads",
        lambda w: ["--out", w / "build", "--tokenizer", w / "build" / "tokenizer"],
        "good",
        ("--out", "contains the tokenizer"),
    ),
    (
        "relative task paths without --data-root",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        ("good", False),
        ("good.yaml", "task a", "--data-root", "data.data_root"),
    ),
    ("--recipe that does not exist", lambda w: ["--out", _out(w)], "nope", ("recipe", "nope.yaml", "no such file")),
    (
        "--data-root that does not exist",
        lambda w: ["--data-root", w / "no_data", "--out", _out(w), "--train-tokenizer"],
        "good",
        ("--data-root", "no_data", "no such directory"),
    ),
    (
        "a typo'd recipe key",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "typo",
        ("typo.yaml", "seq_lenn", "did you mean seq_len"),
    ),
    (
        "a wrong type (seq_len: lots)",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "wrong_type",
        ("wrong_type.yaml", "seq_len", "integer"),
    ),
    (
        "text for a boolean (dedupe: 'no')",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "bool",
        ("bool.yaml", "dedupe", "true/false"),
    ),
    (
        "duplicate YAML keys",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "duplicate",
        ("duplicate.yaml", "duplicate key 'seq_len'", "line"),
    ),
    (
        "an unknown task source type",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "source_type",
        ("source_type.yaml", "alpacca", "unknown source type"),
    ),
    (
        "a template name that does not exist (recipe)",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "template",
        ("template.yaml", "template", "chatml"),
    ),
    (
        "a template name that does not exist (--template)",
        lambda w: ["--out", _out(w), "--train-tokenizer", "--template", "chatml"],
        "good",
        ("--template", "chatml"),
    ),
    (
        "--workers 0",
        lambda w: ["--out", _out(w), "--train-tokenizer", "--workers", "0"],
        "good",
        ("--workers",),
    ),
    (
        "a missing input file",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "missing",
        ("missing.jsonl", "not found"),
    ),
    (
        "an unreadable input file",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "u",
        ("u.jsonl", "cannot read"),
    ),
    (
        "an empty input file (--train-tokenizer)",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "empty",
        ("empty.jsonl", "no usable row", "0 rows read"),
    ),
    (
        "random bytes as input (--train-tokenizer)",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "rand",
        ("rand.jsonl", "no usable row"),
    ),
    (
        "random bytes named .parquet",
        lambda w: ["--out", _out(w), "--train-tokenizer"],
        "p",
        ("p.parquet", "not a readable Parquet file"),
    ),
    (
        "a task of junk beside a good one",
        lambda w: ["--out", _out(w), "--tokenizer", w / "build" / "tokenizer"],
        "junk",
        ("task j", "junk.jsonl", "malformed_json 1"),
    ),
    (
        "a task with nothing in the train split",
        lambda w: ["--out", _out(w), "--tokenizer", w / "build" / "tokenizer"],
        "no_train",
        ("task a", "train split"),
    ),
    (
        "--seq-len 8",
        lambda w: ["--out", _out(w), "--tokenizer", w / "build" / "tokenizer", "--seq-len", "8"],
        "good",
        ("seq_len 8", "smallest example"),
    ),
    (
        "--seq-len 40 --overlong drop (every example too long)",
        lambda w: ["--out", _out(w), "--tokenizer", w / "build" / "tokenizer", "--seq-len", "40", "--overlong", "drop"],
        "good",
        ("seq_len 40", "the smallest is", "too_long"),
    ),
    (
        "a tokenizer directory without vocabulary",
        lambda w: ["--out", _out(w), "--tokenizer", w / "no_vocab"],
        "good",
        ("--tokenizer", "no_vocab", "no tokenizer vocabulary"),
    ),
    (
        "a tokenizer that encodes text to special tokens only",
        lambda w: ["--out", _out(w), "--tokenizer", w / "specials_only"],
        "good",
        ("specials_only", "special tokens only"),
    ),
    (
        "--tokenizer that does not exist",
        lambda w: ["--out", _out(w), "--tokenizer", w / "no_such_tokenizer"],
        "good",
        ("--tokenizer", "no_such_tokenizer"),
    ),
    (
        "--vocab-size too small for the corpus",
        lambda w: ["--out", _out(w), "--train-tokenizer", "--vocab-size", "270"],
        "good",
        ("vocab_size 270", "too small"),
    ),
    (
        "--template chat with a tokenizer trained here",
        lambda w: ["--out", _out(w), "--train-tokenizer", "--template", "chat"],
        "good",
        ("chat template",),
    ),
]


def refused(proc: subprocess.CompletedProcess, words) -> bool:
    """Exit 2, nothing on stdout, and exactly one line on stderr besides the progress bar:
    `data_pipeline: ...` holding `words`."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    return (
        proc.returncode == 2
        and not proc.stdout.strip()
        and len(lines) == 1
        and lines[0].startswith("data_pipeline: ")
        and all(word in lines[0] for word in words)
    )


@pytest.mark.parametrize("case,args,recipe,words", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_and_changes_nothing(world, case, args, recipe, words, fault_table):
    recipe, with_root = recipe if isinstance(recipe, tuple) else (recipe, True)
    before = tree_digest(world)
    proc = build_cli(world, *args(world), recipe=recipe, data_root=with_root)
    after = tree_digest(world)
    ok = refused(proc, words) and after == before
    fault_table.append(
        {
            "item": ITEM,
            "case": case,
            "trials": 1,
            "passed": int(ok),
            "detail": "exit 2, one line naming it, nothing on disk changed",
        }
    )
    assert refused(proc, words), f"{case}: exit {proc.returncode}\nstdout: {proc.stdout[-500:]}\n{proc.stderr[-3000:]}"
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert after == before, f"{case} changed files on disk: {changed[:5]}"


def test_a_previous_build_is_still_replaced(world, tmp_path, fault_table):
    """The guard refuses only what it must: rebuilding into a previous build works (exit 0)."""
    out = tmp_path / "rebuild"
    shutil.copytree(world / "build", out)
    tokenizer = world / "build" / "tokenizer"
    proc = build_cli(world, "--out", out, "--tokenizer", tokenizer, "--no-progress", "--seq-len", "64")
    ok = proc.returncode == 0 and json.loads(proc.stdout)["out"] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    ok = ok and manifest["seq_len"] == 64 and not [p for p in tmp_path.iterdir() if p.name != "rebuild"]
    fault_table.append(
        {
            "item": ITEM,
            "case": "--out a previous build (allowed)",
            "trials": 1,
            "passed": int(ok),
            "detail": "replaced atomically, exit 0",
        }
    )
    assert ok, proc.stderr[-3000:]
