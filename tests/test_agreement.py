"""``loopkit._agreement``: the summary of the parameters' flags and the optimizer that ``with_ddp`` and ``with_fsdp``
compare over the ranks where they build their wrappers (the collective itself: tests/transforms/test_ddp.py's and
test_fsdp.py's two-rank runs). Two summaries compare equal exactly where the optimizers would update alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopkit import _agreement, _collective
from loopkit._agreement import refuse_apart, training_described


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
