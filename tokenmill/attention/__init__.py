"""Attention backends, registered by name."""
from __future__ import annotations

from tokenmill.attention.base import AttentionBackend, AttentionMetadata


def _reference() -> AttentionBackend:
    from tokenmill.attention.reference import ReferenceBackend
    return ReferenceBackend()


def _torch() -> AttentionBackend:
    from tokenmill.attention.torch_sdpa import TorchSDPABackend
    return TorchSDPABackend()


def _triton() -> AttentionBackend:
    # triton is imported only when asked for: tokenmill runs without it on CPU
    from tokenmill.attention.triton_backend import TritonBackend
    return TritonBackend()


BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton}


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_backend"]
