"""GGUF checkpoints (llama.cpp's format): metadata as Python values, tensors in Hugging Face names.

The header is parsed here rather than with gguf-py's GGUFReader, which walks every element of
every array in Python (about 4 s for a 49k-token vocabulary); gguf-py still provides the type
tables and the dequantization kernels.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from tqdm import tqdm

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")
T = GGMLQuantizationType
SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
# architectures whose Q/K rows llama.cpp's converter reorders for interleaved (GPT-J) rope
PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")
# architectures whose converter stores every RMSNorm weight w as 1 + w (Gemma3Model.norm_shift in
# llama.cpp's convert_hf_to_gguf.py), while Hugging Face stores w and computes x * (1 + w)
SHIFTED_NORM_ARCHITECTURES = ("gemma3",)

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# ffn_norm is the norm before the MLP: Llama's post_attention_layernorm, but Gemma 3 has four norms
# per block and its post_attention_layernorm is a different tensor (post_attention_norm)
_LLAMA_BLOCK_NAMES = {**_COMMON_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"}
_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_BLOCK_NAMES,
    "mistral": _LLAMA_BLOCK_NAMES,
    "qwen2": _LLAMA_BLOCK_NAMES,
    "gemma3": {**_COMMON_BLOCK_NAMES,
               "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"},
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFTensor:
    """A quantized GGUF tensor as stored: uint8 [out, bytes per row] blocks of `qtype`, rows in
    Hugging Face order. Blocks never cross rows, so a row slice is a valid tensor too."""
    qtype: GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """float32, exactly as gguf-py (and so transformers) dequantizes it."""
        return torch.from_numpy(np.ascontiguousarray(dequantize(self.data, self.qtype)).reshape(self.shape))


def hf_name(gguf_name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of `architecture`, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    names = _BLOCK_NAMES[architecture]
    if m is None or m.group(2) not in names:
        return None
    layer, part, kind = m.groups()
    if part.endswith("norm") and kind == "bias":
        return None
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row indices that undo llama.cpp's interleaved-rope reordering of a Q or K projection:
    permuted[unpermute_rows(...)] is the Hugging Face (rotate_half) row order."""
    rows = np.arange(n_rows)
    # inverse of reshape(n_head, 2, half, ...).swapaxes(1, 2), applied to row indices
    return rows.reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(n_rows)


class _TensorInfo:
    __slots__ = ("gguf_name", "qtype", "shape", "offset", "n_bytes")

    def __init__(self, gguf_name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...], offset: int,
                 n_bytes: int):
        self.gguf_name = gguf_name
        self.qtype = qtype
        self.shape = shape          # PyTorch order: [out_features, in_features]
        self.offset = offset        # absolute, in bytes
        self.n_bytes = n_bytes


class _Header:
    """A cursor over the GGUF header; every read past the end is reported as truncation."""

    def __init__(self, path: Path, buf: memoryview):
        self.path, self.buf, self.pos = path, buf, 0

    def truncated(self) -> ValueError:
        return ValueError(f"{self.path}: truncated GGUF file (header ends at byte {len(self.buf)}, "
                          f"needed more at byte {self.pos}); re-download it")

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise self.truncated() from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise self.truncated()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise ValueError(f"{self.path}: corrupt GGUF header: unknown value type {vtype} at byte {self.pos}") \
                from None
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _NUMPY.keys():
            dtype = np.dtype(_NUMPY[GGUFValueType(item_type)])
            if self.pos + count * dtype.itemsize > len(self.buf):
                raise self.truncated()
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        if item_type == GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        return [self.value(item_type) for _ in range(count)]


