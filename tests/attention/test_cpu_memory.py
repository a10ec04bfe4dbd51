"""The CPU backend's prefill never allocates an N x N score matrix: an 8k-token prompt, whole or in
2k chunks after cached context, peaks far below one [heads, N, N] float32 matrix (2.3 GiB here)."""
import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys, torch
from tokenmill.attention import AttentionMetadata, get_backend
n, chunk, page = 8192, int(sys.argv[1]), 16
hq, hkv, d = 9, 3, 64
pages = n // page
k_cache = torch.randn(pages, page, hkv, d)
v_cache = torch.randn(pages, page, hkv, d)
table = torch.arange(pages, dtype=torch.int32)[None]
q = torch.randn(chunk, hq, d)
k = torch.randn(chunk, hkv, d)
v = torch.randn(chunk, hkv, d)
meta = AttentionMetadata(torch.arange(n - chunk, n), torch.tensor([0, chunk], dtype=torch.int32),
                         torch.tensor([n], dtype=torch.int32), table, [chunk], [n])
backend = get_backend("torch")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
backend.forward(q, k, v, k_cache, v_cache, meta, d ** -0.5)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
"""


@pytest.mark.parametrize("chunk", [8192, 2048])
def test_8k_prefill_peak_memory_is_linear(chunk):
    out = subprocess.run([sys.executable, "-c", CHILD, str(chunk)], capture_output=True, text=True, check=True)
    peak_mib = json.loads(out.stdout.strip().splitlines()[-1])
    n_by_n_mib = 9 * 8192 * 8192 * 4 / 2 ** 20
    assert peak_mib < n_by_n_mib / 8, f"peak {peak_mib:.0f} MiB: an N x N matrix ({n_by_n_mib:.0f} MiB) was allocated"
