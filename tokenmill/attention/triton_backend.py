"""Triton kernels over the paged KV cache: K/V store by slot mapping, FlashAttention-2 style
prefill / chunked prefill, and flash-decoding for pure decode batches.

Every kernel reads pages straight through the block table and maps query head h to KV head
h // group, so K/V are never gathered or repeated in memory. Under TRITON_INTERPRET=1 they run on
CPU tensors (the tests do this); on CUDA they are the default backend.

Sliding window (HAS_WINDOW, a compile-time switch, so the unbounded kernels stay as they were): the
loops start at the first key a tile's queries see, never at a tile aligned below it, so block-table
entries of pages released before the window are never loaded; prefill masks the window's edge only in
the key tiles that cross it, decode splits only the last `window` keys of each sequence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.attention.base import AttentionBackend, AttentionMetadata

# triton's CPU interpreter computes tl.dot on bfloat16 wrongly (numpy has no bfloat16): there the
# kernels feed their dots float32 copies; compiled on a GPU they keep bfloat16 operands.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        tl.store(k_cache_ptr + slot * ROW + offs, tl.load(k_ptr + t * ROW + offs, mask=mask), mask=mask)
        tl.store(v_cache_ptr + slot * ROW + offs, tl.load(v_ptr + t * ROW + offs, mask=mask), mask=mask)


LOG2E = 1.4426950408889634       # the kernels use exp2: scores are pre-multiplied by log2(e)


@triton.jit
def _kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, b, kv_head, offs_n, offs_d, n_valid,
             stride_bt, stride_kb, stride_ks, stride_kh, PAGE: tl.constexpr):
    # one [BLOCK_N, D] tile of keys and values; a tile may span several pages: each key row finds
    # its page in the block table
    page = tl.load(block_table_ptr + b * stride_bt + offs_n // PAGE, mask=n_valid, other=0).to(tl.int64)
    off = page[:, None] * stride_kb + (offs_n % PAGE)[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
    k = tl.load(k_cache_ptr + off, mask=n_valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + off, mask=n_valid[:, None], other=0.0)
    return k, v


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, b, kv_head, lo, hi, qk_scale,
            window, stride_bt, stride_kb, stride_ks, stride_kh,
            D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr):
    # FlashAttention-2's inner loop over keys lo .. hi: running max m_i, running sum l_i (base 2),
    # unnormalised accumulator acc [rows, D]; q [rows, D]. MASK: 0 none (whole tiles every row sees),
    # 1 the keys at or past hi, 2 causal (key position <= q_pos of the row), 3 causal within the last
    # `window` positions of the row and below hi; with 3 a row may see no key of a whole tile
    # (-inf everywhere), and the running max of a row that has seen nothing yet must stay usable
    offs_d = tl.arange(0, D)
    offs_nb = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_nb
        n_valid = offs_n < hi
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, block_table_ptr, b, kv_head, offs_n, offs_d, n_valid,
                        stride_bt, stride_kb, stride_ks, stride_kh, PAGE)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        else:       # pages may be stored narrower than the queries (kv_cache_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * qk_scale       # [rows, BLOCK_N]
        if MASK == 2:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        elif MASK == 1:
            s = tl.where(n_valid[None, :], s, float("-inf"))
        elif MASK == 3:
            dist = q_pos[:, None] - offs_n[None, :]
            s = tl.where(n_valid[None, :] & (dist >= 0) & (dist < window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASK == 3:   # a row that has seen nothing yet subtracts 0, not -inf - -inf = NaN: p, alpha are 0
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_ptr, cu_q_ptr, seq_len_ptr, qk_scale,
                    window, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_kb, stride_ks, stride_kh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, DOT_FP32: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # one program: BLOCK_M queries of one sequence and one query head; streams [BLOCK_N, D] K/V tiles
    # from the pages (earlier chunks and prefix-cache hits included), online softmax, one output write
    tile = tl.num_programs(0) - 1 - tl.program_id(0)        # the longest (last) query tiles start first
    b, h = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_len_ptr + b)
        first_pos = seq_len - q_len                         # context position of the chunk's first query
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_valid = offs_m < q_len
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        q_pos = first_pos + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # whole key tiles up to the tile's first query are seen by all its queries: no mask; the tiles
        # from there to its last query take the causal mask; the tiles past it are fully masked and
        # never visited
        end = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)
        if HAS_WINDOW:
            # keys lo .. shared - 1 are seen by some of the tile's queries (each query's window edge
            # falls there); from `shared` on, every query's window reaches back past them (shared >=
            # end - window): the plain causal split from there
            lo = tl.maximum(first_pos + tile * BLOCK_M - window + 1, 0)
            shared = tl.maximum(lo, end - window)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, b,
                                    h // GROUP, lo, shared, qk_scale, window, stride_bt, stride_kb, stride_ks,
                                    stride_kh, D, BLOCK_N, PAGE, 3, DOT_FP32)
            unmasked_end = shared + tl.maximum(first_pos + tile * BLOCK_M + 1 - shared, 0) // BLOCK_N * BLOCK_N
        else:
            shared = 0
            unmasked_end = (first_pos + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, b, h // GROUP,
                                shared, unmasked_end, qk_scale, window, stride_bt, stride_kb, stride_ks, stride_kh,
                                D, BLOCK_N, PAGE, 0, DOT_FP32)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, b, h // GROUP,
                                unmasked_end, end, qk_scale, window, stride_bt, stride_kb, stride_ks, stride_kh,
                                D, BLOCK_N, PAGE, 2, DOT_FP32)
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_ml_ptr, block_table_ptr, seq_len_ptr,
                         qk_scale, window, stride_qt, stride_qh, stride_bt, stride_kb, stride_ks, stride_kh,
                         split_len, num_splits,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         PAGE: tl.constexpr, DOT_FP32: tl.constexpr, HAS_WINDOW: tl.constexpr):
    # flash-decoding: one program = one sequence, one KV head with all GROUP query heads that share
    # it (rows of one [BLOCK_G, D] block, so each K/V tile is read once), one slice of the context
    # (under a window: of its last `window` keys, the slices counted from the window's first key)
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_len_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None],
                other=0.0)                                                  # [BLOCK_G, D]
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    first = split * split_len
    if HAS_WINDOW:
        first += tl.maximum(seq_len - window, 0)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, offs_g, k_cache_ptr, v_cache_ptr, block_table_ptr, b, kv_head,
                            first, tl.minimum(seq_len, first + split_len), qk_scale, window,
                            stride_bt, stride_kb, stride_ks, stride_kh, D, BLOCK_N, PAGE, 1, DOT_FP32)
    # unnormalised partials; an empty split (past this sequence's end) keeps m = -inf, l = 0
    base = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split                       # [BLOCK_G]
    tl.store(part_out_ptr + base[:, None] * D + offs_d[None, :], acc, mask=g_valid[:, None])
    tl.store(part_ml_ptr + base * 2, m_i, mask=g_valid)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=g_valid)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh, num_splits,
                         D: tl.constexpr, SPLITS: tl.constexpr):
    # merge the slices by their log-sum-exp (base 2): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    base = (b * tl.num_programs(1) + h) * num_splits
    s_valid = offs_s < num_splits
    m = tl.load(part_ml_ptr + (base + offs_s) * 2, mask=s_valid, other=float("-inf"))
    l = tl.load(part_ml_ptr + (base + offs_s) * 2 + 1, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_valid & (l > 0), tl.exp2(m - m_max), 0.0)
    acc = tl.load(part_out_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k_cache.shape[2] * k_cache.shape[3]
    _store_kv_kernel[(num_tokens,)](k.to(k_cache.dtype).contiguous(), v.to(v_cache.dtype).contiguous(),
                                    k_cache, v_cache, slot_mapping, ROW=row, BLOCK=triton.next_power_of_2(row))


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 128        # prefill: queries per program
    block_n: int = 64         # keys per tile (may span pages), prefill and decode
    num_warps: int = 4
    num_stages: int = 3


def default_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    if device.type != "cuda":
        return TileConfig(block_m=16, block_n=32, num_warps=1, num_stages=1)    # the interpreter: small tiles
    if dtype == torch.float32:                  # twice the shared memory per tile
        return TileConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    # measured on an H200 (docs/benchmarks.md, "GPUs, first run"): at head dim 64, 8 warps beat 4 at 1k-16k
    # tokens; at 128 this one is best at 1k (the length of a 2048-token step's chunks), others from 4k
    if head_dim <= 64:
        return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, tiles: TileConfig | None = None, decode_split_len: int | None = None):
        self.tiles = tiles                      # None: default_tiles() for the head dim and device
        self.decode_split_len = decode_split_len    # None: enough splits to fill the device

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        q = q.contiguous()
        out = torch.empty_like(q)
        num_heads, head_dim = q.shape[1], q.shape[2]
        group = num_heads // k_cache.shape[2]
        tiles = self.tiles or default_tiles(head_dim, k_cache.dtype, q.device)
        tables = meta.block_tables.contiguous()
        dot_fp32 = INTERPRETING and q.dtype == torch.bfloat16
        if meta.is_pure_decode:
            self._decode(q, k_cache, v_cache, out, tables, meta, scale, group, tiles, dot_fp32)
            return out
        grid = (triton.cdiv(meta.max_query_len, tiles.block_m), meta.num_seqs, num_heads)
        _prefill_kernel[grid](q, k_cache, v_cache, out, tables, meta.query_start_loc, meta.seq_lens, scale * LOG2E,
                              meta.sliding_window or 0,
                              q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              GROUP=group, D=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                              PAGE=k_cache.shape[1], DOT_FP32=dot_fp32, HAS_WINDOW=meta.sliding_window is not None,
                              num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        return out

    def _split_len(self, num_seqs: int, num_kv_heads: int, max_len: int, block_n: int, device) -> int:
        if self.decode_split_len is not None:
            return self.decode_split_len
        # split the context only as far as needed to give every SM a few programs
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = max(1, min(triton.cdiv(4 * sms, num_seqs * num_kv_heads), triton.cdiv(max_len, 2 * block_n)))
        return triton.cdiv(triton.cdiv(max_len, splits), block_n) * block_n

    def _decode(self, q, k_cache, v_cache, out, tables, meta, scale, group, tiles: TileConfig, dot_fp32: bool):
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        # under a window a sequence's keys are at most its last `window`
        span = meta.max_seq_len if meta.sliding_window is None else min(meta.max_seq_len, meta.sliding_window)
        split_len = self._split_len(num_seqs, num_kv_heads, span, tiles.block_n, q.device)
        num_splits = triton.cdiv(span, split_len)
        parts = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_seqs * num_heads * num_splits, 2, dtype=torch.float32, device=q.device)
        _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, k_cache, v_cache, parts, ml, tables, meta.seq_lens, scale * LOG2E, meta.sliding_window or 0,
            q.stride(0), q.stride(1), tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            split_len, num_splits, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim,
            BLOCK_N=tiles.block_n, PAGE=k_cache.shape[1], DOT_FP32=dot_fp32,
            HAS_WINDOW=meta.sliding_window is not None, num_warps=4, num_stages=2)
        _decode_merge_kernel[(num_seqs, num_heads)](parts, ml, out, out.stride(0), out.stride(1), num_splits,
                                                    D=head_dim, SPLITS=triton.next_power_of_2(num_splits))
