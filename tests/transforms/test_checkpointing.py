"""with_checkpointing: when it saves, what it keeps, how it composes, graceful stop and resume.

References: the states an independent, uninterrupted run passes through (steps are pure, so
they can be kept and compared), the batches that run sees, and scores chosen by hand.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
import pickle
import re
import shutil
import signal
import threading
import time
import types
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit import TrainState, checkpoint, run_epochs, train_step, with_checkpointing, with_grad_accum
from loopkit.transforms import checkpointing as checkpointing_module
from loopkit.transforms.checkpointing import CheckpointStep
from tests._driver_helpers import LatestTrainLoss, make_data, scripted_loss

# --- helpers -----------------------------------------------------------------------------------


def _state(seed: int = 0, *, scheduler: bool = True) -> TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    return TrainState.create(model, opt, sched, seed=seed)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 1, generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(40)), batch_size=4, shuffle=True)  # 10 batches


class _Recorder:
    """A loss function that remembers which samples each batch held."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append(idx.tolist())
        return ((model(x) - y) ** 2).mean()


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return ((model(x) - y) ** 2).mean()


def test_a_run_that_switches_schedulers_between_its_phases_goes_on_in_its_folder_and_restore_picks_the_phase(
    tmp_path, assert_trees_equal
):
    """A second phase of one run (state.evolve(scheduler=...)) in the same folder was refused as another
    experiment's. Reference: the same two phases without checkpoints. restore still tells the schedulers apart."""
    def phase_two(state: TrainState) -> TrainState:
        return state.evolve(scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(state.optimizer, T_max=8))

    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=5)
    first, _ = run_epochs(step, _state(), _loader(), epochs=1, progress=False)
    second, _ = run_epochs(step, phase_two(first), _loader(), epochs=2, progress=False)
    plain, _ = run_epochs(train_step(_mse), _state(), _loader(), epochs=1, progress=False)
    plain, _ = run_epochs(train_step(_mse), phase_two(plain), _loader(), epochs=2, progress=False)
    assert_trees_equal(second.state_dict(), plain.state_dict())
    assert loopkit.restore(phase_two(_state()), tmp_path).step == 20
    with pytest.raises(loopkit.StateMismatchError, match="its scheduler is CosineAnnealingLR, and this state's StepLR"):
        loopkit.restore(_state(), tmp_path)


def _count_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    """A plain function step: one update per call, no model change."""
    return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}


def _steps(directory: Path) -> list[int]:
    return [c.step for c in checkpoint.list_checkpoints(directory)]


# --- when it saves -----------------------------------------------------------------------------


def _fake_clock(monkeypatch) -> list[float]:
    """with_checkpointing's ``time.monotonic`` reads the returned list's one value (seconds), set by the test."""
    now = [0.0]
    monkeypatch.setattr(checkpointing_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_train_time_interval_saves_at_the_first_update_past_it_and_a_resumed_fit_restarts_its_clock(
        tmp_path, monkeypatch):
    """Lightning's ModelCheckpoint(train_time_interval=...): a save at the first batch end at which the interval
    has passed since the training's start (on_train_start, a resumed fit's too) or the last time save; no epoch
    saves besides. Reference: the steps computed by hand from a fake clock, each update taking 3 s."""
    now = _fake_clock(monkeypatch)

    def loss(model, batch):
        now[0] += 3.0
        return _mse(model, batch)

    def fit(state: TrainState, epochs: int) -> TrainState:
        step = with_checkpointing(train_step(loss), tmp_path, train_time_interval=datetime.timedelta(seconds=10),
                                  keep_last=None)
        return run_epochs(step, state, _loader(), epochs=epochs, progress=False)[0]

    fit(_state(), 1)  # clock from 0; update k ends at 3k s: 12 s >= 10 at step 4, then 24 - 12 at step 8
    assert _steps(tmp_path) == [4, 8]
    now[0] = 100.0  # a relaunch, later: the clock starts again at its fit's start (time between does not count)
    resumed = loopkit.restore(_state(), tmp_path)
    assert resumed.step == 8
    fit(resumed, 2)  # steps 9..20 end at 103, 106, ...: 112 s (step 12), 124 s (step 16), 136 s (step 20)
    assert _steps(tmp_path) == [4, 8, 12, 16, 20]


def test_train_time_interval_in_a_loop_of_your_own_starts_its_clock_at_the_first_call(tmp_path, monkeypatch):
    """Reference: by hand, calls at 3, 6, ..., 30 s, the clock from the first (3 s): 15 s (step 5), 27 s (step 9);
    with every_n_steps=4 too (step 4 a step save, not a time one): 4, 5, 8, 9."""
    now = _fake_clock(monkeypatch)
    for every, expected in (({}, [5, 9]), ({"every_n_steps": 4}, [4, 5, 8, 9])):
        directory = tmp_path / str(len(every))
        step = with_checkpointing(_count_step, directory, train_time_interval=10, keep_last=None, **every)
        state, now[0] = TrainState.create(nn.Linear(1, 1)), 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no "only every_n_steps saves by itself" warning: it saves by itself)
            for _ in range(10):
                now[0] += 3.0
                state, _ = step(state, None)
        assert _steps(directory) == expected


@pytest.mark.parametrize("interval", [0, -1.0, float("inf"), float("nan"), "10", datetime.timedelta(0), True])
def test_a_train_time_interval_that_is_no_positive_time_is_refused(tmp_path, interval):
    with pytest.raises(ValueError, match="train_time_interval must be a positive datetime.timedelta"):
        with_checkpointing(_count_step, tmp_path, train_time_interval=interval)


def test_train_time_interval_with_keep_last_0_is_refused_as_the_other_unscored_triggers(tmp_path):
    with pytest.raises(ValueError, match="the saves of train_time_interval \\(unscored\\) would be removed"):
        with_checkpointing(_count_step, tmp_path, train_time_interval=60, keep_last=0, monitor="val/loss")


def test_every_n_steps_saves_once_per_update_under_grad_accum(tmp_path, make_batches, mse_loss, take_snapshot,
                                                              assert_trees_equal):
    step = with_checkpointing(with_grad_accum(train_step(mse_loss), every=2), tmp_path, every_n_steps=2, keep_last=None)
    state = TrainState.create((m := nn.Linear(4, 2)), torch.optim.SGD(m.parameters(), lr=0.1))
    seen = {}
    for batch in make_batches(11):
        state, _ = step(state, batch)
        seen.setdefault(state.step, take_snapshot(state))  # the state right after each update
    found = checkpoint.list_checkpoints(tmp_path)
    assert [(c.step, c.batch_index) for c in found] == [(2, 4), (4, 8)]
    for info in found:
        fresh = TrainState.create((m := nn.Linear(4, 2)), torch.optim.SGD(m.parameters(), lr=0.1))
        restored = checkpoint.restore(fresh, info.path)
        assert_trees_equal(take_snapshot(restored), seen[info.step])


def test_every_n_epochs_saves_completed_epochs_and_the_end_of_a_fit_cut_mid_epoch(tmp_path, take_snapshot,
                                                                                   assert_trees_equal):
    """A fit ending mid-epoch (max_steps) is saved at its end, as Lightning's epoch-end save comes there: the
    newest checkpoint was the last completed epoch's, older than the trained model. Reference: the trained
    state, and the uninterrupted run the saved one resumes to."""
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_epochs=2, keep_last=None)
    state, _ = run_epochs(step, _state(), _loader(), epochs=5, progress=False)
    assert [(c.epoch, c.batch_index, c.step) for c in checkpoint.list_checkpoints(tmp_path)] == [(2, 0, 20), (4, 0, 40)]
    step = with_checkpointing(train_step(_mse), tmp_path / "partial", every_n_epochs=1)
    cut, _ = run_epochs(step, _state(), _loader(), max_steps=15, progress=False)  # the second epoch is cut short
    assert [(c.epoch, c.batch_index) for c in checkpoint.list_checkpoints(tmp_path / "partial")] == [(1, 0), (1, 5)]
    restored = loopkit.restore(_state(), tmp_path / "partial")
    assert restored.step == 15
    assert_trees_equal(dict(restored.model.state_dict()), dict(cut.model.state_dict()))
    for _ in range(2):  # a requeued job relaunched from it, with the same max_steps: it is saved once
        run_epochs(step, loopkit.restore(_state(), tmp_path / "partial"), _loader(), max_steps=15, progress=False)
    assert [(c.epoch, c.batch_index) for c in checkpoint.list_checkpoints(tmp_path / "partial")] == [(1, 0), (1, 5)]
    resumed, history = run_epochs(train_step(_mse), restored, _loader(), epochs=2, progress=False)
    whole, whole_history = run_epochs(train_step(_mse), _state(), _loader(), epochs=2, progress=False)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(whole))
    assert history == whole_history[1:]


def test_keep_last_keeps_the_newest(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, every_n_steps=1, keep_last=2)
    state = TrainState.create(nn.Linear(1, 1))
    for _ in range(5):
        state, _ = step(state, None)
    assert _steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ckpt-")) == [".lock"]


def test_a_directory_holding_a_further_run_is_named_when_a_new_run_first_saves(tmp_path):
    """The same script run twice into one directory (Lightning warns of a non-empty checkpoint
    directory): the second run's first save is behind the first run's newest checkpoint. A run
    resumed from that directory is not warned about."""

    def fit(state, epochs):
        return run_epochs(with_checkpointing(train_step(_mse), tmp_path, every_n_steps=5), state, _loader(),
                          epochs=epochs, progress=False)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_state(), 2)  # an empty directory: no warning
        fit(loopkit.restore(_state(), tmp_path), 3)  # resumed from its newest checkpoint: no warning
    with pytest.warns(RuntimeWarning, match="holds checkpoints further along .*step30.* than this run \\(step 5\\)"):
        fit(_state(), 1)


def test_a_directory_holding_another_runs_checkpoint_at_the_first_saves_position_is_named_unless_resumed_from_it(
        tmp_path):
    """A fresh run of as many steps into a directory holding the last run's checkpoints (a notebook cell run
    again): its first save lands on their newest position, which was not warned about (only one further along
    was), and both runs' step-10 checkpoints were kept side by side. A run resumed from that checkpoint, whose
    first save is at the position it began from (its end, at the max_steps it already reached), and one that
    trains on from it, are not warned about."""
    def fit(state, every=5, **limits):
        step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=every, keep_last=None)
        return run_epochs(step, state, _loader(), progress=False, **limits)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_state(), max_steps=5)  # ends mid-epoch: (step 5, epoch 0, batch 5)
        fit(loopkit.restore(_state(), tmp_path), max_steps=5)  # resumed at its end: saves there, no warning
        fit(loopkit.restore(_state(), tmp_path), max_steps=15)  # resumed, trains on: no warning
    shutil.rmtree(tmp_path)
    fit(_state(), max_steps=5)
    with pytest.warns(RuntimeWarning, match=r"holds a checkpoint at this run's first save \(ckpt-\S*step5-epoch0-batch5, "
                                            r"step 5\), which this run did not begin from \(it began at step 0\)"):
        fit(_state(seed=1), max_steps=5)
    assert _steps(tmp_path) == [5, 5]  # (both runs' step-5 checkpoints: what the warning names)
    shutil.rmtree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_state(), every=None, epochs=1)  # the epoch's end: (step 10, epoch 1, batch 0)
    with pytest.warns(RuntimeWarning, match="holds a checkpoint at this run's first save"):
        fit(_state(seed=1), every=None, epochs=1)  # a notebook cell run again


def test_a_directory_holding_lightnings_checkpoints_is_named_at_the_first_save_and_the_run_saves_beside_them(
        tmp_path):
    """A folder of Lightning's checkpoints given to a migrated script (restore returns its template there, and
    warns): before, the run saved beside them silently. Reference: the same run in an empty folder saves the same
    checkpoints (Lightning's are left alone), and warns of nothing."""

    def fit(directory: Path) -> None:
        run_epochs(with_checkpointing(train_step(_mse), directory, every_n_steps=5), _state(), _loader(), epochs=1,
                   progress=False)

    (tmp_path / "lightning").mkdir()
    for name in ("epoch=3-step=16.ckpt", "last.ckpt"):
        torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "lightning" / name)
    with pytest.warns(RuntimeWarning, match=r"lightning holds epoch=3-step=16\.ckpt, last\.ckpt, which look like "
                                            r"checkpoints of another kind") as caught:
        fit(tmp_path / "lightning")
    assert len([w for w in caught if "another kind" in str(w.message)]) == 1  # once, at the first save
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(tmp_path / "empty")
    assert _steps(tmp_path / "lightning") == _steps(tmp_path / "empty") == [5, 10]
    assert {"epoch=3-step=16.ckpt", "last.ckpt"} <= {p.name for p in (tmp_path / "lightning").iterdir()}


# --- a directory holding another model's checkpoints -------------------------------------------


def _other_model_state() -> TrainState:
    """Another architecture than _state's (hidden 16, not 8), and another optimizer."""
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    return TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _saved_before_structure(ckpt: Path) -> None:
    """Make ``ckpt`` look saved by a loopkit whose meta.json held no structure (manifest re-signed)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["structure"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    files = {}
    for name in ("state.pt", "meta.json"):
        raw = (ckpt / name).read_bytes()
        files[name] = {"size": len(raw), "fold_crc32_sha256": checkpoint.checksum(raw)}
    (ckpt / "manifest.json").write_text(json.dumps({"format": "loopkit-checkpoint", "version": 1, "files": files}))


@pytest.mark.parametrize("written_by", ["this_loopkit", "an_earlier_loopkit"])
def test_a_run_of_another_model_in_the_directory_is_refused_before_its_first_step_and_deletes_nothing(
        tmp_path, take_snapshot, assert_trees_equal, written_by):
    """Before: experiment B (another architecture) given A's directory by mistake trained on, and its keep_last
    rotation deleted A's checkpoints without a word (A could no longer be restored)."""
    run_epochs(with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1), _state(), _loader(), max_steps=2,
               progress=False)
    if written_by == "an_earlier_loopkit":  # the structure then comes from the payload's keys and shapes
        for info in checkpoint.list_checkpoints(tmp_path):
            _saved_before_structure(info.path)
    kept = _files(tmp_path)
    other = _other_model_state()
    before = take_snapshot(other)
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1, keep_last=1)
    with pytest.raises(loopkit.StateMismatchError) as info:
        run_epochs(step, other, _loader(), epochs=2, progress=False)
    message = str(info.value)
    assert message.startswith(
        f"with_checkpointing: {tmp_path} holds checkpoints of another model or optimizer"
    )
    assert "ckpt-000002-step2-epoch0-batch2" in message
    assert "key 'model.0.weight' has shape (8, 3) there and (16, 3) in this model" in message
    assert "a directory of its own, or delete the old checkpoints" in message
    assert _files(tmp_path) == kept  # A's checkpoints survive, untouched
    other.check_usable()  # refused before the first step: B's state is as it was, and usable
    assert_trees_equal(take_snapshot(other), before)
    assert loopkit.restore(_state(), tmp_path).step == 2  # A resumes
    # in a loop of one's own the first call is refused, before the step changed anything
    donated = loopkit.donate(with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1, keep_last=1))
    with pytest.raises(loopkit.StateMismatchError, match="has shape \\(8, 3\\) there and \\(16, 3\\)") as info:
        donated(other, next(iter(_loader())))
    assert loopkit.state_at_error(info.value) is other
    assert_trees_equal(take_snapshot(other), before)
    assert _files(tmp_path) == kept


