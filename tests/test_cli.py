"""`imcap caption` in-process, with the shipped default model on the bundled example photos."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

import imcap
from imcap.cli import app

from .conftest import EXAMPLES, REPO


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


# --- what a new user tripped over (issue 15): one test per rough edge ---------------------------------


def test_sample_alone_draws_independent_samples_reproducibly(tmp_path):
    """--sample is plain sampling: --num-captions 5 needs no --beams, and --seed repeats the samples."""
    rows = []
    for run in ("first", "again"):
        out = tmp_path / f"{run}.jsonl"
        args = ["--sample", "--num-captions", "5", "--seed", "1", "-o", str(out)]
        result = CliRunner().invoke(app, ["caption", str(EXAMPLES / "coffee.jpg"), *args])
        assert result.exit_code == 0, result.output
        rows.append(json.loads(out.read_text()))
    first, again = rows
    assert first["settings"]["num_beams"] == 1 and len(first["candidates"]) == 5
    assert first["candidates"] == again["candidates"]
    scores = [c["score"] for c in first["candidates"]]
    assert scores == sorted(scores, reverse=True) and first["score"] == scores[0]
    beams = CliRunner().invoke(app, ["caption", str(EXAMPLES / "coffee.jpg"), "--sample", "--beams", "3"])
    assert beams.exit_code == 0  # beam sampling when --beams is given explicitly


def test_importing_the_cli_loads_neither_torch_nor_transformers():
    """`imcap --help` must answer at once: heavy libraries come with the commands that use them."""
    code = "import sys, imcap.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"


def test_help_shows_flags_as_flags_and_version_prints():
    for args in (["--help"], ["caption", "--help"], ["eval", "--help"]):
        result = CliRunner().invoke(app, args, terminal_width=120)
        assert result.exit_code == 0 and "<bool>" not in result.stdout
    caption_help = CliRunner().invoke(app, ["caption", "--help"], terminal_width=200).stdout
    assert "--recursive" in caption_help
    assert "'imcap[ray]'" in caption_help  # square brackets survive rich's markup
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"imcap {imcap.__version__}"


def _one_line_failure(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _find_spec_without(missing: str):
    real = importlib.util.find_spec
    return lambda name, *args: None if name == missing else real(name, *args)


def test_eval_and_train_check_extras_java_and_data_first_and_create_nothing(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("data:\n  path: ../no-such-data\noutput_dir: ../runs/r\n")
    train = ["train", str(recipe)]
    evaluate = ["eval", "--data", str(tmp_path / "no-such-data")]
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", _find_spec_without("pycocoevalcap"))
        for args in (evaluate, train):
            assert "pip install 'imcap[train]'" in _one_line_failure(CliRunner().invoke(app, args))
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "which", lambda name, *a: None)  # no java on PATH
        for args in (evaluate, train):
            assert "needs Java" in _one_line_failure(CliRunner().invoke(app, args))
    assert "no-such-data" in _one_line_failure(CliRunner().invoke(app, evaluate))
    assert "no-such-data" in _one_line_failure(CliRunner().invoke(app, train))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]  # no runs/r left behind


def test_recipe_paths_count_from_the_recipe_file(tmp_path):
    from imcap.training.config import TrainConfig

    recipe = tmp_path / "configs" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        "data:\n  path: ../data/flickr8k\noutput_dir: ../runs/r\ncache_dir: ~/.cache/imcap/features\n"
    )
    config = TrainConfig.from_yaml(recipe)
    assert Path(config.data.path) == tmp_path / "data" / "flickr8k"
    assert Path(config.output_dir) == tmp_path / "runs" / "r"
    assert config.cache_dir == "~/.cache/imcap/features"  # ~ and absolute paths stay as written
    for shipped in (REPO / "configs").glob("*.yaml"):  # the repo's recipes point at ../shared from any folder
        path = Path(TrainConfig.from_yaml(shipped).data.path)
        assert path.resolve() == (REPO.parent / "shared" / "datasets" / "flickr8k").resolve(), shipped


def test_max_pixels_errors_name_the_flag_and_megapixels():
    result = CliRunner().invoke(app, ["caption", str(EXAMPLES / "coffee.jpg"), "--max-pixels", "100000"])
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "over the limit of 0.1 megapixels" in line and "raise --max-pixels 100000" in line


def test_plain_caption_style_for_training_text_and_tags_joined_by_commas(tmp_path):
    photo = tmp_path / "cat.jpg"
    photo.write_bytes((EXAMPLES / "chelsea.jpg").read_bytes())
    args = ["caption", str(photo), "--sidecar", "--caption-style", "plain", "--prefix", "photo of "]
    result = CliRunner().invoke(app, [*args, "--suffix", ", high quality", "--tags", "2"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "cat.txt").read_text()
    caption, _, tags = text.partition(", high quality, ")
    assert caption.startswith("photo of a ") and not caption.endswith(".")  # "photo of a cat is ..."
    assert len(tags.split(", ")) == 2 and tags == tags.lower()
    bad = CliRunner().invoke(app, ["caption", str(photo), "--caption-style", "title"])
    assert "--caption-style" in _one_line_failure(bad)


def test_ctrl_c_reports_progress_and_a_rerun_finishes_every_image_once(tmp_path):
    """A real SIGINT mid-run: a one-line report, exit code 130, and the rerun completes the file."""
    photos = 120  # ~10 s of captioning one by one: the interrupt, sent after 2 rows, always lands mid-run
    for i in range(photos):
        (tmp_path / f"photo{i:03d}.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
    out = tmp_path / "out.jsonl"
    imcap_cli = [sys.executable, "-m", "imcap", "caption", str(tmp_path), "-o", str(out), "--batch-size", "1"]
    process = subprocess.Popen(
        imcap_cli,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background (`cmd &` in a script) ignores SIGINT, and
        # the child would inherit that, so Python would install no KeyboardInterrupt handler at all
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    done = out.read_text().count("\n")
    assert line == f"interrupted: {done} captioned; rerun the same command to continue"
    assert "Traceback" not in stderr and "Warning" not in stderr  # no FutureWarning from transformers either
    subprocess.run(imcap_cli, capture_output=True, check=True, timeout=300)
    paths = [json.loads(row)["path"] for row in out.read_text().splitlines()]
    assert sorted(paths) == sorted(str(p) for p in tmp_path.glob("*.jpg")) and len(set(paths)) == photos
