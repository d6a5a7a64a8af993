"""Mistakes that used to build silent garbage (or fail deep inside a library) are one-line errors
naming the file or field, raised before the work where they can be seen: the recipe's types and
keys, a relative path without a data root, a tokenizer without a vocabulary, a seq_len that holds
no example, a task of junk, an empty split, input that is not text."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from dp_helpers import HYCAM5_RECIPE, write_recipe

import data_pipeline.build as build_module
from data_pipeline import (
    BuildConfig,
    BuildError,
    DataConfigError,
    TypedConfigError,
    UnsafeOutputError,
    build_dataset,
    load_manifest,
    load_recipe,
)
from data_pipeline.embedded import generate
from data_pipeline.tokenizer import MIN_VOCAB_SIZE


def write_rows(path: Path, generator: str, count: int, seed: int = 1) -> Path:
    rows = generate(generator, count, seed)
    path.write_text("".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A data root with two small tasks, its recipe, and a build of it (whose tokenizer the tests reuse)."""
    root = tmp_path_factory.mktemp("tiny")
    write_rows(root / "a.jsonl", "arithmetic", 60)
    write_rows(root / "c.jsonl", "code", 40)
    recipe = write_recipe(
        root / "r.yaml", {"a": [{"type": "alpaca", "path": "a.jsonl"}], "c": [{"type": "alpaca", "path": "c.jsonl"}]}
    )
    out = root / "build"
    build_dataset(BuildConfig(recipe=recipe, out=str(out), data_root=str(root), train_tokenizer=True, progress=False))
    return {"root": root, "recipe": recipe, "build": out, "tokenizer": str(out / "tokenizer")}


