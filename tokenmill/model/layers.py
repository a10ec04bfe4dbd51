"""Building blocks shared by the decoder models: RMSNorm, rotary embedding, gated MLP."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.parallel.comm import SINGLE, TPGroup


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            out = kernels.rms_norm(x, self.weight, self.eps)
            return out if out is not None else F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled).float()


class RotaryEmbedding(nn.Module):
    """Hugging Face's rotate-half (NeoX) rope over a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)   # [max_positions, head_dim / 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim / 2]: looked up once per step, shared by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by position; Q and K heads go through as one tensor (fewer small ops
    per layer, which is what a decode step at batch 1 spends its time on besides the weights)."""
    out = kernels.rope(x, cos, sin)
    if out is not None:
        return out
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with "silu", GeGLU with "gelu_pytorch_tanh"."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, act: str = "silu", tp: TPGroup = SINGLE):
        super().__init__()
        from tokenmill.model.linear import QLinear
        local = intermediate // tp.size
        self.gate_up = QLinear(hidden, [local, local], False, dtype, shards=[tp.rows()] * 2)
        self.down = QLinear(local, [hidden], False, dtype, shards=[tp.columns()], reduce=tp)
        self.act = "gelu_tanh" if act == "gelu_pytorch_tanh" else "silu"         # as kernels.gated names them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        act = kernels.gated(gate_up, self.act)
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = (F.gelu(gate, approximate="tanh") if self.act == "gelu_tanh" else F.silu(gate)) * up
        return self.down(act)
