"""The engine gives the tokens of plain `generate`, whatever the batch size, for greedy and beam search."""

from __future__ import annotations

import collections
import copy
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTModel,
)

from imcap.batch import caption_batches
from imcap.captioner import Captioner
from imcap.engine import Engine, EngineOptions
from imcap.fast_encoder import onednn_pointwise_pays
from imcap.generation import CaptionOptions, generation_config
from imcap.images import ImageLoadError
from imcap.modeling import load_model
from imcap.tokenizer import format_caption

from .conftest import EXAMPLES

SETTINGS = {
    "greedy": CaptionOptions(num_beams=1, max_new_tokens=12),
    "beam3": CaptionOptions(num_beams=3, max_new_tokens=12),
    # no_repeat_ngram_size given (the others leave it to the model): no logits processor at all
    "greedy-no-processors": CaptionOptions(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=12),
    "beam3-no-processors": CaptionOptions(num_beams=3, no_repeat_ngram_size=0, max_new_tokens=12),
    "beam4-three-returned": CaptionOptions(num_beams=4, num_return_sequences=3, max_new_tokens=10),
    "beam3-length-penalty": CaptionOptions(num_beams=3, length_penalty=0.6, max_new_tokens=12),
    "beam2-processors": CaptionOptions(
        num_beams=2, repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=4, max_new_tokens=9
    ),
    "greedy-processors": CaptionOptions(
        num_beams=1, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, max_new_tokens=9
    ),
    "beam3-hits-max-length": CaptionOptions(num_beams=3, max_new_tokens=3),
}


def noise_pictures(count: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def plain_generate(model, pixels: torch.Tensor, config: GenerationConfig) -> list[list[list[int]]]:
    """Per image, the generated tokens of each returned sequence, cut after end-of-text: `generate`, one
    image at a time, as the baseline does."""
    eos = config.eos_token_id
    per_image = []
    for row in pixels:
        out = model.generate(pixel_values=row[None], generation_config=config)
        per_image.append([_cut(seq[1:].tolist(), eos) for seq in out])
    return per_image


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def engine_tokens(engine: Engine, pixels: torch.Tensor, config, batch_size: int) -> list[list[list[int]]]:
    tokens = []
    for start in range(0, len(pixels), batch_size):
        decoded = engine.decode(engine.encode(pixels[start : start + batch_size]), config)
        tokens += [[d.tokens for d in candidates] for candidates in decoded]
    return tokens


def load_ending_model(folder, pictures: int):
    """The tiny image-dependent model, made to end its captions at different lengths (a random decoder
    rarely says end-of-text, and batches whose images all run to max_new_tokens test little), and the
    pixels of `pictures` noise pictures."""
    loaded = load_model(folder)
    with torch.no_grad():
        loaded.model.decoder.lm_head.weight[loaded.model.generation_config.eos_token_id] *= 40
    pixels = loaded.image_processor(noise_pictures(pictures), return_tensors="pt")["pixel_values"]
    return loaded, pixels


@pytest.fixture(scope="module")
def seeing(seeing_model_dir):
    return load_ending_model(seeing_model_dir, 16)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("batch_size", [1, 8])
def test_engine_tokens_equal_plain_generate(seeing, name, batch_size):
    loaded, pixels = seeing
    config = generation_config(SETTINGS[name], loaded.model.generation_config)
    with torch.inference_mode():
        expected = plain_generate(loaded.model, pixels, config)
        # BatchNorm folding changes float rounding; it is checked on its own below
        got = engine_tokens(
            Engine(loaded.model, EngineOptions(fold_batchnorm=False)), pixels, config, batch_size
        )
    assert got == expected
    if name == "beam3":  # captions of several lengths: images really leave the batch early
        assert len({len(candidates[0]) for candidates in got}) > 1


@pytest.mark.parametrize("drop_share", [1e-9, 0.5, 1.01])  # leave at once, in groups, never
def test_done_images_leave_the_batch_without_changing_any_result(seeing, monkeypatch, drop_share):
    import imcap.search

    loaded, pixels = seeing
    config = generation_config(SETTINGS["beam3"], loaded.model.generation_config)
    config.num_return_sequences = 2
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    monkeypatch.setattr(imcap.search, "_DROP_SHARE", drop_share)
    with torch.inference_mode():
        expected = plain_generate(loaded.model, pixels, config)
        got = engine.decode(engine.encode(pixels), config)
    assert [[d.tokens for d in candidates] for candidates in got] == expected  # each result taken once


def test_engine_scores_match_generate(seeing):
    loaded, pixels = seeing
    options = CaptionOptions(num_beams=3, num_return_sequences=2, max_new_tokens=12)
    fast = Captioner(loaded)
    fast.engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    plain = Captioner(loaded, use_engine=False)
    ours, theirs = fast.caption_pixels(pixels, options), plain.caption_pixels(pixels, options)
    for a, b in zip(ours, theirs, strict=True):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)


