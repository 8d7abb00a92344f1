"""How a model's image side splits between the on-disk feature cache and the training step.

LiteFront   our EfficientNet-Lite encoders, in all three architectures: the frozen trunk's output is
            cached; the tail (trainable from `optim.finetune_tail_from_epoch`) and the token layers run in
            every step. While the tail is frozen its output is computed once and kept in memory
            (`TailOutput`; with the concept head's ImageNet logits, from its own frozen tail where it has
            one), so an SCST step runs neither tail.
FrozenFront a pretrained hub encoder (ViT, ...): frozen as a whole, its output is cached and is what the
            decoder reads, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imcap.encoder import LiteCNN
from imcap.features import cached_encoder_outputs, cached_trunk_features


@dataclass
class TailOutput:
    """A frozen tail's output for N images: the maps (N, 1280, G, G) fp16 and, for a concept head with its
    own frozen tail, the head's ImageNet logits (N, 1000) fp32. Indexes and moves as one tensor would."""

    maps: torch.Tensor
    concept_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index) -> TailOutput:
        logits = None if self.concept_logits is None else self.concept_logits[index]
        return TailOutput(self.maps[index], logits)

    def to(self, device: torch.device | str) -> TailOutput:
        logits = None if self.concept_logits is None else self.concept_logits.to(device)
        return TailOutput(self.maps.to(device), logits)


class LiteFront:
    def __init__(self, encoder: LiteCNN):
        self.encoder = encoder
        # an encoder whose concept head has its own frozen tail: the head reads that tail's output
        self.own_concept_tail = getattr(encoder.config, "concept_tail", False)

    def cache(self, image_processor, images: Sequence[Path], cache_dir: Path, flip: bool, desc: str):
        """(N, C, G, G) fp16 trunk features."""
        return cached_trunk_features(self.encoder, image_processor, images, cache_dir, flip=flip, desc=desc)

    @torch.no_grad()
    def precompute(self, cached: torch.Tensor, device: torch.device, batch: int = 256) -> TailOutput:
        """The frozen tail's output on the CPU, for epochs in which the tail is frozen: the maps, and the
        head's logits from its own tail (about 0.2 MB per image: 2.5 GB for Flickr8k's 12000 training
        photos and their mirror images, against running two tails twice in every SCST step)."""
        self.encoder.cnn.eval()
        maps, logits = [], []
        for i in range(0, len(cached), batch):
            trunk = cached[i : i + batch].to(device).float()
            maps.append(self.encoder.tail(trunk).half().cpu())
            if self.own_concept_tail:
                logits.append(self.encoder.concept_logits(self.encoder.concept_tail(trunk)).float().cpu())
        return TailOutput(torch.cat(maps), torch.cat(logits) if logits else None)

    def tokens(self, features: torch.Tensor | TailOutput, from_trunk: bool) -> torch.Tensor:
        """Trunk features (`from_trunk`: the tail runs too) or a `TailOutput` -> the encoder's tokens."""
        if isinstance(features, TailOutput):
            if features.concept_logits is None:
                return self.encoder.tokens(features.maps.float())
            return self.encoder.encode_map(features.maps.float(), concept_logits=features.concept_logits)[0]
        if not from_trunk:
            raise ValueError("a LiteFront reads trunk features or the TailOutput that precompute made")
        if self.own_concept_tail:
            return self.encoder.encode_trunk(features.float())[0]
        return self.encoder.tokens(self.encoder.tail(features.float()))

    def keep_statistics(self) -> None:
        """BatchNorm statistics stay ImageNet's (training batches here are small)."""
        self.encoder.cnn.eval()

    def set_tail_trainable(self, trainable: bool) -> None:
        for p in self.encoder.cnn.parameters():
            p.requires_grad_(False)
        tail = [*self.encoder._blocks_split()[1], self.encoder.cnn._conv_head, self.encoder.cnn._bn1]
        for module in tail:
            for p in module.parameters():
                p.requires_grad_(trainable)
        classifier = getattr(self.encoder, "classifier", None)
        if classifier is not None:  # the ImageNet head never trains: its probabilities are ImageNet's
            classifier.requires_grad_(False)

    def cnn_parameters(self) -> list[nn.Parameter]:
        """The CNN's parameters (they train at `optim.tail_lr_scale` times the learning rate)."""
        return list(self.encoder.cnn.parameters())


class FrozenFront:
    def __init__(self, encoder: nn.Module):
        self.encoder = encoder

    def cache(self, image_processor, images: Sequence[Path], cache_dir: Path, flip: bool, desc: str):
        """(N, S, D) fp16 encoder outputs."""
        return cached_encoder_outputs(self.encoder, image_processor, images, cache_dir, flip=flip, desc=desc)

    def precompute(self, cached: torch.Tensor, device: torch.device) -> torch.Tensor:
        return cached

    def tokens(self, features: torch.Tensor, from_trunk: bool) -> torch.Tensor:
        return features.float()

    def keep_statistics(self) -> None:
        self.encoder.eval()

    def set_tail_trainable(self, trainable: bool) -> None:
        if trainable:
            raise ValueError("a pretrained encoder is frozen: its output is what the cache holds")
        self.encoder.requires_grad_(False)

    def cnn_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())
