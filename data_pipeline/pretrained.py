"""What a user may name as a pretrained backbone or tokenizer, and how transformers is asked for it.

Three forms, everywhere a backbone is named (training's `model.path`, evaluation's and generation's
`--backbone`, the data build's `--tokenizer`, `estimate.py --config`):

    runs/backbones/smollm2-135m-instruct   a local Hugging Face directory
    path/to/model.Q4_1.gguf                a GGUF file: its directory, loaded with `gguf_file=`
    Qwen/Qwen2.5-0.5B[@revision]           a hub id, passed to transformers untouched (the hub,
                                           or its local cache with HF_HUB_OFFLINE=1)

A local path is made absolute (every rank and every later job reads the same files); a hub id is
never rewritten into a path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional

# Hugging Face repository ids: "name" or "org/name", letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class PretrainedRefError(ValueError):
    """A backbone or tokenizer reference that is none of the three accepted forms."""


@dataclasses.dataclass(frozen=True)
class PretrainedRef:
    """A backbone or tokenizer reference, ready for `from_pretrained`."""

    name_or_path: str
    """A local directory (absolute) or a hub id."""
    gguf_file: Optional[str] = None
    """File name inside `name_or_path` for a GGUF checkpoint."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of a hub id."""

    @property
    def is_local(self) -> bool:
        return self.gguf_file is not None or Path(self.name_or_path).is_dir()

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments that `from_pretrained(self.name_or_path, ...)` needs."""
        extra: dict[str, Any] = {}
        if self.gguf_file is not None:
            extra["gguf_file"] = self.gguf_file
        if self.revision is not None:
            extra["revision"] = self.revision
        return extra

    def __str__(self) -> str:
        """The reference as the user would write it again (run_info.json records this)."""
        if self.gguf_file is not None:
            return str(Path(self.name_or_path) / self.gguf_file)
        return f"{self.name_or_path}@{self.revision}" if self.revision else self.name_or_path


def parse_pretrained(ref: str | Path) -> PretrainedRef:
    """Classify `ref`; a path that exists wins over a hub id of the same spelling."""
    text = str(ref).strip()
    if not text:
        raise PretrainedRefError("empty backbone or tokenizer reference")
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PretrainedRefError(f"{text}: no such GGUF file")
        return PretrainedRef(str(path.resolve().parent), gguf_file=path.name)
    if path.is_dir():
        return PretrainedRef(str(path.resolve()))
    if path.exists():
        raise PretrainedRefError(f"{text}: a file, not a model directory, .gguf file or hub id")
    repo, _, revision = text.partition("@")
    looks_local = text.startswith((".", "/", "~")) or repo.count("/") > 1
    if looks_local or not _HUB_ID.match(repo) or (revision == "" and "@" in text):
        raise PretrainedRefError(f"{text}: no such directory, and not a hub id of the form org/name[@revision]")
    return PretrainedRef(repo, revision=revision or None)


# Files that hold a tokenizer's vocabulary, in the formats transformers reads.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "merges.txt")
VOCABULARY_SUFFIXES = (".model", ".tiktoken")


def check_tokenizer_files(ref: PretrainedRef) -> None:
    """A local directory must hold a vocabulary: without one, transformers builds a tokenizer with
    an empty vocabulary from tokenizer_config.json alone, which encodes every text to nothing."""
    if ref.gguf_file is not None or not ref.is_local:
        return
    directory = Path(ref.name_or_path)
    if not any((directory / name).is_file() for name in VOCABULARY_FILES) and not any(
        p.suffix in VOCABULARY_SUFFIXES for p in directory.iterdir() if p.is_file()
    ):
        raise PretrainedRefError(
            f"{directory}: no tokenizer vocabulary in this directory (none of {', '.join(VOCABULARY_FILES)}); "
            "give a backbone's directory or a build's tokenizer/ directory"
        )


def load_pretrained_tokenizer(ref: str | Path | PretrainedRef):
    """`AutoTokenizer.from_pretrained` for any of the three forms; a local directory without a
    vocabulary, or one transformers cannot load, is a `PretrainedRefError` naming it."""
    from transformers import AutoTokenizer

    ref = ref if isinstance(ref, PretrainedRef) else parse_pretrained(ref)
    check_tokenizer_files(ref)
    try:
        return AutoTokenizer.from_pretrained(ref.name_or_path, **ref.kwargs())
    except OSError as err:
        raise cannot_load(ref, "tokenizer", err) from None
    except ValueError as err:  # e.g. "Couldn't instantiate the backend tokenizer" (files it cannot read)
        if not ref.is_local:
            raise
        raise cannot_load(ref, "tokenizer", err) from None


def cannot_load(ref: PretrainedRef, what: str, err: Exception) -> PretrainedRefError:
    """transformers' OSError (offline and not cached, no such repository, missing files) as one line
    naming the reference."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    hint = (
        " (HF_HUB_OFFLINE is set: only the local Hugging Face cache is read)"
        if ref.gguf_file is None
        and not ref.is_local
        and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
        else ""
    )
    return PretrainedRefError(f"{ref}: cannot load its {what}: {first}{hint}")
