"""loopkit.state: creating, evolving, forking, and saving/loading a TrainState."""

from __future__ import annotations

import collections
import copy
import functools
import pickle
import re
import types
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import loopkit
from loopkit.state import fork
from tests._custom_optimizers import EIGHT_BATCHES, CountingSGD, GlobalCountSGD, Lookahead, fresh_state
from tests._custom_optimizers import squares as _squares
from tests.conftest import assert_equal_trees, through_a_file

# --- create and evolve ----------------------------------------------------------------------------


def test_create_starts_at_zero_with_an_rng_seeded_from_seed(make_mlp):
    state = loopkit.TrainState.create(make_mlp(0), seed=42)
    assert (state.step, state.epoch, state.batch_index, state.seed) == (0, 0, 0, 42)
    assert dict(state.extras) == {}
    assert torch.equal(state.rng["cpu"], torch.Generator().manual_seed(42).get_state())


def test_create_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        loopkit.TrainState.create(lambda x: x)


def test_create_refuses_an_optimizer_over_tensors_not_in_the_model(make_mlp):
    model = make_mlp(0)
    stranger = nn.Parameter(torch.zeros(3, 5))
    opt = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(ValueError) as info:
        loopkit.TrainState.create(model, opt)
    message = str(info.value)
    assert "param_groups[0]['params'][4]" in message and "(3, 5)" in message and "not a parameter of the model" in message


def test_create_refuses_an_optimizer_of_another_model(make_mlp):
    opt = torch.optim.SGD(make_mlp(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*not a parameter of the model"):
        loopkit.TrainState.create(make_mlp(0), opt)


def test_create_refuses_wrong_types_and_mismatched_scheduler(make_mlp):
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got list"):
        loopkit.TrainState.create(model, [opt])
    with pytest.raises(ValueError, match="a scheduler needs an optimizer"):
        loopkit.TrainState.create(model, None, torch.optim.lr_scheduler.StepLR(opt, 1))
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="different optimizer"):
        loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(other, 1))
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler.LRScheduler, got str"):
        loopkit.TrainState.create(model, opt, "cosine")
    # Lightning's default for a plateau scheduler ("interval": "epoch") steps it once an epoch, at its end, as the
    # guide's callback does in on_epoch_end: the advice was on_validation_end, twice an epoch with two validations
    with pytest.raises(TypeError, match=r"(?s)ReduceLROnPlateau steps on a validation metric.*once an epoch, in "
                       r"on_epoch_end\(state, record\).*\"interval\": \"epoch\".*docs/from_lightning\.md.*"
                       r"on_validation_end\(state, metrics\) only to step after every validation"):
        loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            loopkit.TrainState.create(model, opt, seed=seed)


def test_evolve_refuses_a_new_optimizer_without_its_scheduler_saying_what_to_pass(make_mlp):
    """The scheduler stepping the old optimizer is refused, naming scheduler_for; passing what it names is taken,
    a scheduler stepping the new optimizer with the old one's schedule (its state_dict)."""
    model = make_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    opt.step()
    state.scheduler.step()
    new = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"different optimizer than the state's; a new optimizer needs a scheduler "
                                         r"of its own: .*loopkit\.state\.scheduler_for\(state\.scheduler, new\)"):
        state.evolve(optimizer=new)
    evolved = state.evolve(optimizer=new, scheduler=loopkit.state.scheduler_for(state.scheduler, new))
    assert evolved.scheduler.optimizer is new and evolved.scheduler.state_dict() == state.scheduler.state_dict()
    with pytest.raises(ValueError, match=r"TrainState: the scheduler was built for a different optimizer than the "
                                         r"state's; build it from the optimizer given"):
        loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(new, 1))


def test_state_is_frozen_and_evolve_returns_a_new_state(make_mlp):
    state = loopkit.TrainState.create(make_mlp(0))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.step = 3
    with pytest.raises(TypeError):
        state.extras["x"] = 1
    new = state.evolve(step=3, extras={"x": 1})
    assert (state.step, dict(state.extras)) == (0, {})
    assert (new.step, dict(new.extras)) == (3, {"x": 1})
    assert new.model is state.model  # evolve shares, it does not copy


def test_fork_copies_what_a_step_changes(make_bn_dropout, make_adam_state, batches, mse_loss):
    state = make_adam_state(make_bn_dropout(0), scheduler=True)
    state, _ = loopkit.train_step(mse_loss)(state, batches[0])
    for p in state.model.parameters():
        p.grad = torch.ones_like(p)
    copy = fork(state)
    pairs = list(zip(state.model.parameters(), copy.model.parameters(), strict=True))
    assert all(a is not b and torch.equal(a, b) for a, b in pairs)
    assert all(a.grad is not b.grad and torch.equal(a.grad, b.grad) for a, b in pairs)
    with torch.no_grad():
        copy.model[0].weight.add_(1.0)
        copy.model[1].running_mean.add_(1.0)
        copy.model[0].weight.grad.add_(1.0)
        next(iter(copy.optimizer.state.values()))["exp_avg"].add_(1.0)
    copy.scheduler.step()
    assert not torch.equal(copy.model[0].weight, state.model[0].weight)
    assert not torch.equal(copy.model[1].running_mean, state.model[1].running_mean)
    assert torch.equal(state.model[0].weight.grad, torch.ones_like(state.model[0].weight))
    first = state.optimizer.param_groups[0]["params"][0]
    copied_first = copy.optimizer.param_groups[0]["params"][0]
    assert copied_first is copy.model[0].weight  # the copied optimizer drives the copied model
    assert not torch.equal(state.optimizer.state[first]["exp_avg"], copy.optimizer.state[copied_first]["exp_avg"])
    assert state.scheduler.last_epoch == 1 and copy.scheduler.last_epoch == 2
    assert state.optimizer.param_groups[0]["lr"] != copy.optimizer.param_groups[0]["lr"]


# --- state_dict / load_state_dict ------------------------------------------------------------------


def _rich_state(make_bn_dropout, batches, mse_loss):
    """Adam + scheduler + float16 loss scale + a nan-guard count + a half-accumulated gradient."""
    model = make_bn_dropout(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), seed=9)
    step = loopkit.with_nan_guard(
        loopkit.with_grad_accum(loopkit.with_amp(loopkit.train_step(mse_loss), torch.float16, init_scale=256.0), every=2)
    )
    for batch in batches[:5]:
        state, _ = step(state, batch)
    return state, step


def _leaves(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            assert isinstance(k, str), f"{path}: key {k!r} is not a string"
            yield from _leaves(v, f"{path}.{k}")
    else:
        yield path, tree


def test_state_dict_holds_only_tensors_numbers_and_strings(make_bn_dropout, batches, mse_loss):
    state, _ = _rich_state(make_bn_dropout, batches, mse_loss)
    sd = state.state_dict()
    leaves = dict(_leaves(sd))
    for path, value in leaves.items():
        assert isinstance(value, (torch.Tensor, int, float, str)), f"{path} is a {type(value).__qualname__}"
    assert {".step", ".epoch", ".batch_index", ".seed", ".rng.cpu", ".extras.amp/scale", ".extras.accum/count"} <= set(leaves)
    assert any(p.startswith(".grads.") for p in leaves)  # the half-accumulated gradient is saved
    assert any(p.startswith(".optimizer.state.") for p in leaves)
    assert any(p.startswith(".scheduler.") for p in leaves)
    # and it is what torch.save(weights_only=True) can take
    import io

    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "take-the-tensors"])
def test_load_state_dict_round_trip_restores_everything(
    copy, make_bn_dropout, batches, mse_loss, take_snapshot, assert_trees_equal, round_trip
):
    state, step = _rich_state(make_bn_dropout, batches, mse_loss)
    fresh_model = make_bn_dropout(1)
    opt = torch.optim.Adam(fresh_model.parameters(), lr=0.01)
    fresh = loopkit.TrainState.create(fresh_model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5), seed=0)
    # copy=False is for a state dict nothing else holds: one read back from a file
    sd = state.state_dict() if copy else round_trip(state.state_dict())
    restored = fresh.load_state_dict(sd, copy=copy)
    assert restored is not fresh
    if not copy:
        for name, tensor in (*restored.model.named_parameters(), *restored.model.named_buffers()):
            assert tensor.data_ptr() == sd["model"][name].data_ptr(), name  # taken, not copied
        assert sd["grads"] and all(
            p.grad.data_ptr() == sd["grads"][n].data_ptr() for n, p in restored.model.named_parameters() if n in sd["grads"]
        )

    want, got = take_snapshot(state), take_snapshot(restored)
    assert_trees_equal(got, want)  # params, grads, buffers, optimizer, scheduler, counters, rng, extras
    assert float(restored.extras["amp/scale"]) == float(state.extras["amp/scale"])
    assert restored.extras["accum/count"] == 1
    assert restored.scheduler.get_last_lr() == state.scheduler.get_last_lr()
    # the restored state trains on exactly as the original would
    a, b = state, restored
    for batch in batches[:3]:
        a, _ = step(a, batch)
        b, _ = step(b, batch)
    assert_trees_equal(take_snapshot(b), take_snapshot(a))
    # the state it was loaded into is unchanged
    assert fresh.step == 0 and fresh.optimizer.state_dict()["state"] == {}


def test_extras_of_any_plain_structure_come_back_from_a_state_dict_as_they_were(make_mlp, round_trip):
    """A transform of one's own may keep tuples, lists, None and int keys in extras; a state dict
    (and a file) holds tensors, numbers and strings only, and load_state_dict gives them back
    (before, a list came back as {'0': ..., '1': ...}, int keys as strings, None not at all)."""
    extras = {
        "history": [1.0, 2.0], "pair": (torch.ones(2), "a"), "by_epoch": {0: 0.5, 3: 0.25}, "best": None,
        "by_pair": {(1, 2): [None]}, "nested": {"deep": ({"x": 1},)}, "odd": {"__loopkit_kind__": "mine", "v": 2},
        "empty": (), "flag": True,
    }
    state = loopkit.TrainState.create(make_mlp(0)).evolve(extras=extras)
    sd = state.state_dict()
    for _, leaf in _leaves(sd["extras"]):
        assert isinstance(leaf, (torch.Tensor, int, float, str))
    for given in (sd, round_trip(sd)):
        restored = dict(loopkit.TrainState.create(make_mlp(1)).load_state_dict(given).extras)
        assert set(restored) == set(extras)
        for key, value in extras.items():
            got = restored[key]
            assert type(got) is type(value), key
            if key == "pair":
                assert torch.equal(got[0], value[0]) and got[1] == value[1]
            else:
                assert got == value, key


class _WithExtraState(nn.Module):
    """A linear layer whose ``get_extra_state()`` returns what it was given (a vocabulary, a config)."""

    def __init__(self, extra) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.extra = extra

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, value) -> None:
        self.extra = value


_EXTRA_STATES = [["a", "b"], (1, 2), {"vocab": ["a", "b"]}, {"n": 3}, "text", [torch.ones(2), ("x", 0.5)], None]


@pytest.mark.parametrize("extra", _EXTRA_STATES, ids=repr)
def test_a_models_extra_state_of_any_kind_comes_back_from_a_state_dict_as_torchs_load_state_dict_gives_it(extra):
    """Reference: torch's own m.load_state_dict(m.state_dict()) hands get_extra_state()'s value, whatever it is, to
    set_extra_state. Before: a list or tuple anywhere in it was refused ("key 'model._extra_state' holds a list,
    expected a mapping"), by the state's own state dict, and through a file."""
    torch.manual_seed(0)
    reference = _WithExtraState(extra)
    torch.manual_seed(1)
    model = _WithExtraState(copy.deepcopy(extra))
    model.extra = "other"
    model.load_state_dict(reference.state_dict())
    state = loopkit.TrainState.create(reference, torch.optim.SGD(reference.parameters(), lr=0.1))
    for given in (state.state_dict(), through_a_file(state.state_dict())):
        torch.manual_seed(1)
        template = _WithExtraState("other")
        restored = loopkit.TrainState.create(template, torch.optim.SGD(template.parameters(), lr=0.1)).load_state_dict(given)
        assert_equal_trees(restored.model.extra, model.extra)
        assert type(restored.model.extra) is type(model.extra)
        assert torch.equal(restored.model.lin.weight, reference.lin.weight)
        if isinstance(extra, (list, dict)):  # the new state's own: changing it leaves the saved state alone
            assert restored.model.extra is not reference.extra


@pytest.mark.parametrize("extra", [["a"], None], ids=repr)
def test_a_state_dict_missing_a_models_extra_state_is_refused_naming_it(extra):
    """Before: an extra state that was None in the template was not looked for, and set_extra_state got None."""
    state = loopkit.TrainState.create(_WithExtraState(extra))
    sd = state.state_dict()
    del sd["model"]["_extra_state"]
    with pytest.raises(loopkit.StateMismatchError, match="missing key 'model._extra_state'"):
        state.load_state_dict(sd)


def test_extras_in_the_earlier_state_dict_form_still_load(make_mlp):
    """Checkpoints written before the tagged form: their lists were string-keyed dicts, which load
    as such (the windows of run_epochs and with_logging read that form)."""
    state = loopkit.TrainState.create(make_mlp(0))
    sd = state.state_dict()
    sd["extras"] = {"run_epochs/epoch": {"0": {"loss": torch.tensor(1.0)}, "1": {"loss": torch.tensor(3.0)}}}
    restored = loopkit.TrainState.create(make_mlp(1)).load_state_dict(sd)
    from loopkit._window import EPOCH

    assert EPOCH.means(restored.extras) == {"loss": 2.0}


