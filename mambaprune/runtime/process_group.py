"""The torch.distributed process group, when one is initialised: this process's rank, and sums over the ranks.

In runtime/ (the leaf) because more than one layer asks: the calibration of the auto searches (search/)
and `recover` (api/). Nothing here starts a group: without one every process is rank 0 of 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over the ranks (a detached copy; itself without a group)."""
    value = value.detach().clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(value)
    return value


def sum_over_ranks(values: list) -> list:
    """Each number summed over the ranks (float64, on the group's device); the numbers themselves alone."""
    if rank_and_world()[1] == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return global_sum(torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)).tolist()
