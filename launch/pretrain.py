"""Pretrain a small Llama-family backbone here, on general English text, for HyCAM experiments.

    python launch/pretrain.py --out runs/backbones/small-en --minutes 25
    python launch/pretrain.py --out /tmp/bb --text-dir my_texts/ --task-recipe data_pipeline/recipes/embedded.yaml \
        --hidden 32 --layers 2 --heads 2 --intermediate 64 --vocab-size 300 --steps 20

Steps: `build_tokenizer` (SentencePiece BPE on the general text plus the task corpus's text, so
the task prompts tokenise well too) -> `build_data` (the general text as one token stream, a
deterministic 1.5% held out) -> `build_model` (a LlamaForCausalLM from a config) -> `fit`
(single process, fp32, AdamW, cosine with warmup, random contiguous blocks) -> `save` (model +
tokenizer with `save_pretrained`, metrics.json, loss.png, written to a temporary sibling and
renamed into `--out`). The result loads with `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` like any hub backbone.

Defaults read ../shared/data (general/ for text, the hycam5 recipe for task text); without it
give `--text-dir` and the embedded recipe. `--resume` continues from the checkpoint that is
written into `<out>.partial/` every `--ckpt-minutes`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

# A backbone trained here never needs the hub: a wrong path must fail, not try a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any directory
from data_pipeline import (  # noqa: E402
    format_prompt,
    iter_examples,
    load_recipe,
    load_tokenizer,
    split_of,
    train_sentencepiece,
)
from data_pipeline.examples import RowReport  # noqa: E402
from data_pipeline.progress import progress as show_progress  # noqa: E402
from hycam_ds.engine.cli import Parser, UsageError, run_main  # noqa: E402
from hycam_ds.modeling.fileio import atomic_directory, check_replaceable, write_bytes_atomic  # noqa: E402

SHARED = (ROOT / ".." / "shared" / "data").resolve()
HELD_OUT_FRACTION = 0.015
# Held-out text is chosen by chunks of lines, not single lines: a held-out sentence whose
# neighbours were trained on would measure memorisation of the passage, not English.
HOLDOUT_CHUNK_LINES = 100


@dataclasses.dataclass
class PretrainConfig:
    """Everything one pretraining run needs; the CLI mirrors it field by field."""

    out: str
    """Output directory (model + tokenizer + metrics.json + loss.png); replaced atomically."""
    text_dirs: list = dataclasses.field(default_factory=list)
    """Directories of .txt files (searched recursively); empty means ../shared/data/general."""
    task_recipe: Optional[str] = None
    """Recipe whose examples' text also trains the tokenizer; None: hycam5 with ../shared, else embedded."""
    data_root: Optional[str] = None
    """Root the recipe's paths are relative to; None: ../shared/data for hycam5."""
    vocab_size: int = 8000
    """SentencePiece BPE vocabulary size."""
    # The defaults (~9M parameters) are sized for 25 minutes on 2 shared CPU cores (~1-2M tokens):
    # with so few tokens a smaller, faster model reaches a lower perplexity than a 20M one.
    hidden: int = 256
    layers: int = 6
    heads: int = 4
    intermediate: int = 768
    seq_len: int = 256
    """Tokens per training block (and the model's trained context)."""
    batch: int = 8
    """Blocks per optimizer step (small: with ~1M tokens in all, more steps beat bigger batches)."""
    lr: float = 1.5e-3
    """Peak learning rate; cosine decay to `min_lr_ratio * lr`."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    """Linear warmup; capped at a tenth of --steps for very short runs."""
    weight_decay: float = 0.1
    """On matrices only: decaying norms' gains or embeddings hurts small models."""
    minutes: Optional[float] = None
    """Wall-time budget of the training loop; the LR schedule follows the elapsed fraction."""
    steps: Optional[int] = None
    """Step budget; with --minutes too, whichever ends first."""
    eval_every: int = 100
    """Held-out perplexity every this many steps (and at start and end)."""
    eval_blocks: int = 64
    """Held-out blocks per evaluation (at most); fixed blocks, so figures are comparable."""
    ckpt_minutes: float = 5.0
    """Resumable checkpoint into <out>.partial/ this often; 0 disables."""
    init: Optional[str] = None
    """Continue pretraining a backbone this script saved (its weights and tokenizer; the size flags
    are then ignored). The held-out split is deterministic, so its perplexities stay comparable."""
    resume: bool = False
    """Continue from <out>.partial/ (tokenizer and training state)."""
    seed: int = 0
    threads: int = 2
    """torch intra-op threads: the machine's 2 cores."""
    max_tokenizer_sentences: int = 400_000
    """Texts sampled by the SentencePiece trainer (general lines and task prompts/responses)."""

    def resolved(self) -> "PretrainConfig":
        """Defaults that depend on what exists on disk, made explicit (and saved with the run)."""
        cfg = dataclasses.replace(self)
        if not cfg.text_dirs:
            if not (SHARED / "general").is_dir():
                raise UsageError(f"{SHARED / 'general'} not found; give --text-dir DIR")
            cfg.text_dirs = [str(SHARED / "general")]
        if cfg.task_recipe is None:
            shared = (SHARED / "tasks").is_dir()
            cfg.task_recipe = str(ROOT / "data_pipeline" / "recipes" / ("hycam5.yaml" if shared else "embedded.yaml"))
            cfg.data_root = cfg.data_root or (str(SHARED) if shared else None)
        if cfg.minutes is None and cfg.steps is None:
            raise UsageError("give --minutes and/or --steps")
        return cfg


