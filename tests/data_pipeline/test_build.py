"""The build: manifest, tokenizer, over-long policy, worker determinism, checksum verification."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys

import numpy as np
from dp_helpers import EMBEDDED_RECIPE, HYCAM5_RECIPE, REPO, write_recipe
from transformers import AutoTokenizer

from data_pipeline import (
    BuildConfig,
    build_dataset,
    format_prompt,
    load_manifest,
    load_tokenizer,
    tokenizer_fingerprint,
    verify,
)
from data_pipeline.shards import INDEX_COLUMNS


def test_embedded_manifest(embedded_build):
    m = load_manifest(embedded_build)
    assert [t["name"] for t in m["tasks"]] == ["arithmetic", "code", "medical", "general", "retrieval"]
    assert m["dtype"] == "<u2" and m["seq_len"] == 512 and 2000 <= m["vocab_size"] <= 4000
    assert sum(t["rows_read"] for t in m["tasks"]) == 3700 and m["bad_rows"]["count"] == 0
    for split in ("train", "eval", "test"):
        info = m["splits"][split]
        assert info["sequences"] > 0 and info["shards"]
        assert info["tokens"] == sum(t["tokens"][split] for t in m["tasks"])
        assert info["sequences"] >= info["lower_bound_sequences"]
        for shard in info["shards"]:
            data = np.fromfile(embedded_build / shard["path"], dtype=m["dtype"])
            assert data.size == shard["sequences"] * m["seq_len"] and data.max() < m["vocab_size"]
    assert m["splits"]["train"]["packing_efficiency"] > 0.95
    assert m["tokenizer"]["fingerprint"] == tokenizer_fingerprint(load_tokenizer(embedded_build / "tokenizer"))
    assert len(m["recipe_sha256"]) == 64 and m["recipe"]["name"] == "embedded"
    # splits are by content hash: ~90/5/5 of the documents
    docs = {s: m["splits"][s]["documents"] for s in ("train", "eval", "test")}
    assert 0.85 < docs["train"] / sum(docs.values()) < 0.95


def test_trained_tokenizer_loads_like_a_backbone_tokenizer(embedded_build):
    tok = AutoTokenizer.from_pretrained(str(embedded_build / "tokenizer"))
    assert tok.is_fast and tok.eos_token == "</s>" and tok.pad_token_id == 0
    text = format_prompt("Write a Python function that reverses a string.") + "def f(s):\n    return s[::-1]"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # lossless, indentation included
    assert len(ids) < len(text) / 2.5  # it compresses the corpus it was trained on


def test_documents_hold_prompt_response_and_eos(embedded_build):
    m = load_manifest(embedded_build)
    tok = load_tokenizer(embedded_build / "tokenizer")
    shard = m["splits"]["train"]["shards"][0]
    tokens = np.fromfile(embedded_build / shard["path"], dtype=m["dtype"]).reshape(-1, m["seq_len"])
    index = np.fromfile(embedded_build / shard["index_path"], dtype="<i4").reshape(-1, len(INDEX_COLUMNS))
    row, start, length, loss_start, task = index[0]
    doc = tokens[row, start : start + length].tolist()
    assert doc[0] == tok.bos_token_id and doc[-1] == tok.eos_token_id
    prompt, response = tok.decode(doc[1:loss_start]), tok.decode(doc[loss_start:-1])
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert "###" not in response and response.strip()
    assert (tokens[row, index[index[:, 0] == row][:, 2].sum() :] == m["pad_id"]).all()


def test_workers_do_not_change_a_single_byte(tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build_dataset(
            BuildConfig(
                recipe=EMBEDDED_RECIPE,
                out=str(out),
                train_tokenizer=True,
                workers=workers,
                progress=False,
                chunk_size=500,
            )
        )
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert len(files) > 5
    for rel in files:
        assert filecmp.cmp(outs[0] / rel, outs[1] / rel, shallow=False), rel


def test_overlong_truncate_and_drop_are_counted(tmp_path, embedded_build):
    long_answer = " ".join(f"word{i}" for i in range(400))
    rows = [
        {"instruction": "Say a lot.", "output": long_answer},
        {"instruction": "Short.", "output": "Yes."},
        {"instruction": "Read this.", "input": " ".join(f"p{i}" for i in range(500)), "output": "Done reading."},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": "d.jsonl"}]}, splits={"train": 1.0})
    tok = str(embedded_build / "tokenizer")
    m = load_manifest(
        build_dataset(
            BuildConfig(recipe=recipe, out=str(tmp_path / "t"), data_root=str(tmp_path), tokenizer=tok, progress=False)
        )
    )
    (task,) = m["tasks"]
    assert (task["kept"], task["truncated"], task["dropped"]) == (3, 2, {})
    out = tmp_path / "t"
    index = np.concatenate(
        [np.fromfile(out / s["index_path"], dtype="<i4").reshape(-1, 5) for s in m["splits"]["train"]["shards"]]
    )
    assert index[:, 2].max() == 128  # truncated documents fill the row exactly
    tokens = np.concatenate(
        [np.fromfile(out / s["path"], dtype=m["dtype"]).reshape(-1, 128) for s in m["splits"]["train"]["shards"]]
    )
    t = load_tokenizer(out / "tokenizer")
    cut_prompt = [tokens[r, s : s + n] for r, s, n, ls, _ in index if "Read this" in t.decode(tokens[r, s : s + ls])]
    assert t.decode(cut_prompt[0]).count("### Response:") == 1  # the long input is cut, the template tail kept
    m = load_manifest(
        build_dataset(
            BuildConfig(
                recipe=recipe,
                out=str(tmp_path / "d"),
                data_root=str(tmp_path),
                tokenizer=tok,
                overlong="drop",
                progress=False,
            )
        )
    )
    (task,) = m["tasks"]
    assert (task["kept"], task["truncated"], task["dropped"]) == (1, 0, {"too_long": 2})


def test_verify_names_a_flipped_byte_and_a_truncated_shard(tmp_path, embedded_build):
    out = tmp_path / "copy"
    shutil.copytree(embedded_build, out)
    assert verify(out) == []
    m = load_manifest(out)
    flipped, cut = m["splits"]["train"]["shards"][0]["path"], m["splits"]["eval"]["shards"][0]["index_path"]
    data = bytearray((out / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / flipped).write_bytes(bytes(data))
    (out / cut).write_bytes((out / cut).read_bytes()[:-3])
    problems = verify(out)
    assert len(problems) == 2 and flipped in problems[0] and "sha256" in problems[0] and cut in problems[1]
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "verify", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 1 and flipped in proc.stderr and cut in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "verify", str(embedded_build)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_hycam5_real_build(tmp_path, shared_data, embedded_build):
    """The five real tasks build into shards (with a tokenizer given by path) at >= 0.98 packing."""
    out = build_dataset(
        BuildConfig(
            recipe=HYCAM5_RECIPE,
            out=str(tmp_path / "h5"),
            data_root=str(shared_data),
            tokenizer=str(embedded_build / "tokenizer"),
            workers=2,
            progress=False,
        )
    )
    m = load_manifest(out)
    rows = {t["name"]: (t["rows_read"], t["kept"]) for t in m["tasks"]}
    # the real files repeat 11 Auto-CoT and 3 Dolly examples verbatim: later copies are dropped as duplicates
    assert rows["auto_cot"] == (5816, 5805) and rows["dolly"] == (6400, 6397) and rows["icliniq"] == (1000, 1000)
    dropped = {t["name"]: t["dropped"] for t in m["tasks"]}
    assert dropped["auto_cot"] == {"duplicate": 11} and dropped["dolly"] == {"duplicate": 3}
    assert rows["code_alpaca"][1] >= 2000 and rows["webgpt"][1] >= 800
    assert m["splits"]["train"]["packing_efficiency"] >= 0.98
    assert verify(out) == []
