"""Build src/imcap/imagenet_concepts.json: each ImageNet-1k class -> the words a caption would use for it.

    python scripts/build_concept_table.py            # rewrites the shipped table, prints a report
    python scripts/build_concept_table.py --check    # exit 1 if the shipped table differs from a rebuild

Inputs: WordNet 3.0 (`apt-get install wordnet-base`, read by `imcap.wordnet`), the ImageNet class list
(`labels.tsv` of the shared ImageNet sample: index, wnid) and the Flickr8k *train* captions. Per class:

- `label`: the synset's first lemma as WordNet writes it ("Siberian husky", "tabby").
- `synonyms`: the lemmas of the synset and of its hypernyms, walking up until a GENERIC synset
  ("animal", "device", "food", "furniture"...: true of the class, but true of hundreds of others), less
  the lemmas that nearly always mean something else (`misleading`: "mouse" for the computer mouse).
- `word`: "the hypernym captions actually say". Walking up from the class (`choose_level`): the nearest
  synset whose names are common (in the captions and in WordNet's sense-tagged texts), then higher while
  a more general one is used ten times as often ("dog" for every breed, "cat" for "tabby", but "clock"
  for "analog clock", "coffee" for "espresso"); artifacts climb at most one step, food two. Then the
  synset's name the captions use most, or WordNet's first, shortened to its head when the synset has it
  (`choose_name`: "hamburger" -> "burger", "airplane" -> "plane").

Only counts in a lemma's usual meaning count: captions' "kite" is the toy, so it is no evidence for the
bird. The output is deterministic (same inputs, same bytes), one class per line so a diff reads per class.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imcap.concepts import DEFAULT_TABLE, tokens, word_forms
from imcap.data import load_records
from imcap.wordnet import WORDNET_DIR, Synset, WordNet, read_noun_synsets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
OUTPUT = REPO / "src" / "imcap" / "imagenet_concepts.json"

# Synsets too general to name a class: the walk up the hypernyms stops at them (they and everything above
# them are left out of `synonyms`, so never chosen as `word`). Three kinds:
# - abstract categories and taxonomic ranks nobody says in a caption ("whole", "chordate", "placental");
# - words so broad that "an animal" or "a device" says nothing about which of hundreds of classes is
#   shown, while matching the captions of all of them;
# - superordinate categories (Rosch's "furniture", "vehicle", "fruit", "tool"...): people name the thing
#   itself ("a banana", "a wardrobe", "a screwdriver"), and with these in the table a banana would
#   become "fruit" because the captions say "fruit" more often than "banana".
GENERIC = {
    # abstract categories
    "n00001740": "entity",
    "n00001930": "physical entity",
    "n00002137": "abstraction",
    "n00002684": "object",
    "n00003553": "whole",
    "n00019128": "natural object",
    "n00019613": "substance (physical matter)",
    "n00020090": "substance",
    "n14580597": "substance (material of a kind)",
    "n14580897": "material, stuff",
    "n09190918": "agent (an active cause)",
    "n03248958": "drug of abuse, street drug (what WordNet files alcohol under)",
    "n00020827": "matter",
    "n00021939": "artifact",
    "n00031921": "relation",
    "n03892891": "part, portion (of an artifact)",
    "n13809207": "part, portion, component",
    "n15046900": "solid",
    # living things too broad to name anything, and taxonomic ranks
    "n00004258": "living thing",
    "n00004475": "organism, being",
    "n00007347": "causal agent",
    "n00007846": "person, individual, someone",
    "n00015388": "animal, creature, beast",
    "n01317541": "domestic animal (a role, not a kind: dogs, cats, horses, ...)",
    "n01466257": "chordate",
    "n01471682": "vertebrate",
    "n01473806": "aquatic vertebrate",
    "n01861778": "mammal",
    "n01886756": "placental",
    "n01905661": "invertebrate",
    "n11675842": "reproductive structure",
    "n13086908": "plant part",
    "n13087625": "plant organ",
    # broad artifact categories
    "n03076708": "commodity, good",
    "n03093574": "consumer goods",
    "n03257877": "durables",
    "n03094503": "container",
    "n04531098": "vessel (a container)",
    "n03122748": "covering",
    "n04014297": "protective covering",
    "n03183080": "device",
    "n03277771": "electronic device",
    "n03278248": "electronic equipment",
    "n02727825": "apparatus",
    "n03294048": "equipment",
    "n03414162": "game equipment",
    "n04285146": "sports equipment",
    "n03563967": "implement",
    "n03575240": "instrumentality",
    "n03736970": "mechanical device",
    "n03738472": "mechanism",
    "n09349797": "mechanism (natural)",
    "n04341686": "structure, construction",
    "n03297735": "establishment",
    "n03953020": "place of business",
    "n09287968": "geological formation",
    # food in general
    "n00021265": "food, nutrient",
    "n07555863": "food, solid food",
    "n07566340": "foodstuff",
    "n07570720": "nutriment",
    "n07557434": "dish (a course of a meal)",
    # superordinates
    "n03100490": "conveyance, transport",
    "n04524313": "vehicle",
    "n04576211": "wheeled vehicle",
    "n04170037": "self-propelled vehicle",
    "n03791235": "motor vehicle",
    "n04377057": "system",
    "n03051540": "clothing",
    "n03419014": "garment",
    "n03405265": "furnishing",
    "n03405725": "furniture",
    "n02729837": "appliance",
    "n04451818": "tool",
    "n03489162": "hand tool",
    "n03699975": "machine",
    "n03574816": "instrument",
    "n03733925": "measuring instrument",
    "n03964744": "plaything, toy",
    "n04565375": "weapon",
    "n02913152": "building",
    "n07705711": "produce",
    "n13134947": "fruit",
    "n07705931": "edible fruit",
    "n07707451": "vegetable",
}

MIN_COMMON = 3  # a word used this often (captions + WordNet's tagged texts) is a common word
DOMINANCE = 10  # a more general word used 10x as often as the chosen one is what captions say instead
STEP_COST = 3  # without common words: one step more general must be used 3x as often to be preferred
MISLEADING_SHARE = 0.1  # a lemma whose sense here has under 10% of its tagged uses means something else...
MISLEADING_EVIDENCE = 3  # ...provided the lemma was tagged at least this often at all

# ImageNet classes whose WordNet synset is not what their photos show: their words come from the sense
# the photos do show (the label stays ImageNet's).
PHOTO_SENSE = {
    "n07930864": "n03147509",  # cup: WordNet's "a punch served in a pitcher"; the photos show cups and mugs
    "n12144580": "n07731952",  # corn: "dried grains used as animal feed"; the photos show ears of corn
    "n13133613": "n07731952",  # ear, spike, capitulum ("of a cereal plant"): the photos show ears of corn
}

# How far up the hypernyms a class's `word` may come from, by WordNet lexicographer file (`synonyms` go
# up to GENERIC regardless). Taxonomies of living things are deep and their everyday names sit high
# ("tench" -> cyprinid -> ... -> "fish", six steps up); artifact categories are shallow and functional:
# two steps up, a "slide rule" is a "computer", a "spider web" a "trap", a "television" a "system".
MAX_STEPS_UP = {5: math.inf, 20: math.inf, 13: 2}  # noun.animal, noun.plant: no limit; noun.food: 2
DEFAULT_STEPS_UP = 1  # artifacts, people, places...
MAX_NGRAM = 5  # the longest phrase counted in the captions (longer lemmas count 0)
SOURCE = (
    "scripts/build_concept_table.py: WordNet 3.0 noun synsets (lemmas of each class and its hypernyms up "
    "to a generic one) and the Flickr8k train captions (which of those words captions say)"
)


@dataclass(frozen=True)
class Name:
    """A lemma that could name the class, with how common it is."""

    lemma: str  # lowercase: "dog"
    order: int  # its place in the synset (WordNet lists the usual name first)
    usual: bool  # the synset is the lemma's main sense: a caption's "kite" is the toy, not the bird
    flickr: int  # Flickr8k train captions mentioning it, when `usual` (else 0)
    tags: int  # times WordNet's tagged texts used the lemma in this sense

    @property
    def common(self) -> int:
        """How much this lemma is used for the synset: not at all when it usually means something else."""
        return self.flickr + self.tags if self.usual else 0


@dataclass(frozen=True)
class Level:
    """The class's synset or one of its hypernyms, with its names."""

    synset: Synset
    distance: int  # hypernym steps from the class: 0 = the class's own synset
    names: tuple[Name, ...]

    @property
    def common(self) -> int:
        return sum(name.common for name in self.names)

    @property
    def flickr(self) -> int:
        return sum(name.flickr for name in self.names)


