"""Architecture name -> model class. A new model is one file and one line here."""
from __future__ import annotations

from torch import nn

from tokenmill.model.gemma3 import Gemma3ForCausalLM
from tokenmill.model.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {sorted(MODELS)}")
    return MODELS[architecture]
