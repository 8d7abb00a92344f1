"""Decoding options: validation, determinism, seeds, batch-size agreement, candidates and their scores."""

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imcap.captioner import Captioner, sequence_log_probs
from imcap.cli import app
from imcap.generation import CaptionOptions, OptionsError, generation_config


@pytest.fixture(scope="module")
def captioner(seeing_model_dir) -> Captioner:
    return Captioner.from_pretrained(seeing_model_dir)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """16 pictures of coloured blocks, different enough for the seeing model to caption differently."""
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(16):
        picture = np.empty((64, 64, 3), np.uint8)
        picture[:] = rng.integers(0, 256, 3)
        picture[rng.integers(0, 32) :, : rng.integers(16, 64)] = rng.integers(0, 256, 3)
        pictures.append(picture)
    return pictures


BAD_OPTIONS = [
    (dict(do_sample=True, temperature=0), "temperature must be > 0"),
    (dict(do_sample=True, temperature=-0.5), "temperature must be > 0"),
    (dict(do_sample=True, top_p=0), "top_p must be in (0, 1]"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(num_beams=3, num_return_sequences=4), "must not exceed num_beams (3)"),
    (dict(num_beams=1, num_return_sequences=2), "must not exceed num_beams (1)"),
    (dict(num_beams=2, do_sample=True, num_return_sequences=3), "must not exceed num_beams (2)"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(min_new_tokens=30, max_new_tokens=20), "min_new_tokens (30) must not exceed max_new_tokens (20)"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(do_sample=True, top_k=-1), "top_k must be >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size must be >= 0"),
    (dict(num_return_sequences=0), "num_return_sequences must be >= 1"),
    (dict(do_sample=True, seed=-1), "seed must be >= 0"),
    (dict(temperature=0.7), "temperature (0.7) only applies with do_sample"),
    (dict(top_k=5), "top_k (5) only applies with do_sample"),
    (dict(top_p=0.9), "top_p (0.9) only applies with do_sample"),
    (dict(num_beams=1, length_penalty=2.0), "length_penalty (2.0) only applies to beam search"),
    (dict(num_beams=2.5), "num_beams must be a whole number"),
    (dict(max_new_tokens="20"), "max_new_tokens must be a whole number"),
    (dict(num_beams=True), "num_beams must be a whole number"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
    (dict(do_sample="yes"), "do_sample must be true or false"),
    (dict(do_sample=True, seed=1.5), "seed must be a whole number"),
]


@pytest.mark.parametrize("kwargs, message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_settings_give_one_line_errors(kwargs, message):
    with pytest.raises(OptionsError) as caught:
        CaptionOptions(**kwargs).validate()
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(num_beams=1),
        dict(num_beams=5, num_return_sequences=5, length_penalty=0.5),
        dict(
            num_beams=1, do_sample=True, num_return_sequences=8, temperature=0.7, top_k=20, top_p=0.9, seed=0
        ),
        dict(num_beams=2, do_sample=True, num_return_sequences=2),
        dict(min_new_tokens=24, max_new_tokens=24, repetition_penalty=1.3, no_repeat_ngram_size=2),
    ],
)
def test_good_settings_pass(kwargs):
    options = CaptionOptions(**kwargs)
    assert options.validate() is options
    generation_config(options, _base_config())  # transformers accepts the combination too


def _base_config():
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=1)


def test_generation_config_sets_sampling_fields_only_when_sampling():
    greedy = generation_config(CaptionOptions(num_beams=1), _base_config())
    assert (greedy.do_sample, greedy.temperature, greedy.top_k, greedy.top_p) == (False, None, None, None)
    assert greedy.early_stopping is None and greedy.eos_token_id == 2
    sampled = generation_config(CaptionOptions(num_beams=1, do_sample=True, top_k=0), _base_config())
    assert sampled.top_k == 0  # our 0 (off), not transformers' default of 50
    beams = generation_config(CaptionOptions(num_beams=4, length_penalty=0.5), _base_config())
    assert (beams.num_beams, beams.length_penalty, beams.early_stopping) == (4, 0.5, True)


