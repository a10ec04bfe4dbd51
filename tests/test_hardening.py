"""Hardening: bad input is refused where it enters, a request that breaks a step fails alone,
nothing waits forever, and prefix-cache hits are verified whatever the hash."""
from __future__ import annotations

import logging
import math
import random
import time

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.core.block_manager import BlockManager
from tokenmill.core.scheduler import Scheduler, SchedulerConfig
from tokenmill.core.sequence import Sequence, SequenceStatus
from tokenmill.engine import LLMEngine
from tokenmill.config import EngineConfig
from tokenmill.sampling_params import RequestOutputKind

VOCAB = 384


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    directory, _ = tiny_llama
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    return LLMEngine(EngineConfig(model=str(directory), max_num_seqs=8, max_model_len=256, num_kv_blocks=256),
                     progress=False)


def run(engine: LLMEngine) -> dict:
    done = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish"
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


# ---- validation where input enters ---------------------------------------------------------------------
@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=math.nan)), ("temperature", dict(temperature=math.inf)),
    ("temperature", dict(temperature=1e-9)), ("top_p", dict(top_p=math.nan)), ("min_p", dict(min_p=math.nan)),
    ("presence_penalty", dict(presence_penalty=math.nan)), ("repetition_penalty", dict(repetition_penalty=math.inf)),
    ("seed", dict(seed=2**64)), ("seed", dict(seed=-2**63 - 1)), ("seed", dict(seed=1.5)),
    ("n", dict(n=True)), ("max_tokens", dict(max_tokens=2.0)),
    ("logit_bias", dict(logit_bias={5: 101.0})), ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={5: math.nan})), ("stop", dict(stop=["ok", "\ud800"])),
])
def test_sampling_params_refuse_with_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_edge_values_that_are_valid():
    assert SamplingParams(top_k=0).top_k == 0                     # vLLM: 0 disables top-k, like -1
    assert SamplingParams(seed=2**63 - 1, n=4).seed == 2**63 - 1
    assert SamplingParams(max_tokens=0, prompt_logprobs=1).max_tokens == 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt_token_ids=[10**6]), "prompt"), (dict(prompt_token_ids=[]), "prompt"),
    (dict(prompt_token_ids=[1, -3]), "prompt"), (dict(prompt_token_ids=[True]), "prompt"),
    (dict(params=SamplingParams(stop_token_ids=[VOCAB], min_tokens=2)), "stop_token_ids"),
    (dict(params=SamplingParams(logit_bias={VOCAB + 5: 1.0})), "logit_bias"),
    (dict(params=SamplingParams(n=9)), "n"), (dict(params=SamplingParams(n=2, best_of=9)), "best_of"),
])
def test_add_request_refuses_before_queueing(engine, kwargs, field):
    params = kwargs.pop("params", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=f"^{field}"):
        engine.add_request(None, None, params, prompt_token_ids=kwargs.get("prompt_token_ids", ids(5)))
    assert not engine.has_unfinished_requests() and not engine.requests
    rid = engine.add_request(None, None, SamplingParams(temperature=0, max_tokens=3), prompt_token_ids=ids(7))
    assert len(run(engine)[rid].outputs[0].token_ids) == 3


def test_a_huge_n_is_refused_at_once(engine):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="^n must be <= max_num_seqs"):
        engine.add_request(None, None, SamplingParams(n=200000), prompt_token_ids=ids(5))
    assert time.perf_counter() - t0 < 0.5


def test_lone_surrogate_in_a_prompt_is_a_value_error(smol):
    llm = smol
    with pytest.raises(ValueError, match="^prompt: not valid Unicode"):
        llm.generate("abc \ud800 def", SamplingParams(max_tokens=2), use_tqdm=False)


