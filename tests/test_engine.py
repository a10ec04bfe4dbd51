"""Engine-level behaviour: validation, seeds, n / best_of with shared pages, stops, abort, logprobs."""
import random

import pytest

from tokenmill import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    directory, _ = tiny_llama
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    return LLM(str(directory), max_num_seqs=32, max_model_len=256, num_kv_blocks=512, progress=False)


def ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(384) for _ in range(n)]


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=-0.5)), ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)), ("top_k", dict(top_k=1.5)), ("n", dict(n=0)), ("max_tokens", dict(max_tokens=-1)),
    ("logprobs", dict(logprobs=21)), ("min_p", dict(min_p=2.0)), ("best_of", dict(n=3, best_of=2)),
    ("repetition_penalty", dict(repetition_penalty=0.0)), ("min_tokens", dict(min_tokens=9, max_tokens=4)),
])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_rejected_requests_leave_the_engine_usable(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([ids(10), ids(300)], SamplingParams(max_tokens=2))   # second prompt longer than the context
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[1, 2, 99999]])
    with pytest.raises(ValueError, match="stop"):
        llm.generate([ids(4)], SamplingParams(stop=["x"]))               # no tokenizer: no stop strings
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([ids(10)], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    p = ids(12, seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=1234)
    alone = llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
    noise = [ids(random.Random(i).randrange(2, 40), seed=50 + i) for i in range(7)]
    others = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
    batch = llm.generate(noise[:3] + [p] + noise[3:], [others] * 3 + [params] + [others] * 4, use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, ignore_eos=True, seed=4321)
    assert llm.generate([p], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_share_the_prompt_pages(llm):
    engine = llm.engine
    p = ids(40, seed=9)                       # 2.5 pages of 16
    rid = engine.add_request(None, p, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    while not any(s.num_output_tokens for s in engine.scheduler.running):
        engine.step()
    seqs = [s for s in engine.scheduler.running if s.request_id == rid]
    assert len(seqs) == 4
    first_page = seqs[0].block_table[0]
    assert all(s.block_table[0] == first_page for s in seqs)
    assert engine.block_manager.blocks[first_page].ref_count == 4
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    texts = [tuple(c.token_ids) for c in outs[0].outputs]
    assert len(texts) == 4 and len(set(texts)) > 1   # independent samples
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_n_gives_n_copies_of_the_greedy_answer(llm):
    p = ids(21, seed=4)
    one = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    many = llm.generate([p], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in many.outputs] == [one.outputs[0].token_ids] * 3


def test_best_of_keeps_the_most_likely_samples(llm):
    """Sample i of a seeded request draws from seed + i, so n=3 shows best_of=3's three candidates."""
    p = ids(15, seed=5)
    base = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    candidates = llm.generate([p], SamplingParams(n=3, **base), use_tqdm=False)[0].outputs
    scores = [c.cumulative_logprob for c in candidates]
    assert len(set(scores)) == 3 and len({tuple(c.token_ids) for c in candidates}) == 3
    best = llm.generate([p], SamplingParams(n=2, best_of=3, **base), use_tqdm=False)[0].outputs
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.cumulative_logprob for c in best] == [c.cumulative_logprob for c in ranked[:2]]
    assert [c.index for c in best] == [0, 1]


def test_stop_token_ids_and_min_tokens(llm):
    p = ids(10, seed=6)
    greedy = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop_at = greedy[2]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:greedy.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, min_tokens=8, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert stop_at not in out.token_ids[:8] and len(out.token_ids) >= 8


def test_logprobs_top_n_are_ranked(llm):
    out = llm.generate([ids(8)], SamplingParams(temperature=0, max_tokens=4, logprobs=5), use_tqdm=False)[0].outputs[0]
    for tok, record in zip(out.token_ids, out.logprobs):
        assert record[tok].rank == 1            # greedy picks the top token
        ranked = sorted(record.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3, 4, 5]
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
    assert out.cumulative_logprob == pytest.approx(sum(r[t].logprob for t, r in zip(out.token_ids, out.logprobs)))


def test_abort_frees_pages(llm):
    engine = llm.engine
    rid = engine.add_request(None, ids(50), SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests() and engine.step() == []


def test_max_model_len_ends_with_length(llm):
    out = llm.generate([ids(250)], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].finish_reason == "length"


def test_sliding_window_does_not_cap_the_context(tmp_path, tiny_model_builder):
    """A window used to cap max_model_len; windowed attention now runs to the model's positions
    (outputs past the window against transformers: tests/test_gemma3.py)."""
    import json

    tiny_model_builder("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert LLM(str(tmp_path), num_kv_blocks=64, progress=False).engine.max_model_len == cfg["max_position_embeddings"]
    assert LLM(str(tmp_path), max_model_len=64, num_kv_blocks=64, progress=False).engine.max_model_len == 64
    # a window as long as every context the engine runs is full attention: prefix cache and all
    short = LLM(str(tmp_path), max_model_len=32, num_kv_blocks=64, progress=False).engine
    assert short.block_manager.windows == (None,) and short.block_manager.enable_prefix_caching