def test_bad_settings_fail_before_any_model_work(captioner, images, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(captioner.model, "generate", no_model_work)
    monkeypatch.setattr(captioner, "pixel_values", no_model_work)
    for options in (CaptionOptions(top_p=2.0, do_sample=True), CaptionOptions(max_new_tokens=64)):
        with pytest.raises(OptionsError):
            captioner(images[0], options)


def test_cli_checks_settings_before_loading_the_model(tmp_path):
    for args, message in (
        (["--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--sample", "--temperature", "0"], "--temperature must be > 0"),
        (["--beams", "2", "--num-captions", "3"], "--num-captions (3) must not exceed --beams (2)"),
        (["--temperature", "0.5"], "--temperature (0.5) only applies with --sample"),
        (["--min-length", "9", "--max-length", "5"], "--min-length (9) must not exceed --max-length (5)"),
    ):
        result = CliRunner().invoke(app, ["caption", str(tmp_path), "--model", "./no/such/model", *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
        assert message in result.stderr  # not the missing model: that would only be found later


def test_too_long_for_the_model_is_an_options_error(captioner, images):
    assert captioner.max_caption_tokens == 63  # 64 decoder positions, one for the start token
    with pytest.raises(OptionsError, match="exceeds what this model can generate"):
        captioner(images[0], CaptionOptions(max_new_tokens=64))


@pytest.mark.parametrize("beams", [1, 3])
def test_greedy_and_beam_search_are_deterministic(seeing_model_dir, captioner, images, beams):
    options = CaptionOptions(num_beams=beams, max_new_tokens=12)
    first = captioner(images[:4], options)
    again = Captioner.from_pretrained(seeing_model_dir)(images[:4], options)
    assert [r.caption for r in first] == [r.caption for r in again]
    assert [r.candidates[0].score for r in first] == [r.candidates[0].score for r in again]


@pytest.mark.parametrize("beams", [1, 3])
def test_captions_agree_across_batch_sizes(captioner, images, beams):
    options = CaptionOptions(num_beams=beams, max_new_tokens=12)
    one_by_one = [captioner(image, options)[0] for image in images]
    in_eights = captioner(images[:8], options) + captioner(images[8:], options)
    assert len({r.caption for r in one_by_one}) >= 3  # the captions do depend on the image
    assert [r.caption for r in one_by_one] == [r.caption for r in in_eights]
    for single, batched in zip(one_by_one, in_eights, strict=True):
        assert single.candidates[0].score == pytest.approx(batched.candidates[0].score, abs=1e-3)


def test_sampling_with_a_seed_is_reproducible_whatever_the_batch(captioner, images):
    options = CaptionOptions(num_beams=1, do_sample=True, seed=7, num_return_sequences=2, max_new_tokens=10)
    batched = captioner(images[:6], options)
    assert [r.candidates for r in batched] == [r.candidates for r in captioner(images[:6], options)]
    assert [r.candidates for r in batched[2:4]] == [r.candidates for r in captioner(images[2:4], options)]
    other_seed = captioner(images[:6], CaptionOptions(**{**options.to_dict(), "seed": 8}))
    assert [r.candidates for r in batched] != [r.candidates for r in other_seed]


def test_a_seed_leaves_the_callers_random_state_alone(captioner, images):
    before = torch.random.get_rng_state()
    captioner(images[0], CaptionOptions(num_beams=1, do_sample=True, seed=3, max_new_tokens=4))
    assert torch.equal(before, torch.random.get_rng_state())


def teacher_forced_log_prob(captioner, image, token_ids: torch.Tensor, eos_id: int) -> float:
    """The model's log-probability of `token_ids` (start token first), summed up to the first eos."""
    pixels = captioner.pixel_values([image])
    with torch.no_grad():
        logits = captioner.model(pixel_values=pixels, decoder_input_ids=token_ids[None]).logits[0]
    log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(1, token_ids[1:, None])[:, 0]
    ends = (token_ids[1:] == eos_id).nonzero()
    return float(log_probs[: int(ends[0]) + 1 if len(ends) else None].sum())


def test_greedy_score_is_the_model_log_probability_of_the_caption(captioner, images):
    options = CaptionOptions(num_beams=1, max_new_tokens=10)
    config = generation_config(options, captioner.model.generation_config)
    pixels = captioner.pixel_values(images[:3])
    out = captioner.model.generate(
        pixel_values=pixels, generation_config=config, output_scores=True, return_dict_in_generate=True
    )
    scores, _, _ = captioner._sequence_scores(out, config)
    eos = captioner.model.generation_config.eos_token_id
    for i, image in enumerate(images[:3]):
        assert float(scores[i]) == pytest.approx(
            teacher_forced_log_prob(captioner, image, out.sequences[i], eos), abs=1e-3
        )
    results = captioner(images[:3], options)
    assert [r.candidates[0].logprob for r in results] == pytest.approx(scores.tolist())
    # greedy: the ranking score is the mean per token (no length penalty), tokens end-of-text included
    for result in results:
        best = result.candidates[0]
        assert best.score == pytest.approx(best.logprob / len(best.tokens)) and result.score == best.score


def test_beam_scores_match_beam_search_and_the_best_comes_first(captioner, images):
    options = CaptionOptions(num_beams=4, num_return_sequences=4, max_new_tokens=10, length_penalty=0.7)
    config = generation_config(options, captioner.model.generation_config)
    pixels = captioner.pixel_values(images[:3])
    out = captioner.model.generate(
        pixel_values=pixels, generation_config=config, output_scores=True, return_dict_in_generate=True
    )
    scores, lengths, _ = captioner._sequence_scores(out, config)
    assert torch.isfinite(scores).all()
    # beam search ranks by log-prob / length**length_penalty: our sums reproduce its own sequence scores
    assert torch.allclose(scores / lengths**0.7, out.sequences_scores, atol=1e-4)
    ranked = out.sequences_scores.view(3, 4)
    assert torch.equal(ranked.argmax(dim=1), torch.zeros(3, dtype=torch.long))
    results = captioner(images[:3], options)
    single = captioner(images[:3], CaptionOptions(**{**options.to_dict(), "num_return_sequences": 1}))
    for result, alone in zip(results, single, strict=True):
        assert len(result.candidates) == 4 and all(math.isfinite(c.score) for c in result.candidates)
        assert result.caption == result.candidates[0].text == alone.caption
        # `score` is what beam search ranked by, so candidates come in score order; `logprob` is the sum
        assert [c.score for c in result.candidates] == sorted(
            (c.score for c in result.candidates), reverse=True
        )
        for c in result.candidates:
            assert c.score == pytest.approx(c.logprob / len(c.tokens) ** 0.7, abs=1e-5)


def test_samples_are_ranked_by_mean_token_log_probability(captioner, images):
    options = CaptionOptions(num_beams=1, do_sample=True, num_return_sequences=5, seed=1, max_new_tokens=8)
    result = captioner(images[0], options)[0]
    scores = [c.score for c in result.candidates]
    assert len(scores) == 5 and all(math.isfinite(s) and s < 0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert all(c.score == pytest.approx(c.logprob / len(c.tokens)) for c in result.candidates)
    assert result.options == captioner.resolved(options).to_dict()


def test_sampling_means_one_beam_unless_beams_are_given():
    """--sample alone is plain sampling: N captions are N independent samples, not N of 3 beams."""
    assert CaptionOptions().num_beams == 3
    assert CaptionOptions(do_sample=True).num_beams == 1
    assert CaptionOptions(do_sample=True, num_return_sequences=5).validate().num_beams == 1
    assert CaptionOptions(do_sample=True, num_beams=3).num_beams == 3  # beam sampling, when asked
    with pytest.raises(OptionsError, match="num_return_sequences"):
        CaptionOptions(do_sample=True, num_beams=2, num_return_sequences=5).validate()


def test_sequence_log_probs_stop_at_the_first_end_token():
    eos, pad = 2, 0
    generated = torch.tensor([[5, 7, eos, pad, pad], [5, 7, 8, 9, 6], [4, eos, eos, eos, eos]])
    transition = torch.tensor(
        [
            [-1.0, -2.0, -0.5, -9.0, -float("inf")],
            [-1.0, -1.0, -1.0, -1.0, -1.0],
            [-0.5, -0.25, -7.0, -7.0, -7.0],
        ]
    )
    scores, lengths = sequence_log_probs(transition, generated, {eos})
    assert scores.tolist() == [-3.5, -5.0, -0.75]  # padding after eos (even -inf) is not counted
    assert lengths.tolist() == [3, 5, 2]


REPEATING_VAL_PHOTOS = (  # Flickr8k val photos whose beam-3 caption repeated a 3-gram before the default
    "989851184_9ef368e520.jpg",  # "A black dog is playing with a black dog in a field."
    "3427540832_c882fded1d.jpg",  # "A man in a man in a red shirt is standing in a crowd."
    "2765747519_2b851e01d6.jpg",  # "A little girl in a red hat is wearing a red hat."
)


def repeats_a_trigram(caption: str) -> bool:
    words = caption.lower().rstrip(".").split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


def test_default_captions_never_repeat_a_trigram(flickr8k):
    """The shipped model's beam search likes "a black dog is playing with a black dog"; its
    generation_config.json forbids any repeated 3-gram, which the default options leave to the model."""
    shipped = Captioner.from_pretrained(None)
    photos = [flickr8k / "images" / name for name in REPEATING_VAL_PHOTOS]
    allowed = shipped(photos, CaptionOptions(no_repeat_ngram_size=0))
    assert any(repeats_a_trigram(result.caption) for result in allowed)  # the test can tell
    default = shipped(photos, CaptionOptions(num_return_sequences=3))
    for result in default:
        assert result.options["no_repeat_ngram_size"] == 3  # results record the value that ran
        assert not any(repeats_a_trigram(candidate.text) for candidate in result.candidates), result


def test_no_repeat_ngram_size_is_the_models_unless_given(captioner):
    """None (the default) takes the model's own setting: 0 for a model whose generation config has none."""
    assert CaptionOptions().no_repeat_ngram_size is None
    assert captioner.resolved(CaptionOptions()).no_repeat_ngram_size == 0
    assert captioner.resolved(CaptionOptions(no_repeat_ngram_size=2)).no_repeat_ngram_size == 2
    config = generation_config(CaptionOptions(), captioner.model.generation_config)
    assert not config.no_repeat_ngram_size
