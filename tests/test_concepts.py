"""imcap.concepts (the shipped ImageNet class -> caption word table, whole-word matching) and the WordNet
reader that builds the table (imcap.wordnet, scripts/build_concept_table.py)."""

from __future__ import annotations

import pytest

from imcap.concepts import DEFAULT_TABLE, load_concept_table, mentions, word_forms
from imcap.wordnet import WORDNET_DIR, WordNetMissingError, read_noun_synsets

from .conftest import SHARED_FLICKR8K, script_module

IMAGENET_SAMPLE = SHARED_FLICKR8K.parent / "imagenet-sample"
HAS_WORDNET = (WORDNET_DIR / "data.noun").is_file()
needs_wordnet = pytest.mark.skipif(
    not HAS_WORDNET, reason="WordNet 3.0 not installed (apt-get install wordnet-base)"
)

# class -> the word the table must give it
EXPECTED_WORDS = {
    "n02110185": ("Siberian husky", "dog"),
    "n02123045": ("tabby", "cat"),
    "n02123159": ("tiger cat", "cat"),
    "n02123394": ("Persian cat", "cat"),
    "n02123597": ("Siamese cat", "cat"),
    "n02124075": ("Egyptian cat", "cat"),
    "n01440764": ("tench", "fish"),
    "n01443537": ("goldfish", "fish"),
    "n07697313": ("cheeseburger", "burger"),
    "n02708093": ("analog clock", "clock"),
    "n04548280": ("wall clock", "clock"),
    "n07920052": ("espresso", "coffee"),
    "n02690373": ("airliner", "plane"),
    "n02391049": ("zebra", "zebra"),
    "n06874185": ("traffic light", "traffic light"),
    "n04070727": ("refrigerator", "refrigerator"),
    "n04266014": ("space shuttle", "space shuttle"),
    "n03773504": ("missile", "missile"),
    "n02389026": ("sorrel", "horse"),
}
# words that say nothing about which class is shown; none may be a synonym of any class
GENERIC_WORDS = {
    "entity", "physical entity", "abstraction", "object", "whole", "living thing", "organism", "being",
    "animal", "creature", "beast", "fauna", "artifact", "artefact", "instrumentality", "device",
    "container", "structure", "construction", "person", "individual", "someone", "matter", "substance",
    "food", "nutrient", "commodity", "covering", "equipment", "implement", "vertebrate", "chordate",
    "invertebrate", "placental", "mammal",
}  # fmt: skip
DOG_BREEDS = range(151, 269)  # the 118 dog classes of ImageNet-1k (Chihuahua ... Mexican hairless)


@pytest.fixture(scope="module")
def table():
    return load_concept_table()


@pytest.mark.parametrize("wnid", sorted(EXPECTED_WORDS))
def test_classes_get_the_word_captions_use(table, wnid):
    label, word = EXPECTED_WORDS[wnid]
    index = table.wnids.index(wnid)
    assert (table.labels[index], table.words[index]) == (label, word)


def test_every_dog_breed_is_a_dog(table):
    assert len(DOG_BREEDS) == 118
    assert {table.words[i] for i in DOG_BREEDS} == {"dog"}
    assert table.labels[DOG_BREEDS[0]] == "Chihuahua" and table.labels[DOG_BREEDS[-1]] == "Mexican hairless"


def test_table_holds_the_1000_classes_in_head_order(table):
    assert table.name == DEFAULT_TABLE
    assert len(table) == 1000 == len(set(table.wnids))
    assert list(table.wnids) == sorted(table.wnids)  # the EfficientNet-Lite head's order
    assert len(table.labels) == len(table.words) == len(table.synonyms) == 1000


def test_each_word_is_among_its_synonyms_and_none_is_generic(table):
    for wnid, word, synonyms in zip(table.wnids, table.words, table.synonyms, strict=True):
        assert word in synonyms, wnid
        assert list(synonyms) == sorted(set(synonyms)) and all(s == s.lower() for s in synonyms), wnid
        assert not GENERIC_WORDS & set(synonyms), (wnid, GENERIC_WORDS & set(synonyms))


