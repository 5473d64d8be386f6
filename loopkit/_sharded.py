"""Sharded tensors (``torch.distributed.tensor.DTensor``), as torch's FSDP2 (``fully_shard``) leaves a model.

A low-layer helper (it imports torch only): :func:`is_sharded` tells a model whose parameters
are sharded over ranks, :func:`full` gathers every sharded tensor of a nested tree whole (a
collective every rank must call at the same point, in the same order; ``to_rank_zero=True``
keeps them on rank 0 alone, in CPU memory), :func:`local` gives a tensor's own shard on this
rank (a plain tensor as it is), and :func:`norms` takes tensors' norms over every shard in one
all-reduce.

>>> import torch
>>> is_sharded(torch.nn.Linear(1, 1))
False
>>> full({"w": torch.ones(2), "n": [1, (torch.zeros(1),)]})["n"][1][0]
tensor([0.])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor = None  # type: ignore[assignment, misc]
    FSDPModule = None  # type: ignore[assignment, misc]

__all__ = [
    "fsdp_modules", "full", "held_grads", "holds_unreduced_grads", "is_dtensor", "is_sharded", "local", "norms",
]


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor`` (a tensor sharded or replicated over the ranks of a mesh).

    >>> is_dtensor(torch.ones(1))
    False
    """
    return DTensor is not None and isinstance(value, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (``fully_shard`` was applied to it).

    >>> is_sharded(torch.nn.Linear(2, 1))
    False
    """
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def fsdp_modules(modules: Sequence[torch.nn.Module]) -> list[Any]:
    """The modules of ``modules`` that ``fully_shard`` was applied to (``FSDPModule``): each all-gathers its
    parameters for a forward, and one built with ``reshard_after_forward=False`` keeps them whole after a forward
    without backward (an evaluation) until its ``reshard()``.

    >>> fsdp_modules(list(torch.nn.Sequential(torch.nn.Linear(1, 1)).modules()))
    []
    """
    return [] if FSDPModule is None else [m for m in modules if isinstance(m, FSDPModule)]


def full(tree: Any, *, to_rank_zero: bool = False) -> Any:
    """``tree`` with every ``DTensor`` gathered into a plain, whole tensor (``full_tensor()``, detached);
    mappings become dicts, lists and tuples stay lists and tuples, the rest is returned as it is.

    Each ``DTensor`` is an all-gather: every rank calls this at the same point on trees of the same
    structure (the same model and optimizer). A tree without one comes back equal (its containers copied).

    With ``to_rank_zero`` only rank 0 keeps what is gathered, each whole tensor moved to CPU memory as
    soon as it is gathered; every other rank drops each one as soon as it is gathered and gets None for
    the whole tree: it holds one whole tensor at a time (the one being gathered), never the whole tree
    (as torch's ``get_model_state_dict`` with ``StateDictOptions(full_state_dict=True, cpu_offload=True)``
    gathers). Plain tensors stay as they are on rank 0 (shared, not copied). For a state dict only rank 0
    writes.

    >>> full([torch.ones(1), 2])
    [tensor([1.]), 2]
    >>> full({"w": torch.ones(1)}, to_rank_zero=True)  # (no process group: this process is rank 0)
    {'w': tensor([1.])}
    """
    if DTensor is None:
        return tree
    if not to_rank_zero:
        return _gathered(tree, keep=True, to_cpu=False)
    dist = torch.distributed
    keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    gathered = _gathered(tree, keep=keep, to_cpu=True)
    return gathered if keep else None


def _gathered(tree: Any, *, keep: bool, to_cpu: bool) -> Any:
    """:func:`full`'s walk: each ``DTensor`` gathered whole (an all-gather), then kept (on CPU with ``to_cpu``)
    or, without ``keep``, dropped at once (None in its place)."""
    if isinstance(tree, DTensor):
        whole = tree.detach().full_tensor()
        if not keep:
            return None
        return whole.cpu() if to_cpu else whole
    if isinstance(tree, Mapping):
        return {k: _gathered(v, keep=keep, to_cpu=to_cpu) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_gathered(v, keep=keep, to_cpu=to_cpu) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_gathered(v, keep=keep, to_cpu=to_cpu) for v in tree)
    return tree


def norms(tensors: Sequence[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """Each tensor's ``norm_type``-norm (a positive number or inf), over every rank's shard of a ``DTensor``:
    plain tensors, each in its tensor's dtype, on every rank alike.

    A plain tensor's is ``t.norm(norm_type)``, no collective (bitwise Lightning's ``grad_norm``). The
    ``DTensor`` s sharded over a 1-D mesh (``fully_shard``'s) take one all-reduce a mesh together: this rank's
    shards' norms (``torch._foreach_norm``), raised to ``norm_type`` and summed over the ranks (for inf: their
    maximum), then the root; on a mesh of one rank, the local norms as they are. Any other ``DTensor``
    (replicated, or on a mesh of more dimensions) is reduced on its own, as ``full(t.norm(norm_type))``.
    Every rank calls this at the same point with the same tensors' shards (a collective).

    >>> norms([torch.tensor([3.0, 4.0]), torch.ones(4)], 2.0)
    [tensor(5.), tensor(2.)]
    """
    out: list[torch.Tensor | None] = [None] * len(tensors)
    batched: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        if not is_dtensor(t):
            out[i] = t.norm(norm_type)
        elif t.device_mesh.ndim == 1 and all(p.is_shard() for p in t.placements):
            batched.setdefault((t.device_mesh, t.device), []).append(i)
        else:
            out[i] = full(t.norm(norm_type))
    for (mesh, _), members in batched.items():
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, i in enumerate(members):
            by_dtype.setdefault(tensors[i].dtype, []).append(k)
        mine: list[torch.Tensor] = [None] * len(members)  # type: ignore[list-item]
        for ks in by_dtype.values():  # (torch._foreach_norm of one dtype, as torch's get_total_norm groups them)
            shards = [local(tensors[members[k]]) for k in ks]
            filled = [k for k, shard in zip(ks, shards) if shard.numel() > 0]  # (an empty shard: a layer with fewer
            for k, shard in zip(ks, shards):  # rows than ranks; its norm is 0, and inf's refuses an empty tensor)
                if shard.numel() == 0:
                    mine[k] = torch.zeros((), dtype=shard.dtype, device=shard.device)
            found = torch._foreach_norm([local(tensors[members[k]]) for k in filled], norm_type) if filled else []
            for k, n in zip(filled, found):
                mine[k] = n
        if mesh.size() == 1:
            for i, n in zip(members, mine):
                out[i] = n
            continue
        dtype = functools.reduce(torch.promote_types, (n.dtype for n in mine), torch.float32)
        stacked = torch.stack([n.to(dtype) for n in mine])
        inf = math.isinf(norm_type)
        if not inf:
            stacked = stacked.pow(norm_type)
        dist = torch.distributed
        dist.all_reduce(stacked, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group())
        if not inf:
            stacked = stacked.pow(1.0 / norm_type)
        for i, n, total in zip(members, mine, stacked.unbind()):
            out[i] = total.to(n.dtype)
    return out  # type: ignore[return-value]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: changing it changes the ``DTensor``); a plain tensor as it is.

    >>> t = torch.ones(2)
    >>> local(t) is t
    True
    """
    return tensor._local_tensor if DTensor is not None and isinstance(tensor, DTensor) else tensor


