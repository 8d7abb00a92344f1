"""`imcap train`: cross-entropy epochs, then optional self-critical (CIDEr-D) epochs, on cached features.

prepare(): records -> tokenizer -> model -> trunk features (cached on disk)
for each epoch: train over all images x all their captions, validate (greedy, COCO metrics),
                write metrics.jsonl + learning_curve.png, checkpoint, keep the best on val CIDEr
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
from tqdm import tqdm
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

from imcap.data import load_records
from imcap.encoder import EfficientNetLiteEncoderConfig
from imcap.features import cached_trunk_features
from imcap.modeling import DecoderSpec, image_processor_for, new_model, save_model
from imcap.tokenizer import format_caption, train_tokenizer
from imcap.training.batches import CaptionTable
from imcap.training.config import TrainConfig
from imcap.training.plots import plot_learning_curve
from imcap.training.steps import (
    cross_entropy_loss,
    generate_from_tokens,
    sample_mask_after_eos,
    scst_loss,
    visual_tokens,
)

CHECKPOINT = "checkpoint.pt"


@dataclass
class Run:
    """Everything a training run holds in memory between epochs."""

    config: TrainConfig
    out: Path
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    table: CaptionTable
    train_trunk: torch.Tensor  # (2N, C, G, G): N images, then their mirror images
    val_trunk: torch.Tensor
    val_ids: list[str]
    val_refs: dict[str, list[str]]
    train_refs: dict[str, list[str]]
    train_maps: torch.Tensor | None = None  # tail output of train_trunk while the tail is frozen
    cider: object | None = None  # the SCST reward (imcap.metrics.CiderD), built on first use


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train as the config says; returns the folder of the best model (on val CIDEr)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    run = prepare(config, resume)
    state = _load_checkpoint(run) if resume else {"stage": "xe", "epoch": 0, "best": -1.0}
    total_xe, total_scst = config.optim.epochs, config.scst.epochs
    while state["stage"] == "xe" and state["epoch"] < total_xe:
        state = _train_epoch(run, state, xe=True)
    if state["stage"] == "xe":
        state = {**state, "stage": "scst", "epoch": 0, "optimizer": None, "scheduler": None}
    while state["stage"] == "scst" and state["epoch"] < total_scst:
        state = _train_epoch(run, state, xe=False)
    return run.out / "best"


def prepare(config: TrainConfig, resume: bool) -> Run:
    """Read data, build tokenizer and model, load or compute the cached trunk features."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(config.seed)
    data = config.data
    train_records = load_records(data.path, data.train_split)[: data.train_limit]
    val_records = load_records(data.path, data.val_split)[: data.val_limit]
    tokenizer_dir = out / "tokenizer"
    if resume and tokenizer_dir.exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        all_captions = [c for r in train_records for c in r.captions]
        tokenizer = train_tokenizer(all_captions, vocab_size=config.model.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    model = _new_model(config, tokenizer)
    processor = image_processor_for(model.encoder.config)
    cache = Path(config.cache_dir).expanduser()
    train_paths = [r.image.resolve() for r in train_records]
    val_paths = [r.image.resolve() for r in val_records]
    trunk = [cached_trunk_features(model.encoder, processor, train_paths, cache, desc="train features")]
    if config.optim.flip:
        trunk.append(
            cached_trunk_features(model.encoder, processor, train_paths, cache, flip=True, desc="mirrored")
        )
    val_trunk = cached_trunk_features(model.encoder, processor, val_paths, cache, desc="val features")
    return Run(
        config=config,
        out=out,
        model=model,
        tokenizer=tokenizer,
        image_processor=processor,
        table=CaptionTable(tokenizer, [r.captions for r in train_records], data.max_tokens),
        train_trunk=torch.cat(trunk),
        val_trunk=val_trunk,
        val_ids=[r.image.name for r in val_records],
        val_refs={r.image.name: list(r.captions) for r in val_records},
        train_refs={r.image.name: list(r.captions) for r in train_records},
    )


def _new_model(config: TrainConfig, tokenizer):
    m = config.model
    encoder = EfficientNetLiteEncoderConfig(
        variant=m.variant,
        image_size=m.image_size,
        hidden_size=m.hidden_size,
        num_layers=m.encoder_layers,
        num_heads=m.num_heads,
        dropout=m.dropout,
        tail_blocks=m.tail_blocks,
    )
    decoder = DecoderSpec(
        num_layers=m.decoder_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_heads,
        max_positions=max(64, config.data.max_tokens),
        dropout=m.dropout,
    )
    return new_model(encoder, decoder, tokenizer, imagenet_weights=m.imagenet_weights)


def _train_epoch(run: Run, state: dict, xe: bool) -> dict:
    """One epoch of either stage, then validation, logging and a checkpoint."""
    config, model = run.config, run.model
    epoch = state["epoch"] + 1
    tail_trains = xe and _tail_trains(config, epoch)
    _set_tail_trainable(model, tail_trains)
    optimizer, scheduler = _optimizers(run, state, xe)
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch + (0 if xe else 500))
    torch.manual_seed(config.seed * 1000 + epoch)  # dropout and sampling: same seed, same run
    if not tail_trains and run.train_maps is None:
        run.train_maps = _tail_maps(model, run.train_trunk)
    started = time.time()
    if xe:
        train_loss = _xe_epoch(run, optimizer, scheduler, generator, tail_trains, epoch)
    else:
        train_loss = _scst_epoch(run, optimizer, generator, epoch)
    if tail_trains:
        run.train_maps = None  # the tail changed: recompute its output when next needed
    metrics = {"stage": "xe" if xe else "scst", "epoch": epoch, "train_loss": train_loss}
    metrics.update(validate(run))
    metrics["epoch_seconds"] = round(time.time() - started, 1)
    state = {**state, "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": _state(scheduler)}
    _log_metrics(run, metrics)
    if metrics["CIDEr"] > state["best"]:
        state["best"] = metrics["CIDEr"]
        save_model(model, run.tokenizer, run.image_processor, run.out / "best")
    _save_checkpoint(run, state)
    return state


