"""``with_compile``: the step's loss (or metric) function through ``torch.compile``.

>>> from loopkit.steps import train_step
>>> with_compile(train_step(lambda m, b: None), backend="eager").applied
('train_step', 'with_compile')
"""

from __future__ import annotations

from typing import Any, overload

import attrs
import torch

from loopkit.steps import EvalStep, Step, TrainStep
from loopkit.transforms._compose import require_train_or_eval_step

__all__ = ["with_compile"]


@overload
def with_compile(step: TrainStep, **torch_compile_options: Any) -> TrainStep: ...
@overload
def with_compile(step: EvalStep, **torch_compile_options: Any) -> EvalStep: ...
@overload
def with_compile(step: Any, **torch_compile_options: Any) -> Step: ...
def with_compile(step: Any, **torch_compile_options: Any) -> Step:
    """Compile the function a ``train_step`` or ``eval_step`` runs with ``torch.compile(fn, **options)``.

    What is compiled is ``loss_fn(model, batch)`` (forward and loss; ``backward`` runs the
    compiled backward graph) or ``metric_fn(model, batch)``; the optimizer update, the
    gradient transforms and the bookkeeping stay as they are. The options are
    ``torch.compile``'s (``mode``, ``backend``, ``fullgraph``, ``dynamic``, ``options``);
    one it does not know fails here, when the step is built. The first call compiles (seconds
    to minutes with the default inductor backend); the copies of the model a pure step makes
    are not new compilations (torch.compile treats the module's parameters as inputs). In any
    order with the other gradient-level transforms; apply it once.

    >>> from loopkit.steps import eval_step, train_step
    >>> step = with_compile(train_step(lambda m, b: m(b).pow(2).mean()), mode="max-autotune-no-cudagraphs")
    >>> evaluator = with_compile(eval_step(lambda m, b: {"mean": m(b).mean()}), backend="eager")
    >>> step.applied, evaluator.applied
    (('train_step', 'with_compile'), ('eval_step', 'with_compile'))

    (Compiling happens on the first call; ``tests/transforms/test_compiling.py`` runs them.)
    """
    for option in ("fullgraph", "dynamic"):
        value = torch_compile_options.get(option)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"with_compile: {option} must be True, False or None, got {value!r}")
    base = require_train_or_eval_step(step, "with_compile")
    if "with_compile" in base.transforms:
        raise TypeError("with_compile cannot wrap with_compile: the function is compiled once; pass every option to one with_compile")
    name = "loss_fn" if isinstance(base, TrainStep) else "metric_fn"
    compiled = torch.compile(getattr(base, name), **torch_compile_options)
    return attrs.evolve(base, **{name: compiled}, transforms=base.transforms + ("with_compile",))
