"""Tests of run_epochs with data given as a factory of the epoch, ``fn(epoch) -> data``: Lightning's
``Trainer(reload_dataloaders_every_n_epochs=n)`` (a curriculum, data that changes from epoch to epoch).

References: a raw PyTorch loop that builds each epoch's loader itself; an uninterrupted run (a crash mid-epoch,
then a resume from its checkpoint in "another process": another global RNG); run_epochs over the same data given
as it is, epoch by epoch; Lightning 2.6.6's calls of ``train_dataloader()``/``val_dataloader()`` and its number of
batches an epoch (measured with Lightning and recorded below); hand counts.
"""

from __future__ import annotations

import functools
import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit import eval_step, evaluate, predict, run_epochs, train_step, with_grad_accum
from tests._driver_helpers import make_state, mse


def params_of(state: loopkit.TrainState) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state.model.parameters()]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def curriculum(epoch: int, batches: int, batch_size: int = 4) -> TensorDataset:
    """Epoch ``epoch``'s samples: ``batches * batch_size`` of them, (index, x, y), their targets larger each epoch."""
    g = torch.Generator().manual_seed(100 + epoch)
    n = batches * batch_size
    return TensorDataset(torch.arange(n), torch.randn(n, 3, generator=g), (1 + epoch) * torch.randn(n, 1, generator=g))


def idx_mse(model, batch) -> torch.Tensor:
    _, x, y = batch
    return ((model(x) - y) ** 2).mean()


class Recorded:
    """A factory that records the epochs it is called with (and the order of all calls, in ``log``)."""

    def __init__(self, make, log: list | None = None, tag: str = "train"):
        self.make, self.calls, self.log, self.tag = make, [], log if log is not None else [], tag

    def __call__(self, epoch):
        self.calls.append(epoch)
        self.log.append((self.tag, epoch))
        return self.make(epoch)


# --- when the factory is called: Lightning's call pattern --------------------------------------------------------

# Lightning 2.6.6, measured: Trainer(max_epochs=E, reload_dataloaders_every_n_epochs=n, **flags).fit(model), 3 train
# batches an epoch, a LightningModule whose train_dataloader()/val_dataloader() record trainer.current_epoch, in
# the order called ("val" at 0 first: the sanity check's, whose loader serves epoch 0's validation too).
# loopkit: run_epochs(..., train_data=lambda e: make(e // n * n), val=(ev, lambda e: make_val(e // n * n))) with
# make and make_val cached (functools.lru_cache(maxsize=1)): they run when Lightning's hooks would.
_LIGHTNING_CALLS = [
    # (n, run_epochs options (Lightning's flags), Lightning's calls)
    (1, dict(epochs=3), [("val", 0), ("train", 0), ("train", 1), ("val", 1), ("train", 2), ("val", 2)]),
    (2, dict(epochs=5), [("val", 0), ("train", 0), ("train", 2), ("val", 2), ("train", 4), ("val", 4)]),
    # num_sanity_val_steps=0: Lightning calls val_dataloader() before training (for the progress bar), loopkit at
    # epoch 0's validation: the same epoch, the same order of calls
    (1, dict(epochs=3, sanity_val_batches=0),
     [("train", 0), ("val", 0), ("train", 1), ("val", 1), ("train", 2), ("val", 2)]),
    # check_val_every_n_epoch=2: validations at epochs 1 and 3; the sanity check still calls at 0
    (1, dict(epochs=4, val_every_n_epochs=2),
     [("val", 0), ("train", 0), ("train", 1), ("val", 1), ("train", 2), ("train", 3), ("val", 3)]),
]


def _cached_recorder(log: list, tag: str, batches: int):
    @functools.lru_cache(maxsize=1)
    def make(epoch: int) -> DataLoader:
        log.append((tag, epoch))
        return DataLoader(curriculum(epoch, batches), batch_size=4)
    return make


