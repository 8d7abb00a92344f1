"""Training examples on cached features: images grouped with all their captions, batched by length."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from imcap.tokenizer import encode_for_training

_LEFT_RIGHT = re.compile(r"\b(left|right)\b")
SORT_WINDOW = 50  # batches sorted by length together: less padding, order still random across windows


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: 'left' and 'right' trade places."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


@dataclass
class CaptionBatch:
    image_index: torch.Tensor  # (B,) rows of the feature tensor, flipped rows offset by the image count
    input_ids: torch.Tensor  # (B * K, T) bos + caption + eos, padded; K captions per image
    attention_mask: torch.Tensor  # (B * K, T) 1 up to and including eos (from lengths: pad may equal eos)
    captions_per_image: int

    def shard(self, rank: int, world: int) -> CaptionBatch:
        """This rank's share of a global batch in data-parallel training: images rank, rank + world, ..."""
        if world == 1:
            return self
        images = list(range(rank, len(self.image_index), world))
        rows = [i * self.captions_per_image + k for i in images for k in range(self.captions_per_image)]
        mask = self.attention_mask[rows]
        width = int(mask.sum(1).max())  # no padding column that only other ranks' captions need
        return CaptionBatch(
            self.image_index[images], self.input_ids[rows, :width], mask[:, :width], self.captions_per_image
        )


class CaptionTable:
    """Token ids of every caption (and of its mirrored form) of every training image."""

    def __init__(self, tokenizer, captions: Sequence[Sequence[str]], max_tokens: int):
        self.pad_id = tokenizer.pad_token_id
        self.per_image = min(len(c) for c in captions)  # Flickr8k: 5; extra captions of an image are unused
        self.plain = [[encode_for_training(tokenizer, c, max_tokens) for c in caps] for caps in captions]
        self.mirrored = [
            [encode_for_training(tokenizer, mirror_caption(c), max_tokens) for c in caps] for caps in captions
        ]

    def __len__(self) -> int:
        return len(self.plain)

    def batches(self, batch_images: int, generator: torch.Generator, flip: bool) -> Iterator[CaptionBatch]:
        """One epoch: every image once (mirrored with probability 1/2 when `flip`), all its captions."""
        count = len(self.plain)
        order = torch.randperm(count, generator=generator).tolist()
        flipped = (torch.rand(count, generator=generator) < 0.5).tolist() if flip else [False] * count
        window = batch_images * SORT_WINDOW
        batches = []
        for start in range(0, count, window):
            chunk = sorted(order[start : start + window], key=lambda i: max(map(len, self.plain[i])))
            batches += [chunk[i : i + batch_images] for i in range(0, len(chunk), batch_images)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield self._collate(batches[b], flipped)

    def _collate(self, images: list[int], flipped: list[bool]) -> CaptionBatch:
        rows = []
        for i in images:
            rows += (self.mirrored if flipped[i] else self.plain)[i][: self.per_image]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        index = torch.tensor([i + (len(self.plain) if flipped[i] else 0) for i in images])
        return CaptionBatch(
            image_index=index, input_ids=ids, attention_mask=mask, captions_per_image=self.per_image
        )
