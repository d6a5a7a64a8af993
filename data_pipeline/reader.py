"""`ShardReader`: memory-mapped packed shards -> training batches, resumable, rank-aware."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .sampler import EvalSampler, TrainSampler
from .shards import INDEX_COLUMNS, INDEX_DTYPE, check_shards, load_manifest, manifest_template, shard_sizes

SAMPLINGS = ("mixture", "temperature", "sequential")
# verify=None checksums the split's shards on open when they total less than this (sha256 runs
# at ~1 GB/s: a couple of seconds once per run); larger splits get the size and index checks only.
VERIFY_AUTO_BYTES = 2 << 30


class ShardReader:
    """Batches of packed rows for one split of a build, for one data-parallel rank.

    split="train" is infinite (epochs reshuffled by seed + epoch) and samples tasks by the
    recipe's mixture weights ("mixture"), by size**(1/temperature) ("temperature"), or reads
    every row once per epoch ("sequential"). A row's task, for sampling, is the task of its
    first (longest) document; with recipe `packing: per_task` every row holds a single task.
    Other splits are one pass in storage order, rank r of W taking rows r, r+W, ...
    Every batch is a dict of int64 tensors [B, L]: input_ids, labels (-100 where no loss),
    position_ids (restarting at every document), segment_ids (0 = padding, 1..n = document
    in the row) and task_ids (-1 on padding).

    `template` ("alpaca" | "chat"), when given, must be the prompt format the shards were built
    with (ValueError otherwise), as `tokenizer_fingerprint` must be their tokenizer's.

    Damaged shards are refused on open (ValueError naming the file): their sizes and index are
    always checked; `verify=True` also compares every shard's sha256 with the manifest, and the
    default (None) does so when the split's shards total less than VERIFY_AUTO_BYTES.
    """

    def __init__(
        self,
        out_dir: str | Path,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int = 4,
        seed: int = 1234,
        tokenizer_fingerprint: Optional[str] = None,
        task_sampling: str = "mixture",
        temperature: float = 1.0,
        drop_last: bool = True,
        verify: Optional[bool] = None,
        template: Optional[str] = None,
    ):
        self.out_dir = Path(out_dir)
        self.manifest = load_manifest(self.out_dir)
        ours = self.manifest["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != ours:
            raise ValueError(
                f"tokenizer fingerprint mismatch: the model's tokenizer is {tokenizer_fingerprint} "
                f"but the shards in {self.out_dir} were built with {ours}; rebuild them with it"
            )
        built = manifest_template(self.manifest)["name"]
        if template is not None and template != built:
            raise ValueError(
                f"prompt template mismatch: the run expects {template!r} prompts but the shards in "
                f"{self.out_dir} were built with {built!r}; rebuild them with --template {template}"
            )
        if split not in self.manifest["splits"]:
            raise ValueError(f"no split {split!r} in {self.out_dir} (have {sorted(self.manifest['splits'])})")
        self._check_files(split, verify)
        if task_sampling not in SAMPLINGS or not 0 <= rank < world_size:
            raise ValueError(
                f"bad reader arguments: task_sampling={task_sampling!r}, rank={rank}, world_size={world_size}"
            )
        self.split, self.rank, self.world_size, self.micro_batch_size = split, rank, world_size, micro_batch_size
        self.seed, self.task_sampling, self.temperature = seed, task_sampling, temperature
        self.tasks = [t["name"] for t in self.manifest["tasks"]]
        self.seq_len = self.manifest["seq_len"]
        self._open_shards()
        if split == "train":
            probs = None if task_sampling == "sequential" else self._task_probs()
            self.sampler = TrainSampler(self.task_rows, probs, seed, drop_last)
        else:
            rows = np.arange(int(self.shard_start[-1]), dtype=np.int64)
            self.sampler = EvalSampler(rows, rank, world_size, micro_batch_size, drop_last)
        self._positions = np.arange(self.seq_len, dtype=np.int64)

    def _check_files(self, split: str, verify: Optional[bool]) -> None:
        shards = self.manifest["splits"][split]["shards"]
        if verify is None:
            verify = sum(sum(shard_sizes(self.manifest, sh).values()) for sh in shards) < VERIFY_AUTO_BYTES
        problems = check_shards(self.out_dir, self.manifest, [split], checksums=verify)
        if problems:
            raise ValueError(
                f"refusing damaged shards of {self.out_dir} ({split}): {'; '.join(problems)} "
                f"(python -m data_pipeline verify {self.out_dir} lists every problem; rebuild the data)"
            )
        self.verified = verify

    def _check_index(self, path: Path, idx: np.ndarray, rows: int) -> None:
        """Cheap bounds check of a shard's index: every document lies inside its row of the shard."""
        row, start, length, loss_start, task = idx.T
        ok = idx.size == 0 or (
            row.min() >= 0
            and row.max() < rows
            and start.min() >= 0
            and length.min() > 0
            and (start + length).max() <= self.seq_len
            and loss_start.min() >= 0
            and (loss_start <= length).all()
            and task.min() >= 0
            and task.max() < len(self.tasks)
            and (np.diff(row) >= 0).all()
        )
        if not ok:
            raise ValueError(
                f"refusing damaged shard index {path}: a document lies outside its shard or names no task "
                f"(python -m data_pipeline verify {self.out_dir}; rebuild the data)"
            )

    def _open_shards(self) -> None:
        dtype = np.dtype(self.manifest["dtype"])
        self.tokens, self.index, self.row_docs = [], [], []
        starts, row_task = [0], []
        for shard in self.manifest["splits"][self.split]["shards"]:
            n = shard["sequences"]
            self.tokens.append(np.memmap(self.out_dir / shard["path"], dtype=dtype, mode="r", shape=(n, self.seq_len)))
            idx = np.fromfile(self.out_dir / shard["index_path"], dtype=INDEX_DTYPE).reshape(-1, len(INDEX_COLUMNS))
            self._check_index(self.out_dir / shard["index_path"], idx, n)
            self.index.append(idx)
            self.row_docs.append(np.searchsorted(idx[:, 0], np.arange(n + 1)))
            row_task.append(idx[self.row_docs[-1][:-1], 4])  # a row's task: its first (longest) document's
            starts.append(starts[-1] + n)
        self.shard_start = np.asarray(starts, dtype=np.int64)
        row_task = np.concatenate(row_task) if row_task else np.zeros(0, np.int64)
        self.task_rows = [np.flatnonzero(row_task == t).astype(np.int64) for t in range(len(self.tasks))]

    def _task_probs(self) -> np.ndarray:
        sizes = np.asarray([len(r) for r in self.task_rows], dtype=np.float64)
        if self.task_sampling == "temperature":
            probs = np.where(sizes > 0, sizes ** (1.0 / self.temperature), 0.0)
        else:
            weights = [t.get("weight") for t in self.manifest["tasks"]]
            probs = np.asarray([s if w is None else w for w, s in zip(weights, sizes)], dtype=np.float64)
            probs = np.where(sizes > 0, probs, 0.0)
        if probs.sum() <= 0:
            raise ValueError(f"split {self.split} of {self.out_dir} has no rows to sample")
        return probs / probs.sum()

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train reader is infinite")
        return len(self.sampler.batches)

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.split == "train":
                rows = self.sampler.next_global_batch(self.world_size * self.micro_batch_size)
                rows = rows[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
            else:
                rows = self.sampler.next_rows()
                if rows is None:
                    return
            yield self._batch(rows)

    def _batch(self, rows: list[int]) -> dict:
        import torch  # here, not at the top: `import data_pipeline` (the build's CLI) stays free of torch

        n, L = len(rows), self.seq_len
        input_ids = np.empty((n, L), dtype=np.int64)
        labels = np.full((n, L), -100, dtype=np.int64)
        position_ids = np.zeros((n, L), dtype=np.int64)
        segment_ids = np.zeros((n, L), dtype=np.int64)
        task_ids = np.full((n, L), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            s = int(np.searchsorted(self.shard_start, row, side="right")) - 1
            local = row - int(self.shard_start[s])
            input_ids[b] = self.tokens[s][local]
            docs = self.index[s][self.row_docs[s][local] : self.row_docs[s][local + 1]]
            for k, (_, start, length, loss_start, task) in enumerate(docs.tolist(), start=1):
                end = start + length
                segment_ids[b, start:end] = k
                position_ids[b, start:end] = self._positions[:length]
                task_ids[b, start:end] = task
                labels[b, start + loss_start : end] = input_ids[b, start + loss_start : end]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
            "task_ids": torch.from_numpy(task_ids),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream; independent of rank (and of world size for train)."""
        return {
            "split": self.split,
            "seed": self.seed,
            "task_sampling": self.task_sampling,
            "fingerprint": self.manifest["tokenizer"]["fingerprint"],
            "sampler": copy.deepcopy(self.sampler.state),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seed", "task_sampling", "fingerprint"):
            ours = self.state_dict()[key]
            if state.get(key) != ours:
                raise ValueError(f"reader state was saved with {key}={state.get(key)!r}, this reader has {ours!r}")
        self.sampler.state = copy.deepcopy(state["sampler"])


def iter_documents(out_dir: str | Path, split: str = "test", rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Every document of a split, unpacked, in storage order; rank r of W takes documents r, r+W, ...

    Yields {"task_id", "tokens" (int64 numpy: [BOS] prompt response [EOS]; a chat build's response
    ends with its end-of-turn token instead of EOS), "loss_start"} — for generation-based
    evaluation, the prompt is tokens[:loss_start] and the reference the rest (builds with
    train_on_prompt=false, where loss_start is the prompt's end).
    """
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"no split {split!r} in {out_dir} (have {sorted(manifest['splits'])})")
    dtype, seq_len = np.dtype(manifest["dtype"]), manifest["seq_len"]
    counter = 0
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.memmap(out_dir / shard["path"], dtype=dtype, mode="r", shape=(shard["sequences"], seq_len))
        index = np.fromfile(out_dir / shard["index_path"], dtype=INDEX_DTYPE).reshape(-1, len(INDEX_COLUMNS))
        for row, start, length, loss_start, task in index.tolist():
            if counter % world_size == rank:
                yield {
                    "task_id": task,
                    "tokens": np.asarray(tokens[row, start : start + length], dtype=np.int64),
                    "loss_start": loss_start,
                }
            counter += 1