def held_grads(model: torch.nn.Module) -> list[tuple[Any, torch.Tensor | None]]:
    """Each FSDP parameter of ``model`` with the unsharded gradient ``fully_shard`` holds for it after backwards
    without gradient sync (None where it holds none), in the modules' order (the same on every rank). Reads torch's
    FSDP2 internals (``FSDPParam``): named in the error where a torch version has moved them.

    >>> held_grads(torch.nn.Linear(1, 1))
    []
    """
    if not is_sharded(model):
        return []
    from torch.distributed.fsdp import FSDPModule

    held, seen = [], set()
    try:
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                groups = [g for g in [state._fsdp_param_group] if g is not None]
            for group in groups:
                if id(group) in seen:
                    continue
                seen.add(id(group))
                for fsdp_param in group.fsdp_params:
                    grad = fsdp_param.unsharded_accumulated_grad
                    if grad is None and hasattr(fsdp_param, "_unsharded_param"):
                        grad = fsdp_param._unsharded_param.grad
                    held.append((fsdp_param, grad))
    except AttributeError as e:
        raise RuntimeError(
            f"with_fsdp: cannot reach the gradients fully_shard holds unsharded in torch {torch.__version__} "
            f"(its FSDP2 internals moved: {e}); flush a partial accumulation group is not possible, so make each "
            "epoch a whole number of with_grad_accum groups"
        ) from e
    return held


def holds_unreduced_grads(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` holds gradients of ``model`` that no reduce-scatter has reached yet: inside a
    ``with_grad_accum`` group under ``with_fsdp`` (each rank's own partial sums, unsharded). No collective.

    >>> holds_unreduced_grads(torch.nn.Linear(1, 1))
    False
    """
    return any(grad is not None for _, grad in held_grads(model))
