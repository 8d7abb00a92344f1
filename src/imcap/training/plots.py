"""Learning-curve PNG from a run's metrics.jsonl (per epoch) and steps.jsonl (per optimizer step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SMOOTHING_STEPS = 50  # the step-loss curve is a running mean over this many steps


def _rows(path: Path | None) -> list[dict]:
    if path is None or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_learning_curve(
    metrics_path: Path, png_path: Path, steps_path: Path | None = None, title: str = ""
) -> None:
    """Training loss per step (or per epoch without a step log) and val CIDEr / BLEU-4 / ROUGE-L per epoch;
    SCST epochs follow the cross-entropy ones."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs headless
    import matplotlib.pyplot as plt

    rows = _rows(metrics_path)
    if not rows:
        return
    x = list(range(1, len(rows) + 1))
    labels = [f"{r['stage']}{r['epoch']}" for r in rows]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    steps = _rows(steps_path)
    if steps:
        _plot_steps(loss_ax, steps)
    else:
        for stage, marker in (("xe", "o"), ("scst", "s")):
            points = [(i, r["train_loss"]) for i, r in zip(x, rows, strict=True) if r["stage"] == stage]
            if points:
                loss_ax.plot(*zip(*points, strict=True), marker=marker, label=f"train loss ({stage})")
        loss_ax.set_xticks(x, labels, rotation=45, fontsize=8)
        loss_ax.set_xlabel("stage / epoch")
    loss_ax.set_title("training loss")
    loss_ax.legend()
    for key in ("CIDEr", "BLEU-4", "ROUGE-L"):
        metric_ax.plot(x, [r.get(key, float("nan")) for r in rows], marker="o", label=f"val {key}")
    metric_ax.set_title("validation (greedy)")
    metric_ax.legend()
    metric_ax.set_xticks(x, labels, rotation=45, fontsize=8)
    metric_ax.set_xlabel("stage / epoch")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _plot_steps(ax, steps: list[dict]) -> None:
    """Raw step losses, faint, with their running mean; one colour per stage (their losses differ)."""
    for stage in ("xe", "scst"):
        points = [(r["step"], r["loss"]) for r in steps if r["stage"] == stage]
        if not points:
            continue
        step, loss = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        window = min(SMOOTHING_STEPS, len(loss))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        line = ax.plot(step, loss, alpha=0.25, linewidth=0.8)[0]
        ax.plot(step[window - 1 :], smooth, color=line.get_color(), label=f"train loss ({stage})")
    ax.set_xlabel("optimizer step")
