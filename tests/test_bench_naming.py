"""benchmarks/bench_naming.py: its scores on hand-made captions, and a short run on the shipped model."""

from __future__ import annotations

import json

import pytest

from imcap.wordnet import WORDNET_DIR

from .conftest import SHARED_FLICKR8K, script_module

IMAGENET_SAMPLE = SHARED_FLICKR8K.parent / "imagenet-sample"
needs_wordnet = pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 not installed (apt-get install wordnet-base)",
)


@pytest.fixture(scope="module")
def bench():
    with script_module("benchmarks/bench_naming.py") as module:
        yield module


def test_scores_on_hand_made_captions(bench):
    tabby = bench.Photo("n02123045.jpg", 281, "n02123045", "tabby")
    zebra = bench.Photo("n02391049.jpg", 340, "n02391049", "zebra")
    cat_words = ["tabby", "tabby cat", "domestic cat", "house cat", "cat", "feline"]
    rows = [
        bench.score(tabby, "a cat sits on a couch", cat_words, dog_class=False),
        bench.score(zebra, "a dog runs", ["zebra"], dog_class=False),
        bench.score(zebra, None, ["zebra"], dog_class=False),  # unreadable photo: a miss
    ]
    assert [(row.named, row.says_dog) for row in rows] == [(True, False), (False, True), (False, False)]
    summary = bench.summarize(rows)
    assert (summary["named"], summary["dog_on_non_dog"], summary["non_dog_classes"]) == (1, 1, 3)
    assert summary["failed"] == 1 and summary["dog_on_non_dog_share"] == pytest.approx(1 / 3)


@needs_wordnet
def test_naming_words_come_from_wordnet_without_generic_ones(bench):
    from imcap.wordnet import read_noun_synsets

    wordnet = read_noun_synsets()
    words = bench.naming_words(wordnet, "n02123045")  # tabby
    assert words[:2] == ["tabby", "tabby cat"] and {"domestic cat", "cat", "feline", "carnivore"} <= set(
        words
    )
    assert not {"animal", "organism", "object", "entity", "mammal"} & set(words)
    assert bench.is_dog(wordnet, "n02110185") and not bench.is_dog(wordnet, "n02391049")  # husky, zebra
    puppy_on_zebra = bench.score(
        bench.Photo("z.jpg", 340, "n02391049", "zebra"), "Two puppies.", words, False
    )
    assert puppy_on_zebra.says_dog and not puppy_on_zebra.named
    assert bench.is_person(wordnet, "n10148035") and not bench.is_person(wordnet, "n02391049")  # groom, zebra


def test_people_are_counted_on_classes_that_are_not_people(bench):
    carbonara = bench.Photo("c.jpg", 959, "n07831146", "carbonara")
    groom = bench.Photo("g.jpg", 982, "n10148035", "groom")
    rows = [
        bench.score(carbonara, "A carbonara is playing with a little girl.", ["carbonara"], False),
        bench.score(carbonara, "Two men and a plate of carbonara.", ["carbonara"], False),
        bench.score(carbonara, "A carbonara on a table.", ["carbonara"], False),
        bench.score(carbonara, "Two hikers eat carbonara.", ["carbonara"], False),
        bench.score(groom, "A man in a suit.", ["groom", "man"], False, person_class=True),
    ]
    assert [row.says_person for row in rows] == [True, True, False, False, True]
    assert [row.says_person_wide for row in rows] == [True, True, False, True, True]  # hikers too
    summary = bench.summarize(rows)
    assert (summary["people_on_non_person"], summary["non_person_classes"]) == (2, 4)
    assert summary["people_on_non_person_share"] == pytest.approx(2 / 4)
    assert summary["people_wide_on_non_person_share"] == pytest.approx(3 / 4)


def test_things_acting_alive_are_counted_on_lifeless_classes(bench):
    clock = bench.Photo("c.jpg", 409, "n02708093", "analog clock")
    words = ["analog clock", "clock"]
    rows = [
        bench.score(clock, "A clock is playing with a white toy.", words, False, lifeless_class=True),
        bench.score(clock, "Two clocks are climbing a rock.", words, False, lifeless_class=True),
        bench.score(clock, "A clock is hanging on a wall.", words, False, lifeless_class=True),
        bench.score(clock, "A man is playing with a clock.", words, False, lifeless_class=True),
        bench.score(clock, "A dog is playing.", ["dog"], False),  # a living class: not counted
    ]
    assert [row.acts_alive for row in rows] == [True, True, False, False, False]
    summary = bench.summarize(rows)
    assert (summary["acting_alive"], summary["lifeless_classes"]) == (2, 4)


@needs_wordnet
def test_lifeless_classes_are_neither_animals_nor_people(bench):
    from imcap.wordnet import read_noun_synsets

    wordnet = read_noun_synsets()
    assert bench.is_lifeless(wordnet, "n02708093")  # analog clock
    assert not bench.is_lifeless(wordnet, "n02391049") and not bench.is_lifeless(wordnet, "n10148035")


@needs_wordnet
@pytest.mark.skipif(not (IMAGENET_SAMPLE / "labels.tsv").is_file(), reason="needs the shared ImageNet sample")
def test_main_captions_a_few_photos_with_the_shipped_model(bench, tmp_path, capsys):
    out = tmp_path / "naming.json"
    assert bench.main(["--data", str(IMAGENET_SAMPLE), "--limit", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "named: " in printed and "dog on non-dog: " in printed and "generic (not counted" in printed
    assert "people on non-person classes: " in printed and "wider word list: " in printed
    assert "things acting alive: " in printed
    result = json.loads(out.read_text())
    assert [row["index"] for row in result["rows"]] == [0, 1, 2, 3, 4]
    assert all(row["caption"] for row in result["rows"]) and result["options"]["guide"] is True
    assert result["summary"]["photos"] == 5 and len(result["misses"]) == 5 - result["summary"]["named"]
