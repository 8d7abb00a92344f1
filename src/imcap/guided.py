"""Lexically constrained beam search: captions that must name given concepts.

Used to make a caption name what an image classifier is confident about ("zebra" or "zebras"), after
Anderson et al. 2017 (constrained beam search for guided captioning), Hokamp & Liu 2017 (grid beam search)
and Post & Vilar 2018 (dynamic beam allocation, DBA). transformers 5 has no constrained beam search, so
this module runs one on top of imcap's engine (same decoder call, caches and logits processors).

Per image, every step:
- candidates are the `width` best continuations of every beam, plus, for every beam, the next token of
  each phrase of each constraint it has not met yet (forced candidates: without them a phrase the model
  finds unlikely would never enter the beam);
- candidates are grouped in banks by how far they are through their constraints (2 per constraint met,
  +1 while inside a multi-token phrase) and the beam is filled round-robin from the fullest bank down,
  each bank's best first (deepest into a phrase, then highest score): so hypotheses that name more
  concepts survive next to more fluent ones that name fewer (DBA's even allocation, with the slots a
  bank can't use going to the others);
- end-of-text is masked for hypotheses with an unmet constraint, so finished captions satisfy them all;
  if none does by max_new_tokens, the hypotheses left at that point are returned, most constraints met
  first, so a caption is always returned;
- right after a phrase is completed, tokens that would carry its last word on (`word_continuations`, e.g.
  "ck" after " zebra": a word the model never learnt gets finished off as some word it knows) are masked.

Finished captions are ranked by score / length**length_penalty, as beam search ranks them. An image is
done once `width` finished captions meet every constraint and no open hypothesis that meets them all
could rank above the worst of them (see `_GuidedSearch._cannot_improve`); it then leaves the batch. All
images' hypotheses go through one decoder call per step.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from imcap.search import Bans, Decoded, Special, new_cache, next_log_probs

Phrase = tuple[int, ...]  # token ids of one surface form, e.g. tokenizer(" zebra") ids
Progress = Phrase | None  # per constraint: the phrase prefix matched so far, or None once it is met
State = tuple[Progress, ...]  # one hypothesis's progress on each constraint of its image

MAX_CONSTRAINTS = 3  # per image; the internal beam grows with their number
# The internal beam is width * (1 + constraints) hypotheses, width = max(num_beams, MIN_WIDTH): a beam's
# worth per constraint, as grid beam search keeps one per bank. Greedy requests get the minimum. On the
# shipped model and examples, width 3 gives the captions width 4 gives with 25% fewer decoder rows, and
# width 2 clearly worse ones ("a skier is skiing down a snow", "two sky smoke tower in the water").
MIN_WIDTH = 3
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Constraint:
    """Satisfied when any one of `phrases` appears contiguously in the generated tokens."""

    phrases: tuple[Phrase, ...]

    def __post_init__(self):
        phrases = tuple(tuple(int(t) for t in phrase) for phrase in self.phrases)
        if not phrases or not all(phrases):
            raise ValueError(f"a Constraint needs one or more non-empty phrases, got {self.phrases!r}")
        object.__setattr__(self, "phrases", phrases)  # lists in, hashable tuples kept


def constrained_beam_search(
    decoder,
    hidden: torch.Tensor,
    config: GenerationConfig,
    special: Special,
    processors,
    constraints: Sequence[Sequence[Constraint]],
    word_continuations: Collection[int] = (),
    bans: Bans | None = None,
) -> list[list[Decoded]]:
    """hidden (B, S, D) encoder states; constraints[b]: the constraints image b must satisfy (0..3 of them).
    Returns per image config.num_return_sequences `search.Decoded`s, best first, like
    search.BeamSearch.run(). word_continuations: ids of tokens that continue a word rather than start
    one (see `word_continuations`); they may not directly follow a completed phrase. Empty: no such rule.
    bans: what each image's captions may not contain (`search.Bans`), so that images with different
    banned words share one search.
    """
    if len(constraints) != hidden.shape[0]:
        raise ValueError(f"{len(constraints)} constraint lists for {hidden.shape[0]} images")
    if any(len(c) > MAX_CONSTRAINTS for c in constraints):
        raise ValueError(f"at most {MAX_CONSTRAINTS} constraints per image")
    eos = set(special.eos.tolist())
    if any(eos.intersection(p) for image in constraints for c in image for p in c.phrases):
        raise ValueError("a constraint's phrase holds the end-of-text token")
    search = _GuidedSearch(
        decoder, hidden, config, special, processors, constraints, word_continuations, bans
    )
    return search.run()


def word_continuations(tokenizer) -> frozenset[int]:
    """Ids of the tokens that carry on the word before them: those whose text does not start with a space
    (special tokens aside). Captions are lowercase words with a leading space each, so after a completed
    phrase such a token would turn " zebra" into " zebrack", " zebra(" or " zebra-s"."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if i not in special and not text[:1].isspace())


