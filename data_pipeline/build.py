"""The build: recipe -> normalised examples -> token ids -> packed rows -> shards + manifest.

Everything is written into a temporary sibling of the output directory, which replaces the
output only when the build has succeeded: a failed build leaves no partial directory and the
previous output untouched. The output directory is replaced only if `output_guard` allows it
(absent, empty or a previous build; never the data root or a directory holding an input).

Mistakes stop the build with a one-line `BuildError` as early as they can be seen: the recipe,
the options, the input files, `--out` and the tokenizer before anything is read; a task left with
no usable row when reading ends (before the tokenizer is trained); a sequence length that holds no
example, or a task with no example in the train split, once the examples are tokenised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Iterator

from .config import SPLITS, BuildConfig, Recipe, load_recipe
from .encode import ChunkEncoder, DocPolicy, assemble, template_tail_tokens
from .examples import BadRow, BuildError, Example, RowReport
from .output_guard import check_output_dir, check_replaceable
from .packing import best_fit_decreasing
from .pretrained import PretrainedRefError, check_tokenizer_files, parse_pretrained
from .progress import progress as show_progress
from .shards import FORMAT, MANIFEST, VERSION, ShardWriter, manifest_digest, sha256_file, token_dtype
from .sources import read_source, source_files
from .template import TEMPLATES, PromptFormat, format_prompt, prompt_format
from .tokenizer import check_encodes_text, load_tokenizer, tokenizer_fingerprint, train_sentencepiece


def build_dataset(cfg: BuildConfig) -> str:
    """Build the recipe into `cfg.out` atomically; returns the output directory."""
    recipe = load_recipe(cfg.recipe, cfg.data_root, root_required=True)
    root_given = recipe.data_root is not None  # else the recipe reads no relative path: cwd stands in
    recipe = _resolve(recipe, cfg)
    out = check_output_dir(cfg.out, _inputs(recipe, cfg, root_given))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build_into(tmp, recipe, cfg)
        _replace_dir(tmp, out, cfg.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _resolve(recipe: Recipe, cfg: BuildConfig) -> Recipe:
    """The recipe with the invocation's overrides applied: what the manifest records and hashes."""
    if recipe.data_root is None:  # no source path is relative (load_recipe checked): any root reads them
        recipe.data_root = str(Path.cwd())
    recipe.seq_len = cfg.seq_len or recipe.seq_len
    recipe.overlong = cfg.overlong or recipe.overlong
    recipe.template = cfg.template or recipe.template
    if recipe.template not in TEMPLATES:
        raise BuildError(f"--template must be one of {list(TEMPLATES)}, not {recipe.template!r}")
    if cfg.tokenizer:
        try:
            ref = parse_pretrained(cfg.tokenizer)
            check_tokenizer_files(ref)
        except PretrainedRefError as err:
            raise BuildError(f"--tokenizer {err}") from None
        recipe.tokenizer.path = str(ref)  # a hub id stays a hub id
    elif cfg.train_tokenizer:
        recipe.tokenizer.path = None
    recipe.tokenizer.vocab_size = cfg.vocab_size or recipe.tokenizer.vocab_size
    return recipe


def _inputs(recipe: Recipe, cfg: BuildConfig, root_given: bool) -> list[tuple[str, Path]]:
    """What the build reads, for the output guard; a source file that is missing or not a file
    stops the build here, before anything is written."""
    root = Path(recipe.data_root)
    inputs = [("the data root", root)] if root_given else []  # in this order the guard's message names them
    for task in recipe.tasks:
        for spec in task.sources:
            for rel in source_files(spec):
                path = root / rel
                if not path.is_file():
                    why = "not found" if not path.exists() else "not a file"
                    raise BuildError(f"task {task.name}: source file {why}: {path}")
                inputs.append(("the input file", path))
    if recipe.tokenizer.path:
        ref = parse_pretrained(recipe.tokenizer.path)
        if ref.is_local:
            inputs.append(("the tokenizer", Path(ref.name_or_path)))
    return inputs + [("the recipe", Path(cfg.recipe))]


def _content_key(example: Example) -> bytes:
    return "\0".join((example.task, example.instruction, example.input, example.output)).encode("utf-8")


def split_of(example: Example, fractions: dict) -> str:
    """The example's split, from a hash of its content: adding rows never moves old ones."""
    u = int.from_bytes(hashlib.sha256(_content_key(example)).digest()[:8], "little") / 2.0**64
    acc = 0.0
    for split in SPLITS:
        acc += fractions.get(split, 0.0)
        if u < acc:
            return split
    return next(s for s in reversed(SPLITS) if fractions.get(s, 0.0) > 0)


