"""A tiny reader for WordNet 3.0 nouns and verb frames, straight from the database files (no nltk).

Only the concept-table builder (`scripts/build_concept_table.py`), guidance fitting
(`imcap.guidance_fit`, run by `scripts/choose_guidance.py`) and the naming benchmark
(`benchmarks/bench_naming.py`) use it; captioning never does. Debian's `wordnet-base` package installs the
files under `/usr/share/wordnet`:

``data.noun``
    One synset per line: ``offset lex_filenum n w_cnt (word lex_id)* p_cnt (pointer offset pos src/tgt)*
    | gloss``. `@` and `@i` pointers lead to (instance) hypernyms.
``index.noun``
    ``lemma n synset_cnt p_cnt ptr* sense_cnt tagsense_cnt offset*``: a lemma's senses, most frequent first.
``cntlist.rev``
    ``sense_key sense_number tag_cnt``: how often each sense was tagged in the SemCor corpora, i.e. how
    common that meaning of the word is in running English.

``data.verb``, ``index.verb``, ``verb.exc``
    The same for verbs; after a verb synset's pointers come its sentence frames, ``f_cnt (+ f_num w_num)*``
    ("Something ----s" is frame 1, "Somebody ----s" frame 2; w_num 00: every word of the synset), and
    ``verb.exc`` maps irregular forms to their lemma ("running run").

An ImageNet id ``nXXXXXXXX`` is the noun synset at byte offset ``XXXXXXXX`` of ``data.noun``.

    wordnet = read_noun_synsets()
    tabby = wordnet.synset("n02123045")
    [s.lemmas[0] for s in wordnet.hypernym_paths(tabby)[0]]  # ['tabby', 'domestic cat', 'cat', ...]
"""

from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "WORDNET_DIR",
    "Synset",
    "Verbs",
    "WordNet",
    "WordNetMissingError",
    "read_noun_synsets",
    "read_verbs",
]

WORDNET_DIR = Path("/usr/share/wordnet")
_NOUN_FILES = ("data.noun", "index.noun", "cntlist.rev")
_VERB_FILES = ("data.verb", "index.verb", "verb.exc")
_HYPERNYM_POINTERS = ("@", "@i")  # hypernym and instance hypernym
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers; never on nouns in 3.0, but cheap
_NOUN_SENSE_KEY = re.compile(r"^(?P<lemma>[^%]+)%1:(?P<lex_file>\d\d):(?P<lex_id>\d\d)::$")


class WordNetMissingError(FileNotFoundError):
    """WordNet's database files are not where we looked; the message says how to install them."""


@dataclass(frozen=True)
class Synset:
    """One noun synset (a meaning shared by its lemmas)."""

    offset: int  # byte offset in data.noun: the synset's id
    names: tuple[str, ...]  # its lemmas as WordNet writes them, underscores as spaces: ("Siberian husky",)
    hypernyms: tuple[int, ...]  # offsets of its hypernyms (`@`) and instance hypernyms (`@i`)
    lex_file: int  # the lexicographer file number (05 = noun.animal, 06 = noun.artifact, ...)
    lex_ids: tuple[int, ...]  # one per name: tells the senses of a word in the same lex file apart
    gloss: str

    @property
    def wnid(self) -> str:
        """The ImageNet id: "n" and the offset in 8 digits."""
        return f"n{self.offset:08d}"

    @property
    def lemmas(self) -> tuple[str, ...]:
        """The names, lowercase: ("siberian husky",)."""
        return tuple(name.lower() for name in self.names)


