"""Fault battery, item 4: corrupt rows mixed into real rows never crash a build, are each reported
with their exact file, line and reason, and leave the shards byte-identical to a build of the
same files without them.

Clean rows come from the embedded generators (always) and from ../shared/data/tasks (when
present). The clean files are built first; every corrupt row is then inserted among the clean
rows (with blank lines that shift the line numbers) and the corrupt copy is built. Expected bad
rows = the injected ones + the clean build's own bad rows (the real files hold genuine empty
responses and duplicates) at their new line numbers.
"""

from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path

import pytest
import yaml

from data_pipeline import BuildConfig, BuildError, build_dataset, load_manifest
from data_pipeline.embedded import generate

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
SHARED_TASKS = Path(os.environ.get("HYCAM_SHARED_DATA", REPO.parent / "shared" / "data")) / "tasks"
REAL_ROWS = 300  # clean rows taken from each real file
EMBEDDED_ROWS = 400  # clean rows generated per embedded file
CORRUPT_PER_FILE = {"embedded": 360, "real": 150}
OVERSIZED_BYTES = 3 << 19  # 1.5 MB of text, over the default max_row_bytes (1 MiB)

# kind -> the reason the pipeline must report for it
KINDS = {
    "truncated_json": "malformed_json",  # a JSON line cut in half (JSONL only)
    "trailing_garbage": "malformed_json",  # an object followed by junk (JSONL only)
    "not_object": "not_object",  # a list, number, string or null line / list element
    "missing_field": "missing_field",
    "null_field": "null_field",
    "wrong_type": "wrong_type",  # a number or a list where text belongs
    "empty_output": "empty_response",
    "whitespace_output": "empty_response",
    "invalid_utf8": "invalid_utf8",
    "empty_prompt": "empty_prompt",
    "unknown_task": "unknown_task",  # files with a task field only
    "duplicate": "duplicate",  # an exact copy of an earlier clean row
    "oversized": "oversized_row",  # one 1.5 MB row per file
}


class Layout:
    """How one source format names its fields: enough to corrupt any of its rows on purpose."""

    def __init__(self, text_key, set_response, empty_prompt=None, task_field=None):
        self.text_key = text_key  # a required string field: deleted / nulled / mistyped
        self.set_response = set_response  # record, text -> record with that response
        self.empty_prompt = empty_prompt  # record -> record with an empty prompt (None: the format fills one in)
        self.task_field = task_field


def _set(key):
    return lambda r, text: {**r, key: text}


ALPACA = Layout("output", _set("output"), lambda r: {**r, "instruction": "", "input": ""})
ALPACA_TASKS = Layout("output", _set("output"), lambda r: {**r, "instruction": "", "input": ""}, task_field="task")
ICLINIQ = Layout("output", _set("output"))  # an empty instruction gets the doctor instruction
DOLLY = Layout("text", _set("text"), lambda r: {**r, "instruction": ""})
CLAPNQ = Layout("input", lambda r, text: {**r, "output": [{"answer": text}]})


def _sources(tmp: Path) -> list[dict]:
    """[{task, file, format, layout, spec, rows (clean records as dicts), raw (their bytes)}]."""
    files = []
    for task, gen, name, fmt, layout in (
        ("arithmetic", "arithmetic", "emb_arithmetic.json", "array", ALPACA),
        ("code", "code", "emb_code.jsonl", "jsonl", ALPACA_TASKS),
        ("medical", "medical", "emb_medical.jsonl", "jsonl", ALPACA),
    ):
        rows = [{"instruction": i, "input": x, "output": o} for i, x, o in generate(gen, EMBEDDED_ROWS, seed=7)]
        files.append(dict(task=task, file=name, format=fmt, layout=layout, kind="embedded", rows=rows))
    if SHARED_TASKS.is_dir():
        auto = json.loads((SHARED_TASKS / "auto_cot/Auto-CoT.json").read_text())[:REAL_ROWS]
        code = json.loads((SHARED_TASKS / "code_alpaca/code_alpaca_2k.json").read_text())[:REAL_ROWS]
        files += [
            dict(task="auto_cot", file="auto_cot.json", format="array", layout=ALPACA, rows=auto),
            dict(task="code_alpaca", file="code_alpaca.jsonl", format="jsonl", layout=ALPACA_TASKS, rows=code),
        ]
        for task, rel, layout, type_ in (
            ("icliniq", "icliniq/iCliniq_1k_gpt-4_answers.jsonl", ICLINIQ, "icliniq"),
            ("dolly", "dolly/dolly_first6400_instruction_response.jsonl", DOLLY, "dolly"),
            ("webgpt", "webgpt/clapnq/clapnq_dev_answerable.jsonl", CLAPNQ, "clapnq"),
        ):
            raw = (SHARED_TASKS / rel).read_bytes().splitlines()[:REAL_ROWS]
            files.append(
                dict(
                    task=task,
                    file=f"{task}.jsonl",
                    format="jsonl",
                    layout=layout,
                    type=type_,
                    rows=[json.loads(line) for line in raw],
                    raw=raw,
                )
            )
    for f in files:
        f.setdefault("kind", "real")
        f.setdefault("type", "alpaca")
        if f["layout"].task_field:  # a multi-task file: every clean row names its (known) task
            f["rows"] = [{**r, "task": f["task"]} for r in f["rows"]]
        f.setdefault("raw", [json.dumps(r, ensure_ascii=False).encode() for r in f["rows"]])
        f["spec"] = {"type": f["type"], "path": f["file"], **({"task_field": "task"} if f["layout"].task_field else {})}
    return files


