"""Triton kernels over the paged KV cache: K/V store by slot mapping, FlashAttention-2 style
prefill / chunked prefill, and flash-decoding for pure decode batches.

Every kernel reads pages straight through the block table and maps query head h to KV head
h // group, so K/V are never gathered or repeated in memory. Under TRITON_INTERPRET=1 they run on
CPU tensors (the tests do this); on CUDA they are the default backend.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokenmill.attention.base import AttentionBackend, AttentionMetadata

# triton's CPU interpreter computes tl.dot on bfloat16 wrongly (numpy has no bfloat16): there the
# prefill kernel feeds its dots float32 copies; compiled on a GPU it keeps bfloat16 operands.
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


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_table_ptr, cu_q_ptr, seq_len_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_kb, stride_ks, stride_kh,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, PAGE: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    # one program: BLOCK_M queries of one sequence and one query head; streams the KV pages
    tile, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_len_ptr + b)
        first_pos = seq_len - q_len                         # context position of the first query
        kv_head = h // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_p = tl.arange(0, PAGE)
        m_valid = offs_m < q_len
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        q_pos = first_pos + offs_m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # causal: keys past the tile's last query are never visited (fully masked tiles skipped)
        end = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)
        for start in range(0, end, PAGE):
            page = tl.load(block_table_ptr + b * stride_bt + start // PAGE).to(tl.int64)
            offs_n = start + offs_p
            kv_off = page * stride_kb + offs_p[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
            n_valid = offs_n < seq_len
            k = tl.load(k_cache_ptr + kv_off, mask=n_valid[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=n_valid[:, None], other=0.0)
            if DOT_FP32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale                  # [BLOCK_M, PAGE]
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, part_out_ptr, part_ml_ptr, block_table_ptr, seq_len_ptr,
                         scale, stride_qt, stride_qh, stride_bt, stride_kb, stride_ks, stride_kh,
                         pages_per_split, num_splits,
                         GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr):
    # flash-decoding: one program = one sequence, one query head, one slice of the context
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_len_ptr + b)
    kv_head = h // GROUP
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, PAGE)
    q = tl.load(q_ptr + b * stride_qt + h * stride_qh + offs_d).to(tl.float32)
    m_i = tl.max(tl.full([PAGE], float("-inf"), tl.float32), 0)     # fp32 scalars, loop-carried
    l_i = tl.sum(tl.zeros([PAGE], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    first = split * pages_per_split * PAGE
    last = tl.minimum(seq_len, first + pages_per_split * PAGE)
    for start in range(first, last, PAGE):
        page = tl.load(block_table_ptr + b * stride_bt + start // PAGE).to(tl.int64)
        offs_n = start + offs_p
        n_valid = offs_n < seq_len
        kv_off = page * stride_kb + offs_p[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=n_valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off, mask=n_valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(n_valid, tl.sum(q[None, :] * k, 1) * scale, float("-inf"))        # [PAGE]
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    base = (b * tl.num_programs(1) + h) * num_splits + split
    tl.store(part_out_ptr + base * D + offs_d, acc)     # unnormalised; empty splits keep m = -inf, l = 0
    tl.store(part_ml_ptr + base * 2, m_i)
    tl.store(part_ml_ptr + base * 2 + 1, l_i)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh, num_splits,
                         D: tl.constexpr, SPLITS: tl.constexpr):
    # merge the slices by their log-sum-exp: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    base = (b * tl.num_programs(1) + h) * num_splits
    s_valid = offs_s < num_splits
    m = tl.load(part_ml_ptr + (base + offs_s) * 2, mask=s_valid, other=float("-inf"))
    l = tl.load(part_ml_ptr + (base + offs_s) * 2 + 1, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_valid & (l > 0), tl.exp(m - m_max), 0.0)
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


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, block_m: int = 16, decode_pages_per_split: int = 16):
        self.block_m = block_m
        self.pages_per_split = decode_pages_per_split

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        q = q.contiguous()
        out = torch.empty_like(q)
        num_heads, head_dim = q.shape[1], q.shape[2]
        group = num_heads // k_cache.shape[2]
        page = k_cache.shape[1]
        tables = meta.block_tables.contiguous()
        if meta.is_pure_decode:
            self._decode(q, k_cache, v_cache, out, tables, meta, scale, group, page)
            return out
        grid = (triton.cdiv(meta.max_query_len, self.block_m), meta.num_seqs, num_heads)
        _prefill_kernel[grid](q, k_cache, v_cache, out, tables, meta.query_start_loc, meta.seq_lens, scale,
                              q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              GROUP=group, D=head_dim, BLOCK_M=self.block_m, PAGE=page,
                              DOT_FP32=INTERPRETING and q.dtype == torch.bfloat16)
        return out

    def _decode(self, q, k_cache, v_cache, out, tables, meta, scale, group, page):
        num_seqs, num_heads, head_dim = q.shape
        max_pages = triton.cdiv(meta.max_seq_len, page)
        num_splits = triton.cdiv(max_pages, self.pages_per_split)
        parts = torch.empty(num_seqs * num_heads * num_splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_seqs * num_heads * num_splits, 2, dtype=torch.float32, device=q.device)
        _decode_split_kernel[(num_seqs, num_heads, num_splits)](
            q, k_cache, v_cache, parts, ml, tables, meta.seq_lens, scale,
            q.stride(0), q.stride(1), tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            self.pages_per_split, num_splits, GROUP=group, D=head_dim, PAGE=page)
        _decode_merge_kernel[(num_seqs, num_heads)](parts, ml, out, out.stride(0), out.stride(1), num_splits,
                                                    D=head_dim, SPLITS=triton.next_power_of_2(num_splits))
