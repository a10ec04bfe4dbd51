"""GGUF end to end: a tiny model written with gguf-py in mixed quantizations runs exactly like the
same (reference-dequantized) weights from safetensors; the real SmolLM2 file knows Paris."""
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from logprobs import hf_logprobs, prompt_logprob_diff
from tokenmill import LLM, SamplingParams
from tokenmill import kernels

Q = gguf.GGMLQuantizationType
HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# one tensor type per projection, so every type meets the model
QTYPES = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.Q4_K,
          "ffn_gate": Q.Q4_K, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0}


def gpt2_byte_vocab() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for interleaved rope (what convert_hf_to_gguf.py writes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)   # d
    blocks[:, 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)   # dmin
    return blocks.reshape(rows, cols // 256 * 144)


def quantize(w: np.ndarray, qtype, rng) -> np.ndarray:
    if qtype == Q.Q4_K:
        return random_q4_k(*w.shape, rng)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_pair(tmp: Path):
    """Write tiny.gguf and an HF directory holding the reference-dequantized same weights."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.05, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    hf = tf.LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(0)
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    writer = gguf.GGUFWriter(str(tmp / "tiny.gguf"), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(256)
    writer.add_block_count(2)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    tokens = gpt2_byte_vocab() + [f"<|extra_{i}|>" for i in range(44)]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * 44)
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    new_state = {}
    for name, w in state.items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gname, qtype = "token_embd.weight", Q.F16
        elif name == "model.norm.weight":
            gname, qtype = "output_norm.weight", Q.F32
        else:
            parts = name.split(".")
            layer, leaf = parts[2], parts[4]
            if parts[3] == "input_layernorm":
                gname, qtype = f"blk.{layer}.attn_norm.weight", Q.F32
            elif parts[3] == "post_attention_layernorm":
                gname, qtype = f"blk.{layer}.ffn_norm.weight", Q.F32
            else:
                gname = f"blk.{layer}.{HF_TO_GGUF[leaf]}.weight"
                qtype = QTYPES[HF_TO_GGUF[leaf]]
        if leaf_is(name, "q_proj"):
            w = permute(w, 4)
        elif leaf_is(name, "k_proj"):
            w = permute(w, 2)
        if qtype == Q.F32:
            raw = w.astype(np.float32)
            deq = raw
        else:
            raw = quantize(w, qtype, rng)
            deq = gguf.quants.dequantize(raw, qtype).reshape(w.shape).astype(np.float32)
        writer.add_tensor(gname, raw, raw_dtype=qtype)
        if leaf_is(name, "q_proj"):
            deq = permute_back(deq, 4)
        elif leaf_is(name, "k_proj"):
            deq = permute_back(deq, 2)
        new_state[name] = torch.from_numpy(np.ascontiguousarray(deq))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf.load_state_dict(new_state, strict=False)
    hf.tie_weights()
    hf.save_pretrained(tmp / "hf")
    return tmp / "tiny.gguf", tmp / "hf", hf


def leaf_is(name: str, leaf: str) -> bool:
    return f".{leaf}." in name


def permute_back(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("gguf-pair"))


def test_mixed_quant_gguf_matches_dequantized_safetensors(gguf_pair):
    gguf_path, hf_dir, hf = gguf_pair
    prompts = [[5, 9, 200, 17, 3, 88], list(range(40, 80))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    # a KV pool sized for these prompts: the default (2 GB) takes ~1.5 s to build and free
    kv = dict(num_kv_blocks=64, progress=False)
    a = LLM(str(gguf_path), quantization="dequantize", **kv).generate(prompts, params, use_tqdm=False)
    b = LLM(str(hf_dir), **kv).generate(prompts, params, use_tqdm=False)
    for x, y, prompt in zip(a, b, prompts):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for rx, ry in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert rx.keys() == ry.keys()
            for t in rx:
                assert rx[t].logprob == pytest.approx(ry[t].logprob, abs=1e-5)
        # and both against transformers on the dequantized weights
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        for pos in range(1, len(prompt)):
            assert x.prompt_logprobs[pos][prompt[pos]].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return LLM(str(smollm2_path), num_kv_blocks=512, progress=False)      # 8192 tokens, the model's context


def test_smollm2_knows_paris(smollm2, smollm2_dequantized):
    out = smollm2.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16),
                           use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    # the chat answer's first token is a near tie ("The" against "L", 0.08 nats apart in float32): the packed
    # path, which rounds activations to int8 per 32 columns as llama.cpp does, answers "L'Étoile, ..." as
    # llama.cpp does on the same file; the float32 path on the same weights answers "Paris"
    chat = smollm2_dequantized.chat([{"role": "user", "content": "What is the capital of France?"}],
                                    SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in chat.outputs[0].text
    assert chat.prompt.startswith("<|im_start|>")


def test_stop_strings_match_across_token_boundaries(smollm2):
    tok = smollm2.get_tokenizer()
    prompt = "Once upon a time, a dragon"
    free = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert free.text == tok.decode(free.token_ids)
    # a stop string made of the end of one token's text and the start of the next one's
    pieces = [tok.decode(free.token_ids[:i]) for i in range(len(free.token_ids) + 1)]
    k = next(i for i in range(5, len(pieces) - 1)
             if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[i_end := k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]
    expected = free.text[:free.text.find(stop)]
    out = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "never-there"],
                                                         ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert out.text == expected and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) <= i_end + 2
    kept = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=40, stop=stop, ignore_eos=True,
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == expected + stop


def test_streaming_deltas_never_show_a_partial_stop_string(smollm2):
    engine = smollm2.engine
    prompt = "Count from one to ten in words:"
    free = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0].text
    stop = free[len(free) // 2: len(free) // 2 + 6]
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=30, stop=stop))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    for text in seen[:-1]:        # a possible start of the stop string is held back until it resolves
        assert stop not in text and not any(text.endswith(stop[:k]) for k in range(1, len(stop)))
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))      # text only grows
    assert seen[-1] == free[:free.find(stop)]


def test_smollm2_bfloat16_tracks_transformers_float32(smollm2_path, smollm2_hf):
    """The dequantized bfloat16 path (the fast one on AMX CPUs) against transformers in float32 on the same file:
    prompt logprobs within bf16 rounding of the weights and matmuls, and it knows Paris.

    Measured |logprob difference| (mean / max nats) on this text: 0.039 / 0.134 on a Zen 3 (AVX2),
    0.027 / 0.13 on a Xeon with AMX. The limits catch the precision slips this test exists for
    (measured by patching them in): RMSNorm computed in bfloat16 0.055 / 0.243, rope in bfloat16
    0.051 / 0.215, both 0.057 / 0.414."""
    pytest.importorskip("accelerate")
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
            "and Berlin is the capital of Germany.")
    llm = LLM(str(smollm2_path), dtype="bfloat16", quantization="dequantize", num_kv_blocks=512, progress=False)
    ids = llm.get_tokenizer().encode(text)
    diff = prompt_logprob_diff(llm, ids, hf_logprobs(smollm2_hf, ids))
    assert diff.mean() < 0.047 and diff.max() < 0.18, (diff.mean().item(), diff.max().item())
    paris = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in paris.outputs[0].text


def test_mixed_quant_gguf_runs_packed_close_to_transformers(gguf_pair):
    """As stored: q Q8_0 / k Q4_0 / v F16 fused into one layer of three kernels, Q4_K on the int4
    kernel, Q8_0 as int8 per row. Prompt logprobs against transformers on the dequantized weights."""
    gguf_path, _, hf = gguf_pair
    llm = LLM(str(gguf_path), num_kv_blocks=64, progress=False)
    q8 = "int8 g32" if kernels.library() is not None else "int8 per-row"     # g32 on tokenmill's CPU kernel
    assert llm.engine.model.layers[0].attn.qkv.kernel.describe() == f"Q8_0 -> {q8} + Q4_0 -> int4 g32 + dense float32"
    prompt = list(range(40, 100))
    diff = prompt_logprob_diff(llm, prompt, hf_logprobs(hf, prompt))
    # measured 0.0052 / 0.016 nats with bf16 in PyTorch's int4 kernel and Q8_0 requantized per row
    assert diff.mean() < 0.015 and diff.max() < 0.06, (diff.mean().item(), diff.max().item())


def test_smollm2_packed_tracks_transformers_and_stays_small(smollm2, smollm2_path, smollm2_hf):
    """The default model as stored (Q4_1 on the int4 kernel, the tied Q8_0 table as int8 per row):
    weights within 1.3x the file's tensor bytes, prompt logprobs close to transformers float32."""
    from tokenmill.loader.gguf import GGUFCheckpoint
    from tokenmill.model.load import weight_bytes
    llm = smollm2                  # LLM(path): the file as stored
    file_bytes = sum(t.n_bytes for t in GGUFCheckpoint(smollm2_path)._tensors.values())
    assert weight_bytes(llm.engine.model) <= 1.3 * file_bytes
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
            "and Berlin is the capital of Germany.")
    ids = llm.get_tokenizer().encode(text)
    diff = prompt_logprob_diff(llm, ids, hf_logprobs(smollm2_hf, ids))
    # measured 0.051 / 0.255 nats (bf16 scales and activations in the int4 kernel, int8 lm_head)
    assert diff.mean() < 0.08 and diff.max() < 0.4, (diff.mean().item(), diff.max().item())


