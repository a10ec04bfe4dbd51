"""Tensor parallelism on torch.distributed: sharded layers (comm.py), the ranks and their step loop."""
