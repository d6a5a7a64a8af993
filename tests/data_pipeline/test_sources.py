"""Every source adapter, on small inline files (always) and on the real rows (when present)."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.examples import BadRow, Example
from data_pipeline.sources import read_source
from data_pipeline.sources.icliniq import DOCTOR_INSTRUCTION


def rows(spec, root, task="t", tasks=("t",)):
    return [r[3] for r in read_source(spec, task, Path(root), list(tasks))]


def examples(spec, root, **kw):
    out = rows(spec, root, **kw)
    assert all(isinstance(e, Example) for e in out), [e for e in out if not isinstance(e, Example)]
    return out


def test_alpaca_json_list_jsonl_and_parquet(tmp_path):
    data = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(data, indent=2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(data), tmp_path / "a.parquet")
    for name in ("a.json", "a.jsonl", "a.parquet"):
        got = examples({"type": "alpaca", "path": name}, tmp_path)
        assert [(e.instruction, e.input, e.output) for e in got] == [("Add.", "1 2", "3"), ("Say hi.", "", "hi")]
    # JSON list elements carry the line they start on (for bad-row reports)
    assert [e.line for e in examples({"type": "alpaca", "path": "a.json"}, tmp_path)] == [2, 7]
    assert [e.line for e in examples({"type": "alpaca", "path": "a.jsonl"}, tmp_path)] == [1, 2]


def test_alpaca_field_renames_and_task_field(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"q": "Why?", "a": "Because.", "task": "x"})
        + "\n"
        + json.dumps({"q": "Hm?", "a": "Yes.", "task": "zzz"})
        + "\n"
    )
    got = rows(
        {"type": "alpaca", "path": "m.jsonl", "fields": {"instruction": "q", "output": "a"}, "task_field": "task"},
        tmp_path,
        task="x",
        tasks=("x", "y"),
    )
    assert got[0] == Example("x", "Why?", "", "Because.", str(tmp_path / "m.jsonl"), 1)
    assert isinstance(got[1], BadRow) and got[1].reason == "unknown_task"


def test_icliniq_uses_the_suggested_instruction(tmp_path):
    (tmp_path / "i.jsonl").write_text(json.dumps({"instruction": "", "input": "I cough.", "output": "Rest."}) + "\n")
    (e,) = examples({"type": "icliniq", "path": "i.jsonl"}, tmp_path)
    assert (e.instruction, e.input, e.output) == (DOCTOR_INSTRUCTION, "I cough.", "Rest.")


def test_dolly_takes_text_and_drops_decoded(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": 0, "instruction": "When?", "text": "In 2000.", "decoded": "MODEL OUTPUT"}) + "\n"
    )
    (e,) = examples({"type": "dolly", "path": "d.jsonl"}, tmp_path)
    assert (e.instruction, e.input, e.output) == ("When?", "", "In 2000.")
    assert "MODEL OUTPUT" not in repr(e)


def test_webgpt_joins_both_answer_sources_with_their_quotes(tmp_path):
    answers = [
        {
            "question_id": 7,
            "question": "Why is the sky blue?",
            "webgpt_answer": "Scattering [1].",
            "human_answer": "Rayleigh.",
        },
        {"question_id": 8, "question": "Q2", "webgpt_answer": "A2", "human_answer": ""},
    ]
    docs_w = [
        {"question_id": 7, "question": "-", "docs": [{"doc_id": "w0", "title": "Sky", "text": "Light scatters."}]},
        {
            "question_id": 8,
            "question": "-",
            "docs": [{"doc_id": "w1", "title": "T", "text": "x"}, {"doc_id": "w2", "title": "U", "text": "y"}],
        },
    ]
    docs_h = [
        {
            "question_id": 7,
            "question": "-",
            "docs": [{"doc_id": "h0", "title": "Physics", "text": "Rayleigh scattering."}],
        },
        {"question_id": 8, "question": "-", "docs": []},
    ]
    for name, obj in (("answers.json", answers), ("w.json", docs_w), ("h.json", docs_h)):
        (tmp_path / name).write_text(json.dumps(obj))
    got = rows({"type": "webgpt", "answers": "answers.json", "docs_webgpt": "w.json", "docs_human": "h.json"}, tmp_path)
    assert (
        got[0].instruction == "Why is the sky blue?"
        and got[0].input == "[1] Sky\nLight scatters."
        and got[0].output == "Scattering [1]."
    )
    assert got[1].input == "[1] Physics\nRayleigh scattering." and got[1].output == "Rayleigh."
    assert got[2].input == "[1] T\nx\n\n[2] U\ny"
    assert isinstance(got[3], BadRow) and got[3].reason == "empty_response"


def test_clapnq_uses_passage_and_last_answer(tmp_path):
    row = {
        "id": "1",
        "input": "who won",
        "passages": [{"title": "Cup", "text": "Team A won ."}],
        "output": [{"answer": "first"}, {"answer": "Team A won ."}],
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    (e,) = examples({"type": "clapnq", "path": "c.jsonl"}, tmp_path)
    assert (e.instruction, e.input, e.output) == ("who won", "Cup\nTeam A won .", "Team A won .")


def test_hf_datasets_spec_on_a_local_file(tmp_path):
    (tmp_path / "h.jsonl").write_text(
        "".join(json.dumps({"instruction": f"I{i}", "input": "", "output": f"O{i}"}) + "\n" for i in range(3))
    )
    got = examples({"type": "hf", "dataset": "json", "data_files": "h.jsonl"}, tmp_path)
    assert [(e.instruction, e.output, e.line) for e in got] == [("I0", "O0", 1), ("I1", "O1", 2), ("I2", "O2", 3)]


def test_embedded_source_yields_examples(tmp_path):
    got = examples({"type": "embedded", "generator": "retrieval", "count": 5, "seed": 3}, tmp_path)
    assert len(got) == 5 and all(e.input.startswith("[1] ") for e in got)


# ---- real rows (skipped without ../shared/data) ----


def test_real_auto_cot_and_code_alpaca(shared_data):
    auto = examples({"type": "alpaca", "path": "tasks/auto_cot/Auto-CoT.json"}, shared_data)
    assert len(auto) == 5816 and all(e.input == "" for e in auto)
    assert auto[0].output.startswith("Let's think step by step.")
    code = rows({"type": "alpaca", "path": "tasks/code_alpaca/code_alpaca_2k.json"}, shared_data)
    good = [e for e in code if isinstance(e, Example)]
    assert len(code) == 2017 and len(good) >= 2000
    assert 0.3 < sum(bool(e.input) for e in good) / len(good) < 0.7  # "half have empty input"


def test_real_icliniq(shared_data):
    got = examples({"type": "icliniq", "path": "tasks/icliniq/iCliniq_1k_gpt-4_answers.jsonl"}, shared_data)
    assert len(got) == 1000 and all(e.instruction == DOCTOR_INSTRUCTION and e.input for e in got)


def test_real_dolly_never_reads_decoded(shared_data):
    path = shared_data / "tasks/dolly/dolly_first6400_instruction_response.jsonl"
    got = examples({"type": "dolly", "path": "tasks/dolly/dolly_first6400_instruction_response.jsonl"}, shared_data)
    raw = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    assert len(got) == 6400
    assert [e.output for e in got[:200]] == [r["text"].strip() for r in raw]
    assert all(e.output != r["decoded"].strip() for e, r in zip(got, raw) if r["decoded"].strip() != r["text"].strip())


def test_real_webgpt_and_clapnq(shared_data):
    spec = {
        "type": "webgpt",
        "answers": "tasks/webgpt/answers.json",
        "docs_webgpt": "tasks/webgpt/docs-webgpt.json",
        "docs_human": "tasks/webgpt/docs-human.json",
    }
    got = rows(spec, shared_data)
    good = [e for e in got if isinstance(e, Example)]
    assert len(got) == 2 * 271 and len(good) >= 520
    assert all(e.input.startswith("[1] ") for e in good)
    assert all(b.reason == "empty_response" for b in got if isinstance(b, BadRow))
    clap = examples({"type": "clapnq", "path": "tasks/webgpt/clapnq/clapnq_dev_answerable.jsonl"}, shared_data)
    assert len(clap) == 300 and all(e.output and e.input for e in clap)
