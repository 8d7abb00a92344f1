"""Fitting guidance to a caption corpus: subject followers, the classes seen with people, the threshold."""

from __future__ import annotations

import pytest
import torch

from imcap.concepts import load_concept_table
from imcap.guidance import GuidanceSettings, Guide
from imcap.guidance_fit import (
    named_people_classes,
    no_people_threshold,
    people_classes,
    people_evident_classes,
    ruled_out_limits,
    ruled_out_subjects,
    shows_people,
    subject_followers,
)
from imcap.modeling import load_model


def test_subject_followers_are_the_words_after_the_first_subject():
    captions = [
        "A black dog is running.",
        "Two dogs are playing in the snow.",
        "A man in a red shirt rides a bike.",
        "A man is sitting on a bench.",
        "A dog man stands.",  # a noun after the subject is not a follower
        "The sun sets over the hills.",  # no subject in its first words
    ]
    followers = subject_followers(captions, {"dog", "man", "bike"}, min_share=0.0)
    assert followers == ("is", "are", "in")  # most frequent first: "is" twice
    assert subject_followers(captions, {"dog", "man"}, min_share=0.3) == ("is",)


def test_shows_people_needs_most_references():
    assert shows_people(["A man runs.", "Two girls play.", "A dog."])
    assert not shows_people(["A man runs.", "A dog runs.", "A dog."])


def test_people_classes_are_top_classes_of_photos_with_people():
    probs = torch.zeros(6, 1000)
    probs[0:3, 5] = 0.9  # class 5: top on three photos, two with people
    probs[3:5, 7] = 0.9  # class 7: top on two photos, none with people
    probs[5, 9] = 0.2  # class 9: top once with people, but not sure enough
    with_people = [True, True, False, False, False, True]
    classes = people_classes(probs, with_people, sure=0.3, max_share=0.5)
    assert classes.nonzero().flatten().tolist() == [5]
    assert people_classes(probs, with_people, sure=0.1, max_share=0.5).nonzero().flatten().tolist() == [5, 9]
    assert not people_classes(probs, with_people, sure=0.3, max_share=0.5, min_seen=4).any()  # seen 3 times


def test_people_evident_classes_are_mostly_seen_with_people_or_people_themselves():
    table = load_concept_table()
    probs = torch.zeros(10, 1000)
    probs[0:4, 5] = 0.9  # class 5: top on four photos, three with people
    probs[4:8, 7] = 0.9  # class 7: top on four photos, one with people
    probs[8:10, 9] = 0.9  # class 9: top on two photos, both with people: too few to tell
    with_people = [True, True, True, False, True, False, False, False, True, True]
    evident = people_evident_classes(probs, with_people, table)
    scuba_diver = table.wnids.index("n10565667")
    assert evident[5] and not evident[7] and not evident[9] and evident[scuba_diver]


def test_named_people_classes_are_the_people_of_imagenet():
    table = load_concept_table()
    people = {table.labels[i] for i in named_people_classes(table).nonzero().flatten().tolist()}
    assert people == {"ballplayer", "groom", "scuba diver"}


@pytest.mark.parametrize(
    ("max_wrong", "expected"),
    [(0.5, 0.5), (0.25, 0.8), (0.0, 0.9), (-1.0, 0.0)],  # -1: nothing passes, the rule stays off
)
def test_no_people_threshold_is_the_lowest_that_rarely_fires_on_people(max_wrong, expected):
    mass = torch.tensor([0.95, 0.85, 0.85, 0.85, 0.75, 0.55, 0.55])
    with_people = [False, False, False, True, True, True, False]
    # fires at 0.5: 7 photos, 3 with people; at 0.6 and 0.7: 5, 2; at 0.8: 4, 1; at 0.9: 1, none
    assert no_people_threshold(mass, with_people, max_wrong) == expected


