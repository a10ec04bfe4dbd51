"""Tokenizers (from GGUF metadata or a Hugging Face directory), chat templates, and incremental
detokenization. GGUF vocabularies are rebuilt with the `tokenizers` library so that they split
text exactly as llama.cpp does (src/llama-vocab.cpp)."""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tokenizers
import tokenizers.processors
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

logger = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
# llama.cpp's pre-tokenizer regexes, applied in turn (each splits the pieces of the previous one)
_PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "dbrx": [_LLAMA3],
    "smaug": [_LLAMA3],
    "chatglm4": [_LLAMA3],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "starcoder": [r"\p{N}", _GPT2],
    "gpt2": [_GPT2],
    "qwen2": [_QWEN2],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
}
# tokenizer.ggml.pre -> (regex set, ignore_merges, add_bos default), as llama_vocab::impl::load does
_PRE_TYPES: dict[str, tuple[str, bool, bool]] = {
    "default": ("default", False, False),
    **{n: ("llama3", True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                           "midm-2.0", "lfm2")},
    "dbrx": ("dbrx", False, False),
    "smaug-bpe": ("smaug", False, False),
    "glm4": ("chatglm4", False, False),
    "chatglm-bpe": ("chatglm4", False, False),
    "falcon": ("falcon", False, False),
    **{n: ("starcoder", False, False) for n in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                                "exaone", "minerva-7b")},
    **{n: ("gpt2", False, False) for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                           "jina-v2-de", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "trillion",
                                           "granite-docling", "exaone4")},
    **{n: ("qwen2", False, False) for n in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan")},
    **{n: ("poro", False, False) for n in ("poro-chat", "bloom", "gpt3-finnish")},
    "viking": ("viking", False, False),
    "deepseek-coder": ("deepseek-coder", False, False),
    "tekken": ("tekken", True, True),
}
_PRE_REGEXES["tekken"] = [
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+"
    r"((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)"]
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE writes byte b as chr(table[b])."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()

# tokens llama.cpp treats as end of generation by their text alone
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"}
# Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json), verbatim: llama.cpp's converter
# writes none into the GGUF when the source has none, as for gemma-3-270m. A system message becomes
# the first user turn's prefix; "assistant" is rendered as "model".
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# general.architecture -> the template to use when the GGUF metadata has no tokenizer.chat_template
DEFAULT_CHAT_TEMPLATES = {"gemma3": GEMMA3_CHAT_TEMPLATE}
# fill-in-the-middle tokens llama.cpp finds by text when the metadata has no id; they end generation too
_FIM_TEXTS = {"fim_pad": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"},
              "fim_rep": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
              "fim_sep": {"<|file_sep|>"}}


