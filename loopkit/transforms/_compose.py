"""How gradient-level transforms find the train step they modify, and the errors when they cannot."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from loopkit.state import TrainState, leave_intact, state_at_error
from loopkit.steps import EvalStep, FnStep, Step, TrainStep, WrapperStep, as_step, innermost

__all__ = [
    "check_option_names", "fitted_to", "intact_as", "refuse_wrapping", "require_step",
    "require_train_or_eval_step", "require_train_step", "sync_refusal",
]


def check_option_names(
    transform: str, options: Mapping[str, Any], target: Callable[..., Any], takes: str, *,
    not_passed: Collection[str] = (), own: Collection[str] = (),
) -> None:
    """Refuse, with a ``TypeError`` naming ``transform`` and the option (and the nearest valid name, where one is
    close), an option that ``target`` (the torch callable ``transform`` passes ``options`` to, named ``takes``) does
    not take: torch would refuse it only when the wrapper is built, at the first step. ``not_passed`` are the
    parameters of ``target`` that cannot be given (``module``: loopkit passes its own), ``own`` the transform's own
    keywords, offered as near names too. A ``target`` that takes ``**kwargs`` (or has no signature) takes any name.

    >>> def fully_shard(module, *, mesh=None, reshard_after_forward=True): ...
    >>> check_option_names("with_fsdp", {"mesh": None}, fully_shard, "fully_shard", not_passed={"module"})
    >>> check_option_names("with_fsdp", {"reshard_after_foward": True}, fully_shard, "fully_shard")
    Traceback (most recent call last):
    ...
    TypeError: with_fsdp: reshard_after_foward= is not an option of with_fsdp nor of fully_shard; did you mean reshard_after_forward=?
    """
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # (no signature to read: torch checks the names itself)
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [p.name for p in parameters if p.kind in kinds and p.name not in not_passed and p.name != "self"]
    for name in options:
        if name not in valid:
            near = difflib.get_close_matches(name, [*own, *valid], n=1)
            hint = f"; did you mean {near[0]}=?" if near else f" (its options: {', '.join(valid)})"
            raise TypeError(f"{transform}: {name}= is not an option of {transform} nor of {takes}{hint}")


def _refuse(transform: str, step: Step, needs: str, takes: tuple[type, ...] = (TrainStep,)) -> TypeError:
    """Why ``transform``, which changes ``needs`` of a step of the kinds ``takes``, cannot wrap ``step``: the order
    that works, where whole-step transforms wrap such a step; else what is at their core instead.

    >>> def plain(state, batch): return state, {}
    >>> print(_refuse("with_grad_clip", as_step(plain), "the gradients"))
    with_grad_clip needs a loopkit train_step to reach the gradients; got the plain step plain
    >>> class Mine(Step): ...
    >>> print(_refuse("with_grad_clip", WrapperStep(Mine()), "the gradients"))
    with_grad_clip needs a loopkit train_step to reach the gradients; got the step Mine (a loopkit.Step subclass of one's own), inside WrapperStep
    """
    inside = getattr(step, "refused_inside", {}).get(transform)
    if inside is not None:  # the other order is refused too: no order to suggest
        return TypeError(f"{transform} cannot wrap {step.name}, nor go inside it: {inside}")
    core = innermost(step)
    within = "" if core is step else f", inside {', '.join(step.applied[len(core.applied):])}"
    if isinstance(core, takes):
        return TypeError(
            f"{transform} cannot wrap {step.name}: {transform} changes {needs}, which {step.name} hides; "
            f"apply {transform} first, e.g. {step.name}({transform}({core.applied[0]}(...)), ...)"
        )
    if isinstance(core, EvalStep):
        return TypeError(f"{transform} cannot wrap eval_step{within}: {transform} changes {needs}, and eval_step "
                         "computes none")
    got = (f"the plain step {core.applied[-1]}" if isinstance(core, FnStep)
           else f"the step {type(core).__qualname__} (a loopkit.Step subclass of one's own)")
    wanted = "train_step or eval_step" if EvalStep in takes else "train_step"
    return TypeError(f"{transform} needs a loopkit {wanted} to reach {needs}; got {got}{within}")


def require_train_step(step: Any, transform: str) -> TrainStep:
    """``step`` as a :class:`TrainStep`, or a ``TypeError`` naming ``transform`` and what it wraps.

    >>> from loopkit.steps import train_step
    >>> require_train_step(train_step(lambda m, b: None), "with_grad_clip").applied
    ('train_step',)
    """
    step = require_step(step, transform)
    if not isinstance(step, TrainStep):
        raise _refuse(transform, step, "the gradients and the update")
    return step


def require_train_or_eval_step(step: Any, transform: str) -> TrainStep | EvalStep:
    """``step`` as a :class:`TrainStep` or :class:`EvalStep`, or a ``TypeError`` naming both.

    >>> from loopkit.steps import eval_step
    >>> require_train_or_eval_step(eval_step(lambda m, b: {}), "with_amp").applied
    ('eval_step',)
    """
    step = require_step(step, transform)
    if isinstance(step, (EvalStep, TrainStep)):
        return step
    raise _refuse(transform, step, "the forward pass", (EvalStep, TrainStep))


def refuse_wrapping(step: Step, transform: str, reasons: dict[str, str]) -> None:
    """Raise ``TypeError`` if a whole-step transform named in ``reasons`` is anywhere inside ``step``.

    ``reasons`` maps a transform's name to why ``transform`` cannot go around it.

    >>> from loopkit.steps import train_step
    >>> refuse_wrapping(train_step(lambda m, b: None), "with_ema", {"with_ema": "one set of averages"})
    """
    wrapped: Any = step
    while isinstance(wrapped, WrapperStep):
        if wrapped.name in reasons:
            raise TypeError(f"{transform} cannot wrap {wrapped.name}: {reasons[wrapped.name]}")
        wrapped = wrapped.inner


def require_step(step: Any, transform: str, *, no_eval: str | None = None) -> Step:
    """``step`` as a :class:`Step` for a whole-step transform; refused if not callable or donated,
    and if ``no_eval`` (the reason) is given, when it is an ``eval_step``.

    >>> from loopkit.steps import eval_step
    >>> require_step(eval_step(lambda m, b: {}), "with_ema", no_eval="nothing to average")
    Traceback (most recent call last):
    ...
    TypeError: with_ema cannot wrap eval_step: nothing to average
    """
    if not callable(step):
        raise TypeError(f"{transform}: the step must be callable as step(state, batch), got {type(step).__qualname__}")
    step = as_step(step, f"{transform}: the step")
    fn = step.fn if isinstance(step, FnStep) else step
    takes = getattr(fn, "takes", None)  # a step of other states than one TrainState (ensemble.train_step)
    if isinstance(takes, str):
        raise TypeError(
            f"{transform} cannot wrap the ensemble step {getattr(fn, 'name', type(fn).__qualname__)}: it takes {takes}, "
            f"and {transform} works on one loopkit.TrainState; apply {transform} to a member's own loopkit.train_step "
            "(ensemble.unstack gives the members as states)"
        )
    if no_eval is not None and isinstance(step, EvalStep):
        raise TypeError(f"{transform} cannot wrap eval_step: {no_eval}")
    if step.donated:
        raise TypeError(f"{transform} cannot wrap a donated step: apply donate() last")
    refusal = sync_refusal(step, transform)
    if refusal is not None:
        raise TypeError(refusal)
    return step


def sync_refusal(step: Step, transform: str) -> str | None:
    """Why ``transform`` cannot go around ``step``'s data-parallel hook (``with_fsdp`` refuses some transforms,
    its ``refuses``), as the message of a ``TypeError`` naming both; None where it can. The hook is found in
    the train step at the core of ``step``, whatever whole-step transforms wrap it.

    >>> from loopkit.steps import train_step
    >>> print(sync_refusal(train_step(lambda m, b: None), "with_ema"))
    None
    """
    sync = getattr(innermost(step), "sync", None)
    reason = None if sync is None else sync.refuses.get(transform)
    return None if reason is None else f"{transform} cannot wrap {sync.name}: {reason}"


def fitted_to(tensor: Any, param: torch.Tensor, what: str, fix: str) -> torch.Tensor | None:
    """A transform's tensor for ``param`` (an average, a mask) checked against it: None when it fits as it
    is, a copy cast to the parameter's dtype and device when only those differ (as ``load_state_dict``
    casts: a float32 checkpoint restored into a float64 model); a ValueError that starts with ``what``
    and ends with ``fix`` when it is not a tensor, or has another shape (another model's).

    >>> print(fitted_to(torch.zeros(2), torch.ones(2), "the mask of 'w'", "drop it"))
    None
    >>> fitted_to(torch.zeros(2), torch.ones(2, dtype=torch.float64), "the mask of 'w'", "drop it").dtype
    torch.float64
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{what} is a {type(tensor).__qualname__}, not a tensor; {fix}")
    if tensor.shape != param.shape:
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, but the parameter has shape {tuple(param.shape)}; "
                         f"{fix}")
    if tensor.dtype != param.dtype or tensor.device != param.device:
        return tensor.detach().to(device=param.device, dtype=param.dtype)
    return None


def intact_as(error: BaseException, used: TrainState, given: TrainState) -> None:
    """Mark ``error`` as leaving ``given`` intact when it left ``used`` (``given`` with other extras) intact.

    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> used = state.evolve(extras={"cast": 1})
    >>> error = leave_intact(ValueError("x"), used)
    >>> intact_as(error, used, state)
    >>> state_at_error(error) is state
    True
    """
    if used is not given and state_at_error(error) is used:
        leave_intact(error, given)
