"""At greedy, a request's tokens do not depend on what else is in the batch, on prefix caching,
on the prefill chunk size, or on preemption."""
import random

import pytest

from tokenmill import LLM, SamplingParams

NUM = 32


def workload(vocab: int):
    rng = random.Random(7)
    shared = [rng.randrange(vocab) for _ in range(24)]     # a common prefix, so the prefix cache has hits
    ps = []
    for i in range(NUM):
        n = rng.randrange(1, 60)
        body = [rng.randrange(vocab) for _ in range(n)]
        ps.append(shared + body if i % 2 else body)
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(4, 24), ignore_eos=True) for _ in range(NUM)]
    return ps, params


@pytest.fixture(scope="module")
def alone(tiny_llama):
    directory, hf = tiny_llama
    ps, params = workload(hf.config.vocab_size)
    llm = LLM(str(directory), enable_prefix_caching=False, num_kv_blocks=64, progress=False)
    return [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(ps, params)]


@pytest.mark.parametrize("prefix,chunk,blocks", [
    (True, 16, None), (False, 16, None), (True, 512, None), (False, 512, None),   # None: 512 pages, room for all
    (True, 16, 10), (False, 512, 10),           # 10 pages of 16: far less than the batch needs -> preemption
])
def test_batched_equals_alone(tiny_llama, alone, prefix, chunk, blocks):
    directory, hf = tiny_llama
    ps, params = workload(hf.config.vocab_size)
    llm = LLM(str(directory), enable_prefix_caching=prefix, max_num_batched_tokens=chunk, num_kv_blocks=blocks or 512,
              max_num_seqs=NUM, progress=False)
    outs = llm.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone
    engine = llm.engine
    assert (engine.scheduler.num_preemptions > 0) == (blocks is not None)
    if prefix:
        assert engine.block_manager.stats.hits > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
