"""``with_grad_clip``: clip gradients by norm and/or value before the update (neither: only report their norm).

>>> from loopkit.steps import train_step
>>> with_grad_clip(train_step(lambda m, b: None), max_norm=1.0).applied
('train_step', 'with_grad_clip')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch

from loopkit._numbers import as_norm_type, as_real
from loopkit._sharded import is_dtensor, local, norms
from loopkit.state import TrainState
from loopkit.steps import GradContext, Step
from loopkit.transforms._compose import require_train_step

__all__ = ["ClipGrad", "with_grad_clip"]


@attrs.frozen
class ClipGrad:
    """Clips with ``torch.nn.utils.clip_grad_value_`` then ``clip_grad_norm_``; reports ``grad_norm``
    (neither ``max_norm`` nor ``max_value``: clips nothing, reports the norm).

    >>> ClipGrad(max_norm=1.0).name
    'with_grad_clip'
    """

    max_norm: float | None = None
    max_value: float | None = None
    norm_type: float = 2.0
    name: str = "with_grad_clip"
    #: a guard's check of the gradients, run before a value clipping: clamping turns inf into +-max_value, so
    #: a ``with_nan_guard`` outside would see nothing (set by ``with_nan_guard`` around it: see ``hides_nonfinite``)
    check: Callable[[GradContext], None] | None = None
    #: it may refuse the gradients after the backward (a sparse one; a complex one under ``max_value``): in one
    #: process ``train_step`` then gives the parameters the gradients they had back, so the state stays whole
    #: (outside ``with_grad_accum`` it refuses them at a group's first call already: see :meth:`refuse_early`)
    refuses_grads: ClassVar[bool] = True

    @property
    def hides_nonfinite(self) -> bool:
        """Whether it may make a non-finite gradient finite (clamping by value does): a guard around it then checks
        the gradients through its ``check``, before it acts.

        >>> ClipGrad(max_value=1.0).hides_nonfinite, ClipGrad(max_norm=1.0).hides_nonfinite
        (True, False)
        """
        return self.max_value is not None
    metric_names: ClassVar[tuple[str, ...]] = ("grad_norm",)

    @property
    def agreed_options(self) -> dict[str, Any]:
        """What every rank must give alike (see :attr:`loopkit.steps.Step.rank_agreed`): under ``with_fsdp`` the norm
        is one all-reduce over the shards (``norm_type`` picks its op, sum or max) and ``max_value`` with ``max_norm``
        makes a second; under either parallel transform a rank that clipped otherwise would update its replica or its
        shard by other gradients than the others.

        >>> ClipGrad(max_norm=1.0).agreed_options
        {'max_norm': 1.0, 'max_value': None, 'norm_type': 2.0}
        """
        return {"max_norm": self.max_norm, "max_value": self.max_value, "norm_type": self.norm_type}

    def on_loss(self, loss: torch.Tensor, state: TrainState, ctx: GradContext) -> None:
        pass

    def on_grads(self, ctx: GradContext) -> None:
        if not ctx.params:  # no parameter of the optimizer got a gradient: torch's norm of nothing, 0
            ctx.metrics["grad_norm"] = _zero_norm(ctx)
            return
        try:
            self._clip(ctx)
        except (NotImplementedError, RuntimeError) as error:
            refusal = self._refusal(ctx)
            if refusal is None:
                raise
            raise refusal from error

    def refuse_early(self, ctx: GradContext) -> None:
        """Refuse, at an accumulation group's first call, a kind of gradient :meth:`on_grads` will not take at the
        group's last (when the group's earlier gradients, summed in the parameters' own, could not be given back)."""
        refusal = self._refusal(ctx)
        if refusal is not None:
            raise refusal

    def _refusal(self, ctx: GradContext) -> TypeError | None:
        """Why torch's clipping fails, naming the parameter: a gradient of the optimizer's (what it clips) it does not
        take."""
        clipped = {id(p) for p in ctx.params}
        for name, p in ctx.state.model.named_parameters():
            if id(p) not in clipped:
                continue
            if p.grad is not None and p.grad.is_sparse:
                return TypeError(
                    f"with_grad_clip: parameter {name!r} has a sparse gradient (an nn.Embedding(sparse=True)?), "
                    "which torch.nn.utils.clip_grad_norm_ and clip_grad_value_ do not take; use a dense gradient "
                    "(sparse=False) or leave with_grad_clip out"
                )
            if p.grad is not None and p.grad.is_complex() and self.max_value is not None:
                return TypeError(
                    f"with_grad_clip: parameter {name!r} has a complex gradient, which "
                    "torch.nn.utils.clip_grad_value_ (max_value) does not take; clip by max_norm only"
                )
        return None

    def _clip(self, ctx: GradContext) -> None:
        params = ctx.params
        if self.check is not None and self.hides_nonfinite:
            self.check(ctx)
            ctx.checked = True  # (the guard's own turn, after the clamping, has nothing left to find)
        if any(is_dtensor(g) for g in ctx.grads):  # under with_fsdp: one all-reduce a norm, not torch's two for inf
            ctx.metrics["grad_norm"] = self._clip_sharded(ctx)
            return
        if self.max_value is None and self.max_norm is None:  # clips nothing: the norm only
            norm = torch.nn.utils.get_total_norm(ctx.grads, self.norm_type)
        elif self.max_value is None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)  # type: ignore[arg-type]
        else:
            norm = torch.nn.utils.get_total_norm(ctx.grads, self.norm_type)
            torch.nn.utils.clip_grad_value_(params, self.max_value)
            if self.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)
        ctx.metrics["grad_norm"] = norm

    def _clip_sharded(self, ctx: GradContext) -> torch.Tensor:
        """``_clip`` of sharded gradients (``DTensor``): torch's formulas on each rank's shards, the total norm over
        every shard taken with one all-reduce (:func:`loopkit._sharded.norms`; ``clip_grad_norm_`` of DTensors makes
        one for a 2-norm but two for inf, and its returned norm is then a partial one, reduced once more). The norm
        before clipping, a plain tensor."""
        norm = self._total_norm(ctx.grads)
        if self.max_value is not None:
            torch.nn.utils.clip_grad_value_(ctx.params, self.max_value)  # (elementwise: each shard on its own)
        if self.max_norm is not None:
            total = norm if self.max_value is None else self._total_norm(ctx.grads)  # (after the value clipping)
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grads_with_norm_
            shards: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for g in ctx.grads:
                shards.setdefault((local(g).device, local(g).dtype), []).append(local(g))
            for (device, _), members in shards.items():
                torch._foreach_mul_(members, coef.to(device))
        return norm

    def _total_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The ``norm_type``-norm of all ``grads`` as one vector (the norm of their norms, as torch's
        ``get_total_norm``), over every rank's shard."""
        each = norms(grads, self.norm_type)
        device = each[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(device) for n in each]), self.norm_type)