def test_folded_encoder_matches_the_original(seeing):
    loaded, pixels = seeing
    with torch.inference_mode():
        original = loaded.model.encoder(pixel_values=pixels).last_hidden_state
        folded = Engine(loaded.model).encode(pixels)
    assert folded.shape == original.shape
    assert torch.allclose(folded, original, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.encoder.modules())  # untouched


def test_padding_and_activations_in_place_give_the_same_numbers(seeing, monkeypatch):
    """The fast encoder pads inside its convolutions instead of copying each map first (the same zeros in
    the same places; where TF pads one more on the far sides, with a kernel one wider whose first row and
    column are zero) and runs its ReLU6 in place on the convolutions' fresh outputs, so the
    visual tokens and concept probabilities are bit-identical to the folded encoder without either."""
    from imcap import fast_encoder

    loaded, pixels = seeing
    moved = Engine(loaded.model)
    monkeypatch.setattr(fast_encoder, "pad_in_convolutions", lambda encoder: None)
    monkeypatch.setattr(fast_encoder, "_activations_in_place", lambda encoder: None)
    padded = Engine(loaded.model)

    def pads(engine):
        return sum(isinstance(m, torch.nn.ZeroPad2d) for m in engine.encoder.modules())

    def in_place(engine):
        return [m.inplace for m in engine.encoder.modules() if isinstance(m, torch.nn.ReLU6)]

    assert pads(moved) == 0 < pads(padded)  # the asymmetric stride-2 paddings too
    assert all(in_place(moved)) and not any(in_place(padded)) and in_place(moved)
    assert not any(in_place(Engine(loaded.model, EngineOptions(fold_batchnorm=False))))  # model untouched
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as the pipeline's workers run it
    try:
        a, b = moved.encode_with_concepts(pixels), padded.encode_with_concepts(pixels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.hidden, b.hidden)
    assert (a.concept_probs is None) == (b.concept_probs is None)
    if a.concept_probs is not None:
        assert torch.equal(a.concept_probs, b.concept_probs)


