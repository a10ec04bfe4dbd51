"""kernels.DecoderStack (every decoder layer of a decode step in one native call) against the model's Python
forward, which calls the same kernels one by one (itself tested against dense math and transformers): the
same logits bit for bit, step by step, for a batch of rows with uneven contexts."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams, kernels
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.quant.int8 import int8_weight_kernel

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="tokenmill's CPU kernels do not run here")

PROMPTS = [[5, 9, 13], list(range(20, 61)), [7] * 17, list(range(100, 108)), [3]]


def run(directory, monkeypatch, stack: bool, int8_parts: bool, quantization: str | None = "int4",
        **kwargs) -> tuple[list, list, int]:
    """The logits of every step, the generated tokens, and how many forwards ran the stack."""
    hidden, stacked = [], []
    logits, call = LlamaForCausalLM.compute_logits, kernels.DecoderStack.__call__

    def record(self, *args):
        out = logits(self, *args)
        hidden.append(out.clone())
        return out

    def count(self, *args):
        stacked.append(1)
        return call(self, *args)

    with monkeypatch.context() as m:
        m.setattr(LlamaForCausalLM, "compute_logits", record)
        m.setattr(kernels.DecoderStack, "__call__", count)
        if not stack:
            m.setattr(LlamaForCausalLM, "_build_stack", lambda self: None)
        llm = LLM(str(directory), quantization=quantization, num_kv_blocks=64, max_num_seqs=8, progress=False, **kwargs)
        model = llm.engine.model
        if int8_parts:          # o and down as int8 weights with a scale per 32 columns: the stack's other kind
            for layer in model.layers:
                for linear in (layer.attn.o, layer.mlp.down):
                    linear.kernel = int8_weight_kernel(linear.kernel.dense_weight(), "test")
            model._stack = None
        hidden.clear()
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return hidden, [o.outputs[0].token_ids for o in outs], len(stacked)


def assert_stack_equals_per_op(directory, monkeypatch, int8_parts: bool = False,
                               quantization: str | None = "int4") -> None:
    """The same model run with the stack and without: the same logits at every step and the same tokens; the decode
    steps of the first run went through the stack, none of the second's did."""
    h_stack, tokens_stack, calls = run(directory, monkeypatch, True, int8_parts, quantization)
    h_ops, tokens_ops, none = run(directory, monkeypatch, False, int8_parts, quantization)
    assert calls >= 11 and none == 0
    assert tokens_stack == tokens_ops
    assert len(h_stack) == len(h_ops) > 0
    for a, b in zip(h_stack, h_ops):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,int8_parts,quantization", [
    ("llama", False, "int4"), ("qwen2", False, "int4"), ("mistral", False, "int4"), ("llama", True, "int4"),
    ("llama", False, "int8"), ("qwen2", False, "int8")])
def test_stack_equals_the_per_op_forward(kind, int8_parts, quantization, tiny_model_builder, tmp_path, monkeypatch):
    """llama: GQA 4/2, head_dim 32; qwen2: MQA with q/k/v biases; mistral: MHA; int4 mixed with int8 weights;
    W8A8 ("int8": activations rounded per token, integer products) on tokenmill's kernel."""
    tiny_model_builder(kind, tmp_path)
    assert_stack_equals_per_op(tmp_path, monkeypatch, int8_parts, quantization)


def test_stack_on_the_real_model_as_stored(smollm2_path, monkeypatch):
    """SmolLM2's Q4_1 linears on the int4 kernel (its lm_head, Q8_0, stays outside the stack)."""
    assert_stack_equals_per_op(smollm2_path, monkeypatch, quantization=None)


@pytest.mark.parametrize("name", ["gptq-asym-act", "awq-gemm", "w8a8"])
def test_stack_on_checkpoints_of_the_reference_tools(name, monkeypatch):
    """gptqmodel's GPTQ with act-order (the stack gathers x[:, perm] as the per-op path does), AWQ, and
    llm-compressor's W8A8 (activations rounded per token with range 127.5, as its reference does)."""
    from pathlib import Path
    directory = Path(__file__).parents[1] / "fixtures" / name
    assert_stack_equals_per_op(directory, monkeypatch, quantization=None)


