"""imcap explain: per-word attention over the image, for the shipped model, a ViT + GPT-2, the prefix model;
words from BPE pieces; the same caption as `imcap caption`; the REST field; the LSTM's one-line error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor, ViTModel
from typer.testing import CliRunner

from imcap.captioner import Captioner
from imcap.cli import app as cli_app
from imcap.explain import ExplainError, explain, explain_results, words_of
from imcap.generation import CaptionOptions
from imcap.images import load_image
from imcap.modeling import image_processor_for, save_model
from imcap.serving.app import create_app
from imcap.serving.settings import ServeSettings

from .conftest import EXAMPLES
from .test_lstm import tiny_lstm_model
from .test_prefix import ENCODER as PREFIX_ENCODER
from .test_prefix import tiny_prefix_model
from .tiny_hub import gpt2_style_tokenizer, tiny_gpt2

DOGS = EXAMPLES / "flickr8k-val-dogs.jpg"  # a Flickr8k val photo
CAT = EXAMPLES / "chelsea.jpg"  # the shipped model names the cat by guided decoding ("A cat is ...")


@pytest.fixture(scope="module")
def shipped() -> Captioner:
    return Captioner.from_pretrained()


@pytest.fixture(scope="module")
def vit_gpt2(tmp_path_factory) -> Captioner:
    """A tiny random VisionEncoderDecoder shaped like ViT-B/16 at 224 px (a 14x14 patch grid + CLS)."""
    folder = tmp_path_factory.mktemp("vit_gpt2_224")
    torch.manual_seed(5)
    tokenizer = gpt2_style_tokenizer()
    vit = ViTModel(
        ViTConfig(
            image_size=224,
            patch_size=16,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    model = VisionEncoderDecoderModel(encoder=vit, decoder=tiny_gpt2(tokenizer, cross_attention=True))
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return Captioner.from_pretrained(folder)


def caption_words(caption: str) -> list[str]:
    return [w.strip(".,;:!?'\"") for w in caption.split() if w.strip(".,;:!?'\"")]


def assert_shares_add_up(explanation, rows: int, cols: int) -> None:
    assert explanation.grid_size == (rows, cols) and explanation.words
    for word in explanation.words:
        assert word.grid.shape == (rows, cols) and (word.grid >= 0).all()
        assert word.grid.sum() + word.other_share == pytest.approx(1, abs=1e-9)


# --- grids for each encoder --------------------------------------------------------------------------------


def test_shipped_model_gives_each_word_a_9x9_grid_and_its_global_and_concept_tokens_the_rest(shipped):
    explanation = explain(shipped, DOGS)
    assert explanation.caption == shipped(DOGS)[0].caption
    assert [w.word for w in explanation.words] == caption_words(explanation.caption)
    assert_shares_add_up(explanation, 9, 9)
    # 81 patches + a global token + 5 concept tokens: the last two take a real share, not all of it
    assert all(0.01 < w.other_share < 0.9 for w in explanation.words)
    assert all(w.image_share == pytest.approx(1) for w in explanation.words)  # cross-attention: all image
    assert shipped.model.decoder.config._attn_implementation == "sdpa"  # the engine's attention is back


def test_vit_gpt2_gives_a_14x14_grid_and_cls_is_the_other_share(vit_gpt2):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8))
    result = vit_gpt2(picture, CaptionOptions(max_new_tokens=4))[0]
    # random weights write no words: explain a caption of pieces instead, as if the model had written it
    tokenizer = vit_gpt2.loaded.tokenizer
    tokens = [
        *tokenizer(" a dog runs on the greengrass", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    result.candidates[0].tokens, result.caption = tokens, "A dog runs on the greengrass."
    expected = reference_attention(vit_gpt2, picture, tokens, layer=1, head=0)  # (T, 1 + 196)

    explanation = explain_results(vit_gpt2, [picture], [result], layer=1, head=0)[0]
    assert_shares_add_up(explanation, 14, 14)
    for word, (_, positions, _) in zip(
        explanation.words, words_of(vit_gpt2.loaded.tokenizer, tokens), strict=True
    ):
        mean = expected[positions].mean(axis=0)
        np.testing.assert_allclose(word.grid, mean[1:].reshape(14, 14), atol=1e-5)  # patches row by row
        assert word.other_share == pytest.approx(mean[0], abs=1e-5)  # CLS
    averaged = explain_results(vit_gpt2, [picture], [result])[0]  # all layers and heads
    assert_shares_add_up(averaged, 14, 14)
    assert not np.allclose(averaged.words[0].grid, explanation.words[0].grid)


def test_prefix_model_explains_caption_tokens_over_the_image_prefix(tmp_path):
    model, tokenizer = tiny_prefix_model()
    save_model(model, tokenizer, image_processor_for(PREFIX_ENCODER), tmp_path / "prefix")
    captioner = Captioner.from_pretrained(tmp_path / "prefix")
    picture = np.random.default_rng(1).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    options = CaptionOptions(num_beams=1, max_new_tokens=6, min_new_tokens=6)
    explanation = explain(captioner, picture, options)
    assert explanation.caption == captioner(picture, options)[0].caption
    side = PREFIX_ENCODER.grid_size  # lite0 at 64 px: 2x2 patches after the global token
    assert_shares_add_up(explanation, side, side)
    # caption tokens attend to SEP and to earlier caption tokens too: that part is not the image's
    assert all(0 < w.image_share < 1 for w in explanation.words)


# --- words -------------------------------------------------------------------------------------------------


def test_bpe_pieces_merge_into_words_and_punctuation_and_end_of_text_are_dropped(shipped):
    tokenizer = shipped.loaded.tokenizer
    text = " a snowboarder's jump, over the snowbank ."
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    pieces = [tokenizer.decode([i]) for i in ids]
    words = words_of(tokenizer, ids)
    assert [w for w, _, _ in words] == ["a", "snowboarder's", "jump", "over", "the", "snowbank"]
    assert len(ids) > len(words) + 3  # some words are several pieces (the test means something)
    for word, positions, _ in words:
        joined = "".join(pieces[p] for p in range(positions[0], positions[-1] + 1)).strip()
        assert joined.strip(",.") == word  # consecutive pieces, punctuation pieces left out
    assert all(pieces[p] not in (",", " .", "<|eos|>") for _, positions, _ in words for p in positions)

    # a GPT-2 style tokenizer (one special token for bos, eos and pad) works the same way
    gpt2 = gpt2_style_tokenizer()
    ids = [
        *gpt2(" a dog runs across the greengrass", add_special_tokens=False)["input_ids"],
        gpt2.eos_token_id,
    ]
    assert [w for w, _, _ in words_of(gpt2, ids)] == ["a", "dog", "runs", "across", "the", "greengrass"]


def test_a_words_map_is_the_mean_of_its_pieces_maps(shipped):
    tokenizer = shipped.loaded.tokenizer
    text = " two dogs play with the giraffe"
    tokens = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    result = shipped(DOGS)[0]
    result.candidates[0].tokens, result.caption = tokens, "Two dogs play with the giraffe."
    [explanation] = explain_results(shipped, [DOGS], [result])
    assert [w.word for w in explanation.words] == ["Two", "dogs", "play", "with", "the", "giraffe"]
    assert len(explanation.words[-1].pieces) == 4  # " g", "ir", "aff", "e"
    reference = reference_attention(shipped, load_image(DOGS), tokens)  # (T, 1 + 81 + 5)
    for word, (_, positions, _) in zip(explanation.words, words_of(tokenizer, tokens), strict=True):
        mean = reference[positions].mean(axis=0)
        np.testing.assert_allclose(word.grid, mean[1:82].reshape(9, 9), atol=1e-4)
        assert word.other_share == pytest.approx(mean[0] + mean[82:].sum(), abs=1e-4)  # global, concepts


def reference_attention(captioner, picture, tokens, layer=None, head=None) -> np.ndarray:
    """(T, S) cross-attention of the plain model's forward pass, as training runs it (no engine): the mean
    over layers and heads unless one is picked."""
    model = captioner.model
    start = model.generation_config.decoder_start_token_id
    model.decoder.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(
                pixel_values=captioner.pixel_values([picture]),
                decoder_input_ids=torch.tensor([[start, *tokens[:-1]]]),
                output_attentions=True,
            )
    finally:
        model.decoder.set_attn_implementation("sdpa")
    attention = torch.cat(out.cross_attentions).double()  # (L, H, T, S)
    attention = attention[layer] if layer is not None else attention.mean(dim=0)
    return (attention[head] if head is not None else attention.mean(dim=0)).numpy()


# --- the command ----------------------------------------------------------------------------------------


def caption_of(*args) -> str:
    result = CliRunner().invoke(cli_app, ["caption", *args])
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    return line.split("\t")[1]


@pytest.mark.parametrize(
    ("photo", "settings"),
    [
        (DOGS, []),
        (CAT, []),  # guided: decoded again with "cat" first
        (DOGS, ["--beams", "1", "--max-length", "12"]),
        (CAT, ["--beams", "5", "--no-guide"]),
        (DOGS, ["--sample", "--seed", "3", "--top-k", "20"]),
    ],
    ids=["default", "guided-cat", "greedy", "beams5-unguided", "sampled"],
)
def test_explain_gives_imcap_captions_caption_and_writes_json_and_figure(photo, settings, tmp_path):
    figure, saved = tmp_path / "a.png", tmp_path / "a.json"
    result = CliRunner().invoke(
        cli_app, ["explain", str(photo), *settings, "--json", str(saved), "--output", str(figure)]
    )
    assert result.exit_code == 0, result.output
    caption = caption_of(str(photo), *settings)
    data = json.loads(saved.read_text())
    assert data["caption"] == caption == result.stdout.splitlines()[0]
    assert [w["word"] for w in data["words"]] == caption_words(caption)
    assert data["grid_size"] == [9, 9]
    for word in data["words"]:
        grid = np.array(word["grid"])
        assert grid.shape == (9, 9) and grid.sum() <= 1
        assert grid.sum() + word["other_share"] == pytest.approx(1, abs=1e-3)
    with Image.open(figure) as png:
        assert png.format == "PNG" and png.width > 600


def test_the_figure_shows_the_photo_then_one_panel_per_word(shipped):
    from imcap.explain_figure import figure, lit

    picture = load_image(DOGS)
    explanation = explain(shipped, picture)
    fig = figure(explanation, picture)
    labels = [ax.texts[0].get_text() for ax in fig.axes]
    assert labels == ["(photo)", *[w.word for w in explanation.words]]
    shown = [ax.images[0].get_array() for ax in fig.axes]
    assert all(image.shape == shown[0].shape for image in shown)
    np.testing.assert_array_equal(shown[1], lit(np.asarray(shown[0]), explanation.words[0].grid))
    assert not np.array_equal(shown[1], shown[0])
    # a 15-word caption: 16 panels in rows of 6
    many = type(explanation)(explanation.caption, (9, 9), explanation.words * 3, explanation.result)
    assert len(figure(many, picture).axes) == 1 + 3 * len(explanation.words)


def test_layer_and_head_pick_one_and_bad_ones_fail_in_one_line(shipped):
    one = explain(shipped, DOGS, layer=2, head=3)
    assert_shares_add_up(one, 9, 9)
    assert (one.layer, one.head) == (2, 3)
    with pytest.raises(ExplainError, match=r"layer 3 does not exist: the decoder has 3 layers \(0..2\)"):
        explain(shipped, DOGS, layer=3)
    result = CliRunner().invoke(cli_app, ["explain", str(DOGS), "--head", "4"])
    assert (
        result.exit_code == 2
        and result.stderr == "error: head 4 does not exist: the decoder has 4 heads (0..3)\n"
    )


def test_models_without_attention_to_image_tokens_fail_in_one_line(tmp_path):
    model, tokenizer = tiny_lstm_model()
    save_model(model, tokenizer, image_processor_for(model.config.encoder), tmp_path / "lstm")
    with pytest.raises(ExplainError, match="LSTM baseline reads the photo as one pooled vector"):
        explain(Captioner.from_pretrained(tmp_path / "lstm"), DOGS)
    result = CliRunner().invoke(cli_app, ["explain", str(DOGS), "--model", str(tmp_path / "lstm")])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(
        "error: cannot explain this model"
    )


# --- REST ---------------------------------------------------------------------------------------------------


def test_rest_return_attention_adds_each_images_word_grids(seeing_model_dir, tmp_path):
    captioner = Captioner.from_pretrained(seeing_model_dir)
    photos = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in (DOGS, CAT)]
    form = {"max_new_tokens": "6", "num_beams": "2"}
    with TestClient(create_app({"seeing": captioner}, ServeSettings(ui=False, api_key=None))) as client:
        plain = client.post("/v1/captions", files=photos, data=form).json()["images"]
        asked = client.post("/v1/captions", files=photos, data={**form, "return_attention": "true"})
        as_json = client.post(
            "/v1/captions",
            files=photos,
            data={"options": json.dumps({"max_new_tokens": 6, "num_beams": 2, "return_attention": True})},
        )
        bad = client.post("/v1/captions", files=photos, data={**form, "return_attention": "maybe"})
    assert asked.status_code == 200, asked.text
    images = asked.json()["images"]
    assert [i["caption"] for i in images] == [i["caption"] for i in plain]  # the same captions
    assert all(i["attention"] is None for i in plain)
    options = CaptionOptions(max_new_tokens=6, num_beams=2)
    for image, photo in zip(images, (DOGS, CAT), strict=True):
        expected = explain(captioner, load_image(photo), options).to_json()
        attention = image["attention"]
        side = captioner.model.config.encoder.grid_size  # the tiny model: lite0 at 64 px, 2x2
        assert attention["grid_size"] == [side, side]
        assert [w["word"] for w in attention["words"]] == caption_words(image["caption"])
        for got, want in zip(attention["words"], expected["words"], strict=True):
            np.testing.assert_allclose(got["grid"], want["grid"], atol=1e-5)
            assert math.isclose(got["other_share"], want["other_share"], abs_tol=1e-5)
    assert as_json.status_code == 200, as_json.text
    assert [i["attention"] for i in as_json.json()["images"]] == [i["attention"] for i in images]
    assert bad.status_code == 422 and "return_attention must be true or false" in bad.json()["detail"]


def test_rest_return_attention_for_an_lstm_is_a_422_in_one_line(tmp_path):
    model, tokenizer = tiny_lstm_model()
    save_model(model, tokenizer, image_processor_for(model.config.encoder), tmp_path / "lstm")
    captioner = Captioner.from_pretrained(tmp_path / "lstm")
    photo = [("images", (DOGS.name, DOGS.read_bytes(), "image/jpeg"))]
    with TestClient(create_app({"lstm": captioner}, ServeSettings(ui=False, api_key=None))) as client:
        response = client.post("/v1/captions", files=photo, data={"return_attention": "true"})
        fine = client.post("/v1/captions", files=photo)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("return_attention: cannot explain this model: the LSTM")
    assert fine.status_code == 200


# --- the web page ---------------------------------------------------------------------------------------


def test_the_pages_explain_view_draws_the_figure_of_the_captions_just_made(seeing_model_dir, tmp_path):
    from imcap.explain_figure import render
    from imcap.serving.queue import Batcher
    from imcap.serving.ui import caption_handler, draw_explanation

    captioner = Captioner.from_pretrained(seeing_model_dir)
    paths = [tmp_path / "dogs.jpg", tmp_path / "cat.jpg"]
    for path, photo in zip(paths, (DOGS, CAT), strict=True):
        path.write_bytes(photo.read_bytes())
    batcher = Batcher({"seeing": captioner})
    try:
        handler = caption_handler(batcher, {"seeing": captioner}, ServeSettings(ui=True), explain=True)
        gallery, _, explained, picker = handler(
            [(str(p), None) for p in paths], "seeing", 6, 2, False, 1, 0, 1, 1
        )
    finally:
        batcher.close()
    assert [e.caption for _, e in explained] == [caption for _, caption in gallery]
    assert [path for path, _ in explained] == [str(p) for p in paths]
    assert picker["choices"] == [("1. dogs.jpg", 0), ("2. cat.jpg", 1)] and picker["value"] == 0
    figure = draw_explanation(explained, 1)
    np.testing.assert_array_equal(
        np.asarray(figure), np.asarray(render(explained[1][1], load_image(paths[1])))
    )
    assert draw_explanation([], None) is None  # before the first caption


def test_the_page_explains_nothing_for_an_lstm_and_still_captions(tmp_path):
    from imcap.serving.queue import Batcher
    from imcap.serving.ui import caption_handler

    model, tokenizer = tiny_lstm_model()
    save_model(model, tokenizer, image_processor_for(model.config.encoder), tmp_path / "lstm")
    captioner = Captioner.from_pretrained(tmp_path / "lstm")
    batcher = Batcher({"lstm": captioner})
    try:
        handler = caption_handler(batcher, {"lstm": captioner}, ServeSettings(ui=True), explain=True)
        gallery, _, explained, picker = handler([(str(DOGS), None)], "lstm", 6, 2, False, 1, 0, 1, 1)
    finally:
        batcher.close()
    assert len(gallery) == 1 and explained == [] and picker["choices"] == []


def test_a_figure_without_matplotlib_fails_in_one_line_before_any_model_work(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args),
    )
    result = CliRunner().invoke(cli_app, ["explain", str(DOGS), "--output", str(tmp_path / "a.png")])
    assert result.exit_code == 2
    assert (
        result.stderr
        == "error: drawing the figure needs matplotlib: pip install matplotlib (or 'imcap[serve]')\n"
    )
