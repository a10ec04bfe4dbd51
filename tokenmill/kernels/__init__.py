"""tokenmill's own kernels. On GPUs: triton_mm.py, the int4 and int8 weight-only products in Triton (imported
by their users, as it needs triton). The rest of this module: the CPU kernels (kernels/cpu.c), for x86-64 CPUs with
AVX2, FMA and F16C:
  - int4 and int8 weight-only products on weights in tiles of 8 rows (tile_int4, tile_int8), unpacked in
    registers; float32 activations rounded per 32 columns to int8 (llama.cpp's Q8 activations), integer sums
    per block, float32 across blocks (int4_mm, int8_mm: any number of rows, ~2x the dense
    float32 product at 64 rows and more, ~4x PyTorch's int4 kernel at batch 1);
  - decode attention straight over the paged KV cache, float32 or float16 pages (paged_decode; F16C widens);
  - RMSNorm, rotate-half rope and SwiGLU / GeGLU in one pass each (rms_norm, rope, gated);
  - the sampler's greedy pick (argmax: torch.argmax's answer, ~7x faster at a 262k vocabulary);
  - a whole stack of Llama decoder layers for the rows of a decode step in one call (DecoderStack): those
    kernels in the model's order, without the Python between them (~40 % of a batch-1 step).

The C file is compiled once per machine with the system C compiler (the one pip uses for packages
that compile) into $TOKENMILL_HOME/kernels, and loaded with ctypes, which releases the GIL while a
kernel runs; its OpenMP threads are PyTorch's (the libgomp already loaded). Where there is no
compiler, no AVX2/FMA/F16C, or TOKENMILL_NATIVE_KERNELS=0, `library()` is None and callers run PyTorch's
path; the helpers that take optional shapes return None for what they do not take. Where the CPU has AVX-512 VNNI
the same source is built a second time with it (BUILDS; `build()` says which runs): the integer products take
one instruction where AVX2 takes three, with the same integer sums, so the same results bit for bit.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger("tokenmill")

SOURCE = Path(__file__).with_name("cpu.c")
# explicit ISA flags, never -march=native: a VM may advertise AVX-512 it then traps (see the Makefile)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
BUILDS = {      # name: flags. The same source twice; "vnni" where the CPU has AVX-512 VNNI (cpu.c's VNNI)
    "avx2": FLAGS,
    "vnni": FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
}
LIBS = ["-lm"]
ENV_SWITCH = "TOKENMILL_NATIVE_KERNELS"     # "0": PyTorch's kernels; "avx2": that build even on a VNNI CPU

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux shows them; empty where it does not."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split()[2:])


def cpu_supports() -> bool:
    """AVX2 with FMA, by PyTorch's own run-time dispatch check (its AVX2 level requires both), and F16C (float16
    KV pages), by the kernel's flags where Linux shows them (every AVX2 CPU made has it: Ivy Bridge and
    Piledriver brought it before AVX2)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    flags = _cpu_flags()
    return not flags or "f16c" in flags


def best_build() -> str:
    """"vnni" where PyTorch runs its AVX-512 kernels here (the OS saves the vector state) and the CPU shows
    AVX-512 VNNI, BW and VL; else "avx2". The loader then runs one VNNI instruction in a child process before
    it trusts the answer."""
    wanted = {"avx512_vnni", "avx512bw", "avx512vl"}
    return "vnni" if torch.backends.cpu.get_cpu_capability() == "AVX512" and wanted <= _cpu_flags() else "avx2"


def _build(target: Path, flags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out), *LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, target)          # atomic: a concurrent process sees the old file or the new one


def _runs(path: Path, build: str) -> bool:
    """Whether this CPU runs `build`'s instructions: tm_isa in a child process (a trap kills the child only)."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(sys.argv[1]).tm_isa())"
    done = subprocess.run([sys.executable, "-S", "-c", code, str(path)], capture_output=True, timeout=60)
    return done.returncode == list(BUILDS).index(build) + 1


def library_path(build: str) -> Path:
    """Where `build`'s library lives: $TOKENMILL_HOME/kernels, named by the source and flags it is built from."""
    from tokenmill.model_files import home
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(BUILDS[build] + LIBS).encode()).hexdigest()[:16]
    return home() / "kernels" / f"cpu-{build}-{key}.so"


