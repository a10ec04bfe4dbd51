"""The token-budget scheduler (vLLM v1's rule): no prefill or decode phase, only
`num_computed_tokens` catching up with `num_tokens` under one budget per step.

Running sequences are served first, in arrival order; a sequence that cannot get pages
preempts the newest running one (recompute: its pages are freed, it goes back to the front
of the queue and later recomputes, mostly from the prefix cache). Waiting sequences are
admitted in FCFS order while the budget, `max_num_seqs` and the page pool allow.

Nothing waits forever: `add` refuses what could never be scheduled, and a sequence that cannot
grow even with the whole pool to itself finishes with "length".
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.core.block_manager import BlockManager
from tokenmill.core.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens), batch order
    samples: list[tuple[Sequence, int]] = field(default_factory=list)    # (receiver, index into `scheduled` whose last logits it samples)
    block_copies: list[tuple[int, int]] = field(default_factory=list)    # (src page, dst page) before the forward
    preempted: list[Sequence] = field(default_factory=list)
    forked: list[Sequence] = field(default_factory=list)                 # n > 1 siblings that start running now
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
        needed = self.block_manager.blocks_needed(seq.num_tokens + 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {seq.num_tokens} tokens needs {needed} KV pages but the cache has "
                             f"{self.block_manager.num_blocks}; raise num_kv_blocks / kv_cache_memory_gb")
        group = 1 + len(seq.pending_forks)
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
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()
                if victim is seq and not self.running:     # the whole pool is not enough: it cannot grow
                    self.finish(seq, SequenceStatus.FINISHED_LENGTH)
                    out.finished.append(seq)
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
        out.block_copies = self.block_manager.take_copies()
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            taken = len(self.running) + len(out.forked) + sum(len(s.pending_forks) for s in self.running)
            if taken + 1 + len(seq.pending_forks) > self.config.max_num_seqs:
                break
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, num_new):
                if not self.running and not out.scheduled:    # alone with the whole pool: it never fits
                    self.finish(seq, SequenceStatus.FINISHED_LENGTH)
                    out.finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            # a prefix-cache hit moved num_computed_tokens forward
            budget -= self._schedule(seq, min(seq.num_tokens - seq.num_computed_tokens, budget), out)

    def _schedule(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> int:
        out.scheduled.append((seq, num_new))
        if seq.num_computed_tokens + num_new == seq.num_tokens and seq.params.max_tokens != 0:
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

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """Advance computed counts, append the sampled tokens (one per `out.samples` entry) and
        apply the token-level stops. Returns the sequences that finished."""
        finished = list(out.finished)
        for seq, num_new in out.scheduled:
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
            if seq.params.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens and not seq.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)     # prompt scoring: nothing to generate
                finished.append(seq)
        for (seq, _), token in zip(out.samples, sampled):
            if seq.is_finished:       # aborted meanwhile
                continue
            seq.token_ids.append(token)
            status = self._check_stop(seq, token)
            if status is not None:
                self.finish(seq, status)
                finished.append(seq)
        return finished

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
