"""Greedy outputs of the engine are identical across attention backends on a tiny model
(the Triton kernels through the interpreter)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402


def test_greedy_identical_across_backends(tiny_llama):
    directory, hf = tiny_llama
    rng = random.Random(0)
    prompts = [[rng.randrange(hf.config.vocab_size) for _ in range(n)] for n in (3, 17, 40, 33)]
    shared = prompts[2][:32]
    prompts.append(shared + [5, 6])                      # a prefix-cache hit: chunk after cached pages
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for backend in ("reference", "torch", "triton"):
        llm = LLM(str(directory), attention_backend=backend, max_num_batched_tokens=24, progress=False)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["torch"] == outs["reference"]
    assert outs["triton"] == outs["reference"]
