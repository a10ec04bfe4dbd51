"""The Llama family decoder (Llama, Mistral, Qwen2): one flat batch of tokens in, hidden states out.

Tokens of all sequences in a step are packed along dim 0; the attention backend uses the
metadata to keep sequences apart and to read/write the paged KV cache.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.model.config import ModelConfig
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, cfg.hidden_size, dtype=dtype),
                                requires_grad=False)
        self.qkv_bias = (nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size, dtype=dtype), requires_grad=False)
                         if cfg.attention_bias else None)
        self.o = nn.Parameter(torch.empty(cfg.hidden_size, self.q_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = F.linear(x, self.qkv, self.qkv_bias)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = apply_rope(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)   # [T, Hq + Hkv, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)               # [T, Hkv, D]
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return F.linear(out.reshape(-1, self.q_size), self.o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (self.embed if cfg.tie_word_embeddings else
                        nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False))
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                backend: AttentionBackend, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        h = F.embedding(input_ids, self.embed)
        residual = h
        rope = self.rope(positions)
        for layer, cache in zip(self.layers, kv_caches):
            h = layer.attn(layer.input_norm(residual), rope, cache, backend, meta)
            residual = residual + h
            h = layer.mlp(layer.post_attn_norm(residual))
            residual = residual + h
        return self.norm(residual)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()                 # [N, vocab]

    # ---- weights -----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters; fail on anything missing."""
        cfg = self.cfg
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        qkv_rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
        gate_up_rows = {"gate_proj": (0, cfg.intermediate_size), "up_proj": (cfg.intermediate_size, 2 * cfg.intermediate_size)}
        loaded: set[str] = set()
        for name, tensor in weights:
            target, rows = self._target(name, qkv_rows, gate_up_rows)
            if target is None:
                continue
            dst = target if rows is None else target[rows[0]:rows[1]]
            if dst.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected shape {tuple(dst.shape)}, file has {tuple(tensor.shape)}")
            with torch.no_grad():
                dst.copy_(tensor)
            loaded.add(name)
        missing = [n for n in self.expected_weight_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")

    def expected_weight_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"]
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            if self.cfg.attention_bias:
                names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        return names

    def _target(self, name: str, qkv_rows: dict, gate_up_rows: dict) -> tuple[torch.Tensor | None, tuple | None]:
        if name == "model.embed_tokens.weight":
            return self.embed, None
        if name == "model.norm.weight":
            return self.norm.weight, None
        if name == "lm_head.weight":
            return (None, None) if self.cfg.tie_word_embeddings else (self.lm_head, None)
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None, None
        layer = self.layers[int(parts[2])]
        module, leaf, kind = parts[3], parts[4], parts[-1]
        if module == "input_layernorm":
            return layer.input_norm.weight, None
        if module == "post_attention_layernorm":
            return layer.post_attn_norm.weight, None
        if module == "self_attn" and leaf == "o_proj":
            return layer.attn.o, None
        if module == "self_attn" and leaf in qkv_rows:
            target = layer.attn.qkv if kind == "weight" else layer.attn.qkv_bias
            return target, qkv_rows[leaf]
        if module == "mlp" and leaf in gate_up_rows:
            return layer.mlp.gate_up, gate_up_rows[leaf]
        if module == "mlp" and leaf == "down_proj":
            return layer.mlp.down, None
        return None, None
