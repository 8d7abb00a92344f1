"""What every output shares: the row a result becomes (the names the REST API uses too), caption
styles, the `Writer` interface and the one-line `OutputError`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from imcap.results import Candidate, CaptionResult, Tag

# sentence: "A dog runs on the beach." (alt text); plain: "a dog runs on the beach" (training captions,
# where a prefix, suffix or tag list follows and a full stop mid-text is noise)
CAPTION_STYLES = ("sentence", "plain")


class OutputError(ValueError):
    """An output that cannot be written or resumed; the message is one line saying what to do."""


def row_dict(path: str, result: CaptionResult, model: str, settings: dict, tags: int = 0) -> dict:
    """One output row: the image, its best caption with its score (what ranks candidates) and log-prob,
    every candidate, its top `tags` tags (only when tags > 0), the model and settings. The REST API
    answers with the same names (imcap.serving.schemas)."""
    row = {
        "path": path,
        "caption": result.caption,
        "score": _score(result.score),
        "logprob": _score(result.logprob),
        "candidates": [candidate_dict(c) for c in result.candidates],
    }
    if tags:
        row["tags"] = [tag_dict(t) for t in result.tags[:tags]]
    return {**row, "model": model, "settings": settings}


def styled(text: str, style: str) -> str:
    """A caption in one of CAPTION_STYLES (captions come as sentences)."""
    if style == "sentence" or not text:
        return text
    text = text.removesuffix(".")
    keeps_case = len(text) > 1 and text[1].isupper()  # "TV on a table" stays, "A dog" -> "a dog"
    return text if keeps_case else text[0].lower() + text[1:]


def candidate_dict(candidate: Candidate) -> dict:
    return {"text": candidate.text, "score": _score(candidate.score), "logprob": _score(candidate.logprob)}


def tag_dict(tag: Tag) -> dict:
    return {"label": tag.label, "score": _score(tag.score)}


def _score(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None  # JSON has no -inf


def tag_labels(tags: Sequence[Tag], lower: bool = False) -> str:
    """Tags as taggers write them: `tabby, tiger cat`."""
    return ", ".join(t.label.lower() if lower else t.label for t in tags)


class Writer:
    """Where captions go. `is_done` tells which images an earlier run finished; `write` takes one batch.

    `tags` is how many of each result's tags to write (0: none, and the output is as without tags).
    """

    tags: int = 0

    def is_done(self, image: Path) -> bool:
        return False

    def write(self, rows: list[tuple[str, CaptionResult]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
