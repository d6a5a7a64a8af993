"""The comparison's report (launch/compare.py): one row per method with every task's perplexity,
BLEU-4 and ROUGE-L, the learning-rate sweep, greedy generations side by side, the loss curves."""

from __future__ import annotations

import json
from pathlib import Path


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["tasks"])
    head = (
        "| method | lr | "
        + " | ".join(f"{t} ppl / BLEU-4 / ROUGE-L" for t in tasks)
        + " | avg ppl | avg BLEU-4 | avg ROUGE-L | trainable | train time | general ppl (backbone -> after) |"
    )
    lines = [head, "|" + "---|" * (len(tasks) + 8)]
    for r in rows:
        cells = [
            f"{r['tasks'][t]['ppl']:.2f} / {r['tasks'][t].get('bleu4', float('nan')):.2f} / "
            f"{r['tasks'][t].get('rougeL', float('nan')):.2f}"
            for t in tasks
        ]
        avg, general = r["average"], r["general_text"]
        retention = f"{general['backbone_ppl']:.2f} -> {general['ppl']:.2f}" if general else "-"
        trainable = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)" if r["total"] else "0"
        lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
        wall = f"{r['train_seconds']:.0f} s" if r["total"] else "-"
        lines.append(
            f"| {r['method']} | {lr} | " + " | ".join(cells) + f" | {avg['ppl']:.2f} | {avg['bleu4']:.2f} | "
            f"{avg['rougeL']:.2f} | {trainable} | {wall} | {retention} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(rows: list[dict]) -> str:
    swept = [r for r in rows if r["sweep"]]
    if not swept:
        return ""
    lines = ["| method | learning rate | eval-split loss at the sweep step | chosen |", "|---|---|---|---|"]
    for r in swept:
        for c in r["sweep"]["candidates"]:
            lines.append(
                f"| {r['method']} | {c['lr']:g} | {c['eval_loss']:.4f} | {'yes' if c['lr'] == r['lr'] else ''} |"
            )
    return "\n".join(lines) + "\n"


def samples_markdown(sample_files: dict[str, Path], per_task: int = 2, width: int = 240) -> str:
    """A few greedy generations per task, every method's beside the reference, from each method's
    samples.json (same test examples: evaluate.py generates for the same examples in the same order
    for every model)."""
    by_method = {}
    for method, path in sample_files.items():
        if path.is_file():
            by_method[method] = {(s["task"], s["reference"]): s["hypothesis"] for s in json.loads(path.read_text())}
    if not by_method:
        return ""
    first = next(iter(by_method.values()))
    shown: dict[str, int] = {}
    lines = ["| task | " + " | ".join(["reference", *by_method]) + " |", "|---|" + "---|" * (len(by_method) + 1)]

    def cell(text: str) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text[:width] + " ..." if len(text) > width else text

    for task, reference in first:
        if shown.get(task, 0) >= per_task or not all((task, reference) in m for m in by_method.values()):
            continue
        shown[task] = shown.get(task, 0) + 1
        lines.append(
            f"| {task} | "
            + " | ".join([cell(reference), *(cell(m[(task, reference)]) for m in by_method.values())])
            + " |"
        )
    return "\n".join(lines) + "\n"


SMOOTH_STEPS = 10


def running_mean(values, window: int) -> list[float]:
    """Mean of each value and up to window - 1 before it (shorter windows at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            # Per-step losses vary more between batches than between methods: each method's raw
            # curve is drawn faint, its running mean over SMOOTH_STEPS steps in full colour.
            (raw,) = ax.plot(steps, losses, linewidth=0.6, alpha=0.3)
            ax.plot(
                steps,
                running_mean(losses, SMOOTH_STEPS),
                color=raw.get_color(),
                linewidth=1.6,
                label=f"{r['method']} (lr {r['lr']:g})",
            )
    ax.set_xlabel("step")
    ax.set_ylabel(f"train LM loss (response tokens; mean of {SMOOTH_STEPS} steps)")
    ax.set_title("training loss, same backbone, data and token budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
