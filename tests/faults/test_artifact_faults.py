"""Fault battery, item 5: damaged artefacts are refused with a message naming the file.

Data side: flipped bytes and truncation of shards (.bin and .idx), shards or a tokenizer from a
build with another tokenizer, hand-edited manifests. Each must make `python -m data_pipeline
verify` exit non-zero naming the file, and `ShardReader` (what the trainer opens) refuse it.
Adapter side: truncated, bit-flipped or edited files of a `save_adapter` directory must make
`load_adapter` raise `AdapterError` naming the file.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline import BuildConfig, ShardReader, build_dataset, load_tokenizer, tokenizer_fingerprint, verify

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]
ITEM = "5 damaged artefacts"


def _build(root: Path, vocab: int) -> Path:
    tasks = [
        {"name": g, "sources": [{"type": "embedded", "generator": g, "count": 150, "seed": 3}]}
        for g in ("arithmetic", "code", "medical")
    ]
    recipe = {
        "name": "artefacts",
        "seq_len": 128,
        "splits": {"train": 0.8, "eval": 0.1, "test": 0.1},
        "shard_sequences": 16,
        "tokenizer": {"vocab_size": vocab},
        "tasks": tasks,
    }
    (root / f"r{vocab}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return Path(
        build_dataset(
            BuildConfig(
                recipe=str(root / f"r{vocab}.yaml"), out=str(root / f"b{vocab}"), train_tokenizer=True, progress=False
            )
        )
    )


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(a build, the same corpus built with another tokenizer)."""
    root = tmp_path_factory.mktemp("artefacts")
    return _build(root, 400), _build(root, 520)


