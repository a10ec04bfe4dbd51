"""Every attention backend against attention/reference.py on fresh random paged inputs:
prefill, chunked prefill after cached context, decode, mixed batches; GQA 1/3/7; head dims 64/128.
The Triton kernels run through the interpreter (tests/attention/conftest.py)."""
import importlib.util

import pytest
import torch

from tokenmill.attention import get_backend
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


def run_both(backend_name, case):
    q, k, v, kc, vc, meta = case
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref = ReferenceBackend().forward(q, k, v, kc_ref, vc_ref, meta, scale)
    out = get_backend(backend_name).forward(q, k, v, kc, vc, meta, scale)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)        # the new K/V land in the same slots
    return out.float(), ref.float()


CASES = {   # (query lens, context lens after the step)
    "prefill": ([1, 16, 33], [1, 16, 33]),                  # odd, on and across page boundaries
    "chunked": ([5, 16, 17], [21, 48, 40]),                 # chunks after cached context / prefix hits
    "decode": ([1, 1, 1, 1], [1, 16, 17, 70]),             # uneven contexts (the CPU path does not pad)
    "decode_even": ([1, 1, 1], [60, 64, 51]),               # similar contexts (the CPU path pads, masks)
    "decode_one": ([1], [37]),
    "mixed": ([1, 9, 1], [31, 9, 64]),
}


@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON])
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
