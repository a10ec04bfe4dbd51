"""Checkpoints that say how they were quantized (`quantization_config` in config.json)."""
from __future__ import annotations

from tokenmill.quant.base import QuantMethod


def checkpoint_method(quant_config: dict, dequantize: bool) -> QuantMethod:
    method = quant_config.get("quant_method")
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported by tokenmill "
                     f"(supported checkpoint formats: none yet; GGUF files run as stored)")
