"""`imcap eval`: caption a dataset split and score it with the COCO caption metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from imcap.batch import caption_batches
from imcap.captioner import Captioner
from imcap.data import load_records
from imcap.generation import CaptionOptions


@dataclass
class EvalReport:
    metrics: dict[str, float]  # BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D), on pycocoevalcap's 0-1 scale
    n_images: int
    distinct_captions: int
    predictions: dict[str, str]
    settings: dict

    def to_json(self) -> dict:
        return {
            **self.metrics,
            "n_images": self.n_images,
            "distinct_captions": self.distinct_captions,
            "settings": self.settings,
        }


def evaluate(
    captioner: Captioner,
    data: str | Path,
    split: str,
    options: CaptionOptions | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    meteor: bool = True,
) -> EvalReport:
    """Caption every image of `split` in `data` (any layout `imcap.data` reads) and score the captions."""
    from imcap.metrics import corpus_stats, score_captions  # needs the [train] extra and Java

    options = captioner.resolved((options or CaptionOptions()).validate())
    records = load_records(data, split)[:limit]
    predictions, started = {}, time.time()
    images = [record.image for record in records]
    with tqdm(total=len(images), desc=f"captioning {split}", unit="img") as bar:
        for batch in caption_batches(captioner, images, options, batch_size):
            if batch.failed:  # a metric over a partial split would not compare with anything
                raise batch.failed[0]
            predictions.update(
                (str(path), result.caption) for path, result in zip(batch.paths, batch.results, strict=True)
            )
            bar.update(len(batch.paths))
    seconds = time.time() - started
    references = {str(r.image): list(r.captions) for r in records}
    metrics = score_captions(predictions, references, meteor=meteor)
    stats = corpus_stats(predictions)
    settings = {
        "model": captioner.name,
        "data": str(data),
        "split": split,
        "limit": limit,
        **options.to_dict(),
        "captioning_seconds": round(seconds, 1),
    }
    return EvalReport(metrics, stats["n_images"], stats["distinct_captions"], predictions, settings)