def config(recipe, root: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(recipe=str(recipe), out=str(out), data_root=str(root), progress=False, **kw)


def recipe_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


TASKS = "tasks:\n  - name: a\n    sources: [{type: embedded, generator: arithmetic, count: 5}]\n"
RECIPE_MISTAKES = [
    ("name: t\nseq_len: lots\n" + TASKS, "r.yaml: seq_len: expected an integer, got 'lots'"),
    ("name: t\ndedupe: 'no'\n" + TASKS, "r.yaml: dedupe: expected true/false, got 'no'"),
    ("name: t\nresponse_share: .nan\n" + TASKS, "r.yaml: response_share: expected a finite number"),
    ("name: t\nseq_lenn: 128\n" + TASKS, "unknown key seq_lenn"),
    ("name: t\ntokenizer: {vocab_size: 100}\n" + TASKS, f"tokenizer.vocab_size: must be at least {MIN_VOCAB_SIZE}"),
    ("name: t\ntokenizer: {model_type: wordpiece}\n" + TASKS, "tokenizer.model_type: 'wordpiece' is not one of"),
    ("name: t\nseq_len: 1\n" + TASKS, "seq_len: must be at least 2"),
    ("name: t\nsplits: {train: 0.5, eval: 0.2}\n" + TASKS, "splits: must be among"),
    ("name: t\nseq_len: 128\n" + TASKS + "seq_len: 64\n", "duplicate key 'seq_len' at line 6 (first at line 2)"),
    ("name: t\n" + TASKS.replace("count: 5", "count: 5, weight: 2"), "unknown key 'weight' for a embedded source"),
    ("name: t\n" + TASKS + "    weight: heavy\n", "tasks[0].weight: expected a number, got 'heavy'"),
    ("name: t\n" + TASKS.replace("embedded,", "embeded,"), "tasks[0].sources[0]: task a: unknown source type"),
    ("name: t\n" + TASKS.replace("arithmetic", "algebra"), "unknown embedded generator 'algebra'"),
    ("name: t\ntasks:\n  - name: a\n    sources: [{type: alpaca}]\n", "a alpaca source needs `path`"),
    ("name: t\ntasks:\n  - name: a\n    sources: [{type: alpaca, path: a.csv}]\n", "a.csv: unsupported file type"),
    ("name: t\ntasks:\n  - name: a\n    sources: [{type: alpaca, pth: a.json}]\n", "did you mean path?"),
    ("name: t\ntasks:\n  - name: a\n    sources: []\n", "tasks[0].sources: task a needs at least one source"),
    ("name: t\ndata_root: nowhere\n" + TASKS, "data_root: "),
    ("name: t\ntemplate: chatml\n" + TASKS, "template must be one of ['alpaca', 'chat'], not 'chatml'"),
    ("seq_len: 128\n" + TASKS, "missing key name"),
    ("- a\n- b\n", "expected a mapping at the top level"),
]


@pytest.mark.parametrize("text,message", RECIPE_MISTAKES, ids=[m for _, m in RECIPE_MISTAKES])
def test_recipe_mistakes_name_the_recipe_and_field(tmp_path, text, message):
    with pytest.raises(DataConfigError) as err:
        load_recipe(recipe_file(tmp_path, text))
    assert message in str(err.value) and str(err.value).startswith(f"recipe {tmp_path / 'r.yaml'}")
    assert isinstance(err.value, BuildError) and isinstance(err.value, TypedConfigError)  # what callers catch
    assert "\n" not in str(err.value)


def test_relative_paths_need_a_data_root_at_load(tmp_path):
    recipe = recipe_file(tmp_path, "name: t\ntasks:\n  - name: a\n    sources: [{type: alpaca, path: d/a.jsonl}]\n")
    with pytest.raises(DataConfigError) as err:
        load_recipe(recipe, root_required=True)
    for words in (str(recipe), "task a", "d/a.jsonl", "--data-root", "data.data_root"):
        assert words in str(err.value)
    assert load_recipe(recipe).data_root is None  # a caller that sets the root itself
    assert load_recipe(recipe, str(tmp_path), root_required=True).data_root == str(tmp_path.resolve())
    with pytest.raises(DataConfigError, match="--data-root .*nowhere: no such directory"):
        load_recipe(recipe, str(tmp_path / "nowhere"), root_required=True)
    absolute = write_recipe(tmp_path / "abs.yaml", {"a": [{"type": "alpaca", "path": str(tmp_path / "a.jsonl")}]})
    assert load_recipe(absolute, root_required=True).data_root is None  # an absolute path needs no root


def test_hycam5_without_data_root_fails_at_once(tmp_path):
    started = time.perf_counter()
    with pytest.raises(DataConfigError, match="task auto_cot reads tasks/auto_cot/Auto-CoT.json.*--data-root"):
        build_dataset(BuildConfig(recipe=HYCAM5_RECIPE, out=str(tmp_path / "o"), train_tokenizer=True, progress=False))
    assert time.perf_counter() - started < 5 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"workers": 0}, "--workers 0: must be at least 1"),
        ({"seq_len": "8"}, "seq_len: expected an integer, got '8'"),
        ({"seq_len": 1}, "--seq-len 1: must be at least 2"),
        ({"vocab_size": 10}, f"--vocab-size 10: must be at least {MIN_VOCAB_SIZE}"),
        ({"overlong": "cut"}, "--overlong cut: must be truncate or drop"),
        ({"strict": "yes"}, "strict: expected true/false"),
        ({"tokenizer": "x", "train_tokenizer": True}, "either --tokenizer or --train-tokenizer"),
    ],
)
def test_build_options_are_checked_when_made(kwargs, message):
    with pytest.raises(DataConfigError, match=message.replace("(", r"\(")):
        BuildConfig(recipe="r.yaml", out="o", **kwargs)


def test_build_config_takes_paths():
    cfg = BuildConfig(recipe=Path("r.yaml"), out=Path("o"), data_root=Path("d"))
    assert (cfg.recipe, cfg.out, cfg.data_root) == ("r.yaml", "o", "d")


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_must_not_be_the_data_root_or_an_input(tiny, tmp_path):
    before = snapshot(tiny["root"])
    for out, words in (
        (tiny["root"], "is the data root"),
        (tiny["root"].parent, "contains the data root"),
        (tiny["root"] / "a.jsonl", "is the input file"),
        (Path(tiny["tokenizer"]).parent, "contains the tokenizer"),
    ):
        cfg = BuildConfig(
            recipe=tiny["recipe"],
            out=str(out),
            data_root=str(tiny["root"]),
            tokenizer=tiny["tokenizer"],
            progress=False,
        )
        with pytest.raises(UnsafeOutputError, match=words):
            build_dataset(cfg)
    assert snapshot(tiny["root"]) == before


