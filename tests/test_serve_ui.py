"""The web page's handler (imcap.serving.ui) on the tiny "seeing" model, without a browser
(tests/test_serve_browser.py drives the real page)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imcap.captioner import Captioner
from imcap.generation import CaptionOptions
from imcap.images import decode_image
from imcap.serving.queue import Batcher
from imcap.serving.settings import ServeSettings

from .serving_helpers import Tagging, png


@pytest.fixture(scope="module")
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)


def test_page_handler_ignores_sampling_sliders_unless_sampling(captioner, tmp_path):
    import gradio as gr

    from imcap.serving.ui import caption_handler

    paths = [tmp_path / "a.png", tmp_path / "b.webp"]
    paths[0].write_bytes(png(1))
    Image.open(io.BytesIO(png(2))).save(paths[1])
    batcher = Batcher({"seeing": captioner})
    handler = caption_handler(batcher, {"seeing": captioner}, ServeSettings(ui=True))
    try:
        gallery, rows = handler([(str(p), None) for p in paths], "seeing", 6, 2, False, 0.3, 5, 0.5, 2)
        with pytest.raises(gr.Error, match="num_return_sequences"):
            handler([(str(paths[0]), None)], "seeing", 6, 1, False, 1.0, 0, 1.0, 2)
        with pytest.raises(gr.Error, match="Upload one or more photos"):
            handler(None, "seeing", 6, 2, False, 1.0, 0, 1.0, 1)
    finally:
        batcher.close()
    two = CaptionOptions(max_new_tokens=6, num_beams=2, num_return_sequences=2)
    expected = captioner([decode_image(png(1)), decode_image(paths[1].read_bytes())], two)
    assert gallery == [(str(p), r.caption) for p, r in zip(paths, expected, strict=True)]
    assert [row[:3] for row in rows] == [
        [p.name, rank, c.text]
        for p, r in zip(paths, expected, strict=True)
        for rank, c in enumerate(r.candidates, 1)
    ]


def test_page_shows_each_photos_top_five_tags_under_its_captions(captioner, tmp_path):
    from imcap.serving.ui import caption_handler

    path = tmp_path / "a.png"
    path.write_bytes(png(1))
    tagging = Tagging(captioner)
    batcher = Batcher({"tagging": tagging})
    try:
        handler = caption_handler(batcher, {"tagging": tagging}, ServeSettings(ui=True))
        _, rows = handler([(str(path), None)], "tagging", 6, 2, False, 1.0, 0, 1.0, 2)
    finally:
        batcher.close()
    assert [row[1] for row in rows] == [1, 2, ""]  # two captions, then the tags
    assert (
        rows[2][2]
        == "tags: concept 1 0.50 · concept 2 0.25 · concept 3 0.12 · concept 4 0.06 · concept 5 0.03"
    )


def test_page_guide_checkbox_maps_to_the_option():
    from imcap.serving.ui import _options

    assert _options(24, 3, False, 1.0, 0, 1.0, 1).guide is True
    assert _options(24, 3, False, 1.0, 0, 1.0, 1, False).guide is False
