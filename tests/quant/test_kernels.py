"""Every quantized kernel against dequantize-then-matmul in float32 (or float64), and every GGUF
int4 mapping bit-exact against gguf-py's dequantization."""
import gguf
import numpy as np
import pytest
import torch

from bounds import activation_bound
from tokenmill.loader.gguf import GGUFCheckpoint, GGUFTensor
from tokenmill.quant.gguf import int4_groups
from tokenmill.quant.int4 import Int4Kernel, dequantize_int4, quantize_rtn
from tokenmill.quant.int8 import Int8WeightKernel, W8A8Kernel, quantize_per_channel

Q = gguf.GGMLQuantizationType


def random_q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(rng.uniform(1e-3, 1e-2, size=rows * cols // 256).astype(np.float16).tobytes(),
                                   np.uint8).reshape(-1, 2)
    blocks[:, 2:4] = np.frombuffer(rng.uniform(1e-3, 1e-2, size=rows * cols // 256).astype(np.float16).tobytes(),
                                   np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // 256 * 144)


def gguf_tensor(qtype, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
    rng = np.random.default_rng(seed)
    if qtype == Q.Q4_K:
        data = random_q4_k(rows, cols, rng)
    else:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 1, size=(rows, 1)).astype(np.float32)
        data = gguf.quants.quantize(w, qtype)
    return GGUFTensor(qtype, data, (rows, cols))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
@pytest.mark.parametrize("shape", [(16, 256), (48, 512), (7, 1024)])
def test_gguf_int4_mapping_is_bit_exact(qtype, shape):
    t = gguf_tensor(qtype, *shape)
    q, s, z = int4_groups(t)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    ours = dequantize_int4(q, s, z, 32)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, qtype).reshape(shape))
    assert torch.equal(ours, ref)


def test_gguf_int4_mapping_is_bit_exact_on_the_real_model(smollm2_path):
    ckpt = GGUFCheckpoint(smollm2_path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.layers.29.mlp.gate_proj.weight"):
        qtype, data, shape = ckpt.raw_tensor(name)
        t = GGUFTensor(qtype, data, shape)
        assert torch.equal(dequantize_int4(*int4_groups(t), 32), t.dequantize())


def int4_reference(x: torch.Tensor, q, s, z, group: int, dtype: torch.dtype) -> torch.Tensor:
    """x @ W^T with the kernel's roundings made explicit: x, scales and zeros in `dtype`, the product in float64."""
    w = dequantize_int4(q, s.to(dtype).double(), z.to(dtype).double(), group).double()
    return x.to(dtype).double() @ w.t()


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (30, 96, 32), (192, 576, 32), (100, 256, 64),
                                       (48, 512, 128), (32, 576, 576), (64, 256, 256)])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_int4_kernel_matches_dequantized_matmul(n, k, group, m):
    torch.manual_seed(n * 7 + m)
    w = torch.randn(n, k) * torch.rand(n, 1)
    q, s, z = quantize_rtn(w, group)
    x = torch.randn(m, k)
    exact = Int4Kernel(q, s, z, group, compute_dtype=torch.float32)(x)      # float32 end to end
    ref32 = int4_reference(x, q, s, z, group, torch.float32)
    assert exact.shape == (m, n) and exact.dtype == torch.float32
    torch.testing.assert_close(exact.double(), ref32, rtol=1e-4, atol=1e-4 * ref32.abs().max().item())
    fast = Int4Kernel(q, s, z, group)(x)                                     # bfloat16 inside
    ref16 = int4_reference(x, q, s, z, group, torch.bfloat16)
    assert fast.dtype == torch.float32
    err = (fast.double() - ref16).abs().max() / ref16.abs().max()
    assert err < 8e-3, err          # the bfloat16 rounding of the output and of partial sums


def test_int4_kernel_act_order_permutation():
    torch.manual_seed(0)
    n, k, group = 64, 256, 32
    w = torch.randn(n, k)
    perm = torch.randperm(k)
    q, s, z = quantize_rtn(w[:, perm], group)            # groups are contiguous in permuted column order
    x = torch.randn(5, k)
    got = Int4Kernel(q, s, z, group, perm=perm, compute_dtype=torch.float32)(x)
    w_perm = dequantize_int4(q, s, z, group)             # [n, k] in permuted order
    w_orig = torch.empty_like(w_perm).index_copy_(1, perm, w_perm)
    torch.testing.assert_close(got, x @ w_orig.t(), rtol=1e-4, atol=1e-4)


