"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and a fast CIDEr-D reward.

`score_captions` runs the official COCO caption evaluation code (`pycocoevalcap`) exactly as
the COCO server does: PTB tokenisation of both sides, then Bleu(4), Meteor, Rouge and Cider.
The PTB tokenizer and METEOR are Java programs, so Java must be installed.

SPICE is deliberately not computed: it needs Stanford CoreNLP models that pycocoevalcap
downloads on first use, and this package must work offline.

`CiderD` is an in-process re-implementation of the same CIDEr-D formula for self-critical
training rewards, where thousands of calls rule out starting Java.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import string
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

__all__ = ["METRIC_NAMES", "CiderD", "MetricsError", "corpus_stats", "score_captions", "simple_tokenize"]

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

JAVA_HINT = "METEOR and the PTB tokenizer need Java: apt-get install -y default-jre-headless"

# CIDEr-D settings of pycocoevalcap and of the SCST paper: 1..4-grams, Gaussian length penalty.
_CIDER_N = 4
_CIDER_SIGMA = 6.0

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


class MetricsError(RuntimeError):
    """Metrics cannot be computed; the message is a one-line explanation for the user."""


# --------------------------------------------------------------------------- COCO metrics


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
) -> dict[str, float]:
    """Corpus-level COCO caption metrics of `predictions` against `references`.

    Both mappings are keyed by image id and must have the same keys; every image needs at least
    one reference. Captions are PTB-tokenised (lowercased, punctuation removed) exactly as the
    COCO evaluation does. Returns the metrics of `METRIC_NAMES` on pycocoevalcap's scale (0-1,
    CIDEr can exceed 1). `meteor=False` skips METEOR, the slowest metric (its JVM takes seconds
    to start), and leaves the "METEOR" key out.

    Raises MetricsError on bad input, missing Java or a failing Java subprocess.
    """
    image_ids = _validate(predictions, references)
    if shutil.which("java") is None:
        raise MetricsError(JAVA_HINT)
    # Same input format and two separate tokenizer calls as pycocoevalcap's COCOEvalCap.evaluate.
    gts = _ptb_tokenize({i: [{"caption": c} for c in references[i]] for i in image_ids})
    res = _ptb_tokenize({i: [{"caption": predictions[i]}] for i in image_ids})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 only prints counts
    scores = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor:
        scores["METEOR"] = _meteor_score(gts, res)
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    # pycocoevalcap's Cider is CIDEr-D (clipped n-gram counts, Gaussian length penalty, x10),
    # the variant reported as "CIDEr" by the COCO leaderboard and papers.
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in METRIC_NAMES if name in scores}


def _validate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    """Check the inputs and return the image ids in a fixed order."""
    missing_pred = [i for i in references if i not in predictions]
    missing_ref = [i for i in predictions if i not in references]
    if missing_pred or missing_ref:
        example = (missing_pred or missing_ref)[0]
        raise MetricsError(
            "predictions and references must have the same image ids: "
            f"{len(missing_pred)} missing from predictions, {len(missing_ref)} missing from "
            f"references (e.g. {example!r})"
        )
    if not references:
        raise MetricsError("no captions to score: predictions and references are empty")
    # A bare string would be iterated character by character as if each were a reference.
    bad = [i for i, refs in references.items() if isinstance(refs, str) or len(refs) == 0]
    if bad:
        raise MetricsError(
            f"{len(bad)} image(s) have no list of reference captions (e.g. {bad[0]!r}); "
            "every image needs at least one reference"
        )
    return list(references)


def _ptb_tokenize(captions: dict[str, list[dict[str, str]]]) -> dict[str, list[str]]:
    """PTBTokenizer.tokenize, quiet, turning its silent failures into MetricsError."""
    with _java_stderr() as java_said:  # "PTBTokenizer tokenized 51270 tokens at ..." on every call
        try:
            tokenized = PTBTokenizer().tokenize(captions)
        except OSError as exc:  # e.g. its temp file is written next to the jar, in site-packages
            raise MetricsError(f"PTB tokenizer failed: {exc}") from exc
    # When Java fails it prints nothing and pycocoevalcap returns a partial dict.
    if tokenized.keys() != captions.keys() or any(len(tokenized[i]) != len(captions[i]) for i in captions):
        said = java_said()
        raise MetricsError("PTB tokenizer (Java) returned incomplete output" + (f": {said}" if said else ""))
    return tokenized