def _reload_every(n: int, log: list, **options):
    make, make_val = _cached_recorder(log, "train", 3), _cached_recorder(log, "val", 2)
    ev = eval_step(lambda m, b: {"mse": idx_mse(m, b)})
    return dict(train_data=lambda epoch: make(epoch // n * n), val=(ev, lambda epoch: make_val(epoch // n * n)),
                progress=False, **options)


@pytest.mark.parametrize(("n", "options", "lightning"), _LIGHTNING_CALLS)
def test_the_recipe_calls_the_factories_at_the_epochs_lightning_reloads_its_dataloaders(n, options, lightning):
    log: list = []
    kwargs = _reload_every(n, log, **options)
    state, history = run_epochs(train_step(idx_mse), make_state(), kwargs.pop("train_data"), **kwargs)
    assert log == lightning
    assert state.epoch == options["epochs"] and state.step == 3 * options["epochs"]


def test_the_recipe_differs_from_lightning_where_lightning_reloads_at_a_validation_epoch_that_n_does_not_divide():
    """Lightning 2.6.6, n=2 and check_val_every_n_epoch=3 over 6 epochs, measured: [val 0 (sanity), train 0, train 2,
    val 2, train 4, val 5]: its val loader is reloaded at the first validation n epochs after the last reload
    (epoch 5). The recipe makes the val data of epoch 5 // 2 * 2 = 4 (documented)."""
    log: list = []
    kwargs = _reload_every(2, log, epochs=6, val_every_n_epochs=3)
    run_epochs(train_step(idx_mse), make_state(), kwargs.pop("train_data"), **kwargs)
    assert log == [("val", 0), ("train", 0), ("train", 2), ("val", 2), ("train", 4), ("val", 4)]


def test_a_resumed_fit_makes_the_uninterrupted_runs_data_where_lightning_restarts_its_reload_count():
    """Lightning 2.6.6, n=2, resumed from a checkpoint after 3 epochs up to 6, measured: [val 3 (sanity), train 3,
    train 5, val 5]: a new trainer reloads at its first epoch and n epochs after. The recipe gives every epoch the
    data of epoch // n * n, as the uninterrupted run (documented)."""
    first, _ = run_epochs(train_step(idx_mse), make_state(), lambda e: DataLoader(curriculum(e, 3), batch_size=4),
                          epochs=3, progress=False)
    log: list = []
    kwargs = _reload_every(2, log, epochs=6)
    run_epochs(train_step(idx_mse), first, kwargs.pop("train_data"), **kwargs)
    assert log == [("val", 2), ("train", 2), ("train", 4), ("val", 4)]


def test_early_stopping_ends_the_fit_before_the_next_epochs_data_is_made():
    """lr=0: train/loss never improves; patience=1 stops after epoch 1 (checked at 0 and 1). As Lightning's fit loop
    (its should_stop ends the loop before on_advance_start reloads), no data is made for epoch 2."""
    factory = Recorded(lambda e: DataLoader(curriculum(0, 2), batch_size=4))
    stopper = loopkit.EarlyStopping("train/loss", patience=1)
    state, history = run_epochs(train_step(idx_mse), make_state(lr=0.0), factory, epochs=5, callbacks=[stopper],
                                progress=False)
    assert [r["epoch"] for r in history] == [0, 1] and factory.calls == [0, 1]


# --- what it trains: a raw loop, plain data ----------------------------------------------------------------------

# Lightning 2.6.6, measured: reload_dataloaders_every_n_epochs=1, limit_train_batches=0.5, epochs of 2, 5 and 4
# batches: [1, 2, 2] batches trained (int(0.5 * the epoch's own length)); without reloading [2, 2, 2]
_LENGTHS = [2, 5, 4]
_LIGHTNING_LIMITED = {0.5: [1, 2, 2]}


def _in_own_order(epoch: int, batches: int) -> DataLoader:
    """A loader whose order the factory fixes (a sampler of indices, no generator: nothing for run_epochs to seed)."""
    dataset = curriculum(epoch, batches)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(7 + epoch)).tolist()
    return DataLoader(dataset, batch_size=4, sampler=order)


@pytest.mark.parametrize(("limit", "counts"), [(None, [2, 5, 4]), (0.5, _LIGHTNING_LIMITED[0.5]), (3, [2, 3, 3])])
def test_a_factory_trains_as_a_raw_loop_that_builds_each_epochs_loader(limit, counts):
    make = lambda epoch: _in_own_order(epoch, _LENGTHS[epoch])  # noqa: E731
    state, history = run_epochs(train_step(idx_mse), make_state(scheduler=True), make, epochs=3,
                                limit_train_batches=limit, progress=False)
    ref = make_state(scheduler=True)
    model, opt, sched = ref.model, ref.optimizer, ref.scheduler
    for epoch in range(3):
        loader = make(epoch)
        take = len(loader) if limit is None else int(len(loader) * limit) if isinstance(limit, float) else limit
        for _, x, y in itertools.islice(loader, take):
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    assert [r["step"] for r in history] == list(itertools.accumulate(counts))
    assert_bitwise(params_of(state), [p.detach() for p in model.parameters()])


