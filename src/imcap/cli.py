"""The `imcap` command: a thin layer that turns arguments into options and calls the Python API."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

import imcap
from imcap.generation import DEFAULT_BEAMS, CaptionOptions
from imcap.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from imcap.results import MAX_TAGS
from imcap.writers import CAPTION_STYLES, DEFAULT_SIDECAR, OutputError, check_outputs, get_writer

# Only light modules above: torch and transformers are imported inside the commands that use them, so
# that `imcap --help` answers at once and `imcap caption` pays for them once.


def _flags_take_no_value(params: list) -> list:
    """Typer shows `<bool>` beside flags, which reads as if they took a value (`--recursive true`)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))


app = typer.Typer(
    cls=_Group, add_completion=False, no_args_is_help=True, help="Image captioning that works offline."
)


def command(name: str | None = None):
    """`app.command`, with flags shown as flags."""
    return app.command(name, cls=_Command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"imcap {imcap.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Image captioning that works offline."""


_DEFAULT = CaptionOptions()
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model folder or hub id (default: the shipped model).")
]
BeamsOption = Annotated[int, typer.Option("--beams", help="Beam width (1 = greedy).")]


def _speed(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Speed")


NoGuideOption = Annotated[
    bool,
    typer.Option(
        "--no-guide",
        help="Don't steer captions toward confident ImageNet concepts (models with a concept head).",
        rich_help_panel="Decoding",
    ),
]
ThreadsOption = Annotated[int | None, _speed("--threads", "CPU threads for the model (default: all cores).")]
OnnxOption = Annotated[
    bool,
    _speed(
        "--onnx-encoder",
        "Run the encoder with ONNX Runtime (faster; on Flickr8k val all 1000 captions matched PyTorch's).",
    ),
]
Int8Option = Annotated[
    bool,
    _speed(
        "--int8-decoder",
        "Quantise the decoder's linear layers to int8 (on Flickr8k val 947 of 1000 captions matched).",
    ),
]
PlainOption = Annotated[
    bool, _speed("--plain-generate", "Decode with plain transformers generate instead of imcap's engine.")
]
PromptOption = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        help="Models that take one (imcap models): a chat model's instruction (default: a one-sentence "
        "caption), BLIP's caption start, Florence-2's task token.",
        rich_help_panel="Decoding",
    ),
]