def test_stack_under_a_sliding_window(tiny_model_builder, tmp_path, monkeypatch):
    """A window shorter than the contexts: the stack reads each row's last `window` positions, as the
    per-op path does."""
    import json
    tiny_model_builder("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 10
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_stack_equals_per_op(tmp_path, monkeypatch)


@pytest.mark.parametrize("kv_heads,global_only", [(1, False), (2, False), (2, True)])
def test_stack_on_gemma3(kv_heads, global_only, tmp_path, monkeypatch):
    """Gemma 3: a norm after each sublayer, per-head q/k norms, GeGLU, local layers (window 10, their own
    rope base) between global ones; and a model of global layers only (one of the two rope tables used)."""
    from test_gemma3 import F, S, build_gemma
    build_gemma(tmp_path, [F, F] if global_only else [S, S, F, S], window=10, kv_heads=kv_heads)
    assert_stack_equals_per_op(tmp_path, monkeypatch)


def test_stack_is_skipped_where_its_kernels_do_not_run(tiny_model_builder, tmp_path, caplog):
    """Dense weights, bfloat16 activations: the Python forward runs (and is not wrong for it). The start-up
    log says which."""
    import logging
    tiny_model_builder("llama", tmp_path)
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        dense = LLM(str(tmp_path), num_kv_blocks=64, progress=False)
        assert dense.engine.model.stack() is None and "native call" not in caplog.text
        int4 = LLM(str(tmp_path), quantization="int4", num_kv_blocks=64, progress=False)
        assert int4.engine.model.stack() is not None
        assert "decode steps in one native call" in caplog.text
    bf16 = LLM(str(tmp_path), quantization="int4", dtype="bfloat16", num_kv_blocks=64, progress=False)
    assert bf16.engine.model.stack() is None


def test_stack_refuses_caches_that_do_not_match_its_layers(smollm2_path):
    """Fewer caches than layers, or one of another shape: an error before any pointer changes."""
    llm = LLM(str(smollm2_path), num_kv_blocks=32, progress=False)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    model, caches = llm.engine.model, llm.engine.runner.layer_caches
    stack = model.stack()
    assert stack is not None
    h = torch.zeros(1, model.cfg.hidden_size)
    cos = sin = torch.zeros(1, model.cfg.head_dim // 2)
    tables = [(torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
               torch.zeros(1, dtype=torch.int32))]
    with pytest.raises(ValueError, match="caches for"):
        stack(h, cos, sin, caches[:1], tables, [0] * len(caches))
    odd = [(k, v[:, :8].contiguous()) for k, v in caches]         # values of another page size
    with pytest.raises(ValueError, match="decode_layers cache"):
        stack(h, cos, sin, odd, tables, [0] * len(caches))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)   # still whole
    assert len(out[0].outputs[0].token_ids) == 3


def test_stack_refuses_what_it_cannot_take():
    """The C code trusts its arguments: shapes that do not match the layers are an error, not a wild read."""
    def int4(n, k):
        return kernels.PackedWeights(4, *kernels.tile_int4(torch.zeros(n, k, dtype=torch.uint8), torch.zeros(n, k // 32),
                                                            torch.zeros(n, k // 32)), 32)
    good = int4(8, 32)
    layer = {"qkv": good, "o": good, "gate_up": good, "down": good, "input_norm": torch.ones(32),
             "mlp_norm": torch.ones(32)}
    with pytest.raises(ValueError, match="decode_layers qkv"):
        kernels.DecoderStack([layer], 4, 2, 16, 32, 64, 1e-6, 0.25)         # qkv must have (4 + 2 * 2) * 16 rows
    shapes = {"qkv": (128, 32), "o": (32, 64), "gate_up": (64, 32), "down": (32, 32)}
    layer = {name: int4(n, k) for name, (n, k) in shapes.items()} | {"input_norm": torch.ones(32), "mlp_norm": torch.ones(32)}
    kernels.DecoderStack([layer], 4, 2, 16, 32, 32, 1e-6, 0.25)             # these fit
    twice = torch.zeros(32, dtype=torch.int64)                                 # not a permutation
    with pytest.raises(ValueError, match="decode_layers o"):
        kernels.DecoderStack([layer | {"o": layer["o"]._replace(perm=twice)}], 4, 2, 16, 32, 32, 1e-6, 0.25)
    with pytest.raises(ValueError, match="decode_layers o"):                   # W8A8 rounding needs int8 weights
        kernels.DecoderStack([layer | {"o": layer["o"]._replace(act_range=127.0)}], 4, 2, 16, 32, 32, 1e-6, 0.25)
