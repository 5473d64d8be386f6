"""A model's summary: its layers, their parameter counts and modes (Lightning's ``ModelSummary``).

Lightning prints one when a fit starts; in loopkit you print it when you want it:
``print(loopkit.summarize(state))``. The table and its totals are Lightning's (without the FLOPs
column, which Lightning fills only with an ``example_input_array``), and the size is the
parameters' own bytes: a bfloat16 model's is half a float32 one's.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> print(summarize(model))
  | Name | Type   | Params | Mode
----------------------------------------
0 | 0    | Linear | 100 K  | train
1 | 1    | ReLU   | 0      | train
2 | 2    | Linear | 1.3 K  | train
----------------------------------------
101 K     Trainable params
0         Non-trainable params
101 K     Total params
0.407     Total estimated model params size (MB)
3         Modules in train mode
0         Modules in eval mode
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch.nn.parameter import UninitializedParameter

from loopkit._numbers import as_int
from loopkit.state import state_hint

__all__ = ["LayerSummary", "ModelSummary", "summarize"]

_UNITS = (" ", "K", "M", "B", "T")


def human_count(number: int) -> str:
    """``number`` abbreviated as Lightning's summary writes it: three digits at most, then K, M, B or T.

    >>> human_count(123), human_count(1234), human_count(2_000_000), human_count(400 * 10**12)
    ('123  ', '1.2 K', '2.0 M', '400 T')
    """
    digits = int(math.floor(math.log10(number)) + 1) if number > 0 else 1
    groups = min(int(math.ceil(digits / 3)), len(_UNITS))
    scaled = number * 10 ** (-3 * (groups - 1))
    if groups == 1 or scaled >= 100:
        return f"{int(scaled):,d} {_UNITS[groups - 1]}"
    return f"{scaled:,.1f} {_UNITS[groups - 1]}"


def _count(parameters: Any) -> int:
    """Elements of ``parameters``; a lazy module's uninitialized ones count 0 (their size is not known yet)."""
    return sum(0 if isinstance(p, UninitializedParameter) else p.numel() for p in parameters)


@attrs.frozen
class LayerSummary:
    """One row of a :class:`ModelSummary`: a submodule's name, class, parameters and mode.

    >>> LayerSummary("fc", "Linear", 30, True).mode
    'train'
    """

    name: str
    type: str
    parameters: int
    training: bool

    @property
    def mode(self) -> str:
        """``"train"`` or ``"eval"``, as the model's ``training`` flag says."""
        return "train" if self.training else "eval"


@attrs.frozen
class ModelSummary:
    """A model's layers (to ``max_depth``) and totals; ``str()`` is Lightning's table.

    ``total_parameters`` counts each parameter once (a shared one too), ``trainable_parameters``
    those with ``requires_grad``; ``size_mb`` is their storage in MB (10^6 bytes);
    ``uninitialized`` says a lazy module's parameters are not made yet (counted as 0 until its
    first forward).

    >>> s = summarize(torch.nn.Linear(3, 2))
    >>> s.total_parameters, s.trainable_parameters, s.layers
    (8, 8, ())
    """

    layers: tuple[LayerSummary, ...]
    total_parameters: int
    trainable_parameters: int
    size_mb: float
    modules_in_train_mode: int
    modules_in_eval_mode: int
    uninitialized: bool
    #: the parameters no listed layer holds (the root's own, a cls token; all of them at ``max_depth=0``), shown
    #: in an "other params" row as Lightning shows them; 0 when the rows' counts add up to the total or more
    other_parameters: int = 0

    def __str__(self) -> str:
        rows = [(str(i), layer.name, layer.type, human_count(layer.parameters), layer.mode)
                for i, layer in enumerate(self.layers)]
        if self.other_parameters > 0:
            rows.append((" ", "other params", "n/a", human_count(self.other_parameters), "n/a"))
        columns = [(title, [row[j] for row in rows]) for j, title in enumerate((" ", "Name", "Type", "Params", "Mode"))]
        widths = [max([len(title), *(len(v) for v in values)]) for title, values in columns]
        rule = "-" * (sum(widths) + 3 * (len(columns) + 1))
        lines = [" | ".join(f"{title:<{w}}" for (title, _), w in zip(columns, widths)).rstrip(), rule]
        for i in range(len(rows)):
            lines.append(" | ".join(f"{values[i]:<{w}}" for (_, values), w in zip(columns, widths)).rstrip())
        lines.append(rule)
        totals = [
            (human_count(self.trainable_parameters), "Trainable params"),
            (human_count(self.total_parameters - self.trainable_parameters), "Non-trainable params"),
            (human_count(self.total_parameters), "Total params"),
            (f"{self.size_mb:,.3f}", "Total estimated model params size (MB)"),
            (str(self.modules_in_train_mode), "Modules in train mode"),
            (str(self.modules_in_eval_mode), "Modules in eval mode"),
        ]
        lines += [f"{value:<10}{label}" for value, label in totals]
        if self.uninitialized:
            lines.append("(a lazy module's parameters are not made yet: they count 0 until its first forward)")
        return "\n".join(lines)


def _model_of(target: Any) -> torch.nn.Module:
    model = getattr(target, "model", target) if not isinstance(target, torch.nn.Module) else target
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"summarize: expected an nn.Module or a TrainState, got {type(target).__qualname__}{state_hint(target)}")
    inner = getattr(model, "_orig_mod", None)  # a torch.compile'd model: its own module's names
    return inner if isinstance(inner, torch.nn.Module) else model


def summarize(model: Any, max_depth: int = 1) -> ModelSummary:
    """Summarize ``model`` (an ``nn.Module``, or a ``TrainState``'s model) as Lightning's ``ModelSummary`` does.

    ``max_depth``: 1 lists the model's children, n the submodules down to n levels, -1 all of
    them, 0 none (the totals only). Parameters no listed layer holds (the model's own) are in an
    "other params" row, as in Lightning's.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Sequential(torch.nn.Linear(4, 1)))
    >>> [(layer.name, layer.parameters) for layer in summarize(model, max_depth=2).layers]
    [('0', 12), ('1', 5), ('1.0', 5)]
    """
    depth = as_int(max_depth)
    if depth is None or depth < -1:
        raise ValueError(f"summarize: max_depth must be an int >= -1 (-1: every layer, 0: none), got {max_depth!r}")
    root = _model_of(model)
    if depth == 0:
        named: list[tuple[str, torch.nn.Module]] = []
    elif depth == 1:  # (the children, as Lightning lists them: one also held inside another child is a row too)
        named = list(root.named_children())
    else:  # (a module reached twice once, under its first name)
        named = [(name, module) for name, module in root.named_modules() if name and (depth < 0 or name.count(".") < depth)]
    layers = tuple(
        LayerSummary(name, type(module).__name__, _count(module.parameters()), module.training)
        for name, module in named
    )
    parameters = list(root.parameters())
    modes = [module.training for module in root.modules()][1:]  # (the root itself is not a layer)
    total = _count(parameters)
    return ModelSummary(
        layers=layers,
        total_parameters=total,
        trainable_parameters=_count(p for p in parameters if p.requires_grad),
        size_mb=sum(0 if isinstance(p, UninitializedParameter) else p.numel() * p.element_size() for p in parameters) / 1e6,
        modules_in_train_mode=modes.count(True),
        modules_in_eval_mode=modes.count(False),
        uninitialized=any(isinstance(p, UninitializedParameter) for p in parameters),
        other_parameters=max(total - sum(layer.parameters for layer in layers), 0),
    )
