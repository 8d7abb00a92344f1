"""The Python API: `Captioner.from_pretrained(...)(images, options) -> [CaptionResult]`.

The CLI (and any server) calls only this. Images may be paths, `PIL.Image`s, file bytes or numpy arrays;
`imcap.images` turns each into an upright RGB picture or raises `ImageLoadError`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import VisionEncoderDecoderModel
from transformers.modeling_outputs import BaseModelOutput

from imcap.concepts import ConceptTable, load_concept_table
from imcap.engine import Encoded, Engine, EngineOptions
from imcap.families import ProcessorInputs, caption_text, check_prompt, one_by_one, prepare
from imcap.generation import CaptionOptions, check_fits, generation_config
from imcap.guidance import Guide
from imcap.images import DEFAULT_MAX_PIXELS, ImageInput, as_image
from imcap.modeling import LoadedModel, load_model, max_caption_tokens
from imcap.results import MAX_TAGS, Candidate, CaptionResult, Tag
from imcap.rewrites import Draft, GuidedDecoder
from imcap.stepwise import sample_seeds
from imcap.tokenizer import format_caption

_SINGLE = (str, Path, Image.Image, bytes, bytearray, np.ndarray)


@dataclass
class Drafted:
    """A batch through the first pass (`Captioner.draft`); `Captioner.finish` makes its results."""

    draft: Draft  # its rows (with plain sampling, an image's samples are rows of their own)
    options: CaptionOptions
    concept_probs: torch.Tensor | None  # per image, for tags


class Captioner:
    """A loaded model plus the code to caption images with it.

    captioner = Captioner.from_pretrained()  # the shipped model, or a model folder or hub id
    result = captioner("photo.jpg", CaptionOptions(num_beams=5, num_return_sequences=3))[0]
    print(result.caption, [(c.text, c.score, c.logprob) for c in result.candidates])
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
        self.family = loaded.family  # processor-based checkpoints (imcap.families); None for imcap's own
        self.max_pixels = max_pixels  # images announcing more pixels are refused (see imcap.images)
        # every decoding setting of VisionEncoderDecoder models goes through imcap's engine (generate's
        # algorithms, faster, guided); use_engine=False sends everything to plain `generate`, as the
        # prefix and LSTM models and processor-based checkpoints always are
        uses_engine = use_engine and isinstance(self.model, VisionEncoderDecoderModel)
        self.engine = Engine(self.model, engine) if uses_engine else None
        encoder_config = getattr(self.model.config, "encoder", None)
        self.concepts = _concept_table(encoder_config)  # class labels for tags; None without a head
        # guided decoding runs in the engine (greedy, beam search and sampling of models with a concept head)
        self.guide = (
            Guide.for_model(encoder_config, loaded.guidance, loaded.tokenizer) if uses_engine else None
        )

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
        return None if self.family else max_caption_tokens(self.model)

    def pixel_values(
        self, images: Sequence[ImageInput], options: CaptionOptions | None = None
    ) -> torch.Tensor | ProcessorInputs:
        """(B, 3, H, W) model input for a batch of images, resized and normalised by the model's processor.

        Processor-based models (imcap.families) get the processor's whole output instead, made with the
        options' prompt: images and text together, as their `generate` takes them.
        """
        pictures = [as_image(i, self.max_pixels) for i in images]
        if self.family is not None:
            prompt = options.prompt if options else None
            return prepare(self.loaded.processor, self.family, pictures, prompt)
        return self.loaded.image_processor(pictures, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def __call__(
        self, images: ImageInput | Sequence[ImageInput], options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """Caption one image or a batch; returns one CaptionResult per image, in order.

        Raises OptionsError for bad settings (before any model work) and ImageLoadError for a bad image.
        """
        options = self.checked(options)
        batch = [images] if isinstance(images, _SINGLE) else list(images)
        if not batch:
            return []
        return self.caption_pixels(self.pixel_values(batch, options), options)

    @torch.inference_mode()
    def caption_pixels(
        self, pixels: torch.Tensor, options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """Caption a (B, 3, H, W) batch made by `pixel_values` (so a caller can prepare the next batch
        in another thread while this one runs)."""
        options = self.checked(options)
        if isinstance(pixels, ProcessorInputs):
            return self._caption_processed(pixels, options)
        pixels = pixels.to(self.model.dtype)
        if self.uses_engine(options):
            return self.caption_encoded(self.encode(pixels), options)
        if options.do_sample and options.seed is not None:
            # one image per generate call, each from the same seed: a seeded caption then depends on the
            # image alone, not on which batch it fell into (a resumed run batches differently)
            return [result for row in pixels for result in self._generate(row[None], options)]
        return self._generate(pixels, options)

    def checked(self, options: CaptionOptions | None) -> CaptionOptions:
        """The options as this model runs them (`resolved`), after every check: OptionsError (one line) for
        a bad setting, a caption longer than the model can write or a prompt it does not take."""
        options = self.resolved((options or CaptionOptions()).validate())
        check_fits(options, self.max_caption_tokens)
        self.check_prompt(options)
        return options

    def resolved(self, options: CaptionOptions) -> CaptionOptions:
        """The options as this model runs them, every setting left to the model filled in (what rows and
        answers record as their settings)."""
        return options.for_model(self.model.generation_config)

    def check_prompt(self, options: CaptionOptions) -> None:
        """Raise OptionsError (one line) when options.prompt does not suit this model."""
        check_prompt(self.family, self.name, options)

    def _caption_processed(self, inputs: ProcessorInputs, options: CaptionOptions) -> list[CaptionResult]:
        """Caption a processor-made batch with plain `generate` (imcap.families)."""
        processor = self.loaded.processor
        if inputs.prompt != options.prompt:  # made for other options: make it again
            inputs = prepare(processor, self.family, inputs.pictures, options.prompt)
        if options.do_sample and options.seed is not None:  # as in caption_pixels: by image alone
            return [
                r for one in one_by_one(processor, self.family, inputs) for r in self._generate(one, options)
            ]
        return self._generate(inputs, options)

    def uses_engine(self, options: CaptionOptions) -> bool:
        """Whether these options go through imcap's engine (every decoding setting of a model it runs:
        greedy, beam search, sampling with one beam or several), or plain `generate`."""
        return self.engine is not None

    def encode(self, pixels: torch.Tensor) -> Encoded:
        """The engine's first half: (B, 3, H, W) -> the states the decoder reads and the concept
        probabilities (see caption_encoded)."""
        return self.engine.encode_with_concepts(pixels.to(self.model.dtype))

    @torch.inference_mode()
    def caption_encoded(
        self, encoded: Encoded | torch.Tensor, options: CaptionOptions | None = None
    ) -> list[CaptionResult]:
        """The engine's second half: decode captions for what `encode` made (the two can run in
        different threads, as `imcap.batch.caption_batches` does)."""
        return self.finish([self.draft(encoded, options)])[0]

    @torch.inference_mode()
    def draft(self, encoded: Encoded | torch.Tensor, options: CaptionOptions | None = None) -> Drafted:
        """`caption_encoded` up to guidance's second pass: `finish` makes the captions final, for several
        drafted batches at once (their rewrites then share one search: imcap.rewrites)."""
        options = self.checked(options)
        encoded = encoded if isinstance(encoded, Encoded) else Encoded(encoded)
        config = generation_config(options, self.model.generation_config)
        guided = options.guide and self.guide is not None and encoded.concept_probs is not None
        if options.do_sample:
            return self._sampled_draft(encoded, config, options, guided)
        return Drafted(self._first_pass(encoded, config, guided), options, encoded.concept_probs)

    @torch.inference_mode()
    def finish(self, drafted: Sequence[Drafted]) -> list[list[CaptionResult]]:
        """Each drafted batch's results: the images guidance rewrites, of every batch, decoded again
        together (one search per setting and placement), then the candidates ranked and tagged."""
        drafts = [d.draft for d in drafted if d.draft.plans]
        if drafts:
            self._guided_decoder().rewrite(drafts)
        return [self._finished(d) for d in drafted]

    def _first_pass(self, encoded: Encoded, config, guided: bool, seeds: list[int] | None = None) -> Draft:
        if guided:
            return self._guided_decoder().draft(encoded, config, seeds)
        return Draft(encoded, config, self.engine.decode(encoded.hidden, config, seeds=seeds))

    def _guided_decoder(self) -> GuidedDecoder:
        # built per call: callers may swap `guide` (scripts/choose_guidance.py tries several)
        return GuidedDecoder(self.engine, self.guide, self.loaded.tokenizer)

    def _sampled_draft(self, encoded: Encoded, config, options: CaptionOptions, guided: bool) -> Drafted:
        """Plain sampling: each of an image's `num_return_sequences` samples is a row of its own, drawn
        once (with a seed, sample j from its own seed, `sample_seeds`), and guided as a searched caption
        is (imcap.rewrites: a sample that misses the sure word is drawn again with it as subject).
        Beam-search sampling: one search per image gives its captions (seeded from `sample_seeds`' first
        seed, as one sample would be)."""
        images, count, seed = encoded.hidden.shape[0], config.num_return_sequences, options.seed
        if config.num_beams > 1:
            image_seeds = None if seed is None else sample_seeds(seed, 1) * images
            draft = self._first_pass(encoded, config, guided, image_seeds)
            return Drafted(draft, options, encoded.concept_probs)
        rows = torch.arange(images, device=encoded.hidden.device).repeat_interleave(count)
        probs = encoded.concept_probs
        rows_encoded = Encoded(encoded.hidden[rows], None if probs is None else probs[rows.to(probs.device)])
        one = copy.deepcopy(config)
        one.num_return_sequences = 1
        seeds = None if seed is None else sample_seeds(seed, count) * images
        return Drafted(self._first_pass(rows_encoded, one, guided, seeds), options, probs)

    def _finished(self, drafted: Drafted) -> list[CaptionResult]:
        # rows in image order, each image's candidates together (its samples, with plain sampling)
        flat = [decoded for row in drafted.draft.decoded for decoded in row]
        scores = torch.tensor([d.score for d in flat])
        lengths = torch.tensor([max(len(d.tokens), 1) for d in flat])
        results = self._results([d.tokens for d in flat], scores, lengths, drafted.options)
        return self._tagged(results, drafted.concept_probs)

    def _tagged(
        self, results: list[CaptionResult], concept_probs: torch.Tensor | None
    ) -> list[CaptionResult]:
        """Attach the top ImageNet concepts of each image (models with a concept head)."""
        if concept_probs is None or self.concepts is None:
            return results
        top = concept_probs.float().topk(min(MAX_TAGS, concept_probs.shape[-1]), dim=-1)
        for result, probs, classes in zip(results, top.values.tolist(), top.indices.tolist(), strict=True):
            result.tags = [Tag(self.concepts.labels[c], p) for p, c in zip(probs, classes, strict=True)]
        return results

    def _generate(
        self, pixels: torch.Tensor | ProcessorInputs, options: CaptionOptions
    ) -> list[CaptionResult]:
        config = generation_config(options, self.model.generation_config)
        config.update(return_dict_in_generate=True, output_scores=True)  # scores for the candidates
        if isinstance(pixels, ProcessorInputs):
            inputs, concept_probs = pixels.on(self.model), None
        else:
            inputs, concept_probs = self._generate_inputs(pixels.to(self.model.device))
        with _seeded(options.seed, self.model.device):
            out = self.model.generate(**inputs, generation_config=config)
        scores, lengths, generated = self._sequence_scores(out, config)
        tokens = [row[:length].tolist() for row, length in zip(generated, lengths.tolist(), strict=True)]
        return self._tagged(self._results(tokens, scores, lengths, options), concept_probs)

    def _generate_inputs(self, pixels: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """generate's inputs; a concept head's encoder runs here, once, so its probabilities give tags."""
        if self.concepts is None:
            return {"pixel_values": pixels}, None
        out = self.model.encoder(pixel_values=pixels)
        states = BaseModelOutput(last_hidden_state=out.last_hidden_state)
        return {"encoder_outputs": states}, out.concept_logits.float().softmax(dim=-1)

    def _results(self, tokens: list[list[int]], scores, lengths, options) -> list[CaptionResult]:
        texts = self.loaded.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        display = caption_text if self.family else format_caption  # a VLM's case is kept
        return _results([display(t) for t in texts], tokens, scores, lengths, options)

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


def _concept_table(encoder_config) -> ConceptTable | None:
    if not getattr(encoder_config, "concept_head", False):
        return None
    return load_concept_table(encoder_config.concept_table)


def _results(
    texts: list[str],
    tokens: list[list[int]],
    scores: torch.Tensor,
    lengths: torch.Tensor,
    options: CaptionOptions,
) -> list[CaptionResult]:
    """Group the N = images x num_return_sequences outputs by image, highest score first.

    A candidate's score is its log-prob / tokens ** length_penalty, as beam search ranks finished beams;
    beam search returns them in that order already, independent samples come unordered and are sorted
    (stably, so ties keep the decoder's order)."""
    per_image, results = options.num_return_sequences, []
    for start in range(0, len(texts), per_image):
        candidates = [
            Candidate(
                texts[r],
                float(scores[r]) / float(lengths[r]) ** options.length_penalty,
                float(scores[r]),
                tokens[r],
            )
            for r in range(start, start + per_image)
        ]
        candidates.sort(key=lambda c: -c.score)
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
