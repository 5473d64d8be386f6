"""``with_amp``: mixed precision with autocast, and a float16 loss scaler kept in the state.

>>> import torch
>>> from loopkit.steps import train_step
>>> step = with_amp(train_step(lambda m, b: m(b).float().mean()), dtype=torch.bfloat16)
>>> step.applied
('train_step', 'with_amp')
"""

from __future__ import annotations

import math
from typing import Any, overload

import attrs
import torch

from loopkit._numbers import as_int, as_real
from loopkit.steps import EvalStep, GradContext, Step, TrainStep
from loopkit.transforms._compose import require_train_or_eval_step, sync_refusal

__all__ = ["Amp", "with_amp"]

_SCALE = "amp/scale"
_GROWTH = "amp/growth_tracker"
_FOUND_INF = "amp/found_inf"


@attrs.frozen
class Amp:
    """Autocast to ``dtype``; for float16 a dynamic loss scaler on torch.amp's own kernels.

    The scale and its growth tracker live in ``state.extras`` (``amp/scale``,
    ``amp/growth_tracker``), so they are part of purity and checkpoints. The scaler
    follows ``torch.amp.GradScaler``: scale the loss, unscale the gradients before any
    other gradient transform sees them, skip the update when they hold inf/NaN, back the
    scale off on an overflow and grow it after ``growth_interval`` clean updates.

    >>> Amp(torch.float16).scales_loss, Amp(torch.bfloat16).scales_loss
    (True, False)
    """

    dtype: torch.dtype
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    cache_enabled: bool = True
    name: str = "with_amp"

    @property
    def scales_loss(self) -> bool:
        return self.dtype == torch.float16

    @property
    def agreed_options(self) -> dict[str, Any]:
        """Under DDP a float16 update's skip is agreed over the ranks (a collective), a bfloat16 one makes none; a
        float16 loss scaler's options too: the ranks' gradients are averaged scaled, and each rank unscales the mean
        by its own scale (see :attr:`loopkit.steps.Step.rank_agreed`).

        >>> Amp(torch.bfloat16).agreed_options
        {'dtype': 'torch.bfloat16'}
        >>> Amp(torch.float16).agreed_options["growth_interval"]
        2000
        """
        if not self.scales_loss:
            return {"dtype": str(self.dtype)}
        return {"dtype": str(self.dtype), "init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics it reports: a float16 update's ``amp/skipped``."""
        return ("amp/skipped",) if self.scales_loss else ()

    def autocast(self, device_type: str) -> torch.autocast:
        return torch.autocast(device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)

    def scale(self, loss: torch.Tensor, extras: dict[str, Any], device: torch.device) -> torch.Tensor:
        scale = extras.get(_SCALE)
        if scale is None:
            scale = extras[_SCALE] = torch.full((), self.init_scale, dtype=torch.float32, device=device)
            extras[_GROWTH] = torch.zeros((), dtype=torch.int32, device=device)
        return loss * scale.to(loss.dtype)

    def unscale(self, ctx: GradContext, extras: dict[str, Any], *, share: int = 1) -> None:
        """Unscale the gradients in place (times ``share / scale``: ``share`` is what the loss was divided by before
        it was scaled, given back here in the same multiplication) and OR their inf/NaN into ``ctx.found_inf``."""
        scale = extras[_SCALE]
        inv_scale = (scale.double().reciprocal() * share).float().reshape(1)
        found = ctx.unscale_and_check(inv_scale, scaler=True)
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device) if found is None else found.to(scale.device).reshape(())
        ctx.found_inf = found_inf if ctx.found_inf is None else torch.maximum(ctx.found_inf, found_inf)

    def after_update(self, ctx: GradContext, extras: dict[str, Any]) -> None:
        """The scale and growth tracker after the update (backed off on an overflow, grown after ``growth_interval``
        clean updates), and metric ``amp/skipped``. An update a guard skipped for a non-finite loss (``ctx.nonfinite``:
        under float16 the guard checks the loss only) leaves both as they were and reports ``amp/skipped`` 0 (the
        guard's skip, its own metric), as a GradScaler loop that skips such a loss before its backward (Lightning's
        ``training_step`` returning None: no ``scaler.step``/``update``); chosen on the device (``torch.where``)."""
        old_scale, old_growth = extras[_SCALE], extras[_GROWTH]
        found_inf = ctx.found_inf
        if found_inf is None:
            found_inf = torch.zeros((), dtype=torch.float32, device=old_scale.device)
        scale, growth = old_scale.clone(), old_growth.clone()
        torch._amp_update_scale_(
            scale, growth, found_inf.reshape(1), self.growth_factor, self.backoff_factor, self.growth_interval
        )
        found_inf = found_inf.reshape(())
        if ctx.nonfinite is not None:  # (only under with_nan_guard(policy="skip"))
            guarded = ctx.nonfinite.reshape(()).to(scale.device) != 0
            scale, growth = torch.where(guarded, old_scale, scale), torch.where(guarded, old_growth, growth)
            found_inf = torch.where(guarded, torch.zeros_like(found_inf), found_inf)
        extras[_SCALE], extras[_GROWTH] = scale, growth
        ctx.metrics["amp/skipped"] = found_inf