def compiled(build: str) -> ctypes.CDLL:
    """`build`'s library (BUILDS), compiled on first use into $TOKENMILL_HOME/kernels, with its signatures set.
    Raises OSError / RuntimeError where it cannot be built or loaded, or this CPU does not run it."""
    path = library_path(build)
    if not path.exists():
        start = time.perf_counter()
        log.info("compiling tokenmill's CPU kernels (%s, once per machine) into %s", build, path)
        _build(path, BUILDS[build])
        log.info("compiled the CPU kernels in %.1f s", time.perf_counter() - start)
    if build != "avx2" and not _runs(path, build):
        raise RuntimeError(f"this CPU does not run the {build} build's instructions")
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {      # name: (argument types, return type), as cpu.c declares them
        "tm_isa": ([], i32),
        "tm_int4_mm": ([p, p, p, i32, p, i64, i64, i64, i64, i64, i32], i32),
        "tm_int8_mm": ([p, p, p, p, i32, p, i64, i64, i64, i64, i64, i32], i32),
        "tm_paged_decode": ([p, p, p, p, p, p, i32, p, p, p, p, i64, i64, i64, i64, i64, i64, f32, i32], None),
        "tm_rms_norm": ([p, p, p, i64, i64, f32, i32], None),
        "tm_rope": ([p, i64, p, p, p, i64, i64, i64, i32], None),
        "tm_silu_mul": ([p, p, i64, i64, i32], None),
        "tm_gelu_tanh_mul": ([p, p, i64, i64, i32], None),
        "tm_argmax_rows": ([p, p, i64, i64, i32], None),
        "tm_decode_layers": ([p, i64, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i32, f32, f32, i32, i32], i32),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def _load() -> ctypes.CDLL | None:
    switch = os.environ.get(ENV_SWITCH, "1")
    if switch == "0":
        return None
    if not cpu_supports():
        log.info("native CPU kernels off: this CPU lacks AVX2/FMA/F16C (PyTorch's kernels run instead)")
        return None
    builds = ["avx2"] if switch == "avx2" or best_build() == "avx2" else ["vnni", "avx2"]
    for build in builds:
        try:
            lib = compiled(build)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native CPU kernels (%s) unavailable: %s", build, e)
            continue
        _state["build"] = build
        log.info("CPU kernels: tokenmill's own (%s) for int4/int8 products, decode attention over pages, norms "
                 "and rope", "AVX-512 VNNI" if build == "vnni" else "AVX2/FMA")
        return lib
    log.warning("PyTorch's kernels run instead of tokenmill's")
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; None where they cannot run (see the module doc)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def build() -> str | None:
    """Which of BUILDS `library()` is ("avx2" or "vnni"); None where none runs."""
    return _state.get("build") if library() is not None else None


def multiplies(in_features: int, device: torch.device = torch.device("cpu")) -> bool:
    """Whether tokenmill's int4 / int8 products run on `device` for weights of `in_features` columns: the
    columns come in blocks of 32, and on the CPU these kernels are loaded, on CUDA triton imports
    (triton_mm.py)."""
    if in_features % 32:
        return False
    if device.type == "cpu":
        return library() is not None
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require(ok: bool, kernel: str, *tensors: torch.Tensor) -> None:
    """The C code trusts its arguments: a caller's mistake is an error here, never a wild read."""
    if not ok:
        raise ValueError(f"{kernel}: unsupported arguments " + ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in tensors))


TILE = 8        # weight rows per tile of cpu.c's layouts


