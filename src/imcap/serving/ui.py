"""The web page at /: a Gradio Blocks app on the same Batcher as the REST API (so they share batches).

Built to work offline: telemetry off, system fonts (no Google Fonts), no CDN assets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported, so set first

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from imcap.captioner import Captioner, CaptionResult  # noqa: E402
from imcap.explain import ExplainError, check_explainable  # noqa: E402
from imcap.explain_figure import render  # noqa: E402
from imcap.generation import CaptionOptions, OptionsError, check_fits  # noqa: E402
from imcap.images import ImageLoadError, load_image  # noqa: E402
from imcap.serving.queue import Batcher, QueueFull  # noqa: E402
from imcap.serving.settings import ServeSettings  # noqa: E402
from imcap.serving.uploads import RequestError, Upload, decode_upload  # noqa: E402

UI_SUFFIXES = [".jpg", ".jpeg", ".png", ".webp"]
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
CACHE_CLEANUP = (600, 600)  # every 10 min, delete uploads older than 10 min from Gradio's temp folder
TABLE_HEADERS = ["photo", "#", "caption", "score"]
UI_TAGS = 5  # a photo's top tags, shown in a row under its captions
_DEFAULT = CaptionOptions()


def mount_ui(
    app: FastAPI, batcher: Batcher, captioners: Mapping[str, Captioner], settings: ServeSettings
) -> None:
    """Mount the page at / on `app` (after the API routes, which keep precedence)."""
    blocks = build_ui(batcher, captioners, settings)
    # several page users may wait at once so that their images can share a model call
    blocks.queue(default_concurrency_limit=settings.max_batch, max_size=settings.queue_size)
    folder = settings.examples_dir
    # outside its own temp folder, Gradio serves only the files of allowed_paths
    examples = [str(folder)] if folder and folder.is_dir() else []
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),
        max_file_size=settings.max_upload_bytes,
        allowed_paths=examples,
        footer_links=["settings"],
    )


def build_ui(batcher: Batcher, captioners: Mapping[str, Captioner], settings: ServeSettings) -> gr.Blocks:
    model_ids = list(captioners)
    longest = min(c.max_caption_tokens or 64 for c in captioners.values())
    with gr.Blocks(title="imcap", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as blocks:
        gr.Markdown(
            "## imcap: image captions\nUpload photos (JPG, PNG, WebP), choose settings, press Caption."
        )
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.Gallery(
                    label="Photos",
                    file_types=UI_SUFFIXES,
                    type="filepath",
                    interactive=True,
                    sources=["upload"],
                    columns=3,
                    height=240,
                    object_fit="contain",
                    allow_preview=False,  # a single photo would otherwise open cropped in preview mode
                    elem_id="photos",
                )
                model = gr.Dropdown(model_ids, value=model_ids[0], label="Model", visible=len(model_ids) > 1)
                max_length = gr.Slider(1, longest, value=_DEFAULT.max_new_tokens, step=1, label="Max length")
                beams = gr.Slider(1, settings.max_beams, value=_DEFAULT.num_beams, step=1, label="Beams")
                sample = gr.Checkbox(value=False, label="Sample (instead of beam search)")
                temperature = gr.Slider(0.1, 2, value=1.0, step=0.05, label="Temperature", interactive=False)
                top_k = gr.Slider(0, 100, value=0, step=1, label="Top-k (0: off)", interactive=False)
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", interactive=False)
                count = gr.Slider(1, settings.max_beams, value=1, step=1, label="Captions per photo")
                guide = gr.Checkbox(value=True, label="Name what the classifier sees (guided captions)")
                prompt = gr.Textbox(  # shown when a loaded model takes a prompt (imcap.families)
                    label="Prompt (models that take one; empty: the model's default)",
                    visible=any(c.family and c.family.takes_prompt for c in captioners.values()),
                    elem_id="prompt",
                )
                button = gr.Button("Caption", variant="primary")
            with gr.Column(scale=1):
                gallery = gr.Gallery(
                    label="Photos and best captions",
                    columns=2,
                    height=300,
                    object_fit="contain",
                    allow_preview=False,
                    elem_id="captions-gallery",
                )
                table = gr.Dataframe(
                    headers=TABLE_HEADERS,
                    label="All captions with scores",
                    wrap=True,
                    column_widths=["27%", "8%", "50%", "15%"],
                    elem_id="captions-table",
                )
        with gr.Accordion("Explain: where the model looked for each word", elem_id="explain"):
            gr.Markdown(
                "The photo, then each word of its caption, bright where the decoder's attention went "
                "when it wrote the word (the mean of its layers and heads). *Other tokens*: the share "
                "that went to the encoder's tokens that are not image patches (global, concepts, CLS)."
            )
            explain_pick = gr.Dropdown([], label="Photo", interactive=True, elem_id="explain-photo")
            explain_figure = gr.Image(
                type="pil", interactive=False, show_label=False, elem_id="explain-figure"
            )
        explained = gr.State([])  # (photo path, Explanation) per photo of the last caption click
        _examples(photos, settings.examples_dir)
        sample.change(lambda on: [gr.update(interactive=on)] * 3, sample, [temperature, top_k, top_p])
        inputs = [photos, model, max_length, beams, sample, temperature, top_k, top_p, count, guide, prompt]
        handler = caption_handler(batcher, captioners, settings, explain=True)
        clicked = button.click(handler, inputs, [gallery, table, explained, explain_pick])
        clicked.success(draw_explanation, [explained, explain_pick], explain_figure)
        explain_pick.input(draw_explanation, [explained, explain_pick], explain_figure)
    return blocks


def _examples(photos: gr.Gallery, folder: Path | None) -> None:
    files = sorted(folder.glob("*.jpg")) if folder and folder.is_dir() else []
    if files:
        gr.Examples([[[str(f)]] for f in files], inputs=[photos], label="Example photos (click one)")


def caption_handler(
    batcher: Batcher, captioners: Mapping[str, Captioner], settings: ServeSettings, explain: bool = False
) -> Callable[..., tuple]:
    """The click handler: checks like the REST API, then the shared batcher; errors as gr.Error.

    It answers (gallery, table rows); with `explain`, also each photo's (path, Explanation) of its
    caption (models that attend to image tokens) and the Explain view's photo picker, the first picked.
    """

    def caption(
        photos, model, max_length, beams, sample, temperature, top_k, top_p, count, guide=True, prompt=""
    ):
        paths = [Path(path) for path, _ in photos or []]  # the gallery gives (path, caption) pairs
        if not paths:
            raise gr.Error("Upload one or more photos first.")
        if len(paths) > settings.max_images_per_request:
            raise gr.Error(f"At most {settings.max_images_per_request} photos at a time.")
        options = _options(max_length, beams, sample, temperature, top_k, top_p, count, guide, prompt)
        try:
            check_fits(options, captioners[model].max_caption_tokens)
            if options.prompt is not None:
                captioners[model].check_prompt(options)
            images = [_decode(path, i, settings) for i, path in enumerate(paths)]
            attention = explain and _explainable(captioners[model])
            futures = batcher.submit(model, images, options, attention=attention)
        except (OptionsError, RequestError) as error:
            raise gr.Error(str(error)) from None
        except QueueFull as error:
            raise gr.Error(f"The server is busy; try again in {error.retry_after_s} s.") from None
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            done = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()
            raise gr.Error("Timed out waiting for the model; try again.") from None
        gallery = [(str(path), item.result.caption) for path, item in zip(paths, done, strict=True)]
        rows = [row for path, item in zip(paths, done, strict=True) for row in _rows(path.name, item.result)]
        if not explain:
            return gallery, rows
        explained = [
            (str(p), item.explanation) for p, item in zip(paths, done, strict=True) if item.explanation
        ]
        choices = [(f"{i}. {Path(path).name}", i - 1) for i, (path, _) in enumerate(explained, start=1)]
        return gallery, rows, explained, gr.update(choices=choices, value=0 if choices else None)

    return caption


def draw_explanation(explained: list, index: int | None):
    """The Explain view's figure (a PIL image) for the photo picked; None before any caption."""
    if not explained or index is None:
        return None
    path, explanation = explained[int(index)]
    try:
        return render(explanation, load_image(path))
    except (ExplainError, ImageLoadError) as error:  # no matplotlib; the upload swept away meanwhile
        raise gr.Error(str(error)) from None


