"""Shared fixtures: tiny random Hugging Face models saved to disk, and the real SmolLM2 GGUF."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SMOLLM2_GGUF = Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".cache" / "tokenmill")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

# Large init makes logits peaky, so greedy choices are not decided by float rounding.
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)


def tiny_config(kind: str):
    import transformers as tf
    if kind == "llama":        # GQA 4/2, untied, head_dim != hidden / heads, llama3 rope scaling
        return tf.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              tie_word_embeddings=False, rope_theta=50000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen2":        # MQA, attention bias, tied embeddings
        return tf.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                              rope_theta=1000000.0)
    if kind == "mistral":      # MHA, linear rope scaling
        return tf.MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 2.0})
    raise ValueError(kind)


def build_tiny(kind: str, directory: Path, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[kind]
    model = cls(cfg).eval().float()
    if kind == "qwen2":    # random (not zero) biases so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny_model(request, tmp_path_factory):
    """(kind, directory, transformers model) for each architecture."""
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, directory, build_tiny(request.param, directory)


@pytest.fixture(scope="session")
def tiny_model_builder():
    """build_tiny itself, for tests that change a config before loading."""
    return build_tiny


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, build_tiny("llama", directory)


@pytest.fixture(scope="session")
def smollm2_path():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} missing: run `make model` first")
    return SMOLLM2_GGUF
