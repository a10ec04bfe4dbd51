"""Dense attention: the truth every other backend is tested against.

Materialises the full score matrix per sequence in float32; slow and simple on purpose.
"""
from __future__ import annotations

import torch

from tokenmill.attention.base import AttentionBackend, AttentionMetadata, gather_context, store_kv


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Lq, Hq, D]; k, v [Lk, Hkv, D], Lk >= Lq; the queries are the last Lq positions."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qf = q.float().transpose(0, 1)                                  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Lk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qf @ kf.transpose(1, 2) * scale                        # [Hq, Lq, Lk]
    q_pos = torch.arange(lk - lq, lk).unsqueeze(1)
    k_pos = torch.arange(lk).unsqueeze(0)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf                        # [Hq, Lq, D]
    return out.transpose(0, 1).to(q.dtype)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            keys = gather_context(k_cache, meta.block_tables[b], slen)
            values = gather_context(v_cache, meta.block_tables[b], slen)
            out[start:start + qlen] = dense_causal_attention(q[start:start + qlen], keys, values, scale)
            start += qlen
        return out
