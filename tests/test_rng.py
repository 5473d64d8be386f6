"""Tests of loopkit.rng: seed_everything, create_rng and RNGScope.

References: a ``torch.Generator`` seeded and advanced by hand, and the global generators'
own states saved before and compared after.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import loopkit
from loopkit.rng import RNGScope, create_rng, seed_everything
from tests._driver_helpers import CrashAfterStep, make_data, make_state, mse


@pytest.fixture(autouse=True)
def _restore_hash_seed(monkeypatch):
    """seed_everything sets PYTHONHASHSEED for child processes: put the caller's value back after."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.delenv("LOOPKIT_GLOBAL_SEED", raising=False)


def draws() -> tuple[float, np.ndarray, torch.Tensor]:
    return random.random(), np.random.rand(3), torch.rand(3)


def test_seed_everything_makes_python_numpy_and_torch_reproducible():
    assert seed_everything(11) == 11
    first = draws()
    seed_everything(11)
    second = draws()
    assert first[0] == second[0]
    assert np.array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    seed_everything(12)
    third = draws()
    assert first[0] != third[0] and not np.array_equal(first[1], third[1]) and not torch.equal(first[2], third[2])
    assert os.environ["PYTHONHASHSEED"] == "12"


def test_seed_everything_matches_each_library_seeded_by_hand():
    seed_everything(5)
    got = draws()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = draws()
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_seed_everything_takes_lightnings_workers_flag_and_seeds_the_same():
    """(Lightning's spelling, seed_everything(s, workers=True), raised a TypeError.)"""
    seed_everything(5, workers=True)
    got = draws()
    seed_everything(5)
    expected = draws()
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    with pytest.raises(TypeError, match="seed_everything: workers must be True or False, got 1"):
        seed_everything(5, workers=1)


def test_seed_everything_is_public():
    assert loopkit.seed_everything is seed_everything


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", True])
def test_seed_everything_refuses_bad_seeds(seed):
    with pytest.raises(ValueError, match=r"seed_everything: seed must be an int in \[0, 2\*\*32\)"):
        seed_everything(seed)


def test_seed_everything_without_a_seed_is_zero_with_a_warning_as_in_lightning():
    """(Lightning's seed_everything() raised a TypeError here.)"""
    with pytest.warns(UserWarning, match="no seed given and LOOPKIT_GLOBAL_SEED is unset: seed set to 0"):
        assert seed_everything() == 0
    got = draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    expected = draws()
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_seed_everything_without_a_seed_takes_the_seed_a_parent_process_set():
    seed_everything(23)
    assert os.environ["LOOPKIT_GLOBAL_SEED"] == "23"
    child = "import loopkit, torch; s = loopkit.seed_everything(); print(s, torch.rand(2).tolist())"
    out = subprocess.run([sys.executable, "-W", "error", "-c", child], capture_output=True, text=True, timeout=120, check=True)
    seed, _, values = out.stdout.strip().partition(" ")
    assert seed == "23"
    assert values == str(torch.rand(2, generator=torch.Generator().manual_seed(23)).tolist())


def test_seed_everything_names_a_bad_global_seed_variable(monkeypatch):
    monkeypatch.setenv("LOOPKIT_GLOBAL_SEED", "abc")
    with pytest.raises(ValueError, match="LOOPKIT_GLOBAL_SEED must hold an int in \\[0, 2\\*\\*32\\), got 'abc'"):
        seed_everything()
    monkeypatch.setenv("LOOPKIT_GLOBAL_SEED", "-4")
    with pytest.raises(ValueError, match="seed must be an int in"):
        seed_everything()


def test_create_rng_is_a_generator_seeded_with_the_seed():
    rng = create_rng(9)
    assert sorted(rng) == ["cpu"]
    assert torch.equal(rng["cpu"], torch.Generator().manual_seed(9).get_state())
    assert not torch.equal(rng["cpu"], create_rng(10)["cpu"])


def test_rng_scope_installs_the_state_and_continues_the_sequence_exactly():
    reference = torch.Generator().manual_seed(21)
    rng = create_rng(21)
    for size in (3, 5, 1):  # three scopes in a row, each continuing from the last one's state
        scope = RNGScope(rng, None)
        inside = torch.rand(size)
        inside_normal = torch.randn(2)
        rng = scope.close()
        assert torch.equal(inside, torch.rand(size, generator=reference))
        assert torch.equal(inside_normal, torch.randn(2, generator=reference))
        assert torch.equal(rng["cpu"], reference.get_state())


def test_rng_scope_close_restores_the_callers_global_state():
    torch.manual_seed(77)
    saved = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(saved)
    scope = RNGScope(create_rng(1), None)
    torch.rand(100)
    scope.close()
    assert torch.equal(torch.get_rng_state(), saved)
    assert torch.equal(torch.rand(4), expected)


def test_rng_scope_discard_restores_the_callers_global_state():
    torch.manual_seed(78)
    saved = torch.get_rng_state()
    rng = create_rng(2)
    scope = RNGScope(rng, None)
    first = torch.rand(5)
    scope.discard()
    assert torch.equal(torch.get_rng_state(), saved)
    # the train state's RNG was not advanced: the same draws come out again
    scope = RNGScope(rng, None)
    assert torch.equal(torch.rand(5), first)
    scope.discard()
    assert torch.equal(torch.get_rng_state(), saved)


