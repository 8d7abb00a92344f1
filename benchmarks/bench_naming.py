"""Do captions name what is in the photo? One photo per ImageNet class, scored against WordNet.

    python benchmarks/bench_naming.py --data ../shared/datasets/imagenet-sample --limit 200 --json out.json
    python benchmarks/bench_naming.py --data ../shared/datasets/imagenet-sample --no-guide   # unguided

Every photo of the sample (`labels.tsv`: file, index, wnid, name) is captioned with the model and default
`CaptionOptions()` (`guide=False` with --no-guide). The scores come from WordNet 3.0 directly rather than
from the shipped concept table (imcap.concepts), so the benchmark does not grade the table by itself:

- named: the caption contains, as whole words (plural too, `imcap.concepts.mentions`), a lemma of the
  class's synset or of a hypernym, walking up until one of GENERIC (printed with the results): a "tabby"
  is named by "tabby", "cat" or "feline", not by "animal".
- dog on non-dog: of the classes whose synset is not under WordNet's `dog, domestic dog, Canis
  familiaris`, the share whose caption says dog(s) or puppy/puppies: the Flickr8k-trained model's habit.

- other objects (a CHAIR-style proxy for hallucination, Rohrbach et al. 2018): the share of captions that
  name an object of COCO's 80 categories (OBJECT_WORDS, people left out) that is not the class or a
  hypernym of it. A photo of one ImageNet class rarely shows a second such object, so this counts mostly
  invented ones ("a coffee cup on a boat").
- people on non-person classes: of the classes whose synset is not under WordNet's `person`, the share
  whose caption says a person (man, woman, people, girl, ...). Photos of things often show someone too, so
  this is not all invention; it compares models on the same photos (a Flickr8k-trained decoder likes to
  add "a man" or "a little girl" after the object: "a carbonara is playing with a little girl"). A second
  share counts a wider list of people words (PEOPLE_WORDS_WIDE: "hikers", "spectators", ...).
- things acting alive: of the classes that are neither animals nor people (WordNet), the share whose
  caption has the class as its subject (the words before the first "is"/"are" name it) doing what only
  living things do (LIVING_ACTS, the word after "is"/"are": "a clock is playing with a toy", "a broom is
  climbing a rock"). A fixed list, wider than the verbs guidance fits (imcap.guidance_fit.living_verbs),
  so that the measure does not move with the rule.

It prints the shares with their counts, the model, settings, machine and time, then every miss
(`wnid  label  ->  caption`); --json writes the same plus one row per photo. The exit status is 0.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imcap.batch import caption_batches
from imcap.captioner import Captioner
from imcap.concepts import mentions, tokens
from imcap.generation import CaptionOptions
from imcap.guidance import Guide
from imcap.wordnet import Synset, WordNet, read_noun_synsets

REPO = Path(__file__).resolve().parents[1]
DOG = "n02084071"  # dog, domestic dog, Canis familiaris
DOG_WORDS = ("dog", "puppy")  # and their plurals
PERSON = "n00007846"  # person, individual, someone, somebody, mortal, soul
PEOPLE_WORDS = (
    "man", "men", "woman", "women", "person", "people", "boy", "girl", "child", "children", "kid", "lady",
    "ladies", "guy", "player", "baby", "toddler", "crowd", "skier", "snowboarder", "surfer", "swimmer",
)  # fmt: skip
# the same with the other words Flickr8k's captions use most for people (so a model that swaps "man" for
# "hiker" gets no credit); a fixed list too, kept apart from the one guidance fits (imcap.guidance_fit)
PEOPLE_WORDS_WIDE = (
    *PEOPLE_WORDS, "biker", "climber", "rider", "skateboarder", "dancer", "diver", "athlete", "adult",
    "someone", "hiker", "cyclist", "bicyclist", "teenager", "spectator", "onlooker", "runner", "skater",
    "tourist", "worker", "soldier", "student", "musician", "singer", "family", "friend", "crowd of people",
)  # fmt: skip
ANIMAL = "n00015388"  # animal, animate being, beast, brute, creature, fauna
LIVING_ACTS = (
    "playing", "running", "jumping", "climbing", "swimming", "walking", "riding", "eating", "smiling",
    "looking", "wearing", "posing", "chasing", "catching", "biting", "digging", "dancing", "laughing",
    "sleeping", "drinking", "watching", "waiting", "hiking", "skiing", "surfing", "fighting", "doing",
    "performing", "throwing", "kicking", "sniffing", "barking", "licking", "swinging", "skateboarding",
)  # fmt: skip
# COCO's object categories as a caption says them (people left out: hard to rule out in any photo)
OBJECT_WORDS = (
    "bicycle", "bike", "car", "motorcycle", "airplane", "plane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "sofa", "potted plant", "bed", "dining table", "table", "toilet", "tv",
    "television", "laptop", "mouse", "remote", "keyboard", "cell phone", "phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip
# Synsets too general to count as naming the class: the walk up the hypernyms stops at them. Kept here,
# apart from the concept table's own list, so that the benchmark does not share the table's choices.
GENERIC = {
    "n00001740": "entity",
    "n00001930": "physical entity",
    "n00002137": "abstraction",
    "n00002684": "object",
    "n00003553": "whole",
    "n00004258": "living thing",
    "n00004475": "organism",
    "n00007347": "causal agent",
    "n00007846": "person",
    "n00015388": "animal",
    "n01466257": "chordate",
    "n01471682": "vertebrate",
    "n01861778": "mammal",
    "n01886756": "placental",
    "n01905661": "invertebrate",
    "n00019128": "natural object",
    "n00020827": "matter",
    "n00019613": "substance (physical matter)",
    "n00020090": "substance (a kind of matter)",
    "n00021265": "food, nutrient",
    "n07555863": "food, solid food",
    "n00021939": "artifact",
    "n03575240": "instrumentality",
    "n03183080": "device",
    "n03094503": "container",
    "n03122748": "covering",
    "n04341686": "structure",
    "n03076708": "commodity",
    "n03294048": "equipment",
    "n03563967": "implement",
}


@dataclass
class Photo:
    file: str  # relative to the images/ folder
    index: int  # ImageNet-1k class index
    wnid: str
    label: str


@dataclass
class Row:
    file: str
    index: int
    wnid: str
    label: str
    caption: str | None  # None when the image could not be read
    named: bool
    dog_class: bool  # the class is a dog (under WordNet's dog synset)
    says_dog: bool
    other_objects: list[str]  # COCO object words the caption names that are not the class
    person_class: bool = False  # the class is a kind of person (groom, scuba diver, ballplayer)
    says_person: bool = False
    says_person_wide: bool = False  # PEOPLE_WORDS_WIDE
    lifeless_class: bool = False  # neither an animal nor a person
    acts_alive: bool = False  # the caption's subject names the class and does one of LIVING_ACTS


def read_photos(data: Path, limit: int | None) -> list[Photo]:
    """The sample's photos in class-index order, the first `limit` of them."""
    with (data / "labels.tsv").open(encoding="utf-8", newline="") as file:
        rows = [
            Photo(r["file"], int(r["index"]), r["wnid"], r["name"])
            for r in csv.DictReader(file, delimiter="\t")
        ]
    return sorted(rows, key=lambda photo: photo.index)[:limit]


