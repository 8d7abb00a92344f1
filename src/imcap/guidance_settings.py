"""The thresholds and word lists of guided decoding (imcap.guidance), as a model folder saves them
(`guidance.json`): what each rule reads, chosen on Flickr8k val by `scripts/choose_guidance.py` and fitted
to the training captions by imcap.guidance_fit. Kept apart from the rules so that loading a model folder
reads them without building a guide.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GUIDANCE_FILE = "guidance.json"
PLACEMENTS = ("start", "anywhere")


@dataclass(frozen=True)
class GuidanceSettings:
    """The thresholds and word lists of imcap.guidance's rules; saved in a model folder as guidance.json."""

    name_threshold: float = 0.5
    ban_threshold: float = 0.0  # 0 bans nothing
    ban_words: tuple[str, ...] = ()
    # where the named word goes: "start" makes it the caption's subject ("a cat ..."), the decoder writing
    # the rest; "anywhere" lets constrained beam search place it
    placement: str = "start"
    # in a caption guidance rewrites, also rule out every concept word below this probability (words the
    # decoder would otherwise bring from Flickr8k: "on a boat" beside a coffee cup); 0: off
    guard_threshold: float = 0.0
    # words the naming rule never forces: on the Flickr8k training photos where the head is sure of them,
    # people's captions rarely say them ("swimming trunks", "seashore": they say "in the water", "beach")
    unsaid_words: tuple[str, ...] = ()
    # words a rewritten caption may never use: the head has no class for people, and after a forced subject
    # the decoder tends to add Flickr8k's people ("a carbonara is playing with a little girl")
    rewrite_ban_words: tuple[str, ...] = ()
    # with placement "start": the only words that may follow the forced subject ("a zebra is ...", "a zebra
    # in ..."), those people's captions put after theirs (`subject_followers`); without it the decoder
    # makes the named thing a modifier ("a zebra old man is sitting on a tree"). Empty: off
    subject_followers: tuple[str, ...] = ()
    # the head has no class for people, so Flickr8k's habit of putting people in every photo goes
    # unchecked: `people_words` are ruled out of an image's caption when the head gives at least
    # `no_people_threshold` of its probability to classes other than `people_classes` (the ImageNet ids
    # of classes the training photos show with people: ski, swing, mountain bike; imcap.guidance_fit)
    people_words: tuple[str, ...] = ()
    people_classes: tuple[str, ...] = ()
    no_people_threshold: float = 0.0  # 0: off
    # hypernyms the naming rule falls back to when no table word is sure (imcap.guidance_fit.generic_words:
    # everyday names of animal, plant and food categories, "reptile", "ape", "parrot"). Empty: off
    generic_words: tuple[str, ...] = ()
    # what only living things do ("playing", "climbing", "eating": imcap.guidance_fit.living_verbs) and the
    # classes that act (animals, people, vehicles: imcap.guidance_fit.acting_classes): a sure subject that
    # does not act may not do these. Empty: off
    living_verbs: tuple[str, ...] = ()
    acting_classes: tuple[str, ...] = ()
    # where people show (the head gives at least `people_evident_threshold` to `people_evident_classes`:
    # classes the training photos mostly show with people, ski, swing, cliff, and ImageNet's own people),
    # a thing that does not act is placed anywhere ("a man is climbing a cliff"); elsewhere it is the
    # subject with the living verbs banned, so no people are invented for it ("a street sign is standing
    # on a street", not "a group of people are standing on a street sign"). 0: never anywhere
    people_evident_classes: tuple[str, ...] = ()
    people_evident_threshold: float = 0.0
    # a subject the head rules out: when nothing reaches `name_threshold` and the caption's subject is a
    # table word the head gives less than `ruled_out_threshold` ("a bird" for red wine, the bird words at
    # 0.013), the caption is decoded again about the head's best guess instead, if that reaches
    # `fallback_threshold`: a guess may be wrong, the subject it replaces almost surely is. 0: off
    fallback_threshold: float = 0.0
    ruled_out_threshold: float = 0.01
    # the only subjects a low probability rules out: names the head rarely misses, with nothing else sure,
    # on the training photos most of whose captions say them (imcap.guidance_fit.ruled_out_subjects:
    # "bird"; not "horse", which ImageNet knows only as a sorrel, so show jumpers got 0.001 and became "a
    # dog"). Empty: none
    ruled_out_subjects: tuple[str, ...] = ()
    # each subject's own threshold where it has one (the highest at which it qualifies: "car" 0.02,
    # "bird" 0.05); the others take `ruled_out_threshold`
    ruled_out_thresholds: dict[str, float] = field(default_factory=dict)
    # per ban word, the caption words for kinds of it that no class names, banned with it ("dog": "puppy",
    # which the decoder says instead once "dog" is banned; imcap.guidance_fit.corpus_kinds)
    ban_kinds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chosen_on: str = ""  # how the thresholds were picked (the data and command), for the record

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"guidance placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}"
            )

    @classmethod
    def load(cls, folder: str | Path) -> GuidanceSettings | None:
        path = Path(folder) / GUIDANCE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        keys = (
            "ban_words",
            "unsaid_words",
            "rewrite_ban_words",
            "subject_followers",
            "people_words",
            "people_classes",
            "generic_words",
            "living_verbs",
            "acting_classes",
            "people_evident_classes",
            "ruled_out_subjects",
        )
        lists = {key: tuple(raw.get(key, ())) for key in keys}
        kinds = {word: tuple(names) for word, names in raw.get("ban_kinds", {}).items()}
        return cls(**{**raw, **lists, "ban_kinds": kinds})

    def save(self, folder: str | Path) -> None:
        (Path(folder) / GUIDANCE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")