def test_the_same_model_with_another_optimizer_is_refused_too_but_not_for_other_param_groups(tmp_path):
    """Another optimizer class is another experiment; other param groups are the same fine-tuning script run
    again (it adds groups as it unfreezes layers): that is only the existing warning's business."""
    run_epochs(with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1), _state(), _loader(), max_steps=1,
               progress=False)
    kept = _files(tmp_path)
    model = _state().model
    sgd = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    layers = [model[0].parameters(), model[3].parameters()]
    grouped = TrainState.create(model, torch.optim.Adam([{"params": ps} for ps in layers], lr=0.01))
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1, keep_last=1)
    with pytest.raises(loopkit.StateMismatchError, match=re.escape("its optimizer is Adam, and this state's SGD")):
        run_epochs(step, sgd, _loader(), epochs=1, progress=False)
    assert _files(tmp_path) == kept
    (newest,) = loopkit.checkpoint.list_checkpoints(tmp_path)
    found = loopkit.checkpoint.read_structure(newest.path)
    assert found["optimizer"]["param_groups"] == [4]
    assert loopkit.checkpoint.structure_mismatch(found, loopkit.checkpoint.structure(grouped)) is None


def test_the_same_model_resumed_or_run_again_in_its_directory_rotates_as_before(tmp_path):
    def fit(state, epochs, every=3):
        step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=every, keep_last=2)
        return run_epochs(step, state, _loader(), epochs=epochs, progress=False)[0]

    fit(_state(), 1)
    assert _steps(tmp_path) == [6, 9]
    fit(loopkit.restore(_state(), tmp_path), 2)  # resumed (at step 9): its saves rotate the earlier ones out
    assert _steps(tmp_path) == [15, 18]
    with pytest.warns(RuntimeWarning, match="holds checkpoints further along"):  # run again from scratch: warned,
        fit(_state(seed=4), 1, every=2)  # as before, not refused
    assert _steps(tmp_path) == [8, 10]


def test_a_step_that_reshapes_the_model_at_its_first_call_or_a_lazy_model_is_compared_as_it_will_be_saved(tmp_path):
    """with_qat prepares the model at its first call, a lazy module gets its shapes at the first forward: a new
    run of the same pipeline in the directory is not refused (the one of another size still is)."""
    def qat():
        return with_checkpointing(loopkit.with_qat(train_step(_mse)), tmp_path / "qat", every_n_steps=5)

    run_epochs(qat(), _state(scheduler=False), _loader(), max_steps=5, progress=False)
    with pytest.warns(RuntimeWarning, match="holds a checkpoint at this run's first save"):  # (another run's)
        run_epochs(qat(), _state(seed=1, scheduler=False), _loader(), max_steps=5, progress=False)
    assert _steps(tmp_path / "qat") == [5, 5]

    def lazy(out):  # nothing but a lazy module: its shapes are known once the first call's forward ran
        model = nn.Sequential(nn.LazyLinear(out))
        return TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    loss = lambda m, b: m(b[0]).pow(2).mean()  # noqa: E731
    lazy_step = lambda: with_checkpointing(train_step(loss), tmp_path / "lazy", every_n_steps=5)  # noqa: E731
    run_epochs(lazy_step(), lazy(4), _loader(), max_steps=5, progress=False)
    kept = _files(tmp_path / "lazy")
    with pytest.warns(RuntimeWarning, match="holds a checkpoint at this run's first save"):
        run_epochs(lazy_step(), lazy(4), _loader(), max_steps=5, progress=False)
    assert _steps(tmp_path / "lazy") == [5, 5]
    refused = re.escape("'model.0.weight' has shape (4, 3) there and (6, 3)")
    with pytest.raises(loopkit.StateMismatchError, match=refused):
        run_epochs(lazy_step(), lazy(6), _loader(), max_steps=5, progress=False)
    assert {k: v for k, v in _files(tmp_path / "lazy").items() if k in kept} == kept


def test_a_plain_function_step_is_checkpointed(tmp_path):
    def fn(state, batch):
        extras = {"count": state.extras.get("count", 0) + 1, "total": state.extras.get("total", torch.zeros(2)) + batch}
        return state.evolve(step=state.step + 1, extras=extras), {}

    step = with_checkpointing(fn, tmp_path, every_n_steps=3)
    state = TrainState.create(nn.Linear(1, 1))
    for i in range(3):
        state, _ = step(state, torch.full((2,), float(i)))
    restored = loopkit.restore(TrainState.create(nn.Linear(1, 1)), tmp_path)
    assert restored.step == 3 and restored.extras["count"] == 3
    assert torch.equal(restored.extras["total"], torch.tensor([3.0, 3.0]))


# --- best by a monitored metric ----------------------------------------------------------------


def _validate(step: CheckpointStep, state: TrainState, score: float) -> TrainState:
    state, _ = step(state, None)
    step.notify("validation_end", state, {"val/loss": score, "val/acc": -score})
    return state


def test_monitor_keeps_the_best_besides_the_last(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, every_n_steps=1, keep_last=1, monitor="val/loss", keep_best=2)
    state = TrainState.create(nn.Linear(1, 1))
    for score in (5.0, 3.0, 4.0, 1.0, 6.0):  # at steps 1..5
        state = _validate(step, state, score)
    assert _steps(tmp_path) == [2, 4, 5]  # best two (3.0 at step 2, 1.0 at step 4) and the last
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["monitor"] == "val/loss" and sorted(scores["scores"].values()) == [1.0, 3.0, 6.0]

    resumed = with_checkpointing(_count_step, tmp_path, every_n_steps=1, keep_last=1, monitor="val/loss", keep_best=2)
    state = _validate(resumed, state, 2.0)  # a new process reads the scores back: 2.0 beats 3.0
    assert _steps(tmp_path) == [4, 6]


def test_two_checkpointers_of_one_directory_are_refused_naming_both_and_the_one_that_keeps_newest_and_best(tmp_path):
    """Lightning's habit of two ModelCheckpoints (every step, keep the newest; best by val) in one directory: both
    were accepted and each one's rotation deleted the other's checkpoints, the best among them. Refused when built,
    whichever is inside and however the directory is spelt; the one checkpointer the message gives keeps the newest
    and the best (test_monitor_keeps_the_best_besides_the_last), and two directories are fine."""
    newest = lambda step, where: with_checkpointing(step, where, every_n_steps=1, keep_last=1)  # noqa: E731
    best = lambda step, where: with_checkpointing(step, where, monitor="val/loss", keep_last=0)  # noqa: E731
    for outer, inner, where in [(best, newest, tmp_path), (newest, best, str(tmp_path) + "/./")]:
        with pytest.raises(ValueError, match=r"with_checkpointing: this one \(.*\) and the with_checkpointing inside it "
                                             r"\(.*\) both save into .*keep_last/keep_best would delete the other's "
                                             r"checkpoints.*with_checkpointing\(step, directory, every_n_steps=N, "
                                             r"keep_last=1, monitor='val/loss', keep_best=1\).*or give each its own "
                                             r"directory"):
            outer(loopkit.with_logging(inner(train_step(_mse), tmp_path), loopkit.ConsoleLogger()), where)
    with pytest.raises(ValueError, match=r"this one \(monitor='val/loss', keep_best=1, keep_last=0\) and the "
                                         r"with_checkpointing inside it \(every_n_steps=1, keep_last=1\)"):
        best(newest(train_step(_mse), tmp_path), tmp_path)
    both = best(newest(train_step(_mse), tmp_path / "newest"), tmp_path / "best")
    assert both.applied == ("train_step", "with_checkpointing", "with_checkpointing")


def test_a_score_given_after_its_checkpoint_was_written_is_kept_with_it_when_scores_json_is_lost(tmp_path):
    """A step checkpoint scored by the validation of its own update: the score is in scores.json and beside the
    checkpoint (score.json); with scores.json gone, the scores, the best checkpoint and a relaunch's rotation are
    those of the run that kept it (the reference: the same run and relaunch with scores.json in place)."""
    runs = {}
    for name, lose in (("kept", False), ("lost", True)):
        directory = tmp_path / name
        step = with_checkpointing(_count_step, directory, every_n_steps=1, keep_last=1, monitor="val/loss", keep_best=2)
        state = TrainState.create(nn.Linear(1, 1))
        for score in (5.0, 3.0, 4.0, 1.0, 6.0):  # each validated after its step's checkpoint was written
            state = _validate(step, state, score)
        recorded = json.loads((directory / "scores.json").read_text())["scores"]
        if lose:
            (directory / "scores.json").unlink()
        found = checkpoint.scores(directory, "val/loss", "min")
        best = checkpoint.best_checkpoint(directory)
        resumed = with_checkpointing(_count_step, directory, every_n_steps=1, keep_last=1, monitor="val/loss", keep_best=2)
        _validate(resumed, state, 2.0)  # 2.0 beats 3.0: the step-2 checkpoint goes, the best (1.0) stays
        runs[name] = (recorded, found, best.name, _steps(directory))
    assert runs["lost"] == runs["kept"]
    assert sorted(runs["lost"][1].values()) == [1.0, 3.0, 6.0] and runs["lost"][3] == [4, 6]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_restore_by_another_process_while_scores_json_is_rewritten_leaves_the_writer_alone(tmp_path, monkeypatch,
                                                                                            async_save):
    """A restore from the folder a run trains into (README: supported) cleaned it under the exclusive lock, which
    no rewrite of scores.json held, and removed the rewrite's temporary: the run died in os.replace with
    FileNotFoundError. Here the reader's restore lands while the temporary is open (a second lock of this process
    conflicts as another process's). Reference: the same run with no reader, its checkpoints and scores."""
    real, restores = checkpoint._replace_atomically, []

    def reader_restores_meanwhile(path, fill, durable=True):
        def fill_then_restore(f):
            fill(f)
            if path.name == "scores.json":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    restores.append(loopkit.restore(TrainState.create(nn.Linear(1, 1)), path.parent).step)
        return real(path, fill_then_restore, durable)

    runs = {}
    for name in ("alone", "read"):
        if name == "read":
            monkeypatch.setattr(checkpoint, "_replace_atomically", reader_restores_meanwhile)
        step = with_checkpointing(_count_step, tmp_path / name, every_n_steps=1, keep_last=1, monitor="val/loss",
                                  keep_best=1, async_save=async_save)
        state = TrainState.create(nn.Linear(1, 1))
        for score in (5.0, 3.0, 4.0, 1.0, 6.0):
            state = _validate(step, state, score)
        step.wait()
        runs[name] = (state.step, _steps(tmp_path / name), checkpoint.scores(tmp_path / name, "val/loss", "min"))
    assert restores and runs["read"] == runs["alone"]
    assert runs["alone"][:2] == (5, [4, 5])


@pytest.mark.filterwarnings("ignore:with_checkpointing. in a loop of your own")  # (this one tells it its validations)
@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("options", [{"every_n_steps": 1, "keep_last": 3},
                                     {"every_n_steps": 1, "keep_last": 1, "monitor": "val/loss", "keep_best": 2},
                                     {"keep_last": 0, "monitor": "val/loss", "keep_best": 2}])  # (the ranking saves)
def test_the_saver_names_only_the_checkpoints_kept_however_many_saves(tmp_path, options, async_save):
    """A long fit's saves: the saver held one name for every checkpoint ever saved (memory growing with the fit), those
    the rotation had removed too. Reference: the checkpoints in the folder, after each save."""
    step = with_checkpointing(_count_step, tmp_path, async_save=async_save, **options)
    state = TrainState.create(nn.Linear(1, 1))
    for i in range(40):
        state = _validate(step, state, float(i * 7 % 11)) if "monitor" in options else step(state, None)[0]
        step.wait()
        assert sorted(step.saver.names.values()) == [c.name for c in checkpoint.list_checkpoints(tmp_path)]
    assert len(step.saver.names) == {3: 3, 1: 3, 0: 2}[options["keep_last"]]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_removed_before_its_late_score_is_left_unscored(tmp_path, async_save):
    """(By hand or by another writer of the folder, as the rotation allows: the fit died writing score.json into a
    folder that was gone.) As if the checkpoint had never been: no score for it, and the next save rotates as usual."""
    step = with_checkpointing(_count_step, tmp_path, every_n_steps=1, keep_last=1, monitor="val/loss", keep_best=2,
                              async_save=async_save)
    state, _ = step(TrainState.create(nn.Linear(1, 1)), None)
    step.wait()
    checkpoint.remove(checkpoint.list_checkpoints(tmp_path)[-1].path)
    step.notify("validation_end", state, {"val/loss": 1.0, "val/acc": -1.0})
    step.wait()
    assert checkpoint.scores(tmp_path, "val/loss", "min") == {} and checkpoint.list_checkpoints(tmp_path) == []
    state = _validate(step, state, 2.0)
    step.wait()
    assert _steps(tmp_path) == [2] and list(checkpoint.scores(tmp_path, "val/loss", "min").values()) == [2.0]


