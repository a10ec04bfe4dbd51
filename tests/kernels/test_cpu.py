"""tokenmill's own CPU kernels (kernels/cpu.c) against dense float64 math, gguf-py's block layout and
attention/reference.py. On an x86-64 CPU with AVX2/FMA and a C compiler (every machine this project
runs on) the kernels must build: a failed build fails here rather than silently falling back."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize, dequantize as gguf_dequantize

from bounds import activation_bound

from tokenmill import kernels
from tokenmill.attention.reference import ReferenceBackend
from tokenmill.attention.testing import random_paged_case
from tokenmill.loader.gguf import GGUFTensor
from tokenmill.model.layers import apply_rope
from tokenmill.quant.gguf import int4_groups
from tokenmill.quant.int8 import quantize_per_group

pytestmark = pytest.mark.skipif(not kernels.cpu_supports(), reason="tokenmill's CPU kernels need AVX2 and FMA")


def test_the_kernels_build_and_load():
    """The best build for this CPU loads (a VNNI build that fails to compile fails here), unless the CPU
    advertises VNNI but traps its instructions, where the AVX2 build is the right answer."""
    assert kernels.library() is not None
    want = "avx2" if os.environ.get(kernels.ENV_SWITCH) == "avx2" else kernels.best_build()
    vnni = kernels.library_path("vnni")
    if want == "vnni" and vnni.exists() and not kernels._runs(vnni, "vnni"):
        want = "avx2"
    assert kernels.build() == want


def test_a_build_the_cpu_does_not_run_falls_back_to_avx2(monkeypatch, caplog):
    """The loader runs one instruction of the VNNI build in a child process before trusting the CPU's flags; where
    it traps (a VM that advertises what it does not run) the AVX2 build loads, and the log says why."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "best_build", lambda: "vnni")
    monkeypatch.setattr(kernels, "_runs", lambda path, build: False)
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    with caplog.at_level("WARNING", logger="tokenmill"):
        assert kernels.library() is not None and kernels.build() == "avx2"
    assert "does not run the vnni build" in caplog.text
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.library() is None and kernels.build() is None


def test_the_child_process_check_runs_the_build():
    """_runs on the AVX2 build's library (every machine here runs it): the child returns its tm_isa."""
    kernels.compiled("avx2")
    assert kernels._runs(kernels.library_path("avx2"), "avx2")


def products(lib, x, x_int, int4, int8, n, k, group):
    """int4, int8 and integer-activation int8 products of one build's library."""
    return (kernels.int4_mm(x, *int4, n, group, lib=lib), kernels.int8_mm(x, *int8, n, group, lib=lib),
            kernels.int8_mm(x_int, *int8, n, group, lib=lib))


