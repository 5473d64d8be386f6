"""``with_grad_hook``: a function of yours that sees (and may change) the gradients before the update,
as Lightning's ``on_before_optimizer_step`` and ``on_after_backward``.

>>> from loopkit.steps import train_step
>>> with_grad_hook(train_step(lambda m, b: None), lambda state: None).applied
('train_step', 'with_grad_hook')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
import torch

from loopkit._calls import check_call
from loopkit._sharded import full, is_dtensor
from loopkit.state import TrainState, with_held_scheduler
from loopkit.steps import GradContext, Step, _fn_name, check_metric
from loopkit.transforms._compose import require_train_step

__all__ = ["GradHook", "with_grad_hook"]

HookFn = Callable[[TrainState], "Mapping[str, Any] | None"]


@attrs.frozen
class GradHook:
    """Calls ``fn(state)`` where the gradients are ready, and adds the metrics it returns.

    >>> GradHook(print).name
    'with_grad_hook'
    """

    fn: HookFn
    name: str = "with_grad_hook"
    #: the fn may raise (or return what is refused) after the backward, before the update: in one process,
    #: ``train_step`` then gives the parameters the gradients they had back, and the state stays usable, unless
    #: the call added into gradients held from before (outside ``with_grad_accum``, at a group's last micro-batch);
    #: at an epoch's flush of a partial group (no backward there), the flush's state stays whole, the group's sums kept
    refuses_grads: ClassVar[bool] = True

    def on_loss(self, loss: torch.Tensor, state: TrainState, ctx: GradContext) -> None:
        pass

    def on_grads(self, ctx: GradContext) -> None:
        out = self.fn(with_held_scheduler(ctx.state))  # (under a scheduler transform: the scheduler itself)
        ctx.refresh_params()  # it may have given a parameter a gradient, or taken one away (p.grad = None)
        if out is None:
            return
        where = f"with_grad_hook's fn {_fn_name(self.fn)}"
        if not isinstance(out, Mapping):
            hint = " (an in-place op such as p.grad.mul_(...) returns its tensor: end the fn with return None)" if (
                isinstance(out, torch.Tensor)) else ""
            raise TypeError(f"{where} returned a {type(out).__qualname__}; expected a dict of metrics or None{hint}")
        for key, value in out.items():
            if is_dtensor(value):  # (under with_fsdp: a reduction over sharded gradients, gathered on every rank)
                value = full(value)
            metric = check_metric(value, key, where)
            owner = "the step" if key in ctx.metrics or key == "loss" else ctx.taken_by(key)  # (a flush has no loss)
            if owner is not None:
                raise ValueError(f"{where} returned a metric named {key!r}, which {owner} reports too; rename it")
            ctx.metrics[key] = metric


def _check_takes_state(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"with_grad_hook: fn must be callable as fn(state), got {type(fn).__qualname__}")
    check_call(fn, f"with_grad_hook: fn {_fn_name(fn)} must take one argument, the state", None)


def with_grad_hook(step: Any, fn: HookFn) -> Step:
    """Call ``fn(state)`` once the gradients are ready, before the optimizer update: Lightning's
    ``on_before_optimizer_step`` (outside ``with_grad_accum``) and ``on_after_backward`` (inside it).

    ``fn`` reads ``p.grad`` of ``state.model``'s parameters, may change them in place or set them
    (``p.grad = None`` leaves a parameter out of this update; a gradient given to a parameter
    without one takes part in it): the transforms after it and the update use what it leaves. It
    returns ``None`` or a dict of metrics, named apart from the step's other metrics (0-dim tensors or numbers: keep
    them tensors, reading one on the host syncs the device), reported with the step's metrics
    (``with_logging`` logs them as ``train/<name>``). ``state.step`` is the number of updates
    before this one, as Lightning's ``global_step`` in its hook. ``state.scheduler`` is the state's
    scheduler (Lightning's ``self.lr_schedulers()``), also under ``with_step_scheduler`` or
    ``with_epoch_scheduler``, which hold it still in the inner step and step it after:
    ``get_last_lr()`` is the rate of the update to come (none in ``with_swa``'s SWA epochs, where
    SWALR's rates train). Where it runs follows the nesting,
    as for the other gradient transforms: outside ``with_grad_accum``, once per update on the summed
    gradient; inside it, on each micro-batch's own gradient (Lightning's ``on_after_backward`` sees
    the running sum); under float16 ``with_amp``, after unscaling (Lightning's ``on_after_backward``
    sees scaled gradients); inside ``with_grad_clip``, before clipping, as Lightning's hook. It must
    not replace the parameters or call the optimizer. A ``fn`` that raises (or returns what is refused)
    in one process leaves the state before the call whole (:func:`loopkit.state_at_error`), the call's
    gradients dropped: without ``with_grad_accum``, inside it (each micro-batch's gradient is set apart
    from the group's sum), and at an epoch's flush; outside it, at a group's last micro-batch, that
    batch's backward has added into the group's sum in place (no second set of gradients is kept, as
    in a raw loop), so no state is whole then: put a hook that may fail inside ``with_grad_accum``, or
    relaunch from a checkpoint. A guard sees what the hook leaves only from
    outside it: ``with_nan_guard(with_grad_hook(step, fn))``. Under ``with_ddp`` it sees the averaged
    gradients (outside accumulation) on every rank; whatever it changes must be the same on each.
    Under ``with_fsdp`` each ``p.grad`` is a ``DTensor`` holding this rank's shard: change it in
    place elementwise; a metric computed from it (``p.grad.norm()``) is gathered to its whole value.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> def freeze_bias(state):  # gradient surgery, and a metric
    ...     state.model.bias.grad.zero_()
    ...     return {"weight_grad_max": state.model.weight.grad.abs().max()}
    >>> step = with_grad_hook(train_step(lambda m, b: m(b).sum()), freeze_bias)
    >>> bias = model.bias.clone()
    >>> state, metrics = step(state, torch.ones(3, 2))
    >>> sorted(metrics), torch.equal(state.model.bias, bias)
    (['loss', 'weight_grad_max'], True)
    """
    _check_takes_state(fn)
    base = require_train_step(step, "with_grad_hook")
    return base.add_grad_transform(GradHook(fn))