def naming_words(wordnet: WordNet, wnid: str) -> list[str]:
    """The lemmas that name the class: its synset's and its hypernyms' up to GENERIC, nearest first."""
    synset = wordnet.synset(wnid)
    generic = _generic_and_above(wordnet, synset)
    return [
        lemma
        for found, _ in wordnet.ancestors(synset)
        if found.offset not in generic
        for lemma in found.lemmas
    ]


def _generic_and_above(wordnet: WordNet, synset: Synset) -> set[int]:
    return {
        above.offset
        for found, _ in wordnet.ancestors(synset)
        if found.wnid in GENERIC
        for above, _ in wordnet.ancestors(found)
    }


def is_dog(wordnet: WordNet, wnid: str) -> bool:
    return wordnet.is_under(wordnet.synset(wnid), wordnet.synset(DOG))


def is_person(wordnet: WordNet, wnid: str) -> bool:
    return wordnet.is_under(wordnet.synset(wnid), wordnet.synset(PERSON))


def is_lifeless(wordnet: WordNet, wnid: str) -> bool:
    synset = wordnet.synset(wnid)
    return not any(wordnet.is_under(synset, wordnet.synset(up)) for up in (ANIMAL, PERSON))


def acts_alive(caption: str, words: list[str]) -> bool:
    """The caption's subject (before its first "is"/"are") names the class and does one of LIVING_ACTS."""
    tokens_ = tokens(caption)
    verb_at = next((i for i, word in enumerate(tokens_) if word in ("is", "are")), None)
    if verb_at is None or verb_at + 1 >= len(tokens_):
        return False
    return tokens_[verb_at + 1] in LIVING_ACTS and mentions(" ".join(tokens_[:verb_at]), words)


def score(
    photo: Photo,
    caption: str | None,
    words: list[str],
    dog_class: bool,
    person_class: bool = False,
    lifeless_class: bool = False,
) -> Row:
    """One photo's scores: does the caption name the class, does it say dog, a person, other objects, does
    a lifeless thing act alive."""
    text = caption or ""
    return Row(
        **asdict(photo),
        caption=caption,
        named=mentions(text, words),
        dog_class=dog_class,
        says_dog=mentions(text, DOG_WORDS),
        other_objects=[w for w in OBJECT_WORDS if mentions(text, (w,)) and not mentions(w, words)],
        person_class=person_class,
        says_person=mentions(text, PEOPLE_WORDS),
        says_person_wide=mentions(text, PEOPLE_WORDS_WIDE),
        lifeless_class=lifeless_class,
        acts_alive=lifeless_class and acts_alive(text, words),
    )


