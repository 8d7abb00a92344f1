"""Checkpoints (resume after any epoch, the logs cut back to match) and the fp16 export that ships."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from imcap.modeling import save_model
from imcap.training.run import Run

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run: Run, state: dict) -> None:
    payload = {**state, "model": run.model.state_dict(), "config": run.config.to_dict()}
    temporary = run.out / (CHECKPOINT + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(run.out / CHECKPOINT)  # a crash mid-save keeps the previous checkpoint


def load_checkpoint(run: Run) -> dict:
    path = run.out / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {run.out}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    run.model.load_state_dict(payload.pop("model"))
    payload.pop("config", None)
    payload.setdefault("steps", 0)  # checkpoints written before step logs and time budgets
    payload.setdefault("train_seconds", 0.0)
    run.clock.spent = payload["train_seconds"]
    if run.process.main:
        for log in ("metrics.jsonl", "steps.jsonl"):
            truncate_log(run.out / log, payload["stage"], payload["epoch"])
    return payload


def truncate_log(path: Path, stage: str, epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (they will be run again)."""
    if not path.exists():
        return
    order = {"xe": 0, "scst": 1}

    def done(row: dict) -> bool:
        return (order[row["stage"]], row["epoch"]) <= (order[stage], epoch)

    keep = [line for line in path.read_text().splitlines() if done(json.loads(line))]
    path.write_text("".join(line + "\n" for line in keep))


# The decoding default an exported model carries in its generation_config.json (CaptionOptions leaves it
# to the model): never repeat a 3-gram, chosen on val (README, "Decoding"). Only exports get it: SCST
# samples and validation during training decode without it, as the model was trained.
EXPORT_NO_REPEAT_NGRAM_SIZE = 3


def export_fp16(model_dir: Path, destination: Path) -> None:
    """Copy a trained model folder as fp16 safetensors (half the size: how the default model ships)."""
    from imcap.modeling import load_model

    loaded = load_model(model_dir)
    if not loaded.model.generation_config.no_repeat_ngram_size:
        loaded.model.generation_config.no_repeat_ngram_size = EXPORT_NO_REPEAT_NGRAM_SIZE
    save_model(loaded.model, loaded.tokenizer, loaded.image_processor, destination, fp16=True)
