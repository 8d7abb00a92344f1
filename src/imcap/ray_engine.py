"""`imcap caption --engine ray`: caption a dataset with a Ray Data pipeline, on one machine or a cluster.

    read (tasks: one per unit)  ->  caption (an actor pool of N Captioners)  ->  write (this process)

Each unit (tar shard, table chunk, chunk of files; imcap.sources) is read by one Ray task into rows of
image bytes. `map_batches` hands batches of rows to a fixed pool of N actors, each holding one
`Captioner` (the model loads once per actor) running torch with cores // N threads, so that actors x
threads = the cluster's cores. Images are decoded and preprocessed inside the actor, by the same
read-ahead pipeline as the local engine (imcap.batch.caption_batches): a JPEG crosses the object store
as its bytes, ~20x smaller than its decoded pixels.

This process (the driver) gathers the results and writes each unit once all its images are back, with
the same writers as the local engine (imcap.datasets_out): the output lives on the driver's disk, a unit
is whole or absent, and a rerun after a crash, SIGKILL or Ctrl-C skips every finished unit and key.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

from tqdm import tqdm

from imcap.batch import clocked, framed, print_failure
from imcap.datasets_out import UnitSink
from imcap.generation import CaptionOptions
from imcap.images import ImageLoadError
from imcap.shards import UnitSummary
from imcap.sources import Unit, read_unit

# tests: seconds to wait after writing each unit, so that a run can be killed between two of them
_UNIT_DELAY = float(os.environ.get("IMCAP_TEST_UNIT_DELAY", "0"))
READ_CPUS = 0.5  # what a read task reserves: reading a shard is I/O, and the actors need the cores


def caption_units_ray(
    loader: dict,
    units: Sequence[Unit],
    sink: UnitSink,
    options: CaptionOptions,
    *,
    workers: int = 1,
    batch_size: int = 16,
    address: str | None = None,
    prefix: str = "",
    suffix: str = "",
    style: str = "sentence",
    progress: bool = True,
    on_failure: Callable[[ImageLoadError], None] | None = None,
) -> UnitSummary:
    """Caption every unit `sink` has not finished with `workers` Captioner actors on Ray.

    `loader`: Captioner.from_pretrained's keyword arguments (each actor loads its own model). Joins the
    Ray cluster at `address` ("auto", "ray://HOST:10001"), or starts a local one with this machine's
    cores (or uses the one this process already started: tests do, with ray.init(num_cpus=2)).
    `summary.startup_seconds` is the time to start or join Ray, apart from the captioning time.
    """
    import ray

    started = time.monotonic()
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    startup = time.monotonic() - started
    try:
        summary = _run(
            loader, units, sink, options, workers, batch_size, (prefix, suffix, style), progress, on_failure
        )
    finally:
        if owns:
            ray.shutdown()
    summary.startup_seconds = startup
    return summary


def _run(loader, units, sink, options, workers, batch_size, framing, progress, on_failure) -> UnitSummary:
    import ray

    report = on_failure or print_failure
    pending = sink.pending(units)
    summary, started = UnitSummary(skipped_units=len(units) - len(pending)), time.monotonic()
    done = sink.done_keys if isinstance(sink.done_keys, frozenset) else frozenset()
    if pending:
        dataset = _pipeline(ray, loader, pending, done, options, workers, batch_size)
    bar = tqdm(unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    gathered: dict[int, dict[int, tuple]] = defaultdict(dict)  # unit -> index -> (key, result)
    seen: dict[int, int] = defaultdict(int)  # unit -> rows back (captioned or failed)
    with bar, clocked(summary, started):
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy") if pending else ():
            for unit, index, total, key, where, error, result in zip(
                batch["unit"],
                batch["index"],
                batch["total"],
                batch["key"],
                batch["where"],
                batch["error"],
                batch["result"],
                strict=True,
            ):
                unit, index = int(unit), int(index)
                if not summary.first_result_seconds:
                    summary.first_result_seconds = time.monotonic() - started
                if error:
                    failure = ImageLoadError(where, error)
                    summary.failed.append(failure)
                    report(failure)
                else:
                    gathered[unit][index] = (str(key), framed(pickle.loads(result), *framing))
                seen[unit] += 1
                if seen[unit] == total:
                    found = gathered.pop(unit, {})
                    rows = [found[i] for i in sorted(found)]
                    sink.write_unit(pending[unit], rows)
                    summary.captioned += len(rows)
                    time.sleep(_UNIT_DELAY)
                bar.update(1)
        for number, unit in enumerate(pending):  # units with nothing left to caption: an empty part
            if number not in seen:
                sink.write_unit(unit, [])
    return summary


def _pipeline(ray, loader, pending, done, options, workers, batch_size):
    """The Ray Data dataset of captioned rows: read tasks, then the actor pool."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # imcap's own bar counts images
    context.print_on_execution_start = False
    cpus = ray.cluster_resources().get("CPU", 1.0)
    threads = max(1, int(cpus) // workers)
    # the actors share the cores, less what one read task holds, so that reads can always run
    actor_cpus = max(0.1, min(float(threads), (cpus - READ_CPUS) / workers))
    units = ray.data.from_items([{"unit": i} for i in range(len(pending))], override_num_blocks=len(pending))
    rows = units.flat_map(_ReadUnit(pending, done), num_cpus=READ_CPUS)
    return rows.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"loader": loader, "options": options, "threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),  # `concurrency=N`, without the deprecation
        num_cpus=actor_cpus,
    )


class _ReadUnit:
    """A read task: one unit's images as rows (bytes, or the reason they could not be read)."""

    def __init__(self, units: Sequence[Unit], done: frozenset[str]):
        self.units, self.done = units, done

    def __call__(self, row: dict) -> list[dict]:
        unit = self.units[row["unit"]]
        items = list(read_unit(unit, self.done))
        return [
            {
                "unit": row["unit"],
                "index": index,
                "total": len(items),
                "key": item.key,
                "where": item.where(unit),
                "data": item.data or b"",
                "error": item.error or ("" if item.data else "no image"),
            }
            for index, item in enumerate(items)
        ]


class CaptionActor:
    """One Captioner in a Ray actor: a batch of rows in, each with its pickled CaptionResult or error."""

    def __init__(self, loader: dict, options: CaptionOptions, threads: int):
        import os

        import torch

        from imcap.captioner import Captioner

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))
        self.captioner = Captioner.from_pretrained(**loader)
        self.options = options

    def __call__(self, batch: dict) -> dict:
        from imcap.batch import caption_batches
        from imcap.images import decode_image

        errors = {i: str(e) for i, e in enumerate(batch["error"]) if e}
        results: dict[int, bytes] = {}

        def load(i: int):
            if i in errors:
                raise ImageLoadError(batch["where"][i], errors[i])
            try:
                return decode_image(batch["data"][i], batch["where"][i], self.captioner.max_pixels)
            except ImageLoadError as error:
                errors[i] = error.reason
                raise

        indices = list(range(len(batch["key"])))
        for done in caption_batches(self.captioner, indices, self.options, max(1, len(indices)), load=load):
            results.update((i, pickle.dumps(r)) for i, r in zip(done.paths, done.results, strict=True))
        return {
            "unit": batch["unit"],
            "index": batch["index"],
            "total": batch["total"],
            "key": batch["key"],
            "where": batch["where"],
            "error": [errors.get(i, "") for i in indices],
            "result": [results.get(i, b"") for i in indices],
        }
