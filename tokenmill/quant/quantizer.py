"""`tokenmill quantize`: GPTQ (Frantar et al. 2022) and W8A8 from a dense Hugging Face directory, written
in the formats the reference tools read (GPTQ v1/v2 as gptqmodel writes it; compressed-tensors as
llm-compressor writes it), which quant/gptq.py and quant/compressed_tensors.py run.

GPTQ per linear: H = 2 X^T X over calibration inputs; columns are quantized one at a time and each
one's rounding error, scaled by the inverse Hessian, is pushed onto the columns not yet quantized
(optionally in decreasing order of H's diagonal: act-order). Hessians are collected in one pass of
the dense model (not layer-by-layer on already quantized inputs): simpler, slightly less accurate.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm


def _grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale [N], integer zero [N] for the columns w [N, g] of one group."""
    maxq = 2 ** bits - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp(min=1e-8)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group: int = 128, sym: bool = True,
         act_order: bool = False, damp: float = 0.01, block: int = 128):
    """w [N, K], h [K, K] -> (q [N, K] ints in 0..2^bits-1, scale [N, G], zero [N, G], g_idx [K]), with
    w ~= scale[:, g_idx] * (q - zero[:, g_idx])."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    group = k if group == -1 else group
    maxq = 2 ** bits - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.long)
    scales, zeros = torch.zeros(n, k // group, dtype=h.dtype), torch.zeros(n, k // group, dtype=h.dtype)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=h.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:       # the group's grid, from its weights as already updated
                g = col // group
                ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group]
                scales[:, g], zeros[:, g] = _grid(ahead, bits, sym)
            s, z = scales[:, col // group], zeros[:, col // group]
            qi = torch.clamp(torch.round(w1[:, i] / s) + z, 0, maxq)
            q[:, col] = qi.long()
            err = (w1[:, i] - s * (qi - z)) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // group)[inv]                  # group of each original column
    return q[:, inv], scales.float(), zeros.float(), g_idx.to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint [R, C] values -> int32 [R * bits / 32, C], value j of each word at bits * j (GPTQ qweight)."""
    per = 32 // bits
    q = (q.to(torch.int64) & (2 ** bits - 1)).view(-1, per, q.shape[1])
    word = sum(q[:, j] << (bits * j) for j in range(per))
    return word.to(torch.int64).where(word < 2 ** 31, word - 2 ** 32).to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(q.t().contiguous(), bits).t().contiguous()


