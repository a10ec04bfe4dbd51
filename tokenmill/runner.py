"""The only place where Sequences meet tensors: a SchedulerOutput in, sampled tokens out.

Per-sequence tensor state lives here, keyed by seq_id and kept until `release(seq)`: the seeded
generators, the penalty history rows and int32 copies of the block tables. Each is brought up to
date from the sequence by its new part only, so a step's bookkeeping does not grow with context."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.core.beam import BeamCandidate
from tokenmill.core.scheduler import SchedulerOutput
from tokenmill.core.sequence import Sequence
from tokenmill.kv_cache import KVLayout, copy_blocks
from tokenmill.parallel.ranks import Ranks, StepInputs
from tokenmill.sample.beam import beam_candidates
from tokenmill.sample.sampler import SampledToken, Sampler, SamplerRow, TokenHistory
from tokenmill.spec.rejection import DraftSpan, verify

if TYPE_CHECKING:
    from tokenmill.cuda_graphs import DecodeGraphs
    from tokenmill.spec.draft import DraftModelProposer

PromptLogprob = tuple[float, int, list[tuple[int, float]]] | None   # (logprob, rank, top-n) of a prompt token
SEED_MASK = 2**64 - 1


@dataclass
class StepResult:
    sampled: list[list[SampledToken]]       # per SchedulerOutput.samples entry: accepted drafts, then one sampled token
    prompt_logprobs: dict[int, list[tuple[int, PromptLogprob]]] = field(default_factory=dict)  # seq_id -> (position, entry)
    beam_candidates: list[list[BeamCandidate]] = field(default_factory=list)  # one per SchedulerOutput.beam_groups entry


@dataclass
class _TableCopy:
    buffer: torch.Tensor      # int32 [capacity]
    length: int               # entries that mirror seq.block_table
    last: int                 # the last of them
    source: int               # id() of the list mirrored
    preemptions: int


@dataclass
class _HistoryRow:
    slot: int
    num_tokens: int           # tokens of the sequence counted so far


class Runner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, eos_token_ids: set[int], seed: int,
                 device: torch.device, vocab_size: int, layout: KVLayout):
        self.model = model
        self.kv_caches = kv_caches              # per slot (kv_cache.py)
        self.layout = layout
        self.layer_caches = [kv_caches[slot] for _, slot in layout.layer_places]
        self.backend = backend
        self.block_size = block_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.vocab_size = vocab_size
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.generators: dict[int, torch.Generator] = {}
        self.tables: dict[int, list[_TableCopy | None]] = {}     # seq_id -> per KV group
        self.history: TokenHistory | None = None
        self.history_rows: dict[int, _HistoryRow] = {}
        self.free_slots: list[int] = []
        self.drafter: DraftModelProposer | None = None     # set by the engine for speculative decoding with a draft model
        self.ranks: Ranks | None = None         # set by the engine under tensor parallelism: the other ranks
        self.graphs: DecodeGraphs | None = None     # set by the engine on CUDA: decode steps replayed as graphs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        copy_blocks(self.kv_caches, out.block_copies)
        if self.drafter is not None:
            self.drafter.copy_blocks(out.block_copies)
        input_ids, positions, metas = self._prepare(out)
        meta = metas[0]
        last = meta.query_start_loc[1:].tolist()
        plain = [i for i, (seq, _) in enumerate(out.samples) if not seq.spec_token_ids]
        spec = [i for i, (seq, _) in enumerate(out.samples) if seq.spec_token_ids]
        plp_rows, plp_targets = self._prompt_logprob_rows(out, meta)
        row_groups = [[last[out.samples[i][1]] - 1 for i in plain],
                      [r for i in spec for r in self._spec_rows(out.samples[i][0], last[out.samples[i][1]])],
                      [last[row] - 1 for _, rows in out.beam_groups for row in rows],
                      plp_rows]
        rows = torch.tensor([r for group in row_groups for r in group], dtype=torch.long, device=self.device)
        if self.ranks is not None:
            self.ranks.step(StepInputs(input_ids, positions, metas, rows, out.block_copies))
        try:
            hidden = self.graphs.run(input_ids, positions, metas) if self.graphs is not None else None
            if hidden is None:
                hidden = self.model(input_ids, positions, self.layer_caches, self.backend,
                                    [metas[group] for group, _ in self.layout.layer_places])   # [T, hidden]
            logits = self.model.compute_logits(hidden[rows])               # one lm_head call for every consumer
        except BaseException as e:
            if self.ranks is not None:      # the other ranks are mid-step: the group cannot go on
                error = self.ranks.failure(e)
                if isinstance(e, Exception):
                    raise error from e
            raise
        plain_logits, spec_logits, beam_logits, plp_logits = logits.split([len(group) for group in row_groups])
        self._update_history([seq for seq, _ in out.samples])
        sampled: list[list[SampledToken]] = [[] for _ in out.samples]
        for i, tok in zip(plain, self.sampler(plain_logits, [self.row(out.samples[i][0]) for i in plain], self.history)):
            sampled[i] = [tok]
        if spec:
            for i, toks in zip(spec, self._verify([out.samples[i][0] for i in spec], spec_logits)):
                sampled[i] = toks
        candidates = beam_candidates(beam_logits, [g for g, _ in out.beam_groups]) if out.beam_groups else []
        return StepResult(sampled, self._prompt_logprobs(plp_logits, plp_targets), candidates)

    @staticmethod
    def _spec_rows(seq: Sequence, end: int) -> range:
        """The hidden rows of a sequence's last token and its drafts (its query chunk ends at `end`)."""
        return range(end - 1 - len(seq.spec_token_ids), end)

    def _verify(self, seqs: list[Sequence], logits: torch.Tensor) -> list[list[SampledToken]]:
        rows, spans = [], []
        for seq in seqs:
            drafts = seq.spec_token_ids
            q = self.drafter.draft_probs(seq, drafts) if self.drafter is not None else None
            spans.append(DraftSpan(len(rows), drafts, q))
            rows += [self.row(seq, drafts[:j]) for j in range(len(drafts) + 1)]
        return verify(self.sampler, logits, rows, spans, self.history)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Draft tokens from the draft model, at most limits[i] for seqs[i] (see spec/draft.py)."""
        self._update_history(seqs)
        return self.drafter.propose(self, seqs, limits)

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, list[AttentionMetadata]]:
        """Token ids, positions and the attention metadata of each KV group."""
        ids: list[int] = []
        pos: list[int] = []
        qlens, slens = [], []
        for seq, n in out.scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            if end > seq.num_tokens:          # the drafts follow the last token
                ids += seq.spec_token_ids[:end - seq.num_tokens]
            pos += range(start, end)
            qlens.append(n)
            slens.append(end)
        dev, seqs = self.device, [seq for seq, _ in out.scheduled]
        metas = [AttentionMetadata.build([seq.block_tables[g] for seq in seqs], qlens, slens, self.block_size, dev,
                                         [self.table(seq, g) for seq in seqs], sliding_window=window)
                 for g, window in enumerate(self.layout.group_windows)]
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev), metas)

    def table(self, seq: Sequence, group: int = 0) -> torch.Tensor:
        """seq.block_tables[group] as int32, re-copying only its tail: the block manager appends pages
        and copies-on-write only the last one; a new list (preemption, prefix hit) is copied whole.
        Entries a sliding window released (-1 in the list) may stay stale here: no backend reads them."""
        table, n = seq.block_tables[group], len(seq.block_tables[group])
        copies = self.tables.setdefault(seq.seq_id, [None] * len(self.layout.group_windows))
        copy = copies[group]
        if (copy is None or copy.source != id(table) or copy.preemptions != seq.num_preemptions
                or copy.buffer.numel() < n):
            buffer = torch.empty(max(16, 2 * n), dtype=torch.int32)
            buffer[:n] = torch.tensor(table, dtype=torch.int32)
            copies[group] = _TableCopy(buffer, n, table[-1] if table else -1, id(table), seq.num_preemptions)
            return buffer[:n]
        if n != copy.length or (n and table[-1] != copy.last):
            start = max(0, min(copy.length, n) - 1)
            copy.buffer[start:n] = torch.tensor(table[start:n], dtype=torch.int32)
            copy.length, copy.last = n, table[-1] if table else -1
        return copy.buffer[:n]

    def row(self, seq: Sequence, pending: list[int] = ()) -> SamplerRow:
        """How the next token of `seq` is sampled, after the `pending` tokens that its history lacks yet."""
        p = seq.params
        suppress = []
        if seq.num_output_tokens + len(pending) < p.min_tokens:
            suppress = sorted(set(self.eos_token_ids) | set(p.stop_token_ids))
        uses_history = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        return SamplerRow(params=p, generator=self._generator(seq), suppress_token_ids=suppress,
                          history_slot=self._history_slot(seq) if uses_history else None,
                          pending_token_ids=tuple(pending) if uses_history else ())

    def _history_slot(self, seq: Sequence) -> int:
        entry = self.history_rows.get(seq.seq_id)
        if entry is not None:
            return entry.slot
        if self.history is None:
            self.history = TokenHistory(8, self.vocab_size, self.device)
        if not self.free_slots:
            grown, old = TokenHistory(2 * len(self.history.seen), self.history.seen.shape[1], self.device), self.history
            grown.seen[:len(old.seen)], grown.counts[:len(old.counts)] = old.seen, old.counts
            self.free_slots = list(range(len(grown.seen) - 1, len(old.seen) - 1, -1))
            self.history = grown
        slot = self.free_slots.pop()
        self.history.reset(slot, seq.prompt_token_ids)
        self.history.add([slot], [seq.output_token_ids])
        self.history_rows[seq.seq_id] = _HistoryRow(slot, seq.num_tokens)
        return slot

    def _update_history(self, seqs: list[Sequence]) -> None:
        """Count the output tokens each penalised sequence gained since it was last counted."""
        slots, new = [], []
        for seq in seqs:
            entry = self.history_rows.get(seq.seq_id)
            if entry is None or entry.num_tokens == seq.num_tokens:
                continue
            slots.append(entry.slot)
            new.append(seq.token_ids[entry.num_tokens:])
            entry.num_tokens = seq.num_tokens
        if slots:
            self.history.add(slots, new)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed((seq.params.seed + seq.index) & SEED_MASK)
            self.generators[seq.seq_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        if self.drafter is not None:
            self.drafter.release(seq)
        self.generators.pop(seq.seq_id, None)
        self.tables.pop(seq.seq_id, None)
        entry = self.history_rows.pop(seq.seq_id, None)
        if entry is not None:
            self.free_slots.append(entry.slot)

    # ---- failure isolation -------------------------------------------------------------------------
    def snapshot(self, out: SchedulerOutput) -> list[tuple[torch.Generator, torch.Tensor]]:
        """The random state a step may consume, so that a failed step can be retried exactly."""
        gens = [self.sampler.generator] + [g for seq, _ in out.samples if (g := self._generator(seq)) is not None]
        return [(g, g.get_state()) for g in gens]

    @staticmethod
    def restore(snapshot: list[tuple[torch.Generator, torch.Tensor]]) -> None:
        for gen, state in snapshot:
            gen.set_state(state)

    @staticmethod
    def _prompt_logprob_rows(out: SchedulerOutput, meta: AttentionMetadata) -> tuple[list[int], list[tuple[int, int, int]]]:
        rows, targets = [], []   # targets: (seq_id, position, next token id)
        for (seq, n), start in zip(out.scheduled, meta.query_start_loc.tolist()):
            if seq.params.prompt_logprobs is None or not seq.in_prompt:
                continue
            for p in range(seq.num_computed_tokens, min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)):
                rows.append(start + p - seq.num_computed_tokens)
                targets.append((seq.seq_id, p, seq.token_ids[p + 1]))
        return rows, targets

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[int, int, int]]
                         ) -> dict[int, list[tuple[int, PromptLogprob]]]:
        result: dict[int, list[tuple[int, PromptLogprob]]] = {}
        if not targets:
            return result
        # every request in the step asks the same top-n width here: the widest; trimmed by the engine
        entries = Sampler.prompt_logprobs(logits, [t for _, _, t in targets], num_top=20)
        for (seq_id, pos, _), entry in zip(targets, entries):
            result.setdefault(seq_id, []).append((pos, entry))
        return result
