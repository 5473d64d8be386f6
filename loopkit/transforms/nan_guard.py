"""``with_nan_guard``: keep non-finite losses and gradients away from the parameters.

>>> from loopkit.steps import train_step
>>> with_nan_guard(train_step(lambda m, b: None)).applied
('train_step', 'with_nan_guard')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch

from loopkit.errors import NonFiniteError
from loopkit.state import TrainState
from loopkit.steps import GradContext, Step
from loopkit.transforms._compose import require_train_step

__all__ = ["NanGuard", "with_nan_guard"]

_POLICIES = ("skip", "raise")


def _where(state: TrainState) -> str:
    return f"step {state.step} (epoch {state.epoch}, batch {state.batch_index - 1})"


@attrs.frozen
class NanGuard:
    """Checks the loss and the gradients for NaN/inf; flags the update to be skipped, or raises.

    >>> NanGuard("skip").name
    'with_nan_guard'
    """

    policy: str
    name: str = "with_nan_guard"
    metric_names: ClassVar[tuple[str, ...]] = ("nan_guard/skipped",)
    #: guards inside and outside accumulation report one flag, which the step writes once (any guard's skip)
    shares_metrics: ClassVar[bool] = True

    @property
    def keeps_buffers(self) -> bool:
        return self.policy == "skip"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """Under DDP a skip is agreed once an update, a raise at the loss and at the gradients (collectives; see
        :attr:`loopkit.steps.Step.rank_agreed`).

        >>> NanGuard("raise").agreed_options
        {'policy': 'raise'}
        """
        return {"policy": self.policy}

    @property
    def restores_buffers_on_raise(self) -> bool:
        """A raising guard puts back what the refused call's forward wrote into the buffers (``train_step`` copies them
        before each forward): BatchNorm statistics of a NaN batch would be NaN in the state left whole."""
        return self.policy == "raise"

    @property
    def refuses_grads(self) -> bool:
        """A raising guard refuses the gradients before the update: ``train_step`` gives them back then."""
        return self.policy == "raise"

    @property
    def refuses_on_every_rank(self) -> bool:
        """A raising guard's refusal is agreed over the ranks (every rank raises, or none does): under data
        parallelism ``train_step`` gives the gradients back then, where the call found none."""
        return self.policy == "raise"

    @property
    def check_loss(self) -> Callable[[torch.Tensor, TrainState], None] | None:
        """What ``train_step`` calls between the loss_fn and the backward (in one process): a raising guard's
        loss check, made while nothing of the state has changed (the error leaves it whole).

        >>> NanGuard("skip").check_loss is None, NanGuard("raise").check_loss is not None
        (True, True)
        """
        return _refuse_nonfinite_loss if self.policy == "raise" else None

    def on_loss(self, loss: torch.Tensor, state: TrainState, ctx: GradContext) -> None:
        if self.policy == "raise" and ctx.agree is None:  # checked before the backward (check_loss)
            return
        bad = (~torch.isfinite(loss.detach())).float()
        if self.policy == "raise":
            if ctx.agree is not None:  # under with_ddp: every rank raises, or none does
                bad = ctx.agree(bad)
            if bool(bad):
                ctx.agreed_refusal = True
                value = float(loss.detach())
                seen = f"{value}" if not math.isfinite(value) else f"on another rank; this rank's is {value}"
                raise NonFiniteError(f"with_nan_guard: non-finite loss ({seen}) at {_where(state)}")
        else:
            ctx.flag_nonfinite(bad)

    def on_grads(self, ctx: GradContext) -> None:
        if ctx.found_inf is not None or ctx.checked:  # a float16 loss scaler owns the skip; or checked before a clamp
            return
        found = ctx.unscale_and_check()
        if found is None:
            return
        if self.policy == "raise":
            if ctx.agree is not None:
                found = ctx.agree(found)
            if bool(found):
                ctx.agreed_refusal = True
                raise NonFiniteError(f"with_nan_guard: non-finite gradient of {_first_bad(ctx)} at {_where(ctx.state)}")
        else:
            ctx.flag_nonfinite(found)


def _refuse_nonfinite_loss(loss: torch.Tensor, state: TrainState) -> None:
    """Raise :class:`loopkit.NonFiniteError` for a non-finite loss of the call ``state`` is given to."""
    if not bool(torch.isfinite(loss.detach())):
        where = f"step {state.step} (epoch {state.epoch}, batch {state.batch_index})"
        raise NonFiniteError(f"with_nan_guard: non-finite loss ({float(loss.detach())}) at {where}")


def _first_bad(ctx: GradContext) -> str:
    for name, p in ctx.state.model.named_parameters():
        g = p.grad
        if g is not None and not bool(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all()):
            return f"'{name}'"
    return "a parameter"


def with_nan_guard(step: Any, policy: str = "skip") -> Step:
    """Never let a NaN or infinite loss or gradient reach the parameters.

    ``policy="skip"`` drops the update (under ``with_grad_accum``, the whole group's) and
    puts the model's buffers back as they were before it (BatchNorm statistics, QAT observers:
    a NaN batch would leave them NaN), reports metric ``nan_guard/skipped`` (1.0 on a skipped update) and counts skips in
    ``state.extras["nan_guard/skipped_total"]``; ``state.step`` and the scheduler do not
    advance. A skipped call adds nothing to ``run_epochs``' epoch means nor to ``with_logging``'s window: its
    record weighs ``1 - nan_guard/skipped`` in every other metric's mean (its NaN loss, the gradient norms of
    ``with_grad_clip``/``with_grad_norm``), on the device, as Lightning's ``training_step`` returning None before
    ``self.log`` leaves it out; ``nan_guard/skipped``'s own mean is the fraction of updates skipped, and a window of
    skipped calls alone has no mean of the others (no ``train/loss`` then). Under ``with_grad_accum`` the flag is
    the group's, reported by the call that ends it: the group's earlier micro-batches are left out with it.
    ``policy="raise"`` raises :class:`loopkit.NonFiniteError` naming the step and
    the loss or the parameter whose gradient was not finite. Deciding reads one flag per
    update on the host ("raise" reads one more per call: the loss, checked before the backward, so
    that a refused loss leaves the state whole even half-way through an accumulation group; and "raise"
    inside ``with_grad_accum`` reads the gradients' flag per micro-batch, not per update: two reads a call). Under float16 ``with_amp`` the loss
    scaler owns overflowing gradients (they are expected while it searches for a scale);
    the guard then checks the loss only, and its skip of a non-finite loss leaves the scale and
    its growth tracker as they were (``amp/skipped`` 0.0: the guard's skip, not an overflow).
    A ``with_grad_clip(max_value=...)`` inside the guard
    is checked by it before it clamps, since clamping makes an infinite gradient finite. A step has one guard: a
    second ``with_nan_guard`` (around ``with_grad_accum`` or not) is refused, since the inner one acts first.

    After a raise nothing is lost: a non-finite loss is refused before the backward, non-finite
    gradients before the update, and the gradients are given back as the call found them (none,
    or under ``with_grad_accum`` the group's sum so far, set apart while per-micro-batch transforms
    look at one micro-batch's). The state the call was given is whole, as after an error of the
    ``loss_fn``: a donated one stays usable and is :func:`loopkit.state_at_error` of the error,
    and under ``run_epochs`` that is the fit's newest whole state, at the failing batch. What the
    failing forward wrote into the model's buffers (BatchNorm statistics) is put back too: the step
    copies them before each forward (``policy="skip"`` once per group, to put them back on a skip).
    The state is used up where the refused gradient is already in a group's sum (the guard outside
    ``with_grad_accum`` finding the summed gradient bad). Under ``with_ddp`` and ``with_fsdp`` the loss is checked
    after the backward (every rank's backward takes part in the gradients' reduction) and every rank raises or none
    does (the flag agreed, a collective): a call that found no gradients (outside an accumulation group, and not the
    one that built the wrapper, whose build broadcast rank 0's weights) gives them back (None) and its buffers, and
    leaves the state whole on every rank, as in one process; inside a group the state is used up.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(1, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_nan_guard(train_step(lambda m, b: m(b).sum() * float("nan")))
    >>> new, metrics = step(state, torch.ones(1, 1))
    >>> new.step, float(metrics["nan_guard/skipped"])
    (0, 1.0)
    >>> from loopkit.state import state_at_error
    >>> from loopkit.steps import donate
    >>> raising = donate(with_nan_guard(train_step(lambda m, b: m(b).sum() * float("nan")), policy="raise"))
    >>> try:
    ...     raising(state, torch.ones(1, 1))
    ... except NonFiniteError as error:
    ...     print(error, state_at_error(error) is state)
    with_nan_guard: non-finite loss (nan) at step 0 (epoch 0, batch 0) True
    """
    if policy not in _POLICIES:
        raise ValueError(f"with_nan_guard: policy must be 'skip' or 'raise', got {policy!r}")
    base = require_train_step(step, "with_nan_guard")
    inside = next((t for t in base.micro + base.update if isinstance(t, NanGuard)), None)
    if inside is not None:
        raise TypeError(f"with_nan_guard cannot wrap with_nan_guard: the one inside (policy={inside.policy!r}) acts on "
                        f"the first non-finite loss or gradient, so this one (policy={policy!r}) would never see one; "
                        "apply with_nan_guard once, with the policy you want")
    guard = NanGuard(policy)
    guarded = base.add_grad_transform(guard)
    return attrs.evolve(guarded, micro=_checked_before_clamping(guarded.micro, guard),
                        update=_checked_before_clamping(guarded.update, guard))


def _checked_before_clamping(transforms: tuple[Any, ...], guard: NanGuard) -> tuple[Any, ...]:
    """``transforms`` with each one inside the guard that may make a non-finite gradient finite (its
    ``hides_nonfinite``: a value clipping, whose ``clip_grad_value_`` makes inf +-max_value) checked by the guard
    first, through its ``check`` field: what the guard saw after it would let the gradient through."""
    return tuple(
        attrs.evolve(t, check=guard.on_grads) if getattr(t, "hides_nonfinite", False) and t.check is None else t
        for t in transforms
    )