@contextlib.contextmanager
def _java_stderr():
    """Send what subprocesses write to stderr (file descriptor 2) to a temporary file while the block
    runs; yields a function giving its last line. pycocoevalcap's Java tools inherit our stderr and
    report progress there."""
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)

        def last_line() -> str:
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").strip().splitlines()
            return lines[-1] if lines else ""

        try:
            yield last_line
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus METEOR from a fresh METEOR JVM that is always shut down afterwards."""
    scorer = _start_meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as exc:  # dead JVM: broken pipe, or "" read back as a score
        raise MetricsError(f"METEOR subprocess failed: {exc!r}") from exc
    finally:
        _close_meteor(scorer)
    return float(score)


def _start_meteor() -> Meteor:
    """Start pycocoevalcap's METEOR wrapper (java -jar meteor-1.5.jar -stdio)."""
    try:
        return Meteor()
    except OSError as exc:
        raise MetricsError(f"cannot start METEOR: {exc}; {JAVA_HINT}") from exc


def _close_meteor(scorer: Meteor) -> None:
    """Stop the METEOR JVM now instead of relying on `Meteor.__del__`.

    pycocoevalcap 1.2's Meteor has no close(): its __del__ kills the JVM only whenever the
    object happens to be garbage-collected. Worse, compute_score acquires `self.lock` without
    try/finally, so after any error the lock stays held and __del__ (which acquires it again)
    deadlocks at garbage collection or interpreter exit. Idempotent.
    """
    proc = scorer.meteor_p
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()  # no-op if it already exited
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    # A fresh lock lets the later __del__ run to completion (on a dead process: a no-op).
    scorer.lock = threading.Lock()


# --------------------------------------------------------------------------- corpus statistics


def _normalize_caption(caption: str) -> str:
    text = " ".join(caption.lower().split())
    return text.removesuffix(".").rstrip()


def corpus_stats(predictions: Mapping[str, str]) -> dict[str, int]:
    """Number of images and of distinct predicted captions (a measure of caption diversity).

    Captions count as equal after lowercasing, collapsing whitespace runs to one space, and
    stripping one trailing "." or " ." (so "A dog ." == "a  dog." == "a dog").
    """
    distinct = {_normalize_caption(c) for c in predictions.values()}
    return {"n_images": len(predictions), "distinct_captions": len(distinct)}


# --------------------------------------------------------------------------- CIDEr-D reward


def simple_tokenize(text: str) -> str:
    """Lowercase, delete ASCII punctuation, split on whitespace; tokens joined by single spaces.

    A fast approximation of the PTB tokenisation used by `score_captions` (which needs Java):
    identical for plain captions, different for e.g. "dog's" ("dogs" here, "dog 's" in PTB).
    It is the preprocessing of the usual Karpathy-split COCO captions used by SCST code.
    """
    return " ".join(text.lower().translate(_PUNCTUATION_TABLE).split())


# A cooked caption: per n-gram order, the tf-idf vector, its norm, and the length used for
# the Gaussian penalty.
_Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


