"""CPU attention over the paged cache with ATen's fused scaled_dot_product_attention.

Each sequence's context is gathered from its pages; a prefill chunk that covers the whole
context uses the causal kernel directly (no mask tensor), a chunk after cached context
uses a bottom-right-aligned causal bias (never a [q, k] tensor), and decode rows are padded into one batched call.
Under a sliding window that binds (context longer than the window) only the pages from the window of the
chunk's first query on are gathered, and the chunk runs in query tiles, each with a banded mask over just
the keys it sees (`window_tiles`), so the mask stays rows x (rows + window).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tokenmill.attention.base import (AttentionBackend, AttentionMetadata, decode_window_tables, first_page,
                                      gather_context, store_kv, window_mask, window_tiles)

WINDOW_TILE = 256       # queries per masked call under a sliding window


class TorchSDPABackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv(k, v, k_cache, v_cache, meta)
        group = q.shape[1] // k_cache.shape[2]
        if meta.is_pure_decode and meta.num_seqs > 1:
            return self._decode(q, k_cache, v_cache, meta, scale, group)
        out = torch.empty_like(q)
        start, window = 0, meta.sliding_window
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            query = q[start:start + qlen].transpose(0, 1)[None]                                 # [1, Hq, Lq, D]
            if window is not None and slen > window:
                o = self._windowed(query, k_cache, v_cache, meta.block_tables[b], slen, window, scale, group)
            else:
                o = self._causal(query, k_cache, v_cache, meta.block_tables[b], slen, scale, group)
            out[start:start + qlen] = o[0].transpose(0, 1)
            start += qlen
        return out

    @staticmethod
    def _causal(query, k_cache, v_cache, block_table, slen: int, scale: float, group: int) -> torch.Tensor:
        """query [1, Hq, Lq, D], the last Lq of slen positions, sees all earlier ones -> [1, Hq, Lq, D]."""
        qlen = query.shape[2]
        # 4-D [1, H, L, D]: ATen's CPU flash kernel takes only 4-D input; 3-D falls back to the
        # math path, which materialises the [Hq, Lq, L] scores
        keys = gather_context(k_cache, block_table, slen, 0, query.dtype).transpose(0, 1)[None]    # [1, Hkv, L, D]
        values = gather_context(v_cache, block_table, slen, 0, query.dtype).transpose(0, 1)[None]
        if qlen == slen:
            return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale,
                                                  enable_gqa=group > 1)
        if qlen == 1:
            return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=group > 1)
        # a chunk after cached context: causal aligned to the bottom-right, no mask tensor
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(qlen, slen),
                                              scale=scale, enable_gqa=group > 1)

    @staticmethod
    def _windowed(query, k_cache, v_cache, block_table, slen: int, window: int, scale: float,
                  group: int) -> torch.Tensor:
        """As _causal, each query seeing only its last `window` positions; never reads released pages."""
        qlen, block_size = query.shape[2], k_cache.shape[1]
        page = first_page(slen, qlen, window, block_size)
        base = page * block_size                                # position of the first gathered key
        keys = gather_context(k_cache, block_table, slen, page, query.dtype).transpose(0, 1)[None]  # [1, Hkv, slen - base, D]
        values = gather_context(v_cache, block_table, slen, page, query.dtype).transpose(0, 1)[None]
        out = torch.empty_like(query)
        for i0, i1, k0, k1 in window_tiles(slen, qlen, window, WINDOW_TILE):
            # a single query sees every key of its tile: no mask, which keeps SDPA on its fused path
            mask = None if i1 - i0 == 1 else window_mask(slen - qlen + i0, i1 - i0, k0, k1 - k0, window)
            out[:, :, i0:i1] = F.scaled_dot_product_attention(
                query[:, :, i0:i1], keys[:, :, k0 - base:k1 - base], values[:, :, k0 - base:k1 - base],
                attn_mask=mask, scale=scale, enable_gqa=group > 1)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, group: int):
        # q [B, Hq, D]; pad every context to the longest and mask the tail (and, under a window, the head).
        block_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        if meta.sliding_window is None:
            tables = meta.block_tables[:, :-(-meta.max_seq_len // block_size)]
            lengths, max_len = meta.seq_lens, meta.max_seq_len            # [B] keys gathered up to the query
        else:
            tables, first_pages, _ = decode_window_tables(meta.block_tables, meta.seq_lens_list, meta.sliding_window,
                                                          block_size)
            lens = [n - f * block_size for n, f in zip(meta.seq_lens_list, first_pages)]
            lengths, max_len = torch.tensor(lens, device=q.device), max(lens)
        # index_select copies whole pages at memcpy speed; advanced indexing is ~3x slower here
        rows = tables.reshape(-1).long()
        keys = k_cache.index_select(0, rows).view(meta.num_seqs, -1, hkv, d)[:, :max_len].transpose(1, 2).to(q.dtype)
        values = v_cache.index_select(0, rows).view(meta.num_seqs, -1, hkv, d)[:, :max_len].transpose(1, 2).to(q.dtype)
        pos = torch.arange(max_len, device=q.device).unsqueeze(0)
        mask = pos < lengths.unsqueeze(1)                                                             # [B, L]
        if meta.sliding_window is not None:
            mask &= pos >= (lengths - meta.sliding_window).unsqueeze(1)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                           scale=scale, enable_gqa=group > 1)                    # [B, Hq, 1, D]
        return o.squeeze(2)
