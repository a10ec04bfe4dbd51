"""The OpenAI-compatible server, driven by the official `openai` SDK against a real uvicorn server on a
loopback port: completions, chat, streaming, logprobs, n / best_of, stop, seeds, every error class,
32 concurrent streams that match offline greedy generation, a disconnect that frees its pages, and
`tokenmill serve` draining on SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from tokenmill import LLM, BeamSearchParams, SamplingParams
from tokenmill.server import ServerConfig, build_app

KEY = "test-key"
MODEL = "smollm2"
NUM_CONCURRENT = 32
BEAM_PROMPT = "The three primary colours are"
CONCURRENT_PROMPTS = [f"Fact number {i}: the" + " very" * (i % 5) + " best" for i in range(NUM_CONCURRENT)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, llm: LLM, app, url: str, reference: dict[str, str], beams: list[str]):
        self.llm, self.app, self.url, self.reference, self.beams = llm, app, url, reference, beams
        self.engine = llm.engine

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, **{"timeout": 60, **kw})


@pytest.fixture(scope="module")
def served(smollm2_path):
    llm = LLM(str(smollm2_path), quantization="dequantize", max_num_seqs=NUM_CONCURRENT, num_kv_blocks=512,
              progress=False)      # 8192 tokens, the model's context (the default 2 GB pool is slow to build)
    # the offline reference first, on the same engine the server will own; in a side thread like the
    # server's engine loop (on a busy 2-core machine, 2 OpenMP threads stepping from the main thread crawl)
    outs = []
    ref = threading.Thread(target=lambda: outs.extend(llm.generate(
        CONCURRENT_PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        + llm.beam_search(BEAM_PROMPT, BeamSearchParams(3, max_tokens=12, length_penalty=0.5), use_tqdm=False)))
    ref.start()
    ref.join()
    reference = {p: o.outputs[0].text for p, o in zip(CONCURRENT_PROMPTS, outs)}
    beams = [s.text for s in outs[-1].sequences]
    app = build_app(llm.engine, ServerConfig(MODEL, api_key=KEY, max_queued_requests=64, disconnect_poll_s=0.1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield Served(llm, app, f"http://127.0.0.1:{port}", reference, beams)
    server.should_exit = True
    thread.join(30)


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while engine.requests or engine.block_manager.num_free_blocks != engine.block_manager.num_blocks:
        assert time.time() < deadline, f"engine not idle: {len(engine.requests)} requests, " \
                                       f"{engine.block_manager.usage:.3f} KV usage"
        time.sleep(0.05)


# ---- models, health, version ---------------------------------------------------------------------------
def test_models_health_version(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    assert httpx.get(served.url + "/version").json()["version"]


# ---- completions ---------------------------------------------------------------------------------------
def test_completion_greedy_and_usage(served):
    client = served.client()
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, user="tester")
    assert r.choices[0].text.startswith(" Paris")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(served.engine.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 4 and r.usage.total_tokens == r.usage.prompt_tokens + 4
    # the same prompt as token ids, and prompt lists of both kinds, give the same text
    ids = served.engine.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    many = client.completions.create(model=MODEL, prompt=[prompt, "One, two,"], max_tokens=4, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == r.choices[0].text
    many_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.text for c in many_ids.choices] == [r.choices[0].text] * 2
    assert many_ids.usage.prompt_tokens == 2 * len(ids)


def test_completion_logprobs_and_echo(served):
    client = served.client()
    prompt = "The capital of France is"
    n_prompt = len(served.engine.tokenizer.encode(prompt))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and tok in top and top[tok] == pytest.approx(value)
        assert max(top.values()) == pytest.approx(value)       # greedy: the chosen token is the top one
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True)
    c = echo.choices[0]
    assert c.text == prompt + r.choices[0].text
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert c.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_n_best_of_stop_and_seed(served):
    client = served.client()
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=3,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]      # seed reproducibility
    best = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=1.0, n=2,
                                     best_of=3, seed=1)
    assert sorted(c.index for c in best.choices) == [0, 1]
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10,
                                        temperature=0, stop=["."])
    assert stopped.choices[0].text == " Paris" and stopped.choices[0].finish_reason == "stop"


def test_completion_stream_sync(served):
    client = served.client()
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


# ---- chat ----------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]


def test_chat_logprobs_and_refusal_field(served):
    client = served.client()
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.message.refusal is None
    assert len(c.logprobs.content) == r.usage.completion_tokens <= 5
    for entry in c.logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    tok = served.engine.tokenizer
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    raw = served.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2}).json()
    assert "refusal" in raw["choices"][0]["message"] and raw["choices"][0]["message"]["refusal"] is None
    # max_tokens is honoured too, and n > 1 gives n choices
    n2 = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, n=2, seed=3, temperature=1)
    assert sorted(ch.index for ch in n2.choices) == [0, 1] and n2.usage.completion_tokens <= 6


def test_chat_stream_async(served):
    async def run():
        client = served.async_client()
        full = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
        parts, reasons, usage = [], [], None
        async for chunk in stream:
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                reasons.append(ch.finish_reason)
            usage = chunk.usage or usage
        await client.close()
        return full, "".join(parts), reasons, usage

    full, text, reasons, usage = asyncio.run(run())
    assert text == full.choices[0].message.content
    assert reasons[-1] == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


# ---- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"logprobs": 99}, "logprobs"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1.5, 2.5]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
])
def test_completion_invalid_fields_are_400(served, fields, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
    r = served.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_error_classes_through_the_sdk(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=3, max_tokens=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True, n=1, best_of=2)
    assert e.value.body["param"] == "best_of"
    too_long = [1] * (served.engine.max_model_len + 10)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * (served.engine.max_model_len - 2), max_tokens=10)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = served.post("/v1/completions", content=b'{"prompt": "hi",', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = served.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    wait_idle(served.engine)


# ---- concurrency and disconnects -----------------------------------------------------------------------
def test_concurrent_streams_match_offline_greedy(served):
    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text, reason = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return text, reason

    async def run():
        client = served.async_client()
        results = await asyncio.gather(*(one(client, p) for p in CONCURRENT_PROMPTS))
        await client.close()
        return results

    results = asyncio.run(run())
    assert all(reason == "length" for _, reason in results)
    assert {p: text for p, (text, _) in zip(CONCURRENT_PROMPTS, results)} == served.reference
    metrics = httpx.get(served.url + "/metrics").text
    for name in ("tokenmill_time_to_first_token_seconds_count", "tokenmill_inter_token_latency_seconds_count",
                 "tokenmill_e2e_request_latency_seconds_count", "tokenmill_num_requests_running",
                 "tokenmill_num_requests_waiting", "tokenmill_kv_cache_usage_perc", "tokenmill_prefix_cache_hit_rate",
                 "tokenmill_prompt_tokens_total", "tokenmill_generation_tokens_total"):
        assert name in metrics


def metric(served, name: str) -> float:
    for line in httpx.get(served.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_disconnect_mid_stream_frees_pages(served):
    engine = served.engine
    wait_idle(engine)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", served.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
            assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks     # pages held mid-stream
            assert metric(served, "tokenmill_num_requests_running") == 1
    wait_idle(engine)       # the client hung up: the request is aborted and every page is back
    deadline = time.time() + 5
    while metric(served, "tokenmill_kv_cache_usage_perc") != 0.0:
        assert time.time() < deadline
        time.sleep(0.05)
    assert served.app.state.async_engine.num_in_flight == 0


def test_disconnect_while_waiting_non_streaming(served):
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        served.post("/v1/completions", json=body, timeout=1.5)
    wait_idle(served.engine)


# ---- `tokenmill serve`: a separate process, drained by SIGTERM ----------------------------------------
# ---- hardening ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, param", [
    ('"seed": 18446744073709551616', "seed"),
    ('"temperature": NaN', "temperature"),
    ('"stop_token_ids": [1000000], "min_tokens": 2', "stop_token_ids"),
    ('"n": 200000', "n"),
    ('"logit_bias": {"abc": 1}', "logit_bias"),
    ('"logit_bias": {"999999": 5}', "logit_bias"),
    ('"logit_bias": {"5": 500}', "logit_bias"),
    ('"prompt": "caf\\ud800e"', "prompt"),
    ('"max_tokens": 0', "max_tokens"),
])
def test_bad_values_are_400_and_harm_no_one(served, raw, param):
    body = '{"model": "%s", "prompt": "hi", "max_tokens": 2, %s}' % (MODEL, raw)
    r = served.post("/v1/completions", content=body.replace('"prompt": "hi", ', '', raw.startswith('"prompt"')),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    wait_idle(served.engine)


def test_chat_with_a_lone_surrogate_is_400(served):
    body = '{"model": "%s", "messages": [{"role": "user", "content": "x\\udc80y"}], "max_tokens": 2}' % MODEL
    r = served.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_a_request_that_fails_in_the_engine_harms_no_one(served, monkeypatch):
    """A fault tied to one request (its prompt holds a poisoned token) while a stream is in flight:
    the faulty request gets a 500 naming the failure, the stream ends exactly as offline."""
    poison = served.engine.model_config.vocab_size - 1
    model = served.engine.runner.model
    forward = model.forward

    def guarded(input_ids, *args, **kwargs):
        if bool((input_ids == poison).any()):
            raise RuntimeError("injected fault")
        return forward(input_ids, *args, **kwargs)
    monkeypatch.setattr(model, "forward", guarded)
    prompt = CONCURRENT_PROMPTS[3]

    async def run():
        client = served.async_client()
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        text = ""
        failed = None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            if failed is None:
                try:
                    await client.completions.create(model=MODEL, prompt=[1, 2, poison], max_tokens=4)
                except openai.InternalServerError as e:
                    failed = e
        await client.close()
        return text, failed

    text, failed = asyncio.run(run())
    assert text == served.reference[prompt]
    assert failed is not None and "injected fault" in failed.body["message"]
    wait_idle(served.engine)
    assert served.engine.runner.generators == {} and served.engine.runner.tables == {}


def test_echo_with_max_tokens_zero_scores_the_prompt(served):
    client = served.client()
    prompt = "The capital of France is Paris."
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    n = len(choice.logprobs.tokens)
    assert choice.logprobs.token_logprobs[0] is None and n == scored.usage.prompt_tokens
    assert choice.logprobs.tokens == one.choices[0].logprobs.tokens[:n]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(one.choices[0].logprobs.token_logprobs[1:n], abs=1e-5)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt


def test_logit_bias_and_stop_token_text(served, smollm2_dequantized):
    client = served.client()
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    tok = served.engine.tokenizer
    ids = tok.encode(prompt + greedy.choices[0].text, add_special_tokens=False)
    first = tok.encode(prompt, add_special_tokens=False)
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                       logit_bias={str(ids[len(first)]): -100})
    assert banned.choices[0].text != greedy.choices[0].text
    # a stop token's own text is dropped unless include_stop_str_in_output
    # offline on an engine of its own: stepping the served engine from this thread races its loop
    offline = smollm2_dequantized
    full = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    stop = full.token_ids[2]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"stop_token_ids": [stop]})
    kept = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True})
    head = tok.decode(full.token_ids[:full.token_ids.index(stop)])
    assert cut.choices[0].text == head and cut.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == tok.decode(full.token_ids[:full.token_ids.index(stop) + 1])
    assert kept.choices[0].text != head


def test_chat_logprob_bytes_of_a_token_that_splits_a_character(served):
    tok = served.engine.tokenizer
    ids = tok.encode("🤗", add_special_tokens=False)
    partial = next(t for t in ids if "\ufffd" in tok.decode([t]))       # holds part of the emoji's UTF-8
    r = served.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                                logprobs=True, top_logprobs=2, logit_bias={str(partial): 100})
    entry = r.choices[0].logprobs.content[0]
    assert entry.bytes == list(tok.token_bytes(partial)) and entry.bytes != list("\ufffd".encode())
    # logprobs are of the model's own distribution (before the bias): its top tokens carry their bytes too
    assert all(bytes(top.bytes).decode(errors="replace") == top.token for top in entry.top_logprobs)
    with pytest.raises(UnicodeDecodeError):
        bytes(entry.bytes).decode()


def test_idle_engine_thread_sleeps(served):
    wait_idle(served.engine)
    engine = served.engine
    calls = []
    original = engine.has_unfinished_requests

    def counted():
        calls.append(1)
        return original()
    engine.has_unfinished_requests = counted
    try:
        time.sleep(1.0)
    finally:
        del engine.has_unfinished_requests
    assert len(calls) <= 1, f"the idle engine loop woke {len(calls)} times in 1 s"


def test_serve_cli_queue_full_and_sigterm_drain(smollm2_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(smollm2_path),
                             "--port", str(port), "--max-num-seqs", "1", "--max-queued-requests", "0",
                             "--served-model-name", "smol", "--log-level", "info"],
                            env={**os.environ, "TOKENMILL_LOG_LEVEL": "WARNING"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "tokenmill serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
            proc.send_signal(signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"     # drained, not cut
        # uvicorn re-raises SIGTERM once its graceful shutdown is done, so supervisors see the cause
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()
        assert "Traceback" not in log and "Application shutdown complete" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- beam search ---------------------------------------------------------------------------------------
def test_beam_search_completion_and_chat(served):
    client = served.client()
    extra = {"use_beam_search": True, "length_penalty": 0.5}
    r = client.completions.create(model=MODEL, prompt=BEAM_PROMPT, n=3, max_tokens=12, logprobs=0, extra_body=extra)
    assert [c.text for c in r.choices] == served.beams            # the offline search's beams, best first
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) > 0 for c in r.choices)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], n=2,
                                          max_tokens=24, logprobs=True, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content
    assert all(c.logprobs.content for c in chat.choices)
    wait_idle(served.engine)


@pytest.mark.parametrize("fields, param", [
    ({"stream": True}, "stream"),
    ({"top_p": 0.5}, "top_p"),
    ({"stop": ["."]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"n": 1000}, "n"),
    ({"n": 0}, "n"),
])
def test_beam_search_refusals_are_400(served, fields, param):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 2, "use_beam_search": True, **fields}
    r = served.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    wait_idle(served.engine)
