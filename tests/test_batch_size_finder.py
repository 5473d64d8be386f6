"""loopkit.scale_batch_size against Lightning 2.6.6's Tuner.scale_batch_size.

The reference is a table measured with Lightning itself (not imported here): a LightningModule whose
training_step raises torch.OutOfMemoryError for a batch larger than LIMIT, its train_dataloader a
DataLoader over N samples at the module's batch_size, each mode and option below; the table holds the
size Lightning returned and the batch lengths its trials ran, in order of first appearance.
"""

from __future__ import annotations

import gc
import random
import traceback
import weakref

import numpy as np
import pytest
import torch

import loopkit
from loopkit.batch_size_finder import is_oom_error
from tests._driver_helpers import Watched, alive, gc_off, raw_loop_frees_its_model

# (LIMIT, N, mode, options) -> (Lightning's answer, the batch lengths its trials ran)
LIGHTNING = [
    (40, 1000, "power", {}, 32, [2, 4, 8, 16, 32, 64]),
    (40, 1000, "binsearch", {}, 38, [2, 4, 8, 16, 32, 64, 48, 40, 44, 42, 41]),
    (40, 1000, "binsearch", {"margin": 0.0}, 40, [2, 4, 8, 16, 32, 64, 48, 40, 44, 42, 41]),
    (40, 1000, "power", {"max_trials": 3}, 8, [2, 4, 8]),
    (40, 1000, "binsearch", {"max_val": 20}, 19, [2, 4, 8, 16]),
    (1000, 100, "power", {}, 128, [2, 4, 8, 16, 32, 64, 36, 100]),  # the data set's length stops the doubling
    (1000, 100, "binsearch", {}, 121, [2, 4, 8, 16, 32, 64, 36, 100]),
    (1000, 16, "power", {}, 16, [2, 4, 8, 16]),  # a doubling that lands on the length: no size above it is made
    (1000, 16, "binsearch", {}, 15, [2, 4, 8, 16]),
    (1000, 64, "power", {}, 64, [2, 4, 8, 16, 32, 64]),
    (1000, 64, "binsearch", {}, 60, [2, 4, 8, 16, 32, 64]),
    (1, 1000, "power", {}, 1, [2, 1]),
    (1, 1000, "binsearch", {}, 1, [2]),
]


class _Device:
    """A loss_fn on a device with room for ``limit`` samples; records the batch lengths it was given."""

    def __init__(self, limit):
        self.limit, self.seen = limit, []

    def __call__(self, model, batch):
        if len(batch) not in self.seen:
            self.seen.append(len(batch))
        if len(batch) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(batch).pow(2).mean()


def _state():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))


def _loader(n):
    return lambda size: torch.utils.data.DataLoader(torch.ones(n, 2), batch_size=size)


@pytest.mark.parametrize("limit, n, mode, options, answer, tried", LIGHTNING)
def test_the_search_tries_and_answers_what_lightnings_does(limit, n, mode, options, answer, tried):
    device = _Device(limit)
    assert loopkit.scale_batch_size(loopkit.train_step(device), _state(), _loader(n), mode=mode, **options) == answer
    assert device.seen == tried


def test_power_mode_caps_at_max_val_where_lightning_returns_the_doubled_size():
    """Lightning 2.6.6's power mode with max_val=20 (LIMIT 40) tried 2..16 and returned 32, above max_val."""
    device = _Device(40)
    assert loopkit.scale_batch_size(loopkit.train_step(device), _state(), _loader(1000), max_val=20) == 20
    assert device.seen == [2, 4, 8, 16]


def test_the_given_state_and_the_global_rngs_are_left_as_they_were(take_snapshot, assert_trees_equal):
    state = _state()
    before = take_snapshot(state)
    rngs = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    loopkit.scale_batch_size(loopkit.train_step(_Device(40)), state, _loader(1000), mode="binsearch")
    assert_trees_equal(take_snapshot(state), before)
    assert torch.equal(torch.get_rng_state(), rngs[0]) and np.array_equal(np.random.get_state()[1], rngs[1])
    assert random.getstate() == rngs[2]
    trained, _ = loopkit.run_epochs(loopkit.train_step(_Device(1000)), state, _loader(8)(4), epochs=1, progress=False)
    assert trained.step == 2


def test_only_running_out_of_memory_makes_a_size_too_large():
    def fails(model, batch):
        if len(batch) > 4:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return model(batch).pow(2).mean()

    state = _state()
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        loopkit.scale_batch_size(loopkit.train_step(fails), state, _loader(100))
    state.check_usable()
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                       "allocate 4000000000 bytes")
    assert is_oom_error(cpu) and is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert not is_oom_error(RuntimeError("out of memory")) and not is_oom_error(MemoryError())


def test_a_batch_of_one_that_runs_out_of_memory_is_named():
    with pytest.raises(RuntimeError, match="even a batch of 1 runs out of memory") as caught:
        loopkit.scale_batch_size(loopkit.train_step(_Device(0)), _state(), _loader(100))
    cause = caught.value.__cause__
    assert isinstance(cause, torch.OutOfMemoryError) and loopkit.state_at_error(cause) is None
    assert "in __call__" in "".join(traceback.format_tb(cause.__traceback__))  # where it ran out still shows