def test_corpus_people_words_are_person_nouns_the_captions_use_for_people():
    from imcap.guidance_fit import corpus_people_words
    from imcap.wordnet import read_noun_synsets

    try:
        wordnet = read_noun_synsets()
    except FileNotFoundError:
        pytest.skip("WordNet 3.0 is not installed (Debian wordnet-base)")
    photos = [
        ["Two hikers are walking up a hill.", "A man and a woman walk.", "A man hiking in the mountains."],
        ["A hiker is resting on a rock.", "A woman sits on a rock.", "A person on a rock."],
        ["A white dog is running.", "A dog runs.", "A white and brown dog runs."],  # white: an adjective
        ["A white man is running.", "A man runs.", "A man in white runs."],
        ["A german shepherd is running.", "A dog runs.", "A german shepherd dog runs."],  # no people
        ["A monitor is on the desk.", "A man looks at a monitor.", "A woman at a computer monitor."],
    ]
    followers = ("is", "are", "in", "on", "runs", "sits")
    words = corpus_people_words(photos, wordnet, followers, min_photos=2, seed=("man", "woman", "person"))
    assert words[:3] == ("man", "woman", "person")  # the seed first
    assert "hiker" in words  # "hikers" and "hiker": a person in WordNet, said as a noun of people's photos
    assert "white" not in words  # WordNet's first sense is a person, but captions use it as an adjective
    assert "german" not in words and "shepherd" not in words  # said of photos without people
    # a word in fewer than min_photos photos stays out; so does one that names an ImageNet class
    assert "monitor" not in words
    twice, seed = photos * 2, ("man", "woman")
    assert "monitor" in corpus_people_words(twice, wordnet, followers, min_photos=2, seed=seed)
    assert "monitor" not in corpus_people_words(
        twice, wordnet, followers, class_names={"monitor"}, min_photos=2, seed=seed
    )


def test_corpus_kinds_are_the_words_captions_use_for_kinds_of_a_word():
    from imcap.guidance_fit import corpus_kinds

    wordnet, _ = wordnet_or_skip()
    photos = [
        ["Two puppies play in the grass.", "A puppy plays.", "Dogs in the grass."],
        ["A brown puppy runs.", "A dog runs.", "A beagle runs on the beach."],
        ["A beagle sleeps.", "A cat and a dog.", "A kitten sleeps."],  # a kitten is no dog
    ]
    assert corpus_kinds("dog", photos, wordnet, min_photos=2) == ("puppy", "beagle")  # most photos first
    assert corpus_kinds("dog", photos, wordnet, class_names={"beagle"}, min_photos=2) == ("puppy",)
    assert corpus_kinds("dog", photos, wordnet, min_photos=3) == ()  # "dog" itself is not its own kind
    assert corpus_kinds("zzzz", photos, wordnet) == ()  # not in WordNet


def test_generic_words_are_everyday_names_of_animal_food_and_plant_categories():
    from imcap.guidance import GuidanceSettings
    from imcap.guidance_fit import generic_words
    from imcap.modeling import DEFAULT_MODEL_DIR
    from imcap.wordnet import read_noun_synsets

    try:
        wordnet = read_noun_synsets()
    except FileNotFoundError:
        pytest.skip("WordNet 3.0 is not installed (Debian wordnet-base)")
    table = load_concept_table()
    words = generic_words(table, wordnet)
    assert {"reptile", "lizard", "ape", "parrot", "shark"} <= set(words)
    assert not set(words) & set(table.words)  # "dog", "fish", "bird" are the table's own words already
    assert "monitor" not in words  # usually the screen, not the lizard
    assert "primate" not in words  # its usual sense is the archbishop
    assert "serpent" not in words and "rattler" not in words  # "snake", "rattlesnake" are said instead
    assert "obstruction" not in words and "utensil" not in words  # artifact categories are not named so
    # the shipped guidance falls back to exactly these (scripts/choose_guidance.py fits them)
    assert GuidanceSettings.load(DEFAULT_MODEL_DIR).generic_words == words