class CiderD:
    """Per-caption CIDEr-D against a fixed reference corpus, in-process (no Java, no subprocess).

    Document frequencies of 1..4-grams are computed once over the whole reference corpus
    (an image's references form one document), as in the SCST paper and self-critical.pytorch's
    `CiderD(df="corpus")`; the formula is pycocoevalcap's cider_scorer.py (clipped tf-idf
    cosine, Gaussian length penalty sigma=6, mean over n and references, x10). With the corpus
    equal to the scored images it reproduces pycocoevalcap's Cider on pre-tokenised captions.
    Captions are tokenised with `simple_tokenize`.
    """

    def __init__(self, references: Mapping[str, Sequence[str]]) -> None:
        if not references:
            raise MetricsError("CiderD needs a non-empty reference corpus")
        self._refs: dict[str, list[str]] = {}
        for image_id, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise MetricsError(f"CiderD: image {image_id!r} has no list of reference captions")
            self._refs[image_id] = [simple_tokenize(r) for r in refs]
        self._df = self._document_frequency(self._refs.values())
        # log(number of documents): the idf of an n-gram seen in no document.
        self._ref_len = math.log(float(len(self._refs)))
        self._cooked: dict[str, list[_Vector]] = {}

    @staticmethod
    def _document_frequency(corpus: Iterable[list[str]]) -> dict[tuple[str, ...], int]:
        """Number of documents (images) whose references contain each n-gram."""
        df: dict[tuple[str, ...], int] = defaultdict(int)
        for refs in corpus:
            for ngram in {g for ref in refs for g in precook(ref, _CIDER_N)}:
                df[ngram] += 1
        return dict(df)

    def scores(self, candidates: Sequence[str], image_ids: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each candidate caption against the references of its image id.

        `candidates[k]` is scored against `image_ids[k]`'s references (several candidates may
        share an image). Returns a float64 array of len(candidates); an empty caption scores 0.
        """
        if len(candidates) != len(image_ids):
            raise MetricsError(f"CiderD: {len(candidates)} candidates but {len(image_ids)} image ids")
        out = np.zeros(len(candidates), dtype=np.float64)
        for k, (caption, image_id) in enumerate(zip(candidates, image_ids, strict=True)):
            hyp = self._vectorize(precook(simple_tokenize(caption), _CIDER_N))
            out[k] = self._score(hyp, self._cooked_refs(image_id))
        return out

    def _cooked_refs(self, image_id: str) -> list[_Vector]:
        cooked = self._cooked.get(image_id)
        if cooked is None:
            if image_id not in self._refs:
                raise MetricsError(f"CiderD: image id {image_id!r} is not in the reference corpus")
            cooked = [self._vectorize(precook(r, _CIDER_N)) for r in self._refs[image_id]]
            self._cooked[image_id] = cooked
        return cooked

    def _vectorize(self, counts: Mapping[tuple[str, ...], int]) -> _Vector:
        """pycocoevalcap's counts2vec: tf-idf vector per n-gram order, norms and length."""
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_N)]
        norm = [0.0] * _CIDER_N
        length = 0
        for ngram, term_freq in counts.items():
            order = len(ngram) - 1
            weight = float(term_freq) * (self._ref_len - math.log(max(1.0, self._df.get(ngram, 0.0))))
            vec[order][ngram] = weight
            norm[order] += weight * weight
            # pycocoevalcap counts *bigrams* here (order index 1); kept to match its scores.
            if order == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    @staticmethod
    def _score(hyp: _Vector, refs: list[_Vector]) -> float:
        """pycocoevalcap's sim() summed over references, averaged over orders and refs, x10."""
        vec, norm, length = hyp
        total = 0.0
        for vec_ref, norm_ref, length_ref in refs:
            delta = float(length - length_ref)
            penalty = math.exp(-(delta**2) / (2 * _CIDER_SIGMA**2))
            for order in range(_CIDER_N):
                ref_order = vec_ref[order]
                # Clipping: a candidate weight counts at most up to the reference's weight.
                val = sum(
                    min(w, ref_order.get(g, 0.0)) * ref_order.get(g, 0.0) for g, w in vec[order].items()
                )
                if norm[order] != 0 and norm_ref[order] != 0:
                    val /= norm[order] * norm_ref[order]
                total += val * penalty
        return total / _CIDER_N / len(refs) * 10.0


class SentenceBleu4:
    """Per-caption BLEU-4 against each image's references: pycocoevalcap's BleuScorer at sentence level
    (its per-image list; closest reference length for the brevity penalty). An SCST reward term beside
    CIDEr-D: BLEU rewards exact 4-gram matches and penalises short captions, which CIDEr-D's tf-idf
    weighting and length Gaussian count differently. Captions are tokenised with `simple_tokenize`."""

    def __init__(self, references: Mapping[str, Sequence[str]]) -> None:
        if not references:
            raise MetricsError("SentenceBleu4 needs a non-empty reference corpus")
        self._refs = {image_id: [simple_tokenize(r) for r in refs] for image_id, refs in references.items()}

    def scores(self, candidates: Sequence[str], image_ids: Sequence[str]) -> np.ndarray:
        """BLEU-4 of each candidate against its image's references; an empty caption scores 0."""
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        if len(candidates) != len(image_ids):
            raise MetricsError(f"SentenceBleu4: {len(candidates)} candidates but {len(image_ids)} image ids")
        out = np.zeros(len(candidates), dtype=np.float64)
        scored = [k for k, caption in enumerate(candidates) if simple_tokenize(caption)]
        if not scored:
            return out
        scorer = BleuScorer(n=4)
        for k in scored:
            if image_ids[k] not in self._refs:
                raise MetricsError(f"SentenceBleu4: image id {image_ids[k]!r} is not in the reference corpus")
            scorer += (simple_tokenize(candidates[k]), self._refs[image_ids[k]])
        _, per_sentence = scorer.compute_score(option="closest", verbose=0)
        out[scored] = per_sentence[3]
        return out
