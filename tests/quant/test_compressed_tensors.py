"""W8A8 in compressed-tensors' int-quantized format, made by llm-compressor (w8a8: tests/fixtures/make_w8a8.py)
and by `tokenmill quantize --method w8a8` (tm-w8a8, from w8a8's dense model), against transformers +
compressed-tensors running each checkpoint (reference_logits.pt; tests/fixtures/reference_logits_transformers.py)."""
import json
from pathlib import Path

import pytest
import torch

from logprobs import prompt_logprob_diff
from tokenmill import LLM

W8A8 = Path(__file__).resolve().parents[1] / "fixtures" / "w8a8"


def diff_to(llm, ref) -> torch.Tensor:
    return prompt_logprob_diff(llm, ref["ids"].tolist(), torch.log_softmax(ref["logits"], -1))


@pytest.mark.parametrize("name", ["w8a8", "tm-w8a8"])
def test_w8a8_checkpoint_matches_compressed_tensors_reference(name):
    """Whole model: a float difference of 1e-7 in an attention output can move one activation across
    a rounding boundary, so only a tolerance is possible here (measured 0.00075 mean / 0.0027 max
    nats; the weights alone, without activation quantization, are 0.0020 / 0.0053 away)."""
    ref = torch.load(W8A8.parent / name / "reference_logits.pt")
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(W8A8.parent / name), kv_cache_dtype="float32", num_kv_blocks=64, progress=False)   # as the reference
    assert llm.engine.model.layers[0].attn.qkv.kernel.describe().startswith("compressed-tensors w8a8")
    assert llm.engine.model.lm_head.kernel.describe() == "dense float32"          # in `ignore`
    assert llm.engine.model.embed.describe() == "dense float32"
    diff = diff_to(llm, ref)
    assert diff.mean() < 0.0015 and diff.max() < 0.006, (diff.mean().item(), diff.max().item())


def test_w8a8_layer_is_exactly_compressed_tensors_math():
    """One fused layer on one input against compressed-tensors' own quantized forward, written out
    from the checkpoint's tensors: activation scale absmax / 127.5, rounding clamped to [-128, 127]
    (with absmax / 127 the outputs differ by ~1e-3 relative)."""
    from safetensors.torch import load_file
    sd = load_file(str(W8A8 / "model.safetensors"))
    kernel = LLM(str(W8A8), num_kv_blocks=64, progress=False).engine.model.layers[1].mlp.gate_up.kernel
    x = torch.randn(7, 128) * 3
    s = x.abs().amax(-1, keepdim=True) / 127.5
    xq = torch.round(x / s).clamp(-128, 127) * s
    p = "model.layers.1.mlp."
    w = torch.cat([sd[p + f"{n}_proj.weight"].double() * sd[p + f"{n}_proj.weight_scale"].double() for n in ("gate", "up")])
    torch.testing.assert_close(kernel(x).double(), xq.double() @ w.t(), rtol=1e-5, atol=1e-5)


def test_unsupported_compressed_tensors_scheme_is_refused(tmp_path):
    for f in W8A8.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config\.config_groups\.group_0\.weights\.strategy 'group'"):
        LLM(str(tmp_path), progress=False)
