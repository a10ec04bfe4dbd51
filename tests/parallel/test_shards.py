"""A rank's piece of a checkpoint tensor, read as stored: exact against slicing the whole tensor."""
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors import safe_open
from safetensors.torch import save_file

from tokenmill.loader.gguf import GGUFCheckpoint, GGUFTensor
from tokenmill.loader.safetensors import iter_mapped
from tokenmill.parallel.comm import Shard
from tokenmill.quant.base import slice_source


def test_pieces_cover_a_dimension_once():
    for n, count in [(385, 2), (49152, 3), (7, 4), (262144, 2)]:
        pieces = [Shard(0, i, count).bounds(n) for i in range(count)]
        assert pieces[0][0] == 0 and pieces[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert max(e - s for s, e in pieces) == -(-n // count)


def test_mapped_safetensors_equal_the_library(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, 4, generator=g).bfloat16(),
               "c": torch.randn(8, generator=g).half(), "d": torch.arange(6, dtype=torch.int32).view(2, 3),
               "e": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "m.safetensors")
    mapped = dict(iter_mapped(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for name in f.keys():
            assert torch.equal(mapped[name], f.get_tensor(name)) and mapped[name].dtype == f.get_tensor(name).dtype
    piece = slice_source(mapped["a"], 1, 2, 5)
    piece.add_(1)                     # a piece is a copy
    mapped["b"].add_(1)               # and the map is private: a write to it never reaches the file
    again = dict(iter_mapped(tmp_path / "m.safetensors"))
    assert torch.equal(again["a"], tensors["a"]) and torch.equal(again["b"], tensors["b"])


def gguf_tensors(path, wanted):
    ckpt = GGUFCheckpoint(path)
    found = {}
    for name in ckpt.tensor_names():
        qtype, data, shape = ckpt.raw_tensor(name)
        if qtype in wanted and qtype not in found and len(shape) == 2:
            found[qtype] = GGUFTensor(qtype, data, shape)
    return found


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_gguf_pieces_stay_packed_and_exact(model, request):
    path = request.getfixturevalue(f"{model}_path")
    tensors = gguf_tensors(path, (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K))
    assert len(tensors) >= 2
    for qtype, t in tensors.items():
        full = t.dequantize()
        n, k = t.shape
        rows = slice_source(t, 0, n // 3, 2 * n // 3)
        assert isinstance(rows, GGUFTensor) and torch.equal(rows.dequantize(), full[n // 3:2 * n // 3])
        half = k // 2                 # 288 / 320 columns: on a 32-block boundary, not always on a 256 one
        cols = slice_source(t, 1, half, k)
        packed = half % (256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 32) == 0
        assert isinstance(cols, GGUFTensor) == packed, qtype
        got = cols.dequantize() if packed else cols
        assert torch.equal(got, full[:, half:]), qtype