def test_rng_scope_does_not_change_the_rng_mapping_it_was_given():
    rng = create_rng(4)
    before = rng["cpu"].clone()
    scope = RNGScope(rng, None)
    torch.rand(10)
    new = scope.close()
    assert torch.equal(rng["cpu"], before) and not torch.equal(new["cpu"], before)


def test_rng_scope_ignores_whatever_the_global_rng_did_before():
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        torch.rand(global_seed * 7)
        scope = RNGScope(create_rng(3), None)
        results.append(torch.rand(4))
        scope.close()
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_scope_on_cuda_continues_and_restores():
    reference = torch.Generator(device="cuda:0").manual_seed(5)
    saved = torch.cuda.get_rng_state(0)
    rng = create_rng(5)
    scope = RNGScope(rng, 0, seed=5)
    inside = torch.rand(3, device="cuda:0")
    rng = scope.close()
    assert torch.equal(inside, torch.rand(3, device="cuda:0", generator=reference))
    assert torch.equal(rng["cuda:0"], reference.get_state())
    assert torch.equal(torch.cuda.get_rng_state(0), saved)


# --- states that draw from the global RNG (TrainState.create(..., global_rng=True)) ---------------


def _dropout_parts() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
        )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def _ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _raw_loop(data) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The hand-written loop: dropout draws from the global RNG, seeded once by seed_everything."""
    model, opt = _dropout_parts()
    seed_everything(123)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


def _pipelines():
    plain = loopkit.train_step(_ce)
    return {
        "pure": plain,
        "donated": loopkit.donate(plain),
        "clipped": loopkit.with_grad_clip(plain, max_norm=1e9),  # the general path (no clipping happens)
        "run_epochs": plain,
    }


@pytest.mark.parametrize("kind", ["pure", "donated", "clipped", "run_epochs"])
def test_a_global_rng_state_trains_bit_for_bit_as_a_raw_loop_seeded_globally(kind):
    data = _batches(8)
    expected, expected_rng = _raw_loop(data)
    step = _pipelines()[kind]
    state = loopkit.TrainState.create(*_dropout_parts(), global_rng=True)
    seed_everything(123)
    if kind == "run_epochs":
        state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    else:
        for batch in data:
            state, _ = step(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(expected, state.model.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), expected_rng)  # the steps advanced the global RNG as the loop did
    assert dict(state.rng) == {}


def test_a_state_with_its_own_rng_does_not_draw_the_raw_loops_dropout_masks():
    """The reference above can tell: with its own RNG seeded otherwise the same run ends elsewhere."""
    data = _batches(8)
    expected, _ = _raw_loop(data)
    state = loopkit.TrainState.create(*_dropout_parts(), seed=7)
    seed_everything(123)
    for batch in data:
        state, _ = loopkit.train_step(_ce)(state, batch)
    assert not all(torch.equal(a, b) for a, b in zip(expected, state.model.parameters(), strict=True))


def test_a_global_rng_state_is_left_as_it_was_and_check_purity_accepts_it():
    state = loopkit.TrainState.create(*_dropout_parts(), global_rng=True)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    seed_everything(5)
    start = torch.get_rng_state()
    first, _ = loopkit.train_step(_ce)(state, _batches(1)[0])
    assert not torch.equal(torch.get_rng_state(), start)  # it drew from the global RNG
    assert all(torch.equal(before[k], v) for k, v in state.model.state_dict().items()) and state.step == 0
    torch.set_rng_state(start)
    again, _ = loopkit.train_step(_ce)(state, _batches(1)[0])  # same global start: same result
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True))
    torch.set_rng_state(start)
    loopkit.check_purity(loopkit.train_step(_ce), state, _batches(1)[0])
    assert torch.equal(torch.get_rng_state(), start)  # check_purity put the caller's RNG back


def test_an_evaluation_of_a_global_rng_state_draws_the_next_numbers_and_puts_the_rng_back():
    state = loopkit.TrainState.create(*_dropout_parts(), global_rng=True)
    seed_everything(9)
    start = torch.get_rng_state()
    _, metrics = loopkit.eval_step(lambda m, b: {"noise": torch.rand(())})(state, None)
    assert torch.equal(torch.get_rng_state(), start)
    assert torch.equal(metrics["noise"], torch.rand(()))  # what the global RNG gives next


def test_a_global_rng_state_round_trips_and_refuses_a_state_dict_of_the_other_kind():
    own = loopkit.TrainState.create(*_dropout_parts())
    shared = loopkit.TrainState.create(*_dropout_parts(), global_rng=True).evolve(step=3)
    loaded = loopkit.TrainState.create(*_dropout_parts(), global_rng=True).load_state_dict(shared.state_dict())
    assert loaded.step == 3 and dict(loaded.rng) == {}
    with pytest.raises(loopkit.StateMismatchError, match=r"missing key 'rng.cpu'.*global_rng=True"):
        own.load_state_dict(shared.state_dict())
    with pytest.raises(loopkit.StateMismatchError, match=r"unexpected key 'rng.cpu'.*global RNG"):
        shared.load_state_dict(own.state_dict())
    assert dict(own.evolve(rng={}).rng) == {}  # evolve switches either way
    assert torch.equal(shared.evolve(rng=create_rng(4)).rng["cpu"], create_rng(4)["cpu"])
    with pytest.raises(TypeError, match="TrainState.create: global_rng must be True or False"):
        loopkit.TrainState.create(*_dropout_parts(), global_rng=1)


def test_evolve_refuses_an_rng_of_another_size_and_extras_that_are_not_a_mapping():
    """Named when evolved, not at the next step (torch's 'Expected a CPUGeneratorImplState of size 5056')."""
    state = loopkit.TrainState.create(*_dropout_parts())
    with pytest.raises(ValueError, match=r"rng\['cpu'\] has shape \(10,\), a CPU generator's state has"):
        state.evolve(rng={"cpu": torch.zeros(10, dtype=torch.uint8)})
    with pytest.raises(TypeError, match="extras must be a mapping of names to values, got list"):
        state.evolve(extras=[1])


def test_a_global_rng_run_resumes_bit_for_bit_from_its_checkpoint(tmp_path):
    """The checkpoint holds the global RNG; restore installs it, whatever drew from it since the crash."""
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(24, 6), torch.randint(0, 2, (24,))), batch_size=4, shuffle=True
    )
    val = (loopkit.eval_step(lambda m, b: {"loss": _ce(m, b)}), _batches(2))
    options = dict(epochs=2, val=val, progress=False)
    seed_everything(0)
    whole, whole_history = loopkit.run_epochs(
        loopkit.train_step(_ce), loopkit.TrainState.create(*_dropout_parts(), global_rng=True), data, **options
    )
    step = loopkit.with_checkpointing(loopkit.train_step(_ce), tmp_path, every_n_steps=1, keep_last=2)
    seed_everything(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loopkit.run_epochs(step, loopkit.TrainState.create(*_dropout_parts(), global_rng=True), data,
                           callbacks=[CrashAfterStep(8)], **options)
    torch.rand(1000)  # the crashed process drew on: the checkpoint's global RNG must win
    restored = loopkit.restore(loopkit.TrainState.create(*_dropout_parts(), global_rng=True), tmp_path)
    assert (restored.step, restored.epoch, restored.batch_index) == (8, 1, 2)
    resumed, history = loopkit.run_epochs(step, restored, data, **options)
    assert all(torch.equal(a, b) for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True))
    assert history[-1] == whole_history[-1]


