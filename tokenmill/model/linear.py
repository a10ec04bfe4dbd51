"""Linear layers and the embedding as the model sees them: a kernel made by the checkpoint's
QuantMethod, plus a bias. Model code never learns which method it runs.

Under tensor parallelism each layer holds this rank's piece of every checkpoint matrix (a `Shard`
per part, parallel/comm.py): column-parallel layers cut output rows, row-parallel ones input columns
and all-reduce their partial sums."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.parallel.comm import SINGLE, Shard, TPGroup
from tokenmill.quant import QuantMethod, Source
from tokenmill.quant.base import DenseKernel, LinearKernel, as_float, slice_source
from tokenmill.quant.int8 import Int8WeightKernel, int8_weight_kernel, quantize_per_channel


def take(src: Source, shard: Shard | None, method: QuantMethod) -> Source:
    """This rank's piece of a checkpoint matrix (the matrix itself when unsplit), cut by its method."""
    if shard is None or shard.count == 1:
        return src
    return method.slice(src, shard.dim, *shard.bounds(method.shape(src)[shard.dim]))


class QLinear(nn.Module):
    """y = x @ W^T (+ b), W the row-concatenation of `len(part_rows)` checkpoint matrices
    (q/k/v, gate/up), each arriving as a Source and made into one kernel when all are loaded.

    `in_features` and `part_rows` are this rank's sizes; `shards[i]` cuts part i out of the checkpoint
    matrix; `reduce`: a row-parallel layer, whose partial products are summed over the group."""

    def __init__(self, in_features: int, part_rows: list[int], bias: bool, dtype: torch.dtype,
                 shards: list[Shard] | None = None, reduce: TPGroup = SINGLE):
        super().__init__()
        self.in_features, self.part_rows = in_features, part_rows
        self.out_features = sum(part_rows)
        self.shards = shards or [None] * len(part_rows)
        self.reduce = reduce
        self.kernel: LinearKernel | None = None
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self._pending: dict[int, Source] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.forward(x)          # kernels carry no hooks: skip nn.Module.__call__ (~1 us a call)
        if self.reduce.size > 1:
            y = self.reduce.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def add_part(self, index: int, src: Source, name: str, method: QuantMethod, dtype: torch.dtype) -> None:
        """Take one part; build the kernel once all parts are here."""
        full = tuple(src.shape) if not isinstance(src, dict) else None
        src = take(src, self.shards[index], method)
        shape = tuple(src.shape) if not isinstance(src, dict) else None
        expected = (self.part_rows[index], self.in_features)
        if shape is not None and shape != expected:
            piece = f" (this rank's piece of {full})" if full != shape else ""
            raise ValueError(f"weight {name}: expected shape {expected}, file has {shape}{piece}")
        self._pending[index] = src
        if len(self._pending) < len(self.part_rows):
            return
        parts = [self._pending[i] for i in range(len(self.part_rows))]
        self._pending = {}
        device = self.bias.device if self.bias is not None else torch.get_default_device()
        self.kernel = method.kernel(parts, dtype, device)
        if self.kernel.out_features != self.out_features:
            raise ValueError(f"weight {name}: method {method.name} made {self.kernel.out_features} rows, "
                             f"expected {self.out_features}")

    def load_bias(self, index: int, src: torch.Tensor, name: str) -> None:
        """Part `index`'s bias (cut like its rows; a row-parallel layer adds the whole bias once)."""
        shard = self.shards[index]
        if shard is not None and shard.dim == 0 and shard.count > 1:
            src = slice_source(src, 0, *shard.bounds(src.shape[0]))
        start = sum(self.part_rows[:index])
        dst = self.bias[start:start + self.part_rows[index]]
        if dst.shape != src.shape:
            raise ValueError(f"weight {name}: expected shape {tuple(dst.shape)}, file has {tuple(src.shape)}")
        with torch.no_grad():
            dst.copy_(src)


class Embedding(nn.Module):
    """Token rows from a table that serves `rows(ids)`: the tied lm_head's kernel when it can serve rows;
    else a dense checkpoint table stays dense (unless the method quantizes at load: int8 per row) and a
    quantized one (GGUF) becomes int8 (a scale per 32 columns on tokenmill's kernels, CPU or Triton, so Q8_0
    stays exact; else per row on the CPU, dense elsewhere). Vocabulary-parallel: a rank holds the rows of `shard` and looks
    up the ids that fall there; the all-reduce adds the other ranks' rows."""

    def __init__(self, vocab_size: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.table: LinearKernel | None = None
        self.tp = tp
        self.shard = tp.rows()
        self.start, self.end = self.shard.bounds(vocab_size)

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.tp.size == 1:
            return self.table.rows(ids, dtype)
        mine = (ids >= self.start) & (ids < self.end)
        rows = self.table.rows(torch.where(mine, ids - self.start, 0), dtype)      # [T, hidden]
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(dtype))

    def load(self, src: Source, method: QuantMethod, dtype: torch.dtype, device: torch.device,
             tied_head: LinearKernel | None) -> None:
        if tied_head is not None and tied_head.serves_rows:
            self.table = tied_head
            return
        src = take(src, self.shard, method)
        if isinstance(src, torch.Tensor) and not method.quantizes_dense:
            self.table = DenseKernel(src.to(device=device, dtype=dtype))
        elif device.type == "cpu" and isinstance(src, torch.Tensor):
            self.table = Int8WeightKernel(*quantize_per_channel(as_float(src)), label="int8 per-row")
        else:           # a quantized table as stored (GGUF): int8 where it runs (Q8_0 comes back exactly), else dense
            table = int8_weight_kernel(as_float(src), "embedding", device)
            self.table = table if table is not None else DenseKernel(as_float(src, dtype).to(device))

    def describe(self) -> str:
        return self.table.describe()
