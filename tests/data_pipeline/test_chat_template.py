"""The chat template option: rendering, loss boundary, BOS/EOS, manifest, reader refusal, and the
prompts generation builds (launch/generate.py, hycam_ds.eval.generation) matching the shards'."""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_helpers import EMBEDDED_RECIPE, REPO, write_recipe

from data_pipeline import (
    BuildConfig,
    BuildError,
    ShardReader,
    block_causal_mask,
    build_dataset,
    iter_documents,
    load_manifest,
    load_tokenizer,
    prompt_format,
)
from data_pipeline.__main__ import main as data_pipeline_main
from data_pipeline.encode import encode_texts, template_tail_tokens
from data_pipeline.shards import manifest_digest

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYSTEM = "You answer briefly."

# (instruction, input, output): with and without input, digits, punctuation, code indentation
EXAMPLES = [(f"Add {a} and {b}.", "", f"{a} + {b} = {a + b}.") for a, b in ((3, 4), (12, 30), (7, 8), (100, 23))] + [
    ("Summarise the note.", "The patient reports a mild headache since Monday.", "A mild headache since Monday."),
    ("Write a Python function that doubles x.", "", "def double(x):\n    return 2 * x"),
    ("Name the capital.", "Country: France", "Paris."),
    ("Which colour is the sky?", "", "Blue, on a clear day."),
]


def chat_tokenizer(
    source: Path, out: Path, template: str = CHATML, eos: str = "<|im_end|>", named: bool = True
) -> Path:
    """A tokenizer trained here, made chat-capable: ChatML special tokens, a chat template, EOS.
    `named=False` adds them as special tokens no role lists (as Llama-3 adds `<|eot_id|>`)."""
    from tokenizers import AddedToken

    tok = load_tokenizer(source)
    if named:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    else:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.eos_token = eos
    tok.chat_template = template
    tok.save_pretrained(str(out))
    return out


def build(tmp: Path, name: str, tokenizer: Path, **recipe_extra) -> Path:
    rows = "".join(json.dumps({"instruction": i, "input": x, "output": o}) + "\n" for i, x, o in EXAMPLES)
    (tmp / "d.jsonl").write_text(rows)
    recipe = write_recipe(
        tmp / f"{name}.yaml", {"a": [{"type": "alpaca", "path": "d.jsonl"}]}, splits={"eval": 1.0}, **recipe_extra
    )
    return Path(
        build_dataset(
            BuildConfig(
                recipe=recipe, out=str(tmp / name), data_root=str(tmp), tokenizer=str(tokenizer), progress=False
            )
        )
    )


def documents(out: Path) -> list[tuple[list[int], int]]:
    return [(d["tokens"].tolist(), d["loss_start"]) for d in iter_documents(out, "eval")]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory, embedded_build) -> Path:
    return chat_tokenizer(embedded_build / "tokenizer", tmp_path_factory.mktemp("chatml") / "tok")


@pytest.fixture(scope="module")
def chat_build(tmp_path_factory, chatml) -> Path:
    return build(tmp_path_factory.mktemp("chat"), "out", chatml, template="chat")


def test_special_tokens_in_text_encode_as_their_single_ids(chatml):
    tok = load_tokenizer(chatml)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, _ = encode_texts(tok, ["<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"])
    assert ids.tolist().count(start) == 2 and ids.tolist().count(end) == 1 and ids[0] == start
    assert not any(
        "|" in piece for piece in tok.convert_ids_to_tokens([i for i in ids.tolist() if i not in (start, end)])
    )


def test_loss_covers_exactly_the_answer_and_its_end_of_turn(chat_build):
    tok = load_tokenizer(chat_build / "tokenizer")
    reader = ShardReader(chat_build, split="eval", micro_batch_size=64, drop_last=False, template="chat")
    answers = []
    for batch in reader:
        for b in range(len(batch["input_ids"])):
            for doc in range(1, int(batch["segment_ids"][b].max()) + 1):
                where = batch["segment_ids"][b] == doc
                learned = batch["labels"][b][where]
                answers.append(tok.decode(learned[learned != -100].tolist()))
    assert sorted(answers) == sorted(o + "<|im_end|>" for _, _, o in EXAMPLES)


