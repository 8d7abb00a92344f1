"""The optimiser and learning-rate schedule of each stage: AdamW with the CNN's tail at its own rate; a
cosine schedule over epochs or over a time budget (cross-entropy), a constant rate (SCST)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup

from imcap.training.run import Run

BUDGET_WARMUP = 0.05  # on a time budget the learning rate warms up over this share of it


def optimizers(run: Run, state: dict, xe: bool):
    config, model = run.config, run.model
    lr = config.optim.lr if xe else config.scst.lr
    cnn = run.front.cnn_parameters()
    cnn_ids = {id(p) for p in cnn}
    params = [p for p in model.parameters() if id(p) not in cnn_ids]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, norms
        {"params": cnn, "weight_decay": config.optim.weight_decay, "lr": lr * config.optim.tail_lr_scale},
    ]
    for group in groups:
        group.setdefault("lr", lr)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = schedule(run, optimizer) if xe else None
    if state.get("optimizer"):
        recipe_rates = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scheduler is None:  # SCST's rate is constant: the recipe's, even if changed since the checkpoint
            for group, rate in zip(optimizer.param_groups, recipe_rates, strict=True):
                group["lr"] = rate
    return optimizer, scheduler


def schedule(run: Run, optimizer):
    """Linear warmup, then cosine decay: over the epochs' steps (`optim.warmup_steps`, `optim.epochs`), or
    on the clock when a time budget is set: warmup over its first BUDGET_WARMUP, decay over the rest. So in
    a same-budget comparison every architecture runs its whole schedule, however fast its steps are."""
    config, clock = run.config, run.clock
    if clock.budget is None:
        per_epoch = math.ceil(len(run.table) / config.optim.batch_images)
        return get_cosine_schedule_with_warmup(
            optimizer, config.optim.warmup_steps, per_epoch * config.optim.epochs
        )

    def factor(step: int) -> float:
        progress = clock.progress()
        if progress < BUDGET_WARMUP:
            return progress / BUDGET_WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (progress - BUDGET_WARMUP) / (1.0 - BUDGET_WARMUP)))

    return LambdaLR(optimizer, factor)


def step(model, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def scheduler_state(scheduler):
    return scheduler.state_dict() if scheduler is not None else None
