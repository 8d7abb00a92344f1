"""Fitting guidance's word lists and thresholds to a caption corpus (scripts/choose_guidance.py uses these).

imcap.guidance applies the rules at caption time; this module derives, from the training photos and their
captions, what the rules need that the concept table cannot say:

- `subject_followers`: the words captions put right after their subject ("a dog *is*", "a man *in*"), the
  only ones allowed after a subject guidance forces, so that it stays the subject;
- `people_classes`: the ImageNet classes the training photos show with people (ski, swing, mountain bike),
  and `no_people_threshold`, chosen on val: above it, the head's probability on every other class rules
  people words out of the caption;
- `corpus_people_words`: which words that rule bans: beyond the hand list below, every word the captions
  use as a noun for a person (WordNet says "hiker", "cyclist", "spectator" are people; the captions
  say which of WordNet's thousands of person nouns come up, and as nouns: "white" is a person in WordNet);
- `generic_words`: the categories naming falls back to when no single word is sure ("reptile", "ape"),
  from WordNet alone;
- `living_verbs` and `acting_classes`: what only living things do ("playing", "climbing", "eating": the
  usual meaning of the verb takes no thing as its subject in WordNet's sentence frames), and the classes
  that may do it (animals, people, and the vehicles that carry them: a car races), so that a named clock
  does not "play with a toy";
- `ruled_out_subjects`: the subjects a low probability may rule out, those the head rarely misses where the
  captions say them ("bird", "car"; not "horse": ImageNet knows horses only as the sorrel).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

import torch

from imcap.concepts import mentions, tokens, word_forms
from imcap.wordnet import Verbs, WordNet

PERSON = "n00007846"  # WordNet's person, individual, someone, somebody, mortal, soul
ANIMAL = "n00015388"  # animal, animate being, beast, brute, creature, fauna
CONVEYANCE = "n03100490"  # conveyance, transport: vehicles, craft, and what else carries people
# WordNet's two progressive verb frames, "It is ----ing" and "Something is ----ing PP": the pattern of a
# caption about a thing ("a clock is hanging on a wall"). "Something ----s" alone is not enough: WordNet
# gives it to run, jump and walk, because animals do them, and "a fence is jumping over a tree" is the
# caption this rule is for
THING_FRAMES = frozenset({3, 4})

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
    min_seen: int = 1,
) -> torch.Tensor:
    """(1000,) bool: the classes that are the head's top class (at least `sure`) on at least `min_seen`
    training photos, and on photos with people more than `max_share` of the time. A class never top on a
    training photo is not among them: in a corpus of people's photos (Flickr8k: 7 in 10), a class seen
    only without them, or never, is evidence that the photo shows the thing, not somebody with it."""
    top_prob, top_class = concept_probs.float().max(dim=-1)
    sure_rows = top_prob >= sure
    seen = torch.bincount(top_class[sure_rows], minlength=concept_probs.shape[-1])
    people = torch.tensor(with_people, dtype=torch.bool, device=concept_probs.device)
    seen_with_people = torch.bincount(top_class[sure_rows & people], minlength=concept_probs.shape[-1])
    return (seen_with_people > max_share * seen) & (seen >= min_seen)


# A class is evidence of people when the head is sure of it (0.3, as `people_classes` counts a top class)
# on at least 3 training photos, most of which show people; the head sees people when such classes hold
# 0.3 of its probability. On Flickr8k val that flags 51% of the photos, 95% of them with people.
PEOPLE_EVIDENT_MIN_SEEN = 3
PEOPLE_EVIDENT_THRESHOLD = 0.3


def people_evident_classes(concept_probs: torch.Tensor, with_people: Sequence[bool], table) -> torch.Tensor:
    """(1000,) bool: the classes whose sight says people are there: top class on mostly people's training
    photos (ski, swing, cliff, at least `PEOPLE_EVIDENT_MIN_SEEN` of them) and ImageNet's own people."""
    mostly = people_classes(concept_probs, with_people, max_share=0.5, min_seen=PEOPLE_EVIDENT_MIN_SEEN)
    return mostly | named_people_classes(table)


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


