"""int8 weights: W8A8 (per-channel weights, per-token dynamic activations, int8 x int8 -> int32)
made at load ("int8"), and int8 weight-only for GGUF types the int4 kernel cannot hold."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.quant.base import DenseKernel, LinearKernel, QuantMethod, Source, as_float


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w ~= q * scale[:, None]."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8WeightKernel(LinearKernel):
    """int8 weights with a scale per output row; activations stay floating. Rows of the same storage
    serve an embedding lookup, so a tied embedding and lm_head share it.

    Few rows (decode): aten._weight_int8pack_mm on bfloat16 activations (its float32 path is ~30x
    slower). Many rows (prefill, prompt scoring): dequantize a slab of weight rows at a time and use
    the dense product, which is faster there (benchmarks/quantization.py)."""
    MAX_KERNEL_ROWS = 32
    serves_rows = True
    SLAB = 4096

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, label: str = "int8 weight-only"):
        super().__init__()
        self.out_features, self.label = q.shape[0], label
        self.register_buffer("q", q.contiguous())                 # [N, K] int8
        self.register_buffer("scale", scale.float().contiguous())  # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= self.MAX_KERNEL_ROWS and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype)
        else:
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for i in range(0, self.out_features, self.SLAB):
                w = self.q[i:i + self.SLAB].to(x.dtype) * self.scale[i:i + self.SLAB, None].to(x.dtype)
                y[:, i:i + self.SLAB] = x2 @ w.t()
        return y.reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.q[ids].float() * self.scale[ids, None]).to(dtype)

    def describe(self) -> str:
        return self.label


class W8A8Kernel(LinearKernel):
    """y = (sx * sw) * (int8(x / sx) @ q^T), sx per token (absmax / act_range), sw per output row.

    act_range 127 maps absmax onto +-127 (vLLM's dynamic quantization); compressed-tensors checkpoints
    use 127.5 with rounding clamped to [-128, 127], which is what their reference computes."""

    serves_rows = True

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, label: str = "int8 w8a8", act_range: float = 127.0):
        super().__init__()
        self.out_features, self.label, self.act_range = q.shape[0], label, act_range
        self.register_buffer("qt", q.t().contiguous().t())         # [N, K], stored K-major for _int_mm
        self.register_buffer("scale", scale.float().contiguous())   # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        sx = (xf.abs().amax(dim=1, keepdim=True) / self.act_range).clamp(min=1e-12)     # [M, 1]
        xq = torch.round(xf / sx).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qt.t())                                   # [M, N] int32
        y = acc.float() * sx * self.scale
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
