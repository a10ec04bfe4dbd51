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
    dtype: str = "float32"               # "auto": bfloat16 on CUDA and on CPUs with AMX-BF16, else float32
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
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

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