class _Matcher:
    """Matching of one Constraint's phrases against generated tokens, KMP-style: the progress kept is the
    longest suffix of the tokens that begins a phrase, so a token that breaks a partial phrase restarts
    matching from whatever suffix still fits (" ze"+" ze"+"bra" still meets " ze"+"bra")."""

    def __init__(self, constraint: Constraint):
        self.phrases = set(constraint.phrases)
        self.prefixes = {p[:i] for p in constraint.phrases for i in range(1, len(p))}
        self.tokens = {t for p in constraint.phrases for t in p}
        self.firsts = {p[0] for p in constraint.phrases}
        self.extending = {q[len(p)] for p in self.phrases for q in self.phrases if q[: len(p)] == p != q}
        self._steps: dict[tuple[Phrase, int], Progress] = {}
        self._forced: dict[Phrase, list[int]] = {}

    def step(self, matched: Phrase, token: int) -> Progress:
        """Progress after `token`: None when a phrase is now complete."""
        if token not in self.tokens:
            return ()
        key = (matched, token)
        if key not in self._steps:
            tokens = (*matched, token)
            suffixes = [tokens[i:] for i in range(len(tokens))]  # longest first
            if any(s in self.phrases for s in suffixes):
                self._steps[key] = None
            else:
                self._steps[key] = next((s for s in suffixes if s in self.prefixes), ())
        return self._steps[key]

    def forced(self, matched: Phrase) -> list[int]:
        """The tokens that continue the partial phrase, or start any phrase afresh."""
        if matched not in self._forced:
            n = len(matched)
            following = {p[n] for p in self.phrases if len(p) > n and p[:n] == matched}
            self._forced[matched] = sorted(following | self.firsts)
        return self._forced[matched]


@functools.lru_cache(maxsize=256)
def _matcher(constraint: Constraint) -> _Matcher:
    """One matcher per distinct constraint, kept across calls: its memoised steps are reused."""
    return _Matcher(constraint)


@dataclass
class _Finished:
    met: int  # constraints met: fewer than all only for the fallback at max_new_tokens
    penalised: float  # score / length**length_penalty, the ranking within `met`
    decoded: Decoded


class _Image:
    """One image's constraints, its beam size and its finished hypotheses (best first)."""

    def __init__(self, constraints: Sequence[Constraint], width: int, keep: int, continuations):
        self.matchers = [_matcher(c) for c in constraints]
        self.tokens = set().union(*(m.tokens for m in self.matchers))
        # masked after a completed phrase, but for a longer phrase's next token (" tab", then " tab"+"by")
        extending = {t for m in self.matchers for t in m.extending}
        self.run_ons = torch.tensor(sorted(set(continuations) - extending), dtype=torch.long)
        self.beams = width * (1 + len(self.matchers))
        self.keep = keep  # how many finished hypotheses to keep: the width, so the ranking has a choice
        self.finished: list[_Finished] = []

    def start(self) -> State:
        return tuple(() for _ in self.matchers)

    def advance(self, state: State, token: int) -> State:
        if token not in self.tokens:  # the common case: partial phrases are lost, met ones stay met
            return tuple(None if p is None else () for p in state)
        return tuple(
            None if p is None else m.step(p, token) for m, p in zip(self.matchers, state, strict=True)
        )

    def forced(self, state: State) -> list[int]:
        tokens = {t for m, p in zip(self.matchers, state, strict=True) if p is not None for t in m.forced(p)}
        return sorted(tokens)

    def offer(self, finished: _Finished) -> None:
        self.finished.append(finished)
        self.finished.sort(key=lambda f: (-f.met, -f.penalised))  # stable: earlier wins ties
        del self.finished[self.keep :]

    def is_full(self) -> bool:
        """Enough finished hypotheses that meet every constraint."""
        met_all = [f for f in self.finished if f.met == len(self.matchers)]
        return len(met_all) >= self.keep


def _met(state: State) -> int:
    return sum(p is None for p in state)


def _bank(state: State) -> int:
    """2 per constraint met, +1 while partway through a phrase (so a half-written " fire hydrant" is
    kept until its second word can follow)."""
    return 2 * _met(state) + any(p for p in state)


def _progress(state: State) -> int:
    """Tokens matched of unmet phrases: within a bank, deeper partial phrases go first, or fresh starts
    (" z", which cost one unlikely token) would crowd out " z"+"e"+"b" (which cost three) every step."""
    return sum(len(p) for p in state if p)