def _tied(tie: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    if tie:
        model[1].weight = model[0].weight
    return model


def test_load_state_dict_without_copy_keeps_tied_weights_tied_and_never_ties_untied_ones(round_trip):
    model = _tied(True)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.train_step(lambda m, x: m(x).pow(2).mean())(state, torch.tensor([0, 3, 4]))
    sd = round_trip(state.state_dict())

    tied = _tied(True)
    restored = loopkit.TrainState.create(tied, torch.optim.SGD(tied.parameters(), lr=0.1)).load_state_dict(
        sd, copy=False
    )
    assert restored.model[0].weight is restored.model[1].weight
    assert restored.optimizer.param_groups[0]["params"][0] is restored.model[0].weight
    assert torch.equal(restored.model[0].weight, state.model[0].weight)

    without_optimizer = {k: v for k, v in round_trip(state.state_dict()).items() if k != "optimizer"}
    untied = loopkit.TrainState.create(_tied(False)).load_state_dict(without_optimizer, copy=False)
    first, second = untied.model[0].weight, untied.model[1].weight
    assert first.data_ptr() != second.data_ptr()  # the shared storage went to one of them only
    assert torch.equal(first, state.model[0].weight) and torch.equal(second, state.model[0].weight)


def test_load_state_dict_without_copy_copies_what_does_not_match_exactly(make_mlp, round_trip):
    source = loopkit.TrainState.create(make_mlp(0))
    sd = round_trip(source.state_dict())
    sd["model"] = {k: v.double() for k, v in sd["model"].items()}
    restored = loopkit.TrainState.create(make_mlp(1)).load_state_dict(sd, copy=False)
    for name, p in restored.model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() != sd["model"][name].data_ptr()
        assert torch.equal(p, source.model.state_dict()[name])


def _bias_free_adam_state(d_in, d_out, batches_in):
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))
    step = loopkit.train_step(lambda m, x: m(x).pow(2).mean())
    for x in batches_in:
        state, _ = step(state, x)
    return state


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda sd: sd.pop("step"), "missing key 'step'"),
        (lambda sd: sd["model"].pop("2.weight"), "missing key 'model.2.weight'"),
        (lambda sd: sd.update(extra_thing=1), "unexpected key 'extra_thing'"),
        (lambda sd: sd["model"].update({"9.weight": torch.zeros(1)}), "unexpected key 'model.9.weight'"),
        (lambda sd: sd["optimizer"].pop("param_groups"), "missing key 'optimizer.param_groups'"),
        (lambda sd: sd.update(step=-1), "key 'step' must be a non-negative int"),
        (lambda sd: sd["rng"].update(cpu=torch.zeros(3)), "rng.cpu"),
        (lambda sd: sd["grads"].update({"0.weight": torch.zeros(2)}), "mis-shaped key 'grads.0.weight'"),
    ],
    ids=["missing-top", "missing-model", "unexpected-top", "unexpected-model", "missing-optimizer", "bad-counter", "bad-rng", "bad-grad"],
)
def test_load_state_dict_names_the_key_that_does_not_fit(
    edit, error, make_mlp, make_adam_state, batches, mse_loss, take_snapshot, assert_trees_equal
):
    source, _ = loopkit.train_step(mse_loss)(make_adam_state(make_mlp(0)), batches[0])
    sd = source.state_dict()
    sd["grads"] = {n: torch.ones_like(p) for n, p in source.model.named_parameters()}
    edit(sd)
    target = make_adam_state(make_mlp(1))
    target, _ = loopkit.train_step(mse_loss)(target, batches[1])
    before = take_snapshot(target)
    with pytest.raises(loopkit.StateMismatchError) as info:
        target.load_state_dict(sd)
    assert error in str(info.value)
    assert_trees_equal(take_snapshot(target), before)


def test_load_state_dict_of_a_differently_shaped_model_names_the_parameter(make_mlp, take_snapshot, assert_trees_equal):
    source = loopkit.TrainState.create(make_mlp(0, hidden=8))
    target = loopkit.TrainState.create(make_mlp(0, hidden=9))
    before = take_snapshot(target)
    with pytest.raises(loopkit.StateMismatchError) as info:
        target.load_state_dict(source.state_dict())
    message = str(info.value)
    assert "mis-shaped key 'model.0.weight'" in message and "(8, 4)" in message and "(9, 4)" in message
    assert_trees_equal(take_snapshot(target), before)


def test_load_state_dict_refuses_optimizer_state_of_the_same_size_from_another_model(take_snapshot, assert_trees_equal):
    x_a = [torch.randn(4, 2, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x_b = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a = _bias_free_adam_state(2, 8, x_a)  # weight (8, 2)
    b = _bias_free_adam_state(8, 2, x_b)  # weight (2, 8): same numel, other shape
    sd = a.state_dict()
    sd["optimizer"] = b.state_dict()["optimizer"]
    target = _bias_free_adam_state(2, 8, x_a[:1])
    before = take_snapshot(target)
    with pytest.raises(loopkit.StateMismatchError) as info:
        target.load_state_dict(sd)
    message = str(info.value)
    assert "mis-shaped key 'optimizer.state.0.exp_avg" in message and "(2, 8)" in message and "(8, 2)" in message
    assert_trees_equal(take_snapshot(target), before)


def test_load_state_dict_refuses_a_non_mapping(make_mlp):
    with pytest.raises(TypeError, match="load_state_dict expects a mapping, got list"):
        loopkit.TrainState.create(make_mlp(0)).load_state_dict([1, 2])


def test_replace_equals_attrs_evolve_field_by_field_and_names_an_unknown_field(make_mlp):
    from loopkit.state import replace

    model = make_mlp()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=3)
    changes = {"step": 7, "epoch": 2, "batch_index": 5, "extras": {"k": 1}, "rng": {"cpu": state.rng["cpu"].clone()}}
    for name, value in changes.items():
        ours, reference = replace(state, **{name: value}), attrs.evolve(state, **{name: value})
        for field in attrs.fields(loopkit.TrainState):
            a, b = getattr(ours, field.name), getattr(reference, field.name)
            assert a is b or a == b, (name, field.name)
    with pytest.raises(TypeError, match="no field.*stepp"):
        replace(state, stepp=1)


def test_make_state_equals_the_attrs_constructor_and_stays_frozen(make_mlp):
    """The hot path's constructor against attrs' own __init__: every field, the converter, frozen, usable."""
    from types import MappingProxyType

    from loopkit.state import make_state

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    rng = {"cpu": torch.get_rng_state()}
    for extras in ({"k": 1}, MappingProxyType({"k": 2}), {}):
        args = (model, opt, sched, 3, 2, 5, rng, extras, 11)
        ours, reference = make_state(*args), loopkit.TrainState(*args)
        for field in attrs.fields(loopkit.TrainState):
            a, b = getattr(ours, field.name), getattr(reference, field.name)
            assert a is b or a == b, field.name
        assert type(ours.extras) is MappingProxyType and dict(ours.extras) == dict(extras)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            ours.step = 4  # type: ignore[misc]
        ours.check_usable()  # not consumed
        assert ours.evolve(step=9).step == 9


def test_a_kept_graph_stays_out_of_copies_and_new_states(make_mlp, make_sgd_state, batches, mse_loss):
    """keep_graph's slot is no attrs field: copies, pickles, forks and new states leave the old graph behind."""
    import copy
    import pickle

    from loopkit.state import keep_graph, make_state, replace

    state, _ = loopkit.donate(loopkit.train_step(mse_loss))(make_sgd_state(make_mlp(0)), batches[0])
    assert state._graph.grad_fn is not None  # the donated step kept its loss, graph and all
    others = [copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state)), fork(state), replace(state)]
    others.append(make_state(*(getattr(state, f.name) for f in attrs.fields(loopkit.TrainState) if f.init)))
    for other in others:
        assert not hasattr(other, "_graph")
    assert "_graph" not in [f.name for f in attrs.fields(loopkit.TrainState)]
    assert keep_graph(others[-1], state._graph) is others[-1]


def test_states_keep_what_a_plain_loop_keeps_of_old_graphs(make_mlp, make_sgd_state, batches, mse_loss):
    """What a graph holds past its backward (here a tensor a custom autograd Function keeps on ctx)
    stays alive as in a plain loop: the last one under donation, none for states of pure calls."""
    import gc
    import weakref

    kept: list[weakref.ref] = []

    class Keeps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.extra = torch.ones(64)  # not a saved tensor: backward() does not free it
            kept.append(weakref.ref(ctx.extra))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad

    def loss_fn(model, batch):
        return mse_loss(lambda x: Keeps.apply(model(x)), batch)

    def alive() -> int:
        gc.collect()
        return sum(ref() is not None for ref in kept)

    model = make_mlp(0)  # the reference: a plain loop keeps its last loss, and so one
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches[:4]:
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    reference = alive()
    del loss
    kept.clear()
    state = make_sgd_state(make_mlp(0))
    pure_states = [state]
    for batch in batches[:4]:
        pure_states.append(loopkit.train_step(loss_fn)(pure_states[-1], batch)[0])
    assert (reference, alive()) == (1, 0)
    kept.clear()
    for batch in batches[:4]:
        state, _ = loopkit.donate(loopkit.train_step(loss_fn))(state, batch)
    assert alive() == reference


@pytest.mark.filterwarnings("error")  # a copied optimizer without the scheduler's wrapper on step() warns
def test_deepcopy_and_pickle_give_an_independent_state_that_trains_as_the_original(
    tmp_path, make_bn_dropout, make_adam_state, batches, mse_loss, take_snapshot, assert_trees_equal
):
    """A deep copy (or a pickle round trip) mid-accumulation, mid-logging-window, is a state of its own:
    training it equals training the original bitwise, and leaves the original as it was."""
    import copy
    import pickle

    logger = loopkit.JSONLLogger(str(tmp_path))  # the window is not due: the state holds its records
    step = loopkit.with_logging(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), logger, every_n_steps=50)
    state = make_adam_state(make_bn_dropout(0), seed=4, scheduler=True)
    for early in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):  # copies made before the first update
        ours, theirs = early, state
        for batch in batches[:2]:  # the second call updates (and steps the scheduler)
            ours, _ = step(ours, batch)
            theirs, _ = step(theirs, batch)
        assert_trees_equal(take_snapshot(ours), take_snapshot(theirs))
    for batch in batches[:3]:  # one update and a pending micro-batch
        state, _ = step(state, batch)
    assert state.extras and state.model[0].weight.grad is not None
    before = take_snapshot(state)
    for twin in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert twin.model[0].weight is not state.model[0].weight
        assert twin.optimizer.param_groups[0]["params"][0] is twin.model[0].weight
        assert twin.scheduler.optimizer is twin.optimizer
        assert_trees_equal(take_snapshot(twin), before)
        ours, theirs = twin, state
        for batch in batches[3:]:
            ours, _ = step(ours, batch)
            theirs, _ = step(theirs, batch)
        assert_trees_equal(take_snapshot(ours), take_snapshot(theirs))
        assert_trees_equal(take_snapshot(state), before)
    used = copy.deepcopy(state)
    loopkit.donate(step)(used, batches[3])
    with pytest.raises(loopkit.DonatedStateError):
        copy.deepcopy(used)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # (torch prefers the parametrization)
@pytest.mark.parametrize("steps", [0, 2])
@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
def test_deepcopy_copies_a_state_whose_model_uses_a_hook_based_norm(norm, steps, take_snapshot, assert_trees_equal):
    """torch.nn.utils.spectral_norm (after a forward) and weight_norm (from the start) keep ``weight`` on the module as
    a tensor their forward pre-hook computes, a non-leaf that torch's deep copy refuses: copy.deepcopy(state), the
    README's snapshot, raised (a pure step's copy, fork, copied it). Reference: the original trained on; the copy
    (and a pickle round trip's) trains on bitwise as it does, and a donated step on the copy leaves it as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0] = getattr(nn.utils, norm)(model[0])
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))
    step = loopkit.train_step(lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(steps + 2)]
    for batch in batches[:steps]:
        state, _ = step(state, batch)
    before = take_snapshot(state)
    for twin in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert twin.model[0].weight is not state.model[0].weight
        assert twin.optimizer.param_groups[0]["params"][0] is next(twin.model.parameters())
        assert_trees_equal(take_snapshot(twin), before)
        ours, theirs = twin, state
        for batch in batches[steps:]:
            ours, _ = loopkit.donate(step)(ours, batch)
            theirs, _ = step(theirs, batch)
        assert_trees_equal(take_snapshot(ours), take_snapshot(theirs))
        assert torch.equal(ours.model(batches[0][0]), theirs.model(batches[0][0]))  # (the recomputed weight too)
        assert_trees_equal(take_snapshot(state), before)


def test_a_deep_copy_keeps_the_gradient_hooks_on_parameters(make_mlp, make_sgd_state, batches, mse_loss, take_snapshot, assert_trees_equal):
    """torch's deep copy of a Parameter drops its hooks; a state's deep copy keeps them, as fork does."""
    import copy

    state = make_sgd_state(make_mlp(0))
    calls = []
    state.model[0].weight.register_hook(lambda grad: grad * 0)  # freezes the first weight
    state.model[0].bias.register_post_accumulate_grad_hook(lambda param: calls.append(param))
    twin, forked = copy.deepcopy(state), fork(state)
    step = loopkit.train_step(mse_loss)
    twin_new, forked_new = step(twin, batches[0])[0], step(forked, batches[0])[0]
    assert_trees_equal(take_snapshot(twin_new)["params"], take_snapshot(forked_new)["params"])
    assert torch.equal(twin_new.model[0].weight, state.model[0].weight)  # frozen by the kept hook
    assert len(calls) == 2 and calls[0] is not calls[1]  # each copy's own parameter


class _GainedByAHook(nn.Module):
    """A forward pre-hook, a gradient hook and an attribute, each a lambda closing over the model's own tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.gain = nn.Parameter(torch.ones(4))
        self.register_buffer("mask", torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]))
        gain, mask = self.gain, self.mask
        self.lin.register_forward_pre_hook(lambda module, args: (args[0] * gain,))
        self.lin.weight.register_hook(lambda grad: grad * mask)
        self.scale = lambda h: h * gain[:2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.lin(x))


def test_a_deep_copy_s_hooks_read_the_copy_s_tensors_where_their_closures_held_the_original_s(
    take_snapshot, assert_trees_equal
):
    """copy.deepcopy shares functions: the copy's hooks read the original's parameter (training the copy wrote its
    gradient into the original, and the copy's own never trained). Reference: the pure step's copy (fork)."""
    import copy

    torch.manual_seed(0)
    model = _GainedByAHook()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = take_snapshot(state)
    batch = (torch.randn(5, 4), torch.randn(5, 2))
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    twin_new, _ = loopkit.donate(loopkit.train_step(loss_fn))(copy.deepcopy(state), batch)
    assert state.model.gain.grad is None and state.model.lin.weight.grad is None
    assert_trees_equal(take_snapshot(state), before)
    pure_new, _ = loopkit.train_step(loss_fn)(state, batch)
    assert not torch.equal(twin_new.model.gain, state.model.gain)
    assert_trees_equal(take_snapshot(twin_new)["params"], take_snapshot(pure_new)["params"])


class _ScaleBy:
    """A forward hook object of one's own holding a parameter of the model."""

    def __init__(self, gain):
        self.gain = gain

    def __call__(self, module, args, out):
        return out * self.gain


class _Gained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.gain = nn.Linear(3, 1), nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _reaching_the_gain(kind: str, seen: list) -> nn.Module:
    """A model whose forward hook reaches its parameter ``gain`` in the way ``kind`` names, and collects what it
    sees into ``seen`` (a list of the caller's, shared by every copy)."""
    torch.manual_seed(0)
    model = _Gained()
    gain = model.gain
    reach = {
        "a list": lambda: (lambda ps: lambda m, a, o: o * ps[0])([gain]),
        "a dict": lambda: (lambda ps: lambda m, a, o: o * ps["g"])({"g": gain}),
        "a function": lambda: (lambda get: lambda m, a, o: o * get())(lambda: gain),
        "an object": lambda: (lambda holder: lambda m, a, o: o * holder.gain)(_ScaleBy(gain)),
        "a hook object": lambda: _ScaleBy(gain),
    }[kind]()
    model.lin.register_forward_hook(reach)
    model.lin.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    return model