def _xe_epoch(run: Run, optimizer, scheduler, generator, tail_trains: bool, epoch: int) -> float:
    config, model, pad = run.config, run.model, run.tokenizer.pad_token_id
    model.train()
    model.encoder.cnn.eval()  # BatchNorm statistics stay ImageNet's: batches here are small
    features = run.train_trunk if tail_trains else run.train_maps
    losses, tokens_seen, started = [], 0, time.time()
    batches = run.table.batches(config.optim.batch_images, generator, flip=config.optim.flip)
    bar = tqdm(batches, total=math.ceil(len(run.table) / config.optim.batch_images), desc=f"xe {epoch}")
    for batch in bar:
        tokens = visual_tokens(model, features[batch.image_index], from_trunk=tail_trains)
        loss, n_tokens = cross_entropy_loss(
            model, tokens, batch.input_ids, batch.captions_per_image, pad, config.optim.label_smoothing
        )
        _step(model, optimizer, scheduler, loss, config.optim.grad_clip)
        losses.append(loss.item())
        tokens_seen += n_tokens
        bar.set_postfix(
            loss=f"{np.mean(losses[-50:]):.3f}", tok_s=f"{tokens_seen / (time.time() - started):.0f}"
        )
    return float(np.mean(losses))


def _scst_epoch(run: Run, optimizer, generator, epoch: int) -> float:
    from imcap.metrics import CiderD  # training-only dependency

    config, model, tok = run.config.scst, run.model, run.tokenizer
    if run.cider is None:  # corpus document frequencies: computed once, shared by every SCST epoch
        run.cider = CiderD(run.train_refs)
    scorer = run.cider
    names = list(run.train_refs)
    model.eval()  # no dropout: the sampled policy and the trained policy must be the same
    losses, rewards_seen, started = [], [], time.time()
    n_images = len(names)
    order = torch.randperm(n_images, generator=generator).tolist()
    bar = tqdm(range(0, n_images, config.batch_images), desc=f"scst {epoch}")
    for start in bar:
        index = torch.tensor(order[start : start + config.batch_images])
        tokens = visual_tokens(model, run.train_maps[index], from_trunk=False)
        samples = generate_from_tokens(
            model,
            tokens.detach(),
            do_sample=True,
            top_k=0,
            num_beams=1,
            num_return_sequences=config.samples,
            max_new_tokens=config.max_new_tokens,
        )
        samples = sample_mask_after_eos(samples, tok.eos_token_id, tok.pad_token_id)
        texts = [format_caption(t) for t in tok.batch_decode(samples, skip_special_tokens=True)]
        ids = [names[i] for i in index.tolist() for _ in range(config.samples)]
        rewards = torch.tensor(scorer.scores(texts, ids), dtype=torch.float32)
        loss = scst_loss(model, tokens, samples, rewards, config.samples, tok.pad_token_id)
        _step(model, optimizer, None, loss, run.config.optim.grad_clip)
        losses.append(loss.item())
        rewards_seen.append(rewards.mean().item())
        rate = (start + len(index)) / (time.time() - started)
        bar.set_postfix(reward=f"{np.mean(rewards_seen[-50:]):.3f}", img_s=f"{rate:.1f}")
    return float(np.mean(losses))


