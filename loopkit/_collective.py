"""Means over ranks: the one collective the driver and the logging transform make under torch.distributed.

A low-layer helper (it imports torch only): in one process, or outside a process group of
more than one rank, it reads the sums as they are; in a process group it all-reduces the
sums and counts of every rank in one collective first, so that every rank reads the same
means, weighted by how many values each rank contributed.

>>> import torch
>>> means({"loss": torch.tensor(3.0)}, {"loss": 2})
{'loss': 1.5}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["active", "means"]


def active() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one rank.

    >>> active()
    False
    """
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device(sums: Mapping[str, torch.Tensor]) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def means(sums: Mapping[str, torch.Tensor], counts: Mapping[str, float]) -> dict[str, float]:
    """``sums[k] / counts[k]`` for each key, over all ranks when a process group is active.

    Under a process group every rank must call this at the same point (it is a collective).
    The keys of all ranks are joined first, so a rank that saw no value of a metric (or no
    batch at all) still takes part; the sums and counts then travel in one all-reduce.
    """
    if not active():
        if not sums:
            return {}
        keys = list(sums)
        read = torch.stack([sums[k].detach().float().reshape(()).to(sums[keys[0]].device) for k in keys]).tolist()
        return {k: total / counts[k] for k, total in zip(keys, read)}
    dist = torch.distributed
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(sums))
    keys: list[str] = []
    for rank_keys in gathered:
        keys.extend(k for k in rank_keys or () if k not in keys)
    if not keys:
        return {}
    device = _reduce_device(sums)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = [sums[k].detach().reshape(()).to(device, torch.float64) if k in sums else zero for k in keys]
    numbers = torch.tensor([float(counts.get(k, 0)) for k in keys], dtype=torch.float64, device=device)
    packed = torch.cat([torch.stack(totals), numbers])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    values = packed.tolist()
    n = len(keys)
    return {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}