class GGUFCheckpoint:
    """A GGUF file opened for reading: metadata decoded, tensor data memory-mapped, not yet read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        header = _Header(self.path, memoryview(self._data))
        self.metadata, infos = self._read_header(header)
        self.architecture: str = self.metadata.get("general.architecture", "")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{self.path}: unsupported architecture {self.architecture!r} "
                             f"(general.architecture); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self._tensors = self._locate(infos, header)
        for name, info in self._tensors.items():
            if info.qtype not in SUPPORTED_TYPES:
                raise ValueError(f"{self.path}: tensor {info.gguf_name} has unsupported type {info.qtype.name}; "
                                 f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")

    def _read_header(self, h: _Header) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
        """Metadata, and (name, dims, type id, offset) of every tensor; leaves `h` at the header's end."""
        h.pos = 4
        version = h.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3, little-endian)")
        n_tensors, n_kv = h.scalar("<Q"), h.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            metadata[key] = h.value(h.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.scalar("<Q") for _ in range(h.scalar("<I"))]
            raw_type, offset = h.scalar("<I"), h.scalar("<Q")
            infos.append((name, dims, raw_type, offset))
        return metadata, infos

    def _locate(self, infos: list[tuple[str, list[int], int, int]], h: _Header) -> dict[str, _TensorInfo]:
        """The tensors the model uses, by Hugging Face name, with their bytes checked to be in the file."""
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-h.pos // alignment) * alignment
        tensors: dict[str, _TensorInfo] = {}
        for name, dims, raw_type, offset in infos:
            hf = hf_name(name, self.architecture)
            if hf is None:
                continue
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"{self.path}: tensor {name} has unknown type id {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            start = data_start + offset
            if start + n_bytes > len(h.buf):
                raise ValueError(f"{self.path}: truncated GGUF file: tensor {name} needs bytes "
                                 f"{start}..{start + n_bytes} but the file has {len(h.buf)}; re-download it")
            tensors[hf] = _TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start, n_bytes)
        return tensors

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def _head_count(self, hf: str) -> int | None:
        """Heads whose rows were reordered in this tensor, or None when it was not permuted."""
        if self.architecture not in PERMUTED_QK_ARCHITECTURES:
            return None
        heads = self.metadata.get(f"{self.architecture}.attention.head_count")
        if ".self_attn.q_proj." in hf:
            return heads
        if ".self_attn.k_proj." in hf:
            return self.metadata.get(f"{self.architecture}.attention.head_count_kv") or heads
        return None

    def _norm_shifted(self, hf: str) -> bool:
        return self.architecture in SHIFTED_NORM_ARCHITECTURES and hf.endswith("norm.weight")

    def raw_tensor(self, hf: str) -> tuple[GGMLQuantizationType, np.ndarray, tuple[int, ...]]:
        """(type, data as stored, logical shape [out, in]) for running a quantized weight as is.

        Quantized data is uint8 [rows, bytes per row]; F32/F16 data is typed. Rows are already in
        Hugging Face order (the Q/K rope permutation is undone; blocks never cross rows). Norm
        weights stored as 1 + w come back as F32 holding Hugging Face's w."""
        if hf not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {hf!r}; it has {len(self._tensors)} tensors")
        info = self._tensors[hf]
        raw = self._data[info.offset:info.offset + info.n_bytes]
        if self._norm_shifted(hf):
            # transformers' Gemma GGUF processor: dequantize to float32, then subtract 1 in float32
            return T.F32, dequantize(raw, info.qtype).reshape(info.shape) - np.float32(1), info.shape
        if info.qtype == T.F32:
            data = raw.view(np.float32).reshape(info.shape)
        elif info.qtype == T.F16:
            data = raw.view(np.float16).reshape(info.shape)
        else:
            block, type_size = GGML_QUANT_SIZES[info.qtype]
            data = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        heads = self._head_count(hf)
        if heads is not None:
            data = data[unpermute_rows(info.shape[0], heads)]
        return info.qtype, data, info.shape

    def iter_sources(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
        """(Hugging Face name, tensor as stored): quantized ones as GGUFTensor, F32/F16 as tensors."""
        for hf in tqdm(self._tensors, desc=f"loading {self.path.name}", unit="tensor", disable=not progress):
            qtype, data, shape = self.raw_tensor(hf)
            if qtype in (T.F32, T.F16):
                yield hf, torch.from_numpy(np.array(data))
            else:
                yield hf, GGUFTensor(qtype, data, shape)

    def iter_tensors(self, dtype: torch.dtype, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, dequantized tensor in dtype, shape [out, in]) for every tensor the model uses."""
        for hf, src in self.iter_sources(progress):
            yield hf, (src.dequantize() if isinstance(src, GGUFTensor) else src).to(dtype)