def _conv_kernels(encoder, pixels) -> collections.Counter:
    """How many times each convolution kernel ran while `encoder` encoded `pixels` on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as the pipeline's workers run it
    try:
        with torch.inference_mode(), torch.profiler.profile() as profile:
            encoder(pixel_values=pixels.contiguous(memory_format=torch.channels_last))
    finally:
        torch.set_num_threads(threads)
    return collections.Counter(e.key for e in profile.key_averages() if "conv" in e.key)


@pytest.mark.skipif(not onednn_pointwise_pays(), reason="the engine uses oneDNN's 1x1 kernel on x86-64 only")
def test_pointwise_convolutions_run_through_onednn(seeing):
    """On one thread and a few images PyTorch gives a 1x1 convolution its slow im2col kernel; the engine's
    encoder sends every pointwise convolution to oneDNN instead, with the same numbers up to rounding.
    An encoder for ONNX export keeps standard convolutions."""
    from imcap.fast_encoder import OneDnnConv2d, fast_encoder

    loaded, pixels = seeing
    fast = Engine(loaded.model).encoder
    standard = fast_encoder(loaded.model.encoder, onednn=False)
    pointwise = [m for m in standard.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    swapped = [m for m in fast.modules() if isinstance(m, OneDnnConv2d)]
    assert len(swapped) == len(pointwise) > 0
    assert not any(isinstance(m, OneDnnConv2d) for m in standard.modules())

    few = pixels[:4]
    assert _conv_kernels(standard, few)["aten::_slow_conv2d_forward"] > 0  # PyTorch's own choice
    assert _conv_kernels(fast, few)["aten::_slow_conv2d_forward"] == 0
    with torch.inference_mode():
        a = fast(pixel_values=few.contiguous(memory_format=torch.channels_last))
        b = standard(pixel_values=few.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-4, rtol=1e-4)
    if getattr(a, "concept_logits", None) is not None:
        assert torch.allclose(a.concept_logits, b.concept_logits, atol=1e-4, rtol=1e-4)


def test_onnx_encoder_is_exported_without_onednn_convolutions(seeing, monkeypatch):
    from imcap import accel
    from imcap.fast_encoder import OneDnnConv2d

    exported = []

    class Recorder(torch.nn.Module):
        def __init__(self, encoder, image_size):
            super().__init__()
            exported.append(encoder)

    monkeypatch.setattr(accel, "OnnxEncoder", Recorder)
    Engine(seeing[0].model, EngineOptions(onnx_encoder=True))
    assert exported and not any(isinstance(m, OneDnnConv2d) for m in exported[0].modules())


@pytest.mark.parametrize("size", [16, 17])
@pytest.mark.parametrize(("kernel", "stride", "groups"), [(3, 2, 1), (3, 2, 4), (5, 2, 4), (3, 1, 4)])
def test_padding_inside_a_convolution_is_tf_same_padding(size, kernel, stride, groups):
    """Every TF-"same" padding lite2 uses (symmetric, or one more on the right and bottom as a stride-2
    convolution of an even-sized map needs) moves into the convolution with the same numbers, bit for bit."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from imcap.fast_encoder import pad_in_convolutions

    torch.manual_seed(0)
    conv = Conv2dStaticSamePadding(4, 4, kernel, stride=stride, image_size=size, groups=groups).eval()
    x = torch.randn(2, 4, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        moved = copy.deepcopy(conv)
        pad_in_convolutions(moved)
        got = moved(x)
    assert isinstance(moved.static_padding, torch.nn.Identity)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_shipped_model_captions_equal_plain_generate_on_the_examples():
    photos = sorted(EXAMPLES.glob("*.jpg"))
    fast = Captioner.from_pretrained()
    plain = Captioner(fast.loaded, use_engine=False)
    # guidance (imcap.guidance) is the engine's own: plain generate is compared unguided
    for options in (CaptionOptions(guide=False), CaptionOptions(num_beams=1, guide=False)):
        batched = [r.caption for r in fast(photos, options)]
        one_by_one = [plain(photo, options)[0].caption for photo in photos]
        assert batched == one_by_one
        assert all(batched)


def tiny_vit_gpt2() -> VisionEncoderDecoderModel:
    """A ViT + GPT-2 pair shaped like nlpconnect/vit-gpt2 (in miniature, widths differ on purpose)."""
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=96,
        ),
        add_pooling_layer=False,
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, add_cross_attention=True)
    )
    model = VisionEncoderDecoderModel(encoder=vit, decoder=gpt2).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=0, bos_token_id=0, eos_token_id=1, pad_token_id=2
    )
    return model


