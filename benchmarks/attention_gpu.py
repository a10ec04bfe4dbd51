"""GPU check and timing of the Triton attention kernels, in one device call (< 8 minutes on an H100).

  PYTHONPATH=. python benchmarks/attention_gpu.py            # on a CUDA machine
  PYTHONPATH=. python benchmarks/attention_gpu.py --quick    # every check, fewer timed sizes
  TRITON_INTERPRET=1 python benchmarks/attention_gpu.py --smoke   # tiny sizes on the CPU

1. correctness: every kernel (store, prefill / chunked prefill, decode) against attention/reference.py
   on the device, fp16 and bf16, GQA 1/3/7, head dims 64/128;
2. prefill TFLOP/s, causal, bf16, N = 1k ... 16k, head dims 64 / 128, against
   torch.nn.functional.scaled_dot_product_attention (FlashAttention-2 inside), same shapes;
3. decode bandwidth (GB/s of K/V read) for batch 1 ... 256 and context 1k ... 32k, against the
   device's measured copy bandwidth.
Targets on an H100: prefill >= 0.8x SDPA, decode >= 70 % of copy bandwidth.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention.testing import random_paged_case  # noqa: E402
from tokenmill.attention.reference import ReferenceBackend  # noqa: E402
from tokenmill.attention.triton_backend import TileConfig, TritonBackend, default_tiles  # noqa: E402

PAGE = 16


def paged(query_lens, seq_lens, hq, hkv, d, dtype, device, seed=0):
    return random_paged_case(query_lens, seq_lens, hq, hkv, d, dtype, device, block_size=PAGE, seed=seed)


def time_ms(fn, iters: int) -> float:
    if not torch.cuda.is_available():
        import time
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters * 1000
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check(device, smoke: bool) -> None:
    print("## correctness against attention/reference.py")
    print("| case | dtype | heads (q/kv) | head_dim | max abs err | ok |")
    print("|---|---|---|---|---|---|")
    cases = {"prefill": ([1, 16, 33], [1, 16, 33]), "chunked": ([5, 16, 17], [21, 48, 40]),
             "decode": ([1, 1, 1, 1], [1, 16, 17, 300])}
    if not smoke:       # long enough for the device's own tiles: several query and key tiles, many splits
        cases.update({"prefill long": ([517, 1000], [517, 1000]), "chunked long": ([300, 129], [1800, 700]),
                      "decode long": ([1] * 3, [2000, 5003, 64])})
    for dtype in (torch.float16, torch.bfloat16):
        for hq, hkv in ((4, 4), (9, 3), (7, 1)):
            for d in ((64,) if smoke else (64, 128)):
                for name, (ql, sl) in cases.items():
                    q, k, v, kc, vc, meta = paged(ql, sl, hq, hkv, d, dtype, device)
                    ref = ReferenceBackend().forward(q.cpu(), k.cpu(), v.cpu(), kc.cpu().clone(), vc.cpu().clone(),
                                                     meta.to("cpu"), d ** -0.5)
                    row = f"| {name} | {str(dtype)[6:]} | {hq}/{hkv} | {d} |"
                    try:
                        out = TritonBackend(decode_split_len=64 if smoke else None).forward(q, k, v, kc, vc, meta,
                                                                                            d ** -0.5)
                    except Exception as e:      # a kernel that fails to build or run is a row, not the end
                        print(f"{row} failed: {type(e).__name__}: {str(e)[:160]} | NO |", flush=True)
                        continue
                    err = (out.cpu().float() - ref.float()).abs().max().item()
                    tol = 2e-3 if dtype == torch.float16 else 2e-2
                    print(f"{row} {err:.2e} | {'yes' if err < tol else 'NO'} |", flush=True)


PREFILL_TILES = {64: [TileConfig(128, 64, 4, 3), TileConfig(128, 64, 8, 3), TileConfig(128, 32, 4, 3),
                      TileConfig(64, 64, 4, 3)],
                 128: [TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 32, 8, 2),
                       TileConfig(64, 64, 4, 3)]}


def prefill(device, smoke: bool, quick: bool = False) -> None:
    """Whole-prompt causal prefill of one sequence through the paged cache (the K/V store included)
    against SDPA restricted to FlashAttention-2 on contiguous K/V already expanded to 32 heads."""
    hq, hkv = (4, 2) if smoke else (32, 8)
    dtype = torch.bfloat16 if not smoke else torch.float32
    for d in (64,) if smoke else (64, 128):
        configs = [default_tiles(d, dtype, device)] if smoke else PREFILL_TILES[d]
        print(f"\n## prefill, causal, {str(dtype)[6:]}, head_dim {d}, {hq} query / {hkv} KV heads: TFLOP/s")
        print("| N | SDPA (FA2) | " + " | ".join(f"triton {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
                                               for c in configs) + " | best / SDPA |")
        print("|---|---|" + "---|" * (len(configs) + 1))
        for n in ((64,) if smoke else (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)):
            q, k, v, kc, vc, meta = paged([n], [n], hq, hkv, d, dtype, device)
            flops = 4 * n * n * d * hq / 2          # causal: half of QK^T and of PV
            iters = 1 if smoke else 10
            qs = q.transpose(0, 1)[None]
            ks = k.repeat_interleave(hq // hkv, 1).transpose(0, 1)[None]
            vs = v.repeat_interleave(hq // hkv, 1).transpose(0, 1)[None]
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    ref = time_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), iters)
            else:
                ref = time_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), iters)
            tflops = []
            for c in configs:
                backend = TritonBackend(tiles=c)
                try:
                    tflops.append(flops / time_ms(lambda: backend.forward(q, k, v, kc, vc, meta, d ** -0.5), iters) / 1e9)
                except Exception as e:      # e.g. a tile that needs more shared memory than the device has
                    print(f"triton {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    tflops.append(float("nan"))
            sdpa = flops / ref / 1e9
            best = max((t for t in tflops if t == t), default=float("nan"))
            print(f"| {n} | {sdpa:.1f} | " + " | ".join(f"{t:.1f}" for t in tflops)
                  + f" | {best / sdpa:.2f} |", flush=True)


def decode(device, smoke: bool, quick: bool = False) -> None:
    print("\n## decode bandwidth, bf16 (32 query heads, 8 KV heads, head_dim 128)")
    hq, hkv, d = (4, 2, 64) if smoke else (32, 8, 128)
    dtype = torch.bfloat16 if not smoke else torch.float32
    if torch.cuda.is_available():
        buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(buf)
        copy_gbs = 2 * buf.numel() / time_ms(lambda: dst.copy_(buf), 20) / 1e6
        del buf, dst
    else:
        copy_gbs = float("nan")
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)\n")
    print("| batch | context | triton GB/s | % of copy |")
    print("|---|---|---|---|")
    backend = TritonBackend()
    for batch in ((2,) if smoke else (1, 64, 256) if quick else (1, 16, 64, 256)):
        for ctx in ((40,) if smoke else (1024, 8192, 32768) if quick else (1024, 4096, 16384, 32768)):
            if batch * ctx > 2 ** 21:       # keep the cache under ~8 GiB
                continue
            q, k, v, kc, vc, meta = paged([1] * batch, [ctx] * batch, hq, hkv, d, dtype, device)
            ms = time_ms(lambda: backend.forward(q, k, v, kc, vc, meta, d ** -0.5), 1 if smoke else 20)
            kv_bytes = 2 * batch * ctx * hkv * d * kc.element_size()
            gbs = kv_bytes / ms / 1e6
            print(f"| {batch} | {ctx} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (for TRITON_INTERPRET=1 on a CPU)")
    ap.add_argument("--quick", action="store_true", help="every correctness case, fewer timed sizes")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"torch {torch.__version__}")
    check(device, args.smoke)
    prefill(device, args.smoke, args.quick)
    decode(device, args.smoke, args.quick)


if __name__ == "__main__":
    main()