def summarize(rows: list[Row]) -> dict:
    """The shares and their counts (unreadable photos count as misses)."""
    others = [row for row in rows if not row.dog_class]
    things = [row for row in rows if not row.person_class]
    people_on_things = sum(row.says_person for row in things)
    people_wide = sum(row.says_person_wide for row in things)
    named = sum(row.named for row in rows)
    dog_on_others = sum(row.says_dog for row in others)
    lifeless = [row for row in rows if row.lifeless_class]
    alive = sum(row.acts_alive for row in lifeless)
    return {
        "photos": len(rows),
        "failed": sum(row.caption is None for row in rows),
        "named": named,
        "named_share": named / len(rows) if rows else 0.0,
        "non_dog_classes": len(others),
        "dog_on_non_dog": dog_on_others,
        "dog_on_non_dog_share": dog_on_others / len(others) if others else 0.0,
        "other_objects": sum(bool(row.other_objects) for row in rows),
        "other_objects_share": sum(bool(row.other_objects) for row in rows) / len(rows) if rows else 0.0,
        "non_person_classes": len(things),
        "people_on_non_person": people_on_things,
        "people_on_non_person_share": people_on_things / len(things) if things else 0.0,
        "people_wide_on_non_person": people_wide,
        "people_wide_on_non_person_share": people_wide / len(things) if things else 0.0,
        "lifeless_classes": len(lifeless),
        "acting_alive": alive,
        "acting_alive_share": alive / len(lifeless) if lifeless else 0.0,
    }


def caption_photos(
    captioner: Captioner, paths: list[Path], options: CaptionOptions, batch_size: int
) -> dict[Path, str]:
    """Path -> caption for every photo that could be read."""
    captions = {}
    for batch in caption_batches(captioner, paths, options, batch_size):
        captions.update(
            {path: result.caption for path, result in zip(batch.paths, batch.results, strict=True)}
        )
    return captions


def machine() -> str:
    """Where it ran: CPU, cores, torch threads and versions."""
    omp = os.environ.get("OMP_NUM_THREADS", "-")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={omp}), "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def report(result: dict) -> str:
    """The printed summary: scores, settings, then the misses."""
    s = result["summary"]
    lines = [
        f"model: {result['model']}",
        f"options: {json.dumps(result['options'])}",
        f"guidance: {json.dumps(result['guidance'])}",
        f"machine: {result['machine']}",
        f"photos: {s['photos']} ({s['failed']} unreadable), {result['seconds']:.1f} s captioning",
        f"named: {s['named_share']:.1%} ({s['named']}/{s['photos']})",
        f"dog on non-dog: {s['dog_on_non_dog_share']:.1%} ({s['dog_on_non_dog']}/{s['non_dog_classes']})",
        f"other objects: {s['other_objects_share']:.1%} ({s['other_objects']}/{s['photos']})",
        f"people on non-person classes: {s['people_on_non_person_share']:.1%} "
        f"({s['people_on_non_person']}/{s['non_person_classes']})",
        f"people on non-person classes, wider word list: {s['people_wide_on_non_person_share']:.1%} "
        f"({s['people_wide_on_non_person']}/{s['non_person_classes']})",
        f"things acting alive: {s['acting_alive_share']:.1%} ({s['acting_alive']}/{s['lifeless_classes']})",
        f"generic (not counted as naming): {', '.join(GENERIC.values())}",
        f"misses ({len(result['misses'])}):",
    ]
    lines += [f"  {m['wnid']}  {m['label']}  ->  {m['caption']}" for m in result["misses"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "imagenet-sample")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    parser.add_argument("--limit", type=int, default=None, help="the first N classes only")
    parser.add_argument("--json", type=Path, default=None, help="write results and per-photo rows here")
    parser.add_argument("--no-guide", action="store_true", help="decode without concept guidance")
    parser.add_argument(
        "--placement", choices=("start", "anywhere"), help="override the model's guidance placement"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wordnet = read_noun_synsets()
    photos = read_photos(args.data, args.limit)
    captioner = Captioner.from_pretrained(args.model)
    if args.placement and captioner.guide is not None:
        settings = dataclasses.replace(captioner.guide.settings, placement=args.placement)
        captioner.guide = Guide(captioner.guide.table, settings, captioner.loaded.tokenizer)
    options = CaptionOptions(guide=not args.no_guide)
    paths = [args.data / "images" / photo.file for photo in photos]
    started = time.monotonic()
    captions = caption_photos(captioner, paths, options, args.batch_size)
    seconds = time.monotonic() - started
    rows = [
        score(
            photo,
            captions.get(path),
            naming_words(wordnet, photo.wnid),
            dog_class=is_dog(wordnet, photo.wnid),
            person_class=is_person(wordnet, photo.wnid),
            lifeless_class=is_lifeless(wordnet, photo.wnid),
        )
        for photo, path in zip(photos, paths, strict=True)
    ]
    result = {
        "model": captioner.name,
        "options": captioner.resolved(options).to_dict(),  # the settings that ran, the model's filled in
        "guidance": dataclasses.asdict(captioner.guide.settings) if captioner.guide else None,
        "data": str(args.data),
        "machine": machine(),
        "seconds": seconds,
        "generic": GENERIC,
        "summary": summarize(rows),
        "misses": [asdict(row) for row in rows if not row.named],
        "rows": [asdict(row) for row in rows],
    }
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
