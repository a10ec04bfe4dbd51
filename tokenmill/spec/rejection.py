"""The verifier: the target scores a sequence's last token and its k drafts in one pass (k + 1
logit rows); drafts are accepted left to right and one more token is drawn, so that what comes out
is distributed exactly as the target's own samples (Leviathan et al. 2023, Chen et al. 2023).

Per draft x at position j: accept with probability min(1, p_j(x) / q_j(x)); at the first rejection
draw from norm(max(0, p_j - q_j)) and stop; with all k accepted draw a bonus token from p_k. p and q
are the target's and the draft's distributions after the same processing (penalties, temperature,
top-k, top-p, min-p); an n-gram draft is a point mass, q = one-hot(x). Greedy rows accept while the
draft is the target's argmax and then emit the argmax, so their output is plain greedy decoding.

A seeded row draws k uniforms and one race's exponentials (Sampler.draw: about 2 sqrt(vocab)) from
its own generator per step, whatever the batch around it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill import kernels
from tokenmill.sample.ops import TokenHistory, apply_filters, apply_penalties
from tokenmill.sample.sampler import SampledToken, Sampler, SamplerRow, with_logprobs


@dataclass
class DraftSpan:
    """One sequence's slice of the verification batch."""
    first_row: int                        # its k + 1 logit rows start here
    draft_token_ids: list[int]            # k drafts
    draft_probs: torch.Tensor | None      # [k, vocab] q of a sampled draft; None: point masses (n-gram, greedy)


def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) for each draft token (p, q: that token's probabilities)."""
    return (p / q).clamp(max=1.0)


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplerRow], spans: list[DraftSpan],
           history: TokenHistory | None = None) -> list[list[SampledToken]]:
    """logits [num_rows, vocab] and one SamplerRow per row (a sequence's rows share params and
    generator; row j carries the drafts before it as pending tokens). Per span: the accepted drafts
    and one more token, with the target's raw logprobs."""
    logits = logits.float()
    processed = apply_penalties(logits, rows, history)
    greedy = [rows[s.first_row].params.greedy for s in spans]
    accepted, last = _accept(sampler, processed, rows, spans, greedy)
    emitted_rows, emitted_tokens = [], []
    for span, m, token in zip(spans, accepted, last):
        emitted_rows += range(span.first_row, span.first_row + m + 1)
        emitted_tokens += span.draft_token_ids[:m] + [token]
    tokens = with_logprobs(logits[emitted_rows], torch.tensor(emitted_tokens, device=logits.device),
                           [rows[r] for r in emitted_rows])
    out, start = [], 0
    for m in accepted:
        out.append(tokens[start:start + m + 1])
        start += m + 1
    return out


def _accept(sampler: Sampler, processed: torch.Tensor, rows: list[SamplerRow], spans: list[DraftSpan],
            greedy: list[bool]) -> tuple[list[int], list[int]]:
    """Per span: how many drafts are accepted, and the token drawn after them."""
    argmax = kernels.argmax(processed).tolist() if any(greedy) else []
    drawn_rows = [r for s, g in zip(spans, greedy) if not g
                  for r in range(s.first_row, s.first_row + len(s.draft_token_ids) + 1)]
    probs = torch.zeros_like(processed) if drawn_rows else torch.empty(0)
    if drawn_rows:
        idx = torch.tensor(drawn_rows, device=processed.device)
        probs[idx] = apply_filters(processed[idx], [rows[r] for r in drawn_rows]).softmax(dim=-1)
    uniforms = iter(sampler.uniforms([len(s.draft_token_ids) for s, g in zip(spans, greedy) if not g],
                                     [rows[s.first_row] for s, g in zip(spans, greedy) if not g], processed.device))
    accepted, final_rows, finals = [], [], []
    for span, is_greedy in zip(spans, greedy):
        drafts, first = span.draft_token_ids, span.first_row
        if is_greedy:
            m = 0
            while m < len(drafts) and drafts[m] == argmax[first + m]:
                m += 1
            accepted.append(m)
            continue
        m = _num_accepted(probs, span, next(uniforms))
        accepted.append(m)
        p = probs[first + m]
        if m < len(drafts):        # rejected: the residual norm(max(0, p - q))
            q = span.draft_probs[m] if span.draft_probs is not None else _one_hot(drafts[m], p)
            residual = (p - q).clamp_(min=0.0)
            p = residual if float(residual.sum()) > 0 else p   # p == q to rounding: it could not be rejected
        final_rows.append(rows[first + m])
        finals.append(p)
    drawn = iter(sampler.draw(torch.stack(finals), final_rows).tolist() if finals else [])
    last = [argmax[s.first_row + m] if g else next(drawn) for s, g, m in zip(spans, greedy, accepted)]
    return accepted, last


def _num_accepted(probs: torch.Tensor, span: DraftSpan, u: torch.Tensor) -> int:
    k = len(span.draft_token_ids)
    if k == 0:
        return 0
    draft = torch.tensor(span.draft_token_ids, device=probs.device)
    p = probs[span.first_row:span.first_row + k].gather(1, draft.unsqueeze(1)).squeeze(1)     # [k]
    q = span.draft_probs.gather(1, draft.unsqueeze(1)).squeeze(1) if span.draft_probs is not None else torch.ones_like(p)
    rejected = (u >= accept_probability(p, q)).tolist()
    return rejected.index(True) if True in rejected else k


def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q
