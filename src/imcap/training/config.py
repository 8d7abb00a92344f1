"""Training recipes as dataclasses, read from YAML (see configs/flickr8k.yaml)."""

from __future__ import annotations

import os
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


MODEL_TYPES = ("encoder-decoder", "prefix", "lstm")  # see imcap.training.build


@dataclass
class PrefixConfig:
    """`model.type: prefix` only (imcap.archs.prefix)."""

    mapper_hidden: int = 1024  # the mapper's middle layer: Linear up to this, GELU, Dropout, Linear down


@dataclass
class LstmConfig:
    """`model.type: lstm` only (imcap.archs.lstm). The LSTM is `hidden_size` wide; dropout is `dropout`."""

    min_word_count: int = 10  # words seen fewer times in the training captions are unknown (<unk>)
    embedding_size: int = 256


@dataclass
class ModelConfig:
    type: str = "encoder-decoder"  # encoder-decoder | prefix | lstm
    variant: str = "efficientnet-lite2"
    image_size: int | None = None  # None: the variant's native size (260 px for lite2)
    tail_blocks: int = 1  # CNN blocks after the cached trunk, fine-tunable
    hidden_size: int = 256
    encoder_layers: int = 1
    decoder_layers: int = 3
    num_heads: int = 4
    dropout: float = 0.1
    vocab_size: int = 4000  # BPE tokens (encoder-decoder, prefix); the LSTM's: lstm.min_word_count
    imagenet_weights: bool = True  # False only for tests that must not depend on the weight packages
    # ImageNet concepts (imcap.encoder, imcap.concepts): keep the CNN's classifier head (tags, guided
    # decoding), and give the decoder the top `concept_tokens` classes as extra tokens
    concept_head: bool = False
    concept_tokens: int = 0
    concept_dropout: float = 0.0  # training: share of concept tokens replaced by a "no concept" token
    concept_table: str = "imagenet-1k-wordnet-v1"  # the class -> caption-word table (imcap.concepts)
    # the head reads its own frozen copy of the CNN tail, so the tail may fine-tune (finetune_tail_from_epoch)
    concept_tail: bool = False
    # Pretrained parts: hub ids or local folders (a hub id needs network once, then its cache works offline).
    # A pretrained encoder is frozen and its output cached; our EfficientNet-Lite is used when none is named.
    pretrained: str | None = None  # encoder-decoder: a whole VisionEncoderDecoder checkpoint to fine-tune
    pretrained_encoder: str | None = None  # encoder-decoder: a vision encoder (ViT, ...) instead of ours
    pretrained_decoder: str | None = None  # encoder-decoder or prefix: GPT-2 weights (distilgpt2, gpt2, ...)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    lstm: LstmConfig = field(default_factory=LstmConfig)

    def validate(self, where: str) -> None:
        if self.type not in MODEL_TYPES:
            raise ValueError(f"{where}: model.type {self.type!r} is not one of {', '.join(MODEL_TYPES)}")
        allowed = {  # which pretrained parts each architecture can take
            "encoder-decoder": {"pretrained", "pretrained_encoder", "pretrained_decoder"},
            "prefix": {"pretrained_decoder"},
            "lstm": set(),
        }[self.type]
        named = {k for k in ("pretrained", "pretrained_encoder", "pretrained_decoder") if getattr(self, k)}
        if named - allowed:
            raise ValueError(f"{where}: model.type {self.type} takes no {', '.join(sorted(named - allowed))}")
        if self.pretrained and len(named) > 1:
            raise ValueError(f"{where}: model.pretrained is a whole model; drop pretrained_encoder/decoder")

    @property
    def frozen_encoder(self) -> bool:
        """A pretrained (hub) encoder: frozen as a whole, its output cached."""
        return bool(self.pretrained or self.pretrained_encoder)


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
    # the CNN tail keeps training in these epochs too (at optim.tail_lr_scale times scst.lr): the rewards
    # then shape the visual features, not only the decoder
    finetune_tail: bool = False
    # reward = CIDEr-D + bleu4_weight x the sample's sentence BLEU-4 (imcap.metrics.SentenceBleu4); 0: CIDEr-D
    bleu4_weight: float = 0.0
    # WiSE-FT (Wortsman et al. 2022): the run's model is the cross-entropy stage's last weights moved this
    # far toward the best SCST epoch's (1.0: the SCST weights as they are; the mix is written to `wise/`)
    wise_weight: float = 1.0


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
    # Stop training once this many minutes were spent in training steps (feature extraction, validation and
    # checkpoints do not count); the learning rate then warms up and decays on the clock, over the budget,
    # instead of over optim.warmup_steps and the epochs.
    time_budget_minutes: float | None = None

    def validate(self, where: str = "config") -> TrainConfig:
        self.model.validate(where)
        tail_trains = self.optim.finetune_tail_from_epoch is not None or self.scst.finetune_tail
        if self.model.frozen_encoder and tail_trains:
            raise ValueError(
                f"{where}: a pretrained encoder is frozen; unset optim.finetune_tail_from_epoch and "
                "scst.finetune_tail"
            )
        concepts = self.model.concept_head or self.model.concept_tokens > 0
        if concepts and tail_trains and not self.model.concept_tail:
            # the frozen ImageNet head reads the tail's output: a tail trained here would change its meaning
            raise ValueError(
                f"{where}: model.concept_head needs a frozen tail; set model.concept_tail (the head gets "
                "its own copy) or leave the tail frozen"
            )
        if self.model.concept_tail and not concepts:
            raise ValueError(f"{where}: model.concept_tail needs model.concept_head")
        if self.model.concept_tokens < 0 or not 0 <= self.model.concept_dropout < 1:
            raise ValueError(f"{where}: model.concept_tokens must be >= 0 and concept_dropout in [0, 1)")
        if not 0.0 <= self.scst.wise_weight <= 1.0:
            raise ValueError(f"{where}: scst.wise_weight must be in [0, 1], got {self.scst.wise_weight}")
        if self.scst.bleu4_weight < 0:
            raise ValueError(f"{where}: scst.bleu4_weight must be >= 0, got {self.scst.bleu4_weight}")
        if self.time_budget_minutes is not None and self.time_budget_minutes <= 0:
            raise ValueError(f"{where}: time_budget_minutes must be > 0, got {self.time_budget_minutes}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a recipe. The data.path, output_dir and cache_dir it writes, when relative, are relative
        to the recipe's folder (so it runs the same from any working folder); absolute paths and ~ stay."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        config = cls.from_dict(raw, where=str(path))
        folder = Path(path).parent
        if "path" in (raw.get("data") or {}):  # the defaults, not written in the recipe, stay as they are
            config.data.path = _beside(folder, config.data.path)
        if "output_dir" in raw:
            config.output_dir = _beside(folder, config.output_dir)
        if "cache_dir" in raw:
            config.cache_dir = _beside(folder, config.cache_dir)
        return config

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> TrainConfig:
        return _build(cls, raw, where).validate(where)

    def to_dict(self) -> dict:
        return asdict(self)


def _beside(folder: Path, path: str) -> str:
    """`path` as written in a recipe in `folder`: relative paths count from that folder."""
    if path.startswith("~") or Path(path).is_absolute():
        return path
    return os.path.normpath(folder / path)


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