def caption_counts(captions: Iterable[str]) -> Counter:
    """Phrase (up to MAX_NGRAM words) -> number of captions containing it as whole words."""
    counts = Counter()
    for caption in captions:
        words = tokens(caption)
        counts.update(
            {
                " ".join(words[start : start + size])
                for size in range(1, MAX_NGRAM + 1)
                for start in range(len(words) - size + 1)
            }
        )
    return counts


def phrase_count(counts: Counter, lemma: str) -> int:
    """Captions containing the lemma or its plural."""
    return sum(counts[form] for form in word_forms(lemma))


def levels(wordnet: WordNet, synset: Synset, counts: Counter) -> list[Level]:
    """The synset and its hypernyms up to a GENERIC one, nearest first, each with its names that are not
    misleading (the class's own synset keeps all of them if none is left)."""
    found = []
    blocked = _generic_and_above(wordnet, synset)
    for ancestor, distance in wordnet.ancestors(synset):
        if ancestor.offset in blocked:
            continue
        lemmas = [lemma for lemma in ancestor.lemmas if not misleading(wordnet, ancestor, lemma)]
        if not lemmas and distance == 0:
            lemmas = list(ancestor.lemmas)
        names = tuple(_name(wordnet, ancestor, lemma, counts) for lemma in lemmas)
        if names:
            found.append(Level(ancestor, distance, names))
    return found