@pytest.mark.parametrize("kind", ["a list", "a dict", "a function", "an object", "a hook object"])
def test_a_hook_reaching_a_parameter_through_a_container_trains_the_copy_s_in_pure_steps_copies_and_restores(kind):
    """The pure step's copy (and a deep copy's, and a restored template's) kept such a hook reading the original's
    parameter: the caller's state got its gradient and the copy's gain never trained. Reference: a raw loop. What
    the hooks collect still reaches the caller's list."""
    import copy

    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(3)]
    raw = _reaching_the_gain(kind, [])
    opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    for batch in batches:
        opt.zero_grad()
        loss_fn(raw, batch).backward()
        opt.step()

    def made(seen):
        model = _reaching_the_gain(kind, seen)
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    seen: list = []
    given = made(seen)
    for start in (given, copy.deepcopy(given), made([]).load_state_dict(given.state_dict())):
        state = start
        for batch in batches:
            state, _ = loopkit.train_step(loss_fn)(state, batch)
        assert torch.equal(state.model.gain, raw.gain) and torch.equal(state.model.lin.weight, raw.lin.weight)
    assert given.model.gain.grad is None and float(given.model.gain.detach()) == 1.5
    assert len(seen) == 6  # (the pure steps' and the deep copy's: the copy of a list the hook only collects into is
    # the caller's own; the restored template's hooks collect into their own list)


def test_extras_copy_is_a_new_dict_equal_to_the_extras_of_any_mapping_kind(make_mlp):
    from collections import OrderedDict
    from collections.abc import Mapping
    from types import MappingProxyType

    from loopkit.state import extras_copy

    state = loopkit.TrainState.create(make_mlp()).evolve(extras={"a": 1, "b": [2]})
    for extras in (state.extras, MappingProxyType(OrderedDict(a=1)), {"a": 1}, MappingProxyType({})):
        new = extras_copy(extras)
        assert type(new) is dict and new == dict(extras)
        new["z"] = 0
        assert "z" not in extras
    assert extras_copy(state.extras)["b"] is state.extras["b"]  # shallow, as dict() is

    class ReadOnly(Mapping):  # a user's mapping without copy(), behind the state's read-only view
        def __init__(self, d):
            self._d = dict(d)

        def __getitem__(self, key):
            return self._d[key]

        def __iter__(self):
            return iter(self._d)

        def __len__(self):
            return len(self._d)

    assert extras_copy(MappingProxyType(ReadOnly({"user": 1}))) == {"user": 1}
    model = make_mlp()
    custom = loopkit.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), extras=MappingProxyType(ReadOnly({"user": 1})))
    batch = (torch.ones(4, 4), torch.zeros(4, 2))
    clipped = loopkit.with_grad_clip(loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()), max_norm=1.0)
    assert clipped(custom, batch)[0].extras["user"] == 1  # the general step path copies such extras too


def test_hooks_and_children_added_to_a_fork_stay_with_it(make_mlp, make_sgd_state):
    state = make_sgd_state(make_mlp(0))
    calls = []
    state.model[0].register_forward_hook(lambda m, i, o: calls.append("shared"))
    copy = loopkit.state.fork(state)
    copy.model[1].register_forward_hook(lambda m, i, o: calls.append("copy only"))
    copy.model[1].add_module("extra", torch.nn.Identity())
    copy.model[1].register_buffer("count", torch.zeros(()))
    state.model(torch.ones(1, 4))
    assert calls == ["shared"]
    assert not hasattr(state.model[1], "extra") and "count" not in dict(state.model.named_buffers())
    calls.clear()
    copy.model(torch.ones(1, 4))
    assert calls == ["shared", "copy only"]


def test_load_state_dict_copies_the_optimizer_state_it_is_given(make_mlp, make_adam_state, batches, mse_loss, take_snapshot, assert_trees_equal):
    """The source of a state dict stays a valid snapshot: training the loaded state never reaches it."""
    step = loopkit.train_step(mse_loss)
    source, _ = step(make_adam_state(make_mlp(0)), batches[0])
    before = take_snapshot(source)
    loaded = make_adam_state(make_mlp(1)).load_state_dict(source.state_dict())
    donated = loopkit.donate(step)
    for batch in batches[1:3]:
        loaded, _ = donated(loaded, batch)
    assert_trees_equal(take_snapshot(source), before)  # exp_avg, exp_avg_sq and step included


def test_a_fresh_template_takes_optimizer_state_not_shaped_like_the_parameters(make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal):
    """Adafactor keeps row and column variances ((rows, 1), (1, cols)): a fresh template has no shapes to refuse them by."""

    def fresh(seed):
        model = make_mlp(seed)
        return loopkit.TrainState.create(model, torch.optim.Adafactor(model.parameters(), lr=0.01))

    step = loopkit.train_step(mse_loss)
    trained, _ = step(fresh(0), batches[0])
    assert any(v.shape != p.shape for p, entry in trained.optimizer.state.items() for v in entry.values() if v.ndim > 0)
    restored = fresh(1).load_state_dict(trained.state_dict())
    a, b = trained, restored
    for batch in batches[1:3]:  # the restored state trains on as the original does
        a, _ = step(a, batch)
        b, _ = step(b, batch)
    assert_trees_equal(take_snapshot(b), take_snapshot(a))


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh template", "trained template"])
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda entry: entry.pop("exp_avg"), "missing key 'optimizer.state.0.exp_avg'"),
        (lambda entry: entry.pop("step"), "missing key 'optimizer.state.0.step'"),
        (lambda entry: entry.__setitem__("bogus", torch.zeros(1)), "unexpected key 'optimizer.state.0.bogus'"),
    ],
    ids=["moment", "step", "unexpected"],
)
def test_a_missing_or_unexpected_key_of_a_parameters_optimizer_state_is_named(fresh, change, message, make_mlp, batches, mse_loss):
    """Before, a missing moment loaded silently and failed at the next step with a bare KeyError,
    and an unexpected key was taken in."""
    step = loopkit.train_step(mse_loss)

    def state(seed, trained):
        model = make_mlp(seed)
        s = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))
        return step(s, batches[0])[0] if trained else s

    sd = state(0, True).state_dict()
    change(sd["optimizer"]["state"]["0"])
    template = state(1, not fresh)
    with pytest.raises(loopkit.StateMismatchError, match=re.escape(message)):
        template.load_state_dict(sd)
    template.check_usable()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, amsgrad=True),
        lambda ps: torch.optim.RMSprop(ps, momentum=0.9, centered=True),
        torch.optim.NAdam, torch.optim.Adagrad, torch.optim.Rprop, torch.optim.ASGD, torch.optim.Adafactor,
    ],
    ids=["sgd", "momentum", "amsgrad", "rmsprop", "nadam", "adagrad", "rprop", "asgd", "adafactor"],
)
def test_every_torch_optimizers_own_state_loads_into_a_fresh_or_trained_template(make_optimizer, make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal):
    """The keys each parameter's state must hold are learnt from the optimizer's class and the loaded
    options: none of torch's own optimizers is refused, and the loaded state trains on as the original."""
    step = loopkit.train_step(mse_loss)

    def state(seed):
        model = make_mlp(seed)
        return loopkit.TrainState.create(model, make_optimizer(model.parameters()))

    trained, _ = step(state(0), batches[0])
    for template in (state(1), step(state(1), batches[1])[0]):
        a, b = trained, template.load_state_dict(trained.state_dict())
        for batch in batches[2:4]:
            a, _ = step(a, batch)
            b, _ = step(b, batch)
        assert_trees_equal(take_snapshot(b), take_snapshot(a))


class _LateKeys(torch.optim.SGD):
    """An optimizer of one's own that adds a state key from its third step on."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                entry = self.state[p]
                entry["count"] = entry.get("count", 0) + 1
                if entry["count"] >= 3:
                    entry["slow"] = p.detach().clone()


def test_an_optimizer_of_ones_own_whose_keys_grow_loads_earlier_and_later_checkpoints(
    make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal
):
    """Its keys are not learnt from a probe (they change as it goes), so none is refused as missing or unexpected:
    the loaded state holds the checkpoint's keys (``slow`` gained, or dropped), not the template's, and trains on as
    the state saved does. Reference: the saved state itself, stepped on beside it; the template before the load."""
    step = loopkit.train_step(mse_loss)

    def trained(n):
        model = make_mlp(0)
        state = loopkit.TrainState.create(model, _LateKeys(model.parameters(), lr=0.1))
        for batch in batches[:n]:
            state, _ = step(state, batch)
        return state

    early, late = trained(1), trained(4)
    for template, saved in ((trained(0), late), (late, early), (early, late)):
        before = take_snapshot(template)
        loaded = template.load_state_dict(saved.state_dict())
        assert_trees_equal(take_snapshot(template), before)  # (load_state_dict returns a new state)
        keys = {frozenset(entry) for entry in loaded.optimizer.state.values()}
        assert keys == {frozenset({"count", "slow"} if saved is late else {"count"})}
        assert_trees_equal(loaded.state_dict(), saved.state_dict())
        a, b = loaded, saved
        for batch in batches[4:]:  # (the early state gains its slow copies at its third update, here)
            a, _ = step(a, batch)
            b, _ = step(b, batch)
        assert_trees_equal(take_snapshot(a), take_snapshot(b))
        assert {frozenset(entry) for entry in a.optimizer.state.values()} == {frozenset({"count", "slow"})}


def test_gradient_hooks_on_parameters_run_in_pure_steps_and_after_load_state_dict(make_mlp, batches, mse_loss, assert_trees_equal):
    """A hook registered on a parameter (here: halve its gradient, count the accumulations) is part of the model."""

    def hooked(seed):
        model = make_mlp(seed)
        model[0].weight.register_hook(lambda g: g * 0.5)
        seen = []
        model[0].bias.register_post_accumulate_grad_hook(lambda p: seen.append(1))
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)), seen

    ref_model = make_mlp(0)
    ref_model[0].weight.register_hook(lambda g: g * 0.5)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for batch in batches[:3]:
        ref_opt.zero_grad()
        mse_loss(ref_model, batch).backward()
        ref_opt.step()

    state, seen = hooked(0)
    pure = loopkit.train_step(mse_loss)
    for batch in batches[:3]:
        state, _ = pure(state, batch)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert len(seen) == 3
    for copy in (True, False):  # into a template of its own hooks, and one whose tensors are taken over
        template, seen_after = hooked(1)
        sd = state.state_dict() if copy else {**state.state_dict(), "model": {k: v.clone() for k, v in state.model.state_dict().items()}}
        restored = template.load_state_dict(sd, copy=copy)
        restored, _ = loopkit.donate(pure)(restored, batches[3])
        expected, _ = pure(state, batches[3])
        assert_trees_equal(dict(restored.model.named_parameters()), dict(expected.model.named_parameters()))
        assert len(seen_after) == 1


def test_an_optimizer_whose_first_group_is_empty_trains(make_mlp, batches, mse_loss, assert_trees_equal):
    model, ref = make_mlp(0), make_mlp(0)
    opt = torch.optim.SGD([{"params": []}, {"params": model.parameters()}], lr=0.1)
    state, _ = loopkit.train_step(mse_loss)(loopkit.TrainState.create(model, opt), batches[0])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    mse_loss(ref, batches[0]).backward()
    ref_opt.step()
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.named_parameters()))


def test_a_fresh_template_still_refuses_adam_moments_of_another_shape(make_mlp, make_adam_state, batches, mse_loss, take_snapshot, assert_trees_equal):
    trained, _ = loopkit.train_step(mse_loss)(make_adam_state(make_mlp(0)), batches[0])
    sd = trained.state_dict()
    sd["optimizer"]["state"]["0"]["exp_avg"] = torch.zeros(5)  # e.g. parameters given to the optimizer in another order
    fresh = make_adam_state(make_mlp(1))
    before = take_snapshot(fresh)
    with pytest.raises(loopkit.StateMismatchError, match=r"mis-shaped key 'optimizer.state.0.exp_avg'.*\(5,\)"):
        fresh.load_state_dict(sd)
    assert_trees_equal(take_snapshot(fresh), before)


@pytest.mark.parametrize("optimizer, key, value", [
    (torch.optim.Adafactor, "row_var", torch.zeros(5, 1)),  # e.g. parameters given to the optimizer in another order
    (torch.optim.Adafactor, "col_var", torch.zeros(1, 9)),
    (torch.optim.Adam, "step", torch.zeros(3)),
])
def test_a_fresh_template_refuses_optimizer_state_of_another_shape_than_its_optimizer_keeps(
    make_mlp, batches, mse_loss, take_snapshot, assert_trees_equal, optimizer, key, value
):
    """The shapes a step of the optimizer gives its state (a probe over small stand-ins), not only the keys kept
    in the parameters' shape: these loaded, and the first step failed with a bare size mismatch."""

    def fresh(seed):
        model = make_mlp(seed)
        return loopkit.TrainState.create(model, optimizer(model.parameters()))

    trained, _ = loopkit.train_step(mse_loss)(fresh(0), batches[0])
    sd = trained.state_dict()
    expected = tuple(trained.optimizer.state[trained.model[0].weight][key].shape)
    sd["optimizer"]["state"]["0"][key] = value
    template = fresh(1)
    before = take_snapshot(template)
    shapes = re.escape(f"{tuple(value.shape)}, expected {expected}")
    with pytest.raises(loopkit.StateMismatchError, match=rf"mis-shaped key 'optimizer.state.0.{key}'.*{shapes}"):
        template.load_state_dict(sd)
    assert_trees_equal(take_snapshot(template), before)


