"""Each rank's share of a checkpoint, in one process: who hashes and who loads which file, the
manifest merged from the ranks' parts, the read-once verify and screen, DeepSpeed handed only screened
objects, and what a change of world size or ZeRO stage means to a resume."""

import hashlib
import io
import json
import os
import pickle

import pytest
import torch

from hycam_ds.engine import checkpoint_shares as shares
from hycam_ds.engine import checkpointing as ckpt
from hycam_ds.engine import checksums
from hycam_ds.engine.train_config import TrainConfig

ZERO3 = [
    "engine/zero_pp_rank_0_mp_rank_00_model_states.pt",
    "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "engine/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "engine/zero_pp_rank_1_mp_rank_00_model_states.pt",
    "rng/rank_00000.json",
    "rng/rank_00001.json",
    "trainer_state.json",
    "zero_to_fp32.py",
]
ZERO2_SHARED = "engine/mp_rank_00_model_states.pt"


def test_each_rank_owns_its_partition_files_and_rank_0_the_shared_ones():
    assert [shares.owner(f) for f in ZERO3] == [0, 0, 1, 1, 0, 1, None, None]
    assert shares.owner(ZERO2_SHARED) is None, "ZeRO-2's model states are every rank's to load"
    assert shares.writer("engine/zero_pp_rank_3_mp_rank_00_optim_states.pt", world=2) == 0
    assert shares.share(ZERO3, 1) == [
        "engine/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "engine/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "rng/rank_00001.json",
        "trainer_state.json",
    ]
    assert shares.share(ZERO3, 0) == sorted(f for f in ZERO3 if shares.owner(f) in (None, 0))
    assert ZERO2_SHARED in shares.share([*ZERO3, ZERO2_SHARED], 1)
    # another world size: rank 0 converts every DeepSpeed file, the others read none of them
    assert shares.share(ZERO3, 0, world_changed=True) == sorted(ZERO3)
    assert shares.share(ZERO3, 1, world_changed=True) == ["rng/rank_00001.json", "trainer_state.json"]


def test_a_file_is_hashed_as_deepspeed_writes_it(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine, state = Engine(), {"big": torch.randn(600_000), "small": torch.arange(3), "step": 7}
    (tmp_path / "engine").mkdir()
    with shares.HashingWrites(engine, tmp_path) as written:
        engine.checkpoint_engine.save(state_dict=state, path=str(tmp_path / "engine" / "a.pt"))
    data = (tmp_path / "engine" / "a.pt").read_bytes()
    assert written.files == {"engine/a.pt": _entry(data)}
    loaded = torch.load(tmp_path / "engine" / "a.pt", weights_only=True)
    assert torch.equal(loaded["big"], state["big"]) and loaded["step"] == 7
    assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine), "DeepSpeed's own engine is back"


def _entry(data: bytes) -> dict:
    return checksums.entry_of_bytes(data)


def test_publish_merges_the_ranks_parts_and_hashes_what_no_part_names(tmp_path):
    root = tmp_path / "checkpoints"
    stage = ckpt.staging_dir(root, 4)
    files = {"engine/zero_pp_rank_0_x.pt": b"zero", "engine/zero_pp_rank_1_x.pt": b"one", "zero_to_fp32.py": b"#"}
    for rel, data in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    parts = {rel: _entry(data) for rel, data in files.items() if rel.endswith(".pt")}
    parts["engine/zero_pp_rank_1_x.pt"][checksums.RECORDED] = "0" * 32  # what the rank said is what goes in
    published = ckpt.publish(root, 4, keep_last=2, files=parts)
    manifest = json.loads((published / ckpt.MANIFEST).read_text())["files"]
    assert manifest["zero_to_fp32.py"] == _entry(b"#"), "rank 0 hashes the files no part names"
    assert manifest["engine/zero_pp_rank_1_x.pt"][checksums.RECORDED] == "0" * 32, "a rank's part is not hashed again"
    stage.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing from the staging directory"):
        ckpt.publish(root, 6, keep_last=2, files={"engine/zero_pp_rank_1_x.pt": _entry(b"one")})


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp_path, files: dict[str, bytes]):
    checkpoint = tmp_path / "step_00000002"
    for rel, data in files.items():
        (checkpoint / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / rel).write_bytes(data)
    manifest = {"step": 2, "files": {rel: _entry(data) for rel, data in files.items()}}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return checkpoint, manifest