def _name(wordnet: WordNet, synset: Synset, lemma: str, counts: Counter) -> Name:
    usual = main_sense(wordnet, lemma) == synset
    return Name(
        lemma=lemma,
        order=synset.lemmas.index(lemma),
        usual=usual,
        flickr=phrase_count(counts, lemma) if usual else 0,
        tags=wordnet.tag_count(synset, lemma),
    )


def _generic_and_above(wordnet: WordNet, synset: Synset) -> set[int]:
    """The offsets of the synset's GENERIC hypernyms and of everything above them."""
    return {
        above.offset
        for found, _ in wordnet.ancestors(synset)
        if found.wnid in GENERIC
        for above, _ in wordnet.ancestors(found)
    }


def misleading(wordnet: WordNet, synset: Synset, lemma: str) -> bool:
    """True when the lemma nearly always means something else: "mouse" (the rodent, not the computer
    mouse), "head" (not a promontory), "toy" (a plaything, not a toy dog). A caption saying it is no
    evidence for this class."""
    total = sum(wordnet.tag_count(sense, lemma) for sense in wordnet.senses(lemma))
    return total >= MISLEADING_EVIDENCE and wordnet.tag_count(synset, lemma) < MISLEADING_SHARE * total


def main_sense(wordnet: WordNet, lemma: str) -> Synset | None:
    """The lemma's most frequent common-noun sense (WordNet lists senses most frequent first). Proper
    nouns are skipped: "burger" means the food, whatever Warren Burger's place in the list."""
    return next((sense for sense in wordnet.senses(lemma) if not _is_proper(sense, lemma)), None)


def _is_proper(synset: Synset, lemma: str) -> bool:
    return synset.names[synset.lemmas.index(lemma.lower())][:1].isupper()


def choose_level(found: Sequence[Level]) -> Level:
    """The synset whose word a caption would use ("prefer the hypernym captions actually say").

    1. The most specific common one: the nearest synset whose names are used at least MIN_COMMON times
       in the Flickr8k train captions and WordNet's tagged texts together.
    2. Then up the hypernyms while a more general one is used DOMINANCE times as often: captions say
       "dog", not "Siberian husky", "sled dog" or "German shepherd"; "cat", not "tabby".
    3. No common one: the best trade of use against generality, one step more general having to be
       used STEP_COST times as often; on ties the nearer.

    Hypernyms that no caption says are passed over.
    """
    # a hypernym must be something captions say: WordNet's tagged texts alone would turn a "cello" into a
    # "bowed stringed instrument"
    found = [level for level in found if level.distance == 0 or level.flickr > 0]
    common = [level for level in found if level.common >= MIN_COMMON]
    if not common:
        return min(found, key=lambda level: (-_fallback_score(level), level.distance))
    best = common[0]  # `found` is nearest first
    for general in common[1:]:
        if general.distance > best.distance and general.common >= DOMINANCE * best.common:
            best = general
    return best


def _fallback_score(level: Level) -> float:
    return math.log(1 + level.common) - math.log(STEP_COST) * level.distance


def choose_name(level: Level) -> str:
    """The synset's name captions use most (at least MIN_COMMON times), else WordNet's first; and a
    shorter usual name it ends with is how people say it: "hamburger" -> "burger", "airplane" -> "plane"."""
    chosen = min(level.names, key=lambda name: (-_caption_use(name), name.order)).lemma
    heads = [
        name.lemma
        for name in level.names
        if name.usual and name.lemma != chosen and chosen.endswith(name.lemma)
    ]
    return min(heads, key=len) if heads else chosen