def test_max_model_len_checked_against_positions_and_cache(tiny_llama, caplog):
    directory, hf = tiny_llama
    positions = hf.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"^max_model_len \\({positions + 1}\\) exceeds the model's"):
        LLMEngine(EngineConfig(model=str(directory), max_model_len=positions + 1), progress=False)
    with pytest.raises(ValueError, match=r"^max_model_len \(512\) exceeds the 128 tokens the KV cache holds"):
        LLMEngine(EngineConfig(model=str(directory), num_kv_blocks=8, max_model_len=512), progress=False)
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        capped = LLMEngine(EngineConfig(model=str(directory), num_kv_blocks=8), progress=False)
    assert capped.max_model_len == 128 and "capped to the 128 tokens" in caplog.text


# ---- nothing waits forever -----------------------------------------------------------------------------
def test_a_sequence_larger_than_the_cache_ends_with_length(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), num_kv_blocks=8, progress=False)           # 128 tokens in all
    t0 = time.perf_counter()
    out = llm.generate([ids(20)], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].prompt_token_ids) + len(out[0].outputs[0].token_ids) == 128
    assert time.perf_counter() - t0 < 30


def test_scheduler_finishes_a_lone_sequence_that_cannot_grow():
    """Below the engine's start-up check: the scheduler alone never spins on such a sequence."""
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=100), bm, set())
    seq = Sequence("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=None))
    sched.add(seq)
    for step in range(10):
        out = sched.schedule()
        if seq.is_finished:
            break
        sched.update(out, [[7]] * len(out.samples))
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_tokens == 9 and step < 6   # 8 in the pages + the last sampled
    assert out.finished == [seq] and not sched.has_unfinished() and bm.num_free_blocks == 2


def test_scheduler_refuses_a_group_larger_than_max_num_seqs():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(8, 4), set())
    leader = Sequence("r", [1, 2], SamplingParams(n=3))
    leader.pending_forks = [Sequence("r", [1, 2], leader.params, index=i) for i in (1, 2)]
    with pytest.raises(ValueError, match="^n: a request of 3 sequences"):
        sched.add(leader)


# ---- a failing request fails alone ---------------------------------------------------------------------
POISON = 383


def poison_forward(engine: LLMEngine):
    """Make the model raise whenever a step's input holds token POISON: a fault tied to one request."""
    model = engine.runner.model
    forward = model.forward

    def guarded(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            raise RuntimeError("injected fault")
        return forward(input_ids, *args, **kwargs)
    return guarded


def test_a_request_that_breaks_the_forward_fails_alone(tiny_llama, monkeypatch):
    directory, _ = tiny_llama
    llm = LLM(str(directory), max_num_seqs=8, num_kv_blocks=64, progress=False)
    prompts = [ids(9, seed=s) for s in range(4)]
    assert all(POISON not in p for p in prompts)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=12, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=0.5)]
    clean = llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(llm.engine.runner.model, "forward", poison_forward(llm.engine))
    mixed = llm.generate(prompts[:2] + [ids(5, seed=9) + [POISON]] + prompts[2:],
                         params[:2] + [SamplingParams(max_tokens=4)] + params[2:], use_tqdm=False)
    bad = mixed.pop(2)
    assert bad.finished and bad.error == "RuntimeError: injected fault"
    assert [o.outputs[0].finish_reason for o in [bad]] == ["abort"]
    assert [[c.token_ids for c in o.outputs] for o in mixed] == [[c.token_ids for c in o.outputs] for o in clean]
    assert all(o.error is None for o in mixed)
    engine = llm.engine
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_breaks_sampling_midway_fails_alone(engine, monkeypatch):
    clean_id = engine.add_request(None, None, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                  prompt_token_ids=ids(11, seed=1))
    clean = run(engine)[clean_id].outputs[0].token_ids
    row = engine.runner.row

    def faulty(seq, pending=()):
        if seq.request_id == "bad" and seq.num_output_tokens == 3:
            raise IndexError("injected sampler fault")
        return row(seq, pending)
    monkeypatch.setattr(engine.runner, "row", faulty)
    engine.add_request("good", None, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       prompt_token_ids=ids(11, seed=1))
    engine.add_request("bad", None, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       prompt_token_ids=ids(6, seed=2))
    done = run(engine)
    assert done["good"].outputs[0].token_ids == clean and done["good"].error is None
    assert done["bad"].error == "IndexError: injected sampler fault"
    assert len(done["bad"].outputs[0].token_ids) == 3


