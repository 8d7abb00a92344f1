"""Guided decoding: captions that name what the image classifier is sure of, and not what it rules out.

A model with a concept head (imcap.encoder) gives ImageNet-1k probabilities per image. The concept table
(imcap.concepts) maps each class to the word a caption would use (Siberian husky -> dog, espresso ->
coffee); summed over the classes a word names (its own, and those listing it among their synonyms: "dog"
for every breed), that gives a probability per caption word. Two rules use it, with thresholds
chosen on Flickr8k val (`scripts/choose_guidance.py`) and saved with the model (`guidance.json`):

- **name**: when a word is at least `name_threshold` probable and the unguided caption says neither it nor
  a compatible word (a synonym or hypernym: "husky", "dog", "canine"), the image is decoded again so that
  the caption contains it: as its subject ("a cat ...", placement "start", a prefixed beam search), or
  wherever lexically constrained beam search puts the word or its plural (placement "anywhere",
  imcap.guided; Anderson et al. 2017). Images whose caption already names it keep the unguided tokens;
  words captions rarely say even when the head is sure (`unsaid_words`) are never forced.
- **rule out**: a word of `ban_words` (words the head recognises reliably, "dog" above all: Flickr8k's
  favourite subject, said of kitchens and zebras) is banned from an image's caption when its probability
  is below `ban_threshold`; a rewritten caption also may not name a concept below `guard_threshold`.
- **no people where the head sees none**: the head has no class for a person, so `people_words` are
  banned when the classes never seen with people on the training photos (`people_classes`: all but ski,
  swing, mountain bike...) hold at least `no_people_threshold` of the probability.
- **a more general name when nothing is sure**: when no word reaches `name_threshold` but one of
  `generic_words` does (a hypernym several classes share, summed over them: "reptile" over an alligator and
  a crocodile at 0.39 and 0.34, "ape" over a gorilla and a chimpanzee), the caption names that instead of
  inventing a Flickr8k subject ("a black bird is playing in the water"); the most specific such word
  (fewest classes) wins.
- **things do not play**: when the head is sure of a thing that does not act (`acting_classes` are
  animals, people and vehicles; a clock, a burger and a mushroom do not), the caption may not have the
  thing do what only the living do (`living_verbs`: "playing", "climbing", "eating"). An unguided caption
  that makes it "play with a toy" is decoded again too, with the thing as subject and those verbs
  banned; only where the head sees people (`people_evident_classes`: ski, swing, cliff...) does
  constrained beam search put the word wherever it fits ("a man is climbing a cliff", not "a cliff is
  climbing a rock"): elsewhere that kept the people the unguided caption had invented;
- **the named thing stays the subject**: with placement "start", the word after "a zebra" must be one
  that captions put after their subject (`subject_followers`: "is", "in", "with", "running"...), not
  "man" ("a zebra man is sitting on a tree").
- **no subject the head rules out**: when no word is sure and the caption's subject is one the head all
  but rules out (below `ruled_out_threshold`: "a bird is sitting on a wall" for red wine, the bird
  words at 0.013), the caption is decoded again about the head's best guess, if it reaches
  `fallback_threshold`; only `ruled_out_subjects` can be ruled out, and a people word is never such a
  subject (the head has no class for people).

imcap.guidance_fit fits the word lists and the people threshold to the training captions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from imcap.concepts import ConceptTable, load_concept_table, mentions, tokens, word_forms
from imcap.guidance_settings import GUIDANCE_FILE, PLACEMENTS, GuidanceSettings
from imcap.guided import Constraint, word_continuations

__all__ = ["GUIDANCE_FILE", "PLACEMENTS", "GuidanceSettings", "Guide", "Plan", "no_people_mass"]


@dataclass
class Plan:
    """What guidance asks of one image's caption."""

    banned: tuple[str, ...] = ()  # words it must not contain
    no_people: bool = False  # the head rules people out (GuidanceSettings.no_people_threshold)
    people_evident: bool = False  # the head sees people (GuidanceSettings.people_evident_threshold)
    required: tuple[str, ...] = ()  # words it must contain (set after the unguided pass)
    word_probs: dict[str, float] = field(default_factory=dict, repr=False)
    generic_probs: dict[str, float] = field(default_factory=dict, repr=False)  # settings.generic_words