def test_in_a_loop_of_ones_own_epoch_saves_alone_are_warned_of_at_the_first_call(tmp_path, recwarn):
    """The defaults (every_n_epochs=1) save at run_epochs' epoch ends: a loop of one's own (examples/custom_loop.py's)
    saved nothing, silently. Under run_epochs, or with every_n_steps, nothing is warned of."""
    state = TrainState.create(nn.Linear(1, 1))
    with pytest.warns(RuntimeWarning, match="in a loop of your own only every_n_steps saves by itself"):
        with_checkpointing(_count_step, tmp_path / "own")(state, None)
    assert _steps(tmp_path / "own") == []
    recwarn.clear()
    with_checkpointing(_count_step, tmp_path / "steps", every_n_steps=1)(state, None)
    with_checkpointing(_count_step, tmp_path / "off", every_n_epochs=0)(state, None)  # (epoch saves off: step.save)
    loopkit.run_epochs(with_checkpointing(_count_step, tmp_path / "driven"), state, [None] * 2, epochs=2, progress=False)
    assert not [w for w in recwarn if "loop of your own" in str(w.message)]
    assert _steps(tmp_path / "driven") == [2, 4] and _steps(tmp_path / "steps") == [1]
    for options in ({"monitor": "train/loss"}, {"monitor": "val/loss", "keep_last": 0}):  # (a monitor acts at them too)
        with pytest.warns(RuntimeWarning, match="in a loop of your own only every_n_steps saves by itself"):
            folder = tmp_path / options["monitor"].replace("/", "_")
            with_checkpointing(_count_step, folder, **options)(TrainState.create(nn.Linear(1, 1)), None)


@pytest.mark.parametrize("stray", ["file", "link to nothing"])
def test_a_stray_entry_named_like_a_checkpoint_is_left_by_the_rotation_with_a_warning(tmp_path, stray):
    """restore skips it; keep_last's rotation tried to remove a file, and checkpoint.remove's refusal stopped the
    fit; a link to nothing (a checkpoint on a disk not mounted) it took for one another process had removed."""
    entry = tmp_path / "ckpt-000001-step0-epoch0-batch0"
    if stray == "file":
        entry.write_text("not a checkpoint")
    else:
        os.symlink(tmp_path / "elsewhere", entry)
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1, keep_last=1)
    with pytest.warns(RuntimeWarning, match="leaving ckpt-000001-step0-epoch0-batch0 in .*keep_last/keep_best would remove"):
        state, _ = run_epochs(step, _state(), _loader(), max_steps=3, progress=False)
    assert state.step == 3 and _steps(tmp_path) == [0, 3]  # (the stray entry, left, and the one kept)
    assert os.path.lexists(entry) and (stray != "file" or entry.read_text() == "not a checkpoint")


def test_monitor_alone_saves_only_what_ranks(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, keep_last=1, monitor="val/acc", mode="max", keep_best=1)
    state = TrainState.create(nn.Linear(1, 1))
    for score in (5.0, 3.0, 4.0, 1.0, 6.0):  # val/acc = -score: best at step 4
        state = _validate(step, state, score)
    assert _steps(tmp_path) == [4]  # steps 1, 2 and 4 were saved in turn; 3 and 5 never ranked
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == {
        checkpoint.list_checkpoints(tmp_path)[0].name: -1.0
    }


def test_keep_last_zero_keeps_only_the_best_as_lightnings_save_top_k_and_an_unscored_save_until_the_next(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, keep_last=0, monitor="val/loss", keep_best=2)
    state = TrainState.create(nn.Linear(1, 1))
    for score in (5.0, 3.0, 4.0, 1.0, 6.0):  # at steps 1..5: the best two are 1.0 (step 4) and 3.0 (step 2)
        state = _validate(step, state, score)
    assert _steps(tmp_path) == [2, 4]
    assert checkpoint.read_meta(checkpoint.best_checkpoint(tmp_path))["step"] == 4
    state, _ = step(state, None)
    step.save(state)  # an unscored save (a graceful stop's too): kept, the newest, for a relaunch
    assert _steps(tmp_path) == [2, 4, 6]
    assert loopkit.restore(TrainState.create(nn.Linear(1, 1)), tmp_path).step == 6
    state = _validate(step, state, 2.0)  # step 7 ranks: the unscored one goes, and 3.0's
    assert _steps(tmp_path) == [4, 7]


def test_monitor_of_a_train_metric_is_read_at_epoch_end(tmp_path):
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_epochs=1, keep_last=1, monitor="train/loss")
    _, history = run_epochs(step, _state(), _loader(), epochs=4, progress=False)
    best_epoch = min(range(4), key=lambda e: history[e]["train/loss"])
    kept = {c.epoch for c in checkpoint.list_checkpoints(tmp_path)}
    assert kept == {4, best_epoch + 1}


def test_a_monitor_that_is_not_reported_is_named(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, monitor="val/los")
    state, _ = step(TrainState.create(nn.Linear(1, 1)), None)
    with pytest.raises(KeyError, match=r"monitor 'val/los' is not among the metrics \['val/loss'\]"):
        step.notify("validation_end", state, {"val/loss": 1.0})


# --- composition and options -------------------------------------------------------------------


@pytest.mark.parametrize(
    "outer",
    [
        lambda s: loopkit.with_grad_clip(s, max_norm=1.0),
        lambda s: loopkit.with_grad_accum(s, every=2),
        lambda s: loopkit.with_amp(s, dtype=torch.bfloat16),
        lambda s: loopkit.with_nan_guard(s),
    ],
    ids=["grad_clip", "grad_accum", "amp", "nan_guard"],
)
def test_gradient_transforms_cannot_wrap_it(tmp_path, outer):
    inner = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1)
    with pytest.raises(TypeError, match=r"with_\w+ cannot wrap with_checkpointing: .*apply with_\w+ first"):
        outer(inner)


