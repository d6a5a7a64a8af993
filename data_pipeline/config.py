"""Typed configuration: the recipe (YAML) and the build options (CLI / `build_dataset`).

A recipe YAML mirrors `Recipe`; `BuildConfig` holds what changes per invocation and overrides
the recipe where both have a say (tokenizer, vocabulary size, sequence length, over-long policy,
prompt template).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from .examples import BuildError
from .template import TEMPLATES

SPLITS = ("train", "eval", "test")


@dataclasses.dataclass
class TaskSpec:
    """One task of the multi-task corpus."""

    name: str
    """Task name; its index in the recipe's list is the task id written with every token."""
    sources: list
    """Source specs: dicts with a `type` (see `data_pipeline.sources.ADAPTERS`) and its own keys."""
    weight: Optional[float] = None
    """Mixture weight for `task_sampling="mixture"`; None means proportional to the task's size."""


@dataclasses.dataclass
class TokenizerSpec:
    """How the recipe wants its tokenizer (the CLI's --tokenizer / --train-tokenizer override it)."""

    path: Optional[str] = None
    """A Hugging Face tokenizer directory (a backbone's); None means train one here."""
    vocab_size: int = 4000
    """Vocabulary size of the SentencePiece model trained here."""
    model_type: str = "bpe"
    """SentencePiece algorithm: bpe (compresses small repetitive corpora far better) or unigram."""
    max_sentences: int = 200_000
    """At most this many texts (prompts and responses of the train split) feed the trainer."""
    add_bos: bool = True
    """Start every document with BOS when the tokenizer has one."""


@dataclasses.dataclass
class Recipe:
    """A multi-task corpus: its tasks, their files, splits, mixture and packing."""

    name: str
    tasks: list
    """List of `TaskSpec`."""
    splits: dict = dataclasses.field(default_factory=lambda: {"train": 0.9, "eval": 0.05, "test": 0.05})
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
    """Where source paths are relative to, when --data-root is not given (relative to the recipe)."""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """Hash of the resolved recipe: the manifest records it, so a changed recipe is visible."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML; errors name the recipe and the offending key."""
    path = Path(path)
    try:
        raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BuildError(f"cannot read recipe {path}: {err}") from None
    try:
        tasks = [TaskSpec(**t) for t in raw.pop("tasks")]
        tok = TokenizerSpec(**(raw.pop("tokenizer", None) or {}))
        recipe = Recipe(tasks=tasks, tokenizer=tok, **raw)
    except (KeyError, TypeError) as err:
        raise BuildError(f"recipe {path}: bad or missing key: {err}") from None
    if recipe.data_root is not None:
        recipe.data_root = str((path.parent / recipe.data_root).resolve())
    _validate(recipe, path)
    return recipe


def _validate(recipe: Recipe, path: Path) -> None:
    names = recipe.task_names
    if not names or len(set(names)) != len(names):
        raise BuildError(f"recipe {path}: task names must be present and unique: {names}")
    if set(recipe.splits) - set(SPLITS) or abs(sum(recipe.splits.values()) - 1.0) > 1e-6:
        raise BuildError(f"recipe {path}: splits must be among {SPLITS} and sum to 1: {recipe.splits}")
    if recipe.overlong not in ("truncate", "drop"):
        raise BuildError(f"recipe {path}: overlong must be truncate or drop, not {recipe.overlong!r}")
    if recipe.packing not in ("mixed", "per_task"):
        raise BuildError(f"recipe {path}: packing must be mixed or per_task, not {recipe.packing!r}")
    if recipe.template not in TEMPLATES:
        raise BuildError(f"recipe {path}: template must be one of {list(TEMPLATES)}, not {recipe.template!r}")
    if recipe.system_prompt is not None and not isinstance(recipe.system_prompt, str):
        raise BuildError(f"recipe {path}: system_prompt must be text or null, not {recipe.system_prompt!r}")
    if not isinstance(recipe.max_row_bytes, int) or recipe.max_row_bytes <= 0:
        raise BuildError(f"recipe {path}: max_row_bytes must be a positive integer, not {recipe.max_row_bytes!r}")
    for task in recipe.tasks:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", task.name) or task.name == "mixed":
            raise BuildError(f"recipe {path}: task name {task.name!r} must be [A-Za-z0-9_.-]+ and not 'mixed'")
        if not task.sources or not all(isinstance(s, dict) and "type" in s for s in task.sources):
            raise BuildError(f"recipe {path}: task {task.name} needs sources with a `type`")


@dataclasses.dataclass
class BuildConfig:
    """One build: `python -m data_pipeline build` arguments, also usable from Python."""

    recipe: str
    """Path of the recipe YAML."""
    out: str
    """Output directory; replaced atomically at the end of a successful build."""
    data_root: Optional[str] = None
    """Directory the recipe's source paths are relative to (e.g. ../shared/data)."""
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
    """Show progress bars (tqdm, on stderr)."""
    chunk_size: int = 2048
    """Examples per tokenisation chunk; fixed chunking keeps the output independent of workers."""