def wordnet_or_skip():
    from imcap.wordnet import read_noun_synsets, read_verbs

    try:
        return read_noun_synsets(), read_verbs()
    except FileNotFoundError:
        pytest.skip("WordNet 3.0 is not installed (Debian wordnet-base)")


def test_verbs_know_their_participles_and_usual_frames():
    _, verbs = wordnet_or_skip()
    participles = ("riding", "sitting", "lying", "playing")
    assert [verbs.lemma(w) for w in participles] == ["ride", "sit", "lie", "play"]
    assert verbs.lemma("zzzing") is None
    assert 4 in verbs.usual_frames("sit")  # "Something is sitting PP": a cup sits on a table
    assert not verbs.usual_frames("play") & {3, 4}  # somebody plays
    assert verbs.usual_frames("no such verb") == frozenset()


def test_living_verbs_are_what_wordnet_lets_no_thing_do_in_the_progressive():
    from imcap.guidance_fit import living_verbs

    _, verbs = wordnet_or_skip()
    captions = [
        *["A boy is riding a bike ."] * 3,
        *["A dog is playing with a ball ."] * 4,
        *["A boy is climbing a rock ."] * 3,
        *["A cup is sitting on a table ."] * 3,
        *["A man in front of a building ."] * 3,  # a noun, never "is building"
        *["A girl on a swing ."] * 3,  # no participle
        "A man is eating .",  # too rare
    ]
    # most frequent first, ties alphabetical, whatever order the captions come in
    assert living_verbs(captions, verbs, min_count=3) == ("playing", "climbing", "riding")
    assert living_verbs(captions[::-1], verbs, min_count=3) == ("playing", "climbing", "riding")


def test_acting_classes_are_animals_people_and_vehicles():
    from imcap.guidance import GuidanceSettings
    from imcap.guidance_fit import acting_classes
    from imcap.modeling import DEFAULT_MODEL_DIR

    wordnet, _ = wordnet_or_skip()
    table = load_concept_table()
    acting = set(acting_classes(table, wordnet))
    # tabby, Siberian husky, groom, sports car, canoe, airliner act
    assert {"n02123045", "n02110185", "n10148035", "n04285008", "n02951358", "n02690373"} <= acting
    # analog clock, cheeseburger, mushroom, acoustic guitar do not
    assert not {"n02708093", "n07697313", "n07734744", "n02676566"} & acting
    shipped = GuidanceSettings.load(DEFAULT_MODEL_DIR).acting_classes
    assert shipped == tuple(sorted(acting, key=table.wnids.index))


def test_shipped_living_verbs_are_fitted_on_the_training_captions(flickr8k):
    from imcap.guidance import GuidanceSettings
    from imcap.guidance_fit import living_verbs
    from imcap.modeling import DEFAULT_MODEL_DIR

    _, verbs = wordnet_or_skip()
    train = set((flickr8k / "splits" / "train.txt").read_text().split())
    rows = (line.split("\t") for line in (flickr8k / "captions.tsv").read_text().splitlines())
    captions = [row[2] for row in rows if row[0] in train]
    fitted = living_verbs(captions, verbs)
    assert {"playing", "climbing", "eating", "riding"} <= set(fitted)
    assert not {"sitting", "standing", "hanging", "flying", "lying", "building"} & set(fitted)
    assert GuidanceSettings.load(DEFAULT_MODEL_DIR).living_verbs == fitted


@pytest.fixture(scope="module")
def guide() -> Guide:
    return Guide(load_concept_table(), GuidanceSettings(), load_model().tokenizer)


