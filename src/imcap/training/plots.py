"""Learning-curve PNG from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_learning_curve(metrics_path: Path, png_path: Path) -> None:
    """Train loss and val CIDEr / BLEU-4 per epoch; SCST epochs follow the cross-entropy ones."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs headless
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    x = list(range(1, len(rows) + 1))
    labels = [f"{r['stage']}{r['epoch']}" for r in rows]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, marker in (("xe", "o"), ("scst", "s")):
        points = [(i, r["train_loss"]) for i, r in zip(x, rows, strict=True) if r["stage"] == stage]
        if points:
            loss_ax.plot(*zip(*points, strict=True), marker=marker, label=f"train loss ({stage})")
    loss_ax.set_title("training loss")
    loss_ax.legend()
    for key in ("CIDEr", "BLEU-4", "ROUGE-L"):
        metric_ax.plot(x, [r.get(key, float("nan")) for r in rows], marker="o", label=f"val {key}")
    metric_ax.set_title("validation (greedy)")
    metric_ax.legend()
    for ax in (loss_ax, metric_ax):
        ax.set_xticks(x, labels, rotation=45, fontsize=8)
        ax.set_xlabel("stage / epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
