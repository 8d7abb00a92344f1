"""Sampling in the engine: generate's algorithm, seeds per sample, prefixes, and guidance on samples."""

from __future__ import annotations

import pytest
import torch

from imcap.captioner import Captioner
from imcap.concepts import load_concept_table, mentions
from imcap.engine import Engine, EngineOptions
from imcap.generation import CaptionOptions, generation_config
from imcap.guidance import GuidanceSettings, Guide
from imcap.stepwise import sample_seeds

from .test_engine import load_ending_model, noise_pictures

SAMPLING = {
    "plain": CaptionOptions(do_sample=True, max_new_tokens=10),
    "warped": CaptionOptions(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=10),
    "processors": CaptionOptions(
        do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, max_new_tokens=9
    ),
}


@pytest.fixture(scope="module")
def seeing(seeing_model_dir):
    return load_ending_model(seeing_model_dir, 8)


def config_of(loaded, options: CaptionOptions):
    return generation_config(options, loaded.model.generation_config)


@pytest.mark.parametrize("name", list(SAMPLING))
def test_unseeded_sampling_draws_what_generate_draws_from_the_same_random_state(seeing, name):
    """One image at a time, both consume torch's generator identically: one multinomial draw per step from
    the same processed and warped distribution. Equal tokens show the algorithm is generate's."""
    loaded, pixels = seeing
    config = config_of(loaded, SAMPLING[name])
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    eos = config.eos_token_id
    with torch.inference_mode():
        for index, row in enumerate(pixels[:6]):
            torch.manual_seed(index)
            out = loaded.model.generate(pixel_values=row[None], generation_config=config)
            generated = out[0, 1:].tolist()
            expected = generated[: generated.index(eos) + 1] if eos in generated else generated
            torch.manual_seed(index)
            [[got]] = engine.decode(engine.encode(row[None]), config)
            assert got.tokens == expected


@pytest.mark.parametrize("name", ["plain", "warped"])
def test_unseeded_beam_sampling_draws_what_generate_draws_from_the_same_random_state(seeing, name):
    """Beam-search sampling: 2K continuations drawn per step from the softmax of the beams' warped running
    scores. One image at a time, from the same random state, the engine returns generate's captions."""
    loaded, pixels = seeing
    options = CaptionOptions(**{**SAMPLING[name].to_dict(), "num_beams": 3, "num_return_sequences": 2})
    config = config_of(loaded, options)
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    eos = config.eos_token_id
    with torch.inference_mode():
        for index, row in enumerate(pixels[:6]):
            torch.manual_seed(index)
            out = loaded.model.generate(pixel_values=row[None], generation_config=config)
            expected = []
            for sequence in out[:, 1:].tolist():
                expected.append(sequence[: sequence.index(eos) + 1] if eos in sequence else sequence)
            torch.manual_seed(index)
            [got] = engine.decode(engine.encode(row[None]), config)
            assert [d.tokens for d in got] == expected


def test_seeded_beam_sampling_depends_on_the_seed_and_image_alone(seeing):
    loaded, pixels = seeing
    engine = Engine(loaded.model)
    options = CaptionOptions(**{**SAMPLING["warped"].to_dict(), "num_beams": 3, "num_return_sequences": 3})
    config = config_of(loaded, options)
    hidden = engine.encode(pixels[:5])
    seeds = [21, 22, 23, 24, 25]

    def tokens(found):
        return [[d.tokens for d in candidates] for candidates in found]

    together = tokens(engine.decode(hidden, config, seeds=seeds))
    alone = [tokens(engine.decode(hidden[i : i + 1], config, seeds=[seeds[i]]))[0] for i in range(5)]
    assert together == alone
    assert all(len(candidates) == 3 for candidates in together)
    assert tokens(engine.decode(hidden, config, seeds=[s + 100 for s in seeds])) != together
    greedy_beams = tokens(engine.decode(hidden, config_of(loaded, CaptionOptions(num_beams=3))))
    assert [c[0] for c in together] != [c[0] for c in greedy_beams]  # it samples: not beam search's
    state = torch.random.get_rng_state()
    engine.decode(hidden, config, seeds=seeds)
    assert torch.equal(state, torch.random.get_rng_state())


