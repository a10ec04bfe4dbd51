"""GGUF loader: every tensor type dequantizes as gguf-py does, Q/K rows come back in Hugging Face
order (checked against the converter's permutation and against transformers' GGUF loader), bad
files fail with messages naming the file, and the real SmolLM2 file matches transformers exactly."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tokenmill.loader.gguf import GGUFCheckpoint

Q = gguf.GGMLQuantizationType
SMOLLM2 = Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".cache" / "tokenmill")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
# (gguf leaf, hf leaf, [out, in]) per layer; two layers so that every type meets a weight
LEAVES = [("attn_q", "self_attn.q_proj", (HIDDEN, HIDDEN)), ("attn_k", "self_attn.k_proj", (HIDDEN // 2, HIDDEN)),
          ("attn_v", "self_attn.v_proj", (HIDDEN // 2, HIDDEN)), ("attn_output", "self_attn.o_proj", (HIDDEN, HIDDEN)),
          ("ffn_gate", "mlp.gate_proj", (FFN, HIDDEN)), ("ffn_up", "mlp.up_proj", (FFN, HIDDEN)),
          ("ffn_down", "mlp.down_proj", (HIDDEN, FFN))]
LAYER_TYPES = [
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1,
     "ffn_up": Q.Q4_K, "ffn_down": Q.Q5_K},
    {"attn_q": Q.Q6_K, "attn_k": Q.BF16, "attn_v": Q.F16, "attn_output": Q.F32, "ffn_gate": Q.Q4_K,
     "ffn_up": Q.Q6_K, "ffn_down": Q.Q8_0},
]
# K-quant block layouts: (bytes per 256 values, byte offsets of fp16 scales)
K_BLOCKS = {Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)), Q.Q6_K: (210, (208,))}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's reordering of Q/K rows for interleaved rope."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant blocks (gguf-py cannot quantize these): small positive fp16 scales."""
    size, scale_offsets = K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        scales = rng.uniform(0.001, 0.01, size=len(blocks)).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // 256 * size)