def iter_examples(recipe: Recipe, report: RowReport, progress: bool = False) -> Iterator[Example]:
    """All examples of the recipe in order, bad rows counted (or raised, in strict mode).

    Everything dropped here is dropped before tokenizer training, splitting and packing, and
    nothing downstream depends on a dropped row: a build with bad rows writes the same shards
    as a build of the same files without them. A file that cannot be read, or a task left with no
    usable row at the end, is a `BuildError` naming the files and the bad-row counts.
    """
    root, names = Path(recipe.data_root), recipe.task_names
    seen: dict[bytes, tuple[str, int]] = {}  # content digest -> where it was first seen
    examples = dict.fromkeys(names, 0)
    with show_progress(desc="read", unit="ex", disable=not progress, mininterval=1.0) as bar:
        for task in recipe.tasks:
            for spec in task.sources:
                for source, line, row in _read(spec, task.name, root, names):
                    report.read(task.name)
                    bar.update()
                    reason, detail = _drop_reason(row, recipe, seen, source, line)
                    if reason:
                        report.bad(task.name, source, line, reason, detail)
                        continue
                    examples[row.task] += 1
                    yield row
    for task in recipe.tasks:
        if not examples[task.name]:
            files = ", ".join(str(root / f) for spec in task.sources for f in source_files(spec)) or "its sources"
            raise BuildError(f"task {task.name}: no usable row in {files} ({report.describe(task.name)})")


def _read(spec: dict, task: str, root: Path, names: list[str]) -> Iterator[tuple[str, int, Example | BadRow]]:
    """(file, line, example or bad row) of one source; a file that cannot be read is a `BuildError`."""
    try:
        for _, source, line, row in read_source(spec, task, root, names):
            yield source, line, row
    except OSError as err:  # the disk, a permission, a vanished file: never a bad row
        where = err.filename or ", ".join(str(root / f) for f in source_files(spec))
        raise BuildError(f"task {task}: cannot read {where}: {err.strerror or err}") from None


def _drop_reason(row, recipe: Recipe, seen: dict, source: str, line: int) -> tuple[str, str]:
    """(reason, detail) for a row to drop as bad input, ("", "") for an example to keep."""
    if isinstance(row, BadRow):
        return row.reason, row.detail
    key = _content_key(row)
    if len(key) > recipe.max_row_bytes:
        return "oversized_row", f"{len(key)} bytes > max_row_bytes {recipe.max_row_bytes}"
    if recipe.dedupe:
        digest = hashlib.blake2b(key, digest_size=16).digest()
        if digest in seen:
            first = seen[digest]
            return "duplicate", f"same as {first[0]}:{first[1]}"
        seen[digest] = (source, line)
    return "", ""


def _prepare_tokenizer(out: Path, recipe: Recipe, cfg: BuildConfig):
    """Put the tokenizer into OUT/tokenizer (trained here or copied from a backbone) and load it."""
    target = out / "tokenizer"
    if recipe.tokenizer.path:
        source = load_tokenizer(recipe.tokenizer.path)
        check_encodes_text(source, recipe.tokenizer.path)  # an empty vocabulary would build lone EOS tokens
        prompt_format(recipe.template, source, recipe.system_prompt)  # a chat template that cannot serve fails here
        source.save_pretrained(str(target))
    else:
        if recipe.template != "alpaca":  # fail before reading the corpus, not after training
            raise BuildError(
                "tokenizer trained here (--train-tokenizer) has no chat template; use template: alpaca "
                "(or give a backbone's tokenizer with --tokenizer)"
            )
        report = RowReport(recipe.task_names, strict=cfg.strict)  # counts come from the main pass
        stopped: list[BuildError] = []
        try:
            train_sentencepiece(
                _train_texts(recipe, report, stopped),
                target,
                recipe.tokenizer.vocab_size,
                recipe.tokenizer.model_type,
                recipe.tokenizer.max_sentences,
            )
        except RuntimeError:
            if stopped:  # SentencePiece wraps what its input iterator raised: give back the strict-mode error
                raise stopped[0] from None
            raise
    tok = load_tokenizer(target)
    if tok.eos_token_id is None:
        raise BuildError(f"tokenizer {recipe.tokenizer.path or target} has no EOS token")
    check_encodes_text(tok, recipe.tokenizer.path or "trained here")
    return tok


def _train_texts(recipe: Recipe, report: RowReport, stopped: list) -> Iterator[str]:
    """Prompts and responses of the train split, for the tokenizer; a strict-mode stop is kept in `stopped`."""
    try:
        for ex in iter_examples(recipe, report):
            if split_of(ex, recipe.splits) == "train":
                yield format_prompt(ex.instruction, ex.input)
                yield ex.output
    except BuildError as err:
        stopped.append(err)
        raise


