"""The Triton int4 and int8 products (kernels/triton_mm.py), run by Triton's interpreter on CPU tensors, against
dequantize-then-matmul in float32 on random and real (SmolLM2 Q4_1 and Q8_0) weights; and the GPU kernel
classes against the CPU ones on the same stored weights."""
from __future__ import annotations

import pytest
import torch

from bounds import activation_bound
from tokenmill import kernels

triton_mm = pytest.importorskip("tokenmill.kernels.triton_mm")
from tokenmill.quant.int8 import Int8WeightKernel, TritonInt8Kernel, quantize_per_group  # noqa: E402
pytestmark = pytest.mark.usefixtures("triton_interpreter")


def reference(x: torch.Tensor, q: torch.Tensor, scale_offset: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    w = q.view(n, k // group, group).double() * scale_offset[..., :1].double() + scale_offset[..., 1:].double()
    return (x.double() @ w.view(n, k).t()).float()


@pytest.mark.parametrize("m,n,k,group", [(1, 96, 64, 32), (5, 70, 128, 64), (33, 48, 96, 32), (17, 40, 256, 128),
                                         (70, 33, 160, 32)])
def test_matches_dequantized_matmul(m, n, k, group):
    """Odd row counts, N not a multiple of the tile, K with an odd number of 32-column blocks (BK = 32)."""
    g = torch.Generator().manual_seed(m * n)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale_offset = torch.randn(n, k // group, 2, generator=g)
    x = torch.randn(m, k, generator=g)
    want = reference(x, q, scale_offset, group)
    got = triton_mm.int4_mm(x, kernels.pack_int4(q), scale_offset, group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    half = triton_mm.int4_mm(x.bfloat16(), kernels.pack_int4(q), scale_offset, group)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference(x.bfloat16().float(), q, scale_offset, group),
                               rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # float16 runs the branch a GPU runs for half precision: weights rounded to float16 before the dot
    w16 = (q.view(n, k // group, group).float() * scale_offset[..., :1] + scale_offset[..., 1:]).half().float()
    f16 = triton_mm.int4_mm(x.half(), kernels.pack_int4(q), scale_offset, group)
    assert f16.dtype == torch.float16
    torch.testing.assert_close(f16.float(), x.half().float() @ w16.view(n, k).t(), rtol=2e-3,
                               atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_both_routes_around_the_row_limit(bits, monkeypatch):
    """Up to FUSED_MAX_ROWS rows run the fused kernel, more the weights dequantized (SLAB rows at a time) and
    F.linear: the dequantized weights are the reference's, both routes give the reference's products, and the
    row count picks the route."""
    g = torch.Generator().manual_seed(bits)
    n, k, group = 72, 160, 32
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scales = torch.randn(n, k // group, 2, generator=g)
        w = q.view(n, k // group, group).float() * scales[..., :1] + scales[..., 1:]
        stored, mm = kernels.pack_int4(q), triton_mm.int4_mm
    else:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scales = torch.rand(n, k // group, generator=g)
        w = q.view(n, k // group, group).float() * scales[..., None]
        stored, mm = q, triton_mm.int8_mm
    w = w.view(n, k)
    torch.testing.assert_close(triton_mm.dequantize(bits, stored, scales, group, torch.float32), w, rtol=1e-6, atol=1e-6)
    # within a bfloat16 step (the interpreter truncates to bfloat16 where a GPU rounds to nearest)
    torch.testing.assert_close(triton_mm.dequantize(bits, stored, scales, group, torch.bfloat16).float(), w,
                               rtol=2 ** -7, atol=0)
    monkeypatch.setattr(triton_mm, "SLAB", 32)          # 72 rows: slabs of 32, 32 and 8
    calls = []
    real = triton_mm.dequantize
    monkeypatch.setattr(triton_mm, "dequantize", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    for m in (triton_mm.FUSED_MAX_ROWS, triton_mm.FUSED_MAX_ROWS + 1):
        x = torch.randn(m, k, generator=g)
        want = (x.double() @ w.double().t()).float()
        calls.clear()
        torch.testing.assert_close(mm(x, stored, scales, group), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        assert calls == ([] if m <= triton_mm.FUSED_MAX_ROWS else [32, 32, 8])
        for fused in (True, False):
            torch.testing.assert_close(mm(x, stored, scales, group, fused=fused), want, rtol=1e-5,
                                       atol=1e-6 * want.abs().max().item())
    monkeypatch.setattr(triton_mm, "SLAB", n)           # the weights in one slab
    calls.clear()
    torch.testing.assert_close(mm(x, stored, scales, group, fused=False), want, rtol=1e-5,
                               atol=1e-6 * want.abs().max().item())
    assert calls == [n]
    with pytest.raises(ValueError, match="triton dequantize"):
        real(bits, stored[:, 1:], scales, group, torch.float32)


def test_real_q4_1_rows_match_gguf_py(smollm2_path):
    """A slice of the default model's first gate projection, packed from the file's own blocks."""
    from tokenmill.loader.gguf import GGUFCheckpoint, GGUFTensor
    from tokenmill.quant.gguf import int4_groups
    t = GGUFTensor(*GGUFCheckpoint(smollm2_path).raw_tensor("model.layers.0.mlp.gate_proj.weight"))
    q, scale, zero = (a[:64] for a in int4_groups(t))
    scale_offset = torch.stack([scale.float(), (zero.double() - 8 * scale.double()).float()], dim=-1).contiguous()
    x = torch.randn(3, q.shape[1], generator=torch.Generator().manual_seed(0))
    dense = t.dequantize()[:64]                                          # gguf-py's dequantization
    torch.testing.assert_close(triton_mm.int4_mm(x, kernels.pack_int4(q), scale_offset, 32), x @ dense.t(),
                               rtol=1e-4, atol=1e-4)


def test_kernel_class_equals_the_cpu_kernel_with_act_order():
    from tokenmill.quant.int4 import NativeInt4Kernel, TritonInt4Kernel
    g = torch.Generator().manual_seed(1)
    n, k, group = 48, 128, 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(n, k // group, generator=g) / 10, torch.randn(n, k // group, generator=g) / 10
    perm = torch.randperm(k, generator=g)
    gpu = TritonInt4Kernel(q, scale, zero, group, torch.device("cpu"), perm)
    x = torch.randn(2, 3, k, generator=g)
    want = x.reshape(-1, k)[:, perm] @ gpu.dense_weight().t()
    torch.testing.assert_close(gpu(x), want.view(2, 3, n), rtol=1e-5, atol=1e-5)
    assert gpu.packed_weights() is None and "triton" in gpu.describe()
    if kernels.library() is not None:
        cpu = NativeInt4Kernel(q, scale, zero, group, perm)
        assert torch.equal(cpu.dense_weight(), gpu.dense_weight())
        # the CPU kernel rounds activations to int8 per 32 columns: each moves by at most half a step (a block's
        # largest value / 127)
        xp = x.reshape(-1, k)[:, perm]
        step = xp.abs().view(-1, k // 32, 32).amax(-1).repeat_interleave(32, dim=1) / 127
        bound = 0.5 * step @ gpu.dense_weight().abs().t() * 1.01 + 1e-5
        assert ((gpu(x).view(-1, n) - cpu(x).view(-1, n)).abs() <= bound).all()


def test_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="triton int4_mm"):         # K = 32 against bytes of 16 columns
        triton_mm.int4_mm(torch.randn(1, 32), torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(8, 1, 2), 32)
    with pytest.raises(ValueError, match="triton int4_mm"):         # a group that is not a multiple of 32
        triton_mm.int4_mm(torch.randn(1, 32), torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 2, 2), 16)
    with pytest.raises(ValueError, match="triton int4_mm"):
        triton_mm.int4_mm(torch.randn(1, 32).double(), torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 1, 2), 32)


@pytest.mark.parametrize("m,n,k,group", [(1, 96, 64, 32), (7, 70, 96, 32), (40, 33, 128, 64), (3, 20, 64, 64)])
def test_int8_matches_dequantized_matmul(m, n, k, group):
    g = torch.Generator().manual_seed(m + n)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) / 100
    x = torch.randn(m, k, generator=g)
    w = (q.view(n, k // group, group).double() * scale[..., None].double()).view(n, k)
    want = (x.double() @ w.t()).float()
    torch.testing.assert_close(triton_mm.int8_mm(x, q, scale, group), want, rtol=1e-5, atol=1e-4)
    f16 = triton_mm.int8_mm(x.half(), q, scale, group)
    torch.testing.assert_close(f16.float(), x.half().float() @ w.float().half().float().t(), rtol=2e-3,
                               atol=2e-3 * want.abs().max().item())
    with pytest.raises(ValueError, match="triton int8_mm"):
        triton_mm.int8_mm(x, q, scale, 16)


def test_int8_kernel_class_on_real_q8_0_rows(smollm2_path):
    """The default model's Q8_0 embedding rows: the GPU class's products and embedding rows against gguf-py's
    dequantization, and the CPU class's within the bound of its int8 activations."""
    from tokenmill.loader.gguf import GGUFCheckpoint, GGUFTensor
    t = GGUFTensor(*GGUFCheckpoint(smollm2_path).raw_tensor("model.embed_tokens.weight"))
    dense = t.dequantize()[:96]
    gpu = TritonInt8Kernel(*quantize_per_group(dense, 32), torch.device("cpu"), "test")
    ids = torch.tensor([0, 5, 95, 5])
    assert torch.equal(gpu.rows(ids, torch.float32), dense[ids])              # Q8_0 comes back exactly
    x = torch.randn(5, dense.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gpu(x), x @ dense.t(), rtol=1e-5, atol=1e-4)
    if kernels.library() is not None:
        cpu = Int8WeightKernel(*quantize_per_group(dense, 32))
        assert ((cpu(x).double() - gpu(x).double()).abs() <= activation_bound(x, dense) + 1e-4).all()
