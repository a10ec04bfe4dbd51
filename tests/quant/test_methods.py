"""Choosing a quantization: names checked up front, checkpoints that say they are quantized in a
way we do not run refused at start-up naming the method; made-at-load int4/int8 against transformers."""
import copy
import json

import pytest
import torch

from logprobs import hf_logprobs, prompt_logprob_diff
from tokenmill import LLM
from tokenmill.config import EngineConfig


def test_unknown_quantization_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="^quantization must be"):
        EngineConfig(quantization="int3")


def test_gguf_quantization_needs_a_gguf_file(tiny_llama):
    with pytest.raises(ValueError, match="quantization='gguf' needs a GGUF file"):
        LLM(str(tiny_llama[0]), quantization="gguf", progress=False)


def test_checkpoint_with_unsupported_quantization_config_is_refused(tiny_llama, tmp_path):
    src = tiny_llama[0]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        LLM(str(tmp_path), progress=False)


def fake_quantized(hf, quantization: str):
    """transformers with every weight replaced by its dequantized quantization (and, for W8A8, each
    linear's input quantized per token): the dense-math reference of what the kernels compute."""
    from tokenmill.quant.int4 import dequantize_int4, quantize_rtn
    from tokenmill.quant.int8 import quantize_per_channel
    ref = copy.deepcopy(hf)

    def int8(w):
        q, s = quantize_per_channel(w)
        return q.float() * s[:, None]

    def w8a8_forward(layer):
        def forward(x):
            sx = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
            return torch.nn.functional.linear(torch.round(x / sx).clamp(-127, 127) * sx, layer.weight, layer.bias)
        return forward

    with torch.no_grad():
        table = ref.model.embed_tokens.weight.detach().clone()
        ref.model.embed_tokens.weight = torch.nn.Parameter(int8(table))      # rows: int8 per row in both methods
        for name, layer in ref.named_modules():
            if isinstance(layer, torch.nn.Linear):
                w = table if name == "lm_head" and hf.config.tie_word_embeddings else layer.weight.detach()
                if quantization == "int4":
                    deq = dequantize_int4(*quantize_rtn(w, 32), 32)
                else:
                    deq = int8(w)
                    layer.forward = w8a8_forward(layer)
                layer.weight = torch.nn.Parameter(deq)
    return ref


@pytest.mark.parametrize("quantization,tol", [("int8", 1e-4), ("int4", 0.03)])
def test_made_at_load_matches_dense_math_of_the_same_quantization(tiny_llama, quantization, tol):
    """W8A8 and int4 RTN made at load from a dense checkpoint, against transformers running the same
    quantized weights (and quantized activations) in float32. int4 computes in bfloat16 inside. KV pages in
    float32, as the reference keeps them: the weights' math alone."""
    path, hf = tiny_llama[0], tiny_llama[1]
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(path), quantization=quantization, kv_cache_dtype="float32", num_kv_blocks=64, progress=False)
    prompt = list(range(3, 40))
    ref, dense = hf_logprobs(fake_quantized(hf, quantization), prompt), hf_logprobs(hf, prompt)
    diff = prompt_logprob_diff(llm, prompt, ref)
    lost = torch.tensor([dense[i - 1, prompt[i]] - ref[i - 1, prompt[i]] for i in range(1, len(prompt))]).abs()
    assert diff.mean() < tol, diff.mean().item()
    assert lost.mean() > 2 * tol        # the quantization itself moves logprobs far more than the tolerance


def test_auto_dtype_is_float32_for_weights_on_tokenmills_kernels(tiny_llama, monkeypatch):
    """dtype="auto" on a CPU where bfloat16 products are fast (AMX, faked here): dense weights run in
    bfloat16, weights packed on tokenmill's CPU kernels in float32, the activations those kernels take."""
    import tokenmill.config
    from tokenmill import kernels
    monkeypatch.setattr(tokenmill.config, "cpu_has_amx_bf16", lambda: True)
    path = str(tiny_llama[0])
    assert LLM(path, dtype="auto", num_kv_blocks=16, progress=False).engine.model.dtype == torch.bfloat16
    packed = LLM(path, dtype="auto", quantization="int4", num_kv_blocks=16, progress=False)
    assert packed.engine.model.dtype == (torch.float32 if kernels.library() is not None else torch.bfloat16)
    dequantized = LLM(path, dtype="auto", quantization="dequantize", num_kv_blocks=16, progress=False)
    assert dequantized.engine.model.dtype == torch.bfloat16


def test_kv_pages_are_float16_where_packed_weights_run_on_tokenmills_kernels(tiny_llama):
    """kv_cache_dtype="auto": float16 pages under float32 activations on tokenmill's CPU kernels (as llama.cpp
    keeps its cache), else the activation dtype (the dequantized path stays the transformers-exact one); an
    explicit dtype is kept, and the pool holds twice the pages in the same memory."""
    from tokenmill import kernels
    path = str(tiny_llama[0])

    def pages(llm):
        caches = llm.engine.runner.kv_caches
        assert all(k.dtype == v.dtype == caches[0][0].dtype for k, v in caches)
        return caches[0][0].dtype, caches[0][0].shape[0]

    native = kernels.library() is not None
    half, blocks = pages(LLM(path, quantization="int4", kv_cache_memory_gb=0.01, progress=False))
    assert half == (torch.float16 if native else torch.float32)
    assert pages(LLM(path, quantization="int4", kv_cache_dtype="float32", kv_cache_memory_gb=0.01,
                     progress=False)) == (torch.float32, blocks // 2 if native else blocks)
    assert pages(LLM(path, quantization="dequantize", num_kv_blocks=16, progress=False))[0] == torch.float32
    assert pages(LLM(path, dtype="bfloat16", quantization="int4", num_kv_blocks=16, progress=False))[0] == torch.bfloat16
    assert pages(LLM(path, kv_cache_dtype="bfloat16", num_kv_blocks=16, progress=False))[0] == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(path, kv_cache_dtype="fp8", num_kv_blocks=16, progress=False)
