"""EngineConfig: every knob of the engine in one frozen, validated dataclass."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_amx_bf16() -> bool:
    """AMX tiles make bfloat16 matrix products ~3.5x faster than float32 ones on this CPU
    (benchmarks/engine.py, docs/benchmarks.md); without them bf16 products are slower than fp32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


SPEC_METHODS = ("draft_model", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with vLLM's names. `ngram`: copy what followed the longest earlier match
    (prompt_lookup_max down to prompt_lookup_min tokens) of the context's tail. `draft_model`: a small
    model with the target's vocabulary (or the target itself, run quantized) proposes."""
    method: str = "ngram"
    num_speculative_tokens: int = 3           # k: drafts verified per step
    model: str | None = None                  # draft_model: path or short name of the draft
    quantization: str | None = None           # draft_model: how the draft runs (None: as stored)
    dtype: str | None = None                  # draft_model: its activation dtype (None: the target's)
    prompt_lookup_min: int = 2                # 1 finds more matches, but too many wrong ones (docs/benchmarks.md)
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = 4     # no drafts while more sequences run (the crossover measured here)

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(SPEC_METHODS)}, got {self.method!r}")
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_min", 1), ("prompt_lookup_max", 1),
                          ("disable_by_batch_size", 1)):
            value = getattr(self, name)
            if value is None and name == "disable_by_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"speculative_config.{name} must be an integer >= {low}, got {value!r}")
        if self.num_speculative_tokens > 16:
            raise ValueError(f"speculative_config.num_speculative_tokens must be <= 16, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model: method 'draft_model' needs the draft's path or short name")
            from tokenmill.quant import check_quantization
            try:
                check_quantization(self.quantization)
            except ValueError as e:
                raise ValueError(f"speculative_config.{e}") from None
            if self.dtype is not None and self.dtype not in DTYPES and self.dtype != "auto":
                raise ValueError(f"speculative_config.dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        elif self.model is not None or self.quantization is not None:
            raise ValueError("speculative_config.model / quantization: only for method 'draft_model'")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From a SpeculativeConfig, a dict or a JSON object string (the CLI's --speculative-config)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None             # path to a .gguf / HF directory, or a short name; None = the default model
    dtype: str = "float32"               # activations; "auto": bfloat16 on CUDA and on CPUs with AMX-BF16, else float32
    #                                      (float32 where the weights run on tokenmill's CPU kernels: model/load.py)
    quantization: str | None = None      # None: as stored (GGUF packed, dense in dtype); "dequantize", "int4", "int8", "gguf"
    kv_cache_dtype: str = "auto"         # the KV pages; "auto": float16 where packed weights run on tokenmill's CPU
    #                                      kernels with float32 activations (as llama.cpp), else the activation dtype
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
    speculative_config: SpeculativeConfig | None = None   # also a dict or a JSON string, parsed here
    tensor_parallel_size: int = 1         # ranks the model is split over (spawned here, or started by torchrun)
    enforce_eager: bool = False           # on CUDA: decode steps launched kernel by kernel, not replayed as CUDA
    #                                       graphs (cuda_graphs.py; vLLM's name)

    def __post_init__(self) -> None:
        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {self.dtype!r}")
        if self.kv_cache_dtype not in DTYPES and self.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype must be one of {sorted(DTYPES)} or 'auto', got {self.kv_cache_dtype!r}")
        from tokenmill.quant import check_quantization
        check_quantization(self.quantization)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            integer(name, 1)
        integer("num_kv_blocks", 1, optional=True)
        integer("tensor_parallel_size", 1)
        integer("max_model_len", 2, optional=True)
        integer("seed", -2**63)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        if self.seed >= 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        gb = self.kv_cache_memory_gb
        if not isinstance(gb, (int, float)) or isinstance(gb, bool) or not 0 < gb < float("inf"):
            raise ValueError(f"kv_cache_memory_gb must be a finite number > 0, got {gb!r}")
        if self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        spec = self.speculative_config
        if spec is not None and spec.num_speculative_tokens + 1 > self.max_num_batched_tokens:
            raise ValueError(f"speculative_config.num_speculative_tokens ({spec.num_speculative_tokens}) + 1 must "
                             f"fit max_num_batched_tokens ({self.max_num_batched_tokens})")
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
