"""Checkpoint averaging: one model whose weights are the mean of several checkpoints of the same run.

Averaging the last epochs' weights (Polyak averaging, as in Vaswani et al. 2017's checkpoint averaging)
smooths the noise of the last updates at no inference cost. It needs the checkpoints of one run, so that
the weights are close enough for their mean to be a model too; `imcap train` overwrites `checkpoint.pt`
every epoch, so keep copies of the ones to average.

Model folders average too: runs fine-tuned from one checkpoint (two SCST stages started from the same
cross-entropy checkpoint) stay close enough for their mean to work as well (a "model soup", Wortsman et al.
2022; docs/ablations.md).

    .venv/bin/python scripts/average_checkpoints.py runs/x/best ckpt-9.pt ckpt-10.pt --output runs/x/avg
    .venv/bin/python scripts/average_checkpoints.py src/imcap/default_model \
        src/imcap/default_model runs/other/best --output runs/soup

Weights other than equal ones interpolate (WiSE-FT, Wortsman et al. 2022: the fine-tuned weights mixed
with those they started from) or extrapolate along the fine-tuning direction ("task arithmetic", Ilharco
et al. 2023): weights 1.2 and -0.2 for an SCST model and its cross-entropy checkpoint go a fifth further
than SCST went.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from imcap.guidance_settings import GUIDANCE_FILE
from imcap.modeling import load_model, save_model


def average_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors (weighted by `weights`, which must sum to 1; equal
    weights by default); other tensors (BatchNorm's step counters, token ids) must be equal in every state
    and are kept as they are."""
    if not states:
        raise ValueError("nothing to average: no checkpoints given")
    weights = _checked_weights(weights, len(states))
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=2):
        if set(state) != set(keys):
            differ = sorted(set(state) ^ set(keys))
            raise ValueError(f"checkpoint {i} has other weights than the first ({', '.join(differ[:3])} ...)")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in states]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ValueError(f"{key}: the checkpoints' shapes differ; they are not from one model")
        if tensors[0].is_floating_point():
            mixed = sum(w * t.double() for w, t in zip(weights, tensors, strict=True))
            averaged[key] = mixed.to(tensors[0].dtype)
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ValueError(f"{key}: a non-float tensor differs between the checkpoints")
            averaged[key] = tensors[0]
    return averaged


def average_checkpoints(
    model_dir: str | Path,
    checkpoints: Sequence[str | Path],
    destination: str | Path,
    fp16: bool = True,
    weights: Sequence[float] | None = None,
) -> Path:
    """Load the model folder `model_dir` (its architecture, tokenizer and preprocessing), put the mean of
    the checkpoints' weights in it (`imcap train`'s checkpoint.pt files, state dicts, or model folders of
    the same architecture) and save it to `destination`, as fp16 safetensors by default (how the default
    model ships). `model_dir`'s guidance.json, if any, is copied along (its thresholds were chosen for
    `model_dir`'s weights: `scripts/choose_guidance.py` chooses them again). `weights`, one per
    checkpoint and summing to 1, weight the mean (average_state_dicts)."""
    weights = _checked_weights(weights, len(checkpoints))  # before any loading
    loaded = load_model(model_dir)
    states = [_weights(Path(path)) for path in checkpoints]
    loaded.model.load_state_dict(average_state_dicts(states, weights))
    save_model(loaded.model, loaded.tokenizer, loaded.image_processor, destination, fp16=fp16)
    guidance = Path(model_dir) / GUIDANCE_FILE
    if guidance.is_file():
        shutil.copyfile(guidance, Path(destination) / GUIDANCE_FILE)
    return Path(destination)


def _checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} checkpoints: give one weight per checkpoint")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"the weights sum to {sum(weights):g}, not 1: that would rescale the model")
    return [float(w) for w in weights]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if (
        path.is_dir()
    ):  # a model folder: loaded as a model, so tied and renamed weights come out as in training
        return load_model(path).model.state_dict()
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return payload.get("model", payload)
