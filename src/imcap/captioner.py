"""The Python API: `Captioner.from_pretrained(...)(images, options) -> [CaptionResult]`.

The CLI (and any server) calls only this. Images may be paths, `PIL.Image`s, file bytes or numpy arrays;
`imcap.images` turns each into an upright RGB picture or raises `ImageLoadError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import VisionEncoderDecoderModel

from imcap.engine import Decoded, Engine, EngineOptions
from imcap.generation import CaptionOptions, check_fits, generation_config
from imcap.images import DEFAULT_MAX_PIXELS, ImageInput, as_image
from imcap.modeling import LoadedModel, load_model, max_caption_tokens
from imcap.tokenizer import format_caption

_SINGLE = (str, Path, Image.Image, bytes, bytearray, np.ndarray)


@dataclass
class Candidate:
    text: str
    # log-probability of the caption's tokens (end-of-text included) under the distribution decoding drew
    # from: the model's own for greedy and beam search, reshaped by temperature/top-k/top-p when sampling
    score: float
    tokens: list[int] = field(default_factory=list, repr=False)  # generated ids, end-of-text included


@dataclass
class CaptionResult:
    caption: str  # the best candidate's text
    candidates: list[Candidate]  # best first: beam search's order, or mean token log-prob for samples
    options: dict = field(default_factory=dict)  # the CaptionOptions used, as a dict


class Captioner:
    """A loaded model plus the code to caption images with it.

    captioner = Captioner.from_pretrained()  # the shipped model, or a model folder or hub id
    result = captioner("photo.jpg", CaptionOptions(num_beams=5, num_return_sequences=3))[0]
    print(result.caption, [(c.text, c.score) for c in result.candidates])
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        engine: EngineOptions | None = None,
        use_engine: bool = True,
    ):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.max_pixels = max_pixels  # images announcing more pixels are refused (see imcap.images)
        # greedy and beam search of VisionEncoderDecoder models go through imcap's engine (generate's tokens,
        # faster); use_engine=False sends everything to plain `generate`, as sampling and the prefix and
        # LSTM models always are
        uses_engine = use_engine and isinstance(self.model, VisionEncoderDecoderModel)
        self.engine = Engine(self.model, engine) if uses_engine else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        engine: EngineOptions | None = None,
        use_engine: bool = True,
    ) -> Captioner:
        """None loads the model shipped inside the package; otherwise a local folder or a hub id."""
        return cls(load_model(name_or_path), max_pixels, engine, use_engine)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def max_caption_tokens(self) -> int | None:
        """The longest caption (in tokens) the decoder's position embeddings allow, if it has a limit."""
        return max_caption_tokens(self.model)

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, H, W) model input for a batch of images, resized and normalised by the model's processor."""
        pictures = [as_image(i, self.max_pixels) for i in images]
        return self.loaded.image_processor(pictures, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """Caption one image or a batch; returns one CaptionResult per image, in order.

        Raises OptionsError for bad settings (before any model work) and ImageLoadError for a bad image.
        """
        options = self._checked(options)
        batch = [images] if isinstance(images, _SINGLE) else list(images)
        if not batch:
            return []
        return self.caption_pixels(self.pixel_values(batch), options)

    @torch.inference_mode()
    def caption_pixels(
        self, pixels: torch.Tensor, options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """Caption a (B, 3, H, W) batch made by `pixel_values` (so a caller can prepare the next batch
        in another thread while this one runs)."""
        options = self._checked(options)
        pixels = pixels.to(self.model.dtype)
        if self.uses_engine(options):
            return self.caption_encoded(self.encode(pixels), options)
        if options.do_sample and options.seed is not None:
            # one image per generate call, each from the same seed: a seeded caption then depends on the
            # image alone, not on which batch it fell into (a resumed run batches differently)
            return [result for row in pixels for result in self._generate(row[None], options)]
        return self._generate(pixels, options)

    def _checked(self, options: CaptionOptions | None) -> CaptionOptions:
        options = (options or CaptionOptions()).validate()
        check_fits(options, self.max_caption_tokens)
        return options

    def uses_engine(self, options: CaptionOptions) -> bool:
        """Whether these options go through imcap's engine (greedy and beam search do; sampling doesn't)."""
        return self.engine is not None and not options.do_sample

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The engine's first half: (B, 3, H, W) -> the states the decoder reads (see caption_encoded)."""
        return self.engine.encode(pixels.to(self.model.dtype))

    @torch.inference_mode()
    def caption_encoded(
        self, hidden: torch.Tensor, options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """The engine's second half: decode captions for states made by `encode` (the two can run in
        different threads, as `imcap.batch.caption_batches` does)."""
        options = self._checked(options)
        per_image = self.engine.decode(hidden, generation_config(options, self.model.generation_config))
        flat: list[Decoded] = [decoded for candidates in per_image for decoded in candidates]
        scores = torch.tensor([d.score for d in flat])
        lengths = torch.tensor([max(len(d.tokens), 1) for d in flat])
        return self._results([d.tokens for d in flat], scores, lengths, options)

    def _generate(self, pixels: torch.Tensor, options: CaptionOptions) -> list[CaptionResult]:
        config = generation_config(options, self.model.generation_config)
        config.update(return_dict_in_generate=True, output_scores=True)  # scores for the candidates
        with _seeded(options.seed, self.model.device):
            out = self.model.generate(pixel_values=pixels.to(self.model.device), generation_config=config)
        scores, lengths, generated = self._sequence_scores(out, config)
        tokens = [row[:length].tolist() for row, length in zip(generated, lengths.tolist(), strict=True)]
        return self._results(tokens, scores, lengths, options)

    def _results(self, tokens: list[list[int]], scores, lengths, options) -> list[CaptionResult]:
        texts = self.loaded.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return _results([format_caption(t) for t in texts], tokens, scores, lengths, options)

    def _sequence_scores(self, out, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) sum of token log-probabilities of each returned sequence, (N,) its length in tokens, and
        (N, T) the generated tokens (the prompt cut off; a model may or may not return it).

        Beam search keeps log-softmaxed scores and gives beam_indices; greedy and sampling keep the
        (processed) logits of row i for sequence i, which we normalise here.
        """
        beam_indices = getattr(out, "beam_indices", None)
        transition = self.model.compute_transition_scores(
            out.sequences, out.scores, beam_indices, normalize_logits=beam_indices is None
        )
        generated = out.sequences[:, -transition.shape[1] :]
        return (*sequence_log_probs(transition, generated, _eos_ids(config)), generated)


def _results(
    texts: list[str],
    tokens: list[list[int]],
    scores: torch.Tensor,
    lengths: torch.Tensor,
    options: CaptionOptions,
) -> list[CaptionResult]:
    """Group the N = images x num_return_sequences outputs by image, best candidate first."""
    per_image, results = options.num_return_sequences, []
    for start in range(0, len(texts), per_image):
        rows = [
            (float(scores[r]), float(scores[r] / lengths[r]), texts[r], tokens[r])
            for r in range(start, start + per_image)
        ]
        if options.num_beams == 1 and per_image > 1:
            # independent samples come unordered: rank them by mean token log-prob, as beam search would
            rows.sort(key=lambda row: -row[1])
        candidates = [Candidate(text, score, ids) for score, _, text, ids in rows]
        results.append(CaptionResult(candidates[0].text, candidates, options.to_dict()))
    return results


def sequence_log_probs(
    transition: torch.Tensor, generated: torch.Tensor, eos_ids: set[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the (N, T) per-token log-probs up to and including each row's first end-of-text token.

    After it, a batch holds padding (whose scores are meaningless for greedy and sampling, and zero for
    beams); a row without end-of-text ran to max_new_tokens and counts all T tokens.
    """
    is_eos = torch.isin(generated, torch.tensor(sorted(eos_ids), device=generated.device))
    ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # positions after the first eos
    keep = ~ended_before
    return torch.where(keep, transition, 0.0).sum(dim=1), keep.sum(dim=1).clamp(min=1)


def _eos_ids(config) -> set[int]:
    eos = config.eos_token_id
    return set(eos) if isinstance(eos, list | tuple) else {eos}


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for one generate call without changing the caller's random state afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