def test_rtn_error_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(40, 320) * 3
    q, s, z = quantize_rtn(w, 32)
    err = (dequantize_int4(q, s, z, 32) - w).abs().view(40, 10, 32)
    assert (err <= s[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("m", [1, 4, 17, 64])
def test_w8a8_kernel_matches_int_math(m):
    torch.manual_seed(m)
    w, x = torch.randn(96, 320), torch.randn(m, 320) * 4
    qw, sw = quantize_per_channel(w)
    got = W8A8Kernel(qw, sw)(x)
    sx = x.abs().amax(1, keepdim=True) / 127
    qx = torch.round(x / sx).clamp(-127, 127)
    ref = (qx.double() @ qw.double().t()) * sx.double() * sw.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    assert ((got - x @ w.t()).abs().max() / (x @ w.t()).abs().max()) < 0.03      # and close to the float product


@pytest.mark.parametrize("m", [1, 5, 32, 33, 100])
def test_int8_weight_only_kernel_matches_dequantized_matmul(m):
    torch.manual_seed(m)
    w, x = torch.randn(80, 256), torch.randn(m, 256)
    q, s = quantize_per_channel(w)
    kernel = Int8WeightKernel(q, s)
    kernel.SLAB = 48                                     # slabs that do not divide the rows
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    if kernel.native:                                    # tokenmill's kernel: activations rounded to int8 per block
        assert ((kernel(x).double() - ref).abs() <= activation_bound(x, q.float() * s[:, None])).all()
    else:
        tol = 1e-4 if m > kernel.MAX_KERNEL_ROWS else 8e-3  # the few-row kernel computes in bfloat16
        torch.testing.assert_close(kernel(x).double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    ids = torch.tensor([0, 79, 3, 3])
    torch.testing.assert_close(kernel.rows(ids, torch.float32), (q.float() * s[:, None])[ids])


@pytest.mark.parametrize("n,k,group", [(30, 96, 32), (192, 576, 32), (64, 256, 128)])
def test_int4_dense_route_unpacks_the_kernels_own_bytes(n, k, group):
    """Above DENSE_ROWS rows the kernel multiplies a float32 matrix unpacked from its packed bytes:
    exactly the weights the int4 product uses (bf16 scales and zeros), on this CPU's packing layout."""
    from tokenmill.quant.int4 import packed_layout
    assert packed_layout() is not None
    torch.manual_seed(n)
    w = torch.randn(n, k)
    q, s, z = quantize_rtn(w, group)
    kernel = Int4Kernel(q, s, z, group)
    expected = dequantize_int4(q, s.bfloat16().double(), z.bfloat16().double(), group)
    assert torch.equal(kernel.dense_weight(), expected)
    x = torch.randn(kernel.DENSE_ROWS + 3, k)
    torch.testing.assert_close(kernel(x), x @ expected.t(), rtol=1e-5, atol=1e-4)


def test_w8a8_without_tokenmills_kernels_keeps_exact_integer_math(monkeypatch):
    """Without VNNI and without tokenmill's kernels the int8 x int8 product stays torch._int_mm: exact,
    never PyTorch's bfloat16 weight-only kernel."""
    from tokenmill import kernels
    monkeypatch.setattr(kernels, "library", lambda: None)
    torch.manual_seed(3)
    w, x = torch.randn(64, 320), torch.randn(5, 320) * 4
    qw, sw = quantize_per_channel(w)
    kernel = W8A8Kernel(qw, sw)
    assert kernel.weight_only is None
    sx = x.abs().amax(1, keepdim=True) / 127
    ref = (torch.round(x / sx).clamp(-127, 127).double() @ qw.double().t()) * sx.double() * sw.double()
    torch.testing.assert_close(kernel(x).double(), ref, rtol=1e-5, atol=1e-4)
