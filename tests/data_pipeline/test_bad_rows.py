"""Bad input is counted by reason with file and line, --strict stops on it, failures lose nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dp_helpers import REPO, write_recipe

from data_pipeline import BuildConfig, BuildError, build_dataset, load_manifest

GOOD = {"instruction": "Add two and two.", "input": "", "output": "Four.", "task": "a"}
# line -> (raw bytes of the line, expected reason)
BAD_LINES = {
    2: (b'{"instruction": "x", "output": ', "malformed_json"),
    3: (b'{"instruction": "caf\xe9", "output": "y", "task": "a"}', "invalid_utf8"),
    4: (json.dumps({"instruction": "x", "task": "a"}).encode(), "missing_field"),
    5: (json.dumps({"instruction": "x", "output": 5, "task": "a"}).encode(), "wrong_type"),
    6: (json.dumps({"instruction": "x", "output": "   ", "task": "a"}).encode(), "empty_response"),
    7: (json.dumps({"instruction": " ", "input": "", "output": "y", "task": "a"}).encode(), "empty_prompt"),
    8: (json.dumps({"instruction": "x", "output": "y", "task": "nope"}).encode(), "unknown_task"),
    9: (b'["not", "an", "object"]', "not_object"),
    10: (json.dumps({"instruction": "x", "output": None, "task": "a"}).encode(), "null_field"),
    11: (json.dumps(GOOD).encode(), "duplicate"),  # of line 1: the first copy is kept
    12: (json.dumps({"instruction": "x", "output": "y" * 3000, "task": "a"}).encode(), "oversized_row"),
}


def make_inputs(tmp_path: Path) -> str:
    lines = (
        [json.dumps(GOOD).encode()]
        + [BAD_LINES[i][0] for i in sorted(BAD_LINES)]
        + [json.dumps({**GOOD, "output": "4"}).encode()]
    )
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # a JSON list whose second element holds bytes that are not UTF-8
    (tmp_path / "list.json").write_bytes(
        b'[\n {"instruction": "ok", "output": "fine"},\n {"instruction": "\xff\xfe", "output": "z"}\n]\n'
    )
    return write_recipe(
        tmp_path / "r.yaml",
        {"a": [{"type": "alpaca", "path": "bad.jsonl", "task_field": "task"}, {"type": "alpaca", "path": "list.json"}]},
        max_row_bytes=2000,
    )


def test_every_bad_row_is_counted_with_file_and_line(tmp_path, embedded_build):
    recipe = make_inputs(tmp_path)
    out = build_dataset(
        BuildConfig(
            recipe=recipe,
            out=str(tmp_path / "o"),
            data_root=str(tmp_path),
            tokenizer=str(embedded_build / "tokenizer"),
            progress=False,
        )
    )
    manifest = load_manifest(out)
    (task,) = manifest["tasks"]
    assert task["rows_read"] == 13 + 2 and task["kept"] == 3
    assert task["dropped"] == {
        "malformed_json": 1,
        "invalid_utf8": 2,
        "not_object": 1,
        "missing_field": 1,
        "null_field": 1,
        "wrong_type": 1,
        "empty_response": 1,
        "empty_prompt": 1,
        "unknown_task": 1,
        "duplicate": 1,
        "oversized_row": 1,
    }
    report = [json.loads(line) for line in (Path(out) / "bad_rows.jsonl").read_text().splitlines()]
    got = {(Path(r["file"]).name, r["line"], r["reason"]) for r in report}
    want = {("bad.jsonl", line, reason) for line, (_, reason) in BAD_LINES.items()} | {("list.json", 3, "invalid_utf8")}
    assert got == want
    assert manifest["bad_rows"]["count"] == len(want)


def test_strict_stops_at_the_first_bad_row_with_its_location(tmp_path, embedded_build):
    recipe = make_inputs(tmp_path)
    with pytest.raises(BuildError, match=r"bad\.jsonl:2: malformed_json"):
        build_dataset(
            BuildConfig(
                recipe=recipe,
                out=str(tmp_path / "o"),
                data_root=str(tmp_path),
                tokenizer=str(embedded_build / "tokenizer"),
                strict=True,
                progress=False,
            )
        )
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no partial temp dir left


def test_cli_strict_exits_nonzero_with_the_message(tmp_path, embedded_build):
    recipe = make_inputs(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline",
            "build",
            "--recipe",
            recipe,
            "--out",
            str(tmp_path / "o"),
            "--data-root",
            str(tmp_path),
            "--tokenizer",
            str(embedded_build / "tokenizer"),
            "--strict",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "bad.jsonl:2: malformed_json" in proc.stderr


def test_failed_build_keeps_the_previous_output(tmp_path, embedded_build):
    recipe = make_inputs(tmp_path)
    cfg = dict(
        recipe=recipe,
        out=str(tmp_path / "o"),
        data_root=str(tmp_path),
        tokenizer=str(embedded_build / "tokenizer"),
        progress=False,
    )
    build_dataset(BuildConfig(**cfg))
    before = {p.relative_to(tmp_path / "o"): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    (tmp_path / "bad.jsonl").write_bytes(b"{broken\n")  # now fails in strict mode
    with pytest.raises(BuildError):
        build_dataset(BuildConfig(**cfg, strict=True))
    (tmp_path / "list.json").unlink()  # and a missing file fails in any mode
    with pytest.raises(BuildError, match="not found"):
        build_dataset(BuildConfig(**cfg))
    after = {p.relative_to(tmp_path / "o"): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "o", "r.yaml"]
