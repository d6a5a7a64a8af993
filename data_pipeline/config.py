"""Typed configuration: the recipe (YAML) and the build options (CLI / `build_dataset`).

A recipe YAML mirrors `Recipe`; `BuildConfig` holds what changes per invocation and overrides
the recipe where both have a say (tokenizer, vocabulary size, sequence length, over-long policy,
prompt template). Both are checked by `typed_config` (every value against its annotation; YAML
with a repeated key refused) and then by the rules below; an error is a `DataConfigError` whose
one line names the recipe file and the dotted field (`recipe r.yaml: tasks[1].weight: ...`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

from .examples import BuildError
from .sources import source_files, spec_problem
from .template import TEMPLATES
from .tokenizer import MIN_VOCAB_SIZE
from .typed_config import TypedConfigError, build_dataclass, check_fields, read_yaml_mapping

SPLITS = ("train", "eval", "test")


class DataConfigError(TypedConfigError, BuildError):
    """A recipe or a build option that is wrong: the message names the file and the field.

    Both a `TypedConfigError` (the typed-config family) and a `BuildError` (what callers of the
    build already catch)."""


@dataclasses.dataclass
class TaskSpec:
    """One task of the multi-task corpus."""

    name: str
    """Task name; its index in the recipe's list is the task id written with every token."""
    sources: list[dict[str, Any]]
    """Source specs: dicts with a `type` (see `data_pipeline.sources.ADAPTERS`) and its own keys
    (`data_pipeline.sources.SPEC_KEYS`)."""
    weight: Optional[float] = None
    """Mixture weight for `task_sampling="mixture"`; None means proportional to the task's size."""


@dataclasses.dataclass
class TokenizerSpec:
    """How the recipe wants its tokenizer (the CLI's --tokenizer / --train-tokenizer override it)."""

    path: Optional[str] = None
    """A Hugging Face tokenizer directory (a backbone's); None means train one here."""
    vocab_size: int = 4000
    """Vocabulary size of the SentencePiece model trained here."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm: bpe (compresses small repetitive corpora far better) or unigram."""
    max_sentences: int = 200_000
    """At most this many texts (prompts and responses of the train split) feed the trainer."""
    add_bos: bool = True
    """Start every document with BOS when the tokenizer has one."""


