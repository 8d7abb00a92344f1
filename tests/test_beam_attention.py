"""Cross-attention kept once per image in beam search (imcap.beam_attention): the same attention as one
copy per beam, the same captions from the engine, and the model itself left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imcap import engine as engine_module
from imcap import search
from imcap.beam_attention import (
    NAME,
    beam_sdpa,
    read_once,
    shares_cross_attention,
    with_shared_cross_attention,
)
from imcap.engine import Engine, EngineOptions
from imcap.generation import CaptionOptions, generation_config
from imcap.modeling import load_model
from imcap.training import steps as training_steps
from imcap.training.steps import caption_logits, generate_from_tokens, sample_captions

from .test_engine import noise_pictures


class _CrossAttention(torch.nn.Module):
    is_causal = False  # as GPT-2's cross-attention module says


@pytest.mark.parametrize(("beams", "length"), [(1, 1), (3, 1), (5, 1), (3, 2)])
def test_beam_sdpa_equals_attention_over_one_copy_per_beam(beams, length):
    torch.manual_seed(0)
    images, heads, keys, dim = 4, 2, 7, 8
    query = torch.randn(images * beams, heads, length, dim)
    key, value = torch.randn(images, heads, keys, dim), torch.randn(images, heads, keys, dim)
    got, _ = beam_sdpa(_CrossAttention(), query, key, value, None, scaling=dim**-0.5)
    per_beam = F.scaled_dot_product_attention(
        query, key.repeat_interleave(beams, dim=0), value.repeat_interleave(beams, dim=0)
    )
    assert got.shape == (images * beams, length, heads, dim)
    torch.testing.assert_close(got, per_beam.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_beam_sdpa_refuses_rows_that_are_not_beams_of_the_images():
    query, key = torch.randn(5, 2, 1, 8), torch.randn(2, 2, 7, 8)
    with pytest.raises(ValueError, match="5 query rows for 2 key rows"):
        beam_sdpa(_CrossAttention(), query, key, key, None)


def test_the_engine_shares_while_the_model_keeps_its_attention(seeing_model_dir):
    loaded = load_model(seeing_model_dir)
    engine = Engine(loaded.model)
    assert shares_cross_attention(engine.decoder)
    assert engine.decoder is not loaded.model.decoder
    modules = [m for m in loaded.model.decoder.modules() if hasattr(m, "config")]
    assert all(m.config._attn_implementation == "sdpa" for m in modules)  # generate, training: untouched
    assert all(
        m.config._attn_implementation == NAME for m in engine.decoder.modules() if hasattr(m, "config")
    )


def test_other_decoders_are_left_as_they_are(seeing_model_dir):
    decoder = load_model(seeing_model_dir).model.decoder
    decoder.set_attn_implementation("eager")  # not the SDPA path this folds into
    assert with_shared_cross_attention(decoder) is decoder
    assert not shares_cross_attention(decoder)


@pytest.mark.parametrize("options", [{"num_beams": 3}, {"num_beams": 4, "num_return_sequences": 2}])
def test_shared_and_per_beam_caches_give_the_same_captions(seeing_model_dir, monkeypatch, options):
    """Beam search, prefixed beam search and images leaving the batch early, with the cache kept once per
    image and with one copy per beam (as before; the engine's other tests compare with generate)."""
    loaded = load_model(seeing_model_dir)
    with torch.no_grad():  # end captions at different lengths, so that done images leave the batch
        loaded.model.decoder.lm_head.weight[loaded.model.generation_config.eos_token_id] *= 40
    pixels = loaded.image_processor(noise_pictures(12), return_tensors="pt")["pixel_values"]
    config = generation_config(CaptionOptions(max_new_tokens=12, **options), loaded.model.generation_config)
    shared = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    monkeypatch.setattr(engine_module, "with_shared_cross_attention", lambda decoder: decoder)
    per_beam = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    assert shares_cross_attention(shared.decoder) and not shares_cross_attention(per_beam.decoder)
    drops = []
    drop = search.BeamSearch._drop
    monkeypatch.setattr(search.BeamSearch, "_drop", lambda self, keep: drops.append(1) or drop(self, keep))
    with torch.inference_mode():
        hidden = shared.encode(pixels)
        prefixes = [[5], [7, 7]] * 6
        for decode in (
            lambda engine: engine.decode(hidden, config),
            lambda engine: engine.decode_prefixed(hidden, config, prefixes),
        ):
            a, b = decode(shared), decode(per_beam)
            assert [[d.tokens for d in image] for image in a] == [[d.tokens for d in image] for image in b]
            for x, y in zip(a, b, strict=True):
                assert [d.score for d in x] == pytest.approx([d.score for d in y], abs=1e-4)
    assert drops  # done images did leave the batch


def test_training_reads_each_image_once_with_the_same_logits_and_gradients(seeing_model_dir):
    model = load_model(seeing_model_dir).model.float().train()
    torch.manual_seed(0)
    images, per_image, length = 3, 4, 6
    tokens = torch.randn(images, 10, model.decoder.config.hidden_size)
    ids = torch.randint(3, model.decoder.config.vocab_size, (images * per_image, length))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padded captions too
    model.decoder.config.attn_pdrop = model.decoder.config.resid_pdrop = 0.0
    model.eval()  # no dropout: both ways must draw nothing at random

    def logits_and_grads(read_once_allowed: bool):
        model.zero_grad()
        if read_once_allowed:
            logits = caption_logits(model, tokens, ids, mask, per_image)
        else:  # the old way: one copy of the image's tokens per caption
            logits = caption_logits(model, tokens.repeat_interleave(per_image, dim=0), ids, mask, 1)
        logits.logsumexp(-1)[mask == 1].sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    once, once_grads = logits_and_grads(True)
    copied, copied_grads = logits_and_grads(False)
    # positions after a caption's end are free to differ: no loss reads them
    torch.testing.assert_close(once[mask == 1], copied[mask == 1], rtol=1e-4, atol=1e-5)
    assert once_grads.keys() == copied_grads.keys() and once_grads
    for name, grad in copied_grads.items():
        torch.testing.assert_close(once_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert model.decoder.config._attn_implementation == "sdpa"  # the model's own setting is back
    with read_once(model.decoder, per_image) as once_inside:
        assert once_inside and shares_cross_attention(model.decoder)
    with read_once(model.decoder, 1) as once_inside:  # one caption per image: nothing to share
        assert not once_inside and not shares_cross_attention(model.decoder)


@pytest.mark.parametrize("samples", [2, 3])
def test_scst_sampling_reads_each_image_once_and_draws_what_generate_draws(
    seeing_model_dir, samples, monkeypatch
):
    model = load_model(seeing_model_dir).model.float().eval()
    torch.manual_seed(0)
    tokens = torch.randn(8, 10, model.decoder.config.hidden_size)
    torch.manual_seed(1)
    with monkeypatch.context() as patched:  # its own loop, not generate
        patched.setattr(training_steps, "generate_from_tokens", None)
        drawn = sample_captions(model, tokens, samples, max_new_tokens=24)
    torch.manual_seed(1)
    expected = generate_from_tokens(
        model, tokens, do_sample=True, top_k=0, num_beams=1, num_return_sequences=samples, max_new_tokens=24
    )
    assert torch.equal(drawn, expected)
    pad = model.generation_config.pad_token_id
    assert (drawn[:, -1] == pad).any()  # rows that ended early were padded, as generate pads them
    assert model.decoder.config._attn_implementation == "sdpa"
