"""GGUF weights as stored: Q4_0, Q4_1 and Q4_K are exactly group-32 int4 with a scale and a zero,
so they run on the int4 kernel as they are; other block types (Q8_0, Q5_*, Q6_K) become int8
weight-only (they hold more than four bits): with a scale per 32 columns on tokenmill's CPU kernel,
which gives Q8_0 back exactly, else with a scale per row (requantized from their exact values);
F32/F16 tensors stay dense.

The mappings, with w as gguf-py dequantizes it and q the stored nibble:
  Q4_0: w = d (q - 8)               -> s = d,        z = 0
  Q4_1: w = d q + m                 -> s = d,        z = m + 8 d
  Q4_K: w = d sc_j q - dmin m_j     -> s = d sc_j,   z = 8 s - dmin m_j   (j: 32-wide sub-block)
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import Q4_K

from tokenmill.quant.base import DenseKernel, ConcatKernel, GGUFTensor, LinearKernel, QuantMethod, Source, as_float
from tokenmill.quant.int4 import int4_kernel
from tokenmill.quant.int8 import int8_weight_kernel

INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
DENSE_TYPES = (T.F32, T.F16, T.BF16)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float64)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_groups(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K], scale [N, K / 32], zero [N, K / 32]) in float64, exact: (q - 8) * s + z is
    every weight gguf-py dequantizes, bit for bit once rounded to float32."""
    n, k = t.shape
    if t.qtype in (T.Q4_0, T.Q4_1):
        blocks = t.data.reshape(n, k // 32, -1)
        d = _f16(blocks[..., 0:2])
        if t.qtype == T.Q4_0:
            q, zero = _nibbles(blocks[..., 2:]), np.zeros_like(d)
        else:
            q, zero = _nibbles(blocks[..., 4:]), _f16(blocks[..., 2:4]) + 8 * d
        scale = d
    elif t.qtype == T.Q4_K:
        blocks = t.data.reshape(n * k // 256, 144)
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
        scale, mins = d * sc.astype(np.float64), dmin * m.astype(np.float64)       # [blocks, 8]
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 8, 32)
        zero = 8 * scale - mins
        scale, zero = scale.reshape(n, k // 32), zero.reshape(n, k // 32)
    else:
        raise ValueError(f"GGUF type {t.qtype.name} is not a group-32 int4 type")
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(n, k).astype(np.uint8))
    return q, torch.from_numpy(np.ascontiguousarray(scale)), torch.from_numpy(np.ascontiguousarray(zero))


def _kind(src: Source) -> str:
    if isinstance(src, GGUFTensor):
        if src.qtype in INT4_TYPES:
            return "int4"
        return "dense" if src.qtype in DENSE_TYPES else "int8"
    return "dense"


class GGUFMethod(QuantMethod):
    """Run each GGUF tensor in the kernel its block type maps onto; fused rows of one kind share one kernel."""
    name = "gguf"

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        kinds = [_kind(p) for p in parts]
        if len(set(kinds)) > 1:
            return ConcatKernel([self.kernel([p], dtype, device) for p in parts])
        label = "/".join(dict.fromkeys(p.qtype.name for p in parts if isinstance(p, GGUFTensor))) or "F32"
        if kinds[0] == "int4":
            q, s, z = (torch.cat(x) for x in zip(*(int4_groups(p) for p in parts)))
            return int4_kernel(q, s, z, 32, device, label=f"{label} -> int4")
        w = torch.cat([as_float(p) for p in parts])
        packed = int8_weight_kernel(w, label, device) if kinds[0] == "int8" else None
        return packed if packed is not None else DenseKernel(w.to(device=device, dtype=dtype))
