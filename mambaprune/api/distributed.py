"""torch.distributed for `recover` (and the command line under torchrun): who am I, wrap, reduce.

Nothing here starts a process group on its own except `init_from_env`, which the command line calls
when torchrun's environment variables say there are several processes (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..runtime.process_group import global_sum, rank_and_world

__all__ = ["global_sum", "init_from_env", "rank_and_world", "wrap"]


def init_from_env(device: torch.device | None = None) -> bool:
    """Initialise the default group from torchrun's environment (WORLD_SIZE > 1); True if this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when a group is initialised, else ``module``."""
    if rank_and_world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