@pytest.mark.skipif(kernels.best_build() != "vnni", reason="this CPU has no AVX-512 VNNI")
def test_the_vnni_build_gives_the_avx2_builds_results():
    """vpdpbusd adds up the same integers as vpmaddubsw + vpmaddwd (int4) and as int16 vpmaddwd (int8; the VNNI
    build's unsigned weights less 128 x the activations' sum), so every product is bit for bit the AVX2 build's:
    on row counts around the 4-row passes and the 64-row work items, weights with extreme nibbles and bytes,
    integer activations at the int8 limits."""
    avx2, vnni = kernels.compiled("avx2"), kernels.compiled("vnni")
    assert (avx2.tm_isa(), vnni.tm_isa()) == (1, 2)
    for m, n, k, group in [(1, 8, 32, 32), (3, 13, 96, 32), (5, 40, 256, 128), (67, 24, 512, 64), (130, 16, 64, 32)]:
        q, scale, zero = random_int4(n, k, group, seed=m)
        q[0] = 15
        q[-1] = 0
        g = torch.Generator().manual_seed(m)
        q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        q8[0] = -128
        int8 = kernels.tile_int8(q8, torch.rand(n, k // group, generator=g))
        x = torch.randn(m, k, generator=g) * 3
        x_int = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        x_int[0] = -128
        want = products(avx2, x, x_int, int4_tiles(q, scale, zero), int8, n, k, group)
        got = products(vnni, x, x_int, int4_tiles(q, scale, zero), int8, n, k, group)
        for a, b in zip(want, got):
            assert torch.equal(a, b), (m, n, k, group)


@pytest.mark.parametrize("build", [b for b in kernels.BUILDS if b == "avx2" or kernels.best_build() == "vnni"])
def test_float16_scales_give_the_float32_scales_products(build):
    """Scales that are float16 values (GGUF's Q4_0 / Q4_1 / Q8_0) are kept as float16 (a sixth fewer bytes for
    int4); the products are bit for bit those of the same scales kept as float32, in each build, on row counts
    around the 4-row passes, the 64-row work items and the two-tile passes. Scales that are not float16 values
    stay float32."""
    lib = kernels.compiled(build)
    for m, n, k, group in [(1, 8, 32, 32), (3, 13, 96, 32), (5, 40, 256, 128), (67, 24, 512, 64), (2, 72, 576, 32)]:
        q, scale, zero = random_int4(n, k, group, seed=m)
        scale, offset = scale.half().float(), (zero - 8 * scale).half().float()
        g = torch.Generator().manual_seed(m)
        q8, s8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g), torch.rand(n, k // group, generator=g)
        s8 = s8.half().float()
        int4, int8 = kernels.tile_int4(q, scale, offset), kernels.tile_int8(q8, s8)
        assert int4[1].dtype == int8[1].dtype == torch.float16
        wide4, wide8 = (int4[0], int4[1].float()), (int8[0], int8[1].float())
        x = torch.randn(m, k, generator=g) * 3
        x_int = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        for a, b in zip(products(lib, x, x_int, int4, int8, n, k, group),
                        products(lib, x, x_int, wide4, wide8, n, k, group)):
            assert torch.equal(a, b), (build, m, n, k, group)
    q, scale, zero = random_int4(8, 64, 32)
    assert kernels.tile_int4(q, scale, zero)[1].dtype == torch.float32       # not float16 values: kept exact


def random_int4(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    zero = torch.randn(n, k // group, generator=g) * 0.05
    return q, scale, zero


def int4_tiles(q, scale, zero):
    return kernels.tile_int4(q, scale, (zero.double() - 8 * scale.double()).float())


def test_tiles_hold_the_weights():
    """tile_int4 / tile_int8 (8 rows a tile, the last one padded) and their inverses, on row counts around 8."""
    for n in (1, 8, 13, 24):
        q, scale, zero = random_int4(n, 96, 32, seed=n)
        offset = zero - 8 * scale
        back = kernels.untile_int4(*kernels.tile_int4(q, scale, offset), n)
        assert torch.equal(back[0], q) and torch.equal(back[1], scale) and torch.equal(back[2], offset)
        q8 = torch.randint(-128, 128, (n, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
        s8 = torch.rand(n, 2)
        want = (q8.float().view(n, 2, 32) * s8[..., None]).view(n, 64)
        assert torch.equal(kernels.int8_dequantize(*kernels.tile_int8(q8, s8), n), want)
        assert torch.equal(kernels.int8_rows(*kernels.tile_int8(q8, s8), torch.tensor([n - 1, 0])), want[[n - 1, 0]])


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 33, 70])
@pytest.mark.parametrize("n,k,group", [(64, 64, 32), (36, 576, 32), (20, 512, 64), (12, 384, 128), (8, 256, 256),
                                       (10, 96, 96)])
def test_int4_mm_is_dequantize_then_matmul(m, n, k, group):
    q, scale, zero = random_int4(n, k, group, seed=m)
    w = ((q.double().view(n, k // group, group) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    x[0, :7] = torch.tensor([0.0, 1e-6, -50.0, 2.5, 0.0, -1e-9, 7.0])         # outliers and tiny values
    y = kernels.int4_mm(x, *int4_tiles(q, scale, zero), n, group)
    ref = x.double() @ w.t()
    assert ((y.double() - ref).abs() <= activation_bound(x, w.float())).all()


def test_int4_packing_is_ggufs_nibble_order():
    """pack_int4 of the values int4_groups reads from a Q4_0 / Q4_1 tensor is the file's own qs bytes."""
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    for qtype, head in ((T.Q4_0, 2), (T.Q4_1, 4)):
        data = gguf_quantize(w, qtype)
        q, _, _ = int4_groups(GGUFTensor(qtype, data, (8, 128)))
        qs = data.reshape(8, 4, -1)[..., head:].reshape(8, 64)
        assert np.array_equal(kernels.pack_int4(q).numpy(), qs)
        assert torch.equal(kernels.unpack_int4(kernels.pack_int4(q)), q)


@pytest.mark.parametrize("m", [1, 4, 7, 70])
@pytest.mark.parametrize("n,group", [(24, 32), (21, 160), (5, 320)])
def test_int8_mm_is_dequantize_then_matmul(m, n, group):
    k = 320
    g = torch.Generator().manual_seed(m)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.01
    w = (q.double().view(n, k // group, group) * scale.double()[..., None]).view(n, k)
    x = torch.randn(m, k, generator=g)
    y = kernels.int8_mm(x, *kernels.tile_int8(q, scale), n, group)
    assert ((y.double() - x.double() @ w.t()).abs() <= activation_bound(x, w.float())).all()


@pytest.mark.parametrize("build", [b for b in kernels.BUILDS if b == "avx2" or kernels.best_build() == "vnni"])
def test_int8_mm_on_int8_activations_is_integer_math(build):
    """W8A8's path: int8 activations are used as they are: every 32-column block's sum is exact, -128 x -128
    included (where vpmaddubsw's int16 pairs would saturate), the sum over blocks is float32 (48 roundings
    here); in each build, on row counts around the 4-row passes. And float activations go the same way."""
    lib = kernels.compiled(build)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (40, 1536), generator=g, dtype=torch.int8)
    q[:3] = torch.tensor([-128, 127, -128], dtype=torch.int8)[:, None]
    for m in (1, 3, 5, 8):
        xq = torch.randint(-128, 128, (m, 1536), generator=g, dtype=torch.int8)
        xq[0] = -128
        xq[-1] = 127
        scale = torch.rand(40, 1, generator=g)
        y = kernels.int8_mm(xq, *kernels.tile_int8(q, scale), 40, 1536, lib=lib)
        exact = (xq.long() @ q.long().t()).double() * scale.double().t()
        magnitude = (xq.long().abs() @ q.long().abs().t()).double() * scale.double().t()
        assert ((y.double() - exact).abs() <= 48 * 2 ** -24 * magnitude).all(), (build, m)
        # float activations that are integers in [-127, 127], a 127 in every block: rounded to themselves (block
        # scale 1), so the float route (the AVX2 build's vpsignb / vpmaddubsw one) gives the integer route's results
        xf = xq.clamp(min=-127).float()
        xf[:, ::32] = 127
        assert torch.equal(kernels.int8_mm(xf, *kernels.tile_int8(q, scale), 40, 1536, lib=lib),
                           kernels.int8_mm(xf.to(torch.int8), *kernels.tile_int8(q, scale), 40, 1536, lib=lib))


def test_q8_0_comes_back_exactly_as_int8_groups():
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    data = gguf_quantize(w, T.Q8_0)                         # blocks: f16 d, 32 int8
    q, scale = quantize_per_group(torch.from_numpy(gguf_dequantize(data, T.Q8_0)), 32)
    blocks = data.reshape(16, 8, 34)
    assert np.array_equal(q.numpy().reshape(16, 8, 32), blocks[..., 2:].view(np.int8))
    assert np.array_equal(scale.numpy(), blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))


@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((8, 8), 128), ((4, 1), 256), ((16, 1), 32)])
@pytest.mark.parametrize("seq_lens,window", [([1], None), ([37], None), ([1, 16, 17, 300], None),
                                             ([70, 64, 5], 16), ([130], 100),
                                             ([513, 3], None), ([1300, 40, 4700], None), ([2100], 1500)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_decode_matches_reference(heads, head_dim, seq_lens, window, cache_dtype):
    """float16 pages: the new rows are stored rounded as .to(torch.float16) does (the same bits), and read
    back widened, so the reference over the same pages is as close as over float32 ones."""
    q, k, v, kc, vc, meta = random_paged_case([1] * len(seq_lens), seq_lens, *heads, head_dim, torch.float32,
                                              block_size=16, spare_blocks=3, seed=len(seq_lens))
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    meta_ref = dataclasses.replace(meta, sliding_window=window)
    ref = ReferenceBackend().forward(q, k, v, kc_ref, vc_ref, meta_ref, head_dim ** -0.5)
    starts = torch.tensor([0 if window is None else max(0, n - window) for n in seq_lens], dtype=torch.int32)
    if window is not None:      # entries before each window are never read: poison them
        for b, s in enumerate(starts.tolist()):
            meta.block_tables[b, :s // 16] = -1
    out = kernels.paged_decode(q, k, v, meta.slot_mapping, kc, vc, meta.block_tables.contiguous(),
                               meta.seq_lens.to(torch.int32), starts, head_dim ** -0.5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)        # the new rows were written, and only they
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_paged_decode_rows_do_not_depend_on_the_batch():
    """Long contexts are cut into chunks by their own length only, so a row's output is the same bits alone
    and in any batch, with any number of threads."""
    lens = [1300, 40, 700, 5000, 513]
    q, k, v, kc, vc, meta = random_paged_case([1] * len(lens), lens, 9, 3, 64, torch.float32, block_size=16,
                                              spare_blocks=2, seed=5)
    tables, seq = meta.block_tables.contiguous(), meta.seq_lens.to(torch.int32)
    starts = torch.zeros(len(lens), dtype=torch.int32)
    together = kernels.paged_decode(q, k, v, meta.slot_mapping, kc, vc, tables, seq, starts, 0.125)
    threads = torch.get_num_threads()
    for b in range(len(lens)):
        torch.set_num_threads(1 + b % 2)
        try:
            alone = kernels.paged_decode(q[b:b + 1], k[b:b + 1], v[b:b + 1], meta.slot_mapping[b:b + 1], kc, vc,
                                         tables[b:b + 1], seq[b:b + 1], starts[b:b + 1], 0.125)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(alone[0], together[b]), b


def test_paged_decode_skips_slot_minus_one():
    q, k, v, kc, vc, meta = random_paged_case([1, 1], [20, 9], 4, 2, 64, torch.float32, block_size=16,
                                              spare_blocks=1, seed=3)
    before = kc.clone()
    slots = torch.tensor([-1, -1])
    kernels.paged_decode(q, k, v, slots, kc, vc, meta.block_tables.contiguous(), meta.seq_lens.to(torch.int32),
                         torch.zeros(2, dtype=torch.int32), 0.125)
    assert torch.equal(kc, before)


def test_rms_norm_rope_gated_match_pytorch():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 576, generator=g) * 4, torch.randn(576, generator=g)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    qkv = torch.randn(3, 15 * 64, generator=g)
    qk = qkv[:, :12 * 64].view(3, 12, 64)                            # a strided view, as the model passes it
    cos, sin = torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 32, generator=g)
    x1, x2 = qk.chunk(2, dim=-1)
    torch.testing.assert_close(apply_rope(qk, cos, sin), torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1))
    gate_up = torch.randn(4, 2 * 1536, generator=g) * 8
    gate_up[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-8, -90.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.gated(gate_up, "silu"), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.gated(gate_up, "gelu_tanh"), F.gelu(gate, approximate="tanh") * up,
                               rtol=1e-5, atol=1e-5)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0, -30.0, 30.0, 0.0, -0.0])
    torch.testing.assert_close(kernels.gated(torch.cat([special, torch.ones(8)])[None], "gelu_tanh")[0],
                               F.gelu(special, approximate="tanh"), equal_nan=True)


def test_shapes_the_kernels_do_not_take_fall_back():
    assert kernels.rms_norm(torch.randn(2, 12), torch.ones(12), 1e-5) is None                 # K % 8
    assert kernels.rms_norm(torch.randn(2, 16, dtype=torch.bfloat16), torch.ones(16), 1e-5) is None
    assert kernels.gated(torch.randn(2, 20), "silu") is None
    assert not kernels.paged_decode_fits(4, torch.float32, torch.zeros(2, 16, 2, 60))       # D % 8
    assert not kernels.paged_decode_fits(4, torch.bfloat16, torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16))
    assert not kernels.paged_decode_fits(34, torch.float32, torch.zeros(2, 16, 2, 64))      # group > MAX_GROUP


def test_kernel_rows_do_not_depend_on_the_batch():
    """Every row is computed the same way whatever the others (and however many there are): a sequence's
    decode output does not change with the batch it runs in, int4 and int8 alike."""
    from tokenmill.quant.int4 import NativeInt4Kernel
    from tokenmill.quant.int8 import Int8WeightKernel
    q, scale, zero = random_int4(100, 576, 32)
    x = torch.randn(133, 576, generator=torch.Generator().manual_seed(1))
    for kernel in (NativeInt4Kernel(q, scale, zero, 32), Int8WeightKernel(*quantize_per_group(torch.randn(100, 576)))):
        alone = torch.cat([kernel(x[i:i + 1]) for i in range(len(x))])
        for m in (2, 3, 5, 17, 64, 65, 133):
            assert torch.equal(kernel(x[:m]), alone[:m])


def test_int4_kernel_act_order():
    """GPTQ act-order (a column permutation) on the kernel, and the weights unpacked from its own bytes."""
    from tokenmill.quant.int4 import NativeInt4Kernel, dequantize_int4
    n, k, group = 40, 256, 64
    q, scale, zero = random_int4(n, k, group, seed=2)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    kernel = NativeInt4Kernel(q, scale, zero, group, perm=perm)
    w = dequantize_int4(q, scale, zero, group)                      # the weights of the permuted columns
    torch.testing.assert_close(kernel.dense_weight(), w, rtol=0, atol=1e-6)
    for m in (3, 69):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = x[:, perm].double() @ w.double().t()
        assert ((kernel(x).double() - ref).abs() <= activation_bound(x[:, perm], w)).all()


def test_arguments_the_c_code_cannot_take_are_refused():
    q, so = kernels.tile_int4(torch.zeros(8, 64, dtype=torch.uint8), torch.zeros(8, 2), torch.zeros(8, 2))
    with pytest.raises(ValueError, match="int4_mm"):
        kernels.int4_mm(torch.zeros(1, 64, dtype=torch.bfloat16), q, so, 8, 32)
    with pytest.raises(ValueError, match="int4_mm"):
        kernels.int4_mm(torch.zeros(1, 96), q, so, 8, 32)                    # K does not match the weights
    with pytest.raises(ValueError, match="int4_mm"):
        kernels.int4_mm(torch.zeros(1, 64), q, so, 9, 32)                    # more rows than the tiles hold
    with pytest.raises(ValueError, match="int4_mm"):
        kernels.int4_mm(torch.zeros(1, 64), q, so, 8, 64)                    # group does not match the scales
    with pytest.raises(ValueError, match="int8_mm"):                         # rows, not tiles
        kernels.int8_mm(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.zeros(8, 1), 8, 64)


def test_dequantize_is_the_kernels_weights():
    q, scale, zero = random_int4(21, 320, 64, seed=5)
    offset = (zero.double() - 8 * scale.double()).float()
    expected = (q.float().view(21, 5, 64) * scale[..., None] + offset[..., None]).view(21, 320)
    assert torch.equal(kernels.int4_dequantize(*kernels.tile_int4(q, scale, offset), 21, 64), expected)


def test_more_arguments_the_c_code_cannot_take_are_refused():
    q, k, v, kc, vc, meta = random_paged_case([1], [20], 4, 2, 64, torch.float32, block_size=16, seed=0)
    args = (meta.slot_mapping, kc, vc, meta.block_tables.contiguous(), meta.seq_lens.to(torch.int32),
            torch.zeros(1, dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match="paged_decode"):       # a cache whose head dim is not q's
        kernels.paged_decode(q, k, v, args[0], kc[..., :8].contiguous(), vc[..., :8].contiguous(), *args[3:])
    with pytest.raises(ValueError, match="paged_decode"):       # a bfloat16 value cache
        kernels.paged_decode(q, k, v, args[0], kc, vc.bfloat16(), *args[3:])
    with pytest.raises(ValueError, match="paged_decode"):       # float32 keys, float16 values
        kernels.paged_decode(q, k, v, args[0], kc, vc.half(), *args[3:])
    with pytest.raises(ValueError, match="rms_norm"):
        kernels.rms_norm(torch.randn(2, 64), torch.ones(8), 1e-5)
    from tokenmill.quant.int4 import NativeInt4Kernel
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        NativeInt4Kernel(*random_int4(8, 576, 32)[:1], torch.rand(8, 5), torch.rand(8, 5), 128)


def test_nan_and_inf_activations_give_nan():
    """A non-finite activation makes its products NaN (as float math would), never a finite number."""
    q8 = torch.randint(-127, 128, (4, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    int8 = kernels.tile_int8(q8, torch.rand(4, 2))
    int4 = int4_tiles(*random_int4(4, 64, 32))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 64)
        x[0, 5] = bad
        for y in (kernels.int8_mm(x, *int8, 4, 32), kernels.int4_mm(x, *int4, 4, 32)):
            assert y[0].isnan().all() and y[1].isfinite().all()


@pytest.mark.parametrize("build", [b for b in kernels.BUILDS if b == "avx2" or kernels.best_build() == "vnni"])
def test_blocks_too_small_to_scale_round_to_zero(build):
    """A block whose largest value is below ~3.7e-37 (127 / max overflows) rounds to zeros, as an all-zero block
    does, so its products stay within its own magnitude, in each build (not -128 everywhere)."""
    lib = kernels.compiled(build)
    g = torch.Generator().manual_seed(0)
    q8 = torch.randint(-128, 128, (8, 64), dtype=torch.int8, generator=g)
    scale = torch.rand(8, 2, generator=g)
    int4 = int4_tiles(*random_int4(8, 64, 32))
    x = torch.randn(2, 64, generator=g)
    x[0] = torch.randn(64, generator=g) * 1e-38
    for y, w in ((kernels.int8_mm(x, *kernels.tile_int8(q8, scale), 8, 32, lib=lib),
                  (q8.float().view(8, 2, 32) * scale[..., None]).view(8, 64)),
                 (kernels.int4_mm(x, *int4, 8, 32, lib=lib), kernels.int4_dequantize(*int4, 8, 32))):
        assert (y[0].abs() <= x[0].abs() @ w.abs().t()).all(), build
        assert ((y[1].double() - x[1].double() @ w.double().t()).abs() <= activation_bound(x[1:], w)[0]).all()


@pytest.mark.parametrize("vocab", [1, 7, 8, 49152, 262147])
def test_argmax_is_torch_argmax(vocab):
    """The first largest index, NaN counting as the largest, on ties, infinities, signed zeros and tails."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[1] = -float("inf")
    x[2, vocab // 2:] = float("nan")
    x[3, vocab - 1] = float("inf")
    x[4] = 0.0
    x[4, vocab // 3] = -0.0
    x[5, ::3] = 7.0                                    # ties: the lowest id wins
    x[6, -1] = float("nan")
    x[7] = x[7].round()
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))
    big = torch.randn(64, 4096, generator=g)             # rows split between threads
    assert torch.equal(kernels.argmax(big), big.argmax(dim=-1))
    strided = big[:, ::2]                                # not contiguous: copied first
    assert torch.equal(kernels.argmax(strided), strided.argmax(dim=-1))