def test_the_accumulation_flush_ends_each_epoch_of_its_own_length_as_fits_of_one_epoch_each():
    """5, 3 and 4 batches in groups of 2: 3, 2 and 2 updates (the odd epochs' last batch flushed alone). Reference:
    run_epochs over each epoch's data given as it is, one epoch a call (its flush at that epoch's end)."""
    lengths = [5, 3, 4]
    make = lambda epoch: DataLoader(curriculum(epoch, lengths[epoch]), batch_size=4, shuffle=True)  # noqa: E731
    step = with_grad_accum(train_step(idx_mse), every=2)
    state, history = run_epochs(step, make_state(dropout=True), make, epochs=3, progress=False)
    ref = make_state(dropout=True)
    for epoch in range(3):
        ref, _ = run_epochs(step, ref, make(epoch), epochs=epoch + 1, progress=False)
    assert [r["step"] for r in history] == [3, 5, 7] and ref.step == 7
    assert_bitwise(params_of(state), params_of(ref))


class OrderRecorder:
    def __init__(self):
        self.seen: list[list[int]] = []

    def __call__(self, model, batch):
        self.seen.append(batch[0].tolist())
        return idx_mse(model, batch)


@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "own-generator"])
def test_a_factorys_fresh_shuffled_loaders_come_in_the_order_of_the_same_loader_given_as_data(generator):
    """run_epochs seeds a loader's shuffling from (state.seed, epoch): a new loader each epoch is shuffled as the one
    loader given as data, whatever the global RNG was before each run."""
    def loader() -> DataLoader:
        own = torch.Generator().manual_seed(555) if generator else None
        return DataLoader(curriculum(0, 5), batch_size=4, shuffle=True, generator=own)

    orders = []
    for data, seed in ((loader(), 1), (lambda epoch: loader(), 2)):
        rec = OrderRecorder()
        torch.manual_seed(seed)
        state, _ = run_epochs(train_step(rec), make_state(), data, epochs=2, progress=False)
        orders.append((rec.seen, params_of(state)))
    assert orders[0][0] == orders[1][0] and orders[0][0][:5] != orders[0][0][5:]
    assert_bitwise(orders[0][1], orders[1][1])


def test_the_factorys_own_global_rng_draws_come_from_the_state_and_leave_the_callers_alone():
    """A factory that draws from torch's, numpy's and Python's global RNGs (a random subset of the curriculum) gets
    draws fixed by (state.seed, epoch), and the caller's RNGs are as they were."""
    def draws_of(seed: int, global_seed: int) -> list:
        seen = []

        def make(epoch):
            seen.append((torch.randint(1000, (3,)).tolist(), np.random.randint(1000), random.random()))
            return DataLoader(curriculum(epoch, 2), batch_size=4)

        loopkit.seed_everything(global_seed)
        expected = torch.rand(2), np.random.rand(), random.random()
        loopkit.seed_everything(global_seed)
        run_epochs(train_step(idx_mse), make_state(seed), make, epochs=2, progress=False)
        assert torch.equal(torch.rand(2), expected[0]) and (np.random.rand(), random.random()) == expected[1:]
        return seen

    a = draws_of(0, 1)
    assert a == draws_of(0, 2) and a[0] != a[1] and draws_of(1, 1) != a


# --- crash and resume --------------------------------------------------------------------------------------------

_EPOCH_LENGTHS = [5, 3, 5]  # batches; in groups of 2: 3, 2 and 3 updates (steps 3, 5, 8 at the epochs' ends)


def _subset_curriculum(epoch: int) -> DataLoader:
    """Epoch ``epoch``'s data: a random subset (drawn from the global RNG) of a curriculum, shuffled (by the global
    RNG too), with dropout in the model: everything random that a resumed run must draw as the uninterrupted one."""
    pool = curriculum(epoch, 8)
    keep = torch.randperm(len(pool))[: 4 * _EPOCH_LENGTHS[epoch]].tolist()
    return DataLoader(torch.utils.data.Subset(pool, keep), batch_size=4, shuffle=True)


def _val_of(epoch: int) -> DataLoader:
    pool = curriculum(10 + epoch, 4)
    return DataLoader(pool, batch_size=3, shuffle=True)


class _CrashAt(loopkit.Callback):
    """Crashes after batch ``batch_index`` (1-based) of ``epoch``: the checkpoint of the update before it is the newest."""

    def __init__(self, epoch: int, batch_index: int):
        self.at = epoch, batch_index

    def on_batch_end(self, state, metrics):
        if (state.epoch, state.batch_index) == self.at:
            raise RuntimeError("simulated crash")