def test_it_wraps_any_gradient_transform_and_reports_its_name(tmp_path):
    clipped = loopkit.with_grad_clip(with_grad_accum(train_step(_mse), every=2), max_norm=1.0)
    step = with_checkpointing(clipped, tmp_path)
    assert step.applied == ("train_step", "with_grad_accum", "with_grad_clip", "with_checkpointing")
    with pytest.raises(TypeError, match="with_checkpointing cannot wrap eval_step"):
        with_checkpointing(loopkit.eval_step(lambda m, b: {}), tmp_path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive int or None, got 0"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be an int >= 0 or None, got 1.5"),
        ({"every_n_epochs": -1}, "every_n_epochs must be an int >= 0 or None, got -1"),
        ({"keep_last": -1}, "keep_last must be an int >= 0 or None, got -1"),
        ({"keep_last": 0}, "keep_last=0 keeps only the best-scored checkpoints, and without a monitor none is scored"),
        ({"keep_last": 0, "monitor": "val/loss", "every_n_epochs": 1},
         "the saves of every_n_epochs (unscored) would be removed as soon as written"),
        ({"keep_last": 0, "monitor": "val/loss", "every_n_steps": 5},
         "the saves of every_n_steps (unscored) would be removed as soon as written"),
        ({"keep_best": -1}, "keep_best must be an int >= 0, got -1"),
        ({"keep_best": 0, "monitor": "val/loss"}, "keep_best=0 with monitor='val/loss' keeps no checkpoint for its score"),
        ({"mode": "avg"}, "mode must be 'min' or 'max', got 'avg'"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_options_out_of_range_are_named(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        with_checkpointing(train_step(_mse), tmp_path, **options)


def test_keep_best_0_without_a_monitor_is_unused_as_any_keep_best(tmp_path):
    """(keep_best=0 with a monitor is refused: it would keep nothing for the score, the monitor doing nothing.)"""
    assert with_checkpointing(_count_step, tmp_path / "ckpt", keep_best=0).keep_best == 0


# --- resume under run_epochs -------------------------------------------------------------------


def _uninterrupted(tmp_path: Path, epochs: int = 2):
    recorder = _Recorder()
    step = with_grad_accum(train_step(recorder), every=2)
    state, _ = run_epochs(step, _state(seed=3), _loader(), epochs=epochs, progress=False)
    return state, recorder.seen


def test_a_restored_state_continues_with_the_same_batches_in_the_same_order(tmp_path, take_snapshot,
                                                                            assert_trees_equal):
    reference, reference_seen = _uninterrupted(tmp_path)
    recorder = _Recorder()
    step = with_checkpointing(with_grad_accum(train_step(recorder), every=2), tmp_path, every_n_steps=1)
    run_epochs(step, _state(seed=3), _loader(), max_steps=7, progress=False)  # stops mid-epoch 1
    assert recorder.seen == reference_seen[:14]
    restored = loopkit.restore(_state(seed=99), tmp_path)  # another seed: the checkpoint's wins
    assert (restored.epoch, restored.batch_index, restored.step, restored.seed) == (1, 4, 7, 3)
    final, _ = run_epochs(step, restored, _loader(), epochs=2, progress=False)
    assert recorder.seen == reference_seen
    assert_trees_equal(take_snapshot(final), take_snapshot(reference))


def test_sigterm_stops_after_the_current_step_saves_and_resumes_exactly(tmp_path, take_snapshot, assert_trees_equal):
    reference, reference_seen = _uninterrupted(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)

    class Terminate:
        def on_batch_end(self, state, metrics):
            if state.epoch == 0 and state.batch_index == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    recorder = _Recorder()
    step = with_checkpointing(with_grad_accum(train_step(recorder), every=2), tmp_path, every_n_epochs=1)
    stopped, history = run_epochs(step, _state(seed=3), _loader(), epochs=2, progress=False, callbacks=[Terminate()])
    assert (stopped.epoch, stopped.batch_index, stopped.step) == (0, 5, 2)  # the step under way finished
    assert signal.getsignal(signal.SIGTERM) is previous
    assert history == [] and recorder.seen == reference_seen[:5]  # the interrupted epoch is the resumed run's to record
    [saved] = checkpoint.list_checkpoints(tmp_path)
    payload = checkpoint.load(saved.path)
    assert payload["meta"]["reason"] == "stop" and payload["state"]["extras"]["accum/count"] == 1
    final, _ = run_epochs(step, loopkit.restore(_state(), tmp_path), _loader(), epochs=2, progress=False)
    assert recorder.seen == reference_seen
    assert_trees_equal(take_snapshot(final), take_snapshot(reference))


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    import time

    from loopkit.driver import _StopOnSignal

    monkeypatch.setattr(_StopOnSignal, "repeat_window", 0.05)
    previous = signal.getsignal(signal.SIGINT)

    class Interrupt:
        def on_batch_end(self, state, metrics):
            if state.batch_index == 2:
                signal.raise_signal(signal.SIGINT)
                time.sleep(0.1)  # past the window in which a repeat is the same stop delivered twice
                signal.raise_signal(signal.SIGINT)

    step = with_checkpointing(train_step(_mse), tmp_path)
    with pytest.raises(KeyboardInterrupt, match="SIGINT after SIGINT: stopping at once"):
        run_epochs(step, _state(), _loader(), epochs=1, progress=False, callbacks=[Interrupt()])
    assert signal.getsignal(signal.SIGINT) is previous
    assert checkpoint.list_checkpoints(tmp_path) == []  # it did not wait to save


def test_one_stop_delivered_twice_at_once_is_one_graceful_stop(tmp_path):
    """torchrun's agent (and SLURM) send a worker SIGTERM twice within a millisecond: before, that was
    taken as a second signal, and the stop checkpoint was never written (half of the runs)."""

    class Terminate:
        def on_batch_end(self, state, metrics):
            if state.batch_index == 2:
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)

    step = with_checkpointing(train_step(_mse), tmp_path)
    state, history = run_epochs(step, _state(), _loader(), epochs=1, progress=False, callbacks=[Terminate()])
    assert (state.step, history) == (2, [])
    assert _steps(tmp_path) == [2]  # the stop's checkpoint


def test_outside_the_main_thread_no_handler_is_installed(tmp_path):
    seen = []

    class Look:
        def on_batch_end(self, state, metrics):
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    worker = threading.Thread(target=run_epochs, args=(train_step(_mse), _state(), _loader()),
                              kwargs={"epochs": 1, "progress": False, "callbacks": [Look()]})
    worker.start()
    worker.join(timeout=60)
    assert len(seen) == 10 and all(h is before for h in seen)


# --- saving in the background ------------------------------------------------------------------


def test_async_saves_hold_exactly_what_synchronous_saves_hold(tmp_path, assert_trees_equal, monkeypatch):
    """The background writer is held back until training has made the next update in place (donated), so a
    snapshot that shared the live tensors instead of copying them would be written with a later step's
    weights and optimizer state. Reference: the synchronous run's checkpoints, and each update's weights."""
    real_write = checkpoint.write
    seen = threading.Condition()
    progress = {"step": 0, "held": 0}

    class Progress(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            with seen:
                progress["step"] = state.step
                seen.notify_all()

    def held_write(snap, *args, **kwargs):  # (the last update has no next one to wait for)
        if snap.step < 5:
            with seen:
                assert seen.wait_for(lambda: progress["step"] > snap.step, timeout=60), "training did not go on"
                progress["held"] += 1
        return real_write(snap, *args, **kwargs)

    weights: dict[int, torch.Tensor] = {}

    class Weights(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            weights[state.step] = state.model[0].weight.detach().clone()

    for mode in ("sync", "async"):
        step = with_checkpointing(with_grad_accum(train_step(_mse), every=2), tmp_path / mode, every_n_steps=1,
                                  keep_last=None, async_save=mode == "async")
        if mode == "async":
            monkeypatch.setattr(checkpoint, "write", held_write)
        callbacks = [Weights()] if mode == "sync" else [Progress()]
        run_epochs(step, _state(seed=1), _loader(), epochs=1, callbacks=callbacks, progress=False)  # donated
    assert progress["held"] == 4  # each save but the last was written after the next update
    sync, background = (checkpoint.list_checkpoints(tmp_path / m) for m in ("sync", "async"))
    assert [c.name for c in sync] == [c.name for c in background] and len(sync) == 5
    assert weights[1].ne(weights[2]).any()  # (the updates change the weights: a later step's would differ)
    for a, b in zip(sync, background):
        one, two = checkpoint.load(a.path), checkpoint.load(b.path)
        assert_trees_equal(one["state"], two["state"])
        assert torch.equal(two["state"]["model"]["0.weight"], weights[b.step])


def test_async_saves_for_a_monitor_keep_what_synchronous_saves_keep(tmp_path, monkeypatch):
    """Ranking a score waits for the pending save, whose score is not recorded before it is written."""
    real_write = checkpoint.write

    def slow_write(*args, **kwargs):  # a large model: the save is still pending at the next validation
        threading.Event().wait(0.2)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", slow_write)
    values = iter([0.9, 0.5, 0.4] * 2)

    def scripted(state, batch):
        return state, {"acc": torch.tensor(next(values))}

    for mode in ("sync", "async"):
        step = with_checkpointing(train_step(_mse), tmp_path / mode, monitor="val/acc", mode="max", keep_best=1,
                                  keep_last=None, async_save=mode == "async")
        run_epochs(step, _state(), _loader(), epochs=3, val=(scripted, [0]), sanity_val_batches=0, progress=False)
    sync, background = ([c.name for c in checkpoint.list_checkpoints(tmp_path / m)] for m in ("sync", "async"))
    assert sync == background and len(sync) == 1 and "step10-" in sync[0]  # only the best (0.9, after epoch 1)


def test_a_background_save_pending_when_the_interpreter_exits_is_written(tmp_path):
    import subprocess
    import sys

    script = f"""
import torch, loopkit
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters()))
step = loopkit.with_checkpointing(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), {str(tmp_path)!r},
                                  every_n_steps=2, async_save=True, durable=True)
for _ in range(2):
    state, _ = step(state, torch.randn(4, 256))
# no step.wait(): the script ends with the save pending
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [saved] = checkpoint.list_checkpoints(tmp_path)
    assert saved.step == 2
    checkpoint.verify(saved.path)


def test_durable_false_saves_without_any_fsync_and_restores(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=2, keep_last=2, durable=False)
    state, _ = run_epochs(step, _state(), _loader(), epochs=1, progress=False)
    assert synced == []
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    resumed = loopkit.restore(_state(seed=1), tmp_path)
    assert resumed.step == newest.step == state.step
    for (name, p), q in zip(resumed.model.named_parameters(), state.model.parameters()):
        assert torch.equal(p, q), name


def test_a_failed_background_save_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(payload, path, durable):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_payload", full_disk)
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=4, async_save=True)
    with pytest.raises(OSError, match="no space left on device"):
        run_epochs(step, _state(), _loader(), epochs=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_failed_save_leaves_the_callers_state_as_it_was(tmp_path, monkeypatch, take_snapshot, assert_trees_equal):
    monkeypatch.setattr(checkpoint, "_write_payload", lambda payload, path, durable: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1)
    state = _state()
    before = take_snapshot(state)
    batch = next(iter(_loader()))
    with pytest.raises(OSError, match="previous checkpoints are intact"):
        step(state, batch)
    assert_trees_equal(take_snapshot(state), before)


def test_after_fit_end_the_same_position_is_saved_again(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, every_n_steps=1, keep_last=None)
    start = TrainState.create(nn.Linear(1, 1))
    first, _ = step(start, None)
    step.notify("stop", first, {})  # the same position: not saved twice within one run
    assert _steps(tmp_path) == [1]
    step.notify("fit_end", first, {})
    with pytest.warns(RuntimeWarning, match="holds a checkpoint at this run's first save"):  # (named: two runs
        step(start, None)  # a second run with the same step object reaches the same position
    assert _steps(tmp_path) == [1, 1]


def test_an_epoch_without_steps_is_not_scored(tmp_path):
    step = with_checkpointing(_count_step, tmp_path, monitor="train/loss")
    step.notify("epoch_end", TrainState.create(nn.Linear(1, 1)).evolve(epoch=1), {"epoch": 0, "step": 0})
    assert _steps(tmp_path) == []
    with pytest.raises(KeyError, match="monitor 'train/loss'"):
        step.notify("epoch_end", TrainState.create(nn.Linear(1, 1)), {"epoch": 0, "train/mse": 1.0})


# --- step saves under run_epochs: after the batch's callbacks -------------------------------------


def test_callbacks_never_see_the_mark_of_a_save_due_and_no_state_keeps_it(tmp_path):
    from loopkit.steps import SAVE_DUE

    seen = []

    class Look(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            seen.append(SAVE_DUE in state.extras or SAVE_DUE in state.state_dict()["extras"])

    step = with_checkpointing(train_step(_mse), tmp_path, every_n_steps=1, keep_last=None)
    final, _ = run_epochs(step, _state(), _loader(), epochs=1, callbacks=[Look()], progress=False)
    assert seen == [False] * 10 and SAVE_DUE not in final.extras
    saved = [loopkit.restore(_state(), c.path) for c in checkpoint.list_checkpoints(tmp_path)]
    assert [s.step for s in saved] == list(range(1, 11)) and not any(SAVE_DUE in s.extras for s in saved)


def test_a_fit_whose_inner_transform_fails_at_its_end_leaves_the_step_saving_in_a_loop_of_ones_own(tmp_path):
    """A logger that cannot close (disk full) fails the fit at its end; with_checkpointing around it
    still hears "fit_end": the same step in the user's loop saves inside each call again."""

    class Full(loopkit.Logger):
        def _write_metrics(self, metrics, step):
            pass

        def _finalize(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    step = with_checkpointing(loopkit.with_logging(train_step(_mse), Full(), every_n_steps=1), tmp_path,
                              every_n_steps=1, keep_last=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError, match="No space left"):
            run_epochs(step, _state(), _loader(), max_steps=2, progress=False)
    # (each logger is finalized once: the abort that follows does not finalize the failed one again)
    assert not [w for w in caught if "releasing the step failed" in str(w.message)]
    state = loopkit.restore(_state(), tmp_path)
    assert state.step == 2
    for batch in list(_loader())[:3]:
        state, _ = step(state, batch)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [1, 2, 3, 4, 5]


# --- a kill between a scored save and scores.json; rotation; non-finite scores; one save per update ----

#: the start of a script run in a process of its own: ``dies_at(name, n)`` makes the n-th call of checkpoint.<name>
#: end the process as SIGKILL would at that moment (n=0: never)
_KILLABLE = r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import loopkit
from loopkit import checkpoint
def dies_at(name, n):
    calls, original = [], getattr(checkpoint, name)
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os._exit(137)
        return original(*args, **kwargs)
    setattr(checkpoint, name, dying)
"""

_SCORED_RUN = _KILLABLE + r"""
directory, die_in, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
dies_at(die_in, die_at)
torch.manual_seed(1)
model = torch.nn.Linear(4, 1)
state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05), seed=3)
step = loopkit.with_checkpointing(loopkit.train_step(lambda m, b: m(b[0]).sub(b[1]).pow(2).mean()), directory,
                                  every_n_epochs=1, keep_last=1, monitor="val/score", keep_best=1)
SCORES = [5.0, 1.0, 3.0, 4.0, 2.0, 6.0]  # the best is the 2nd epoch's
state = loopkit.restore(state, directory)
done = {"n": state.epoch}
class Count:
    def on_validation_end(self, state, metrics):
        done["n"] += 1
x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
loopkit.run_epochs(step, state, [(x, x.sum(1, keepdim=True))], epochs=len(SCORES), sanity_val_batches=0,
                   progress=False, callbacks=[Count()],
                   val=(loopkit.eval_step(lambda m, b: {"score": torch.tensor(SCORES[done["n"]])}), [0]))
"""


def _scored_run(directory: Path, die_in: str = "write_scores", die_at: int = 0) -> int:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loopkit.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _SCORED_RUN, str(directory), die_in, str(die_at)], env=env,
                          timeout=300).returncode


@pytest.mark.parametrize("die_in, die_at", [("write_scores", 2), ("remove", 1)])
def test_a_kill_right_after_the_best_checkpoint_is_saved_loses_neither_it_nor_its_score(tmp_path, die_in, die_at):
    """Killed after the epoch-2 checkpoint (the best score, 1.0) is renamed into place: before scores.json is
    rewritten, or while the older checkpoints are removed; then resumed with loopkit.restore. Reference: the
    same run uninterrupted. Before: the resumed run never re-validated that point, its score was lost, and
    keep_last deleted the best checkpoint."""
    assert _scored_run(tmp_path / "reference") == 0
    assert _scored_run(tmp_path / "killed", die_in, die_at) == 137
    assert _scored_run(tmp_path / "killed") == 0
    expected = json.loads((tmp_path / "reference" / "scores.json").read_text())["scores"]
    got = json.loads((tmp_path / "killed" / "scores.json").read_text())["scores"]
    assert got == expected  # the best, and the newest (keep_last=1) with its own score
    assert expected == {"ckpt-000002-step2-epoch2-batch0": 1.0, "ckpt-000006-step6-epoch6-batch0": 6.0}
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "killed")] == [
        c.name for c in checkpoint.list_checkpoints(tmp_path / "reference")
    ]
    assert checkpoint.read_meta(tmp_path / "killed" / "ckpt-000002-step2-epoch2-batch0")["score"] == {
        "monitor": "val/score", "mode": "min", "value": 1.0
    }


_EPOCH_RUN = _KILLABLE + r"""
directory, case, die_in, die_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dies_at(die_in, die_at)
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
state = loopkit.restore(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), directory)
LOSSES = [3.0, 1.0, 2.0, 4.0]  # train/loss per epoch: the 2nd epoch's is the best
epoch = {"n": state.epoch}
class Epochs:
    def on_epoch_start(self, state):
        epoch["n"] = state.epoch
if case == "train_monitor":
    step = loopkit.with_checkpointing(loopkit.train_step(lambda m, b: m(b).sum() * 0 + LOSSES[epoch["n"]]),
                                      directory, every_n_epochs=1, keep_last=1, monitor="train/loss", keep_best=1)
    data = [torch.ones(1, 2)]
else:  # step and epoch saves: one checkpoint per update
    step = loopkit.with_checkpointing(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), directory,
                                      every_n_steps=1, every_n_epochs=1, keep_last=None)
    data = [torch.ones(1, 2), torch.zeros(1, 2)]
loopkit.run_epochs(step, state, data, epochs=4, callbacks=[Epochs()], progress=False)
"""


def _epoch_run(directory: Path, case: str, die_in: str = "write", die_at: int = 0) -> int:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loopkit.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _EPOCH_RUN, str(directory), case, die_in, str(die_at)], env=env,
                          timeout=300).returncode


def _kept(directory: Path) -> list[tuple[str, float | None]]:
    scores = checkpoint.read_scores(directory).get("scores", {})
    return [(c.name, scores.get(c.name)) for c in checkpoint.list_checkpoints(directory)]


@pytest.mark.slow
@pytest.mark.parametrize("case, die_in, die_at", [
    ("train_monitor", "write_scores", 2),  # killed before scores.json gets the best (2nd) epoch's score
    ("one_save_per_update", "write", 3),  # killed as the 1st epoch-end save starts (update 2, saved at its step)
])
def test_a_kill_at_an_epoch_end_save_resumes_to_the_checkpoints_of_the_uninterrupted_run(tmp_path, case, die_in,
                                                                                        die_at):
    """Reference: the same run uninterrupted. Before: a train/ monitor's epoch save was written without its
    score, which a kill before scores.json lost (the resumed run then removed the best checkpoint); and a run
    killed between an epoch's last step save and its epoch-end save kept two checkpoints of that update."""
    assert _epoch_run(tmp_path / "reference", case) == 0
    assert _epoch_run(tmp_path / "killed", case, die_in, die_at) == 137
    assert _epoch_run(tmp_path / "killed", case) == 0
    assert _kept(tmp_path / "killed") == _kept(tmp_path / "reference")
    if case == "train_monitor":
        assert [score for _, score in _kept(tmp_path / "reference")] == [1.0, 4.0]


@pytest.mark.parametrize("how", ["checkpoint.remove", "by hand"])
def test_the_scores_of_checkpoints_removed_since_rank_no_more(tmp_path, how):
    """Reference: the same run in an empty folder. Before: scores.json still ranked the removed best
    checkpoint, so no later monitored save ranked and the run kept nothing."""
    import shutil

    def fit(directory: Path, scores: list[float]) -> None:
        step = with_checkpointing(_count_step, directory, keep_last=1, monitor="val/loss", keep_best=1)
        state = TrainState.create(nn.Linear(1, 1))
        for score in scores:
            state, _ = step(state, None)
            step.on_event("validation_end", state, {"val/loss": score})

    fit(tmp_path / "run", [2.0, 1.0, 3.0])
    for info in checkpoint.list_checkpoints(tmp_path / "run"):
        checkpoint.remove(info.path) if how == "checkpoint.remove" else shutil.rmtree(info.path)
    fit(tmp_path / "run", [2.0, 1.5, 3.0])
    fit(tmp_path / "reference", [2.0, 1.5, 3.0])
    assert _kept(tmp_path / "run") == _kept(tmp_path / "reference") != []


_LOGGED_RUN = r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import loopkit
logs, directory, case, kill = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "kill"
mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5 if case == "held" else 3)]
class Killing(loopkit.CSVLogger):  # a kill as the epoch's rows are written: after the last checkpoint of that point
    def log_metrics(self, metrics, step):
        if kill and ("val/mse" in metrics if case == "held" else metrics.get("epoch") == 0):
            os._exit(137)
        super().log_metrics(metrics, step)
step = loopkit.with_checkpointing(
    loopkit.with_logging(loopkit.train_step(mse), Killing(logs, "r", version=0), every_n_steps=1), directory,
    every_n_steps=1, monitor=None if case == "held" else "val/mse")
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
state = loopkit.restore(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), directory)
loopkit.run_epochs(step, state, data, val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), data[:2]),
                   sanity_val_batches=0, progress=False, **({"max_steps": 5} if case == "held" else {"epochs": 2}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["held", "monitor"])
