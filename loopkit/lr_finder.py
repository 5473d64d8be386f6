"""``loopkit.lr_find``: a learning-rate range test, as Lightning's ``Tuner(trainer).lr_find(model)``.

The step trains a copy of the state for up to ``num_training`` optimizer updates while the
learning rate grows from ``min_lr`` to ``max_lr`` (exponentially or linearly); the loss after
each update is recorded, smoothed, and the search stops early once it diverges. The given state
is left exactly as it was. :meth:`LRFinderResult.suggestion` proposes the rate where the loss
falls fastest; build the optimizer with it, as Lightning's ``configure_optimizers`` reads
``self.lr``, or set it with :meth:`LRFinderResult.apply`.

>>> import torch, loopkit
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> data = [(x, x @ torch.tensor([[1.0], [-2.0]])) for x in torch.randn(16, 8, 2)]
>>> model = torch.nn.Linear(2, 1)
>>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
>>> result = loopkit.lr_find(loopkit.train_step(mse), state, data, min_lr=1e-4, max_lr=10.0, num_training=40)
>>> [round(lr, 6) for lr in result.results["lr"][:3]]  # the first update uses min_lr; r = 1/40 is skipped, as Lightning does
[0.0001, 0.000178, 0.000237]
>>> result.stopped_early, len(result.results["loss"])  # the loss diverged after 37 of 40 updates
(True, 37)
>>> 1e-4 < result.suggestion() < 10.0
True
>>> state.optimizer.param_groups[0]["lr"]  # the given state is untouched
0.1
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from loopkit import _collective
from loopkit._epoch_data import check_factory, is_factory
from loopkit._numbers import as_int, as_real
from loopkit.callbacks import Callback
from loopkit._search import search_step
from loopkit.driver import _check_data, _check_device, _num_batches, run_epochs
from loopkit.rng import global_rngs_kept
from loopkit.state import TrainState, fork, not_a_state, refuse_copy_if_sharded, state_at_error
from loopkit.steps import grads_as_found

__all__ = ["LRFinderResult", "lr_find"]

_MODES = ("exponential", "linear")
_BETA = 0.98  # Lightning's smoothing of the recorded loss
# what Lightning turns off during the search (its loggers and callbacks): transforms that write files (logs,
# checkpoints) of the probe run, or change its training apart from the rates (SWA sets rates of its own, pruning zeroes weights)
_REFUSED = ("with_checkpointing", "with_logging", "with_swa", "with_pruning", "with_epoch_scheduler",
            "with_step_scheduler")


class _RangeLR(LRScheduler):
    """Lightning's ``_ExponentialLR`` / ``_LinearLR``: the learning rates of the range test.

    As there, the first update uses ``base_lr`` (``min_lr``) and update ``i >= 1`` uses
    ``r = (i + 1) / num_iter``: ``r = 1 / num_iter`` is never used, and the last of
    ``num_iter`` updates uses ``end_lr``. The same expressions, so the same floats.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, end_lr: float, num_iter: int, mode: str) -> None:
        self.end_lr = end_lr
        self.num_iter = num_iter
        self.mode = mode
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        if self.last_epoch <= 0:
            return list(self.base_lrs)
        r = (self.last_epoch + 1) / self.num_iter
        if self.mode == "linear":
            return [base_lr + r * (self.end_lr - base_lr) for base_lr in self.base_lrs]
        return [base_lr * (self.end_lr / base_lr) ** r for base_lr in self.base_lrs]


def _accum_every(step: Any) -> Callable[[int], int]:
    """The step's ``with_grad_accum`` factor by epoch (1 without one), looked for through whole-step wrappers."""
    while step is not None:
        every_at = getattr(step, "every_at", None)
        if callable(every_at):
            return every_at  # type: ignore[no-any-return]
        step = getattr(step, "inner", None)
    return lambda epoch: 1


