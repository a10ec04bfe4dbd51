"""Tensor parallelism: the same tokens from N ranks as from one (tiny random models of every family and
the real model), ranks started by a launcher's environment variables, and loud failure: a killed rank,
a taken port, a server's SIGTERM, a dead rank 0; no process is ever left behind."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.parallel.ranks import TensorParallelError

ROOT = Path(__file__).resolve().parents[2]
PROMPT_LENS = [3, 40, 9, 27, 1, 55]           # mixed: decode rows beside chunks of prefill
NEW_TOKENS = 64


def build(kind: str, directory: Path, seed: int = 0):
    """Tiny random models: llama GQA 4/2 with an odd vocabulary (uneven vocabulary pieces) and an untied
    head; qwen2 MQA (its one KV head replicated on both ranks) with biases and a tied head; mistral MHA;
    gemma3 with sliding-window layers, QK norms and a replicated KV head."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
                  initializer_range=0.2, rms_norm_eps=1e-6)
    if kind == "gemma3":
        from test_gemma3 import build_gemma
        return build_gemma(directory, ["sliding_attention", "full_attention", "sliding_attention"], window=16)
    cfg = {"llama": lambda: tf.LlamaConfig(vocab_size=385, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                           tie_word_embeddings=False, **common),
           "qwen2": lambda: tf.Qwen2Config(vocab_size=384, num_attention_heads=4, num_key_value_heads=1,
                                           tie_word_embeddings=True, **common),
           "mistral": lambda: tf.MistralConfig(vocab_size=384, num_attention_heads=4, num_key_value_heads=4,
                                               tie_word_embeddings=False, sliding_window=None, **common)}[kind]()
    model = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[kind](cfg)
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.eval().save_pretrained(directory)
    return model


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run(llm: LLM, batch: list[list[int]]) -> list:
    """Greedy with logprobs, then seeded sampling, in one batch: chunked prefill (32-token budget) and,
    with the engine's small page pool, preemption."""
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    return llm.generate(batch + batch[:2], [greedy] * len(batch) + [sampled] * 2, use_tqdm=False)


def engine(directory, tp: int, **kw) -> LLM:
    return LLM(str(directory), tensor_parallel_size=tp, max_num_batched_tokens=32, num_kv_blocks=kw.pop("blocks", 40),
               block_size=8, progress=False, **kw)


def assert_same(single, parallel, logprob_tol: float) -> None:
    for a, b in zip(single, parallel):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        if a.outputs[0].logprobs is not None:
            la = [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
            lb = [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
            assert max(abs(x - y) for x, y in zip(la, lb)) < logprob_tol


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_two_ranks_match_one(kind, tmp_path):
    hf = build(kind, tmp_path)
    batch = prompts(hf.config.vocab_size)
    single = engine(tmp_path, 1)
    expected = run(single, batch)
    preemptions = single.engine.scheduler.num_preemptions
    parallel = engine(tmp_path, 2)
    try:
        got = run(parallel, batch)
        assert parallel.engine.scheduler.num_preemptions == preemptions > 0      # the same schedule, preempting
        procs = list(parallel.engine.ranks.procs.values())
    finally:
        parallel.shutdown()
    assert_same(expected, got, 1e-4)
    assert all(p.returncode == 0 for p in procs)           # asked to stop, each rank exited cleanly


def test_shards_hold_their_piece(tmp_path):
    """Rank 0 of 2 holds half of every split matrix, its KV heads, and its rows of the vocabulary."""
    build("llama", tmp_path)
    llm = engine(tmp_path, 2)
    try:
        model = llm.engine.model
        attn, mlp = model.layers[0].attn, model.layers[0].mlp
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        assert attn.qkv.kernel.weight.shape == (2 * 32 + 2 * 32, 64) and attn.o.kernel.weight.shape == (64, 64)
        assert mlp.gate_up.kernel.weight.shape == (128, 64) and mlp.down.kernel.weight.shape == (64, 64)
        assert model.lm_head.kernel.weight.shape == (193, 64) and model.embed.table.weight.shape == (193, 64)
        assert llm.engine.runner.kv_caches[0][0].shape[2] == 1
    finally:
        llm.shutdown()


def test_real_model_three_ranks(smollm2_path):
    """SmolLM2 (9 heads, 3 KV heads) split three ways, dequantized (the exact path): the same greedy
    tokens and the same logprobs as one rank (32 tokens: three ranks share two cores here)."""
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(max_tokens=32, temperature=0.0, logprobs=1, ignore_eos=True)
    kw = dict(quantization="dequantize", num_kv_blocks=64, progress=False)
    expected = LLM(str(smollm2_path), **kw).generate(texts, params, use_tqdm=False)
    llm = LLM(str(smollm2_path), tensor_parallel_size=3, **kw)
    try:
        got = llm.generate(texts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_same(expected, got, 1e-4)


# ---- launching and failing --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = """
import json, sys
from tokenmill import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_num_batched_tokens=32, num_kv_blocks=40, block_size=8, progress=False)
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_ranks_started_by_a_launcher(tmp_path):
    """Two processes started the torchrun way (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) run one
    engine: rank 0 generates and rank 1 serves its steps, then exits 0."""
    hf = build("llama", tmp_path)
    batch = prompts(hf.config.vocab_size)[:3]
    expected = LLM(str(tmp_path), max_num_batched_tokens=32, num_kv_blocks=40, block_size=8, progress=False).generate(
        batch, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               TOKENMILL_LOG_LEVEL="WARNING")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(batch)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, text=True)
             for r in (1, 0)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0]
    assert json.loads(outs[1].strip().splitlines()[-1]) == [o.outputs[0].token_ids for o in expected]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0


