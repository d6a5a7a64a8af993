"""The paper's comparison at small scale: full, lora, cam, hycam and hycam without the balance loss,
on the same backbone, data and token budget; each trained with launch/train.py and evaluated with
launch/evaluate.py (held-out perplexity, BLEU-4, ROUGE-L per task, general-text perplexity).

    python launch/compare.py --backbone runs/backbones/small-en --data-root ../shared/data --out runs/compare
    python launch/compare.py --backbone-name tiny-llama --recipe data_pipeline/recipes/embedded.yaml --steps 4 --out /tmp/c   # smoke test

Writes OUT/comparison.md and .json (the table), OUT/loss_curves.png (all methods), and each
method's run directory and evaluation report under OUT/<method>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (train.py overrides). Learning rates: full fine-tuning moves every weight and needs a
# smaller one; the adapters share one.
METHODS: dict[str, list[str]] = {
    "full": ["method=full", "optim.lr=2e-4"],
    "lora": ["method=lora", "optim.lr=1e-3"],
    "cam": ["method=cam", "optim.lr=1e-3"],
    "hycam": ["method=hycam", "optim.lr=1e-3"],
    "hycam (no balance loss)": ["method=hycam", "optim.lr=1e-3", "hycam.balance_weight=0.0"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="a Hugging Face backbone directory (e.g. from launch/pretrain.py)")
    parser.add_argument("--backbone-name", help="or a backbone built in code (for smoke tests)")
    parser.add_argument("--recipe", default="data_pipeline/recipes/hycam5.yaml")
    parser.add_argument("--data-root", help="directory the recipe's paths are relative to (../shared/data)")
    parser.add_argument("--general-text", help="text for knowledge retention (default: DATA_ROOT/general if it exists)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-examples", type=int, default=24, help="generations per task")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--general-tokens", type=int, default=30_000)
    return parser.parse_args(argv)


def run(cmd: list[str], log_path: Path) -> float:
    """Run a step of the comparison, its output into a log file; returns wall seconds."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        sys.exit(f"compare.py: {' '.join(cmd[:3])} ... failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - started


def train_and_evaluate(name: str, overrides: list[str], args, out: Path, general: str | None) -> dict:
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir, eval_dir = out / slug / "run", out / slug / "eval"
    model = [f"model.path={Path(args.backbone).resolve()}"] if args.backbone else [f"model.name={args.backbone_name}"]
    data = [f"data.recipe={args.recipe}", f"data.cache_dir={out / 'data'}", f"data.seq_len={args.seq_len}"]
    if args.data_root:
        data.append(f"data.data_root={args.data_root}")
    train = [sys.executable, "launch/train.py", f"run_dir={run_dir}", *model, *data, *overrides, f"optim.max_steps={args.steps}",
             f"optim.warmup_steps={max(1, args.steps // 20)}", f"optim.micro_batch_size={args.micro_batch}", "logging.eval_every=0",
             f"checkpoint.save_every=0", "logging.progress=false"]
    timing = out / slug / "timing.json"
    report_path = eval_dir / "report.json"
    if timing.is_file() and report_path.is_file():  # finished in an earlier, interrupted comparison
        print(f"  reusing {out / slug}", flush=True)
        return _row(name, run_dir, eval_dir, json.loads(timing.read_text())["train_seconds"])
    wall = run(train, out / f"{slug}.train.log")
    evaluate = [sys.executable, "launch/evaluate.py", "--run-dir", str(run_dir), "--out", str(eval_dir), "--max-examples", str(args.max_examples),
                "--max-new-tokens", str(args.max_new_tokens), "--no-progress"]
    if general:
        evaluate += ["--general-text", general, "--general-tokens", str(args.general_tokens)]
    run(evaluate, out / f"{slug}.eval.log")
    timing.write_text(json.dumps({"train_seconds": wall}))
    return _row(name, run_dir, eval_dir, wall)


def _row(name: str, run_dir: Path, eval_dir: Path, wall: float) -> dict:
    report = json.loads((eval_dir / "report.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    curve = [(r["step"], r["train/lm_loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    return {"method": name, "tasks": report["tasks"], "average": report["average"], "general_text": report.get("general_text"),
            "trainable": info["trainable_parameters"], "total": info["total_parameters"], "train_seconds": wall, "loss_curve": curve}


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["tasks"])
    head = "| method | " + " | ".join(f"{t} ppl / BLEU-4 / ROUGE-L" for t in tasks) + " | avg ppl | avg BLEU-4 | avg ROUGE-L | trainable | train time | general ppl (backbone -> after) |"
    lines = [head, "|" + "---|" * (len(tasks) + 7)]
    for row in rows:
        cells = [f"{row['tasks'][t]['ppl']:.2f} / {row['tasks'][t].get('bleu4', float('nan')):.2f} / {row['tasks'][t].get('rougeL', float('nan')):.2f}" for t in tasks]
        avg = row["average"]
        general = row["general_text"]
        retention = f"{general['backbone_ppl']:.2f} -> {general['ppl']:.2f}" if general else "-"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {avg['ppl']:.2f} | {avg['bleu4']:.2f} | {avg['rougeL']:.2f} | "
                     f"{row['trainable']:,} ({100 * row['trainable'] / row['total']:.2f}%) | {row['train_seconds']:.0f} s | {retention} |")
    return "\n".join(lines) + "\n"


def loss_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        steps, losses = zip(*row["loss_curve"])
        ax.plot(steps, losses, label=row["method"], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss (response tokens)")
    ax.set_title("training loss, same backbone, data and token budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.backbone or args.backbone_name):
        sys.exit("compare.py: give --backbone or --backbone-name")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        sys.exit(f"compare.py: unknown method(s) {unknown}; choose from {list(METHODS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    general = args.general_text or (str(Path(args.data_root) / "general") if args.data_root and (Path(args.data_root) / "general").is_dir() else None)
    rows = []
    for name in args.methods.split(","):
        print(f"compare.py: {name} ...", flush=True)
        rows.append(train_and_evaluate(name, METHODS[name], args, out, general))
        print(f"  average ppl {rows[-1]['average']['ppl']:.2f}, BLEU-4 {rows[-1]['average']['bleu4']:.2f}, "
              f"ROUGE-L {rows[-1]['average']['rougeL']:.2f}, {rows[-1]['train_seconds']:.0f} s", flush=True)
    (out / "comparison.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    (out / "comparison.md").write_text(table(rows))
    loss_plot(rows, out / "loss_curves.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