class _SharedStats(nn.Module):
    """A buffer that is a view (a row) of another module's buffer, updated in place through the owner."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stats", torch.zeros(2, 4))
        self.reader = nn.Module()
        self.reader.register_buffer("row", self.stats[0])
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.stats[0].add_(x.mean(0))
        return self.lin(x + self.reader.row)


def test_a_buffer_that_is_a_view_of_another_stays_one_in_pure_steps_and_after_load_state_dict(round_trip, batches, mse_loss,
                                                                                              assert_trees_equal):
    def fresh():
        torch.manual_seed(0)
        model = _SharedStats()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ref, ref_opt = fresh()  # the raw loop
    for batch in batches[:4]:
        ref_opt.zero_grad()
        mse_loss(ref, batch).backward()
        ref_opt.step()
    step = loopkit.train_step(mse_loss)
    pure = loopkit.TrainState.create(*fresh())
    for batch in batches[:4]:
        pure, _ = step(pure, batch)
        assert pure.model.reader.row.data_ptr() == pure.model.stats.data_ptr()
    resumed = loopkit.TrainState.create(*fresh())
    for batch in batches[:2]:
        resumed, _ = step(resumed, batch)
    resumed = loopkit.TrainState.create(*fresh()).load_state_dict(round_trip(resumed.state_dict()))
    assert resumed.model.reader.row.data_ptr() == resumed.model.stats.data_ptr()
    for batch in batches[2:4]:
        resumed, _ = step(resumed, batch)
    for state in (pure, resumed):
        assert_trees_equal(dict(state.model.named_parameters()), dict(ref.named_parameters()))
        assert_trees_equal(state.model.stats, ref.stats)


def test_create_drops_gradients_the_model_holds_as_a_loop_that_zeroes_first(make_mlp, batches, mse_loss, assert_trees_equal):
    def with_stale_grads():
        model = make_mlp(0)
        mse_loss(model, (batches[0][0] * 100, batches[0][1])).backward()  # e.g. a gradient check of one's own
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ref, ref_opt = with_stale_grads()
    ref_opt.zero_grad()
    mse_loss(ref, batches[1]).backward()
    ref_opt.step()
    state = loopkit.TrainState.create(*with_stale_grads())
    assert all(p.grad is None for p in state.model.parameters())
    state, _ = loopkit.train_step(mse_loss)(state, batches[1])
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.named_parameters()))


def test_a_buffer_sliced_from_a_larger_tensor_the_state_does_not_hold_is_copied_alone():
    model = nn.Linear(2, 1)
    model.register_buffer("pe", torch.arange(1_000_000.0)[:4])  # its _base: a tensor no module holds
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    copied = fork(state).model.pe
    assert torch.equal(copied, model.pe) and copied.untyped_storage().nbytes() == 4 * 4


# --- models whose structure is more than parameters, buffers and children --------------------------


class _KeepsItsMethods(nn.Module):
    """Keeps a method of its own and one of a child as attributes (``self.impl = self._impl``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.impl, self.head = self._impl, self.b.forward

    def _impl(self, x):
        return torch.tanh(self.a(x))

    def forward(self, x):
        return self.head(self.impl(x))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


class _HeadsInADict(nn.Module):
    """Registered children also kept in a dict, a list and a functools.partial of a method."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.heads, self.layers = {"main": self.b}, [self.a]
        self.scaled = functools.partial(self._scaled, scale=2.0)

    def _scaled(self, x, scale):
        return torch.tanh(self.layers[0](x)) * scale

    def forward(self, x):
        return self.heads["main"](self.scaled(x))


class _Child(nn.Module):
    def __init__(self, parent):
        super().__init__()
        object.__setattr__(self, "parent", parent)  # a back-reference, not a registered child

    def forward(self, x):
        return x * self.parent.scale


class _WithStateOutsideTheRegistries(nn.Module):
    """A back-reference, a registered BatchNorm also kept in a plain list, a forward hook that is a method counting
    into a buffer, a plain tensor the forward updates in place and a generator of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.scale, self.norm = nn.Linear(4, 2), nn.Parameter(torch.ones(2)), nn.BatchNorm1d(2)
        self.child, self.norms = _Child(self), [self.norm]
        self.register_buffer("calls", torch.zeros(()))
        self.register_forward_hook(self._count)
        self.running, self.noise = torch.zeros(2), torch.Generator().manual_seed(5)
        self.cache = types.SimpleNamespace(total=torch.zeros(2), hits=0)  # an object of one's own holding a tensor

    def _count(self, module, inputs, output):
        self.calls.add_(1)

    def forward(self, x):
        y = self.norms[0](self.child(self.a(x + 0.01 * torch.randn(x.shape, generator=self.noise))))
        self.running.add_(y.detach().mean(0))
        self.cache.total.add_(1.0)
        self.cache.hits += 1
        return y + self.running + self.cache.total


def _mlp_with(change):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    change(model[0])
    return model


_STRUCTURES = {
    "bound methods": _KeepsItsMethods,
    "children in a dict, a list and a partial": _HeadsInADict,
    "state outside the registries": _WithStateOutsideTheRegistries,
    "tied weights": _Tied,
    "orthogonal parametrization": lambda: _mlp_with(nn.utils.parametrizations.orthogonal),
    "weight_norm parametrization": lambda: _mlp_with(nn.utils.parametrizations.weight_norm),
    "spectral_norm parametrization": lambda: _mlp_with(nn.utils.parametrizations.spectral_norm),
    "LSTM": lambda: _Sequence(nn.LSTM(4, 4, batch_first=True)),
    "TransformerEncoder": lambda: _Sequence(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 2)),
}


class _Sequence(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, nn.Linear(4, 2)

    def forward(self, x):
        out = self.body(x.view(-1, 2, 2).repeat(1, 1, 2))
        return self.head((out[0] if isinstance(out, tuple) else out)[:, -1])


@pytest.mark.parametrize("structure", list(_STRUCTURES))
def test_pure_steps_train_the_copy_of_any_module_structure_as_a_raw_loop_trains_the_model(structure, take_snapshot,
                                                                                             assert_trees_equal):
    """Reference: a raw Adam loop on the model. A method kept as an attribute stayed bound to the original module
    in the copy: a pure step trained the input state's model."""
    make = _STRUCTURES[structure]
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(4)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    torch.manual_seed(0)
    raw_model = make()
    raw = torch.optim.Adam(raw_model.parameters(), lr=0.01)
    for batch in batches:
        loss(raw_model, batch).backward()
        raw.step()
        raw.zero_grad()
    torch.manual_seed(0)
    model = make()
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01))
    before = take_snapshot(state)
    current = state
    for batch in batches:
        current, _ = loopkit.train_step(loss)(current, batch)
    assert_trees_equal(take_snapshot(state), before)
    assert current.model.state_dict().keys() == raw_model.state_dict().keys()
    for (name, p), q in zip(current.model.state_dict().items(), raw_model.state_dict().values()):
        assert torch.equal(p, q), name
    if hasattr(raw_model, "running"):  # (what no state dict holds: copied too, as deepcopy copies it)
        assert_trees_equal(state.model.running, torch.zeros(2))
        assert_trees_equal(current.model.running, raw_model.running)
        assert current.model.norms[0] is current.model.norm
        assert (state.model.cache.hits, current.model.cache.hits) == (0, 4)
        assert_trees_equal(current.model.cache.total, raw_model.cache.total)


def test_a_large_container_on_a_module_is_shared_by_its_copy_and_a_small_one_copied():
    """A vocabulary of 100k words copied at every pure step cost milliseconds, and a frozen teacher outside the
    model as much as the model; a list a forward appends to, small, and a long list of the model's blocks are the
    copy's own (the given state's stays as it was)."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.vocabulary, self.seen = {f"w{i}": i for i in range(1000)}, []

        def forward(self, x):
            self.seen.append(len(self.seen))
            return self.a(x)

    model = Tagger()
    model.teacher = [nn.Linear(4, 2).requires_grad_(False)]  # outside the model's tree (not in its parameters)
    model.blocks = [model.a] * 65  # large, but of modules: the copy's own
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = loopkit.train_step(lambda m, b: m(b).pow(2).mean())(state, torch.randn(8, 4))
    assert new.model.vocabulary is model.vocabulary and new.model.teacher[0] is model.teacher[0]
    assert model.seen == [] and new.model.seen == [0]
    assert all(block is new.model.a for block in new.model.blocks) and model.a.weight.grad is None


class _Holder:
    """An object of one's own holding a module (as a cache might): a copy looks into it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


def _reached(model: nn.Module, path: str) -> Any:
    """What ``path`` (``"<module>.<attribute>.<key or index>..."``, as shared_modules names it) reaches in ``model``."""
    value: Any = model
    for part in path.split("."):
        if isinstance(value, nn.Module) and part in value._modules:
            value = value._modules[part]
        elif isinstance(value, (list, tuple)):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value[part]
        else:
            value = getattr(value, part)
    return value


def test_shared_modules_names_the_modules_a_copy_shares_and_no_other():
    """What check_purity compares of the modules a pure step's copy shares: each module kept outside the registered
    tree (in a list, a dict, a nested list, an object of one's own, on a submodule too) is named by where it sits,
    and is the original in fork's copy (the reference: fork itself); a registered module also kept in a list (a
    back-reference) is the copy's own and not named."""
    from loopkit.state import shared_modules

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model.teacher = [nn.Linear(3, 3)]
    model.norms = {"bn": nn.BatchNorm1d(3)}
    model[1].nested = [[nn.LayerNorm(3)]]
    model.cache = _Holder(nn.Linear(1, 1))
    model.blocks = [model[0], model[1], model.teacher[0]]  # (the teacher reached twice: named once, first place)
    model.vocabulary = {f"w{i}": i for i in range(100)}
    found = shared_modules(model)
    assert sorted(found) == ["1.nested.0.0", "cache.module", "norms.bn", "teacher.0"]
    copied = fork(loopkit.TrainState.create(model)).model
    for name, module in found.items():
        assert _reached(model, name) is module and _reached(copied, name) is module, name
    assert copied.blocks[0] is copied[0] and copied.blocks[0] is not model[0]


_Stats = collections.namedtuple("_Stats", "mean count")


class _MyList(list):
    pass


class _MyTuple(tuple):
    pass


@pytest.mark.parametrize("holder", [
    lambda a, b: _Stats(a, b),
    lambda a, b: collections.deque([a, b], maxlen=4),
    lambda a, b: _MyList([a, b]),
    lambda a, b: _MyTuple((a, b)),
], ids=["namedtuple", "deque", "list subclass", "tuple subclass"])
def test_tensors_a_module_caches_in_a_namedtuple_deque_or_subclass_are_copied_for_a_pure_step(holder):
    """Only a plain list or tuple attribute was copied: a namedtuple's, a deque's or a subclass's tensors were
    shared, and the pure step's forward counted into the caller's model. Reference: the raw loop on a model of its
    own; the copy's container is of the original's type (a deque with its maxlen)."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 1)
            self.stats = holder(torch.zeros(1), torch.zeros(1))

        def forward(self, x):
            self.stats[1].add_(1)  # a counter cached as a module attribute, updated in place
            return self.fc(x)

    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    batch = torch.ones(4, 2)
    torch.manual_seed(0)
    raw_model = Counting()
    raw = torch.optim.SGD(raw_model.parameters(), lr=0.1)
    for _ in range(3):
        raw.zero_grad()
        loss(raw_model, batch).backward()
        raw.step()
    torch.manual_seed(0)
    model = Counting()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    current = state
    for _ in range(3):
        current, _ = loopkit.train_step(loss)(current, batch)
    assert float(state.model.stats[1]) == 0.0 and float(current.model.stats[1]) == float(raw_model.stats[1]) == 3.0
    assert type(current.model.stats) is type(model.stats) and current.model.stats[1] is not model.stats[1]
    assert getattr(current.model.stats, "maxlen", None) == getattr(model.stats, "maxlen", None)
    assert torch.equal(current.model.fc.weight, raw_model.fc.weight)


class _Tagged(list):
    """A list subclass with an instance attribute of its own."""


class _Window(list):
    """A list subclass whose constructor takes another argument than its items."""

    def __init__(self, maxlen):
        super().__init__()
        self.maxlen = maxlen


class _HW(tuple):
    """A tuple subclass whose constructor takes its items one by one."""

    def __new__(cls, h, w):
        return super().__new__(cls, (h, w))

    def __reduce__(self):
        return (_HW, tuple(self))


class _Holding(nn.Module):
    def __init__(self, item):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.names = _Tagged(["a", item])
        self.names.source = "vocab.txt"
        self.window = _Window(3)
        self.window.append(item)
        self.patch = _HW(2, item)

    def forward(self, x):
        assert self.names.source == "vocab.txt"
        self.window.append(0)
        del self.window[1:-self.window.maxlen]
        return self.fc(x)


@pytest.mark.parametrize("item", ["b", "tensor"])
def test_list_and_tuple_subclasses_of_ones_own_survive_a_pure_step(item):
    """Fork rebuilt every list or tuple subclass from its items (type(x)(items)): a list subclass lost its instance
    attributes or had its __init__ given the items, a tuple subclass whose __new__ takes its items one by one
    failed. Holding no tensor, each is shared (as before); holding one, a list subclass is copied as copy.deepcopy
    copies it (the reference: its type, attributes, items), and a tuple subclass that cannot be rebuilt from its
    items is shared."""
    torch.manual_seed(0)
    model = _Holding(torch.zeros(1) if item == "tensor" else item)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    reference = copy.deepcopy(model)
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    current = state
    for _ in range(2):
        current, _ = step(current, torch.ones(2, 2))
    copied = current.model
    for name in ("names", "window"):
        mine, theirs = getattr(copied, name), getattr(reference, name)
        assert type(mine) is type(theirs) and mine.__dict__ == theirs.__dict__
    assert copied.names[:1] == ["a"] and copied.patch == model.patch and type(copied.patch) is _HW
    if item == "tensor":
        assert copied.names is not model.names and copied.names[1] is not model.names[1]
        assert copied.window is not model.window and model.window == [model.window[0]]
        assert copied.patch is model.patch
    else:
        assert copied.names is model.names and copied.window is model.window and copied.patch is model.patch


def _seeded_batches(width):
    return [torch.randn(4, width, generator=torch.Generator().manual_seed(k)) for k in range(3)]


def _raw_trained(optimizer_class, width, batches):
    """The reference: ``nn.Linear(width, 1)`` made after ``manual_seed(0)``, trained on ``batches`` by a raw loop with
    ``optimizer_class(lr=0.1)`` on the mean square of its output; the model and the optimizer."""
    torch.manual_seed(0)
    model = nn.Linear(width, 1)
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        _squares(model, batch).backward()
        optimizer.step()
    return model, optimizer


def test_a_namedtuple_in_the_optimizers_state_is_copied_for_a_pure_step():
    """An optimizer keeping a namedtuple of tensors per parameter: the copy rebuilt it as type(t)(generator), which
    a namedtuple refuses (a TypeError at the second step). Reference: the raw loop."""
    Moments = collections.namedtuple("Moments", "m v")

    class MomentsSGD(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                old = self.state[p].get("moments", Moments(torch.zeros_like(p), torch.zeros_like(p)))
                self.state[p]["moments"] = Moments(old.m * 0.9 + p.grad, old.v * 0.99 + p.grad ** 2)
                p.sub_(0.1 * self.state[p]["moments"].m)

    loss, batches = _squares, _seeded_batches(2)
    raw_model, raw = _raw_trained(MomentsSGD, 2, batches)
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, MomentsSGD(model.parameters(), lr=0.1))
    current = state
    for batch in batches:
        current, _ = loopkit.train_step(loss)(current, batch)
    moments = current.optimizer.state[current.model.weight]["moments"]
    assert type(moments) is Moments and torch.equal(moments.v, raw.state[raw_model.weight]["moments"].v)
    assert torch.equal(current.model.weight, raw_model.weight) and not state.optimizer.state


def test_a_wrapper_optimizers_inner_optimizer_is_copied_for_a_pure_step():
    """A Lookahead/SAM-style optimizer holding another: the copy's inner optimizer stepped the original's parameters
    (without gradients): a pure step trained nothing. Reference: the raw loop."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):
            self.inner, self.param_groups, self.defaults = inner, inner.param_groups, inner.defaults
            self.state = collections.defaultdict(dict)
            for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                         "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                         "_optimizer_load_state_dict_post_hooks"):
                setattr(self, name, collections.OrderedDict())

        def step(self, closure=None):
            self.inner.step()

        def zero_grad(self, set_to_none=True):
            self.inner.zero_grad(set_to_none)

    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(3)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    torch.manual_seed(0)
    raw_model = nn.Linear(4, 2)
    raw = Wrapper(torch.optim.Adam(raw_model.parameters(), lr=0.01))
    for batch in batches:
        loss(raw_model, batch).backward()
        raw.step()
        raw.zero_grad()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    state = loopkit.TrainState.create(model, Wrapper(torch.optim.Adam(model.parameters(), lr=0.01)))
    for batch in batches:
        new, _ = loopkit.train_step(loss)(state, batch)
        assert new.optimizer.inner.param_groups is new.optimizer.param_groups  # shared, as in the original
        state = new
    assert torch.equal(state.model.weight, raw_model.weight) and torch.equal(state.model.bias, raw_model.bias)


