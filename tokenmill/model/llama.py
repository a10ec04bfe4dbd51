"""The Llama family decoder (Llama, Mistral, Qwen2): one flat batch of tokens in, hidden states out.

Tokens of all sequences in a step are packed along dim 0; the attention backend uses the
metadata to keep sequences apart and to read/write the paged KV cache.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.attention import AttentionBackend, AttentionMetadata
from tokenmill.model.config import ModelConfig
from tokenmill.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rope
from tokenmill.model.linear import Embedding, QLinear
from tokenmill.parallel.comm import SINGLE, TPGroup, kv_shards, local_kv_heads
from tokenmill.quant import QuantMethod, Source

log = logging.getLogger("tokenmill")


class Attention(nn.Module):
    """Fused QKV, rope, paged attention, output projection; `qk_norm`: an RMSNorm over each head of Q
    and K before rope (Gemma 3, Qwen 3)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, qk_norm: bool = False, tp: TPGroup = SINGLE):
        super().__init__()
        self.num_heads = cfg.num_attention_heads // tp.size             # this rank's heads
        self.num_kv_heads = local_kv_heads(cfg.num_key_value_heads, tp.size)
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scale = cfg.attention_scale
        kv = tp.rows(kv_shards(cfg.num_key_value_heads, tp.size))
        self.qkv = QLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], cfg.attention_bias, dtype,
                           shards=[tp.rows(), kv, kv])
        self.o = QLinear(self.q_size, [cfg.hidden_size], False, dtype, shards=[tp.columns()], reduce=tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv(x)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim)     # [T, Hq + Hkv, D]
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        qk = apply_rope(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)               # [T, Hkv, D]
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o(out.reshape(-1, self.q_size))


