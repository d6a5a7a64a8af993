"""Which directory a build may replace: the rule that keeps a mistyped `--out` from deleting data.

A build writes into a staging sibling and then swaps it in for `--out`, deleting what was there.
That is safe only when what was there is disposable, so `--out` must be

    absent, an empty directory, or a previous build: its manifest.json in the build format and
    nothing that is not one of that build's own files (the manifest, the shards and their
    indexes, the tokenizer, bad_rows.jsonl),

and never the data root, a directory holding an input (a source file, the recipe, the
tokenizer), nor an ancestor of one. Paths are compared with symlinks resolved. Anything else is an
`UnsafeOutputError` naming the directory and the reason, raised before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .examples import BuildError
from .shards import FORMAT, MANIFEST


class UnsafeOutputError(BuildError):
    """`--out` names something a build must not replace."""


def check_output_dir(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """The resolved output directory, if a build may replace it; else an `UnsafeOutputError`.

    `inputs` are (what, path) pairs, e.g. ("the data root", root), ("input file", path): a
    directory input is protected with its ancestors, a file input with its directory and theirs.
    """
    given = str(out)
    out = Path(out).expanduser().resolve()
    for what, path in inputs:
        path = Path(path).expanduser().resolve()
        keep = path if path.is_dir() else path.parent
        if out == path or out == keep or out in keep.parents:
            relation = "is" if out == path else "holds" if out == keep else "contains"
            raise UnsafeOutputError(
                f"--out {given}: {relation} {what} {path}; refusing to replace it "
                "(a build replaces its output directory: choose a new one)"
            )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UnsafeOutputError(
            f"--out {given}: {existing} is a file, not a directory; refusing to replace it (choose a new directory)"
        )
    if existing == out:
        check_replaceable(out, given)
    return out


def check_replaceable(out: Path, given: str | None = None) -> None:
    """`out` (an existing directory) is empty or a previous build holding nothing else; else an error.

    The build calls this again right before it swaps its result in, so a file that appeared in
    `out` while it ran is not deleted either."""
    given = given or str(out)
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = (
            "a data_pipeline build, but also files the build did not write"
            if _own_files(out) is not None
            else "files that are not a data_pipeline build"
        )
        raise UnsafeOutputError(
            f"--out {given}: holds {what} ({shown}); refusing to replace it "
            "(choose another directory, or empty this one yourself)"
        )


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` (relative paths, directories with a trailing /) that no previous build wrote."""
    if not any(out.iterdir()):
        return []
    own = _own_files(out)
    if own is None:  # no build here: everything is foreign
        return sorted(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in out.iterdir())
    own_dirs = {str(Path(rel).parent) for rel in own} - {"."}
    own_dirs |= {str(parent) for rel in own_dirs for parent in Path(rel).parents} - {"."}
    foreign = []
    for root, dirs, files in os.walk(out):  # symlinks are entries, never followed
        base = Path(root).relative_to(out)
        for name in sorted(dirs):
            rel = str(base / name)
            if (out / rel).is_symlink():
                foreign.append(rel)
            elif rel not in own_dirs:
                foreign.append(rel + "/")
        dirs[:] = [d for d in sorted(dirs) if str(base / d) in own_dirs and not (out / base / d).is_symlink()]
        foreign += [str(base / name) for name in sorted(files) if str(base / name) not in own]
    return foreign


def _own_files(out: Path) -> set[str] | None:
    """The files a build lists in its manifest (with the manifest itself), or None if `out` holds no
    manifest in the build format."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return None
        own = {MANIFEST, *manifest.get("files", {})}
        for split in manifest.get("splits", {}).values():
            for shard in split.get("shards", []):
                own |= {shard["path"], shard["index_path"]}
        return {str(Path(rel)) for rel in own}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return None