@overload
def with_amp(
    step: TrainStep, dtype: torch.dtype = ..., *, init_scale: float | None = ..., growth_factor: float | None = ...,
    backoff_factor: float | None = ..., growth_interval: int | None = ..., cache_enabled: bool = ...,
) -> TrainStep: ...
@overload
def with_amp(
    step: EvalStep, dtype: torch.dtype = ..., *, init_scale: float | None = ..., growth_factor: float | None = ...,
    backoff_factor: float | None = ..., growth_interval: int | None = ..., cache_enabled: bool = ...,
) -> EvalStep: ...
@overload
def with_amp(
    step: Any, dtype: torch.dtype = ..., *, init_scale: float | None = ..., growth_factor: float | None = ...,
    backoff_factor: float | None = ..., growth_interval: int | None = ..., cache_enabled: bool = ...,
) -> Step: ...
def with_amp(
    step: Any,
    dtype: torch.dtype = torch.bfloat16,
    *,
    init_scale: float | None = None,
    growth_factor: float | None = None,
    backoff_factor: float | None = None,
    growth_interval: int | None = None,
    cache_enabled: bool = True,
) -> Step:
    """Run the forward pass under ``torch.autocast(dtype)``; for float16, scale the loss.

    bfloat16 needs no scaler, and refuses the scaler's options (``init_scale``, ``growth_factor``,
    ``backoff_factor``, ``growth_interval``: a ``ValueError``, as Lightning's ``bf16-mixed`` refuses a scaler).
    float16 keeps a dynamic loss scale in ``state.extras`` (the options not given take
    ``torch.amp.GradScaler``'s defaults: 2**16, 2.0, 0.5, 2000); an update whose gradients overflow is skipped
    (``state.step`` does not advance, nor does the scheduler) and reported as metric ``amp/skipped`` (1.0). An
    update ``with_nan_guard`` skips for a non-finite loss is the guard's (``nan_guard/skipped`` 1.0,
    ``amp/skipped`` 0.0): the scale and its growth tracker stay as they were, as in a GradScaler loop that skips
    such a loss before its backward (Lightning's ``training_step`` returning None). Deciding the skip reads one
    flag per update on the host, as ``torch.amp.GradScaler`` does with non-fused optimizers. Works on
    ``train_step`` and ``eval_step``; gradient clipping and NaN guards always see unscaled gradients, whatever
    the nesting order. ``cache_enabled`` is ``torch.autocast``'s (its cache of low-precision copies of the
    weights within one forward); Lightning's ``precision="bf16-mixed"``/``"16-mixed"`` autocast with
    ``cache_enabled=False``: pass that for its numerics (a weight used many times in one forward, an RNN's,
    rounds otherwise).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(4, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_amp(train_step(lambda m, b: m(b).float().pow(2).mean()), dtype=torch.float16)
    >>> state, metrics = step(state, torch.randn(8, 4))
    >>> float(state.extras["amp/scale"]) > 0, "amp/skipped" in metrics
    (True, True)
    >>> with_amp(train_step(lambda m, b: m(b).mean()), dtype=torch.bfloat16, init_scale=1024.0)
    Traceback (most recent call last):
    ...
    ValueError: with_amp: dtype=torch.bfloat16 runs no loss scaler, so it takes none of its options; got init_scale=1024.0 (drop it, or use dtype=torch.float16)
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"with_amp: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    scaler_options = {"init_scale": init_scale, "growth_factor": growth_factor, "backoff_factor": backoff_factor,
                      "growth_interval": growth_interval}
    given = [f"{k}={v!r}" for k, v in scaler_options.items() if v is not None]
    if dtype == torch.bfloat16 and given:
        raise ValueError(f"with_amp: dtype=torch.bfloat16 runs no loss scaler, so it takes none of its options; got "
                         f"{', '.join(given)} (drop {'them' if len(given) > 1 else 'it'}, or use dtype=torch.float16)")
    init_scale, growth_factor, backoff_factor, growth_interval = (  # (float16's: those not given, Amp's defaults)
        getattr(attrs.fields(Amp), k).default if v is None else v for k, v in scaler_options.items()
    )
    reals = [as_real(v) for v in (init_scale, growth_factor, backoff_factor)]
    if None in reals or not 0 < reals[0] < math.inf or not 1 < reals[1] < math.inf or not 0 < reals[2] < 1:
        raise ValueError(  # (an infinite scale never comes down: every update would be skipped)
            "with_amp: need a finite init_scale > 0, a finite growth_factor > 1 and 0 < backoff_factor < 1, got "
            f"{init_scale}, {growth_factor}, {backoff_factor}"
        )
    if (as_int(growth_interval) or 0) < 1:
        raise ValueError(f"with_amp: growth_interval must be a positive int, got {growth_interval!r}")
    init_scale, growth_factor, backoff_factor = reals
    growth_interval = as_int(growth_interval)
    if not isinstance(cache_enabled, bool):
        raise TypeError(f"with_amp: cache_enabled must be True or False, got {cache_enabled!r}")
    base = require_train_or_eval_step(step, "with_amp")
    if base.precision is not None:
        raise TypeError("with_amp cannot wrap with_amp: a step has one precision; apply with_amp once")
    amp = Amp(dtype, init_scale, growth_factor, backoff_factor, growth_interval, cache_enabled)
    refusal = sync_refusal(base, "with_amp(float16)") if amp.scales_loss else None
    if refusal is not None:
        raise TypeError(refusal)
    return attrs.evolve(base, precision=amp, transforms=base.transforms + ("with_amp",))
