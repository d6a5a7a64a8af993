"""The reader: batch contents, fingerprint check, exact resume, ranks without overlap."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline import ShardReader, load_manifest
from data_pipeline.shards import manifest_digest


def rows_of(batch):
    """Identify rows by their token content (every packed row is distinct)."""
    return [tuple(r.tolist()) for r in batch["input_ids"]]


def test_batch_fields(embedded_build):
    m = load_manifest(embedded_build)
    reader = ShardReader(embedded_build, split="train", micro_batch_size=4, seed=1)
    batch = next(iter(reader))
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids", "task_ids"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (4, 512)
    seg, pos, lab, ids, task = (batch[k] for k in ("segment_ids", "position_ids", "labels", "input_ids", "task_ids"))
    pad = seg == 0
    assert (lab[pad] == -100).all() and (task[pad] == -1).all() and (ids[pad] == m["pad_id"]).all()
    assert ((task >= 0) & (task < 5))[~pad].all()
    for b in range(4):
        for d in range(1, int(seg[b].max()) + 1):
            where = (seg[b] == d).nonzero().squeeze(1)
            assert torch.equal(pos[b, where], torch.arange(len(where)))  # positions restart per document
            assert ids[b, where[0]] == m["bos_id"] and lab[b, where[0]] == -100
            has_loss = lab[b, where] != -100
            first = int(has_loss.nonzero()[0])
            assert has_loss[first:].all() and not has_loss[:first].any()  # loss on the response only
            assert torch.equal(lab[b, where][first:], ids[b, where][first:])
            assert len(task[b, where].unique()) == 1


def test_fingerprint_mismatch_is_refused(embedded_build):
    m = load_manifest(embedded_build)
    ShardReader(embedded_build, tokenizer_fingerprint=m["tokenizer"]["fingerprint"])
    with pytest.raises(ValueError, match="tokenizer fingerprint mismatch"):
        ShardReader(embedded_build, tokenizer_fingerprint="0" * 32)


@pytest.mark.parametrize("sampling", ["mixture", "temperature", "sequential"])
def test_resume_yields_exactly_the_next_batches(embedded_build, sampling):
    kw = dict(split="train", micro_batch_size=8, seed=7, task_sampling=sampling, temperature=2.0)
    ref = ShardReader(embedded_build, **kw)
    it = iter(ref)
    expected = [next(it) for _ in range(130)]  # > one epoch of the smallest task, > a sequential epoch
    first = ShardReader(embedded_build, **kw)
    it = iter(first)
    for _ in range(57):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardReader(embedded_build, **kw)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in expected[57:]:
        got = next(it)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    other = ShardReader(embedded_build, **{**kw, "seed": 8})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_two_ranks_partition_a_train_epoch(embedded_build):
    m = load_manifest(embedded_build)
    n_rows, B = m["splits"]["train"]["sequences"], 4
    readers = [
        ShardReader(embedded_build, rank=r, world_size=2, micro_batch_size=B, seed=3, task_sampling="sequential")
        for r in range(2)
    ]
    steps = n_rows // (2 * B)
    seen = [[row for batch, _ in zip(r, range(steps)) for row in rows_of(batch)] for r in readers]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == steps * 2 * B >= n_rows - 2 * B
    # mixture sampling: within a task's epoch the ranks never read the same row either
    readers = [ShardReader(embedded_build, rank=r, world_size=2, micro_batch_size=B, seed=3) for r in range(2)]
    seen = [[row for batch, _ in zip(r, range(40)) for row in rows_of(batch)] for r in readers]
    assert not set(seen[0]) & set(seen[1])


def test_epochs_reshuffle(embedded_build):
    n_rows = load_manifest(embedded_build)["splits"]["train"]["sequences"]
    reader = ShardReader(embedded_build, micro_batch_size=1, seed=0, task_sampling="sequential")
    it = iter(reader)
    epoch0 = [rows_of(next(it))[0] for _ in range(n_rows)]
    epoch1 = [rows_of(next(it))[0] for _ in range(n_rows)]
    assert len(set(epoch0)) == n_rows and set(epoch0) == set(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("split", ["eval", "test"])
def test_eval_ranks_are_disjoint_and_cover_everything(embedded_build, split):
    n_rows = load_manifest(embedded_build)["splits"][split]["sequences"]
    shards = [
        list(ShardReader(embedded_build, split=split, rank=r, world_size=2, micro_batch_size=3, drop_last=False))
        for r in range(2)
    ]
    seen = [[row for batch in s for row in rows_of(batch)] for s in shards]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == n_rows == len(set(seen[0]) | set(seen[1]))
    single = [
        row
        for batch in ShardReader(embedded_build, split=split, micro_batch_size=3, drop_last=False)
        for row in rows_of(batch)
    ]
    assert sorted(single) == sorted(seen[0] + seen[1])


def test_mixture_weights_steer_task_frequencies(tmp_path, embedded_build):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(embedded_build, out)
    m = json.loads((out / "manifest.json").read_text())
    for t in m["tasks"]:
        t["weight"] = 1.0 if t["name"] == "general" else 0.0
    m["manifest_sha256"] = manifest_digest(m)  # a deliberate edit re-seals the manifest (an unsealed one is refused)
    (out / "manifest.json").write_text(json.dumps(m))
    reader = ShardReader(out, micro_batch_size=8, seed=0)
    general = [t for t in m["tasks"] if t["name"] == "general"][0]["id"]
    it = iter(reader)
    first_task = [int(b["task_ids"][i, 0]) for b in (next(it) for _ in range(10)) for i in range(8)]
    assert set(first_task) == {general}
