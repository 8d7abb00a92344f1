"""The `imcap` command: a thin layer that turns arguments into options and calls the Python API."""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Image captioning that works offline.")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model folder or hub id (default: the shipped model).")
]
BeamsOption = Annotated[int, typer.Option("--beams", help="Beam width (1 = greedy).")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def expand_paths(items: list[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted), globs expanded; missing ones are errors."""
    paths: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise FileNotFoundError(f"{item}: no file matches")
        for match in map(Path, matches):
            if match.is_dir():
                paths += sorted(p for p in match.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            elif match.exists():
                paths.append(match)
            else:
                raise FileNotFoundError(f"{match}: no such file or folder")
    return paths


@app.command()
def caption(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: ModelOption = None,
    beams: BeamsOption = 3,
    max_length: Annotated[int, typer.Option("--max-length", help="Maximum new tokens per caption.")] = 24,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 8,
) -> None:
    """Caption images: prints `path<TAB>caption` lines."""
    _quiet_libraries()
    from imcap.captioner import Captioner
    from imcap.generation import CaptionOptions, OptionsError
    from imcap.images import ImageLoadError
    from imcap.modeling import ModelLoadError

    try:
        options = CaptionOptions(num_beams=beams, max_new_tokens=max_length).validate()
        files = expand_paths(paths)
        captioner = Captioner.from_pretrained(model)
    except (OptionsError, FileNotFoundError, ModelLoadError) as error:
        _fail(str(error))
    failed = 0
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        for path, text in _caption_chunk(captioner, chunk, options, ImageLoadError):
            if text is None:
                failed += 1
            else:
                typer.echo(f"{path}\t{text}")
    if failed:
        raise typer.Exit(1)


def _caption_chunk(captioner, chunk, options, error_type):
    """Caption a batch; when one file is bad, caption the rest one by one and report the bad one."""
    try:
        return [(p, r.caption) for p, r in zip(chunk, captioner(chunk, options), strict=True)]
    except error_type:
        pass
    results = []
    for path in chunk:
        try:
            results.append((path, captioner(path, options)[0].caption))
        except error_type as error:
            typer.echo(f"error: {error}", err=True)
            results.append((path, None))
    return results


@app.command("eval")
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
) -> None:
    """Caption a split and print BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (pycocoevalcap; SPICE needs a
    download of Stanford CoreNLP models and is not computed)."""
    _quiet_libraries()
    from imcap.captioner import Captioner
    from imcap.data import DataError
    from imcap.evaluate import evaluate
    from imcap.generation import CaptionOptions, OptionsError
    from imcap.images import ImageLoadError
    from imcap.metrics import MetricsError
    from imcap.modeling import ModelLoadError

    try:
        options = CaptionOptions(num_beams=beams, max_new_tokens=max_length).validate()
        captioner = Captioner.from_pretrained(model)
        report = evaluate(captioner, data, split, options, limit=limit, batch_size=batch_size)
    except (OptionsError, DataError, ModelLoadError, MetricsError, ImageLoadError) as error:
        _fail(str(error))
    for name, value in report.metrics.items():
        typer.echo(f"{name:8s} {value:.4f}")
    typer.echo(f"images   {report.n_images}\ndistinct {report.distinct_captions}")
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if predictions:
        predictions.write_text(json.dumps(report.predictions, indent=2) + "\n")


@app.command()
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
    typer.echo(f"best model (on val CIDEr): {best}")
    if export:
        export_fp16(best, export)
        typer.echo(f"exported fp16 model: {export}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