def test_a_kill_as_an_epochs_rows_are_logged_leaves_no_checkpoint_past_them(tmp_path, case):
    """held: the step checkpoint held at max_steps; monitor: the scored checkpoint of an epoch's validation. Both
    were written before the epoch's validation row and record were logged: a relaunch from them (past the
    epoch) never wrote those rows. Reference: the uninterrupted run's metrics.csv."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loopkit.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1"}

    def run(name: str, kill: bool) -> int:
        argv = [str(tmp_path / name / "logs"), str(tmp_path / name / "ckpt"), case, "kill" if kill else "no"]
        return subprocess.run([sys.executable, "-c", _LOGGED_RUN, *argv], env=env, timeout=300).returncode

    assert run("reference", False) == 0
    assert run("killed", True) == 137
    assert run("killed", False) == 0
    read = lambda name: (tmp_path / name / "logs" / "r" / "version_0" / "metrics.csv").read_text()  # noqa: E731
    assert read("killed") == read("reference")
    assert "val/mse" in read("reference").splitlines()[0]


# a stopped epoch's scored validation; a relaunch's scored save at the position of its newest checkpoint (the
# step save made before that step's validation); a kill during the rotation of a fit's end save
#: five regression batches, a linear model and its SGD state, for the scripts below
_FIVE_BATCHES = r"""
mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05), seed=3)
"""

_RELAUNCHED = {
    "stopped epoch": r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import loopkit
from loopkit import checkpoint
logs, ckdir, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
orig = checkpoint.write_scores
def dying(*a, **k):   # SIGKILL right after the scored checkpoint of step 3 was renamed into place
    if kill and "ckpt-000002-step3-epoch0-batch3" in os.listdir(ckdir):
        os._exit(137)
    return orig(*a, **k)
checkpoint.write_scores = dying
class Stopper(loopkit.Callback):   # e.g. a time budget: asks to stop after an update (stateful, as EarlyStopping)
    def on_batch_end(self, state, metrics):
        if state.step == 3:
            self.should_stop = True
    def state_dict(self): return {"s": self.should_stop}
    def load_state_dict(self, sd): self.should_stop = sd["s"]
""" + _FIVE_BATCHES + r"""step = loopkit.with_checkpointing(loopkit.with_logging(loopkit.train_step(mse), loopkit.CSVLogger(logs, "r", version=0), every_n_steps=1),
                                  ckdir, every_n_steps=2, monitor="val/mse", keep_best=1, keep_last=1)
state = loopkit.restore(state, ckdir)
loopkit.run_epochs(step, state, data, epochs=2, val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), data[:2]),
                   val_every_n_steps=2, sanity_val_batches=0, progress=False, callbacks=[Stopper()])
""",
    "same position": r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import loopkit
logs, ckdir, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
class Kill(loopkit.Callback):          # SIGKILL at step 8, after the step-6 checkpoint and its validation
    def on_batch_end(self, state, metrics):
        if kill and state.step == 8:
            os._exit(137)
mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(4)]
vdata = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(2)]
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seed=3)
step = loopkit.with_checkpointing(loopkit.train_step(mse), ckdir, every_n_steps=3, every_n_epochs=1,
                                  monitor="val/mse", keep_best=2, keep_last=1)
state = loopkit.restore(state, ckdir)
loopkit.run_epochs(step, state, data, epochs=3, val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), vdata),
                   val_every_n_steps=2, sanity_val_batches=0, progress=False, callbacks=[Kill()])
""",
    "rotation at the end": r"""
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import loopkit
from loopkit import checkpoint
logs, ckdir, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
orig = checkpoint.remove
def dying(path, *a, **k):   # SIGKILL as the fit_end save's rotation starts
    if kill and any("step7" in p for p in os.listdir(ckdir)):
        os._exit(137)
    return orig(path, *a, **k)
checkpoint.remove = dying
""" + _FIVE_BATCHES + r"""step = loopkit.with_checkpointing(loopkit.train_step(mse), ckdir, every_n_steps=2, every_n_epochs=1, keep_last=2)
state = loopkit.restore(state, ckdir)
loopkit.run_epochs(step, state, data, max_steps=7, progress=False)
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_RELAUNCHED))
def test_a_killed_run_relaunched_keeps_the_checkpoints_scores_and_rows_of_the_uninterrupted_run(tmp_path, case):
    """stopped epoch: the scored save of a stopped epoch's validation came before its rows were logged (the
    relaunch never wrote them); same position: a relaunch wrote a second checkpoint of its newest checkpoint's
    update, and keep_best removed the runner-up; rotation at the end: a relaunch that trained nothing skipped the
    rotation a kill had cut short (keep_last exceeded for good). Reference: the uninterrupted run."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loopkit.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1"}

    def run(name: str, kill: bool) -> int:
        argv = [str(tmp_path / name / "logs"), str(tmp_path / name / "ckpt"), "kill" if kill else "no"]
        return subprocess.run([sys.executable, "-c", _RELAUNCHED[case], *argv], env=env, timeout=300).returncode

    def kept(name: str) -> list:
        directory = tmp_path / name / "ckpt"
        scores = json.loads((directory / "scores.json").read_text())["scores"] if (directory / "scores.json").exists() else {}
        return [(c.step, c.epoch, c.batch_index, scores.get(c.name)) for c in checkpoint.list_checkpoints(directory)]

    def rows(name: str) -> str | None:
        path = tmp_path / name / "logs" / "r" / "version_0" / "metrics.csv"
        return path.read_text() if path.exists() else None

    assert run("reference", False) == 0
    assert run("killed", True) == 137
    assert run("killed", False) == 0
    assert kept("killed") == kept("reference") != []
    assert rows("killed") == rows("reference")


_SUPERSEDED_RUN = _KILLABLE + r"""
directory, case, die_in, die_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dies_at(die_in, die_at)
mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
g = torch.Generator().manual_seed(0)
data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(6)]
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
state = loopkit.restore(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01)), directory)
if case == "scored":
    step = loopkit.with_checkpointing(loopkit.train_step(mse), directory, every_n_steps=3, every_n_epochs=1,
                                      keep_last=1, monitor="val/score", keep_best=1)
else:  # step saves alone: the fit's last one is at step 18, before its epoch's end
    step = loopkit.with_checkpointing(loopkit.train_step(mse), directory, every_n_steps=3, keep_last=1)
class Score:  # epoch 0's last update (step 6, validated at its step save) is the best one
    def on_validation_end(self, state, metrics):
        return {"val/score": 1.0 if state.step == 6 else 5.0}
loopkit.run_epochs(step, state, data, epochs=3, val_every_n_steps=3, sanity_val_batches=0, progress=False,
                   val=(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), data[:2]), callbacks=[Score()])
"""


@pytest.mark.slow
@pytest.mark.parametrize("case, die_in, die_at, left", [
    # right after the epoch save of step 6 (its score carried over) is renamed into place
    ("scored", "write_scores", 3, "ckpt-000002-step6-epoch0-batch6"),
    # as its rotation deletes the step save it replaced (scores.json already rewritten)
    ("scored", "remove", 2, "ckpt-000002-step6-epoch0-batch6"),
    # the same at the fit's last save (step 18), which the relaunch's epoch end takes as its own (and rotates)
    ("scored", "remove", 6, "ckpt-000008-step18-epoch2-batch6"),
    # as the last step save's rotation deletes step 15's: the relaunch saves nothing
    ("plain", "remove", 5, "ckpt-000005-step15-epoch2-batch3"),
])
def test_a_kill_in_the_rotation_of_a_save_resumes_to_the_folder_of_the_uninterrupted_run(tmp_path, case, die_in,
                                                                                         die_at, left):
    """scored: every_n_steps=3 with every_n_epochs=1, 6 batches an epoch: each epoch's last update is saved at
    its step (and scored by that step's validation), then once more at the next epoch's start, which replaces
    it. Killed after that epoch save is renamed into place, before the step save is deleted; plain: killed before
    the rotation of the fit's last save deleted what keep_last no longer keeps. Then resumed with loopkit.restore.
    Reference: the same run uninterrupted. Before: the step save stayed for good, kept the best score (tied, the
    older), and a later rotation removed the epoch save instead; a relaunch that saved nothing kept keep_last + 1
    checkpoints."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loopkit.__file__).parents[1]), "OPENBLAS_NUM_THREADS": "1"}

    def run(name: str, die_in: str = "write", die_at: int = 0) -> int:
        argv = [str(tmp_path / name), case, die_in, str(die_at)]
        return subprocess.run([sys.executable, "-c", _SUPERSEDED_RUN, *argv], env=env, timeout=300).returncode

    def folder(name: str) -> tuple:
        best = checkpoint.best_checkpoint(tmp_path / name)
        return ([c.name for c in checkpoint.list_checkpoints(tmp_path / name)],
                checkpoint.read_scores(tmp_path / name).get("scores"), best and best.name)

    assert run("reference") == 0
    assert run("killed", die_in, die_at) == 137
    assert left in [c.name for c in checkpoint.list_checkpoints(tmp_path / "killed")]
    assert run("killed") == 0
    assert folder("killed") == folder("reference")
    assert folder("reference") == ((
        ["ckpt-000003-step6-epoch1-batch0", "ckpt-000009-step18-epoch3-batch0"],
        {"ckpt-000003-step6-epoch1-batch0": 1.0, "ckpt-000009-step18-epoch3-batch0": 5.0},
        "ckpt-000003-step6-epoch1-batch0",
    ) if case == "scored" else (["ckpt-000006-step18-epoch2-batch6"], None, None))


class _Killed(BaseException):
    """A kill, in-process: nothing after it runs."""


@pytest.mark.parametrize("dies_in", ["remove", "write_scores"])
def test_a_loop_of_ones_own_relaunched_finishes_the_rotation_a_kill_cut_short(tmp_path, monkeypatch, dies_in):
    """Killed in the rotation of the step-4 save: remove, as it deletes the step-2 checkpoint keep_last=1 no
    longer keeps; write_scores, before scores.json records that save's score (1.0, the best; keep_last=None keeps
    all). Relaunched with restore for one more update, which saves nothing. Reference: the same loop
    uninterrupted. Before: the relaunch kept the doomed checkpoint, or a scores.json without the best, for good."""
    options = {"every_n_steps": 2, "keep_last": 1} if dies_in == "remove" else {
        "keep_last": None, "monitor": "val/loss", "keep_best": 2}

    def fit(directory: Path, scores: list[float], more: int = 0) -> None:
        step = with_checkpointing(_count_step, directory, **options)
        state = checkpoint.restore(TrainState.create(nn.Linear(1, 1)), directory)
        for score in scores:  # (val/loss is unused without a monitor)
            state = _validate(step, state, score)
        for _ in range(more):
            state, _ = step(state, None)

    def folder(directory: Path) -> tuple:
        best = checkpoint.best_checkpoint(directory)
        return _kept(directory), best and best.name

    original, calls = getattr(checkpoint, dies_in), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == (1 if dies_in == "remove" else 4):
            raise _Killed
        return original(*args, **kwargs)

    fit(tmp_path / "reference", [5.0, 3.0, 4.0, 1.0], more=1)
    monkeypatch.setattr(checkpoint, dies_in, dying)
    with pytest.raises(_Killed):
        fit(tmp_path / "run", [5.0, 3.0, 4.0, 1.0])
    monkeypatch.setattr(checkpoint, dies_in, original)
    assert folder(tmp_path / "run") != folder(tmp_path / "reference")
    fit(tmp_path / "run", [], more=1)
    assert folder(tmp_path / "run") == folder(tmp_path / "reference")
    assert _steps(tmp_path / "reference") == ([4] if dies_in == "remove" else [1, 2, 3, 4])


def test_rotation_tolerates_a_checkpoint_another_writer_removed_and_says_so_once(tmp_path, monkeypatch):
    """Two runs in one folder: the other one's rotation removes a checkpoint this one is about to remove.
    Reference: the checkpoints the same run keeps alone. Before: a bare FileNotFoundError from os.rename."""
    alone = with_checkpointing(_count_step, tmp_path / "alone", every_n_steps=1, keep_last=1)
    state = TrainState.create(nn.Linear(1, 1))
    for _ in range(4):
        state, _ = alone(state, None)
    original = checkpoint.remove

    def removed_by_another_first(path, *args, **kwargs):
        original(path)  # the other run's rotation got there first
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "remove", removed_by_another_first)
    shared = with_checkpointing(_count_step, tmp_path / "shared", every_n_steps=1, keep_last=1)
    state = TrainState.create(nn.Linear(1, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            state, _ = shared(state, None)
    told = [w for w in caught if "another process seems to write checkpoints there" in str(w.message)]
    assert len(told) == 1
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "shared")] == [
        c.name for c in checkpoint.list_checkpoints(tmp_path / "alone")
    ]


@pytest.mark.parametrize("scores, keep_best, mode, lightning_keeps", [
    # what lightning.pytorch.callbacks.ModelCheckpoint(save_top_k=keep_best) keeps for these validation
    # scores, one per epoch (its _update_best_and_save ranks NaN as +inf in min mode, -inf in max mode)
    ([1.0, float("nan"), float("nan")], 3, "min", [0, 1, 2]),
    ([float("nan")] * 3, 1, "min", [0]),
    ([float("-inf"), 1.0, 2.0], 1, "min", [0]),
    ([1.0, float("inf"), 2.0], 1, "max", [1]),
    ([float("nan"), 1.0, float("nan")], 1, "max", [1]),
])
def test_nan_and_infinite_scores_are_ranked_as_lightning_ranks_them(tmp_path, scores, keep_best, mode,
                                                                    lightning_keeps):
    """Before: NaN and ±inf were never ranked ([1, nan, nan] kept epoch 0 alone; [-inf, 1, 2] kept epoch 1)."""
    step = with_checkpointing(_count_step, tmp_path, keep_last=1, monitor="val/loss", mode=mode, keep_best=keep_best)
    state = TrainState.create(nn.Linear(1, 1))
    for score in scores:  # at steps 1, 2, 3 (epoch e's score at step e + 1)
        state = _validate(step, state, score)
    recorded = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert sorted(c.step - 1 for c in checkpoint.list_checkpoints(tmp_path) if c.name in recorded) == lightning_keeps


@pytest.mark.parametrize("values, mode, lightning_keeps", [
    # equal in float32, as Lightning's logged metrics are: its ModelCheckpoint(save_top_k=1) keeps the first
    ([0.3, 0.2999999999, 0.2999999998], "min", [0]),
    ([0.7, 0.7000000001], "max", [0]),
    ([1e39, 2e39, 1.0], "min", [2]),  # beyond float32's range: +inf both, tied, then beaten
])
def test_scores_are_ranked_in_float32_as_lightning_and_early_stopping_rank_them(tmp_path, values, mode,
                                                                                lightning_keeps):
    """Before: ranked in float64, 0.2999999999 beat 0.3 and evicted it, where Lightning keeps the first (and
    loopkit's EarlyStopping, told the same values, finds no improvement). References: the checkpoints Lightning's
    ModelCheckpoint keeps, and the last check EarlyStopping counts as an improvement."""
    monitor = "val/loss" if mode == "min" else "val/acc"  # (_validate reports val/acc = -score)
    step = with_checkpointing(_count_step, tmp_path, keep_last=0, monitor=monitor, mode=mode, keep_best=1)
    stopper = loopkit.EarlyStopping(monitor, mode=mode, patience=len(values) + 1, check_finite=False)
    state = TrainState.create(nn.Linear(1, 1))
    improved_last = None
    for epoch, value in enumerate(values):  # epoch e's value at step e + 1
        state = _validate(step, state, value if mode == "min" else -value)
        stopper.check(None, value)
        improved_last = epoch if stopper.wait == 0 else improved_last
    recorded = json.loads((tmp_path / "scores.json").read_text())["scores"]
    kept = sorted(c.step - 1 for c in checkpoint.list_checkpoints(tmp_path) if c.name in recorded)
    assert kept == lightning_keeps == [improved_last]


