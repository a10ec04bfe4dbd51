"""The GPTQ quantizer against dense math: on correlated inputs it must beat round-to-nearest on the
layer's output error (what the algorithm minimises), with every value on its grid; the checkpoint it
writes loads back to exactly the weights it chose, and the model still tracks the dense one."""
import pytest
import torch
from safetensors.torch import load_file

from tokenmill import LLM, SamplingParams
from tokenmill.quant.gptq import unpack_cols, unpack_rows
from tokenmill.quant.quantizer import gptq, pack_cols, pack_rows, quantize_gptq


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * (torch.rand(k, generator=g) * 3)[:, None]
    return torch.randn(n, k, generator=g) @ mix


def rtn(w, bits, group, sym):
    from tokenmill.quant.quantizer import _grid
    out = torch.empty_like(w)
    for g in range(0, w.shape[1], group):
        s, z = _grid(w[:, g:g + group], bits, sym)
        q = torch.clamp(torch.round(w[:, g:g + group] / s[:, None]) + z[:, None], 0, 2 ** bits - 1)
        out[:, g:g + group] = s[:, None] * (q - z[:, None])
    return out


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (4, 32, False, True),
                                                      (4, -1, True, False), (8, 64, True, True)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group, sym, act_order):
    torch.manual_seed(0)
    n, k = 48, 128
    w = torch.randn(n, k)
    x = correlated_inputs(512, k)
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    q, scale, zero, g_idx = gptq(w, h, bits, k if group == -1 else group, sym, act_order)
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1
    if not act_order:
        assert torch.equal(g_idx.long(), torch.arange(k) // (k if group == -1 else group))
    wq = scale[:, g_idx.long()] * (q.float() - zero[:, g_idx.long()])
    err_gptq = (x @ (w - wq).t()).norm()
    err_rtn = (x @ (w - rtn(w, bits, k if group == -1 else group, sym)).t()).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq.item(), err_rtn.item())


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips(bits):
    q = torch.randint(0, 2 ** bits, (64, 24))
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits).long(), q)
    assert torch.equal(unpack_cols(pack_cols(q, bits), bits).long(), q)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, True)])
def test_quantize_writes_a_checkpoint_that_loads_and_runs(tiny_chat_llama, tmp_path, sym, act_order):
    src = tiny_chat_llama[0]
    out = quantize_gptq(src, tmp_path / "q", bits=4, group=32, sym=sym, act_order=act_order, num_windows=8,
                        window=32)
    packed = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.qweight" in packed and "lm_head.weight" in packed
    cfg = __import__("json").loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == ("gptq" if sym else "gptq_v2") and cfg["desc_act"] == act_order
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(out), num_kv_blocks=64, progress=False)
    assert llm.engine.model.layers[0].attn.qkv.kernel.describe() == "gptq int4 g32"
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    packed_run = llm.generate([prompt], params, use_tqdm=False)[0]
    dense_run = LLM(str(out), quantization="dequantize", num_kv_blocks=64, progress=False).generate(
        [prompt], params, use_tqdm=False)[0]
    diff = torch.tensor([packed_run.prompt_logprobs[i][prompt[i]].logprob - dense_run.prompt_logprobs[i][prompt[i]].logprob
                         for i in range(1, len(prompt))]).abs()
    assert diff.mean() < 0.05, diff.mean().item()       # the int4 kernel (bf16) against the same weights in float32


def test_quantize_w8a8_writes_int8_per_channel(tiny_chat_llama, tmp_path):
    from tokenmill.quant.quantizer import quantize_w8a8
    src = tiny_chat_llama[0]
    out = quantize_w8a8(src, tmp_path / "w8a8")
    dense, packed = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    q, scale = packed[name], packed[name + "_scale"]
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    assert ((q.float() * scale - dense[name]).abs() <= scale / 2 + 1e-7).all()      # within half a step
    assert torch.equal(packed["lm_head.weight"], dense["lm_head.weight"])
    llm = LLM(str(out), num_kv_blocks=64, progress=False)
    assert llm.engine.model.layers[0].mlp.down.kernel.describe() == "compressed-tensors w8a8"


def test_awq_scales_beat_round_to_nearest_when_some_input_channels_dominate():
    """AWQ's premise, in dense math: with a few input channels carrying most of the activation,
    scaling them up before quantizing (and the input down) cuts the output error."""
    from tokenmill.quant.quantizer import _rtn_asym, awq_search
    torch.manual_seed(0)
    n, k, group = 64, 256, 32
    w = torch.randn(n, k)
    x = torch.randn(1024, k)
    x[:, torch.randperm(k)[:8]] *= 30                        # salient channels
    s = awq_search([w], x, 4, group)

    def output_error(scale):
        q, sc, z = _rtn_asym(w * scale, 4, group)
        deq = sc.repeat_interleave(group, 1) * (q - z.repeat_interleave(group, 1)) / scale
        return (x @ (w - deq).t()).pow(2).mean()

    assert output_error(s) < 0.7 * output_error(torch.ones(k))


def test_awq_pack_matches_the_loaders_unpack():
    from tokenmill.quant.gptq import AWQ_ORDER, unpack_cols
    from tokenmill.quant.quantizer import pack_awq
    q = torch.randint(0, 16, (12, 64))
    assert torch.equal(unpack_cols(pack_awq(q), 4, AWQ_ORDER).long(), q)


def test_a_gguf_file_is_quantized_from_its_dense_form(tmp_path):
    """A GGUF file (Q4_K/Q6_K/Q8_0 blocks) written out as a Hugging Face directory holds exactly the weights
    gguf-py dequantizes and the same tokenizer; GPTQ and W8A8 made from the file load and track it."""
    from test_gguf_engine import write_pair
    from tokenmill.quant.quantizer import hf_directory_from_gguf, quantize_w8a8
    from tokenmill.tokenizer import Tokenizer
    gguf_path, reference_dir, _ = write_pair(tmp_path)
    dense = hf_directory_from_gguf(gguf_path, tmp_path / "dense")
    ours, ref = load_file(str(dense / "model.safetensors")), load_file(str(reference_dir / "model.safetensors"))
    assert set(ours) == set(ref) - {"lm_head.weight"}          # tied: the head is the embedding, as in the file
    assert all(torch.equal(ours[k], ref[k].float()) for k in ours)
    text = "Hello world, 12 apples"
    assert Tokenizer.from_dir(dense).encode(text) == LLM(str(gguf_path), progress=False, num_kv_blocks=8
                                                         ).get_tokenizer().encode(text)
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

    def scores(path, **kw):
        out = LLM(str(path), progress=False, num_kv_blocks=8, **kw).generate([prompt], params, use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])

    exact = scores(gguf_path, quantization="dequantize")
    assert (scores(dense) - exact).abs().max() < 1e-4
    rtn = (scores(gguf_path, quantization="int4") - exact).abs().mean()
    for out in (quantize_gptq(gguf_path, tmp_path / "gptq", group=32, num_windows=2, window=64),
                quantize_w8a8(gguf_path, tmp_path / "w8a8")):
        assert not list(tmp_path.glob(".dense-*"))               # the dense form was removed
        error = (scores(out, quantization="dequantize") - exact).abs().mean()
        assert error <= rtn if out.name == "gptq" else error < 0.05, (out.name, error, rtn)
