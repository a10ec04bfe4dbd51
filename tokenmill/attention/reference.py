"""Dense attention: the truth every other backend is tested against.

Materialises the full score matrix per sequence in float32; slow and simple on purpose.
"""
from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionBackend, AttentionMetadata, first_page, gather_context, store_kv


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """q [Lq, Hq, D]; k, v [Lk, Hkv, D], Lk >= Lq; the queries are the last Lq positions. With a
    `window` W a query sees only keys less than W positions back; positions count from k's first
    row, which needs not be position 0 of the sequence: the rule depends only on their distance."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().transpose(0, 1)                                  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale                        # [Hq, Lq, Lk]
    q_pos = torch.arange(lk - lq, lk).unsqueeze(1)
    k_pos = torch.arange(lk).unsqueeze(0)
    hidden = k_pos > q_pos                                          # [Lq, Lk]
    if window is not None:
        hidden |= q_pos - k_pos >= window
    scores = scores.masked_fill(hidden, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf                        # [Hq, Lq, D]
    return out.transpose(0, 1).to(q.dtype)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv(k, v, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        start, block_size, window = 0, k_cache.shape[1], meta.sliding_window
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            # pages before the window of the first query may be released: never gathered
            page = first_page(slen, qlen, window, block_size)
            keys = gather_context(k_cache, meta.block_tables[b], slen, page, q.dtype)   # [slen - page * block_size, Hkv, D]
            values = gather_context(v_cache, meta.block_tables[b], slen, page, q.dtype)
            out[start:start + qlen] = dense_causal_attention(q[start:start + qlen], keys, values, scale, window)
            start += qlen
        return out
