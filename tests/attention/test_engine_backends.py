"""Greedy outputs of the engine are identical across attention backends on a tiny model
(the Triton kernels through the interpreter, tests/attention/conftest.py)."""
import importlib.util
import random

import pytest

from tokenmill import LLM, SamplingParams

BACKENDS = ["reference", "torch", "cpu",
            pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                            reason="triton is not installed"))]


@pytest.fixture(scope="module")
def reference_run(tiny_llama):
    directory, hf = tiny_llama
    rng = random.Random(0)
    prompts = [[rng.randrange(hf.config.vocab_size) for _ in range(n)] for n in (3, 17, 40, 33)]
    prompts.append(prompts[2][:32] + [5, 6])            # a prefix-cache hit: a chunk after cached pages
    prompts.append(prompts[1] + [9] * 30)               # decodes of uneven length share steps
    return directory, prompts, _run(directory, prompts, "reference")


def _run(directory, prompts, backend):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(directory), attention_backend=backend, max_num_batched_tokens=24, num_kv_blocks=64,
              progress=False)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_greedy_identical_across_backends(reference_run, backend, triton_interpreter):
    directory, prompts, expected = reference_run
    assert _run(directory, prompts, backend) == expected