def encode(w: np.ndarray, qtype, rng) -> np.ndarray:
    """Raw GGUF data for a float weight (rows in HF order)."""
    if qtype in K_BLOCKS:
        return random_k_blocks(qtype, *w.shape, rng)
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def start_writer(path: Path, arch: str = "llama") -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(len(LAYER_TYPES))
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    if arch == "gemma3":        # transformers reads the head size from these
        writer.add_key_length(HIDDEN // HEADS)
        writer.add_value_length(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges([])
    return writer


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# per-block norms: (gguf leaf, hf leaf, size). ffn_norm is Llama's post_attention_layernorm but Gemma 3's
# pre_feedforward_layernorm; Gemma 3 has four norms per block and per-head Q/K norms
NORMS = {
    "llama": [("attn_norm", "input_layernorm", HIDDEN), ("ffn_norm", "post_attention_layernorm", HIDDEN)],
    "gemma3": [("attn_norm", "input_layernorm", HIDDEN),
               ("post_attention_norm", "post_attention_layernorm", HIDDEN),
               ("ffn_norm", "pre_feedforward_layernorm", HIDDEN),
               ("post_ffw_norm", "post_feedforward_layernorm", HIDDEN),
               ("attn_q_norm", "self_attn.q_norm", HIDDEN // HEADS),
               ("attn_k_norm", "self_attn.k_norm", HIDDEN // HEADS)],
}
NORMS["qwen2"] = NORMS["llama"]


def write_tiny(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write a 2-layer GGUF in every supported type; return the expected HF state dict, computed
    from gguf-py's dequantization of the very bytes written, in HF row order. qwen2 gets Q/K/V
    biases and, unlike llama, no Q/K row permutation. gemma3 stores each norm weight w as 1 + w,
    as llama.cpp's converter does, and has tied embeddings."""
    rng = np.random.default_rng(0)
    writer = start_writer(path, arch)
    expected: dict[str, np.ndarray] = {}

    def add(gname: str, hfname: str, w: np.ndarray, qtype, n_head: int | None = None):
        raw = encode(w, qtype, rng)
        expected[hfname] = gguf.quants.dequantize(raw, qtype).reshape(w.shape).astype(np.float32)
        if n_head is not None:     # quantization blocks never cross rows, so permuting raw rows is the converter's order
            raw = permute(raw, n_head)
        writer.add_tensor(gname, raw, raw_dtype=qtype)

    def add_norm(gname: str, hfname: str, size: int):
        w = rng.normal(0, 0.1, size).astype(np.float32)
        if arch == "gemma3":
            writer.add_tensor(gname, w + np.float32(1), raw_dtype=Q.F32)
            expected[hfname] = (w + np.float32(1)) - np.float32(1)     # not always w itself, in float32
        else:
            add(gname, hfname, w + 1, Q.F32)

    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(0, 0.1, (VOCAB, HIDDEN)), Q.F16)
    add_norm("output_norm.weight", "model.norm.weight", HIDDEN)
    if arch != "gemma3":
        add("output.weight", "lm_head.weight", rng.normal(0, 0.1, (VOCAB, HIDDEN)), Q.Q8_0)
    writer.add_tensor("rope_freqs.weight", np.ones(HIDDEN // HEADS // 2, np.float32))   # unknown: skipped
    for layer, types in enumerate(LAYER_TYPES):
        for gleaf, hfleaf, size in NORMS[arch]:
            add_norm(f"blk.{layer}.{gleaf}.weight", f"model.layers.{layer}.{hfleaf}.weight", size)
        for gleaf, hfleaf, shape in LEAVES:
            n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gleaf) if arch == "llama" else None
            if arch == "qwen2" and gleaf in ("attn_q", "attn_k", "attn_v"):
                add(f"blk.{layer}.{gleaf}.bias", f"model.layers.{layer}.{hfleaf}.bias",
                    rng.normal(0, 0.5, shape[0]), Q.F32)
            add(f"blk.{layer}.{gleaf}.weight", f"model.layers.{layer}.{hfleaf}.weight",
                rng.normal(0, 0.05, shape), types[gleaf], n_head)
    finish(writer)
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny(path)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_any(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"gguf-{request.param}") / "tiny.gguf"
    return path, write_tiny(path, request.param)


def test_every_type_dequantizes_like_gguf_py_in_hf_row_order(tiny_any):
    path, expected = tiny_any
    ckpt = GGUFCheckpoint(path)
    assert sorted(ckpt.tensor_names()) == sorted(expected)
    types = {ckpt.raw_tensor(n)[0] for n in ckpt.tensor_names()}
    assert types == {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
    got = dict(ckpt.iter_tensors(torch.float32))
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert torch.equal(got[name], torch.from_numpy(want)), name
    half = dict(ckpt.iter_tensors(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in half.values())


def test_raw_tensor_rows_are_in_hf_order(tiny):
    path, expected = tiny
    ckpt = GGUFCheckpoint(path)
    qtype, data, shape = ckpt.raw_tensor("model.layers.1.self_attn.q_proj.weight")
    assert qtype == Q.Q6_K and shape == (HIDDEN, HIDDEN)
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype),
                                  expected["model.layers.1.self_attn.q_proj.weight"])


def test_metadata_decoded_to_python_values(tiny):
    path, _ = tiny
    md = GGUFCheckpoint(path).metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.attention.head_count"] == HEADS and isinstance(md["llama.attention.head_count"], int)
    assert md["llama.rope.freq_base"] == 10000.0
    assert md["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert md["tokenizer.ggml.token_type"] == [1] * VOCAB


def test_matches_transformers_gguf_loader(tiny_any):
    """transformers un-permutes llama's Q/K with its own code: an independent check of ours."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path, _ = tiny_any
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = model.state_dict()
    got = dict(GGUFCheckpoint(path).iter_tensors(torch.float32))
    assert set(got) == set(ref) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name


# errors: each names the file and says what is wrong

def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=str(path)):
        GGUFCheckpoint(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=f"{path}.*not a GGUF file"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.99])
def test_truncated(tiny, tmp_path, keep):
    src, _ = tiny
    data = src.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{path}.*truncated"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(writer)
    with pytest.raises(ValueError, match=f"{path}.*unsupported architecture 'phi3'"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q2k.gguf"
    writer = start_writer(path)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((HIDDEN, HIDDEN // 256 * 84), np.uint8), raw_dtype=Q.Q2_K)
    finish(writer)
    with pytest.raises(ValueError, match=f"{path}.*blk.0.attn_q.weight.*unsupported type Q2_K"):
        GGUFCheckpoint(path)


# the real file

@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} missing: run `make model` first")
    return SMOLLM2


def test_smollm2_metadata_is_fast_and_complete(smollm2):
    import time
    start = time.perf_counter()
    ckpt = GGUFCheckpoint(smollm2)
    assert time.perf_counter() - start < 2.0
    assert len(ckpt.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ckpt.metadata["tokenizer.ggml.merges"][0] == "Ġ t"
    assert "lm_head.weight" not in ckpt.tensor_names()      # tied embeddings


def test_smollm2_equals_transformers(smollm2, smollm2_hf):
    ref = smollm2_hf.state_dict()
    got = dict(GGUFCheckpoint(smollm2).iter_tensors(torch.float32))
    assert set(got) == set(ref) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name


def test_gemma3_names_and_norms(gemma3_path):
    ckpt = GGUFCheckpoint(gemma3_path)
    assert ckpt.architecture == "gemma3"
    names = ckpt.tensor_names()
    leaves = {n.split(".", 3)[3] for n in names if n.startswith("model.layers.0.")}
    assert leaves == {"input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                      "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                      *(f"{leaf}.weight" for _, leaf, _ in LEAVES)}
    assert len(names) == 18 * 13 + 2 and "lm_head.weight" not in names      # tied embeddings
    # every norm is stored as 1 + w; raw_tensor and iter_sources both give Hugging Face's w
    sources = dict(ckpt.iter_sources())
    for name in (n for n in names if n.endswith("norm.weight")):
        info = ckpt._tensors[name]
        stored = np.asarray(ckpt._data[info.offset:info.offset + info.n_bytes]).view(np.float32)
        qtype, w, _ = ckpt.raw_tensor(name)
        assert qtype == Q.F32 and np.array_equal(w, stored - np.float32(1)), name
        assert torch.equal(sources[name], torch.from_numpy(w)), name


def test_gemma3_equals_transformers(gemma3_path, gemma3_hf):
    """Every tensor, dequantized by us, bit-equal to what transformers builds from the same file."""
    ref = gemma3_hf.state_dict()
    got = dict(GGUFCheckpoint(gemma3_path).iter_tensors(torch.float32))
    assert set(got) == set(ref) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert tensor.dtype == ref[name].dtype and torch.equal(tensor, ref[name]), name