def decoded_tokens(engine: Engine, pixels: torch.Tensor, config) -> list[list[list[int]]]:
    return [[d.tokens for d in candidates] for candidates in engine.decode(engine.encode(pixels), config)]


def test_sampling_with_top_k_1_is_greedy_search(seeing):
    loaded, pixels = seeing
    engine = Engine(loaded.model)
    greedy = decoded_tokens(engine, pixels, config_of(loaded, CaptionOptions(num_beams=1, max_new_tokens=12)))
    sampled = decoded_tokens(
        engine, pixels, config_of(loaded, CaptionOptions(do_sample=True, top_k=1, max_new_tokens=12))
    )
    assert sampled == greedy


def test_seeded_samples_depend_on_their_seed_and_image_alone(seeing):
    loaded, pixels = seeing
    engine = Engine(loaded.model)
    config = config_of(loaded, SAMPLING["plain"])
    hidden = engine.encode(pixels[:5])
    seeds = [11, 12, 13, 14, 15]
    together = [d.tokens for [d] in engine.decode(hidden, config, seeds=seeds)]
    alone = [engine.decode(hidden[i : i + 1], config, seeds=[seeds[i]])[0][0].tokens for i in range(5)]
    assert together == alone
    assert together == [d.tokens for [d] in engine.decode(hidden, config, seeds=seeds)]  # again: the same
    other = [d.tokens for [d] in engine.decode(hidden, config, seeds=[s + 100 for s in seeds])]
    assert other != together  # the seed matters
    # and the caller's random state is left alone
    state = torch.random.get_rng_state()
    engine.decode(hidden, config, seeds=seeds)
    assert torch.equal(state, torch.random.get_rng_state())


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seeds(7, 3) == sample_seeds(7, 5)[:3]  # sample j's seed does not depend on the count
    assert len(set(sample_seeds(7, 8) + sample_seeds(8, 8))) == 16


def test_sampled_scores_are_the_log_probs_of_the_drawn_tokens(seeing):
    """Without warpers or processors, a sample's score is the model's log-probability of its tokens."""
    loaded, pixels = seeing
    engine = Engine(loaded.model, EngineOptions(fold_batchnorm=False))
    options = CaptionOptions(do_sample=True, no_repeat_ngram_size=0, max_new_tokens=8)
    hidden = engine.encode(pixels[:3])
    for row, [decoded] in enumerate(engine.decode(hidden, config_of(loaded, options), seeds=[1, 2, 3])):
        start = loaded.model.generation_config.decoder_start_token_id
        tokens = torch.tensor([[start, *decoded.tokens]])
        with torch.inference_mode():
            logits = loaded.model.decoder(
                input_ids=tokens, encoder_hidden_states=hidden[row : row + 1]
            ).logits
        log_probs = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, tokens[0, 1:, None])
        assert decoded.score == pytest.approx(float(log_probs.sum()), abs=1e-4)


def test_prefixed_samples_start_with_the_prefix(seeing):
    loaded, pixels = seeing
    engine = Engine(loaded.model)
    config = config_of(loaded, SAMPLING["warped"])
    hidden = engine.encode(pixels[:4])
    prefixes = [[5, 6], [7], [5, 6], [8, 9]]
    found = engine.decode_prefixed(hidden, config, prefixes, word_continuations=[10, 11], seeds=[1, 2, 3, 4])
    for prefix, [decoded] in zip(prefixes, found, strict=True):
        assert decoded.tokens[: len(prefix)] == prefix
        assert decoded.tokens[len(prefix)] not in (10, 11)  # the prefix's last word stays whole
        assert len(decoded.tokens) <= len(prefix) + config.max_new_tokens


