"""Training recipes as dataclasses, read from YAML (see configs/flickr8k.yaml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    path: str = "../shared/datasets/flickr8k"
    train_split: str = "train"
    val_split: str = "val"
    train_limit: int | None = None  # first N training images only (smoke tests, quick probes)
    val_limit: int | None = None
    max_tokens: int = 32  # bos + caption + eos; longer captions are cut (Flickr8k p99 is ~27)


@dataclass
class ModelConfig:
    variant: str = "efficientnet-lite2"
    image_size: int | None = None  # None: the variant's native size (260 px for lite2)
    tail_blocks: int = 1  # CNN blocks after the cached trunk, fine-tunable
    hidden_size: int = 256
    encoder_layers: int = 1
    decoder_layers: int = 3
    num_heads: int = 4
    dropout: float = 0.1
    vocab_size: int = 4000
    imagenet_weights: bool = True  # False only for tests that must not depend on the weight packages


@dataclass
class OptimConfig:
    epochs: int = 8
    batch_images: int = 16  # each image brings all its captions, so a batch has ~5x as many sequences
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    flip: bool = True  # mirror images (and swap left/right in captions) half of the time
    finetune_tail_from_epoch: int | None = None  # 1-based epoch from which the CNN tail trains too
    tail_lr_scale: float = 0.1


@dataclass
class ScstConfig:
    """Self-critical sequence training (Rennie et al. 2017) on CIDEr-D, after the cross-entropy epochs."""

    epochs: int = 0
    batch_images: int = 16
    samples: int = 5  # per image; each sample's baseline is the mean reward of the others (Luo 2020)
    lr: float = 2e-5
    max_new_tokens: int = 20


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    output_dir: str = "runs/flickr8k"
    cache_dir: str = "~/.cache/imcap/features"
    seed: int = 0
    threads: int | None = None  # None: torch's default (all cores)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {}, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> TrainConfig:
        return _build(cls, raw, where)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(kind, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values = {}
    for name, value in raw.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        values[name] = _build(type(default), value, f"{where}:{name}") if is_dataclass(default) else value
    return kind(**values)
