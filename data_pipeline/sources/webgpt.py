"""Retrieval-augmented QA: WebGPT answers joined with their quotes, and ClapNQ passages.

WebGPT (`answers.json` + `docs-webgpt.json` + `docs-human.json`, aligned by `question_id`)
gives two examples per question: the WebGPT answer with the WebGPT quotes, and the human
answer with the human quotes. instruction = question, input = quotes as `[i] title\\ntext`
joined by blank lines, output = the answer; empty answers are counted as `empty_response`.
ClapNQ (JSONL): instruction = the query, input = passage title + text, output = the last
non-empty answer.
"""

from __future__ import annotations

from pathlib import Path

from ..examples import BadRow, get_str, make_example
from .files import iter_records

# answer field -> the spec key naming the quotes file that goes with it
ANSWER_SOURCES = (("webgpt_answer", "docs_webgpt"), ("human_answer", "docs_human"))


def format_quotes(docs: list) -> str:
    parts = []
    for i, doc in enumerate(docs, start=1):
        title, text = get_str(doc, "title", required=False), get_str(doc, "text")
        parts.append(f"[{i}] {title}\n{text}" if title else f"[{i}] {text}")
    return "\n\n".join(parts)


def _load_docs(path: Path) -> dict:
    """question_id -> docs list; bad records here only lose their quotes (reported on the answer)."""
    docs = {}
    for _, record in iter_records(path):
        if isinstance(record, dict) and isinstance(record.get("docs"), list):
            docs[record.get("question_id")] = record["docs"]
    return docs


def read_webgpt(spec: dict, task: str, root: Path, tasks: list[str]):
    answers = root / spec["answers"]
    docs = {key: _load_docs(root / spec[key]) for _, key in ANSWER_SOURCES if spec.get(key)}
    for line, record in iter_records(answers):
        for answer_key, docs_key in ANSWER_SOURCES:
            if docs_key not in docs:
                continue
            yield (
                task,
                str(answers),
                line,
                _webgpt_example(record, answer_key, docs[docs_key], task, str(answers), line),
            )


def _webgpt_example(record, answer_key, docs, task, source, line):
    if isinstance(record, BadRow):
        return record
    try:
        question = get_str(record, "question")
        answer = get_str(record, answer_key)
        qid = record.get("question_id")
        if qid not in docs:
            raise BadRow("missing_field", f"no quotes for question_id {qid!r}")
        return make_example(task, question, format_quotes(docs[qid]), answer, source, line)
    except BadRow as bad:
        return bad


def read_clapnq(spec: dict, task: str, root: Path, tasks: list[str]):
    path = root / spec["path"]
    for line, record in iter_records(path):
        yield task, str(path), line, _clapnq_example(record, task, str(path), line)


def _clapnq_example(record, task, source, line):
    if isinstance(record, BadRow):
        return record
    try:
        query = get_str(record, "input")
        for key in ("passages", "output"):
            if record.get(key) is None:
                raise BadRow("missing_field" if key not in record else "null_field", key)
        passages, outputs = record["passages"], record["output"]
        if not isinstance(passages, list) or not isinstance(outputs, list):
            raise BadRow("wrong_type", "passages and output must be lists")
        if not passages or not outputs:
            raise BadRow("empty_response" if not outputs else "missing_field", "no passage or answer")
        passage = passages[0]
        title, text = get_str(passage, "title", required=False), get_str(passage, "text")
        # the last answer, as the README maps it; 10 rows end with an empty one: take the last non-empty
        answers = [get_str(o, "answer") for o in outputs]
        answer = next((a for a in reversed(answers) if a.strip()), "")
        return make_example(task, query, f"{title}\n{text}" if title else text, answer, source, line)
    except BadRow as bad:
        return bad
