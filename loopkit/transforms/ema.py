"""``with_ema``: an exponential moving average of the parameters, kept in the state.

>>> from loopkit.steps import train_step
>>> with_ema(train_step(lambda m, b: None), decay=0.99).applied
('train_step', 'with_ema')
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import nn

from loopkit._numbers import as_int, as_real
from loopkit.state import TrainState, core_module, fork, leave_intact, plain_names, replace, replace_extras
from loopkit.steps import Metrics, Step, UpdateStep
from loopkit.transforms._compose import fitted_to, intact_as, refuse_wrapping, require_step
from loopkit.transforms.pruning import _MASKS as _PRUNING_MASKS
from loopkit.transforms.pruning import _fitted_state as _fitted_masks

__all__ = ["EMAStep", "ema_state", "with_ema"]

_EMA = "ema/params"
#: the last epoch (0-based) at whose end the averages moved (``update_starting_at_epoch``), as Lightning's
#: ``_latest_update_epoch``: an epoch's end updates them once, however often it is flushed (a resumed run's flush)
_LATEST_EPOCH = "ema/latest_update_epoch"
#: how an update moves the averages: ``torch.lerp`` (``get_ema_multi_avg_fn``) or ``decay * ema + (1 - decay) * param``
#: (``get_ema_avg_fn``, Lightning's ``EMAWeightAveraging``)
Formula = Literal["lerp", "weighted_sum"]
_FORMULAS = ("lerp", "weighted_sum")
#: what to do about averages that do not fit the model (the end of each such error)
_FIX = (
    f"the averages belong to another model: to average this one anew from its parameters, drop '{_EMA}' from the "
    f"state's extras (state.evolve(extras={{k: v for k, v in state.extras.items() if k != '{_EMA}'}})), or "
    "restore a checkpoint of this model"
)


def _parameters(state: TrainState) -> tuple[list[str], list[torch.Tensor]]:
    names, params = [], []
    for name, p in core_module(state.model).named_parameters():
        names.append(name)
        params.append(p.detach())
    return names, params


def _averaged(
    previous: Mapping[str, torch.Tensor] | None, names: list[str], params: list[torch.Tensor], decay: float,
    formula: Formula = "lerp",
) -> dict[str, torch.Tensor]:
    """The new averages after an update, as new tensors: ``torch.lerp(ema, param, 1 - decay)`` (``formula="lerp"``,
    ``get_ema_multi_avg_fn``'s arithmetic) or ``decay * ema + (1 - decay) * param`` (``"weighted_sum"``,
    ``get_ema_avg_fn``'s); the two differ in the last bits (about 1e-7 for float32 weights of order 1).

    The first update (``previous`` None) copies the parameters (as ``torch.optim.swa_utils.AveragedModel``
    does). The tensors of ``previous`` are never changed in place: an earlier state keeps its own.
    """
    if previous is None:
        return {name: p.clone() for name, p in zip(names, params)}
    ema = [previous[name] for name in names]
    if formula == "weighted_sum":
        return _weighted_sums(names, ema, params, decay)
    try:
        return dict(zip(names, torch._foreach_lerp(ema, params, 1.0 - decay)))
    except (NotImplementedError, RuntimeError):
        if all(e.is_floating_point() or e.is_complex() for e in ema):
            raise
    # an integer parameter (frozen): averaged and cast back, as AveragedModel's get_ema_multi_avg_fn does
    return {
        name: torch.lerp(e, p, 1.0 - decay) if e.is_floating_point() or e.is_complex() else (e * decay + p * (1 - decay)).to(e.dtype)
        for name, e, p in zip(names, ema, params)
    }


def _weighted_sums(
    names: list[str], ema: list[torch.Tensor], params: list[torch.Tensor], decay: float
) -> dict[str, torch.Tensor]:
    """``decay * ema + (1 - decay) * param`` for each tensor, torch's ``get_ema_avg_fn(decay)`` (what Lightning's
    ``EMAWeightAveraging`` gives ``AveragedModel``) written out, each cast back to its average's dtype as
    ``AveragedModel.update_parameters`` copies it into the average (an integer parameter's truncated)."""
    out = {}
    for name, e, p in zip(names, ema, params):
        new = decay * e + (1 - decay) * p
        out[name] = new if new.dtype == e.dtype else new.to(e.dtype)
    return out


class _Checked:
    """The averages mapping an :class:`EMAStep` last found to fit a model (or made from it), and that model.

    A call returns a state whose averages are a new mapping made from its model's parameters,
    and the next call gets that state (a donated run keeps the same model): the full check runs
    only when a state brings other averages, another model or another optimizer (``evolve``, a
    checkpoint, the copy of the model a pure call makes, a new head with its new optimizer, an
    ``add_param_group``), or when the model's parameters moved to another dtype or device in
    place (``run_epochs(device=...)`` moves the model, not the extras), which one parameter,
    remembered with its dtype and device, tells. The model, optimizer and that parameter are
    held weakly; the averages, which the state returned holds anyway, strongly (the ``id`` of a
    freed mapping is soon another's).
    """

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple[Any, ...] | None = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Checked, ()  # a copied or pickled step checks its first state again (weak references do not pickle)

    def fits(self, averages: Mapping[str, torch.Tensor], state: TrainState) -> bool:
        entry = self.entry  # read once: remember swaps the whole tuple
        if entry is None or entry[0] is not averages or entry[1]() is not state.model or not _same_groups(entry[2], state):
            return False
        if entry[3] is None:  # a model without parameters
            return True
        probe = entry[3]()
        return probe is not None and probe.dtype == entry[4] and probe.device == entry[5]

    def remember(self, averages: Mapping[str, torch.Tensor], state: TrainState) -> None:
        """``averages`` fit ``state``'s model."""
        model = state.model
        probe = next(iter(model.parameters()), None)  # the Parameter itself: .to() changes its dtype and device
        if probe is None:
            self.entry = (averages, weakref.ref(model), _groups(state), None, None, None)
        else:
            self.entry = (averages, weakref.ref(model), _groups(state), weakref.ref(probe), probe.dtype, probe.device)


def _groups(state: TrainState) -> tuple[Any, int]:
    """The optimizer (held weakly) and how many param groups it has."""
    optimizer = state.optimizer
    return (None, 0) if optimizer is None else (weakref.ref(optimizer), len(optimizer.param_groups))


def _same_groups(remembered: tuple[Any, int], state: TrainState) -> bool:
    optimizer = state.optimizer
    if optimizer is None:
        return remembered[0] is None
    return remembered[0] is not None and remembered[0]() is optimizer and remembered[1] == len(optimizer.param_groups)


def _fitted(averages: Any, model: nn.Module, where: str, key: str = _EMA, fix: str = _FIX) -> Mapping[str, torch.Tensor]:
    """``averages`` checked against ``model``'s parameters: one of the same shape for each, and no other.

    ``key`` is where the state's extras hold them, ``fix`` what to do about ones that do not fit
    (with_ema's by default; :mod:`loopkit.transforms.swa` passes its own).

    A missing, extra or mis-shaped average is a ValueError that says which and what to do. An
    average whose dtype or device differs only is cast to its parameter's, as
    ``model.load_state_dict`` casts its values; ``averages`` comes back as it is when none needed it.
    Averages named as a compiled model names its tensors (``_orig_mod.0.weight``: an older
    checkpoint's), every one of them, are checked, and come back, under the plain names (``0.weight``).
    """
    if not isinstance(averages, Mapping):
        raise ValueError(
            f"{where}: state.extras['{key}'] must map parameter names to averages, got {type(averages).__qualname__}; "
            + fix
        )
    renamed = plain_names(averages, model)  # (this check runs once per state the step has not seen fit)
    if renamed is not None:
        averages = renamed
    cast: dict[str, torch.Tensor] = {}
    names = set()
    for name, param in model.named_parameters():
        names.add(name)
        if name not in averages:
            raise ValueError(f"{where}: the state's averages hold no average of parameter '{name}' "
                             f"(shape {tuple(param.shape)}); {fix}")
        fitted = fitted_to(averages[name], param, f"{where}: the average of parameter '{name}'", fix)
        if fitted is not None:
            cast[name] = fitted
    for name in averages:
        if name not in names:
            raise ValueError(f"{where}: the state's averages hold one of '{name}', which is not a parameter of the "
                             f"model; {fix}")
    return {**averages, **cast} if cast else averages


@attrs.frozen(eq=False)
class EMAStep(UpdateStep):
    """The step :func:`with_ema` returns: after each optimizer update, the averages move toward the parameters.

    >>> from loopkit.steps import as_step
    >>> EMAStep(as_step(lambda s, b: (s, {})), decay=0.9).name
    'with_ema'
    """

    decay: float = 0.999
    #: Lightning's ``EMAWeightAveraging`` options, as :func:`with_ema` takes them (``update_starting_at_step`` None
    #: is 0: from the first update)
    update_every_n_steps: int = 1
    update_starting_at_step: int = 0
    update_starting_at_epoch: int | None = None
    formula: Formula = "lerp"
    # shared with the donated copy of the step that run_epochs makes (attrs.evolve): what it found holds for both
    _checked: _Checked = attrs.field(factory=_Checked, repr=False)

    @property
    def name(self) -> str:
        return "with_ema"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """What decides the averages: each rank averages its replica, and another decay, formula or schedule of
        updates on one rank would give the ranks other averaged models (rank 0's checkpointed, each rank's
        evaluated: see :attr:`loopkit.steps.Step.rank_agreed`). Described as they act: with
        ``update_every_n_steps=0`` no update follows a step, and ``update_starting_at_step`` is None.

        >>> from loopkit.steps import as_step
        >>> EMAStep(as_step(lambda s, b: (s, {})), decay=0.9).agreed_options  # doctest: +NORMALIZE_WHITESPACE
        {'decay': 0.9, 'formula': 'lerp', 'update_every_n_steps': 1, 'update_starting_at_step': 0,
         'update_starting_at_epoch': None}
        """
        every = self.update_every_n_steps
        return {"decay": self.decay, "formula": self.formula, "update_every_n_steps": every,
                "update_starting_at_step": self.update_starting_at_step if every else None,
                "update_starting_at_epoch": self.update_starting_at_epoch}

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        return self._checked_call(super().run_, state, batch)

    def flush_(self, state: TrainState) -> tuple[TrainState, Metrics]:
        return self._checked_call(self._flush_and_end_epoch, state)

    def after_update(self, state: TrainState, metrics: Metrics) -> TrainState:
        return self._updated(state) if self._updates_after_step(state.step - 1) else state

    def _updates_after_step(self, step_index: int) -> bool:
        """Whether the averages move after the update of 0-based index ``step_index`` (``state.step - 1``): Lightning's
        ``EMAWeightAveraging.should_update(step_idx=...)``, every ``update_every_n_steps``-th index counted from 0
        (not from the start), from ``update_starting_at_step`` on."""
        every = self.update_every_n_steps
        return every > 0 and step_index >= self.update_starting_at_step and step_index % every == 0

    def _flush_and_end_epoch(self, state: TrainState) -> tuple[TrainState, Metrics]:
        """The inner flush (a partial group's update, and its averaging), then the epoch's own update when
        ``update_starting_at_epoch`` asks for it: Lightning's ``on_train_epoch_end``, once per epoch."""
        new, metrics = super().flush_(state)
        start = self.update_starting_at_epoch
        if start is None or new.epoch < start or new.extras.get(_LATEST_EPOCH, -1) >= new.epoch:
            return new, metrics
        new = self._updated(new)
        return replace_extras(new, {**new.extras, _LATEST_EPOCH: new.epoch}), metrics

    def _updated(self, state: TrainState) -> TrainState:
        """``state`` with its averages moved toward its parameters (the first update copies them)."""
        with torch.no_grad():
            averages = _averaged(state.extras.get(_EMA), *_parameters(state), self.decay, self.formula)
        self._checked.remember(averages, state)  # made from the model's parameters: they fit it
        return replace_extras(state, {**state.extras, _EMA: averages})

    def _checked_call(self, call: Any, state: TrainState, *args: Any) -> tuple[TrainState, Metrics]:
        """``call(state, *args)`` once the averages are known to fit the model, before anything changes.

        Averages of another model (``state.evolve(model=...)``, a checkpoint's extras) would fail
        only after the update, in torch's lerp, naming neither; here they fail first, naming the
        parameter, and the given state stays usable. Averages whose dtype or device differ only
        (a float32 checkpoint restored into a float64 template) are cast once: the call goes on
        with, and returns, a state holding the cast averages.
        """
        averages = state.extras.get(_EMA)
        if averages is None or self._checked.fits(averages, state):
            return call(state, *args)
        try:
            fitted = _fitted(averages, core_module(state.model), "with_ema")
        except ValueError as error:
            raise leave_intact(error, state)
        self._checked.remember(fitted, state)
        if fitted is averages:
            return call(state, *args)
        given, state = state, replace_extras(state, {**state.extras, _EMA: fitted})
        try:
            return call(state, *args)
        except BaseException as error:
            intact_as(error, state, given)  # nothing changed in place: neither did the given state
            raise


def with_ema(
    step: Any,
    decay: float,
    *,
    update_every_n_steps: int = 1,
    update_starting_at_step: int | None = None,
    update_starting_at_epoch: int | None = None,
    formula: Formula = "lerp",
) -> Step:
    """Keep an exponential moving average of the model's parameters in ``state.extras``.

    After each optimizer update (once per group under ``with_grad_accum``; not after an
    update that ``with_nan_guard`` or float16 ``with_amp`` skipped) every parameter's
    average moves: ``ema = decay * ema + (1 - decay) * param``. The first update copies the
    parameters. This is ``torch.optim.swa_utils.AveragedModel`` with
    ``get_ema_multi_avg_fn(decay)``, the same arithmetic (``torch.lerp(ema, param, 1 - decay)``);
    buffers (BatchNorm statistics) are not averaged, as there. The averages are part of the
    state: a step stays pure (new tensors each update), and checkpoints carry them.
    :func:`ema_state` gives a state whose model holds the averages, to evaluate, predict or
    export (pruned weights, under ``with_pruning``, stay pruned there).

    Lightning's ``EMAWeightAveraging(decay, update_every_n_steps, update_starting_at_step,
    update_starting_at_epoch)`` computes ``decay * ema + (1 - decay) * param``
    (``get_ema_avg_fn``), which differs from the lerp in the last bits (about 1e-7 for
    float32 weights of order 1); ``formula="weighted_sum"`` computes that instead, so a
    port's averages are Lightning's bitwise. Its options mean here what they mean there,
    an update's 0-based index being ``state.step - 1`` after it:

    - ``update_every_n_steps`` (default 1): the averages move after the updates whose index
      is a multiple of it (counted from 0, not from the start step); 0: after none (then give
      ``update_starting_at_epoch``);
    - ``update_starting_at_step`` (default None, which is 0): not after an update of a
      smaller index (a warm-up: the first update at or after it copies the parameters);
    - ``update_starting_at_epoch`` (default None: never): also at the end of every epoch from
      this one on (0-based ``state.epoch``), once per epoch, as Lightning's
      ``on_train_epoch_end``: in addition to the step updates (Lightning's too: with the
      default ``update_every_n_steps=1`` an epoch's last weights are averaged in twice; pass
      ``update_every_n_steps=0`` to average once per epoch). The epoch's end is
      ``run_epochs``' flush of it: an epoch a fit leaves unfinished (``max_steps`` or a stop
      mid-epoch) is averaged in when a resumed run finishes it, where Lightning's callback
      updates at the stop too. The last epoch so averaged is kept in ``state.extras``
      (``ema/latest_update_epoch``), so a checkpoint resumes exactly.

    Until the first update there are no averages (:func:`ema_state` refuses such a state
    past step 0; Lightning's average is the initial weights then). Updates are counted as
    ``state.step`` counts them (a skipped one not; Lightning counts an update float16 AMP
    skipped, and averages after it).

    The averages are checked against the model before the step changes anything: averages of
    another model (a state given a new model with ``evolve``) are refused with a ValueError
    naming the parameter and both shapes, and the given state stays usable; averages whose
    dtype or device differs only (a float32 checkpoint restored into a float64 template) are
    cast to the parameters' once, and the state returned holds the cast averages. Averages
    named as a compiled model names its parameters (``_orig_mod.0.weight``: a compiled
    model's checkpoint from an older loopkit) are taken under the plain names
    (``0.weight``) when all are so named, as the model's own state dict is. The check runs
    again only for a state whose averages or model are not the ones the step last saw.

    Apply it inside ``with_checkpointing`` and ``with_logging``
    (``with_checkpointing(with_ema(step, 0.999), ...)``) so that a checkpoint holds the
    averages of the update it was taken after.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_ema(train_step(lambda m, b: m(b).pow(2).mean()), decay=0.9)
    >>> for _ in range(3):
    ...     state, _ = step(state, torch.ones(4, 2))
    >>> averaged = ema_state(state)
    >>> bool(torch.equal(averaged.model.weight, state.model.weight))  # the average lags the weights
    False
    """
    decay_ = as_real(decay)
    if decay_ is None or not 0.0 <= decay_ < 1.0:
        raise ValueError(f"with_ema: decay must be a number in [0, 1), e.g. 0.999, got {decay!r}")
    every = _count(update_every_n_steps, "update_every_n_steps")
    start_step = _count(update_starting_at_step, "update_starting_at_step", none=0)
    start_epoch = _count(update_starting_at_epoch, "update_starting_at_epoch", none=None)
    if every == 0 and start_epoch is None:
        raise ValueError("with_ema: update_every_n_steps=0 moves the averages after no update, and "
                         "update_starting_at_epoch is None: they would never move; give update_starting_at_epoch "
                         "(the first epoch, 0-based, whose end updates them) or an update_every_n_steps >= 1")
    if formula not in _FORMULAS:
        raise ValueError(f"with_ema: formula must be 'lerp' (torch.lerp, AveragedModel's get_ema_multi_avg_fn) or "
                         f"'weighted_sum' (decay * ema + (1 - decay) * param, get_ema_avg_fn: Lightning's "
                         f"EMAWeightAveraging), got {formula!r}")
    inner = require_step(step, "with_ema", no_eval="an evaluation step updates no parameters to average")
    refuse_wrapping(inner, "with_ema", {
        "with_ema": "the state holds one set of averages",
        "with_checkpointing": "its checkpoints would miss the averages' last update; apply with_ema first, "
        "e.g. with_checkpointing(with_ema(step, decay), directory)",
    })
    return EMAStep(inner, decay=float(decay_), update_every_n_steps=every, update_starting_at_step=start_step,
                   update_starting_at_epoch=start_epoch, formula=formula)


_REQUIRED = object()


def _count(value: Any, option: str, *, none: Any = _REQUIRED) -> Any:
    """``value`` as an int >= 0, or ``none`` for None where the option may be None; else a ValueError naming it."""
    if value is None and none is not _REQUIRED:
        return none
    count = as_int(value)
    if count is None or count < 0:
        maybe = " or None" if none is not _REQUIRED else ""
        raise ValueError(f"with_ema: {option} must be an int >= 0{maybe}, got {value!r}")
    return count


def ema_state(state: TrainState) -> TrainState:
    """A new state whose model holds the moving averages of :func:`with_ema` (no optimizer).

    Buffers are the model's own (not averaged: recompute BatchNorm statistics for the averaged
    weights with ``torch.optim.swa_utils.update_bn``); before the first update the averages are
    the parameters. Pruned weights stay pruned: where the state holds ``with_pruning``'s masks,
    the averages are put under them (an average of weights pruned only lately is not zero), as
    :func:`loopkit.swa_state` does and as Lightning's averaged ``weight_orig`` is seen through
    ``weight_mask``. ``state`` is unchanged. Averages (or masks) that do not fit the model
    (another's), or none in a state past its first update (one not trained with ``with_ema``,
    or still in its ``update_starting_at_step``/``update_starting_at_epoch`` warm-up), raise a
    ValueError. Use it to evaluate, predict or export the averaged weights:
    ``loopkit.evaluate(eval_step(metric_fn), ema_state(state), data)``.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(2, 1))
    >>> averaged = ema_state(state)
    >>> averaged.optimizer is None, bool(torch.equal(averaged.model.weight, state.model.weight))
    (True, True)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"ema_state: expected a loopkit.TrainState, got {type(state).__qualname__}")
    state.check_usable()
    averages = state.extras.get(_EMA)
    if averages is None and state.step > 0:  # with_ema copies the parameters at the first update
        raise ValueError(f"ema_state: the state (step {state.step}) holds no EMA averages: with_ema has made no "
                         "update on it (its first update starts them, the first at or after update_starting_at_step "
                         "or the end of update_starting_at_epoch when given; a state trained without it has none), "
                         "or its extras were dropped; before with_ema's first update its weights are the state's own")
    copy = fork(replace(state, optimizer=None, scheduler=None))
    if averages is not None:
        averages = _fitted(averages, core_module(copy.model), "ema_state")
        names, params = _parameters(copy)
        with torch.no_grad():
            torch._foreach_copy_(params, [averages[name] for name in names])
            _keep_pruned(copy)
    return copy


def _keep_pruned(state: TrainState) -> None:
    """Multiply the weights ``with_pruning``'s masks in ``state.extras`` name by them, in place (none: nothing).

    The masks are checked against the model as ``with_pruning`` checks them (a ValueError naming
    the parameter), cast to their parameter's dtype and device where only those differ.
    """
    masks = state.extras.get(_PRUNING_MASKS)
    if not masks:
        return
    fitted, names, params = _fitted_masks(state, masks)
    masks = fitted.extras[_PRUNING_MASKS]
    torch._foreach_mul_(params, [masks[name] for name in names])
