"""loopkit._window: running means in state.extras, and how a DDP checkpoint gives each rank its own back."""

from __future__ import annotations

import pytest
import torch

import loopkit._collective
from loopkit._window import EPOCH, LOGGED, OVER_RANKS, own_share


def _window_of(*losses: float) -> dict:
    extras: dict = {}
    for loss in losses:
        extras = dict(EPOCH.add(extras, {"loss": torch.tensor(loss)}))
    return extras


def _saved(world_size: int = 2) -> dict:
    """What rank 0 writes under DDP: its own window, and rank 1's as it was."""
    part = {k: v for k, v in _window_of(10.0, 20.0, 30.0).items()}
    return {**_window_of(1.0, 2.0), "other": 7, OVER_RANKS: {"world_size": world_size, "ranks": {"1": part}}}


def test_each_rank_takes_its_own_window_back_with_the_same_number_of_ranks():
    rank0 = own_share(_saved(), 0, 2, "cpu")
    rank1 = own_share(_saved(), 1, 2, "cpu")
    assert OVER_RANKS not in rank0 and OVER_RANKS not in rank1 and rank1["other"] == 7
    assert EPOCH.means(rank0) == {"loss": 1.5}
    assert EPOCH.means(rank1) == {"loss": 20.0}
    assert EPOCH.records(rank1) == EPOCH.records(_window_of(10.0, 20.0, 30.0))  # the records themselves, unsummed


def test_with_another_number_of_ranks_rank_zero_takes_every_saved_record_weighed_as_this_runs_updates():
    # saved on 2 ranks (2 records an update), resumed on 4 (4 records an update): each saved record weighs 4/2
    rank0 = own_share(_saved(), 0, 4, "cpu")
    rank3 = own_share(_saved(), 3, 4, "cpu")
    assert EPOCH.means(rank0) == {"loss": (1 + 2 + 10 + 20 + 30) / 5}  # (alone, the weights cancel)
    assert EPOCH.means(EPOCH.add(rank0, {"loss": torch.tensor(100.0)})) == pytest.approx(
        {"loss": (2 * (1 + 2 + 10 + 20 + 30) + 100) / (2 * 5 + 1)}
    )
    assert EPOCH.means(rank3) == {}


def test_the_earlier_form_summed_into_rank_zero_still_loads():
    saved = {**_window_of(1.0, 2.0, 3.0), OVER_RANKS: True}
    assert EPOCH.means(own_share(saved, 0, 2, "cpu")) == {"loss": 2.0}
    assert EPOCH.means(own_share(saved, 1, 2, "cpu")) == {}


def test_windows_past_a_fold_and_the_logging_window_come_back_too():
    """40 records fold once (32 summed on the device, 8 pending); the logging window travels alike."""
    from loopkit._window import LOGGED

    values = [float(v) for v in range(40)]
    part: dict = {}
    for v in values:
        part = dict(EPOCH.add(part, {"loss": torch.tensor(v)}))
        part = dict(LOGGED.add(part, {"loss": torch.tensor(2 * v)}))
    assert len(EPOCH.records(part)) == 8
    saved = {**_window_of(1.0), **dict(LOGGED.add({}, {"loss": torch.tensor(5.0)})),
             OVER_RANKS: {"world_size": 2, "ranks": {"1": part}}}
    rank1 = own_share(saved, 1, 2, "cpu")
    assert EPOCH.means(rank1) == EPOCH.means(part) == {"loss": sum(values) / 40}
    assert LOGGED.means(rank1) == {"loss": 2 * sum(values) / 40}
    merged = own_share(saved, 0, 1, "cpu")  # one rank now: rank 0 takes both
    assert EPOCH.means(merged) == {"loss": (1.0 + sum(values)) / 41}
    assert LOGGED.means(merged) == {"loss": (5.0 + 2 * sum(values)) / 41}


@pytest.mark.parametrize("window, owner, advice", [
    (LOGGED, "with_logging", "call the step with_logging wraps on every rank"),
    (EPOCH, "run_epochs", ""),
])
def test_means_that_fail_over_the_ranks_name_the_windows_owner_not_evaluate(monkeypatch, window, owner, advice):
    """Rank 0 of 2 whose other rank died: the all-gather of the means' keys raises gloo's error. The error names the
    window's owner (it said "call evaluate on every rank" in with_logging's and run_epochs' means too)."""
    def died(*args, **kwargs):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(loopkit._collective, "active", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "all_gather_object", died)
    with pytest.raises(RuntimeError) as raised:
        window.means(window.add({}, {"loss": torch.tensor(1.0)}))
    message = str(raised.value)
    assert message.startswith(f"{owner}: the reduction of the means over the ranks failed on rank 0 of 2: ")
    assert advice in message and "evaluate" not in message
    assert ("every rank must reach it at the same point" in message) == bool(advice)
    assert "another rank has probably died or stopped" in message
    assert message.endswith("The error was: Connection reset by peer")
