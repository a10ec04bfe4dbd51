"""The only place where Sequences meet tensors: a SchedulerOutput in, sampled tokens out."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.core.scheduler import SchedulerOutput
from tokenmill.core.sequence import Sequence
from tokenmill.kv_cache import copy_blocks
from tokenmill.sample.sampler import SampledToken, Sampler, SamplerRow

PromptLogprob = tuple[float, int, list[tuple[int, float]]] | None   # (logprob, rank, top-n) of a prompt token


@dataclass
class StepResult:
    sampled: list[SampledToken]                                           # one per SchedulerOutput.samples entry
    prompt_logprobs: dict[int, list[tuple[int, PromptLogprob]]] = field(default_factory=dict)  # seq_id -> (position, entry)


class Runner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 backend: AttentionBackend, block_size: int, eos_token_ids: set[int], seed: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.block_size = block_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.generators: dict[int, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        copy_blocks(self.kv_caches, out.block_copies)
        input_ids, positions, meta = self._prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, self.backend, meta)   # [T, hidden]
        last = meta.query_start_loc[1:].tolist()
        sample_rows = [last[row] - 1 for _, row in out.samples]
        plp_rows, plp_targets = self._prompt_logprob_rows(out, meta)
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows + plp_rows, dtype=torch.long)])
        sampled = self.sampler(logits[:len(sample_rows)], [self._row(seq) for seq, _ in out.samples])
        return StepResult(sampled, self._prompt_logprobs(logits[len(sample_rows):], plp_targets))

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        pos: list[int] = []
        qlens, slens = [], []
        for seq, n in out.scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            qlens.append(n)
            slens.append(end)
        dev = self.device
        meta = AttentionMetadata.build([seq.block_table for seq, _ in out.scheduled], qlens, slens,
                                       self.block_size, dev)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev), meta)

    def _row(self, seq: Sequence) -> SamplerRow:
        p = seq.params
        suppress = []
        if seq.num_output_tokens < p.min_tokens:
            suppress = sorted(set(self.eos_token_ids) | set(p.stop_token_ids))
        return SamplerRow(params=p, prompt_token_ids=seq.prompt_token_ids, output_token_ids=seq.output_token_ids,
                          generator=self._generator(seq), suppress_token_ids=suppress)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.index)
            self.generators[seq.seq_id] = gen
        return gen

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

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
