"""Routing analysis: how a trained HyCAM model routes the tokens of any task, trained on or not.

For every task of the given data builds (any build made with the run's tokenizer, e.g. a user's own
alpaca file through the generic source), per routed layer: the mean routing vector, the mean
per-token routing entropy and the share of tokens each expert is the top choice for; the task's
perplexity with the adapter and with the untouched backbone. Between tasks: the Jensen-Shannon
distance of their mean routing vectors (base 2, so in [0, 1]; 0 = routed alike), per layer and
averaged over layers, and for each task the run did not train on, its nearest trained tasks.

Runs on every rank like the evaluation (ZeRO-3 partitions the model, rows are split across ranks,
the sums reduced): the numbers equal one process's. Routing is deterministic (the model's eval
routing; "sample" is replaced by the softmax weights).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..engine.distributed import rank_and_world
from ..engine.ds_config import zero_stage
from ..engine.lm_loss import perplexity, task_losses
from ..modeling.injection import disable_hycam, hycam_state, routed_layers
from .loading import ModelSpec, load_model
from .perplexity import ppl_batches
from .precision import dtype_name, placement
from .settings import EvalSettings

NEAREST = 3
"""Trained tasks listed for each unseen task, nearest first."""


class AnalysisError(ValueError):
    """A run or data build the analysis cannot use; the message names it."""


@dataclass
class TaskRouting:
    name: str
    """As the report shows it: the task's name, prefixed with its build's directory name when two
    builds hold tasks of the same name."""
    build: str
    seen: bool
    """Whether the run trained on a task of this name."""
    ppl: float
    backbone_ppl: float
    loss_tokens: int
    routed_tokens: int
    mean: np.ndarray
    """[layers, experts] mean routing vector."""
    top_share: np.ndarray
    """[layers, experts] share of the task's tokens whose top expert is k."""
    entropy: np.ndarray
    """[layers] mean per-token routing entropy, nats."""


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (the square root of the divergence, base-2 logarithms) of two
    distributions: 0 for equal ones, 1 for disjoint ones; a metric."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def distance_matrices(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """means [tasks, layers, experts] -> (per layer [layers, tasks, tasks], averaged [tasks, tasks])."""
    tasks, layers = means.shape[0], means.shape[1]
    per_layer = np.zeros((layers, tasks, tasks))
    for layer in range(layers):
        for i in range(tasks):
            for j in range(i + 1, tasks):
                per_layer[layer, i, j] = per_layer[layer, j, i] = js_distance(means[i, layer], means[j, layer])
    return per_layer, per_layer.mean(0)


def nearest_trained(averaged: np.ndarray, tasks: list[TaskRouting], k: int = NEAREST) -> dict[str, list[dict]]:
    """For each unseen task, the k trained tasks with the smallest averaged distance."""
    seen = [i for i, t in enumerate(tasks) if t.seen]
    out = {}
    for i, task in enumerate(tasks):
        if not task.seen:
            order = sorted(seen, key=lambda j: averaged[i, j])[:k]
            out[task.name] = [{"task": tasks[j].name, "distance": float(averaged[i, j])} for j in order]
    return out


def specialisation(per_layer: np.ndarray, tasks: list[TaskRouting]) -> Optional[float]:
    """How task-specific the routing is: the mean distance between two trained tasks' mean routing
    vectors, over pairs and layers (0: every task routed alike; None with fewer than 2)."""
    seen = [i for i, t in enumerate(tasks) if t.seen]
    pairs = [(i, j) for a, i in enumerate(seen) for j in seen[a + 1 :]]
    if not pairs:
        return None
    return float(np.mean([per_layer[:, i, j].mean() for i, j in pairs]))


def analyze(
    spec: ModelSpec,
    builds: list[Path],
    tokenizer,
    trained_tasks: list[str],
    settings: EvalSettings,
    ds_config: Optional[dict] = None,
    progress: Callable = lambda it, **kw: it,
) -> dict[str, Any]:
    """The analysis of `builds` (on every rank; collective). Returns {"tasks": [TaskRouting], ...}."""
    from data_pipeline import ShardReader, tokenizer_fingerprint

    rank, world = rank_and_world()
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    device, dtype = placement(settings.dtype, settings.device, zero3)
    model, keepalive = load_model(spec, dtype, ds_config, device=device)
    device = next(model.parameters()).device
    module = getattr(model, "module", model)
    if not routed_layers(module):
        raise AnalysisError(f"{spec.adapter or spec.kind()}: the model routes no tokens (method {spec.kind()})")
    config = hycam_state(module).config
    if config.eval_routing == "sample":
        config.eval_routing = "softmax"  # deterministic: the router's weights themselves
    model.eval()
    fingerprint = tokenizer_fingerprint(tokenizer)
    names_seen: set[str] = set()
    tasks: list[TaskRouting] = []
    for build in builds:
        try:
            reader = ShardReader(
                build,
                settings.split,
                rank,
                world,
                settings.batch_size,
                tokenizer_fingerprint=fingerprint,
                drop_last=False,
            )
        except (ValueError, OSError) as err:  # another tokenizer, no such split, a damaged build
            raise AnalysisError(f"--data {build}: {err}") from None
        batches = ppl_batches(list(reader), settings, world)
        run = (model, module, batches, len(reader.tasks), settings.batch_size, reader.seq_len, device, progress)
        sums, tally = task_losses(*run)
        with disable_hycam(module):
            backbone_sums, _ = task_losses(*run, with_routing=False)
        means, tops, entropies = tally.mean_routing(), tally.top_share(), tally.mean_entropy()
        for i, task in enumerate(reader.tasks):
            name = task if task not in names_seen else f"{Path(build).name}/{task}"
            names_seen.add(name)
            tasks.append(
                TaskRouting(
                    name=name,
                    build=str(build),
                    seen=task in trained_tasks,
                    ppl=perplexity(float(sums[i, 0]), float(sums[i, 1])),
                    backbone_ppl=perplexity(float(backbone_sums[i, 0]), float(backbone_sums[i, 1])),
                    loss_tokens=int(sums[i, 1]),
                    routed_tokens=int(tally.tokens[0, i]),
                    mean=means[:, i],
                    top_share=tops[:, i],
                    entropy=entropies[:, i],
                )
            )
    del keepalive
    empty = [t.name for t in tasks if t.routed_tokens == 0]
    if empty:
        raise AnalysisError(f"no tokens of task(s) {empty} in the {settings.split} split (a larger --max-rows?)")
    per_layer, averaged = distance_matrices(np.stack([t.mean for t in tasks]))
    return {
        "tasks": tasks,
        "distance_per_layer": per_layer,
        "distance": averaged,
        "nearest_trained": nearest_trained(averaged, tasks),
        "specialisation": specialisation(per_layer, tasks),
        "trained_tasks": list(trained_tasks),
        "split": settings.split,
        "world_size": world,
        "dtype": dtype_name(dtype),
        "eval_routing": config.eval_routing,
        "model": {"kind": spec.kind(), **vars(spec)},
    }


def report_json(result: dict[str, Any]) -> dict[str, Any]:
    tasks = result["tasks"]
    return {
        **{k: v for k, v in result.items() if k not in ("tasks", "distance_per_layer", "distance")},
        "tasks": {
            t.name: {
                "build": t.build,
                "seen": t.seen,
                "ppl": t.ppl,
                "backbone_ppl": t.backbone_ppl,
                "loss_tokens": t.loss_tokens,
                "routed_tokens": t.routed_tokens,
                "layers": [
                    {
                        "mean": t.mean[layer].tolist(),
                        "top_share": t.top_share[layer].tolist(),
                        "entropy": t.entropy[layer],
                    }
                    for layer in range(t.mean.shape[0])
                ],
            }
            for t in tasks
        },
        "task_order": [t.name for t in tasks],
        "distance": result["distance"].tolist(),
        "distance_per_layer": result["distance_per_layer"].tolist(),
    }


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    experts = tasks[0].mean.shape[1]
    lines = [
        f"# Routing analysis ({result['split']} split, {result['eval_routing']} routing, {result['dtype']})",
        "",
        "| task | trained on | perplexity | backbone perplexity | tokens | entropy (nats, mean over layers) | "
        + " | ".join(f"e{k}" for k in range(experts))
        + " |",
        "|---" * (6 + experts) + "|",
    ]
    for t in tasks:
        mean = t.mean.mean(0)
        lines.append(
            f"| {t.name} | {'yes' if t.seen else 'no'} | {t.ppl:.2f} | {t.backbone_ppl:.2f} | {t.routed_tokens} | "
            f"{t.entropy.mean():.3f} | " + " | ".join(f"{v:.3f}" for v in mean) + " |"
        )
    lines += [
        "",
        f"Maximum routing entropy with {experts} experts: {math.log(experts):.3f} nats. Columns e0..: the mean",
        "routing weight of each expert, averaged over layers.",
        "",
        "Jensen-Shannon distance between the tasks' mean routing vectors, averaged over layers (0 = routed alike):",
        "",
        "| | " + " | ".join(t.name for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for i, t in enumerate(tasks):
        lines.append(f"| {t.name} | " + " | ".join(f"{v:.3f}" for v in result["distance"][i]) + " |")
    if result["specialisation"] is not None:
        lines += ["", f"Specialisation (mean distance between two trained tasks): {result['specialisation']:.3f}"]
    for name, nearest in result["nearest_trained"].items():
        listed = ", ".join(f"{n['task']} ({n['distance']:.3f})" for n in nearest)
        lines += ["", f"Unseen task **{name}** routes most like: {listed}"]
    return "\n".join(lines) + "\n"


def distance_figure(result: dict[str, Any]):
    """The averaged distance matrix, then one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name + ("" if t.seen else " *") for t in result["tasks"]]
    panels = [("mean over layers", result["distance"])] + [
        (f"layer {i}", m) for i, m in enumerate(result["distance_per_layer"])
    ]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    size = 0.55 * len(names) + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, matrix) in zip(axes.flat, panels):
        im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma_r")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value > 0.5 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Jensen-Shannon distance of mean routing vectors (* = not trained on)", fontsize=10)
    fig.tight_layout()
    return fig


def write(result: dict[str, Any], out: Path) -> str:
    """report.json, report.md, routing_heatmap.png and routing_distance.png in `out`; returns the Markdown."""
    import matplotlib.pyplot as plt

    from ..engine.telemetry import heatmap_figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report_json(result), indent=2))
    text = markdown(result)
    (out / "report.md").write_text(text)
    tasks = result["tasks"]
    layers = {i: np.stack([t.mean[i] for t in tasks]) for i in range(tasks[0].mean.shape[0])}
    names = [t.name + ("" if t.seen else " *") for t in tasks]
    for name, fig in (
        ("routing_heatmap.png", heatmap_figure(layers, names, "mean routing weight per task and expert (* = unseen)")),
        ("routing_distance.png", distance_figure(result)),
    ):
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return text
