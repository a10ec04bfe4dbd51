"""tokenmill's weight-only products for GPUs, in Triton: y [M, N] = x [M, K] @ W^T with W kept as stored,
int4 (int4_mm) or int8 with a scale per group of columns (int8_mm: GGUF Q8_0 exactly, and Q5/Q6 requantized
to it, as on the CPU).

int4_mm:
The weights are the CPU kernel's (kernels/cpu.c): uint8 [N, K / 2], per 32 columns 16 bytes whose low
nibbles are columns 0..15 and high nibbles columns 16..31 (GGUF's Q4_0/Q4_1 order), and float32
scale_offset [N, K / group, 2] with w = q * scale + offset. A program computes a [BM, BN] tile of y: per BK
columns it loads BK / 2 bytes of each of its BN weight rows, splits them into the low and the high nibbles,
dequantizes both halves in registers (float32, then the activations' dtype) and multiplies each with the
matching columns of x (the low-nibble columns and the ones 16 further), accumulating in float32. The
weights never exist unpacked in memory, so a decode step reads ~0.75 bytes per weight instead of 2.

More than FUSED_MAX_ROWS rows take another route (vLLM's for GGUF on GPUs): one Triton pass dequantizes
SLAB weight rows at a time to the activations' dtype (_int4_dequantize_kernel, _int8_dequantize_kernel) and
cuBLAS multiplies them (F.linear); the dequantized slab (2 or 4 bytes a weight, at most SLAB rows) lives for
one call. Timed on an H200 (benchmarks/gpu_quant.py, docs/benchmarks.md "GPUs, second run"): up to 64 rows
every product of the default model is launch-bound and the fused kernel's one launch beats the slab route's
two per slab (the lm_head at 64 rows 426 against 542 µs); at 512 rows the fused kernel is compute-bound in
tiles unsuited to tensor cores and the slab route wins (the lm_head 533 against 2979 µs). Recorded in a CUDA
graph (cuda_graphs.py: the engine's decode steps), launches cost nothing and the device's own times decide:
the slab route is ahead at every row count (1 row: 8-13 against 13-44 µs for a layer's products, 75 against
104 µs for the lm_head), so a product being recorded always takes it.

Under TRITON_INTERPRET=1 it runs on CPU tensors (the tests do this); the interpreter computes tl.dot on
bfloat16 wrongly (numpy has no bfloat16), so there bfloat16 activations meet float32 operands; float16 ones
take the GPU's own branch (weights rounded to the activations' dtype, then the dot).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _int4_mm_kernel(x_ptr, q_ptr, so_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    F32_DOT: tl.constexpr):
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)       # 64-bit offsets: M x N may pass 2^31
    rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    j = tl.arange(0, BK // 2)                      # bytes of the tile
    low_col = (j // 16) * 32 + j % 16              # the column of byte j's low nibble; its high one is 16 further
    row_in, col_in = rm[:, None] < M, rn[:, None] < N
    groups = K // GROUP
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        packed = tl.load(q_ptr + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=col_in, other=0)
        so = so_ptr + rn[:, None] * (2 * groups) + ((k0 + low_col) // GROUP)[None, :] * 2      # [BN, BK / 2]
        scale = tl.load(so, mask=col_in, other=0.0)
        offset = tl.load(so + 1, mask=col_in, other=0.0)
        w_low = (packed & 15).to(tl.float32) * scale + offset
        w_high = (packed >> 4).to(tl.float32) * scale + offset
        x_row = x_ptr + rm[:, None] * stride_xm + (k0 + low_col)[None, :]
        x_low = tl.load(x_row, mask=row_in, other=0.0)
        x_high = tl.load(x_row + 16, mask=row_in, other=0.0)
        if F32_DOT:
            acc += tl.dot(x_low.to(tl.float32), tl.trans(w_low), input_precision="ieee")
            acc += tl.dot(x_high.to(tl.float32), tl.trans(w_high), input_precision="ieee")
        else:
            acc += tl.dot(x_low, tl.trans(w_low.to(x_low.dtype)))
            acc += tl.dot(x_high, tl.trans(w_high.to(x_high.dtype)))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_in & (rn[None, :] < N))


def _tiles(m: int, k: int) -> tuple[int, int, int]:
    """(BM, BN, BK): row tiles of 16 to 64 as the rows need, K in 64s (32s where it must)."""
    return (16 if m <= 16 else 32 if m <= 32 else 64), (32 if m <= 32 else 64), (64 if k % 64 == 0 else 32)


def _fits(bits: int, q: torch.Tensor, scales: torch.Tensor, group: int, k: int) -> bool:
    """Whether q and scales hold a weight of k columns as these kernels take it, by rows (not the CPU kernels'
    tiles): int4 uint8 [N, K / 2] (kernels.pack_int4) with scale and offset [N, K / group, 2], or int8 [N, K] with
    scale [N, K / group]; float32 scales, both contiguous and on one device, `group` a multiple of 32."""
    n, int4 = q.shape[0], bits == 4
    return (bits in (4, 8) and q.dtype is (torch.uint8 if int4 else torch.int8) and q.dim() == 2
            and q.shape[1] * (2 if int4 else 1) == k and group % 32 == 0 and k % group == 0 and q.is_contiguous()
            and q.device == scales.device
            and scales.dtype is torch.float32 and scales.is_contiguous()
            and scales.numel() == (2 if int4 else 1) * n * (k // group))


FUSED_MAX_ROWS = 64      # above: dequantize, then cuBLAS (measured: the module's docstring)
SLAB = 8192              # weight rows dequantized at a time on that route: a 128k-row lm_head never whole


@triton.jit
def _int4_dequantize_kernel(q_ptr, so_ptr, w_ptr, N, K, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """w [N, K] = q * scale + offset, a [BN, BK] tile a program (BK / 2 bytes of each of BN rows)."""
    rn = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    j = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)        # bytes of the row
    low_col = (j // 16) * 32 + j % 16
    inside = (rn[:, None] < N) & (j[None, :] < K // 2)
    packed = tl.load(q_ptr + rn[:, None] * (K // 2) + j[None, :], mask=inside, other=0)
    so = so_ptr + rn[:, None] * (2 * (K // GROUP)) + (low_col // GROUP)[None, :] * 2
    scale = tl.load(so, mask=inside, other=0.0)
    offset = tl.load(so + 1, mask=inside, other=0.0)
    out = w_ptr + rn[:, None] * K + low_col[None, :]
    tl.store(out, ((packed & 15).to(tl.float32) * scale + offset).to(w_ptr.dtype.element_ty), mask=inside)
    tl.store(out + 16, ((packed >> 4).to(tl.float32) * scale + offset).to(w_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _int8_dequantize_kernel(q_ptr, s_ptr, w_ptr, N, K, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """w [N, K] = q * scale, a [BN, BK] tile a program."""
    rn = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    inside = (rn[:, None] < N) & (kk[None, :] < K)
    q = tl.load(q_ptr + rn[:, None] * K + kk[None, :], mask=inside, other=0)
    scale = tl.load(s_ptr + rn[:, None] * (K // GROUP) + (kk // GROUP)[None, :], mask=inside, other=0.0)
    tl.store(w_ptr + rn[:, None] * K + kk[None, :], (q.to(tl.float32) * scale).to(w_ptr.dtype.element_ty), mask=inside)


def dequantize(bits: int, q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights these products take (int4: q uint8 [N, K / 2] with scale_offset; int8: q int8 [N, K] with
    scale), dequantized to dense [N, K] in `dtype` on their device in one pass."""
    n, k = q.shape[0], q.shape[1] * (2 if bits == 4 else 1)
    if not _fits(bits, q, scales, group, k):
        raise ValueError(f"triton dequantize: unsupported arguments {q.dtype} {tuple(q.shape)}, "
                         f"{scales.dtype} {tuple(scales.shape)}, group {group}")
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    bn, bk = 32, 128
    kernel = _int4_dequantize_kernel if bits == 4 else _int8_dequantize_kernel
    kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](q, scales, w, n, k, GROUP=group, BN=bn, BK=bk)
    return w


