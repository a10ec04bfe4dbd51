"""The real Gemma 3 270M GGUF against transformers on the same file (which dequantizes it): greedy
tokens and logprobs over 32 tokens on several prompts, one longer than the 512-token window."""
import pytest
import torch

from tokenmill import LLM, SamplingParams

NEW_TOKENS = 32


def long_text() -> str:
    """Real English longer than the window (the standard library's own documentation)."""
    from pydoc_data.topics import topics
    return topics["assert"] + topics["assignment"][:1800]


@pytest.fixture(scope="module")
def llm(gemma3_path):
    return LLM(str(gemma3_path), quantization="dequantize", max_num_batched_tokens=256, num_kv_blocks=400,
               progress=False)


def test_greedy_matches_transformers_past_the_window(llm, gemma3_hf):
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                   add_generation_prompt=True)
    prompts = [tok.encode(chat, add_special_tokens=False), tok.encode("The capital of France is"), tok.encode(long_text())]
    assert len(prompts[2]) > 512 + 32, len(prompts[2])
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        # one teacher-forced forward over prompt + our tokens: every token is transformers' argmax
        # after the same prefix exactly when its own greedy decoding produces the same sequence
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS
        with torch.no_grad():
            # only the rows scored: 262k logits for every prompt position would be most of the test
            logits = gemma3_hf(torch.tensor([prompt + ours]), logits_to_keep=NEW_TOKENS + 1).logits[0, :-1].float()
        assert logits.argmax(-1).tolist() == ours, f"prompt of {len(prompt)} tokens diverged"
        theirs = torch.log_softmax(logits, -1)[torch.arange(NEW_TOKENS), torch.tensor(ours)]
        got = torch.tensor([next(iter(d.values())).logprob for d in out.outputs[0].logprobs])
        assert torch.allclose(got, theirs, atol=2e-3), (got - theirs).abs().max()
