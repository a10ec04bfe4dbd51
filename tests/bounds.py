"""Error bounds of tokenmill's CPU kernels, shared by the kernel tests. (A plain module, as logprobs.py.)"""
import torch


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most the kernels' rounding of activations can move x @ w^T: each value rounds by at most half a
    step of its 32-column block (block absmax / 127: int8, against int4 and int8 weights alike), plus float32
    summation."""
    m, k = x.shape
    step = x.abs().view(m, k // 32, 32).amax(-1).repeat_interleave(32, dim=1) / 127       # [M, K]
    return (0.5 * step.double() @ w.abs().double().t()) * 1.001 + 1e-6 * (x.abs().double() @ w.abs().double().t())