def test_a_step_save_and_an_epoch_save_of_the_same_update_are_one_checkpoint(tmp_path, assert_trees_equal):
    """every_n_steps=4 with every_n_epochs=1 and 4 batches an epoch: each epoch's last update is saved once, at
    the next epoch's start (what a resumed run continues from). Reference: every_n_epochs alone. Before:
    ...step12-epoch2-batch4 and ...step12-epoch3-batch0, the same weights; keep_last=2 kept one update."""
    batches = [torch.ones(2, 2) * i for i in range(4)]

    def fit(directory: Path, **every) -> TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Linear(2, 1)
        step = with_checkpointing(train_step(lambda m, b: m(b).pow(2).mean()), directory, keep_last=2, **every)
        return run_epochs(step, TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01)), batches,
                          epochs=3, progress=False)[0]

    fit(tmp_path / "both", every_n_steps=4, every_n_epochs=1)
    fit(tmp_path / "epochs", every_n_epochs=1)
    both, epochs = checkpoint.list_checkpoints(tmp_path / "both"), checkpoint.list_checkpoints(tmp_path / "epochs")
    assert [(c.step, c.epoch, c.batch_index) for c in both] == [(c.step, c.epoch, c.batch_index) for c in epochs]
    assert [(c.step, c.epoch, c.batch_index) for c in both] == [(8, 2, 0), (12, 3, 0)]
    for a, b in zip(both, epochs):
        assert_trees_equal(checkpoint.load(a.path)["state"]["model"], checkpoint.load(b.path)["state"]["model"])


def test_with_no_trigger_it_saves_after_every_epoch_as_lightnings_model_checkpoint(tmp_path):
    """with_checkpointing(step, directory) saved nothing in a whole fit, and restore then gave the fresh template.
    Reference: Lightning's ModelCheckpoint() (every_n_epochs=1 when no trigger is given), and the same fit with
    every_n_epochs=1 written out."""
    defaults = with_checkpointing(train_step(_mse), tmp_path / "defaults")
    explicit = with_checkpointing(train_step(_mse), tmp_path / "explicit", every_n_epochs=1)
    assert (defaults.every_n_epochs, defaults.every_n_steps) == (1, None)
    trained, _ = run_epochs(defaults, _state(), _loader(), epochs=4, progress=False)
    run_epochs(explicit, _state(), _loader(), epochs=4, progress=False)
    kept = [c.step for c in checkpoint.list_checkpoints(tmp_path / "defaults")]
    assert kept == [c.step for c in checkpoint.list_checkpoints(tmp_path / "explicit")] == [20, 30, 40]  # keep_last=3
    restored = loopkit.restore(_state(), tmp_path / "defaults")
    assert restored.step == 40 and all(torch.equal(a, b) for a, b in zip(restored.model.parameters(),
                                                                            trained.model.parameters()))
    monitored = with_checkpointing(train_step(_mse), tmp_path / "m", monitor="val/loss")
    assert monitored.every_n_epochs is None  # a monitor alone saves at its validations, as before
    manual = with_checkpointing(train_step(_mse), tmp_path / "manual", every_n_epochs=0)  # Lightning's off switch
    state, _ = run_epochs(manual, _state(), _loader(), epochs=2, progress=False)
    manual.save(state)
    assert manual.every_n_epochs is None and [c.step for c in checkpoint.list_checkpoints(tmp_path / "manual")] == [20]


class _CrashAtStep(loopkit.Callback):
    """Raises after update ``at`` (a crash mid-epoch, after the batch's hooks)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_batch_end(self, state, metrics):
        if state.step == self.at:
            raise RuntimeError("crash")


def _positions(directory: Path) -> list[tuple[int, int, int]]:
    return [(c.step, c.epoch, c.batch_index) for c in checkpoint.list_checkpoints(directory)]


@pytest.mark.parametrize("given", [{}, {"every_n_epochs": 1}], ids=["default", "every_n_epochs=1"])
@pytest.mark.parametrize("keep_last", [1, 3])
def test_with_no_trigger_it_saves_after_each_validation_mid_epoch_ones_included_as_lightnings_model_checkpoint(
    tmp_path, keep_last, given, assert_trees_equal
):
    """A fit validating every 2 updates saved only at its epoch's end, so a crash at update 7 of an 8-batch epoch
    left no checkpoint and restore gave the fresh state. Reference (hand-written, Lightning 2.6.6's ModelCheckpoint()
    with val_check_interval=2, max_epochs=1): after each validation, so the crash leaves epoch=0-step=6.ckpt alone
    (its save_top_k=1 is keep_last=1 here; keep_last=3 keeps steps 2, 4, 6), the whole run epoch=0-step=8.ckpt (held
    at the epoch's end, past its record); and the uninterrupted run, which the run resumed from step 6 equals."""
    data = _owed_data(8)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=1, val=(loopkit.eval_step(loss), data[:2]), val_every_n_steps=2, sanity_val_batches=0,
              progress=False)
    whole, whole_history = run_epochs(
        with_checkpointing(train_step(_mse), tmp_path / "whole", keep_last=keep_last, **given), _state(), data, **kw)
    assert _positions(tmp_path / "whole") == [(4, 0, 4), (6, 0, 6), (8, 1, 0)][-keep_last:]

    def make():
        return with_checkpointing(train_step(_mse), tmp_path / "crashed", keep_last=keep_last, **given)

    with pytest.raises(RuntimeError, match="crash"):
        run_epochs(make(), _state(), data, callbacks=[_CrashAtStep(7)], **kw)
    assert _positions(tmp_path / "crashed") == [(2, 0, 2), (4, 0, 4), (6, 0, 6)][-keep_last:]
    restored = loopkit.restore(_state(), tmp_path / "crashed")
    assert (restored.step, restored.epoch, restored.batch_index) == (6, 0, 6)
    resumed, history = run_epochs(make(), restored, data, **kw)
    assert_trees_equal(resumed.model.state_dict(), whole.model.state_dict())
    assert_trees_equal(resumed.optimizer.state_dict(), whole.optimizer.state_dict())
    assert history == whole_history
    assert _positions(tmp_path / "crashed") == _positions(tmp_path / "whole")


def test_with_no_trigger_a_fit_validating_every_other_epoch_saves_after_its_validations_alone(tmp_path):
    """Lightning's ModelCheckpoint() saves at its validations when the fit validates other than once an epoch
    (check_val_every_n_epoch=2: epochs 1 and 3 of 4), at every epoch's end when it does not validate; the defaults
    saved every epoch's end. Reference: hand-written, from ModelCheckpoint._should_save_on_train_epoch_end."""
    data = _owed_data(4)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=4, sanity_val_batches=0, progress=False)
    run_epochs(with_checkpointing(train_step(_mse), tmp_path / "v", keep_last=None), _state(), data,
               val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=2, **kw)
    assert _positions(tmp_path / "v") == [(8, 2, 0), (16, 4, 0)]
    run_epochs(with_checkpointing(train_step(_mse), tmp_path / "n", keep_last=None), _state(), data, **kw)
    assert _positions(tmp_path / "n") == [(4, 1, 0), (8, 2, 0), (12, 3, 0), (16, 4, 0)]
    explicit = with_checkpointing(train_step(_mse), tmp_path / "e", every_n_epochs=1, keep_last=None)  # (Lightning's
    run_epochs(explicit, _state(), data, val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=2, **kw)  # too)
    assert _positions(tmp_path / "e") == [(8, 2, 0), (16, 4, 0)]
    run_epochs(with_checkpointing(train_step(_mse), tmp_path / "2", every_n_epochs=2, keep_last=None), _state(), data,
               val=(loopkit.eval_step(loss), data[:2]), val_every_n_steps=2, val_every_n_epochs=None, **kw)
    assert _positions(tmp_path / "2") == [(8, 2, 0), (16, 4, 0)]  # (n > 1: every n-th epoch's end, validated or not)


@pytest.mark.parametrize(("schedule", "max_steps", "expected"), [
    ({"val_every_n_steps": 2}, 5, [2, 4]),  # val_check_interval=2: ends off a validation
    ({"val_every_n_steps": 2}, 6, [2, 4, 6]),  # on one
    ({"val_every_n_steps": 2}, 13, [2, 4, 6, 8, 10, 12]),  # in the second epoch
    ({"val_every_n_steps": 3, "val_every_n_epochs": None}, 10, [3, 6, 9]),  # check_val_every_n_epoch=None
    ({"val_every_n_epochs": 2}, 11, []),  # check_val_every_n_epoch=2: cut in an epoch that would validate
    ({"val_every_n_epochs": 2}, 19, [16]),
    ({}, 11, [8, 11]),  # validates at every epoch's end: saves at epochs' ends, the cut one's included
    (None, 11, [8, 11]),  # no validation: the same
], ids=["steps2-off", "steps2-on", "steps2-epoch1", "steps3-no-epochs", "epochs2-cut-epoch0", "epochs2-cut-epoch2",
        "each-epoch", "no-val"])
def test_with_no_trigger_a_fit_ending_mid_epoch_saves_its_end_only_where_lightnings_model_checkpoint_does(
    tmp_path, schedule, max_steps, expected, assert_trees_equal
):
    """The defaults saved a fit's end cut by max_steps mid-epoch wherever it fell (step 5 with validations every 2
    updates). Reference (hand-written, from Lightning 2.6.6 runs of ModelCheckpoint(save_top_k=-1) on 8 batches an
    epoch, max_steps as here): saving after validations (validations mid-epoch or not every epoch) it adds no save
    at such an end, saving at epochs' ends (validation at each epoch's end, or none) it saves the cut epoch's end.
    A relaunch from the newest kept checkpoint with the same max_steps ends as the cut fit did, adding none."""
    data = _owed_data(8)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    val = {} if schedule is None else {"val": (loopkit.eval_step(loss), data[:2]), **schedule}
    kw = dict(epochs=5, max_steps=max_steps, sanity_val_batches=0, progress=False, **val)

    def make():
        return with_checkpointing(train_step(_mse), tmp_path, keep_last=None)

    cut, _ = run_epochs(make(), _state(), data, **kw)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == expected
    relaunched, _ = run_epochs(make(), loopkit.restore(_state(), tmp_path), data, **kw)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == expected
    assert relaunched.step == max_steps
    assert_trees_equal(relaunched.model.state_dict(), cut.model.state_dict())
    assert_trees_equal(relaunched.optimizer.state_dict(), cut.optimizer.state_dict())


_SCORES = {2: 5.0, 4: 0.5, 6: 4.0, 8: 3.0, 10: 6.0, 12: 0.1, 14: 7.0, 16: 1.0, 18: 8.0, 20: 9.0, 22: 0.2, 24: 2.0}


class _ScriptedScore(loopkit.Callback):
    """``val/score`` at each validation: ``_SCORES`` by the update it saw (as the Lightning reference logs it)."""

    def on_validation_end(self, state, metrics):
        return {"val/score": _SCORES[state.step]}


@pytest.mark.parametrize(("options", "max_steps", "expected"), [
    ({"monitor": "val/score", "keep_best": 1, "keep_last": 0}, None, [16]),  # save_top_k=1
    ({"monitor": "val/score", "keep_best": 2, "keep_last": 0}, None, [16, 24]),  # save_top_k=2
    ({"keep_last": None}, None, [8, 16, 24]),  # no monitor, save_top_k=-1
    ({"keep_last": None}, 13, [8, 13]),  # the same, max_steps cutting the second epoch short
], ids=["top1", "top2", "all", "all-cut"])
def test_the_save_on_train_epoch_end_recipe_saves_where_lightnings_model_checkpoint_does(tmp_path, options, max_steps,
                                                                                         expected):
    """docs/from_lightning.md's recipe for ModelCheckpoint(save_on_train_epoch_end=True) in a fit validating mid-epoch
    (Lightning's val_check_interval=2, 8 batches an epoch, 3 epochs): the same with_checkpointing, the fit validating
    at epochs' ends only (val_every_n_steps=None, the default). Reference (hand-written, checked against Lightning
    2.6.6 with val_score logged from _SCORES by global_step): only epochs' ends are ranked, with the latest score,
    that of the epoch's last update (3, 1, 2 at steps 8, 16, 24), so save_top_k=1 keeps step 16, save_top_k=2 steps 16
    and 24; without a monitor every epoch's end is saved, one max_steps cuts short included. (Lightning's default,
    save_on_train_epoch_end=None, ranks every validation: step 12's 0.1 would be kept.)"""
    data = _owed_data(8)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    step = with_checkpointing(train_step(_mse), tmp_path, **options)
    run_epochs(step, _state(), data, epochs=3, max_steps=max_steps, val=(loopkit.eval_step(loss), data[:2]),
               callbacks=[_ScriptedScore()], sanity_val_batches=0, progress=False)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == expected
    if "monitor" in options:
        assert checkpoint.best_checkpoint(tmp_path).name == checkpoint.list_checkpoints(tmp_path)[0].name  # step 16