def test_an_optimizers_own_data_outside_its_state_is_copied_for_a_pure_step(take_snapshot, assert_trees_equal):
    """An optimizer keeping a tensor counter and a history list as attributes: the copy shared them, so pure
    calls advanced the given state's. Reference: the raw loop, and a second pure call from the same state."""

    class WarmSGD(torch.optim.SGD):
        def __init__(self, params, lr):
            super().__init__(params, lr=lr)
            self.t = torch.zeros(())
            self.history: list[float] = []

        @torch.no_grad()
        def step(self, closure=None):
            self.t += 1
            self.history.append(float(self.t))
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"] * min(1.0, float(self.t) / 10))

    loss, batches = _squares, _seeded_batches(3)
    raw_model, raw = _raw_trained(WarmSGD, 3, batches)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, WarmSGD(model.parameters(), lr=0.1))
    step = loopkit.train_step(loss)
    first, _ = step(state, batches[0])
    again, _ = step(state, batches[0])
    assert float(state.optimizer.t) == 0 and state.optimizer.history == []
    assert torch.equal(first.model.weight, again.model.weight)
    for batch in batches[1:]:
        first, _ = step(first, batch)
    assert torch.equal(first.model.weight, raw_model.weight) and first.optimizer.history == raw.history == [1.0, 2.0, 3.0]


def test_attributes_set_on_parameters_survive_a_pure_step_as_a_donated_one(mse_loss, batches):
    """Tags a user sets on parameters (``no_decay``): a Parameter subclass's were dropped by the pure copy."""

    class TaggedParameter(nn.Parameter):
        pass

    def build():
        model = nn.Sequential(nn.Linear(4, 2))
        model[0].weight = TaggedParameter(model[0].weight.detach().clone())
        model[0].weight.no_decay = True
        model[0].bias.no_decay = False
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    donated, _ = loopkit.donate(loopkit.train_step(mse_loss))(build(), batches[0])
    pure, _ = loopkit.train_step(mse_loss)(build(), batches[0])
    for state in (donated, pure):
        assert type(state.model[0].weight) is not nn.Parameter and isinstance(state.model[0].weight, nn.Parameter)
        assert (state.model[0].weight.no_decay, state.model[0].bias.no_decay) == (True, False)


def test_a_torchscript_model_is_refused_where_it_would_be_copied_and_saved_where_it_trains_donated():
    """A scripted or traced module's parameters live in C++: a copy of its wrapper trained the original's."""
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    for make in (lambda: torch.jit.script(nn.Linear(4, 2)), lambda: torch.jit.trace(nn.Linear(4, 2), torch.randn(1, 4)),
                 lambda: nn.Sequential(torch.jit.script(nn.Linear(4, 2)))):
        model = make()
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
        before = copy.deepcopy(state.state_dict())
        with pytest.raises(TypeError, match="cannot copy the TorchScript module .* script it after training"):
            loopkit.train_step(loss)(state, torch.randn(8, 4))
        assert all(p.grad is None for p in model.parameters())
        assert_equal_trees(state.state_dict()["model"], before["model"])
        trained, _ = loopkit.donate(loopkit.train_step(loss))(state, torch.randn(8, 4))
        assert set(trained.state_dict()["model"]) == set(before["model"])  # (its state dict: for a checkpoint)
        template = make()
        with pytest.raises(TypeError, match="cannot copy the TorchScript module"):
            loopkit.TrainState.create(template, torch.optim.SGD(template.parameters(), lr=0.1)).load_state_dict(
                trained.state_dict())


def test_a_model_prepared_for_qat_by_hand_resumes_its_per_channel_scales():
    """prepare_qat's fake-quantizers resize their scales on load ((1,) before the first forward, then one per
    channel): the state dict was refused as mis-shaped, though torch's own load takes it."""
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model.qconfig = get_default_qat_qconfig("x86")
        model = prepare_qat(model.train())
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    batches = [torch.randn(8, 4) for _ in range(4)]
    uninterrupted = fresh()
    for k, batch in enumerate(batches):
        uninterrupted, _ = loopkit.donate(loopkit.train_step(loss))(uninterrupted, batch)
        if k == 1:
            saved = through_a_file(uninterrupted.state_dict())
    resumed = fresh().load_state_dict(saved)
    for batch in batches[2:]:
        resumed, _ = loopkit.donate(loopkit.train_step(loss))(resumed, batch)
    assert_equal_trees(resumed.state_dict(), uninterrupted.state_dict())
    with pytest.raises(loopkit.StateMismatchError, match=r"mis-shaped key 'model.0.weight'"):  # others still refused
        fresh().load_state_dict({**saved, "model": {**saved["model"], "0.weight": torch.zeros(3, 4)}})


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_a_qat_state_dict_loaded_into_an_unprepared_model_says_to_prepare_the_template(fused):
    """A with_qat checkpoint's model holds fake-quantizers and observers that an unprepared template lacks (an
    unexpected key; a fused Conv-BN-ReLU's renamed weight, a missing one): the error says to restore into
    ``step.prepare(template)``; a template that lacks nothing QAT-like gets the bare mismatch."""
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).train()
        return fuse_modules_qat(net, [["0", "1", "2"]]) if fused else net

    prepared = model()
    prepared.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(prepared, inplace=True)
    saved = loopkit.TrainState.create(prepared).state_dict()
    with pytest.raises(loopkit.StateMismatchError, match=re.escape("restore(step.prepare(template), directory)")):
        loopkit.TrainState.create(model()).load_state_dict(saved)
    plain = loopkit.TrainState.create(model()).state_dict()
    with pytest.raises(loopkit.StateMismatchError, match=r"unexpected key 'model.extra'$"):
        loopkit.TrainState.create(model()).load_state_dict({**plain, "model": {**plain["model"], "extra": torch.ones(1)}})



@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_a_plain_state_dict_loaded_into_a_prepared_model_says_to_load_the_unprepared_template(fused):
    """The reverse: a state dict without fake-quantizers and observers (a plain run's, or one saved before with_qat's
    first call) into a prepared template (missing keys; a fused Conv-BN-ReLU's weights under other names): the error
    says to load it into the unprepared template, which with_qat prepares; a QAT state dict that does not fit either
    gets the bare mismatch."""
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    def model(prepared):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).train()
        net = fuse_modules_qat(net, [["0", "1", "2"]]) if fused else net
        if prepared:
            net.qconfig = get_default_qat_qconfig("x86")
            prepare_qat(net, inplace=True)
        return net

    saved = loopkit.TrainState.create(model(False)).state_dict()
    with pytest.raises(loopkit.StateMismatchError, match=r"key 'model\.0\..*not prepared for quantization-aware training"
                       r".*load it into the unprepared template: loopkit\.restore\(template, directory\)"):
        loopkit.TrainState.create(model(True)).load_state_dict(saved)
    qat = loopkit.TrainState.create(model(True)).state_dict()
    with pytest.raises(loopkit.StateMismatchError, match=r"unexpected key 'model.extra'$"):
        loopkit.TrainState.create(model(True)).load_state_dict({**qat, "model": {**qat["model"], "extra": torch.ones(1)}})

# --- schedulers of every kind: purity and exact resume against a raw loop ---------------------------


class _Warmup:
    """An ``lr_lambda`` object with state of its own (LambdaLR's state dict holds its ``__dict__``)."""

    def __init__(self, steps):
        self.steps, self.calls = steps, 0

    def __call__(self, epoch):
        self.calls += 1
        return min(1.0, (epoch + 1) / self.steps)


class _KeepsHistory(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler of one's own whose state grows: a list of the epochs it saw."""

    def __init__(self, optimizer):
        self.seen = []
        super().__init__(optimizer)

    def get_lr(self):
        self.seen.append(self.last_epoch)
        return [lr * 0.9 ** self.last_epoch for lr in self.base_lrs]


class _WarmupThen(torch.optim.lr_scheduler.LRScheduler):
    """GradualWarmup's pattern: a scheduler of one's own that steps another it holds once warmed up."""

    def __init__(self, optimizer, after, steps=3):
        self.after, self.steps = after, steps
        super().__init__(optimizer)

    def get_lr(self):
        return [lr * min(1.0, (self.last_epoch + 1) / self.steps) for lr in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch + 1 < self.steps:
            return super().step(epoch)
        self.last_epoch += 1
        self.after.step()
        self._last_lr = self.after.get_last_lr()

    def state_dict(self):
        return {**{k: v for k, v in self.__dict__.items() if k not in ("optimizer", "after")},
                "after": self.after.state_dict()}

    def load_state_dict(self, state_dict):
        self.after.load_state_dict(state_dict["after"])
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "after"})


class _Memoizing:
    """An ``lr_lambda`` (or CyclicLR ``scale_fn``) object whose state grows: a memo of the factors it computed."""

    def __init__(self, steps):
        self.steps, self.cache = steps, {}

    def __call__(self, x):
        if x not in self.cache:
            self.cache[x] = min(1.0, (x + 1) / self.steps)
        return self.cache[x]


class _MemoFromScratch:
    """An ``lr_lambda`` whose memo is empty when it is made (LambdaLR's first call, at 0, stores nothing): its keys
    are ints, which a checkpoint saves as strings."""

    def __init__(self):
        self.memo = {}

    def __call__(self, s):
        if s == 0:
            return 1.0
        self.memo[s] = self.memo.get(s - 1, 1.0) * 0.9
        return self.memo[s]


def test_a_memo_keyed_by_numbers_that_afresh_state_holds_empty_is_refused_rather_than_guessed(tmp_path):
    """Its keys came back as strings: the resumed schedule silently read an empty memo (lr 0.81 where the
    uninterrupted run has 0.59049)."""
    def made():
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        return loopkit.TrainState.create(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _MemoFromScratch()))

    state = made()
    for _ in range(3):
        state, _ = loopkit.train_step(lambda m, b: m(b).sum())(state, torch.ones(2, 2))
    loopkit.checkpoint.save(state, tmp_path)
    with pytest.raises(loopkit.StateMismatchError, match=r"key 'scheduler\.lr_lambdas\.0\.memo' holds entries "
                                                         r"numbered 1, 2, 3, which this state's, made empty, cannot tell"):
        loopkit.restore(made(), tmp_path)


class _PicksItsMethod(torch.optim.lr_scheduler.LRScheduler):
    """OneCycleLR's pattern in a scheduler of one's own: the annealing function, a bound method, picked at
    construction."""

    def __init__(self, optimizer, steps, strategy="linear"):
        self.steps = steps
        self.anneal = self._linear if strategy == "linear" else self._square
        super().__init__(optimizer)

    def _linear(self):
        return min(1.0, (self.last_epoch + 1) / self.steps)

    def _square(self):
        return min(1.0, ((self.last_epoch + 1) / self.steps) ** 2)

    def get_lr(self):
        return [lr * self.anneal() for lr in self.base_lrs]

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "anneal")}


class _RunsAList(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler of one's own stepping the schedulers it keeps in a list (as ChainedScheduler does)."""

    def __init__(self, optimizer, inner):
        self.inner = []  # (none stepped by the initial step LRScheduler makes: each made its own)
        super().__init__(optimizer)
        self.inner = list(inner)

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, epoch=None):
        for scheduler in self.inner:
            scheduler.step()
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"inner": [s.state_dict() for s in self.inner], "_last_lr": self._last_lr}

    def load_state_dict(self, state_dict):
        for scheduler, saved in zip(self.inner, state_dict["inner"]):
            scheduler.load_state_dict(saved)
        self._last_lr = state_dict["_last_lr"]


_LR = torch.optim.lr_scheduler
_SCHEDULERS = {
    "StepLR": lambda o: _LR.StepLR(o, 3, 0.5),
    "MultiStepLR": lambda o: _LR.MultiStepLR(o, [2, 5, 5]),
    "CosineAnnealingWarmRestarts": lambda o: _LR.CosineAnnealingWarmRestarts(o, 3, 2),
    "OneCycleLR": lambda o: _LR.OneCycleLR(o, 1.0, total_steps=10),
    "CyclicLR": lambda o: _LR.CyclicLR(o, 0.01, 0.1, step_size_up=2, mode="triangular2"),
    "LambdaLR of an object": lambda o: _LR.LambdaLR(o, _Warmup(4)),
    "MultiplicativeLR of a lambda": lambda o: _LR.MultiplicativeLR(o, lambda epoch: 0.95),
    "SequentialLR into MultiStepLR": lambda o: _LR.SequentialLR(
        o, [_LR.LinearLR(o, 0.1, total_iters=3), _LR.MultiStepLR(o, [2, 4])], milestones=[3]),
    "ChainedScheduler": lambda o: _LR.ChainedScheduler([_LR.ConstantLR(o, 0.5, total_iters=2), _LR.ExponentialLR(o, 0.9)]),
    "a scheduler of one's own with a growing list": _KeepsHistory,
    "a warm-up of one's own holding the next scheduler": lambda o: _WarmupThen(o, _LR.StepLR(o, 2, 0.5)),
    "LambdaLR of an object memoizing its factors": lambda o: _LR.LambdaLR(o, _Memoizing(6)),
    "CyclicLR of a scale_fn object memoizing": lambda o: _LR.CyclicLR(
        o, 0.01, 0.1, step_size_up=2, scale_fn=_Memoizing(5), scale_mode="iterations"),
    "a scheduler of one's own picking its method at construction": lambda o: _PicksItsMethod(o, 6),
    "a scheduler of one's own stepping those in its list": lambda o: _RunsAList(o, [_LR.ExponentialLR(o, 0.5)]),
}