def stack_linears(attn: Attention, mlp: GatedMLP) -> dict | None:
    """A layer's four linears as kernels.DecoderStack takes them (PackedWeights and biases); None where one is
    not packed for tokenmill's CPU kernels or is split across ranks."""
    entry = {}
    for name, linear in (("qkv", attn.qkv), ("o", attn.o), ("gate_up", mlp.gate_up), ("down", mlp.down)):
        packed = linear.kernel.packed_weights()
        if packed is None or linear.reduce.size > 1 or (linear.bias is not None and linear.bias.dtype != torch.float32):
            return None
        entry[name], entry[name + "_bias"] = packed, linear.bias
    return entry


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup = SINGLE):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype, tp=tp)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, tp=tp)

    def stack_entry(self) -> dict | None:
        """This layer for kernels.DecoderStack (its linears, norms by their role there), or None."""
        entry = stack_linears(self.attn, self.mlp)
        if entry is None:
            return None
        return entry | {"input_norm": self.input_norm.weight, "mlp_norm": self.post_attn_norm.weight}


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = DecoderLayer
    norm_offset = 0.0           # added to every checkpoint norm weight (Gemma's norms scale by 1 + w)

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.tp = tp
        self.embed = Embedding(cfg.vocab_size, tp)
        self.layers = nn.ModuleList(self.layer_class(cfg, dtype, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        vocab = tp.rows()
        self.lm_head = QLinear(cfg.hidden_size, [vocab.length(cfg.vocab_size)], False, dtype, shards=[vocab])
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self._stack: tuple[kernels.DecoderStack | None] | None = None      # built at the first step

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                backend: AttentionBackend, metas: list[AttentionMetadata]) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]; a KV cache and the metadata
        of its KV group (block tables, window) per layer."""
        h = self.embed(input_ids, self.dtype)
        residual = h
        rope = self.rope(positions)
        stacked = self._run_stack(h, [rope], kv_caches, backend, metas)
        if stacked is not None:
            return self.norm(stacked)
        for layer, cache, meta in zip(self.layers, kv_caches, metas):
            h = layer.attn(layer.input_norm(residual), rope, cache, backend, meta)
            residual = residual + h
            h = layer.mlp(layer.post_attn_norm(residual))
            residual = residual + h
        return self.norm(residual)

    def layer_ropes(self) -> list[int]:
        """Per layer, which of the rope tables `forward` hands `_run_stack` it rotates by."""
        return [0] * len(self.layers)

    def _run_stack(self, h: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
                   kv_caches: list[tuple[torch.Tensor, torch.Tensor]], backend: AttentionBackend,
                   metas: list[AttentionMetadata]) -> torch.Tensor | None:
        """A decode step whose every layer runs on tokenmill's CPU kernels goes through them in one native call
        (kernels.DecoderStack: the same kernels in the same order, without ~3 ms of Python between them at
        batch 1): embeddings h in, the last layer's residual stream out. None where it does not apply.
        ropes: the step's (cos, sin) tables, picked per layer by `layer_ropes`."""
        stack = self.stack()
        rows = h.shape[0]
        if stack is None:
            return None
        attn = self.layers[0].attn
        tables, index, layer_tables = [], {}, []
        for meta, cache in zip(metas, kv_caches):
            i = index.get(id(meta))
            if i is None:
                found = backend.decode_tables(meta, attn.num_heads, self.dtype, cache[0])
                if found is None:
                    return None
                i = index[id(meta)] = len(tables)
                tables.append(found)
            layer_tables.append(i)
        if len(ropes) == 1:
            cos, sin = (t.reshape(rows, -1) for t in ropes[0])
        else:
            cos, sin = (torch.stack([rope[i].reshape(rows, -1) for rope in ropes]) for i in (0, 1))
        residual = h.clone(memory_format=torch.contiguous_format)
        stack(residual, cos, sin, kv_caches, tables, layer_tables)
        return residual

    def stack(self) -> kernels.DecoderStack | None:
        """The kernels.DecoderStack decode steps run through; None where they run layer by layer. Built once, at
        the first call after the weights are loaded."""
        if self._stack is None:
            try:
                self._stack = self._build_stack(),
            except ValueError as e:          # a layout the stack does not take: the Python forward runs
                log.warning("decode steps run layer by layer: %s", e)
                self._stack = None,
        return self._stack[0]

    def _build_stack(self) -> kernels.DecoderStack | None:
        """The layers as a kernels.DecoderStack; None where a layer cannot say how it goes there or a linear's
        weights are not packed for tokenmill's kernels."""
        attn, cfg = self.layers[0].attn, self.cfg
        if (self.dtype != torch.float32 or self.tp.size > 1 or self.norm.weight.device.type != "cpu"
                or not kernels.DecoderStack.takes(attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.hidden_size,
                                                  cfg.intermediate_size)):
            return None
        layers = []
        for layer, rope in zip(self.layers, self.layer_ropes()):
            entry = layer.stack_entry() if hasattr(layer, "stack_entry") else None
            if entry is None:
                return None
            layers.append(entry | {"rope": rope})
        return kernels.DecoderStack(layers, attn.num_heads, attn.num_kv_heads, attn.head_dim, cfg.hidden_size,
                                     cfg.intermediate_size, cfg.rms_norm_eps, attn.scale, self.layers[0].mlp.act)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] float32; under tensor parallelism gathered on rank 0
        (the other ranks return None)."""
        logits = self.tp.gather_columns(self.lm_head(hidden).float(), self.cfg.vocab_size)     # [N, vocab]
        if logits is None:
            return None
        cap = self.cfg.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ---- weights -----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Source]], method: QuantMethod) -> None:
        """Hugging Face-named checkpoint tensors into the layers: norms and biases copied, linear
        matrices handed to `method`, which makes each fused layer's kernel once its parts are in."""
        device = self.norm.weight.device
        loaded: set[str] = set()
        embed_src = None
        packed: dict[tuple[QLinear, int], dict[str, torch.Tensor]] = {}    # GPTQ/AWQ tensors of one matrix
        for name, src in weights:
            if name == "model.embed_tokens.weight":
                embed_src = src
                if self.cfg.tie_word_embeddings:
                    self.lm_head.add_part(0, src, name, method, self.dtype)
            elif name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            else:
                target, part = self._target(name)
                if target is None:
                    continue
                stem, suffix = name.rsplit(".", 1)
                if isinstance(target, QLinear) and suffix == "bias":
                    target.load_bias(part, src, name)
                elif isinstance(target, QLinear):
                    if suffix not in method.source_names():
                        continue
                    if method.source_names() == ("weight",):
                        target.add_part(part, src, name, method, self.dtype)
                    else:                                   # several tensors per matrix: gather them first
                        packed.setdefault((target, part), {})[suffix] = src
                        name = stem + ".weight"
                else:
                    dst = target
                    if dst.shape != src.shape:
                        raise ValueError(f"weight {name}: expected shape {tuple(dst.shape)}, file has {tuple(src.shape)}")
                    with torch.no_grad():
                        dst.copy_(src)
                        if name.endswith("norm.weight"):
                            dst.add_(self.norm_offset)      # in float32, as transformers adds 1.0 + w.float()
            loaded.add(name)
        for (target, part), tensors in packed.items():
            src = tensors["weight"] if tensors.keys() == {"weight"} else tensors      # a layer left dense
            target.add_part(part, src, f"{target} part {part}", method, self.dtype)
        missing = [n for n in self.expected_weight_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
        tied = self.lm_head.kernel if self.cfg.tie_word_embeddings else None
        self.embed.load(embed_src, method, self.dtype, device, tied)
        self._stack = None          # built again from these weights at the next decode step

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

    def linears(self) -> dict[str, QLinear]:
        """Every linear layer by a short role name ("layers.3.qkv", "lm_head")."""
        out = {}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.qkv": layer.attn.qkv, f"layers.{i}.o": layer.attn.o,
                        f"layers.{i}.gate_up": layer.mlp.gate_up, f"layers.{i}.down": layer.mlp.down})
        out["lm_head"] = self.lm_head
        return out

    def _target(self, name: str) -> tuple[QLinear | torch.Tensor | None, int | None]:
        """(layer and part index, or a tensor) a checkpoint tensor goes to; (None, None) to skip."""
        if name == "model.norm.weight":
            return self.norm.weight, None
        if name == "lm_head.weight":
            return self.lm_head, 0
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            return None, None
        layer = self.layers[int(parts[2])]
        module, leaf, kind = parts[3], parts[4], parts[-1]
        if module == "input_layernorm":
            return layer.input_norm.weight, None
        if module == "post_attention_layernorm":
            return layer.post_attn_norm.weight, None
        if module == "self_attn" and leaf in ("q_proj", "k_proj", "v_proj"):
            return layer.attn.qkv, "qkv".index(leaf[0])
        if module == "self_attn" and leaf == "o_proj":
            return layer.attn.o, 0
        if module == "mlp" and leaf in ("gate_proj", "up_proj"):
            return layer.mlp.gate_up, ("gate_proj", "up_proj").index(leaf)
        if module == "mlp" and leaf == "down_proj":
            return layer.mlp.down, 0
        return None, None
