"""Tokenizer: GGUF vocabularies split text exactly as llama.cpp does (llama-cpp-python on the same
file is the reference; transformers' GGUF tokenizer a second one), decoding round-trips, the
incremental detokenizer's deltas add up to decode(), and chat templates render as transformers'."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest

from tokenmill.loader.gguf import GGUFCheckpoint
from tokenmill.tokenizer import (GEMMA3_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer, _PieceTable, _spm_merges,
                                 _spm_merges_exact)

TEXTS = [
    "", " ", "Hello world", "The capital of France is", "  leading spaces", "trailing spaces   ",
    "12345678", "x 1234567 y 3.14159 1,000,000", "a\n\nb\n", "\t\ttabs\tand\ttext\t", "   \n  \n\n ",
    "emoji 🤗👩‍👩‍👧 done 🎉", "日本語のテキスト、中文。한국어", "Ünïcödé façade naïve — “quotes”",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b", "<|endoftext|><|endoftext|>",
    "don't I'll we've THEY'RE", "  multiple   spaces  ", "$100.50 + €20 = ?!", "line\r\nwindows\r\n",
    "https://example.com/a?b=c&d=e#frag", "def f(x):\n    return x**2  # comment\n", "ÿ\x00\x01 control chars",
]
MESSAGES = [
    [{"role": "user", "content": "hi 🤗"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def metadata(smollm2_path):
    return GGUFCheckpoint(smollm2_path).metadata


@pytest.fixture(scope="module")
def ours(metadata):
    return Tokenizer.from_gguf(metadata)


def llama_cpp_vocab_of(path: Path):
    """llama.cpp's own tokenizer for a GGUF file (vocabulary only): the tokenization reference."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the tokenization reference")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def llama_cpp_vocab(smollm2_path):
    return llama_cpp_vocab_of(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path, gguf_reading):
    tf = pytest.importorskip("transformers")
    with gguf_reading():
        return tf.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


def llama_cpp_ids(llm, text: str, add_bos: bool) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=add_bos, special=True)


# --- SmolLM2 (byte-level BPE, pre-tokenizer "smollm") ---

@pytest.mark.parametrize("add_special", [True, False])
def test_smollm2_matches_llama_cpp(ours, llama_cpp_vocab, add_special):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special) == llama_cpp_ids(llama_cpp_vocab, text, add_special), \
            repr(text)


def test_smollm2_matches_transformers(ours, hf_tokenizer):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == hf_tokenizer(text, add_special_tokens=False).input_ids, \
            repr(text)


