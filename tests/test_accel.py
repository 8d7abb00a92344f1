"""The opt-in accelerations: int8 decoder and ONNX Runtime encoder stay close to the fp32 model."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from imcap import accel
from imcap.captioner import Captioner
from imcap.compat import cache_keyword
from imcap.engine import Engine, EngineOptions
from imcap.generation import CaptionOptions
from imcap.modeling import load_model
from imcap.search import new_cache

from .test_engine import noise_pictures


@pytest.fixture(scope="module")
def seeing(seeing_model_dir):
    loaded = load_model(seeing_model_dir)
    pixels = loaded.image_processor(noise_pictures(6), return_tensors="pt")["pixel_values"]
    return loaded, pixels


def next_token_logits(decoder, hidden: torch.Tensor) -> torch.Tensor:
    start = torch.full((hidden.shape[0], 1), 1, dtype=torch.long)
    with torch.inference_mode():
        cache = {cache_keyword(decoder): new_cache(decoder)}
        return decoder(input_ids=start, encoder_hidden_states=hidden, **cache).logits


def test_int8_decoder_quantises_every_linear_layer_and_stays_close(seeing):
    loaded, pixels = seeing
    quantized = accel.int8_decoder(loaded.model.decoder)
    assert not any(isinstance(m, Conv1D | torch.nn.Linear) for m in quantized.modules())
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
    assert any(isinstance(m, Conv1D) for m in loaded.model.decoder.modules())  # the model is untouched

    hidden = Engine(loaded.model).encode(pixels)
    exact, approx = next_token_logits(loaded.model.decoder, hidden), next_token_logits(quantized, hidden)
    assert not torch.equal(exact, approx)  # it really runs int8
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()


def test_int8_decoder_prints_no_deprecation_notice(seeing):
    loaded, _ = seeing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a notice already shown once in this process still counts
        accel.int8_decoder(loaded.model.decoder)
    assert [str(w.message) for w in caught] == []


def test_int8_engine_captions(seeing):
    loaded, pixels = seeing
    captioner = Captioner(loaded, engine=EngineOptions(int8_decoder=True))
    results = captioner.caption_pixels(pixels, CaptionOptions(num_beams=2, max_new_tokens=8))
    assert len(results) == len(pixels)
    for result in results:
        assert result.candidates[0].tokens and -1e4 < result.candidates[0].score < 0


def test_onnx_encoder_matches_torch_and_is_exported_once(seeing, tmp_path, monkeypatch, capfd):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(accel, "ONNX_CACHE", tmp_path)
    loaded, pixels = seeing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx = Engine(loaded.model, EngineOptions(onnx_encoder=True))
    # the export is silent: no notice per skipped torchvision operator, no pytree FutureWarning
    assert [str(w.message) for w in caught] == [] and "torchvision" not in capfd.readouterr().err
    exported = list(tmp_path.glob("*.onnx"))
    assert len(exported) == 1
    reference = Engine(loaded.model)
    for batch in (1, 5):  # the batch dimension is dynamic
        assert torch.allclose(onnx.encode(pixels[:batch]), reference.encode(pixels[:batch]), atol=1e-4)
    stamp = exported[0].stat().st_mtime_ns
    Engine(loaded.model, EngineOptions(onnx_encoder=True))
    assert exported[0].stat().st_mtime_ns == stamp and len(list(tmp_path.glob("*"))) == 1
