"""Rank-0 telemetry: TensorBoard scalars and images, metrics.jsonl, routing-collapse warnings.

One place for every metric name: the tags below are what TensorBoard and metrics.jsonl show.
    train/loss, train/lm_loss, train/balance_loss, train/lr, train/grad_norm, train/tokens_per_s, train/loss_tokens,
    train/skipped_steps, train/step_skipped, train/weights_checksum, train/task/<task>/loss, data/batch_fingerprint,
    routing/layer_<i>/expert_<k>, routing/layer_<i>/entropy, routing/layer_<i>/top_<k>,
    modulation/layer_<i>/shared, modulation/layer_<i>/specialized,
    eval/loss, eval/ppl, eval/<task>/loss, eval/<task>/ppl, eval/routing_heatmap (image)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..modeling.fileio import write_text_atomic
from .run_dir import RunDir

log = logging.getLogger(__name__)

# Metric names: the trainer writes them, compare.py, tests and dashboards read them.
TRAIN_LOSS = "train/loss"
LM_LOSS = "train/lm_loss"
BALANCE_LOSS = "train/balance_loss"
LR = "train/lr"
GRAD_NORM = "train/grad_norm"
TOKENS_PER_S = "train/tokens_per_s"
LOSS_TOKENS = "train/loss_tokens"
SKIPPED_STEPS = "train/skipped_steps"
STEP_SKIPPED = "train/step_skipped"
WEIGHTS_CHECKSUM = "train/weights_checksum"
BATCH_FINGERPRINT = "data/batch_fingerprint"
EVAL_LOSS = "eval/loss"
EVAL_PPL = "eval/ppl"
EVAL_TOKENS = "eval/tokens"


def task_train_loss(task: str) -> str:
    return f"train/task/{task}/loss"


def task_eval_loss(task: str) -> str:
    return f"eval/{task}/loss"


def task_eval_ppl(task: str) -> str:
    return f"eval/{task}/ppl"


def routing_scalars(stats: list[dict[str, Any]]) -> dict[str, float]:
    """hycam_ds.routing_stats(model) -> flat scalar tags."""
    out: dict[str, float] = {}
    for layer in stats:
        prefix = f"routing/layer_{layer['layer']}"
        for k, value in enumerate(layer["expert_prob"]):
            out[f"{prefix}/expert_{k}"] = value
        for k, value in enumerate(layer["top_fraction"]):
            out[f"{prefix}/top_{k}"] = value
        out[f"{prefix}/entropy"] = layer["entropy"]
        for kind in ("shared", "specialized"):
            value = layer.get(f"{kind}_magnitude")
            if value is not None:
                out[f"modulation/layer_{layer['layer']}/{kind}"] = value
    return out


class CollapseDetector:
    """Warns when, in some layer, one expert is the top choice of more than `threshold` of the
    tokens for `patience` consecutive observations; warns again only after recovery."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.streak: dict[int, int] = {}
        self.warned: set[int] = set()

    def observe(self, step: int, stats: list[dict[str, Any]]) -> list[str]:
        messages = []
        for layer in stats:
            index, top = layer["layer"], layer["top_fraction"]
            dominant = int(np.argmax(top)) if top else 0
            if top and top[dominant] > self.threshold:
                self.streak[index] = self.streak.get(index, 0) + 1
            else:
                self.streak[index] = 0
                self.warned.discard(index)
            if self.streak[index] >= self.patience and index not in self.warned:
                self.warned.add(index)
                messages.append(
                    f"routing collapse at step {step}: layer {index} sends {top[dominant]:.0%} of tokens to "
                    f"expert {dominant} for {self.streak[index]} consecutive logged steps "
                    "(raise hycam.balance_weight or hycam.tau)"
                )
        return messages


def heatmap_figure(matrices: dict[int, np.ndarray], tasks: list[str], title: str):
    """Task x expert mean routing weight, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(matrices)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.45 * len(tasks) * rows + 1.4), squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        matrix = matrices[layer]
        im = ax.imshow(matrix, vmin=0, vmax=max(1e-6, float(matrix.max())), cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(matrix.shape[1]), [f"e{k}" for k in range(matrix.shape[1])], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="w" if value < matrix.max() * 0.6 else "k",
            )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class Telemetry:
    """Writes only on rank 0 (other ranks get an inert instance)."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        collapse: CollapseDetector,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.collapse = collapse
        self.writer = None
        self.metrics_file = None
        if not enabled:
            return
        metrics_path = RunDir(run_dir).metrics
        if resume_step is not None and metrics_path.is_file():
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=purge)
        self.metrics_file = open(metrics_path, "a")

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {
            "step": step,
            "kind": kind,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()},
        }
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for tag, value in scalars.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def observe_routing(self, step: int, stats: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        for message in self.collapse.observe(step, stats):
            log.warning(message)
            self.log(step, {"routing/collapse_warning": 1.0}, kind="warning")

    def routing_heatmap(self, step: int, matrices: dict[int, np.ndarray], tasks: list[str]) -> Path | None:
        if not self.enabled or not matrices:
            return None
        import matplotlib.pyplot as plt

        fig = heatmap_figure(matrices, tasks, f"mean routing weight per task (step {step})")
        path = RunDir(self.run_dir).plots / f"routing_heatmap_step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        if self.writer is not None:
            self.writer.add_figure("eval/routing_heatmap", fig, step)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
