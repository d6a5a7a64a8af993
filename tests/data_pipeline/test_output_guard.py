"""output_guard: a build replaces --out only if it is absent, empty or a previous build holding
nothing else; never the data root, an input's directory or an ancestor of one (symlinks resolved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import UnsafeOutputError, check_output_dir
from data_pipeline.output_guard import check_replaceable, foreign_entries
from data_pipeline.shards import FORMAT, MANIFEST


def fake_build(out: Path) -> Path:
    """A directory laid out as a build: the manifest lists its shards and files."""
    (out / "train").mkdir(parents=True)
    (out / "tokenizer").mkdir()
    for rel in ("train/mixed-00000.bin", "train/mixed-00000.idx", "tokenizer/tokenizer.json", "bad_rows.jsonl"):
        (out / rel).write_bytes(b"x")
    shard = {"path": "train/mixed-00000.bin", "index_path": "train/mixed-00000.idx"}
    manifest = {
        "format": FORMAT,
        "version": 1,
        "splits": {"train": {"shards": [shard]}, "eval": {"shards": []}},
        "files": {"tokenizer/tokenizer.json": "0", "bad_rows.jsonl": "0"},
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "data"
    (root / "tasks").mkdir(parents=True)
    (root / "tasks" / "a.jsonl").write_text("{}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jsonl").write_text("{}\n")
    inputs = [
        ("the data root", root),
        ("the input file", root / "tasks" / "a.jsonl"),
        ("the input file", elsewhere / "b.jsonl"),
        ("the recipe", tmp_path / "recipes" / "r.yaml"),
    ]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("name: r\n")
    return tmp_path, inputs


def test_absent_empty_and_previous_builds_may_be_replaced(world):
    tmp, inputs = world
    assert check_output_dir(tmp / "new" / "deeper", inputs) == (tmp / "new" / "deeper").resolve()
    (tmp / "empty").mkdir()
    assert check_output_dir(tmp / "empty", inputs) == (tmp / "empty").resolve()
    build = fake_build(tmp / "old")
    assert check_output_dir(build, inputs) == build.resolve()
    assert check_output_dir(tmp / "data" / "build", inputs)  # inside the data root is fine
    assert not (tmp / "new").exists()  # checking creates nothing


@pytest.mark.parametrize(
    "out,words",
    [
        ("data", ("is the data root",)),
        (".", ("contains the data root",)),
        ("data/tasks", ("holds the input file", "a.jsonl")),
        ("data/tasks/a.jsonl", ("is the input file",)),
        ("elsewhere", ("holds the input file", "b.jsonl")),
        ("recipes", ("holds the recipe",)),
    ],
)
def test_inputs_and_their_ancestors_are_never_replaced(world, out, words):
    tmp, inputs = world
    with pytest.raises(UnsafeOutputError) as err:
        check_output_dir(tmp / out, inputs)
    assert all(w in str(err.value) for w in words) and "refusing" in str(err.value)


def test_symlinks_are_resolved(world):
    tmp, inputs = world
    (tmp / "link").symlink_to(tmp / "data")
    with pytest.raises(UnsafeOutputError, match="is the data root"):
        check_output_dir(tmp / "link", inputs)
    (tmp / "up").symlink_to(tmp)
    with pytest.raises(UnsafeOutputError, match="contains"):
        check_output_dir(tmp / "up", inputs)


def test_a_file_or_a_path_through_a_file_is_refused(world):
    tmp, inputs = world
    (tmp / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="notes.txt is a file, not a directory"):
        check_output_dir(tmp / "notes.txt", inputs)
    with pytest.raises(UnsafeOutputError, match="notes.txt is a file"):
        check_output_dir(tmp / "notes.txt" / "sub", inputs)


def test_a_directory_of_other_files_is_refused(world):
    tmp, inputs = world
    run = tmp / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    with pytest.raises(UnsafeOutputError) as err:
        check_output_dir(run, inputs)
    assert "not a data_pipeline build (checkpoints/, run_info.json)" in str(err.value)
    (tmp / "odd").mkdir()
    (tmp / "odd" / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(UnsafeOutputError, match="not a data_pipeline build"):
        check_output_dir(tmp / "odd", inputs)
    (tmp / "odd" / MANIFEST).write_text("{broken")
    with pytest.raises(UnsafeOutputError, match="not a data_pipeline build"):
        check_output_dir(tmp / "odd", inputs)


@pytest.mark.parametrize(
    "extra",
    ["notes.txt", "train/notes.txt", "tokenizer/extra.json", "checkpoints/", "train/sub/", "link"],
)
def test_a_build_holding_anything_else_is_refused(tmp_path, extra):
    build = fake_build(tmp_path / "b")
    if extra == "link":
        (build / "link").symlink_to(tmp_path)
    elif extra.endswith("/"):
        (build / extra).mkdir()
    else:
        (build / extra).write_text("mine")
    assert foreign_entries(build) == [extra]
    with pytest.raises(UnsafeOutputError, match="a data_pipeline build, but also files the build did not write"):
        check_replaceable(build)


def test_a_build_with_its_own_files_missing_is_still_a_build(tmp_path):
    build = fake_build(tmp_path / "b")
    (build / "train" / "mixed-00000.bin").unlink()
    assert foreign_entries(build) == []
