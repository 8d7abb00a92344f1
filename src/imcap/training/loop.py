"""`imcap train`: cross-entropy epochs, then optional self-critical (CIDEr-D) epochs, on cached features.

prepare(): records -> tokenizer + model of any `model.type` (imcap.training.build) -> cached features
for each epoch: train over all images x all their captions, validate (greedy, COCO metrics), write
                metrics.jsonl, steps.jsonl and learning_curve.png, checkpoint, keep the best on val CIDEr

Under torchrun every process runs this same loop on its share of each batch (imcap.training.distributed);
rank 0 validates and writes. With `time_budget_minutes` training stops when the budget is spent.

Beside it: run.py (the run's state and clock), optim.py (optimisers, schedules), scst.py (the
self-critical stage), checkpoints.py (resume, the fp16 export).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from imcap.data import load_records
from imcap.modeling import load_model, save_model
from imcap.tokenizer import format_caption
from imcap.training import distributed
from imcap.training.batches import CaptionTable
from imcap.training.build import Built, build
from imcap.training.checkpoints import load_checkpoint, save_checkpoint
from imcap.training.config import TrainConfig
from imcap.training.distributed import Process
from imcap.training.optim import optimizers, scheduler_state
from imcap.training.optim import step as optimizer_step
from imcap.training.plots import plot_learning_curve
from imcap.training.run import Clock, Run, mean_loss, step_row
from imcap.training.scst import scst_epoch
from imcap.training.steps import TeacherForcing, generate_from_tokens, token_cross_entropy

CROSS_ENTROPY_DIR = "xe"  # the model at the end of the cross-entropy stage
WISE_DIR = "wise"  # its mix with best/ (scst.wise_weight)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train as the config says; returns the folder of the best model (on val CIDEr), or of its mix with
    the cross-entropy stage's last weights (`scst.wise_weight`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    process = distributed.start()
    try:
        run = prepare(config, resume, process)
        fresh = {"stage": "xe", "epoch": 0, "best": -1.0, "steps": 0, "train_seconds": 0.0}
        state = load_checkpoint(run) if resume else fresh
        total_xe, total_scst = config.optim.epochs, config.scst.epochs
        while state["stage"] == "xe" and state["epoch"] < total_xe and not run.clock.used_up:
            state = _train_epoch(run, state, xe=True)
        if state["stage"] == "xe":
            if total_scst and process.main:  # where SCST starts from: WiSE-FT mixes it back in
                save_model(run.model, run.tokenizer, run.image_processor, run.out / CROSS_ENTROPY_DIR)
            state = {**state, "stage": "scst", "epoch": 0, "optimizer": None, "scheduler": None}
        while state["stage"] == "scst" and state["epoch"] < total_scst and not run.clock.used_up:
            state = _train_epoch(run, state, xe=False)
        finished = state["stage"] == "scst" and state["epoch"] == total_scst and total_scst > 0
        if finished and config.scst.wise_weight != 1.0 and process.main:
            return _mix_with_cross_entropy(run)
    finally:
        distributed.stop(process)
    return run.out / "best"


def _mix_with_cross_entropy(run: Run) -> Path:
    """WiSE-FT: the cross-entropy stage's last weights moved `scst.wise_weight` of the way to the best
    epoch's (`best/`, an SCST epoch once SCST beats cross-entropy on val), saved to `wise/` with its greedy
    val scores in `wise.json`. On Flickr8k val it kept CIDEr-D and raised BLEU-4 (docs/ablations.md)."""
    from imcap.training.averaging import average_checkpoints

    weight, start = run.config.scst.wise_weight, run.out / CROSS_ENTROPY_DIR
    if not (start / "config.json").is_file():
        raise FileNotFoundError(
            f"{start}: no cross-entropy model to mix with (kept since scst.wise_weight exists); "
            "set scst.wise_weight: 1.0 for runs from before"
        )
    best = run.out / "best"
    mixed = average_checkpoints(
        best, [best, start], run.out / WISE_DIR, fp16=False, weights=[weight, 1 - weight]
    )
    run.model.load_state_dict(load_model(mixed).model.state_dict())
    scores = {"wise_weight": weight, **validate(run)}
    (run.out / "wise.json").write_text(json.dumps(scores, indent=2) + "\n")
    tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}))
    return mixed


def prepare(config: TrainConfig, resume: bool, process: Process | None = None) -> Run:
    """Read data, build tokenizer and model, load or compute the cached image features."""
    process = process or Process()
    out = Path(config.output_dir)
    _seed_everything(config.seed)
    data = config.data
    train_records = load_records(data.path, data.train_split)[: data.train_limit]
    val_records = load_records(data.path, data.val_split)[: data.val_limit]
    out.mkdir(parents=True, exist_ok=True)  # only once the data is there: a failed start leaves nothing
    captions = [c for r in train_records for c in r.captions]
    tokenizer_dir = out / "tokenizer"
    reuse = resume or not process.main  # other ranks read the tokenizer rank 0 trained

    def model_and_tokenizer() -> Built:
        saved = AutoTokenizer.from_pretrained(tokenizer_dir) if reuse and tokenizer_dir.exists() else None
        built = build(config, captions, saved)
        if saved is None:
            built.tokenizer.save_pretrained(tokenizer_dir)
        return built

    built = distributed.main_first(process, model_and_tokenizer)

    def image_features() -> tuple[torch.Tensor, torch.Tensor]:
        cache = Path(config.cache_dir).expanduser()
        train_paths = [r.image.resolve() for r in train_records]
        val_paths = [r.image.resolve() for r in val_records]
        train = [
            built.front.cache(built.image_processor, train_paths, cache, flip=False, desc="train features")
        ]
        if config.optim.flip:
            train.append(
                built.front.cache(built.image_processor, train_paths, cache, flip=True, desc="mirrored")
            )
        val = built.front.cache(built.image_processor, val_paths, cache, flip=False, desc="val features")
        return torch.cat(train), val

    train_features, val_features = distributed.main_first(process, image_features)  # rank 0 fills the cache
    return Run(
        config=config,
        out=out,
        model=built.model.to(process.device),
        tokenizer=built.tokenizer,
        image_processor=built.image_processor,
        front=built.front,
        table=CaptionTable(built.tokenizer, [r.captions for r in train_records], data.max_tokens),
        train_features=train_features,
        val_features=val_features,
        val_ids=[r.image.name for r in val_records],
        val_refs={r.image.name: list(r.captions) for r in val_records},
        train_refs={r.image.name: list(r.captions) for r in train_records},
        process=process,
        clock=Clock(config.time_budget_minutes),
    )


def _train_epoch(run: Run, state: dict, xe: bool) -> dict:
    """One epoch of either stage, then (rank 0) validation, logging and a checkpoint."""
    config, model, process = run.config, run.model, run.process
    epoch = state["epoch"] + 1
    tail_trains = _tail_trains(config, epoch) if xe else config.scst.finetune_tail
    run.front.set_tail_trainable(tail_trains)
    optimizer, scheduler = optimizers(run, state, xe)
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + (0 if xe else 500))
    # dropout and sampling: same seed, same run (each rank its own stream)
    torch.manual_seed(config.seed * 1000 + epoch + 7919 * process.rank)
    if not tail_trains and run.train_maps is None:
        run.train_maps = run.front.precompute(run.train_features, process.device)
    step_module = distributed.wrap(TeacherForcing(model, run.front), process)
    started = time.time()
    run.clock.start()
    if xe:
        steps = _xe_epoch(
            run, step_module, optimizer, scheduler, generator, tail_trains, epoch, state["steps"]
        )
    else:
        steps = scst_epoch(run, step_module, optimizer, generator, tail_trains, epoch, state["steps"])
    run.clock.stop(process)
    del step_module  # its DDP reducer and gradient hooks go with it
    if tail_trains:
        run.train_maps = None  # the tail changed: recompute its output when next needed
    state = {
        **state,
        "epoch": epoch,
        "steps": state["steps"] + len(steps),
        "train_seconds": run.clock.spent,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state(scheduler),
    }
    if process.main:
        metrics = {"stage": "xe" if xe else "scst", "epoch": epoch, "train_loss": mean_loss(steps)}
        metrics.update(validate(run))
        metrics["epoch_seconds"] = round(time.time() - started, 1)
        metrics["train_seconds"] = round(run.clock.spent, 1)
        _log_metrics(run, metrics, steps)
        if metrics["CIDEr"] > state["best"]:
            state["best"] = metrics["CIDEr"]
            save_model(model, run.tokenizer, run.image_processor, run.out / "best")
        save_checkpoint(run, state)
    distributed.barrier(process)  # the others wait for validation and the checkpoint
    return state


def _xe_epoch(
    run: Run, step_module, optimizer, scheduler, generator, tail_trains: bool, epoch: int, step: int
):
    """Cross-entropy over every image once with all its captions; returns one log row per step."""
    config, model, process, device = run.config, run.model, run.process, run.process.device
    model.train()
    run.front.keep_statistics()
    features = run.train_features if tail_trains else run.train_maps
    rows, tokens_seen, started = [], 0, time.time()
    batches = run.table.batches(config.optim.batch_images, generator, flip=config.optim.flip)
    total = math.ceil(len(run.table) / config.optim.batch_images)
    bar = tqdm(batches, total=total, desc=f"xe {epoch}", disable=not process.main)
    for batch in bar:
        if len(batch.image_index) < process.world:
            continue  # every rank needs an image; all ranks skip the same (last, short) batch
        part = batch.shard(process.rank, process.world)
        ids, mask = part.input_ids.to(device), part.attention_mask.to(device)
        logits = step_module(
            features[part.image_index].to(device), ids, mask, part.captions_per_image, tail_trains
        )
        loss_sum, n_tokens = token_cross_entropy(logits, ids, mask, config.optim.label_smoothing)
        loss = distributed.global_mean(loss_sum, n_tokens, process)
        optimizer_step(model, optimizer, scheduler, loss, config.optim.grad_clip)
        step += 1
        run.clock.read(process)
        rows.append(step_row(run, "xe", epoch, step, loss, optimizer, images=len(batch.image_index)))
        tokens_seen += n_tokens * process.world
        bar.set_postfix(
            loss=f"{mean_loss(rows[-50:]):.3f}", tok_s=f"{tokens_seen / (time.time() - started):.0f}"
        )
        if run.clock.used_up:
            break
    return rows


def validate(run: Run, batch_images: int = 64) -> dict:
    """Greedy captions of the val images, scored with pycocoevalcap (METEOR left to `imcap eval`)."""
    from imcap.metrics import corpus_stats, score_captions

    model, tok, device = run.model, run.tokenizer, run.process.device
    model.eval()
    predictions = {}
    with torch.no_grad():
        val_maps = run.front.precompute(run.val_features, device)
        for start in range(0, len(run.val_ids), batch_images):
            tokens = run.front.tokens(val_maps[start : start + batch_images].to(device), from_trunk=False)
            out = generate_from_tokens(model, tokens, num_beams=1, do_sample=False, max_new_tokens=24)
            for name, text in zip(
                run.val_ids[start : start + batch_images],
                tok.batch_decode(out, skip_special_tokens=True),
                strict=True,
            ):
                predictions[name] = format_caption(text)
    scores = score_captions(predictions, run.val_refs, meteor=False)
    return {**{f"val_{k}": v for k, v in corpus_stats(predictions).items()}, **scores}


def _tail_trains(config: TrainConfig, epoch: int) -> bool:
    start = config.optim.finetune_tail_from_epoch
    return start is not None and epoch >= start


def _log_metrics(run: Run, metrics: dict, steps: list[dict]) -> None:
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    with open(run.out / "steps.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in steps)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    tqdm.write(json.dumps(shown))
    plot_learning_curve(run.out / "metrics.jsonl", run.out / "learning_curve.png", run.out / "steps.jsonl")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