def _scheduled(make, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, make(optimizer)


@pytest.mark.parametrize("kind", list(_SCHEDULERS))
def test_every_kind_of_scheduler_stays_pure_and_resumes_exactly_as_a_raw_loop_runs(kind, assert_trees_equal, round_trip):
    """Reference: a raw loop (backward, step, scheduler.step, zero_grad). A restored MultiStepLR's milestones came
    back a dict (SequentialLR then failed at its milestone); an lr_lambda object and a custom scheduler's list
    were shared with the given state (a pure step changed them; loading changed the template's); a list that grew
    was refused on load, and so was an lr_lambda's (or scale_fn's) memo that grew ("unexpected key
    'scheduler.lr_lambdas.0.cache.1'"). A method a scheduler of one's own picked at construction stayed bound to a
    deep copy of the original (its last_epoch frozen), and inner schedulers it kept in a list stepped a stray copy
    of the optimizer (the rate never changed), in pure steps and after loading alike."""
    make = _SCHEDULERS[kind]
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(8)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    model, optimizer, scheduler = _scheduled(make)
    for batch in batches:
        loss(model, batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = loopkit.TrainState.create(*_scheduled(make))
    for batch in batches[:2]:  # (saved before SequentialLR hands over to its MultiStepLR, at step 3)
        before = copy.deepcopy(state.scheduler.state_dict())
        new, _ = loopkit.train_step(loss)(state, batch)
        assert_trees_equal(state.scheduler.state_dict(), before)
        state = new
    template = loopkit.TrainState.create(*_scheduled(make, seed=1))
    untouched = copy.deepcopy(template.scheduler.state_dict())
    resumed = template.load_state_dict(round_trip(state.state_dict()))
    assert_trees_equal(template.scheduler.state_dict(), untouched)
    for batch in batches[2:]:
        resumed, _ = loopkit.donate(loopkit.train_step(loss))(resumed, batch)
    assert_trees_equal(resumed.scheduler.state_dict(), scheduler.state_dict())
    assert torch.equal(resumed.model.weight, model.weight) and torch.equal(resumed.model.bias, model.bias)
    assert resumed.scheduler.get_last_lr() == scheduler.get_last_lr()


def test_the_backbone_finetuning_recipe_run_not_donated_leaves_the_given_schedulers_lists_as_they_were(
        assert_trees_equal):
    """docs/from_lightning.md's BackboneFinetuning recipe appends the new group's rate to ``scheduler.base_lrs``. A
    copy of torch's own scheduler shared its lists with the original, so run_epochs(donate=False) appended to the
    given state's: it then had more base_lrs than groups and could not step. References: the same run donated, and
    a raw loop's first update for the given state's next step."""
    def parts():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        model[0].requires_grad_(False)
        optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
        return model, optimizer, _LR.LambdaLR(optimizer, lambda epoch: 0.9 ** epoch)

    class Unfreeze(loopkit.Callback):
        def on_epoch_start(self, state):
            if state.epoch == 1:
                state.model[0].requires_grad_(True)
                state.optimizer.add_param_group({"params": list(state.model[0].parameters()), "lr": 0.01})
                state.scheduler.base_lrs.append(0.01)
                state.scheduler.lr_lambdas.append(lambda epoch: 1.0)

    batches = [(torch.randn(4, 4, generator=torch.Generator().manual_seed(i)), torch.ones(4, 1)) for i in range(3)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    given = loopkit.TrainState.create(*parts())
    before = copy.deepcopy(given.scheduler.state_dict())
    fit = functools.partial(loopkit.run_epochs, loopkit.train_step(loss), train_data=batches, epochs=2,
                            callbacks=[Unfreeze()], progress=False)
    kept, _ = fit(given, donate=False)
    donated, _ = fit(loopkit.TrainState.create(*parts()))
    assert_trees_equal(kept.state_dict(), donated.state_dict())
    assert_trees_equal(given.scheduler.state_dict(), before)
    model, optimizer, scheduler = parts()
    loss(model, batches[0]).backward()
    optimizer.step()
    scheduler.step()
    stepped, _ = loopkit.train_step(loss)(given, batches[0])
    assert torch.equal(stepped.model[2].weight, model[2].weight)
    assert stepped.scheduler.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("copied", ["fork", "deepcopy", "pickle"])
def test_a_held_scheduler_steps_nothing_is_its_scheduler_otherwise_and_copies_as_a_held_copy(copied):
    """A scheduler transform's inner state holds its scheduler in a HeldScheduler: step() does nothing, the rest is the
    scheduler's (isinstance checks of its class included); a copy of such a state (a pure step's fork, a deepcopy, a
    pickle's round trip) holds a held copy of the scheduler, which steps the copy's optimizer, the original's left as
    it was."""
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)
    state = loopkit.TrainState.create(model, opt, scheduler)
    held = loopkit.state.HeldScheduler(scheduler)
    inner = loopkit.state.replace(state, scheduler=held)
    held.step()
    assert (scheduler.last_epoch, held.last_epoch, held.get_last_lr(), opt.param_groups[0]["lr"]) == (0, 0, [1.0], 1.0)
    assert held.state_dict() == scheduler.state_dict() and held.optimizer is opt
    assert held.milestones is scheduler.milestones  # (its own attributes too)
    assert isinstance(held, torch.optim.lr_scheduler.LRScheduler) and isinstance(held, loopkit.state.HeldScheduler)
    assert isinstance(held, torch.optim.lr_scheduler.MultiStepLR) and held.__class__ is type(scheduler)
    assert not isinstance(held, (torch.optim.lr_scheduler.StepLR, torch.optim.lr_scheduler.ReduceLROnPlateau))
    assert type(held) is loopkit.state.HeldScheduler and not isinstance(scheduler, loopkit.state.HeldScheduler)
    assert inner.evolve(model=model, step=1).scheduler is held  # (evolve's checks take it: it steps the optimizer)
    assert loopkit.state.with_held_scheduler(inner).scheduler is scheduler
    copy_ = {"fork": fork, "deepcopy": copy.deepcopy, "pickle": lambda s: pickle.loads(pickle.dumps(s))}[copied](inner)
    twin = loopkit.state.held_scheduler(copy_.scheduler)
    assert type(copy_.scheduler) is loopkit.state.HeldScheduler and type(twin) is torch.optim.lr_scheduler.MultiStepLR
    assert isinstance(copy_.scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert twin is not scheduler and twin.optimizer is copy_.optimizer and twin.state_dict() == scheduler.state_dict()
    copy_.scheduler.step()
    assert twin.last_epoch == 0
    copy_.optimizer.step()  # (no gradients: nothing changes; torch's schedulers warn of a step before it)
    twin.step()
    assert (twin.last_epoch, copy_.optimizer.param_groups[0]["lr"]) == (1, 0.5)
    assert (scheduler.last_epoch, opt.param_groups[0]["lr"], dict(scheduler.milestones)) == (0, 1.0, {1: 1, 2: 1})


@pytest.mark.parametrize("copied", ["fork", "deepcopy", "pickle"])
def test_a_scheduler_held_unshown_stays_held_for_a_gradient_hook_and_in_its_copies(copied):
    """with_swa holds the scheduler with shown=False in SWA epochs (SWALR sets the rates): with_held_scheduler, what a
    gradient hook's fn sees, leaves it held (its step() does nothing); a copy of the state holds it so too."""
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    inner = loopkit.state.replace(loopkit.TrainState.create(model, opt, scheduler),
                                  scheduler=loopkit.state.HeldScheduler(scheduler, shown=False))
    assert loopkit.state.with_held_scheduler(inner) is inner
    copy_ = {"fork": fork, "deepcopy": copy.deepcopy, "pickle": lambda s: pickle.loads(pickle.dumps(s))}[copied](inner)
    assert type(copy_.scheduler) is loopkit.state.HeldScheduler and loopkit.state.with_held_scheduler(copy_) is copy_
    shown = loopkit.state.replace(copy_, scheduler=loopkit.state.HeldScheduler(loopkit.state.held_scheduler(copy_.scheduler)))
    assert loopkit.state.with_held_scheduler(shown).scheduler is loopkit.state.held_scheduler(copy_.scheduler)


@pytest.mark.parametrize("copied", ["deepcopy", "pickle"])
def test_a_held_reduce_lr_on_plateau_is_one_to_isinstance_and_steps_nothing_on_a_metric(copied):
    """Lightning's ``isinstance(sch, ReduceLROnPlateau): sch.step(metric)`` on a held one: True, and the step does
    nothing (a state does not take one, a scheduler transform never holds one: the class is what the check sees); a
    copy is a held copy."""
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    held = loopkit.state.HeldScheduler(scheduler)
    assert isinstance(held, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert not isinstance(held, torch.optim.lr_scheduler.StepLR) and type(held) is loopkit.state.HeldScheduler
    for metric in (1.0, 2.0, 3.0):
        held.step(metric)
    assert (scheduler.num_bad_epochs, opt.param_groups[0]["lr"]) == (0, 1.0)
    copy_ = copy.deepcopy(held) if copied == "deepcopy" else pickle.loads(pickle.dumps(held))
    twin = loopkit.state.held_scheduler(copy_)
    assert type(copy_) is loopkit.state.HeldScheduler and type(twin) is torch.optim.lr_scheduler.ReduceLROnPlateau
    assert twin is not scheduler and twin.state_dict() == scheduler.state_dict()


def test_a_checkpoint_of_torchs_own_scheduler_of_another_structure_is_refused():
    """Lists may change length in the state dict of a scheduler of one's own only: a SequentialLR of three
    schedulers loaded into one of two raised IndexError from torch, into one of four loaded silently."""

    def sequential(n):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        parts = [_LR.ConstantLR(optimizer, 0.5, total_iters=1) for _ in range(n)]
        return loopkit.TrainState.create(model, optimizer, _LR.SequentialLR(optimizer, parts, list(range(1, n))))

    saved = sequential(3).state_dict()
    for n in (2, 4):
        with pytest.raises(loopkit.StateMismatchError, match="scheduler"):
            sequential(n).load_state_dict(saved)


def test_a_pure_steps_copy_keeps_a_modules_many_hooks_its_tensors_leaves_and_views_its_own():
    """A module with more than 64 hooks shared its registry with the copy; a plain tensor that requires grad was
    copied as a non-leaf tied to the original (gradients reached it); a view kept of another plain tensor stayed
    one only when the set of attribute names happened to list its base first."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.alpha = torch.ones(2, requires_grad=True)  # a plain tensor, not a Parameter
            self.full = torch.zeros(4)
            self.part = self.full[:2]
            for _ in range(65):
                self.register_forward_hook(lambda module, inputs, output: None)

        def forward(self, x):
            self.part.add_(1.0)
            return self.a(x) * self.alpha

    model = Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = loopkit.train_step(lambda m, b: m(b).pow(2).mean())(state, torch.randn(8, 4))
    new.model.register_forward_hook(lambda module, inputs, output: None)
    assert len(model._forward_hooks) == 65 and len(new.model._forward_hooks) == 66
    assert model.alpha.grad is None and new.model.alpha.is_leaf and new.model.alpha.grad is not None
    assert torch.equal(model.full, torch.zeros(4)) and new.model.full.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_a_copy_or_pickle_of_an_lbfgs_state_steps_as_the_state_does():
    """torch's own copy of an LBFGS leaves out the parameter list it keeps aside: the copy's step raised."""
    import pickle

    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.LBFGS(model.parameters(), max_iter=3))
    batch = torch.ones(3, 2)
    copies = [copy.deepcopy(state), pickle.loads(pickle.dumps(state))]
    expected, _ = loopkit.train_step(loss)(state, batch)
    for twin in copies:
        got, _ = loopkit.train_step(loss)(twin, batch)
        assert torch.equal(got.model.weight, expected.model.weight) and got.step == 1


# --- a torch.compile'd model's names ------------------------------------------------------------


def _compiled_and_plain(seed: int = 0):
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    compiled = torch.compile(copy.deepcopy(plain), backend="eager")
    return compiled, plain


def _sgd(model):
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def test_a_compiled_models_state_dict_names_its_tensors_as_the_plain_model_does_and_loads_either_way():
    """As Lightning strips ``_orig_mod.``: a checkpoint of a compiled model failed to load into the plain one
    ('missing key model.0.weight'), and back."""
    compiled, plain = _compiled_and_plain()
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    trained, _ = loopkit.train_step(loss)(_sgd(compiled), batch)
    sd = trained.state_dict()
    assert list(sd["model"]) == list(plain.state_dict()) and set(sd["grads"]) <= set(dict(plain.named_parameters()))
    into_plain = _sgd(_compiled_and_plain(1)[1]).load_state_dict(sd)
    into_compiled = _sgd(_compiled_and_plain(1)[0]).load_state_dict(into_plain.state_dict())
    old = {**sd, "model": {f"_orig_mod.{k}": v for k, v in sd["model"].items()}}  # saved before this change
    from_old = _sgd(_compiled_and_plain(1)[1]).load_state_dict(old)
    for state in (into_plain, into_compiled, from_old):
        for (name, p), q in zip(trained.model.named_parameters(), state.model.parameters()):
            assert torch.equal(p, q), name
        assert state.step == 1


def test_pure_steps_and_restores_of_a_compiled_model_train_the_copy_as_a_raw_loop_trains_the_plain_model(
    take_snapshot, assert_trees_equal
):
    """Reference: a raw loop on the plain model. A copy of the compiled wrapper kept its forward bound to the
    original's inner module: pure steps trained the input state's model and returned the copy untouched, and a
    state loaded into a compiled template ran the template's old weights."""
    batches = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    plain = _compiled_and_plain()[1]
    raw = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for batch in batches:
        loss(plain, batch).backward()
        raw.step()
        raw.zero_grad()
    state = _sgd(_compiled_and_plain()[0])
    before = take_snapshot(state)
    pure = loopkit.train_step(loss)
    current = state
    for batch in batches[:2]:
        current, _ = pure(current, batch)
    assert_trees_equal(take_snapshot(state), before)  # the input state's model untouched
    restored = _sgd(_compiled_and_plain(1)[0]).load_state_dict(current.state_dict())
    x = batches[0][0]
    assert torch.equal(restored.model(x), loopkit.state.core_module(restored.model)(x))
    assert torch.equal(current.model(x), loopkit.state.core_module(current.model)(x))
    for batch in batches[2:]:
        current, _ = pure(current, batch)
        restored, _ = loopkit.donate(pure)(restored, batch)
    for result in (current, restored):
        for (name, p), q in zip(plain.named_parameters(), result.model.parameters()):
            assert torch.equal(p, q), name


def test_ema_averages_of_a_compiled_model_go_on_in_a_plain_one():
    compiled, _ = _compiled_and_plain()
    batch = (torch.randn(8, 3), torch.randn(8, 1))
    step = loopkit.with_ema(loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()), 0.9)
    trained, _ = step(_sgd(compiled), batch)
    assert set(trained.extras["ema/params"]) == {n for n, _ in _compiled_and_plain()[1].named_parameters()}
    plain = _sgd(_compiled_and_plain(1)[1]).load_state_dict(trained.state_dict())
    again, _ = step(plain, batch)  # (the averages fit the plain model's names)
    assert again.step == 2


# --- evolve: states that share the model -------------------------------------------------------------


def _adam_state(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))


def _sq(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("saved, template", [
    ({"foreach": False}, {}), ({}, {"foreach": False}), ({}, {"fused": True}), ({"fused": True}, {"foreach": True}),
])
def test_the_optimizers_implementation_options_are_the_templates(saved, template):
    """A checkpoint of Adam(foreach=False) into a default Adam, or of a default Adam into Adam(fused=True) (a run
    resumed on a GPU): the second was refused ("missing key ...foreach"); the template's options stay, the
    training state (moments, step) is the saved one, as torch's own load gives it."""
    def adam_state(**options):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1, **options))

    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    trained, _ = step(adam_state(**saved), torch.ones(4, 3))
    restored = adam_state(**template).load_state_dict(through_a_file(trained.state_dict()))
    group = restored.optimizer.param_groups[0]
    for key in ("foreach", "fused"):
        assert group[key] == template.get(key), key
    reference = torch.optim.Adam(nn.Linear(3, 2).parameters(), lr=0.1, **template)
    reference.load_state_dict(trained.optimizer.state_dict())
    assert_equal_trees(restored.optimizer.state_dict()["state"], reference.state_dict()["state"])


def test_a_zero_dim_moment_for_a_parameter_of_another_shape_is_refused_by_name():
    """Only moments of more than 0 dimensions were compared: a 0-dim exp_avg for a (2, 3) weight loaded, and
    the next step failed in Adam with an unnamed broadcast error."""
    model = nn.Linear(3, 2)
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))
    trained, _ = loopkit.train_step(lambda m, b: m(b).pow(2).mean())(state, torch.ones(4, 3))
    sd = trained.state_dict()
    sd["optimizer"]["state"]["0"]["exp_avg"] = torch.zeros(())
    with pytest.raises(loopkit.StateMismatchError, match=r"mis-shaped key 'optimizer\.state\.0\.exp_avg'.*\(\), expected \(2, 3\)"):
        state.load_state_dict(sd)


