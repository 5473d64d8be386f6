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


class _OnMPS(torch.Tensor):
    """A CPU tensor that says it is on MPS and, as MPS does, refuses to become float64 there (MPS has no float64:
    ``TypeError: Cannot convert a MPS Tensor to float64 dtype ...``); moved to the CPU it is a plain tensor."""

    @property
    def device(self) -> torch.device:
        return torch.device("mps")

    def to(self, *args, **kwargs):
        device = next((a for a in args if isinstance(a, (torch.device, str))), kwargs.get("device"))
        dtype = next((a for a in args if isinstance(a, torch.dtype)), kwargs.get("dtype"))
        if dtype == torch.float64 and (device is None or torch.device(device).type == "mps"):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        plain = self.as_subclass(torch.Tensor)
        plain = plain if dtype is None else torch.Tensor.to(plain, dtype)
        return plain if device is not None and torch.device(device).type == "cpu" else plain.as_subclass(_OnMPS)


def test_the_means_of_sums_on_mps_are_read_without_float64():
    """The first log point read the window's sums as float64 on their device, which MPS refuses (its sums are
    float32, sum_dtype); they are read in float32 there, every value as it is. (MPS simulated: see _OnMPS.)"""
    sums = {"loss": torch.tensor(0.1).as_subclass(_OnMPS), "tokens": torch.tensor(2.0**24).as_subclass(_OnMPS)}
    assert loopkit._collective.read(sums) == {"loss": float(torch.tensor(0.1)), "tokens": 2.0**24}
    assert loopkit._collective.means(sums, {"loss": 2, "tokens": 4}, who="with_logging") == {
        "loss": float(torch.tensor(0.1)) / 2, "tokens": 2.0**22}
    assert loopkit._collective.read({"loss": torch.tensor(0.1, dtype=torch.float64)}) == {"loss": 0.1}  # (float64 elsewhere)


def _flagged(loss: float, skipped: bool) -> dict:
    """A record of a step under with_nan_guard: its loss, and its skip flag."""
    return {"loss": torch.tensor(loss), "nan_guard/skipped": torch.tensor(float(skipped))}


def _guarded_window(n: int, skipped: set[int], window=EPOCH) -> dict:
    extras: dict = {}
    for i in range(n):
        extras = dict(window.add(extras, _flagged(float("nan") if i in skipped else float(i), i in skipped)))
    return extras


@pytest.mark.parametrize("window", [EPOCH, LOGGED])
def test_a_record_the_guard_skipped_adds_nothing_to_the_means_but_its_flag(window):
    """40 records (32 folded on the device, 8 pending), 3 skipped with a NaN loss: the loss mean is the other 37's,
    the flag's mean the fraction skipped; the weighed counts are device tensors (no host read until the means)."""
    extras = _guarded_window(40, {3, 17, 35}, window)
    kept = [i for i in range(40) if i not in {3, 17, 35}]
    assert window.means(extras) == pytest.approx({"loss": sum(kept) / 37, "nan_guard/skipped": 3 / 40})
    assert isinstance(extras[window.counts]["loss"], torch.Tensor) and extras[window.counts]["nan_guard/skipped"] == 32
    assert window.means(_guarded_window(2, {0, 1}, window)) == {"nan_guard/skipped": 1.0}  # every call skipped


def test_plain_records_are_counted_by_the_host_as_before():
    extras = _window_of(*[float(v) for v in range(33)])
    assert extras[EPOCH.counts] == {"loss": 32} and type(extras[EPOCH.counts]["loss"]) is int


def test_weighed_windows_come_back_to_each_rank_and_with_another_number_of_ranks():
    """A DDP checkpoint's windows of guarded records (weighed counts: tensors) go back to each rank (the same number
    of ranks), or into rank 0's, weighed as this run's updates (another number), as plain ones do."""
    mine, theirs = _guarded_window(40, {3, 35}), _guarded_window(5, {1})
    saved = {**mine, OVER_RANKS: {"world_size": 2, "ranks": {"1": theirs}}}
    assert EPOCH.means(own_share(saved, 0, 2, "cpu")) == EPOCH.means(mine)
    assert EPOCH.means(own_share(saved, 1, 2, "cpu")) == EPOCH.means(theirs) == {"loss": 2.25, "nan_guard/skipped": 0.2}
    merged = own_share(saved, 0, 4, "cpu")  # each saved record weighs 4/2: the weights cancel in the means
    kept = [i for i in range(40) if i not in {3, 35}] + [0, 2, 3, 4]
    assert EPOCH.means(merged) == pytest.approx({"loss": sum(kept) / len(kept), "nan_guard/skipped": 3 / 45})


def test_weighed_counts_are_summed_over_the_ranks(monkeypatch):
    """Under DDP the means' all-reduce sums each rank's weighed counts (device tensors) with the plain ones: rank 0 of
    2 (simulated: the other rank's sums and counts added by the all-reduce) reads the mean over both ranks' kept calls."""
    def all_gather_object(out, keys):
        out[:] = [keys, ["loss", "nan_guard/skipped"]]

    def all_reduce(packed, op=None):
        packed += torch.tensor([10.0, 0.0, 2.0, 2.0], dtype=packed.dtype)  # rank 1: 2 calls, losses 4 and 6, none skipped

    monkeypatch.setattr(loopkit._collective, "active", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "gloo")
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    extras = _guarded_window(3, {1})  # losses 0, (skipped), 2
    assert EPOCH.means(extras) == pytest.approx({"loss": (0 + 2 + 10) / 4, "nan_guard/skipped": 1 / 5})


def test_an_accumulation_groups_micro_batches_take_its_flag_across_a_fold():
    """Records without the flag before a flagged one (a group's micro-batches, its update's flag on the last) weigh as
    it does; at a fold (32 records) those after the last flagged record are held back until their flag comes."""
    extras: dict = {}
    for group in range(12):  # groups of 3: losses 3g, 3g+1, 3g+2; group 5 skipped (its first loss NaN)
        for i in range(3):
            loss = float("nan") if (group, i) == (5, 0) else float(3 * group + i)
            record = {"loss": torch.tensor(loss)}
            if i == 2:
                record["nan_guard/skipped"] = torch.tensor(float(group == 5))
            extras = dict(EPOCH.add(extras, record))
        if group == 10:  # 33 records: folded at the 32nd, the group of records 30-32 held back then (30, 31 pending)
            assert len(EPOCH.records(extras)) == 3
    kept = [3 * g + i for g in range(12) if g != 5 for i in range(3)]
    assert EPOCH.means(extras) == pytest.approx({"loss": sum(kept) / len(kept), "nan_guard/skipped": 1 / 12})
