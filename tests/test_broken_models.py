"""Broken model folders (issue 16): one line saying what is wrong, from the API, the CLI and the server.

Each folder is a copy of the tiny model with one thing damaged, as a failed download, a full disk or a
hand-edited config leaves them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imcap.captioner import Captioner
from imcap.cli import app
from imcap.modeling import ModelLoadError

from .test_batch import make_photos

WEIGHTS = "model.safetensors"


def truncate_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def overwrite_header_length(folder: Path) -> None:  # random bytes where the header's length goes
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[:8] = b"\x9f\x13\xe2\x07\xaa\x51\x00\xff"
    (folder / WEIGHTS).write_bytes(bytes(data))


def garble_header(folder: Path) -> None:  # a plausible length, then not JSON
    data = (folder / WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    (folder / WEIGHTS).write_bytes(data[:8] + b"\x00garbage" * (length // 8) + data[8 + length // 8 * 8 :])


def edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def delete(*names: str):
    return lambda folder: [(folder / name).unlink() for name in names]


DAMAGES = {  # what is done to the folder -> what the one line says
    "truncated weights": (truncate_weights, f"{WEIGHTS} is truncated ("),
    "empty weights": (write(WEIGHTS, ""), f"{WEIGHTS} is truncated or corrupt (0 bytes"),
    "random header length": (overwrite_header_length, f"{WEIGHTS} is truncated or corrupt ("),
    "garbled header": (garble_header, f"{WEIGHTS} is corrupt (its header is not a safetensors header)"),
    "no weights": (delete(WEIGHTS), "it has no weights (model.safetensors)"),
    "no tokenizer": (delete("tokenizer.json"), "it has no tokenizer files (tokenizer.json"),
    "tokenizer not JSON": (write("tokenizer.json", '{"version": "1.0",'), "tokenizer.json is not valid JSON"),
    "no processor": (
        delete("preprocessor_config.json"),
        "it has no image processor settings (preprocessor_config.json)",
    ),
    "unknown architecture": (
        edit_config(model_type="frobnicator", architectures=["FrobnicatorModel"]),
        "model_type 'frobnicator' is not",
    ),
    "unknown encoder": (
        edit_config(encoder={"model_type": "nope"}),
        "Unrecognized model type for subconfig: nope",
    ),
    "config not JSON": (
        write("config.json", '{"model_type": "vision-encoder-decoder",'),
        "config.json is not valid JSON (",
    ),
    "config not an object": (write("config.json", "[]"), "config.json does not hold a JSON object"),
    "shapes differ": (
        edit_config(decoder={"n_embd": 64}),
        "its weights do not fit its config.json (tensor shapes differ)",
    ),
}


@pytest.fixture(params=list(DAMAGES))
def broken(request, tiny_model_dir, tmp_path) -> tuple[Path, str]:
    damage, message = DAMAGES[request.param]
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    return folder, message


def test_the_api_raises_model_load_error_with_one_line(broken):
    folder, message = broken
    with pytest.raises(ModelLoadError) as raised:
        Captioner.from_pretrained(folder)
    text = str(raised.value)
    assert message in text and str(folder) in text and "\n" not in text and len(text) < 400


def test_caption_and_serve_fail_with_one_line(broken, tmp_path):
    folder, message = broken
    make_photos(tmp_path / "photos", 1)
    for command in (["caption", str(tmp_path / "photos")], ["serve", "--port", "0"]):
        result = CliRunner().invoke(app, [*command, "--model", str(folder)])
        assert result.exit_code == 2, (command, result.output)
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and message in line, (command, line)


def test_a_real_run_prints_only_the_line(tiny_model_dir, tmp_path):
    """In a process of its own (where transformers' loading report would reach stderr), still one line."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    edit_config(decoder={"n_embd": 64})(folder)
    make_photos(tmp_path / "photos", 1)
    result = subprocess.run(
        [sys.executable, "-m", "imcap", "caption", str(tmp_path / "photos"), "--model", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot load the model in {folder}: "
        "its weights do not fit its config.json (tensor shapes differ)"
    ]
    assert result.stdout == ""