class WordNet:
    """WordNet's nouns: synsets by offset, senses by lemma and how often each sense was tagged."""

    def __init__(
        self, synsets: dict[int, Synset], senses: dict[str, tuple[int, ...]], tag_counts: dict[tuple, int]
    ):
        self.synsets = synsets
        self._senses = senses  # lemma (lowercase, spaces) -> synset offsets, most frequent sense first
        self._tag_counts = tag_counts  # (lemma, lex_file, lex_id) -> SemCor tag count

    def synset(self, key: str | int) -> Synset:
        """The synset of an ImageNet id ("n02123045") or an offset (2123045); KeyError when none."""
        offset = int(key[1:]) if isinstance(key, str) else key
        if offset not in self.synsets:
            raise KeyError(f"no WordNet 3.0 noun synset {key!r}")
        return self.synsets[offset]

    def hypernyms(self, synset: Synset) -> list[Synset]:
        return [self.synsets[offset] for offset in synset.hypernyms]

    def hypernym_paths(self, synset: Synset) -> list[tuple[Synset, ...]]:
        """Every chain from the synset itself (nearest first) up to a root (`entity`), one per way up
        through WordNet's multiple inheritance."""
        parents = self.hypernyms(synset)
        if not parents:
            return [(synset,)]
        return [(synset, *path) for parent in parents for path in self.hypernym_paths(parent)]

    def ancestors(self, synset: Synset) -> list[tuple[Synset, int]]:
        """The synset (distance 0) and each hypernym once, with its shortest distance, nearest first."""
        distance = {synset.offset: 0}
        queue = deque([synset])
        while queue:  # breadth first, so the first distance found for a synset is its shortest
            current = queue.popleft()
            for parent in self.hypernyms(current):
                if parent.offset not in distance:
                    distance[parent.offset] = distance[current.offset] + 1
                    queue.append(parent)
        return [(self.synsets[offset], steps) for offset, steps in distance.items()]

    def is_under(self, synset: Synset, ancestor: Synset) -> bool:
        """True when `ancestor` is the synset itself or one of its hypernyms."""
        return any(found.offset == ancestor.offset for found, _ in self.ancestors(synset))

    def senses(self, lemma: str) -> list[Synset]:
        """The noun synsets of a lemma (any case, spaces or underscores), most frequent sense first."""
        return [self.synsets[offset] for offset in self._senses.get(_lemma_key(lemma), ())]

    def tag_count(self, synset: Synset, lemma: str) -> int:
        """How often `lemma` was tagged with this meaning in SemCor: 0 for rare (or unseen) senses."""
        key = _lemma_key(lemma)
        for name, lex_id in zip(synset.lemmas, synset.lex_ids, strict=True):
            if name == key:
                return self._tag_counts.get((key, synset.lex_file, lex_id), 0)
        raise KeyError(f"{lemma!r} is not a lemma of {synset.wnid} {synset.names}")


@functools.cache
def read_noun_synsets(folder: Path = WORDNET_DIR) -> WordNet:
    """Read WordNet 3.0's nouns from `folder` (about 2 s); raises WordNetMissingError when absent."""
    folder = Path(folder)
    _check_files(folder, _NOUN_FILES)
    return WordNet(
        _read_data(folder / "data.noun"),
        _read_index(folder / "index.noun"),
        _read_counts(folder / "cntlist.rev"),
    )


def _check_files(folder: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet 3.0 not found ({folder / missing[0]} is missing): install it with "
            "`apt-get install wordnet-base`"
        )


@dataclass(frozen=True)
class Verbs:
    """WordNet's verbs, as far as the sentence frames of their usual meaning."""

    senses: dict[str, tuple[int, ...]]  # lemma -> verb synset offsets, most frequent sense first
    frames: dict[tuple[int, str], frozenset[int]]  # (offset, lemma) -> the frames that lemma takes there
    exceptions: dict[str, str]  # irregular form -> lemma ("lying" -> "lie", "running" -> "run")

    def lemma(self, form: str) -> str | None:
        """The verb a present participle belongs to ("riding" -> "ride", "sitting" -> "sit"), by
        `verb.exc` and WordNet's own suffix rules for -ing; None when it is no verb WordNet knows."""
        form = form.lower()
        if form in self.exceptions:
            return self.exceptions[form]
        if form.endswith("ing"):
            for stem in (form[:-3] + "e", form[:-3]):  # morphy's order: "riding" -> "ride" before "rid"
                if stem in self.senses:
                    return stem
        return form if form in self.senses else None

    def usual_frames(self, lemma: str) -> frozenset[int]:
        """The frame numbers of the lemma's most frequent sense (empty for an unknown verb)."""
        offsets = self.senses.get(lemma)
        return self.frames.get((offsets[0], lemma), frozenset()) if offsets else frozenset()


