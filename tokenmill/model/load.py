"""Open a checkpoint (GGUF file or Hugging Face directory) and build the model from it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tokenmill import kernels
from tokenmill.config import DTYPES
from tokenmill.model.config import ModelConfig
from tokenmill.model.registry import model_class
from tokenmill.parallel.comm import SINGLE, TPGroup
from tokenmill.quant import QuantMethod, Source, resolve_method

WeightStream = Callable[[bool, bool], Iterator[tuple[str, Source]]]


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: WeightStream          # (progress, mapped) -> (hf name, tensor as stored; mapped: read when used)
    gguf_metadata: dict[str, Any] | None = None
    quant_config: dict[str, Any] | None = None     # config.json's quantization_config

    @property
    def is_gguf(self) -> bool:
        return self.gguf_metadata is not None

    def method(self, quantization: str | None) -> QuantMethod:
        return resolve_method(quantization, self.is_gguf, self.quant_config)


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        from tokenmill.loader.safetensors import iter_safetensors, read_hf_config, safetensors_files
        hf_config = read_hf_config(path)
        config = ModelConfig.from_hf(hf_config)
        safetensors_files(path)   # fail now, not halfway through building the model
        return Checkpoint(path, config, lambda progress, mapped=False: iter_safetensors(path, progress, mapped),
                          quant_config=hf_config.get("quantization_config"))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    from tokenmill.loader.gguf import GGUFCheckpoint
    gguf = GGUFCheckpoint(path)
    names = set(gguf.tensor_names())
    config = ModelConfig.from_gguf(gguf.metadata, has_output_weight="lm_head.weight" in names,
                                   has_qkv_bias="model.layers.0.self_attn.q_proj.bias" in names)
    return Checkpoint(path, config, lambda progress, mapped=False: gguf.iter_sources(progress),      # always mapped
                      gguf_metadata=gguf.metadata)


def on_cpu_kernels(config, method: QuantMethod) -> bool:
    """Whether `method`'s weights run packed on tokenmill's CPU kernels under `config`."""
    return method.packed and config.torch_device.type == "cpu" and kernels.library() is not None


def activation_dtype(config, method: QuantMethod) -> torch.dtype:
    """config.torch_dtype, except that dtype="auto" with weights running packed on tokenmill's CPU kernels
    is float32: the kernels take float32, and bfloat16 converts at every call and leaves attention and
    norms to PyTorch (a decode step of the default model: 20.3 ms against 12.2 ms, 2-vCPU AVX2 EPYC).
    Every tensor-parallel rank decides the same way."""
    if config.dtype == "auto" and on_cpu_kernels(config, method):
        return torch.float32
    return config.torch_dtype


def cache_dtype(config, method: QuantMethod, dtype: torch.dtype) -> torch.dtype:
    """The KV pages' dtype for activations of `dtype`: config.kv_cache_dtype, where "auto" is float16 when packed
    weights run on tokenmill's CPU kernels with float32 activations (half the bytes a decode step streams, as
    llama.cpp stores its cache; docs/benchmarks.md), else `dtype` itself."""
    if config.kv_cache_dtype != "auto":
        return DTYPES[config.kv_cache_dtype]
    return torch.float16 if on_cpu_kernels(config, method) and dtype == torch.float32 else dtype


def build_model(ckpt: Checkpoint, dtype: torch.dtype, max_positions: int, device: torch.device,
                method: QuantMethod, progress: bool = True, tp: TPGroup = SINGLE) -> nn.Module:
    """The model, or under tensor parallelism this rank's shard of it (each tensor read only as far as
    the shard needs it)."""
    with torch.device(device):
        model = model_class(ckpt.config.architecture)(ckpt.config, dtype, max_positions, tp)
        model.load_weights(ckpt.weights(progress, tp.size > 1), method)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of every weight, each storage counted once (a tied table is one)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.split(".")[0].endswith("rope") or t.data_ptr() in seen:     # rope tables are not weights
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def describe_weights(model: nn.Module) -> str:
    """What runs where, e.g. "210 linears Q4_1 -> int4 g32, lm_head Q8_0 -> int8 g32, embedding: lm_head's rows,
    decode steps in one native call"."""
    linears = model.linears()
    head = linears.pop("lm_head")
    counts: Counter[str] = Counter()
    for layer in linears.values():
        counts[layer.kernel.describe()] += len(layer.part_rows)
    parts = [f"{n} linears {kind}" for kind, n in counts.most_common()]
    parts.append(f"lm_head {head.kernel.describe()}")
    table = model.embed.table
    parts.append("embedding: lm_head's rows" if table is head.kernel else f"embedding {table.describe()}")
    if model.stack() is not None:
        parts.append("decode steps in one native call")
    return ", ".join(parts)
