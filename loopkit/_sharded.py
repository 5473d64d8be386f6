"""Sharded tensors (``torch.distributed.tensor.DTensor``), as torch's FSDP2 (``fully_shard``) leaves a model.

A low-layer helper (it imports torch only): :func:`is_sharded` tells a model whose parameters
are sharded over ranks, :func:`full` gathers every sharded tensor of a nested tree whole (a
collective every rank must call at the same point, in the same order), and :func:`local`
gives a tensor's own shard on this rank (a plain tensor as it is).

>>> import torch
>>> is_sharded(torch.nn.Linear(1, 1))
False
>>> full({"w": torch.ones(2), "n": [1, (torch.zeros(1),)]})["n"][1][0]
tensor([0.])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor = None  # type: ignore[assignment, misc]

__all__ = ["full", "held_grads", "holds_unreduced_grads", "is_dtensor", "is_sharded", "local"]


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


def full(tree: Any) -> Any:
    """``tree`` with every ``DTensor`` gathered into a plain, whole tensor (``full_tensor()``, detached);
    mappings become dicts, lists and tuples stay lists and tuples, the rest is returned as it is.

    Each ``DTensor`` is an all-gather: every rank calls this at the same point on trees of the same
    structure (the same model and optimizer). A tree without one comes back equal (its containers copied).

    >>> full([torch.ones(1), 2])
    [tensor([1.]), 2]
    """
    if DTensor is None:
        return tree
    if isinstance(tree, DTensor):
        return tree.detach().full_tensor()
    if isinstance(tree, Mapping):
        return {k: full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full(v) for v in tree]
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(full(v) for v in tree)
    return tree


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