# a crash after the 3rd batch of epoch 1 (a micro-batch): the newest checkpoint is update 4's, after its 2nd batch;
# of epoch 2: update 6's
@pytest.mark.parametrize(("crash_after", "epoch"), [(4, 1), (6, 2)], ids=["mid-epoch-1", "mid-epoch-2"])
def test_a_crash_mid_epoch_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(tmp_path, crash_after, epoch):
    ev = eval_step(lambda m, b: {"mse": idx_mse(m, b)})

    def fit(state, directory=None, callbacks=()):
        step = with_grad_accum(train_step(idx_mse), every=2)
        if directory is not None:
            step = loopkit.with_checkpointing(step, directory, every_n_steps=1, keep_last=None)
        train, val = Recorded(_subset_curriculum), Recorded(_val_of, tag="val")
        final, history = run_epochs(step, state, train, epochs=3, val=(ev, val), val_every_n_steps=3,
                                    callbacks=list(callbacks), progress=False)
        return final, history, train.calls, val.calls

    loopkit.seed_everything(11)
    whole, whole_history, whole_calls, _ = fit(make_state(dropout=True))
    assert whole.step == 8 and whole_calls == [0, 1, 2]
    loopkit.seed_everything(11)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_state(dropout=True), tmp_path, [_CrashAt(epoch, 3)])
    loopkit.seed_everything(99)  # another process: another global RNG
    mid = loopkit.restore(make_state(dropout=True), tmp_path)
    assert (mid.step, mid.epoch, mid.batch_index) == (crash_after, epoch, 2)
    resumed, history, calls, val_calls = fit(mid, tmp_path)
    assert calls == list(range(epoch, 3)) and val_calls[0] == epoch  # (the sanity check's: the resumed epoch's data)
    assert history == whole_history[epoch:]
    assert_bitwise(params_of(resumed), params_of(whole))
    assert torch.equal(resumed.rng["cpu"], whole.rng["cpu"])


# --- validation, limits, the progress bar ------------------------------------------------------------------------


def _tagged(tag: float, batches: int = 2) -> list[torch.Tensor]:
    return [torch.full((3,), float(tag)) for _ in range(batches)]


@pytest.mark.parametrize("sets", ["mapping", "list"])
def test_several_validation_sets_made_per_epoch_validate_that_epochs_data(sets):
    """Each set's metric is the epoch its data was made for: the epoch-end validation's (the state is then at the next
    epoch), the step validations' within an epoch (every 2 updates of 3 an epoch), the sanity check's at 0."""
    ev = eval_step(lambda m, b: {"tag": b.mean()})
    made = Recorded(lambda e: _tagged(e), tag="made")
    fixed = [torch.full((3,), -1.0)]
    given = {"made": made, "fixed": fixed} if sets == "mapping" else [made, lambda e: DataLoader(fixed, batch_size=None)]
    names = ("made", "fixed") if sets == "mapping" else ("dataloader_idx_0", "dataloader_idx_1")
    seen = []

    class Validations(loopkit.Callback):
        def on_validation_end(self, state, metrics):
            seen.append((state.step, metrics[f"val/tag/{names[0]}"], metrics[f"val/tag/{names[1]}"]))

    _, history = run_epochs(train_step(mse), make_state(), [(torch.randn(2, 3), torch.randn(2, 1))] * 3, epochs=3,
                            val=(ev, given), val_every_n_steps=2, callbacks=[Validations()], progress=False)
    assert [(r[f"val/tag/{names[0]}"], r[f"val/tag/{names[1]}"]) for r in history] == [(0, -1), (1, -1), (2, -1)]
    # steps 2, 3 (epoch 0's end), 4, 6 (epoch 1's end: one validation), 8, 9 (epoch 2's end)
    assert seen == [(2, 0, -1), (3, 0, -1), (4, 1, -1), (6, 1, -1), (8, 2, -1), (9, 2, -1)]
    assert made.calls == [0, 1, 2]  # once an epoch: the sanity check's data serve epoch 0's validations


class _Bars:
    """Records the totals (and the counts they start from) of the progress bars run_epochs opens."""

    def __init__(self, monkeypatch):
        self.totals: list = []
        self.initials: list = []
        real = loopkit.driver.ProgressBar

        def bar(*args, **kwargs):
            self.totals.append(kwargs["total"])
            self.initials.append(kwargs.get("initial", 0))
            return real(*args, **kwargs)

        monkeypatch.setattr(loopkit.driver, "ProgressBar", bar)


