"""Caption a dataset unit by unit on this machine (the local engine): tar shards, table chunks, files.

Each unit's images go through imcap.batch's read-ahead pipeline; when the unit is done its rows are
written at once (imcap.datasets_out), so a kill loses at most the units in flight, and a rerun skips
every finished unit and every key already written. `imcap.ray_engine` does the same across a Ray cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from PIL import Image
from tqdm import tqdm

from imcap.batch import BatchSummary, caption_batches, clocked, framed, print_failure
from imcap.captioner import Captioner
from imcap.datasets_out import UnitSink
from imcap.generation import CaptionOptions
from imcap.images import ImageLoadError, decode_image
from imcap.sources import Item, Unit, read_unit


@dataclass
class UnitSummary(BatchSummary):
    skipped_units: int = 0  # finished by an earlier run
    startup_seconds: float = 0.0  # Ray: starting (or joining) the cluster, before any image
    first_result_seconds: float = 0.0  # Ray: from the start to the first image back (actors loading)

    def line(self) -> str:
        rate = (
            f" ({self.captioned / self.seconds:.1f} images/s)" if self.seconds > 0 and self.captioned else ""
        )
        startup = f", after {self.startup_seconds:.1f} s starting Ray" if self.startup_seconds else ""
        return (
            f"captioned {self.captioned}, skipped {self.skipped_units} units (already done), "
            f"failed {len(self.failed)} in {self.seconds:.1f} s{rate}{startup}"
        )


def load_item(unit: Unit, item: Item, max_pixels: int | None) -> Image.Image:
    """An item's picture; ImageLoadError naming the shard and key (or the file) for a bad one."""
    if item.error is not None or item.data is None:
        raise ImageLoadError(item.where(unit), item.error or "no image")
    return decode_image(item.data, item.where(unit), max_pixels)


def caption_units(
    captioner: Captioner,
    units: Sequence[Unit],
    sink: UnitSink,
    options: CaptionOptions,
    batch_size: int = 16,
    prefix: str = "",
    suffix: str = "",
    style: str = "sentence",
    progress: bool = True,
    on_failure: Callable[[ImageLoadError], None] | None = None,
) -> BatchSummary:
    """Caption every unit `sink` has not finished, writing each unit's rows when it is complete.

    Keys the sink already holds are skipped (counted in `skipped`, with the units already finished as
    their own count). A bad image is reported to `on_failure` and costs only itself. Ctrl-C raises
    BatchInterrupted; the unit being captioned is redone by the next run.
    """
    report = on_failure or print_failure
    pending = sink.pending(units)
    summary = UnitSummary(skipped_units=len(units) - len(pending))
    bar = tqdm(unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    with bar, clocked(summary):
        for unit in pending:
            items = list(read_unit(unit, sink.done_keys))
            rows = []
            load = partial(load_item, unit, max_pixels=captioner.max_pixels)
            for batch in caption_batches(captioner, items, options, batch_size, load=load):
                for error in batch.failed:
                    summary.failed.append(error)
                    report(error)
                for item, result in zip(batch.paths, batch.results, strict=True):
                    rows.append((item.key, framed(result, prefix, suffix, style)))
                bar.update(len(batch.paths) + len(batch.failed))
            sink.write_unit(unit, rows)
            summary.captioned += len(rows)
    return summary
