"""`imcap caption`: files, folders, globs, shards or tables in; stdout, rows, sidecars or datasets out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from imcap.cli.common import (
    DEFAULT_OPTIONS,
    DecodingBeamsOption,
    Int8Option,
    LengthPenaltyOption,
    MaxLengthOption,
    MinLengthOption,
    ModelOption,
    NoGuideOption,
    NoRepeatNgramOption,
    OnnxOption,
    PlainOption,
    PromptOption,
    RepetitionPenaltyOption,
    SampleOption,
    SeedOption,
    TemperatureOption,
    ThreadsOption,
    TopKOption,
    TopPOption,
    as_flags,
    command,
    decoding_option,
    fail,
    output_option,
    quiet_libraries,
    speed_settings,
)
from imcap.generation import CaptionOptions
from imcap.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from imcap.results import MAX_TAGS
from imcap.writers import CAPTION_STYLES, DEFAULT_SIDECAR, OutputError, check_outputs, get_writer


@command()
def caption(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: ModelOption = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Look into sub-folders too.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 16,
    allow_failures: Annotated[
        bool, typer.Option("--allow-failures", help="Exit 0 even when some images could not be read.")
    ] = False,
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            help="Refuse images of more pixels, width x height (decompression-bomb guard); 0: no limit of "
            "imcap's (Pillow's own, 2 x 89.5 megapixels, still applies).",
        ),
    ] = DEFAULT_MAX_PIXELS,
    output: Annotated[
        Path | None,
        output_option("--output", "-o", help="Write rows to FILE.jsonl or FILE.csv; resumes if it exists."),
    ] = None,
    sidecar: Annotated[
        bool, output_option("--sidecar", help="Write photo.txt next to each photo.jpg.")
    ] = False,
    sidecar_ext: Annotated[
        str, output_option("--sidecar-ext", help="Sidecar extension, e.g. .caption.")
    ] = DEFAULT_SIDECAR,
    prefix: Annotated[str, output_option("--prefix", help="Text put before every caption, as is.")] = "",
    suffix: Annotated[str, output_option("--suffix", help="Text put after every caption, as is.")] = "",
    caption_style: Annotated[
        str,
        output_option(
            "--caption-style",
            help="sentence: 'A dog runs.' (alt text); plain: 'a dog runs' (training text, e.g. with "
            "--prefix/--suffix/--tags).",
        ),
    ] = "sentence",
    tags: Annotated[
        int,
        output_option(
            "--tags", help=f"Add each image's top K ImageNet tags (0-{MAX_TAGS}; models with a concept head)."
        ),
    ] = 0,
    overwrite: Annotated[
        bool, output_option("--overwrite", help="Caption all again, replacing earlier results.")
    ] = False,
    beams: DecodingBeamsOption = None,
    max_length: MaxLengthOption = DEFAULT_OPTIONS.max_new_tokens,
    min_length: MinLengthOption = DEFAULT_OPTIONS.min_new_tokens,
    length_penalty: LengthPenaltyOption = DEFAULT_OPTIONS.length_penalty,
    sample: SampleOption = False,
    temperature: TemperatureOption = DEFAULT_OPTIONS.temperature,
    top_k: TopKOption = DEFAULT_OPTIONS.top_k,
    top_p: TopPOption = DEFAULT_OPTIONS.top_p,
    repetition_penalty: RepetitionPenaltyOption = DEFAULT_OPTIONS.repetition_penalty,
    no_repeat_ngram_size: NoRepeatNgramOption = DEFAULT_OPTIONS.no_repeat_ngram_size,
    num_captions: Annotated[
        int,
        decoding_option(
            "--num-captions",
            "Captions per image: the best beams, or independent samples with --sample; ranked by score "
            "(log-prob / tokens ^ length-penalty), each also with its log-prob.",
        ),
    ] = DEFAULT_OPTIONS.num_return_sequences,
    seed: SeedOption = None,
    no_guide: NoGuideOption = False,
    prompt: PromptOption = None,
    threads: ThreadsOption = None,
    onnx_encoder: OnnxOption = False,
    int8_decoder: Int8Option = False,
    plain_generate: PlainOption = False,
    engine_name: Annotated[
        str,
        _scale("--engine", "local: this process; ray: a Ray Data actor pool (pip install 'imcap\\[ray]')."),
    ] = "local",
    address: Annotated[
        str | None, _scale("--address", "Ray cluster to join: auto, ray://HOST:10001 (default: a local one).")
    ] = None,
    workers: Annotated[int, _scale("--workers", "Ray: Captioner actors (each with cores / N threads).")] = 1,
    image_column: Annotated[
        str | None,
        _scale("--image-column", "Tables (.parquet/.csv/.jsonl): the column of image paths or bytes."),
    ] = None,
) -> None:
    """Caption images: `path<TAB>caption` lines on stdout, or rows in a JSONL/CSV file, or sidecar files.

    Datasets too: WebDataset .tar shards and Parquet/CSV/JSONL tables in, OUT.parquet (a folder of parts),
    OUT.wds (shards with KEY.txt) or DIR/metadata.jsonl (Hugging Face imagefolder) out, also on Ray.

    Rerunning the same command continues where an interrupted run stopped.
    """
    quiet_libraries()
    from imcap.accel import AccelError
    from imcap.batch import BatchInterrupted, caption_files, find_images
    from imcap.captioner import Captioner
    from imcap.generation import OptionsError
    from imcap.modeling import ModelLoadError

    options = CaptionOptions(
        max_new_tokens=max_length,
        min_new_tokens=min_length,
        num_beams=beams,
        length_penalty=length_penalty,
        do_sample=sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_return_sequences=num_captions,
        seed=seed,
        guide=not no_guide,
        prompt=prompt,
    )
    sidecar_extension = sidecar_ext if sidecar else None
    _check_numbers(batch_size, max_pixels, tags)
    if caption_style not in CAPTION_STYLES:
        fail(f"--caption-style must be one of {', '.join(CAPTION_STYLES)}, got {caption_style!r}")
    engine, use_engine = speed_settings(threads, onnx_encoder, int8_decoder, plain_generate)
    if engine_name != "local" or _is_dataset_run(paths, output):
        from imcap.datasets_run import DatasetRun, run_dataset

        run = DatasetRun(
            paths, output, model, options, engine=engine_name, address=address, workers=workers,
            image_column=image_column, batch_size=batch_size, max_pixels=max_pixels or None,
            engine_options=engine, use_engine=use_engine, prefix=prefix, suffix=suffix,
            style=caption_style, tags=tags, overwrite=overwrite, recursive=recursive,
        )  # fmt: skip
        _finish(run_dataset(run, sidecar_extension, _print_image_error, sys.stderr.isatty()), allow_failures)
        return
    try:  # everything that can be checked without the model first
        options.validate()
        files = find_images(paths, recursive)
        if not files:
            raise FileNotFoundError(
                f"no images found (folders are searched for {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        check_outputs(files, output, sidecar_extension)
        captioner = Captioner.from_pretrained(model, max_pixels or None, engine, use_engine)
        options = captioner.checked(options)
        settings = {**options.to_dict(), "prefix": prefix, "suffix": suffix}
        if caption_style != "sentence":  # rows of earlier versions, without the setting, still resume
            settings["caption_style"] = caption_style
        writer = get_writer(
            output, sidecar_extension, model=captioner.name, settings=settings, overwrite=overwrite, tags=tags
        )
    except OptionsError as error:
        fail(as_flags(str(error)))
    except (OutputError, FileNotFoundError, ModelLoadError, AccelError) as error:
        fail(str(error))
    try:
        with writer:
            summary = caption_files(
                captioner,
                files,
                writer,
                options,
                batch_size,
                prefix=prefix,
                suffix=suffix,
                style=caption_style,
                on_failure=_print_image_error,
                # a bar redrawn with carriage returns garbles a log; there the summary line gives the rate
                progress=sys.stderr.isatty(),
            )
    except OutputError as error:  # the output became unwritable mid-run (disk full, permissions...)
        fail(str(error))
    except BatchInterrupted as interrupted:  # Ctrl-C: every batch written so far stays, whole
        typer.echo(
            f"interrupted: {interrupted.summary.captioned} captioned; rerun the same command to continue",
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(summary.line(), err=True)
    if summary.failed and not allow_failures:
        raise typer.Exit(1)


def _print_image_error(error) -> None:
    """A bad image's line, in the command's terms, kept whole above the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"error: {str(error).replace('max_pixels=', '--max-pixels ')}", file=sys.stderr)


def _scale(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Datasets and Ray")


def _is_dataset_run(paths: list[str], output: Path | None) -> bool:
    """Shards or tables in, or a dataset format out: the unit-by-unit engines (imcap.datasets_run)."""
    from imcap.datasets_out import is_dataset_output
    from imcap.sources import is_dataset_input

    return any(map(is_dataset_input, paths)) or is_dataset_output(output)


def _finish(outcome, allow_failures: bool) -> None:
    """A dataset run's end: its summary line, or its error; the exit code as for files."""
    from imcap.batch import BatchInterrupted

    if isinstance(outcome, str):
        fail(as_flags(outcome))
    if isinstance(outcome, BatchInterrupted):
        captioned = outcome.summary.captioned
        typer.echo(f"interrupted: {captioned} captioned; rerun the same command to continue", err=True)
        raise typer.Exit(130)
    typer.echo(outcome.line(), err=True)
    if outcome.failed and not allow_failures:
        raise typer.Exit(1)


def _check_numbers(batch_size: int, max_pixels: int, tags: int) -> None:
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}")
    if max_pixels < 0:
        fail(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    if not 0 <= tags <= MAX_TAGS:
        fail(f"--tags must be in 0..{MAX_TAGS} (0: no tags), got {tags}")
