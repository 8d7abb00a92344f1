"""Processor-based checkpoints (imcap.families): tiny random BLIP, GIT and LLaVA folders, saved as the hub
hands them over, through the Python API, `imcap caption`, `imcap eval`, the REST API and batching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imcap.batch import caption_batches
from imcap.captioner import Captioner
from imcap.cli import app
from imcap.families import DEFAULT_INSTRUCTION, caption_text, prompt_text
from imcap.generation import CaptionOptions, OptionsError
from imcap.images import load_image
from imcap.modeling import ModelLoadError, load_model

from .conftest import EXAMPLES
from .tiny_hub import tiny_gpt2_folder, tiny_vit
from .tiny_vlm import blip_folder, git_folder, llava_folder

PHOTOS = sorted(EXAMPLES.glob("*.jpg"))
BUILDERS = {"blip": blip_folder, "git": git_folder, "llava": llava_folder}


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def captioners(folders) -> dict[str, Captioner]:
    return {name: Captioner.from_pretrained(folder) for name, folder in folders.items()}


def _plain_generate(captioner: Captioner, photo: Path, options: CaptionOptions) -> list[int]:
    """The new tokens plain transformers `generate` gives for one photo, the prompt cut off by its
    length (the reference the Captioner must match)."""
    processor, family = captioner.loaded.processor, captioner.family
    text = prompt_text(processor, family, options.prompt)
    picture = load_image(photo)
    images = [[picture]] if family.nested_images else [picture]
    kwargs = {} if text is None else {"text": [text]}
    inputs = processor(images=images, return_tensors="pt", **kwargs)
    with torch.inference_mode():
        out = captioner.model.generate(
            **inputs, num_beams=options.num_beams, max_new_tokens=options.max_new_tokens, do_sample=False
        )
    start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    return out[0, start:].tolist()


@pytest.mark.parametrize("name", ["blip", "git", "llava"])
@pytest.mark.parametrize("beams", [1, 3])
def test_batches_of_1_and_4_give_plain_generates_captions(captioners, name, beams):
    captioner = captioners[name]
    options = CaptionOptions(num_beams=beams, max_new_tokens=8)
    photos = PHOTOS[:5]
    expected = [
        caption_text(captioner.loaded.tokenizer.decode(_plain_generate(captioner, p, options), True))
        for p in photos
    ]
    for batch_size in (1, 4):
        got = [
            result.caption
            for batch in caption_batches(captioner, photos, options, batch_size)
            for result in batch.results
        ]
        assert got == expected, (name, beams, batch_size)


@pytest.mark.parametrize("name", ["blip", "llava"])
def test_the_prompt_is_never_echoed(captioners, name):
    """generate gives the prompt back in front of the caption; the caption is what follows it."""
    captioner = captioners[name]
    prompt = "photo of" if name == "blip" else DEFAULT_INSTRUCTION
    options = CaptionOptions(num_beams=1, max_new_tokens=6, prompt=prompt)
    photo = PHOTOS[0]
    result = captioner(photo, options)[0]
    picture = load_image(photo)
    text = prompt_text(captioner.loaded.processor, captioner.family, prompt)
    inputs = captioner.loaded.processor(images=[picture], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = captioner.model.generate(**inputs, num_beams=1, max_new_tokens=6, do_sample=False)[0].tolist()
    tokens = result.candidates[0].tokens
    assert out[-len(tokens) :] == tokens and len(out) > len(tokens)  # plain generate = prompt + caption
    prompt_ids = [i for i in inputs["input_ids"][0].tolist() if i not in (0, 2, 3)]
    assert tokens[: len(prompt_ids)] != prompt_ids


def test_llava_uses_the_chat_template_and_a_default_instruction(captioners):
    captioner = captioners["llava"]
    assert captioner.family.name == "LLaVA" and captioner.family.takes_prompt
    text = prompt_text(captioner.loaded.processor, captioner.family, None)
    assert text == "user : <image>" + DEFAULT_INSTRUCTION + " assistant :"
    assert captioner.loaded.processor.tokenizer.padding_side == "left"
    default = captioner(PHOTOS[0], CaptionOptions(num_beams=1, max_new_tokens=6))[0]
    other = captioner(PHOTOS[0], CaptionOptions(num_beams=1, max_new_tokens=6, prompt="a dog"))[0]
    assert default.candidates[0].tokens != other.candidates[0].tokens


def test_python_api_candidates_scores_and_sampling(captioners):
    captioner = captioners["git"]
    result = captioner(PHOTOS[0], CaptionOptions(num_beams=3, num_return_sequences=3, max_new_tokens=8))[0]
    assert len(result.candidates) == 3 and result.caption == result.candidates[0].text
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    for c in result.candidates:
        assert c.score == pytest.approx(c.logprob / len(c.tokens))
    sampled = CaptionOptions(do_sample=True, num_return_sequences=2, seed=3, max_new_tokens=8)
    one = captioner(PHOTOS[:2], sampled)
    again = captioner(PHOTOS[1], sampled)[0]
    assert [c.text for c in one[1].candidates] == [c.text for c in again.candidates]  # by image alone
    assert "prompt" not in CaptionOptions().to_dict()  # rows of models without prompts read as before


def test_prompt_is_refused_in_one_line_by_models_without_prompts(captioners, tiny_model_dir):
    with pytest.raises(OptionsError, match=r"^prompt: .* does not take one; see imcap models$"):
        captioners["git"](PHOTOS[0], CaptionOptions(prompt="a photo of"))
    with pytest.raises(OptionsError, match="does not take one"):
        Captioner.from_pretrained(tiny_model_dir)(PHOTOS[0], CaptionOptions(prompt="a photo of"))
    result = CliRunner().invoke(
        app, ["caption", str(PHOTOS[0]), "--model", str(tiny_model_dir), "--prompt", "hi"]
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --prompt: ") and "does not take one" in result.stderr


@pytest.mark.parametrize("name", ["blip", "git", "llava"])
def test_imcap_caption_prints_one_line_per_photo(folders, name):
    args = ["caption", "--model", str(folders[name]), *map(str, PHOTOS), "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--max-length", "6"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in PHOTOS]
    assert all(line.split("\t")[1] for line in lines)


def test_imcap_caption_with_a_prompt_records_it_in_rows(folders, tmp_path):
    out = tmp_path / "rows.jsonl"
    args = ["caption", "--model", str(folders["blip"]), str(PHOTOS[0]), "--prompt", "photo of"]
    result = CliRunner().invoke(app, [*args, "--output", str(out), "--max-length", "6"])
    assert result.exit_code == 0, result.output
    assert '"prompt": "photo of"' in out.read_text()


def test_not_an_image_to_text_model_fails_in_one_line(tmp_path, folders):
    tiny_gpt2_folder(tmp_path / "gpt2")
    classifier = tmp_path / "vit"
    from transformers import ViTForImageClassification

    ViTForImageClassification(tiny_vit().config).save_pretrained(classifier)
    for folder, kind in ((tmp_path / "gpt2", "gpt2"), (classifier, "vit")):
        with pytest.raises(ModelLoadError) as error:
            load_model(folder)
        message = str(error.value)
        assert "\n" not in message and f"model_type '{kind}' is not an image-to-text model" in message
    no_processor = tmp_path / "blip-without-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(folders["blip"] / name, no_processor / name)
    with pytest.raises(ModelLoadError) as error:
        load_model(no_processor)
    assert "\n" not in str(error.value) and "processor" in str(error.value)


def test_rest_request_with_and_without_prompt(captioners):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imcap.serving.app import create_app
    from imcap.serving.settings import ServeSettings

    served = {"blip": captioners["blip"], "git": captioners["git"]}
    with TestClient(create_app(served, ServeSettings(ui=False))) as client:
        photo = ("images", (PHOTOS[0].name, PHOTOS[0].read_bytes(), "image/jpeg"))
        fields = {"model": "blip", "prompt": "photo of", "max_new_tokens": "6"}
        answer = client.post("/v1/captions", files=[photo], data=fields)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["settings"]["prompt"] == "photo of" and body["images"][0]["caption"]
        refused = client.post("/v1/captions", files=[photo], data={**fields, "model": "git"})
        assert refused.status_code == 422 and "does not take one" in refused.text


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_imcap_eval_on_a_tiny_dataset(folders, tmp_path):
    pytest.importorskip("pycocoevalcap")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "splits").mkdir()
    for photo in PHOTOS[:3]:
        shutil.copy(photo, data / "images" / photo.name)
    (data / "splits" / "val.txt").write_text("".join(p.name + "\n" for p in PHOTOS[:3]))
    (data / "splits" / "train.txt").write_text(PHOTOS[0].name + "\n")
    rows = [f"{p.name}\t{i}\ta dog runs on the grass" for p in PHOTOS[:3] for i in range(2)]
    (data / "captions.tsv").write_text("\n".join(rows) + "\n")
    args = ["eval", "--data", str(data), "--model", str(tmp_path), "--limit", "2", "--max-length", "6"]
    for name in ("git", "llava"):
        args[4] = str(next(iter([p for n, p in folders.items() if n == name])))
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "CIDEr-D" in result.stdout and "images   2" in result.stdout


def test_web_page_prompt_box(captioners):
    pytest.importorskip("gradio")
    import gradio as gr

    from imcap.serving.queue import Batcher
    from imcap.serving.settings import ServeSettings
    from imcap.serving.ui import caption_handler

    served = {"llava": captioners["llava"], "git": captioners["git"]}
    batcher = Batcher(served)
    handler = caption_handler(batcher, served, ServeSettings(ui=True))
    photos = [(str(PHOTOS[0]), None)]
    try:
        gallery, _ = handler(photos, "llava", 6, 1, False, 1.0, 0, 1.0, 1, True, "a dog")
        with pytest.raises(gr.Error, match="does not take one"):
            handler(photos, "git", 6, 1, False, 1.0, 0, 1.0, 1, True, "a dog")
        handler(photos, "git", 6, 1, False, 1.0, 0, 1.0, 1, True, "  ")  # empty: the default
    finally:
        batcher.close()
    expected = captioners["llava"](PHOTOS[0], CaptionOptions(max_new_tokens=6, num_beams=1, prompt="a dog"))
    assert gallery == [(str(PHOTOS[0]), expected[0].caption)]


def test_imcap_models_lists_families_with_prompts_sizes_and_licences():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert rows[0] == ["family", "model_type", "prompt", "checkpoint", "params", "licence"]
    by_id = {row[3]: row for row in rows[1:]}
    assert by_id["Salesforce/blip-image-captioning-base"][2] == "optional"
    assert by_id["microsoft/git-base-coco"][2] == "no"
    assert by_id["HuggingFaceTB/SmolVLM-256M-Instruct"][2] == f"default: {DEFAULT_INSTRUCTION}"
    assert all(len(row) == 6 and row[4] and row[5] for row in rows[1:])