def test_the_progress_bar_counts_each_epochs_own_batches_and_a_resumed_epoch_from_where_it_resumed(monkeypatch):
    bars = _Bars(monkeypatch)
    make = lambda epoch: _in_own_order(epoch, _LENGTHS[epoch])  # noqa: E731
    run_epochs(train_step(idx_mse), make_state(), make, epochs=3, limit_train_batches=0.5, progress=False)
    assert bars.totals == _LIGHTNING_LIMITED[0.5]
    bars.totals.clear()
    bars.initials.clear()
    cut, _ = run_epochs(train_step(idx_mse), make_state(), make, max_steps=4, progress=False)  # epoch 1, 2 of 5
    run_epochs(train_step(idx_mse), cut, make, epochs=3, progress=False)
    # (the cut run's epoch 1 ends at max_steps: its bar is sized to its 2 batches; the resumed one counts 2 to 5)
    assert (bars.totals, bars.initials) == ([2, 2, 5, 4], [0, 0, 2, 0])


# --- bad input ---------------------------------------------------------------------------------------------------


def _fresh():
    return make_state()


@pytest.mark.parametrize("factory", [lambda: [], lambda epoch, size: []], ids=["no-parameter", "two-parameters"])
def test_a_factory_of_the_wrong_signature_is_refused_before_training_naming_where(factory):
    state = _fresh()
    with pytest.raises(TypeError, match=r"run_epochs: train_data \(.*lambda.*\) is a function.*fn\(epoch\)"):
        run_epochs(train_step(mse), state, factory, epochs=1, progress=False)
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    with pytest.raises(TypeError, match=r"run_epochs: val's data\['hard'\] \(.*\) is a function.*fn\(epoch\)"):
        run_epochs(train_step(mse), state, [(torch.ones(2, 3), torch.ones(2, 1))], epochs=1,
                   val=(ev, {"hard": factory}), progress=False)
    assert state.step == 0 and run_epochs(train_step(mse), state, [(torch.ones(2, 3), torch.ones(2, 1))], epochs=1,
                                          progress=False)[0].step == 1  # the given state is intact


def make_batches(epoch):
    return [(torch.ones(2, 3), torch.ones(2, 1))] * 2


def test_a_factory_returning_no_data_is_named_with_its_epoch():
    state = _fresh()
    with pytest.raises(TypeError, match=r"what train_data, a factory \(.*<lambda>\), returned for epoch 0, must be an "
                                        r"iterable of batches .* got NoneType"):
        run_epochs(train_step(mse), state, lambda epoch: None, epochs=2, progress=False)
    state.check_usable()  # nothing trained: the given state stays usable
    later = lambda epoch: make_batches(epoch) if epoch == 0 else 5  # noqa: E731
    with pytest.raises(TypeError, match=r"returned for epoch 1, must be an iterable of batches .* got int") as info:
        run_epochs(train_step(mse), state, later, epochs=2, progress=False)
    assert loopkit.state_at_error(info.value).epoch == 1  # the newest whole state: epoch 0 trained


def test_what_is_neither_data_nor_a_factory_is_refused_naming_both():
    for bad in (5, torch.nn.Linear(3, 1)):
        with pytest.raises(TypeError, match=r"run_epochs: train_data .*(function of the epoch|torch Module)"):
            run_epochs(train_step(mse), _fresh(), bad, epochs=1, progress=False)


def test_a_validation_factory_must_make_one_set_that_starts_over():
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    train = make_batches(0)
    with pytest.raises(TypeError, match=r"what val's data\['a'\], a factory .* for epoch 0, is an iterator"):
        run_epochs(train_step(mse), _fresh(), train, epochs=1, val=(ev, {"a": lambda e: iter(make_batches(e))}),
                   progress=False)
    with pytest.raises(TypeError, match=r"what val's data, a factory .* is several data sets \(dict\)"):
        run_epochs(train_step(mse), _fresh(), train, epochs=1, val=(ev, lambda e: {"x": make_batches(e)}),
                   progress=False)


def test_a_fraction_of_an_epochs_data_that_is_no_batch_is_named_with_the_epoch():
    lengths = [4, 1]
    with pytest.raises(ValueError, match=r"limit_train_batches=0.5 of 1 batches is 0 batches.*made for epoch 1"):
        run_epochs(train_step(mse), _fresh(), lambda e: make_batches(e)[: lengths[e]] * (2 if e == 0 else 1),
                   epochs=2, limit_train_batches=0.5, progress=False)


def test_evaluate_and_predict_take_data_not_a_factory_and_say_so():
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    with pytest.raises(TypeError, match=r"evaluate: data must be an iterable .*a factory of the epoch's data.*make\(epoch\)"):
        evaluate(ev, _fresh(), make_batches)
    with pytest.raises(TypeError, match=r"predict: data must be an iterable .*a factory of the epoch's data"):
        predict(lambda m, b: m(b[0]), _fresh(), make_batches)


