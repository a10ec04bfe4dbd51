"""Group-wise int4 weights on a CPU kernel, and "int4": round-to-nearest made at load.

Every int4 format we run (GGUF Q4_0/Q4_1/Q4_K, GPTQ, AWQ, RTN) is brought to one form:
q in [0, 15], and per group of input columns a scale s and a zero z with w = (q - 8) * s + z.
Two kernels run it:
  - tokenmill's own (tokenmill/kernels, x86-64 with AVX2 and FMA; Triton on CUDA): float32 activations
    (rounded to int8 per 32 columns inside), faster than PyTorch's at every batch size on AVX2
    (docs/benchmarks.md);
  - elsewhere `aten._weight_int4pack_mm_for_cpu`, which computes exactly that form; its fast path
    wants bfloat16 activations (float32 ones take a path about 15x slower), so it computes in
    bfloat16 and casts back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill import kernels
from tokenmill.quant.base import DenseKernel, LinearKernel, QuantMethod, Source, as_float

KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def regroup(scale: torch.Tensor, zero: torch.Tensor, group: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Express a group size the kernel lacks (per-channel, 512, ...) with 32-column groups by
    repeating each scale and zero: the same weights, exactly."""
    if group in KERNEL_GROUP_SIZES:
        return scale, zero, group
    if group % 32 or in_features % group:
        raise ValueError(f"int4 kernel: group size {group} is not a multiple of 32 dividing {in_features}")
    r = group // 32
    return scale.repeat_interleave(r, dim=1), zero.repeat_interleave(r, dim=1), 32


