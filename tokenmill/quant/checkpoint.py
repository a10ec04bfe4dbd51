"""Checkpoints that say how they were quantized (`quantization_config` in config.json)."""
from __future__ import annotations

from tokenmill.quant.base import DenseMethod, QuantMethod
from tokenmill.quant.gptq import PackedInt4Method


def checkpoint_method(qc: dict, dequantize: bool) -> QuantMethod:
    """The method that runs a checkpoint's `quantization_config`; anything else is refused by name."""
    method = qc.get("quant_method")
    if method == "gptq":
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported for gptq "
                             f"(supported: 'gptq', 'gptq_v2')")
        m = PackedInt4Method("gptq", int(qc.get("bits", 4)), int(qc.get("group_size", 128)),
                             v1_zeros=fmt == "gptq", awq=False, dequantize=dequantize)
    elif method == "awq":
        version = str(qc.get("version", qc.get("checkpoint_format", qc.get("format", "gemm")))).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version {version!r} is not supported for awq (supported: 'gemm')")
        if qc.get("zero_point", True) is False:
            raise ValueError("quantization_config.zero_point false is not supported for awq")
        m = PackedInt4Method("awq", int(qc.get("bits", qc.get("w_bit", 4))),
                             int(qc.get("group_size", qc.get("q_group_size", 128))), v1_zeros=False, awq=True,
                             dequantize=dequantize)
    elif method == "compressed-tensors":
        from tokenmill.quant.compressed_tensors import CompressedTensorsInt8Method
        m = CompressedTensorsInt8Method(qc, dequantize=dequantize)
    else:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported by tokenmill "
                         f"(supported checkpoint formats: 'gptq', 'awq', 'compressed-tensors' int8; GGUF files run as stored)")
    return m