def _launch(kernel, bits: int, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group: int,
            fused: bool | None) -> torch.Tensor:
    """The checks, then `kernel` over [BM, BN] tiles of y [M, N] in x's dtype, or the weights dequantized to
    x's dtype and F.linear; fused=None: the kernel up to FUSED_MAX_ROWS rows launched eagerly, never while a
    CUDA graph records (benchmarks force either)."""
    m, k = x.shape
    n, name = q.shape[0], f"int{bits}_mm"
    if not (_fits(bits, q, scales, group, k) and x.device == q.device
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(f"triton {name}: unsupported arguments " + ", ".join(
            f"{t.dtype} {tuple(t.shape)} on {t.device}" for t in (x, q, scales)))
    if fused is None:
        fused = m <= FUSED_MAX_ROWS and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    if not fused:
        if n <= SLAB:                      # one slab: cuBLAS writes y itself, no copy into it
            return torch.nn.functional.linear(x, dequantize(bits, q, scales, group, x.dtype))
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        for i in range(0, n, SLAB):        # rows of q and of scales: contiguous slices
            y[:, i:i + SLAB] = torch.nn.functional.linear(x, dequantize(bits, q[i:i + SLAB], scales[i:i + SLAB],
                                                                        group, x.dtype))
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, bk = _tiles(m, k)
    kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, q, scales, y, m, n, k, x.stride(0), y.stride(0), GROUP=group, BM=bm, BN=bn, BK=bk,
        F32_DOT=x.dtype == torch.float32 or (INTERPRETING and x.dtype == torch.bfloat16))
    return y


def int4_mm(x: torch.Tensor, q: torch.Tensor, scale_offset: torch.Tensor, group: int,
            fused: bool | None = None) -> torch.Tensor:
    """x [M, K] (float16, bfloat16 or float32), q uint8 [N, K / 2], scale_offset float32 [N, K / group, 2], all
    on one device -> [M, N] in x's dtype."""
    return _launch(_int4_mm_kernel, 4, x, q, scale_offset, group, fused)


@triton.jit
def _int8_mm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    F32_DOT: tl.constexpr):
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    kk = tl.arange(0, BK)
    row_in, col_in = rm[:, None] < M, rn[:, None] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        q = tl.load(q_ptr + rn[:, None] * K + (k0 + kk)[None, :], mask=col_in, other=0)
        scale = tl.load(s_ptr + rn[:, None] * (K // GROUP) + ((k0 + kk) // GROUP)[None, :], mask=col_in, other=0.0)
        w = q.to(tl.float32) * scale
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + kk)[None, :], mask=row_in, other=0.0)
        if F32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=row_in & (rn[None, :] < N))


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int,
            fused: bool | None = None) -> torch.Tensor:
    """x [M, K] (float16, bfloat16 or float32), q int8 [N, K], scale float32 [N, K / group] (group a multiple
    of 32), all on one device -> [M, N] in x's dtype."""
    return _launch(_int8_mm_kernel, 8, x, q, scale, group, fused)
