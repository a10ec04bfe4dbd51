"""Speculative decoding inside the engine: greedy output token-identical to plain greedy decoding (n-gram
and draft-model proposers, k in {1, 3, 5}, mixed batches, chunked prefill, prefix hits, preemption),
seeded sampling independent of the batch, and the target's distribution under sampling (chi-square
against transformers' own processing of the target's logits)."""
import random

import pytest
import torch
from scipy.stats import chisquare

from tokenmill import LLM, SamplingParams
from tokenmill.spec import rejection

V = 384


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(V) for _ in range(n)]


def repetitive(n: int, seed: int) -> list[int]:
    """A prompt made of a repeated phrase: the n-gram proposer finds matches at once."""
    phrase = ids(7, seed)
    return (phrase * (n // 7 + 1))[:n]


PROMPTS = [repetitive(40, 1), ids(9, 2), repetitive(70, 3), ids(33, 4), repetitive(21, 5), ids(3, 6)]


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, tiny_model_builder):
    """A different random llama with the same vocabulary: drafts that are often wrong."""
    directory = tmp_path_factory.mktemp("tiny-draft")
    tiny_model_builder("llama", directory, seed=1)
    return directory


@pytest.fixture(scope="module")
def near_draft(tiny_llama, tmp_path_factory):
    """The target with noise on every weight: a draft that agrees often, not always."""
    import copy
    _, hf_model = tiny_llama
    draft = copy.deepcopy(hf_model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std())
    directory = tmp_path_factory.mktemp("near-draft")
    draft.save_pretrained(directory)
    return directory


def greedy(max_tokens=32, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, **kw)


def run(directory, spec=None, params=None, prompts=PROMPTS, **engine_kw):
    kw = dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=256, progress=False) | engine_kw
    llm = LLM(str(directory), speculative_config=spec, **kw)
    outs = llm.generate(prompts, params or greedy(), use_tqdm=False)
    return outs, llm.engine


def assert_same(outs, plain):
    for o, p in zip(outs, plain):
        assert o.outputs[0].token_ids == p.outputs[0].token_ids
        for ours, theirs in zip(o.outputs[0].logprobs, p.outputs[0].logprobs):
            assert ours.keys() == theirs.keys()
            for t in ours:
                assert ours[t].logprob == pytest.approx(theirs[t].logprob, abs=1e-4)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    directory, _ = tiny_llama
    return run(directory)[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ngram_greedy_is_plain_greedy(tiny_llama, plain, k):
    directory, _ = tiny_llama
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "disable_by_batch_size": None}
    outs, engine = run(directory, spec)
    assert_same(outs, plain)
    stats = engine.spec_stats
    assert stats.num_accepted_tokens > 0 and stats.num_accepted_tokens < stats.num_draft_tokens
    assert max(len(p) for p in [stats.drafted_per_position]) == k
    assert any(o.metrics.spec_decode is not None for o in outs)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_model_greedy_is_plain_greedy(tiny_llama, tiny_draft, plain, k):
    directory, _ = tiny_llama
    spec = {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": k,
            "disable_by_batch_size": None}
    outs, engine = run(directory, spec)
    assert_same(outs, plain)
    assert 0 < engine.spec_stats.num_accepted_tokens < engine.spec_stats.num_draft_tokens


def test_self_draft_accepts_everything_greedy(tiny_llama, plain):
    """The target as its own draft: every greedy draft is the target's argmax, so it is accepted."""
    directory, _ = tiny_llama
    spec = {"method": "draft_model", "model": str(directory), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    outs, engine = run(directory, spec)
    assert_same(outs, plain)
    stats = engine.spec_stats
    assert stats.acceptance_rate == 1.0 and stats.mean_acceptance_length > 3.5


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_chunked_prefill_prefix_hits_and_preemption(tiny_llama, tiny_draft, plain, method):
    directory, _ = tiny_llama
    spec = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": None, "prompt_lookup_min": 1}
    if method == "draft_model":
        spec["model"] = str(tiny_draft)
    shared = PROMPTS + [PROMPTS[2] + [5, 6], PROMPTS[0]]          # prefix hits: the same pages twice
    want = run(directory, params=greedy(), prompts=shared, max_num_batched_tokens=16, max_model_len=128)[0]
    # 14 pages of 16 tokens for 8 sequences of up to 96 tokens: preemption is forced
    outs, engine = run(directory, spec, prompts=shared, max_num_batched_tokens=16, num_kv_blocks=14,
                       max_model_len=128)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.stats.hits > 0
    assert_same(outs, want)
    assert engine.spec_stats.num_accepted_tokens > 0


def test_stops_and_max_tokens_inside_the_drafts(tiny_llama, plain):
    """stop_token_ids, min_tokens and max_tokens that fall mid-draft end exactly where plain decoding ends."""
    directory, _ = tiny_llama
    plain_out = [o.outputs[0].token_ids for o in plain]
    stop = plain_out[0][9]                        # a token the first request emits at step 10
    cases = [greedy(max_tokens=m) for m in (2, 5, 7)] + [greedy(stop_token_ids=[stop]),
                                                         greedy(stop_token_ids=[stop], min_tokens=12)]
    spec = {"method": "ngram", "num_speculative_tokens": 5, "disable_by_batch_size": None, "prompt_lookup_min": 1}
    kw = dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=256, progress=False)
    plain_llm, spec_llm = LLM(str(directory), **kw), LLM(str(directory), speculative_config=spec, **kw)
    for params in cases:
        want = plain_llm.generate(PROMPTS[:3], params, use_tqdm=False)
        outs = spec_llm.generate(PROMPTS[:3], params, use_tqdm=False)
        assert_same(outs, want)
        for o, w in zip(outs, want):
            assert o.outputs[0].finish_reason == w.outputs[0].finish_reason


