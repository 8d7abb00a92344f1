"""How a model's image side splits between the on-disk feature cache and the training step.

LiteFront   our EfficientNet-Lite encoders, in all three architectures: the frozen trunk's output is
            cached; the tail (trainable from `optim.finetune_tail_from_epoch`) and the token layers run in
            every step. While the tail is frozen its output is computed once per run and kept in memory
            (except for an encoder whose concept head has its own frozen tail: it reads trunk features).
FrozenFront a pretrained hub encoder (ViT, ...): frozen as a whole, its output is cached and is what the
            decoder reads, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from imcap.encoder import LiteCNN
from imcap.features import cached_encoder_outputs, cached_trunk_features


class LiteFront:
    def __init__(self, encoder: LiteCNN):
        self.encoder = encoder
        # An encoder whose concept head has its own frozen tail reads trunk features in every epoch: the
        # head needs them too, and a second precomputed (N, 1280, G, G) map would double the memory.
        self.trunk_only = getattr(encoder.config, "concept_tail", False)

    def cache(self, image_processor, images: Sequence[Path], cache_dir: Path, flip: bool, desc: str):
        """(N, C, G, G) fp16 trunk features."""
        return cached_trunk_features(self.encoder, image_processor, images, cache_dir, flip=flip, desc=desc)

    @torch.no_grad()
    def precompute(self, cached: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
        """The tail's output (N, 1280, G, G) fp16 on the CPU, for epochs in which the tail is frozen
        (`trunk_only` encoders: the trunk features as they are)."""
        if self.trunk_only:
            return cached
        self.encoder.cnn.eval()
        chunks = [
            self.encoder.tail(cached[i : i + batch].to(device).float()) for i in range(0, len(cached), batch)
        ]
        return torch.cat([c.half().cpu() for c in chunks])

    def tokens(self, features: torch.Tensor, from_trunk: bool) -> torch.Tensor:
        """Cached features -> the encoder's tokens; `from_trunk`: they are trunk output, run the tail too."""
        if self.trunk_only:
            return self.encoder.encode_trunk(features.float())[0]
        feature_map = self.encoder.tail(features.float()) if from_trunk else features
        return self.encoder.tokens(feature_map)

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