def packed_fits(bits: int, q: torch.Tensor, scale: torch.Tensor, group: int, n: int, k: int) -> bool:
    """Whether q and scale hold an [n, k] weight in cpu.c's tiles of 8 rows, as its int4 (bits 4: tile_int4's uint8
    [N8, K / 32, 4, 32] and scales [N8, K / group, 2, 8]) or int8 (bits 8: tile_int8's int8 [N8, K / 4, 8, 4] and
    scales [N8, K / group, 8]) products take it, N8 = ceil(n / 8), scales float32 or float16; both contiguous,
    `group` a multiple of 32 dividing k."""
    tiles, int4 = -(-n // TILE), bits == 4
    q_shape = (tiles, k // 32, 4, 32) if int4 else (tiles, k // 4, TILE, 4)
    s_shape = (tiles, k // group, 2, TILE) if int4 else (tiles, k // group, TILE)
    return (bits in (4, 8) and n > 0 and k > 0 and k % 32 == 0 and group % 32 == 0 and k % group == 0
            and q.dtype is (torch.uint8 if int4 else torch.int8) and tuple(q.shape) == q_shape and q.is_contiguous()
            and scale.dtype in (torch.float32, torch.float16) and tuple(scale.shape) == s_shape
            and scale.is_contiguous())


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("tokenmill CPU kernel: no memory for the activations' scratch copy")


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t [N, ...] with zero rows appended up to a multiple of TILE."""
    pad = -t.shape[0] % TILE
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def narrow_scales(scales: torch.Tensor) -> torch.Tensor:
    """float32 scales as float16 where every one is a float16 value (GGUF's Q4_0, Q4_1 and Q8_0 store theirs so),
    else as they are: the kernels read either, and the products are the same."""
    half = scales.half()
    return half if torch.equal(half.float(), scales) else scales


def tile_int4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15 and w = q * scale + offset with scale, offset [N, K / group] -> int4_mm's tiles (cpu.c):
    uint8 [N8, K / 32, 4, 32], in block b, chunk c, byte j of tile t the low nibble row 8t + j // 4, column
    32b + 8c + j % 4 and the high nibble column 32b + 8c + 4 + j % 4; [N8, K / group, 2, 8] (scales, offsets),
    float16 where they all are float16 values (narrow_scales), else float32."""
    n, k = q.shape
    g = scale.shape[1]
    v = _pad_rows(q.to(torch.uint8)).view(-1, TILE, k // 32, 4, 2, 4)           # t, r, b, c, h, kk
    v = v.permute(0, 2, 3, 4, 1, 5).reshape(-1, k // 32, 4, 2, 32)               # t, b, c, h, (r kk)
    packed = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).contiguous()
    so = torch.stack([_pad_rows(scale.float()), _pad_rows(offset.float())], dim=1)  # [N8 * 8, 2, G]
    return packed, narrow_scales(so.view(-1, TILE, 2, g).permute(0, 3, 2, 1).contiguous())


def untile_int4(q: torch.Tensor, scale_offset: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tile_int4's inverse: (q uint8 [n, K], scale [n, G], offset [n, G])."""
    tiles, blocks = q.shape[:2]
    v = torch.stack([q & 15, q >> 4], dim=3).view(tiles, blocks, 4, 2, TILE, 4)   # t, b, c, h, r, kk
    v = v.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, blocks * 32)[:n]
    so = scale_offset.float().permute(0, 3, 2, 1).reshape(tiles * TILE, 2, -1)[:n]
    return v, so[:, 0], so[:, 1]


def tile_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q int8 [N, K] and w = q * scale with scale [N, K / group] -> int8_mm's tiles (cpu.c): int8 [N8, K / 4, 8, 4]
    (row 8t + r, columns 4s .. 4s + 3 at [t, s, r]), [N8, K / group, 8] float16 where all are float16 values
    (narrow_scales: Q8_0's), else float32."""
    n, k = q.shape
    g = scale.shape[1]
    qt = _pad_rows(q.to(torch.int8)).view(-1, TILE, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return qt, narrow_scales(_pad_rows(scale.float()).view(-1, TILE, g).permute(0, 2, 1).contiguous())


def int8_rows(q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of tile_int8's weights as float32 [len(ids), K] (q * scale): an embedding lookup."""
    ids = ids.reshape(-1)
    rows = q[ids // TILE, :, ids % TILE].reshape(len(ids), -1).float()            # [L, K / 4, 4] -> [L, K]
    s = scale[ids // TILE, :, ids % TILE].float()                                  # [L, G]
    return (rows.view(len(ids), s.shape[1], -1) * s[..., None]).view(len(ids), -1)


def int4_mm(x: torch.Tensor, q: torch.Tensor, scale_offset: torch.Tensor, n: int, group: int,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32, tile_int4's tiles of an [n, K] weight -> [M, n] float32. `lib`: a build's library
    (`compiled`) in place of the loaded one, to compare builds."""
    x = x.contiguous()
    m, k = x.shape
    _require(x.dtype is torch.float32 and packed_fits(4, q, scale_offset, group, n, k), "int4_mm", x, q, scale_offset)
    y = torch.empty(m, n, dtype=torch.float32)
    _check((lib or library()).tm_int4_mm(x.data_ptr(), q.data_ptr(), scale_offset.data_ptr(),
                                         scale_offset.dtype is torch.float16, y.data_ptr(),
                                         m, n, k, group, n, torch.get_num_threads()))
    return y


def int4_dequantize(q: torch.Tensor, scale_offset: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """int4_mm's weights as float32 [n, K] (q * scale + offset)."""
    v, scale, offset = untile_int4(q, scale_offset, n)
    w = v.float().view(n, scale.shape[1], group) * scale[..., None] + offset[..., None]
    return w.view(n, -1)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """int8_mm's weights as float32 [n, K] (q * scale)."""
    return int8_rows(q, scale, torch.arange(n))


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, n: int, group: int,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 (rounded to int8 per 32 columns, as against int4) or int8 (integer activations used
    exactly, W8A8's math), tile_int8's tiles of an [n, K] weight -> [M, n] float32. `lib` as int4_mm's."""
    x = x.contiguous()
    m, k = x.shape
    exact = x.dtype is torch.int8
    _require((exact or x.dtype is torch.float32) and packed_fits(8, q, scale, group, n, k), "int8_mm", x, q, scale)
    y = torch.empty(m, n, dtype=torch.float32)
    _check((lib or library()).tm_int8_mm(None if exact else x.data_ptr(), x.data_ptr() if exact else None,
                                         q.data_ptr(), scale.data_ptr(), scale.dtype is torch.float16, y.data_ptr(),
                                         m, n, k, group, n, torch.get_num_threads()))
    return y


MAX_GROUP, MAX_DIM = 16, 256        # cpu.c's bounds for paged_decode
CACHE_DTYPES = (torch.float32, torch.float16)       # the KV pages paged_decode reads and writes


def paged_decode_fits(num_heads: int, dtype: torch.dtype, k_cache: torch.Tensor) -> bool:
    """Whether `paged_decode` takes `num_heads` query heads of `dtype` (float32) over this cache (float32 or
    float16 pages, head_dim a multiple of 8 up to MAX_DIM, at most MAX_GROUP query heads per KV head)."""
    d, hkv = k_cache.shape[3], k_cache.shape[2]
    return (library() is not None and dtype == torch.float32 and k_cache.dtype in CACHE_DTYPES
            and k_cache.is_contiguous() and d % 8 == 0 and d <= MAX_DIM and num_heads % hkv == 0
            and num_heads // hkv <= MAX_GROUP)


def _caches_fit(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """A key and a value cache paged_decode takes for `num_heads` float32 query heads: alike, on the CPU."""
    return (paged_decode_fits(num_heads, torch.float32, k_cache) and v_cache.shape == k_cache.shape
            and v_cache.dtype is k_cache.dtype and v_cache.is_contiguous()
            and k_cache.device.type == v_cache.device.type == "cpu")


def _tables_fit(rows: int, slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                starts: torch.Tensor) -> bool:
    """paged_decode's per-row tables for `rows` rows: slots int64 [B], block_tables int32 [B, width], seq_lens and
    starts int32 [B], contiguous, on the CPU."""
    tables = (slots, block_tables, seq_lens, starts)
    return (slots.dtype is torch.int64 and slots.numel() == rows and block_tables.dtype is torch.int32
            and block_tables.dim() == 2 and block_tables.shape[0] == rows
            and seq_lens.dtype is starts.dtype is torch.int32 and seq_lens.numel() == starts.numel() == rows
            and all(t.is_contiguous() and t.device.type == "cpu" for t in tables))


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, starts: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Decode rows: row b's new k, v [B, Hkv, D] are written at cache slot slots[b] (int64; -1: skipped),
    then its query q [B, Hq, D] attends to its positions starts[b] .. seq_lens[b] - 1 of the paged cache
    [num_blocks, block_size, Hkv, D] through block_tables [B, width] (int32; seq_lens, starts int32 [B])
    -> [B, Hq, D]. Only the pages of those positions are read. The pages hold float32 or float16 (written
    rounded to nearest even, as .to(torch.float16)); the arithmetic is float32 either way."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, hq, d = q.shape
    _require(q.dtype is torch.float32 and _caches_fit(hq, k_cache, v_cache) and k_cache.shape[3] == d
             and k.shape == v.shape == (b, k_cache.shape[2], d) and k.dtype is v.dtype is torch.float32
             and _tables_fit(b, slots, block_tables, seq_lens, starts),
             "paged_decode", q, k, slots, k_cache, v_cache, block_tables, seq_lens, starts)
    # the values are trusted: the caller's tables cover seq_lens, slots and page ids lie in the cache
    out = torch.empty_like(q)
    library().tm_paged_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), slots.data_ptr(), k_cache.data_ptr(),
                              v_cache.data_ptr(), int(k_cache.dtype is torch.float16), block_tables.data_ptr(),
                              seq_lens.data_ptr(), starts.data_ptr(), out.data_ptr(), b, hq, k_cache.shape[2], d,
                              k_cache.shape[1], block_tables.shape[1], scale, torch.get_num_threads())
    return out


class _Linear(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("perm", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("half", ctypes.c_int64), ("act_range", ctypes.c_float)]


NORMS = ("input_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm", "q_norm", "k_norm")     # cpu.c's tm_layer


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)] \
        + [(name, ctypes.c_void_p) for name in NORMS] \
        + [("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("meta", ctypes.c_int64), ("rope", ctypes.c_int64)]


class _Tables(ctypes.Structure):
    _fields_ = [("slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p), ("seq_lens", ctypes.c_void_p),
                ("starts", ctypes.c_void_p), ("width", ctypes.c_int64)]


class PackedWeights(NamedTuple):
    """A linear layer's weights as int4_mm (bits 4) or int8_mm (bits 8) take them."""
    bits: int
    q: torch.Tensor
    scale: torch.Tensor
    group: int
    perm: torch.Tensor | None = None    # int64 [K]: the product takes x[:, perm] (GPTQ act-order)
    act_range: float = 0.0              # > 0 (bits 8): W8A8, activations rounded per token to integers with
                                        # scale max|x| / act_range (quant/int8.py's W8A8Kernel); 0: float


def _linear(name: str, weights: PackedWeights, bias: torch.Tensor | None, n: int, k: int) -> _Linear:
    bits, q, scale, group, perm, act_range = weights
    ok = packed_fits(bits, q, scale, group, n, k) and q.device.type == scale.device.type == "cpu" \
        and (bias is None or (bias.dtype is torch.float32 and bias.numel() == n and bias.is_contiguous()))
    ok = ok and (perm is None or (perm.dtype is torch.int64 and perm.numel() == k and perm.is_contiguous()
                                  and bool((perm.sort().values == torch.arange(k)).all())))
    ok = ok and act_range >= 0 and (act_range == 0 or (bits == 8 and perm is None))
    _require(ok, f"decode_layers {name}", q, scale)
    pointer = lambda t: None if t is None else t.data_ptr()     # noqa: E731
    return _Linear(q.data_ptr(), scale.data_ptr(), pointer(bias), pointer(perm), n, k, group, bits,
                   int(scale.dtype is torch.float16), act_range)


class DecoderStack:
    """Decoder layers of the Llama shape whose linears are packed int4/int8 weights, run for the rows of a
    decode step by one call (tm_decode_layers): the kernels of the Python forward in its order, so the same
    results bit for bit, without Python between them. Per layer:
        residual += [attn_out_norm] o(attention(rope([q_norm, k_norm] qkv(input_norm(residual)))))
        residual += [mlp_out_norm] down(act(gate) * up)(mlp_norm(residual))
    (Llama, Mistral, Qwen 2: without the bracketed norms; Gemma 3: with them). `layers`: per layer a dict of
    its four linears' PackedWeights and optional biases ("qkv", "o", "gate_up", "down", "qkv_bias", ...), its
    norm weights (NORMS; the bracketed ones optional) and "rope", the index of its rope table (default 0).
    act: "silu" or "gelu_tanh"."""

    @staticmethod
    def takes(num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, intermediate: int) -> bool:
        """Whether layers of these sizes fit the kernels (loaded; sizes in vectors of 8, rope's half too; the
        decode kernel's bounds on head_dim and query heads per KV head)."""
        return (library() is not None and hidden % 8 == 0 and intermediate % 8 == 0 and (head_dim // 2) % 8 == 0
                and head_dim <= MAX_DIM and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP)

    def __init__(self, layers: list[dict], num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
                 intermediate: int, eps: float, scale: float, act: str = "silu"):
        hq, hkv, d = num_heads, num_kv_heads, head_dim
        _require(self.takes(hq, hkv, d, hidden, intermediate), "decode_layers", torch.empty(hq, hkv, d))
        _require(act in ("silu", "gelu_tanh"), f"decode_layers act {act}")
        self.dims = (hq, hkv, d, hidden, intermediate)
        self.eps, self.scale, self.act = eps, scale, int(act == "gelu_tanh")
        self.ropes = 1 + max(layer.get("rope", 0) for layer in layers)
        shapes = {"qkv": ((hq + 2 * hkv) * d, hidden), "o": (hidden, hq * d), "gate_up": (2 * intermediate, hidden),
                  "down": (hidden, intermediate)}
        self._structs = (_Layer * len(layers))()
        self._keep = layers                         # the tensors the pointers point into
        for struct, layer in zip(self._structs, layers):
            for name, (n, k) in shapes.items():
                setattr(struct, name, _linear(name, layer[name], layer.get(name + "_bias"), n, k))
            for name in NORMS:
                w = layer.get(name)
                if w is None and name in ("input_norm", "mlp_norm"):
                    raise ValueError(f"decode_layers: a layer without {name}")
                if w is not None:
                    size = d if name in ("q_norm", "k_norm") else hidden
                    _require(w.dtype is torch.float32 and w.numel() == size and w.is_contiguous(), f"decode_layers {name}", w)
                    setattr(struct, name, w.data_ptr())
            _require((layer.get("q_norm") is None) == (layer.get("k_norm") is None) and layer.get("rope", 0) >= 0,
                     "decode_layers q_norm / k_norm / rope", torch.empty(0))
            struct.rope = layer.get("rope", 0)
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._lock = threading.Lock()

    def _set_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every cache checked before any pointer is written: a refused list leaves no layer half-updated."""
        hq, hkv, d = self.dims[:3]
        self._caches = None
        _require(len(caches) == len(self._structs), f"decode_layers: {len(caches)} caches for {len(self._structs)} layers")
        shape = caches[0][0].shape
        for k, v in caches:
            _require(_caches_fit(hq, k, v) and k.shape == shape and k.dtype is caches[0][0].dtype
                     and k.shape[2:] == (hkv, d), "decode_layers cache", k, v)
        for struct, (k, v) in zip(self._structs, caches):
            struct.k_cache, struct.v_cache = k.data_ptr(), v.data_ptr()
        self._caches = list(caches)

    def __call__(self, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 caches: list[tuple[torch.Tensor, torch.Tensor]], tables: list[tuple], layer_tables: list[int]) -> None:
        """residual [M, hidden] float32, through every layer in place. cos, sin [R, M, head_dim / 2]: the R rope
        tables the layers pick from; caches per layer; tables: paged_decode's (slots, block_tables, seq_lens,
        starts) per KV group; layer_tables[i]: the group of layer i."""
        with self._lock:        # the structs are rewritten per call: one call at a time
            self._call(residual, cos, sin, caches, tables, layer_tables)

    def _call(self, residual, cos, sin, caches, tables, layer_tables) -> None:
        hq, hkv, d, hidden, intermediate = self.dims
        m = residual.shape[0]
        if self._caches is None or len(caches) != len(self._caches) \
                or any(a is not b for pair, old in zip(caches, self._caches) for a, b in zip(pair, old)):
            self._set_caches(caches)
        ropes = cos.shape[0] if cos.dim() == 3 else 1
        _require(residual.dtype is torch.float32 and residual.is_contiguous() and tuple(residual.shape) == (m, hidden)
                 and cos.dtype is sin.dtype is torch.float32 and cos.is_contiguous() and sin.is_contiguous()
                 and cos.shape == sin.shape and tuple(cos.shape[-2:]) == (m, d // 2) and ropes >= self.ropes
                 and residual.device.type == cos.device.type == sin.device.type == "cpu"
                 and len(layer_tables) == len(self._structs) and all(0 <= i < len(tables) for i in layer_tables),
                 "decode_layers", residual, cos, sin)
        metas = (_Tables * len(tables))()
        for meta, (slots, block_tables, seq_lens, starts) in zip(metas, tables):
            _require(_tables_fit(m, slots, block_tables, seq_lens, starts), "decode_layers tables",
                     slots, block_tables, seq_lens, starts)
            meta.slots, meta.block_tables, meta.seq_lens, meta.starts = (
                slots.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(), starts.data_ptr())
            meta.width = block_tables.shape[1]
        for struct, i in zip(self._structs, layer_tables):
            struct.meta = i
        _check(library().tm_decode_layers(self._structs, len(self._structs), metas, residual.data_ptr(), cos.data_ptr(),
                                          sin.data_ptr(), m, hidden, hq, hkv, d, intermediate,
                                          self._caches[0][0].shape[1], int(self._caches[0][0].dtype is torch.float16),
                                          self.eps, self.scale, self.act,
                                          torch.get_num_threads()))


def gated(x: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(gate) * up of x [T, 2I] = [gate | up] -> [T, I]: act "silu" (SwiGLU) or "gelu_tanh" (GeGLU, gelu's
    tanh approximation as PyTorch's approximate="tanh"); None where the kernel does not take it."""
    half = x.shape[-1] // 2
    if x.dtype != torch.float32 or half % 8 or x.dim() != 2 or x.device.type != "cpu" or library() is None:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape[0], half, dtype=torch.float32)
    kernel = library().tm_gelu_tanh_mul if act == "gelu_tanh" else library().tm_silu_mul
    kernel(x.data_ptr(), out.data_ptr(), x.shape[0], half, torch.get_num_threads())
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [M, N] -> int64 [M]: each row's first largest value's index, NaN the largest; torch.argmax(x, dim=-1)
    exactly, in one vectorized pass and part of another (PyTorch's takes ~10x as long at a 262k vocabulary).
    PyTorch's where the kernel does not run."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or x.shape[1] == 0 or library() is None:
        return x.argmax(dim=-1)
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().tm_argmax_rows(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., K] / rms(x) * weight in one pass; None where the kernel does not take it (not float32 on the
    CPU, K not a multiple of 8, no kernels): the caller runs PyTorch's."""
    k = x.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or k % 8 or x.device.type != "cpu"
            or library() is None):
        return None
    _require(weight.numel() == k and weight.is_contiguous(), "rms_norm", x, weight)
    x = x.contiguous()
    out = torch.empty_like(x)
    library().tm_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // k, k, eps,
                          torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotate-half rope of x [T, H, D] (heads contiguous, any token stride) by cos, sin [T, 1, D / 2] ->
    a new [T, H, D]; None where the kernel does not take it (the caller runs PyTorch's)."""
    t, h, d = x.shape
    if (x.dtype != torch.float32 or cos.dtype != torch.float32 or (d // 2) % 8 or x.device.type != "cpu"
            or x.stride(2) != 1 or x.stride(1) != d or library() is None):
        return None
    _require(sin.dtype is torch.float32 and cos.numel() == sin.numel() == t * (d // 2), "rope", x, cos, sin)
    cos, sin = cos.reshape(t, d // 2).contiguous(), sin.reshape(t, d // 2).contiguous()
    out = torch.empty(t, h, d, dtype=torch.float32)
    library().tm_rope(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, h, d,
                      torch.get_num_threads())
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> uint8 [N, K / 2]: per 32 columns, 16 bytes with columns 0..15 in the low
    nibbles and 16..31 in the high ones."""
    n, k = q.shape
    g = q.to(torch.uint8).view(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: uint8 [N, K / 2] -> uint8 [N, K]."""
    n, half = packed.shape
    b = packed.view(n, half // 16, 1, 16)
    return torch.cat((b & 15, b >> 4), dim=2).reshape(n, 2 * half)