@dataclass
class _Candidate:
    """A hypothesis one token longer than the beam row it extends; the next step's rows are these."""

    score: float  # sum of the (processed) log-probs of its tokens; -inf for a padding row
    row: int  # the beam row it extends
    token: int
    state: State
    completed: bool = False  # `token` just completed a phrase


class _GuidedSearch:
    """The search over a batch. Row layout: image i owns a block of `beams` rows (one row before the first
    step) that keeps its size, so only the self-attention cache is reordered between steps, as in the
    engine; the cross-attention cache only when images leave."""

    def __init__(self, decoder, hidden, config, special, processors, constraints, word_continuations, bans):
        self.decoder, self.config, self.processors, self.bans = decoder, config, processors, bans
        self.eos, self.eos_ids = set(special.eos.tolist()), special.eos.to(hidden.device)
        self.width = max(config.num_beams, MIN_WIDTH)
        keep = max(self.width, config.num_return_sequences)
        self.images = [_Image(c, self.width, keep, word_continuations) for c in constraints]
        self.index = list(range(len(self.images)))  # original position of each image still decoding
        self.hidden, self.cache = hidden, new_cache(decoder)
        self.sequences = torch.full((len(hidden), 1), special.start, dtype=torch.long, device=hidden.device)
        self.rows = [_Candidate(0.0, i, special.start, image.start()) for i, image in enumerate(self.images)]
        self.owners = list(range(len(self.images)))  # the image (position in self.images) of each row
        self.blocks = [1] * len(self.images)  # rows per image: one before the first step, then its beams
        self.results: list[list[Decoded]] = [[] for _ in self.images]

    def run(self) -> list[list[Decoded]]:
        for length in range(1, self.config.max_new_tokens + 1):
            totals = self._totals()
            chosen, done = self._choose_all(totals, length, last=length == self.config.max_new_tokens)
            for i in (i for i, d in enumerate(done) if d):
                self._collect(i)
            if all(done):
                break
            self._advance(chosen, done)
        return self.results

    def _totals(self) -> torch.Tensor:
        """(rows, V) score of every continuation: the sum of log-probs so far plus the next token's."""
        log_probs = next_log_probs(self.decoder, self.sequences, self.hidden, self.cache)
        log_probs = self.processors(self.sequences, log_probs)
        if self.bans is not None:
            images = torch.tensor([self.index[owner] for owner in self.owners], device=log_probs.device)
            log_probs = self.bans.apply(self.sequences, log_probs, images)
        # end-of-text only once every constraint is met
        unmet = [r for r, row in enumerate(self.rows) if _met(row.state) < len(row.state)]
        unmet = torch.tensor(unmet, dtype=torch.long, device=log_probs.device)
        log_probs[unmet[:, None], self.eos_ids[None, :]] = _NEG_INF
        # a phrase just completed must not run on into a longer word (" zebra"+"ck")
        for r in (r for r, row in enumerate(self.rows) if row.completed):
            log_probs[r, self.images[self.owners[r]].run_ons.to(log_probs.device)] = _NEG_INF
        scores = torch.tensor([row.score for row in self.rows], device=log_probs.device)
        return log_probs + scores[:, None]

    def _choose_all(self, totals: torch.Tensor, length: int, last: bool):
        """Each image's next beam (a list of candidates) and whether it is done."""
        per_row = self._continuations(totals)
        chosen, done, start = [], [], 0
        for image, block in zip(self.images, self.blocks, strict=True):
            rows = range(start, start + block)
            candidates = self._candidates(image, rows, per_row)
            beam = self._fill(image, candidates, length, last)
            chosen.append(beam)
            done.append(last or not beam or self._cannot_improve(image, beam, length))
            start = rows.stop
        return chosen, done

    def _continuations(self, totals: torch.Tensor) -> list[dict[int, float]]:
        """Per row, token -> score of its candidates: its `width` best tokens and its forced ones."""
        top_scores, top_tokens = (t.tolist() for t in totals.topk(min(self.width, totals.shape[1])))
        per_row = [dict(zip(t, s, strict=True)) for t, s in zip(top_tokens, top_scores, strict=True)]
        forced = [
            (r, token)
            for r, row in enumerate(self.rows)
            if row.score != _NEG_INF  # not a padding row
            for token in self.images[self.owners[r]].forced(row.state)
        ]
        if forced:
            rows, tokens = [r for r, _ in forced], [t for _, t in forced]
            for (r, token), score in zip(forced, totals[rows, tokens].tolist(), strict=True):
                per_row[r][token] = score
        return per_row

    def _candidates(self, image: _Image, rows: range, per_row) -> list[_Candidate]:
        candidates = []
        for r in rows:
            state = self.rows[r].state
            for token, score in per_row[r].items():
                if score == _NEG_INF:  # banned by a processor, masked end-of-text, or a padding row
                    continue
                new = state if token in self.eos else image.advance(state, token)
                candidates.append(_Candidate(score, r, token, new, _met(new) > _met(state)))
        return candidates

    def _fill(self, image: _Image, candidates: list[_Candidate], length: int, last: bool) -> list[_Candidate]:
        """DBA: walk the banks round-robin, fullest bank first. Of the first `beams` candidates walked, those
        that stop are offered as finished; the beam is the first `beams` walked that go on (as transformers'
        beam search keeps the best K of 2K that did not finish)."""
        beam: list[_Candidate] = []
        for rank, candidate in enumerate(_round_robin(candidates)):
            if last or candidate.token in self.eos:
                if rank < image.beams:
                    image.offer(self._finished(candidate, length))
                elif last:
                    break
            else:
                beam.append(candidate)
                if len(beam) == image.beams:
                    break
        return beam

    def _finished(self, candidate: _Candidate, length: int) -> _Finished:
        tokens = [*self.sequences[candidate.row, 1:].tolist(), candidate.token]
        penalised = candidate.score / (length**self.config.length_penalty)
        return _Finished(_met(candidate.state), penalised, Decoded(tokens, candidate.score))

    def _cannot_improve(self, image: _Image, beam: list[_Candidate], length: int) -> bool:
        """Done when enough captions meet every constraint and no open hypothesis that meets them all can
        beat the worst of them (the engine's rule for early_stopping False/"never").

        Open hypotheses with a constraint unmet are left out: they can't finish until a forced phrase costs
        them, and counting them made captions run on to max_new_tokens for twice the time. Nor is
        early_stopping=True's "stop at num_beams finished" kept: the first captions to finish are forced
        words followed by end-of-text ("two dogs ball grass"), rarely the best.
        """
        if not image.is_full():
            return False
        met_all = [c.score for c in beam if _met(c.state) == len(image.matchers)]
        if not met_all:
            return True
        penalty = self.config.length_penalty
        never = self.config.early_stopping == "never" and penalty > 0
        best_open = max(met_all) / ((self.config.max_new_tokens if never else length) ** penalty)
        return best_open <= image.finished[-1].penalised

    def _collect(self, i: int) -> None:
        finished = self.images[i].finished[: self.config.num_return_sequences]
        self.results[self.index[i]] = [f.decoded for f in finished]

    def _advance(self, chosen: list[list[_Candidate]], done: list[bool]) -> None:
        """Move to the next step: each kept image's rows become its chosen candidates (padded with -inf
        copies up to its beam size, so its block of rows keeps its size); finished images leave."""
        kept = [i for i, d in enumerate(done) if not d]
        self.rows, self.owners = [], []
        for position, i in enumerate(kept):
            beam, beams = chosen[i], self.images[i].beams
            padding = _Candidate(_NEG_INF, beam[0].row, beam[0].token, beam[0].state)
            self.rows += beam + [padding] * (beams - len(beam))
            self.owners += [position] * beams
        sources = torch.tensor([row.row for row in self.rows], device=self.sequences.device)
        tokens = torch.tensor([row.token for row in self.rows], device=self.sequences.device)
        self.sequences = torch.cat([self.sequences[sources], tokens[:, None]], dim=1)
        first_step = self.blocks[0] == 1
        self.blocks = [self.images[i].beams for i in kept]
        if first_step or len(kept) < len(done):
            # rows change image (copied out from one per image, or images leaving): the cross-attention
            # cache and the encoder states follow
            self.cache.reorder_cache(sources)
            self.hidden = self.hidden[sources]
        else:
            self.cache.self_attention_cache.reorder_cache(sources)
        self.images = [self.images[i] for i in kept]
        self.index = [self.index[i] for i in kept]


def _round_robin(candidates: list[_Candidate]) -> list[_Candidate]:
    """Banks fullest first, each bank's best first (deepest into a phrase, then highest score; ties by row
    and token, so every run walks the same way), taking one from each bank in turn."""
    banks: dict[int, list[_Candidate]] = {}
    for c in candidates:
        banks.setdefault(_bank(c.state), []).append(c)
    ordered = [banks[b] for b in sorted(banks, reverse=True)]
    for bank in ordered:
        bank.sort(key=lambda c: (-_progress(c.state), -c.score, c.row, c.token))
    longest = max(map(len, ordered), default=0)
    return [bank[n] for n in range(longest) for bank in ordered if n < len(bank)]