def _caption_use(name: Name) -> int:
    return name.flickr if name.flickr >= MIN_COMMON else 0  # one or two captions are noise ("red hot")


def concept_row(wordnet: WordNet, index: int, wnid: str, counts: Counter) -> dict:
    synset = wordnet.synset(PHOTO_SENSE.get(wnid, wnid))
    found = levels(wordnet, synset, counts)
    limit = MAX_STEPS_UP.get(synset.lex_file, DEFAULT_STEPS_UP)
    return {
        "index": index,
        "wnid": wnid,
        "label": wordnet.synset(wnid).names[0],
        "word": choose_name(choose_level([level for level in found if level.distance <= limit])),
        "synonyms": sorted({name.lemma for level in found for name in level.names}),
    }


def build_table(wordnet: WordNet, wnids: Sequence[str], captions: Iterable[str]) -> dict:
    """The concept table for the classes `wnids` (in head order), from WordNet and caption texts."""
    counts = caption_counts(captions)
    return {
        "name": DEFAULT_TABLE,
        "source": SOURCE,
        "classes": [concept_row(wordnet, index, wnid, counts) for index, wnid in enumerate(wnids)],
    }


def table_json(table: dict) -> str:
    """The table as JSON text, one class per line, keys in a fixed order: the same table, the same bytes."""
    head = {key: value for key, value in table.items() if key != "classes"}
    rows = [json.dumps(row, ensure_ascii=False) for row in table["classes"]]
    header = json.dumps(head, ensure_ascii=False, indent=1)[:-2]  # open: the classes follow
    return header + ',\n "classes": [\n  ' + ",\n  ".join(rows) + "\n ]\n}\n"


def read_wnids(labels: Path) -> list[str]:
    """The ImageNet-1k WNIDs in head order, from the sample's labels.tsv (checked against sorted order)."""
    with labels.open(encoding="utf-8", newline="") as file:
        rows = sorted(csv.DictReader(file, delimiter="\t"), key=lambda row: int(row["index"]))
    wnids = [row["wnid"] for row in rows]
    if wnids != sorted(wnids) or len(wnids) != 1000:
        raise SystemExit(f"{labels}: expected the 1000 ImageNet-1k classes in sorted-WNID order")
    return wnids


def train_captions(flickr8k: Path) -> list[str]:
    return [
        caption
        for record in load_records(flickr8k, "train", check_images=False)
        for caption in record.captions
    ]


def report(table: dict, counts: Counter, sample: Sequence[str]) -> str:
    """How many classes get a word captions say, and some example rows."""
    rows = table["classes"]
    lines = [f"{len(rows)} classes, {len({row['word'] for row in rows})} distinct words"]
    for least in (1, 10, 100):
        seen = sum(phrase_count(counts, row["word"]) >= least for row in rows)
        lines.append(f"  word in >= {least:3d} Flickr8k train captions: {seen} classes")
    by_wnid = {row["wnid"]: row for row in rows}
    for wnid in sample:
        row = by_wnid[wnid]
        lines.append(
            f"  {wnid}  {row['label']:<28} -> {row['word']:<16} ({phrase_count(counts, row['word'])})"
        )
    return "\n".join(lines)


# shown by the report: the classes the table must get right, and a few others
SAMPLE = (  # noqa: SIM905 (a list of 30 quoted ids reads worse)
    "n01440764 n01443537 n01484850 n01614925 n02106662 n02110185 n02123045 n02123159 n02123394 n02124075 "
    "n02123597 n02389026 n02391049 n02504458 n02690373 n02708093 n03595614 n03773504 n03792782 n03793489 "
    "n04070727 n04146614 n04254680 n04266014 n04548280 n06874185 n07697313 n07697537 n07920052 n07930864"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR, help="WordNet 3.0 dict folder")
    parser.add_argument("--labels", type=Path, default=SHARED / "imagenet-sample" / "labels.tsv")
    parser.add_argument("--flickr8k", type=Path, default=SHARED / "flickr8k")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    captions = train_captions(args.flickr8k)
    table = build_table(read_noun_synsets(args.wordnet), read_wnids(args.labels), captions)
    text = table_json(table)
    print(report(table, caption_counts(captions), SAMPLE))
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a rebuild'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