def test_killed_rank_ends_the_engine_with_its_name(tmp_path):
    build("mistral", tmp_path)
    llm = engine(tmp_path, 2)
    batch = prompts(384)
    assert len(llm.generate(batch, SamplingParams(max_tokens=4), use_tqdm=False)) == len(batch)
    worker = llm.engine.ranks.procs[1]
    os.kill(worker.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 failed: its process \d+ was killed by SIGKILL"):
        llm.generate(batch, SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - t0 < 10
    with pytest.raises(TensorParallelError, match="closed"):         # and it stays ended
        llm.generate(batch, SamplingParams(max_tokens=4), use_tqdm=False)
    assert gone(worker.pid)


def test_taken_port_is_named(tmp_path, monkeypatch):
    build("mistral", tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
        with pytest.raises(TensorParallelError, match=f"cannot listen on 127.0.0.1:{s.getsockname()[1]}"):
            engine(tmp_path, 2)


def test_splits_that_do_not_divide_are_refused(tmp_path):
    build("mistral", tmp_path)
    with pytest.raises(ValueError, match="4 attention heads do not split evenly over 3 ranks"):
        engine(tmp_path, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        engine(tmp_path, 0)
    with pytest.raises(ValueError, match="draft model does not run under tensor parallelism"):
        engine(tmp_path, 2, speculative_config={"method": "draft_model", "model": str(tmp_path)})


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def start_server(model_dir: Path) -> tuple[subprocess.Popen, int]:
    """`tokenmill serve` on two ranks, once it listens."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(model_dir),
                               "--tensor-parallel-size", "2", "--num-kv-blocks", "40", "--port", str(port)],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError(f"the server did not start: {server.stderr.read()[-2000:]}")
        time.sleep(0.2)


def test_sigterm_of_the_server_leaves_no_process(tmp_path):
    build("mistral", tmp_path)
    server, port = start_server(tmp_path)
    try:
        ranks = children(server.pid)
        assert len(ranks) == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)     # uvicorn re-raises SIGTERM once shut down
        assert "Application shutdown complete" in server.stderr.read()
    finally:
        server.kill()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in ranks)


def test_dead_rank0_takes_its_ranks_along(tmp_path):
    """kill -9 of the process that spawned the ranks: they follow it (no orphans)."""
    build("mistral", tmp_path)
    script = ("import os, sys, time\nfrom tokenmill import LLM\n"
              "llm = LLM(sys.argv[1], tensor_parallel_size=2, num_kv_blocks=40, progress=False)\n"
              "print(llm.engine.ranks.procs[1].pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        rank1 = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not gone(rank1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(rank1)
    finally:
        parent.kill()


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("checkpoint", ["gptq-sym", "gptq-asym-act", "gptq-8bit", "awq-gemm", "w8a8"])
def test_quantized_checkpoints_split_in_their_own_packing(checkpoint):
    """GPTQ (v1 sym, asym + act-order, 8-bit per-channel), AWQ and compressed-tensors W8A8 checkpoints made
    by the reference tools, split two ways, scored teacher-forced (these tiny random models have near ties
    that greedy decoding would turn into flips): dequantized, the pieces are exactly the whole (1e-4); run
    as stored, within what the kernels round (bf16 partial sums, per-rank activation scales of W8A8)."""
    path = FIXTURES / checkpoint
    batch = prompts(512)[1:4]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for quantization, tol in (("dequantize", 1e-4), (None, 2e-2)):
        scores = []
        for tp in (1, 2):
            llm = LLM(str(path), quantization=quantization, tensor_parallel_size=tp, num_kv_blocks=64, progress=False)
            try:
                outs = llm.generate(batch, params, use_tqdm=False)
            finally:
                llm.shutdown()
            scores.append(torch.tensor([d[t].logprob for o in outs
                                        for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]))
            if tp == 2 and quantization is None:      # the pieces run on the method's own kernels, not dense
                kinds = {name: layer.kernel.describe() for name, layer in llm.engine.model.linears().items()}
                assert "dense" not in kinds["layers.0.qkv"]
                assert ("dense" in kinds["layers.0.down"]) == (checkpoint == "gptq-asym-act")   # act-order rows
        assert (scores[0] - scores[1]).abs().max() < tol, quantization


def test_interrupt_mid_step_ends_the_group_and_a_second_group_is_refused(tmp_path, monkeypatch):
    """Ctrl-C inside rank 0's forward: the interrupt reaches the caller, and since the ranks are out of
    step the group is closed (never a hang on the next call). A second tensor-parallel engine in the same
    process is refused while one runs."""
    build("qwen2", tmp_path)
    llm = engine(tmp_path, 2)
    with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
        engine(tmp_path, 2)
    assert len(llm.generate(prompts(384)[:2], SamplingParams(max_tokens=2), use_tqdm=False)) == 2   # unharmed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    worker = llm.engine.ranks.procs[1]
    monkeypatch.setattr(llm.engine.runner.model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts(384)[:2], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(TensorParallelError, match="closed"):
        llm.generate(prompts(384)[:2], SamplingParams(max_tokens=2), use_tqdm=False)
    assert worker.poll() is not None


def test_ranks_outlive_the_thread_that_started_them(tmp_path):
    import threading
    build("qwen2", tmp_path)
    made = []
    thread = threading.Thread(target=lambda: made.append(engine(tmp_path, 2)))
    thread.start()
    thread.join()
    try:
        time.sleep(0.5)
        assert len(made[0].generate(prompts(384)[:2], SamplingParams(max_tokens=2), use_tqdm=False)) == 2
    finally:
        made[0].shutdown()


def test_a_dead_rank_stops_the_server_with_its_name(tmp_path):
    import urllib.error
    import urllib.request
    build("mistral", tmp_path)
    server, port = start_server(tmp_path)
    try:
        (rank1,) = children(server.pid)
        os.kill(rank1, signal.SIGKILL)
        body = json.dumps({"model": tmp_path.name, "prompt": [5, 6, 7], "max_tokens": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 503 and "rank 1 failed" in answer.value.read().decode()
        assert server.wait(timeout=30) == 1
        assert "the engine failed, the server stopped: tensor-parallel rank 1 failed" in server.stderr.read()
    finally:
        server.kill()


def test_rank0_gets_its_threads_back(tmp_path):
    build("qwen2", tmp_path)
    before = torch.get_num_threads()
    llm = engine(tmp_path, 2)
    assert torch.get_num_threads() == max(1, before // 2)      # threads / N on every rank, rank 0 too
    llm.shutdown()
    assert torch.get_num_threads() == before