class _Recorder(Callback):
    """Lightning's ``_LRCallback``: after each update, the rate it used and the smoothed loss; stops on divergence.

    Under a process group only rank 0's copy (``decides``) asks to stop, on its own losses: ``run_epochs``' vote on
    the callbacks' ``should_stop`` after each batch (an all-reduce it makes anyway) then stops every rank after that
    update, as Lightning broadcasts rank 0's ``trainer.should_stop`` at each record.
    """

    reads_only = True

    def __init__(
        self, start: int, accum_every: Callable[[int], int], threshold: float | None, decides: bool = True
    ) -> None:
        self.start = start
        self.accum_every = accum_every
        self.threshold = threshold if decides else None
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.avg_loss = 0.0
        self.best_loss = 0.0
        self.should_stop = False
        self._lr = 0.0  # the rate the next update uses
        self._seen = start  # state.step after the last update seen

    def on_fit_start(self, state: Any) -> None:
        self._lr = float(state.optimizer.param_groups[0]["lr"])
        self._seen = state.step

    def on_batch_end(self, state: Any, metrics: Any) -> None:
        if state.step == self._seen:  # a micro-batch of an accumulation group, or a skipped batch: no update
            return
        used, self._lr, self._seen = self._lr, float(state.optimizer.param_groups[0]["lr"]), state.step
        self.lrs.append(used)
        loss = metrics.get("loss") if metrics else None
        if loss is None:  # as Lightning does for a step without a loss: NaN, which the suggestion leaves out
            self.losses.append(float("nan"))
            return
        # Lightning's outputs["loss"] is the loss the closure backpropagates: divided by the accumulation factor
        every = self.accum_every(state.epoch)
        current = float((loss / every).item() if every > 1 else loss.item())
        current_step = state.step - self.start  # Lightning's trainer.global_step, counted from the search's start
        self.avg_loss = _BETA * self.avg_loss + (1 - _BETA) * current
        smoothed = self.avg_loss / (1 - _BETA ** (current_step + 1))
        if self.threshold is not None and current_step > 1 and smoothed > self.threshold * self.best_loss:
            self.should_stop = True
        if smoothed < self.best_loss or current_step == 1:
            self.best_loss = smoothed
        self.losses.append(smoothed)

    def on_flush_end(self, state: Any, metrics: Any) -> None:
        """A partial accumulation group's update at an epoch's end: its rate is spent, nothing is recorded (as
        Lightning records only at a batch that completes a group of ``accumulate_grad_batches``)."""
        self._lr, self._seen = float(state.optimizer.param_groups[0]["lr"]), state.step