@pytest.mark.parametrize(("beams", "early_stopping"), [(1, None), (3, True), (3, False), (3, "never")])
def test_engine_handles_other_encoders_and_width_projection(beams, early_stopping):
    model = tiny_vit_gpt2()
    assert model.encoder.config.hidden_size != model.decoder.config.hidden_size  # enc_to_dec_proj used
    pixels = torch.randn(6, 3, 32, 32)
    config = GenerationConfig.from_dict(
        {**model.generation_config.to_dict(), "num_beams": beams, "max_new_tokens": 8}
    )
    config.early_stopping = early_stopping
    with torch.inference_mode():
        expected = plain_generate(model, pixels, config)
        got = engine_tokens(Engine(model), pixels, config, batch_size=6)
    assert got == expected


def test_caption_batches_keeps_order_and_reports_bad_files(seeing_model_dir, tmp_path):
    captioner = Captioner.from_pretrained(seeing_model_dir)
    paths = []
    for i, picture in enumerate(noise_pictures(7)):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths.insert(3, broken)
    options = CaptionOptions(num_beams=2, max_new_tokens=8)
    batches = list(caption_batches(captioner, paths, options, batch_size=3))
    assert [len(b.paths) + len(b.failed) for b in batches] == [3, 3, 2]
    assert [p for b in batches for p in b.paths] == [p for p in paths if p != broken]
    failed = [e for b in batches for e in b.failed]
    assert len(failed) == 1 and isinstance(failed[0], ImageLoadError) and "broken.jpg" in str(failed[0])
    direct = captioner([p for p in paths if p != broken], options)
    assert [r.caption for b in batches for r in b.results] == [r.caption for r in direct]


def test_each_batch_is_encoded_in_one_slice_per_worker(seeing_model_dir, tmp_path, monkeypatch):
    """With two cores a batch is read and encoded as two slices by the two workers, then decoded as one
    batch: the same captions as captioning it whole; a slice whose files are all broken only reports them."""
    captioner = Captioner.from_pretrained(seeing_model_dir)
    paths = []
    for i, picture in enumerate(noise_pictures(6)):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    broken = [tmp_path / "broken-a.jpg", tmp_path / "broken-b.jpg"]
    for path in broken:
        path.write_bytes(b"not an image")
    paths[4:4] = broken  # the second batch of four: one slice of two broken files, one of two pictures
    calls = []
    encode = captioner.encode

    def recording(pixels):
        calls.append((threading.current_thread().name, len(pixels)))
        return encode(pixels)

    monkeypatch.setattr(captioner, "encode", recording)
    options = CaptionOptions(num_beams=2, max_new_tokens=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batches = list(caption_batches(captioner, paths, options, batch_size=4))
    finally:
        torch.set_num_threads(threads)
    assert [len(b.results) for b in batches] == [4, 2]
    assert [len(b.failed) for b in batches] == [0, 2]
    assert sorted(size for _, size in calls) == [2, 2, 2]  # every slice with a picture, encoded apart
    assert all(name.startswith("imcap-read") for name, _ in calls)
    good = [p for p in paths if p not in broken]
    assert [p for b in batches for p in b.paths] == good
    direct = captioner(good, options)
    assert [r.caption for b in batches for r in b.results] == [r.caption for r in direct]


@pytest.mark.parametrize(("count", "expected"), [(2, [3, 2]), (1, [5]), (8, [1, 1, 1, 1, 1])])
def test_slices_of_cuts_contiguous_near_equal_slices(count, expected):
    from imcap.batch import slices_of

    items = list(range(5))
    slices = slices_of(items, count)
    assert [len(s) for s in slices] == expected
    assert [x for s in slices for x in s] == items


def test_candidates_carry_the_same_tokens_on_both_paths(seeing):
    loaded, pixels = seeing
    options = CaptionOptions(num_beams=3, num_return_sequences=2, max_new_tokens=12)
    fast = Captioner(loaded)
    fast.engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    ours = fast.caption_pixels(pixels, options)
    theirs = Captioner(loaded, use_engine=False).caption_pixels(pixels, options)
    eos = loaded.model.generation_config.eos_token_id
    for a, b in zip(ours, theirs, strict=True):
        assert [c.tokens for c in a.candidates] == [c.tokens for c in b.candidates]
        for candidate in a.candidates:
            assert candidate.tokens and eos not in candidate.tokens[:-1]  # cut after the first end
            text = loaded.tokenizer.decode(candidate.tokens, skip_special_tokens=True)
            assert candidate.text == format_caption(text)


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="encoder_batch"):
        EngineOptions(encoder_batch=0)


