"""Which rows each rank reads, in which order: deterministic, resumable, disjoint across ranks.

All ranks compute the same global stream of rows from (seed, state) and each keeps its own
slice of every global batch (`world_size * micro_batch_size` rows), so ranks never overlap
within an epoch and together read everything. The state is global (it does not depend on the
rank), so a run can resume on the same or another number of ranks.
"""

from __future__ import annotations

import numpy as np

CHOICE_BLOCK = 4096  # task choices are drawn in blocks keyed by (seed, block): O(1) resume


class TrainSampler:
    """Infinite stream of global row ids for the train split.

    mixture / temperature: each row's task is drawn with probabilities `probs`; each task walks
    its own permutation of its rows, reshuffled by (seed, task, epoch) when it runs out.
    sequential: one permutation of all rows per epoch (seed, epoch), every row once per epoch;
    with drop_last the tail that does not fill a global batch is skipped.
    """

    def __init__(self, task_rows: list[np.ndarray], probs: np.ndarray | None, seed: int, drop_last: bool):
        self.task_rows, self.probs, self.seed, self.drop_last = task_rows, probs, seed, drop_last
        self.all_rows = np.concatenate(task_rows) if task_rows else np.zeros(0, np.int64)
        self.state = {"samples": 0, "cursors": [[0, 0] for _ in task_rows], "epoch": 0, "pos": 0}
        self._perm_cache: dict = {}
        self._choice_cache: tuple = (-1, None)

    def next_global_batch(self, size: int) -> list[int]:
        if self.probs is None:
            return self._sequential(size)
        return [self._mixture_one() for _ in range(size)]

    def _perm(self, key: tuple, n: int) -> np.ndarray:
        if key not in self._perm_cache:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._perm_cache[key]

    def _mixture_one(self) -> int:
        g = self.state["samples"]
        block = g // CHOICE_BLOCK
        if self._choice_cache[0] != block:
            rng = np.random.default_rng([self.seed, 0x7A5C, block])
            self._choice_cache = (block, rng.choice(len(self.probs), size=CHOICE_BLOCK, p=self.probs))
        task = int(self._choice_cache[1][g % CHOICE_BLOCK])
        epoch, pos = self.state["cursors"][task]
        rows = self.task_rows[task]
        row = int(rows[self._perm((1, task, epoch), len(rows))[pos]])
        pos += 1
        self.state["cursors"][task] = [epoch + 1, 0] if pos == len(rows) else [epoch, pos]
        self.state["samples"] = g + 1
        return row

    def _sequential(self, size: int) -> list[int]:
        n = len(self.all_rows)
        if self.drop_last and size > n:
            raise ValueError(f"global batch of {size} rows is larger than the split ({n} rows)")
        out = []
        while len(out) < size:
            epoch, pos = self.state["epoch"], self.state["pos"]
            if pos >= n or (self.drop_last and not out and pos + size > n):
                self.state["epoch"], self.state["pos"] = epoch + 1, 0
                continue
            take = min(size - len(out), n - pos)
            perm = self._perm((2, epoch), n)
            out.extend(int(r) for r in self.all_rows[perm[pos : pos + take]])
            self.state["pos"] = pos + take
        self.state["samples"] += size
        return out


class EvalSampler:
    """One pass over all rows in storage order; rank r of W reads rows r, r+W, r+2W, ..."""

    def __init__(self, rows: np.ndarray, rank: int, world_size: int, micro_batch_size: int, drop_last: bool):
        mine = rows[rank::world_size]
        n_batches = len(mine) // micro_batch_size if drop_last else -(-len(mine) // micro_batch_size)
        self.batches = [mine[i * micro_batch_size : (i + 1) * micro_batch_size].tolist() for i in range(n_batches)]
        self.state = {"batches": 0}

    def next_rows(self) -> list[int] | None:
        i = self.state["batches"]
        if i >= len(self.batches):
            return None
        self.state["batches"] = i + 1
        return self.batches[i]