# ---- prefix-cache hits are verified --------------------------------------------------------------------
def weak_hash(parent, tokens):
    """A hash that ignores the prefix: every page with the same tokens collides."""
    return repr(tokens).encode()


def test_colliding_hashes_never_share_pages():
    bm = BlockManager(num_blocks=16, block_size=4, hash_fn=weak_hash)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]

    def compute(tokens):
        s = Sequence("r", list(tokens), SamplingParams())
        assert bm.allocate(s, len(tokens))
        s.num_computed_tokens = len(tokens)
        bm.cache_full_blocks(s)
        return s
    a = compute(x + z + [0])          # z computed after x
    b = compute(y + z + [0])          # the same z page, after y: same weak hash, other KV
    c = Sequence("r", y + z + [13], SamplingParams())
    assert bm.allocate(c, c.num_tokens)
    assert c.block_table[0] == b.block_table[0]                   # y is a true hit
    assert c.block_table[1] not in (a.block_table[1],)            # a's z page follows x, not y
    assert c.num_computed_tokens in (4, 8)
    if c.num_computed_tokens == 8:
        assert c.block_table[1] == b.block_table[1]


def test_engine_output_is_unchanged_by_colliding_hashes(tiny_llama, monkeypatch):
    import tokenmill.engine as engine_module
    directory, _ = tiny_llama
    x, y, z = ids(16, seed=1), ids(16, seed=2), ids(32, seed=3)
    prompts = [x + z + ids(3, seed=4), y + z + ids(3, seed=5), y + z + ids(3, seed=6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLM(str(directory), enable_prefix_caching=False, num_kv_blocks=256, progress=False)
    expected = [plain.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    class WeakBlockManager(BlockManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, hash_fn=weak_hash)
    monkeypatch.setattr(engine_module, "BlockManager", WeakBlockManager)
    weak = LLM(str(directory), num_kv_blocks=256, progress=False)      # evicts none of its 12 pages
    got = [weak.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == expected
    # the third prompt hits its y page; the z pages the weak hash finds were computed after x
    assert weak.engine.block_manager.stats.hits == 16


# ---- outputs, penalties and seeds stay exact across batching, chunking and preemption --------------------
def test_penalised_and_seeded_rows_are_batch_invariant(tiny_llama):
    directory, _ = tiny_llama
    rng = random.Random(11)
    prompts = [ids(rng.randrange(5, 70), seed=100 + i) for i in range(12)]
    params = [SamplingParams(temperature=rng.choice([0, 0.8]), seed=i, max_tokens=rng.randrange(8, 30),
                             ignore_eos=True, repetition_penalty=rng.choice([1.0, 1.3]),
                             frequency_penalty=rng.choice([0.0, 0.7]), presence_penalty=rng.choice([0.0, -0.4]),
                             logit_bias={rng.randrange(VOCAB): rng.choice([-100.0, 3.0])})
              for i in range(12)]
    alone_llm = LLM(str(directory), enable_prefix_caching=False, num_kv_blocks=64, progress=False)
    alone = [alone_llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    squeezed = LLM(str(directory), num_kv_blocks=12, max_num_batched_tokens=32, max_num_seqs=12, progress=False)
    batched = squeezed.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == alone
    assert squeezed.engine.scheduler.num_preemptions > 0


def test_delta_outputs_add_up_to_the_cumulative_ones(engine):
    base = dict(temperature=1.0, seed=7, n=2, max_tokens=12, ignore_eos=True, logprobs=2)
    collected = {}
    for kind in RequestOutputKind:
        rid = engine.add_request(None, None, SamplingParams(**base, output_kind=kind), prompt_token_ids=ids(9))
        steps = []
        while engine.has_unfinished_requests():
            steps += [o for o in engine.step() if o.request_id == rid]
        collected[kind] = steps
    assert len(collected[RequestOutputKind.FINAL_ONLY]) == 1
    final = collected[RequestOutputKind.FINAL_ONLY][0]
    assert collected[RequestOutputKind.CUMULATIVE][-1].outputs[0].token_ids == final.outputs[0].token_ids
    deltas = collected[RequestOutputKind.DELTA]
    assert len(deltas) == 12
    for j in range(2):
        assert sum((d.outputs[j].token_ids for d in deltas), []) == final.outputs[j].token_ids
        assert sum((d.outputs[j].logprobs for d in deltas), []) == final.outputs[j].logprobs


def test_max_tokens_zero_scores_the_prompt_only(engine):
    prompt = ids(40, seed=8)
    rid = engine.add_request(None, None, SamplingParams(max_tokens=0, prompt_logprobs=1), prompt_token_ids=prompt)
    one = engine.add_request(None, None, SamplingParams(max_tokens=1, prompt_logprobs=1), prompt_token_ids=prompt)
    done = run(engine)
    scored = done[rid]
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
    assert len(scored.prompt_logprobs) == len(prompt)
    assert [{t: lp.logprob for t, lp in r.items()} if r else None for r in scored.prompt_logprobs] == \
        [{t: lp.logprob for t, lp in r.items()} if r else None for r in done[one].prompt_logprobs]


def test_top_k_zero_is_disabled(engine):
    outs = {}
    for k in (0, -1):
        rid = engine.add_request(None, None, SamplingParams(temperature=1.0, top_k=k, seed=3, max_tokens=10,
                                                            ignore_eos=True), prompt_token_ids=ids(6))
        outs[k] = run(engine)[rid].outputs[0].token_ids
    assert outs[0] == outs[-1]


def test_logit_bias_bans_and_forces_tokens(engine):
    prompt = ids(12, seed=21)
    rid = engine.add_request(None, None, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                             prompt_token_ids=prompt)
    greedy = run(engine)[rid].outputs[0].token_ids
    rid = engine.add_request(None, None, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                        logit_bias={greedy[0]: -100.0}), prompt_token_ids=prompt)
    banned = run(engine)[rid].outputs[0].token_ids
    assert greedy[0] not in banned
    rid = engine.add_request(None, None, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=1,
                                                        logit_bias={17: 100.0}), prompt_token_ids=prompt)
    assert run(engine)[rid].outputs[0].token_ids == [17] * 6


# ---- stop semantics on the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=128, max_num_seqs=8, progress=False)


def test_stop_strings_wait_for_min_tokens(smol):
    prompt = "The numbers from one to ten are: one, two,"
    free = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    tok = smol.get_tokenizer()
    assert "," in tok.decode(free.token_ids[:3]), free.text        # a stop that would fire early
    early = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=","), use_tqdm=False)[0]
    assert early.outputs[0].text == free.text[:free.text.index(",")]
    for min_tokens in (5, 6):
        waited = smol.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=",", min_tokens=min_tokens),
                               use_tqdm=False)[0].outputs[0]
        floor = len(tok.decode(free.token_ids[:min_tokens - 1]))   # text before the min_tokens-th token
        assert waited.finish_reason == "stop" and waited.stop_reason == ","
        assert waited.text == free.text[:free.text.index(",", floor)]
        assert len(waited.token_ids) >= min_tokens


