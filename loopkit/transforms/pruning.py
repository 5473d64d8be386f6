"""``with_pruning``: magnitude pruning on a schedule, the masks kept in the state.

>>> from loopkit.steps import train_step
>>> with_pruning(train_step(lambda m, b: None), amount=0.5, schedule=[10, 20]).applied
('train_step', 'with_pruning')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn.utils import prune

from loopkit.state import TrainState, leave_intact, replace
from loopkit.steps import Metrics, UpdateStep
from loopkit.transforms._compose import refuse_wrapping, require_step

__all__ = ["PruningStep", "default_prunable", "with_pruning"]

_MASKS, _SPARSITY = "pruning/masks", "pruning/sparsity"
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_prunable(model: nn.Module) -> list[str]:
    """The names of the weights of every ``Linear`` and ``Conv`` layer (what Lightning's ``ModelPruning`` prunes).

    >>> default_prunable(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)))
    ['0.weight', '2.weight']
    """
    return [f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, _PRUNABLE)]


def cubic_sparsity(amount: float, points: Sequence[int], step: int) -> float:
    """The target sparsity after update ``step``: ``amount * (1 - (1 - i/n)**3)`` at the i-th of n points.

    Zhu & Gupta's gradual pruning: fast at first, gentle near the end; 0 before the first point.

    >>> [round(cubic_sparsity(0.8, [10, 20, 30, 40], s), 4) for s in (5, 10, 20, 40, 50)]
    [0.0, 0.4625, 0.7, 0.8, 0.8]
    """
    done = sum(1 for p in points if p <= step)
    return amount * (1.0 - (1.0 - done / len(points)) ** 3)


def _global_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """New masks zeroing the ``sparsity`` fraction of all the weights with the smallest magnitude.

    One threshold over every pruned tensor (``torch.nn.utils.prune.global_unstructured``'s
    rule), computed by ``prune.L1Unstructured``; weights already masked stay masked.
    """
    flat = torch.cat([(w * m).reshape(-1) for w, m in zip(weights, masks)])
    flat_mask = torch.cat([m.reshape(-1) for m in masks])
    new = prune.L1Unstructured(amount=sparsity).compute_mask(flat, default_mask=flat_mask)
    return [part.view_as(w) for part, w in zip(new.split([w.numel() for w in weights]), weights)]


@attrs.frozen(eq=False, kw_only=True)
class PruningStep(UpdateStep):
    """The step :func:`with_pruning` returns.

    >>> from loopkit.steps import as_step
    >>> PruningStep(inner=as_step(lambda s, b: (s, {})), amount=0.5, schedule=lambda s: 0.5).name
    'with_pruning'
    """

    amount: float
    schedule: Callable[[int], float]
    parameters: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return "with_pruning"

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # it zeroes weights in place: a pure call works on a copy, whatever the inner step

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        masks = state.extras.get(_MASKS)
        if masks is None:
            # the names are checked before the step changes anything, never after an update: the names given
            # at every call until the first prune (a resumed run's first call too), the default ones (read off
            # the model) at the first call and before the update that prunes
            try:
                if (self.parameters is not None or state.step == 0
                        or self.schedule(state.step + 1) > state.extras.get(_SPARSITY, 0.0)):
                    _resolve(state.model, self._names(state))
            except (KeyError, ValueError) as error:
                raise leave_intact(error, state)
            return super().run_(state, batch)
        # a pruned entry's gradient is zero, as torch.nn.utils.prune's weight_orig * mask gives it: the hooks
        # scale each backward's gradient by the mask before it reaches .grad, for every gradient transform
        # and the optimizer to see; they are this call's only, removed whatever happens
        try:
            names, params = _resolve(state.model, list(masks))
        except KeyError as error:
            raise leave_intact(error, state)
        handles = [p.register_hook(_MaskGrad(masks[n])) for n, p in zip(names, params) if p.requires_grad]
        try:
            return super().run_(state, batch)
        finally:
            for handle in handles:
                handle.remove()

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        masks = state.extras.get(_MASKS)
        target = self.schedule(state.step)
        grows = target > state.extras.get(_SPARSITY, 0.0)  # a pruning point
        if masks is None and not grows:
            return state
        # the masks name what is pruned; the parameters are looked up only before the first prune
        names, params = _resolve(state.model, list(masks) if masks is not None else self._names(state))
        weights = [p.detach() for p in params]
        with torch.no_grad():
            if grows:
                old = [torch.ones_like(w) for w in weights] if masks is None else [masks[n] for n in names]
                masks = dict(zip(names, _global_masks(weights, old, target)))
                state = replace(state, extras={**state.extras, _MASKS: masks, _SPARSITY: float(target)})
            torch._foreach_mul_(weights, [masks[n] for n in names])  # pruned weights stay zero, whatever the optimizer did
        return state

    def _names(self, state: TrainState) -> list[str]:
        return list(self.parameters) if self.parameters is not None else default_prunable(state.model)


def _resolve(model: nn.Module, names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """The parameters ``names`` name in ``model``, each tensor once, under the first of its names.

    A weight shared by two modules (a language model's head tied to its embedding) has one name
    per module, and ``named_parameters()`` lists only the first: each name is looked up in its
    own module, and a shared tensor is pruned once (one mask, which every module using it sees).
    """
    kept: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for name in names:
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise KeyError(f"with_pruning: the model has no parameter '{name}'") from None
        if id(param) not in seen:
            seen.add(id(param))
            kept.append(name)
            params.append(param)
    return kept, params


@attrs.frozen(eq=False)
class _MaskGrad:
    """A gradient hook: the gradient times the mask (torch.nn.utils.prune's ``weight_orig`` gradient)."""

    mask: torch.Tensor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask


def with_pruning(
    step: Any,
    amount: float,
    schedule: Sequence[int] | Callable[[int], float],
    *,
    parameters: Sequence[str] | None = None,
) -> PruningStep:
    """Prune the smallest weights by magnitude, step by step, up to a fraction ``amount`` of them.

    ``schedule`` says when: a sequence of update counts (``state.step`` values) after which the
    sparsity grows, reaching ``amount`` at the last one along Zhu & Gupta's cubic ramp
    (:func:`cubic_sparsity`); or a function ``schedule(state.step) -> fraction of amount``
    (0 to 1, never decreasing), e.g. ``lambda s: 1.0 if s >= 100 else 0.0`` to prune once.
    ``parameters`` names the tensors to prune (default: the weights of every ``Linear`` and
    ``Conv`` layer); one threshold over all of them decides (global unstructured L1, as
    ``torch.nn.utils.prune.global_unstructured``); a weight that several modules share (a head
    tied to an embedding) is one tensor, pruned once under the first of its names, and every
    module that uses it sees it pruned. The masks live in ``state.extras``
    (``pruning/masks``, with ``pruning/sparsity``), so checkpoints carry them and the model's
    own state dict keeps its keys; after every update the pruned weights are set back to
    zero, so the model itself holds the pruned weights (export it as it is). A pruned
    weight's gradient is its gradient times the mask, zero (the gradient of
    ``torch.nn.utils.prune``'s ``weight_orig``), before gradient clipping, the NaN guard, a
    loss scaler or the optimizer sees it: the model's weights follow the raw loop's
    ``weight_orig * weight_mask``. Only an optimizer that reads a parameter's values across its
    entries tells them apart: Adafactor's relative step size (the parameter's RMS) reads the
    pruned weight here, ``weight_orig`` with its stale pruned entries there.

    Apply it inside ``with_ema``, ``with_logging`` and ``with_checkpointing``.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(10, 10)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_pruning(train_step(lambda m, b: m(b).pow(2).mean()), amount=0.6, schedule=[2, 4])
    >>> for _ in range(5):
    ...     state, _ = step(state, torch.ones(4, 10))
    >>> int((state.model.weight == 0).sum()), state.extras["pruning/sparsity"]
    (60, 0.6)
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 < amount < 1.0:
        raise ValueError(f"with_pruning: amount must be a fraction in (0, 1), e.g. 0.5, got {amount!r}")
    if callable(schedule):
        fraction = schedule
    elif isinstance(schedule, Sequence) and not isinstance(schedule, str) and schedule:
        points = list(schedule)
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in points) or points != sorted(set(points)):
            raise ValueError(f"with_pruning: schedule must be increasing update counts >= 1, got {schedule!r}")
        fraction = _CubicSchedule(tuple(points))
    else:
        raise TypeError(
            f"with_pruning: schedule must be a non-empty list of update counts or a function of the step, got {schedule!r}"
        )
    if parameters is not None and (isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters)):
        raise TypeError(f"with_pruning: parameters must be a list of parameter names, got {parameters!r}")
    inner = require_step(step, "with_pruning", no_eval="an evaluation step updates no weights to prune")
    later = "apply with_pruning first, e.g. {}(with_pruning(step, ...), ...)"
    refuse_wrapping(inner, "with_pruning", {
        "with_pruning": "the state holds one set of masks",
        "with_ema": "the averages would take in weights about to be pruned; " + later.format("with_ema"),
        "with_checkpointing": "its checkpoints would hold weights about to be pruned; " + later.format("with_checkpointing"),
    })
    amount = float(amount)
    return PruningStep(
        inner=inner,
        amount=amount,
        schedule=_Scaled(fraction, amount),
        parameters=None if parameters is None else tuple(parameters),
    )


@attrs.frozen
class _CubicSchedule:
    """The fraction of ``amount`` reached after update ``step`` on the cubic ramp over ``points``."""

    points: tuple[int, ...]

    def __call__(self, step: int) -> float:
        return cubic_sparsity(1.0, self.points, step)


@attrs.frozen
class _Scaled:
    """``amount * fraction(step)``, with the fraction checked to lie in [0, 1]."""

    fraction: Callable[[int], float]
    amount: float

    def __call__(self, step: int) -> float:
        value = self.fraction(step)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"with_pruning: schedule({step}) must be a fraction in [0, 1], got {value!r}")
        return self.amount * value
