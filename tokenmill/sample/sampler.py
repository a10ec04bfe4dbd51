"""The batched sampler: one call per step over rows with different parameters.

Order per row: suppressed tokens → repetition penalty → frequency / presence penalties →
greedy argmax, or temperature → top-k → top-p → min-p → draw (exponential race, so a seeded
row's draw depends only on its own generator). Logprobs are of the raw model distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplerRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    suppress_token_ids: list[int] | None = None


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    rank: int                          # 1-based rank in the raw distribution; 0 when logprobs were not asked for
    top_logprobs: list[tuple[int, float]]


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Suppression and repetition / frequency / presence penalties, in place on a copy."""
    logits = logits.clone()
    for i, row in enumerate(rows):
        if row.suppress_token_ids:
            logits[i, row.suppress_token_ids] = float("-inf")
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long,
                                device=logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            counts = torch.bincount(torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device),
                                    minlength=logits.shape[1])[:logits.shape[1]].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_filters(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on penalised logits; removed tokens become -inf.
    Greedy rows (temperature 0) pass through untouched."""
    temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]
    logits = logits / _row_tensor(temps, logits)
    vocab = logits.shape[1]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        remove = ranks >= torch.tensor(top_k, device=logits.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keep at least one)
        before = probs.cumsum(dim=-1) - probs
        remove = before >= _row_tensor([p if p < 1.0 else 2.0 for p in top_p], probs)  # 1.0 must drop nothing
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    min_p = [r.params.min_p for r in rows]
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * _row_tensor(min_p, probs)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow]) -> list[SampledToken]:
        logits = logits.float()                                         # [num_rows, vocab]
        if not rows:
            return []
        needs_penalty = any(r.suppress_token_ids or r.params.repetition_penalty != 1.0
                            or r.params.frequency_penalty or r.params.presence_penalty for r in rows)
        processed = apply_penalties(logits, rows) if needs_penalty else logits
        tokens = processed.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            sub = [rows[i] for i in random_rows]
            probs = apply_filters(processed[idx], sub).softmax(dim=-1)
            tokens[idx] = (probs / self._exponentials(probs, sub)).argmax(dim=-1)
        return self._logprobs(logits, tokens, rows)

    def _exponentials(self, probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        q = torch.empty_like(probs)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            q[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
                generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        return q

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerRow]) -> list[SampledToken]:
        # log p = logit - logsumexp: the full log-softmax is only needed for rows that ask for top-n
        lse = logits.logsumexp(dim=-1, keepdim=True)
        chosen = logits.gather(1, tokens.unsqueeze(1))
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        ranks = {}
        tops: dict[int, list[tuple[int, float]]] = {}
        if wanted:
            idx = torch.tensor(wanted, device=logits.device)
            sub = logits[idx]
            ranks = dict(zip(wanted, ((sub > chosen[idx]).sum(dim=-1) + 1).tolist()))
            widest = max(rows[i].params.logprobs for i in wanted)
            if widest:
                vals, ids = sub.topk(widest, dim=-1)
                vals = vals - lse[idx]
                for j, i in enumerate(wanted):
                    n = rows[i].params.logprobs
                    tops[i] = list(zip(ids[j, :n].tolist(), vals[j, :n].tolist()))
        logprobs = (chosen - lse).squeeze(1).tolist()
        return [SampledToken(int(t), lp, ranks.get(i, 0), tops.get(i, []))
                for i, (t, lp) in enumerate(zip(tokens.tolist(), logprobs))]

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], num_top: int
                        ) -> list[tuple[float, int, list[tuple[int, float]]]]:
        raw = logits.float().log_softmax(dim=-1)
        target = torch.tensor(next_token_ids, device=raw.device).unsqueeze(1)
        chosen = raw.gather(1, target)
        ranks = (raw > chosen).sum(dim=-1) + 1
        top_vals, top_ids = raw.topk(num_top, dim=-1)
        return [(float(chosen[i]), int(ranks[i]), list(zip(top_ids[i].tolist(), top_vals[i].tolist())))
                for i in range(raw.shape[0])]
