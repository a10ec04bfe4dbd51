"""EngineConfig: every knob of the engine in one frozen, validated dataclass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_amx_bf16() -> bool:
    """AMX tiles make bfloat16 matrix products ~3.5x faster than float32 ones on this CPU
    (benchmarks/engine.py, docs/benchmarks.md); without them bf16 products are slower than fp32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None             # path to a .gguf / HF directory, or a short name; None = the default model
    dtype: str = "float32"               # activations; "auto": bfloat16 on CUDA and on CPUs with AMX-BF16, else float32
    quantization: str | None = None      # None: as stored (GGUF packed, dense in dtype); "dequantize", "int4", "int8", "gguf"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str | None = None  # None: "triton" on CUDA, "cpu" (ATen flash over pages) on CPU
    device: str | None = None             # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        from tokenmill.quant import check_quantization
        check_quantization(self.quantization)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            integer(name, 1)
        integer("num_kv_blocks", 1, optional=True)
        integer("max_model_len", 2, optional=True)
        integer("seed", -2**63)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        gb = self.kv_cache_memory_gb
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or not 0 < gb < float("inf"):
            raise ValueError(f"kv_cache_memory_gb must be a finite number > 0, got {gb!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r} "
                                 f"({e})") from None

    @property
    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            fast_bf16 = self.torch_device.type == "cuda" or cpu_has_amx_bf16()
            return torch.bfloat16 if fast_bf16 else torch.float32
        return DTYPES[self.dtype]

    @property
    def backend_name(self) -> str:
        if self.attention_backend is not None:
            return self.attention_backend
        return "triton" if self.torch_device.type == "cuda" else "cpu"