def _corrupt(kind: str, rec: dict, layout: Layout, rng: random.Random, n: int) -> bytes:
    """One corrupt row of `kind` made from the clean record `rec` (n makes rows unique)."""
    dump = lambda r: json.dumps(r, ensure_ascii=False).encode()  # noqa: E731
    if kind == "truncated_json":
        line = dump(rec)
        return line[: max(2, len(line) // 2)]
    if kind == "trailing_garbage":
        return dump(rec) + b' trailing"junk'
    if kind == "not_object":
        return [b'["a", "list", %d]' % n, b"%d" % n, b'"a string %d"' % n, b"null"][n % 4]
    if kind == "missing_field":
        return dump({k: v for k, v in rec.items() if k != layout.text_key})
    if kind == "null_field":
        return dump({**rec, layout.text_key: None})
    if kind == "wrong_type":
        return dump({**rec, layout.text_key: [n, "x"] if n % 2 else n})
    if kind == "empty_output":
        return dump(layout.set_response(rec, ""))
    if kind == "whitespace_output":
        return dump(layout.set_response(rec, " \n\t " * (1 + n % 3)))
    if kind == "invalid_utf8":
        return dump({**rec, layout.text_key: f"@@BAD{n}@@"}).replace(f"@@BAD{n}@@".encode(), b"caf\xe9 \xff\xfe")
    if kind == "empty_prompt":
        return dump(layout.empty_prompt(rec))
    if kind == "unknown_task":
        return dump({**rec, "task": f"no_such_task_{n % 7}"})
    if kind == "oversized":
        return dump(layout.set_response(rec, rng.randbytes(OVERSIZED_BYTES // 2).hex()))
    raise AssertionError(kind)


def _kinds_for(f: dict) -> list[str]:
    kinds = [k for k in KINDS if k not in ("duplicate", "oversized")]
    if f["format"] != "jsonl":
        kinds = [k for k in kinds if k not in ("truncated_json", "trailing_garbage")]
    if f["layout"].empty_prompt is None:
        kinds.remove("empty_prompt")
    if not f["layout"].task_field:
        kinds.remove("unknown_task")
    return kinds + ["duplicate"]


def _write(path: Path, fmt: str, lines: list[bytes]) -> dict[int, int]:
    """Write rows (None = a blank line) one per line; returns {row index: its 1-based line}."""
    out, where, lineno = [], {}, 1 if fmt == "jsonl" else 2
    rows = [i for i, line in enumerate(lines) if line is not None]
    for i, line in enumerate(lines):
        if line is None:
            out.append(b"" if i % 2 else b"  \t")
        else:
            where[i] = lineno
            out.append(line + (b"," if fmt == "array" and i != rows[-1] else b""))
        lineno += 1
    body = b"\n".join(out)
    path.write_bytes(body + b"\n" if fmt == "jsonl" else b"[\n" + body + b"\n]\n")
    return where


def _recipe(root: Path, files: list[dict]) -> str:
    tasks = collections.defaultdict(list)
    for f in files:
        tasks[f["task"]].append(f["spec"])
    recipe = {
        "name": "faults",
        "seq_len": 256,
        "splits": {"train": 0.8, "eval": 0.1, "test": 0.1},
        "tokenizer": {"vocab_size": 1000},
        "tasks": [{"name": t, "sources": s} for t, s in tasks.items()],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(root / "recipe.yaml")


def _bad_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]


def _shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*")) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def corrupt_case(tmp_path_factory):
    """Build the clean files, then the same files with corrupt rows mixed in; return both builds."""
    tmp = tmp_path_factory.mktemp("faults")
    files = _sources(tmp)
    clean_root, dirty_root = tmp / "clean", tmp / "dirty"
    clean_root.mkdir(), dirty_root.mkdir()
    for f in files:
        _write(clean_root / f["file"], f["format"], f["raw"])
    cfg = dict(train_tokenizer=True, progress=False)
    clean = Path(
        build_dataset(
            BuildConfig(recipe=_recipe(clean_root, files), out=str(tmp / "clean_out"), data_root=str(clean_root), **cfg)
        )
    )
    clean_bad = {(Path(r["file"]).name, r["line"]): r for r in _bad_rows(clean)}

    rng = random.Random(20240607)
    expected = {}  # (file, line) -> (kind, reason, detail or None)
    n = 0
    for f in files:
        kinds, budget = _kinds_for(f), CORRUPT_PER_FILE[f["kind"]]
        slots = sorted(rng.sample(range(1, len(f["raw"]) + budget), budget))  # positions among the clean rows
        lines, origin, kept_so_far = [], {}, []  # origin: output index -> (kind, clean row index)
        valid = [i for i in range(len(f["raw"])) if (f["file"], _clean_line(f, i)) not in clean_bad]
        clean_i, plan = 0, collections.deque(slots)
        oversized_at = rng.randrange(budget)
        for pos in range(len(f["raw"]) + budget):
            if rng.random() < 0.05:
                lines.append(None)  # a blank or whitespace-only line: skipped, shifts every line after it
            if plan and plan[0] == pos:
                plan.popleft()
                k = len(slots) - len(plan) - 1
                kind = "oversized" if k == oversized_at else kinds[k % len(kinds)]
                if kind == "duplicate" and not kept_so_far:
                    kind = "not_object"
                if kind == "duplicate":
                    src = rng.choice(kept_so_far)
                    origin_line = ("dup", src)
                    lines.append(f["raw"][src])
                else:
                    origin_line = None
                    lines.append(_corrupt(kind, f["rows"][rng.choice(valid)], f["layout"], rng, n))
                n += 1
                origin[len(lines) - 1] = (kind, origin_line)
            else:
                lines.append(f["raw"][clean_i])
                origin[len(lines) - 1] = ("clean", clean_i)
                if (f["file"], _clean_line(f, clean_i)) not in clean_bad:
                    kept_so_far.append(clean_i)
                clean_i += 1
        where = _write(dirty_root / f["file"], f["format"], lines)
        clean_where = {c: where[i] for i, (kind, c) in origin.items() if kind == "clean"}
        for i, (kind, extra) in origin.items():
            line = where[i]
            if kind == "clean":
                bad = clean_bad.get((f["file"], _clean_line(f, extra)))
                if bad is not None:  # the clean file's own bad row (or genuine duplicate), moved
                    detail = _moved_detail(bad, f, clean_where, dirty_root)
                    expected[(f["file"], line)] = ("genuine " + bad["reason"], bad["reason"], detail)
            elif kind == "duplicate":
                expected[(f["file"], line)] = (
                    kind,
                    "duplicate",
                    f"same as {dirty_root / f['file']}:{clean_where[extra[1]]}",
                )
            else:
                expected[(f["file"], line)] = (kind, KINDS[kind], None)
    dirty = Path(
        build_dataset(
            BuildConfig(recipe=_recipe(dirty_root, files), out=str(tmp / "dirty_out"), data_root=str(dirty_root), **cfg)
        )
    )
    return dict(files=files, clean=clean, dirty=dirty, expected=expected, dirty_root=dirty_root, n_injected=n)


def _clean_line(f: dict, i: int) -> int:
    return i + 1 if f["format"] == "jsonl" else i + 2


def _moved_detail(bad: dict, f: dict, clean_where: dict, dirty_root: Path) -> str:
    """A genuine duplicate's detail names its first copy: translate that line to the corrupt file."""
    if bad["reason"] != "duplicate":
        return bad["detail"]
    first = int(bad["detail"].rsplit(":", 1)[1]) - _clean_line(f, 0)
    return f"same as {dirty_root / f['file']}:{clean_where[first]}"


def test_every_corrupt_row_is_reported_at_its_file_and_line(corrupt_case, fault_table):
    expected, dirty = corrupt_case["expected"], corrupt_case["dirty"]
    got = {(Path(r["file"]).name, r["line"]): r for r in _bad_rows(dirty)}
    injected = {k: v for k, v in expected.items() if not v[0].startswith("genuine")}
    kinds = collections.Counter(kind for kind, _, _ in injected.values())
    assert sum(kinds.values()) == corrupt_case["n_injected"] >= 1000 and len(kinds) >= 10, kinds
    per_kind = collections.defaultdict(lambda: [0, 0])
    for key, (kind, reason, detail) in expected.items():
        per_kind[kind][0] += 1
        per_kind[kind][1] += _matches((kind, reason, detail), got.get(key))
    for kind, (trials, passed) in sorted(per_kind.items()):
        fault_table.append(
            {
                "item": "4 corrupt data",
                "case": kind,
                "trials": trials,
                "passed": passed,
                "detail": f"reported as {expected_reason(kind)} at its file:line",
            }
        )
    unexpected = sorted(set(got) - set(expected))
    assert not unexpected, f"rows reported that were not injected: {[got[k] for k in unexpected[:5]]}"
    wrong = {k: (expected[k], got.get(k)) for k in expected if not _matches(expected[k], got.get(k))}
    assert not wrong, f"{len(wrong)} rows misreported, e.g. {list(wrong.items())[:3]}"

    # the manifest's per-task counts say the same, exactly
    manifest = load_manifest(dirty)
    assert manifest["bad_rows"]["count"] == len(expected)
    want = collections.defaultdict(collections.Counter)
    task_of = {f["file"]: f["task"] for f in corrupt_case["files"]}
    for (file, _), (_, reason, _) in expected.items():
        want[task_of[file]][reason] += 1
    policy = {"too_long", "prompt_too_long"}
    for task in manifest["tasks"]:
        assert {k: v for k, v in task["dropped"].items() if k not in policy} == dict(want[task["name"]]), task["name"]


def expected_reason(kind: str) -> str:
    return KINDS.get(kind) or kind.split(" ", 1)[1]


def _matches(want, r) -> bool:
    _, reason, detail = want
    return r is not None and r["reason"] == reason and (detail is None or r["detail"] == detail)


def test_clean_rows_give_byte_identical_shards(corrupt_case, fault_table):
    clean, dirty = corrupt_case["clean"], corrupt_case["dirty"]
    a, b = _shards(clean), _shards(dirty)
    same = sum(1 for k in a if b.get(k) == a[k])
    ma, mb = load_manifest(clean), load_manifest(dirty)
    fault_table.append(
        {
            "item": "4 corrupt data",
            "case": "clean rows -> byte-identical shards",
            "trials": len(a),
            "passed": same if set(a) == set(b) else 0,
            "detail": f"{len(a)} .bin/.idx files vs the build without the {corrupt_case['n_injected']} corrupt rows",
        }
    )
    fault_table.append(
        {
            "item": "4 corrupt data",
            "case": "zero crashes",
            "trials": 2,
            "passed": 2,
            "detail": f"{len(corrupt_case['files'])} files "
            f"({'real + embedded' if SHARED_TASKS.is_dir() else 'embedded only'}), "
            f"{len(corrupt_case['expected'])} bad rows",
        }
    )
    assert set(a) == set(b) and a, (sorted(a), sorted(b))
    assert same == len(a)
    assert ma["splits"] == mb["splits"]  # shard sha256s, counts, packing efficiency
    assert ma["tokenizer"]["fingerprint"] == mb["tokenizer"]["fingerprint"]
    assert {k: v for k, v in ma["files"].items() if k != "bad_rows.jsonl"} == {
        k: v for k, v in mb["files"].items() if k != "bad_rows.jsonl"
    }
    for ta, tb in zip(ma["tasks"], mb["tasks"]):
        assert (ta["kept"], ta["truncated"], ta["documents"], ta["tokens"]) == (
            tb["kept"],
            tb["truncated"],
            tb["documents"],
            tb["tokens"],
        )


def test_strict_stops_at_the_first_corrupt_row(corrupt_case, tmp_path, fault_table):
    first = min((line, file) for (file, line) in corrupt_case["expected"] if file == corrupt_case["files"][0]["file"])
    reason = corrupt_case["expected"][(first[1], first[0])][1]
    recipe = str(corrupt_case["dirty_root"] / "recipe.yaml")
    with pytest.raises(BuildError) as err:
        build_dataset(
            BuildConfig(
                recipe=recipe,
                out=str(tmp_path / "o"),
                data_root=str(corrupt_case["dirty_root"]),
                train_tokenizer=True,
                strict=True,
                progress=False,
            )
        )
    ok = f"{first[1]}:{first[0]}: {reason}" in str(err.value) and not (tmp_path / "o").exists()
    fault_table.append(
        {
            "item": "4 corrupt data",
            "case": "--strict stops at the first bad row",
            "trials": 1,
            "passed": int(ok),
            "detail": f"BuildError {first[1]}:{first[0]}: {reason}, no output left",
        }
    )
    assert ok, str(err.value)
