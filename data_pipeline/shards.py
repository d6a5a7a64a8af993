"""Token shards on disk, their manifest, and verification.

Layout of a build directory (the contract between the pipeline and the training engine):

    OUT/manifest.json            everything below, with sha256 of every file
    OUT/tokenizer/               the tokenizer (AutoTokenizer.from_pretrained loads it)
    OUT/bad_rows.jsonl           one line per dropped bad row: task, file, line, reason, detail
    OUT/<split>/<group>-NNNNN.bin packed rows: [sequences, seq_len] token ids, little-endian,
                                  uint16 when the vocabulary fits, else uint32, padded with pad_id
    OUT/<split>/<group>-NNNNN.idx documents: [documents, 5] int32 little-endian rows of
                                  (row, start, length, loss_start, task_id), sorted by row, start

<group> is "mixed" (default: all tasks of a split packed together, which fills the space that
long documents leave with short ones of other tasks) or the task name (recipe packing: per_task).
The first document of a row is its longest (best-fit-decreasing), and its task is the row's
task for task sampling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "hycam-ds-packed-shards"
VERSION = 1
INDEX_DTYPE = np.dtype("<i4")
INDEX_COLUMNS = ("row", "start", "length", "loss_start", "task_id")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id (as Megatron chooses it)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Writes one group's packed rows of one split as fixed-size shards, hashing as it writes."""

    def __init__(
        self, out: Path, split: str, group: str, seq_len: int, dtype: np.dtype, pad_id: int, shard_sequences: int
    ):
        self.out, self.split, self.group = out, split, group
        self.seq_len, self.dtype, self.pad_id, self.shard_sequences = seq_len, dtype, pad_id, shard_sequences
        self.shards: list[dict] = []
        self._rows: list[list[tuple[np.ndarray, int]]] = []

    def add_rows(self, rows: list[list[tuple[np.ndarray, int]]]) -> None:
        """Append packed rows; each row is a list of (tokens, loss_start, task_id) documents."""
        self._rows.extend(rows)
        while len(self._rows) >= self.shard_sequences:
            self._write(self._rows[: self.shard_sequences])
            self._rows = self._rows[self.shard_sequences :]

    def close(self) -> list[dict]:
        if self._rows:
            self._write(self._rows)
            self._rows = []
        return self.shards

    def _write(self, rows: list) -> None:
        tokens = np.full((len(rows), self.seq_len), self.pad_id, dtype=self.dtype)
        index = []
        for r, docs in enumerate(rows):
            start = 0
            for doc, loss_start, task_id in docs:
                tokens[r, start : start + len(doc)] = doc
                index.append((r, start, len(doc), loss_start, task_id))
                start += len(doc)
        index_arr = np.asarray(index, dtype=INDEX_DTYPE).reshape(-1, len(INDEX_COLUMNS))
        name = f"{self.split}/{self.group}-{len(self.shards):05d}"
        (self.out / self.split).mkdir(parents=True, exist_ok=True)
        self.shards.append(
            {
                "path": name + ".bin",
                "sha256": _write_file(self.out / (name + ".bin"), tokens.tobytes()),
                "index_path": name + ".idx",
                "index_sha256": _write_file(self.out / (name + ".idx"), index_arr.tobytes()),
                "sequences": len(rows),
                "tokens": int(index_arr[:, 2].sum()),
                "documents": len(index_arr),
                "loss_tokens": int((index_arr[:, 2] - np.minimum(index_arr[:, 3], index_arr[:, 2])).sum()),
            }
        )


def _write_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content without its own `manifest_sha256` (written last by the build)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def load_manifest(out_dir: str | Path) -> dict:
    """The manifest of a build directory, with a clear error when it is not one or was edited.

    The manifest carries the sha256 of its own content (`manifest_sha256`): a hand-edited
    manifest (a changed count, weight or checksum, or the key removed) is refused.
    """
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{out_dir} is not a data_pipeline build: cannot read {path}: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a data_pipeline manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported format {manifest.get('format')!r} v{manifest.get('version')}")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        why = "has no manifest_sha256" if "manifest_sha256" not in manifest else "no longer matches its manifest_sha256"
        raise ValueError(
            f"{path}: {why}: edited after the build (or built before manifests were sealed); "
            "rebuild the data instead of editing the manifest"
        )
    return manifest


def manifest_template(manifest: dict) -> dict:
    """The manifest's prompt format entry; a manifest without one holds alpaca prompts."""
    return manifest.get("template", {"name": "alpaca"})


def shard_sizes(manifest: dict, shard: dict) -> dict:
    """Expected byte size of a shard's .bin and .idx files, from the manifest."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    return {
        shard["path"]: shard["sequences"] * manifest["seq_len"] * itemsize,
        shard["index_path"]: shard["documents"] * len(INDEX_COLUMNS) * INDEX_DTYPE.itemsize,
    }


def check_shards(out_dir: str | Path, manifest: dict, splits=None, checksums: bool = True) -> list[str]:
    """Problems of the shards of `splits` (default: all): missing, wrong size, and (checksums) sha256."""
    out_dir = Path(out_dir)
    problems = []
    for split in manifest["splits"] if splits is None else splits:
        for shard in manifest["splits"][split]["shards"]:
            for rel, size in shard_sizes(manifest, shard).items():
                path = out_dir / rel
                digest = shard["sha256" if rel == shard["path"] else "index_sha256"]
                if not path.is_file():
                    problems.append(f"{rel}: missing")
                elif path.stat().st_size != size:
                    problems.append(f"{rel}: size {path.stat().st_size} != {size} (truncated or extended)")
                elif checksums and sha256_file(path) != digest:
                    problems.append(f"{rel}: sha256 mismatch (damaged)")
    return problems


def verify(out_dir: str | Path) -> list[str]:
    """Re-check every file of the build against the manifest; returns the problems found."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    problems = check_shards(out_dir, manifest)
    for rel, digest in manifest.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            problems.append(f"{rel}: missing or sha256 mismatch")
    return problems