def forced_agreement(engine, ids: list[int], theirs: "LazyTokens", n: int) -> int:
    """Of llama.cpp's n greedy tokens after `ids`, how many `engine` picks too, each after llama.cpp's own
    tokens before it: greedy decoding runs alone until its first difference, then resumes from llama.cpp's
    prefix one token further (the prefix cache keeps what was computed). A near tie costs one token, not,
    as with the first difference alone, the whole rest of the continuation."""
    agree = pos = 0
    while pos < n:
        rid = engine.add_request(None, ids + [theirs[i] for i in range(pos)],
                                 SamplingParams(temperature=0, max_tokens=n - pos, ignore_eos=True))
        ours: list[int] = []
        while engine.has_unfinished_requests():
            ours = next((o.outputs[0].token_ids for o in engine.step() if o.request_id == rid), ours)
            if ours and ours[-1] != theirs[pos + len(ours) - 1]:
                engine.abort_request(rid)
        same = next((i for i, t in enumerate(ours) if t != theirs[pos + i]), len(ours))
        agree, pos = agree + same, pos + same + 1
    return agree


class LazyTokens:
    """llama.cpp's greedy continuation of one prompt, generated only as far as it is read."""

    def __init__(self, tokens):
        self.tokens, self.seen = tokens, []

    def __getitem__(self, i: int) -> int:
        self.seen += itertools.islice(self.tokens, max(0, i + 1 - len(self.seen)))
        return self.seen[i]


