"""CPU attention over the paged cache with ATen's fused scaled_dot_product_attention.

Each sequence's context is gathered from its pages; a prefill chunk that covers the whole
context uses the causal kernel directly (no mask tensor), a chunk after cached context
uses a bottom-right-aligned causal bias (never a [q, k] tensor), and decode rows are padded into one batched call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tokenmill.attention.base import AttentionBackend, AttentionMetadata, gather_context, store_kv


class TorchSDPABackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        group = q.shape[1] // k_cache.shape[2]
        if meta.is_pure_decode and meta.num_seqs > 1:
            return self._decode(q, k_cache, v_cache, meta, scale, group)
        out = torch.empty_like(q)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            # 4-D [1, H, L, D]: ATen's CPU flash kernel takes only 4-D input; 3-D falls back to the
            # math path, which materialises the [Hq, Lq, L] scores
            keys = gather_context(k_cache, meta.block_tables[b], slen).transpose(0, 1)[None]    # [1, Hkv, L, D]
            values = gather_context(v_cache, meta.block_tables[b], slen).transpose(0, 1)[None]
            query = q[start:start + qlen].transpose(0, 1)[None]                                 # [1, Hq, Lq, D]
            if qlen == slen:
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                   enable_gqa=group > 1)
            elif qlen == 1:
                o = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=group > 1)
            else:   # a chunk after cached context: causal aligned to the bottom-right, no mask tensor
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(qlen, slen),
                                                   scale=scale, enable_gqa=group > 1)
            out[start:start + qlen] = o[0].transpose(0, 1)
            start += qlen
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, group: int):
        # q [B, Hq, D]; pad every context to the longest and mask the tail.
        block_size = k_cache.shape[1]
        max_len = meta.max_seq_len
        num_blocks = (max_len + block_size - 1) // block_size
        tables = meta.block_tables[:, :num_blocks].reshape(-1).long()
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        # index_select copies whole pages at memcpy speed; advanced indexing is ~3x slower here
        keys = k_cache.index_select(0, tables).view(meta.num_seqs, -1, hkv, d)[:, :max_len].transpose(1, 2)  # [B, Hkv, L, D]
        values = v_cache.index_select(0, tables).view(meta.num_seqs, -1, hkv, d)[:, :max_len].transpose(1, 2)
        mask = torch.arange(max_len).unsqueeze(0) < meta.seq_lens.unsqueeze(1)                  # [B, L]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                           scale=scale, enable_gqa=group > 1)                    # [B, Hq, 1, D]
        return o.squeeze(2)
