"""compressed-tensors checkpoints (llm-compressor's `int-quantized` format), the form W8A8 models are
published in: per linear, `weight` int8 [N, K] and `weight_scale` [N, 1] (symmetric, per channel);
with dynamic per-token int8 input activations they run on the W8A8 kernel, without (W8A16) on the
int8 weight-only kernel. Other schemes are refused naming the field."""
from __future__ import annotations

import torch

from tokenmill.quant.base import DenseKernel, LinearKernel, QuantMethod, Source, as_float
from tokenmill.quant.int8 import Int8WeightKernel, W8A8Kernel


def _check(cond: bool, field: str, value, expected: str) -> None:
    if not cond:
        raise ValueError(f"quantization_config.{field} {value!r} is not supported for compressed-tensors "
                         f"(supported: {expected})")


class CompressedTensorsInt8Method(QuantMethod):
    name = "compressed-tensors"

    def __init__(self, qc: dict, dequantize: bool = False):
        fmt = qc.get("format")
        _check(fmt in ("int-quantized", "naive-quantized"), "format", fmt, "'int-quantized'")
        groups = qc.get("config_groups") or {}
        _check(len(groups) == 1, "config_groups", list(groups), "one group")
        (gname, group), = groups.items()
        w, a = group.get("weights") or {}, group.get("input_activations")
        prefix = f"config_groups.{gname}"
        _check(w.get("num_bits") == 8 and w.get("type") == "int", f"{prefix}.weights.num_bits",
               w.get("num_bits"), "8-bit int")
        _check(w.get("symmetric", True), f"{prefix}.weights.symmetric", w.get("symmetric"), "true")
        _check(w.get("strategy") == "channel", f"{prefix}.weights.strategy", w.get("strategy"), "'channel'")
        if a is not None:
            _check(a.get("num_bits") == 8 and a.get("type") == "int", f"{prefix}.input_activations.num_bits",
                   a.get("num_bits"), "8-bit int")
            _check(a.get("dynamic") is True and a.get("strategy") == "token" and a.get("symmetric", True),
                   f"{prefix}.input_activations", {k: a.get(k) for k in ("dynamic", "strategy", "symmetric")},
                   "dynamic, per token, symmetric")
        self.activations = a is not None
        self.dequantize = dequantize

    @property
    def packed(self) -> bool:
        return not self.dequantize

    def source_names(self) -> tuple[str, ...]:
        return ("weight", "weight_scale")

    def shape(self, src: Source) -> tuple[int, int]:
        return tuple(src["weight"].shape) if isinstance(src, dict) else super().shape(src)

    def slice(self, src: Source, dim: int, start: int, end: int) -> Source:
        """A rank's piece: rows with their scales, or columns under the same per-row scales."""
        if not isinstance(src, dict):
            return super().slice(src, dim, start, end)
        if dim == 0:
            return {"weight": src["weight"][start:end], "weight_scale": src["weight_scale"][start:end]}
        return {"weight": src["weight"][:, start:end], "weight_scale": src["weight_scale"]}

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        if all(isinstance(p, torch.Tensor) for p in parts):                  # an ignored (dense) layer
            return DenseKernel(torch.cat([as_float(p, dtype) for p in parts]).to(device))
        if not all(isinstance(p, dict) and {"weight", "weight_scale"} <= p.keys() for p in parts):
            raise ValueError("compressed-tensors: a quantized linear needs weight and weight_scale")
        q = torch.cat([p["weight"] for p in parts])
        scale = torch.cat([p["weight_scale"].float().reshape(-1) for p in parts])
        if q.dtype != torch.int8:
            raise ValueError(f"compressed-tensors: int-quantized weights must be int8, found {q.dtype}")
        if self.dequantize or device.type != "cpu":
            return DenseKernel((q.float() * scale[:, None]).to(device=device, dtype=dtype))
        if self.activations:
            return W8A8Kernel(q, scale, label="compressed-tensors w8a8", act_range=127.5)
        return Int8WeightKernel(q, scale, label="compressed-tensors w8a16")
