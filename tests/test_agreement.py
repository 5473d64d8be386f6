"""``loopkit._agreement``: the summary of the parameters' flags and the optimizer that ``with_ddp`` and ``with_fsdp``
compare over the ranks where they build their wrappers (the collective itself: tests/transforms/test_ddp.py's and
test_fsdp.py's two-rank runs). Two summaries compare equal exactly where the optimizers would update alike."""

from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch

from loopkit import _agreement, _collective
from loopkit._agreement import named_callable, refuse_apart, training_described


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))


def _described(make_optimizer) -> dict[str, object]:
    model = _model()
    return training_described(model, make_optimizer(list(model.parameters())))


def test_optimizers_that_update_alike_are_described_alike():
    sgd = _described(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert sgd == _described(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert sgd == _described(lambda p: torch.optim.SGD(p, lr=np.float64(0.1), momentum=np.float64(0.9)))
    assert _described(lambda p: torch.optim.SGD(p, lr=float("nan"))) == _described(
        lambda p: torch.optim.SGD(p, lr=float("nan")))  # (NaN compared as itself: not refused)
    tensor_lr = _described(lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)))
    assert tensor_lr == _described(lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)))  # (by value, not identity)
    assert tensor_lr["optimizer param group 0"]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("other", [
    lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9),  # another lr
    lambda p: torch.optim.SGD(p, lr=0.1),  # another momentum
    lambda p: torch.optim.Adam(p, lr=0.1),  # another class
    lambda p: torch.optim.SGD(p[:-1], lr=0.1, momentum=0.9),  # a group without a parameter
    lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.1, momentum=0.9),  # two groups
    lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.999)),  # a tuple
    lambda p: torch.optim.Adam(p, lr=torch.tensor(0.2)),  # a tensor's value
])
def test_optimizers_that_update_otherwise_are_described_otherwise(other):
    assert _described(other) != _described(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def test_flags_are_described_by_name_but_those_ignored_and_what_cannot_be_compared_is_left_out():
    model = _model()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["hook"] = print  # (a callable: not comparable over the ranks, left out)
    optimizer.param_groups[0]["phase"] = torch.tensor([1 + 1j])  # (complex: left out)
    described = training_described(model, optimizer, ignored={"1.bias"})
    assert {k: v for k, v in described.items() if not k.startswith("optimizer")} == {
        "0.weight": False, "0.bias": True, "1.weight": True}
    group = described["optimizer param group 0"]
    assert group["params"] == 4 and group["lr"] == 0.1 and "hook" not in group and "phase" not in group
    assert "optimizer class" not in training_described(model, None)


def test_nothing_is_described_or_gathered_without_a_process_group_of_several_ranks(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("described without a process group of several ranks")

    monkeypatch.setattr(_agreement, "training_described", never)
    monkeypatch.setattr(_collective, "gather", never)
    refuse_apart(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), "with_ddp", "")


def _hook(state, bucket):
    return bucket


def _closure(scale):
    def hook(state, bucket):
        return bucket * scale
    return hook


def test_callables_of_one_name_are_told_apart_by_module_and_a_lambdas_line():
    """named_callable (what agreed_options compare over the ranks of a callable option) told two lambdas of a module
    apart by nothing (``module.<lambda>``), nor two partials (``functools.partial``); a function of one name in another
    module by its module (as it did). Reference: what Python says of each, its module, qualname and first line."""
    other = types.FunctionType(_hook.__code__, {}, "_hook")
    other.__module__, other.__qualname__ = "elsewhere", _hook.__qualname__
    first, second = (lambda m, b: 1,
                     lambda m, b: 2)
    assert named_callable(_hook) == f"{__name__}._hook" and named_callable(other) == "elsewhere._hook"
    qualname = test_callables_of_one_name_are_told_apart_by_module_and_a_lambdas_line.__qualname__
    assert named_callable(first) == f"{__name__}.{qualname}.<locals>.<lambda> (line {first.__code__.co_firstlineno}, column 34)"
    assert named_callable(second) != named_callable(first)
    one, other = (lambda step: 0.0, lambda step: 0.5)  # (two on one line: told apart by their columns)
    assert named_callable(one) != named_callable(other)
    assert named_callable(_closure(1.0)) == named_callable(_closure(2.0))  # (one closure's code; values not compared)
    assert named_callable(_closure(1.0)).endswith(f"(line {_closure(1.0).__code__.co_firstlineno})")
    assert named_callable(functools.partial(first, b=0)) == f"functools.partial({named_callable(first)})"
    assert named_callable(functools.partial(first)) != named_callable(functools.partial(second))
    assert named_callable(torch.nn.MSELoss()) == "torch.nn.modules.loss.MSELoss" and named_callable(None) is None
