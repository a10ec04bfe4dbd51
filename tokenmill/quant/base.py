"""The quantization interface: a QuantMethod turns one linear layer's checkpoint tensors into a
LinearKernel; the model calls kernels and never learns which method made them.

A linear layer may fuse several checkpoint matrices by rows (q/k/v, gate/up). Each matrix arrives
as a `Source`: a float tensor, a GGUF block tensor as stored, or a dict of a packed format's tensors
(GPTQ/AWQ: qweight, qzeros, scales, g_idx). A method builds one kernel for the whole fused layer.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from torch import nn
import torch.nn.functional as F

from tokenmill.loader.gguf import GGUFTensor


Source = Union[torch.Tensor, GGUFTensor, dict]


def as_float(src: Source, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [out, in] weight a source stands for (dict sources are dequantized by their method)."""
    if isinstance(src, GGUFTensor):
        return src.dequantize().to(dtype)
    if isinstance(src, torch.Tensor):
        return src.to(dtype)
    raise TypeError(f"cannot read a {type(src).__name__} source as a dense weight")


def slice_source(src: Source, dim: int, start: int, end: int) -> Source:
    """Output rows (dim 0) or input columns (dim 1) start..end of a weight as stored, reading only
    those bytes: a tensor piece is copied out of its (possibly memory-mapped) file; a GGUF piece stays
    packed (rows: a view of the map) when the cut falls on block boundaries (rows always do), and is
    dequantized otherwise."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, end - start).clone()
    if isinstance(src, GGUFTensor):
        n, k = src.shape
        if dim == 0:
            return GGUFTensor(src.qtype, np.ascontiguousarray(src.data[start:end]), (end - start, k))
        block, type_size = GGML_QUANT_SIZES[src.qtype]
        if start % block == 0 and end % block == 0:
            data = src.data[:, start // block * type_size:end // block * type_size]
            return GGUFTensor(src.qtype, np.ascontiguousarray(data), (n, end - start))
        return src.dequantize()[:, start:end].clone()
    raise ValueError(f"tensor parallelism: a packed {type(src).__name__} source is cut by its quantization method")


class LinearKernel(nn.Module):
    """y = x @ W^T for one (possibly fused) weight W [out, in]. Input and output keep x's dtype;
    a kernel that computes in another dtype casts inside."""
    out_features: int
    serves_rows = False          # True: `rows` reads embedding rows from the same storage (a tied table)

    def describe(self) -> str:
        raise NotImplementedError

    def packed_weights(self) -> "kernels.PackedWeights | None":
        """The weights as tokenmill's CPU kernels take them (kernels.DecoderStack); None for weights they do
        not hold."""
        return None

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W[ids] for an embedding lookup from the same storage (kernels with `serves_rows`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve embedding rows")


class DenseKernel(LinearKernel):
    serves_rows = True

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) if self.weight.dtype != x.dtype else self.weight)

    def describe(self) -> str:
        return f"dense {str(self.weight.dtype).removeprefix('torch.')}"

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(dtype)


class ConcatKernel(LinearKernel):
    """Fused rows whose parts could not share one kernel (e.g. a GGUF file with Q4_K q/k and Q6_K v)."""

    def __init__(self, kernels: list[LinearKernel]):
        super().__init__()
        self.kernels = nn.ModuleList(kernels)
        self.out_features = sum(k.out_features for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([k(x) for k in self.kernels], dim=-1)

    def describe(self) -> str:
        return " + ".join(k.describe() for k in self.kernels)


class QuantMethod:
    """How one checkpoint's linear layers run. Subclasses set `name` and implement `kernel`."""
    name: str = ""
    quantizes_dense: bool = False      # made at load: also shrink a dense embedding table (to int8 rows)
    packed: bool = True                # linears run on quantized kernels (False: dense weights in `dtype`)

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        """One kernel computing the row-concatenation of `parts` ([out_i, in] each) for activations
        of `dtype`."""
        raise NotImplementedError

    def source_names(self) -> tuple[str, ...]:
        """Checkpoint tensor suffixes this method reads for one matrix ("weight", or "qweight", ...)."""
        return ("weight",)

    def shape(self, src: Source) -> tuple[int, int]:
        """[out, in] of the matrix a source stands for."""
        if isinstance(src, dict):
            raise ValueError(f"{self.name}: packed sources of this method cannot be split between ranks")
        return tuple(src.shape)

    def slice(self, src: Source, dim: int, start: int, end: int) -> Source:
        """Rows (dim 0) or input columns (dim 1) start..end of one matrix as stored, for a tensor-parallel
        rank; methods with packed (dict) sources cut them in their own layout."""
        return slice_source(src, dim, start, end)


class DenseMethod(QuantMethod):
    """Every weight dequantized to the activation dtype: the transformers-exact reference path."""
    name = "dequantize"
    packed = False

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        return DenseKernel(torch.cat([as_float(p, dtype) for p in parts]).to(device))


class SumKernel(LinearKernel):
    """W = the sum of the kernels' weights (8-bit values as two 4-bit halves)."""

    def __init__(self, kernels: list[LinearKernel]):
        super().__init__()
        self.kernels = nn.ModuleList(kernels)
        self.out_features = kernels[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels[0](x)
        for k in self.kernels[1:]:
            y = y + k(x)
        return y

    def describe(self) -> str:
        return " + ".join(k.describe() for k in self.kernels)
