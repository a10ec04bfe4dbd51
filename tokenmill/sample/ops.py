"""The sampler's tensor ops, vectorised over rows that each carry their own parameters.

Each op takes logits [num_rows, vocab] and one SamplerRow per row, returns new logits (the
input is never written) with removed tokens at -inf, and skips any step that no row uses.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.sample.sampler import SamplerRow

NEG_INF = float("-inf")
# top-k / top-p look for survivors among this many best logits first, and sort a whole row
# only when its nucleus is wider: a full sort of a 49k vocab costs far more than a top-256
CANDIDATES = 256


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)   # [n, 1]


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def _pairs(token_lists: list[list[int]], row_ids: list[int], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs of ragged token lists, so one gather / scatter serves the batch."""
    tokens = _index(list(chain.from_iterable(token_lists)), device)
    rows = torch.repeat_interleave(_index(row_ids, device), _index([len(t) for t in token_lists], device))
    return rows, tokens


def penalised(row: SamplerRow) -> bool:
    p = row.params
    return bool(row.suppress_token_ids or p.repetition_penalty != 1.0
                or (row.output_token_ids and (p.frequency_penalty or p.presence_penalty)))


def apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Suppressed tokens to -inf, then the repetition penalty over prompt + output (a positive
    logit divided by it, a negative one multiplied, as transformers does), then the OpenAI
    frequency and presence penalties over the output: logit - f * count - p * (count > 0).
    Work is in the number of (row, token) pairs, never rows x vocab."""
    logits = logits.clone()
    device = logits.device
    if any(r.suppress_token_ids for r in rows):
        logits[_pairs([r.suppress_token_ids or [] for r in rows], list(range(len(rows))), device)] = NEG_INF

    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        # a token repeated in the history is written twice with the same value: still penalised once
        where = _pairs([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep], rep, device)
        penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=logits.dtype, device=device)
        vals, penalty = logits[where], penalty[where[0]]
        logits[where] = torch.where(vals > 0, vals / penalty, vals * penalty)

    freq = [i for i, r in enumerate(rows)
            if r.output_token_ids and (r.params.frequency_penalty or r.params.presence_penalty)]
    if freq:
        row, token = _pairs([rows[i].output_token_ids for i in freq], freq, device)
        vocab = logits.shape[1]
        keys, counts = torch.unique(row * vocab + token, return_counts=True)
        row, token = keys // vocab, keys % vocab
        f = torch.tensor([r.params.frequency_penalty for r in rows], dtype=logits.dtype, device=device)
        p = torch.tensor([r.params.presence_penalty for r in rows], dtype=logits.dtype, device=device)
        logits[row, token] -= f[row] * counts.to(logits.dtype) + p[row]
    return logits


def apply_filters(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on penalised logits; removed tokens become -inf.
    Greedy rows (temperature 0) pass through untouched.

    Top-k and top-p keep every token tied with the lowest survivor, so the result never depends
    on how a sort orders equal logits (nor on what else is in the batch)."""
    vocab, device = logits.shape[1], logits.device
    temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        logits = logits / _per_row(temps, logits)

    truncate = [i for i, r in enumerate(rows)
                if not r.params.greedy and (0 < r.params.top_k < vocab or r.params.top_p < 1.0)]
    if truncate:
        idx = _index(truncate, device)
        sub = logits[idx]
        top_k = _index([k if 0 < (k := rows[i].params.top_k) < vocab else vocab for i in truncate], device)
        top_p = _per_row([rows[i].params.top_p for i in truncate], sub)
        floor = truncation_floor(sub, top_k, top_p)
        logits = logits.index_put((idx,), sub.masked_fill(sub < floor, NEG_INF))

    min_p = [i for i, r in enumerate(rows) if not r.params.greedy and r.params.min_p > 0]
    if min_p:
        idx = _index(min_p, device)
        sub = logits[idx]
        # prob < min_p * max prob  <=>  logit < max logit + log(min_p): no softmax needed
        floor = sub.max(dim=-1, keepdim=True).values + _per_row([math.log(rows[i].params.min_p) for i in min_p], sub)
        logits = logits.index_put((idx,), sub.masked_fill(sub < floor, NEG_INF))
    return logits


def truncation_floor(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     full_sort: bool = False) -> torch.Tensor:
    """The lowest logit [n, 1] that survives top-k (top_k [n], vocab = off) and then top-p
    (top_p [n, 1], 1 = off: keep the smallest prefix of the top-k distribution, by falling
    probability, whose mass reaches top_p; always at least one token)."""
    n, vocab = logits.shape
    k_on = top_k < vocab
    width = vocab if full_sort else min(vocab, max(CANDIDATES, int(top_k[k_on].max()) if k_on.any() else 0))
    values = (logits.sort(dim=-1, descending=True) if width == vocab else logits.topk(width, dim=-1)).values
    kth = values.gather(1, (top_k.clamp(max=width) - 1).unsqueeze(1))
    kth = kth.masked_fill(~k_on.unsqueeze(1), NEG_INF)                              # [n, 1]
    p_on = top_p < 1.0
    if not p_on.any():
        return kth
    # the normaliser of the top-k distribution, over the whole row so ties beyond `width` count
    lse = logits.masked_fill(logits < kth, NEG_INF).logsumexp(dim=-1, keepdim=True)
    probs = (values - lse).exp().masked_fill(values < kth, 0.0)                      # [n, width]
    before = probs.cumsum(dim=-1) - probs
    # top_p = 1 must drop nothing even when the cumulative sum rounds up to 1 early
    keep = (before < top_p.masked_fill(~p_on, 2.0)).sum(dim=-1, keepdim=True)        # >= 1: before[:, 0] = 0
    floor = torch.maximum(kth, values.gather(1, keep - 1))
    unsure = (keep == width).squeeze(1) & ~k_on & (width < vocab)                     # nucleus may reach past width
    if unsure.any():
        redo = unsure.nonzero().squeeze(1)
        floor[redo] = truncation_floor(logits[redo], top_k[redo], top_p[redo], full_sort=True)
    return floor