@pytest.mark.parametrize("key, value", [("exp_avg", 0.5), ("exp_avg", "s"), ("exp_avg_sq", True), ("step", True),
                                        ("step", "3")])
@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "fresh"])
def test_a_non_tensor_where_the_optimizer_keeps_a_tensor_is_refused_by_name_before_anything_changes(
        key, value, fresh, take_snapshot, assert_trees_equal):
    """Before: it loaded, and the next step failed inside Adam ("'float' object has no attribute 'lerp_'")."""
    def made():
        torch.manual_seed(0)
        model = nn.Linear(3, 4)
        return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))

    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    sd = step(made(), torch.ones(4, 3))[0].state_dict()
    sd["optimizer"]["state"]["0"][key] = value
    template = made() if fresh else step(made(), torch.ones(4, 3))[0]
    before = take_snapshot(template)
    shape = r" of shape \(4, 3\)" if key != "step" else r" of shape \(\)"
    with pytest.raises(loopkit.StateMismatchError,
                       match=rf"key 'optimizer\.state\.0\.{key}' holds a {type(value).__name__}, expected a tensor{shape}$"):
        template.load_state_dict(sd)
    assert_trees_equal(take_snapshot(template), before)


def test_a_step_count_saved_as_a_number_loads_as_torchs_adam_takes_it(take_snapshot, assert_trees_equal):
    """torch before 1.12 saved Adam's step as a number, which Adam's own load turns into a tensor: it loads still."""
    def made():
        torch.manual_seed(0)
        model = nn.Linear(3, 4)
        return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))

    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    trained = step(made(), torch.ones(4, 3))[0]
    sd = trained.state_dict()
    for entry in sd["optimizer"]["state"].values():
        entry["step"] = float(entry["step"])
    reference = made()
    reference.optimizer.load_state_dict({**trained.optimizer.state_dict(), "state": {
        i: {**e, "step": float(e["step"])} for i, e in trained.optimizer.state_dict()["state"].items()}})
    reference.model.load_state_dict(trained.model.state_dict())
    restored = step(made().load_state_dict(sd), torch.ones(4, 3))[0]
    ref_next = step(reference, torch.ones(4, 3))[0]
    assert_trees_equal(dict(restored.model.named_parameters()), dict(ref_next.model.named_parameters()))


def test_a_run_that_added_a_param_group_after_its_scheduler_resumes_as_the_uninterrupted_run():
    """Unfreezing a backbone at epoch 2 adds a group to the optimizer after the scheduler was made: the scheduler's
    _last_lr then has an entry per group, the template's (made the same way) one; the resume was refused with
    "unexpected key 'scheduler._last_lr.1'", which torch's own load takes."""
    def state_of(with_group):
        torch.manual_seed(0)
        net = nn.ModuleDict({"backbone": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
        opt = torch.optim.SGD(net["head"].parameters(), lr=0.1, momentum=0.9)
        sch = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[7], gamma=0.1)
        if with_group:
            opt.add_param_group({"params": list(net["backbone"].parameters()), "lr": 0.01})
        return loopkit.TrainState.create(net, opt, sch)

    class Unfreeze(loopkit.Callback):
        def on_epoch_start(self, state):
            if state.epoch == 2 and len(state.optimizer.param_groups) == 1:
                state.optimizer.add_param_group({"params": list(state.model["backbone"].parameters()), "lr": 0.01})

    data = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.ones(8, 2)) for i in range(3)]

    def fit(state, epochs):
        return loopkit.run_epochs(loopkit.train_step(lambda m, b: ((m["head"](m["backbone"](b[0])) - b[1]) ** 2).mean()),
                                  state, data, epochs=epochs, callbacks=[Unfreeze()], progress=False)[0]

    uninterrupted = fit(state_of(False), 4)
    cut = fit(state_of(False), 3)  # unfrozen at epoch 2
    resumed = fit(state_of(True).load_state_dict(through_a_file(cut.state_dict())), 4)
    assert_equal_trees(resumed.state_dict(), uninterrupted.state_dict())


def test_two_states_evolved_to_share_a_model_train_in_turn_as_a_raw_loop_with_two_optimizers():
    """evolve shares what it does not change: a discriminator's and a generator's state over one model (their own
    optimizers) trained in turn by donated steps equal a raw loop alternating the two optimizers, bitwise."""
    def parts():
        torch.manual_seed(0)
        model = nn.ModuleDict({"g": nn.Linear(3, 3), "d": nn.Linear(3, 1)})
        return model, torch.optim.SGD(model["d"].parameters(), lr=0.1), torch.optim.Adam(model["g"].parameters(), lr=0.01)

    def d_loss(m, x):
        return (m["d"](x) - 1).pow(2).mean() + m["d"](m["g"](x).detach()).pow(2).mean()

    def g_loss(m, x):  # (it reaches g's parameters only: a backward through d would leave d gradients that the
        return (m["g"](x) - x.flip(1)).pow(2).mean()  # d step then adds to, as a loop that zeroes per optimizer does)

    data = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model, opt_d, opt_g = parts()
    for x in data:
        for opt, loss_fn in ((opt_d, d_loss), (opt_g, g_loss)):
            model.zero_grad()
            loss_fn(model, x).backward()
            opt.step()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt_d, opt_g = parts()
    d_state = _adam_state().evolve(model=model, optimizer=opt_d)
    g_state = d_state.evolve(optimizer=opt_g)  # the same model, its own optimizer
    d_step, g_step = loopkit.donate(loopkit.train_step(d_loss)), loopkit.donate(loopkit.train_step(g_loss))
    for x in data:
        d_state, _ = d_step(d_state, x)
        g_state, _ = g_step(g_state, x)
    assert g_state.model is d_state.model
    assert_equal_trees({n: p.detach() for n, p in g_state.model.named_parameters()}, reference)


# --- lazy modules (LazyLinear, LazyBatchNorm1d) before their first forward ---------------------------------------


def _lazy_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(7), nn.LazyBatchNorm1d(), nn.Tanh(), nn.LazyLinear(1))
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=1e-2))


def _lazy_batches(width=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, width, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)]


def _lazy_mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _raw_lazy_run(batches):
    """Reference: a hand-written loop over a fresh lazy model (torch shapes it at the first forward)."""
    raw = _lazy_state()
    model, opt = raw.model, raw.optimizer
    for batch in batches:
        opt.zero_grad()
        _lazy_mse(model, batch).backward()
        opt.step()
    return model


def test_a_pure_step_of_a_lazy_model_trains_as_the_raw_loop_and_leaves_the_given_state_unshaped():
    """The copy's first forward failed (the copy's hooks were the original's: they shaped the original, and the
    copy's own stayed to fail on the next call)."""
    state = _lazy_state()
    step = loopkit.train_step(_lazy_mse)
    new = state
    for batch in _lazy_batches():
        new, _ = step(new, batch)
    raw = _raw_lazy_run(_lazy_batches())
    assert all(torch.equal(a, b) for a, b in zip(new.model.state_dict().values(), raw.state_dict().values()))
    assert isinstance(state.model[0].weight, nn.parameter.UninitializedParameter)
    other, _ = step(state, _lazy_batches(width=3)[0])  # the given state is still lazy: another width shapes a copy
    assert other.model[0].weight.shape == (7, 3) and isinstance(state.model[0].weight, nn.parameter.UninitializedParameter)


@pytest.mark.parametrize("how", ["load_state_dict", "restore"])
def test_a_lazy_template_takes_a_trained_state_and_goes_on_as_the_uninterrupted_run(tmp_path, how):
    """Restoring into a freshly built lazy template raised torch's "Can't access the shape of an uninitialized
    parameter". Reference: the raw loop over all 4 batches against 2 + 2 across the load."""
    batches = _lazy_batches()
    step = loopkit.donate(loopkit.train_step(_lazy_mse))
    state = _lazy_state()
    for batch in batches[:2]:
        state, _ = step(state, batch)
    template = _lazy_state()
    if how == "restore":
        from loopkit.checkpoint import save
        save(state, tmp_path / "ckpt")
        resumed = loopkit.restore(template, tmp_path / "ckpt")
    else:
        resumed = template.load_state_dict(state.state_dict())
    assert isinstance(template.model[0].weight, nn.parameter.UninitializedParameter)  # the template is left as it was
    for batch in batches[2:]:
        resumed, _ = step(resumed, batch)
    raw = _raw_lazy_run(batches)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), raw.state_dict().values()))


def test_a_state_dict_without_a_lazy_modules_weight_is_named():
    trained, _ = loopkit.donate(loopkit.train_step(_lazy_mse))(_lazy_state(), _lazy_batches()[0])
    sd = trained.state_dict()
    del sd["model"]["3.weight"]
    with pytest.raises(loopkit.StateMismatchError, match=r"missing key 'model.3.weight'"):
        _lazy_state().load_state_dict(sd)


def test_a_hook_closing_over_the_model_reads_the_copy_in_a_pure_step():
    """A forward hook ``lambda mod, i, out: out * m.gain`` kept reading the original's ``gain`` in the pure step's
    copy: the given state's parameter got the gradient and the copy's never trained. Reference: a raw loop. A
    closure cell that is no tensor or module of the model (a list the hook collects into) stays the user's."""
    collected = []

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
        m.gain = nn.Parameter(torch.ones(7))
        gain = m.gain
        m[0].register_forward_hook(lambda mod, inp, out: out * m.gain)  # closes over the model
        m[2].register_forward_pre_hook(lambda mod, inp: collected.append(float(gain.sum())))  # over a parameter
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    m, opt = make()
    for batch in data:
        opt.zero_grad()
        mse(m, batch).backward()
        opt.step()
    raw_collected, collected[:] = list(collected), []
    model, opt = make()
    state = given = loopkit.TrainState.create(model, opt)
    for batch in data:
        state, _ = loopkit.train_step(mse)(state, batch)
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), m.parameters()))
    assert given.model.gain.grad is None and torch.equal(given.model.gain, torch.ones(7))
    assert collected == raw_collected  # the copies' gains, read by each step's copy of the hook


def test_a_hook_taking_the_model_as_a_default_reads_the_copy_in_a_pure_step():
    """``lambda mod, i, out, model=m: out * model.gain`` (the idiom that binds the model at definition) kept the
    original: the given state's gain got the gradient, the copy's never trained. Reference: the donated step."""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        m.gain = nn.Parameter(torch.full((4,), 2.0))
        m[0].register_forward_hook(lambda mod, inp, out, model=m: out * model.gain)
        m[1].register_forward_hook(lambda mod, inp, out, *, scale=m.gain: out * scale.sum())
        return loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1))

    batch = torch.ones(2, 3)
    loss = lambda m, b: m(b).pow(2).mean()
    given = make()
    pure, _ = loopkit.train_step(loss)(given, batch)
    donated, _ = loopkit.donate(loopkit.train_step(loss))(make(), batch)
    assert all(torch.equal(a, b) for a, b in zip(pure.model.parameters(), donated.model.parameters()))
    assert given.model.gain.grad is None and torch.equal(given.model.gain, torch.full((4,), 2.0))


def test_a_lazy_modules_copy_infers_its_shapes_before_the_pre_hooks_of_ones_own():
    """A pre-hook reading the weight's shape works in torch (shape inference is registered first); in a pure step's
    copy inference ran after it, and the hook failed on the uninitialized parameter."""
    shapes = []
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    model[0].register_forward_pre_hook(lambda mod, inp: shapes.append(tuple(mod.weight.shape)))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    loopkit.train_step(lambda m, b: m(b).pow(2).mean())(state, torch.ones(2, 5))
    assert shapes == [(3, 5)]


def test_a_template_whose_hyper_parameters_are_numpy_numbers_loads_a_state_dict():
    """Adam(weight_decay=np.float32(.01)) or StepLR(step_size=np.int64(2)) saved fine, and loading into the same
    template raised "cannot decode state at 'optimizer.param_groups.0.weight_decay' into a float32". Reference:
    the saved state's parameters and counters."""
    import numpy as np

    def template():
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=np.float32(0.01), amsgrad=np.bool_(False))
        return loopkit.TrainState.create(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=np.int64(2)))

    trained = template()
    step = loopkit.donate(loopkit.train_step(lambda m, b: m(b).pow(2).mean()))
    for _ in range(3):
        trained, _ = step(trained, torch.ones(2, 3))
    loaded = template().load_state_dict(trained.state_dict())
    assert loaded.step == 3 and loaded.scheduler.last_epoch == 3
    assert torch.equal(loaded.model.weight, trained.model.weight)


