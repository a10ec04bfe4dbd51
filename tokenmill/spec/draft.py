"""A draft model proposer: a small model (or the target itself, run in a cheaper form) with the
target's vocabulary samples k tokens ahead, with the target's sampling processing, and keeps the
probabilities it drew from (q) for the verifier.

Its KV cache has its own shapes but the target's pages: the draft writes a position into the same
page and slot as the target, so the block manager's tables, forks and copy-on-write serve both
(the scheduler reserves `k` lookahead slots for the positions past the drafts). Which positions hold
valid draft KV is the one piece of state kept here, per sequence (the drafts it wrote count while
they are accepted): after a step the draft catches up from there (the last token; after all k
drafts were accepted also the k-th), so proposing costs k forward passes of the draft. A sequence that is new, preempted, or served
from the prefix cache computes its whole prompt in the draft once (other requests' pages hold the
target's KV, and the draft's only as far as their own drafts reached).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill import kernels
from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.core.sequence import Sequence
from tokenmill.kv_cache import copy_blocks
from tokenmill.sample.ops import apply_filters, apply_penalties

if TYPE_CHECKING:
    from tokenmill.runner import Runner


@dataclass
class _DraftState:
    base: int                  # positions before this hold valid draft KV
    written: list[int]         # the drafts written at positions base, base + 1, ...: valid while accepted
    preemptions: int


class DraftModelProposer:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.states: dict[int, _DraftState] = {}
        self.probs: dict[int, tuple[list[int], torch.Tensor]] = {}   # seq_id -> (drafts, q [k, vocab])

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        copy_blocks(self.kv_caches, copies)

    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)
        self.probs.pop(seq.seq_id, None)

    def draft_probs(self, seq: Sequence, drafts: list[int]) -> torch.Tensor | None:
        """q of the drafts being verified (kept until the next proposal: a failed step is retried);
        None for greedy rows, whose verification needs only the tokens."""
        entry = self.probs.get(seq.seq_id)
        if seq.params.greedy:
            return None
        if entry is None or entry[0] != drafts:
            raise RuntimeError(f"no draft probabilities for the drafts of sequence {seq.seq_id}")
        return entry[1]

    def _valid(self, seq: Sequence) -> int:
        """Leading positions of `seq` whose draft KV holds its tokens (at most all but the last)."""
        state = self.states.get(seq.seq_id)
        if state is None or state.preemptions != seq.num_preemptions:
            return 0
        valid = state.base
        for token in state.written:
            if valid >= seq.num_tokens - 1 or seq.token_ids[valid] != token:
                break
            valid += 1
        return min(valid, seq.num_tokens - 1)

    def propose(self, runner: Runner, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Up to limits[i] drafts for seqs[i] (decode-ready sequences with pages for them)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for step in range(max(limits, default=0)):
            active = [i for i in active if limits[i] > step]
            if not active:
                break
            if step == 0:
                starts = [self._valid(seqs[i]) for i in active]
                chunks = [seqs[i].token_ids[start:] for i, start in zip(active, starts)]
            else:
                starts = [seqs[i].num_tokens + step - 1 for i in active]
                chunks = [[drafts[i][-1]] for i in active]
            logits = self._forward(runner, [seqs[i] for i in active], starts, chunks)
            rows = [runner.row(seqs[i], drafts[i]) for i in active]
            tokens, q = self._sample(runner, logits, rows)
            for j, i in enumerate(active):
                drafts[i].append(tokens[j])
                if q is not None:
                    probs[i].append(q[j])
        for seq, d, p, limit in zip(seqs, drafts, probs, limits):
            if limit > 0:
                self.states[seq.seq_id] = _DraftState(seq.num_tokens, d[:limit - 1], seq.num_preemptions)
            if p:
                self.probs[seq.seq_id] = (d, torch.stack(p))
            else:
                self.probs.pop(seq.seq_id, None)
        return drafts

    def _forward(self, runner: Runner, seqs: list[Sequence], starts: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Draft logits [len(seqs), vocab] after each chunk, written at positions starts[i] onwards."""
        ids, pos, qlens, slens = [], [], [], []
        for start, chunk in zip(starts, chunks):
            ids += chunk
            pos += range(start, start + len(chunk))
            qlens.append(len(chunk))
            slens.append(start + len(chunk))
        meta = AttentionMetadata.build([s.block_table for s in seqs], qlens, slens, self.block_size, self.device,
                                       [runner.table(s) for s in seqs])
        # every layer reads the target's full-attention table; a windowed one just sees less of it
        metas = {w: dataclasses.replace(meta, sliding_window=w) for w in set(self.model.cfg.layer_windows)}
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device),
                            torch.tensor(pos, dtype=torch.long, device=self.device), self.kv_caches, self.backend,
                            [metas[w] for w in self.model.cfg.layer_windows])
        last = meta.query_start_loc[1:].long() - 1
        return self.model.compute_logits(hidden[last]).float()

    @staticmethod
    def _sample(runner: Runner, logits: torch.Tensor, rows) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens with the target's processing; q rows (zeros for greedy rows) when any row samples."""
        processed = apply_penalties(logits, rows, runner.history)
        tokens = kernels.argmax(processed)
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not drawn:
            return tokens.tolist(), None
        idx = torch.tensor(drawn, device=logits.device)
        q = torch.zeros_like(processed)
        q[idx] = apply_filters(processed[idx], [rows[i] for i in drawn]).softmax(dim=-1)
        tokens[idx] = runner.sampler.draw(q[idx], [rows[i] for i in drawn])
        return tokens.tolist(), q