def test_verify_share_reads_once_checks_the_manifest_first_and_screens_pickles(tmp_path):
    tensors = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, tensors)
    marker = tmp_path / "pwned"
    checkpoint, manifest = _checkpoint(
        tmp_path,
        {"a.pt": tensors.getvalue(), "state.json": b"{}", "evil.pt": pickle.dumps(_Exploit(marker))},
    )
    loaded = shares.verify_share(checkpoint, manifest, ["a.pt", "state.json"])
    assert torch.equal(loaded["a.pt"]["w"], torch.arange(3.0)) and loaded["state.json"] == b"{}"
    with pytest.raises(ckpt.CheckpointError, match="evil.pt: refused, not plain tensor data"):
        shares.verify_share(checkpoint, manifest, ["evil.pt"])  # the manifest matches: the screen refuses it
    manifest["files"]["evil.pt"][checksums.RECORDED] = "f" * 32
    with pytest.raises(ckpt.CheckpointError, match="evil.pt: does not match the checkpoint manifest"):
        shares.verify_share(checkpoint, manifest, ["evil.pt"])
    assert not marker.exists(), "a pickle offered as a checkpoint was executed"
    (checkpoint / "planted.pt").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match="planted.pt: file not in the checkpoint manifest"):
        ckpt.check_listing(checkpoint, ckpt.read_manifest(checkpoint))
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps({"files": {"../../outside": _entry(b"")}}))
    with pytest.raises(ckpt.CheckpointError, match="points outside the checkpoint"):
        ckpt.read_manifest(checkpoint)


def test_a_manifest_written_before_the_checksum_changed_still_verifies(tmp_path):
    """Manifests once recorded sha256: a checkpoint saved then resumes, and is still checked."""
    tensors = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, tensors)
    files = {"a.pt": tensors.getvalue(), "trainer_state.json": b'{"step": 2}'}
    checkpoint, _ = _checkpoint(tmp_path, files)
    old = {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps({"step": 2, "files": old}))
    manifest = ckpt.verify(checkpoint)
    loaded = shares.verify_share(checkpoint, manifest, sorted(files))
    assert torch.equal(loaded["a.pt"]["w"], torch.arange(3.0))
    assert checksums.entry_of_file(checkpoint / "a.pt") == checksums.entry_of_bytes(files["a.pt"])
    (checkpoint / "a.pt").write_bytes(files["a.pt"][:-1] + b"!")  # same size, one byte changed
    with pytest.raises(ckpt.CheckpointError, match="a.pt: does not match the checkpoint manifest"):
        ckpt.verify(checkpoint)
    with pytest.raises(ckpt.CheckpointError, match="a.pt: does not match the checkpoint manifest"):
        shares.verify_share(checkpoint, manifest, ["a.pt"])


def test_deepspeed_is_handed_only_screened_objects(tmp_path):
    class Engine:
        checkpoint_engine = "deepspeed's own"

    engine, known = Engine(), str((tmp_path / "a.pt").resolve())
    with shares.ScreenedLoads(engine, {known: {"x": 1}}) as loads:
        assert engine.checkpoint_engine is loads
        assert loads.load(tmp_path / "." / "a.pt", map_location="cpu") == {"x": 1}
        with pytest.raises(ckpt.CheckpointError, match="did not verify"):
            loads.load(tmp_path / "b.pt")
    assert engine.checkpoint_engine == "deepspeed's own"


def test_a_world_size_change_is_allowed_and_a_zero_stage_change_refused():
    config = TrainConfig().to_dict()
    config["optim"].update(micro_batch_size=2, grad_accum=1)
    state = {"world_size": 2, "zero_stage": 3, "config": json.loads(json.dumps(config))}
    config["optim"]["grad_accum"] = 2
    assert ckpt.run_changes(state, config, world=1, stage=3) == ([], ["world size 2 -> 1"])
    fixed, allowed = ckpt.run_changes(state, config, world=4, stage=2)
    assert fixed == ["ZeRO stage 3 -> 2 (--ds_config)"]
    assert allowed == ["world size 2 -> 4", "global batch 4 -> 16 rows per step"]
    assert ckpt.run_changes({"step": 3}, config, world=8, stage=3) == ([], []), "an old checkpoint: nothing to compare"
