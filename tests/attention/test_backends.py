"""Every attention backend against attention/reference.py on fresh random paged inputs:
prefill, chunked prefill after cached context, decode, mixed batches; GQA 1/3/7; head dims 64/128;
sliding windows, with the table entries of released pages set to -1 or to poisoned pages.
The Triton kernels run through the interpreter (tests/attention/conftest.py)."""
import contextlib
import dataclasses
import importlib.util
from unittest import mock

import pytest
import torch

from tokenmill import kernels
from tokenmill.attention import AttentionMetadata, get_backend
from tokenmill.attention.base import first_page
from tokenmill.attention.reference import ReferenceBackend
from tokenmill.attention.testing import random_paged_case

HAVE_TRITON = importlib.util.find_spec("triton") is not None
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed"))

pytestmark = pytest.mark.usefixtures("triton_interpreter")


PAGE = 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Random q/k/v for the new tokens, a cache already holding the earlier context, shuffled pages."""
    return random_paged_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, block_size=PAGE,
                             spare_blocks=3, seed=seed)


# the CPU backend with tokenmill's decode kernel off (kernels/cpu.c): decode rows on ATen's flash kernel too,
# as on a CPU without AVX2 or for half-precision caches
CPU_ATEN = "cpu-aten"


def run_both(backend_name, case):
    q, k, v, kc, vc, meta = case
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = ReferenceBackend().forward(q, k, v, kc_ref, vc_ref, meta, scale)
    aten_only = backend_name == CPU_ATEN
    with mock.patch.object(kernels, "paged_decode_fits", lambda *a: False) if aten_only else contextlib.nullcontext():
        out = get_backend("cpu" if aten_only else backend_name).forward(q, k, v, kc, vc, meta, scale)
    for cache, cache_ref in ((kc, kc_ref), (vc, vc_ref)):            # the new K/V land in the same slots
        torch.testing.assert_close(cache, cache_ref, rtol=0, atol=0, equal_nan=True)   # (poisoned pages: NaN)
    return out.float(), ref.float()


CASES = {   # (query lens, context lens after the step)
    "prefill": ([1, 16, 33], [1, 16, 33]),                  # odd, on and across page boundaries
    "chunked": ([5, 16, 17], [21, 48, 40]),                 # chunks after cached context / prefix hits
    "decode": ([1, 1, 1, 1], [1, 16, 17, 70]),             # uneven contexts (the CPU path does not pad)
    "decode_even": ([1, 1, 1], [60, 64, 51]),               # similar contexts (the CPU path pads, masks)
    "decode_one": ([1], [37]),
    "mixed": ([1, 9, 1], [31, 9, 64]),
}


@pytest.mark.parametrize("backend", ["torch", "cpu", CPU_ATEN, TRITON])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (7, 1)])       # GQA ratios 1, 3, 7
def test_matches_reference_fp32(backend, case, heads):
    out, ref = run_both(backend, make_case(*CASES[case], *heads, 64, torch.float32))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["chunked", "decode", "mixed"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_half_precision(backend, dtype, case, head_dim):
    out, ref = run_both(backend, make_case(*CASES[case], 6, 2, head_dim, dtype))
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "cpu", CPU_ATEN, TRITON])
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["prefill", "chunked", "decode", "mixed"])
def test_float32_queries_over_narrower_pages(backend, cache_dtype, case):
    """kv_cache_dtype narrower than the activations: the new rows are stored rounded (the same bits as the
    reference stores), every page is read widened, so the backends stay as close as over float32 pages."""
    q, k, v, kc, vc, meta = make_case(*CASES[case], 9, 3, 64, torch.float32)
    out, ref = run_both(backend, (q, k, v, kc.to(cache_dtype), vc.to(cache_dtype), meta))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("split_len", [48, 64])
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_decode_split_across_many_pages(split_len):
    # many splits, partial results merged by their log-sum-exp; 48 is not a multiple of the key tile
    from tokenmill.attention.triton_backend import TritonBackend
    q, k, v, kc, vc, meta = make_case([1, 1], [300, 45], 8, 2, 64, torch.float32)
    scale = 0.125
    ref = ReferenceBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, scale)
    out = TritonBackend(decode_split_len=split_len).forward(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_prefill_tiles_larger_than_pages():
    # key tiles of 64 span four 16-token pages; query tiles of 32 start mid-page
    from tokenmill.attention.triton_backend import TileConfig, TritonBackend
    q, k, v, kc, vc, meta = make_case([70, 37], [70, 130], 6, 2, 64, torch.float32)
    ref = ReferenceBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.125)
    out = TritonBackend(TileConfig(block_m=32, block_n=64)).forward(q, k, v, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ---- sliding window: a query at position p sees positions max(0, p - W + 1) .. p ----------------------------

GQA, MQA = (4, 2), (3, 1)
WINDOW_CASES = {   # (query lens, context lens after the step, window W, (query heads, KV heads), released entries)
    # released: "-1" the table entries before the window are -1; "poison" they point at poisoned pages
    "prefill": ([33, 20, 1], [33, 20, 1], 5, GQA, "-1"),            # W < page, not a multiple of it
    "prefill_page": ([40], [40], 16, MQA, "-1"),                     # W = page
    "chunked": ([5, 17, 16], [40, 50, 70], 20, GQA, "poison"),       # chunks whose windows start on later pages
    "decode": ([1, 1, 1, 1], [1, 16, 37, 70], 16, MQA, "-1"),        # uneven (the CPU path attends one by one);
    #                                                                  W = one context, > another
    "decode_even": ([1, 1, 1], [60, 64, 51], 35, GQA, "poison"),     # the CPU path pads: heads and tails masked
    "mixed": ([1, 9, 1, 4], [31, 9, 64, 50], 24, MQA, "poison"),     # prefill chunks and decode rows in one batch
    "mixed_gqa": ([4, 1, 1, 12], [50, 64, 20, 60], 19, GQA, "-1"),
    "one": ([7, 1], [30, 30], 1, GQA, "poison"),                     # each query sees itself only
    "equal_larger": ([10, 1, 1], [40, 40, 20], 40, MQA, "-1"),       # W = two contexts, > the third: no effect
}


def window_case(name: str, head_dim: int = 32, dtype: torch.dtype = torch.float32):
    """WINDOW_CASES[name] as inputs, its released entries -1 or pointing at poisoned pages."""
    query_lens, seq_lens, window, heads, released = WINDOW_CASES[name]
    case, _ = windowed(make_case(query_lens, seq_lens, *heads, head_dim, dtype), window)
    return poisoned(case) if released == "poison" else case


def windowed(case, window: int):
    """`case` under a sliding window, the table entries the engine may release set to -1; returns it
    and the table as it was, to read the whole context through."""
    q, k, v, kc, vc, meta = case
    tables = meta.block_tables.clone()
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        tables[b, :first_page(slen, qlen, window, kc.shape[1])] = -1
    return (q, k, v, kc, vc, dataclasses.replace(meta, block_tables=tables, sliding_window=window)), meta.block_tables


def poisoned(case):
    """`case` (from `windowed`) with its released entries pointing at the cache pages no sequence uses,
    now poisoned: values NaN, so that any read of them, even one weighted 0 by a mask, turns the output
    NaN (assert_close fails on NaN); keys NaN or huge (a score of inf, were one let through unmasked)."""
    q, k, v, kc, vc, meta = case
    tables = meta.block_tables.clone()
    spare = sorted(set(range(kc.shape[0])) - set(tables[tables >= 0].tolist()))
    for i, page in enumerate(spare):
        kc[page] = float("nan") if i % 2 == 0 else torch.finfo(kc.dtype).max
        vc[page] = float("nan")
    released = (tables == -1).nonzero().tolist()
    assert released, "no released entries: the case would test nothing"
    for i, (b, j) in enumerate(released):
        tables[b, j] = spare[i % len(spare)]
    return q, k, v, kc, vc, dataclasses.replace(meta, block_tables=tables)


@pytest.fixture
def small_window_tiles(monkeypatch):
    # a few queries per masked call, so the small cases run several query tiles through the CPU backends
    from tokenmill.attention import cpu_tiled, torch_sdpa
    monkeypatch.setattr(cpu_tiled, "WINDOW_TILE", 8)
    monkeypatch.setattr(torch_sdpa, "WINDOW_TILE", 8)


def explicit_window_attention(q, k_ctx, v_ctx, first_pos: int, window: int, scale: float) -> torch.Tensor:
    """From the definition, in float64: query i (position p = first_pos + i), head h takes the softmax of
    q_i . k_j * scale over the keys j <= p with p - j < W of KV head h // group, and averages their v_j."""
    lq, hq, _ = q.shape
    kv_head = torch.arange(hq) // (hq // k_ctx.shape[1])                           # [Hq]
    out = torch.empty(lq, hq, q.shape[2], dtype=torch.float64)
    for i in range(lq):
        p = first_pos + i
        visible = [j for j in range(k_ctx.shape[0]) if j <= p and p - j < window]
        keys = k_ctx[visible][:, kv_head].double()                                 # [n, Hq, D]
        values = v_ctx[visible][:, kv_head].double()
        scores = torch.einsum("hd,nhd->hn", q[i].double(), keys) * scale            # [Hq, n]
        weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        out[i] = torch.einsum("hn,nhd->hd", weights, values) / weights.sum(dim=1, keepdim=True)
    return out


