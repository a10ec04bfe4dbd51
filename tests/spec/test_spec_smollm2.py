"""Speculative decoding on the real model: greedy output token-identical to plain decoding (n-gram and
the quantized self-draft), stop strings landing inside accepted drafts, streaming deltas, and the
server's stream and /metrics."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tokenmill import LLM, SamplingParams
from tokenmill.server import ServerConfig, build_app

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
PROMPTS = [f"Repeat this code exactly:\n\n{CODE}", "Copy this line word for word: the cat sat on the mat.",
           "What is the capital of France?"]


def chat_ids(llm: LLM) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in PROMPTS]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 32, "logprobs": 1} | kw)


@pytest.fixture(scope="module")
def plain(smollm2_dequantized_module):
    llm = smollm2_dequantized_module          # the same weights as speculative(), decoding one token a step
    prompts = chat_ids(llm)
    return prompts, llm.generate(prompts, params(), use_tqdm=False), llm


def speculative(path, spec) -> LLM:
    return LLM(str(path), quantization="dequantize", max_model_len=512, num_kv_blocks=160, speculative_config=spec,
               progress=False)


def assert_same(outs, want):
    for o, w in zip(outs, want):
        assert o.outputs[0].token_ids == w.outputs[0].token_ids
        assert o.outputs[0].text == w.outputs[0].text
        assert o.outputs[0].finish_reason == w.outputs[0].finish_reason
        for ours, theirs in zip(o.outputs[0].logprobs, w.outputs[0].logprobs):
            for t in ours:
                assert ours[t].logprob == pytest.approx(theirs[t].logprob, abs=1e-3)


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2},
    {"method": "draft_model", "model": "smollm2-135m", "num_speculative_tokens": 3},   # the file as stored: int4
], ids=["ngram", "self-draft"])
def test_greedy_is_plain_greedy(smollm2_path, plain, spec):
    prompts, want, _ = plain
    llm = speculative(smollm2_path, spec)
    assert_same(llm.generate(prompts, params(), use_tqdm=False), want)
    stats = llm.engine.spec_stats
    assert stats.mean_acceptance_length > 1.5


def test_a_stop_string_inside_accepted_drafts(smollm2_path, plain):
    prompts, want, plain_llm = plain
    text = want[0].outputs[0].text
    stop = text[text.index("return"):][:9]           # ends inside a copied line: inside a run of drafts
    p = params(stop=[stop])
    expected = plain_llm.generate(prompts[:1], p, use_tqdm=False)
    llm = speculative(smollm2_path, {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2})
    got = llm.generate(prompts[:1], p, use_tqdm=False)
    assert_same(got, expected)
    assert got[0].outputs[0].stop_reason == stop


def test_server_streams_speculative_tokens_and_reports_metrics(smollm2_path, plain):
    prompts, want, _ = plain
    llm = speculative(smollm2_path, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2})
    app = build_app(llm.engine, ServerConfig("smollm2"))
    with TestClient(app) as client:
        body = {"model": "smollm2", "prompt": prompts[0], "max_tokens": 32, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["text"] for chunk in chunks for c in json.loads(chunk)["choices"])
        assert text == want[0].outputs[0].text
        metrics = client.get("/metrics").text
    accepted = [line for line in metrics.splitlines() if line.startswith("tokenmill_spec_decode_num_accepted_tokens{")]
    assert accepted and float(accepted[0].split()[-1]) > 0
    assert 'tokenmill_spec_decode_acceptance_per_position{model_name="smollm2",position="3"}' in metrics