def _build_into(out: Path, recipe: Recipe, cfg: BuildConfig) -> None:
    tok = _prepare_tokenizer(out, recipe, cfg)
    fmt = prompt_format(recipe.template, tok, recipe.system_prompt)
    tail = template_tail_tokens(fmt, lambda text: tok(text, add_special_tokens=False)["input_ids"])
    policy = DocPolicy(
        recipe.seq_len,
        fmt.document_bos(tok, recipe.tokenizer.add_bos),
        tok.eos_token_id,
        recipe.overlong,
        recipe.min_response_tokens,
        recipe.response_share,
        tail,
        recipe.train_on_prompt,
        fmt.append_eos,
    )
    _check_seq_len(policy)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dtype = token_dtype(len(tok))
    report = RowReport(recipe.task_names, strict=cfg.strict)
    packer = _Packer(out, recipe, dtype, pad_id)
    encoder = ChunkEncoder(str(out / "tokenizer"), cfg.workers, recipe.template, recipe.system_prompt)
    try:
        pending: deque = deque()
        for ids, lengths in encoder.map(_chunks(iter_examples(recipe, report, cfg.progress), cfg.chunk_size, pending)):
            chunk = pending.popleft()
            _add_chunk(chunk, ids, lengths, policy, recipe, report, packer)
    finally:
        encoder.close()
    _check_documents(recipe, report, packer)
    splits = packer.close()
    bad_rows = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in report.bad_rows)
    (out / "bad_rows.jsonl").write_text(bad_rows)
    manifest = _manifest(out, recipe, tok, fmt, dtype, pad_id, report, splits, packer)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def _check_seq_len(policy: DocPolicy) -> None:
    """Before any example is tokenised: a kept document holds at least BOS (if any), the template's
    response header (`prompt_tail`), one token of the prompt's own and one of the response."""
    smallest = (policy.bos_id is not None) + policy.prompt_tail + 2
    if policy.seq_len < smallest:
        raise BuildError(
            f"seq_len {policy.seq_len} cannot hold any example: the smallest example needs at least {smallest} "
            f"tokens (the prompt template's own {policy.prompt_tail}, one prompt token, one response token"
            f"{', BOS' if policy.bos_id is not None else ''}); raise seq_len (--seq-len)"
        )


def _check_documents(recipe: Recipe, report: RowReport, packer: _Packer) -> None:
    """Once every example is tokenised: each task kept one (seq_len holds it) and, when the recipe
    has a train split, has one there."""
    empty = [t for t, counts in report.tasks.items() if counts.kept == 0]
    if empty:
        tasks = ", ".join(
            f"{t} (the smallest is {report.tasks[t].shortest} tokens; {report.describe(t)})" for t in empty
        )
        needed = max(report.tasks[t].shortest for t in empty)
        raise BuildError(
            f"seq_len {recipe.seq_len} holds no example of task {tasks}; raise seq_len (--seq-len) to at least {needed}"
        )
    if recipe.splits.get("train", 0) > 0:
        for task in recipe.task_names:
            if packer.stats[("train", task)]["documents"] == 0:
                raise BuildError(
                    f"task {task}: none of its {report.tasks[task].kept} examples fell in the train split "
                    f"(splits {recipe.splits}, by a hash of each example; {report.describe(task)}): "
                    "give it more rows, or a larger train fraction"
                )


def _chunks(examples: Iterator[Example], size: int, pending: deque) -> Iterator[list[tuple[str, str, str]]]:
    """Fixed-size chunks of (instruction, input, output) texts; the examples wait in `pending`, in order."""
    chunk: list[Example] = []
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == size:
            pending.append(chunk)
            yield [(e.instruction, e.input, e.output) for e in chunk]
            chunk = []
    if chunk:
        pending.append(chunk)
        yield [(e.instruction, e.input, e.output) for e in chunk]


def _add_chunk(chunk, ids, lengths, policy, recipe, report, packer) -> None:
    n = len(chunk)
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + int(length))
    for i, ex in enumerate(chunk):
        prompt, response = ids[offsets[i] : offsets[i + 1]], ids[offsets[n + i] : offsets[n + i + 1]]
        tokens, loss_start, status = assemble(prompt, response, policy)
        counts = report.tasks[ex.task]
        full = len(prompt) + len(response) + (policy.bos_id is not None) + policy.append_eos
        counts.shortest = full if counts.shortest is None else min(counts.shortest, full)
        if tokens is None:
            report.policy_drop(ex.task, status)
            continue
        counts.kept += 1
        counts.truncated += status == "truncated"
        packer.add(split_of(ex, recipe.splits), packer.task_ids[ex.task], tokens, loss_start)