def _capture_inputs(llm, windows: list[list[int]], on_input) -> None:
    """Run the calibration windows through the engine's dense forward (prefix caching off, so every
    token is computed), calling on_input(role, x [rows, in]) for the input of every linear but lm_head."""
    from tokenmill.sampling_params import SamplingParams
    hooks = []
    for name, layer in llm.engine.model.linears().items():
        if name != "lm_head":
            hooks.append(layer.register_forward_hook(
                lambda mod, inp, out, name=name: on_input(name, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        llm.generate(windows, SamplingParams(max_tokens=1, temperature=0), use_tqdm=True)
    finally:
        for h in hooks:
            h.remove()


def collect_hessians(llm, windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n for the input of every linear except lm_head."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.double()
        hessians[name] = hessians.get(name, 0) + 2 * x.t() @ x
        counts[name] = counts.get(name, 0) + x.shape[0]
    _capture_inputs(llm, windows, add)
    return {k: v / counts[k] for k, v in hessians.items()}


def collect_inputs(llm, windows: list[list[int]], max_rows: int) -> dict[str, torch.Tensor]:
    """Up to `max_rows` input rows of every linear except lm_head."""
    rows: dict[str, list[torch.Tensor]] = {}

    def add(name: str, x: torch.Tensor) -> None:
        have = sum(r.shape[0] for r in rows.get(name, []))
        if have < max_rows:
            rows.setdefault(name, []).append(x[:max_rows - have].float().clone())
    _capture_inputs(llm, windows, add)
    return {k: torch.cat(v) for k, v in rows.items()}


def hf_directory_from_gguf(path: Path, dst: Path) -> Path:
    """A GGUF file (llama, mistral, qwen2) written out as the dense Hugging Face directory it stands for:
    float32 weights as gguf-py dequantizes them (in Hugging Face's row order), config.json,
    tokenizer.json and tokenizer_config.json. The quantizers start from it."""
    from safetensors.torch import save_file
    from tokenmill.loader.gguf import GGUFCheckpoint
    from tokenmill.model.load import open_checkpoint
    from tokenmill.tokenizer import Tokenizer
    ckpt = open_checkpoint(path)
    config = ckpt.config.to_hf()
    tokenizer = Tokenizer.from_gguf(ckpt.gguf_metadata)
    config |= {"bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": sorted(tokenizer.eos_token_ids) if len(tokenizer.eos_token_ids) > 1
               else tokenizer.eos_token_id}
    dst.mkdir(parents=True, exist_ok=True)
    tensors = dict(GGUFCheckpoint(path).iter_tensors(torch.float32, progress=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(dst)
    return dst


def accepts_gguf(quantize):
    """Let a quantizer of Hugging Face directories take a GGUF file too: it quantizes the file's dense
    form, written to a temporary directory beside `dst` and removed afterwards."""
    @functools.wraps(quantize)
    def wrapper(src: str | Path, dst: str | Path, *args, **kwargs) -> Path:
        src, dst = Path(src), Path(dst)
        if src.is_dir():
            return quantize(src, dst, *args, **kwargs)
        if not src.is_file():
            raise FileNotFoundError(f"quantize: {src}: no such file or directory")
        dst.resolve().parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dst.resolve().parent, prefix=".dense-") as work:
            return quantize(hf_directory_from_gguf(src, Path(work)), dst, *args, **kwargs)
    return wrapper


def _calibrate(src: Path, group: int, calibration_text: str | None, num_windows: int, window: int):
    """(dense engine of src, calibration windows): the checks every calibrated quantizer shares."""
    from tokenmill.engine import LLM
    from tokenmill.perplexity import reference_text
    llm = LLM(str(src), quantization="dequantize", enable_prefix_caching=False, progress=False,
              num_kv_blocks=num_windows * (window // 16 + 2))      # every window at once, nothing more
    cfg = llm.engine.model_config
    widths = {cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim}
    if group != -1 and any(w % group for w in widths):
        raise ValueError(f"group_size {group} must divide every linear's input width {sorted(widths)}; "
                         f"try {[g for g in (32, 64, 128) if not any(w % g for w in widths)] or -1}")
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError(f"quantize: {src} has no tokenizer to encode the calibration text")
    ids = tok.encode(calibration_text if calibration_text is not None else reference_text("calibration"))
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:num_windows]
    if not windows:
        raise ValueError(f"calibration text: {len(ids)} tokens, fewer than one window of {window}")
    return llm, windows


HF_LINEARS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
              "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}


@accepts_gguf
def quantize_gptq(src: str | Path, dst: str | Path, bits: int = 4, group: int = 128, sym: bool = True,
                  act_order: bool = False, calibration_text: str | None = None, num_windows: int = 32,
                  window: int = 512) -> Path:
    """A dense Hugging Face directory -> a GPTQ directory (v1 when symmetric, v2 when not, as v1
    cannot store an asymmetric zero of 0); lm_head and embeddings stay dense."""
    from tokenmill.loader.safetensors import iter_safetensors
    src, dst = Path(src), Path(dst)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    llm, windows = _calibrate(src, group, calibration_text, num_windows, window)
    cfg = llm.engine.model_config
    hessians = collect_hessians(llm, windows)
    dense = dict(iter_safetensors(src))
    out: dict[str, torch.Tensor] = {}
    for name, t in dense.items():
        if not _is_linear(name):
            out[name] = t.contiguous()
    for i in tqdm(range(cfg.num_hidden_layers), desc="GPTQ", unit="layer"):
        for role, leaves in HF_LINEARS.items():
            h = hessians[f"layers.{i}.{role}"]
            for leaf in leaves:
                prefix = f"model.layers.{i}.{leaf}"
                w = dense[prefix + ".weight"].float()
                g = w.shape[1] if group == -1 else group
                q, scale, zero, g_idx = gptq(w, h, bits, g, sym, act_order)
                out[prefix + ".qweight"] = pack_rows(q.t().contiguous(), bits)
                stored = zero - 1 if sym else zero        # v1 stores zero - 1, which asym zeros of 0 cannot
                out[prefix + ".qzeros"] = pack_cols(stored.long().t().contiguous(), bits)
                out[prefix + ".scales"] = scale.t().contiguous().half()
                out[prefix + ".g_idx"] = g_idx
                if prefix + ".bias" in dense:
                    out[prefix + ".bias"] = dense[prefix + ".bias"]
    fmt = "gptq" if sym else "gptq_v2"
    return write_checkpoint(src, dst, out, {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                            "desc_act": act_order, "checkpoint_format": fmt, "format": fmt,
                                            "quantizer": ["tokenmill"]})


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    """dst = src's config (plus quantization_config), tokenizer and generation files, and `tensors`."""
    from safetensors.torch import save_file
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(f, dst / f.name)
    return dst


def _is_linear(name: str) -> bool:
    return any(f".{leaf}." in name for leaves in HF_LINEARS.values() for leaf in leaves)


@accepts_gguf
def quantize_w8a8(src: str | Path, dst: str | Path) -> Path:
    """A dense Hugging Face directory -> compressed-tensors int-quantized W8A8 (symmetric per-channel int8
    weights, dynamic per-token int8 activations), llm-compressor's layout; lm_head and embeddings stay dense.
    Needs no calibration: activation scales are computed per token at run time."""
    from tokenmill.loader.safetensors import iter_safetensors, read_hf_config
    from tokenmill.quant.int8 import quantize_per_channel
    src, dst = Path(src), Path(dst)
    if read_hf_config(src).get("quantization_config"):
        raise ValueError(f"quantize: {src} is already quantized")
    out: dict[str, torch.Tensor] = {}
    for name, t in tqdm(list(iter_safetensors(src)), desc="W8A8", unit="tensor"):
        if _is_linear(name) and name.endswith(".weight"):
            q, scale = quantize_per_channel(t.float())
            out[name], out[name + "_scale"] = q, scale[:, None].contiguous()
        else:
            out[name] = t.contiguous()
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "actorder": None,
            "block_structure": None}
    group = {"targets": ["Linear"], "format": "int-quantized", "output_activations": None,
             "weights": {**int8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
             "input_activations": {**int8, "strategy": "token", "dynamic": True, "observer": None}}
    return write_checkpoint(src, dst, out, {"quant_method": "compressed-tensors", "format": "int-quantized",
                                            "quantization_status": "compressed", "config_groups": {"group_0": group},
                                            "ignore": ["lm_head"], "kv_cache_scheme": None})


def _rtn_asym(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N, K], scale [N, G], integer zero [N, G]: w ~= scale * (q - zero), per group of columns."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    scale, zero = _grid(g.reshape(-1, group), bits, sym=False)
    scale, zero = scale.view(n, -1), zero.view(n, -1)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    return q.view(n, k).long(), scale, zero


def awq_search(ws: list[torch.Tensor], x: torch.Tensor, bits: int, group: int, grid: int = 20) -> torch.Tensor:
    """AWQ's per-input-channel scale s = mean|x|^a (normalised), `a` chosen on a grid to minimise the
    output error of the quantized (W * s) with inputs x / s, over every matrix sharing the input."""
    w = torch.cat(ws).float()
    x_mean = x.abs().mean(0).clamp(min=1e-8)
    ref = x @ w.t()
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(grid):
        s = x_mean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        q, scale, zero = _rtn_asym(w * s, bits, group)
        deq = (scale.repeat_interleave(group, 1) * (q - zero.repeat_interleave(group, 1))) / s
        err = (ref - x @ deq.t()).pow(2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> int32 [R, C / 8], AWQ's nibble order 0, 2, 4, 6, 1, 3, 5, 7 along C:
    word slot j holds column AWQ_ORDER[j] of its eight."""
    from tokenmill.quant.gptq import AWQ_ORDER
    return pack_cols(q.view(q.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(q.shape[0], -1), 4)


@accepts_gguf
def quantize_awq(src: str | Path, dst: str | Path, group: int = 128, calibration_text: str | None = None,
                 num_windows: int = 16, window: int = 512, max_rows: int = 2048) -> Path:
    """A dense Hugging Face directory -> AWQ (gemm, 4-bit asymmetric) directory. Scales are searched for
    q/k/v (folded into the input norm), gate/up (into the post-attention norm) and down (into up's
    rows); o keeps scale 1 (its input comes from v through attention, not foldable under GQA). No
    clipping search."""
    from tokenmill.loader.safetensors import iter_safetensors
    src, dst = Path(src), Path(dst)
    llm, windows = _calibrate(src, group, calibration_text, num_windows, window)
    cfg = llm.engine.model_config
    inputs = collect_inputs(llm, windows, max_rows)
    del llm
    t = {k: v.float().clone() for k, v in iter_safetensors(src)}
    out: dict[str, torch.Tensor] = {k: v for k, v in t.items() if not _is_linear(k)}
    for i in tqdm(range(cfg.num_hidden_layers), desc="AWQ", unit="layer"):
        p = f"model.layers.{i}."
        groups = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                  "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"], "o": ["self_attn.o_proj"]}
        folds = {"qkv": p + "input_layernorm.weight", "gate_up": p + "post_attention_layernorm.weight",
                 "down": p + "mlp.up_proj.weight"}
        # search every scale on the original weights, then fold them all, then quantize (AutoAWQ's order)
        scales = {role: awq_search([t[p + leaf + ".weight"] for leaf in groups[role]], inputs[f"layers.{i}.{role}"],
                                   4, group) for role in folds}
        for role, s_ in scales.items():
            prev = t[folds[role]]
            t[folds[role]] = prev / s_ if prev.dim() == 1 else prev / s_[:, None]     # a norm, or up_proj's rows
            for leaf in groups[role]:
                t[p + leaf + ".weight"] = t[p + leaf + ".weight"] * s_
        for role in ("input_layernorm", "post_attention_layernorm"):
            out[p + role + ".weight"] = t[p + role + ".weight"]
        for leaves in groups.values():
            for leaf in leaves:
                q, scale, zero = _rtn_asym(t[p + leaf + ".weight"], 4, group)
                name = p + leaf
                out[name + ".qweight"] = pack_awq(q.t().contiguous())          # [K, N / 8]
                out[name + ".qzeros"] = pack_awq(zero.long().t().contiguous())  # [G, N / 8]
                out[name + ".scales"] = scale.t().contiguous().half()           # [G, N]
    return write_checkpoint(src, dst, out, {"quant_method": "awq", "bits": 4, "group_size": group,
                                            "zero_point": True, "version": "gemm", "format": "gemm",
                                            "checkpoint_format": "gemm", "quantizer": ["tokenmill"]})