def test_the_copies_the_trials_train_are_freed_on_return_without_a_gc():
    """As a raw loop's model and optimizer are, by reference counting alone (no cycle of a trial's fit holds its
    copy until Python's cyclic gc runs; on a GPU, device memory)."""
    with gc_off():
        assert raw_loop_frees_its_model()
        model = Watched(2, 1)
        state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters()))
        assert loopkit.scale_batch_size(loopkit.train_step(_Device(1000)), state, _loader(100), max_trials=3) == 8
        del state, model
        assert alive() == 0


@pytest.mark.parametrize("options", [{"mode": "power", "init_val": 128}, {"mode": "binsearch"}])
def test_a_trial_that_ran_out_of_memory_holds_nothing_during_the_next(options):
    """As Lightning's search, which lets go of the exception before freeing memory: the failed trial's
    activations and its copy of the model are freed before the next (smaller) trial runs."""
    failed, alive = [], []

    def loss_fn(model, batch):
        activations = torch.empty(len(batch), 100)  # what a trial's forward allocates
        if len(batch) > 40:
            failed.extend((weakref.ref(activations), weakref.ref(model.weight)))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        gc.collect()
        alive.append(sum(ref() is not None for ref in failed))
        return model(batch).pow(2).mean()

    assert loopkit.scale_batch_size(loopkit.train_step(loss_fn), _state(), _loader(1000), **options) == {
        "power": 32, "binsearch": 38}[options["mode"]]
    assert failed and alive  # trials ran after one ran out of memory (128 and 64 first in power mode)
    assert alive == [0] * len(alive)


@pytest.mark.parametrize("options, error, match", [
    ({"mode": "linear"}, ValueError, "mode must be 'power' or 'binsearch', got 'linear'"),
    ({"steps_per_trial": 0}, ValueError, "steps_per_trial must be a positive int, got 0"),
    ({"init_val": 2.5}, ValueError, "init_val must be a positive int, got 2.5"),
    ({"max_trials": -1}, ValueError, "max_trials must be a positive int"),
    ({"margin": 1.0}, ValueError, r"margin must be a number in \[0, 1\), got 1.0"),
    ({"device": "nowhere"}, (ValueError, RuntimeError), "nowhere"),
])
def test_bad_options_are_named_before_any_trial(options, error, match):
    device = _Device(40)
    with pytest.raises(error, match=match):
        loopkit.scale_batch_size(loopkit.train_step(device), _state(), _loader(100), **options)
    assert device.seen == []


def test_bad_steps_states_and_data_are_named():
    step = loopkit.train_step(_Device(40))
    with pytest.raises(ValueError, match="no optimizer"):
        loopkit.scale_batch_size(step, loopkit.TrainState.create(torch.nn.Linear(2, 1)), _loader(10))
    with pytest.raises(TypeError, match="make_data must be a function of the batch size"):
        loopkit.scale_batch_size(step, _state(), _loader(10)(2))
    with pytest.raises(TypeError, match=r"scale_batch_size: make_data\(2\) must be an iterable of batches"):
        loopkit.scale_batch_size(step, _state(), lambda size: 3)
    with pytest.raises(ValueError, match="with_logging"):
        loopkit.scale_batch_size(loopkit.with_logging(step, loopkit.ConsoleLogger()), _state(), _loader(10))
    with pytest.raises(TypeError, match="eval_step"):
        loopkit.scale_batch_size(loopkit.eval_step(lambda m, b: {}), _state(), _loader(10))
    assert loopkit.scale_batch_size(step, _state(), _loader(100), init_val=np.int64(4), margin=np.float32(0.0),
                                    mode="binsearch") == 40


@pytest.mark.parametrize("mode, answer", [("power", 64), ("binsearch", 76)])
def test_a_size_at_the_data_sets_length_that_runs_out_of_memory_makes_the_search_go_down(mode, answer):
    """100 samples, room for 80: 2..64 fit, 128 (one batch of 100) does not. Lightning 2.6.6 answers 128 in power
    mode (which does not fit) and tries 128 again without end in binsearch mode."""
    device = _Device(80)
    assert loopkit.scale_batch_size(loopkit.train_step(device), _state(), _loader(100), mode=mode) == answer
    assert answer <= 80


def test_empty_data_is_named_and_a_pure_function_step_leaves_the_state_usable():
    from loopkit.state import fork

    with pytest.raises(ValueError, match=r"scale_batch_size: make_data\(2\) is empty"):
        loopkit.scale_batch_size(loopkit.train_step(_Device(40)), _state(), lambda size: [])

    def own(state, batch):  # a step of one's own, pure as documented: it forks first
        state = fork(state)
        _Device(40)(state.model, batch).backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    state, _ = loopkit.run_epochs(own, _state(), _loader(16)(4), max_steps=2, progress=False)  # extras from a fit
    assert loopkit.scale_batch_size(own, state, _loader(1000)) == 32
    state.check_usable()


def test_a_make_data_that_cannot_take_the_batch_size_is_refused_before_any_trial():
    state = _state()
    with pytest.raises(TypeError, match=r"^scale_batch_size: make_data must take \(batch_size\); .*<lambda>\(\) cannot"):
        loopkit.scale_batch_size(loopkit.train_step(lambda m, b: m(b).sum()), state, lambda: _loader(8)(2))
    state.check_usable()