def _zero_norm(ctx: GradContext) -> torch.Tensor:
    """A 0-dim zero norm on the optimizer's first parameter's device, of its real dtype (as a norm of its
    gradient would be): what ``clip_grad_norm_`` returns for no gradients, made without a host sync."""
    first = local(next(p for group in ctx.state.optimizer.param_groups for p in group["params"]))
    dtype = first.real.dtype if first.is_floating_point() or first.is_complex() else torch.get_default_dtype()
    return torch.zeros((), dtype=dtype, device=first.device)


def with_grad_clip(
    step: Any, max_norm: float | None = None, max_value: float | None = None, *, norm_type: float | str = 2.0
) -> Step:
    """Clip the gradients before the optimizer update; report their total norm as ``grad_norm``.

    ``max_norm`` rescales all gradients together so that their total ``norm_type``-norm is at
    most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``); ``max_value`` clamps each element
    to ``[-max_value, max_value]``. Under float16 ``with_amp`` the gradients are unscaled
    first. Outside ``with_grad_accum`` it clips the summed gradient once per update; inside, it
    clips each micro-batch's gradient. ``grad_norm`` is the norm before clipping. Under ``with_fsdp``
    the norm is over every rank's shard (one all-reduce; two with both ``max_value`` and ``max_norm``,
    whose norm is taken again after the value clipping, as torch's). Neither ``max_norm`` nor ``max_value``
    (Lightning's ``gradient_clip_val=None``) clips nothing and only reports ``grad_norm``. A gradient torch's
    clipping does not take (a sparse one; a complex one under ``max_value``) is refused with a TypeError, the
    parameters given back the gradients they had, so the state stays whole (in one process; not outside
    ``with_grad_accum``, where the refusing call added its gradients into the group's sum).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_grad_clip(train_step(lambda m, b: m(b).sum() * 100), max_norm=1.0)
    >>> state, metrics = step(state, torch.ones(4, 2))
    >>> float(metrics["grad_norm"]) > 1.0
    True

    The bare call clips nothing and reports the norm (the total 2-norm):

    >>> state, metrics = with_grad_clip(train_step(lambda m, b: m(b).sum()))(state, torch.ones(4, 2))
    >>> round(float(metrics["grad_norm"]), 4) == round(4 * 3 ** 0.5, 4)  # d/dw: (4, 4), d/db: 4
    True
    """
    for name, value in (("max_norm", max_norm), ("max_value", max_value)):
        if value is not None and not (as_real(value) or 0) > 0:
            raise ValueError(f"with_grad_clip: {name} must be a positive number, got {value!r}")
    order = as_norm_type(norm_type)  # as torch's clip_grad_norm_: a number, or "inf"
    if order is None:
        raise ValueError(f"with_grad_clip: norm_type must be a positive number or 'inf', got {norm_type!r}")
    max_norm, max_value = (None if v is None else as_real(v) for v in (max_norm, max_value))
    base = require_train_step(step, "with_grad_clip")
    return base.add_grad_transform(ClipGrad(max_norm, max_value, order))