def scale_offset_form(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(scale, offset, group) of w = q * scale + offset, offset = zero - 8 * scale (float64 here), the form
    tokenmill's own kernels take (C and Triton: any group a multiple of 32 dividing K; others by regroup)."""
    k = q.shape[1]
    if group % 32 or k % group:
        scale, zero, group = regroup(scale, zero, group, k)
    if k % group:
        raise ValueError(f"int4 kernel: in_features {k} is not a multiple of the group size {group}")
    return scale, zero.double() - 8 * scale.double(), group


def _unpack_layout(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """The kernel's packed [N, K / 2] bytes -> q [N, K], for its layout with `block` rows per tile:
    tiles of `block` rows, then K / 2 rows of (2 k-parities x block / 2 bytes), a byte holding row j
    of the tile in its low nibble and row j + block / 2 in its high one."""
    p = packed.view(n // block, k // 2, 2, block // 2)
    q = torch.stack((p & 15, p >> 4), dim=3)                       # [tiles, K/2, parity, half, block/2]
    return q.permute(0, 3, 4, 1, 2).reshape(n, k)


def _probe_layout() -> int | None:
    """Which tile height the int4 CPU kernel packs with on this CPU (it depends on the ISA), checked
    by packing a random matrix and unpacking it; None when neither known layout matches."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (32, 64, 16):
        if torch.equal(_unpack_layout(packed, 128, 64, block).to(torch.int32), q):
            return block
    return None


_LAYOUT: list[int | None] = []


def packed_layout() -> int | None:
    if not _LAYOUT:
        _LAYOUT.append(_probe_layout())
    return _LAYOUT[0]


class Int4Kernel(LinearKernel):
    """W [N, K] = (q - 8) * scale + zero, scale and zero per (row, group of `group` columns).

    `perm` (GPTQ act-order) reorders input columns so that each group is contiguous: y = x[:, perm] @ W'^T.

    Many rows (prefill, big batches) are compute-bound, where the int4 kernel is ~2x slower than the
    float32 product on AVX2 (docs/benchmarks.md): above `DENSE_ROWS` rows the weights are unpacked
    from the same packed bytes into a transient float32 matrix and multiplied densely.
    """
    DENSE_ROWS = 128

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 perm: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                 label: str = "int4"):
        super().__init__()
        n, k = q.shape
        scale, zero, group = regroup(scale, zero, group, k)
        if k % group:
            raise ValueError(f"int4 kernel: in_features {k} is not a multiple of the group size {group}")
        self.out_features, self.in_features, self.group = n, k, group
        self.compute_dtype, self.label = compute_dtype, label
        # rows padded to whole tiles of the widest packing layout (64 rows with AVX-512): PyTorch packs a last
        # partial tile in yet another order, which dense_weight would have to know
        pad = -n % 64
        q = F.pad(q.to(torch.int32), (0, 0, 0, pad))
        sz = torch.stack([F.pad(scale.float(), (0, 0, 0, pad)), F.pad(zero.float(), (0, 0, 0, pad))], dim=-1)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))   # [N', K / 2]
        self.register_buffer("scale_zero", sz.transpose(0, 1).contiguous().to(compute_dtype))     # [K / g, N', 2]
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        if x.shape[0] > self.DENSE_ROWS and packed_layout() is not None:
            y = F.linear(x.to(torch.float32), self.dense_weight()).to(dtype)
            return y.reshape(*shape[:-1], self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.compute_dtype), self.packed, self.group,
                                                        self.scale_zero)
        return y[:, :self.out_features].to(dtype).reshape(*shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """float32 [N, K] from the packed bytes, with the kernel's own (compute-dtype) scales and zeros."""
        n = self.packed.shape[0]
        q = _unpack_layout(self.packed, n, self.in_features, packed_layout())[:self.out_features]
        sz = self.scale_zero[:, :self.out_features].float()            # [K / g, N, 2]
        w = q.view(self.out_features, -1, self.group).to(torch.float32).sub_(8)
        w.mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None])
        return w.view(self.out_features, self.in_features)

    def describe(self) -> str:
        return f"{self.label} g{self.group}"


class NativeInt4Kernel(LinearKernel):
    """The same weights on tokenmill's own kernel (kernels.int4_mm), in its tiles of 8 rows (kernels.tile_int4):
    w = q * scale + offset with offset = zero - 8 * scale per (row, group), float32 (float16 where they all are
    float16 values, as GGUF's Q4_0 / Q4_1 store them: kernels.narrow_scales). One kernel for every number of
    rows: at 64 rows and more it runs ~2.5x the dense float32 product of the same weights (docs/benchmarks.md), and
    a row's result never depends on the other rows."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 perm: torch.Tensor | None = None, label: str = "int4"):
        super().__init__()
        scale, offset, group = scale_offset_form(q, scale, zero, group)
        (self.out_features, self.in_features), self.group, self.label = q.shape, group, label
        packed, scale_offset = kernels.tile_int4(q, scale, offset)
        self.register_buffer("packed", packed)                    # [N8, K / 32, 4, 32]
        self.register_buffer("scale_offset", scale_offset)        # [N8, K / group, 2, 8]
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32:        # the model's own calls are [T, K] float32
            return self(x.reshape(-1, self.in_features).float()).to(x.dtype).reshape(*x.shape[:-1], -1)
        # buffers straight from the dict: nn.Module.__getattr__ costs ~1 us, and this runs 120 times a
        # decode step (with QLinear calling forward directly, ~4 % of a batch-1 step)
        buffers = self._buffers
        if buffers["perm"] is not None:
            x = x[:, buffers["perm"]]
        return kernels.int4_mm(x, buffers["packed"], buffers["scale_offset"], self.out_features, self.group)

    def dense_weight(self) -> torch.Tensor:
        """float32 [N, K] from the packed bytes."""
        return kernels.int4_dequantize(self.packed, self.scale_offset, self.out_features, self.group)

    def packed_weights(self) -> kernels.PackedWeights:
        return kernels.PackedWeights(4, self.packed, self.scale_offset, self.group, self.perm)

    def describe(self) -> str:
        return f"{self.label} g{self.group}"


class TritonInt4Kernel(LinearKernel):
    """The same weights on a GPU, packed two per byte in GGUF's nibble order (kernels.pack_int4) with a (scale,
    offset) per row and group, multiplied by tokenmill's Triton kernel (kernels/triton_mm.py), which dequantizes
    them in registers up to 64 rows launched eagerly (~0.75 bytes a weight read per product, not 2), else
    (more rows, or recorded in a CUDA graph: decode steps) into a dense slab for cuBLAS; ~0.75 bytes a weight
    stay resident."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, device: torch.device,
                 perm: torch.Tensor | None = None, label: str = "int4"):
        super().__init__()
        scale, offset, group = scale_offset_form(q, scale, zero, group)
        (self.out_features, self.in_features), self.group, self.label = q.shape, group, label
        self.register_buffer("packed", kernels.pack_int4(q).to(device))                       # [N, K / 2]
        self.register_buffer("scale_offset", torch.stack([scale.float(), offset.float()], dim=-1).to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.kernels import triton_mm
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = triton_mm.int4_mm(x2, self.packed, self.scale_offset, self.group)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """float32 [N, K] from the packed bytes."""
        q = kernels.unpack_int4(self.packed).view(self.out_features, -1, self.group).float()
        return (q * self.scale_offset[..., :1] + self.scale_offset[..., 1:]).view(self.out_features, self.in_features)

    def describe(self) -> str:
        return f"{self.label} g{self.group} (triton)"


def int4_kernel(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, device: torch.device,
                perm: torch.Tensor | None = None, label: str = "int4") -> LinearKernel:
    """tokenmill's int4 kernel where it runs (CPU: kernels/cpu.c; CUDA: the Triton kernel), else PyTorch's on
    CPU; a GPU without triton gets the same weights dequantized to bfloat16."""
    if device.type == "cpu" and kernels.multiplies(q.shape[1]):
        return NativeInt4Kernel(q, scale, zero, group, perm, label=label)
    if device.type == "cpu":
        return Int4Kernel(q, scale, zero, group, perm, label=label)
    if kernels.multiplies(q.shape[1], device):
        return TritonInt4Kernel(q, scale, zero, group, device, perm, label=label)
    w = dequantize_int4(q, scale, zero, group)
    if perm is not None:
        w = torch.empty_like(w).index_copy_(1, perm, w)
    return DenseKernel(w.to(device=device, dtype=torch.bfloat16))


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    w = (q.double().view(n, k // group, group) - 8) * scale.double()[..., None] + zero.double()[..., None]
    return w.view(n, k).float()


def quantize_rtn(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest: per group, [min, max] onto 0..15."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return q, scale, lo + 8 * scale


class Int4Method(QuantMethod):
    """"int4": weight-only, asymmetric, group-wise round-to-nearest, made at load from any weights."""
    name = "int4"
    quantizes_dense = True

    def __init__(self, group_size: int = 32):
        self.group_size = group_size

    def kernel(self, parts: list[Source], dtype: torch.dtype, device: torch.device) -> LinearKernel:
        w = torch.cat([as_float(p) for p in parts])
        group = self.group_size if w.shape[1] % self.group_size == 0 else 32
        if w.shape[1] % group:
            return DenseKernel(w.to(device=device, dtype=dtype))
        return int4_kernel(*quantize_rtn(w, group), group, device, label="int4 rtn")
