"""launch/pretrain.py run as a user runs it (a subprocess): a tiny backbone on a text dir the test writes.

The output must load like a hub backbone (AutoModelForCausalLM / AutoTokenizer, sdpa, generate),
training must lower the held-out perplexity, and metrics.json must hold the reported figures.
One run of ~20 s (imports, tokenizer, 25 steps) serves every check; a second one continues it (--init).
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "pretrain.py"
EMBEDDED = ROOT / "data_pipeline" / "recipes" / "embedded.yaml"

WORDS = (
    "the cat dog sat ran on a mat in house garden quickly slowly and but with big small red old "
    "man woman child saw found took gave little bird tree river"
).split()


def write_text(root: Path) -> Path:
    """A few thousand simple sentences over a small vocabulary: learnable in 25 steps."""
    rng = random.Random(0)
    text_dir = root / "text"
    (text_dir / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt"):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + " ." for _ in range(2500)
        ]
        (text_dir / name).write_text("\n".join(lines) + "\n")
    return text_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    out = root / "backbone"
    args = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--text-dir",
        str(write_text(root)),
        "--task-recipe",
        str(EMBEDDED),
        "--vocab-size",
        "500",
        "--hidden",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--intermediate",
        "64",
        "--seq-len",
        "64",
        "--batch",
        "8",
        "--lr",
        "5e-3",
        "--steps",
        "25",
        "--eval-every",
        "10",
        "--eval-blocks",
        "16",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result


def test_loads_like_a_hub_backbone_and_generates(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok) and not model.config.tie_word_embeddings
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    prompt = tok("The cat sat on", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(generated[0], skip_special_tokens=True), str)
    # The tokenizer was trained on the task text too: the Alpaca template words are single pieces.
    assert len(tok("### Response:", add_special_tokens=False)["input_ids"]) <= 4


def test_training_lowers_held_out_perplexity_and_reports_it(trained):
    out, result = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "params",
        "tokens_seen",
        "steps",
        "held_out_ppl_before",
        "held_out_ppl_after",
        "tokens_per_s",
        "train_minutes",
        "wall_minutes",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 25
    assert metrics["tokens_seen"] == 25 * 8 * 64
    assert metrics["held_out_ppl_after"] < 0.8 * metrics["held_out_ppl_before"]
    assert metrics["params"] == sum(
        p.numel() for p in __import__("safetensors.torch").torch.load_file(str(out / "model.safetensors")).values()
    )
    assert (out / "loss.png").stat().st_size > 0
    assert "tokens/s" in result.stdout


def test_save_is_atomic_and_leaves_nothing_behind(trained):
    out, _ = trained
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]
    assert leftovers == []  # no temporary save directory, no checkpoint directory


def test_init_continues_the_same_backbone_on_the_same_held_out_text(trained):
    out, _ = trained
    more = out.parent / "more"
    args = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(more),
        "--init",
        str(out),
        "--text-dir",
        str(out.parent / "text"),
        "--task-recipe",
        str(EMBEDDED),
        "--seq-len",
        "64",
        "--batch",
        "8",
        "--steps",
        "5",
        "--eval-blocks",
        "16",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (out, more))
    assert second["held_out_ppl_before"] == pytest.approx(first["held_out_ppl_after"], rel=1e-4)
    assert second["tokens_seen_total"] == first["tokens_seen"] + 5 * 8 * 64
    assert (more / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


def test_detokenize_undoes_gutenberg_word_splitting():
    sys.path.insert(0, str(ROOT / "launch"))
    from pretrain import detokenize

    assert detokenize("`` Emma 's father , he said , did n't come . ''") == "\"Emma's father, he said, didn't come.\""


def test_resume_restores_the_training_state_through_a_weights_only_load(tmp_path, monkeypatch):
    """The <out>.partial/state.pt written by save_checkpoint comes back whole (model, optimizer, loop state,
    block generator) under torch.load(weights_only=True): a planted pickle there cannot run code."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    pretrain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, pretrain)  # its dataclasses look their module up
    spec.loader.exec_module(pretrain)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    cfg = pretrain.PretrainConfig(out=str(tmp_path / "out"), steps=3, resume=True, eval_every=1000, batch=2)
    opt = pretrain.make_optimizer(cfg, model)
    model(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    opt.step()
    state = pretrain.FitState(step=3, tokens=48, seconds=1.5, losses=[(1, 4.0), (2, 3.5), (3, 3.0)], evals=[(0, 50.0)])
    gen = torch.Generator().manual_seed(7)
    partial = tmp_path / "out.partial"
    partial.mkdir()
    pretrain.save_checkpoint(partial / "state.pt", model, opt, state, gen)

    fresh = LlamaForCausalLM(model.config)
    blocks = torch.randint(0, 50, (4, 9))
    resumed = pretrain.fit(cfg, fresh, blocks, blocks[:2], partial)  # steps=3 reached: no training step runs
    assert resumed.step == 3 and resumed.tokens == 48 and [tuple(x) for x in resumed.losses[:3]] == state.losses
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))

    class Exploit:
        def __reduce__(self):
            return (print, ("exploit ran",))

    torch.save({"model": Exploit()}, partial / "state.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        pretrain.fit(cfg, LlamaForCausalLM(model.config), blocks, blocks[:2], partial)
