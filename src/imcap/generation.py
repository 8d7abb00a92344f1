"""Caption decoding options: one frozen dataclass in, a transformers `GenerationConfig` out.

We wrap `generate` instead of writing beam search: every option maps onto a GenerationConfig field, and
all cross-field checks live in `CaptionOptions.validate` so that bad settings fail before any model work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import GenerationConfig


class OptionsError(ValueError):
    """Invalid generation settings; the message is one line naming the setting."""


@dataclass(frozen=True)
class CaptionOptions:
    max_new_tokens: int = 24
    min_new_tokens: int = 0
    num_beams: int = 3
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    seed: int | None = None  # sampling only: same seed, same captions

    def validate(self) -> CaptionOptions:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
            (
                self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})",
            ),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.length_penalty == self.length_penalty, "length_penalty must be a number"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (
                self.no_repeat_ngram_size >= 0,
                f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}",
            ),
            (
                self.num_return_sequences >= 1,
                f"num_return_sequences must be >= 1, got {self.num_return_sequences}",
            ),
            (
                self.do_sample or self.num_return_sequences <= self.num_beams,
                f"num_return_sequences ({self.num_return_sequences}) must not exceed "
                f"num_beams ({self.num_beams}) "
                "without sampling",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionsError(message)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def generation_config(options: CaptionOptions, base: GenerationConfig) -> GenerationConfig:
    """The model's own GenerationConfig (special tokens) with our options on top."""
    options.validate()
    config = GenerationConfig.from_dict(base.to_dict())
    config.update(
        max_new_tokens=options.max_new_tokens,
        min_new_tokens=options.min_new_tokens,
        num_beams=options.num_beams,
        length_penalty=options.length_penalty,
        do_sample=options.do_sample,
        temperature=options.temperature if options.do_sample else None,
        top_k=options.top_k if options.do_sample else None,
        top_p=options.top_p if options.do_sample else None,
        repetition_penalty=options.repetition_penalty,
        no_repeat_ngram_size=options.no_repeat_ngram_size,
        num_return_sequences=options.num_return_sequences,
        early_stopping=True,
        max_length=None,
    )
    return config
