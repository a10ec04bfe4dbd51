"""Hugging Face checkpoints: config.json plus single or sharded *.safetensors files."""
from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Hugging Face model directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: names shards that are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights found")
    return files


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def iter_mapped(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of one file as a view of its memory map: nothing is read until used, so a tensor-
    parallel rank that copies out its piece reads only that piece's pages. The views are of a private
    (copy-on-write) mapping: writing to one never reaches the file."""
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (struct.error, ValueError, OSError) as e:
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None or 8 + n + end > len(mapped):
            raise ValueError(f"{path}: tensor {name} has an unknown dtype or lies past the end of the file")
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + n + begin) if count else \
            torch.empty(0, dtype=dtype)
        if flat.numel() != math.prod(info["shape"]):
            raise ValueError(f"{path}: tensor {name} has {flat.numel()} values for shape {info['shape']}")
        yield name, flat.view(info["shape"])


def iter_safetensors(directory: Path, progress: bool = False, mapped: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file; `mapped`: as views of the files' memory maps (iter_mapped)."""
    files = safetensors_files(directory)
    for path in tqdm(files, desc="loading safetensors", unit="file", disable=not progress):
        if mapped:
            yield from iter_mapped(path)
            continue
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{path}: tensor {name} is unreadable, the file may be truncated ({e})") from None
                yield name, tensor
