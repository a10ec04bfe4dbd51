"""The batched sampler: one call per step over rows with different parameters.

Order per row: suppressed tokens → logit bias → repetition penalty → frequency / presence penalties →
greedy argmax, or temperature → top-k → top-p → min-p → draw (exponential race, so a seeded
row's draw depends only on its own generator). Logprobs are of the raw model distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sample.ops import TokenHistory, apply_filters, apply_penalties
from tokenmill.sampling_params import SamplingParams

__all__ = ["SampledToken", "Sampler", "SamplerRow", "TokenHistory", "apply_filters", "apply_penalties"]


@dataclass
class SamplerRow:
    params: SamplingParams
    generator: torch.Generator | None = None      # the request's own when params.seed is set
    suppress_token_ids: list[int] | None = None   # forbidden this step (EOS / stop ids before min_tokens)
    history_slot: int | None = None               # its row in the TokenHistory, when it has penalties
    pending_token_ids: tuple[int, ...] = ()       # output tokens the history lacks yet (drafts before this position)


@dataclass
class SampledToken:
    token_id: int
    logprob: float                     # raw log-softmax, before penalties, temperature and filters
    rank: int                          # 1-based rank in the raw distribution; 0 when logprobs were not asked for
    top_logprobs: list[tuple[int, float]]


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator     # draws for every row without its own generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplerRow], history: TokenHistory | None = None
                 ) -> list[SampledToken]:
        if not rows:
            return []
        logits = logits.float()                                         # [num_rows, vocab]
        processed = apply_penalties(logits, rows, history)
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(drawn) == len(rows):
            tokens = self._draw(processed, rows)
        else:
            tokens = processed.argmax(dim=-1)                           # the first maximum: ties go to the lowest id
            if drawn:
                idx = torch.tensor(drawn, device=logits.device)
                tokens[idx] = self._draw(processed[idx], [rows[i] for i in drawn])
        return with_logprobs(logits, tokens, rows)

    def _draw(self, logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        return self.draw(apply_filters(logits, rows).softmax(dim=-1), rows)

    def draw(self, probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        """One token per row of `probs` [n, vocab] (written over)."""
        # argmax(p / q), q ~ Exp(1), picks token i with probability p_i, one row at a time
        return probs.div_(self._exponentials(probs, rows)).argmax(dim=-1)

    def uniforms(self, counts: list[int], rows: list[SamplerRow], device: torch.device) -> list[torch.Tensor]:
        """counts[i] draws from U[0, 1) for rows[i], from its own generator when it has one."""
        shared = [n for n, r in zip(counts, rows) if r.generator is None]
        pool = iter(torch.rand(sum(shared), generator=self.generator, device=device).split(shared)) if shared else None
        return [torch.rand(n, generator=r.generator, device=device) if r.generator is not None else next(pool)
                for n, r in zip(counts, rows)]

    def _exponentials(self, probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if len(shared) == len(rows):
            q = torch.empty_like(probs).exponential_(generator=self.generator)
        else:
            q = torch.empty_like(probs)
            if shared:
                q[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
                    generator=self.generator)
            for i, r in enumerate(rows):
                if r.generator is not None:
                    q[i].exponential_(generator=r.generator)
        # a zero draw would make 0 / 0 = nan for a filtered token, and argmax would pick the nan
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], num_top: int
                        ) -> list[tuple[float, int, list[tuple[int, float]]]]:
        """Per row: the raw logprob and 1-based rank of next_token_ids[i], and the top num_top."""
        raw = logits.float().log_softmax(dim=-1)
        target = torch.tensor(next_token_ids, device=raw.device).unsqueeze(1)
        chosen = raw.gather(1, target)
        ranks = (raw > chosen).sum(dim=-1) + 1
        top_vals, top_ids = raw.topk(num_top, dim=-1)
        return [(float(chosen[i]), int(ranks[i]), list(zip(top_ids[i].tolist(), top_vals[i].tolist())))
                for i in range(raw.shape[0])]


def with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplerRow]) -> list[SampledToken]:
    """SampledTokens for `tokens` drawn from raw `logits` (one per row), with the logprobs the rows ask for."""
    # log p = logit - logsumexp: ranks and the full top-n only for the rows that ask
    lse = logits.logsumexp(dim=-1, keepdim=True)
    chosen = logits.gather(1, tokens.unsqueeze(1))
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    ranks: dict[int, int] = {}
    tops: dict[int, list[tuple[int, float]]] = {}
    if wanted:
        idx = torch.tensor(wanted, device=logits.device)
        sub = logits[idx]
        ranks = dict(zip(wanted, ((sub > chosen[idx]).sum(dim=-1) + 1).tolist()))
        widest = max(rows[i].params.logprobs for i in wanted)
        if widest:
            vals, ids = sub.topk(widest, dim=-1)
            vals = (vals - lse[idx]).tolist()
            ids = ids.tolist()
            for j, i in enumerate(wanted):
                n = rows[i].params.logprobs
                tops[i] = list(zip(ids[j][:n], vals[j][:n]))
    logprobs = (chosen - lse).squeeze(1).tolist()
    return [SampledToken(t, lp, ranks.get(i, 0), tops.get(i, []))
            for i, (t, lp) in enumerate(zip(tokens.tolist(), logprobs))]
