"""Sliding-window perplexity against transformers scoring the same windows."""
import math

import pytest
import torch

from tokenmill import LLM
from tokenmill.perplexity import perplexity, reference_text


def test_perplexity_matches_transformers_windows(tiny_llama):
    path, hf = tiny_llama[0], tiny_llama[1]
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(path), quantization="dequantize", num_kv_blocks=64, progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (3 * 32 + 5,), generator=g).tolist()
    r = perplexity(llm, ids, ctx=32, use_tqdm=False)
    nll = []
    with torch.no_grad():
        for w in range(3):
            window = torch.tensor([ids[w * 32:(w + 1) * 32]])
            logp = torch.log_softmax(hf(window).logits[0].double(), -1)
            nll += [-logp[p - 1, window[0, p]].item() for p in range(16, 32)]
    assert r.windows == 3 and r.tokens == 48
    assert r.nll == pytest.approx(sum(nll) / len(nll), abs=1e-4)
    assert r.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_perplexity_refuses_text_shorter_than_a_window(tiny_llama):
    llm = LLM(str(tiny_llama[0]), num_kv_blocks=64, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(llm, [1, 2, 3], ctx=32, use_tqdm=False)


def test_reference_text_halves_are_disjoint():
    cal, ev = reference_text("calibration"), reference_text("evaluation")
    assert len(cal) > 100_000 and len(ev) > 100_000 and cal[-200:] not in ev
