"""Linear layers and the embedding as the model sees them: a kernel made by the checkpoint's
QuantMethod, plus a bias. Model code never learns which method it runs."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.quant import QuantMethod, Source
from tokenmill.quant.base import DenseKernel, LinearKernel, as_float
from tokenmill.quant.int8 import Int8WeightKernel, quantize_per_channel


class QLinear(nn.Module):
    """y = x @ W^T (+ b), W the row-concatenation of `len(part_rows)` checkpoint matrices
    (q/k/v, gate/up), each arriving as a Source and made into one kernel when all are loaded."""

    def __init__(self, in_features: int, part_rows: list[int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.part_rows = in_features, part_rows
        self.out_features = sum(part_rows)
        self.kernel: LinearKernel | None = None
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self._pending: dict[int, Source] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias

    def add_part(self, index: int, src: Source, name: str, method: QuantMethod, dtype: torch.dtype) -> None:
        """Take one part; build the kernel once all parts are here."""
        shape = tuple(src.shape) if not isinstance(src, dict) else None
        expected = (self.part_rows[index], self.in_features)
        if shape is not None and shape != expected:
            raise ValueError(f"weight {name}: expected shape {expected}, file has {shape}")
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


class Embedding(nn.Module):
    """Token rows from a table that serves `rows(ids)`: the tied lm_head's kernel when it can serve rows;
    else a dense checkpoint table stays dense (unless the method quantizes at load) and a quantized
    one (GGUF) becomes int8 per row."""

    def __init__(self):
        super().__init__()
        self.table: LinearKernel | None = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.table.rows(ids, dtype)

    def load(self, src: Source, method: QuantMethod, dtype: torch.dtype, device: torch.device,
             tied_head: LinearKernel | None) -> None:
        if tied_head is not None and tied_head.serves_rows:
            self.table = tied_head
        elif isinstance(src, torch.Tensor) and not method.quantizes_dense:
            self.table = DenseKernel(src.to(device=device, dtype=dtype))
        elif device.type == "cpu":
            self.table = Int8WeightKernel(*quantize_per_channel(as_float(src)), label="int8 per-row")
        else:
            self.table = DenseKernel(as_float(src, dtype).to(device))

    def describe(self) -> str:
        return self.table.describe()