@pytest.mark.parametrize("crash_at", [4, 7, 9, 13])
def test_the_backbone_finetuning_recipe_resumes_from_any_checkpoint_as_the_uninterrupted_run(tmp_path, crash_at,
                                                                                            assert_trees_equal):
    """docs/from_lightning.md's BackboneFinetuning recipe, resumed from the newest checkpoint (every 3 updates) of a
    run that crashed before, at the start of, or inside the unfreeze epoch (2; 5 batches an epoch): run_epochs calls
    on_epoch_start again for the epoch a resumed run finishes, so the recipe adds the group at batch 0 only, and the
    template holds the group once the checkpoint is past the epoch's start. The reference is the uninterrupted run."""
    unfreeze = 2
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(5)]

    def add_group(model, optimizer):
        model[0].requires_grad_(True)
        optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})

    class Unfreeze(loopkit.Callback):  # the recipe
        def on_fit_start(self, state):
            if (state.epoch, state.batch_index) > (unfreeze, 0):
                state.model[0].requires_grad_(True)

        def on_epoch_start(self, state):
            if state.epoch == unfreeze and state.batch_index == 0:
                add_group(state.model, state.optimizer)

    class Crash(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.step == crash_at:
                raise RuntimeError("crash")

    def template(with_group):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
        model[0].requires_grad_(False)
        optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
        if with_group:
            add_group(model, optimizer)
        return loopkit.TrainState.create(model, optimizer)

    def run(directory, state, *extra):
        loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
        step = loopkit.with_checkpointing(loopkit.train_step(loss), directory, every_n_steps=3)
        return loopkit.run_epochs(step, state, data, epochs=4, callbacks=[Unfreeze(), *extra], progress=False)

    full, _ = run(tmp_path / "full", template(False))
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "cut", template(False), Crash())
    newest = loopkit.checkpoint.list_checkpoints(tmp_path / "cut")[-1]
    resumed, _ = run(tmp_path / "cut", loopkit.restore(template((newest.epoch, newest.batch_index) > (unfreeze, 0)),
                                                       tmp_path / "cut"))
    assert_trees_equal(resumed.state_dict(), full.state_dict())


# --- an optimizer's own entries in its state dict ---------------------------------------------------


def _resumed_runs(optimizer_class, directory):
    """Runs of ``fresh_state(optimizer_class)`` over :data:`EIGHT_BATCHES` cut after 4 updates and finished: from
    ``with_checkpointing``'s folder by ``restore``, and from ``state_dict()`` through a file by ``load_state_dict``
    (that one loaded state also returned, before it trains on)."""
    step = loopkit.with_checkpointing(loopkit.train_step(_squares), directory, every_n_steps=1)
    cut, _ = loopkit.run_epochs(step, fresh_state(optimizer_class), EIGHT_BATCHES, max_steps=4, progress=False)
    loaded = fresh_state(optimizer_class).load_state_dict(through_a_file(cut.state_dict()))
    restored = loopkit.restore(fresh_state(optimizer_class), directory)
    finish = loopkit.train_step(_squares)
    finished = [loopkit.run_epochs(finish, fork(s), EIGHT_BATCHES, epochs=1, progress=False)[0]
                for s in (restored, loaded)]
    return finished, loaded


@pytest.mark.parametrize("optimizer_class", [CountingSGD, GlobalCountSGD, Lookahead])
def test_an_optimizers_own_state_dict_entries_resume_as_the_uninterrupted_raw_loop(optimizer_class, tmp_path):
    """An entry the optimizer's state_dict() adds beside torch's (an update counter) was dropped, one kept in its
    ``state`` under a name was refused (unexpected key 'optimizer.state.global'), and a wrapper's own layout failed
    with a bare KeyError: 'state'. Each now goes through a checkpoint (torch.load(weights_only=True)) to the
    optimizer's own load_state_dict. Reference: the raw loop over all the batches, bit for bit."""
    raw_model, raw = _raw_trained(optimizer_class, 3, EIGHT_BATCHES)
    finished, loaded = _resumed_runs(optimizer_class, tmp_path)
    if optimizer_class is CountingSGD:
        assert (loaded.optimizer.updates, loaded.optimizer.scales) == (4, [1.0, 1.0, 0.5, 1.0])
    for state in finished:
        assert torch.equal(state.model.weight, raw_model.weight) and torch.equal(state.model.bias, raw_model.bias)
        assert_equal_trees(state.optimizer.state_dict(), raw.state_dict())


def test_a_checkpoint_without_an_optimizers_own_entries_still_loads(assert_trees_equal):
    """One saved before loopkit kept them (a compatibility guard): the optimizer's load_state_dict takes what there
    is, as torch's would (its own defaults, not the template's counter)."""
    step = loopkit.train_step(_squares)
    trained, _ = step(fresh_state(CountingSGD), EIGHT_BATCHES[0])
    sd = trained.state_dict()
    old = {**sd, "optimizer": {key: sd["optimizer"][key] for key in ("state", "param_groups")}}
    template, _ = step(step(fresh_state(CountingSGD), EIGHT_BATCHES[1])[0], EIGHT_BATCHES[2])
    loaded = template.load_state_dict(through_a_file(old))
    assert (loaded.optimizer.updates, loaded.optimizer.scales, loaded.step) == (0, [], 1)
    assert template.optimizer.updates == 2
    assert_trees_equal(dict(loaded.model.named_parameters()), dict(trained.model.named_parameters()))


def test_torchs_own_optimizer_refuses_an_entry_its_state_dict_has_not():
    """torch's SGD.load_state_dict would drop the counter silently: the checkpoint is of another optimizer."""
    sd = through_a_file(fresh_state(CountingSGD).state_dict())
    with pytest.raises(loopkit.StateMismatchError, match="unexpected key 'optimizer.updates'"):
        fresh_state(torch.optim.SGD).load_state_dict(sd)
    sd["optimizer"]["state"]["global"] = {"n": 3}
    del sd["optimizer"]["updates"], sd["optimizer"]["scales"]
    with pytest.raises(loopkit.StateMismatchError, match="unexpected key 'optimizer.state.global'"):
        fresh_state(torch.optim.SGD).load_state_dict(sd)


def test_a_wrapper_layout_of_another_optimizer_is_named_by_its_missing_key():
    sd = through_a_file(fresh_state(Lookahead).state_dict())
    with pytest.raises(loopkit.StateMismatchError, match="missing key 'optimizer.slow'"):
        fresh_state(Lookahead).load_state_dict({**sd, "optimizer": {"fast": sd["optimizer"]["fast"]}})
    with pytest.raises(loopkit.StateMismatchError, match="missing key 'optimizer.state'"):
        fresh_state(torch.optim.SGD).load_state_dict(sd)


@pytest.mark.parametrize("optimizer_class", [GlobalCountSGD, Lookahead])
def test_a_pure_step_copies_an_optimizers_named_entries_and_wrapper_state(optimizer_class):
    """check_purity on an optimizer keeping ``state["global"]`` died on 'str' object has no attribute '_base' (the
    copy took every key of ``state`` for a parameter), and on the wrapper with KeyError: 'state'. Reference: the raw
    loop; the given state's entries stay as they were."""
    raw_model, raw = _raw_trained(optimizer_class, 3, EIGHT_BATCHES[:3])
    step = loopkit.train_step(_squares)
    first, _ = step(fresh_state(optimizer_class), EIGHT_BATCHES[0])
    before = through_a_file(first.state_dict())
    second, _ = loopkit.check_purity(step, first, EIGHT_BATCHES[1])
    assert_equal_trees(through_a_file(first.state_dict()), before)
    if optimizer_class is GlobalCountSGD:
        assert first.optimizer.state["global"] == {"n": 1} and second.optimizer.state["global"] == {"n": 2}
    third, _ = step(second, EIGHT_BATCHES[2])
    assert torch.equal(third.model.weight, raw_model.weight) and torch.equal(third.model.bias, raw_model.bias)
    assert_equal_trees(third.optimizer.state_dict(), raw.state_dict())


def test_an_optimizer_entry_no_checkpoint_can_hold_is_refused_by_name_before_training(tmp_path):
    """Refused when the state dict is made, naming the optimizer's class and the entry: by run_epochs before the
    first step under with_checkpointing (the state left as it was, nothing saved)."""

    class WithConfig(CountingSGD):
        def state_dict(self):
            return {**super().state_dict(), "config": object()}

    state = fresh_state(WithConfig)
    with pytest.raises(TypeError, match=re.escape("WithConfig.state_dict(): state at 'optimizer.config' is a object")):
        state.state_dict()
    step = loopkit.with_checkpointing(loopkit.train_step(_squares), tmp_path, every_n_steps=1)
    with pytest.raises(TypeError, match=r"with_checkpointing could not save this state: \S*WithConfig\.state_dict\(\)"):
        loopkit.run_epochs(step, state, EIGHT_BATCHES, epochs=1, progress=False)
    assert state.step == 0 and state.optimizer.updates == 0 and not list(tmp_path.iterdir())
    odd = fresh_state(GlobalCountSGD)
    odd.optimizer.state[("a", 1)] = {"n": 1}
    message = "GlobalCountSGD.state_dict(): its state holds an entry under ('a', 1), which is neither"
    with pytest.raises(TypeError, match=re.escape(message)):
        odd.state_dict()


@pytest.mark.parametrize("optimizer_class", [CountingSGD, GlobalCountSGD, Lookahead])
def test_load_state_dict_copies_an_optimizers_own_entries_and_layout(optimizer_class):
    """The source of a state dict stays a valid snapshot (as for torch's layout): training the loaded state never
    reaches its wrapper's moments, its named entries or its own entries."""
    step = loopkit.train_step(_squares)
    source, _ = step(step(fresh_state(optimizer_class), EIGHT_BATCHES[0])[0], EIGHT_BATCHES[1])
    before = through_a_file(source.state_dict())
    loaded = fresh_state(optimizer_class).load_state_dict(source.state_dict())
    for batch in EIGHT_BATCHES[2:4]:
        loaded, _ = loopkit.donate(step)(loaded, batch)
    assert_equal_trees(through_a_file(source.state_dict()), before)


class _SharedStorage(nn.Module):
    """Parameters sharing storage, as the testers' repros: ``dec`` built from ``enc``'s transposed data, and ``w``, ``b``
    slices of the registered buffer ``flat`` (a flat-parameter layout)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Parameter(torch.randn(3, 4))
        self.dec = nn.Parameter(self.enc.data.t())
        self.register_buffer("flat", torch.zeros(5))
        self.w = nn.Parameter(self.flat[:4])
        self.b = nn.Parameter(self.flat[4:])

    def forward(self, x):
        return torch.tanh(x @ self.dec) @ self.enc + x * self.w + self.b


def _shared_storage_state():
    torch.manual_seed(0)
    model = _SharedStorage()
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def _shared_storage_loss(model, batch):
    return (model(batch) - batch).pow(2).mean()


def _shared_storage_batches(n):
    torch.manual_seed(1)
    return [torch.randn(8, 4) for _ in range(n)]


def _assert_storage_shared(model):
    assert model.dec.untyped_storage().data_ptr() == model.enc.untyped_storage().data_ptr()
    assert model.dec.stride() == (1, 4) and model.w.untyped_storage().data_ptr() == model.flat.untyped_storage().data_ptr()
    assert model.b.storage_offset() == 4 and model.b.untyped_storage().data_ptr() == model.flat.untyped_storage().data_ptr()


def test_parameters_sharing_storage_train_in_a_pure_step_as_in_a_raw_loop_and_a_donated_run():
    """A pure step's copy cloned each Parameter on its own: ``dec`` stopped following ``enc``, ``flat`` stayed zero,
    and the pure run trained other weights than the raw loop and the donated run. Reference: the raw loop, bitwise."""
    batches = _shared_storage_batches(3)
    raw = _shared_storage_state()
    for batch in batches:
        raw.optimizer.zero_grad()
        _shared_storage_loss(raw.model, batch).backward()
        raw.optimizer.step()
    step = loopkit.train_step(_shared_storage_loss)
    pure = first = _shared_storage_state()
    for batch in batches:
        pure, _ = step(pure, batch)
    donated, _ = loopkit.run_epochs(step, _shared_storage_state(), batches, epochs=1, progress=False)

    _assert_storage_shared(pure.model)
    assert_equal_trees(pure.model.state_dict(), raw.model.state_dict())
    assert_equal_trees(donated.model.state_dict(), raw.model.state_dict())
    assert_equal_trees(first.model.state_dict(), _shared_storage_state().model.state_dict())  # the given one untouched


@pytest.mark.parametrize("copy", [True, False])
def test_a_state_loaded_from_a_state_dict_keeps_parameters_sharing_storage_and_resumes_as_the_uninterrupted_run(copy):
    """``load_state_dict`` (and ``restore``, which loads with ``copy=False``) gave each of the Parameters sharing
    storage a storage of its own: the resumed run differed from the uninterrupted one. Reference: the uninterrupted
    run, bitwise."""
    batches = _shared_storage_batches(6)
    step = loopkit.train_step(_shared_storage_loss)
    uninterrupted, _ = loopkit.run_epochs(step, _shared_storage_state(), batches, epochs=1, progress=False)
    half, _ = loopkit.run_epochs(step, _shared_storage_state(), batches[:3], epochs=1, progress=False)

    resumed = _shared_storage_state().load_state_dict(through_a_file(half.state_dict()), copy=copy)
    _assert_storage_shared(resumed.model)
    for batch in batches[3:]:
        resumed, _ = step(resumed, batch)
    assert_equal_trees(resumed.model.state_dict(), uninterrupted.model.state_dict())


class _SparseAdjacency(nn.Module):
    """A GCN-like layer whose adjacency matrix is a sparse COO buffer (a tensor without a storage to share)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("adj", torch.eye(4).to_sparse())
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.sparse.mm(self.adj, self.lin(x))


def test_a_model_with_a_sparse_buffer_takes_pure_steps_as_a_raw_loop_and_loads_its_state_dict():
    """A sparse buffer has no storage: the copy's storage sharing (a first cut read every tensor's storage) leaves it
    out, so a pure step trains as a raw loop and load_state_dict (copy True, and False as restore loads) works."""
    def loss_fn(model, x):
        return model(x).pow(2).mean()

    def fresh():
        torch.manual_seed(0)
        model = _SparseAdjacency()
        return model, loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    xs = [torch.randn(4, 3) for _ in range(3)]
    raw, _ = fresh()
    opt = torch.optim.SGD(raw.parameters(), lr=0.1)
    for x in xs:
        opt.zero_grad()
        loss_fn(raw, x).backward()
        opt.step()
    state = fresh()[1]
    for x in xs:
        state, _ = loopkit.train_step(loss_fn)(state, x)
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), raw.parameters(), strict=True))
    for copy in (True, False):
        loaded = fresh()[1].load_state_dict(state.state_dict(), copy=copy)
        assert torch.equal(loaded.model.lin.weight, raw.lin.weight)
        assert torch.equal(loaded.model.adj.to_dense(), torch.eye(4))


def test_two_storages_over_one_memory_of_two_sizes_are_copied_apart():
    """A Parameter over the first half of a numpy array and a buffer over all of it: two storage objects at one
    address, of two sizes. The copy's storage sharing took them for one storage and set the larger onto the smaller's
    copy (out of bounds); each is copied on its own, as before sharing was kept, with its values."""
    memory = np.arange(8, dtype=np.float32)
    model = nn.Module()
    model.head = nn.Parameter(torch.from_numpy(memory[:4]))
    model.register_buffer("whole", torch.from_numpy(memory))
    copied = fork(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))).model
    assert copied.head.tolist() == [0.0, 1.0, 2.0, 3.0] and copied.whole.tolist() == list(map(float, range(8)))
    assert copied.head.data_ptr() != model.head.data_ptr()