def test_smollm2_packed_agrees_with_llama_cpp_as_far_as_dequantized(smollm2, smollm2_dequantized, smollm2_path):
    """Greedy continuations against llama.cpp on the same file: the packed path (float16 KV pages, as
    llama.cpp's) picks llama.cpp's next token after llama.cpp's own prefix about as often as the
    transformers-exact one does (forced_agreement, summed over prompts)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    prompts = ["The capital of France is", "Once upon a time, a dragon", "def fibonacci(n):",
               "The three laws of thermodynamics are", "My favourite recipe for pancakes:",
               "In 1969, the first humans", "Water boils at", "The best way to learn a language is"]
    n = 48
    ref = llama_cpp.Llama(str(smollm2_path), n_ctx=256, n_threads=2, verbose=False)
    assert smollm2.engine.runner.kv_caches[0][0].dtype == torch.float16 or kernels.library() is None
    agree = {"dequantize": 0, None: 0}
    for prompt in prompts:
        ids = smollm2.get_tokenizer().encode(prompt)
        # one prompt at a time, as llama.cpp runs them (the packed path rounds differently per batch shape)
        theirs = LazyTokens(ref.generate(ids, temp=0.0, top_k=1, reset=True))
        agree["dequantize"] += forced_agreement(smollm2_dequantized.engine, ids, theirs, n)
        agree[None] += forced_agreement(smollm2.engine, ids, theirs, n)
    # measured on an AVX2 EPYC: dequantized 377, packed 375 of 384 (379 with float32 pages); the first
    # difference alone, the earlier measure, moved from 262 to 199 with the pages' dtype: chaos at near ties
    assert agree[None] >= agree["dequantize"] - 0.02 * n * len(prompts), agree
