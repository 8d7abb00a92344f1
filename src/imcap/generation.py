"""Caption decoding options: one frozen dataclass in, a transformers `GenerationConfig` out.

We wrap `generate` instead of writing beam search: every option maps onto a GenerationConfig field, and
all cross-field checks live in `CaptionOptions.validate` so that bad settings fail, with a one-line
message, before any model work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GenerationConfig

DEFAULT_BEAMS = 3  # beam width of deterministic decoding when none is given
_SAMPLING_ONLY = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # option -> its no-op value


class OptionsError(ValueError):
    """Invalid generation settings; the message is one line naming the setting."""


@dataclass(frozen=True)
class CaptionOptions:
    """How to decode captions. Defaults: beam search with 3 beams, one caption per image.

    Greedy (num_beams=1) and beam search are deterministic. Sampling (do_sample=True) draws from the
    model's distribution, reshaped by temperature, top_k (0: off) and top_p (1: off), with one beam unless
    num_beams is given: num_return_sequences=N then means N independent samples. With a seed it is
    reproducible per image, whatever the batch.
    """

    max_new_tokens: int = 24
    min_new_tokens: int = 0
    num_beams: int | None = None  # None: DEFAULT_BEAMS for search, 1 (plain sampling) with do_sample
    length_penalty: float = 1.0  # beam search ranks beams by log-prob / length**length_penalty
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # never repeat an n-gram of this size (0: off); None: the model's own setting, from its
    # generation_config.json (`for_model`): 3 for the shipped model, whose beam search otherwise writes "A
    # black dog is playing with a black dog." (2% of val captions; README, "Decoding"), 0 for most others
    no_repeat_ngram_size: int | None = None
    num_return_sequences: int = 1
    seed: int | None = None  # sampling only: same seed, same captions
    # models with a concept head (the shipped one): make the caption name a confident ImageNet concept
    # it would otherwise miss, by constrained beam search (imcap.guidance); False decodes unguided
    guide: bool = True
    # models that take a prompt (imcap.families): a chat model's instruction, BLIP's caption start,
    # Florence-2's task token; None: the model's default (none, or a short captioning instruction)
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.num_beams is None:  # frozen: set once, here, so that every reader sees a number
            object.__setattr__(self, "num_beams", 1 if self.do_sample is True else DEFAULT_BEAMS)

    def validate(self) -> CaptionOptions:
        """Raise OptionsError (one line) on the first bad setting; return self when all are fine."""
        for checks in (self._type_checks, self._range_checks, self._combination_checks):  # types first
            for ok, message in checks():
                if not ok:
                    raise OptionsError(message)
        return self

    def for_model(self, base: GenerationConfig) -> CaptionOptions:
        """These options with the settings left to the model (None) taken from its GenerationConfig."""
        if self.no_repeat_ngram_size is not None:
            return self
        return replace(self, no_repeat_ngram_size=base.no_repeat_ngram_size or 0)

    def to_dict(self) -> dict:
        """Every setting; `prompt` only when one is given, so rows and answers of models without prompts
        read as before (and resume files written before prompts existed)."""
        values = asdict(self)
        if values["prompt"] is None:
            del values["prompt"]
        return values

    def _type_checks(self) -> list[tuple[bool, str]]:
        checks = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int" or (field.type == "int | None" and value is not None):
                ok = isinstance(value, int) and not isinstance(value, bool)
                checks.append((ok, f"{field.name} must be a whole number, got {value!r}"))
            elif field.type == "float":
                ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                checks.append((ok, f"{field.name} must be a finite number, got {value!r}"))
            elif field.type == "str | None" and value is not None:
                checks.append((isinstance(value, str), f"{field.name} must be text, got {value!r}"))
            elif field.type == "bool":
                checks.append((isinstance(value, bool), f"{field.name} must be true or false, got {value!r}"))
        return checks

    def _range_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                self.no_repeat_ngram_size is None or self.no_repeat_ngram_size >= 0,
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}",
            ),
            (
                self.num_return_sequences >= 1,
                f"num_return_sequences must be >= 1, got {self.num_return_sequences}",
            ),
            (self.seed is None or self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.prompt is None or self.prompt.strip() != "", "prompt must not be empty"),
        ]

    def _combination_checks(self) -> list[tuple[bool, str]]:
        checks = [
            (
                self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})",
            ),
            (
                # several captions come from several beams, or from sampling; beam search (even with
                # sampling) returns at most num_beams of them
                self.num_return_sequences <= self.num_beams or (self.do_sample and self.num_beams == 1),
                f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams "
                f"({self.num_beams}) unless sampling with num_beams=1",
            ),
            (
                self.length_penalty == 1.0 or self.num_beams > 1,
                f"length_penalty ({self.length_penalty}) only applies to beam search (num_beams > 1)",
            ),
        ]
        for name, no_op in _SAMPLING_ONLY.items():
            value = getattr(self, name)
            checks.append((self.do_sample or value == no_op, f"{name} ({value}) only applies with do_sample"))
        return checks


def check_fits(options: CaptionOptions, max_tokens: int | None) -> None:
    """Raise OptionsError when the model cannot produce max_new_tokens (its position embeddings end)."""
    if max_tokens is not None and options.max_new_tokens > max_tokens:
        raise OptionsError(
            f"max_new_tokens ({options.max_new_tokens}) exceeds what this model can generate ({max_tokens})"
        )


def generation_config(options: CaptionOptions, base: GenerationConfig) -> GenerationConfig:
    """The model's own GenerationConfig (special tokens) with our options on top."""
    from transformers import GenerationConfig  # here, not at the top: `imcap --help` needs no torch

    options = options.validate().for_model(base)
    config = GenerationConfig.from_dict(base.to_dict())
    beams, sampling = options.num_beams > 1, options.do_sample
    config.update(
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=options.min_new_tokens,
        num_beams=options.num_beams,
        length_penalty=options.length_penalty if beams else None,
        early_stopping=True if beams else None,
        do_sample=sampling,
        temperature=options.temperature if sampling else None,
        top_k=options.top_k if sampling else None,
        top_p=options.top_p if sampling else None,
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        num_return_sequences=options.num_return_sequences,
        max_length=None,
    )
    return config