@pytest.mark.parametrize("encoder_batch", [1, 3])
def test_encoder_slices_do_not_change_the_states(seeing, encoder_batch):
    loaded, pixels = seeing
    whole = Engine(loaded.model, EngineOptions(fold_batchnorm=False, encoder_batch=len(pixels)))
    sliced = Engine(loaded.model, EngineOptions(fold_batchnorm=False, encoder_batch=encoder_batch))
    # equal up to float rounding: convolution kernels pick batch-size-dependent paths (seen: ~1e-4)
    assert torch.allclose(sliced.encode(pixels), whole.encode(pixels), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["greedy", "beam3", "beam4-three-returned", "beam2-processors"])
def test_prefixed_decoding_equals_generate_with_a_prompt(seeing, name):
    """Captions that must start with given tokens (how guidance puts a concept first) are generate's
    captions for that decoder prompt; an empty prefix is plain decoding."""
    loaded, pixels = seeing
    model, options = loaded.model, SETTINGS[name]
    config = generation_config(options, model.generation_config)
    engine = Engine(model, EngineOptions(fold_batchnorm=False))
    prefixes = [[5, 9], [], [7, 7], [11]]
    with torch.inference_mode():
        hidden = engine.encode(pixels[:4])
        got = engine.decode_prefixed(hidden, config, prefixes)
        plain = engine.decode(hidden[1:2], config)[0]
        for image, prefix in enumerate(prefixes):
            prompt = torch.tensor([[config.decoder_start_token_id, *prefix]])
            beam_config = copy.deepcopy(config)
            if options.num_beams == 1:  # a prefixed greedy request is a beam search of width 1
                beam_config.update(num_beams=1)
            out = model.generate(
                pixel_values=pixels[image : image + 1],
                decoder_input_ids=prompt,
                generation_config=beam_config,
                max_new_tokens=config.max_new_tokens,
            )
            expected = [_cut(seq[1:].tolist(), config.eos_token_id) for seq in out]
            assert [d.tokens for d in got[image]] == expected
            assert all(d.tokens[: len(prefix)] == prefix for d in got[image])
    assert [d.tokens for d in got[1]] == [d.tokens for d in plain]


def test_prefixed_scores_count_the_prefix(seeing):
    loaded, pixels = seeing
    config = generation_config(CaptionOptions(num_beams=2, max_new_tokens=6), loaded.model.generation_config)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    with torch.inference_mode():
        hidden = engine.encode(pixels[:1])
        [[best, *_]] = engine.decode_prefixed(hidden, config, [[5, 9]])
        ids = torch.tensor([[config.decoder_start_token_id, *best.tokens]])
        logits = loaded.model.decoder(input_ids=ids, encoder_hidden_states=hidden).logits
    log_probs = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum()
    assert best.score == pytest.approx(float(log_probs), abs=1e-3)


def test_engine_bans_words_as_generate_does(seeing):
    loaded, pixels = seeing
    config = generation_config(CaptionOptions(num_beams=3, max_new_tokens=10), loaded.model.generation_config)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    with torch.inference_mode():
        hidden = engine.encode(pixels[:6])
        common = collections.Counter(t for c in engine.decode(hidden, config) for t in c[0].tokens)
        config.bad_words_ids = [[token] for token, _ in common.most_common(2)]
        got = [c[0].tokens for c in engine.decode(hidden, config)]
        expected = [seq[0] for seq in plain_generate(loaded.model, pixels[:6], config)]
    assert got == expected
    assert not {t for tokens in got for t in tokens} & {b[0] for b in config.bad_words_ids}


