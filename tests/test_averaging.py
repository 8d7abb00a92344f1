"""Checkpoint averaging: the mean of the weights, refusals for checkpoints of different models, and a
real run's checkpoints averaged into a model folder that loads, and model folders averaged (a soup)."""

import shutil

import pytest
import torch

from imcap.guidance import GUIDANCE_FILE
from imcap.modeling import load_model, save_model
from imcap.training.averaging import average_checkpoints, average_state_dicts
from imcap.training.loop import train

from .test_training import data, tiny_config  # noqa: F401  (data: the module's shared Flickr8k subset)


def test_floats_are_averaged_and_counters_kept():
    first = {
        "w": torch.tensor([1.0, 3.0]),
        "steps": torch.tensor(5),
        "half": torch.tensor([1.0], dtype=torch.half),
    }
    second = {
        "w": torch.tensor([3.0, 5.0]),
        "steps": torch.tensor(5),
        "half": torch.tensor([2.0], dtype=torch.half),
    }
    averaged = average_state_dicts([first, second])
    torch.testing.assert_close(averaged["w"], torch.tensor([2.0, 4.0]))
    assert averaged["steps"].item() == 5 and averaged["half"].dtype == torch.half
    assert averaged["half"].item() == 1.5


def test_weights_interpolate_and_extrapolate():
    start, tuned = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 2.0])}
    between = average_state_dicts([tuned, start], weights=[0.75, 0.25])
    torch.testing.assert_close(between["w"], torch.tensor([2.5, 2.0]))
    further = average_state_dicts([tuned, start], weights=[1.5, -0.5])  # half again along start -> tuned
    torch.testing.assert_close(further["w"], torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match="sum to 1.2, not 1"):
        average_state_dicts([tuned, start], weights=[1.0, 0.2])
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        average_state_dicts([tuned, start], weights=[1.0])


@pytest.mark.parametrize(
    "second, message",
    [
        ({"w": torch.zeros(2)}, "other weights"),
        ({"w": torch.zeros(3), "steps": torch.tensor(5)}, "shapes differ"),
        ({"w": torch.zeros(2), "steps": torch.tensor(6)}, "non-float tensor differs"),
    ],
)
def test_checkpoints_of_different_models_are_refused(second, message):
    first = {"w": torch.zeros(2), "steps": torch.tensor(5)}
    with pytest.raises(ValueError, match=message):
        average_state_dicts([first, second])
    with pytest.raises(ValueError, match="nothing to average"):
        average_state_dicts([])


def test_a_runs_checkpoints_average_into_a_model_folder(data, tmp_path):  # noqa: F811
    best = train(tiny_config(data, tmp_path / "run", tmp_path / "cache", xe_epochs=1))
    first = tmp_path / "run" / "checkpoint.pt"
    payload = torch.load(first, weights_only=False)
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in payload["model"].items()}
    second = tmp_path / "moved.pt"
    torch.save({**payload, "model": moved}, second)

    out = average_checkpoints(best, [first, second], tmp_path / "avg", fp16=False)

    averaged = load_model(out).model.state_dict()
    for key, value in payload["model"].items():
        expected = value + 0.5 if value.is_floating_point() else value
        torch.testing.assert_close(averaged[key], expected)


def test_model_folders_average_into_a_soup_with_the_first_folders_guidance(seeing_model_dir, tmp_path):
    loaded = load_model(seeing_model_dir)
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with torch.no_grad():
        tensors = {v.data_ptr(): v for v in loaded.model.state_dict().values() if v.is_floating_point()}
        for value in tensors.values():  # once per tensor: tied weights are one tensor under two names
            value += 1
    moved = tmp_path / "moved"
    save_model(loaded.model, loaded.tokenizer, loaded.image_processor, moved)
    first = tmp_path / "first"
    shutil.copytree(seeing_model_dir, first)
    (first / GUIDANCE_FILE).write_text('{"name_threshold": 0.4}')

    out = average_checkpoints(first, [first, moved], tmp_path / "soup", fp16=False)

    averaged = load_model(out).model.state_dict()
    for key, value in original.items():
        expected = value + 0.5 if value.is_floating_point() else value
        torch.testing.assert_close(averaged[key], expected)
    assert (out / GUIDANCE_FILE).read_text() == '{"name_threshold": 0.4}'