def _explainable(captioner: Captioner) -> bool:
    try:
        check_explainable(captioner.model)
    except ExplainError:  # the LSTM baseline: its page shows no Explain figure
        return False
    return True


def _rows(name: str, result: CaptionResult) -> list[list]:
    """A photo's table rows: each candidate with its score, then `tags: tabby 0.81 · tiger cat 0.10 · ...`."""
    rows = [[name, rank, c.text, round(c.score, 3)] for rank, c in enumerate(result.candidates, start=1)]
    if result.tags:  # models without a concept head have none
        tags = " · ".join(f"{t.label} {t.score:.2f}" for t in result.tags[:UI_TAGS])
        rows.append([name, "", f"tags: {tags}", ""])
    return rows


def _options(
    max_length, beams, sample, temperature, top_k, top_p, count, guide=True, prompt=""
) -> CaptionOptions:
    # the sampling sliders always hold a value; they count only when sampling is on
    sampling = {"temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p)}
    try:
        return CaptionOptions(
            max_new_tokens=int(max_length),
            num_beams=1 if sample else int(beams),  # sampling: N independent samples, as in the CLI
            do_sample=bool(sample),
            num_return_sequences=int(count),
            guide=bool(guide),
            prompt=prompt.strip() or None if prompt else None,
            **(sampling if sample else {}),
        ).validate()
    except OptionsError as error:
        raise gr.Error(str(error)) from None


def _decode(path: Path, index: int, settings: ServeSettings):
    if path.suffix.lower() not in UI_SUFFIXES:
        raise RequestError(422, f"{path.name}: not a JPG, PNG or WebP file")
    return decode_upload(Upload(path.name, path.read_bytes()), index, settings.max_pixels)[0]
