"""The token-budget scheduler (vLLM v1's rule): no prefill or decode phase, only
`num_computed_tokens` catching up with `num_tokens` under one budget per step.

Running sequences are served first, in arrival order; a sequence that cannot get pages
preempts the newest running one (recompute: its pages are freed, it goes back to the front
of the queue and later recomputes, mostly from the prefix cache). Waiting sequences are
admitted in FCFS order while the budget, `max_num_seqs` and the page pool allow.

A sequence with draft tokens (`spec_token_ids`, speculative decoding) asks for 1 + drafts tokens:
its last token and the drafts, verified in one step, all of them or none. `update` takes the
tokens the verifier emitted (the accepted drafts and one more) and rolls `num_computed_tokens`
back past the rejected ones, whose KV slots are simply overwritten later; only pages made entirely
of accepted tokens enter the prefix cache.

Nothing waits forever: `add` refuses what could never be scheduled, and a sequence that cannot
grow even with the whole pool to itself finishes with "length".

A beam search group (core/beam.py) holds `beam_width` places from admission on. Its beams are
scored together, so a step that cannot bring all of them to their last token holds the others
back by one token; a preempted beam comes back one group member per step, so that it finds its
group's pages in the prefix cache instead of recomputing beside them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.core.beam import BeamCandidate, BeamGroup
from tokenmill.core.block_manager import BlockManager
from tokenmill.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    num_lookahead_tokens: int = 0     # KV slots past a sequence's drafts that a draft model writes into

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_lookahead_tokens < 0:
            raise ValueError(f"num_lookahead_tokens must be >= 0, got {self.num_lookahead_tokens}")


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens), batch order
    samples: list[tuple[Sequence, int]] = field(default_factory=list)    # (receiver, index into `scheduled` whose last logits it samples)
    block_copies: list[tuple[int, int]] = field(default_factory=list)    # (src page, dst page) before the forward
    preempted: list[Sequence] = field(default_factory=list)
    forked: list[Sequence] = field(default_factory=list)                 # n > 1 siblings that start running now
    beam_groups: list[tuple[BeamGroup, list[int]]] = field(default_factory=list)  # (group, rows of its beams in `scheduled`)
    finished: list[Sequence] = field(default_factory=list)               # ended while scheduling (no room to grow)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.finished


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: set[int]):
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; siblings for n > 1 ride in `seq.pending_forks` until its prompt is done."""
        needed = self.block_manager.pages_for(seq.num_tokens + 1,
                                              self.config.max_num_batched_tokens + self.config.num_lookahead_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {seq.num_tokens} tokens needs {needed} KV pages but the cache has "
                             f"{self.block_manager.num_blocks}; raise num_kv_blocks / kv_cache_memory_gb")
        group = self._places(seq)
        if group > self.config.max_num_seqs:
            raise ValueError(f"n: a request of {group} sequences (n / best_of) can never run beside "
                             f"max_num_seqs ({self.config.max_num_seqs}); ask for at most {self.config.max_num_seqs}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in [*self.waiting, *self.running] if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return aborted

    @staticmethod
    def _places(seq: Sequence) -> int:
        """The running places a request takes: its n samples, or its beam width."""
        return seq.beam.width if seq.beam is not None else 1 + len(seq.pending_forks)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free_seq(seq)
        for sibling in seq.pending_forks:
            sibling.status = status
        seq.pending_forks = []

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens, budget)
            if seq.spec_token_ids and num_new <= len(seq.spec_token_ids):
                break       # drafts are verified whole: trimming them would change a seeded request's draws
            while not self.block_manager.allocate(seq, num_new, self._lookahead(seq)):
                victim = self.running.pop()
                if victim is seq and not self.running:     # the whole pool is not enough: it cannot grow
                    self._finish_length(seq, out)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                budget -= self._schedule(seq, num_new, out)
                i += 1
        if not out.preempted:
            self._admit(out, budget)
        self.running.extend(out.forked)
        self._gather_beams(out)
        if not out.scheduled and not out.finished and self.running:
            self._unstick(out)
        out.block_copies = self.block_manager.take_copies()
        return out

    def _finish_length(self, seq: Sequence, out: SchedulerOutput) -> None:
        if seq.beam is None:
            self.finish(seq, SequenceStatus.FINISHED_LENGTH)
            out.finished.append(seq)
        else:
            self._end_group(seq.beam, out)

    def _end_group(self, group: BeamGroup, out: SchedulerOutput) -> None:
        """A group the pool cannot hold: what it has becomes its result (BeamGroup.truncate)."""
        group.truncate()
        for beam in group.beams:
            if not beam.is_finished:
                self.finish(beam, SequenceStatus.FINISHED_LENGTH)
                out.finished.append(beam)

    def _unstick(self, out: SchedulerOutput) -> None:
        """Nothing ran: every running sequence is a beam held for a group member that cannot come back
        for want of pages. The oldest group keeps its pages and the others step back whole, behind its
        waiting members; alone, its own pages fill the pool and it ends with what it has."""
        if any(s.beam is None for s in self.running):
            return
        groups = list({id(s.beam): s.beam for s in self.running}.values())
        mates = [s for s in self.waiting if s.beam in groups]
        if mates and self.waiting[0] not in mates:       # someone else blocks the queue: the mates go first
            for seq in reversed(mates):
                self.waiting.remove(seq)
                self.waiting.appendleft(seq)
            return
        if len(groups) == 1:
            self._end_group(groups[0], out)
            return
        for seq in [s for s in self.running if s.beam is not groups[0]]:
            self.running.remove(seq)
            self._preempt(seq, to_front=False)
            out.preempted.append(seq)

    def _gather_beams(self, out: SchedulerOutput) -> None:
        """Score a group only when all its beams reach their last token in this step; otherwise those
        that do compute all but it, and wait."""
        rows: dict[BeamGroup, dict[int, int]] = {}
        for row, (seq, n) in enumerate(out.scheduled):
            if seq.beam is not None and seq.num_computed_tokens + n == seq.num_tokens:
                rows.setdefault(seq.beam, {})[seq.seq_id] = row
        held: set[int] = set()
        for group, by_seq in rows.items():
            if len(by_seq) == len(group.beams):
                out.beam_groups.append((group, [by_seq[b.seq_id] for b in group.beams]))
            else:
                held.update(by_seq.values())
        if held:
            self._hold(out, held)

    @staticmethod
    def _hold(out: SchedulerOutput, held: set[int]) -> None:
        new_row: dict[int, int] = {}
        scheduled = []
        for row, (seq, n) in enumerate(out.scheduled):
            n -= row in held
            if n:
                new_row[row] = len(scheduled)
                scheduled.append((seq, n))
        out.scheduled = scheduled
        out.samples = [(seq, new_row[row]) for seq, row in out.samples]
        out.beam_groups = [(group, [new_row[r] for r in rows]) for group, rows in out.beam_groups]

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        admitted_groups: set[BeamGroup] = set()
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.beam in admitted_groups:      # one preempted beam per step: the next finds its pages cached
                break
            if self._places_taken(out) + self._places_needed(seq) > self.config.max_num_seqs:
                break
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, num_new, self._lookahead(seq)):
                if not self.running and not out.scheduled:    # alone with the whole pool: it never fits
                    self._finish_length(seq, out)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.beam is not None:
                admitted_groups.add(seq.beam)
            # a prefix-cache hit moved num_computed_tokens forward
            budget -= self._schedule(seq, min(seq.num_tokens - seq.num_computed_tokens, budget), out)

    def _lookahead(self, seq: Sequence) -> int:
        """Slots past the last token: the drafts and what a draft model writes after them, within max_model_len."""
        # forks share every page of the prompt: none past it, so their first writes copy only the last one
        draft_slots = self.config.num_lookahead_tokens if seq.beam is None and not seq.pending_forks else 0
        wanted = len(seq.spec_token_ids) + draft_slots
        return max(0, min(wanted, self.config.max_model_len - seq.num_tokens))

    def _places_taken(self, out: SchedulerOutput) -> int:
        groups = {s.beam for s in self.running if s.beam is not None}
        return (sum(self._places(s) for s in self.running if s.beam is None) + len(out.forked)
                + sum(g.width for g in groups))

    def _places_needed(self, seq: Sequence) -> int:
        if seq.beam is not None and any(s.beam is seq.beam for s in self.running):
            return 0
        return self._places(seq)

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> int:
        out.scheduled.append((seq, num_new))
        if seq.beam is not None:
            return num_new
        if seq.num_computed_tokens + num_new == seq.num_tokens + len(seq.spec_token_ids) and seq.params.max_tokens != 0:
            row = len(out.scheduled) - 1
            out.samples.append((seq, row))
            for sibling in seq.pending_forks:     # n > 1: siblings share the prompt's pages and its logits
                self.block_manager.fork(seq, sibling)
                sibling.num_computed_tokens = seq.num_computed_tokens + num_new
                sibling.status = SequenceStatus.RUNNING
                out.forked.append(sibling)
                out.samples.append((sibling, row))
            seq.pending_forks = []
        return num_new

    def _preempt(self, seq: Sequence, to_front: bool = True) -> None:
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        if to_front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, sampled: list[list[int]],
               beam_candidates: list[list[BeamCandidate]] = ()) -> list[Sequence]:
        """Advance computed counts, append the sampled tokens (per `out.samples` entry a list: the
        accepted drafts, then one sampled token), apply the token-level stops after each, and advance
        the beam groups (one candidate list per `out.beam_groups` entry). Returns the sequences that
        finished, dropped beams included."""
        finished = list(out.finished)
        for seq, num_new in out.scheduled:
            seq.num_computed_tokens += num_new - len(seq.spec_token_ids)    # drafts count once accepted
            seq.spec_token_ids = []
            self.block_manager.cache_full_blocks(seq)
            if seq.params.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens and not seq.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)     # prompt scoring: nothing to generate
                finished.append(seq)
        for (seq, _), tokens in zip(out.samples, sampled):
            if seq.is_finished:       # aborted meanwhile
                continue
            for i, token in enumerate(tokens):
                seq.token_ids.append(token)
                if i:       # the token before was an accepted draft: its KV is computed
                    seq.num_computed_tokens += 1
                status = self._check_stop(seq, token)
                if status is not None:
                    self.finish(seq, status)
                    finished.append(seq)
                    break
            else:
                if len(tokens) > 1:
                    self.block_manager.cache_full_blocks(seq)
        for (group, _), candidates in zip(out.beam_groups, beam_candidates):
            if not group.done:       # not aborted meanwhile
                finished += self._advance_beams(group, candidates)
        return finished

    def _advance_beams(self, group: BeamGroup, candidates: list[BeamCandidate]) -> list[Sequence]:
        """Continue the surviving candidates: the first continuation of a parent reuses it, the others
        fork it (sharing its pages); parents nobody continues are freed now."""
        parents = group.beams
        running = group.advance(candidates)
        records = {i: group.records.get(p.seq_id, []) for i, p in enumerate(parents)}
        used: set[int] = set()
        children = []
        for c in running:
            parent = parents[c.beam]
            if c.beam in used:
                child = parent.fork(parent.index)
                self.block_manager.fork(parent, child)
                self.running.append(child)
            else:
                used.add(c.beam)
                child = parent
            children.append(child)
        for child, c in zip(children, running):
            child.token_ids.append(c.token_id)
            child.cumulative_logprob = c.score
            group.records[child.seq_id] = records[c.beam] + [(c.logprob, c.rank)]
        group.beams = children
        ended = [p for i, p in enumerate(parents) if i not in used] + (children if group.done else [])
        for seq in ended:
            group.records.pop(seq.seq_id, None)
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
        return ended

    def _check_stop(self, seq: Sequence, token: int) -> SequenceStatus | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return SequenceStatus.FINISHED_STOPPED
            if token in self.eos_token_ids and not p.ignore_eos:
                return SequenceStatus.FINISHED_STOPPED
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
