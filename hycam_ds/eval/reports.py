"""Evaluation reports: report.json, a Markdown table and PNG figures (routing heatmaps, per-task bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

METRICS = (("ppl", "perplexity", "lower"), ("bleu4", "BLEU-4", "higher"), ("rougeL", "ROUGE-L", "higher"))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def averages(tasks: dict[str, dict]) -> dict[str, float]:
    out = {}
    for key, _, _ in METRICS:
        values = [t[key] for t in tasks.values() if t.get(key) is not None and math.isfinite(t[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def markdown_table(report: dict[str, Any]) -> str:
    dtype = f", {report['dtype']}" if "dtype" in report else ""  # reports written before it was recorded
    lines = [
        f"# Evaluation: {report['model']['kind']} ({report['split']} split{dtype})",
        "",
        "| task | perplexity | BLEU-4 | ROUGE-L | generations |",
        "|---|---|---|---|---|",
    ]
    for task, values in report["tasks"].items():
        lines.append(
            f"| {task} | {_fmt(values.get('ppl'))} | {_fmt(values.get('bleu4'))} | "
            f"{_fmt(values.get('rougeL'))} | {values.get('examples', 0)} |"
        )
    avg = report["average"]
    lines.append(f"| **average** | {_fmt(avg['ppl'])} | {_fmt(avg['bleu4'])} | {_fmt(avg['rougeL'])} | |")
    general = report.get("general_text")
    if general:
        lines += [
            "",
            f"General-text perplexity (knowledge retention): adapted {_fmt(general['ppl'])}, "
            f"untouched backbone {_fmt(general['backbone_ppl'])} ({general['tokens']} tokens of {general['source']})",
        ]
    return "\n".join(lines) + "\n"


def metric_bars(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, (key, label, better) in zip(axes, METRICS):
        values = [report["tasks"][t].get(key) or 0.0 for t in tasks]
        ax.bar(range(len(tasks)), values, color="#4c72b0")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{label} ({better} is better)", fontsize=9)
    fig.suptitle(f"{report['model']['kind']}: per-task metrics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path, routing: dict[int, np.ndarray] | None) -> None:
    from ..engine.telemetry import heatmap_figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "report.md").write_text(markdown_table(report))
    metric_bars(report, out / "task_metrics.png")
    if routing:
        import matplotlib.pyplot as plt

        fig = heatmap_figure(routing, list(report["tasks"]), "mean routing weight per task and expert")
        fig.savefig(out / "routing_heatmap.png", dpi=110)
        plt.close(fig)