def parse_args(argv: list[str]) -> PretrainConfig:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-dir", dest="text_dirs", action="append", default=[], help="repeatable")
    parser.add_argument("--resume", action="store_true")
    for name, field in fields.items():
        if name in ("out", "text_dirs", "resume"):
            continue
        kind = {"int": int, "float": float, "Optional[float]": float, "Optional[int]": int}.get(str(field.type), str)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default)
    return PretrainConfig(**vars(parser.parse_args(argv))).resolved()


# ----------------------------------------------------------------------------- text


def detokenize(line: str) -> str:
    """Undo the NLTK-style word splitting of the Gutenberg files (`word , word 's`).

    The tasks are ordinary prose; a backbone that learned `Emma 's` and `end .` would see
    the task text as a different language.
    """
    line = re.sub(r"`` ?", '"', line)
    line = re.sub(r" ?''", '"', line)
    line = line.replace(" -- ", " - ").replace("ca n't", "can't")
    line = re.sub(r" ([,.;:!?)\]}%])", r"\1", line)
    line = re.sub(r"([(\[{$]) ", r"\1", line)
    line = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", line)
    return line.strip()


def general_text(text_dirs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: each a run of sentences joined by spaces, split by line chunks."""
    files = sorted(p for d in text_dirs for p in Path(d).rglob("*.txt"))
    if not files:
        raise UsageError(f"no .txt files under {text_dirs}")
    train, held = [], []
    for path in files:
        lines = [detokenize(x) for x in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        lines = [x for x in lines if x]
        for start in range(0, len(lines), HOLDOUT_CHUNK_LINES):
            key = f"{path.name}:{start}".encode()
            u = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2.0**64
            (held if u < HELD_OUT_FRACTION else train).append(" ".join(lines[start : start + HOLDOUT_CHUNK_LINES]))
    if not held:  # a tiny corpus: still measure on something never trained on
        held.append(train.pop())
    return train, held


def task_texts(recipe_path: str, data_root: Optional[str]) -> Iterator[str]:
    """Prompts and responses of the recipe's train split, read with the project's data pipeline."""
    recipe = load_recipe(recipe_path)
    if data_root is not None:
        recipe.data_root = str(Path(data_root).resolve())
    elif recipe.data_root is None:
        recipe.data_root = str(Path.cwd())
    report = RowReport(recipe.task_names)
    for ex in iter_examples(recipe, report):
        if split_of(ex, recipe.splits) == "train":
            yield format_prompt(ex.instruction, ex.input)
            yield ex.output


# ----------------------------------------------------------------------------- steps


def build_tokenizer(cfg: PretrainConfig, train_docs: list[str], partial: Path):
    """Train (or, on resume, reload) the tokenizer in <out>.partial/tokenizer."""
    if cfg.init:
        return load_tokenizer(cfg.init)
    target = partial / "tokenizer"
    if not (cfg.resume and (target / "tokenizer.json").is_file()):
        # Sentences, not whole documents: SentencePiece samples and caps the length of its inputs.
        sentences = (s for doc in train_docs for s in re.split(r"(?<=[.!?]) ", doc))
        texts = _chain(sentences, task_texts(cfg.task_recipe, cfg.data_root))
        t0 = time.time()
        train_sentencepiece(texts, target, cfg.vocab_size, "bpe", cfg.max_tokenizer_sentences)
        print(f"tokenizer: {cfg.vocab_size} BPE pieces trained in {time.time() - t0:.0f}s", flush=True)
    return load_tokenizer(target)


def _chain(*iterables):
    for it in iterables:
        yield from it


def build_data(tok, train_docs: list[str], held_docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token stream per split: BOS doc EOS BOS doc EOS ... (int32; the vocab may exceed uint16)."""

    def encode(docs):
        ids = []
        for i in range(0, len(docs), 256):
            for row in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"]:
                ids.append(tok.bos_token_id)
                ids.extend(row)
                ids.append(tok.eos_token_id)
        return torch.tensor(ids, dtype=torch.int32)

    t0 = time.time()
    train, held = encode(train_docs), encode(held_docs)
    print(f"data: {len(train):,} train tokens, {len(held):,} held-out tokens ({time.time() - t0:.0f}s)", flush=True)
    return train, held


def build_model(cfg: PretrainConfig, tok):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.init:
        return AutoModelForCausalLM.from_pretrained(cfg.init, attn_implementation="sdpa", dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def eval_blocks(held: torch.Tensor, seq_len: int, limit: int) -> torch.Tensor:
    """Fixed, non-overlapping held-out blocks (seq_len + 1 tokens each: inputs and shifted targets)."""
    n = max(1, min(limit, (len(held) - 1) // seq_len))
    if len(held) < seq_len + 1:
        raise UsageError(f"held-out text has {len(held)} tokens, fewer than --seq-len + 1")
    return torch.stack([held[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).long()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch: int) -> float:
    """Held-out perplexity: exp of the mean next-token loss over all held-out tokens."""
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        b = blocks[i : i + batch]
        logits = model(input_ids=b[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return math.exp(total / blocks[:, 1:].numel())


def lr_at(cfg: PretrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine over the run's progress (the larger of the step and time fractions)."""
    warmup = min(cfg.warmup_steps, max(1, (cfg.steps or 10**9) // 10))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(cfg: PretrainConfig, model) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2 and not _is_embedding(model, p)]
    keep = [p for p in model.parameters() if not any(p is q for q in decay)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def _is_embedding(model, p) -> bool:
    return p is model.get_input_embeddings().weight


@dataclasses.dataclass
class FitState:
    """What the loop carries and a checkpoint restores."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    """Training-loop wall time so far (across resumes); evaluation included."""
    losses: list = dataclasses.field(default_factory=list)
    """(step, train loss) every step."""
    evals: list = dataclasses.field(default_factory=list)
    """(step, held-out perplexity)."""


def fit(cfg: PretrainConfig, model, train: torch.Tensor, held_blocks: torch.Tensor, partial: Path) -> FitState:
    """The training loop: random contiguous blocks, fixed-time or fixed-step budget, periodic eval."""
    opt = make_optimizer(cfg, model)
    # A continued backbone must draw new blocks, not replay the ones its first run drew.
    state, gen = FitState(), torch.Generator().manual_seed(cfg.seed + _init_tokens(cfg))
    ckpt = partial / "state.pt"
    if cfg.resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)  # tensors, numbers and lists only: nothing to execute
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state, _ = FitState(**saved["state"]), gen.set_state(saved["generator"])
        print(f"resumed at step {state.step} ({state.seconds / 60:.1f} min done)", flush=True)
    else:
        state.evals.append((0, evaluate(model, held_blocks, cfg.batch)))
        print(f"held-out perplexity at init: {state.evals[0][1]:.1f}", flush=True)
    budget_s = cfg.minutes * 60 if cfg.minutes is not None else math.inf
    bar = show_progress(total=cfg.steps, initial=state.step, desc="pretrain", unit="step", mininterval=2.0)
    start, last_ckpt = time.time() - state.seconds, time.time()
    model.train()
    while True:
        progress = max(state.step / cfg.steps if cfg.steps else 0.0, state.seconds / budget_s)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, state.step, progress)
        starts = torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        block = torch.stack([train[s : s + cfg.seq_len + 1] for s in starts.tolist()]).long()
        logits = model(input_ids=block[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state.step += 1
        state.tokens += block[:, :-1].numel()
        state.seconds = time.time() - start
        state.losses.append((state.step, loss.item()))
        bar.update()
        bar.set_postfix(
            loss=f"{loss.item():.3f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}", refresh=False
        )
        if state.step % cfg.eval_every == 0:
            state.evals.append((state.step, evaluate(model, held_blocks, cfg.batch)))
            bar.write(f"step {state.step}: held-out ppl {state.evals[-1][1]:.1f}, {state.seconds / 60:.1f} min")
        if cfg.ckpt_minutes and time.time() - last_ckpt > cfg.ckpt_minutes * 60:
            save_checkpoint(ckpt, model, opt, state, gen)
            last_ckpt = time.time()
    bar.close()
    if not state.evals or state.evals[-1][0] != state.step:
        state.evals.append((state.step, evaluate(model, held_blocks, cfg.batch)))
    return state


def save_checkpoint(path: Path, model, opt, state: FitState, gen: torch.Generator) -> None:
    """Write then rename: a kill during the write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": dataclasses.asdict(state),
            "generator": gen.get_state(),
        },
        buffer,
    )
    write_bytes_atomic(path, buffer.getvalue())


def save(cfg: PretrainConfig, model, tok, state: FitState, n_train: int, n_held: int, wall_start: float) -> dict:
    """Model, tokenizer, metrics.json and loss.png into a temporary sibling, then renamed to --out."""
    out = Path(cfg.out).resolve()
    with atomic_directory(out, is_pretrained_output, "a backbone written by pretrain.py") as tmp:
        return _write_backbone(tmp, cfg, model, tok, state, n_train, n_held, wall_start)


def is_pretrained_output(directory: Path) -> bool:
    """A directory this script wrote before: a model, its tokenizer and metrics.json."""
    return all((directory / name).is_file() for name in ("config.json", "metrics.json", "model.safetensors"))


def _write_backbone(
    tmp: Path, cfg: PretrainConfig, model, tok, state: FitState, n_train: int, n_held: int, wall_start: float
) -> dict:
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    metrics = {
        "params": sum(p.numel() for p in model.parameters()),
        "params_non_embedding": sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n),
        "steps": state.step,
        "tokens_seen": state.tokens,
        "tokens_seen_total": state.tokens + _init_tokens(cfg),
        "train_tokens": n_train,
        "held_out_tokens": n_held,
        "epochs": state.tokens / max(n_train, 1),
        "held_out_ppl_before": state.evals[0][1],
        "held_out_ppl_after": state.evals[-1][1],
        "held_out_ppl_curve": state.evals,
        "final_train_loss": sum(x for _, x in state.losses[-50:]) / max(1, len(state.losses[-50:])),
        "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
        "train_minutes": state.seconds / 60,
        "wall_minutes": (time.time() - wall_start) / 60,  # tokenizer and data included
        "config": dataclasses.asdict(cfg),
        "torch_threads": torch.get_num_threads(),
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_loss(state, tmp / "loss.png")
    return metrics


def _init_tokens(cfg: PretrainConfig) -> int:
    """Tokens the --init backbone had already seen (from its metrics.json), for the running total."""
    path = Path(cfg.init or "/nonexistent") / "metrics.json"
    if not path.is_file():
        return 0
    metrics = json.loads(path.read_text())
    return metrics.get("tokens_seen_total", metrics.get("tokens_seen", 0))


def plot_loss(state: FitState, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if state.losses:
        steps, losses = zip(*state.losses)
        window = max(1, len(losses) // 100)  # a running mean: single batches are noisy
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, losses, alpha=0.25, label="train loss")
        ax.plot(steps, smooth, label=f"train loss (mean of {window})")
    es, ppl = zip(*state.evals)
    ax.plot(es, [math.log(p) for p in ppl], "o-", label="held-out loss (log ppl)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return run_main("pretrain.py", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).resolve()
    check_replaceable(out, is_pretrained_output, "a backbone written by pretrain.py")  # before hours of training
    partial = out.parent / f"{out.name}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_docs, held_docs = general_text(cfg.text_dirs)
    tok = build_tokenizer(cfg, train_docs, partial)
    train, held = build_data(tok, train_docs, held_docs)
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: llama, {n_params / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)
    state = fit(cfg, model, train, eval_blocks(held, cfg.seq_len, cfg.eval_blocks), partial)
    metrics = save(cfg, model, tok, state, len(train), len(held), t0)
    shutil.rmtree(partial, ignore_errors=True)
    print(
        f"saved {out}: {state.step} steps, {state.tokens:,} tokens, {metrics['tokens_per_s']:.0f} tokens/s, "
        f"held-out ppl {metrics['held_out_ppl_before']:.1f} -> {metrics['held_out_ppl_after']:.1f}, "
        f"{metrics['train_minutes']:.1f} min training, {(time.time() - t0) / 60:.1f} min total",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