class Guide:
    """The rules of the module docstring for one model: its concept table, thresholds and tokenizer."""

    def __init__(self, table: ConceptTable, settings: GuidanceSettings, tokenizer):
        self.table, self.settings, self.tokenizer = table, settings, tokenizer
        self._token_ids: dict[str, tuple[int, ...]] = {}
        self._forms_ids: dict[str, tuple[tuple[int, ...], ...]] = {}
        self.words = sorted(set(table.words))  # the words a caption would use, one or more classes each
        # a word is as probable as all the classes it names: "dog" sums every breed, "missile" both the
        # missile and the projectile class (each lists "missile" among its synonyms)
        self._names = _names_matrix(table, self.words)  # (W, 1000): 1 where word i names class j
        compatible: dict[str, set[str]] = {w: {w} for w in self.words}
        for word, synonyms in zip(table.words, table.synonyms, strict=True):
            compatible[word].update(synonyms)
        # a general word is said by the names of every class it covers: "reptile" by "crocodile"
        self.generic_words = tuple(sorted(set(settings.generic_words) - set(self.words)))
        self._generic_names = _names_matrix(table, self.generic_words)  # (G, 1000)
        sizes = self._generic_names.sum(dim=1).tolist()  # how many classes each covers
        self._generic_size = dict(zip(self.generic_words, sizes, strict=True))
        for word, row in zip(self.generic_words, self._generic_names, strict=True):
            compatible[word] = {word}
            for cls in row.nonzero().flatten().tolist():
                compatible[word].update({table.words[cls], *table.synonyms[cls]})
        self._compatible = {w: tuple(sorted(s)) for w, s in compatible.items()}
        self._people_classes = _class_mask(table, settings.people_classes, "people")  # seen with people
        self._people_evident_classes = _class_mask(table, settings.people_evident_classes, "people_evident")
        self._inert, self._acting_names = self._inert_words(table, settings)
        self._living_verbs = frozenset(settings.living_verbs)
        self._unsaid = frozenset(settings.unsaid_words)  # looked up for every word of every caption's plan
        # the subjects a low probability rules out, each with the probability below which it is
        self._ruled_out_below = {
            name: settings.ruled_out_thresholds.get(name, settings.ruled_out_threshold)
            for name in settings.ruled_out_subjects
        }
        # tokens that would glue onto a forced word (" zebra" -> " zebrack"): the search keeps them off it
        self.word_continuations = word_continuations(tokenizer)
        # after a forced subject (placement "start"), also every token that is no subject follower
        self.after_subject = self.word_continuations
        if settings.subject_followers:
            allowed = self._one_token_words(settings.subject_followers)
            self.after_subject = self.after_subject | (frozenset(range(len(tokenizer))) - allowed)

    def _inert_words(
        self, table: ConceptTable, settings: GuidanceSettings
    ) -> tuple[frozenset[str], tuple[str, ...]]:
        """The table and generic words none of whose classes acts, and every name of something that does
        (people words, and the names compatible with words that cover an acting class); both empty when
        the rule is off (no `living_verbs`)."""
        if not settings.living_verbs:
            return frozenset(), ()
        acting = _class_mask(table, settings.acting_classes, "acting").float()
        words = [*self.words, *self.generic_words]
        acts = (torch.cat([self._names, self._generic_names]) @ acting > 0).tolist()
        inert = frozenset(word for word, word_acts in zip(words, acts, strict=True) if not word_acts)
        acting_names = {name for word in words if word not in inert for name in self._compatible[word]}
        return inert, tuple(sorted(acting_names | set(settings.people_words)))

    @functools.cached_property
    def _one_token_names(self) -> set[str]:
        """The names the guard may ban: those the decoder can say in one token, the words it knows and so
        brings unasked (a multi-token name is one it has rarely, if ever, seen). Built on first use: it
        tokenizes every name, which start-up need not pay for when the guard is off."""
        names = {name for synonyms in self._compatible.values() for name in synonyms}
        return {name for name in names if len(self._ids(name)) == 1}

    @functools.cached_property
    def _words_by_name(self) -> dict[str, tuple[str, ...]]:
        """Every name of a table word (its own, synonyms, hypernyms) -> the table words it names."""
        index: dict[str, set[str]] = {}
        for word in self.words:
            for name in self._compatible[word]:
                index.setdefault(name, set()).add(word)
        return {name: tuple(sorted(words)) for name, words in index.items()}

    @functools.cached_property
    def _names_by_form(self) -> dict[str, tuple[str, ...]]:
        """Every form of every name (singular and plural: `word_forms`) -> the names. Built on first use, by
        the best-guess rule only: `mentions` over all ~600 words per caption cost 0.7 ms."""
        index: dict[str, set[str]] = {}
        for name in self._words_by_name:
            for form in word_forms(name):
                index.setdefault(form, set()).add(name)
        return {form: tuple(sorted(names)) for form, names in index.items()}

    def names_in(self, text: str) -> set[str]:
        """The names of table words a text says, singular or plural: "two black dogs" -> {"dog"}."""
        words, index, longest = tokens(text), self._names_by_form, self._longest_form
        spans = (" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, i + longest + 1))
        return {name for span in spans for name in index.get(span, ())}

    @functools.cached_property
    def _longest_form(self) -> int:
        return max(len(form.split()) for form in self._names_by_form)

    def words_named(self, name: str) -> tuple[str, ...]:
        """The table words a name names: "bird" -> bird, duck, goose, swan."""
        return self._words_by_name.get(name, ())

    @classmethod
    def for_model(cls, encoder_config, settings: GuidanceSettings | None, tokenizer) -> Guide | None:
        """The model's guide, or None when it has no concept head (or no saved thresholds)."""
        if settings is None or not getattr(encoder_config, "concept_head", False):
            return None
        return cls(load_concept_table(encoder_config.concept_table), settings, tokenizer)

    def word_probabilities(self, concept_probs: torch.Tensor) -> torch.Tensor:
        """(B, 1000) class probabilities -> (B, W) word probabilities (`self.words` order)."""
        return _summed(concept_probs, self._names)

    def plans(self, concept_probs: torch.Tensor) -> list[Plan]:
        """The first pass's plan per image: which words are ruled out."""
        word_probs = self.word_probabilities(concept_probs)
        generic_probs = _summed(concept_probs, self._generic_names).tolist()
        no_people = self.no_people(concept_probs).tolist()
        evident = self.people_evident(concept_probs).tolist()
        plans = []
        for row, generic_row, people_unlikely, people_seen in zip(
            word_probs.tolist(), generic_probs, no_people, evident, strict=True
        ):
            probs = dict(zip(self.words, row, strict=True))
            banned = tuple(
                w for w in self.settings.ban_words if probs.get(w, 1.0) < self.settings.ban_threshold
            )
            banned += tuple(kind for w in banned for kind in self.settings.ban_kinds.get(w, ()))
            if people_unlikely:
                banned += self.settings.people_words
            generic = dict(zip(self.generic_words, generic_row, strict=True))
            plans.append(
                Plan(
                    banned=banned,
                    no_people=people_unlikely,
                    people_evident=people_seen,
                    word_probs=probs,
                    generic_probs=generic,
                )
            )
        return plans

    def no_people(self, concept_probs: torch.Tensor) -> torch.Tensor:
        """(B,) True where people words are ruled out: the classes never seen with people hold at least
        `no_people_threshold` of the probability (never, when the threshold is 0)."""
        threshold = self.settings.no_people_threshold
        if threshold <= 0:  # off: every caption pays for this call, so skip the mass
            return torch.zeros(concept_probs.shape[0], dtype=torch.bool)
        return no_people_mass(concept_probs, self._people_classes) >= threshold

    def people_evident(self, concept_probs: torch.Tensor) -> torch.Tensor:
        """(B,) True where the head sees people: `people_evident_classes` hold at least
        `people_evident_threshold` of the probability (never, when the threshold is 0)."""
        threshold = self.settings.people_evident_threshold
        if threshold <= 0:
            return torch.zeros(concept_probs.shape[0], dtype=torch.bool)
        mask = self._people_evident_classes.to(concept_probs.device)
        return concept_probs.float()[:, mask].sum(dim=-1) >= threshold

    def missing_word(self, plan: Plan, caption: str) -> str | None:
        """The most probable word over `name_threshold` that the caption does not name, if any (words
        captions do not say, `unsaid_words`, are passed over). When no word is that sure, the most
        specific of `generic_words` that is (fewest classes, then most probable)."""
        return self._missing(self.sure_word(plan), caption)

    def misused_subject(self, plan: Plan, caption: str) -> str | None:
        """The sure word, when it does not act and the caption has it do what only the living do ("a clock
        is playing with a toy"): the words before the caption's first living verb name it and nothing
        that acts (so "a man is playing a guitar" stays)."""
        return self._misused(self.sure_word(plan), caption)

    def placement(self, plan: Plan) -> str:
        """Where the rewrite puts the plan's word: `placement`, but "anywhere" for a thing that does not act
        where the head sees people (`people_evident`): a photo of a cliff with people on it is "a man is
        climbing a cliff", not "a cliff is climbing a rock". Elsewhere the thing stays the subject: placed
        anywhere, it kept the people the unguided caption invented ("a group of people are standing on a
        street sign")."""
        return "anywhere" if self._names_inert(plan) and plan.people_evident else self.settings.placement

    def rewrite_word(self, plan: Plan, caption: str) -> str | None:
        """The word to decode the caption again about, if any: one it misses, a misused subject, or with
        nothing sure the best guess instead of a subject the head rules out."""
        word = self.sure_word(plan)
        if word is None:
            return self._instead_of_ruled_out(plan, caption)
        return self._missing(word, caption) or self._misused(word, caption)

    def _instead_of_ruled_out(self, plan: Plan, caption: str) -> str | None:
        """The most probable table word (`unsaid_words` passed over), when it reaches `fallback_threshold`
        and the caption's subject says only `ruled_out_subjects`, each with its table words all below its
        threshold (`ruled_out_thresholds`, else `ruled_out_threshold`; and no people)."""
        threshold = self.settings.fallback_threshold
        if not threshold or not self._subject_ruled_out(plan, caption):
            return None
        guess, prob = self._most_probable_said(plan)
        return guess if prob >= threshold else None

    def _subject_ruled_out(self, plan: Plan, caption: str) -> bool:
        """Whether the caption's subject says only `ruled_out_subjects`, each with its table words all
        below its threshold, and no people (the head cannot rule people out)."""
        subject = caption_subject(caption)
        if mentions(subject, self.settings.people_words):
            return False
        names = self.names_in(subject)
        if not names or not names <= self._ruled_out_below.keys():  # a name it may miss stays
            return False
        return all(
            max(plan.word_probs[w] for w in self.words_named(name)) < self._ruled_out_below[name]
            for name in names
        )

    def _missing(self, word: str | None, caption: str) -> str | None:
        return None if word is None or mentions(caption, self._compatible[word]) else word

    def _misused(self, word: str | None, caption: str) -> str | None:
        if word is None or word not in self._inert:
            return None
        words = tokens(caption)
        verb_at = next((i for i, w in enumerate(words) if w in self._living_verbs), None)
        if verb_at is None:
            return None
        subject = " ".join(words[:verb_at])
        if mentions(subject, self._compatible[word]) and not mentions(subject, self._acting_names):
            return word
        return None

    def _names_inert(self, plan: Plan) -> bool:
        """Whether the plan requires a word for a thing that does not act."""
        return any(word in self._inert for word in plan.required)

    def sure_word(self, plan: Plan) -> str | None:
        """The most probable table word at `name_threshold` or over (`unsaid_words` passed over); when none
        is, the most specific sure one of `generic_words` (fewest classes, then most probable)."""
        threshold = self.settings.name_threshold
        word, prob = self._most_probable_said(plan)
        if prob >= threshold:
            return word
        sure = [(self._generic_size[w], -p, w) for w, p in plan.generic_probs.items() if p >= threshold]
        return min(sure)[2] if sure else None

    def _most_probable_said(self, plan: Plan) -> tuple[str, float]:
        """The most probable table word and its probability, `unsaid_words` passed over (first-seen wins
        ties, as `max` does)."""
        said = ((w, p) for w, p in plan.word_probs.items() if w not in self._unsaid)
        return max(said, key=lambda item: item[1])

    def names(self, word: str) -> tuple[str, ...]:
        """Every name compatible with a table or generic word: its own, its classes' names and hypernyms."""
        return self._compatible[word]

    def guarded(self, plan: Plan) -> tuple[str, ...]:
        """The words a rewritten caption must not use: the plan's bans, the living verbs when the named word
        does not act and is the subject, plus (with a guard threshold) every word of the table the
        classifier gives less than it, but for those compatible with the named one."""
        banned = set(plan.banned) | set(self.settings.rewrite_ban_words)
        if self._names_inert(plan) and self.placement(plan) == "start":
            banned |= self._living_verbs
        if not self.settings.guard_threshold:
            return tuple(sorted(banned))
        likely = [w for w, p in plan.word_probs.items() if p >= self.settings.guard_threshold]
        keep = {name for word in [*plan.required, *likely] for name in self._compatible[word]}
        unlikely = {
            name
            for word, p in plan.word_probs.items()
            if p < self.settings.guard_threshold
            for name in self._compatible[word]
            if name not in keep and name in self._one_token_names
        }
        return tuple(sorted(banned | unlikely))

    def prefix(self, word: str) -> tuple[int, ...]:
        """Token ids of "a WORD" / "an WORD": the start of a caption about it."""
        article = "an" if word[:1] in "aeiou" else "a"
        return self._ids(f"{article} {word}")

    def constraint(self, word: str) -> Constraint:
        """The word or its plural, as token ids (a caption word always follows a space in our BPE)."""
        return Constraint(tuple(self._ids(form) for form in word_forms(word)))

    def bad_words_ids(self, words: Sequence[str]) -> list[list[int]]:
        return [list(ids) for word in words for ids in self._forms_ids_of(word)]

    def _forms_ids_of(self, word: str) -> tuple[tuple[int, ...], ...]:
        # memoised: every image's bans hold the same few hundred words
        forms = self._forms_ids.get(word)
        if forms is None:
            forms = self._forms_ids[word] = tuple(
                ids for form in word_forms(word) if (ids := self._ids(form))
            )
        return forms

    def _one_token_words(self, words: Sequence[str]) -> frozenset[int]:
        """The tokens of these words said after a space, for those the tokenizer keeps whole (a split
        word's first piece may be another word: " crowd"+"s")."""
        return frozenset(ids[0] for ids in map(self._ids, words) if len(ids) == 1)

    def _ids(self, text: str) -> tuple[int, ...]:
        # memoised: the guard asks for hundreds of names per rewritten caption, always the same ones
        ids = self._token_ids.get(text)
        if ids is None:
            ids = self._token_ids[text] = tuple(
                self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            )
        return ids


# words that end a caption's subject ("a man in a red shirt is ..." -> "a man"), and the collective nouns
# whose "of" leads to it ("a group of birds" -> "birds")
_AFTER_SUBJECT = frozenset(
    "is are in with on at and of near by under over through from into next beside behind".split()  # noqa: SIM905
)
_COLLECTIVES = frozenset("group couple pair team crowd herd flock line pack bunch".split())  # noqa: SIM905
# "a black and white bird": an "and" between two of these joins colours, it does not end the subject
_COLOURS = frozenset(
    ("black", "white", "brown", "red", "blue", "green", "yellow", "orange", "pink", "purple")
    + ("gray", "grey", "tan", "golden", "silver", "dark", "light")
)


def caption_subject(caption: str) -> str:
    """The words of a caption's subject: those before its first verb or preposition (an "and" between two
    colours aside), after "a group of"."""
    words, subject, i = tokens(caption), [], 0
    while i < len(words) and (words[i] not in _AFTER_SUBJECT or _joins_colours(words, i)):
        if words[i] in _COLLECTIVES and words[i + 1 : i + 2] == ["of"]:
            subject, i = [], i + 2  # "a group of birds": the birds are the subject
            continue
        subject.append(words[i])
        i += 1
    return " ".join(subject)


def _joins_colours(words: list[str], i: int) -> bool:
    return words[i] == "and" and 0 < i < len(words) - 1 and {words[i - 1], words[i + 1]} <= _COLOURS


def _class_mask(table: ConceptTable, wnids: Sequence[str], what: str) -> torch.Tensor:
    """(classes,) bool: True for the given ImageNet ids; ValueError (one line) for an id not in the table."""
    unknown = sorted(set(wnids) - set(table.wnids))
    if unknown:
        raise ValueError(f"guidance.json: {what}_classes {unknown[:3]} are not classes of {table.name}")
    mask = torch.zeros(len(table), dtype=torch.bool)
    mask[[table.wnids.index(w) for w in wnids]] = True
    return mask


def _names_matrix(table: ConceptTable, words: Sequence[str]) -> torch.Tensor:
    """(len(words), classes): 1 where the word is among the class's synonyms (its names and hypernyms')."""
    column = {word: i for i, word in enumerate(words)}
    names = torch.zeros(len(words), len(table))
    for cls, synonyms in enumerate(table.synonyms):
        for word in set(synonyms) & column.keys():
            names[column[word], cls] = 1.0
    return names


def _summed(concept_probs: torch.Tensor, names: torch.Tensor) -> torch.Tensor:
    """(B, 1000) class probabilities -> (B, len(names)): each word's classes summed."""
    probs = concept_probs.float()
    return (probs @ names.to(probs.device).T).clamp(max=1.0)


def no_people_mass(concept_probs: torch.Tensor, people_classes: torch.Tensor) -> torch.Tensor:
    """(B,) the probability the head gives to classes outside `people_classes` (a (1000,) bool mask)."""
    return concept_probs.float()[:, ~people_classes.to(concept_probs.device)].sum(dim=-1)