def test_seeded_sampling_with_drafts_is_the_same_whatever_the_batch(tiny_llama, tiny_draft):
    directory, _ = tiny_llama
    spec = {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    llm = LLM(str(directory), speculative_config=spec, max_num_seqs=8, max_model_len=256, num_kv_blocks=256,
              progress=False)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, presence_penalty=0.5, max_tokens=24,
                            ignore_eos=True, seed=99)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True)
    batch = llm.generate(PROMPTS[1:4] + [PROMPTS[0]], [others] * 3 + [params], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone
    assert llm.engine.spec_stats.num_accepted_tokens > 0


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama, tmp_path, tiny_model_builder):
    import transformers as tf
    directory, _ = tiny_llama
    cfg = tf.LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocabulary"):
        LLM(str(directory), speculative_config={"method": "draft_model", "model": str(tmp_path)}, progress=False)


@pytest.mark.parametrize("spec,field", [
    ({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "draft_model"}, "model"), ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"typo": 1}, "unknown"), ('{"method": ', "JSON"), ({"disable_by_batch_size": 0}, "disable_by_batch_size"),
])
def test_bad_speculative_config_names_the_field(tiny_llama, spec, field):
    directory, _ = tiny_llama
    with pytest.raises(ValueError, match=field):
        LLM(str(directory), speculative_config=spec, progress=False)


# ---- the output distribution is the target's -------------------------------------------------------

DIST_PARAMS = dict(temperature=1.0, top_k=4, top_p=0.9, repetition_penalty=1.3, max_tokens=3, ignore_eos=True)