def test_numpy_integer_seeds_are_taken_as_the_ints_they_are():
    """As Lightning's seed_everything and TrainState.evolve take them (a seed drawn with numpy); refused before."""
    import numpy as np

    assert loopkit.seed_everything(np.int64(5)) == 5
    a = torch.rand(3)
    loopkit.seed_everything(5)
    assert torch.equal(a, torch.rand(3))
    state = loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=np.uint32(7))
    assert state.seed == 7 and type(state.seed) is int
    assert torch.equal(state.rng["cpu"], loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=7).rng["cpu"])


class _EpochStartSampler(torch.utils.data.Sampler):
    """Shuffles with numpy's and Python's global RNGs when an epoch's iterator starts (as a bucketing sampler of one's
    own does), recording what it drew."""

    def __init__(self) -> None:
        self.drawn: list[tuple[list[int], float]] = []

    def __len__(self) -> int:
        return 8

    def __iter__(self):
        order = np.random.permutation(8).tolist()
        self.drawn.append((order, random.random()))
        return iter(order)


def test_each_epochs_start_seeds_numpys_and_pythons_global_rngs_anew_and_a_resumed_run_draws_the_same():
    """run_epochs seeds numpy's and Python's global RNGs from ``(seed, epoch)`` while an epoch's iterator starts: a
    sampler shuffling with them draws another order each epoch (not one order every epoch), and a run resumed from a
    later epoch (the caller's RNGs elsewhere, the step drawing from them too) draws what the uninterrupted run drew."""
    samples = [(x[0], y[0]) for x, y in make_data(8, batch_size=1, seed=3)]

    def loss_fn(model, batch):
        np.random.rand()  # (the step draws from them as it goes: the epoch's start is seeded anew all the same)
        random.random()
        return mse(model, batch)

    def fit(state, epochs, caller_seed):
        sampler = _EpochStartSampler()
        seed_everything(caller_seed)
        loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=sampler)
        state, _ = loopkit.run_epochs(loopkit.train_step(loss_fn), state, loader, epochs=epochs, progress=False)
        return state, sampler.drawn

    _, whole = fit(make_state(), 3, caller_seed=0)
    assert len(whole) == 3
    assert len({tuple(order) for order, _ in whole}) == 3 and len({x for _, x in whole}) == 3
    middle, first = fit(make_state(), 1, caller_seed=5)
    assert first == whole[:1] and middle.epoch == 1
    _, rest = fit(middle, 3, caller_seed=99)
    assert rest == whole[1:]