def test_eos_text_is_dropped_unless_asked(smol):
    tok = smol.get_tokenizer()
    eos = next(iter(sorted(tok.eos_token_ids)))
    conversation = [{"role": "user", "content": "Hi"}]
    base = dict(temperature=0, max_tokens=40, skip_special_tokens=False)
    # a first run fills the prefix cache, so the two compared runs both start from the same hit: a hit computes
    # the prompt's tail with a different attention split than a miss, and the int8 rounding of activations can
    # turn that last-bit difference into another greedy token at a near tie
    smol.chat(conversation, SamplingParams(**base), use_tqdm=False)
    cut = smol.chat(conversation, SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    kept = smol.chat(conversation, SamplingParams(**base, include_stop_str_in_output=True),
                     use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.token_ids[-1] in tok.eos_token_ids and cut.token_ids == kept.token_ids
    assert cut.text == tok.decode(cut.token_ids[:-1], skip_special_tokens=False)
    assert kept.text == tok.decode(kept.token_ids, skip_special_tokens=False) and kept.text != cut.text
    assert eos in tok.eos_token_ids


# ---- EOS end to end on a tiny model with a real tokenizer ----------------------------------------------
@pytest.fixture(scope="module")
def chat_llm(tiny_chat_llama):
    directory = tiny_chat_llama[0]
    return LLM(str(directory), max_num_seqs=8, num_kv_blocks=256, progress=False)


def hf_greedy(model, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             **kwargs)
    return out[0, len(ids):].tolist()


def test_eos_ends_generation_like_transformers(tiny_chat_llama, chat_llm):
    _, hf, eos, prompt = tiny_chat_llama
    tok = chat_llm.get_tokenizer()
    assert tok.eos_token_ids == {eos}
    ids = tok.encode(prompt)
    expected = hf_greedy(hf, ids, 10, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) == 3             # the reference stops on EOS too
    out = chat_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == expected and c.finish_reason == "stop" and c.stop_reason is None
    assert c.text == tok.decode(expected[:-1])
    shown = chat_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, skip_special_tokens=False,
                                                              include_stop_str_in_output=True), use_tqdm=False)
    assert shown[0].outputs[0].text == tok.decode(expected, skip_special_tokens=False)
    assert shown[0].outputs[0].text.endswith("<|im_end|>")


