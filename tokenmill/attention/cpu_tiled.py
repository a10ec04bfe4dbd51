"""CPU attention over the paged cache: ATen's tiled flash kernel, never a mask, never an N x N matrix.

`aten::_scaled_dot_product_flash_attention_for_cpu` is an online-softmax kernel (query tiles of up
to 256 rows stream key tiles of 512) that maps query heads to KV heads itself and returns the
log-sum-exp of every row. Its causal mask is aligned to the top-left, so:
  - a prompt processed whole (query_len == seq_len) is one causal call;
  - a chunk after cached context (an earlier chunk or a prefix-cache hit) is two calls merged by
    their log-sum-exp: every query sees every cached key (no mask), and the chunk's own keys causally;
  - the decode rows of a step (query_len == 1) are one call over their contexts padded to the
    longest, the tails masked by an additive [B, 1, 1, L] row, while padding wastes at most 25 %;
    contexts more uneven than that are gathered without padding and attended one call each.
Unmasked calls fold the query heads of a KV head into rows (`fold_groups`), so each K/V tile is read
once per KV head rather than once per query head.
Pages are copied into a reused workspace: a fresh multi-MiB tensor per call costs more in page
faults than the copy itself (measured: 25 ms against 8 ms for 50 MiB on this machine). The workspace
holds at most one layer's gathered context (x 1.25 for padding), a small part of the whole KV cache.
Chosen as the CPU default by benchmarks/attention_cpu.py; the numbers are in docs/attention.md.
Under a sliding window that binds (context longer than the window) only pages from the window of the
first query on are gathered (earlier table entries may be released); a chunk runs in query tiles of
WINDOW_TILE, each over just the keys it sees with an additive banded bias (rows x (rows + window), never
N x N); decode rows see their last `window` keys: the head of their first page is masked when padded,
sliced off when attended one by one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill import kernels
from tokenmill.attention.base import (AttentionBackend, AttentionMetadata, decode_window_tables, first_page,
                                      store_kv, window_mask, window_tiles)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
WINDOW_TILE = 256       # queries per masked call under a sliding window: the flash kernel's own query tile


class Workspace:
    """Two grow-only buffers that receive gathered K and V pages; reused from call to call."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy `pages` of both caches, in `dtype` (the queries'; pages may be stored narrower); returns two
        [len(pages), block_size, Hkv, D] views."""
        rows, page_shape = pages.numel(), k_cache.shape[1:]
        if self.k is None or self.k.dtype != dtype or self.k.shape[1:] != page_shape or self.k.shape[0] < rows:
            self.k = torch.empty(rows, *page_shape, dtype=dtype)
            self.v = torch.empty_like(self.k)
        k, v = self.k[:rows], self.v[:rows]
        if k_cache.dtype == dtype:
            torch.index_select(k_cache, 0, pages, out=k)
            torch.index_select(v_cache, 0, pages, out=v)
        else:
            k.copy_(k_cache.index_select(0, pages))
            v.copy_(v_cache.index_select(0, pages))
        return k, v


@dataclass
class DecodePlan:
    padded: bool                 # one call over contexts padded to the longest, else one call per row
    pages: torch.Tensor          # int64 page ids to gather: [B * width] padded, else the pages in use
    width: int                   # pages per padded row
    length: int                  # keys per padded row
    bias: torch.Tensor | None    # [B, 1, 1, length] additive mask of padded rows, None when nothing is hidden
    row_pages: list[int]         # per row: pages in use, keys before its window, keys in use
    heads: list[int]
    lengths: list[int]


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Softmax over the union of two key sets from each set's result: o [.., H, L, D], lse [.., H, L]."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


def fold_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Lq, Hq, D] -> [..., Hkv, group * Lq, D]: without a causal mask the query heads of one KV
    head are just more rows against the same keys, so each K/V tile is read once per group."""
    *lead, lq, hq, d = q.shape
    group = hq // num_kv_heads
    q = q.view(*lead, lq, num_kv_heads, group, d).movedim(-4, -2)        # [..., Hkv, group, Lq, D]
    return q.reshape(*lead, num_kv_heads, group * lq, d)