def _speed_settings(threads: int | None, onnx_encoder: bool, int8_decoder: bool, plain: bool):
    """(EngineOptions, use_engine) for the Captioner; sets torch's thread count."""
    import torch

    from imcap.engine import EngineOptions

    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if plain and (onnx_encoder or int8_decoder):
        _fail("--plain-generate runs the model as it is; drop --onnx-encoder/--int8-decoder")
    return EngineOptions(onnx_encoder=onnx_encoder, int8_decoder=int8_decoder), not plain


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _decoding(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Decoding")


def _output(*flags: str, help: str):
    return typer.Option(*flags, help=help, rich_help_panel="Output")


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
        _output("--output", "-o", help="Write rows to FILE.jsonl or FILE.csv; resumes if it exists."),
    ] = None,
    sidecar: Annotated[bool, _output("--sidecar", help="Write photo.txt next to each photo.jpg.")] = False,
    sidecar_ext: Annotated[
        str, _output("--sidecar-ext", help="Sidecar extension, e.g. .caption.")
    ] = DEFAULT_SIDECAR,
    prefix: Annotated[str, _output("--prefix", help="Text put before every caption, as is.")] = "",
    suffix: Annotated[str, _output("--suffix", help="Text put after every caption, as is.")] = "",
    caption_style: Annotated[
        str,
        _output(
            "--caption-style",
            help="sentence: 'A dog runs.' (alt text); plain: 'a dog runs' (training text, e.g. with "
            "--prefix/--suffix/--tags).",
        ),
    ] = "sentence",
    tags: Annotated[
        int,
        _output(
            "--tags", help=f"Add each image's top K ImageNet tags (0-{MAX_TAGS}; models with a concept head)."
        ),
    ] = 0,
    overwrite: Annotated[
        bool, _output("--overwrite", help="Caption all again, replacing earlier results.")
    ] = False,
    beams: Annotated[
        int | None,
        _decoding(
            "--beams",
            f"Beam width, 1 = greedy (default {DEFAULT_BEAMS}; with --sample 1: plain sampling).",
        ),
    ] = None,
    max_length: Annotated[
        int, _decoding("--max-length", "Maximum new tokens per caption.")
    ] = _DEFAULT.max_new_tokens,
    min_length: Annotated[
        int, _decoding("--min-length", "Minimum new tokens per caption.")
    ] = _DEFAULT.min_new_tokens,
    length_penalty: Annotated[
        float, _decoding("--length-penalty", "Beam search: > 1 favours longer captions.")
    ] = _DEFAULT.length_penalty,
    sample: Annotated[bool, _decoding("--sample", "Sample captions instead of searching.")] = False,
    temperature: Annotated[float, _decoding("--temperature", "Sampling temperature.")] = _DEFAULT.temperature,
    top_k: Annotated[
        int, _decoding("--top-k", "Sample from the k likeliest tokens (0: all).")
    ] = _DEFAULT.top_k,
    top_p: Annotated[
        float, _decoding("--top-p", "Sample from the likeliest tokens holding this mass.")
    ] = _DEFAULT.top_p,
    repetition_penalty: Annotated[
        float, _decoding("--repetition-penalty", "> 1 discourages repeated tokens.")
    ] = _DEFAULT.repetition_penalty,
    no_repeat_ngram_size: Annotated[
        int, _decoding("--no-repeat-ngram-size", "Never repeat an n-gram of this size (0: off).")
    ] = _DEFAULT.no_repeat_ngram_size,
    num_captions: Annotated[
        int,
        _decoding(
            "--num-captions",
            "Captions per image: the best beams, or independent samples with --sample; ranked by score "
            "(log-prob / tokens ^ length-penalty), each also with its log-prob.",
        ),
    ] = _DEFAULT.num_return_sequences,
    seed: Annotated[int | None, _decoding("--seed", "Makes sampling reproducible.")] = None,
    no_guide: NoGuideOption = False,
    prompt: PromptOption = None,
    threads: ThreadsOption = None,
    onnx_encoder: OnnxOption = False,
    int8_decoder: Int8Option = False,
    plain_generate: PlainOption = False,
    engine_name: Annotated[
        str,
        _scale("--engine", "local: this process; ray: a Ray Data actor pool (pip install 'imcap[ray]')."),
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
    _quiet_libraries()
    from imcap.accel import AccelError
    from imcap.batch import BatchInterrupted, caption_files, find_images
    from imcap.captioner import Captioner
    from imcap.generation import OptionsError, check_fits
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
        _fail(f"--caption-style must be one of {', '.join(CAPTION_STYLES)}, got {caption_style!r}")
    engine, use_engine = _speed_settings(threads, onnx_encoder, int8_decoder, plain_generate)
    if engine_name != "local" or _is_dataset_run(paths, output):
        from imcap.datasets_run import DatasetRun, run_dataset

        run = DatasetRun(
            paths, output, model, options, engine=engine_name, address=address, workers=workers,
            image_column=image_column, batch_size=batch_size, max_pixels=max_pixels or None,
            engine_options=engine, use_engine=use_engine, prefix=prefix, suffix=suffix,
            style=caption_style, tags=tags, overwrite=overwrite,
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
        check_fits(options, captioner.max_caption_tokens)
        captioner.check_prompt(options)
        settings = {**options.to_dict(), "prefix": prefix, "suffix": suffix}
        if caption_style != "sentence":  # rows of earlier versions, without the setting, still resume
            settings["caption_style"] = caption_style
        writer = get_writer(
            output, sidecar_extension, model=captioner.name, settings=settings, overwrite=overwrite, tags=tags
        )
    except OptionsError as error:
        _fail(_as_flags(str(error)))
    except (OutputError, FileNotFoundError, ModelLoadError, AccelError) as error:
        _fail(str(error))
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
        _fail(str(error))
    except BatchInterrupted as interrupted:  # Ctrl-C: every batch written so far stays, whole
        typer.echo(
            f"interrupted: {interrupted.summary.captioned} captioned; rerun the same command to continue",
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(summary.line(), err=True)
    if summary.failed and not allow_failures:
        raise typer.Exit(1)


_FLAGS = {  # CaptionOptions field -> the flag that sets it, where the names differ
    "max_new_tokens": "--max-length",
    "min_new_tokens": "--min-length",
    "num_beams": "--beams",
    "do_sample": "--sample",
    "num_return_sequences": "--num-captions",
}


def _as_flags(message: str) -> str:
    """An OptionsError message in the command's own terms: num_beams -> --beams, top_p -> --top-p."""
    names = "|".join(field.name for field in fields(CaptionOptions))

    def flag(match: re.Match) -> str:
        return _FLAGS.get(match[0], "--" + match[0].replace("_", "-"))

    return re.sub(rf"\b({names})\b", flag, message)


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
        _fail(_as_flags(outcome))
    if isinstance(outcome, BatchInterrupted):
        captioned = outcome.summary.captioned
        typer.echo(f"interrupted: {captioned} captioned; rerun the same command to continue", err=True)
        raise typer.Exit(130)
    typer.echo(outcome.line(), err=True)
    if outcome.failed and not allow_failures:
        raise typer.Exit(1)


def _check_numbers(batch_size: int, max_pixels: int, tags: int) -> None:
    if batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {batch_size}")
    if max_pixels < 0:
        _fail(f"--max-pixels must be >= 0 (0: no limit), got {max_pixels}")
    if not 0 <= tags <= MAX_TAGS:
        _fail(f"--tags must be in 0..{MAX_TAGS} (0: no tags), got {tags}")


@command("eval")
def eval_command(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder or file (any layout imcap reads).")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate, e.g. val.")] = "val",
    model: ModelOption = None,
    beams: BeamsOption = 3,
    max_length: Annotated[int, typer.Option("--max-length")] = 24,
    limit: Annotated[int | None, typer.Option("--limit", help="First N images only.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the numbers to this JSON file.")
    ] = None,
    predictions: Annotated[Path | None, typer.Option("--predictions", help="Write captions (JSON).")] = None,
    threads: ThreadsOption = None,
    onnx_encoder: OnnxOption = False,
    int8_decoder: Int8Option = False,
    plain_generate: PlainOption = False,
    no_guide: NoGuideOption = False,
    prompt: PromptOption = None,
) -> None:
    """Caption a split and print BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (pycocoevalcap).

    SPICE needs a download of Stanford CoreNLP models and is not computed.
    """
    _quiet_libraries()
    from imcap.generation import OptionsError
    from imcap.requirements import MissingRequirement, require_extra, require_java

    try:  # what needs no model first: settings, the metrics' extra and Java, the data
        options = CaptionOptions(
            num_beams=beams, max_new_tokens=max_length, guide=not no_guide, prompt=prompt
        ).validate()
        require_extra("train", "imcap eval", modules=("pycocoevalcap",))
        require_java("imcap eval")
    except (OptionsError, MissingRequirement) as error:
        _fail(_as_flags(str(error)))
    from imcap.accel import AccelError
    from imcap.captioner import Captioner
    from imcap.data import DataError, load_records
    from imcap.evaluate import evaluate
    from imcap.images import ImageLoadError
    from imcap.metrics import MetricsError
    from imcap.modeling import ModelLoadError

    try:
        load_records(data, split)
        engine, use_engine = _speed_settings(threads, onnx_encoder, int8_decoder, plain_generate)
        captioner = Captioner.from_pretrained(model, engine=engine, use_engine=use_engine)
        report = evaluate(captioner, data, split, options, limit=limit, batch_size=batch_size)
    except OptionsError as error:  # a prompt the model does not take
        _fail(_as_flags(str(error)))
    except (DataError, ModelLoadError, MetricsError, ImageLoadError, AccelError) as error:
        _fail(str(error))
    for name, value in report.metrics.items():
        label = "CIDEr-D" if name == "CIDEr" else name  # pycocoevalcap's "CIDEr" is CIDEr-D
        typer.echo(f"{label:8s} {value:.4f}")
    typer.echo(f"images   {report.n_images}\ndistinct {report.distinct_captions}")
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if predictions:
        predictions.write_text(json.dumps(report.predictions, indent=2) + "\n")


@command()
def train(
    config: Annotated[Path, typer.Argument(help="Training recipe (YAML), e.g. configs/flickr8k.yaml.")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")
    ] = False,
    export: Annotated[
        Path | None, typer.Option("--export", help="Also write the best model here as fp16 safetensors.")
    ] = None,
) -> None:
    """Train a captioning model from a YAML recipe."""
    from imcap.requirements import MissingRequirement, require_extra, require_java

    try:  # before torch is even imported: one line, and nothing created
        require_extra("train", "imcap train")
        require_java("imcap train", why="the PTB tokenizer of its validation metrics")
    except MissingRequirement as error:
        _fail(str(error))
    _quiet_libraries()
    from imcap.data import DataError
    from imcap.training.config import TrainConfig
    from imcap.training.loop import export_fp16
    from imcap.training.loop import train as run_training

    try:
        recipe = TrainConfig.from_yaml(config)
        best = run_training(recipe, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # data-parallel (torchrun): rank 0 reports and exports
    typer.echo(f"best model (on val CIDEr): {best}")
    if export:
        export_fp16(best, export)
        typer.echo(f"exported fp16 model: {export}")


def _serve_option(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Limits")


@command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model folder or hub id; repeat for several (default: shipped)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    max_upload_mb: Annotated[float, _serve_option("--max-upload-mb", "Largest file accepted.")] = 20.0,
    max_pixels: Annotated[
        int, _serve_option("--max-pixels", "Refuse larger images (decompression-bomb guard).")
    ] = DEFAULT_MAX_PIXELS,
    max_images: Annotated[int, _serve_option("--max-images", "Images per request.")] = 16,
    timeout: Annotated[float, _serve_option("--timeout", "Seconds a request may wait, then 503.")] = 60.0,
    queue_size: Annotated[
        int, _serve_option("--queue-size", "Images waiting for the model; more get 503 + Retry-After.")
    ] = 64,
    max_batch: Annotated[int, _serve_option("--max-batch", "Images per model call.")] = 8,
    max_wait_ms: Annotated[
        float, _serve_option("--max-wait-ms", "How long to wait for more images to fill a batch.")
    ] = 10.0,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Torch CPU threads (default: all cores).")
    ] = None,
    no_ui: Annotated[bool, typer.Option("--no-ui", help="REST API only, no web page at /.")] = False,
    rate_limit: Annotated[
        str | None, _serve_option("--rate-limit", "REST requests per client address, e.g. 5/s; more get 429.")
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Let pages from this origin call the API; repeat (default none)."),
    ] = None,
) -> None:
    """Serve a web page at / and a REST API at /v1 (docs at /docs). Set IMCAP_API_KEY to require a key."""
    _quiet_libraries()
    from imcap.modeling import ModelLoadError
    from imcap.serving.server import serve as run_server
    from imcap.serving.settings import ServeSettings, parse_rate

    try:
        settings = ServeSettings(
            host=host,
            port=port,
            max_upload_mb=max_upload_mb,
            max_pixels=max_pixels or None,
            max_images_per_request=max_images,
            request_timeout_s=timeout,
            queue_size=queue_size,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            **({"threads": threads} if threads is not None else {}),
            ui=not no_ui,
            rate_limit=parse_rate(rate_limit) if rate_limit else None,
            cors_origins=tuple(cors_origin or ()),
        ).validate()
        run_server(model or [None], settings)
    except ModuleNotFoundError as error:  # fastapi, uvicorn, gradio... come with the serve extra
        _fail(f"imcap serve needs {error.name}: pip install 'imcap[serve]' (or scripts/install.sh --serve)")
    except (ValueError, ModelLoadError) as error:
        _fail(str(error))


@command()
def explain(
    photo: Annotated[Path, typer.Argument(help="The photo to caption and explain.")],
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        _output(
            "--output", "-o", help="Write the figure: the photo, then each word's map (.png/.jpg/.webp)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, _output("--json", help="Write the caption and each word's grid to this JSON file.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="One decoder layer, 0 first (default: the mean of all).")
    ] = None,
    head: Annotated[
        int | None, typer.Option("--head", help="One attention head, 0 first (default: the mean of all).")
    ] = None,
    beams: Annotated[
        int | None,
        _decoding(
            "--beams",
            f"Beam width, 1 = greedy (default: {DEFAULT_BEAMS}; with --sample: 1, plain sampling).",
        ),
    ] = None,
    max_length: Annotated[
        int, _decoding("--max-length", "Maximum new tokens per caption.")
    ] = _DEFAULT.max_new_tokens,
    min_length: Annotated[
        int, _decoding("--min-length", "Minimum new tokens per caption.")
    ] = _DEFAULT.min_new_tokens,
    length_penalty: Annotated[
        float, _decoding("--length-penalty", "Beam search: > 1 favours longer captions.")
    ] = _DEFAULT.length_penalty,
    sample: Annotated[bool, _decoding("--sample", "Sample the caption instead of searching.")] = False,
    temperature: Annotated[float, _decoding("--temperature", "Sampling temperature.")] = _DEFAULT.temperature,
    top_k: Annotated[
        int, _decoding("--top-k", "Sample from the k likeliest tokens (0: all).")
    ] = _DEFAULT.top_k,
    top_p: Annotated[
        float, _decoding("--top-p", "Sample from the likeliest tokens holding this mass.")
    ] = _DEFAULT.top_p,
    repetition_penalty: Annotated[
        float, _decoding("--repetition-penalty", "> 1 discourages repeated tokens.")
    ] = _DEFAULT.repetition_penalty,
    no_repeat_ngram_size: Annotated[
        int, _decoding("--no-repeat-ngram-size", "Never repeat an n-gram of this size (0: off).")
    ] = _DEFAULT.no_repeat_ngram_size,
    seed: Annotated[int | None, _decoding("--seed", "Makes sampling reproducible.")] = None,
    no_guide: NoGuideOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Caption a photo and show where the model looked for each word (attention maps).

    The decoder's attention over the image as a grid per word, Show, Attend and Tell style; prints the
    caption and the patch each word looked at most. The caption is `imcap caption`'s with the same flags.
    """
    _quiet_libraries()
    from imcap.captioner import Captioner
    from imcap.explain import ExplainError
    from imcap.explain import explain as explain_photo
    from imcap.explain_figure import check_figure_path, save_figure
    from imcap.generation import OptionsError
    from imcap.images import ImageLoadError, load_image
    from imcap.modeling import ModelLoadError

    engine, _ = _speed_settings(threads, False, False, False)
    try:  # settings, the photo and the outputs first, then the model
        options = CaptionOptions(
            **({"num_beams": beams} if beams is not None else {}),  # the default is caption's
            max_new_tokens=max_length,
            min_new_tokens=min_length,
            length_penalty=length_penalty,
            do_sample=sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            seed=seed,
            guide=not no_guide,
        ).validate()
        if output is not None:
            check_figure_path(output)
        picture = load_image(photo)
        captioner = Captioner.from_pretrained(model, engine=engine)
        explanation = explain_photo(captioner, picture, options, layer=layer, head=head)
        if output is not None:
            save_figure(explanation, picture, output)
        if json_path is not None:
            saved = {"photo": str(photo), "model": captioner.name, **explanation.to_json()}
            json_path.write_text(json.dumps(saved) + "\n")
    except OptionsError as error:
        _fail(_as_flags(str(error)))
    except (ExplainError, ImageLoadError, ModelLoadError) as error:
        _fail(str(error))
    except OSError as error:  # an output that cannot be written
        _fail(f"cannot write {error.filename}: {error.strerror}")
    typer.echo(explanation.caption)
    for word in explanation.words:
        row, col = divmod(int(word.grid.argmax()), word.grid.shape[1])
        typer.echo(
            f"  {word.word:<14} looked most at row {row}, col {col} ({word.grid.max():.0%}); "
            f"other tokens {word.other_share:.0%}"
        )


@command()
def models() -> None:
    """List the model families imcap runs, with well-known hub ids, their size and licence, and which
    take a --prompt. Information only: nothing is downloaded."""
    from imcap.families import FAMILIES

    typer.echo("family\tmodel_type\tprompt\tcheckpoint\tparams\tlicence")
    for family in FAMILIES:
        prompt = f"default: {family.default_prompt}" if family.default_prompt else "optional"
        prompt = prompt if family.takes_prompt else "no"
        for checkpoint in family.checkpoints:
            row = (family.name, ",".join(family.model_types), prompt, *vars(checkpoint).values())
            typer.echo("\t".join(row))
    typer.echo(
        "other image-text-to-text models of transformers load too (untested): with a chat template they "
        "take --prompt (default: a one-sentence caption)",
        err=True,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
