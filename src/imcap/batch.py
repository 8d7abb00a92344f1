"""Caption many images: find the files, skip those an earlier run finished, caption the rest in batches.

A bad file costs only itself: each batch is decoded file by file first, failures are reported (path and
reason) and the good images go through the model together. Where results go is `imcap.writers`.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from imcap.captioner import Captioner, CaptionResult, Drafted
from imcap.engine import Encoded
from imcap.generation import CaptionOptions
from imcap.images import IMAGE_SUFFIXES, ImageLoadError, load_image
from imcap.writers import Writer, styled

# caption_batches pools guidance rewrites (imcap.rewrites) until this many images wait to be rewritten, or
# MAX_HELD_BATCHES batches wait for them
REWRITE_POOL = 16
MAX_HELD_BATCHES = 8
# batches the reading workers encode ahead of the decoder: four, so that they keep working while it runs a
# pool's rewrites (with two, guided captioning of 400 val photos took 42.2 s against 38.4, unguided the same)
READ_AHEAD_BATCHES = 4
_Held = tuple[list, "Drafted | None", list]  # a batch's items, first pass (None: no image read), failures


def find_images(items: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Files as given, folders as their image files (sorted; hidden ones skipped), globs expanded.

    Each file appears once, in the order found. Missing files and globs matching nothing raise
    FileNotFoundError.
    """
    found: dict[str, Path] = {}
    for item in map(str, items):
        matches = sorted(glob.glob(item, recursive=recursive)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"{item}: no file matches")
        for match in map(Path, matches):
            if match.is_dir():
                paths = _folder_images(match, recursive)
            elif match.exists() or match.is_symlink():  # a dangling link is reported as a bad image
                paths = [match]
            else:
                raise FileNotFoundError(f"{match}: no such file or folder")
            for path in paths:
                found.setdefault(os.path.abspath(path), path)
    return list(found.values())


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        paths += [
            Path(root) / f
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(paths, key=lambda p: p.parts)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `caption_files`: the batches written so far are complete; `summary` counts them."""

    def __init__(self, summary: BatchSummary):
        super().__init__(summary.line())
        self.summary = summary


@dataclass
class BatchSummary:
    captioned: int = 0
    skipped: int = 0  # already done by an earlier run
    failed: list[ImageLoadError] = field(default_factory=list)  # each names its file and the reason
    seconds: float = 0.0

    def line(self) -> str:
        rate = (
            f" ({self.captioned / self.seconds:.1f} images/s)" if self.seconds > 0 and self.captioned else ""
        )
        return (
            f"captioned {self.captioned}, skipped {self.skipped} (already done), failed {len(self.failed)}"
            f" in {self.seconds:.1f} s{rate}"
        )


def caption_files(
    captioner: Captioner,
    images: Sequence[Path],
    writer: Writer,
    options: CaptionOptions,
    batch_size: int = 8,
    prefix: str = "",
    suffix: str = "",
    progress: bool = True,
    on_failure: Callable[[ImageLoadError], None] | None = None,
    style: str = "sentence",
) -> BatchSummary:
    """Caption every image that `writer` does not have yet, `batch_size` at a time.

    A bad file (reported to `on_failure`, by default on stderr) costs only itself; each batch's results
    are written at once. Captions are written in `style` (imcap.writers.CAPTION_STYLES), between `prefix`
    and `suffix`. Ctrl-C raises BatchInterrupted once the batch being written (if any) is complete.
    """
    report = on_failure or print_failure
    pending = [image for image in images if not writer.is_done(image)]
    summary = BatchSummary(skipped=len(images) - len(pending))
    bar = tqdm(total=len(pending), unit="img", desc="captioning", disable=not progress, file=sys.stderr)
    # writes are whole batches (see imcap.writers), so after Ctrl-C a rerun resumes after the last one
    with bar, clocked(summary):
        for batch in caption_batches(captioner, pending, options, batch_size):
            for error in batch.failed:
                summary.failed.append(error)
                report(error)
            results = [framed(result, prefix, suffix, style) for result in batch.results]
            if results:
                rows = [(str(path), result) for path, result in zip(batch.paths, results, strict=True)]
                writer.write(rows)
            summary.captioned += len(results)
            bar.update(len(batch.paths) + len(batch.failed))
    return summary


@contextmanager
def clocked(summary: BatchSummary, started: float | None = None) -> Iterator[None]:
    """Time the block (from `started`, else from now) into `summary.seconds`; Ctrl-C inside it becomes
    BatchInterrupted(summary), so the caller can say how far the run got."""
    started = time.monotonic() if started is None else started
    try:
        yield
    except KeyboardInterrupt:
        summary.seconds = time.monotonic() - started
        raise BatchInterrupted(summary) from None
    summary.seconds = time.monotonic() - started


@dataclass
class CaptionedBatch:
    paths: list[Path]  # the images captioned, in input order
    results: list[CaptionResult]  # one per path
    failed: list[ImageLoadError]  # the images of this batch that could not be read


def caption_batches(
    captioner: Captioner,
    images: Sequence[Path],
    options: CaptionOptions,
    batch_size: int = 16,
    load: Callable[[object], Image.Image] | None = None,
) -> Iterator[CaptionedBatch]:
    """Caption `images` in batches, as a pipeline: worker threads read, preprocess and encode the next
    batches while this thread decodes the captions of the current one.

    Each stage runs with one torch thread and the stages run side by side, one per core: on a small CPU
    that beats running each stage with all cores in turn, because the decoder's many small operations
    cost more in thread start-up and synchronisation than they gain from a second core. Each batch is
    read and encoded in one slice per worker, so the decoder, which waits for the first batch, waits a
    fraction of what one worker would take (the README's 7 example photos: 367 -> 258 ms). A
    Captioner without the engine (processor-based and prefix/LSTM models) pipelines only reading and
    preprocessing. Each file is decoded on its own, so a bad one is only reported. `load` reads other
    kinds of items (imcap.sources: a shard's images as bytes) into pictures, raising ImageLoadError for
    a bad one; `paths` then holds those items.

    Guided batches whose photos guidance decodes again wait until REWRITE_POOL such photos (or
    MAX_HELD_BATCHES batches) do, and are rewritten together (imcap.rewrites) on a thread of their own
    while this one drafts the next batches (`_Finisher`); whatever is held when the last batch comes is
    rewritten beside its first pass. Batches still come out whole and in order, only later. Captions are
    the same as one batch at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = options.validate()  # bad settings fail before any file is read
    split = captioner.uses_engine(options)
    cores = torch.get_num_threads()

    def prepare(chunk: Sequence[Path]) -> tuple[list[Path], torch.Tensor | Encoded | None, list]:
        decoded, failed = _decode_each(chunk, captioner.max_pixels, load)
        pictures = [picture for _, picture in decoded]
        pixels = captioner.pixel_values(pictures, options) if decoded else None
        if split and pixels is not None:
            pixels = captioner.encode(pixels)
        return [path for path, _ in decoded], pixels, failed

    chunks = [images[start : start + batch_size] for start in range(0, len(images), batch_size)]
    if not split:
        with _torch_threads(cores):
            for paths, pixels, failed in _prefetched(prepare, chunks, 1, cores):
                results = captioner.caption_pixels(pixels, options) if pixels is not None else []
                yield CaptionedBatch(paths, results, failed)
        return
    sliced = [slices_of(chunk, cores) for chunk in chunks]
    slices = [part for parts in sliced for part in parts]
    ahead = READ_AHEAD_BATCHES * len(sliced[0]) if sliced else 1
    with (
        _torch_threads(1),
        closing(_prefetched(prepare, slices, cores, 1, ahead=ahead)) as prepared,
        _Finisher(captioner) as finisher,
    ):
        held: list[_Held] = []  # drafted, waiting for pooled rewrites
        for number, parts in enumerate(sliced, 1):
            if number == len(sliced):  # the last batch's first pass runs beside the held rewrites
                finisher.submit(held)
                held = []
            paths, encoded, failed = _joined_slices([next(prepared) for _ in parts])
            held.append((paths, captioner.draft(encoded, options) if encoded is not None else None, failed))
            if _rewrites_due(held):
                finisher.submit(held)
                held = []
            yield from finisher.ready()
        yield from finisher.rest(held)


def _rewrites_due(held: list[_Held]) -> bool:
    """Whether to run the held batches' guidance rewrites now: when there are none (nothing to wait for),
    when REWRITE_POOL images wait, or when MAX_HELD_BATCHES batches do (so that results keep coming)."""
    pending = _pending_rewrites(held)
    return pending == 0 or pending >= REWRITE_POOL or len(held) >= MAX_HELD_BATCHES


def _pending_rewrites(held: list[_Held]) -> int:
    return sum(len(d.draft.rewrite_rows) for d in _drafted(held))


def _drafted(held: list[_Held]) -> list[Drafted]:
    return [d for _, d, _ in held if d is not None]


class _Finisher:
    """Runs pools of held batches' rewrites (`Captioner.finish`) on a thread of its own, one pool after the
    other, while caption_batches' thread drafts the next batches; hands the batches back in order.

    The readers are done before the decoder is, so the last pool's rewrites used to run alone on one core
    while the other sat idle, at the end of every run (and `bench_caption.py` makes a run of every 40
    photos): the pool held when the last batch comes now runs here beside that batch's first pass, and
    the last batch's own rewrites on caption_batches' thread. Alternated four times in one process on 200
    val photos in 40-photo runs, guided kept 0.845 of unguided's images/s, against 0.821 all on one
    thread.
    """

    def __init__(self, captioner: Captioner):
        self.captioner = captioner
        self.queue: deque[tuple[list[_Held], Future]] = deque()  # pools in order, being finished or done
        self.thread = ThreadPoolExecutor(1, "imcap-rewrite", initializer=torch.set_num_threads, initargs=(1,))

    def __enter__(self) -> _Finisher:
        return self

    def __exit__(self, *exc) -> None:
        # stopped early (Ctrl-C, or the caller stopped reading): the pool being rewritten ends, the rest go
        self.thread.shutdown(wait=True, cancel_futures=True)

    def submit(self, held: list[_Held]) -> None:
        """Finish `held` (on the thread, or here at once when it has nothing to rewrite and nothing is
        queued before it: ranking and tags only, so that unguided batches come out as soon as drafted)."""
        if not held:
            return
        drafted = _drafted(held)
        if self.queue or any(d.draft.rewrite_rows for d in drafted):
            finished = self.thread.submit(self.captioner.finish, drafted)
        else:
            finished = Future()
            finished.set_result(self.captioner.finish(drafted))
        self.queue.append((held, finished))

    def ready(self) -> Iterator[CaptionedBatch]:
        """The batches finished so far, in order, up to the first pool still being rewritten."""
        while self.queue and self.queue[0][1].done():
            yield from _batches(*self.queue.popleft())

    def rest(self, held: list[_Held]) -> Iterator[CaptionedBatch]:
        """Every batch left, in order: `held` (the last pool) finished on this thread meanwhile."""
        last = self.captioner.finish(_drafted(held))
        while self.queue:
            yield from _batches(*self.queue.popleft())
        yield from _batches(held, last)


def _batches(held: list[_Held], finished: Future | list[list[CaptionResult]]) -> Iterator[CaptionedBatch]:
    results = iter(finished.result() if isinstance(finished, Future) else finished)
    for paths, d, failed in held:
        yield CaptionedBatch(paths, next(results) if d is not None else [], failed)


def slices_of(items: Sequence, count: int) -> list[Sequence]:
    """`items` in up to `count` contiguous slices of near-equal size."""
    size = math.ceil(len(items) / max(1, min(count, len(items))))
    return [items[start : start + size] for start in range(0, len(items), size)]


def _joined_slices(parts: list[tuple]) -> tuple[list, Encoded | None, list[ImageLoadError]]:
    """What `prepare` made of one batch's slices, as one batch: its paths, encoded images and failures."""
    encoded = [part for _, part, _ in parts if part is not None]
    return (
        [path for paths, _, _ in parts for path in paths],
        Encoded.joined(encoded) if encoded else None,
        [error for _, _, failed in parts for error in failed],
    )


def _prefetched(
    work: Callable, items: Sequence, workers: int = 1, worker_threads: int = 1, ahead: int | None = None
) -> Iterator:
    """Yield work(item) for each item in order, with `workers` threads computing the next `ahead` ones
    (default: one per worker) meanwhile, each running torch with `worker_threads` threads."""
    ahead = ahead or workers
    with ThreadPoolExecutor(
        workers, "imcap-read", initializer=torch.set_num_threads, initargs=(worker_threads,)
    ) as pool:
        upcoming = deque(pool.submit(work, item) for item in items[:ahead])
        for item in items[ahead:]:
            current = upcoming.popleft().result()
            upcoming.append(pool.submit(work, item))
            yield current
        while upcoming:
            yield upcoming.popleft().result()


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run torch with `count` threads in this thread, then restore the count it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _decode_each(
    chunk: Sequence[Path], max_pixels: int | None, load: Callable | None = None
) -> tuple[list[tuple[Path, Image.Image]], list[ImageLoadError]]:
    decoded, failed = [], []
    for path in chunk:
        try:
            decoded.append((path, load(path) if load else load_image(path, max_pixels)))
        except ImageLoadError as error:
            failed.append(error)
    return decoded, failed


def framed(result: CaptionResult, prefix: str, suffix: str, style: str = "sentence") -> CaptionResult:
    """The result with every candidate in `style`, between `prefix` and `suffix`."""
    if not (prefix or suffix) and style == "sentence":
        return result
    candidates = [replace(c, text=f"{prefix}{styled(c.text, style)}{suffix}") for c in result.candidates]
    return replace(result, caption=candidates[0].text, candidates=candidates)


def print_failure(error: ImageLoadError) -> None:
    tqdm.write(f"error: {error}", file=sys.stderr)