def test_scale_batch_size_refuses_make_data_that_returns_a_factory():
    with pytest.raises(TypeError, match=r"scale_batch_size: make_data\(2\) returned a function .*factory"):
        loopkit.scale_batch_size(train_step(mse), _fresh(), lambda size: make_batches)


def test_lr_find_takes_a_factory_as_run_epochs_does():
    """The search goes through 3 epochs of 2 batches: the factory is called for each; the results equal those of
    the same data given as it is."""
    data = [(torch.randn(2, 3, generator=torch.Generator().manual_seed(i)), torch.ones(2, 1)) for i in range(2)]
    factory = Recorded(lambda e: data)
    options = dict(num_training=6, early_stop_threshold=None)
    by_factory = loopkit.lr_find(train_step(mse), _fresh(), factory, **options)
    given = loopkit.lr_find(train_step(mse), _fresh(), data, **options)
    assert factory.calls == [0, 1, 2] and by_factory.results == given.results


def test_tune_fit_takes_a_factory_as_run_epochs_does():
    optuna = pytest.importorskip("optuna")
    factory = Recorded(make_batches)
    trial = optuna.create_study().ask()
    loopkit.tune.fit(trial, train_step(mse), _fresh(), factory, monitor="train/loss", epochs=2, progress=False)
    assert factory.calls == [0, 1] and trial.user_attrs["step"] == 4


# --- a tester's findings: persistent workers on resume, an empty validation set, a class or a Module as data, each
# set's own random draws, a factory's exception -------------------------------------------------------------------


