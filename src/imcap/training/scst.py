"""The self-critical stage (Rennie et al. 2017): sample captions, reward each with CIDEr-D against the
mean of the image's other samples, raise the better ones."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from imcap.tokenizer import format_caption
from imcap.training import distributed
from imcap.training.optim import step as optimizer_step
from imcap.training.run import Run, step_row
from imcap.training.steps import caption_mask, sample_captions, sample_mask_after_eos, scst_loss


def scst_epoch(run: Run, step_module, optimizer, generator, tail_trains: bool, epoch: int, step: int):
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
        samples = sample_captions(model, tokens, config.samples, config.max_new_tokens)
        samples = sample_mask_after_eos(samples, tok.eos_token_id, tok.pad_token_id)
        texts = [format_caption(t) for t in tok.batch_decode(samples, skip_special_tokens=True)]
        ids = [names[i] for i in index.tolist() for _ in range(config.samples)]
        rewards = torch.tensor(sample_rewards(run, texts, ids), dtype=torch.float32, device=process.device)
        mask = caption_mask(samples, tok.eos_token_id)
        logits = step_module(features, samples, mask, config.samples, tail_trains)
        per_sample = scst_loss(logits, samples, mask, rewards, config.samples)
        loss = distributed.global_mean(per_sample.sum(), per_sample.numel(), process)
        optimizer_step(model, optimizer, None, loss, run.config.optim.grad_clip)
        step += 1
        run.clock.read(process)
        rows.append(step_row(run, "scst", epoch, step, loss, optimizer, images=len(batch)))
        rewards_seen.append(rewards.mean().item())
        rate = (start + len(batch)) / (time.time() - started)
        bar.set_postfix(reward=f"{np.mean(rewards_seen[-50:]):.3f}", img_s=f"{rate:.1f}")
        if run.clock.used_up:
            break
    return rows


def sample_rewards(run: Run, texts: list[str], image_ids: list[str]) -> np.ndarray:
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
