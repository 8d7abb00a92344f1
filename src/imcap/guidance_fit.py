"""Fitting guidance's word lists and thresholds to a caption corpus (scripts/choose_guidance.py uses these).

imcap.guidance applies the rules at caption time; this module derives, from the training photos and their
captions, what the rules need that the concept table cannot say:

- `subject_followers`: the words captions put right after their subject ("a dog *is*", "a man *in*"), the
  only ones allowed after a subject guidance forces, so that it stays the subject;
- `people_classes`: the ImageNet classes the training photos show with people (ski, swing, mountain bike),
  and `no_people_threshold`, chosen on val: above it, the head's probability on every other class rules
  people words out of the caption.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

import torch

from imcap.concepts import mentions, tokens, word_forms

# words for a person, as captions say them (their plurals count too, see word_forms); collective nouns
# ("crowd", "group") are left out: "a crowd of" makes "of" look like a word that follows subjects.
# benchmarks/bench_naming.py keeps its own list on purpose: the measure should not move with the rule
PEOPLE_WORDS = (
    "man", "woman", "person", "people", "boy", "girl", "child", "kid", "lady", "guy", "player", "baby",
    "toddler", "skier", "snowboarder", "surfer", "swimmer", "biker", "climber", "rider", "skateboarder",
    "dancer", "diver", "athlete", "groom", "bride",
)  # fmt: skip


def subject_followers(
    captions: Iterable[str], subjects: Collection[str], min_share: float = 0.0015, within: int = 5
) -> tuple[str, ...]:
    """The words people's captions put right after their subject, most frequent first: in each caption
    whose first `within` words hold one of `subjects` (nouns: people words, the concept table's words),
    the word after the first such noun ("a black dog *is* running", "two men *in* a boat"), kept when it
    follows at least `min_share` of those subjects. Other nouns stay out of the list ("a mountain biker"):
    after a named subject they would make it a modifier, the fault this rule is for."""
    nouns = {form for subject in subjects for form in word_forms(subject)}
    counts: Counter[str] = Counter()
    for caption in captions:
        words = tokens(caption)
        first = next((i for i, word in enumerate(words[:within]) if word in nouns), None)
        if first is not None and first + 1 < len(words):
            counts[words[first + 1]] += 1
    total = sum(counts.values())
    return tuple(word for word, n in counts.most_common() if n >= min_share * total and word not in nouns)


def shows_people(captions: Sequence[str], people_words: Sequence[str] = PEOPLE_WORDS) -> bool:
    """Whether most of a photo's reference captions name a person."""
    return 2 * sum(mentions(c, people_words) for c in captions) > len(captions)


def people_classes(
    concept_probs: torch.Tensor,
    with_people: Sequence[bool],
    sure: float = 0.3,
    max_share: float = 0.2,
) -> torch.Tensor:
    """(1000,) bool: the classes that are the head's top class (at least `sure`) on training photos with
    people more than `max_share` of the time. A class never top on a training photo is not among them: in
    a corpus of people's photos (Flickr8k: 7 in 10), a class seen only without them, or never, is evidence
    that the photo shows the thing, not somebody with it."""
    top_prob, top_class = concept_probs.float().max(dim=-1)
    sure_rows = top_prob >= sure
    seen = torch.bincount(top_class[sure_rows], minlength=concept_probs.shape[-1])
    people = torch.tensor(with_people, dtype=torch.bool, device=concept_probs.device)
    seen_with_people = torch.bincount(top_class[sure_rows & people], minlength=concept_probs.shape[-1])
    return seen_with_people > max_share * seen


def named_people_classes(table, people_words: Sequence[str] = PEOPLE_WORDS) -> torch.Tensor:
    """(1000,) bool: the classes that are people (ballplayer, scuba diver, groom): a name of theirs in the
    concept table is a people word."""
    people = set(people_words)
    return torch.tensor([bool(people & set(names)) for names in table.synonyms])


def no_people_threshold(
    mass: torch.Tensor,
    with_people: Sequence[bool],
    max_wrong: float = 0.15,
    candidates: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
) -> float:
    """The lowest candidate threshold on the no-people mass (imcap.guidance.no_people_mass) at which at
    most `max_wrong` of the photos it rules people out of show people (by their references); 0 (off) when
    none does."""
    people, mass = torch.tensor(with_people, dtype=torch.bool), mass.cpu()
    for threshold in sorted(candidates):
        fires = mass >= threshold
        if fires.any() and float((fires & people).sum()) <= max_wrong * float(fires.sum()):
            return threshold
    return 0.0
