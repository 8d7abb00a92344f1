"""`imcap explain`: where the model looked, word by word."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imcap.cli.common import (
    DEFAULT_OPTIONS,
    DecodingBeamsOption,
    LengthPenaltyOption,
    MaxLengthOption,
    MinLengthOption,
    ModelOption,
    NoGuideOption,
    NoRepeatNgramOption,
    RepetitionPenaltyOption,
    SampleOption,
    SeedOption,
    TemperatureOption,
    ThreadsOption,
    TopKOption,
    TopPOption,
    as_flags,
    command,
    fail,
    output_option,
    quiet_libraries,
    speed_settings,
)
from imcap.generation import CaptionOptions


@command()
def explain(
    photo: Annotated[Path, typer.Argument(help="The photo to caption and explain.")],
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        output_option(
            "--output", "-o", help="Write the figure: the photo, then each word's map (.png/.jpg/.webp)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, output_option("--json", help="Write the caption and each word's grid to this JSON file.")
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="One decoder layer, 0 first (default: the mean of all).")
    ] = None,
    head: Annotated[
        int | None, typer.Option("--head", help="One attention head, 0 first (default: the mean of all).")
    ] = None,
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
    seed: SeedOption = None,
    no_guide: NoGuideOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Caption a photo and show where the model looked for each word (attention maps).

    The decoder's attention over the image as a grid per word, Show, Attend and Tell style; prints the
    caption and the patch each word looked at most. The caption is `imcap caption`'s with the same flags.
    """
    quiet_libraries()
    from imcap.captioner import Captioner
    from imcap.explain import ExplainError
    from imcap.explain import explain as explain_photo
    from imcap.explain_figure import check_figure_path, save_figure
    from imcap.generation import OptionsError
    from imcap.images import ImageLoadError, load_image
    from imcap.modeling import ModelLoadError

    engine, _ = speed_settings(threads, False, False, False)
    try:  # settings, the photo and the outputs first, then the model
        options = CaptionOptions(
            num_beams=beams,
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
        fail(as_flags(str(error)))
    except (ExplainError, ImageLoadError, ModelLoadError) as error:
        fail(str(error))
    except OSError as error:  # an output that cannot be written
        fail(f"cannot write {error.filename}: {error.strerror}")
    typer.echo(explanation.caption)
    for word in explanation.words:
        row, col = divmod(int(word.grid.argmax()), word.grid.shape[1])
        typer.echo(
            f"  {word.word:<14} looked most at row {row}, col {col} ({word.grid.max():.0%}); "
            f"other tokens {word.other_share:.0%}"
        )
