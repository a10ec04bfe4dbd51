"""The CPU backends' prefill never allocates an N x N score matrix: an 8k-token prompt, whole or in
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
q = torch.randn(chunk, hq, d)
k = torch.randn(chunk, hkv, d)
v = torch.randn(chunk, hkv, d)
meta = AttentionMetadata.build([list(range(pages))], [chunk], [n], page)
backend = get_backend(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
backend.forward(q, k, v, k_cache, v_cache, meta, d ** -0.5)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
"""


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("chunk", [8192, 2048])
def test_8k_prefill_peak_memory_is_linear(chunk, backend):
    out = subprocess.run([sys.executable, "-c", CHILD, str(chunk), backend], capture_output=True, text=True, check=True)
    peak_mib = json.loads(out.stdout.strip().splitlines()[-1])
    n_by_n_mib = 9 * 8192 * 8192 * 4 / 2 ** 20
    assert peak_mib < n_by_n_mib / 8, f"peak {peak_mib:.0f} MiB: an N x N matrix ({n_by_n_mib:.0f} MiB) was allocated"
