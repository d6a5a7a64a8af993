"""hycam-ds data pipeline: five task sources -> packed, checksummed token shards -> a resumable reader.

Data flows one way: raw records (sources/) -> normalised examples (examples.py) -> token ids
with a loss boundary (encode.py) -> packed rows (packing.py) -> shards + manifest (shards.py,
build.py) -> batches for each rank (reader.py). This package knows nothing of the model or of
DeepSpeed; its output directory is the contract.

Mistakes are refused before they cost data or time: the recipe is typed (typed_config.py), `--out`
is replaced only if it is a previous build or empty (output_guard.py), and inputs that would build
nothing (a tokenizer without a vocabulary, a task of junk, a seq_len that holds no example) are
one-line errors naming the file or field.
"""

from .build import build_dataset, iter_examples, split_of
from .config import BuildConfig, DataConfigError, Recipe, TaskSpec, load_recipe
from .examples import BadRow, BuildError, Example
from .mask import block_causal_mask
from .output_guard import UnsafeOutputError, check_output_dir
from .pretrained import PretrainedRef, PretrainedRefError, load_pretrained_tokenizer, parse_pretrained
from .reader import ShardReader, iter_documents
from .shards import load_manifest, manifest_template, verify
from .template import TEMPLATES, PromptFormat, format_prompt, prompt_format
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_sentencepiece
from .typed_config import TypedConfigError, build_dataclass, read_yaml_mapping

__all__ = [
    "BadRow",
    "BuildConfig",
    "BuildError",
    "DataConfigError",
    "Example",
    "PretrainedRef",
    "PretrainedRefError",
    "Recipe",
    "ShardReader",
    "TaskSpec",
    "TypedConfigError",
    "UnsafeOutputError",
    "block_causal_mask",
    "build_dataclass",
    "build_dataset",
    "check_output_dir",
    "format_prompt",
    "iter_documents",
    "iter_examples",
    "load_manifest",
    "load_pretrained_tokenizer",
    "load_recipe",
    "load_tokenizer",
    "parse_pretrained",
    "read_yaml_mapping",
    "split_of",
    "tokenizer_fingerprint",
    "train_sentencepiece",
    "verify",
    "TEMPLATES",
    "PromptFormat",
    "manifest_template",
    "prompt_format",
]
