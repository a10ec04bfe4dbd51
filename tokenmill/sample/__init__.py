"""Sampling: the batched sampler and its filters."""