def test_a_file_written_into_out_during_the_build_is_not_deleted(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o"
    cfg = dict(recipe=tiny["recipe"], out=str(out), data_root=str(tiny["root"]), tokenizer=tiny["tokenizer"])
    build_dataset(BuildConfig(**cfg, progress=False))
    real = build_module._build_into

    def meanwhile(staging, recipe, config):
        real(staging, recipe, config)
        (out / "notes.txt").write_text("written while the build ran")

    monkeypatch.setattr(build_module, "_build_into", meanwhile)
    with pytest.raises(UnsafeOutputError, match="notes.txt"):
        build_dataset(BuildConfig(**cfg, progress=False))
    assert (out / "notes.txt").read_text() == "written while the build ran" and load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging left


def test_a_tokenizer_directory_without_vocabulary(tiny, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    cfg = BuildConfig(recipe=tiny["recipe"], out=str(tmp_path / "o"), data_root=str(tiny["root"]), tokenizer=str(empty))
    with pytest.raises(BuildError, match=f"--tokenizer {empty}: no tokenizer vocabulary in this directory"):
        build_dataset(cfg)
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_that_encodes_text_to_special_tokens_only(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(
        str(tmp_path / "tok")
    )
    cfg = BuildConfig(
        recipe=tiny["recipe"], out=str(tmp_path / "o"), data_root=str(tiny["root"]), tokenizer=str(tmp_path / "tok")
    )
    with pytest.raises(BuildError, match="encodes ordinary text to special tokens only"):
        build_dataset(cfg)
    assert not (tmp_path / "o").exists()


def test_a_seq_len_that_holds_no_example(tiny, tmp_path):
    cfg = dict(recipe=tiny["recipe"], data_root=str(tiny["root"]), tokenizer=tiny["tokenizer"], progress=False)
    with pytest.raises(BuildError, match="seq_len 8 cannot hold any example: the smallest example needs at least"):
        build_dataset(BuildConfig(out=str(tmp_path / "o"), seq_len=8, **cfg))
    with pytest.raises(BuildError) as err:  # not caught up front: found once the examples are tokenised
        build_dataset(BuildConfig(out=str(tmp_path / "o"), seq_len=40, overlong="drop", **cfg))
    message = str(err.value)
    assert message.startswith("seq_len 40 holds no example of task a (the smallest is ") and "too_long 60" in message
    needed = int(message.split("to at least ")[1])
    assert needed > 40
    build_dataset(BuildConfig(out=str(tmp_path / "o"), seq_len=needed, overlong="drop", **cfg))  # the advice works
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_a_task_of_junk_names_its_file_and_counts(tiny, tmp_path):
    (tmp_path / "junk.jsonl").write_bytes(b'{"instruction": "x"}\n[1, 2]\nnot json\n{"output": ""}\n')
    write_rows(tmp_path / "a.jsonl", "arithmetic", 30)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"a": [{"type": "alpaca", "path": "a.jsonl"}], "j": [{"type": "alpaca", "path": "junk.jsonl"}]},
    )
    for tokenizer in ({"tokenizer": tiny["tokenizer"]}, {"train_tokenizer": True}):
        with pytest.raises(BuildError) as err:
            build_dataset(
                BuildConfig(
                    recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), progress=False, **tokenizer
                )
            )
        assert str(err.value) == (
            f"task j: no usable row in {tmp_path / 'junk.jsonl'} (4 rows read, 0 kept, dropped: "
            "malformed_json 1, missing_field 2, not_object 1)"
        )


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", os.urandom(4096)], ids=["empty", "blank", "random"])
def test_empty_or_binary_input_for_tokenizer_training(tmp_path, content):
    (tmp_path / "d.jsonl").write_bytes(content)
    recipe = write_recipe(tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": "d.jsonl"}]})
    with pytest.raises(BuildError, match=f"task a: no usable row in {tmp_path / 'd.jsonl'}") as err:
        build_dataset(
            BuildConfig(recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), train_tokenizer=True)
        )
    assert "sentences_" not in str(err.value) and "\n" not in str(err.value)


