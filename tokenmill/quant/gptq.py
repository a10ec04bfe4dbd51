"""GPTQ and AWQ checkpoints (Hugging Face directories with `quantization_config`) on the int4 kernel.

GPTQ (`checkpoint_format` "gptq" = v1, or "gptq_v2"), per linear:
  qweight int32 [K / 8, N]   eight 4-bit values along K per int32, value j at bits 4j
  qzeros  int32 [G, N / 8]   zero points packed along N; v1 stores zero - 1
  scales  fp16  [G, N]       g_idx int32 [K]: the group of each input column (act-order when unsorted)
  w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]
AWQ (`version` "gemm"): qweight int32 [K, N / 8] and qzeros [G, N / 8] packed along N in the nibble
order 0, 2, 4, 6, 1, 3, 5, 7; w = scales * (q - zero).

On the kernel, w = (q - 8) * s + z, so z = (8 - zero) * s; act-order becomes a permutation of the
input columns that makes every group contiguous. 8-bit GPTQ is two int4 kernels summed:
q = 16 hi + lo, each nibble with its own scale and zero, exactly.
"""
from __future__ import annotations

import torch

from tokenmill.quant.base import DenseKernel, LinearKernel, QuantMethod, Source, SumKernel, as_float
from tokenmill.quant.int4 import int4_kernel

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding 32 / bits values along R -> uint8 [R * 32 / bits, C]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return vals.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] holding 32 / bits values along C -> uint8 [R, C * 32 / bits]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)              # [R, C, per]
    if order is not None:                                                     # vals[..., j] is column order[j]
        vals = vals[..., torch.tensor([order.index(i) for i in range(per)])]
    return vals.reshape(packed.shape[0], -1).to(torch.uint8)


class PackedInt4Method(QuantMethod):
    """GPTQ / AWQ checkpoints: each matrix arrives as {qweight, qzeros, scales[, g_idx]}."""

    def __init__(self, name: str, bits: int, group_size: int, v1_zeros: bool, awq: bool, dequantize: bool = False):
        if bits not in (4, 8) or (awq and bits != 4):
            raise ValueError(f"quantization_config.bits {bits} is not supported for {name} (supported: "
                             f"{'4' if awq else '4 and 8'})")
        self.name, self.bits, self.group_size, self.v1_zeros, self.awq = name, bits, group_size, v1_zeros, awq
        self.dequantize = dequantize            # the dense float reference of the same weights

    @property
    def packed(self) -> bool:
        return not self.dequantize

    def source_names(self) -> tuple[str, ...]:
        return ("weight", "qweight", "qzeros", "scales", "g_idx")

    def unpack(self, src: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q uint8 [N, K], zero [N, G], scale [N, G], g_idx [K] or None)."""
        if self.awq:
            q = unpack_cols(src["qweight"], 4, AWQ_ORDER).t()
            zero = unpack_cols(src["qzeros"], 4, AWQ_ORDER).t()
            g_idx = None
        else:
            q = unpack_rows(src["qweight"], self.bits).t()
            zero = unpack_cols(src["qzeros"], self.bits).t()
            g_idx = src.get("g_idx")
        zero = zero.float() + (1 if self.v1_zeros else 0)
        return q.contiguous(), zero, src["scales"].float().t(), g_idx

    def _group(self, k: int) -> int:
        return k if self.group_size in (-1, 0) else self.group_size

    def _dense(self, q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor | None
               ) -> torch.Tensor:
        """The float32 [N, K] the unpacked tensors stand for."""
        g = g_idx.long() if g_idx is not None else torch.arange(q.shape[1]) // self._group(q.shape[1])
        return (scale.double()[:, g] * (q.double() - zero.double()[:, g])).float()

    def shape(self, src: Source) -> tuple[int, int]:
        if not isinstance(src, dict):
            return super().shape(src)
        rows = src["qweight"].shape[0]
        return src["scales"].shape[1], rows if self.awq else rows * 32 // self.bits

    def slice(self, src: Source, dim: int, start: int, end: int) -> Source:
        """A rank's piece in the checkpoint's own packing: N cuts on whole int32 words, K cuts on whole
        groups; a piece that would split a word or a group (or act-order columns) comes back dense."""
        if not isinstance(src, dict):
            return super().slice(src, dim, start, end)
        per = 32 // self.bits
        qweight, qzeros, scales, g_idx = src["qweight"], src["qzeros"], src["scales"], src.get("g_idx")
        k = qweight.shape[0] if self.awq else qweight.shape[0] * per
        group = self._group(k)
        if dim == 0 and start % per == 0 and end % per == 0:
            words = slice(start // per, end // per)
            piece = {"qweight": qweight[:, words] if self.awq else qweight[:, start:end], "qzeros": qzeros[:, words],
                     "scales": scales[:, start:end]}
            return piece | ({"g_idx": g_idx} if g_idx is not None else {})
        per_channel = scales.shape[0] == 1
        ordered = g_idx is None or torch.equal(g_idx.long(), torch.arange(k) // group)
        aligned = self.awq or (start % per == 0 and end % per == 0)            # AWQ packs along N, not K
        if dim == 1 and ordered and aligned and (per_channel or (start % group == 0 and end % group == 0)):
            groups = slice(0, 1) if per_channel else slice(start // group, end // group)
            piece = {"qweight": qweight[start:end] if self.awq else qweight[start // per:end // per],
                     "qzeros": qzeros[groups], "scales": scales[groups]}
            if g_idx is not None:
                piece["g_idx"] = g_idx[start:end] - (0 if per_channel else start // group)
            return piece
        q, zero, scale, g_idx = self.unpack(src)           # dense, cut before dequantizing: [N, K] float32
        if dim == 0:
            return self._dense(q[start:end], zero[start:end], scale[start:end], g_idx)
        g = g_idx.long() if g_idx is not None else torch.arange(q.shape[1]) // self._group(q.shape[1])
        return self._dense(q[:, start:end], zero, scale, g[start:end])

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        if all(isinstance(p, torch.Tensor) for p in parts):          # left unquantized (lm_head, usually)
            return DenseKernel(torch.cat([as_float(p, dtype) for p in parts]).to(device))
        for p in parts:
            if not isinstance(p, dict) or not {"qweight", "qzeros", "scales"} <= p.keys():
                raise ValueError(f"{self.name}: a quantized linear needs qweight, qzeros and scales")
        unpacked = [self.unpack(p) for p in parts]
        q = torch.cat([u[0] for u in unpacked])
        zero = torch.cat([u[1] for u in unpacked])
        scale = torch.cat([u[2] for u in unpacked])
        k = q.shape[1]
        group = self._group(k)
        g_idx = unpacked[0][3]
        if self.dequantize:
            return DenseKernel(self._dense(q, zero, scale, g_idx).to(device=device, dtype=dtype))
        perm = None
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
            perm = torch.argsort(g_idx.long(), stable=True)
            q = q[:, perm]
            zero, scale = zero[:, g_idx.long()[perm]], scale[:, g_idx.long()[perm]]   # per column now
            zero, scale = zero[:, ::group], scale[:, ::group]
        if self.bits == 4:
            return int4_kernel(q, scale, (8 - zero) * scale, group, device, perm, label=f"{self.name} int4")
        hi, lo = q >> 4, q & 15                      # w = s (16 hi + lo - zero)
        return SumKernel([int4_kernel(hi, 16 * scale, torch.zeros_like(scale) + 128 * scale, group, device, perm,
                                      label=f"{self.name} int8 (hi)"),
                          int4_kernel(lo, scale, (8 - zero) * scale, group, device, perm,
                                      label=f"{self.name} int8 (lo)")])
