"""`imcap train`: a YAML recipe in, a trained model out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from imcap.cli.common import (
    command,
    fail,
    quiet_libraries,
)


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
        fail(str(error))
    quiet_libraries()
    from imcap.data import DataError
    from imcap.training.checkpoints import export_fp16
    from imcap.training.config import TrainConfig
    from imcap.training.loop import WISE_DIR
    from imcap.training.loop import train as run_training

    try:
        recipe = TrainConfig.from_yaml(config)
        best = run_training(recipe, resume=resume)
    except (DataError, ValueError, FileNotFoundError) as error:
        fail(str(error))
    if int(os.environ.get("RANK", "0")) != 0:
        return  # data-parallel (torchrun): rank 0 reports and exports
    typer.echo(
        f"model: {best} (best on val CIDEr; mixed with the cross-entropy stage by scst.wise_weight)"
        if best.name == WISE_DIR
        else f"best model (on val CIDEr): {best}"
    )
    if export:
        export_fp16(best, export)
        typer.echo(f"exported fp16 model: {export}")
