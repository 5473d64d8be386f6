"""Tests of loopkit.rng: seed_everything, create_rng and RNGScope.

References: a ``torch.Generator`` seeded and advanced by hand, and the global generators'
own states saved before and compared after.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import loopkit
from loopkit.rng import RNGScope, create_rng, seed_everything


@pytest.fixture(autouse=True)
def _restore_hash_seed(monkeypatch):
    """seed_everything sets PYTHONHASHSEED for child processes: put the caller's value back after."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


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


def test_seed_everything_is_public():
    assert loopkit.seed_everything is seed_everything


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", True, None])
def test_seed_everything_refuses_bad_seeds(seed):
    with pytest.raises(ValueError, match=r"seed_everything: seed must be an int in \[0, 2\*\*32\)"):
        seed_everything(seed)


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
