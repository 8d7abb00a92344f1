"""The Python API: `Captioner.from_pretrained(...)(images, options) -> [CaptionResult]`.

The CLI (and any server) calls only this. Images may be paths, `PIL.Image`s, raw bytes or numpy arrays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imcap.generation import CaptionOptions, generation_config
from imcap.images import ImageLoadError, load_image, to_rgb
from imcap.modeling import LoadedModel, load_model
from imcap.tokenizer import format_caption

ImageInput = str | Path | Image.Image | bytes | np.ndarray


@dataclass
class Candidate:
    text: str
    score: float  # log-probability of the caption's tokens under the model (higher is better)


@dataclass
class CaptionResult:
    caption: str  # the best candidate's text
    candidates: list[Candidate]
    options: dict = field(default_factory=dict)


def as_image(item: ImageInput) -> Image.Image:
    """Any supported input as an upright RGB image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, bytes):
        try:
            with Image.open(io.BytesIO(item)) as image:
                image.load()
                return to_rgb(image)
        except (OSError, ValueError) as error:
            raise ImageLoadError(f"<bytes>: not a readable image ({error})") from error
    if isinstance(item, np.ndarray):
        return to_rgb(Image.fromarray(item))
    return load_image(item)


class Captioner:
    """A loaded model plus the code to caption images with it."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path | None = None) -> Captioner:
        """None loads the model shipped inside the package; otherwise a local folder or a hub id."""
        return cls(load_model(name_or_path))

    @property
    def name(self) -> str:
        return self.loaded.name

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        pictures = [as_image(i) for i in images]
        return self.loaded.image_processor(pictures, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """Caption one image or a batch; returns one CaptionResult per image, in order."""
        options = (options or CaptionOptions()).validate()
        batch = [images] if isinstance(images, (str, Path, Image.Image, bytes, np.ndarray)) else list(images)
        if not batch:
            return []
        pixels = self.pixel_values(batch).to(self.model.dtype)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        config = generation_config(options, self.model.generation_config)
        out = self.model.generate(
            pixel_values=pixels, generation_config=config, return_dict_in_generate=True, output_scores=True
        )
        scores = self._sequence_scores(out, config)
        texts = self.loaded.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        per_image = options.num_return_sequences
        results = []
        for i in range(len(batch)):
            rows = range(i * per_image, (i + 1) * per_image)
            candidates = sorted(
                (Candidate(format_caption(texts[r]), float(scores[r])) for r in rows), key=lambda c: -c.score
            )
            results.append(CaptionResult(candidates[0].text, candidates, options.to_dict()))
        return results

    def _sequence_scores(self, out, config) -> torch.Tensor:
        """Sum of token log-probabilities of each returned sequence."""
        transition = self.model.compute_transition_scores(
            out.sequences,
            out.scores,
            getattr(out, "beam_indices", None),
            normalize_logits=config.num_beams == 1,
        )
        return torch.where(torch.isfinite(transition), transition, 0.0).sum(dim=1)