class LRFinderResult:
    """What :func:`lr_find` found: ``results["lr"]`` and ``results["loss"]`` (floats, one per recorded update).

    ``results["loss"]`` holds the smoothed losses (Lightning's running mean with ``beta=0.98`` and its
    bias correction), as Lightning's ``results`` does. ``stopped_early`` says whether the loss diverged
    before ``num_training`` updates.

    >>> result = LRFinderResult({"lr": [0.1, 0.2, 0.3, 0.4], "loss": [3.0, 2.0, 0.5, 0.4]}, mode="linear")
    >>> result.suggestion(skip_begin=0, skip_end=0)  # the steepest fall: from 3.0 at 0.1 to 0.5 at 0.3
    0.2
    >>> result.suggestion_index(skip_begin=0, skip_end=0)
    1
    """

    def __init__(
        self,
        results: dict[str, list[float]],
        *,
        mode: str = "exponential",
        min_lr: float | None = None,
        max_lr: float | None = None,
        num_training: int | None = None,
        stopped_early: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"LRFinderResult: mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(results, dict) or set(results) != {"lr", "loss"} or len(results["lr"]) != len(results["loss"]):
            raise ValueError("LRFinderResult: results must be a dict with 'lr' and 'loss' lists of one length")
        self.results = results
        self.mode = mode
        self.min_lr = min_lr
        self.max_lr = max_lr
        self.num_training = num_training
        self.stopped_early = stopped_early

    def __repr__(self) -> str:
        return (f"LRFinderResult(mode={self.mode!r}, points={len(self.results['lr'])}, "
                f"stopped_early={self.stopped_early})")

    def suggestion_index(self, skip_begin: int = 10, skip_end: int = 1) -> int | None:
        """The index in ``results`` of :meth:`suggestion`'s rate, or None (with a warning) when too few points.

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     LRFinderResult({"lr": [0.1, 0.2], "loss": [1.0, 0.5]}).suggestion_index()
        >>> str(caught[0].message)[:40]
        'lr_find: no suggestion: 0 finite loss(es'
        """
        begin, end = as_int(skip_begin), as_int(skip_end)
        if begin is None or begin < 0:
            raise ValueError(f"LRFinderResult.suggestion: skip_begin must be an int >= 0, got {skip_begin!r}")
        if end is None or end < 0:
            raise ValueError(f"LRFinderResult.suggestion: skip_end must be an int >= 0, got {skip_end!r}")
        count = len(self.results["loss"])
        stop = max(count - end, 0)  # (Lightning slices [begin:-end]: skip_end=0 would keep nothing there)
        # as Lightning 2.6: tensors of torch's default dtype, torch.gradient against the rates
        losses = torch.tensor(self.results["loss"][begin:stop])
        lrs = torch.tensor(self.results["lr"][begin:stop])
        finite = torch.isfinite(losses)
        losses, lrs = losses[finite], lrs[finite]
        if len(losses) < 2:
            warnings.warn(
                f"lr_find: no suggestion: {len(losses)} finite loss(es) left after skipping {begin} at the beginning and "
                f"{end} at the end of {count} (torch.gradient needs 2); give more num_training updates, more data, "
                "or smaller skip_begin/skip_end",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        gradients = torch.gradient(losses, spacing=[lrs])[0]
        steepest = int(torch.argmin(gradients).item())
        return int(torch.arange(count)[begin:stop][finite][steepest].item())

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The rate where the loss falls fastest (the most negative gradient of the loss against the rate).

        As Lightning's: the first ``skip_begin`` and last ``skip_end`` points are left out, then the
        non-finite losses; None (with a ``RuntimeWarning``) when fewer than two points remain.

        >>> LRFinderResult({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.0, 0.2, 5.0]}).suggestion(skip_begin=0, skip_end=0)
        0.001
        """
        index = self.suggestion_index(skip_begin, skip_end)
        return None if index is None else self.results["lr"][index]

    def apply(self, state: TrainState, skip_begin: int = 10, skip_end: int = 1) -> TrainState:
        """A copy of ``state`` whose parameter groups all use :meth:`suggestion`'s rate (``state`` is unchanged).

        As Lightning's ``update_attr=True``. A state with a scheduler is refused: the scheduler would set its own
        rates at its next step; build the optimizer and scheduler with ``lr=result.suggestion()`` instead.

        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=1.0))
        >>> result = LRFinderResult({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.0, 0.2, 5.0]})
        >>> result.apply(state, skip_begin=0, skip_end=0).optimizer.param_groups[0]["lr"], state.optimizer.param_groups[0]["lr"]
        (0.001, 1.0)
        """
        if not isinstance(state, TrainState):
            raise not_a_state("LRFinderResult.apply", state)
        refuse_copy_if_sharded(state, "LRFinderResult.apply", "Apply the suggestion to the unsharded state, before "
                               "training under with_fsdp, or set the rate on this one in place: for group in "
                               "state.optimizer.param_groups: group['lr'] = result.suggestion()")
        if state.optimizer is None:
            raise ValueError("LRFinderResult.apply: the state has no optimizer")
        if state.scheduler is not None:
            raise ValueError(
                f"LRFinderResult.apply: the state has a scheduler ({type(state.scheduler).__name__}), which sets the "
                "rates itself: build the optimizer and the scheduler with lr=result.suggestion() instead"
            )
        lr = self.suggestion(skip_begin, skip_end)
        if lr is None:
            raise ValueError("LRFinderResult.apply: there is no suggestion (too few points; see the warning)")
        new = fork(state)
        for group in new.optimizer.param_groups:
            group["lr"] = lr
        return new

    def plot(self, suggest: bool = False, show: bool = False, ax: Any = None) -> Any:
        """Plot the loss against the rate (log scale in ``"exponential"`` mode) and return the figure.

        ``suggest=True`` marks :meth:`suggestion` with a red point; ``show=True`` calls ``pyplot.show()``;
        ``ax`` draws into given axes (their figure is returned). Needs matplotlib, the ``plot`` extra.

        >>> import matplotlib; matplotlib.use("Agg")
        >>> fig = LRFinderResult({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.0, 0.2, 5.0]}).plot()
        >>> fig.axes[0].get_xlabel(), fig.axes[0].get_xscale()
        ('Learning rate', 'log')
        >>> import matplotlib.pyplot as plt; plt.close(fig)
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                "LRFinderResult.plot needs matplotlib, an optional extra: pip install 'loopkit[plot]' "
                "(or pip install matplotlib)"
            ) from e
        lrs, losses = self.results["lr"], self.results["loss"]
        if ax is None:
            fig, ax = plt.subplots()
        else:
            fig = ax.figure
        ax.plot(lrs, losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if suggest:
            index = self.suggestion_index()
            if index is not None:
                ax.plot(lrs[index], losses[index], markersize=10, marker="o", color="red")
        if show:
            plt.show()
        return fig


def _positive_real(value: Any, name: str, *, zero: bool = False) -> float:
    real = as_real(value)
    if real is None or not math.isfinite(real) or real < 0 or (real == 0 and not zero):
        raise ValueError(f"lr_find: {name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}")
    return float(real)


def lr_find(
    step: Callable[[TrainState, Any], tuple[TrainState, Any]],
    state: TrainState,
    train_data: Iterable,
    *,
    min_lr: float = 1e-8,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: str = "exponential",
    early_stop_threshold: float | None = 4.0,
    device: torch.device | str | None = None,
) -> LRFinderResult:
    """A learning-rate range test on a copy of ``state``: Lightning's ``Tuner(trainer).lr_find(model)``.

    Every parameter group of the copy's optimizer gets the rate of update ``i`` (0-based): ``min_lr``
    for the first, then ``min_lr * (max_lr / min_lr) ** ((i + 1) / num_training)`` (``"exponential"``)
    or ``min_lr + (i + 1) / num_training * (max_lr - min_lr)`` (``"linear"``), as Lightning's
    ``_ExponentialLR``/``_LinearLR`` give (the rate of ``i = 1`` is never used; the last update uses
    ``max_lr``). The copy's scheduler is replaced by one that sets these rates, so the step moves
    them once per optimizer update (never per micro-batch under ``with_grad_accum``).
    :func:`loopkit.run_epochs` trains the copy until ``num_training`` updates, over as many
    epochs as that takes (from the state's epoch and ``batch_index``, in its data order), without
    validation or a progress bar; torch's (CPU), numpy's and Python's global RNGs are put back
    afterwards (a state made with ``global_rng=True`` draws from them). ``state`` (its parameters,
    optimizer and scheduler state, counters and RNG) is left exactly as it was. ``train_data`` may be a
    factory of the epoch's data, ``fn(epoch)``, as ``run_epochs`` takes it: the search calls it for each
    epoch it goes through, from the state's.

    After each update the rate it used and the loss go to ``results``, the loss smoothed as
    Lightning does: ``avg = 0.98 * avg + 0.02 * loss``, recorded as ``avg / (1 - 0.98 ** (k + 1))``
    after the ``k``-th update (1-based, so Lightning's bias correction is one step off). From the
    second update on, a smoothed loss above ``early_stop_threshold`` times the best one so far
    stops the search (that point is still recorded); ``None`` never stops.

    Under a process group of several ranks (``with_ddp``, or ``with_fsdp`` from the unsharded state; each
    rank its own batches) it does as Lightning's: each rank records its own batches' losses, the search
    stops on every rank after the update at which rank 0's smoothed loss diverges (Lightning broadcasts
    rank 0's ``should_stop``; here ``run_epochs``' vote on the callbacks' ``should_stop`` after each batch
    carries it), and every rank returns rank 0's rates, losses and ``stopped_early`` (one gather at the
    end, as Lightning broadcasts its results), so :meth:`LRFinderResult.suggestion` and
    :meth:`LRFinderResult.apply` agree on every rank. Call it on every rank at the same point.

    Where it differs from Lightning 2.6:

    - Under ``with_grad_accum(every=n)`` the update's recorded loss is, as in Lightning, the last
      micro-batch's divided by ``n``; the update that ``run_epochs`` makes for an epoch's partial
      group (Lightning's last batch of an epoch) moves the rate but is not recorded, as in Lightning.
      That update's gradient is the mean over the group's batches (Lightning divides their sum by ``n``:
      see ``accumulate_grad_batches`` in ``docs/from_lightning.md``), so the later points differ then.
    - A batch the loss_fn skips (returns None) makes no update in loopkit: nothing is recorded and it
      does not count toward ``num_training``; Lightning still steps (the rate moves) and records NaN.
    - The update count starts at 0 for any state (Lightning uses ``trainer.global_step``, which only
      agrees when the search starts a fresh trainer); the epochs are not capped by a ``max_epochs``.
    - No validation runs during the search (Lightning validates the probe when an epoch ends).
    - A step with ``with_logging``, ``with_checkpointing``, ``with_swa``, ``with_pruning``, ``with_epoch_scheduler``
      or ``with_step_scheduler`` is refused (they would write the probe's logs and checkpoints, set rates of
      their own, hold the search's rates still or prune it; Lightning
      turns loggers and callbacks off): pass the step without them.
    - A closure optimizer (LBFGS) records the loss a raw ``optimizer.step(closure)`` returns, its first
      evaluation; Lightning records its last.
    - Under a schedule, ``with_grad_accum(every={epoch: n})``, the search accumulates as the schedule
      says for its epochs; Lightning's ``GradientAccumulationScheduler`` is a callback, off during its
      search (one update per batch there; an int ``accumulate_grad_batches`` it keeps, as ``every=n`` is kept).
    - The given state is never touched (Lightning trains the model itself, then restores it from a
      checkpoint, which leaves the global RNG advanced).
    - Suggestions: as Lightning 2.6, ``torch.gradient`` over tensors of torch's default dtype (older
      Lightning used ``np.gradient``, in float64); ``skip_end=0`` keeps the end (Lightning's ``[skip_begin:-0]`` keeps nothing), and
      a missing suggestion is a ``RuntimeWarning``, not a log record.
    - Nothing is set on the model (Lightning's ``update_attr``): build the optimizer with
      ``lr=result.suggestion()``, or take ``result.apply(state)``.

    Errors name the option before anything runs: a state without an optimizer, ``min_lr >= max_lr``,
    a rate that is not a positive finite number (``min_lr=0`` is allowed in ``"linear"`` mode),
    ``num_training < 2``, an unknown ``mode``, a threshold that is not a positive finite number or None.

    >>> import torch, loopkit
    >>> model = torch.nn.Linear(1, 1)
    >>> state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters()))
    >>> data = [(torch.ones(4, 1), torch.zeros(4, 1))] * 5  # shorter than num_training: it goes round again
    >>> result = lr_find(loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()), state, data,
    ...                  num_training=12, mode="linear", early_stop_threshold=None)
    >>> len(result.results["lr"]), result.results["lr"][-1], state.step
    (12, 1.0, 0)
    """
    if mode not in _MODES:
        raise ValueError(f"lr_find: mode must be 'exponential' or 'linear', got {mode!r}")
    min_lr = _positive_real(min_lr, "min_lr", zero=mode == "linear")
    max_lr = _positive_real(max_lr, "max_lr")
    if min_lr >= max_lr:
        raise ValueError(f"lr_find: min_lr must be below max_lr, got min_lr={min_lr!r}, max_lr={max_lr!r}")
    count = as_int(num_training)
    if count is None or count < 2:
        raise ValueError(f"lr_find: num_training must be an int >= 2 (optimizer updates to try), got {num_training!r}")
    threshold = None if early_stop_threshold is None else _positive_real(early_stop_threshold, "early_stop_threshold")
    step = search_step(step, state, "lr_find", _REFUSED, "write the search's logs or checkpoints, or set rates or "
                       "prune weights of its own (SWA and pruning are callbacks in Lightning)")
    device = _check_device(device, "lr_find")
    if is_factory(train_data):  # (run_epochs makes each epoch's data, and names what is wrong with it)
        check_factory(train_data, "lr_find: train_data")
    else:
        _check_data(train_data, "lr_find: train_data", factories=True)
        if _num_batches(train_data, None, "train_data") == 0:
            raise ValueError("lr_find: train_data is empty (len() is 0): there is no batch to try a rate on")
    probe = fork(state)
    for group in probe.optimizer.param_groups:
        group["lr"] = min_lr
        group["initial_lr"] = min_lr
    probe = probe.evolve(scheduler=_RangeLR(probe.optimizer, max_lr, count, mode))
    recorder = _Recorder(probe.step, _accum_every(step), threshold, decides=_collective.rank_and_size()[0] == 0)
    try:
        with global_rngs_kept(), warnings.catch_warnings():
            # (its words are run_epochs' options: the search says it in its own below)
            warnings.filterwarnings("ignore", message=r"run_epochs: epoch \d+ went by without state.step advancing")
            run_epochs(step, probe, train_data, max_steps=probe.step + count, callbacks=[recorder], progress=False,
                       device=device)
    except BaseException as error:
        left = state_at_error(error)  # the copy as the first step found it (no batch trained): a loss_fn closing over
        if (left is not None and left.model is probe.model  # state's model, not the one it is given, wrote state's
                and (left.step, left.batch_index) == (probe.step, probe.batch_index)):  # gradients: given back
            grads_as_found(state, probe)
        raise
    lrs, losses, stopped = recorder.lrs, recorder.losses, recorder.should_stop
    if _collective.active():  # rank 0's records on every rank, as Lightning broadcasts its results
        lrs, losses, stopped = _collective.gather(  # type: ignore[index, misc]
            (lrs, losses, stopped), who="lr_find", what="the gather of the ranks' recorded rates and losses")[0]
    if len(lrs) < count and not stopped:
        warnings.warn(
            f"lr_find: the search ended after {len(lrs)} of num_training={count} updates: a pass over "
            "train_data made no update (every batch skipped: a loss_fn returning None, or with_nan_guard skipping "
            "non-finite updates)",
            RuntimeWarning,
            stacklevel=2,
        )
    return LRFinderResult(
        {"lr": lrs, "loss": losses},
        mode=mode,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=count,
        stopped_early=stopped,
    )