@pytest.mark.parametrize(("accumulate", "expected"), [(1, [(2, 1.0), (4, 1.1)]), (2, [(1, 1.0), (2, 1.1)])])
def test_the_guides_latest_train_loss_recipe_ranks_a_train_monitor_at_each_validation_as_lightnings_default(
    tmp_path, accumulate, expected
):
    """Lightning's ModelCheckpoint(monitor="train_loss", save_top_k=2) (save_on_train_epoch_end=None) in a fit
    validating twice an epoch (val_check_interval=0.5; 4 batches an epoch, 4 epochs) ranks after each validation,
    with the latest step's loss: 1.0, 1.1, 1.2, ... (Lightning 2.6.6 measured: steps 2 and 4 kept, step 2 the best;
    under accumulate_grad_batches=2 steps 1 and 2). docs/from_lightning.md's recipe, monitor="val/train_loss" with
    LatestTrainLoss, keeps those; monitor="train/loss" ranks the epochs' means at their ends, better each epoch, and
    keeps the last two epochs' ends (the difference the guide states)."""

    def fit(directory, monitor, callbacks):
        step = train_step(scripted_loss())
        if accumulate > 1:
            step = with_grad_accum(step, every=accumulate)
        step = with_checkpointing(step, tmp_path / directory, monitor=monitor, keep_best=2, keep_last=0)
        run_epochs(step, _state(), make_data(4), epochs=4, val=(loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}),
                   make_data(1)), val_every_n_steps=2 // accumulate, callbacks=callbacks, sanity_val_batches=0,
                   progress=False)
        steps = {c.name: c.step for c in checkpoint.list_checkpoints(tmp_path / directory)}
        kept = sorted((steps[name], round(score, 4)) for name, score in checkpoint.scores(tmp_path / directory).items())
        return kept, steps[checkpoint.best_checkpoint(tmp_path / directory).name]

    assert fit("recipe", "val/train_loss", [LatestTrainLoss()]) == (expected, expected[0][0])
    assert fit("plain", "train/loss", []) == ([(12 // accumulate, 5.725), (16 // accumulate, 3.325)], 16 // accumulate)


def test_a_save_of_a_lazy_model_that_never_ran_is_skipped_with_a_warning(tmp_path):
    """Its checkpoint could not be loaded, and checkpoint.save now refuses it; with_checkpointing's own saves (a
    graceful stop before the first step, a manual save) raised out of run_epochs where nothing was yet lost."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = with_checkpointing(train_step(_mse), tmp_path)
    with pytest.warns(RuntimeWarning, match=r"no checkpoint at step 0 \(manual\): the model's lazy modules have not run"):
        step.save(state)
    assert checkpoint.list_checkpoints(tmp_path) == []
    state, _ = run_epochs(step, state, [(torch.ones(2, 4), torch.ones(2, 1))] * 2, epochs=1, progress=False)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [2]  # shaped by its first forward: saved


# --- a step save due when a hook raised: made by the fit given what the error left --------------------------------


def _owed_data(n: int = 6) -> list:
    return [(torch.randn(4, 3, generator=torch.Generator().manual_seed(i)), torch.zeros(4, 1)) for i in range(n)]


class _RaiseOnce(loopkit.Callback):
    """Raises in ``hook`` at its ``at``-th call (once)."""

    def __init__(self, hook: str, at: int) -> None:
        self.at, self.n = at, 0
        setattr(self, hook, self._maybe_raise)

    def _maybe_raise(self, state, metrics):
        self.n += 1
        if self.n == self.at:
            raise RuntimeError("boom")


def _positions(directory) -> list[tuple[int, int, int]]:
    return [(c.step, c.epoch, c.batch_index) for c in checkpoint.list_checkpoints(directory)]


def _same_restored(a, b) -> None:
    ra, rb = loopkit.restore(_state(scheduler=False), a), loopkit.restore(_state(scheduler=False), b)
    assert (ra.step, ra.epoch, ra.batch_index) == (rb.step, rb.epoch, rb.batch_index)
    for (name, x), (_, y) in zip(ra.model.state_dict().items(), rb.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert {k for k in ra.extras if not k.startswith("callbacks/")} == {k for k in rb.extras if not k.startswith("callbacks/")}


def _no_mark(directory) -> None:
    from loopkit.steps import SAVE_DUE

    for found in checkpoint.list_checkpoints(directory):
        assert SAVE_DUE not in loopkit.restore(_state(scheduler=False), found.path).extras, found


@pytest.mark.parametrize("hook", ["on_batch_end", "on_flush_end"])
def test_a_save_due_at_an_update_whose_hooks_raised_is_made_by_the_fit_given_state_at_error(tmp_path, hook):
    # every_n_steps=2; the update of step 2 (a batch's; with on_flush_end, the epoch's flush under with_grad_accum)
    # has its hooks raise: the fit given state_at_error makes that save first, as the uninterrupted run did
    def make(directory):
        inner = train_step(_mse)
        if hook == "on_flush_end":
            inner = with_grad_accum(inner, every=2)  # 3 batches an epoch: updates at the 2nd and the flush
        return with_checkpointing(inner, directory, every_n_steps=2, keep_last=None, every_n_epochs=0)

    data = _owed_data(3 if hook == "on_flush_end" else 6)
    epochs = 2 if hook == "on_flush_end" else 1
    run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, epochs=epochs, progress=False)
    step = make(tmp_path / "b")
    crash = _RaiseOnce(hook, 2 if hook == "on_batch_end" else 1)
    with pytest.raises(RuntimeError, match="boom") as info:
        run_epochs(step, _state(scheduler=False), data, epochs=epochs, callbacks=[crash], progress=False)
    left = loopkit.state_at_error(info.value)
    assert left.step == 2
    run_epochs(step, left, data, epochs=epochs, callbacks=[crash], progress=False)
    assert _positions(tmp_path / "b") == _positions(tmp_path / "a")
    _same_restored(tmp_path / "a", tmp_path / "b")
    _no_mark(tmp_path / "b")


@pytest.mark.parametrize(("hook", "resume"), [("on_validation_end", "state_at_error"), ("on_epoch_end", "directory"),
                                            ("on_epoch_end", "state_at_error")])
def test_a_save_held_for_max_steps_is_made_by_the_fit_that_finishes_the_epoch(tmp_path, hook, resume):
    # max_steps at an epoch's last batch, a monitored step validation there: the held step save of the fit's end is
    # made once the epoch is recorded, also by a fit resumed after a crash at that epoch's end
    data = _owed_data(4)
    loss = lambda m, b: {"loss": _mse(m, b)}
    kw = dict(epochs=3, max_steps=4, val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=None,
              val_every_n_steps=2, progress=False)

    def make(directory):
        return with_checkpointing(train_step(_mse), directory, every_n_steps=2, keep_last=2, monitor="val/loss")

    run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, **kw)
    step = make(tmp_path / "b")
    crash = _RaiseOnce(hook, 2 if hook == "on_validation_end" else 1)
    with pytest.raises(RuntimeError, match="boom") as info:
        run_epochs(step, _state(scheduler=False), data, callbacks=[crash], **kw)
    if resume == "directory":
        state = loopkit.restore(_state(scheduler=False), tmp_path / "b")
        step = make(tmp_path / "b")
    else:
        state = loopkit.state_at_error(info.value)
    assert (state.step, state.epoch, state.batch_index) == (4, 0, 4)
    run_epochs(step, state, data, callbacks=[crash], **kw)
    assert _positions(tmp_path / "b") == _positions(tmp_path / "a") == [(2, 0, 2), (4, 1, 0)]
    _same_restored(tmp_path / "a", tmp_path / "b")
    _no_mark(tmp_path / "b")


def _marks(directory) -> list[tuple[int, int, int, bool, int | None]]:
    """Each checkpoint's position, whether it carries the mark of a step save due, and the update its epoch was
    recorded at (None: not recorded)."""
    from loopkit.steps import RECORDED, SAVE_DUE

    out = []
    for found in checkpoint.list_checkpoints(directory):
        extras = loopkit.restore(_state(scheduler=False), found.path).extras
        out.append((found.step, found.epoch, found.batch_index, SAVE_DUE in extras, extras.get(RECORDED)))
    return out


class _EpochEnds(loopkit.Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_epoch_end(self, state, record):
        self.calls += 1


@pytest.mark.parametrize("every", [3, 2])
def test_a_sigterm_at_max_steps_mid_epoch_then_relaunches_leave_the_uninterrupted_runs_checkpoint(tmp_path, every):
    # max_steps=3 in a 6-batch epoch. every=3: the step save of the fit's last update is held until the epoch is
    # recorded, and a SIGTERM there saved it marked as owed; every=2: the stop's save was of the unrecorded epoch.
    # The relaunch recorded the epoch and took the stop's checkpoint, at its start position, as the save it owed:
    # the directory kept it, and every further relaunch recorded epoch 0 again. Reference: the uninterrupted run
    data = _owed_data(6)
    kw = dict(epochs=3, max_steps=3, progress=False)

    def make(directory):
        return with_checkpointing(train_step(_mse), directory, every_n_steps=every, keep_last=None)

    class Terminate(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, **kw)
    _, history = run_epochs(make(tmp_path / "b"), _state(scheduler=False), data, callbacks=[Terminate()], **kw)
    assert history == [] and _positions(tmp_path / "b") == _positions(tmp_path / "a")  # (saved by the stop)
    ends = _EpochEnds()
    _, history = run_epochs(make(tmp_path / "b"), loopkit.restore(_state(scheduler=False), tmp_path / "b"), data,
                            callbacks=[ends], **kw)
    assert [r["epoch"] for r in history] == [0] and ends.calls == 1  # the relaunch records the stopped epoch
    expected = ([(2, 0, 2, False, None)] if every == 2 else []) + [(3, 0, 3, False, 3)]
    assert _marks(tmp_path / "b") == _marks(tmp_path / "a") == expected
    _same_restored(tmp_path / "a", tmp_path / "b")
    for directory in ("a", "b"):  # a relaunch of either finished run does nothing
        ends = _EpochEnds()
        restored = loopkit.restore(_state(scheduler=False), tmp_path / directory)
        _, history = run_epochs(make(tmp_path / directory), restored, data, callbacks=[ends], **kw)
        assert (history, ends.calls) == ([], 0), directory
        assert _marks(tmp_path / directory) == expected


@pytest.mark.parametrize("crash", [None, "state_at_error", "directory"])
def test_a_monitored_step_validation_at_max_steps_mid_epoch_leaves_the_recorded_checkpoint_scored(tmp_path, crash):
    # max_steps=3 mid-epoch with a monitored validation at step 3: its scored save was made before the epoch was
    # recorded, and the held step save then found the position saved: the newest checkpoint stayed unrecorded and
    # marked, so a relaunch recorded epoch 0 again. Now the recorded state replaces it, with the validation's score.
    # References: the same run without a monitor (its checkpoint), and the score evaluated on the restored model;
    # with a crash in on_epoch_end, the uninterrupted run's directory and scores.json
    data = _owed_data(6)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=3, max_steps=3, val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=None,
              val_every_n_steps=3, sanity_val_batches=0, progress=False)

    def make(directory, monitor="val/loss"):
        return with_checkpointing(train_step(_mse), directory, every_n_steps=3, keep_last=2, monitor=monitor)

    run_epochs(make(tmp_path / "plain", monitor=None), _state(scheduler=False), data, **kw)
    run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, **kw)
    assert _marks(tmp_path / "a") == _marks(tmp_path / "plain") == [(3, 0, 3, False, 3)]
    [newest] = checkpoint.list_checkpoints(tmp_path / "a")
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())["scores"]
    restored = loopkit.restore(_state(scheduler=False), newest.path)
    assert scores == {newest.name: pytest.approx(float(loopkit.evaluate(loopkit.eval_step(loss), restored,
                                                                        data[:2])["loss"]), rel=1e-6)}
    assert loopkit.checkpoint.best_checkpoint(tmp_path / "a") == newest.path
    if crash is not None:
        step = make(tmp_path / "b")
        with pytest.raises(RuntimeError, match="boom") as info:
            run_epochs(step, _state(scheduler=False), data, callbacks=[_RaiseOnce("on_epoch_end", 1)], **kw)
        if crash == "directory":
            state, step = loopkit.restore(_state(scheduler=False), tmp_path / "b"), make(tmp_path / "b")
        else:
            state = loopkit.state_at_error(info.value)
        run_epochs(step, state, data, **kw)
        assert _marks(tmp_path / "b") == _marks(tmp_path / "a")
        assert (tmp_path / "b" / "scores.json").read_text() == (tmp_path / "a" / "scores.json").read_text()
        _same_restored(tmp_path / "a", tmp_path / "b")
    directory = tmp_path / ("a" if crash is None else "b")
    ends = _EpochEnds()  # a relaunch of the finished run does nothing
    _, history = run_epochs(make(directory), loopkit.restore(_state(scheduler=False), directory), data,
                            callbacks=[ends], **kw)
    assert (history, ends.calls) == ([], 0)
    assert _marks(directory) == [(3, 0, 3, False, 3)]


@pytest.mark.parametrize("monitor", [None, "val/loss"])
def test_a_stop_asked_at_a_step_validation_mid_epoch_leaves_a_checkpoint_a_relaunch_does_nothing_from(
    tmp_path, monitor
):
    # a callback asks to stop at the validation of step 3 (mid-epoch), where the step save was made before the
    # epoch was recorded: the fit's end found its position saved, and a relaunch recorded epoch 0 again. Reference:
    # the fit's own history (one epoch), which a relaunch must not add to
    data = _owed_data(6)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=3, val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=None, val_every_n_steps=3,
              sanity_val_batches=0, progress=False)

    def make():
        return with_checkpointing(train_step(_mse), tmp_path, every_n_steps=3, keep_last=2, monitor=monitor)

    _, history = run_epochs(make(), _state(scheduler=False), data, callbacks=[_StopAtValidation()], **kw)
    assert [r["epoch"] for r in history] == [0]
    assert _marks(tmp_path) == [(3, 0, 3, False, 3)]
    ends = _EpochEnds()
    with pytest.warns(UserWarning, match="asks to stop at once"):  # (its stop, restored)
        _, history = run_epochs(make(), loopkit.restore(_state(scheduler=False), tmp_path), data,
                                callbacks=[_StopAtValidation(), ends], **kw)
    assert (history, ends.calls) == ([], 0)
    assert _marks(tmp_path) == [(3, 0, 3, False, 3)]


class _StopAtValidation(loopkit.Callback):
    """Asks to stop at the first validation it sees (kept in checkpoints, as a stateful callback's counters)."""

    def __init__(self) -> None:
        self.should_stop = False

    def on_validation_end(self, state, metrics):
        self.should_stop = True

    def state_dict(self):
        return {"should_stop": self.should_stop}

    def load_state_dict(self, state_dict):
        self.should_stop = state_dict["should_stop"]


@pytest.mark.parametrize("keep_last, keep_best", [(0, 1), (0, 2), (2, 1)])
@pytest.mark.parametrize("end", ["max_steps", "stop", "crash"])
def test_a_monitor_alone_at_a_fit_ending_mid_epoch_leaves_the_recorded_checkpoint_scored(tmp_path, keep_last,
                                                                                          keep_best, end):
    # Only the monitor saves (keep_last=0, Lightning's save_top_k without save_last; or no every_n_*): its validation
    # at step 3, where the fit ends mid-epoch (max_steps, or a callback's stop there), took the best checkpoint before
    # the epoch was recorded at that update, and the fit's end saved nothing (only every_n_* made a fit_end save): the
    # directory kept the unrecorded checkpoint, and a relaunch from it recorded epoch 0 again (history row,
    # on_epoch_end). Now the recorded state replaces it, with the validation's score. References: the same run saving
    # every_n_steps=3 with keep_last=None (its checkpoint: the state the uninterrupted run ends with), the score
    # evaluated on the restored model; with a crash in on_epoch_end, the relaunch records the epoch once, as owed
    data = _owed_data(6)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=3, max_steps=None if end == "stop" else 3, val=(loopkit.eval_step(loss), data[:2]),
              val_every_n_epochs=None, val_every_n_steps=3, sanity_val_batches=0, progress=False)

    def make(directory, **options):
        options = options or dict(keep_last=keep_last, monitor="val/loss", keep_best=keep_best)
        return with_checkpointing(train_step(_mse), directory, **options)

    def callbacks(*more):
        return [_StopAtValidation(), *more] if end == "stop" else list(more)

    run_epochs(make(tmp_path / "plain", every_n_steps=3, keep_last=None), _state(scheduler=False), data,
               callbacks=callbacks(), **kw)
    crash = [_RaiseOnce("on_epoch_end", 1)] if end == "crash" else []
    if crash:
        with pytest.raises(RuntimeError, match="boom"):
            run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, callbacks=callbacks(*crash), **kw)
        ends = _EpochEnds()  # the relaunch records the epoch the crash left unrecorded, once
        _, history = run_epochs(make(tmp_path / "a"), loopkit.restore(_state(scheduler=False), tmp_path / "a"), data,
                                callbacks=callbacks(ends), **kw)
        assert ([r["epoch"] for r in history], ends.calls) == ([0], 1)
    else:
        _, history = run_epochs(make(tmp_path / "a"), _state(scheduler=False), data, callbacks=callbacks(), **kw)
        assert [r["epoch"] for r in history] == [0]
    assert _marks(tmp_path / "a") == _marks(tmp_path / "plain") == [(3, 0, 3, False, 3)]
    _same_restored(tmp_path / "a", tmp_path / "plain")
    [newest] = checkpoint.list_checkpoints(tmp_path / "a")
    restored = loopkit.restore(_state(scheduler=False), newest.path)
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())["scores"]
    assert scores == {newest.name: pytest.approx(float(loopkit.evaluate(loopkit.eval_step(loss), restored,
                                                                        data[:2])["loss"]), rel=1e-6)}
    for _ in range(2):  # relaunches of the finished run do nothing
        ends = _EpochEnds()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*asks to stop at once")  # (the stop, restored)
            _, history = run_epochs(make(tmp_path / "a"), loopkit.restore(_state(scheduler=False), tmp_path / "a"),
                                    data, callbacks=callbacks(ends), **kw)
        assert (history, ends.calls) == ([], 0)
        assert _marks(tmp_path / "a") == [(3, 0, 3, False, 3)]
        assert json.loads((tmp_path / "a" / "scores.json").read_text())["scores"] == scores


def test_a_monitor_alone_adds_no_checkpoint_at_a_fit_ending_mid_epoch_after_its_validation(tmp_path):
    # Only the monitor saves (keep_last=0, keep_best=1: Lightning's ModelCheckpoint(monitor=..., save_top_k=1) without
    # save_last); the fit ends mid-epoch at step 4, an update no validation scored (the last was at step 3): the fit's
    # end adds no checkpoint where there was none, so the directory holds the validation's alone. Reference: the same
    # run saving every_n_steps=3 with keep_last=None (the model of its step 3 checkpoint), the score evaluated on the
    # restored model
    data = _owed_data(6)
    loss = lambda m, b: {"loss": _mse(m, b)}  # noqa: E731
    kw = dict(epochs=3, max_steps=4, val=(loopkit.eval_step(loss), data[:2]), val_every_n_epochs=None,
              val_every_n_steps=3, sanity_val_batches=0, progress=False)
    run_epochs(with_checkpointing(train_step(_mse), tmp_path / "plain", every_n_steps=3, keep_last=None),
               _state(scheduler=False), data, **kw)
    state, _ = run_epochs(with_checkpointing(train_step(_mse), tmp_path / "a", keep_last=0, monitor="val/loss",
                                             keep_best=1), _state(scheduler=False), data, **kw)
    assert state.step == 4 and _steps(tmp_path / "a") == [3]
    [ours] = checkpoint.list_checkpoints(tmp_path / "a")
    reference = checkpoint.list_checkpoints(tmp_path / "plain")[0]
    restored = loopkit.restore(_state(scheduler=False), ours.path)
    expected = loopkit.restore(_state(scheduler=False), reference.path)
    positions = [(s.step, s.epoch, s.batch_index) for s in (restored, expected)]
    assert positions == [(3, 0, 3), (3, 0, 3)]
    assert all(torch.equal(a, b) for a, b in zip(restored.model.state_dict().values(),
                                                 expected.model.state_dict().values(), strict=True))
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())["scores"]
    assert scores == {ours.name: pytest.approx(float(loopkit.evaluate(loopkit.eval_step(loss), restored,
                                                                      data[:2])["loss"]), rel=1e-6)}