@pytest.fixture
def build(builds, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(builds[0], out)
    return out


def _shards(out: Path) -> list[tuple[str, str]]:
    """(split, relative path) of every .bin and .idx file."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [
        (split, sh[key])
        for split, info in manifest["splits"].items()
        for sh in info["shards"]
        for key in ("path", "index_path")
    ]


def _reader_refuses(out: Path, split: str, name: str, **kw) -> bool:
    try:
        ShardReader(out, split, micro_batch_size=2, **kw)
    except ValueError as err:
        return name in str(err)
    return False


def _cli_verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline", "verify", str(out)], cwd=REPO, capture_output=True, text=True
    )


def _record(table, case, results, detail):
    table.append({"item": ITEM, "case": case, "trials": len(results), "passed": sum(results), "detail": detail})


def test_flipped_bytes_in_a_shard(build, fault_table):
    rng = random.Random(11)
    results = []
    for trial, (split, rel) in enumerate(rng.sample(_shards(build), 10)):
        path = build / rel
        original = path.read_bytes()
        data = bytearray(original)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)  # one bit
        path.write_bytes(bytes(data))
        ok = any(rel in p for p in verify(build)) and _reader_refuses(build, split, rel)
        if trial == 0:  # the command line, once (a fresh interpreter costs seconds)
            proc = _cli_verify(build)
            ok = ok and proc.returncode != 0 and rel in proc.stderr
        results.append(ok)
        path.write_bytes(original)
    assert verify(build) == []
    _record(
        fault_table,
        "one bit flipped in a shard (.bin or .idx)",
        results,
        "verify exits 1 naming it; ShardReader refuses on open (sha256, verify=auto)",
    )
    assert all(results)


def test_truncated_shard(build, fault_table):
    results = []
    for split, rel in _shards(build)[:2] + [s for s in _shards(build) if s[0] == "train"][-2:]:
        path = build / rel
        original = path.read_bytes()
        for cut in (0, len(original) // 2, len(original) - 1):
            path.write_bytes(original[:cut])
            results.append(
                any(rel in p for p in verify(build))
                and _reader_refuses(build, split, rel)
                and _reader_refuses(build, split, rel, verify=False)
            )  # the size check needs no hashing
        path.write_bytes(original)
    path.unlink()
    proc = _cli_verify(build)
    results.append(proc.returncode != 0 and rel in proc.stderr and _reader_refuses(build, split, rel, verify=False))
    _record(
        fault_table,
        "truncated or missing shard",
        results,
        "verify names it; ShardReader refuses it even with verify=False (sizes always checked)",
    )
    assert all(results)


def test_shards_of_another_tokenizer(builds, build, fault_table):
    other = builds[1]
    theirs = tokenizer_fingerprint(load_tokenizer(other / "tokenizer"))
    results = []
    # the trainer's model has the other tokenizer: every split is refused
    for split in ("train", "eval", "test"):
        try:
            ShardReader(build, split, tokenizer_fingerprint=theirs)
            results.append(False)
        except ValueError as err:
            results.append("tokenizer fingerprint mismatch" in str(err) and str(build) in str(err))
    # token files of the other build copied over ours (same names; an .idx can be byte-identical
    # when every document fills its row, so token files are what differ)
    swaps = [
        s
        for s in _shards(other)
        if s[1].endswith(".bin")
        and (build / s[1]).is_file()
        and (build / s[1]).read_bytes() != (other / s[1]).read_bytes()
    ]
    for split, rel in swaps[:2] + swaps[-2:]:
        original = (build / rel).read_bytes()
        shutil.copyfile(other / rel, build / rel)
        results.append(any(rel in p for p in verify(build)) and _reader_refuses(build, split, rel))
        (build / rel).write_bytes(original)
    # the other build's tokenizer copied into ours: verify names it, and the trainer (which loads
    # OUT/tokenizer when it has no backbone path) is refused by the fingerprint
    shutil.rmtree(build / "tokenizer")
    shutil.copytree(other / "tokenizer", build / "tokenizer")
    swapped = tokenizer_fingerprint(load_tokenizer(build / "tokenizer"))
    proc = _cli_verify(build)
    results.append(proc.returncode != 0 and "tokenizer/tokenizer.json" in proc.stderr)
    try:
        ShardReader(build, "train", tokenizer_fingerprint=swapped)
        results.append(False)
    except ValueError as err:
        results.append("tokenizer fingerprint mismatch" in str(err))
    _record(
        fault_table,
        "shards / tokenizer of another tokenizer",
        results,
        "ShardReader: fingerprint mismatch naming the directory; swapped files named by verify",
    )
    assert all(results)


MANIFEST_EDITS = {
    "a shard's sha256": lambda m: m["splits"]["train"]["shards"][0].__setitem__("sha256", "0" * 64),
    "a task's mixture weight": lambda m: m["tasks"][0].__setitem__("weight", 5.0),
    "a shard's sequence count": lambda m: m["splits"]["train"]["shards"][0].__setitem__("sequences", 15),
    "seq_len": lambda m: m.__setitem__("seq_len", 64),
    "a shard entry removed": lambda m: m["splits"]["train"]["shards"].pop(),
    "pad_id": lambda m: m.__setitem__("pad_id", 3),
    "manifest_sha256 removed": lambda m: m.pop("manifest_sha256"),
    "tokenizer fingerprint": lambda m: m["tokenizer"].__setitem__("fingerprint", "f" * 32),
}


def test_hand_edited_manifest(build, fault_table):
    path = build / "manifest.json"
    original = path.read_text()
    results = []
    for name, edit in list(MANIFEST_EDITS.items()) + [("truncated", None), ("not an object", None)]:
        if edit is not None:
            manifest = json.loads(original)
            edit(manifest)
            path.write_text(json.dumps(manifest, indent=1))
        else:
            path.write_text(original[: len(original) // 2] if name == "truncated" else "[1, 2]")
        try:
            ShardReader(build, "train")
            refused = False
        except ValueError as err:
            refused = str(path) in str(err)
        results.append(refused)
    proc = _cli_verify(build)  # the last edit still in place
    results.append(proc.returncode != 0 and "manifest.json" in proc.stderr)
    path.write_text(original)
    assert verify(build) == []
    _record(
        fault_table,
        "manifest edited by hand",
        results,
        f"{len(MANIFEST_EDITS)} edits + truncated + not an object: refused by its own sha256 (manifest_sha256)",
    )
    assert all(results)


# ---- adapter files (hycam_ds.save_adapter / load_adapter) ----


@pytest.fixture
def adapter(tmp_path):
    import torch

    import hycam_ds as H
    from hycam_ds.modeling.backbones import build_backbone

    model = H.apply_hycam(build_backbone("tiny-llama", 97), H.HyCAMConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in H.hycam_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return H.save_adapter(model, tmp_path / "adapter")


def _adapter_refused(directory: Path, name: str) -> bool:
    """load_adapter raises AdapterError whose message names `name` (a file of the adapter)."""
    import hycam_ds as H
    from hycam_ds.modeling.backbones import build_backbone

    try:
        H.load_adapter(build_backbone("tiny-llama", 97), directory)
    except H.AdapterError as err:
        return name in str(err)
    return False


def test_damaged_adapter_files(adapter, fault_table):
    rng = random.Random(5)
    cases = {}
    weights = adapter / "adapter.safetensors"
    good = {p.name: p.read_bytes() for p in adapter.iterdir()}

    def attempt(case, file, damaged, named=None):
        (adapter / file).write_bytes(damaged)
        cases.setdefault(case, []).append(_adapter_refused(adapter, named or file))
        (adapter / file).write_bytes(good[file])

    for cut in (0, 8, len(good[weights.name]) // 2, len(good[weights.name]) - 1):
        attempt("truncated adapter weights", weights.name, good[weights.name][:cut])
    for offset in (3, 40, rng.randrange(100, len(good[weights.name])), len(good[weights.name]) - 1):
        data = bytearray(good[weights.name])
        data[offset] ^= 1 << rng.randrange(8)
        attempt("bit flipped in adapter weights", weights.name, bytes(data))
    config = json.loads(good["hycam_config.json"])
    for key, value in (("rank", 4), ("tau", 2.0), ("num_specialized", 2)):
        attempt("tampered adapter config", "hycam_config.json", json.dumps({**config, key: value}).encode())
    attempt("tampered adapter config", "hycam_config.json", b"")
    manifest = json.loads(good["manifest.json"])
    attempt("tampered adapter manifest", "manifest.json", good["manifest.json"][:50])
    attempt(
        "tampered adapter manifest",
        "manifest.json",
        json.dumps({**manifest, "sha256": {**manifest["sha256"], "adapter.safetensors": "0" * 64}}).encode(),
        "adapter.safetensors",
    )
    attempt(
        "tampered adapter manifest",
        "manifest.json",
        json.dumps({**manifest, "backbone": {**manifest["backbone"], "hidden_size": 1}}).encode(),
        str(adapter),
    )
    attempt("tampered adapter manifest", "manifest.json", json.dumps({**manifest, "format": "other/9"}).encode())
    weights.unlink()
    cases["missing adapter weights"] = [_adapter_refused(adapter, weights.name)]
    weights.write_bytes(good[weights.name])
    for case, results in cases.items():
        _record(fault_table, case, results, "load_adapter: AdapterError naming the file")
    assert all(all(r) for r in cases.values()), cases


# A hand-edited manifest that is valid JSON of the wrong shape must be an AdapterError naming
# manifest.json (it used to escape as AttributeError/KeyError).
WRONG_SHAPE_MANIFESTS = {
    "a JSON list": lambda m: [1, 2],
    "sha256 not an object": lambda m: {**m, "sha256": "x"},
    "backbone removed": lambda m: {k: v for k, v in m.items() if k != "backbone"},
}


def test_adapter_manifest_of_the_wrong_shape(adapter, fault_table):
    manifest = json.loads((adapter / "manifest.json").read_text())
    results = []
    for edit in WRONG_SHAPE_MANIFESTS.values():
        (adapter / "manifest.json").write_text(json.dumps(edit(manifest)))
        try:
            results.append(_adapter_refused(adapter, "manifest.json"))
        except Exception:  # refused, but not with a message naming the file
            results.append(False)
    _record(
        fault_table, "adapter manifest of the wrong shape", results, "load_adapter: AdapterError naming manifest.json"
    )
    assert all(results)