def corpus_people_words(
    captions_per_photo: Sequence[Sequence[str]],
    wordnet: WordNet,
    followers: Collection[str],
    class_names: Collection[str] = (),
    seed: Sequence[str] = PEOPLE_WORDS,
    min_photos: int = 5,
    min_noun_use: float = 0.4,
    min_people_share: float = 0.7,
) -> tuple[str, ...]:
    """`seed` and the words the captions use for people, most frequent first: a caption word is one when
    - WordNet's most frequent noun sense of it (or of its singular: "hikers") is a kind of person;
    - at least `min_noun_use` of its uses are as a noun: followed by one of `followers` (subject_followers:
      "is", "in", "with", ...) or ending the caption; "white", "asian", "blond" are mostly adjectives;
    - at least `min_people_share` of the `min_photos` or more photos whose captions say it show people
      (shows_people with `seed`): "german" shepherds, "boxer" dogs and "tiger" are kept out that way;
    - it is none of `class_names` (the concept table's names): "monitor" or "pitcher" is the head's to judge,
      and a word the rule bans must never be one guidance puts in.
    Singular forms are returned; the ban covers plurals (word_forms)."""
    photo_counts: Counter[str] = Counter()
    people_counts: Counter[str] = Counter()
    uses: Counter[str] = Counter()
    noun_uses: Counter[str] = Counter()
    singulars: dict[str, str | None] = {}
    for captions in captions_per_photo:
        in_photo = set()
        for caption in captions:
            words = tokens(caption)
            for i, word in enumerate(words):
                if word not in singulars:
                    singulars[word] = _person_noun(word, wordnet)
                lemma = singulars[word]
                if lemma is None:
                    continue
                in_photo.add(lemma)
                uses[lemma] += 1
                noun_uses[lemma] += i + 1 == len(words) or words[i + 1] in followers
        photo_counts.update(in_photo)
        if shows_people(captions, seed):
            people_counts.update(in_photo)
    found = [
        lemma
        for lemma, photos in photo_counts.most_common()
        if photos >= min_photos
        and lemma not in class_names
        and noun_uses[lemma] >= min_noun_use * uses[lemma]
        and people_counts[lemma] >= min_people_share * photos
    ]
    return tuple(dict.fromkeys([*seed, *found]))


def _person_noun(word: str, wordnet: WordNet) -> str | None:
    """The singular of `word` when WordNet's first noun sense of it is a person ("hikers" -> "hiker")."""
    return _noun_under(word, wordnet.synset(PERSON), wordnet)


def corpus_kinds(
    word: str,
    captions_per_photo: Sequence[Sequence[str]],
    wordnet: WordNet,
    class_names: Collection[str] = (),
    min_photos: int = 5,
) -> tuple[str, ...]:
    """The words the captions use for kinds of `word` that none of `class_names` is, most frequent first: a
    caption word whose most frequent noun sense (or its singular's) is under `word`'s, said of at least
    `min_photos` photos. For "dog" on Flickr8k's training captions: "puppy", which the decoder says
    instead once "dog" is banned ("a brown and white puppy" for a red fox). Class names stay the head's to
    judge, and a word a rule bans must never be one guidance puts in. Singular forms (bans cover plurals)."""
    senses = wordnet.senses(word)
    if not senses:
        return ()
    kind_of, own = senses[0], set(word_forms(word))
    photos: Counter[str] = Counter()
    singulars: dict[str, str | None] = {}
    for captions in captions_per_photo:
        in_photo = set()
        for caption in captions:
            for token in tokens(caption):
                if token not in singulars:
                    singulars[token] = _noun_under(token, kind_of, wordnet)
                if singulars[token] is not None:
                    in_photo.add(singulars[token])
        photos.update(in_photo)
    return tuple(
        lemma
        for lemma, count in photos.most_common()
        if count >= min_photos and lemma not in own and lemma not in class_names
    )


def _noun_under(word: str, ancestor, wordnet: WordNet) -> str | None:
    """The singular of `word` when WordNet's first noun sense of it is under `ancestor`."""
    for lemma in _singulars(word):
        senses = wordnet.senses(lemma)
        if senses and word in word_forms(lemma) and wordnet.is_under(senses[0], ancestor):
            return lemma
    return None


def _singulars(word: str) -> list[str]:
    """Candidate singulars, the word itself first: word_forms then says which one really pluralises to it."""
    candidates = [word, word[:-1], word[:-2], word[:-3] + "y"]
    if word.endswith("men"):
        candidates.append(word[:-3] + "man")
    return [c for c in candidates if c]


# WordNet lexicographer files whose categories people name in captions: noun.animal, noun.food,
# noun.plant. Their taxonomies are deep and everyday names sit high in them ("reptile", "ape", "parrot");
# artifact categories are functional ("an obstruction", "a utensil", "a transducer")
GENERIC_LEX_FILES = (5, 13, 20)


def generic_words(
    table, wordnet: WordNet, lex_files: Collection[int] = GENERIC_LEX_FILES, min_classes: int = 2
) -> tuple[str, ...]:
    """The hypernyms the naming rule may fall back to (imcap.guidance, `generic_words`): the synonyms of the
    concept table that are no class's word and name at least `min_classes` classes, where
    - WordNet's most frequent sense of the name is a category of `lex_files` that all those classes are in
      (so "monitor", whose usual sense is the screen, never stands for a monitor lizard);
    - that sense is in everyday use: tagged in WordNet's texts, and the synset's most tagged name ("snake"
      rather than "serpent", "rattlesnake" rather than "rattler")."""
    covers: dict[str, list[int]] = {}
    for cls, synonyms in enumerate(table.synonyms):
        for name in synonyms:
            covers.setdefault(name, []).append(cls)
    words = set(table.words)
    found = []
    for name, classes in sorted(covers.items()):
        if name in words or len(classes) < min_classes:
            continue
        senses = wordnet.senses(name)
        if not senses or senses[0].lex_file not in lex_files:
            continue
        category = senses[0]
        tags = {lemma: wordnet.tag_count(category, lemma) for lemma in category.lemmas}
        if tags[name] < 1 or max(tags.values()) > tags[name]:
            continue
        if all(wordnet.is_under(wordnet.synset(table.wnids[cls]), category) for cls in classes):
            found.append(name)
    return tuple(found)