class _FailsAfterInner:
    """A step of one's own around another (a callable forwarding ``notify``), whose own work at epoch ``epoch``'s end,
    after the inner step's, raises once: the checkpoint of that end is saved by then."""

    def __init__(self, inner, epoch: int) -> None:
        self.inner, self.epoch = inner, epoch

    def __call__(self, state, batch):
        return self.inner(state, batch)

    def notify(self, event, state, metrics):
        self.inner.notify(event, state, metrics)
        if event == "epoch_end" and metrics["epoch"] == self.epoch:
            self.epoch = None
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("monitor", [None, "val/mse"])
def test_a_fit_retried_from_state_at_error_after_an_epochs_save_adds_no_second_checkpoint_of_it(tmp_path, monitor):
    """Reference: the uninterrupted run's checkpoint folder (names, scores) and restored state. The epoch-0 end is
    saved, then a step of one's own around the checkpointer fails there; the fit given ``state_at_error`` (before
    that end) validates and records epoch 0 again, and its save there takes the checkpoint already at that
    position as its own: no second one (keep_best counting it twice, a real second best rotated out), no warning
    of "another run's" checkpoint."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 1, generator=g)
    xs = [torch.randn(4, 3, generator=g) for _ in range(6)]
    data = [(x, x @ w) for x in xs[:4]]
    val = [(x, -(x @ w)) for x in xs[4:]]  # the better the fit, the worse val/mse: epoch 0 ranks among the best
    evaluator = loopkit.eval_step(lambda m, b: {"mse": ((m(b[0]) - b[1]) ** 2).mean()})

    def make(directory):
        options = dict(monitor=monitor, keep_best=2) if monitor else dict(every_n_epochs=1)
        return with_checkpointing(train_step(_mse), directory, keep_last=1, every_n_steps=3, **options)

    def fit(step, state):
        return run_epochs(step, state, data, epochs=4, val=(evaluator, val), sanity_val_batches=0, progress=False)

    fit(make(tmp_path / "a"), _state(scheduler=False))
    step = _FailsAfterInner(make(tmp_path / "b"), epoch=0)
    with pytest.raises(OSError, match="No space left") as error:
        fit(step, _state(scheduler=False))
    left = loopkit.state_at_error(error.value)
    assert (left.step, left.epoch, left.batch_index) == (4, 0, 4)
    assert _positions(tmp_path / "b")[-1] == (4, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(step, left)
    names = [[c.name for c in checkpoint.list_checkpoints(root)] for root in (tmp_path / "a", tmp_path / "b")]
    assert names[0] == names[1]
    assert checkpoint.read_scores(tmp_path / "b") == checkpoint.read_scores(tmp_path / "a")
    _same_restored(tmp_path / "a", tmp_path / "b")


# --- copies of the step: pickle (torch.multiprocessing.spawn), copy.deepcopy --------------------------------------

_COPY_OPTIONS = dict(every_n_steps=2, keep_last=1, monitor="val/loss", keep_best=2)
_COPY_SCORES = (3.0, 1.0, 4.0, 2.0, 5.0, 0.5)  # val/loss after steps 1..6


def _copy_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)


def _train_validated(step: CheckpointStep, state: TrainState, upto: int) -> TrainState:
    """Train up to step ``upto``, each update validated (its score from ``_COPY_SCORES``) as a loop of one's own
    tells the checkpointer."""
    while state.step < upto:
        state, _ = step(state, _copy_batch(state.step))
        step.notify("validation_end", state, {"val/loss": _COPY_SCORES[state.step - 1]})
    return state


def _folder(directory: Path) -> tuple[list[tuple[int, int, int]], dict[int, float]]:
    """What the folder holds: the checkpoints' positions, and the score of each (by step)."""
    by_name = {c.name: c.step for c in checkpoint.list_checkpoints(directory)}
    scores = checkpoint.scores(directory, "val/loss", "min")
    return _positions(directory), {by_name[n]: v for n, v in scores.items() if n in by_name}


def _assert_same_restored(a: Path, b: Path, assert_trees_equal) -> None:
    assert_trees_equal(loopkit.restore(_state(), a).state_dict(), loopkit.restore(_state(), b).state_dict())


def _pickled(x):
    return pickle.loads(pickle.dumps(x))


@pytest.mark.parametrize("copy_of", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_copy_of_the_step_mid_fit_goes_on_as_a_new_checkpointer_of_its_directory(tmp_path, copy_of,
                                                                                     assert_trees_equal):
    """A copy held a threading.Lock, refused by pickle and deepcopy. Now it keeps the options and the inner step, and
    none of the bookkeeping (what this process saved, the scores, the last position): it goes on as a new
    with_checkpointing of the directory does (reference: one on a copy of the folder), and as the run that never
    stopped (reference: its folder and restored state). The original is left as it was."""
    _train_validated(with_checkpointing(train_step(_mse), tmp_path / "whole", **_COPY_OPTIONS), _state(), 6)
    step = with_checkpointing(train_step(_mse), tmp_path / "a", **_COPY_OPTIONS)
    state = _train_validated(step, _state(), 3)
    names, last = dict(step.saver.names), step.saver.last
    copied = copy_of(step)
    assert step.saver.names == names and step.saver.last == last == (2, 0, 2)
    fields = [f.name for f in attrs.fields(CheckpointStep) if f.name not in ("inner", "saver")]
    assert [getattr(copied, f) for f in fields] == [getattr(step, f) for f in fields]
    assert copied.applied == step.applied and copied.saver is not step.saver
    assert (copied.saver.names, copied.saver.scores, copied.saver.last, copied.saver.began) == ({}, None, None, None)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fresh = with_checkpointing(train_step(_mse), tmp_path / "b", **_COPY_OPTIONS)
    _train_validated(fresh, copy.deepcopy(state), 6)
    _train_validated(copied, state, 6)
    assert _folder(tmp_path / "a") == _folder(tmp_path / "b") == _folder(tmp_path / "whole")
    # (by hand: the parent's step 2 kept for its score, read back; step 1's and the copy's step 4 rotated out)
    assert _folder(tmp_path / "a") == ([(2, 0, 2), (6, 0, 6)], {2: 1.0, 6: 0.5})
    _assert_same_restored(tmp_path / "a", tmp_path / "whole", assert_trees_equal)


@pytest.mark.parametrize("copy_of", [_pickled, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_a_pending_background_save_is_on_disk_before_the_step_is_copied_and_its_error_raised(tmp_path, monkeypatch,
                                                                                               copy_of):
    """(The copy finds it in the directory, as a relaunch does.) A failed one is raised by the copy, once, as by the
    next save."""
    write = checkpoint.write
    failing = []

    def slow_write(*args, **kwargs):
        time.sleep(0.3)
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", slow_write)
    step = with_checkpointing(_count_step, tmp_path, every_n_steps=1, async_save=True)
    state, _ = step(TrainState.create(nn.Linear(1, 1)), None)
    assert step.saver.pending is not None and _steps(tmp_path) == []
    copied = copy_of(step)
    assert _steps(tmp_path) == [1] and step.saver.pending is None and copied.saver.pending is None
    failing.append(True)
    state, _ = step(state, None)
    with pytest.raises(OSError, match="No space left"):
        copy_of(step)
    step.wait()  # (raised once)
    copy_of(step)
    assert _steps(tmp_path) == [1]


def _spawned_checkpointer(rank: int, step: CheckpointStep, state: TrainState, restored: bool, root: str) -> None:
    torch.set_num_threads(1)
    if restored:  # a relaunch: the state from the directory (the parent's step 2), step 3 done again
        state = loopkit.restore(state, root)
    _train_validated(step, state, 6)


@pytest.mark.parametrize("restored", [False, True], ids=["given-state", "restored-state"])
def test_a_step_pickled_mid_fit_to_a_spawned_process_saves_there_as_the_run_that_never_stopped(
        tmp_path, restored, assert_trees_equal):
    """The pipeline and the state go to ``torch.multiprocessing.spawn`` in ``args=`` (pickled); the child trains on,
    saving and rotating in the directory (the parent's checkpoints, ranked by their scores read back, among them).
    Reference: an in-process run that never stopped, its folder and its restored state."""
    _train_validated(with_checkpointing(train_step(_mse), tmp_path / "whole", **_COPY_OPTIONS), _state(), 6)
    step = with_checkpointing(train_step(_mse), tmp_path / "a", **_COPY_OPTIONS)
    state = _train_validated(step, _state(), 3)
    context = torch.multiprocessing.spawn(_spawned_checkpointer, args=(step, state, restored, str(tmp_path / "a")),
                                          nprocs=1, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the spawned process did not finish within 120 s")
    assert _folder(tmp_path / "a") == _folder(tmp_path / "whole")
    _assert_same_restored(tmp_path / "a", tmp_path / "whole", assert_trees_equal)