def target_law(hf_model, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """Exact probability of each first three tokens: transformers' target logits through transformers'
    own processors (repetition penalty over prompt + output, temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    procs = [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(1.0), TopKLogitsWarper(4),
             TopPLogitsWarper(0.9)]

    @torch.no_grad()
    def probs(context):
        ids = torch.tensor([context])
        logits = hf_model(ids).logits[:, -1].double()
        for proc in procs:
            logits = proc(ids, logits)
        return logits.softmax(-1)[0]

    law = {(): 1.0}
    for _ in range(3):
        law = {key + (t,): prob * float(p[t]) for key, prob in law.items()
               for p in [probs(prompt + list(key))] for t in p.nonzero().squeeze(1).tolist()}
    return law


def pooled_pvalue(observed: dict, law: dict, n: int) -> float:
    """Chi-square over outcomes expected at least 5 times, the rest pooled into one bin; 0 when an
    outcome the target cannot produce occurred."""
    if not set(observed) <= set(law):
        return 0.0
    big = [key for key in law if law[key] * n >= 5]
    obs = [observed.get(key, 0) for key in big]
    exp = [law[key] * n for key in big]
    rest = n - sum(obs)
    if rest or n - sum(exp) > 1e-6:
        obs.append(rest)
        exp.append(n - sum(exp))
    return chisquare(obs, exp).pvalue


def sample_first_three(directory, draft, n: int):
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2, "disable_by_batch_size": None}
    llm = LLM(str(directory), speculative_config=spec, max_num_seqs=256, max_model_len=64, num_kv_blocks=512, seed=3,
              progress=False)
    outs = llm.generate([PROMPTS[3][:12]] * n, SamplingParams(**DIST_PARAMS), use_tqdm=False)
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    return counts, llm.engine.spec_stats


N_DIST = 3000


def test_sampled_output_follows_the_target_distribution(tiny_llama, near_draft):
    directory, hf_model = tiny_llama
    law = target_law(hf_model, PROMPTS[3][:12])
    counts, stats = sample_first_three(directory, near_draft, N_DIST)
    assert stats.num_draft_tokens >= N_DIST and 0.3 < stats.acceptance_rate < 0.95
    assert pooled_pvalue(counts, law, N_DIST) > 1e-3


def test_the_distribution_test_catches_an_always_accepting_rule(tiny_llama, near_draft, monkeypatch):
    monkeypatch.setattr(rejection, "accept_probability", lambda p, q: torch.ones_like(p))
    directory, hf_model = tiny_llama
    law = target_law(hf_model, PROMPTS[3][:12])
    assert pooled_pvalue(sample_first_three(directory, near_draft, N_DIST)[0], law, N_DIST) < 1e-6


def test_n_samples_speculate_each_and_free_every_page(tiny_llama, tiny_draft, plain):
    """n > 1: siblings share the prompt's pages, then draft and verify each on their own."""
    directory, _ = tiny_llama
    for method in ("ngram", "draft_model"):
        spec = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": None, "prompt_lookup_min": 1}
        if method == "draft_model":
            spec["model"] = str(tiny_draft)
        outs, engine = run(directory, spec, params=greedy(n=2), prompts=PROMPTS[:3])
        for o, p in zip(outs, plain):
            assert [c.token_ids for c in o.outputs] == [p.outputs[0].token_ids] * 2
        sampled, _ = run(directory, spec, params=SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=20,
                                                                 ignore_eos=True), prompts=PROMPTS[:3])
        assert all(len(c.token_ids) == 20 for o in sampled for c in o.outputs)
        assert engine.spec_stats.num_accepted_tokens > 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_fails_while_verifying_drafts_fails_alone(tiny_llama, near_draft, monkeypatch):
    """A fault inside a speculative step: the step is retried request by request (seeded draws and the
    draft's q restored), the faulty request fails alone and the other's output is unchanged."""
    directory, _ = tiny_llama
    spec = {"method": "draft_model", "model": str(near_draft), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    llm = LLM(str(directory), speculative_config=spec, max_num_seqs=8, max_model_len=256, num_kv_blocks=256,
              progress=False)
    good = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=11)
    clean = llm.generate([PROMPTS[0]], good, use_tqdm=False)[0].outputs[0].token_ids
    engine, verify = llm.engine, llm.engine.runner._verify

    def faulty(seqs, logits):
        if any(seq.request_id == "bad" and seq.num_output_tokens >= 4 for seq in seqs):
            raise IndexError("injected verifier fault")
        return verify(seqs, logits)
    monkeypatch.setattr(engine.runner, "_verify", faulty)
    engine.add_request("good", PROMPTS[0], good)
    engine.add_request("bad", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["good"].error is None and done["good"].outputs[0].token_ids == clean
    assert done["bad"].error == "IndexError: injected verifier fault"


def test_a_failing_draft_model_costs_only_its_drafts(tiny_llama, near_draft, plain, monkeypatch):
    directory, _ = tiny_llama
    spec = {"method": "draft_model", "model": str(near_draft), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}
    llm = LLM(str(directory), speculative_config=spec, max_num_seqs=8, max_model_len=256, num_kv_blocks=256,
              progress=False)
    propose, calls = llm.engine.runner.drafter.propose, []

    def flaky(*args):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("injected draft fault")
        return propose(*args)
    monkeypatch.setattr(llm.engine.runner.drafter, "propose", flaky)
    assert_same(llm.generate(PROMPTS, greedy(), use_tqdm=False), plain)
    assert len(calls) >= 6 and llm.engine.spec_stats.num_accepted_tokens > 0


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_switching_on_as_the_batch_drains(tiny_llama, near_draft, method):
    """disable_by_batch_size 3 with 6 requests of different lengths: no drafts while the batch is full,
    then drafts (the draft model catching up over what it skipped) as requests finish."""
    directory, _ = tiny_llama
    spec = {"method": method, "num_speculative_tokens": 3, "disable_by_batch_size": 3, "prompt_lookup_min": 1}
    if method == "draft_model":
        spec["model"] = str(near_draft)
    params = [greedy(max_tokens=m) for m in (6, 10, 14, 20, 30, 40)]
    kw = dict(max_num_seqs=8, max_model_len=256, num_kv_blocks=256, progress=False)
    want = LLM(str(directory), **kw).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(str(directory), speculative_config=spec, **kw)
    assert_same(llm.generate(PROMPTS, params, use_tqdm=False), want)
    stats = llm.engine.spec_stats
    assert 0 < stats.num_drafts < sum(p.max_tokens for p in params) - 20       # some steps, not all
    if method == "draft_model":
        assert stats.num_accepted_tokens > 0
