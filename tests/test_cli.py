"""`imcap caption` in-process, with the shipped default model on the bundled example photos."""

import json

from typer.testing import CliRunner

from imcap.cli import app

from .conftest import EXAMPLES


def caption_lines(*args):
    result = CliRunner().invoke(app, ["caption", *args])
    return result, dict(line.split("\t") for line in result.stdout.splitlines() if "\t" in line)


def test_default_model_captions_every_example_sensibly():
    result, captions = caption_lines(str(EXAMPLES))
    assert result.exit_code == 0, result.output
    assert len(captions) == len(list(EXAMPLES.glob("*.jpg")))
    by_name = {path.rsplit("/", 1)[-1]: text for path, text in captions.items()}
    assert "dog" in by_name["flickr8k-val-dogs.jpg"].lower()
    assert any(word in by_name["flickr8k-val-snow.jpg"].lower() for word in ("snow", "ski", "mountain"))
    assert any(word in by_name["flickr8k-val-soccer.jpg"].lower() for word in ("soccer", "ball", "football"))
    for text in by_name.values():
        assert text[0].isupper() and text.endswith(".") and 3 <= len(text.split()) <= 30


def test_same_image_same_caption_every_time():
    first = caption_lines(str(EXAMPLES / "coffee.jpg"), "--beams", "3")[1]
    second = caption_lines(str(EXAMPLES / "coffee.jpg"), "--beams", "3")[1]
    assert first == second


def test_globs_and_a_bad_file_in_a_batch(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    good = tmp_path / "good.jpg"
    good.write_bytes((EXAMPLES / "flickr8k-val-dogs.jpg").read_bytes())
    result, captions = caption_lines(str(tmp_path / "*.jpg"))
    assert result.exit_code == 1  # one file failed
    assert list(captions) == [str(good)]
    assert "broken.jpg" in result.stderr and "not a readable image" in result.stderr


def test_missing_path_and_bad_options_fail_in_one_line(tmp_path):
    for args in (
        [str(tmp_path / "nope.jpg")],
        [str(EXAMPLES), "--beams", "0"],
        ["--model", "./no/model", "x"],
    ):
        result = CliRunner().invoke(app, ["caption", *args])
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_tags_from_the_shipped_models_concept_head(tmp_path):
    """`--tags K`: the shipped model's top K ImageNet labels with probabilities, most probable first."""
    out = tmp_path / "tags.jsonl"
    result = CliRunner().invoke(
        app, ["caption", str(EXAMPLES / "chelsea.jpg"), "--tags", "5", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    scores = [tag["score"] for tag in row["tags"]]
    assert len(row["tags"]) == 5 and all(tag["label"] and 0 < tag["score"] <= 1 for tag in row["tags"])
    assert scores == sorted(scores, reverse=True) and row["settings"]["tags"] == 5
    assert any(word in tag["label"].lower() for tag in row["tags"] for word in ("cat", "tabby"))
    shown = CliRunner().invoke(app, ["caption", str(EXAMPLES / "chelsea.jpg"), "--tags", "2"])
    [(_, caption, labels)] = [line.split("\t") for line in shown.stdout.splitlines()]
    assert caption == row["caption"] and labels == ", ".join(tag["label"] for tag in row["tags"][:2])