@functools.cache
def read_verbs(folder: Path = WORDNET_DIR) -> Verbs:
    """Read WordNet 3.0's verb senses and frames from `folder`; raises WordNetMissingError when absent."""
    folder = Path(folder)
    _check_files(folder, _VERB_FILES)
    frames: dict[tuple[int, str], frozenset[int]] = {}
    with (folder / "data.verb").open(encoding="utf-8") as lines:
        for line in lines:
            if not line.startswith(" "):
                frames.update(_verb_frames(line))
    with (folder / "verb.exc").open(encoding="utf-8") as lines:
        exceptions = dict(line.split()[:2] for line in lines if line.strip())
    return Verbs(_read_index(folder / "index.verb"), frames, exceptions)


def _verb_frames(line: str) -> dict[tuple[int, str], frozenset[int]]:
    """(offset, lemma) -> frames, for each word of one data.verb synset line."""
    parts = line.partition(" | ")[0].split()
    offset, word_count = int(parts[0]), int(parts[3], 16)
    words = [_lemma_key(word) for word in parts[4 : 4 + 2 * word_count : 2]]
    pointer_start = 4 + 2 * word_count
    frame_start = pointer_start + 1 + 4 * int(parts[pointer_start])
    per_word: dict[int, set[int]] = {i: set() for i in range(word_count)}
    for i in range(int(parts[frame_start])):
        frame, word = int(parts[frame_start + 2 + 3 * i]), int(parts[frame_start + 3 + 3 * i], 16)
        for index in range(word_count) if word == 0 else (word - 1,):
            per_word[index].add(frame)
    return {(offset, words[i]): frozenset(found) for i, found in per_word.items()}


def _read_data(path: Path) -> dict[int, Synset]:
    with path.open(encoding="utf-8") as lines:
        return {synset.offset: synset for synset in map(_parse_synset, lines) if synset is not None}


def _parse_synset(line: str) -> Synset | None:
    if line.startswith(" "):  # the license header
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    word_count = int(parts[3], 16)
    words = parts[4 : 4 + 2 * word_count]
    pointer_start = 4 + 2 * word_count
    pointer_count = int(parts[pointer_start])
    pointers = parts[pointer_start + 1 : pointer_start + 1 + 4 * pointer_count]
    hypernyms = [
        int(pointers[i + 1])
        for i in range(0, len(pointers), 4)
        if pointers[i] in _HYPERNYM_POINTERS and pointers[i + 2] == "n"
    ]
    return Synset(
        offset=int(parts[0]),
        names=tuple(_clean_name(word) for word in words[0::2]),
        hypernyms=tuple(hypernyms),
        lex_file=int(parts[1]),
        lex_ids=tuple(int(lex_id, 16) for lex_id in words[1::2]),
        gloss=gloss.strip(),
    )


def _read_index(path: Path) -> dict[str, tuple[int, ...]]:
    senses = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            parts = line.split()
            synset_count = int(parts[2])
            senses[_lemma_key(parts[0])] = tuple(int(offset) for offset in parts[-synset_count:])
    return senses


def _read_counts(path: Path) -> dict[tuple, int]:
    counts = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            key, _, count = line.split()
            match = _NOUN_SENSE_KEY.match(key)
            if match:  # a noun sense (satellite adjectives and verbs have other keys)
                lemma = _lemma_key(match["lemma"])
                counts[(lemma, int(match["lex_file"]), int(match["lex_id"]))] = int(count)
    return counts


def _clean_name(word: str) -> str:
    return _MARKER.sub("", word).replace("_", " ")


def _lemma_key(lemma: str) -> str:
    return _clean_name(lemma).lower()
