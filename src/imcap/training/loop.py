"""`imcap train`: cross-entropy epochs, then optional self-critical (CIDEr-D) epochs, on cached features.

prepare(): records -> tokenizer + model of any `model.type` (imcap.training.build) -> cached features
for each epoch: train over all images x all their captions, validate (greedy, COCO metrics), write
                metrics.jsonl, steps.jsonl and learning_curve.png, checkpoint, keep the best on val CIDEr

Under torchrun every process runs this same loop on its share of each batch (imcap.training.distributed);
rank 0 validates and writes. With `time_budget_minutes` training stops when the budget is spent.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedModel, get_cosine_schedule_with_warmup

from imcap.data import load_records
from imcap.modeling import save_model
from imcap.tokenizer import format_caption
from imcap.training import distributed
from imcap.training.batches import CaptionTable
from imcap.training.build import Built, build
from imcap.training.config import TrainConfig
from imcap.training.distributed import Process
from imcap.training.fronts import FrozenFront, LiteFront
from imcap.training.plots import plot_learning_curve
from imcap.training.steps import (
    TeacherForcing,
    caption_mask,
    generate_from_tokens,
    sample_mask_after_eos,
    scst_loss,
    token_cross_entropy,
)

CHECKPOINT = "checkpoint.pt"
BUDGET_WARMUP = 0.05  # on a time budget the learning rate warms up over this share of it


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
    train_maps: torch.Tensor | None = None  # front.precompute(train_features) while the tail is frozen
    cider: object | None = None  # the SCST reward (imcap.metrics.CiderD), built on first use
    bleu: object | None = None  # its BLEU-4 term when scst.bleu4_weight > 0 (imcap.metrics.SentenceBleu4)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train as the config says; returns the folder of the best model (on val CIDEr)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    process = distributed.start()
    try:
        run = prepare(config, resume, process)
        fresh = {"stage": "xe", "epoch": 0, "best": -1.0, "steps": 0, "train_seconds": 0.0}
        state = _load_checkpoint(run) if resume else fresh
        total_xe, total_scst = config.optim.epochs, config.scst.epochs
        while state["stage"] == "xe" and state["epoch"] < total_xe and not run.clock.used_up:
            state = _train_epoch(run, state, xe=True)
        if state["stage"] == "xe":
            state = {**state, "stage": "scst", "epoch": 0, "optimizer": None, "scheduler": None}
        while state["stage"] == "scst" and state["epoch"] < total_scst and not run.clock.used_up:
            state = _train_epoch(run, state, xe=False)
    finally:
        distributed.stop(process)
    return run.out / "best"


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
    optimizer, scheduler = _optimizers(run, state, xe)
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
        steps = _scst_epoch(run, step_module, optimizer, generator, tail_trains, epoch, state["steps"])
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
        "scheduler": _state(scheduler),
    }
    if process.main:
        metrics = {"stage": "xe" if xe else "scst", "epoch": epoch, "train_loss": _mean_loss(steps)}
        metrics.update(validate(run))
        metrics["epoch_seconds"] = round(time.time() - started, 1)
        metrics["train_seconds"] = round(run.clock.spent, 1)
        _log_metrics(run, metrics, steps)
        if metrics["CIDEr"] > state["best"]:
            state["best"] = metrics["CIDEr"]
            save_model(model, run.tokenizer, run.image_processor, run.out / "best")
        _save_checkpoint(run, state)
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
        _step(model, optimizer, scheduler, loss, config.optim.grad_clip)
        step += 1
        run.clock.read(process)
        rows.append(_step_row(run, "xe", epoch, step, loss, optimizer, images=len(batch.image_index)))
        tokens_seen += n_tokens * process.world
        bar.set_postfix(
            loss=f"{_mean_loss(rows[-50:]):.3f}", tok_s=f"{tokens_seen / (time.time() - started):.0f}"
        )
        if run.clock.used_up:
            break
    return rows


def _scst_epoch(run: Run, step_module, optimizer, generator, tail_trains: bool, epoch: int, step: int):
    """Self-critical epoch: sample captions, reward them with CIDEr-D (plus scst.bleu4_weight x BLEU-4),
    raise the better ones."""
    config, model, tok, process = run.config.scst, run.model, run.tokenizer, run.process
    names = list(run.train_refs)
    model.eval()  # no dropout: the sampled policy and the trained policy must be the same
    rows, rewards_seen, started = [], [], time.time()
    order = torch.randperm(len(names), generator=generator).tolist()
    bar = tqdm(range(0, len(names), config.batch_images), desc=f"scst {epoch}", disable=not process.main)
    for start in bar:
        batch = order[start : start + config.batch_images]
        if len(batch) < process.world:
            continue
        index = torch.tensor(batch[process.rank :: process.world])
        features = (run.train_features if tail_trains else run.train_maps)[index].to(process.device)
        with torch.no_grad():
            tokens = run.front.tokens(features, from_trunk=tail_trains)
        samples = generate_from_tokens(
            model,
            tokens,
            do_sample=True,
            top_k=0,
            num_beams=1,
            num_return_sequences=config.samples,
            max_new_tokens=config.max_new_tokens,
        )
        samples = sample_mask_after_eos(samples, tok.eos_token_id, tok.pad_token_id)
        texts = [format_caption(t) for t in tok.batch_decode(samples, skip_special_tokens=True)]
        ids = [names[i] for i in index.tolist() for _ in range(config.samples)]
        rewards = torch.tensor(_rewards(run, texts, ids), dtype=torch.float32, device=process.device)
        mask = caption_mask(samples, tok.eos_token_id)
        logits = step_module(features, samples, mask, config.samples, tail_trains)
        per_sample = scst_loss(logits, samples, mask, rewards, config.samples)
        loss = distributed.global_mean(per_sample.sum(), per_sample.numel(), process)
        _step(model, optimizer, None, loss, run.config.optim.grad_clip)
        step += 1
        run.clock.read(process)
        rows.append(_step_row(run, "scst", epoch, step, loss, optimizer, images=len(batch)))
        rewards_seen.append(rewards.mean().item())
        rate = (start + len(batch)) / (time.time() - started)
        bar.set_postfix(reward=f"{np.mean(rewards_seen[-50:]):.3f}", img_s=f"{rate:.1f}")
        if run.clock.used_up:
            break
    return rows


def _rewards(run: Run, texts: list[str], image_ids: list[str]) -> np.ndarray:
    """Each sample's SCST reward: CIDEr-D with the training corpus's document frequencies, plus
    scst.bleu4_weight times its sentence BLEU-4. The scorers are built once and shared by every epoch."""
    from imcap.metrics import CiderD, SentenceBleu4  # training-only dependency

    if run.cider is None:
        run.cider = CiderD(run.train_refs)
    rewards = run.cider.scores(texts, image_ids)
    weight = run.config.scst.bleu4_weight
    if weight:
        if run.bleu is None:
            run.bleu = SentenceBleu4(run.train_refs)
        rewards = rewards + weight * run.bleu.scores(texts, image_ids)
    return rewards


def _step_row(
    run: Run, stage: str, epoch: int, step: int, loss: torch.Tensor, optimizer, images: int
) -> dict:
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


def _mean_loss(rows: list[dict]) -> float:
    return float(np.mean([r["loss"] for r in rows])) if rows else float("nan")


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


def _optimizers(run: Run, state: dict, xe: bool):
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
    scheduler = _schedule(run, optimizer) if xe else None
    if state.get("optimizer"):
        recipe_rates = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scheduler is None:  # SCST's rate is constant: the recipe's, even if changed since the checkpoint
            for group, rate in zip(optimizer.param_groups, recipe_rates, strict=True):
                group["lr"] = rate
    return optimizer, scheduler


def _schedule(run: Run, optimizer):
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


def _step(model, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _state(scheduler):
    return scheduler.state_dict() if scheduler is not None else None


def _log_metrics(run: Run, metrics: dict, steps: list[dict]) -> None:
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    with open(run.out / "steps.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in steps)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    tqdm.write(json.dumps(shown))
    plot_learning_curve(run.out / "metrics.jsonl", run.out / "learning_curve.png", run.out / "steps.jsonl")


def _save_checkpoint(run: Run, state: dict) -> None:
    payload = {**state, "model": run.model.state_dict(), "config": run.config.to_dict()}
    temporary = run.out / (CHECKPOINT + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(run.out / CHECKPOINT)  # a crash mid-save keeps the previous checkpoint


def _load_checkpoint(run: Run) -> dict:
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
            _truncate_log(run.out / log, payload["stage"], payload["epoch"])
    return payload


def _truncate_log(path: Path, stage: str, epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (they will be run again)."""
    if not path.exists():
        return
    order = {"xe": 0, "scst": 1}

    def done(row: dict) -> bool:
        return (order[row["stage"]], row["epoch"]) <= (order[stage], epoch)

    keep = [line for line in path.read_text().splitlines() if done(json.loads(line))]
    path.write_text("".join(line + "\n" for line in keep))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
