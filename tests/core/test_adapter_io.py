"""save_adapter / load_adapter: round trip, integrity checks, refusals, no unpickling."""

import json
import pickle

import pytest
import torch
from safetensors import SafetensorError

import hycam_ds as H
from hycam_ds.modeling.backbones import build_backbone

VOCAB = 97


def _trained_model(family="tiny-llama", **cfg):
    model = H.apply_hycam(build_backbone(family, VOCAB), H.HyCAMConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in H.hycam_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_round_trip_gives_identical_logits(tmp_path, family):
    model = _trained_model(family)
    ids = torch.randint(0, VOCAB, (2, 6))
    expected = model(ids).logits
    H.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors",
        "hycam_config.json",
        "manifest.json",
    ]
    fresh = build_backbone(family, VOCAB).eval()
    H.load_adapter(fresh, tmp_path / "adapter")  # applies HyCAM with the saved config
    assert torch.equal(fresh(ids).logits, expected)
    # Loading into a model that already has HyCAM works too.
    again = H.apply_hycam(build_backbone(family, VOCAB)).eval()
    H.load_adapter(again, tmp_path / "adapter")
    assert torch.equal(again(ids).logits, expected)


def test_ffn_site_round_trips_and_is_recorded(tmp_path):
    """An adapter of site="ffn" records its site; loading wraps the MLPs again, not the attention."""
    model = _trained_model(site="ffn")
    ids = torch.randint(0, VOCAB, (2, 6))
    expected = model(ids).logits
    directory = H.save_adapter(model, tmp_path / "adapter")
    assert json.loads((directory / "hycam_config.json").read_text())["site"] == "ffn"
    assert all(".mlp.hycam." in name for name in json.loads((directory / "manifest.json").read_text())["tensors"])
    fresh = build_backbone("tiny-llama", VOCAB).eval()
    H.load_adapter(fresh, directory)
    assert torch.equal(fresh(ids).logits, expected)
    assert not any(name.startswith("model.layers.0.self_attn.hycam") for name, _ in fresh.named_parameters())
    at_attention = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(site="attention"))
    with pytest.raises(H.AdapterError, match="site"):
        H.load_adapter(at_attention, directory)


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    model = _trained_model()
    H.save_adapter(model, tmp_path / "adapter")
    H.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_tampered_or_truncated_weights_are_refused(tmp_path):
    model = _trained_model()
    directory = H.save_adapter(model, tmp_path / "adapter")
    weights = directory / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(H.AdapterError, match="adapter.safetensors: checksum mismatch"):
        H.load_adapter(build_backbone("tiny-llama", VOCAB), directory)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(H.AdapterError, match="checksum mismatch"):
        H.load_adapter(build_backbone("tiny-llama", VOCAB), directory)


def test_mismatched_backbone_or_config_is_refused(tmp_path):
    directory = H.save_adapter(_trained_model(), tmp_path / "adapter")
    wider = build_backbone("tiny-llama", VOCAB, hidden_size=96)
    with pytest.raises(H.AdapterError, match="trained for backbone .*'hidden_size': 64"):
        H.load_adapter(wider, directory)
    with pytest.raises(H.AdapterError, match="trained for backbone .*'model_type': 'llama'"):
        H.load_adapter(build_backbone("tiny-qwen2", VOCAB), directory)
    other_rank = H.apply_hycam(build_backbone("tiny-llama", VOCAB), H.HyCAMConfig(rank=4))
    with pytest.raises(H.AdapterError, match="rank: model 4 vs adapter 8"):
        H.load_adapter(other_rank, directory)


def test_pickle_offered_as_adapter_is_never_executed(tmp_path):
    """A pickle that would run code when loaded: rejected without being unpickled."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    directory = H.save_adapter(_trained_model(), tmp_path / "adapter")
    (directory / "adapter.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(H.AdapterError):
        H.load_adapter(build_backbone("tiny-llama", VOCAB), directory)
    # Even with the checksum forged to match, safetensors parses bytes and never unpickles.
    manifest = json.loads((directory / "manifest.json").read_text())
    import hashlib

    manifest["sha256"]["adapter.safetensors"] = hashlib.sha256(
        (directory / "adapter.safetensors").read_bytes()
    ).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SafetensorError):  # the pickle's bytes are not a valid safetensors header
        H.load_adapter(build_backbone("tiny-llama", VOCAB), directory)
    assert not marker.exists()


def test_refuses_empty_or_partial_adapter(tmp_path):
    model = _trained_model()
    tensors = {n: p.detach() for n, p in H.hycam_named_parameters(model)}
    name = next(iter(tensors))
    with pytest.raises(H.AdapterError, match="empty adapter"):
        H.save_adapter(model, tmp_path / "a", tensors={**tensors, name: torch.empty(0)})
    partial = dict(tensors)
    partial.pop(name)
    with pytest.raises(H.AdapterError, match="partial adapter"):
        H.save_adapter(model, tmp_path / "a", tensors=partial)
    assert not (tmp_path / "a").exists()


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(H.AdapterError, match="not a HyCAM adapter"):
        H.load_adapter(build_backbone("tiny-llama", VOCAB), tmp_path)
