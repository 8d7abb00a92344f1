"""Constrained beam search (imcap.guided): every caption names its concepts, end-of-text waits for them,
and images without constraints get exactly the engine's captions."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from PIL import Image

from imcap.engine import Engine
from imcap.generation import CaptionOptions, generation_config
from imcap.guided import Constraint, _Matcher, word_continuations
from imcap.images import as_image
from imcap.modeling import load_model

from .conftest import EXAMPLES

GREEDY = {"num_beams": 1, "max_new_tokens": 14}
BEAMS = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 14}


def noise_pictures(count: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def phrase(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def constraint(tokenizer, *forms: str) -> Constraint:
    return Constraint(tuple(phrase(tokenizer, form) for form in forms))


def contains(tokens: list[int], part: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i : i + len(part)]) == part for i in range(len(tokens) - len(part) + 1))


def meets(tokens: list[int], constraints) -> bool:
    return all(any(contains(tokens, p) for p in c.phrases) for c in constraints)


def config_for(loaded, **options):
    return generation_config(CaptionOptions(**options), loaded.model.generation_config)


@pytest.fixture(scope="module")
def tiny(seeing_model_dir):
    """The tiny image-dependent model, made to say end-of-text often (as in test_engine), so that masking
    it until the constraints are met is tested; and the states of 5 noise pictures."""
    loaded = load_model(seeing_model_dir)
    with torch.no_grad():
        loaded.model.decoder.lm_head.weight[loaded.model.generation_config.eos_token_id] *= 40
    engine = Engine(loaded.model)
    pixels = loaded.image_processor(noise_pictures(5), return_tensors="pt")["pixel_values"]
    return loaded, engine, engine.encode(pixels)


def tiny_constraints(tokenizer) -> dict[str, list[Constraint]]:
    """Single-token, multi-token (" zebra" is 6 tokens to the tiny tokenizer), two at once, disjunctive."""
    return {
        "one-token": [constraint(tokenizer, " dog")],
        "multi-token": [constraint(tokenizer, " zebra")],
        "two": [constraint(tokenizer, " green grass"), constraint(tokenizer, " zebra", " zebras")],
        "either": [constraint(tokenizer, " cat", " dogs")],
    }


def test_matcher_tracks_partial_phrases():
    matcher = _Matcher(Constraint(((5, 6, 7), (5, 6, 8), (9,))))
    assert matcher.step((), 5) == (5,)
    assert matcher.step((5,), 6) == (5, 6)
    assert matcher.step((5, 6), 8) is None  # either form completes it
    assert matcher.step((5, 6), 3) == ()  # drifting off loses the progress
    assert matcher.step((5, 6), 5) == (5,)  # ... and restarts from the token that broke it
    assert matcher.step((5,), 9) is None
    assert matcher.forced((5, 6)) == [5, 7, 8, 9]  # continue the phrase, or start any form afresh
    overlapping = _Matcher(Constraint(((4, 4, 6),)))
    assert overlapping.step((4, 4), 4) == (4, 4)  # "4 4 4 6" still holds "4 4 6"
    assert overlapping.step((4, 4), 6) is None


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
@pytest.mark.parametrize("kind", ["one-token", "multi-token", "two", "either"])
def test_every_caption_meets_its_constraints(tiny, options, kind):
    loaded, engine, hidden = tiny
    wanted = tiny_constraints(loaded.tokenizer)[kind]
    results = engine.decode_guided(hidden, config_for(loaded, **options), [wanted] * len(hidden))
    assert len(results) == len(hidden)
    for candidates in results:
        assert len(candidates) == options.get("num_return_sequences", 1)
        assert all(meets(c.tokens, wanted) for c in candidates)


def test_end_of_text_waits_for_the_constraints(tiny):
    loaded, engine, hidden = tiny
    eos = loaded.model.generation_config.eos_token_id
    config = config_for(loaded, **BEAMS)
    plain = engine.decode(hidden, config)
    assert min(len(c[0].tokens) for c in plain) < 4  # the model ends captions early when it may
    for wanted in tiny_constraints(loaded.tokenizer).values():
        for candidates in engine.decode_guided(hidden, config, [wanted] * len(hidden)):
            for c in candidates:
                assert eos not in c.tokens[:-1]
                if c.tokens[-1] == eos:
                    assert meets(c.tokens[:-1], wanted)
                else:
                    assert len(c.tokens) == config.max_new_tokens


def test_a_caption_comes_back_when_max_new_tokens_runs_out(tiny):
    loaded, engine, hidden = tiny
    tokenizer, eos = loaded.tokenizer, loaded.model.generation_config.eos_token_id
    dog, zebra = constraint(tokenizer, " dog"), constraint(tokenizer, " zebra")  # zebra: 6 tokens
    config = config_for(loaded, num_beams=3, max_new_tokens=4)
    for candidates in engine.decode_guided(hidden, config, [[zebra, dog]] * len(hidden)):
        best = candidates[0].tokens
        assert len(best) == 4 and eos not in best
        assert meets(best, [dog])  # the fallback prefers hypotheses that meet more constraints


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
@pytest.mark.parametrize("batch", [1, 4])
def test_without_constraints_the_tokens_are_decodes(tiny, options, batch):
    loaded, engine, hidden = tiny
    config = config_for(loaded, **options)
    expected = engine.decode(hidden[:batch], config)
    got = engine.decode_guided(hidden[:batch], config, [[] for _ in range(batch)])
    assert [[c.tokens for c in r] for r in got] == [[c.tokens for c in r] for r in expected]
    assert [[c.score for c in r] for r in got] == [[c.score for c in r] for r in expected]


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_a_mixed_batch_keeps_image_order(tiny, options):
    loaded, engine, hidden = tiny
    config = config_for(loaded, **options)
    kinds = tiny_constraints(loaded.tokenizer)
    wanted = [kinds["two"], [], kinds["one-token"], [], kinds["multi-token"]]
    got = engine.decode_guided(hidden, config, wanted)
    plain = engine.decode(hidden, config)
    for i, constraints in enumerate(wanted):
        if not constraints:
            assert [c.tokens for c in got[i]] == [c.tokens for c in plain[i]]
        else:  # as when decoded alone: the batch changes nothing
            alone = engine.decode_guided(hidden[i : i + 1], config, [constraints])[0]
            assert [c.tokens for c in got[i]] == [c.tokens for c in alone]
            assert all(meets(c.tokens, constraints) for c in got[i])


@pytest.mark.parametrize("options", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_per_image_bans_equal_each_image_alone_with_its_bad_words(tiny, options):
    """One guided call with per-image Bans (guidance rewrites every flagged photo of a batch at once) gives
    each image the captions it gets decoded alone with its banned words as bad_words_ids."""
    loaded, engine, hidden = tiny
    config = config_for(loaded, **options)
    kinds = tiny_constraints(loaded.tokenizer)
    wanted = [kinds["one-token"], kinds["multi-token"], [], kinds["two"], kinds["either"]]
    first = [c[0].tokens for c in engine.decode_guided(hidden, config, wanted)]
    # ban what each image said: a token alone, a 2-token sequence, or nothing
    per_image = [[[first[0][0]]], [], [[first[2][0]]], [[first[3][0], first[3][1]]], [[first[4][1]]]]
    got = engine.decode_guided(hidden, config, wanted, bans=engine.bans(per_image))
    for i, banned in enumerate(per_image):
        alone = copy.deepcopy(config)
        alone.bad_words_ids = banned or None
        expected = engine.decode_guided(hidden[i : i + 1], alone, [wanted[i]])[0]
        assert [c.tokens for c in got[i]] == [c.tokens for c in expected]
        assert [c.score for c in got[i]] == pytest.approx([c.score for c in expected], abs=1e-4)
    assert got[0][0].tokens[:1] != first[0][:1]  # the ban bit


def test_deterministic_and_scored_as_plain_log_prob_sums(tiny):
    loaded, engine, hidden = tiny
    config = config_for(loaded, **BEAMS)
    wanted = [tiny_constraints(loaded.tokenizer)["two"]] * len(hidden)
    first, again = (engine.decode_guided(hidden, config, wanted) for _ in range(2))
    assert [[(c.tokens, c.score) for c in r] for r in first] == [
        [(c.tokens, c.score) for c in r] for r in again
    ]
    start = loaded.model.generation_config.decoder_start_token_id
    for i, candidates in enumerate(first):
        for c in candidates:  # teacher-forced: the sum of the model's log-probs of the tokens
            inputs = torch.tensor([[start, *c.tokens[:-1]]])
            with torch.inference_mode():
                logits = loaded.model.decoder(
                    input_ids=inputs, encoder_hidden_states=hidden[i : i + 1]
                ).logits
            log_probs = torch.log_softmax(logits[0].float(), dim=-1)
            assert c.score == pytest.approx(float(log_probs[range(len(c.tokens)), c.tokens].sum()), abs=1e-3)


def test_logits_processors_are_respected(tiny):
    loaded, engine, hidden = tiny
    config = config_for(loaded, num_beams=2, no_repeat_ngram_size=2, min_new_tokens=6, max_new_tokens=12)
    wanted = [tiny_constraints(loaded.tokenizer)["one-token"]] * len(hidden)
    for candidates in engine.decode_guided(hidden, config, wanted):
        for c in candidates:
            bigrams = list(zip(c.tokens, c.tokens[1:], strict=False))
            assert len(bigrams) == len(set(bigrams))
            assert len(c.tokens) >= 7  # min_new_tokens: no end-of-text among the first 6
            assert meets(c.tokens, wanted[0])


def test_bad_requests_are_refused(tiny):
    loaded, engine, hidden = tiny
    config = config_for(loaded, **GREEDY)
    dog = tiny_constraints(loaded.tokenizer)["one-token"][0]
    with pytest.raises(ValueError, match="at most 3"):
        engine.decode_guided(hidden[:1], config, [[dog] * 4])
    with pytest.raises(ValueError, match="constraint lists"):
        engine.decode_guided(hidden[:2], config, [[dog]])
    with pytest.raises(ValueError, match="end-of-text"):
        engine.decode_guided(
            hidden[:1], config, [[Constraint(((loaded.model.generation_config.eos_token_id,),))]]
        )
    with pytest.raises(ValueError, match="non-empty"):
        Constraint(((),))
    with pytest.raises(ValueError, match="does not sample"):
        engine.decode_guided(hidden[:1], config_for(loaded, num_beams=1, do_sample=True), [[dog]])


@pytest.fixture(scope="module")
def shipped():
    loaded = load_model()
    engine = Engine(loaded.model)
    photos = {path.stem: path for path in sorted(EXAMPLES.glob("*.jpg"))}
    pictures = [as_image(path) for path in photos.values()]
    hidden = engine.encode(loaded.image_processor(pictures, return_tensors="pt")["pixel_values"])
    return loaded, engine, dict(zip(photos, hidden, strict=True))


SHIPPED_CASES = {  # photo -> the concepts its caption must name, each as its surface forms
    "chelsea": [(" cat", " cats")],
    "flickr8k-val-dogs": [(" dog", " dogs")],  # the model says "dogs" unasked: the plural form meets it
    "flickr8k-val-soccer": [(" ball",), (" grass",)],
    "rocket": [(" traffic light",)],
    "coffee": [(" zebra", " zebras")],  # 4 BPE tokens each, two ways: " z"+"e"+"b"+"ra", " z"+"e"+"br"+"as"
}


@pytest.mark.parametrize("options", [CaptionOptions(num_beams=1), CaptionOptions()], ids=["greedy", "beams"])
def test_shipped_model_names_the_concepts(shipped, options):
    loaded, engine, hidden = shipped
    tokenizer = loaded.tokenizer
    names = list(SHIPPED_CASES)
    wanted = [[constraint(tokenizer, *forms) for forms in SHIPPED_CASES[n]] for n in names]
    states = torch.stack([hidden[n] for n in names])
    config = generation_config(options, loaded.model.generation_config)
    results = engine.decode_guided(states, config, wanted, word_continuations(tokenizer))
    for name, constraints, candidates in zip(names, wanted, results, strict=True):
        best = candidates[0]
        text = tokenizer.decode(best.tokens, skip_special_tokens=True)
        assert best.tokens[-1] == loaded.model.generation_config.eos_token_id, text  # ended, not cut off
        assert meets(best.tokens, constraints), text
        for forms in SHIPPED_CASES[name]:  # whole words: " zebra" never runs on into " zebrack"
            assert any(re.search(rf"(^| ){form.strip()}( |$)", text) for form in forms), text
    dogs = tokenizer.decode(results[names.index("flickr8k-val-dogs")][0].tokens, skip_special_tokens=True)
    assert " dogs " in f"{dogs} "


def test_word_continuations_are_the_pieces_without_a_leading_space(shipped):
    loaded = shipped[0]
    tokenizer = loaded.tokenizer
    continuations = word_continuations(tokenizer)
    zebras = phrase(tokenizer, " zebras")  # " z", "e", "br", "as"
    assert zebras[0] not in continuations and set(zebras[1:]) <= continuations
    assert not continuations & set(tokenizer.all_special_ids)