def _bpe_from_gguf(md: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[tokenizers.Tokenizer, bool]:
    """Byte-level BPE (tokenizer.ggml.model == "gpt2"); returns (tokenizer, add_bos default)."""
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TYPES:
        logger.warning("tokenizer.ggml.pre=%r is unknown; splitting text with GPT-2's regex, "
                       "which may tokenize differently from llama.cpp", pre)
    regex_set, ignore_merges, add_bos = _PRE_TYPES.get(pre, ("gpt2", False, False))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[regex_set]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos


def _spm_merges_exact(scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """_spm_merges as a plain loop over every split of every piece (~1.4 s for Gemma 3's 262k pieces)."""
    found = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                found.append((-scores[pid], pid, i, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


class _PieceTable:
    """Every piece's code points end to end, with a polynomial hash (mod 2**64, uint64 arithmetic
    wraps) of every prefix, so that any substring's hash is a few array operations. The base is odd,
    hence invertible: a substring's hash is normalised to start at power 0, as a whole piece's is."""

    BASE = 0x9E3779B97F4A7C15
    INVERSE = pow(BASE, -1, 1 << 64)

    def __init__(self, pieces: list[str]):
        self.lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
        self.starts = np.cumsum(self.lengths) - self.lengths
        codes = np.frombuffer("".join(pieces).encode("utf-32-le", "surrogatepass"), np.uint32)
        self.codes = codes.astype(np.uint64) + np.uint64(1)      # + 1: a NUL must still count
        n = len(self.codes)
        with np.errstate(over="ignore"):
            self.prefix = np.zeros(n + 1, np.uint64)
            np.cumsum(self.codes * self._powers(self.BASE, n), out=self.prefix[1:])
            self.unshift = self._powers(self.INVERSE, n + 1)
        self.whole = self.hash(self.starts, self.starts + self.lengths)
        self.order = np.argsort(self.whole)
        self.sorted = self.whole[self.order]

    @staticmethod
    def _powers(base: int, n: int) -> np.ndarray:
        steps = np.full(n, base, np.uint64)
        steps[:1] = 1
        with np.errstate(over="ignore"):
            return np.cumprod(steps, dtype=np.uint64)

    def hash(self, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        """Hashes of the substrings [start, stop) of the joined code points."""
        with np.errstate(over="ignore"):
            return (self.prefix[stop] - self.prefix[start]) * self.unshift[start]

    def unique(self) -> bool:
        return not np.any(self.sorted[1:] == self.sorted[:-1])

    def find(self, hashes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The index of the piece with each hash and length, or -1."""
        queries = np.argsort(hashes)        # searching sorted queries is ~10x faster than shuffled
        at = np.empty(len(hashes), np.int64)
        at[queries] = np.searchsorted(self.sorted, hashes[queries])
        at = np.minimum(at, len(self.sorted) - 1)
        found = self.order[at]
        return np.where((self.sorted[at] == hashes) & (self.lengths[found] == lengths), found, -1)

    def same_text(self, a: np.ndarray, b: np.ndarray, n: np.ndarray) -> bool:
        """Whether the substrings of n code points at a and at b are equal, for every triple."""
        offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return np.array_equal(self.codes[np.repeat(a, n) + offsets], self.codes[np.repeat(b, n) + offsets])


def _spm_merges(scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SPM tokenizer, which repeatedly joins the adjacent pair
    whose concatenation is the highest-scoring vocabulary entry (leftmost on ties): every split of a
    piece into two pieces, by the piece's score (highest first), then its id, then the split point.

    Vectorised (~0.75 s instead of _spm_merges_exact's ~1.4 s for Gemma 3): substrings are matched to
    pieces by hash, then every match is compared code point by code point, so a hash collision can
    cost speed (the plain loop takes over), never correctness."""
    pieces = list(vocab)            # unique texts; vocab maps each to its id
    table = _PieceTable(pieces)
    n_cuts = np.maximum(table.lengths - 1, 0)
    piece = np.repeat(np.arange(len(pieces)), n_cuts)
    cut = np.arange(len(piece)) - np.repeat(np.cumsum(n_cuts) - n_cuts, n_cuts) + 1
    start, stop = table.starts[piece], table.starts[piece] + table.lengths[piece]
    left = table.find(table.hash(start, start + cut), cut)
    keep = left >= 0                # most splits fail here, so the right halves are looked up for fewer
    piece, cut, left, start, stop = piece[keep], cut[keep], left[keep], start[keep], stop[keep]
    right = table.find(table.hash(start + cut, stop), stop - start - cut)
    keep = right >= 0
    piece, cut, left, right, start = piece[keep], cut[keep], left[keep], right[keep], start[keep]
    exact = table.unique() and table.same_text(table.starts[left], start, cut) and \
        table.same_text(table.starts[right], start + cut, table.lengths[right])
    if not exact:                   # two strings share a hash (never seen on a real vocabulary)
        return _spm_merges_exact(scores, vocab)
    ids = np.fromiter(vocab.values(), np.int64, len(pieces))[piece]
    rank = np.lexsort((cut, ids, -np.asarray(scores, np.float64)[ids]))
    text = pieces.__getitem__
    return list(zip(map(text, left[rank].tolist()), map(text, right[rank].tolist())))


def _spm_from_gguf(md: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[tokenizers.Tokenizer, bool]:
    """SentencePiece-style BPE (tokenizer.ggml.model == "llama"): merges by score, byte fallback."""
    scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = md.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else None)
    model = models.BPE(vocab, _spm_merges(scores, vocab), byte_fallback=True, fuse_unk=True,
                       unk_token=tokens[unk_id] if unk_id is not None else None)
    tok = tokenizers.Tokenizer(model)
    # Prepend runs on each stretch of text between special tokens, as llama.cpp adds its space
    # prefix after every special token.
    steps = [normalizers.Replace(" ", "▁")]
    if md.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if md.get("tokenizer.ggml.add_space_prefix", True):      # drop the space the encoder added, not a real one
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok, True


def _end_of_generation_ids(md: dict[str, Any], tokens: list[str]) -> set[int]:
    """Token ids that end generation, found as llama.cpp finds them (ids in the metadata, then by text)."""
    eog = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    for kind, texts in _FIM_TEXTS.items():
        found = md.get(f"tokenizer.ggml.{kind}_token_id")
        if found is None:
            found = next((i for i, t in enumerate(tokens) if t in texts), None)
        eog.add(found)
    eog |= {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    return {i for i in eog if i is not None}


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_id: int | None,
                 eos_token_ids: set[int] | None = None, chat_template: str | None = None,
                 add_bos: bool = False, add_eos: bool = False, post_processor_adds_specials: bool = False):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids or ()) | ({eos_token_id} if eos_token_id is not None else set())
        self.chat_template = chat_template
        self.add_bos, self.add_eos = add_bos, add_eos
        self._native_specials = post_processor_adds_specials
        self._template = None
        self._byte_level = _is_byte_level(tok)
        self._added_ids = set(tok.get_added_tokens_decoder())
        self._bytes: dict[int, bytes] = {}     # token_bytes, filled lazily per id

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> "Tokenizer":
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: this file carries no tokenizer")
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if kind == "gpt2":
            tok, add_bos = _bpe_from_gguf(metadata, tokens, types)
        elif kind == "llama":
            tok, add_bos = _spm_from_gguf(metadata, tokens, types)
        else:
            raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', 'llama')")
        eog = _end_of_generation_ids(metadata, tokens)
        # llama.cpp matches control, user-defined and unknown tokens whole in the text (parse_special),
        # and makes every end-of-generation token a control token
        special = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)} | eog
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
        tok.add_tokens([AddedToken(tokens[i], normalized=False)
                        for i, t in enumerate(types) if t == USER_DEFINED and i not in special])
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        eos = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(tok, bos_token_id=bos, eos_token_id=eos, eos_token_ids=eog,
                   chat_template=metadata.get("tokenizer.chat_template")
                   or DEFAULT_CHAT_TEMPLATES.get(metadata.get("general.architecture", "")),
                   add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos)) and bos is not None,
                   add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        directory = Path(path)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (a Hugging Face fast tokenizer) in this directory")
        tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = cls._read_json(directory / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):      # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        bos_text, eos_text = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        bos = tok.token_to_id(bos_text) if bos_text else None
        eos = tok.token_to_id(eos_text) if eos_text else None
        eos_ids = set()
        for name in ("generation_config.json", "config.json"):
            value = cls._read_json(directory / name).get("eos_token_id")
            eos_ids |= set(value) if isinstance(value, list) else {value} if value is not None else set()
        if eos is None and eos_ids:
            eos = min(eos_ids)
        return cls(tok, bos_token_id=bos, eos_token_id=eos, eos_token_ids=eos_ids, chat_template=template,
                   post_processor_adds_specials=True)

    def save_pretrained(self, directory: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json that `from_dir` and transformers read back as this
        tokenizer (the BOS/EOS this one adds itself go into the saved post-processor)."""
        directory = Path(directory)
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        specials = [(self._tok.id_to_token(i), i) for i in (self.bos_token_id, self.eos_token_id) if i is not None]
        bos = self._tok.id_to_token(self.bos_token_id) if self.add_bos else None
        eos = self._tok.id_to_token(self.eos_token_id) if self.add_eos else None
        if bos or eos:
            single = " ".join(x for x in (bos, "$A", eos) if x)
            pair = " ".join(x for x in (bos, "$A", eos, bos, "$B", eos) if x)
            tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                         special_tokens=specials)
        tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                  "add_eos_token": self.add_eos, "chat_template": self.chat_template}
        config |= {name: self._tok.id_to_token(i) for name, i in (("bos_token", self.bos_token_id),
                                                                  ("eos_token", self.eos_token_id)) if i is not None}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, as llama.cpp's llama_token_to_piece(special=True) gives
        them. A byte-level or byte-fallback token may hold part of a UTF-8 character, which decoding it
        alone shows as U+FFFD; this gives the bytes themselves. Ids the vocabulary lacks give b""."""
        found = self._bytes.get(token_id)
        if found is None:
            found = self._piece_bytes(token_id)
            if found:                       # not ids outside the vocabulary, so the cache stays bounded
                self._bytes[token_id] = found
        return found

    def _piece_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id) if token_id >= 0 else None
        if piece is None:
            return b""
        if token_id in self._added_ids:          # special and user-defined tokens are stored as text
            return piece.encode()
        if self._byte_level:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece) if all(c in _UNICODE_TO_BYTE for c in piece) \
                else piece.encode()
        if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token strings in the text (e.g. "<|im_start|>") become their tokens."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens and self._native_specials).ids
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The conversation rendered by the model's jinja chat template, as transformers renders it."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer.chat_template / chat_template in "
                             "tokenizer_config.json); pass a plain prompt to generate() instead of chat messages")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        specials = {"bos_token": self._text_or_empty(self.bos_token_id),
                    "eos_token": self._text_or_empty(self.eos_token_id)}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**specials, **kwargs})

    def _text_or_empty(self, token_id: int | None) -> str:
        return (self._tok.id_to_token(token_id) or "") if token_id is not None else ""


def _is_byte_level(tok: tokenizers.Tokenizer) -> bool:
    """Whether the vocabulary is GPT-2 byte-level (its decoder, alone or in a sequence, is ByteLevel)."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(walk(d) for d in node.get("decoders") or [])
        return False
    # the decoder's own JSON: the whole tokenizer's (tok.to_str()) takes ~1 s for a 262k vocabulary
    return tok.decoder is not None and walk(json.loads(tok.decoder.__getstate__()))


def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas one token at a time.

    Decodes only a short window: ids[prefix_offset:read_offset] is text already emitted, kept as
    left context so that spaces and merges decode as they would in the whole sequence. A delta is
    held back while it ends in U+FFFD (a UTF-8 character split across tokens)."""

    CONTEXT = 5     # prompt tokens decoded as left context, as vLLM does

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self.CONTEXT, 0)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        text = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]