class _Packer:
    """Per (split, group) buffers of documents, packed every `pack_window` documents.

    A group is "mixed" (every task of the split) or one task (recipe packing: per_task).
    Also counts documents and tokens per (split, task) for the manifest.
    """

    def __init__(self, out: Path, recipe: Recipe, dtype, pad_id: int):
        self.recipe = recipe
        self.task_ids = {t.name: i for i, t in enumerate(recipe.tasks)}
        self.groups = ["mixed"] if recipe.packing == "mixed" else recipe.task_names
        self.buffers: dict = {}
        self.writers = {
            (s, g): ShardWriter(out, s, g, recipe.seq_len, dtype, pad_id, recipe.shard_sequences)
            for s in SPLITS
            for g in self.groups
        }
        self.lower_bound = {s: 0 for s in SPLITS}  # sum over windows of ceil(tokens / seq_len)
        self.stats = {
            (s, t): {"documents": 0, "tokens": 0, "loss_tokens": 0} for s in SPLITS for t in recipe.task_names
        }

    def add(self, split: str, task_id: int, tokens, loss_start: int) -> None:
        group = "mixed" if self.recipe.packing == "mixed" else self.recipe.tasks[task_id].name
        buf = self.buffers.setdefault((split, group), [])
        buf.append((tokens, loss_start, task_id))
        stats = self.stats[(split, self.recipe.tasks[task_id].name)]
        stats["documents"] += 1
        stats["tokens"] += len(tokens)
        stats["loss_tokens"] += len(tokens) - loss_start
        if len(buf) >= self.recipe.pack_window:
            self._flush(split, group)

    def _flush(self, split: str, group: str) -> None:
        docs = self.buffers.pop((split, group), [])
        if not docs:
            return
        lengths = [len(d[0]) for d in docs]
        rows = best_fit_decreasing(lengths, self.recipe.seq_len)
        self.lower_bound[split] += -(-sum(lengths) // self.recipe.seq_len)
        self.writers[(split, group)].add_rows([[docs[i] for i in row] for row in rows])

    def close(self) -> dict:
        for key in list(self.buffers):
            self._flush(*key)
        return {s: [sh for g in self.groups for sh in self.writers[(s, g)].close()] for s in SPLITS}


def _manifest(
    out: Path, recipe: Recipe, tok, fmt: PromptFormat, dtype, pad_id, report: RowReport, splits: dict, packer
) -> dict:
    counts = report.summary()
    tasks = []
    for i, task in enumerate(recipe.tasks):
        entry = {"name": task.name, "id": i, "weight": task.weight, **counts[task.name]}
        for key in ("documents", "tokens", "loss_tokens"):
            entry[key] = {s: packer.stats[(s, task.name)][key] for s in SPLITS}
        tasks.append(entry)
    split_info = {}
    for s in SPLITS:
        shards = splits[s]
        seqs, toks = sum(sh["sequences"] for sh in shards), sum(sh["tokens"] for sh in shards)
        split_info[s] = {
            "sequences": seqs,
            "tokens": toks,
            "documents": sum(sh["documents"] for sh in shards),
            "loss_tokens": sum(sh["loss_tokens"] for sh in shards),
            "packing_efficiency": toks / (seqs * recipe.seq_len) if seqs else 1.0,
            "lower_bound_sequences": packer.lower_bound[s],
            "shards": shards,
        }
    all_seqs = sum(v["sequences"] for v in split_info.values())
    files = sorted(str(p.relative_to(out)) for p in (out / "tokenizer").rglob("*") if p.is_file())
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": recipe.name,
        "seq_len": recipe.seq_len,
        "dtype": dtype.str,
        "pad_id": pad_id,
        # the BOS documents start with, added by the build or written by the chat template
        "bos_id": tok.bos_token_id if recipe.tokenizer.add_bos or fmt.renders_bos else None,
        "eos_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "packing": recipe.packing,
        "template": fmt.describe(),
        "tokenizer": {
            "path": "tokenizer",
            "fingerprint": tokenizer_fingerprint(tok),
            "trained_here": recipe.tokenizer.path is None,
            "source": recipe.tokenizer.path,
        },
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.sha256(),
        "tasks": tasks,
        "splits": split_info,
        "packing_efficiency": sum(v["tokens"] for v in split_info.values()) / (all_seqs * recipe.seq_len)
        if all_seqs
        else 1.0,
        "bad_rows": {"count": len(report.bad_rows), "path": "bad_rows.jsonl"},
        "files": {rel: sha256_file(out / rel) for rel in files + ["bad_rows.jsonl"]},
    }


def _replace_dir(tmp: Path, out: Path, given: str) -> None:
    """Swap the finished build into place; the old output is removed only after the swap, and only
    if it still holds nothing but a build (a file written into it meanwhile is never deleted)."""
    old = None
    if out.exists():
        check_replaceable(out, given)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
