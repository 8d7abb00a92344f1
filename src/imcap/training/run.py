"""What a training run holds between epochs (`Run`), the clock a time budget counts, and the per-step
log row both stages write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from imcap.training import distributed
from imcap.training.batches import CaptionTable
from imcap.training.config import TrainConfig
from imcap.training.distributed import Process
from imcap.training.fronts import FrozenFront, LiteFront, TailOutput


class Clock:
    """Seconds spent in training steps over the whole run, resumes included: what a time budget counts.

    Feature extraction, validation and checkpoints are not counted. In data-parallel training every rank
    reads the largest clock, so all of them stop at the same step and use the same learning rate.
    """

    def __init__(self, budget_minutes: float | None, spent: float = 0.0):
        self.budget = budget_minutes * 60 if budget_minutes else None
        self.spent = spent
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.time()

    def read(self, process: Process) -> float:
        now = time.time()
        self.spent += now - self._since
        self._since = now
        if self.budget is not None:
            self.spent = distributed.all_max(self.spent, process)
        return self.spent

    def stop(self, process: Process) -> None:
        self.read(process)
        self._since = None

    @property
    def used_up(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    def progress(self) -> float:
        return min(1.0, self.spent / self.budget) if self.budget else 0.0


@dataclass
class Run:
    """Everything a training run holds in memory between epochs."""

    config: TrainConfig
    out: Path
    model: PreTrainedModel
    tokenizer: object
    image_processor: object
    front: LiteFront | FrozenFront
    table: CaptionTable
    train_features: torch.Tensor  # (2N, ...): N images, then their mirror images (flip augmentation)
    val_features: torch.Tensor
    val_ids: list[str]
    val_refs: dict[str, list[str]]
    train_refs: dict[str, list[str]]
    process: Process
    clock: Clock
    train_maps: TailOutput | torch.Tensor | None = None  # front.precompute(train_features): tail frozen
    cider: object | None = None  # the SCST reward (imcap.metrics.CiderD), built on first use
    bleu: object | None = None  # its BLEU-4 term when scst.bleu4_weight > 0 (imcap.metrics.SentenceBleu4)


def step_row(run: Run, stage: str, epoch: int, step: int, loss: torch.Tensor, optimizer, images: int) -> dict:
    """One line of steps.jsonl: the global batch's mean loss (the same number one process would log),
    the learning rate, the global batch's images and the training clock."""
    mean = float(distributed.all_sum(loss.detach(), run.process)) / run.process.world
    lr = optimizer.param_groups[0]["lr"]
    seconds = round(run.clock.spent, 2)
    return {
        "stage": stage,
        "epoch": epoch,
        "step": step,
        "loss": mean,
        "lr": lr,
        "images": images,
        "seconds": seconds,
    }


def mean_loss(rows: list[dict]) -> float:
    return float(np.mean([r["loss"] for r in rows])) if rows else float("nan")