def test_prompt_decodes_to_the_rendered_prompt_with_one_bos_and_one_end(chat_build):
    tok = load_tokenizer(chat_build / "tokenizer")
    fmt = prompt_format("chat", tok)
    prompts = {fmt.prompt(i, x) for i, x, _ in EXAMPLES}
    docs = documents(chat_build)
    assert len(docs) == len(EXAMPLES)
    for tokens, loss_start in docs:
        assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 1  # added once, not by the template
        assert tok.decode(tokens[1:loss_start]) in prompts
        assert tokens[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert tokens.count(tok.eos_token_id) == 2  # the user turn's end and the answer's: no EOS appended
    assert "You are" not in tok.decode(docs[0][0])  # no system prompt set, and this template adds none


def test_manifest_records_the_template(chat_build, embedded_build):
    m = load_manifest(chat_build)
    eot = load_tokenizer(chat_build / "tokenizer").convert_tokens_to_ids("<|im_end|>")
    assert m["template"] == {"name": "chat", "system_prompt": None, "end_of_turn_id": eot}
    assert m["recipe"]["template"] == "chat" and m["recipe"]["system_prompt"] is None
    assert load_manifest(embedded_build)["template"] == {"name": "alpaca"}


def test_system_prompt_is_rendered_when_set(tmp_path, chatml):
    out = build(tmp_path, "sys", chatml, template="chat", system_prompt=SYSTEM)
    tok = load_tokenizer(out / "tokenizer")
    for tokens, loss_start in documents(out):
        assert tok.decode(tokens[1:loss_start]).startswith(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        )
    assert load_manifest(out)["template"]["system_prompt"] == SYSTEM


def test_a_template_that_writes_bos_gets_no_second_one(tmp_path, embedded_build):
    tok_dir = chat_tokenizer(embedded_build / "tokenizer", tmp_path / "tok", template="{{ bos_token }}" + CHATML)
    out = build(tmp_path, "bos", tok_dir, template="chat")
    tok = load_tokenizer(tok_dir)
    assert prompt_format("chat", tok).renders_bos
    for tokens, _ in documents(out):
        assert tokens[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
        assert tokens.count(tok.bos_token_id) == 1
    assert load_manifest(out)["bos_id"] == tok.bos_token_id


def test_an_end_of_turn_other_than_eos_ends_the_answer_without_eos(tmp_path, embedded_build):
    """Llama-3 style: EOS stays </s>, the turn ends with its own token, which the manifest records."""
    tok_dir = chat_tokenizer(embedded_build / "tokenizer", tmp_path / "tok", eos="</s>", named=False)
    out = build(tmp_path, "eot", tok_dir, template="chat")
    tok = load_tokenizer(tok_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert load_manifest(out)["template"]["end_of_turn_id"] == eot != tok.eos_token_id
    for tokens, _ in documents(out):
        assert tokens[-1] == eot and tok.eos_token_id not in tokens


def test_a_cut_prompt_keeps_the_chat_tail(tmp_path, chatml):
    tok = load_tokenizer(chatml)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    tail = template_tail_tokens(prompt_format("chat", tok), encode)
    assert tok.decode(encode(prompt_format("chat", tok).prompt("Hi."))[-tail:]) == "<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "d.jsonl").write_text(
        json.dumps(
            {"instruction": "Read this.", "input": " ".join(f"p{i}" for i in range(300)), "output": "Done reading."}
        )
        + "\n"
    )
    recipe = write_recipe(
        tmp_path / "r.yaml", {"a": [{"type": "alpaca", "path": "d.jsonl"}]}, splits={"eval": 1.0}, template="chat"
    )
    out = Path(
        build_dataset(
            BuildConfig(
                recipe=recipe, out=str(tmp_path / "o"), data_root=str(tmp_path), tokenizer=str(chatml), progress=False
            )
        )
    )
    ((tokens, loss_start),) = documents(out)
    assert len(tokens) == 128 and load_manifest(out)["tasks"][0]["truncated"] == 1
    assert tok.decode(tokens[loss_start - tail : loss_start]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tokens[loss_start:]) == "Done reading.<|im_end|>"


def test_packed_chat_documents_stay_isolated(chat_build):
    """A packed row through a tiny Llama with the block mask gives every document its logits alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=load_manifest(chat_build)["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    batch = next(iter(ShardReader(chat_build, split="eval", micro_batch_size=1, drop_last=False)))
    seg = batch["segment_ids"][0]
    assert int(seg.max()) >= 2
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=block_causal_mask(batch["segment_ids"]),
        ).logits[0]
        for doc in range(1, int(seg.max()) + 1):
            where = (seg == doc).nonzero().squeeze(1)
            assert torch.equal(batch["position_ids"][0, where], torch.arange(len(where)))
            alone = model(input_ids=batch["input_ids"][0, where][None]).logits[0]
            torch.testing.assert_close(packed[where], alone, atol=1e-5, rtol=1e-4)


def test_alpaca_is_the_default_byte_for_byte(tmp_path, embedded_build):
    tok = embedded_build / "tokenizer"
    plain, explicit = (
        build(tmp_path, "plain", tok),
        build(tmp_path, "explicit", tok, template="alpaca", system_prompt=None),
    )
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert len(files) > 5 and files == sorted(p.relative_to(explicit) for p in explicit.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(plain / rel, explicit / rel, shallow=False), rel
    for tokens, _loss_start in documents(plain):  # alpaca still appends EOS
        assert tokens[-1] == load_tokenizer(tok).eos_token_id and tokens[-2] != tokens[-1]


def test_chat_without_a_chat_template_fails_before_any_work(tmp_path, embedded_build):
    with pytest.raises(BuildError, match="has no chat template; use template: alpaca"):
        build(tmp_path, "x", embedded_build / "tokenizer", template="chat")
    with pytest.raises(BuildError, match="has no chat template; use template: alpaca"):
        build_dataset(
            BuildConfig(
                recipe=EMBEDDED_RECIPE, out=str(tmp_path / "y"), train_tokenizer=True, template="chat", progress=False
            )
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert (
        data_pipeline_main(
            [
                "build",
                "--recipe",
                EMBEDDED_RECIPE,
                "--out",
                str(tmp_path / "z"),
                "--train-tokenizer",
                "--template",
                "chat",
                "--no-progress",
            ]
        )
        == 2
    )


def test_a_bad_template_value_names_the_recipe_and_key(tmp_path, chatml):
    with pytest.raises(BuildError, match=r"r\.yaml: template must be one of \['alpaca', 'chat'\], not 'chatml'"):
        build_dataset(
            BuildConfig(
                recipe=write_recipe(
                    tmp_path / "r.yaml",
                    {"a": [{"type": "embedded", "generator": "arithmetic", "count": 5}]},
                    template="chatml",
                ),
                out=str(tmp_path / "o"),
                tokenizer=str(chatml),
                progress=False,
            )
        )


def test_the_reader_refuses_a_template_mismatch(tmp_path, chat_build, embedded_build):
    ShardReader(chat_build, split="eval", template="chat")
    with pytest.raises(ValueError, match="template mismatch: the run expects 'alpaca' .* built with 'chat'"):
        ShardReader(chat_build, split="eval", template="alpaca")
    with pytest.raises(ValueError, match="template mismatch: the run expects 'chat' .* built with 'alpaca'"):
        ShardReader(embedded_build, split="eval", template="chat")
    # a manifest without the entry holds alpaca prompts
    old = tmp_path / "old"
    old.mkdir()
    for name in ("eval", "tokenizer"):
        (old / name).symlink_to(embedded_build / name)
    m = load_manifest(embedded_build)
    del m["template"]
    m["manifest_sha256"] = manifest_digest(m)
    (old / "manifest.json").write_text(json.dumps(m))
    ShardReader(old, split="eval", template="alpaca")
    with pytest.raises(ValueError, match="built with 'alpaca'"):
        ShardReader(old, split="eval", template="chat")


def _generate_module():
    sys.path.insert(0, str(REPO / "launch"))
    import generate

    return generate


def test_generate_formats_a_chat_run_as_its_shards(tmp_path, chatml, chat_build):
    generate = _generate_module()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"data_dir": str(chat_build), "tokenizer": str(chatml)}))
    tok = load_tokenizer(chatml)
    shard_prompts = {tuple(tokens[:loss_start]) for tokens, loss_start in documents(chat_build)}
    how = generate.prompting(generate.parse_args(["--run-dir", str(run)]), tok)
    standalone = generate.prompting(generate.parse_args(["--template", "chat"]), tok)
    assert how.fmt.name == "chat" and how.stop_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    for instruction, input, _ in EXAMPLES:
        ids = how.ids(tok, how.fmt.prompt(instruction, input))
        assert tuple(ids) in shard_prompts
        assert standalone.ids(tok, standalone.fmt.prompt(instruction, input)) == ids
    # SystemExit before launch/generate.py's one-line errors, UsageError (a ValueError) after
    with pytest.raises((SystemExit, ValueError), match="trained on chat prompts"):
        generate.prompting(generate.parse_args(["--run-dir", str(run), "--template", "alpaca"]), tok)


class _ScriptedModel:
    """Stands in for a model: every prompt gets `answer`, the end-of-turn token, then junk."""

    def __init__(self, continuation: list[int]):
        self.continuation = torch.tensor(continuation)
        self.eos_token_id = None

    def generate(self, input_ids, eos_token_id, **kwargs):
        self.eos_token_id = eos_token_id
        return torch.cat([input_ids, self.continuation.expand(len(input_ids), -1)], dim=1)


def test_evaluation_stops_at_the_end_of_turn_and_skips_it(chat_build):
    from hycam_ds.eval.generation import generate_texts, generation_examples
    from hycam_ds.eval.settings import EvalSettings

    tok = load_tokenizer(chat_build / "tokenizer")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    examples = generation_examples(chat_build, "eval", ["a"], None)
    assert examples and all(e["end_of_turn_id"] == eot for e in examples)
    junk = tok("never shown", add_special_tokens=False)["input_ids"]
    model = _ScriptedModel(tok("Paris.", add_special_tokens=False)["input_ids"] + [eot] + junk)
    results = generate_texts(model, tok, examples, EvalSettings(batch_size=4, max_new_tokens=8), "cpu", synced=False)
    assert eot in model.eos_token_id
    assert {h for _, h, _ in results} == {"Paris."}
    assert sorted(r for _, _, r in results) == sorted(o for _, _, o in EXAMPLES)


def test_smollm2_chat_build_of_the_embedded_tasks(tmp_path, smollm2_dir):
    backbone = smollm2_dir  # the real backbone, fetched once per machine (tests/conftest.py)
    out = tmp_path / "smol"
    assert (
        data_pipeline_main(
            [
                "build",
                "--recipe",
                EMBEDDED_RECIPE,
                "--out",
                str(out),
                "--tokenizer",
                str(backbone),
                "--template",
                "chat",
                "--no-progress",
            ]
        )
        == 0
    )
    m = load_manifest(out)
    tok = load_tokenizer(out / "tokenizer")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert m["template"] == {"name": "chat", "system_prompt": None, "end_of_turn_id": end} and end == tok.eos_token_id
    assert [t["name"] for t in m["tasks"]] == ["arithmetic", "code", "medical", "general", "retrieval"]
    first = next(iter_documents(out, "train"))
    tokens, loss_start = first["tokens"].tolist(), first["loss_start"]
    text = tok.decode(tokens)
    # the template writes <|im_start|> (SmolLM2's BOS) itself and its default system turn
    assert text.startswith("<|im_start|>system\n") and not text.startswith("<|im_start|><|im_start|>")
    assert "<|im_start|>user\n" in text and tok.decode(tokens[:loss_start]).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokens[-1] == end and tokens[-2] != end
    assert np.count_nonzero(np.asarray(tokens) == end) == 3  # system, user and assistant turns