def test_the_engine_refuses_constrained_sampling(seeing):
    loaded, _ = seeing
    engine = Engine(loaded.model)
    with pytest.raises(ValueError, match="does not sample"):
        engine.decode_guided(torch.zeros(1, 4, 32), config_of(loaded, SAMPLING["plain"]), [[]])


def test_captioner_samples_are_independent_and_each_seeded(seeing_model_dir):
    captioner = Captioner.from_pretrained(seeing_model_dir)
    assert captioner.uses_engine(CaptionOptions(do_sample=True))
    assert captioner.uses_engine(CaptionOptions(do_sample=True, num_beams=2))
    pictures = noise_pictures(3)
    five = captioner(
        pictures, CaptionOptions(do_sample=True, num_return_sequences=5, seed=3, max_new_tokens=8)
    )
    two = captioner(
        pictures, CaptionOptions(do_sample=True, num_return_sequences=2, seed=3, max_new_tokens=8)
    )
    alone = captioner(
        pictures[1], CaptionOptions(do_sample=True, num_return_sequences=5, seed=3, max_new_tokens=8)
    )
    for many, few in zip(five, two, strict=True):
        assert len(many.candidates) == 5
        assert [c.score for c in many.candidates] == sorted((c.score for c in many.candidates), reverse=True)
        # samples 0 and 1 are drawn from the same seeds whatever the count
        assert {c.text for c in few.candidates} <= {c.text for c in many.candidates}
    assert [c.text for c in alone[0].candidates] == [c.text for c in five[1].candidates]
    assert len({c.text for r in five for c in r.candidates}) > 3  # they really are samples


def test_guidance_applies_to_samples(cat_model_dir):
    """The head is sure of a tabby: every sample names the cat (drawn again with it as subject when it
    did not) and none says dog, whatever placement the guide prefers for beam search."""
    captioner = cat_captioner(cat_model_dir, placement="anywhere")
    options = CaptionOptions(do_sample=True, num_return_sequences=4, seed=0, max_new_tokens=10)
    guided = samples_all_name_the_cat(captioner, options)
    assert guided[0].caption == captioner(noise_pictures(3), options)[0].caption  # seeded: reproducible


def test_guidance_applies_to_beam_sampling(cat_model_dir):
    """Beam-search sampling is guided too: every caption of each image names the cat, none says dog, and
    a seed makes them reproducible photo by photo."""
    captioner = cat_captioner(cat_model_dir)
    options = CaptionOptions(
        do_sample=True, num_beams=3, num_return_sequences=2, seed=0, top_k=50, max_new_tokens=10
    )
    guided = samples_all_name_the_cat(captioner, options)
    assert [r.caption for r in guided] == [r.caption for r in captioner(noise_pictures(3), options)]
    assert guided[2].caption == captioner(noise_pictures(3)[2], options)[0].caption


def cat_captioner(cat_model_dir, placement: str = "start") -> Captioner:
    """The tabby-head model, guided to name words over 0.5 and rule dog out below 0.5."""
    captioner = Captioner.from_pretrained(cat_model_dir)
    settings = GuidanceSettings(0.5, 0.5, ("dog",), placement=placement)
    captioner.guide = Guide(load_concept_table(), settings, captioner.loaded.tokenizer)
    return captioner


def samples_all_name_the_cat(captioner: Captioner, options: CaptionOptions) -> list:
    """Three images' guided captions, after checking that each of their `num_return_sequences` candidates
    names the cat and none says dog, while unguided some do not name it (so guidance acts)."""
    guided = captioner(noise_pictures(3), options)
    unguided = captioner(noise_pictures(3), CaptionOptions(**{**options.to_dict(), "guide": False}))
    assert not all(mentions(c.text, ("cat",)) for r in unguided for c in r.candidates)
    for result in guided:
        assert len(result.candidates) == options.num_return_sequences
        for candidate in result.candidates:
            assert mentions(candidate.text, ("cat",)) and not mentions(candidate.text, ("dog",))
    return guided
