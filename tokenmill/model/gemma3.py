"""Gemma 3 (text): the Llama decoder with a norm before and after each sublayer, (1 + w) norms,
per-head RMSNorm on Q and K, GeGLU, embeddings scaled by sqrt(hidden), and local layers (sliding
window, their own rope base) between the global ones."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.model.config import ModelConfig
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from tokenmill.model.llama import Attention, LlamaForCausalLM, stack_linears
from tokenmill.model.linear import QLinear
from tokenmill.parallel.comm import SINGLE, TPGroup


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup = SINGLE):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(cfg.hidden_size, eps)
        self.attn = Attention(cfg, dtype, qk_norm=True, tp=tp)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps)
        self.pre_mlp_norm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, cfg.hidden_act, tp)
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps)

    def stack_entry(self) -> dict | None:
        """This layer for kernels.DecoderStack (its linears, norms by their role there), or None."""
        entry = stack_linears(self.attn, self.mlp)
        if entry is None:
            return None
        norms = {"input_norm": self.input_norm, "attn_out_norm": self.post_attn_norm, "mlp_norm": self.pre_mlp_norm,
                 "mlp_out_norm": self.post_mlp_norm, "q_norm": self.attn.q_norm, "k_norm": self.attn.k_norm}
        return entry | {name: norm.weight for name, norm in norms.items()}


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer
    norm_offset = 1.0

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, tp: TPGroup = SINGLE):
        super().__init__(cfg, dtype, max_positions, tp)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        self.local_rope = RotaryEmbedding(cfg.head_dim, max_positions, local_theta, None)
        # Hugging Face rounds the scale to the weights' dtype before multiplying
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5).to(dtype), persistent=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                backend: AttentionBackend, metas: list[AttentionMetadata]) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (see LlamaForCausalLM.forward)."""
        h = self.embed(input_ids, self.dtype) * self.embed_scale
        global_rope, local_rope = self.rope(positions), self.local_rope(positions)
        stacked = self._run_stack(h, [global_rope, local_rope], kv_caches, backend, metas)
        if stacked is not None:
            return self.norm(stacked)
        for layer, window, cache, meta in zip(self.layers, self.cfg.layer_windows, kv_caches, metas):
            x = layer.attn(layer.input_norm(h), global_rope if window is None else local_rope, cache, backend, meta)
            h = h + layer.post_attn_norm(x)
            h = h + layer.post_mlp_norm(layer.mlp(layer.pre_mlp_norm(h)))
        return self.norm(h)

    def layer_ropes(self) -> list[int]:
        return [0 if window is None else 1 for window in self.cfg.layer_windows]

    def expected_weight_names(self) -> list[str]:
        names = super().expected_weight_names()
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight",
                      p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        return names

    def _target(self, name: str) -> tuple[QLinear | torch.Tensor | None, int | None]:
        parts = name.split(".")
        if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
            layer = self.layers[int(parts[2])]
            extra = {"pre_feedforward_layernorm": layer.pre_mlp_norm, "post_feedforward_layernorm": layer.post_mlp_norm,
                     "q_norm": layer.attn.q_norm, "k_norm": layer.attn.k_norm}
            norm = extra.get(parts[3]) or (extra.get(parts[4]) if parts[3] == "self_attn" else None)
            if norm is not None:
                return norm.weight, None
        return super()._target(name)
