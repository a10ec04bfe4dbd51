"""int8 weights: W8A8 (per-channel weights, per-token dynamic activations, int8 x int8 -> int32)
made at load ("int8"), and int8 weight-only for GGUF types the int4 kernel cannot hold."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.quant.base import DenseKernel, LinearKernel, QuantMethod, Source, as_float


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~= q * scale[:, None]."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_per_group(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per `group` columns of each row: w ~= q * scale[:, k // group]. Exact for GGUF Q8_0
    (whose blocks are 32 int8 values times one scale)."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    scale = (g.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    return torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k), scale


class Int8WeightKernel(LinearKernel):
    """int8 weights with a scale per output row (`scale` [N]) or per row and group of 32 columns
    ([N, K / 32], tokenmill's CPU kernel only); activations stay floating. Rows of the same storage
    serve an embedding lookup, so a tied embedding and lm_head share it.

    Where tokenmill's CPU kernels run, the weights are kept in their tiles (kernels.tile_int8) and every product
    runs there: float32 activations rounded to int8 per 32 columns (llama.cpp's Q8_0 x Q8_0), or int8 activations
    used exactly (W8A8's integers; the result is then float32). Elsewhere aten._weight_int8pack_mm on bfloat16
    activations for few rows (its float32 path is ~30x slower), and for many rows (prefill, prompt scoring) a slab
    of weight rows dequantized at a time and the dense product."""
    MAX_KERNEL_ROWS = 32            # PyTorch's int8 kernel
    serves_rows = True
    SLAB = 4096

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, label: str = "int8 weight-only"):
        super().__init__()
        n, k = q.shape
        self.out_features, self.label = n, label
        self.native = kernels.multiplies(k)
        if scale.dim() == 2 and not self.native:
            raise ValueError("int8 weights with group scales need tokenmill's CPU kernel (tokenmill/kernels)")
        self.group = k // scale.shape[1] if scale.dim() == 2 else k
        scale = scale.float()
        if self.native:
            q, scale = kernels.tile_int8(q, scale.view(n, -1))
        self.register_buffer("q", q.contiguous())                 # [N, K], or the CPU kernel's tiles
        self.register_buffer("scale", scale.contiguous())         # [N], or the tiles' [N8, K / group, 8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dtype = torch.float32 if x.dtype == torch.int8 else x.dtype
        x2 = x.reshape(-1, shape[-1])
        if self.native:
            y = kernels.int8_mm(x2 if x2.dtype == torch.int8 else x2.float(), self.q, self.scale, self.out_features,
                                self.group).to(dtype)
        elif x2.shape[0] <= self.MAX_KERNEL_ROWS and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale.to(torch.bfloat16))
            y = y.to(dtype)
        else:
            x2 = x2.to(dtype)
            y = torch.empty(x2.shape[0], self.out_features, dtype=dtype, device=x.device)
            for i in range(0, self.out_features, self.SLAB):
                y[:, i:i + self.SLAB] = x2 @ self._dense(slice(i, i + self.SLAB), dtype).t()
        return y.reshape(*shape[:-1], self.out_features)

    def _dense(self, rows, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows `rows` (ids or a slice) as `dtype` [..., K], from their per-row scales (off the CPU kernel)."""
        return self.q[rows].to(dtype) * self.scale[rows, None].to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.native:
            return kernels.int8_rows(self.q, self.scale, ids).to(dtype).view(*ids.shape, -1)
        return self._dense(ids, dtype)

    def packed_weights(self) -> kernels.PackedWeights | None:
        return kernels.PackedWeights(8, self.q, self.scale, self.group) if self.native else None

    def describe(self) -> str:
        return self.label


class TritonInt8Kernel(LinearKernel):
    """int8 weights with a scale per row and group of 32 columns on a GPU, multiplied by tokenmill's Triton kernel
    (kernels/triton_mm.py), which dequantizes them in registers up to 64 rows launched eagerly, else (more rows,
    or recorded in a CUDA graph) into a dense slab for cuBLAS; rows of the same storage serve a tied embedding."""
    serves_rows = True

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, device: torch.device, label: str):
        super().__init__()
        self.out_features, self.label, self.group = q.shape[0], label, q.shape[1] // scale.shape[1]
        self.register_buffer("q", q.contiguous().to(device))                     # [N, K] int8
        self.register_buffer("scale", scale.float().contiguous().to(device))     # [N, K / group]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.kernels import triton_mm
        y = triton_mm.int8_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale, self.group)
        return y.reshape(*x.shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, scale = self.q[ids].float(), self.scale[ids]
        return (q.view(len(ids), -1, self.group) * scale[..., None]).view(len(ids), -1).to(dtype)

    def describe(self) -> str:
        return self.label


def int8_weight_kernel(w: torch.Tensor, label: str, device: torch.device = torch.device("cpu")) -> LinearKernel | None:
    """int8 weight-only from float weights: a scale per 32 columns where tokenmill's kernels run (Q8_0's
    values come back exactly: its CPU kernel, or its Triton kernel on CUDA), else a scale per row on the CPU;
    None on another device (the caller keeps the weights dense)."""
    if device.type == "cpu" and kernels.multiplies(w.shape[1]):
        return Int8WeightKernel(*quantize_per_group(w, 32), label=f"{label} -> int8 g32")
    if device.type == "cpu":
        return Int8WeightKernel(*quantize_per_channel(w), label=f"{label} -> int8 per-row")
    if kernels.multiplies(w.shape[1], device):
        return TritonInt8Kernel(*quantize_per_group(w, 32), device, label=f"{label} -> int8 g32 (triton)")
    return None


class W8A8Kernel(LinearKernel):
    """y = (sx * sw) * (int8(x / sx) @ q^T), sx per token (absmax / act_range), sw per output row.

    act_range 127 maps absmax onto +-127 (vLLM's dynamic quantization); compressed-tensors checkpoints
    use 127.5 with rounding clamped to [-128, 127], which is what their reference computes.

    Where tokenmill's CPU kernels run, the quantized activations meet the int8 weights in its int8 kernel as
    the same integers (every product and 32-column sum exact, the rest float32; the weights in its tiles, so
    decode steps go through kernels.DecoderStack): with VNNI ~3x torch._int_mm at 1 row, 0.7-0.8x at 64-512
    rows (oneDNN), and without VNNI ~10x it (its CPU path is slow there: 12.8 ms against 0.43 ms for float32
    at 17 rows, docs/benchmarks.md). Elsewhere torch._int_mm."""

    serves_rows = True

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, label: str = "int8 w8a8", act_range: float = 127.0):
        super().__init__()
        self.out_features, self.label, self.act_range = q.shape[0], label, act_range
        # the weight-only class only on tokenmill's kernel, which takes the integers as they are (PyTorch's int8
        # weight-only kernel would round scales and sums to bfloat16)
        self.weight_only = Int8WeightKernel(q, scale, label) if kernels.multiplies(q.shape[1]) else None
        if self.weight_only is None:
            self.register_buffer("qt", q.t().contiguous().t())         # [N, K], stored K-major for _int_mm
            self.register_buffer("scale", scale.float().contiguous())   # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        sx = (xf.abs().amax(dim=1, keepdim=True) / self.act_range).clamp(min=1e-12)     # [M, 1]
        xq = torch.round(xf / sx).clamp(-128, 127)
        if self.weight_only is not None:       # integer operands, every product exact
            y = self.weight_only(xq.to(torch.int8)) * sx
        else:
            y = torch._int_mm(xq.to(torch.int8), self.qt.t()).float() * sx * self.scale     # [M, N]
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def packed_weights(self) -> kernels.PackedWeights | None:
        """The int8 weights with this kernel's per-token activation rounding, where they run on tokenmill's kernel."""
        if self.weight_only is None:
            return None
        return self.weight_only.packed_weights()._replace(act_range=self.act_range)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_only is not None:
            return self.weight_only.rows(ids, dtype)
        return (self.qt[ids].float() * self.scale[ids, None]).to(dtype)

    def describe(self) -> str:
        return self.label


class Int8Method(QuantMethod):
    """"int8": W8A8 made at load from any weights (symmetric per-channel, dynamic per-token)."""
    name = "int8"
    quantizes_dense = True

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        q, scale = quantize_per_channel(torch.cat([as_float(p) for p in parts]))
        if device.type != "cpu":
            return DenseKernel((q.float() * scale[:, None]).to(device=device, dtype=dtype))
        return W8A8Kernel(q, scale)