class _Augmented(torch.utils.data.Dataset):
    """Samples with an augmentation drawn in the worker process (from its torch RNG, which the loader seeds)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(3, generator=g), torch.randn(1, generator=g)
        return x + 0.1 * torch.randn(3), y


def _recipe(n: int, persistent: bool):
    """``reload_dataloaders_every_n_epochs=n``, the documented recipe: a loader kept for n epochs (a cache of its own)."""
    @functools.lru_cache(maxsize=1)
    def make(epoch):
        return DataLoader(_Augmented(), batch_size=4, shuffle=True, num_workers=2, persistent_workers=persistent)

    return lambda epoch: make(epoch // n * n)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "persistent", "exact"), [(2, True, False), (2, False, True), (1, True, True)],
                         ids=["kept-persistent", "kept-not-persistent", "fresh-persistent"])
def test_a_resume_with_a_loader_the_recipe_keeps_with_persistent_workers_is_warned_of_once(tmp_path, n, persistent,
                                                                                           exact):
    """The uninterrupted run is the reference. A loader kept across epochs 0 and 1 with persistent workers: its
    workers' random streams (the augmentation) went on from epoch 0, a run resumed in epoch 1 starts new ones, so it
    is not bitwise that run, and it says so, once (not again for epoch 2's fresh loader), as for the same loader given
    as data (tests/test_driver.py); the fit that is no resume says nothing. Without persistent workers, or with a
    fresh loader each epoch, the resumed run is the uninterrupted one, bitwise."""
    import warnings

    def fit(state, directory=None, callbacks=()):
        step = train_step(mse)
        if directory is not None:
            step = loopkit.with_checkpointing(step, directory, every_n_steps=1, keep_last=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            final, _ = run_epochs(step, state, _recipe(n, persistent), epochs=3, callbacks=list(callbacks),
                                  progress=False)
        return final, [str(w.message) for w in caught if "persistent_workers" in str(w.message)]

    whole, told = fit(make_state())
    assert told == []
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_state(), tmp_path, [_CrashAt(1, 3)])
    mid = loopkit.restore(make_state(), tmp_path)
    assert (mid.epoch, mid.batch_index) == (1, 2)
    resumed, told = fit(mid, tmp_path)
    same = all(torch.equal(a, b) for a, b in zip(params_of(resumed), params_of(whole)))
    if persistent:  # (n=1: a fresh loader each epoch resumes exactly; which run_epochs cannot tell from the recipe's)
        assert len(told) == 1 and "which train_data, a factory (_recipe.<locals>.<lambda>), returned for epoch 1" in told[0]
        assert "for an exact resume use persistent_workers=False" in told[0]
    else:
        assert told == []
    assert same == exact


def _drawing(log: list, tag: str):
    """A factory that takes a random subset (torch's, numpy's and Python's global RNGs) of the epoch's batches."""
    def make(epoch):
        log.append((tag, epoch, torch.randperm(9)[:3].tolist(), int(np.random.randint(1000)), random.random()))
        return make_batches(epoch) * 2

    return make


def test_each_validation_set_draws_from_a_stream_of_its_own_and_a_resumed_run_draws_the_same(tmp_path):
    """Two validation factories taking a random subset each take different ones, and neither the train factory's;
    a set's draws come from its name (the same with or without the other set); a run resumed mid-epoch 1 from its
    checkpoint (another process: another global RNG) draws what the uninterrupted run drew for epochs 1 and 2."""
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})

    def fit(state, sets=("a", "b"), directory=None, callbacks=()):
        log: list = []
        step = train_step(mse)
        if directory is not None:
            step = loopkit.with_checkpointing(step, directory, every_n_steps=1, keep_last=None)
        val = {name: _drawing(log, name) for name in sets}
        run_epochs(step, state, _drawing(log, "train"), epochs=3, val=(ev, val), callbacks=list(callbacks),
                   progress=False)
        return {(tag, epoch): draws for tag, epoch, *draws in log}

    loopkit.seed_everything(3)
    whole = fit(make_state())
    assert sorted(whole) == sorted(itertools.product(("train", "a", "b"), range(3)))  # once an epoch each
    for epoch in range(3):
        train, a, b = (whole[tag, epoch] for tag in ("train", "a", "b"))
        assert all(a[i] != b[i] and a[i] != train[i] and b[i] != train[i] for i in range(3))  # each RNG's draws
    assert all(whole["a", epoch] != whole["a", epoch + 1] for epoch in range(2))
    alone = fit(make_state(), sets=("a",))
    assert all(alone["a", epoch] == whole["a", epoch] and alone["train", epoch] == whole["train", epoch]
               for epoch in range(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(make_state(), directory=tmp_path, callbacks=[_CrashAt(1, 3)])
    loopkit.seed_everything(99)  # another process: another global RNG
    mid = loopkit.restore(make_state(), tmp_path)
    assert (mid.epoch, mid.batch_index) == (1, 2)
    resumed = fit(mid, directory=tmp_path)
    assert resumed == {key: draws for key, draws in whole.items() if key[1] >= 1}


def test_a_validation_factory_returning_an_empty_set_is_refused_as_empty_data_given_as_it_is():
    """The reference: the same empty set given as data is refused (ValueError, before training). A factory's is
    refused when made, naming the set, the factory and the epoch: before training for the sanity check's (the given
    state intact), at epoch 1's end otherwise (the newest whole state: epoch 1 trained, its record to make)."""
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    train = make_batches(0)
    with pytest.raises(ValueError, match=r"run_epochs: val's data\['b'\] is empty \(len\(\) is 0\)"):
        run_epochs(train_step(mse), _fresh(), train, epochs=3, val=(ev, {"a": train, "b": []}), progress=False)

    def empty_from(first):
        return lambda epoch: [] if epoch >= first else make_batches(epoch)

    state = _fresh()
    with pytest.raises(ValueError, match=r"run_epochs: what val's data\['b'\], a factory \(.*<lambda>\), returned for "
                                         r"epoch 0, is empty \(len\(\) is 0\): no validation could give a metric"):
        run_epochs(train_step(mse), state, train, epochs=3, val=(ev, {"a": train, "b": empty_from(0)}), progress=False)
    state.check_usable()
    with pytest.raises(ValueError, match=r"what val's data, a factory \(.*<lambda>\), returned for epoch 1, is empty"
                       ) as info:
        run_epochs(train_step(mse), state, train, epochs=3, val=(ev, empty_from(1)), progress=False)
    left = loopkit.state_at_error(info.value)
    assert (left.epoch, left.batch_index, left.step) == (1, 2, 4)

    class Stream(torch.utils.data.IterableDataset):  # no len(): found empty only once read, and warned of then
        def __init__(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(make_batches(self.epoch) if self.epoch == 0 else [])

    with pytest.warns(RuntimeWarning, match=r"a validation read no batch: what val's data\['b'\], a factory "
                                            r"\(.*<lambda>\), returned for epoch 1 yielded none"):
        run_epochs(train_step(mse), _fresh(), train, epochs=2,
                   val=(ev, {"a": train, "b": lambda epoch: DataLoader(Stream(epoch), batch_size=None)}), progress=False)


class _CurriculumDataset(torch.utils.data.Dataset):
    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.ones(2, 3), torch.ones(2, 1)


def test_a_class_or_a_module_given_as_data_or_made_by_a_factory_is_refused_naming_where():
    """A Dataset class (it has __getitem__: it passed as data, and failed in the first epoch with Python's bare
    "'type' object is not iterable") and an nn.Sequential (iterable: its layers were taken as batches) are neither
    data nor a factory; a factory that returns one is named with its epoch."""
    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    train = make_batches(0)
    sequential = torch.nn.Sequential(torch.nn.Linear(3, 1))
    cases = [
        (dict(train_data=_CurriculumDataset), r"run_epochs: train_data is the class _CurriculumDataset, not data: pass "
                                              r"an instance, a DataLoader, or a function of the epoch"),
        (dict(val=(ev, _CurriculumDataset)), r"run_epochs: val's data is the class _CurriculumDataset, not data"),
        (dict(train_data=lambda epoch: _CurriculumDataset),
         r"what train_data, a factory \(.*<lambda>\), returned for epoch 0, is the class _CurriculumDataset, not data: "
         r"pass an instance or a DataLoader$"),
        (dict(train_data=sequential), r"run_epochs: train_data is a torch Module \(Sequential\), not data"),
        (dict(val=(ev, {"a": sequential})), r"run_epochs: val's data\['a'\] is a torch Module \(Sequential\)"),
        (dict(val=(ev, {"a": lambda epoch: sequential})),
         r"what val's data\['a'\], a factory .*returned for epoch 0, is a torch Module \(Sequential\), not data"),
    ]
    for options, match in cases:
        state = _fresh()
        with pytest.raises(TypeError, match=match):
            run_epochs(train_step(mse), state, **{"train_data": train, "epochs": 1, "progress": False, **options})
        state.check_usable()
    with pytest.raises(TypeError, match=r"evaluate: data is the class _CurriculumDataset, not data: pass an instance "
                                        r"or a DataLoader"):
        evaluate(ev, _fresh(), _CurriculumDataset)
    # the instance is data (a Dataset: each item a batch, as run_epochs warns)
    with pytest.warns(RuntimeWarning, match="is a torch Dataset"):
        assert run_epochs(train_step(mse), _fresh(), _CurriculumDataset(), epochs=1, progress=False)[0].step == 2


class _FactoryError(Exception):
    pass


def test_an_exception_a_factory_raises_comes_out_as_it_is_with_a_note_naming_the_factory_and_the_epoch():
    """Its type and its traceback (down to the factory's frame) kept, a note added; loopkit.state_at_error still
    gives the newest whole state (epoch 0 trained, for a train factory failing at epoch 1), from which training goes
    on; a validation factory's failure names the set."""
    import traceback

    def make(epoch):
        if epoch == 1:
            raise _FactoryError("no data for epoch 1")
        return make_batches(epoch)

    with pytest.raises(_FactoryError, match="no data for epoch 1") as info:
        run_epochs(train_step(mse), _fresh(), make, epochs=2, progress=False)
    assert info.value.__notes__ == [f"(raised by train_data, a factory ({make.__qualname__}), called for epoch 1)"]
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "make"
    left = loopkit.state_at_error(info.value)
    assert (left.epoch, left.batch_index, left.step) == (1, 0, 2)
    assert run_epochs(train_step(mse), left, make_batches, epochs=2, progress=False)[0].step == 4

    ev = eval_step(lambda m, b: {"mse": mse(m, b)})
    state = _fresh()
    with pytest.raises(_FactoryError) as info:
        run_epochs(train_step(mse), state, make_batches, epochs=2, val=(ev, {"hard": make}), progress=False)
    assert info.value.__notes__ == [f"(raised by val's data['hard'], a factory ({make.__qualname__}), called for "
                                    "epoch 1)"]
    left = loopkit.state_at_error(info.value)  # at epoch 1's end, before its record: training on validates it
    assert (left.epoch, left.batch_index, left.step) == (1, 2, 4)


def test_with_training_off_the_train_factory_is_not_called_and_a_validation_factory_once_for_the_sanity_check():
    """Lightning 2.6.6, measured (limit_train_batches=0, max_epochs=3, reload_dataloaders_every_n_epochs=1):
    val_dataloader() at epoch 0 for the sanity check, train_dataloader() never."""
    train, val = Recorded(make_batches), Recorded(make_batches, tag="val")
    state, history = run_epochs(train_step(mse), _fresh(), train, epochs=3, limit_train_batches=0,
                                val=(eval_step(lambda m, b: {"mse": mse(m, b)}), val), progress=False)
    assert (train.calls, val.calls, history, state.step) == ([], [0], [], 0)