@pytest.mark.parametrize("name", ["greedy", "beam3", "beam2-processors"])
def test_per_image_bans_equal_decoding_each_image_with_its_bad_words(seeing, name):
    """Bans: one batched call, each image with its own banned sequences (one-token and longer), gives the
    tokens of decoding each image alone with those sequences as bad_words_ids; with prefixes too."""
    loaded, pixels = seeing
    config = generation_config(SETTINGS[name], loaded.model.generation_config)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    with torch.inference_mode():
        hidden = engine.encode(pixels[:6])
        plain = [c[0].tokens for c in engine.decode(hidden, config)]
        # ban what each image said: its first token alone, or its 2nd token after its 1st (a 2-token rule)
        per_image = [
            [[plain[0][0]]],
            [],
            [[plain[2][0], plain[2][1]]],
            [[plain[3][0]], [plain[3][1]]],
            [[plain[4][0], plain[4][1]], [plain[4][2]]],
            [],
        ]
        bans = engine.bans(per_image)
        got = engine.decode(hidden, config, bans)
        prefixes = [[5], [5], [7, 7], [5], [7, 7], [5]]
        got_prefixed = engine.decode_prefixed(hidden, config, prefixes, bans=bans)
        for image, banned in enumerate(per_image):
            alone = copy.deepcopy(config)
            alone.bad_words_ids = banned or None
            expected = engine.decode(hidden[image : image + 1], alone)[0]
            assert [d.tokens for d in got[image]] == [d.tokens for d in expected]
            expected = engine.decode_prefixed(hidden[image : image + 1], alone, [prefixes[image]])[0]
            assert [d.tokens for d in got_prefixed[image]] == [d.tokens for d in expected]
    assert got[0][0].tokens[:1] != plain[0][:1] and got[1][0].tokens == plain[1]
    assert engine.bans([[], []]) is None


@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_prefixes_of_several_lengths_in_one_search_equal_each_alone(seeing, min_new_tokens):
    """One beam search forces each longer prefix's tokens a step at a time; with tokens banned right after
    the prefix (guidance's word continuations) every image gets the captions it gets alone, scores
    included. With min_new_tokens (counted from each prompt) images are grouped by length instead."""
    loaded, pixels = seeing
    options = CaptionOptions(num_beams=3, max_new_tokens=10, min_new_tokens=min_new_tokens)
    config = generation_config(options, loaded.model.generation_config)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    prefixes, after = [[5, 9, 7], [11], [], [7, 7]], [216, 143, 9]
    with torch.inference_mode():
        hidden = engine.encode(pixels[:4])
        together = engine.decode_prefixed(hidden, config, prefixes, after)
        for image, prefix in enumerate(prefixes):
            [alone] = engine.decode_prefixed(hidden[image : image + 1], config, [prefix], after)
            assert [d.tokens for d in together[image]] == [d.tokens for d in alone]
            assert [d.score for d in together[image]] == pytest.approx([d.score for d in alone], abs=1e-4)
            if prefix:
                assert all(d.tokens[len(prefix)] not in after for d in alone if len(d.tokens) > len(prefix))


def test_an_empty_prefix_among_others_takes_any_first_token(seeing):
    """Tokens banned right after a prefix do not touch an image with no prefix: its captions are plain
    decoding's, even when its first token is on that list."""
    loaded, pixels = seeing
    config = generation_config(CaptionOptions(num_beams=3, max_new_tokens=10), loaded.model.generation_config)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    with torch.inference_mode():
        hidden = engine.encode(pixels[:2])
        plain = engine.decode(hidden[1:2], config)[0]
        after = [plain[0].tokens[0]]
        together = engine.decode_prefixed(hidden, config, [[5, 9], []], after)
    assert [d.tokens for d in together[1]] == [d.tokens for d in plain]
    assert all(d.tokens[2] not in after for d in together[0] if len(d.tokens) > 2)
