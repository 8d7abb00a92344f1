"""`imcap eval`: caption a split and print the COCO caption metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imcap.cli.common import (
    BeamsOption,
    Int8Option,
    ModelOption,
    NoGuideOption,
    OnnxOption,
    PlainOption,
    PromptOption,
    ThreadsOption,
    as_flags,
    command,
    fail,
    quiet_libraries,
    speed_settings,
)
from imcap.generation import CaptionOptions


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
    quiet_libraries()
    from imcap.generation import OptionsError
    from imcap.requirements import MissingRequirement, require_extra, require_java

    try:  # what needs no model first: settings, the metrics' extra and Java, the data
        options = CaptionOptions(
            num_beams=beams, max_new_tokens=max_length, guide=not no_guide, prompt=prompt
        ).validate()
        require_extra("train", "imcap eval", modules=("pycocoevalcap",))
        require_java("imcap eval")
    except (OptionsError, MissingRequirement) as error:
        fail(as_flags(str(error)))
    from imcap.accel import AccelError
    from imcap.captioner import Captioner
    from imcap.data import DataError, load_records
    from imcap.evaluate import evaluate
    from imcap.images import ImageLoadError
    from imcap.metrics import MetricsError
    from imcap.modeling import ModelLoadError

    try:
        load_records(data, split)
        engine, use_engine = speed_settings(threads, onnx_encoder, int8_decoder, plain_generate)
        captioner = Captioner.from_pretrained(model, engine=engine, use_engine=use_engine)
        report = evaluate(captioner, data, split, options, limit=limit, batch_size=batch_size)
    except OptionsError as error:  # a prompt the model does not take
        fail(as_flags(str(error)))
    except (DataError, ModelLoadError, MetricsError, ImageLoadError, AccelError) as error:
        fail(str(error))
    for name, value in report.metrics.items():
        label = "CIDEr-D" if name == "CIDEr" else name  # pycocoevalcap's "CIDEr" is CIDEr-D
        typer.echo(f"{label:8s} {value:.4f}")
    typer.echo(f"images   {report.n_images}\ndistinct {report.distinct_captions}")
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if predictions:
        predictions.write_text(json.dumps(report.predictions, indent=2) + "\n")