@pytest.mark.parametrize("params", [dict(ignore_eos=True), dict(min_tokens=6), dict(logit_bias={"eos": -100.0})])
def test_eos_can_be_ignored_delayed_or_banned(tiny_chat_llama, chat_llm, params):
    _, hf, eos, prompt = tiny_chat_llama
    if "logit_bias" in params:
        params = dict(logit_bias={eos: -100.0})
    out = chat_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, **params),
                            use_tqdm=False)[0].outputs[0]
    free = hf_greedy(hf, chat_llm.get_tokenizer().encode(prompt), 8, eos_token_id=None)
    if "ignore_eos" in params:                     # EOS stays in the tokens, the text runs on
        assert out.token_ids == free and out.finish_reason == "length" and eos in out.token_ids
    else:
        assert eos not in out.token_ids[:6] and out.token_ids[:2] == free[:2]
        assert out.token_ids[2] != eos


def test_chat_template_and_stop_string_on_the_tiny_model(chat_llm):
    out = chat_llm.chat([{"role": "user", "content": "hello world"}], SamplingParams(temperature=0, max_tokens=12,
                                                                                     ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    text = out.outputs[0].text
    assert text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = chat_llm.chat([{"role": "user", "content": "hello world"}],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop), use_tqdm=False)[0]
    assert cut.outputs[0].text == text[:text.index(stop)] and cut.outputs[0].stop_reason == stop


@pytest.mark.parametrize("kwargs,field", [
    (dict(kv_cache_memory_gb=math.nan), "kv_cache_memory_gb"), (dict(kv_cache_memory_gb=-1.0), "kv_cache_memory_gb"),
    (dict(num_kv_blocks=2.5), "num_kv_blocks"), (dict(max_model_len=True), "max_model_len"),
    (dict(device="gpu9"), "device"), (dict(seed=2**64), "seed"), (dict(block_size=0), "block_size"),
    (dict(dtype="fp8"), "dtype"), (dict(enforce_eager="yes"), "enforce_eager"),
])
def test_engine_config_refuses_with_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        EngineConfig(**kwargs)


# ---- fuzz: any mix of values is refused with a field name or runs to the end, and harms no one ----------
FUZZ_VALUES = {
    "n": [1, 2, 3, 0, -1, 9, 2.0, True, None],
    "best_of": [None, 3, 1, 0, 100],
    "temperature": [0.0, 0.7, 1.0, 2.5, -1.0, math.nan, math.inf, 1e-7, "hot"],
    "top_p": [1.0, 0.9, 0.01, 0.0, 1.5, math.nan],
    "top_k": [-1, 0, 1, 5, 10**6, -3, 2.5],
    "min_p": [0.0, 0.1, 1.0, -0.1, 2.0],
    "presence_penalty": [0.0, 1.0, -2.0, 3.0, math.inf],
    "frequency_penalty": [0.0, 0.5, -2.5],
    "repetition_penalty": [1.0, 1.3, 0.7, 0.0, -1.0, math.nan],
    "seed": [None, 0, 7, 2**63 - 1, 2**64, -5, -2**63 - 1, "x"],
    "stop": [None, "a", ["ab", "c"], [""], [1], "\udc80"],
    "stop_token_ids": [None, [5], [VOCAB + 1], [-1], ["5"]],
    "logit_bias": [None, {3: 5.0}, {3: 200.0}, {VOCAB: 1.0}, {-2: 1.0}, {4: math.nan}],
    "max_tokens": [1, 5, 12, 0, -1, None],
    "min_tokens": [0, 2, 20, -1],
    "logprobs": [None, 0, 3, 21, -1],
    "prompt_logprobs": [None, 0, 2, 30],
    "ignore_eos": [False, True],
}


def test_fuzzed_requests_are_refused_by_name_or_complete(tiny_chat_llama):
    llm = LLM(str(tiny_chat_llama[0]), max_num_seqs=8, num_kv_blocks=24, max_model_len=128, progress=False)
    engine = llm.engine
    rng = random.Random(1234)
    accepted, refused = set(), 0
    for i in range(160):
        kwargs = {k: rng.choice(v) for k, v in rng.sample(sorted(FUZZ_VALUES.items()), rng.randrange(1, 8))}
        if kwargs.get("max_tokens", 1) is None:
            kwargs["max_tokens"] = 30
        prompt = ids(rng.randrange(1, 40), seed=i)
        try:
            params = SamplingParams(**kwargs)
            rid = engine.add_request(None, None, params, prompt_token_ids=prompt)
        except ValueError as e:
            field = str(e).split(" ", 1)[0].rstrip(":")
            assert field in FUZZ_VALUES or field in ("prompt", "sampling_params"), (kwargs, str(e))
            assert field == "prompt" or field in kwargs or field == "n", (kwargs, str(e))
            refused += 1
            continue
        except TypeError as e:          # a value of a type no field takes (e.g. a str seed) -- never past here
            raise AssertionError(f"{kwargs}: TypeError instead of ValueError: {e}") from e
        accepted.add(rid)
        if len(engine.requests) >= 6 or i == 159:
            done = run(engine)
            assert set(done) <= accepted and all(o.error is None for o in done.values()), \
                [o.error for o in done.values() if o.error]
            accepted -= set(done)
    run(engine)
    assert refused > 20 and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("call", [
    lambda llm: llm.generate([None], SamplingParams(max_tokens=1), use_tqdm=False),
    lambda llm: llm.generate([{"text": "x"}], SamplingParams(max_tokens=1), use_tqdm=False),
    lambda llm: llm.generate(["x"], [SamplingParams(), SamplingParams()], use_tqdm=False),
    lambda llm: llm.generate(["x"], [dict(max_tokens=1)], use_tqdm=False),
    lambda llm: llm.chat([{"role": "user"}], use_tqdm=False),
    lambda llm: llm.chat([{"role": "user", "content": 5}], use_tqdm=False),
    lambda llm: llm.chat([{"role": "user", "content": "a\ud800"}], use_tqdm=False),
    lambda llm: llm.chat([], use_tqdm=False),
])
def test_offline_entry_points_refuse_bad_input(chat_llm, call):
    with pytest.raises(ValueError, match="^(prompt|sampling_params|messages)"):
        call(chat_llm)
    assert not chat_llm.engine.has_unfinished_requests()
