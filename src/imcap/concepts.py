"""ImageNet classes as caption words: the table shipped with the package, and whole-word matching.

The encoder's ImageNet-1k head gives a probability per class; captions name things in words. The
concept table (built once by `scripts/build_concept_table.py` from WordNet 3.0 and the Flickr8k captions,
shipped as `imagenet_concepts.json`) says, per class in head order:

- `labels`: a readable class name for tags ("Siberian husky", "tabby", "analog clock");
- `words`: the one word a caption would use for it ("dog", "cat", "clock");
- `synonyms`: every word or phrase a caption could use that is right for the class (the class's WordNet
  lemmas and its hypernyms', without generic ones such as "animal" or "device"); `words[i]` is among them.

Nothing here needs WordNet: reading the table is a JSON load.

    table = load_concept_table()
    table.words[table.wnids.index("n02110185")]  # 'dog'
    mentions("Two huskies pull a sled.", table.synonyms[250])  # True
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

__all__ = ["DEFAULT_TABLE", "ConceptTable", "load_concept_table", "mentions", "tokens", "word_forms"]

DEFAULT_TABLE = "imagenet-1k-wordnet-v1"
_TABLE_FILES = {DEFAULT_TABLE: "imagenet_concepts.json"}  # table name -> file inside the package

_WORD = re.compile(r"[^\W_]+")  # letters and digits: punctuation, hyphens and apostrophes split words
# plurals English does not make with -s/-es; looked up on the last word of a phrase
_IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "louse": "lice",
    "goose": "geese",
    "foot": "feet",
    "tooth": "teeth",
    "ox": "oxen",
    "knife": "knives",
    "wife": "wives",
    "life": "lives",
    "leaf": "leaves",
    "loaf": "loaves",
    "wolf": "wolves",
    "calf": "calves",
    "half": "halves",
    "shelf": "shelves",
    "thief": "thieves",
    "scarf": "scarves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "volcano": "volcanoes",
    "torpedo": "torpedoes",
    "mosquito": "mosquitoes",
    "hero": "heroes",
    "cactus": "cacti",
    "fungus": "fungi",
}
# compounds that inflect like their last part: fireman -> firemen, dormouse -> dormice
_IRREGULAR_ENDINGS = ("man", "mouse", "knife", "wife", "shelf", "wolf", "tooth", "foot")
_REGULAR_DESPITE_ENDING = {"human", "german", "roman", "shaman", "caiman", "talisman", "ottoman", "doberman"}
_SAME_PLURAL = ("fish", "sheep", "deer", "moose", "bison", "swine", "aircraft", "series", "species")


@dataclass(frozen=True)
class ConceptTable:
    """Per ImageNet class, in the classifier head's order (sorted WNIDs): its id, tag label, caption word
    and the words compatible with it."""

    name: str
    wnids: tuple[str, ...]
    labels: tuple[str, ...]
    words: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.wnids)


@functools.cache
def load_concept_table(name: str = DEFAULT_TABLE) -> ConceptTable:
    """The concept table shipped with imcap; ValueError (one line) for a name it does not ship."""
    if name not in _TABLE_FILES:
        raise ValueError(f"unknown concept table {name!r}; known: {', '.join(sorted(_TABLE_FILES))}")
    data = json.loads(resources.files("imcap").joinpath(_TABLE_FILES[name]).read_text(encoding="utf-8"))
    classes = data["classes"]
    return ConceptTable(
        name=data["name"],
        wnids=tuple(row["wnid"] for row in classes),
        labels=tuple(row["label"] for row in classes),
        words=tuple(row["word"] for row in classes),
        synonyms=tuple(tuple(row["synonyms"]) for row in classes),
    )


def tokens(text: str) -> list[str]:
    """The lowercase words of a text, punctuation dropped: "A dog's T-shirt." -> a dog s t shirt."""
    return _WORD.findall(text.lower())


def word_forms(word: str) -> tuple[str, ...]:
    """The word (or phrase) and its plural, lowercase: "traffic light" -> ("traffic light", "traffic lights").

    Only the last word takes the plural; a word whose plural is itself ("fish", "sheep") gives one form.
    """
    words = tokens(word)
    if not words:
        return ()
    singular = " ".join(words)
    plural = " ".join([*words[:-1], _plural(words[-1])])
    return (singular,) if plural == singular else (singular, plural)


def _plural(word: str) -> str:
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    ending = next((end for end in _IRREGULAR_ENDINGS if word.endswith(end)), None)
    if ending and word not in _REGULAR_DESPITE_ENDING:
        return word[: -len(ending)] + _IRREGULAR_PLURALS[ending]
    if word.endswith(_SAME_PLURAL):  # goldfish, jellyfish, bighorn sheep
        return word
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def mentions(caption: str, phrases: Iterable[str]) -> bool:
    """True when the caption contains one of the phrases, or its plural, as whole words.

    Case and punctuation are ignored: "dog" matches "Dogs run." and "a dog's ball", not "hotdog" or "doge".
    """
    # spaces around both sides turn "whole words in sequence" into a plain substring test
    text = f" {' '.join(tokens(caption))} "
    return any(f" {form} " in text for phrase in phrases for form in word_forms(phrase))