@pytest.mark.parametrize("case", ["prefill", "chunked", "mixed", "one", "equal_larger"])
def test_reference_window_is_the_masked_softmax(case):
    query_lens, seq_lens, window, heads, _ = WINDOW_CASES[case]
    (q, k, v, kc, vc, meta), full_tables = windowed(make_case(query_lens, seq_lens, *heads, 16, torch.float32),
                                                    window)
    scale = 0.25
    out = ReferenceBackend().forward(q, k, v, kc, vc, meta, scale)       # also writes the new K/V into the cache
    start = 0
    for b, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        pages = full_tables[b, :-(-slen // PAGE)].long()
        k_ctx, v_ctx = kc[pages].flatten(0, 1)[:slen], vc[pages].flatten(0, 1)[:slen]     # [slen, Hkv, D]
        expected = explicit_window_attention(q[start:start + qlen], k_ctx, v_ctx, slen - qlen, window, scale)
        torch.testing.assert_close(out[start:start + qlen].double(), expected, atol=1e-5, rtol=1e-5)
        start += qlen


@pytest.mark.usefixtures("small_window_tiles")
@pytest.mark.parametrize("backend", ["torch", "cpu", CPU_ATEN, TRITON])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_matches_reference(backend, case):
    # on the poisoned cases the reference, too, must never read a released entry
    out, ref = run_both(backend, window_case(case))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_window_half_precision(backend):
    out, ref = run_both(backend, window_case("mixed", 64, torch.bfloat16))
    torch.testing.assert_close(out, ref, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_window_chunk_longer_than_a_window_tile(backend):
    # the CPU backends' own query tile (256 rows): a 300-token chunk after cached context runs two of them
    case, _ = windowed(make_case([300, 1], [420, 200], 4, 2, 32, torch.float32), 100)
    out, ref = run_both(backend, poisoned(case))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("tiles", [(32, 16), (16, 64)])
def test_triton_window_tile_shapes(tiles):
    # (32, 16): query tiles longer than key tiles, so under W=7 a row sees nothing in a whole key tile;
    # (16, 64): key tiles span four pages and the window's first key falls mid-tile, mid-page
    from tokenmill.attention.triton_backend import TileConfig, TritonBackend
    case, _ = windowed(make_case([70, 37, 1], [70, 130, 90], 4, 2, 32, torch.float32), 7)
    q, k, v, kc, vc, meta = poisoned(case)
    ref = ReferenceBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.125)
    out = TritonBackend(TileConfig(block_m=tiles[0], block_n=tiles[1])).forward(q, k, v, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_window_decode_splits():
    # splits of 48 keys counted from each sequence's window start (not a multiple of the page or key tile)
    from tokenmill.attention.triton_backend import TritonBackend
    case, _ = windowed(make_case([1, 1, 1], [300, 45, 101], 4, 1, 32, torch.float32), 100)
    q, k, v, kc, vc, meta = poisoned(case)
    ref = ReferenceBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, 0.125)
    out = TritonBackend(decode_split_len=48).forward(q, k, v, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_metadata_carries_the_window():
    meta = AttentionMetadata.build([[3, 1]], [2], [20], PAGE, sliding_window=8)
    assert meta.sliding_window == 8 and meta.to("cpu").sliding_window == 8
    assert AttentionMetadata.build([[3]], [2], [5], PAGE).sliding_window is None
    with pytest.raises(ValueError):
        AttentionMetadata.build([[3]], [2], [5], PAGE, sliding_window=0)
