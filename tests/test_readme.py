"""The README's examples are real: the first command's output, the JSONL row, the REST answer and the
messages it shows are what the commands print now (on the shipped model)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex

import pytest
from typer.testing import CliRunner

from imcap.cli import app

from .conftest import EXAMPLES, REPO

README = (REPO / "README.md").read_text()


def example(marker: str) -> str:
    """The fenced block right after `<!-- example: marker -->`."""
    match = re.search(rf"<!-- example: {marker} -->\n```\w*\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no example block {marker!r}"
    return match[1]


def same(expected, actual, where: str = "") -> None:
    """Equal structure and texts; numbers within rounding; timings by their keys only."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            if key != "timing":
                same(expected[key], actual[key], f"{where}.{key}")
            else:
                assert list(actual[key]) == list(expected[key]), where
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            same(e, a, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert actual == pytest.approx(expected, abs=2e-3), where
    else:
        assert actual == expected, where


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the README's commands run from the repository's root


def test_the_first_command_prints_what_the_readme_shows(in_repo):
    shown = re.search(r"line per photo:\n\n```\n(.*?)```", README, re.DOTALL)[1].splitlines()
    result = CliRunner().invoke(app, ["caption", "examples/"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == shown
    assert len(shown) == len(list(EXAMPLES.glob("*.jpg")))


def test_the_jsonl_row_example_is_real(in_repo, tmp_path):
    command = re.search(r"`(imcap caption examples/\S+ [^`]*--output dogs\.jsonl)`", README)[1]
    out = tmp_path / "dogs.jsonl"
    args = [str(out) if arg == "dogs.jsonl" else arg for arg in shlex.split(command)[1:]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    same(json.loads(example("jsonl-row")), row)


def test_the_rest_answer_example_is_real(in_repo):
    from fastapi.testclient import TestClient

    from imcap.captioner import Captioner
    from imcap.serving.app import create_app
    from imcap.serving.settings import ServeSettings

    curl = re.search(r"curl (-F .*?)\\\n\s+http://", README, re.DOTALL)[1]
    fields = dict(field.split("=", 1) for field in shlex.split(curl) if field != "-F")
    photo = fields.pop("images").removeprefix("@")
    settings = ServeSettings(ui=False, api_key=None)
    with TestClient(create_app({"default": Captioner.from_pretrained()}, settings)) as client:
        files = [("images", (photo.rsplit("/", 1)[-1], (REPO / photo).read_bytes(), "image/jpeg"))]
        response = client.post("/v1/captions", files=files, data=fields)
    assert response.status_code == 200, response.text
    same(json.loads(example("rest-answer")), response.json())


def _without(missing: str):
    real = importlib.util.find_spec
    return lambda name, *args: None if name == missing else real(name, *args)


def test_the_messages_are_what_the_commands_print(in_repo, monkeypatch):
    lines = example("messages").splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    assert len(commands) >= 3
    for start, end in zip(commands, [*commands[1:], len(lines)], strict=True):
        command, _, note = lines[start][2:].partition("#")
        with monkeypatch.context() as patch:
            if "without the train extra" in note:
                patch.setattr(importlib.util, "find_spec", _without("pycocoevalcap"))
            result = CliRunner().invoke(app, shlex.split(command)[1:])
        printed = result.stderr.splitlines()
        expected = lines[start + 1 : end]
        assert expected and all(line in printed for line in expected), (command, printed)
        assert result.exit_code != 0