def test_synonyms_leave_out_words_that_mean_something_else(table):
    mouse = table.wnids.index("n03793489")  # the computer mouse: a caption's "mouse" is the animal
    assert table.words[mouse] == "computer mouse" and "mouse" not in table.synonyms[mouse]
    tabby = table.wnids.index("n02123045")
    assert {"tabby", "domestic cat", "house cat", "cat", "feline"} <= set(table.synonyms[tabby])


def test_unknown_table_name_is_one_line():
    with pytest.raises(ValueError, match="unknown concept table 'imagenet-22k'") as error:
        load_concept_table("imagenet-22k")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("word", "forms"),
    [
        ("dog", ("dog", "dogs")),
        ("bus", ("bus", "buses")),
        ("box", ("box", "boxes")),
        ("mouse", ("mouse", "mice")),
        ("library", ("library", "libraries")),
        ("toy", ("toy", "toys")),
        ("knife", ("knife", "knives")),
        ("fireman", ("fireman", "firemen")),
        ("human", ("human", "humans")),
        ("fish", ("fish",)),
        ("goldfish", ("goldfish",)),
        ("sheep", ("sheep",)),
        ("traffic light", ("traffic light", "traffic lights")),
        ("T-shirt", ("t shirt", "t shirts")),
        ("Siberian husky", ("siberian husky", "siberian huskies")),
    ],
)
def test_word_forms(word, forms):
    assert word_forms(word) == forms


@pytest.mark.parametrize(
    ("caption", "phrases", "expected"),
    [
        ("A dog runs.", ["dog"], True),
        ("Two DOGS play in the snow", ["dog"], True),
        ("a dog's ball", ["dog"], True),
        ("a man eats a hotdog", ["dog"], False),
        ("the doge of Venice", ["dog"], False),
        ("three mice on a table", ["mouse"], True),
        ("a car stops at the traffic lights", ["traffic light"], True),
        ("a traffic cone under a light", ["traffic light"], False),
        ("a boy in a red t-shirt", ["T-shirt"], True),
        ("a cat sits on a couch", ["dog", "cat"], True),
        ("a cat sits on a couch", [], False),
    ],
)
def test_mentions_matches_whole_words_and_plurals(caption, phrases, expected):
    assert mentions(caption, phrases) is expected


def test_missing_wordnet_says_how_to_install_it(tmp_path):
    with pytest.raises(WordNetMissingError, match="apt-get install wordnet-base") as error:
        read_noun_synsets(tmp_path)
    assert isinstance(error.value, FileNotFoundError) and "\n" not in str(error.value)


@needs_wordnet
def test_wordnet_reads_synsets_lemmas_and_hypernym_chains():
    wordnet = read_noun_synsets()
    tabby = wordnet.synset("n02123045")
    assert tabby == wordnet.synset(2123045) and tabby.wnid == "n02123045"
    assert tabby.lemmas == ("tabby", "tabby cat")
    assert wordnet.synset("n02110185").names == ("Siberian husky",)  # natural case kept in `names`
    chains = [[synset.lemmas[0] for synset in path] for path in wordnet.hypernym_paths(tabby)]
    through_cat = [chain for chain in chains if "domestic cat" in chain and "cat" in chain]
    assert through_cat and through_cat[0][:3] == ["tabby", "domestic cat", "cat"]
    assert all(chain[0] == "tabby" and chain[-1] == "entity" for chain in chains)
    dog = wordnet.synset("n02084071")
    assert wordnet.is_under(wordnet.synset("n02110185"), dog) and not wordnet.is_under(tabby, dog)


@needs_wordnet
@pytest.mark.skipif(
    not (SHARED_FLICKR8K / "captions.tsv").is_file() or not (IMAGENET_SAMPLE / "labels.tsv").is_file(),
    reason="needs the shared Flickr8k and ImageNet sample copies",
)
def test_builder_reproduces_the_shipped_table():
    """The JSON in the package is exactly what scripts/build_concept_table.py makes (about 10 s)."""
    with script_module("scripts/build_concept_table.py") as builder:
        wnids = builder.read_wnids(IMAGENET_SAMPLE / "labels.tsv")
        table = builder.build_table(read_noun_synsets(), wnids, builder.train_captions(SHARED_FLICKR8K))
        assert builder.table_json(table) == builder.OUTPUT.read_text(encoding="utf-8")