def validate(run: Run, batch_images: int = 64) -> dict:
    """Greedy captions of the val images, scored with pycocoevalcap (METEOR left to `imcap eval`)."""
    from imcap.metrics import corpus_stats, score_captions

    model, tok = run.model, run.tokenizer
    model.eval()
    predictions = {}
    with torch.no_grad():
        val_maps = _tail_maps(model, run.val_trunk)
        for start in range(0, len(run.val_ids), batch_images):
            tokens = visual_tokens(model, val_maps[start : start + batch_images], from_trunk=False)
            out = generate_from_tokens(model, tokens, num_beams=1, do_sample=False, max_new_tokens=24)
            for name, text in zip(
                run.val_ids[start : start + batch_images],
                tok.batch_decode(out, skip_special_tokens=True),
                strict=True,
            ):
                predictions[name] = format_caption(text)
    scores = score_captions(predictions, run.val_refs, meteor=False)
    return {**{f"val_{k}": v for k, v in corpus_stats(predictions).items()}, **scores}


@torch.no_grad()
def _tail_maps(model, trunk: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.encoder.cnn.eval()
    return torch.cat(
        [model.encoder.tail(trunk[i : i + batch].float()).half() for i in range(0, len(trunk), batch)]
    )


def _tail_trains(config: TrainConfig, epoch: int) -> bool:
    start = config.optim.finetune_tail_from_epoch
    return start is not None and epoch >= start


def _set_tail_trainable(model, trainable: bool) -> None:
    for p in model.encoder.cnn.parameters():
        p.requires_grad_(False)
    for block in model.encoder._blocks_split()[1]:
        for p in block.parameters():
            p.requires_grad_(trainable)
    for module in (model.encoder.cnn._conv_head, model.encoder.cnn._bn1):
        for p in module.parameters():
            p.requires_grad_(trainable)


def _optimizers(run: Run, state: dict, xe: bool):
    config, model = run.config, run.model
    lr = config.optim.lr if xe else config.scst.lr
    cnn = {id(p) for p in model.encoder.cnn.parameters()}
    params = [p for p in model.parameters() if id(p) not in cnn]
    tail = [p for p in model.encoder.cnn.parameters()]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # biases, norms
        {"params": tail, "weight_decay": config.optim.weight_decay, "lr": lr * config.optim.tail_lr_scale},
    ]
    for group in groups:
        group.setdefault("lr", lr)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = None
    if xe:
        per_epoch = math.ceil(len(run.table) / config.optim.batch_images)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, config.optim.warmup_steps, per_epoch * config.optim.epochs
        )
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler


def _step(model, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _state(scheduler):
    return scheduler.state_dict() if scheduler is not None else None


def _log_metrics(run: Run, metrics: dict) -> None:
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    tqdm.write(json.dumps(shown))
    plot_learning_curve(run.out / "metrics.jsonl", run.out / "learning_curve.png")


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
    _truncate_metrics(run.out / "metrics.jsonl", payload["stage"], payload["epoch"])
    return payload


def _truncate_metrics(path: Path, stage: str, epoch: int) -> None:
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


def export_fp16(model_dir: Path, destination: Path) -> None:
    """Copy a trained model folder as fp16 safetensors (half the size: how the default model ships)."""
    from imcap.modeling import load_model

    loaded = load_model(model_dir)
    save_model(loaded.model, loaded.tokenizer, loaded.image_processor, destination, fp16=True)
