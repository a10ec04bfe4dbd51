"""Quantized execution: one QuantMethod per format, chosen once per checkpoint.

A new method is one file here with a QuantMethod subclass, and one line in `METHODS` (or, for a
checkpoint format, in `quant/checkpoint.py`); nothing outside this package learns its name.
"""
from __future__ import annotations

from typing import Any

from tokenmill.quant.base import DenseMethod, LinearKernel, QuantMethod, Source
from tokenmill.quant.gguf import GGUFMethod
from tokenmill.quant.int4 import Int4Method
from tokenmill.quant.int8 import Int8Method

__all__ = ["QuantMethod", "Source", "LinearKernel", "resolve_method", "check_quantization"]

METHODS: dict[str, type[QuantMethod]] = {
    "dequantize": DenseMethod,
    "int4": Int4Method,
    "int8": Int8Method,
    "gguf": GGUFMethod,
}


def check_quantization(value: Any) -> None:
    if value is not None and value not in METHODS:
        raise ValueError(f"quantization must be None (run the checkpoint as stored) or one of "
                         f"{sorted(METHODS)}, got {value!r}")


def resolve_method(quantization: str | None, is_gguf: bool, quant_config: dict | None) -> QuantMethod:
    """The method for a checkpoint: `quantization` when given, else what the checkpoint stores."""
    check_quantization(quantization)
    if quant_config is not None and quantization not in (None, "dequantize"):
        raise ValueError(f"quantization={quantization!r}: the checkpoint is already quantized "
                         f"({quant_config.get('quant_method')!r}); pass None to run it as stored")
    if quant_config is not None:
        from tokenmill.quant.checkpoint import checkpoint_method
        return checkpoint_method(quant_config, dequantize=quantization == "dequantize")
    if quantization == "gguf" and not is_gguf:
        raise ValueError("quantization='gguf' needs a GGUF file; this checkpoint is a Hugging Face directory")
    if quantization is None:
        return GGUFMethod() if is_gguf else DenseMethod()
    return METHODS[quantization]()