def test_ruled_out_subjects_are_the_names_the_head_rarely_misses_where_captions_say_them(guide):
    """Birds the head sees on every photo most captions call birds; horses it gives nothing on half of
    theirs; a name said by fewer than `min_captions` captions, or on fewer than `min_photos` photos, has
    no say."""
    goldfinch, sorrel = (guide.table.wnids.index(w) for w in ("n01531178", "n02389026"))
    birds = ["A bird on a branch."] * 3 + ["A small animal.", "Something yellow."]
    horses = ["A horse jumps a fence."] * 4 + ["A rider."]
    probs = torch.zeros(8, 1000)
    probs[:4, goldfinch] = 0.3
    probs[4:6, sorrel] = 0.5  # two horses seen, two missed
    captions = [birds] * 4 + [horses] * 4
    assert ruled_out_subjects(guide, probs, captions, 0.01, min_photos=4) == ("bird",)
    # at max_miss 0.5 the fence too: the head sees none, but on the two photos where the horse is sure
    # the rule would not fire, so it "misses" the fence on two photos of four, as it does the horse
    loose = ruled_out_subjects(guide, probs, captions, 0.01, min_photos=4, max_miss=0.5)
    assert loose == ("bird", "fence", "horse")
    assert ruled_out_subjects(guide, probs, captions, 0.01, min_photos=5) == ()
    assert ruled_out_subjects(guide, probs, captions, 0.01, min_photos=4, min_captions=4) == ()
    assert ruled_out_subjects(guide, probs, captions, 0.5, min_photos=4) == ()  # 0.3 < 0.5: all missed


def test_each_subject_gets_the_highest_threshold_at_which_it_qualifies(guide):
    goldfinch, sorrel = (guide.table.wnids.index(w) for w in ("n01531178", "n02389026"))
    birds = ["A bird on a branch."] * 3 + ["A small animal.", "Something yellow."]
    horses = ["A horse jumps a fence."] * 4 + ["A rider."]
    probs = torch.zeros(8, 1000)
    probs[:4, goldfinch] = 0.03  # under 0.05 on every bird photo, with nothing sure
    probs[4:, sorrel] = 0.3
    captions = [birds] * 4 + [horses] * 4
    limits = ruled_out_limits(guide, probs, captions, [0.05, 0.01, 0.02], min_photos=4)
    assert limits == {"bird": 0.02, "horse": 0.05}  # the fence: never seen, always missed
    assert ruled_out_limits(guide, probs, captions, [0.5], min_photos=4) == {}


def test_a_ruled_out_subject_counts_as_missed_only_where_the_rule_would_fire(guide):
    """The best-guess rule waits until the head is sure of nothing, so a bird the head misses next to a dog
    it is sure of (a dog carrying the bird) costs nothing: only photos with nothing sure count as misses."""
    goldfinch, labrador = (guide.table.wnids.index(w) for w in ("n01531178", "n02099712"))
    birds = ["A bird on a branch."] * 3 + ["A small animal.", "Something yellow."]
    probs = torch.zeros(4, 1000)
    probs[:2, goldfinch] = 0.3  # seen
    probs[2:, labrador] = 0.8  # missed, but a dog is sure (name_threshold 0.5)
    captions = [birds] * 4
    assert ruled_out_subjects(guide, probs, captions, 0.01, min_photos=4) == ("bird",)
    probs[2:, labrador] = 0.2  # missed, and nothing is sure: the rule would rewrite real birds
    assert ruled_out_subjects(guide, probs, captions, 0.01, min_photos=4) == ()


def test_shipped_ban_kinds_are_fitted_on_the_training_captions(flickr8k):
    from imcap.data import load_records
    from imcap.guidance import GuidanceSettings
    from imcap.guidance_fit import corpus_kinds
    from imcap.modeling import DEFAULT_MODEL_DIR

    wordnet, _ = wordnet_or_skip()
    shipped = GuidanceSettings.load(DEFAULT_MODEL_DIR)
    table = load_concept_table()
    class_names = (
        {n for names in table.synonyms for n in names} | set(table.words) | set(shipped.generic_words)
    )
    photos = [r.captions for r in load_records(flickr8k, "train")]
    fitted = {word: corpus_kinds(word, photos, wordnet, class_names) for word in shipped.ban_words}
    assert "puppy" in fitted["dog"]
    assert shipped.ban_kinds == fitted
