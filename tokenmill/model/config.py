"""ModelConfig: the shape of a decoder-only transformer, read from a HF config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}
FULL, SLIDING = "full_attention", "sliding_attention"     # Hugging Face's layer_types values


@dataclass(frozen=True)
class ModelConfig:
    architecture: str            # "llama" | "mistral" | "qwen2" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()            # FULL or SLIDING per layer; () = all FULL
    rope_local_theta: float | None = None        # rope base of SLIDING layers, when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None   # attention scale = this ** -0.5 (default head_dim)
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"                     # of the gated MLP: "silu" | "gelu_pytorch_tanh"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {FULL, SLIDING}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported ({FULL!r}, {SLIDING!r})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")

    @property
    def layer_windows(self) -> list[int | None]:
        """The attention window of each layer (None: the whole context)."""
        return [self.sliding_window if t == SLIDING else None for t in self.layer_types] or \
            [None] * self.num_hidden_layers

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if not known:
            raise ValueError(f"config.json architectures {archs} not supported; "
                             f"supported: {sorted(ARCHITECTURES)}")
        arch = known[0]
        if cfg.get("attn_logit_softcapping"):
            raise ValueError("config.json: attn_logit_softcapping is not supported (Gemma 3 does not use it)")
        heads = cfg["num_attention_heads"]
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta", 1e6 if arch == "gemma3" else None)
        rope_local = cfg.get("rope_local_base_freq", 1e4) if arch == "gemma3" else None
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(rope_params, dict) and FULL in rope_params:   # per layer type (Gemma 3)
            rope_local = rope_params.get(SLIDING, {}).get("rope_theta", rope_local)
            rope_params = rope_params[FULL]
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch in ("mistral", "gemma3")) else None
        return cls(
            architecture=known[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling if rope_scaling and rope_scaling.get(
                "rope_type", rope_scaling.get("type")) != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),   # transformers' defaults
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            sliding_window=window,
            layer_types=_hf_layer_types(cfg, arch, window),
            rope_local_theta=float(rope_local) if rope_local is not None else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if arch == "gemma3" else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json that `from_hf` (and transformers) read back as this config; for the
        Llama family (Gemma 3 keeps settings llama.cpp's files do not carry)."""
        if self.architecture not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"architecture {self.architecture!r}: writing a Hugging Face config is supported "
                             f"for llama, mistral and qwen2")
        cfg = {"architectures": [next(k for k, v in ARCHITECTURES.items() if v == self.architecture)],
               "model_type": self.architecture, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
               "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
               "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": self.hidden_act,
               "torch_dtype": "float32"}
        if self.architecture == "llama":
            cfg["attention_bias"] = self.attention_bias
        elif self.attention_bias != (self.architecture == "qwen2"):
            raise ValueError(f"{self.architecture} with attention_bias={self.attention_bias} has no Hugging Face config")
        if self.architecture != "llama":
            cfg["sliding_window"] = self.sliding_window
            cfg["use_sliding_window"] = self.sliding_window is not None
        if self.architecture == "qwen2" and self.sliding_window is not None:
            cfg["max_window_layers"] = self.layer_types.index(SLIDING) if SLIDING in self.layer_types else \
                self.num_hidden_layers
        return cfg

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], has_output_weight: bool, has_qkv_bias: bool) -> "ModelConfig":
        arch = metadata["general.architecture"]

        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{key}", default)

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        vocab = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", []))
        scaling = None
        if get("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        layers = get("block_count")
        window = get("attention.sliding_window")
        gemma = arch == "gemma3"
        head_dim = get("attention.key_length") or hidden // heads
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings=not has_output_weight,
            attention_bias=has_qkv_bias,
            sliding_window=window if gemma else None,
            # llama.cpp's Gemma 3: every 6th layer global, local layers on a 10k rope base, and
            # the attention scale from head_dim (hidden / heads for the 62-layer 27B)
            layer_types=_pattern_layer_types(layers, get("attention.sliding_window_pattern", 6))
            if gemma and window else (),
            rope_local_theta=float(get("rope.freq_base_swa", 10000.0)) if gemma else None,
            query_pre_attn_scalar=(hidden / heads if layers == 62 else head_dim) if gemma else None,
            final_logit_softcapping=get("final_logit_softcapping"),
            hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        )


def _pattern_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma's rule: layer i is global when (i + 1) % pattern == 0."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _hf_layer_types(cfg: dict[str, Any], arch: str, window: int | None) -> tuple[str, ...]:
    if not window:
        return ()
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    if arch == "gemma3":
        return _pattern_layer_types(cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6))
    if arch == "qwen2":      # Qwen2 slides from layer max_window_layers on
        first = cfg.get("max_window_layers", 28)      # transformers' default
        return tuple(SLIDING if i >= first else FULL for i in range(cfg["num_hidden_layers"]))
    return (SLIDING,) * cfg["num_hidden_layers"]
