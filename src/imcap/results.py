"""What captioning returns: plain dataclasses, importable without torch (the CLI's writers use them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Candidate:
    """One caption of an image.

    `logprob` is the log-probability of the caption's tokens (end-of-text included) under the distribution
    decoding drew from: the model's own for greedy and beam search, reshaped by temperature/top-k/top-p
    when sampling. `score` is what ranks candidates: logprob / tokens ** length_penalty, the quantity beam
    search keeps its best beams by (length_penalty is 1 for greedy and sampling: the mean per token).
    """

    text: str
    score: float
    logprob: float
    tokens: list[int] = field(default_factory=list, repr=False)  # generated ids, end-of-text included


@dataclass
class Tag:
    """One ImageNet concept the encoder's classifier head sees in the image (imcap.concepts)."""

    label: str  # the class's readable name, e.g. "Siberian husky"
    score: float  # its probability under the head, 0..1


MAX_TAGS = 20  # results carry at most this many tags; outputs show as many as asked (--tags K)


@dataclass
class CaptionResult:
    caption: str  # the best candidate's text
    candidates: list[Candidate]  # highest score first
    options: dict = field(default_factory=dict)  # the CaptionOptions used, as a dict
    # the top ImageNet concepts, most probable first (empty for models without a concept head)
    tags: list[Tag] = field(default_factory=list)

    @property
    def score(self) -> float:
        return self.candidates[0].score

    @property
    def logprob(self) -> float:
        return self.candidates[0].logprob