def test_smollm2_special_ids_match_llama_cpp(ours, llama_cpp_vocab):
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llama_cpp_vocab.model)
    assert ours.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab)
    assert ours.bos_token_id == llama_cpp.llama_vocab_bos(vocab)
    assert ours.eos_token_id == llama_cpp.llama_vocab_eos(vocab)
    eog = {i for i in range(ours.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert ours.eos_token_ids == eog


def test_decode_round_trip(ours, hf_tokenizer):
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def deltas(tokenizer: Tokenizer, ids: list[int], prompt: list[int] = ()) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    out = []
    for i in ids:
        out.append(detok.add(i))
        assert len(detok.ids) - detok.prefix_offset <= 8, "the decode window must stay short"
    return out


def test_incremental_detokenizer_adds_up_to_decode(ours):
    text = "Emoji 🤗👩‍👩‍👧, CJK 日本語のテキスト, accents déjà vu<|im_end|> and\nnewlines 🎉🎉"
    ids = ours.encode(text, add_special_tokens=False)
    # the test means something only if some token boundary splits a UTF-8 character
    assert any(ours.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    parts = deltas(ours, ids)
    assert "".join(parts) == ours.decode(ids)
    assert not any("\ufffd" in p for p in parts)
    prompt = ours.encode("<|im_start|>assistant\nSure: ", add_special_tokens=False)
    assert "".join(deltas(ours, ids, prompt)) == ours.decode(prompt + ids)[len(ours.decode(prompt)):]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf_tokenizer, add_generation_prompt):
    for messages in MESSAGES:
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
            hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_missing_chat_template_is_a_clear_error(metadata):
    tok = Tokenizer.from_gguf({k: v for k, v in metadata.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES[0])


def test_from_dir_matches_transformers(ours, hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer(text).input_ids, repr(text)
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    assert tok.eos_token_id == ours.eos_token_id
    assert tok.apply_chat_template(MESSAGES[1]) == \
        hf_tokenizer.apply_chat_template(MESSAGES[1], tokenize=False, add_generation_prompt=True)


def test_from_dir_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


# --- other llama.cpp pre-tokenizers, on SmolLM2's vocabulary rewritten with another tokenizer.ggml.pre ---

def write_vocab(path: Path, md: dict, **overrides) -> Path:
    """A tensor-light llama GGUF holding only a tokenizer, for llama.cpp's vocab_only loading."""
    md = {**md, **overrides}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(md["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in md:
        writer.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types(md["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in md:
        writer.add_token_merges(md["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in md:
        writer.add_token_scores(md["tokenizer.ggml.scores"])
    writer.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.unknown_token_id" in md:
        writer.add_unk_token_id(md["tokenizer.ggml.unknown_token_id"])
    if "tokenizer.ggml.add_bos_token" in md:
        writer.add_add_bos_token(md["tokenizer.ggml.add_bos_token"])
    writer.add_tensor("token_embd.weight", np.zeros((len(md["tokenizer.ggml.tokens"]), 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default", "falcon", "starcoder", "poro-chat"])
def test_pre_tokenizers_match_llama_cpp(metadata, tmp_path, pre):
    md = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    path = write_vocab(tmp_path / f"{pre}.gguf", md, **{"tokenizer.ggml.pre": pre})
    ref = llama_cpp_vocab_of(path)
    tok = Tokenizer.from_gguf(GGUFCheckpoint(path).metadata)
    for text in TEXTS:
        for add_special in (True, False):
            assert tok.encode(text, add_special) == llama_cpp_ids(ref, text, add_special), (pre, repr(text))


def test_unknown_pre_tokenizer_warns_and_uses_gpt2(metadata, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenmill.tokenizer"):
        tok = Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    gpt2 = Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "gpt-2"})
    assert tok.encode(TEXTS[7]) == gpt2.encode(TEXTS[7])


# --- a small SentencePiece ("llama") vocabulary: merges by score, space prefix, byte fallback ---

SPM_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "a", "b", "c", "t", "n", "s", "i", "g", "é", "日", "本",
              "he", "ll", "▁h", "hell", "hello", "▁hello", "▁w", "or", "wor", "ld", "world", "▁world", "ab", "abc",
              "▁a", "▁ab", "st", "te", "tes", "test", "▁test", "in", "ing", "▁▁", "▁▁▁", "日本", "é▁", "<tool>"]
SPM_TEXTS = ["hello world", "", " ", "  hello", "hello  world  ", "test testing", "abc ab a", "日本語", "é é",
             "x<tool>hello</s> <s>test", "<unk>z", "tab\there\nnew", "hellohello", "Ünïcödé 🤗"]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [4 if p == "<tool>" else 1 for p in SPM_PIECES]
    # distinct scores, not in vocabulary order, so merge priority is really read from them
    scores = [0.0] * 259 + [float(-i - rng.uniform(0, 0.9) * 10) for i in range(len(SPM_PIECES))]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    return write_vocab(tmp_path_factory.mktemp("spm") / "spm.gguf", md)


@pytest.fixture(scope="module")
def spm(spm_path):
    return Tokenizer.from_gguf(GGUFCheckpoint(spm_path).metadata)


@pytest.mark.parametrize("add_special", [True, False])
def test_spm_matches_llama_cpp(spm, spm_path, add_special):
    ref = llama_cpp_vocab_of(spm_path)
    for text in SPM_TEXTS:
        assert spm.encode(text, add_special) == llama_cpp_ids(ref, text, add_special), repr(text)


def test_spm_decode_and_incremental(spm):
    for text in ["hello world", "  hello", "日本語 é", "Ünïcödé 🤗 test"]:
        ids = spm.encode(text, add_special_tokens=True)
        assert spm.decode(ids) == text
        parts = deltas(spm, ids)
        assert "".join(parts) == text and not any("\ufffd" in p for p in parts)
    assert spm.eos_token_ids == {2}


# ---- token bytes (the chat logprobs `bytes` field) ------------------------------------------------------
def llama_cpp_piece(llm, token_id: int) -> bytes:
    """llama.cpp's own bytes of one token (llama_token_to_piece, special tokens as text). Not
    Llama.detokenize([id], special=True): llama-cpp-python gives it a 32-byte buffer per token, and a
    longer piece (47 of SmolLM2's, runs of spaces or dashes) comes back as b""."""
    import ctypes

    import llama_cpp
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(llama_cpp.llama_model_get_vocab(llm.model), token_id, buf, len(buf), 0, True)
    assert n >= 0, n
    return buf.raw[:n]


def test_token_bytes_match_llama_cpp_over_the_whole_vocabulary(ours, llama_cpp_vocab):
    partial = 0
    for token_id in range(ours.vocab_size):
        expected = llama_cpp_piece(llama_cpp_vocab, token_id)
        assert ours.token_bytes(token_id) == expected, token_id
        try:
            expected.decode()
        except UnicodeDecodeError:
            partial += 1
    assert partial > 100           # tokens that hold part of a UTF-8 character were really checked
    assert ours.token_bytes(ours.vocab_size) == ours.token_bytes(ours.vocab_size + 10**6) == b""
    assert ours.token_bytes(-1) == b""


def test_token_bytes_add_up_to_the_text(ours, tmp_path, hf_tokenizer):
    text = "naïve café 日本語 🤗🎉 Ωμέγα — ok"
    ids = ours.encode(text, add_special_tokens=False)
    assert b"".join(ours.token_bytes(t) for t in ids) == text.encode()
    assert any("\ufffd" in ours.decode([t]) for t in ids)          # some tokens are parts of a character
    hf_tokenizer.save_pretrained(tmp_path)                          # the same vocabulary from tokenizer.json
    from_dir = Tokenizer.from_dir(tmp_path)
    assert [from_dir.token_bytes(t) for t in ids] == [ours.token_bytes(t) for t in ids]


def test_spm_token_bytes_match_llama_cpp(spm, spm_path):
    ref = llama_cpp_vocab_of(spm_path)
    for token_id in range(spm.vocab_size):
        assert spm.token_bytes(token_id) == llama_cpp_piece(ref, token_id), token_id
    ids = spm.encode("Ünïcödé 🤗 日本語", add_special_tokens=False)
    assert b"".join(spm.token_bytes(t) for t in ids) == " Ünïcödé 🤗 日本語".encode()


def test_tiny_test_tokenizer_matches_transformers(tiny_chat_llama):
    """The tiny models' own tokenizer (tests/conftest.py) reads the same through tokenmill and transformers."""
    import transformers as tf
    directory, _, eos, _ = tiny_chat_llama
    ours, theirs = Tokenizer.from_dir(directory), tf.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, repr(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text)      # byte-level: lossless
        assert b"".join(ours.token_bytes(t) for t in ids) == text.encode(), repr(text)
    assert ours.eos_token_ids == {eos} and ours.vocab_size == 384
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)


# --- Gemma 3 (SentencePiece, 262k pieces, no space prefix, no chat template in the file) ---

GEMMA3_TEXTS = TEXTS + [
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "a<end_of_turn>b", "<bos>x<eos>",
    "<unused5> <b>bold</b> <table><tr>", "  \t\n\n\n  x\n\n\n\n", "𝔘𝔫𝔦 \U000E0041 \u0378 ǅ \ue000",
    "<mask>[multimodal]<start_of_image>", "    indented\n        more", "naïve café Ωμέγα Привет мир",
]
GEMMA3_CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
               {"role": "assistant", "content": "Hello 🤗"}, {"role": "user", "content": "What is 2+2?\nIn words."}]


@pytest.fixture(scope="module")
def gemma3_metadata(gemma3_path):
    return GGUFCheckpoint(gemma3_path).metadata


@pytest.fixture(scope="module")
def gemma3(gemma3_metadata):
    return Tokenizer.from_gguf(gemma3_metadata)


@pytest.fixture(scope="module")
def gemma3_llama_cpp(gemma3_path):
    return llama_cpp_vocab_of(gemma3_path)


def llama_cpp_chat(messages: list[dict], template: bytes, add_generation_prompt: bool) -> str:
    """llama.cpp's built-in (non-Jinja) rendering of a conversation: llama_chat_apply_template."""
    import ctypes

    import llama_cpp
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), add_generation_prompt, buf, len(buf))
    assert 0 <= n <= len(buf), n
    return buf.raw[:n].decode()


@pytest.mark.parametrize("add_special", [True, False])
def test_gemma3_matches_llama_cpp(gemma3, gemma3_llama_cpp, add_special):
    for text in GEMMA3_TEXTS:
        assert gemma3.encode(text, add_special_tokens=add_special) == \
            llama_cpp_ids(gemma3_llama_cpp, text, add_special), repr(text)


def test_gemma3_decode_round_trip(gemma3, gemma3_llama_cpp):
    byte_fallback = 0
    for text in GEMMA3_TEXTS:
        ids = gemma3.encode(text, add_special_tokens=False)
        assert gemma3.decode(ids, skip_special_tokens=False) == text, repr(text)     # no space prefix to strip
        assert gemma3_llama_cpp.detokenize(ids, special=True) == text.encode(), repr(text)
        assert b"".join(gemma3.token_bytes(t) for t in ids) == text.encode(), repr(text)
        byte_fallback += sum(gemma3.token_text(t).startswith("<0x") for t in ids)
    assert byte_fallback > 10          # characters outside the vocabulary were really spelled in bytes
    assert gemma3.decode(gemma3.encode("<start_of_turn>user\nhi<end_of_turn>")) == "user\nhi"


def test_gemma3_incremental_detokenizer_adds_up_to_decode(gemma3):
    text = "Emoji 🤗👩‍👩‍👧, 𝔘𝔫𝔦 \U000E0041, CJK 日本語<end_of_turn> and\n\n  spaces"
    ids = gemma3.encode(text, add_special_tokens=False)
    parts = deltas(gemma3, ids)
    assert "".join(parts) == gemma3.decode(ids) and not any("\ufffd" in p for p in parts)


def test_gemma3_special_ids_match_llama_cpp(gemma3, gemma3_llama_cpp):
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(gemma3_llama_cpp.model)
    assert gemma3.vocab_size == llama_cpp.llama_vocab_n_tokens(vocab) == 262144
    assert gemma3.bos_token_id == llama_cpp.llama_vocab_bos(vocab) == 2
    assert gemma3.eos_token_id == llama_cpp.llama_vocab_eos(vocab) == 1
    assert gemma3.add_bos and not gemma3.add_eos
    eog = {i for i in range(gemma3.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    # llama.cpp also stops at any "</s>" (a PaddleOCR rule); in Gemma's vocabulary it is the HTML
    # strikethrough close tag, a plain user-defined token, and transformers' Gemma 3 stops at <eos> and
    # <end_of_turn> only (generation_config.json: eos_token_id [1, 106])
    assert gemma3.eos_token_ids == {i for i in eog if gemma3.token_text(i) != "</s>"} == {1, 106}
    assert gemma3.token_text(106) == "<end_of_turn>"


def test_gemma3_token_bytes_match_llama_cpp_over_the_whole_vocabulary(gemma3, gemma3_llama_cpp):
    for token_id in range(gemma3.vocab_size):
        assert gemma3.token_bytes(token_id) == llama_cpp_piece(gemma3_llama_cpp, token_id), token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma3_chat_template_matches_llama_cpp(gemma3, gemma3_llama_cpp, gemma3_metadata, add_generation_prompt):
    """The file has no template: Gemma 3's own applies (by general.architecture). llama.cpp's built-in
    "gemma" formatting folds the system message into the first user turn the same way; it leaves the
    BOS to the tokenizer, which the Jinja template writes itself."""
    assert "tokenizer.chat_template" not in gemma3_metadata
    ours = gemma3.apply_chat_template(GEMMA3_CHAT, add_generation_prompt=add_generation_prompt)
    theirs = llama_cpp_chat(GEMMA3_CHAT, b"gemma", add_generation_prompt)
    assert ours == "<bos>" + theirs
    assert ours.startswith("<bos><start_of_turn>user\nYou are terse.\n\nHi there!<end_of_turn>\n")
    assert ours.endswith("<start_of_turn>model\n") == add_generation_prompt
    assert gemma3.encode(ours, add_special_tokens=False) == llama_cpp_ids(gemma3_llama_cpp, theirs, True)


def test_gemma3_template_is_chosen_by_architecture_only(gemma3, spm_path):
    """general.architecture decides, and only when the metadata has no template of its own."""
    assert gemma3.chat_template == GEMMA3_CHAT_TEMPLATE
    md = {k: v for k, v in GGUFCheckpoint(spm_path).metadata.items() if k != "tokenizer.chat_template"}
    assert Tokenizer.from_gguf({**md, "general.architecture": "gemma3"}).chat_template == GEMMA3_CHAT_TEMPLATE
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert Tokenizer.from_gguf({**md, "general.architecture": "gemma3", "tokenizer.chat_template": own}) \
        .chat_template == own
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf({**md, "general.architecture": "llama"}).apply_chat_template(GEMMA3_CHAT)
    with pytest.raises(Exception, match="must alternate"):
        gemma3.apply_chat_template(GEMMA3_CHAT[:2] + GEMMA3_CHAT[1:2])


def test_spm_merges_vectorised_equal_the_plain_loop(gemma3_metadata, spm_path, monkeypatch):
    """Gemma 3's 514,847 merges (and the small vocabulary's), in order; and the exact loop takes
    over should two pieces ever share a hash."""
    for md in (gemma3_metadata, GGUFCheckpoint(spm_path).metadata):
        scores, vocab = md["tokenizer.ggml.scores"], {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
        assert _spm_merges(scores, vocab) == _spm_merges_exact(scores, vocab)
    monkeypatch.setattr(_PieceTable, "unique", lambda self: False)      # the small vocabulary, "colliding"
    assert _spm_merges(scores, vocab) == _spm_merges_exact(scores, vocab)