@dataclasses.dataclass
class Recipe:
    """A multi-task corpus: its tasks, their files, splits, mixture and packing."""

    name: str
    tasks: list[TaskSpec]
    """The tasks, in task-id order."""
    splits: dict[str, float] = dataclasses.field(default_factory=lambda: {"train": 0.9, "eval": 0.05, "test": 0.05})
    """Fraction of examples per split, assigned by a hash of each example's content."""
    seq_len: int = 512
    """Length of every packed sequence."""
    overlong: str = "truncate"
    """Examples longer than seq_len: `truncate` (keep the prompt, cut the response) or `drop`."""
    min_response_tokens: int = 8
    """With `truncate`, the response keeps at least min(its length, this) tokens (cutting the
    middle of a long prompt if needed); a sequence too short even for that drops the example."""
    response_share: float = 0.5
    """With `truncate`, a prompt longer than seq_len * (1 - response_share) is cut in its middle
    (its head and the template's `### Response:` tail are kept), so long retrieval passages
    still leave room for the answer."""
    train_on_prompt: bool = False
    """Put loss on the prompt tokens too (the default trains on the response only)."""
    template: str = "alpaca"
    """Prompt format (`data_pipeline.template`): `alpaca` (the paper's template, EOS appended) or
    `chat` (the tokenizer's own chat template: a user turn, the answer as the assistant turn,
    which ends with the template's end-of-turn token instead of an appended EOS). `chat` needs a
    tokenizer with a chat template (an instruction-tuned backbone's), not one trained here."""
    system_prompt: Optional[str] = None
    """With `chat`, the system turn; None gives no system message (some templates, e.g. ChatML
    ones, then insert their own default system prompt: that is the tokenizer's choice)."""
    packing: str = "mixed"
    """`mixed`: all tasks of a split packed together (fills gaps, ~0.99 efficiency on the real
    tasks); `per_task`: every row holds one task (exact task sampling, more padding)."""
    max_row_bytes: int = 1 << 20
    """An example whose instruction + input + output exceed this many UTF-8 bytes is dropped as
    `oversized_row` (the real tasks' largest is ~5 KB): a runaway row is reported, never
    silently truncated into the shards."""
    dedupe: bool = True
    """Drop an example identical (task, instruction, input, output: the normalised text, not an id)
    to an earlier one as `duplicate`; the first copy is kept, so removing the later copies
    changes nothing in the shards."""
    shard_sequences: int = 8192
    """Packed sequences per shard file."""
    pack_window: int = 100_000
    """Documents of one task and split packed together; bounds the build's memory on huge corpora."""
    tokenizer: TokenizerSpec = dataclasses.field(default_factory=TokenizerSpec)
    data_root: Optional[str] = None
    """Where source paths are relative to, when --data-root is not given (relative to the recipe).
    With neither, a relative source path is an error when the recipe is loaded for a build."""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """Hash of the resolved recipe: the manifest records it, so a changed recipe is visible."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | os.PathLike, data_root: Optional[str] = None, *, root_required: bool = False) -> Recipe:
    """Read and check a recipe YAML; every error names the recipe and the offending field.

    `data_root` (the build's --data-root) replaces the recipe's own and must be a directory.
    `root_required` (the build): a relative source path with no data root at all is an error here,
    at once, naming the task and the setting, instead of a missing file after minutes of work.
    Callers that set `recipe.data_root` themselves afterwards leave it False.
    """
    path = Path(path)
    where = f"recipe {path}"
    raw = read_yaml_mapping(path, label="recipe", error=DataConfigError)
    recipe = build_dataclass(Recipe, raw, error=DataConfigError, file=where)
    if data_root is not None:
        if not Path(data_root).is_dir():
            raise DataConfigError(f"--data-root {data_root}: no such directory")
        recipe.data_root = str(Path(data_root).resolve())
    elif recipe.data_root is not None:
        recipe.data_root = str((path.parent / recipe.data_root).resolve())
        if not Path(recipe.data_root).is_dir():
            raise DataConfigError(f"{where}: data_root: {recipe.data_root}: no such directory")
    _validate(recipe, where)
    if root_required and recipe.data_root is None:
        _require_data_root(recipe, where)
    return recipe


def _fail(where: str, field: str, message: str, say_field: bool = True) -> DataConfigError:
    err = DataConfigError(f"{where}: {field}: {message}" if say_field else f"{where}: {message}")
    err.field, err.file = field, where
    return err


def _validate(recipe: Recipe, where: str) -> None:
    """The rules a type cannot say: names, fractions, choices, ranges, source specs."""
    names = recipe.task_names
    if not names or len(set(names)) != len(names):
        raise _fail(where, "tasks", f"task names must be present and unique: {names}")
    if set(recipe.splits) - set(SPLITS) or abs(sum(recipe.splits.values()) - 1.0) > 1e-6:
        raise _fail(where, "splits", f"must be among {SPLITS} and sum to 1: {recipe.splits}")
    if any(not 0 <= f <= 1 for f in recipe.splits.values()):
        raise _fail(where, "splits", f"every fraction must be within [0, 1]: {recipe.splits}")
    # the historical wording of these three: "recipe r.yaml: template must be one of ..."
    for field, value, allowed in (
        ("overlong", recipe.overlong, ("truncate", "drop")),
        ("packing", recipe.packing, ("mixed", "per_task")),
        ("template", recipe.template, TEMPLATES),
    ):
        if value not in allowed:
            raise _fail(where, field, f"{field} must be one of {list(allowed)}, not {value!r}", say_field=False)
    for field, value, low in (
        ("seq_len", recipe.seq_len, 2),
        ("max_row_bytes", recipe.max_row_bytes, 1),
        ("shard_sequences", recipe.shard_sequences, 1),
        ("pack_window", recipe.pack_window, 1),
        ("min_response_tokens", recipe.min_response_tokens, 0),
        ("tokenizer.vocab_size", recipe.tokenizer.vocab_size, MIN_VOCAB_SIZE),
        ("tokenizer.max_sentences", recipe.tokenizer.max_sentences, 1),
    ):
        if value < low:
            raise _fail(where, field, f"must be at least {low}, got {value}")
    if not 0 <= recipe.response_share < 1:
        raise _fail(where, "response_share", f"must be within [0, 1), got {recipe.response_share}")
    for i, task in enumerate(recipe.tasks):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.name) or task.name == "mixed":
            message = f"task name {task.name!r} must be [A-Za-z0-9_.-]+ and not 'mixed'"
            raise _fail(where, f"tasks[{i}].name", message, say_field=False)
        if task.weight is not None and task.weight < 0:
            raise _fail(where, f"tasks[{i}].weight", f"must be >= 0 (or null), got {task.weight}")
        if not task.sources:
            raise _fail(where, f"tasks[{i}].sources", f"task {task.name} needs at least one source")
        for j, spec in enumerate(task.sources):
            problem = spec_problem(spec)
            if problem:
                raise _fail(where, f"tasks[{i}].sources[{j}]", f"task {task.name}: {problem}")


def _require_data_root(recipe: Recipe, where: str) -> None:
    for task in recipe.tasks:
        for spec in task.sources:
            relative = [f for f in source_files(spec) if not Path(f).is_absolute()]
            if relative:
                raise _fail(
                    where,
                    "data_root",
                    f"task {task.name} reads {relative[0]}, a path relative to the data root, and no data root "
                    "is set: give --data-root DIR (data.data_root in a train config, or data_root: in the recipe)",
                    say_field=False,
                )


@dataclasses.dataclass
class BuildConfig:
    """One build: `python -m data_pipeline build` arguments, also usable from Python."""

    recipe: str
    """Path of the recipe YAML."""
    out: str
    """Output directory; replaced atomically at the end of a successful build, and only if it is
    absent, empty or a previous build holding nothing else (`output_guard`): never the data root,
    a directory holding an input, nor an ancestor of one."""
    data_root: Optional[str] = None
    """Directory the recipe's source paths are relative to (e.g. ../shared/data); overrides the
    recipe's. A recipe with relative paths and no data root at all is refused when loaded."""
    tokenizer: Optional[str] = None
    """A Hugging Face tokenizer directory to use as is (overrides the recipe)."""
    train_tokenizer: bool = False
    """Train a SentencePiece tokenizer on the corpus (overrides the recipe's path)."""
    vocab_size: Optional[int] = None
    """Vocabulary size when training; None keeps the recipe's."""
    seq_len: Optional[int] = None
    """Packed sequence length; None keeps the recipe's."""
    workers: int = 1
    """Tokenizer processes; the output is byte-identical whatever this is."""
    strict: bool = False
    """Stop at the first bad row with its file and line instead of counting it."""
    overlong: Optional[str] = None
    """Over-long policy (truncate | drop); None keeps the recipe's."""
    template: Optional[str] = None
    """Prompt format (alpaca | chat); None keeps the recipe's."""
    progress: bool = True
    """Show progress on stderr (a bar on a terminal, timestamped lines otherwise)."""
    chunk_size: int = 2048
    """Examples per tokenisation chunk; fixed chunking keeps the output independent of workers."""

    def __post_init__(self):
        """Types as annotated (paths may be given as `Path`s) and ranges, before anything is read."""
        for name in ("recipe", "out", "data_root", "tokenizer"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_fields(self, DataConfigError, file="BuildConfig")
        for name, low in (
            ("workers", 1),
            ("chunk_size", 1),
            ("seq_len", 2),
            ("vocab_size", MIN_VOCAB_SIZE),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                raise _option_error(name, value, f"must be at least {low}")
        if self.overlong not in (None, "truncate", "drop"):
            raise _option_error("overlong", self.overlong, "must be truncate or drop")
        if self.tokenizer and self.train_tokenizer:
            raise DataConfigError("give either --tokenizer or --train-tokenizer, not both")


def _option_error(name: str, value: Any, message: str) -> DataConfigError:
    err = DataConfigError(f"--{name.replace('_', '-')} {value}: {message} (BuildConfig.{name})")
    err.field = name
    return err
