"""Greedy ids and logprobs against transformers on tiny random models, run as one continuous batch."""
import random

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPT_LENS = [3, 17, 40, 64, 5]
NEW_TOKENS = 32


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, output_scores=False, return_dict_in_generate=False,
                         pad_token_id=0, eos_token_id=None)
    full = out[0].tolist()
    with torch.no_grad():
        logits = model(out).logits[0, len(prompt) - 1:-1]
    return full[len(prompt):], torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def references(tiny_model):
    """transformers' greedy tokens and logprobs, once per model (every backend meets the same)."""
    _, _, hf = tiny_model
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts(hf.config.vocab_size)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_greedy_and_logprobs_match_transformers(tiny_model, references, backend):
    kind, directory, hf = tiny_model
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    llm = LLM(str(directory), attention_backend=backend, max_num_batched_tokens=48, num_kv_blocks=64,
              progress=False)
    ps = prompts(hf.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate(ps, params, use_tqdm=False)
    for prompt, out, (expected, logprobs) in zip(ps, outs, references):
        got = out.outputs[0].token_ids
        assert got == expected, f"{kind}: prompt of {len(prompt)} tokens diverged"
        ours = torch.tensor([next(iter(d.values())).logprob for d in out.outputs[0].logprobs])
        theirs = logprobs[torch.arange(NEW_TOKENS), torch.tensor(expected)]
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
        assert out.outputs[0].finish_reason == "length"


def test_prompt_logprobs_match_transformers(tiny_llama):
    directory, hf = tiny_llama
    llm = LLM(str(directory), max_num_batched_tokens=16, num_kv_blocks=64, progress=False)   # prompt split in chunks
    prompt = prompts(hf.config.vocab_size)[3]
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        record = out.prompt_logprobs[pos]
        assert record[prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        top = ref[pos - 1].topk(3)
        ranked = sorted((lp.rank, tid) for tid, lp in record.items() if tid != prompt[pos] or lp.rank <= 3)
        assert [tid for rank, tid in ranked if rank <= 3] == top.indices.tolist()
