"""Every attention backend against attention/reference.py on fresh random paged inputs:
prefill, chunked prefill after cached context, decode, mixed batches; GQA 1/3/7; head dims 64/128.

The Triton kernels run through the interpreter (TRITON_INTERPRET=1) in a subprocess-free way:
the variable is set before triton is first imported by this module."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenmill.attention import AttentionMetadata, get_backend  # noqa: E402
from tokenmill.attention.reference import ReferenceBackend  # noqa: E402

PAGE = 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Random q/k/v for the new tokens, a cache already holding the earlier context, shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    num_seqs = len(seq_lens)
    pages_per_seq = [-(-s // PAGE) for s in seq_lens]
    num_blocks = sum(pages_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, i = [], [], 0
    width = max(pages_per_seq)
    for n in pages_per_seq:
        tables.append(perm[i:i + n] + [0] * (width - n))
        i += n
    shape = (num_blocks, PAGE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    for b, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        slots += [tables[b][p // PAGE] * PAGE + p % PAGE for p in range(sl - ql, sl)]
    t = sum(query_lens)
    q = torch.randn(t, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(t, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(t, num_kv_heads, head_dim, generator=g).to(dtype)
    cu = [0]
    for ql in query_lens:
        cu.append(cu[-1] + ql)
    meta = AttentionMetadata(torch.tensor(slots), torch.tensor(cu, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(tables, dtype=torch.int32),
                             list(query_lens), list(seq_lens))
    return q, k, v, k_cache, v_cache, meta


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
    "decode": ([1, 1, 1, 1], [1, 16, 17, 70]),
    "mixed": ([1, 9, 1], [31, 9, 64]),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (7, 1)])       # GQA ratios 1, 3, 7
def test_matches_reference_fp32(backend, case, heads):
    out, ref = run_both(backend, make_case(*CASES[case], *heads, 64, torch.float32))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["chunked", "decode"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_half_precision(dtype, case, head_dim):
    out, ref = run_both("triton", make_case(*CASES[case], 6, 2, head_dim, dtype))
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_split_across_many_pages():
    # more pages than one split holds: partial results merged by their log-sum-exp
    from tokenmill.attention.triton_backend import TritonBackend
    q, k, v, kc, vc, meta = make_case([1, 1], [300, 45], 4, 2, 64, torch.float32)
    scale = 0.125
    ref = ReferenceBackend().forward(q, k, v, kc.clone(), vc.clone(), meta, scale)
    out = TritonBackend(decode_pages_per_split=4).forward(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
