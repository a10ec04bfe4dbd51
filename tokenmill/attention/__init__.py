"""Attention backends, registered by name."""
from __future__ import annotations

from tokenmill.attention.base import AttentionBackend, AttentionMetadata


def _reference() -> AttentionBackend:
    from tokenmill.attention.reference import ReferenceBackend
    return ReferenceBackend()


def _torch() -> AttentionBackend:
    from tokenmill.attention.torch_sdpa import TorchSDPABackend
    return TorchSDPABackend()


def _cpu() -> AttentionBackend:
    from tokenmill.attention.cpu_tiled import CPUTiledBackend
    return CPUTiledBackend()


def _triton() -> AttentionBackend:
    # triton is imported only when asked for: tokenmill runs without it on CPU
    try:
        from tokenmill.attention.triton_backend import TritonBackend
    except ImportError as e:
        raise ValueError(f"attention_backend='triton' needs the triton package ({e}); "
                         "install it (`pip install triton`) or choose one of 'cpu', 'torch', 'reference'") from e
    return TritonBackend()


BACKENDS = {"reference": _reference, "torch": _torch, "cpu": _cpu, "triton": _triton}


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_backend"]