def living_verbs(
    captions: Iterable[str], verbs: Verbs, min_count: int = 20, min_progressive: float = 0.1
) -> tuple[str, ...]:
    """The -ing words of `captions` that only a living subject does, most frequent first: present
    participles ("swing" and "string" are not) seen at least `min_count` times, as verbs ("is/are playing"
    at least `min_progressive` of the time: "a building", "a railing", "a wedding" are nouns), whose usual
    WordNet meaning has no frame of THING_FRAMES ("play", "ride", "climb", "run", "eat"; but things sit,
    stand, hang, fly, float and roll)."""
    counts: Counter[str] = Counter()
    progressive: Counter[str] = Counter()
    for caption in captions:
        words = tokens(caption)
        for before, word in zip(["", *words], words, strict=False):
            if word.endswith("ing"):
                counts[word] += 1
                progressive[word] += before in ("is", "are")
    found = []
    # most frequent first, ties alphabetical: the same list whatever order the captions come in
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count < min_count:
            break
        lemma = verbs.lemma(word)
        frames = verbs.usual_frames(lemma) if lemma and lemma != word else frozenset()
        if frames and not frames & THING_FRAMES and progressive[word] >= min_progressive * count:
            found.append(word)
    return tuple(found)


def acting_classes(table, wordnet: WordNet) -> tuple[str, ...]:
    """The ImageNet ids of the table's classes that act: animals, people, and conveyances, which race,
    drive and carry their people ("a yellow car is racing on a dirt track"; a plant or a mushroom no more
    plays than a clock does)."""
    acting = [wordnet.synset(up) for up in (ANIMAL, PERSON, CONVEYANCE)]
    return tuple(
        wnid for wnid in table.wnids if any(wordnet.is_under(wordnet.synset(wnid), up) for up in acting)
    )


def ruled_out_limits(
    guide,
    probs: torch.Tensor,
    captions: Sequence[Sequence[str]],
    thresholds: Sequence[float],
    min_photos: int = 20,
    min_captions: int = 3,
    max_miss: float = 0.1,
) -> dict[str, float]:
    """Each name `ruled_out_subjects` admits at one of `thresholds`, with the highest that admits it (a miss
    at a threshold is one at every higher threshold, so a name admitted high is admitted lower down): on
    Flickr8k's training photos "bird" at 0.05, "car" and "boat" at 0.02. The captions are read and the
    head's plans made once for all the thresholds."""
    said: dict[str, list[int]] = {}
    for photo, photo_captions in enumerate(captions):
        counts = Counter(name for caption in photo_captions for name in guide.names_in(caption))
        for name, count in counts.items():
            if count >= min_captions:
                said.setdefault(name, []).append(photo)
    word_probs = guide.word_probabilities(probs)
    unsure = torch.tensor([guide.sure_word(plan) is None for plan in guide.plans(probs)])
    column = {word: i for i, word in enumerate(guide.words)}
    limits: dict[str, float] = {}
    for name, photos in sorted(said.items()):
        if len(photos) < min_photos:
            continue
        columns = [column[word] for word in guide.words_named(name)]
        best = word_probs[photos][:, columns].max(dim=1).values
        for threshold in sorted(thresholds):
            rewritten = (best < threshold) & unsure[photos]
            if float(rewritten.float().mean()) <= max_miss:
                limits[name] = threshold
    return limits


def ruled_out_subjects(
    guide,
    probs: torch.Tensor,
    captions: Sequence[Sequence[str]],
    threshold: float,
    min_photos: int = 20,
    min_captions: int = 3,
    max_miss: float = 0.1,
) -> tuple[str, ...]:
    """The names (imcap.guidance.Guide.names_in) whose table words all falling below `threshold` rules them
    out: of the photos where at least `min_captions` of the captions say the name (its main subject, not a
    car in the background; at least `min_photos` such photos), at most `max_miss` are photos the rule would
    rewrite, where the head gives all the name's table words less than `threshold` *and* is sure of
    nothing (`guide`'s settings: the best-guess rule waits for that). `probs` are the head's (N, 1000)
    probabilities for the photos whose `captions` these are. On Flickr8k's training photos at 0.05:
    "bird" qualifies (8 of 33 photos below, 5 of them beside a sure word such as the dog carrying the
    bird: 3 of 33 count), "horse" does not (20 of 52 below 0.01 with nothing sure: the show jumpers)."""
    limits = ruled_out_limits(guide, probs, captions, [threshold], min_photos, min_captions, max_miss)
    return tuple(limits)
