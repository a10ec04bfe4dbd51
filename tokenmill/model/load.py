"""Open a checkpoint (GGUF file or Hugging Face directory) and build the model from it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tokenmill.model.config import ModelConfig
from tokenmill.model.registry import model_class

WeightStream = Callable[[torch.dtype, bool], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weights: WeightStream          # (dtype, progress) -> (hf name, tensor)
    gguf_metadata: dict[str, Any] | None = None


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        from tokenmill.loader.safetensors import iter_safetensors, read_hf_config, safetensors_files
        config = ModelConfig.from_hf(read_hf_config(path))
        safetensors_files(path)   # fail now, not halfway through building the model
        return Checkpoint(path, config, lambda dtype, progress: iter_safetensors(path, dtype, progress))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    from tokenmill.loader.gguf import GGUFCheckpoint
    gguf = GGUFCheckpoint(path)
    names = set(gguf.tensor_names())
    config = ModelConfig.from_gguf(gguf.metadata, has_output_weight="lm_head.weight" in names,
                                   has_qkv_bias="model.layers.0.self_attn.q_proj.bias" in names)
    return Checkpoint(path, config, lambda dtype, progress: gguf.iter_tensors(dtype, progress=progress),
                      gguf_metadata=gguf.metadata)


def build_model(ckpt: Checkpoint, dtype: torch.dtype, max_positions: int, device: torch.device,
                progress: bool = True) -> nn.Module:
    with torch.device(device):
        model = model_class(ckpt.config.architecture)(ckpt.config, dtype, max_positions)
    model.load_weights(ckpt.weights(dtype, progress))
    return model.eval()