def test_a_task_with_nothing_in_the_train_split(tiny, tmp_path):
    write_rows(tmp_path / "a.jsonl", "arithmetic", 3)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": "a.jsonl"}]}, splits={"train": 0.01, "eval": 0.99}
    )
    with pytest.raises(BuildError, match=r"task a: none of its 3 examples fell in the train split \(splits"):
        build_dataset(
            BuildConfig(recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), tokenizer=tiny["tokenizer"])
        )
    with pytest.raises(BuildError, match="no text to train the tokenizer on"):  # and before training one on nothing
        build_dataset(
            BuildConfig(recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), train_tokenizer=True)
        )


def test_a_vocabulary_too_small_for_the_corpus(tiny, tmp_path):
    with pytest.raises(BuildError, match=r"vocab_size 270 is too small for this corpus: .*at least \d+ pieces"):
        build_dataset(
            BuildConfig(
                recipe=tiny["recipe"],
                out=str(tmp_path / "o"),
                data_root=str(tiny["root"]),
                train_tokenizer=True,
                vocab_size=270,
                progress=False,
            )
        )


def test_unreadable_and_non_parquet_files_name_the_file(tiny, tmp_path):
    unreadable = tmp_path / "u.jsonl"
    if os.geteuid() == 0:  # root reads any mode: a file whose read fails with EIO instead
        unreadable.symlink_to("/proc/self/mem")
    else:
        unreadable.write_text("{}\n")
        unreadable.chmod(0)
    (tmp_path / "p.parquet").write_bytes(os.urandom(2000))
    for name, words in (("u.jsonl", "cannot read"), ("p.parquet", "not a readable Parquet file")):
        recipe = write_recipe(tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": name}]})
        with pytest.raises(BuildError) as err:
            build_dataset(
                BuildConfig(
                    recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), tokenizer=tiny["tokenizer"]
                )
            )
        assert str(tmp_path / name) in str(err.value) and words in str(err.value), str(err.value)


def test_the_cli_prints_one_line_for_a_users_mistake_and_a_traceback_for_a_bug(tmp_path, capsys, monkeypatch):
    from data_pipeline import __main__ as cli

    def raising(error):
        def build(cfg):
            raise error

        return build

    args = ["build", "--recipe", "r.yaml", "--out", str(tmp_path / "o")]
    for error, line in (
        (OSError(13, "Permission denied", "/data/x.jsonl"), "data_pipeline: /data/x.jsonl: Permission denied"),
        (BuildError("task a: no usable row\nin x"), "data_pipeline: task a: no usable row in x"),
        (DataConfigError("recipe r.yaml: seq_len: expected 1"), "data_pipeline: recipe r.yaml: seq_len: expected 1"),
    ):
        monkeypatch.setattr(cli, "build_dataset", raising(error))
        assert cli.main(args) == 2
        assert capsys.readouterr().err.splitlines() == [line]
    monkeypatch.setattr(cli, "build_dataset", raising(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(args)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["build", "--recipe", "r.yaml", "--out", "o", "--seq-len", "many"])
    assert exit_.value.code == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("data_pipeline: argument --seq-len: invalid int value: 'many'")


def test_the_cli_warns_of_an_empty_split(tiny, tmp_path, capsys):
    from data_pipeline.__main__ import main

    write_rows(tmp_path / "a.jsonl", "arithmetic", 12)
    recipe = write_recipe(
        tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": "a.jsonl"}]}, splits={"train": 0.98, "eval": 0.02}
    )
    args = ["build", "--recipe", recipe, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(args + ["--tokenizer", tiny["tokenizer"], "--no-progress"]) == 0
    assert capsys.readouterr().err == "data_pipeline: warning: split eval (fraction 0.02) is empty: too few examples\n"
