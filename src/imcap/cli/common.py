"""What every `imcap` command shares: the Typer app, flags shown as flags, common options, failing."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

import imcap
from imcap.generation import DEFAULT_BEAMS, CaptionOptions

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


DEFAULT_OPTIONS = CaptionOptions()
ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model folder or hub id (default: the shipped model).")
]
BeamsOption = Annotated[int, typer.Option("--beams", help="Beam width (1 = greedy).")]


def speed_option(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Speed")


NoGuideOption = Annotated[
    bool,
    typer.Option(
        "--no-guide",
        help="Don't steer captions toward confident ImageNet concepts (models with a concept head).",
        rich_help_panel="Decoding",
    ),
]
ThreadsOption = Annotated[
    int | None, speed_option("--threads", "CPU threads for the model (default: all cores).")
]
OnnxOption = Annotated[
    bool,
    speed_option(
        "--onnx-encoder",
        "Run the encoder with ONNX Runtime (faster; on Flickr8k val all 1000 captions matched PyTorch's).",
    ),
]
Int8Option = Annotated[
    bool,
    speed_option(
        "--int8-decoder",
        "Quantise the decoder's linear layers to int8 (on Flickr8k val 947 of 1000 captions matched).",
    ),
]
PlainOption = Annotated[
    bool,
    speed_option("--plain-generate", "Decode with plain transformers generate instead of imcap's engine."),
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


def speed_settings(threads: int | None, onnx_encoder: bool, int8_decoder: bool, plain: bool):
    """(EngineOptions, use_engine) for the Captioner; sets torch's thread count."""
    import torch

    from imcap.engine import EngineOptions

    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if plain and (onnx_encoder or int8_decoder):
        fail("--plain-generate runs the model as it is; drop --onnx-encoder/--int8-decoder")
    return EngineOptions(onnx_encoder=onnx_encoder, int8_decoder=int8_decoder), not plain


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def decoding_option(flag: str, help: str):
    return typer.Option(flag, help=help, rich_help_panel="Decoding")


def output_option(*flags: str, help: str):
    return typer.Option(*flags, help=help, rich_help_panel="Output")


_FLAGS = {  # CaptionOptions field -> the flag that sets it, where the names differ
    "max_new_tokens": "--max-length",
    "min_new_tokens": "--min-length",
    "num_beams": "--beams",
    "do_sample": "--sample",
    "num_return_sequences": "--num-captions",
}


def as_flags(message: str) -> str:
    """An OptionsError message in the command's own terms: num_beams -> --beams, top_p -> --top-p."""
    names = "|".join(field.name for field in fields(CaptionOptions))

    def flag(match: re.Match) -> str:
        return _FLAGS.get(match[0], "--" + match[0].replace("_", "-"))

    return re.sub(rf"\b({names})\b", flag, message)


# The decoding flags `imcap caption` and `imcap explain` share: one definition, so the two stay alike.
DecodingBeamsOption = Annotated[
    int | None,
    decoding_option(
        "--beams", f"Beam width, 1 = greedy (default {DEFAULT_BEAMS}; with --sample 1: plain sampling)."
    ),
]
MaxLengthOption = Annotated[int, decoding_option("--max-length", "Maximum new tokens per caption.")]
MinLengthOption = Annotated[int, decoding_option("--min-length", "Minimum new tokens per caption.")]
LengthPenaltyOption = Annotated[
    float, decoding_option("--length-penalty", "Beam search: > 1 favours longer captions.")
]
SampleOption = Annotated[
    bool, decoding_option("--sample", "Sample instead of searching (guided too, unless --no-guide).")
]
TemperatureOption = Annotated[float, decoding_option("--temperature", "Sampling temperature.")]
TopKOption = Annotated[int, decoding_option("--top-k", "Sample from the k likeliest tokens (0: all).")]
TopPOption = Annotated[
    float, decoding_option("--top-p", "Sample from the likeliest tokens holding this mass.")
]
RepetitionPenaltyOption = Annotated[
    float, decoding_option("--repetition-penalty", "> 1 discourages repeated tokens.")
]
NoRepeatNgramOption = Annotated[
    int | None,
    decoding_option(
        "--no-repeat-ngram-size",
        "Never repeat an n-gram of this size (0: off; default: the model's own, 3 for the shipped model).",
    ),
]
SeedOption = Annotated[
    int | None,
    decoding_option("--seed", "Makes sampling reproducible, photo by photo (whatever the batch)."),
]