def unfold_groups(o: torch.Tensor, lse: torch.Tensor, lq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Back from fold_groups: o [..., Hkv, group * Lq, D] -> [..., Hq, Lq, D], lse likewise."""
    *lead, hkv, rows, d = o.shape
    return o.reshape(*lead, hkv * (rows // lq), lq, d), lse.reshape(*lead, hkv * (rows // lq), lq)


class CPUTiledBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, max_padding: float = 0.25) -> None:
        self.workspace = Workspace()
        self.max_padding = max_padding     # decode pads to the longest context while that wastes at most this

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        window = meta.sliding_window
        native = self.decode_tables(meta, q.shape[1], q.dtype, k_cache)
        if native is not None:
            slots, tables, lens, starts = native
            return kernels.paged_decode(q, k, v, slots, k_cache, v_cache, tables, lens, starts, scale)
        store_kv(k, v, k_cache, v_cache, meta)
        if meta.is_pure_decode:
            key = ("cpu decode plan", q.dtype)
            plan = meta.derived.get(key)
            if plan is None:
                plan = meta.derived[key] = self._decode_plan(meta.block_tables, meta.seq_lens_list, window,
                                                             k_cache.shape[1], q.dtype)
            return self._decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_list, scale, window, plan)
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        decode_seqs = [b for b, qlen in enumerate(meta.query_lens_list) if qlen == 1]
        if len(decode_seqs) > 1:
            rows = torch.tensor([starts[b] for b in decode_seqs])
            out[rows] = self._decode(q[rows], k_cache, v_cache, meta.block_tables[torch.tensor(decode_seqs)],
                                     [meta.seq_lens_list[b] for b in decode_seqs], scale, window)
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            if qlen > 1 or (qlen == 1 and len(decode_seqs) == 1):
                s = starts[b]
                if window is not None and slen > window:
                    out[s:s + qlen] = self._windowed(q[s:s + qlen], k_cache, v_cache, meta.block_tables[b], slen,
                                                     window, scale)
                else:
                    out[s:s + qlen] = self._prefill(q[s:s + qlen], k_cache, v_cache, meta.block_tables[b], slen,
                                                    scale)
        return out

    def decode_tables(self, meta: AttentionMetadata, num_heads: int, dtype: torch.dtype,
                      k_cache: torch.Tensor) -> tuple | None:
        """Pure-decode steps with float32 queries (over float32 or float16 pages) run tokenmill's own kernel; its
        tables once per step."""
        if not meta.is_pure_decode or not kernels.paged_decode_fits(num_heads, dtype, k_cache):
            return None
        key = "native decode rows"
        if key not in meta.derived:
            window = meta.sliding_window
            starts = [0 if window is None else max(0, n - window) for n in meta.seq_lens_list]
            meta.derived[key] = (meta.slot_mapping.to(torch.int64), meta.block_tables.contiguous(),
                                 meta.seq_lens.to(torch.int32), torch.tensor(starts, dtype=torch.int32))
        return meta.derived[key]

    def _prefill(self, q, k_cache, v_cache, block_table, seq_len: int, scale: float) -> torch.Tensor:
        """q [Lq, Hq, D], the last Lq of seq_len positions -> [Lq, Hq, D]."""
        qlen, block_size, hkv = q.shape[0], k_cache.shape[1], k_cache.shape[2]
        num_pages = -(-seq_len // block_size)
        kp, vp = self.workspace.gather(k_cache, v_cache, block_table[:num_pages].long(), q.dtype)
        keys = kp.flatten(0, 1)[:seq_len].transpose(0, 1)[None]             # [1, Hkv, L, D]
        values = vp.flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        cached = seq_len - qlen
        if cached == 0:
            o, _ = _flash(q.transpose(0, 1)[None], keys, values, is_causal=True, scale=scale)
            return o[0].transpose(0, 1)
        o_old, lse_old = _flash(fold_groups(q, hkv)[None], keys[:, :, :cached], values[:, :, :cached], scale=scale)
        o_old, lse_old = unfold_groups(o_old, lse_old, qlen)                # [1, Hq, Lq, D], [1, Hq, Lq]
        o_new, lse_new = _flash(q.transpose(0, 1)[None], keys[:, :, cached:], values[:, :, cached:],
                                is_causal=True, scale=scale)
        return merge_by_lse(o_old, lse_old, o_new, lse_new)[0].transpose(0, 1)

    def _windowed(self, q, k_cache, v_cache, block_table, seq_len: int, window: int, scale: float) -> torch.Tensor:
        """As _prefill, each query seeing only its last `window` positions; never reads released pages."""
        qlen, block_size = q.shape[0], k_cache.shape[1]
        page = first_page(seq_len, qlen, window, block_size)
        base = page * block_size                                            # position of the first gathered key
        kp, vp = self.workspace.gather(k_cache, v_cache, block_table[page:-(-seq_len // block_size)].long(), q.dtype)
        keys = kp.flatten(0, 1)[:seq_len - base].transpose(0, 1)[None]      # [1, Hkv, seq_len - base, D]
        values = vp.flatten(0, 1)[:seq_len - base].transpose(0, 1)[None]
        queries = q.transpose(0, 1)[None]                                   # [1, Hq, Lq, D]
        out = torch.empty_like(q)
        for i0, i1, k0, k1 in window_tiles(seq_len, qlen, window, WINDOW_TILE):
            bias = None
            if i1 - i0 > 1:     # a single query sees every key of its tile
                hidden = ~window_mask(seq_len - qlen + i0, i1 - i0, k0, k1 - k0, window)
                bias = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))[None, None]
            o, _ = _flash(queries[:, :, i0:i1], keys[:, :, k0 - base:k1 - base], values[:, :, k0 - base:k1 - base],
                          attn_mask=bias, scale=scale)                      # [1, Hq, i1 - i0, D]
            out[i0:i1] = o[0].transpose(0, 1)
        return out

    def _decode(self, q, k_cache, v_cache, block_tables, seq_lens: list[int], scale: float,
                window: int | None = None, plan: "DecodePlan | None" = None) -> torch.Tensor:
        """q [B, Hq, D], one query per sequence at its last position -> [B, Hq, D]. `plan`: the gather
        and mask of these rows, when a pure decode step made it for all its layers."""
        if plan is None:
            plan = self._decode_plan(block_tables, seq_lens, window, k_cache.shape[1], q.dtype)
        num_seqs, block_size, hkv, d = q.shape[0], k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        folded = q.view(num_seqs, hkv, -1, d)                                # [B, Hkv, group, D]
        kp, vp = self.workspace.gather(k_cache, v_cache, plan.pages, q.dtype)
        if plan.padded:
            width, length = plan.width, plan.length
            keys = kp.view(num_seqs, width * block_size, hkv, d)[:, :length].transpose(1, 2)   # [B, Hkv, L, D]
            values = vp.view(num_seqs, width * block_size, hkv, d)[:, :length].transpose(1, 2)
            o, _ = _flash(folded, keys, values, attn_mask=plan.bias, scale=scale)   # [B, Hkv, group, D]
            return o.reshape(num_seqs, -1, d)
        # contexts too uneven to pad: only the pages in use were gathered, one call per sequence
        out = torch.empty_like(q)
        first = 0
        for b, (n, head, length) in enumerate(zip(plan.row_pages, plan.heads, plan.lengths)):
            keys = kp[first:first + n].flatten(0, 1)[head:length].transpose(0, 1)[None]   # [1, Hkv, L, D]
            values = vp[first:first + n].flatten(0, 1)[head:length].transpose(0, 1)[None]
            out[b] = _flash(folded[b:b + 1], keys, values, scale=scale)[0].reshape(-1, d)
            first += n
        return out

    def _decode_plan(self, block_tables, seq_lens: list[int], window: int | None, block_size: int,
                     dtype: torch.dtype) -> "DecodePlan":
        """Which pages decode rows gather and how their keys are masked: the same for every layer of a step."""
        num_seqs = len(seq_lens)
        if window is None:
            pages = [-(-n // block_size) for n in seq_lens]
            tables = block_tables[:, :max(pages)]                           # [B, width]
            heads, lengths = [0] * num_seqs, seq_lens
        else:   # each row's entries from its first page in the window on; `heads`: keys before the window
            tables, first, pages = decode_window_tables(block_tables, seq_lens, window, block_size)
            lengths = [n - f * block_size for n, f in zip(seq_lens, first)]
            heads = [max(0, n - window) for n in lengths]
        width = max(pages)
        if num_seqs * width <= (1 + self.max_padding) * sum(pages):
            return DecodePlan(True, tables.reshape(-1).long(), width, max(lengths),
                              self._decode_bias(heads, lengths, dtype), pages, heads, lengths)
        in_use = torch.arange(width).unsqueeze(0) < torch.tensor(pages).unsqueeze(1)
        return DecodePlan(False, tables[in_use].long(), width, max(lengths), None, pages, heads, lengths)

    @staticmethod
    def _decode_bias(heads: list[int], lengths: list[int], dtype: torch.dtype) -> torch.Tensor | None:
        """Additive [B, 1, 1, L] bias hiding each padded row's keys before `heads[b]` and from `lengths[b]` on;
        None when nothing is hidden."""
        length = max(lengths)
        if min(lengths) == length and max(heads) == 0:
            return None
        pos = torch.arange(length).unsqueeze(0)
        hidden = pos >= torch.tensor(lengths).unsqueeze(1)                  # [B, L]
        if max(heads) > 0:
            hidden |= pos < torch.tensor(heads).unsqueeze(1)
        return torch.zeros(len(lengths), 1, 1, length, dtype=dtype).masked_fill_(hidden[:, None, None], float("-inf"))
