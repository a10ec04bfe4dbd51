"""Beam search as a group of sequences inside the scheduler, scored exactly as transformers does.

A group's beams are ordinary Sequences that decode side by side. Each step the runner scores the
group's W beams and hands back their best K = max(2, 1 + #stop ids) * W continuations
(`BeamCandidate`, best first); `BeamGroup.advance` then does what transformers'
`_beam_search` does for one batch item:

- a candidate that ends (stop id, or the length limit) enters the pool of W finished hypotheses
  only if it ranks among the first W, scored sum_logprobs / generated_len ** length_penalty;
- the best W candidates that do not end run on;
- the group is done at the length limit, when early_stopping=True and the pool is full, or when
  the pool is full and the best running beam can no longer beat its worst hypothesis (at its
  current length; at the longest possible for early_stopping="never" with length_penalty > 0).

The scheduler turns the survivors into forks that share their parent's pages (the partial last
page is copied on write) and frees the beams nobody continues. Scores are float32, as in
transformers, so that near ties resolve alike.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from tokenmill.core.sequence import Sequence
from tokenmill.sampling_params import BeamSearchParams


def f32(x: float) -> float:
    return array("f", [x])[0]


@dataclass(frozen=True)
class BeamCandidate:
    beam: int            # index into BeamGroup.beams of the parent
    token_id: int
    logprob: float       # of token_id under the parent's (temperature-scaled) distribution
    rank: int            # 1-based rank of token_id there
    score: float         # the parent's cumulative logprob + logprob, float32


@dataclass
class BeamHypothesis:
    token_ids: list[int]                  # generated tokens, the stop token included
    logprobs: list[tuple[float, int]]     # (logprob, rank) of each
    cumulative_logprob: float
    score: float                          # cumulative_logprob / len(token_ids) ** length_penalty
    finish_reason: str                    # "stop" | "length"
    stop_reason: int | None = None        # the stop token id, when it is not EOS


@dataclass(eq=False)
class BeamGroup:
    params: BeamSearchParams
    num_prompt_tokens: int
    max_len: int                          # prompt + max_tokens, within max_model_len
    stop_token_ids: frozenset[int]        # EOS (unless ignore_eos) and params.stop_token_ids
    eos_token_ids: frozenset[int] = frozenset()
    beams: list[Sequence] = field(default_factory=list)            # running, best first
    records: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # seq_id -> (logprob, rank) per token
    finished: list[BeamHypothesis] = field(default_factory=list)   # best first, at most `width`
    improvable: bool = True
    done: bool = False

    @property
    def width(self) -> int:
        return self.params.beam_width

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + len(self.stop_token_ids)) * self.width

    @property
    def stops_when_full(self) -> bool:
        # one beam is greedy decoding, whatever early_stopping says (transformers does not search then)
        return self.params.early_stopping is True or self.width == 1

    def advance(self, candidates: list[BeamCandidate]) -> list[BeamCandidate]:
        """Take this step's candidates (best first); returns those that run on, best first."""
        params, width = self.params, self.width
        length = self.beams[0].num_tokens + 1              # every beam has the same length
        generated = length - self.num_prompt_tokens
        at_max = length >= self.max_len
        ends = [at_max or c.token_id in self.stop_token_ids for c in candidates]
        running = [c for c, end in zip(candidates, ends) if not end][:width]
        if self.improvable and not (len(self.finished) == width and self.stops_when_full):
            penalty = f32(generated ** params.length_penalty)
            new = [self._hypothesis(c, penalty) for c, end in zip(candidates[:width], ends) if end]
            self.finished = sorted(self.finished + new, key=lambda h: -h.score)[:width]   # stable: old first on ties
        if len(self.finished) == width and running:
            longest = params.early_stopping == "never" and params.length_penalty > 0
            horizon = self.max_len - self.num_prompt_tokens if longest else generated
            best_possible = f32(running[0].score / f32(horizon ** params.length_penalty))
            self.improvable = self.improvable and best_possible > self.finished[-1].score
        self.done = (at_max or not running or not self.improvable
                     or (len(self.finished) == width and self.stops_when_full))
        return running

    def _hypothesis(self, c: BeamCandidate, penalty: float) -> BeamHypothesis:
        parent = self.beams[c.beam]
        stopped = c.token_id in self.stop_token_ids
        return BeamHypothesis(
            parent.output_token_ids + [c.token_id], self.records.get(parent.seq_id, []) + [(c.logprob, c.rank)],
            c.score, f32(c.score / penalty), "stop" if stopped else "length",
            c.token_id if stopped and c.token_id not in self.eos_token_ids else None)

    def truncate(self) -> None:
        """End early (the page pool cannot hold the group): running beams fill the pool's empty places."""
        for beam in self.beams[:self.width - len(self.finished)]:
            n = beam.num_output_tokens
            if n:
                score = f32(beam.cumulative_logprob / f32(n ** self.params.length_penalty))
                self.finished.append(BeamHypothesis(beam.output_token_ids, self.records.get(beam.seq_id, []),
                                                    beam.cumulative_logprob, score, "length"))
        self.finished.sort(key=lambda h: -h.score)
        self.done = True
