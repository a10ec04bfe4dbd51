"""Gemma 3 and sliding-window attention against transformers on tiny random models: greedy tokens
and logprobs past the window, several local/global patterns, every backend; pages of local layers
released as the window moves, with the output unchanged under batching and preemption."""
import random

import pytest
import torch

from tokenmill import LLM, SamplingParams

WINDOW = 16
PROMPT_LENS = [3, 20, 45, 70]
NEW_TOKENS = 40
F, S = "full_attention", "sliding_attention"
PATTERNS = {
    "every-3rd-global": [S, S, F, S, S, F],     # Gemma's rule with a shorter period
    "global-first": [F, S, S, F],              # groups of two layers in the page pool
    "all-local": [S, S, S],                    # no full-attention group at all
}


def gemma_config(layer_types: list[str], window: int = WINDOW, kv_heads: int = 1):
    import transformers as tf
    return tf.Gemma3TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=window, layer_types=layer_types, max_position_embeddings=512, initializer_range=0.2,
        rms_norm_eps=1e-6, rope_theta=20000.0, rope_local_base_freq=500.0, tie_word_embeddings=True,
        attn_implementation="eager")


def build_gemma(directory, layer_types: list[str], seed: int = 0, **kw):
    import transformers as tf
    torch.manual_seed(seed)
    model = tf.Gemma3ForCausalLM(gemma_config(layer_types, **kw)).eval().float()
    with torch.no_grad():      # norms start at zero (scale 1 + 0): random ones exercise the (1 + w) rule
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model


def prompts(vocab: int, lens=PROMPT_LENS, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():     # one full forward: the logprobs of every generated token
        logits = model(out).logits[0, len(prompt) - 1:-1]
    return out[0, len(prompt):].tolist(), torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module", params=list(PATTERNS))
def tiny_gemma(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"gemma3-{request.param}")
    return request.param, directory, build_gemma(directory, PATTERNS[request.param])


@pytest.fixture(scope="module")
def expected(tiny_gemma):
    _, _, hf = tiny_gemma
    return [hf_greedy(hf, p, NEW_TOKENS) for p in prompts(hf.config.vocab_size)]


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_greedy_and_logprobs_match_transformers(tiny_gemma, expected, backend):
    kind, directory, hf = tiny_gemma
    llm = LLM(str(directory), attention_backend=backend, max_num_batched_tokens=32, num_kv_blocks=64,
              progress=False)
    outs = llm.generate(prompts(hf.config.vocab_size),
                        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    for out, (tokens, logprobs) in zip(outs, expected):
        assert out.outputs[0].token_ids == tokens, f"{kind}/{backend}: prompt of {len(out.prompt_token_ids)} diverged"
        ours = torch.tensor([next(iter(d.values())).logprob for d in out.outputs[0].logprobs])
        theirs = logprobs[torch.arange(NEW_TOKENS), torch.tensor(tokens)]
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_local_pages_are_released_and_output_unchanged(tmp_path):
    """A long generation: each local layer group holds a bounded number of pages while the global
    group grows; batching and forced preemption (a pool too small for all) leave tokens unchanged."""
    hf = build_gemma(tmp_path, PATTERNS["every-3rd-global"])
    ps = prompts(hf.config.vocab_size, lens=[5, 37, 12, 50], seed=3)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    alone = [LLM(str(tmp_path), num_kv_blocks=64, progress=False).generate(p, params, use_tqdm=False)[0]
             for p in ps[:1]]
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24, progress=False)
    engine = llm.engine
    windows = engine.block_manager.windows
    assert windows == (None, WINDOW, WINDOW)       # 2 global + 4 local layers: groups of 2 layers
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, params)
    most_live, most_full = 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            local = [[b for b in t if b >= 0] for t, w in zip(seq.block_tables, windows) if w is not None]
            most_live = max(most_live, *map(len, local))
            most_full = max(most_full, len(seq.block_tables[0]))
    # window 16 + one 24-token chunk on 8-token pages: at most 6 live pages, however long the sequence
    assert most_live <= -(-(WINDOW - 1 + 24) // 8) + 1 < most_full
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small for all four at once"
    assert engine.block_manager.num_free_blocks == 64
    batched = llm.generate(ps, params, use_tqdm=False)   # again, now batched from the start
    assert batched[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    for p, out in zip(ps, batched):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 64)[0]


def test_mistral_runs_past_its_window(tiny_model_builder, tmp_path):
    """Mistral with a sliding window: full context, transformers' windowed attention, no cap."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           initializer_range=0.2, sliding_window=WINDOW, attn_implementation="eager")
    hf = tf.MistralForCausalLM(cfg).eval().float()
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), num_kv_blocks=32, progress=False)
    assert llm.engine.max_model_len == 512
    ps = prompts(384, lens=[30, 4])
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NEW_TOKENS)[0]


def test_checkpoint_conventions(tmp_path):
    """Hugging Face leaves defaults out of config.json (Gemma 3 ties its embeddings by default), and
    a bfloat16 checkpoint's norms scale by 1 + w computed in float32, as transformers does."""
    import json

    from tokenmill.model.config import ModelConfig
    cfg = json.loads(gemma_config(PATTERNS["global-first"]).to_json_string())
    cfg.pop("tie_word_embeddings", None)
    assert ModelConfig.from_hf({**cfg, "architectures": ["Gemma3ForCausalLM"]}).tie_word_embeddings
    hf = build_gemma(tmp_path, PATTERNS["global-first"]).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = LLM(str(tmp_path), num_kv_blocks=16, progress=False).engine.model
    w = hf.model.layers[0].self_attn.q_norm.weight
    assert torch.equal(model.layers[0].attn.q_norm.weight, 1.0 + w.float())
