"""`imcap caption` over datasets: check everything, open the output, run the local or the Ray engine.

The command builds a `DatasetRun` from its flags and calls `run_dataset`, which answers with the run's
summary, an interruption (Ctrl-C) or one line of error; the command turns those into its messages and
exit codes, as it does for plain files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imcap.batch import BatchInterrupted
from imcap.generation import CaptionOptions
from imcap.images import ImageLoadError

ENGINES = ("local", "ray")


@dataclass
class DatasetRun:
    paths: list[str]  # tar shards, tables, image files, folders, globs
    output: Path | None
    model: str | None
    options: CaptionOptions
    engine: str = "local"  # one of ENGINES
    address: str | None = None  # Ray: the cluster to join
    workers: int = 1  # Ray: Captioner actors
    image_column: str | None = None
    batch_size: int = 16
    max_pixels: int | None = None
    engine_options: object = None  # imcap.engine.EngineOptions
    use_engine: bool = True
    prefix: str = ""
    suffix: str = ""
    style: str = "sentence"
    tags: int = 0
    overwrite: bool = False
    recursive: bool = False  # folders among the inputs: their sub-folders too


def run_dataset(
    run: DatasetRun,
    sidecar: str | None = None,
    on_failure: Callable[[ImageLoadError], None] | None = None,
    progress: bool = True,
):
    """Caption `run`'s inputs unit by unit; returns a UnitSummary, a BatchInterrupted or an error line."""
    from imcap.accel import AccelError
    from imcap.datasets_out import check_dataset_output
    from imcap.generation import OptionsError
    from imcap.modeling import ModelLoadError
    from imcap.requirements import MissingRequirement
    from imcap.sources import SourceError, find_units
    from imcap.writers import OutputError

    known = (OptionsError, OutputError, FileNotFoundError, ModelLoadError, AccelError, SourceError)
    try:  # what needs no model first: flags, extras, inputs, the output's kind
        _check(run)
        check_dataset_output(run.output, sidecar)
        run.options.validate()
        units = find_units(run.paths, run.image_column, recursive=run.recursive)
        if not units:
            raise FileNotFoundError("no images found")
        sink, captioner = _open(run, units)
    except (*known, MissingRequirement) as error:
        return str(error)
    try:
        with sink:
            return _caption(run, units, sink, captioner, on_failure, progress)
    except BatchInterrupted as interrupted:
        return interrupted
    except OutputError as error:
        return str(error)


def _check(run: DatasetRun) -> None:
    from imcap.requirements import require_extra

    if run.engine not in ENGINES:
        raise _options_error(f"--engine must be one of {', '.join(ENGINES)}, got {run.engine!r}")
    if run.workers < 1:
        raise _options_error(f"--workers must be >= 1, got {run.workers}")
    if run.engine == "ray":
        require_extra("ray", "imcap caption --engine ray")
        if run.output is not None and Path(run.output).suffix.lower() not in (".parquet", ".wds"):
            raise _options_error(
                "--engine ray writes OUT.parquet or OUT.wds (a folder of one file per shard)"
            )
    elif run.address is not None or run.workers != 1:
        raise _options_error("--address and --workers are for --engine ray")
    uses_parquet = str(run.output or "").lower().endswith(".parquet") or any(
        str(p).lower().endswith(".parquet") for p in run.paths
    )
    if uses_parquet:
        require_extra("parquet", "Parquet input or output")


def _options_error(message: str):
    from imcap.generation import OptionsError

    return OptionsError(message)


def _open(run: DatasetRun, units):
    """The output sink, and the Captioner (loaded here to check the options against the model and to
    name it in rows; the Ray engine drops it and loads one per actor)."""
    from imcap.captioner import Captioner
    from imcap.datasets_out import get_sink

    captioner = Captioner.from_pretrained(run.model, run.max_pixels, run.engine_options, run.use_engine)
    settings = {**captioner.checked(run.options).to_dict(), "prefix": run.prefix, "suffix": run.suffix}
    if run.style != "sentence":
        settings["caption_style"] = run.style
    sink = get_sink(
        run.output, units, model=captioner.name, settings=settings, overwrite=run.overwrite, tags=run.tags
    )
    return sink, captioner


def _caption(run: DatasetRun, units, sink, captioner, on_failure, progress):
    framing = {"prefix": run.prefix, "suffix": run.suffix, "style": run.style}
    if run.engine == "local":
        from imcap.shards import caption_units

        return caption_units(
            captioner,
            units,
            sink,
            run.options,
            run.batch_size,
            **framing,
            progress=progress,
            on_failure=on_failure,
        )
    from imcap.ray_engine import caption_units_ray

    model = run.model
    if model is not None and Path(model).exists():  # actors may start in another folder
        model = str(Path(model).resolve())
    loader = {
        "name_or_path": model,
        "max_pixels": run.max_pixels,
        "engine": run.engine_options,
        "use_engine": run.use_engine,
    }
    del captioner  # each actor loads its own
    return caption_units_ray(
        loader,
        units,
        sink,
        run.options,
        workers=run.workers,
        batch_size=run.batch_size,
        address=run.address,
        **framing,
        progress=progress,
        on_failure=on_failure,
    )
