"""What every rank of a data-parallel step must hold alike where its wrapper is built: the parameters' flags and the
optimizer.

A low-layer helper of ``with_ddp`` and ``with_fsdp`` (it imports torch, :mod:`loopkit._collective` and the steps'
:class:`loopkit.steps.SyncRefusal`): :func:`training_described` sums up which parameters require a gradient and how
the optimizer updates them (its class, and each param group's size and hyper-parameters), and :func:`refuse_apart`
compares that over the ranks in one small all-gather, refusing on every rank what differs.

>>> model = torch.nn.Linear(2, 1)
>>> described = training_described(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> described["weight"], described["optimizer class"], described["optimizer param group 0"]["lr"]
(True, 'torch.optim.sgd.SGD', 0.1)
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

from loopkit import _collective
from loopkit._calls import fn_name
from loopkit.steps import SyncRefusal

__all__ = ["ddp_ignored", "frozen_summary", "named_callable", "refuse_apart", "training_described"]

_SKIPPED = object()  # a hyper-parameter that cannot be compared over the ranks (a callable, an object): left out


#: the names of parameters without requires_grad that :func:`frozen_summary` lists (then a count and a digest)
_FROZEN_LISTED = 16


def named_callable(fn: Any) -> str | None:
    """A callable option as the ranks compare it (a transform's ``agreed_options``): by its place,
    ``module.qualname``, the same on every rank that defines it alike, and two functions of one name in two modules
    told apart; a lambda or a function defined inside another (``<locals>`` in its qualname), of which a module may
    hold several of one name, also by the line its code starts at (not by its file's path, which may differ between
    the ranks' machines), and a lambda by the column of its body too (two on one line); a ``functools.partial`` by
    the function under it (its arguments are not compared). None for None.

    >>> named_callable(None), named_callable(len), named_callable(functools.partial(len))
    (None, 'builtins.len', 'functools.partial(builtins.len)')
    >>> first, second = (lambda: 1, lambda: 2)
    >>> named_callable(first), named_callable(second)
    ('loopkit._agreement.<lambda> (line 1, column 25)', 'loopkit._agreement.<lambda> (line 1, column 36)')
    """
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        return f"functools.partial({named_callable(fn.func)})"
    name = fn_name(fn)
    described = f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"
    code = getattr(fn, "__code__", None)
    if ("<lambda>" in name or "<locals>" in name) and hasattr(code, "co_firstlineno"):
        column = next((c for _, _, c, _ in code.co_positions() if c), None) if "<lambda>" in name else None
        described += f" (line {code.co_firstlineno})" if column is None else f" (line {code.co_firstlineno}, column {column})"
    return described


def ddp_ignored(model: torch.nn.Module) -> frozenset[str]:
    """The parameters and buffers DDP is told to leave alone (``_ddp_params_and_buffers_to_ignore``): not reduced,
    so not compared over the ranks either.

    >>> ddp_ignored(torch.nn.Linear(1, 1))
    frozenset()
    """
    return frozenset(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))


def frozen_summary(model: torch.nn.Module) -> dict[str, list[str]]:
    """Which parameters of ``model`` require no gradient, for ``run_epochs``' check of the ranks at an epoch's start
    (with the epoch's number of batches, in one gather): their names, in the model's order, up to ``_FROZEN_LISTED``
    of them, then a line with how many more and a digest of every name (the gather stays small, and any difference
    still shows). Those DDP ignores (:func:`ddp_ignored`) are left out, as :func:`training_described` leaves them.

    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    >>> _ = model[0].requires_grad_(False)
    >>> frozen_summary(model)
    {'requires_grad off': ['0.weight', '0.bias']}
    >>> frozen_summary(torch.nn.Sequential(*(torch.nn.Linear(1, 1) for _ in range(9))).requires_grad_(False))[
    ...     "requires_grad off"][-2:]
    ['7.bias', '... and 2 more (digest c6daa07b5ff6ec90)']
    """
    ignored = ddp_ignored(model)
    names = [name for name, p in model.named_parameters() if not p.requires_grad and name not in ignored]
    if len(names) > _FROZEN_LISTED:
        digest = hashlib.blake2b("\n".join(names).encode(), digest_size=8).hexdigest()
        names = [*names[:_FROZEN_LISTED], f"... and {len(names) - _FROZEN_LISTED} more (digest {digest})"]
    return {"requires_grad off": names}


def training_described(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ignored: Collection[str] = ()
) -> dict[str, object]:
    """Each parameter's ``requires_grad`` by name (but those named in ``ignored``), and the optimizer: its class
    (``"optimizer class"``) and each param group's size and hyper-parameters (``"optimizer param group i"``: every
    entry but ``params``, whose number of parameters is ``params``; a tensor by its value, a value that cannot be
    compared, left out). Picklable, compared with ``==``: a host read of a tensor hyper-parameter (once a wrapper
    built), no collective.

    >>> model = torch.nn.Linear(2, 1).requires_grad_(False)
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.5), betas=(0.8, 0.9))
    >>> described = training_described(model, optimizer, ignored={"bias"})
    >>> described["weight"], "bias" in described, described["optimizer class"]
    (False, False, 'torch.optim.adam.Adam')
    >>> group = described["optimizer param group 0"]
    >>> group["params"], group["lr"], group["betas"]
    (2, 0.5, (0.8, 0.9))
    """
    described: dict[str, object] = {
        name: p.requires_grad for name, p in model.named_parameters() if name not in ignored}
    if optimizer is None:
        return described
    kind = type(optimizer)
    described["optimizer class"] = f"{kind.__module__}.{kind.__qualname__}"
    for index, group in enumerate(optimizer.param_groups):
        summary: dict[str, object] = {"params": len(group["params"])}
        for key, value in group.items():
            if key != "params" and (comparable := _comparable(value)) is not _SKIPPED:
                summary[key] = comparable
        described[f"optimizer param group {index}"] = summary
    return described


def _comparable(value: Any) -> Any:
    """``value`` as the ranks compare it: None, a bool, an int, a str as it is, a float (NaN as ``"nan"``, which
    equals itself), numpy's numbers as Python's, a tuple or list as a tuple of such, a tensor or a numpy array by its
    value; anything else (a complex number, a callable, an object) ``_SKIPPED``.

    >>> _comparable(float("nan")), _comparable([1, torch.tensor(2.0)]), _comparable(print) is _SKIPPED
    ('nan', (1, 2.0), True)
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, torch.Tensor):
        return _SKIPPED if value.is_complex() else _comparable(value.tolist())
    if isinstance(value, np.ndarray):
        return _SKIPPED if np.iscomplexobj(value) else _comparable(value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if number == number else "nan"
    if isinstance(value, (tuple, list)):
        items = tuple(_comparable(item) for item in value)
        return _SKIPPED if any(item is _SKIPPED for item in items) else items
    return _SKIPPED


def refuse_apart(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, who: str, why: str, *,
    ignored: Collection[str] = (), advice: str = "",
) -> None:
    """Refuse, on every rank, parameters whose ``requires_grad`` differs from rank 0's, or an optimizer that differs
    from rank 0's (:func:`training_described`), naming what differs and the first rank that differs: a
    :class:`loopkit.steps.SyncRefusal` raised before anything changed (the state stays usable: make them alike on
    every rank and call again). ``why`` says why ``who`` needs them alike. One small all-gather (the caller's: where
    its wrapper is built), none outside a process group of several ranks; ``advice`` goes into the error of a
    failed gather (a rank that reached it alone waits for the others until the process group's timeout).

    >>> refuse_apart(torch.nn.Linear(1, 1), None, "with_ddp", "")  # (no process group of several ranks)
    """
    if not _collective.active():
        return
    _collective.check_same(
        training_described(model, optimizer, ignored),
        f"{who}: requires_grad or the optimizer differs between the ranks ({why}; change requires_grad and the "
        "optimizer alike on every rank)", who, error=SyncRefusal, advice=advice)
