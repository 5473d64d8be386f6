"""loopkit.ensemble: K members trained by one vmapped step, each equal to its own raw PyTorch loop."""

from __future__ import annotations

import copy
import functools
import io
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import loopkit
from loopkit import ensemble

STEPS = 6


def _mlp(seed: int, dropout: bool = False, norm: nn.Module | None = None) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(4, 16), norm or nn.Tanh(), nn.Linear(16, 2)]
        if dropout:
            layers.insert(2, nn.Dropout(0.5))
        return nn.Sequential(*layers)


def _loss(model, batch):
    x, y = batch
    err = model(x) - y
    return (err**2).mean(), {"mae": err.abs().mean()}


# each member: its seed (initial weights), optimizer and scheduler
MEMBERS = [
    (0, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), None),
    (1, lambda ps: torch.optim.Adam(ps, lr=0.01), lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)),
    (2, lambda ps: torch.optim.AdamW(ps, lr=0.003, weight_decay=0.1), None),
]


def _states():
    states = []
    for seed, make_opt, make_sched in MEMBERS:
        model = _mlp(seed)
        opt = make_opt(model.parameters())
        states.append(loopkit.TrainState.create(model, opt, make_sched(opt) if make_sched else None, seed=seed))
    return states


def _raw(seed, make_opt, make_sched, batches):
    """The reference: a hand-written loop for one member."""
    model = _mlp(seed)
    return model, _raw_loop(model, make_opt, make_sched, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batches)


def _raw_loop(model, make_opt, make_sched, loss_of, batches):
    """``model`` trained by hand on ``batches`` (``loss_of(model, batch)`` a scalar loss); the losses stacked."""
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    losses = []
    for batch in batches:
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_each_member_follows_its_own_raw_loop(make_batches):
    batches = make_batches(STEPS)
    ens = ensemble.stack(_states())
    step = ensemble.train_step(_loss, donated=True)
    losses, maes = [], []
    for batch in batches:
        ens, metrics = step(ens, batch)
        losses.append(metrics["loss"])
        maes.append(metrics["mae"])
    losses = torch.stack(losses)  # [steps, K]
    assert losses.shape == (STEPS, len(MEMBERS)) and torch.stack(maes).shape == (STEPS, len(MEMBERS))
    for k, (seed, make_opt, make_sched) in enumerate(MEMBERS):
        model, raw_losses = _raw(seed, make_opt, make_sched, batches)
        # one batched matmul instead of one per member: equal within float32 rounding
        torch.testing.assert_close(losses[:, k], raw_losses, rtol=1e-5, atol=1e-6)
        for (name, p), member_p in zip(model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(member_p, p, rtol=1e-5, atol=1e-6, msg=f"member {k} {name}")
            torch.testing.assert_close(ens.params[name][k], p, rtol=1e-5, atol=1e-6)
        assert (ens.members[k].step, ens.members[k].batch_index) == (STEPS, STEPS)
    assert ens.members[1].scheduler.get_last_lr() == [0.01 * 0.5**3]


def test_members_differ_and_are_views_of_the_stacked_storage():
    ens = ensemble.stack(_states())
    first = [p for p in ens.members[0].model.parameters()]
    assert not torch.equal(ens.params["0.weight"][0], ens.params["0.weight"][1])  # own initial weights
    assert first[0].untyped_storage().data_ptr() == ens.params["0.weight"].untyped_storage().data_ptr()
    assert ens.members[0].optimizer.param_groups[0]["params"][0] is first[0]  # the optimizer follows the views


def test_stack_and_a_pure_step_leave_their_inputs_unchanged(make_batches, take_snapshot, assert_trees_equal):
    states = _states()
    before = [take_snapshot(s) for s in states]
    ens = ensemble.stack(states)
    ens_before = {n: p.clone() for n, p in ens.params.items()}
    new, _ = ensemble.train_step(_loss)(ens, make_batches(1)[0])
    for s, snap in zip(states, before):
        assert_trees_equal(take_snapshot(s), snap)
    assert_trees_equal(dict(ens.params), ens_before)
    assert [m.step for m in ens.members] == [0, 0, 0] and [m.step for m in new.members] == [1, 1, 1]
    assert not torch.equal(new.params["0.weight"], ens.params["0.weight"])
    again, _ = ensemble.train_step(_loss)(ens, make_batches(1)[0])  # the same call again: the same result
    assert_trees_equal(dict(again.params), dict(new.params))


def test_a_donated_ensemble_and_its_members_cannot_be_used_again(make_batches):
    ens = ensemble.stack(_states())
    step = ensemble.train_step(_loss, donated=True)
    new, _ = step(ens, make_batches(1)[0])
    with pytest.raises(loopkit.DonatedStateError):
        step(ens, make_batches(1)[0])
    with pytest.raises(loopkit.DonatedStateError):
        ens.members[0].state_dict()
    step(new, make_batches(1)[0])


@pytest.mark.parametrize("donated", [True, False])
def test_an_ensemble_whose_member_a_donated_solo_run_used_up_is_refused_naming_it(donated, make_batches):
    """Before, a donated ensemble step checked only the ensemble: it trained on a member that run_epochs (donated)
    had trained in place and used up, changing the state run_epochs returned behind its back. Now every ensemble
    step refuses it naming the member, as stack refuses the used-up member, and nothing changes; stacked again with
    the returned state in its place, the members train on."""
    batches = make_batches(3)
    ens, _ = ensemble.train_step(_loss, donated=True)(ensemble.stack(_states()), batches[0])
    # (run_epochs resumes the member's epoch at its batch 1: it trains on batches[1])
    trained, _ = loopkit.run_epochs(loopkit.train_step(_loss), ens.members[1], batches[:2], epochs=1, progress=False)
    assert trained.step == 2
    solo_params = {n: p.clone() for n, p in trained.model.named_parameters()}
    params = {n: p.clone() for n, p in ens.params.items()}
    with pytest.raises(loopkit.DonatedStateError, match="member 1 of this Ensemble was given to a donated step"):
        ensemble.train_step(_loss, donated=donated)(ens, batches[2])
    assert all(torch.equal(p, solo_params[n]) for n, p in trained.model.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in ens.params.items())
    again = ensemble.stack([ens.members[0], trained, ens.members[2]])
    again, _ = ensemble.train_step(_loss, donated=donated)(again, batches[2])
    assert [m.step for m in again.members] == [2, 3, 2]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_ensemble_trains_as_the_original_and_apart_from_it(make_batches, how):
    # a copy's members must be views of the copy's stacked params, or a donated step trains detached copies
    import pickle

    duplicate = copy.deepcopy if how == "deepcopy" else (lambda e: pickle.loads(pickle.dumps(e)))
    batches = make_batches(4)
    original = ensemble.stack(_states())
    snapshot = duplicate(original)
    assert snapshot.members[1].model[0].weight.data_ptr() == snapshot.params["0.weight"][1].data_ptr()
    step = ensemble.train_step(_loss, donated=True)
    trained = snapshot
    for batch in batches:
        trained, _ = step(trained, batch)
    for k, (seed, make_opt, make_sched) in enumerate(MEMBERS):
        raw, _ = _raw(seed, make_opt, make_sched, batches)
        for name, p in raw.named_parameters():
            torch.testing.assert_close(trained.params[name][k], p, rtol=1e-6, atol=1e-6)
    # the original kept its values (the copy has storage of its own)
    for name, p in ensemble.stack(_states()).params.items():
        assert torch.equal(original.params[name], p)
    step(original, batches[0])
    with pytest.raises(loopkit.DonatedStateError):
        duplicate(original)


def test_unstack_copies_members_out_for_evaluate_and_checkpoints(make_batches, tmp_path):
    ens = ensemble.stack(_states())
    ens, _ = ensemble.train_step(_loss, donated=True)(ens, make_batches(1)[0])
    solo = ensemble.unstack(ens)
    assert solo[2].model[0].weight.untyped_storage().data_ptr() != ens.params["0.weight"].untyped_storage().data_ptr()
    torch.testing.assert_close(solo[2].model[0].weight, ens.params["0.weight"][2], rtol=0, atol=0)
    mse = loopkit.eval_step(lambda m, b: {"mse": ((m(b[0]) - b[1]) ** 2).mean()})
    data = make_batches(2, seed=3)
    assert loopkit.evaluate(mse, solo[1], data) == loopkit.evaluate(mse, ens.members[1], data)
    loopkit.checkpoint.save(solo[1], tmp_path)
    template = _mlp(9)
    opt = torch.optim.Adam(template.parameters())
    restored = loopkit.restore(loopkit.TrainState.create(template, opt, torch.optim.lr_scheduler.StepLR(opt, 2)), tmp_path)
    assert restored.step == 1
    torch.testing.assert_close(restored.model[2].bias, ens.params["2.bias"][1], rtol=0, atol=0)


def _wide_tied_state(seed):
    """A member large enough for its checkpoint's size to show how many members it holds, with a tied weight."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 2))
    model[2].weight = model[0].weight
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01), seed=seed)


def test_a_checkpoint_of_a_live_member_holds_that_member_alone_and_restores_bitwise(make_batches, tmp_path):
    """Before, checkpoint.save(ens.members[k]) (and torch.save of its state_dict) wrote all K members' weights: its
    parameters are views of the stacked storage, and torch.save writes a view's whole storage (2.1 MB where the
    unstacked member's is 0.29 MB at K = 8). Now it is the size of the unstacked member's, restores bitwise, keeps
    its tied weight tied in the file, and the member stays a view of the ensemble, which trains on."""
    batches = make_batches(3, d_in=64)
    ens = ensemble.stack([_wide_tied_state(k) for k in range(8)])
    step = ensemble.train_step(_mse_loss, donated=True)
    for batch in batches[:2]:
        ens, _ = step(ens, batch)
    member, copy_ = ens.members[1], ensemble.unstack(ens)[1]
    sizes, saved = [], []
    for state, name in [(member, "view"), (copy_, "copy")]:
        saved.append(loopkit.checkpoint.save(state, tmp_path / name))
        sizes.append((saved[-1] / "state.pt").stat().st_size)
        buffer = io.BytesIO()
        torch.save(state.state_dict(), buffer)
        sizes.append(buffer.tell())
    assert sizes[0] <= 1.02 * sizes[2] and sizes[1] <= 1.02 * sizes[3], sizes
    model = loopkit.checkpoint.load(saved[0])["state"]["model"]
    assert model["0.weight"].untyped_storage().data_ptr() == model["2.weight"].untyped_storage().data_ptr()
    restored = loopkit.restore(_wide_tied_state(99), tmp_path / "view")
    assert restored.step == member.step == 2 and restored.model[2].weight is restored.model[0].weight
    for (name, p), q in zip(member.model.named_parameters(), restored.model.parameters()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(restored.optimizer.state_dict(), member.optimizer.state_dict(), rtol=0, atol=0)
    assert member.model[0].weight.data_ptr() == ens.params["0.weight"][1].data_ptr()
    ens, _ = step(ens, batches[2])
    assert [m.step for m in ens.members] == [3] * 8


def test_bad_input_is_named(make_batches):
    batch = make_batches(1)[0]
    model = nn.Linear(4, 2)
    other = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="member 1's model differs from member 0's"):
        ensemble.stack([_states()[0], other])
    with pytest.raises(ValueError, match="member 0 has no optimizer"):
        ensemble.stack([loopkit.TrainState.create(_mlp(0))])
    partly_frozen = _states()
    partly_frozen[1].model[0].weight.requires_grad_(False)  # one vmapped gradient cannot freeze it in one member only
    with pytest.raises(ValueError, match="parameter '0.weight' has requires_grad=False in member 1 and True in member 0"):
        ensemble.stack(partly_frozen)
    bn = _mlp(0, norm=nn.BatchNorm1d(16))
    with pytest.raises(TypeError, match="BatchNorm1d in training mode with running statistics"):
        ensemble.stack([loopkit.TrainState.create(bn, torch.optim.SGD(bn.parameters(), lr=0.1))])
    with pytest.raises(TypeError, match="a sequence of loopkit.TrainState"):
        ensemble.stack(_states()[0])
    with pytest.raises(TypeError, match="takes a loopkit.ensemble.Ensemble"):
        ensemble.train_step(_loss)(_states()[0], batch)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        ensemble.train_step("loss")
    ens = ensemble.stack(_states())
    with pytest.raises(ValueError, match=r"returned a loss of shape \(8, 2\); the loss must be a scalar \(0-dim\)"):
        ensemble.train_step(lambda m, b: m(b[0]) - b[1])(ens, batch)
    with pytest.raises(ValueError, match="aux metric named 'loss'"):
        ensemble.train_step(lambda m, b: (_loss(m, b)[0], {"loss": 1.0}))(ens, batch)
    sparse = nn.Embedding(10, 2, sparse=True)
    with pytest.raises(TypeError, match=r"member 0 has Embedding\(sparse=True\)"):
        ensemble.stack([loopkit.TrainState.create(sparse, torch.optim.SparseAdam(sparse.parameters(), lr=0.1))])


class _Tied(nn.Module):
    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            self.c = nn.Linear(4, 4)
        self.c.weight = self.a.weight  # tied
        self.b.weight.requires_grad_(False)  # frozen

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def _solo(state, batches):
    step = loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    for batch in batches:
        state, _ = step(state, batch)
    return state


def _assert_follow_solo(ens, states, batches, rtol=1e-6, atol=1e-7):
    """Each member of ``ens`` (trained on ``batches``) equals its state of ``states`` trained alone on them."""
    for k, state in enumerate(states):
        solo = _solo(state, batches)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=f"member {k} {name}")


def _together(states, batches, donated=True):
    """``states`` stacked and trained by one ensemble step on ``batches`` (the loss of :func:`_solo`)."""
    ens = ensemble.stack(states)
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=donated)
    for batch in batches:
        ens, _ = step(ens, batch)
    return ens


def test_tied_frozen_and_already_trained_members_follow_their_solo_runs(make_batches):
    """Members with a tied weight, a frozen one, Adam moments from earlier training and two parameter
    groups listed out of model order: each equals the same state trained alone."""
    def member(seed):
        model = _Tied(seed)
        opt = torch.optim.Adam([{"params": [model.c.bias, model.b.bias]}, {"params": [model.a.weight, model.a.bias], "lr": 0.03}],
                               lr=0.01)
        return _solo(loopkit.TrainState.create(model, opt, seed=seed), make_batches(2, seed=seed))  # moments exist

    states = [member(0), member(1)]
    batches = make_batches(STEPS, seed=5)
    ens = ensemble.stack(states)
    assert ens.members[0].model.a.weight is ens.members[0].model.c.weight
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    for batch in batches:
        ens, _ = step(ens, batch)  # pure calls: each copies the ensemble (and its Adam moments)
    for k, state in enumerate(states):
        solo = _solo(state, batches)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"member {k} {name}")
        assert torch.equal(ens.members[k].model.b.weight, state.model.b.weight)  # frozen: never moved
        assert ens.members[k].model.b.weight.grad is None
        torch.testing.assert_close(ens.members[k].optimizer.state_dict(), solo.optimizer.state_dict(), rtol=1e-5, atol=1e-7)


def test_members_in_different_training_modes_are_refused(make_batches):
    """Before, member 1 (train mode, dropout on) silently trained in member 0's eval mode."""
    states = _states()
    states[0].model.eval()
    with pytest.raises(ValueError, match=r"member 1's module \(model\) \(Sequential\) is in train mode where member 0's is in eval"):
        ensemble.stack(states)
    states = _states()
    states[2].model[1].eval()  # one submodule only
    with pytest.raises(ValueError, match="member 2's module 1 \\(Tanh\\) is in eval mode where member 0's is in train mode"):
        ensemble.stack(states)
    ens = ensemble.stack(_states())
    ens.members[1].model.eval()  # after stacking: refused by the step too (a donated one does not stack again)
    for step in (ensemble.train_step(_loss), ensemble.train_step(_loss, donated=True)):
        with pytest.raises(ValueError, match="member 1's module \\(model\\) \\(Sequential\\) is in eval mode"):
            step(ens, make_batches(1)[0])
    evaluated = _states()
    for state in evaluated:
        state.model.eval()
    ens, _ = ensemble.train_step(_loss)(ensemble.stack(evaluated), make_batches(1)[0])  # all in one mode: fine
    assert not ens.members[1].model.training


class _Counter(nn.Module):
    def __init__(self, seed, reassign=False):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.reassign = reassign

    def forward(self, x):
        if self.reassign:
            self.calls = self.calls + 1
        else:
            self.calls += 1
        return self.l(x) * self.scale


def test_a_forward_that_changes_a_buffer_is_refused_before_the_change_is_lost(make_batches):
    """Before, the members' counters stayed 0 where a solo run counts the calls."""
    batch = make_batches(1)[0]
    for reassign in (False, True):
        models = (_Counter(0, reassign), _Counter(1, reassign))
        states = [loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models]
        ens = ensemble.stack(states)
        with pytest.raises(RuntimeError, match="changed the buffer\\(s\\) 'calls' in its forward"):
            ensemble.train_step(_loss)(ens, batch)
        assert [m.step for m in ens.members] == [0, 0]
        assert torch.equal(ens.members[0].model.l.weight, states[0].model.l.weight)  # no member updated
    read_only = nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2))  # buffers only read: fine
    read_only.register_buffer("offset", torch.ones(2))
    ens = ensemble.stack([loopkit.TrainState.create(read_only, torch.optim.SGD(read_only.parameters(), lr=0.1))])
    ens, _ = ensemble.train_step(_loss)(ens, batch)
    assert ens.members[0].step == 1


class _LazyCache(nn.Module):
    """A forward that grows a non-persistent cache buffer (as rotary or position tables are built)."""

    def __init__(self, seed):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.register_buffer("pos", torch.zeros(0), persistent=False)

    def forward(self, x):
        if self.pos.numel() < x.shape[-1]:
            self.pos = torch.arange(x.shape[-1], dtype=x.dtype)
        return self.l(x + self.pos)


def test_a_non_persistent_cache_the_forward_fills_is_not_refused_and_members_follow_their_solo_runs(make_batches):
    batches = make_batches(3)
    states = [loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in (_LazyCache(0), _LazyCache(1))]
    ens = ensemble.stack(states)
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    for batch in batches:
        ens, _ = step(ens, batch)
    for k, state in enumerate(states):
        solo = _solo(state, batches)
        torch.testing.assert_close(ens.members[k].model.l.weight, solo.model.l.weight, rtol=1e-6, atol=1e-7)


def test_an_optimizer_that_needs_a_closure_is_refused_when_stacking():
    """Before, LBFGS failed in the step with torch's own 'missing 1 required positional argument: closure'."""
    model = _mlp(0)
    lbfgs = loopkit.TrainState.create(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="member 1's optimizer LBFGS needs a closure"):
        ensemble.stack([_states()[0], lbfgs])


@pytest.mark.parametrize("transform", [
    lambda s, d: loopkit.with_ema(s, 0.9),
    lambda s, d: loopkit.with_pruning(s, 0.5, [1]),
    lambda s, d: loopkit.with_qat(s),
    lambda s, d: loopkit.with_checkpointing(s, d, every_n_steps=1),
    lambda s, d: loopkit.with_profiler(s, d, wait=0, warmup=0, active=1),
    lambda s, d: loopkit.with_logging(s, loopkit.CSVLogger(d), every_n_steps=1),
    lambda s, d: loopkit.with_compile(s, backend="eager"),
    lambda s, d: loopkit.with_grad_clip(s, max_norm=1.0),
], ids=["with_ema", "with_pruning", "with_qat", "with_checkpointing", "with_profiler", "with_logging", "with_compile",
        "with_grad_clip"])
def test_transforms_of_one_state_refuse_an_ensemble_step_when_built(transform, tmp_path, request):
    """Before, the whole-step transforms built and then failed in the call, naming neither."""
    name = request.node.callspec.id
    with pytest.raises(TypeError, match=rf"{name} cannot wrap the ensemble step ensemble.train_step\(_loss\): it takes a "
                                        r"loopkit.ensemble.Ensemble"):
        transform(ensemble.train_step(_loss), tmp_path)


# what takes one loopkit.TrainState, given an ensemble (``e``, its step ``step``, data ``d``, a folder ``p``)
ONE_STATE = {
    "run_epochs": lambda e, step, d, p: loopkit.run_epochs(step, e, d, epochs=1, progress=False),
    "evaluate": lambda e, step, d, p: loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mse": _mse_loss(m, b)}), e, d),
    "predict": lambda e, step, d, p: loopkit.predict(lambda m, b: m(b[0]), e, d),
    "restore": lambda e, step, d, p: loopkit.restore(e, p),
    "save": lambda e, step, d, p: loopkit.checkpoint.save(e, p),
    "export_weights": lambda e, step, d, p: loopkit.export_weights(e, p / "w.safetensors"),
    "check_purity": lambda e, step, d, p: loopkit.check_purity(step, e, d[0]),
    "lr_find": lambda e, step, d, p: loopkit.lr_find(loopkit.train_step(_mse_loss), e, d),
    "scale_batch_size": lambda e, step, d, p: loopkit.scale_batch_size(loopkit.train_step(_mse_loss), e, lambda n: d),
    "summarize": lambda e, step, d, p: loopkit.summarize(e),
    "train_step": lambda e, step, d, p: loopkit.train_step(_mse_loss)(e, d[0]),
}


@pytest.mark.parametrize("where", list(ONE_STATE))
def test_what_takes_one_train_state_refuses_an_ensemble_saying_how_to_train_and_use_it(where, make_batches, tmp_path):
    """Before, the driver, evaluate, predict, restore, export_weights, check_purity, lr_find and summarize said only
    "state must be a loopkit.TrainState, got Ensemble" (checkpoint.save alone named unstack). Now each says what an
    Ensemble is, how to train it (its step in a loop of one's own) and how to give a member; the driver finds that
    out without importing loopkit.ensemble (the Ensemble class says it: instead_of_a_state)."""
    ens = ensemble.stack(_states())
    with pytest.raises(TypeError, match=r"got Ensemble \(an Ensemble is K member TrainStates, trained by its ensemble "
                                        r"step in a loop of your own: .*ens.members\[k\] as it is, or "
                                        r"loopkit.ensemble.unstack\(ens\)"):
        ONE_STATE[where](ens, ensemble.train_step(_mse_loss), make_batches(2), tmp_path)
    ens.check_usable()


def _clip_norm(optimizer, args, kwargs):
    """An optimizer step pre-hook: its parameters' gradients clipped to norm 0.5 (the README's recipe)."""
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm=0.5)


def test_per_member_clipping_by_an_optimizer_step_pre_hook_follows_the_solo_with_grad_clip_runs(make_batches):
    """The README's way to clip each member's gradients (no transform wraps an ensemble step): a step pre-hook on
    each member's optimizer, which the ensemble step runs as it steps that optimizer; each member ends as its solo
    run under loopkit.with_grad_clip."""
    batches = [(x, 10 * y) for x, y in make_batches(4)]  # (large errors: the clip bites)
    states = _states()
    for state in states:
        state.optimizer.register_step_pre_hook(_clip_norm)
    ens = ensemble.stack(states)
    step = ensemble.train_step(_mse_loss, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    for k, solo in enumerate(_states()):
        clipped = loopkit.with_grad_clip(loopkit.train_step(_mse_loss), max_norm=0.5)
        for batch in batches:
            solo, _ = clipped(solo, batch)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"member {k} {name}")


def _raising(model, batch):
    raise KeyError("the loss_fn's own bug")


# what loopkit.train_step refuses before anything changes in place (and what a loss_fn raises itself)
REFUSED = {
    "own_exception": (_raising, KeyError, "own bug"),
    "not_scalar": (lambda m, b: (m(b[0]) - b[1]) ** 2, ValueError, "the loss must be a scalar"),
    "no_gradient": (lambda m, b: _loss(m, b)[0].detach(), ValueError, "without a gradient"),
    "bad_metric": (lambda m, b: (_loss(m, b)[0], {"note": "text"}), TypeError, "note"),
    "aux_named_loss": (lambda m, b: (_loss(m, b)[0], {"loss": 1.0}), ValueError, "aux metric named 'loss'"),
}


@pytest.mark.parametrize("refused", list(REFUSED))
def test_a_donated_ensemble_step_that_fails_before_changing_anything_leaves_the_ensemble_usable(
        refused, make_batches, take_snapshot, assert_trees_equal):
    """As loopkit.donate leaves one state. Before, a finally: used up every member, and nothing came back."""
    loss_fn, kind, message = REFUSED[refused]
    batches = make_batches(2)
    # the reference: loopkit.donate keeps one state usable, and state_at_error gives it back
    solo = _states()[0]
    with pytest.raises(kind, match=message) as solo_error:
        loopkit.donate(loopkit.train_step(loss_fn))(solo, batches[0])
    solo.check_usable()
    assert loopkit.state_at_error(solo_error.value) is solo

    ens = ensemble.stack(_states())
    ens, _ = ensemble.train_step(_loss, donated=True)(ens, batches[0])  # some training, not to be lost
    before = [take_snapshot(m) for m in ens.members]
    params = {n: p.clone() for n, p in ens.params.items()}
    with pytest.raises(kind, match=message) as error:
        ensemble.train_step(loss_fn, donated=True)(ens, batches[1])
    ens.check_usable()
    assert loopkit.state_at_error(error.value) is ens
    for member, snap in zip(ens.members, before):
        member.check_usable()
        assert_trees_equal(take_snapshot(member), snap)  # parameters, optimizer state, counters: unchanged
    assert_trees_equal(dict(ens.params), params)
    # fixed, it trains on as if the failed call had never been made
    again, _ = ensemble.train_step(_loss, donated=True)(ens, batches[1])
    reference = ensemble.stack(_states())
    for batch in batches:
        reference, _ = ensemble.train_step(_loss, donated=True)(reference, batch)
    assert_trees_equal(dict(again.params), dict(reference.params))
    assert [m.step for m in again.members] == [2, 2, 2]


def _skipping(loss_fn):
    """``loss_fn`` on batches that have labelled rows (a third item, a mask): None (skip the batch) on one that has
    none, decided from the batch alone."""
    def skipping(model, batch):
        x, y, valid = batch
        if not valid.any():
            return None
        return loss_fn(model, (x[valid], y[valid]))
    return skipping


def _noisy_mse(model, batch):
    """:func:`_mse_loss` on inputs with Gaussian noise: it draws, so the members run one at a time."""
    x, y = batch
    return _mse_loss(model, (x + 0.1 * torch.randn_like(x), y))


@pytest.mark.parametrize("donated", [True, False])
@pytest.mark.parametrize("path", ["vmapped", "drawing", "unbatchable"])
def test_a_batch_every_members_loss_fn_skips_is_skipped_as_in_their_solo_runs(path, donated, make_batches):
    """Before, a loss_fn returning None (SPEC: skip the update for that batch) was refused ("an ensemble step cannot
    skip a batch for some members") though every member skipped it. Now the step skips it as loopkit.train_step does:
    no update, step as it was, batch_index one on, each member's RNG as its draws left it, no metrics; each member
    ends as its solo train_step run on the same batches (bitwise one member at a time)."""
    loss_fn = _skipping({"vmapped": _mse_loss, "drawing": _noisy_mse, "unbatchable": _checked_scaled_loss}[path])
    labelled = [(x, y, torch.ones(len(x), dtype=torch.bool)) for x, y in make_batches(3)]
    empty = (labelled[0][0], labelled[0][1], torch.zeros(len(labelled[0][0]), dtype=torch.bool))
    batches = [labelled[0], empty, labelled[1], empty, labelled[2]]
    ens = ensemble.stack(_states())
    step = ensemble.train_step(loss_fn, donated=donated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (unbatchable: said once)
        for i, batch in enumerate(batches):
            params = {n: p.clone() for n, p in ens.params.items()}
            ens, metrics = step(ens, batch)
            if batch is empty:
                assert metrics == {} and all(torch.equal(p, params[n]) for n, p in ens.params.items())
    assert step.draws_random == (path == "drawing") and step.unbatchable == (path == "unbatchable")
    exact = {"rtol": 0, "atol": 0} if path != "vmapped" else {"rtol": 1e-5, "atol": 1e-6}
    for k, solo in enumerate(_states()):
        solo_step = loopkit.train_step(loss_fn)
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        member = ens.members[k]
        assert (member.step, member.batch_index) == (solo.step, solo.batch_index) == (3, 5)
        assert torch.equal(member.rng["cpu"], solo.rng["cpu"])
        for (name, p), q in zip(solo.model.named_parameters(), member.model.parameters()):
            torch.testing.assert_close(q, p, **exact, msg=f"member {k} {name}")
        torch.testing.assert_close(member.optimizer.state_dict(), solo.optimizer.state_dict(), **exact)


def test_a_batch_some_members_skip_is_refused_naming_them_and_the_ensemble_stays_usable(make_batches):
    """One member at a time, a loss_fn may decide from a member's own values: a skip by some members only cannot be
    one update of every member (each has one step and one batch_index), and is refused before any member updates."""
    def skips_the_largest(model, batch):
        if model[0].bias.sum().item() > biases[1]:
            return None
        return _mse_loss(model, batch)

    batches = make_batches(2)
    ens, _ = ensemble.train_step(_loss, donated=True)(ensemble.stack(_states()), batches[0])
    biases = sorted(m.model[0].bias.sum().item() for m in ens.members)
    largest = max(range(3), key=lambda k: ens.members[k].model[0].bias.sum().item())
    params = {n: p.clone() for n, p in ens.params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=rf"returned None \(skip the batch\) for member\(s\) \[{largest}\] and a "
                                             "loss for member.*updates every member or none") as error:
            ensemble.train_step(skips_the_largest, donated=True)(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    assert all(torch.equal(p, params[n]) for n, p in ens.params.items())
    assert [m.step for m in ens.members] == [1, 1, 1] and [m.batch_index for m in ens.members] == [1, 1, 1]
    ensemble.train_step(_loss, donated=True)(ens, batches[1])


def test_a_donated_ensemble_step_that_fails_after_changing_something_uses_the_ensemble_up(make_batches):
    batch = make_batches(1)[0]
    ens = ensemble.stack(_states())

    def broken_step(*args, **kwargs):
        raise RuntimeError("the optimizer's own error")

    ens.members[1].optimizer.step = broken_step  # member 0 is updated in place before member 1 fails
    with pytest.raises(RuntimeError, match="optimizer's own error") as error:
        ensemble.train_step(_loss, donated=True)(ens, batch)
    assert loopkit.state_at_error(error.value) is None
    with pytest.raises(loopkit.DonatedStateError):
        ens.check_usable()
    for member in ens.members:
        with pytest.raises(loopkit.DonatedStateError):
            member.check_usable()


class _CountsLater(_Counter):
    """Counts its calls in a buffer from its second call on (a statistic tracked after a warm-up)."""

    def forward(self, x):
        self.warm = getattr(self, "warm", False)
        if self.warm and self.reassign:
            self.calls = self.calls + 1
        elif self.warm:
            self.calls += 1
        self.warm = True
        return self.l(x) * self.scale


@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
@pytest.mark.parametrize("reassign", [False, True], ids=["in place", "replaced"])
def test_a_donated_step_that_refuses_a_buffer_change_leaves_the_trained_ensemble_usable(reassign, path, make_batches):
    """Before, a buffer changed in place (only the step's stacked copy of the buffers: the members' own are never
    written) used up the whole trained ensemble: state_at_error gave nothing back and every member raised
    DonatedStateError. Now the stacked copy is stacked again from the members' own, and the ensemble, its members as
    they were, trains on once the forward leaves its buffers alone (reference: a run without the refused call)."""
    loss_fn = {"vmapped": _loss, "one member at a time": _noisy_loss}[path]
    batches = make_batches(3)
    states = [_sgd(_CountsLater(k, reassign)) for k in range(2)]
    ens = ensemble.stack(states)
    step = ensemble.train_step(loss_fn, donated=True)
    ens, _ = step(ens, batches[0])
    params = {n: p.clone() for n, p in ens.params.items()}
    with pytest.raises(RuntimeError, match=r"changed the buffer\(s\) 'calls' in its forward") as error:
        step(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    ens.check_usable()
    assert [m.step for m in ens.members] == [1, 1]
    assert all(torch.equal(ens.params[n], params[n]) for n in params)
    assert float(ens.buffers["calls"].abs().sum()) == 0 and float(ens.members[1].model.calls) == 0
    for member in ens.members:
        member.model.warm = False  # (fixed: it counts no more)
    ens, _ = step(ens, batches[1])
    reference = ensemble.stack(states)
    for batch in batches[:2]:
        for state in reference.members:
            state.model.warm = False
        reference, _ = ensemble.train_step(loss_fn, donated=True)(reference, batch)
    assert all(torch.equal(ens.params[n], reference.params[n]) for n in params)
    assert [m.step for m in ens.members] == [2, 2]


class _FilledCache(nn.Module):
    """A non-persistent cache buffer (a position or rotary table) that the first forward fills in place, with a plain
    flag saying so, and that the forward reads."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.register_buffer("table", torch.zeros(4), persistent=False)
        self.filled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.filled:
            self.table.copy_(torch.arange(1.0, 5.0))
            self.filled = True
        return self.l(x * self.table)


def _unscalar_metric(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn`` returning a metric that is no scalar, which the step refuses after the forward ran."""
    def refused(model, batch):
        return loss_fn(model, batch)[0], {"oops": torch.ones(3)}
    return refused


def _cache_states() -> list[loopkit.TrainState]:
    return [loopkit.TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1), seed=10 + k)
            for k, m in enumerate(_FilledCache(k) for k in range(3))]


def _assert_cached_members_are_their_solo_runs(ens, loss_fn, batches, refused_first=False, rtol=1e-6, atol=1e-7):
    """Each member of ``ens``, and its unstacked copy trained one batch further, equals its solo run (donated, after
    the same refused call first if ``refused_first``): its table, flag and parameters."""
    for k, (solo, member) in enumerate(zip(_cache_states(), ensemble.unstack(ens))):
        step = loopkit.donate(loopkit.train_step(loss_fn))
        if refused_first:
            with pytest.raises(TypeError, match="metric 'oops'") as error:
                loopkit.donate(loopkit.train_step(_unscalar_metric(loss_fn)))(solo, batches[0])
            solo = loopkit.state_at_error(error.value)
        for batch in batches:
            solo, _ = step(solo, batch)
        assert torch.equal(ens.members[k].model.table, solo.model.table), f"member {k}: {ens.members[k].model.table}"
        assert ens.members[k].model.filled and member.model.filled
        solo, _ = step(solo, batches[0])
        member, _ = step(member, batches[0])
        for (name, p), q in zip(solo.model.named_parameters(), member.model.parameters()):
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol, msg=f"member {k} {name}")


@pytest.mark.parametrize("donated", [False, True])
@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
def test_a_cache_the_forward_fills_in_place_reaches_every_members_own_as_in_its_solo_run(path, donated, make_batches):
    """Before, only the step's stacked copy of the buffers was filled, while the plain flag reached every member: a
    member used alone (unstack, members[k]) ran with an empty table where its solo run has the filled one."""
    loss_fn = {"vmapped": _loss, "one member at a time": _noisy_loss}[path]
    batches = make_batches(2)
    ens = ensemble.stack(_cache_states())
    step = ensemble.train_step(loss_fn, donated=donated)
    for batch in batches:
        ens, _ = step(ens, batch)
    _assert_cached_members_are_their_solo_runs(ens, loss_fn, batches)


@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
def test_a_donated_step_refused_after_the_forward_filled_a_cache_keeps_it_filled_as_its_solo_run(path, make_batches):
    """Before, the refused call stacked every buffer the forward wrote again from the members' own (a cache too, never
    filled there) while the flag stayed set: the next calls trained on an empty table (losses off the solo runs')."""
    loss_fn = {"vmapped": _loss, "one member at a time": _noisy_loss}[path]
    batches = make_batches(2)
    ens = ensemble.stack(_cache_states())
    with pytest.raises(TypeError, match="metric 'oops'") as error:
        ensemble.train_step(_unscalar_metric(loss_fn), donated=True)(ens, batches[0])
    ens = loopkit.state_at_error(error.value)
    assert torch.equal(ens.buffers["table"], torch.arange(1.0, 5.0).expand(3, 4))
    step = ensemble.train_step(loss_fn, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    _assert_cached_members_are_their_solo_runs(ens, loss_fn, batches, refused_first=True)


def test_donated_must_be_a_bool():
    """Before, donated="no" was taken as donated (truthy)."""
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match=f"ensemble.train_step: donated must be True or False, got {bad!r}"):
            ensemble.train_step(_loss, donated=bad)
    assert ensemble.train_step(_loss, donated=False).donated is False


class _AuxHead(nn.Module):
    """A body, a head, and an auxiliary head that the loss uses only on batches flagged so."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body, self.head, self.aux_head = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head(h), self.aux_head(h)


def _aux_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
    x, y, use_aux = batch
    out, aux = model(x)
    loss = ((out - y) ** 2).mean()
    return loss + (aux**2).mean() if use_aux else loss  # aux_head unused (no gradient path) on the other batches


# decoupled and coupled weight decay, momentum, Adam moments: each would move a parameter given a zero gradient
AUX_OPTIMIZERS = [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
]


def _noisy_aux_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
    """:func:`_aux_loss` on inputs with Gaussian noise: it draws, so the members run one at a time."""
    x, y, use_aux = batch
    return _aux_loss(model, (x + 0.3 * torch.randn_like(x), y, use_aux))


def _checked_aux_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
    """:func:`_aux_loss` with a ``.item()`` check vmap cannot run: the members run one at a time."""
    loss = _aux_loss(model, batch)
    if loss.item() > 1e6:
        raise FloatingPointError("diverged")
    return loss


# how the members' gradients are computed: vmapped, or one member at a time (a draw, or what vmap cannot run)
AUX_LOSSES = {"vmapped": _aux_loss, "drawing": _noisy_aux_loss, "unbatchable": _checked_aux_loss}


@pytest.mark.parametrize("path", list(AUX_LOSSES))
def test_a_parameter_the_loss_does_not_reach_keeps_no_gradient_as_in_its_solo_run(path, make_batches):
    """Before, torch.func.grad gave the unused aux head a zero gradient: weight decay shrank it, momentum kept moving
    it after the one batch that used it, and Adam/AdamW made state for it, where a solo run's optimizer skips it.
    One member at a time (a loss that draws, or one vmap cannot run), each member's own gradients are dropped alike
    (no test failed when they were kept). Reference: each member's solo train_step run (its own seed's draws)."""
    loss_fn = AUX_LOSSES[path]
    flags = [False, False, True, False, False]  # unused, used once, unused again
    batches = [(x, y, flag) for (x, y), flag in zip(make_batches(len(flags)), flags)]

    def states() -> list[loopkit.TrainState]:
        out = []
        for seed, make_opt in enumerate(AUX_OPTIMIZERS):
            model = _AuxHead(seed)
            out.append(loopkit.TrainState.create(model, make_opt(model.parameters()), seed=seed))
        return out

    initial = [s.model.aux_head.weight.detach().clone() for s in states()]
    ens, step = ensemble.stack(states()), ensemble.train_step(loss_fn, donated=True)
    for i, batch in enumerate(batches):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
            ens, _ = step(ens, batch)
        if i == 0:  # not reached yet: untouched, and no optimizer state
            for k, member in enumerate(ens.members):
                assert torch.equal(member.model.aux_head.weight, initial[k]), f"member {k}"
                assert member.model.aux_head.weight not in member.optimizer.state
    assert (step.draws_random, step.unbatchable) == (path == "drawing", path == "unbatchable")
    solo_step = loopkit.train_step(loss_fn)
    for k, solo in enumerate(states()):  # the reference: each member trained alone
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        member = ens.members[k]
        for (name, p), q in zip(solo.model.named_parameters(), member.model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"member {k} {name}")
            assert q.grad is None
        assert len(member.optimizer.state) == len(solo.optimizer.state)
        torch.testing.assert_close(member.optimizer.state_dict(), solo.optimizer.state_dict(), rtol=1e-5, atol=1e-7)


def _conv(seed: int, stride: int = 1) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv1d(1, 4, 3, stride=stride), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2))


def _normed(seed: int, norm: nn.Module) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), norm, nn.Tanh(), nn.Linear(16, 2))


class _Tempered(nn.Module):
    """A plain attribute (not a tensor) that the forward reads."""

    def __init__(self, seed: int, temperature: float = 1.0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x) / self.temperature


def _sgd(model: nn.Module) -> loopkit.TrainState:
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_members_whose_layers_differ_in_settings_are_refused_naming_the_module_and_both_values(make_batches):
    """Before, members with the same parameter shapes but another stride, group count, eps or temperature stacked,
    and the step ran member 0's modules for all: member 1 silently trained as another network than its solo run."""
    cases = [
        ((_conv(0), _conv(1, stride=2)), r"member 1's module 0 \(Conv1d\) has stride=\(2,\) where member 0's has stride=\(1,\)"),
        ((_normed(0, nn.GroupNorm(1, 16)), _normed(1, nn.GroupNorm(8, 16))),
         r"member 1's module 1 \(GroupNorm\) has num_groups=8 where member 0's has num_groups=1"),
        ((_normed(0, nn.LayerNorm(16)), _normed(1, nn.LayerNorm(16, eps=1e-3))),
         r"member 1's module 1 \(LayerNorm\) has eps=0.001 where member 0's has eps=1e-05"),
        ((_Tempered(0), _Tempered(1, temperature=2.0)),
         r"member 1's module \(model\) \(_Tempered\) has temperature=2.0 where member 0's has temperature=1.0"),
    ]
    for models, message in cases:
        with pytest.raises(ValueError, match=rf"ensemble.stack: {message}; the vmapped step runs member 0's modules"):
            ensemble.stack([_sgd(m) for m in models])
    tagged = _mlp(1)
    tagged.temperature = 2.0  # set on one member only
    with pytest.raises(ValueError, match=r"member 2's module \(model\) \(Sequential\) has temperature=2.0 where member "
                                         r"0's has temperature=<not set>"):
        ensemble.stack([_sgd(_mlp(0)), _sgd(_mlp(2)), _sgd(tagged)])
    ens = ensemble.stack([_sgd(_Tempered(0)), _sgd(_Tempered(1))])
    ens.members[1].model.temperature = 3.0  # after stacking: refused by the step too (a donated one does not stack again)
    for step in (ensemble.train_step(_loss), ensemble.train_step(_loss, donated=True)):
        with pytest.raises(ValueError, match=r"member 1's module \(model\) \(_Tempered\) has temperature=3.0 where"):
            step(ens, make_batches(1)[0])


def test_deep_copies_with_other_parameter_values_stack_and_follow_their_solo_runs(make_batches):
    """The settings compared are plain attributes, not parameter values: copies of one model, perturbed, stack."""
    template = nn.Sequential(_conv(0, stride=2), nn.LayerNorm(2, eps=1e-3))
    models = []
    for seed in range(3):
        model = copy.deepcopy(template)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        models.append(model)
    batches = [(x.unsqueeze(1).repeat(1, 1, 3), y) for x, y in make_batches(4)]
    states = [_sgd(m) for m in models]
    ens = _together(states, batches)
    _assert_follow_solo(ens, states, batches, rtol=1e-5, atol=1e-6)


class _SeenWidth(nn.Module):
    """A forward that records a plain setting (as a lazily grown cache records its length)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.seen_width: int | None = None
        self.widths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_width = max(self.seen_width or 0, x.shape[-1])
        self.widths.append(x.shape[-1])
        return self.l(x) / self.seen_width


def test_settings_a_forward_sets_reach_every_member_as_in_their_solo_runs(make_batches):
    """The step runs member 0's modules: a setting their forward records must reach every member, as each one's own
    forward sets it in a solo run (and the next step does not refuse the members as differing)."""
    batches = make_batches(3)
    for donated in (True, False):
        states = [_sgd(_SeenWidth(seed)) for seed in range(3)]
        ens = _together(states, batches, donated)
        for k, state in enumerate(states):
            solo = _solo(state, batches)
            assert (ens.members[k].model.seen_width, ens.members[k].model.widths) == (4, [4, 4, 4]) == (
                solo.model.seen_width, solo.model.widths), f"member {k}"
            torch.testing.assert_close(ens.members[k].model.l.weight, solo.model.l.weight, rtol=1e-6, atol=1e-7)
        assert ens.members[1].model.widths is not ens.members[2].model.widths  # copies, not one shared list


def test_settings_a_forward_sets_before_the_loss_fn_raises_reach_every_member_as_in_their_solo_runs(make_batches):
    """loopkit.donate keeps what the forward set when the loss_fn then raises: so does a donated ensemble step, for
    every member (before, member 0's differed from the others' and the next step refused them)."""
    batch = make_batches(1)[0]

    def failing(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        model(batch[0])
        raise KeyError("the loss_fn's own bug")

    states = [_sgd(_SeenWidth(seed)) for seed in range(3)]
    ens = ensemble.stack(states)
    with pytest.raises(KeyError, match="own bug"):
        ensemble.train_step(failing, donated=True)(ens, batch)
    solo = states[1]
    with pytest.raises(KeyError, match="own bug"):
        loopkit.donate(loopkit.train_step(failing))(solo, batch)
    for k, member in enumerate(ens.members):
        assert (member.model.seen_width, member.model.widths) == (solo.model.seen_width, solo.model.widths) == (4, [4]), k
    ens, _ = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)(ens, batch)
    assert [m.model.widths for m in ens.members] == [[4, 4]] * 3


def test_members_whose_numpy_settings_differ_are_refused():
    """A temperature given as a numpy scalar was not compared: member 1 trained with member 0's, silently."""
    import numpy as np

    with pytest.raises(ValueError, match=r"has temperature=np.float32\(4.0\) where member 0's has temperature=np.float32\(1.0\)"):
        ensemble.stack([_sgd(_Tempered(0, np.float32(1.0))), _sgd(_Tempered(1, np.float32(4.0)))])
    ensemble.stack([_sgd(_Tempered(0, np.float32(2.0))), _sgd(_Tempered(1, np.float32(2.0)))])  # equal ones stack


class _Projected(nn.Module):
    """A fixed random projection kept as a plain tensor (not a buffer), a dict and a private number the forward reads."""

    def __init__(self, seed: int, same: tuple[str, ...] = ()) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(100 + (0 if "proj" in same else seed))
        self.proj = torch.randn(4, 4, generator=g)
        self.cfg = {"scale": 1.0 + (0 if "cfg" in same else seed)}
        self._shift = 0.5 * (0 if "_shift" in same else seed)
        self.names = ["a", "b"]  # (equal in every member)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x @ self.proj) * self.cfg["scale"] + self._shift


@pytest.mark.parametrize("differing", ["proj", "cfg", "_shift"])
def test_members_whose_tensor_dict_or_private_values_differ_are_refused(differing, make_batches):
    """They stacked, and the step ran member 0's projection, config and shift for every member: member 1 trained away
    from its solo run (by 0.05-0.08) without a word. Members equal in them stack and follow their solo runs."""
    same = tuple(n for n in ("proj", "cfg", "_shift") if n != differing)
    with pytest.raises(ValueError, match=rf"member 1's module \(model\) \(_Projected\) has another '{differing}' than "
                                         "member 0's"):
        ensemble.stack([_sgd(_Projected(0, same)), _sgd(_Projected(1, same))])
    states = [_sgd(_Projected(k, ("proj", "cfg", "_shift"))) for k in range(2)]
    batches = make_batches(3)
    ens = _together(states, batches)
    _assert_follow_solo(ens, states, batches)


class _Listed(nn.Module):
    """Plain values kept in lists: projections (tensors, not buffers) and per-layer configs (dicts)."""

    def __init__(self, seed: int, scale: float = 1.0) -> None:
        super().__init__()
        self.projs = [torch.eye(4) * scale]
        self.cfgs = [{"scale": scale}]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x @ self.projs[0]) * self.cfgs[0]["scale"]


def test_members_with_equal_lists_of_tensors_or_dicts_stack_and_differing_ones_are_refused(make_batches):
    """A list of tensors or of dicts was compared by identity (each member's own list never matched): equal members
    were refused as differing. Reference: the solo runs; members that differ are still refused."""
    states = [_sgd(_Listed(k)) for k in range(2)]
    batches = make_batches(3)
    ens = _together(states, batches, donated=False)
    _assert_follow_solo(ens, states, batches)
    with pytest.raises(ValueError, match=r"member 1's module \(model\) \(_Listed\) has another 'cfgs' than member 0's"):
        ensemble.stack([_sgd(_Listed(0)), _sgd(_Listed(1, scale=2.0))])


def test_a_pickled_ensemble_holds_each_member_once():
    """Each member's parameters are views of the stacked storage, and pickle writes a view's whole base: K members
    pickled K x K members' worth (61.6 x one member at K = 8). Reference: the pickled unstacked members."""
    import pickle

    states = [_sgd(_mlp(k)) for k in range(8)]
    ens = ensemble.stack(states)
    size, reference = len(pickle.dumps(ens)), len(pickle.dumps(ensemble.unstack(ens)))
    assert size <= 1.05 * reference
    again = pickle.loads(pickle.dumps(ens))
    assert all(torch.equal(again.params[n], ens.params[n]) for n in ens.params)


def test_members_with_a_frozen_batchnorm_in_eval_mode_follow_their_solo_runs(make_batches):
    """A BatchNorm in eval mode (a fine-tuned backbone's: it reads its running statistics) was refused, with advice
    (track_running_stats=False) that makes it another function. Reference: each member trained alone. Set to
    train mode after stacking, the step refuses it (stack again, or the buffers it would update)."""
    def member(k):
        model = _mlp(k, norm=nn.BatchNorm1d(16))
        with torch.no_grad():
            model[1].running_mean.fill_(0.1 * k)
            model[1].running_var.fill_(1.0 + k)
        model[1].eval()
        return _sgd(model)

    states = [member(k) for k in range(3)]
    batches = make_batches(3)
    ens = _together(states, batches)
    _assert_follow_solo(ens, states, batches)
    for m in ens.members:
        m.model[1].train()
    with pytest.raises(TypeError, match="BatchNorm1d in training mode with running statistics"):
        ensemble.train_step(_loss)(ens, batches[0])  # (stacked again)
    with pytest.raises(RuntimeError, match="changed the buffer"):
        ensemble.train_step(_loss, donated=True)(ens, batches[0])


class _Keeping(nn.Module):
    """Keeps its last activations on itself, as a feature-capturing model does."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.last_h = h.detach()
        return self.b(h)


_KEPT = r"kept tensors of the step's call \(vmapped, or one member at a time\) on the model \("

@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
@pytest.mark.parametrize("donated", [False, True])
def test_a_forward_that_keeps_a_tensor_on_the_model_is_refused_before_any_member_updates(donated, path, make_batches):
    """It trained, and left a tensor of the vmapped call on member 0's module: unstack, deepcopy and pickle of the
    members then failed in functorch ("your tensor may have escaped"). One member at a time (a loss that draws) the
    tensor is a plain one, the last member's, as much no member's own. Reference: the members as stacked."""
    loss_fn = {"vmapped": _loss, "one member at a time": _noisy_loss}[path]
    ens = ensemble.stack([_sgd(_Keeping(k)) for k in range(2)])
    before = {n: t.clone() for n, t in ens.params.items()}
    with pytest.raises(RuntimeError, match=_KEPT + r"last_h: set to None\)"):
        ensemble.train_step(loss_fn, donated=donated)(ens, make_batches(1)[0])
    assert all(torch.equal(ens.params[n], before[n]) for n in before)
    members = ensemble.unstack(ens)  # (still usable, and copies)
    assert torch.equal(members[1].model.a.weight, before["a.weight"][1])


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (vmap of weight_norm, torch's own)
def test_members_with_an_old_style_weight_norm_train_and_unstack(make_batches):
    """torch's weight_norm hook recomputes ``weight`` before each forward and keeps it on the module: it was taken
    for a tensor the forward kept, and the step refused the ensemble. Reference: each member trained alone."""
    import warnings

    def member(k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (torch prefers the parametrization)
            model = _mlp(k)
            model[0] = nn.utils.weight_norm(model[0])
        return _sgd(model)

    states = [member(k) for k in range(2)]
    batches = make_batches(3)
    ens = _together(states, batches)
    _assert_follow_solo(ens, states, batches)
    assert all(isinstance(m.model[0].weight_v, nn.Parameter) for m in ensemble.unstack(ens))


class _Recurrent(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.r, self.out = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.r(x.unsqueeze(1))[0][:, -1])


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (vmap of the LSTM kernel, torch's own)
def test_members_with_an_lstm_train_for_several_steps_as_their_solo_runs(make_batches):
    """From the second step on the step refused them: after a vmapped call torch's own list of the LSTM's weights
    (_flat_weights) held the call's tensors, which the check of members' values took for a differing attribute."""
    states = [_sgd(_Recurrent(k)) for k in range(2)]
    batches = make_batches(3)
    for donated in (True, False):
        ens = _together(states, batches, donated)
        _assert_follow_solo(ens, states, batches, rtol=1e-5, atol=1e-6)
        ensemble.unstack(ens)


class _Collecting(nn.Module):
    """Keeps its activations in a list and a dict, as a feature-capturing model does."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.acts: list = []
        self.cache: dict = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        self.acts.append(h.detach())
        self.cache["h"] = h.detach()
        return self.b(h)


def test_a_forward_that_keeps_tensors_in_a_list_or_dict_is_refused_and_they_are_taken_out(make_batches):
    """A dict's tensor escaped silently (unstack failed later in functorch); a list's made the step fail inside
    deepcopy ("Cannot access storage of TensorWrapper")."""
    ens = ensemble.stack([_sgd(_Collecting(k)) for k in range(2)])
    with pytest.raises(RuntimeError, match=_KEPT + r"acts: taken out of it; "
                                           r"cache: taken out of it\)"):
        ensemble.train_step(_loss, donated=True)(ens, make_batches(1)[0])
    assert ens.skeleton.acts == [] and ens.skeleton.cache == {}
    ensemble.unstack(ens)


class _Registering(nn.Module):
    """Registers its activations as a (non-persistent) buffer in its forward."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.register_buffer("last", h.detach(), persistent=False)
        return h


def test_a_forward_that_registers_a_buffer_is_refused_and_it_is_taken_out(make_batches):
    """The search for a forward's kept tensors skips a module's hook and submodule registries, not its buffers."""
    ens = ensemble.stack([_sgd(_Registering(k)) for k in range(2)])
    with pytest.raises(RuntimeError, match=_KEPT + r"_buffers: taken out of it\)"):
        ensemble.train_step(_loss, donated=True)(ens, make_batches(1)[0])
    assert "last" not in ens.skeleton._buffers
    ensemble.unstack(ens)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_an_lstm_ensemble_stays_usable_after_its_loss_fn_raises(make_batches):
    """The LSTM's own list of its weights kept the failed vmapped call's tensors: a later pure step, deepcopy or
    stack of the members failed ("member 1's module r (LSTM) has another '_flat_weights'")."""
    states = [_sgd(_Recurrent(k)) for k in range(2)]
    ens = ensemble.stack(states)

    def failing(model, batch):
        model(batch[0])
        raise ValueError("the loss_fn's own error")

    with pytest.raises(ValueError, match="the loss_fn's own error"):
        ensemble.train_step(failing, donated=True)(ens, make_batches(1)[0])
    copy.deepcopy(ens)
    ens, _ = ensemble.train_step(_loss)(ens, make_batches(1)[0])


# --- a loss_fn that draws random numbers: one member at a time, each from its own RNG ------------------------------


def _noisy_loss(model, batch):
    """The loss of :func:`_loss` on inputs with Gaussian noise (``torch.randn_like``): a draw outside any module."""
    x, y = batch
    err = model(x + 0.3 * torch.randn_like(x)) - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def _raw_random(seed, model, make_opt, make_sched, loss_fn, batches):
    """The reference for a member whose loss draws: a hand-written loop whose draws come from torch's global RNG
    seeded with the member's seed (what ``TrainState.create(seed=seed)`` holds), the caller's RNG put back after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = _raw_loop(model, make_opt, make_sched, lambda m, b: loss_fn(m, b)[0], batches)
        rng = torch.get_rng_state()
    return model, losses, rng


class _Transposed(nn.Module):
    """Dropout of a non-contiguous activation (a transpose, as attention and conv-to-sequence code have), or a
    TransformerEncoderLayer with dropout: under torch.func.grad torch fills such a mask in another order than the
    solo run's dropout does (the members drew other masks than their solo runs)."""

    def __init__(self, seed: int, transformer: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 12), nn.Linear(4, 2)
            self.mid = (nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2, batch_first=True) if transformer
                        else nn.Dropout(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).view(-1, 3, 4)
        if isinstance(self.mid, nn.Dropout):
            return self.b(self.mid(h.transpose(1, 2)).mean(2))  # (the dropout's input: [N, 4, 3], not contiguous)
        return self.b(self.mid(h).mean(1))


# (model, loss_fn): a dropout layer's draws, a loss_fn's own torch.randn_like, and both
RANDOM = {
    "dropout": (lambda seed: _mlp(seed, dropout=True), _loss),
    "randn_like_in_the_loss": (lambda seed: _mlp(seed), _noisy_loss),
    "both": (lambda seed: _mlp(seed, dropout=True), _noisy_loss),
    "dropout_of_a_transposed_activation": (_Transposed, _loss),
    "transformer_encoder_layer": (functools.partial(_Transposed, transformer=True), _loss),
}


def _random_states(make_model, seeds=(10, 11, 12)):
    """The members of MEMBERS (their initial weights, optimizer, learning rate, scheduler), each with its own RNG
    seed ``seeds[k]`` (what its dropout masks and noise draw from)."""
    states = []
    for (init, make_opt, make_sched), seed in zip(MEMBERS, seeds):
        model = make_model(init)
        opt = make_opt(model.parameters())
        states.append(loopkit.TrainState.create(model, opt, make_sched(opt) if make_sched else None, seed=seed))
    return states


@pytest.mark.parametrize("random", list(RANDOM))
def test_members_whose_loss_draws_random_numbers_follow_their_solo_runs_bitwise(random, make_batches):
    """Before, a model with dropout (or a loss_fn calling torch.randn_like) was refused ("draws random numbers ...
    remove the randomness"): a member's seed never mattered. Now each member draws from its own RNG, one member at a
    time (no batched arithmetic), so each equals its solo loopkit.train_step run and its own hand-written loop
    bitwise: parameters, losses, optimizer state and the RNG state it ends with."""
    make_model, loss_fn = RANDOM[random]
    batches = make_batches(STEPS)
    seeds = (10, 11, 12)
    ens = ensemble.stack(_random_states(make_model, seeds))
    step = ensemble.train_step(loss_fn, donated=True)
    losses = []
    for batch in batches:
        ens, metrics = step(ens, batch)
        losses.append(metrics["loss"])
        assert metrics["loss"].shape == metrics["mae"].shape == (3,)
    assert step.draws_random
    losses = torch.stack(losses)
    for k, ((init, make_opt, make_sched), seed) in enumerate(zip(MEMBERS, seeds)):
        member = ens.members[k]
        assert member.step == STEPS and member.batch_index == STEPS
        raw, raw_losses, raw_rng = _raw_random(seed, make_model(init), make_opt, make_sched, loss_fn, batches)
        assert torch.equal(losses[:, k], raw_losses), f"member {k}"
        solo = _random_states(make_model, seeds)[k]
        solo_step = loopkit.donate(loopkit.train_step(loss_fn))
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        for (name, p), q, r in zip(raw.named_parameters(), member.model.parameters(), solo.model.parameters()):
            assert torch.equal(q, p), f"member {k} {name}: differs from its hand-written loop"
            assert torch.equal(q, r), f"member {k} {name}: differs from its solo train_step run"
            assert torch.equal(ens.params[name][k], p)
        torch.testing.assert_close(member.optimizer.state_dict(), solo.optimizer.state_dict(), rtol=0, atol=0)
        assert torch.equal(member.rng["cpu"], solo.rng["cpu"]) and torch.equal(member.rng["cpu"], raw_rng)
        assert not torch.equal(member.rng["cpu"], loopkit.TrainState.create(nn.Linear(1, 1), seed=seed).rng["cpu"])


def _first_draw(model, batch):
    """The loss of :func:`_loss` through the model's dropout, reporting the first number the loss_fn draws itself and
    how many units the dropout dropped (its mask)."""
    x, y = batch
    noise = torch.randn_like(y)
    out = model(x)
    dropped = (model[2](torch.ones(8, 16)) == 0).sum().float()  # (the same Dropout: the next mask it draws)
    return ((out - y) ** 2).mean() + 0 * noise.sum(), {"noise": noise[0, 0], "dropped": dropped}


def test_each_member_draws_from_its_own_seed_and_not_from_the_global_rng(make_batches):
    """The same initial weights and optimizer in every member: members 0 and 2 share a seed, member 1 has its own. So
    0 and 2 draw the same masks and noise and stay bitwise equal, and member 1 draws other ones and trains apart
    (the seed matters). The caller's global RNG neither feeds the draws nor moves."""
    batches = make_batches(3)

    def states(seeds):
        out = []
        for seed in seeds:
            model = _mlp(0, dropout=True)
            out.append(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=seed))
        return out

    ens = ensemble.stack(states((5, 6, 5)))
    step = ensemble.train_step(_first_draw, donated=True)
    rows = []
    for batch in batches:
        torch.manual_seed(1234)  # the global RNG: none of the members' business
        before = torch.get_rng_state()
        ens, metrics = step(ens, batch)
        assert torch.equal(torch.get_rng_state(), before), "the step moved the caller's global RNG"
        rows.append(metrics)
    for metrics in rows:
        assert metrics["noise"][0] == metrics["noise"][2] and metrics["noise"][0] != metrics["noise"][1]
        assert metrics["dropped"][0] == metrics["dropped"][2]
    assert any(m["dropped"][0] != m["dropped"][1] for m in rows)
    for name, stacked in ens.params.items():
        assert torch.equal(stacked[0], stacked[2]), name
    assert not torch.equal(ens.params["0.weight"][0], ens.params["0.weight"][1])
    # and each is what its solo run with its seed draws (the first noise value: the first number drawn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        assert float(rows[0]["noise"][1]) == float(torch.randn(8, 2)[0, 0])


def test_a_state_dict_round_trip_mid_run_continues_as_the_uninterrupted_run(make_batches):
    """Half the run, then each member's state_dict (its RNG among it) saved and loaded into fresh states, stacked
    again and trained by a new step: the same masks and noise, bitwise the uninterrupted ensemble's (and solo) run."""
    batches = make_batches(STEPS)
    make_model, loss_fn = RANDOM["both"]
    whole = ensemble.stack(_random_states(make_model))
    step = ensemble.train_step(loss_fn, donated=True)
    for batch in batches:
        whole, _ = step(whole, batch)

    ens = ensemble.stack(_random_states(make_model))
    step = ensemble.train_step(loss_fn, donated=True)
    for batch in batches[: STEPS // 2]:
        ens, _ = step(ens, batch)
    saved = []
    for member in ensemble.unstack(ens):
        buffer = io.BytesIO()
        torch.save(member.state_dict(), buffer)
        saved.append(buffer.getvalue())
    fresh = _random_states(make_model, seeds=(20, 21, 22))  # other seeds: the loaded RNGs must replace theirs
    loaded = [state.load_state_dict(torch.load(io.BytesIO(data), weights_only=False)) for state, data in zip(fresh, saved)]
    resumed = ensemble.stack(loaded)
    step = ensemble.train_step(loss_fn, donated=True)
    for batch in batches[STEPS // 2:]:
        resumed, _ = step(resumed, batch)
    for name in whole.params:
        assert torch.equal(resumed.params[name], whole.params[name]), name
    for a, b in zip(resumed.members, whole.members):
        assert a.step == b.step == STEPS and torch.equal(a.rng["cpu"], b.rng["cpu"])
        torch.testing.assert_close(a.optimizer.state_dict(), b.optimizer.state_dict(), rtol=0, atol=0)
    _assert_random_follow_solo(whole, make_model, loss_fn, batches)


def _assert_random_follow_solo(ens, make_model, loss_fn, batches, seeds=(10, 11, 12)):
    for k, solo in enumerate(_random_states(make_model, seeds)):
        solo_step = loopkit.train_step(loss_fn)
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            assert torch.equal(q, p), f"member {k} {name}"


def test_a_pure_step_that_draws_leaves_the_members_rng_as_it_was_and_repeats(make_batches):
    """Not donated: the given ensemble's members keep their RNG (and all else), so a second call from it draws the
    same numbers; the returned members' RNGs advanced."""
    batch = make_batches(1)[0]
    ens = ensemble.stack(_random_states(RANDOM["both"][0]))
    rngs = [m.rng["cpu"].clone() for m in ens.members]
    step = ensemble.train_step(_noisy_loss)
    a, metrics_a = step(ens, batch)
    b, metrics_b = step(ens, batch)
    assert all(torch.equal(m.rng["cpu"], r) for m, r in zip(ens.members, rngs))
    assert not any(torch.equal(m.rng["cpu"], r) for m, r in zip(a.members, rngs))
    assert torch.equal(metrics_a["loss"], metrics_b["loss"])
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name])


def test_a_loss_without_randomness_keeps_the_vmapped_call(make_batches):
    """The one-at-a-time path is for losses that draw: one that does not stays vmapped (its members' RNGs unmoved),
    and a model whose dropout is in eval mode draws nothing."""
    batches = make_batches(2)
    step = ensemble.train_step(_loss, donated=True)
    ens = ensemble.stack(_states())
    rngs = [m.rng["cpu"].clone() for m in ens.members]
    for batch in batches:
        ens, _ = step(ens, batch)
    assert not step.draws_random
    assert all(torch.equal(m.rng["cpu"], r) for m, r in zip(ens.members, rngs))
    evaluated = [s.evolve(model=s.model.eval()) for s in _random_states(RANDOM["dropout"][0])]
    step = ensemble.train_step(_loss, donated=True)
    ens = ensemble.stack(evaluated)
    ens, _ = step(ens, batches[0])
    assert not step.draws_random


def test_rrelu_members_train_one_at_a_time_as_their_solo_runs(make_batches):
    """RReLU's training-mode noise has no vmap rule at all (it was refused too): one member at a time it trains."""
    batches = make_batches(3)

    def states():
        out = []
        for seed, lr in ((0, 0.1), (1, 0.05)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = nn.Sequential(nn.Linear(4, 8), nn.RReLU(), nn.Linear(8, 2))
            out.append(loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr), seed=seed + 7))
        return out

    ens = ensemble.stack(states())
    step = ensemble.train_step(_loss, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    for k, solo in enumerate(states()):
        solo_step = loopkit.train_step(_loss)
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            assert torch.equal(q, p), f"member {k} {name}"


class _Checkpointed(nn.Module):
    """A block under activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``, as gradient
    checkpointing in Lightning and transformers runs it), after a dropout (a GPT's embedding dropout) or none: the
    backward recomputes the block's forward, reading the block's weights then."""

    def __init__(self, seed: int, dropout: bool = True) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
            self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(x))
        return self.head(h + torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False))


class _OldStyleTanh(torch.autograd.Function):
    """A custom autograd.Function written the old way (``forward(ctx, ...)``, no ``setup_context``), which torch.func
    transforms refuse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _CustomFunction(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.mlp = _mlp(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp[2](_OldStyleTanh.apply(self.mlp[0](x)))


def _assert_bitwise_solo_runs(ens, make_model, batches, losses, seeds=(10, 11, 12)):
    """Each member of ``ens`` (its losses ``losses[i][k]``) equals its solo loopkit.train_step run bitwise."""
    for k, solo in enumerate(_random_states(make_model, seeds)):
        solo_step = loopkit.train_step(_loss)
        for i, batch in enumerate(batches):
            solo, solo_metrics = solo_step(solo, batch)
            assert torch.equal(losses[i][k], solo_metrics["loss"]), f"member {k}, batch {i}"
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            assert torch.equal(q, p), f"member {k} {name}"


@pytest.mark.parametrize("donated", [False, True])
def test_activation_checkpointing_after_a_dropout_follows_the_solo_runs_bitwise(donated, make_batches):
    """Before, one member at a time took each member's gradients after functional_call had put member 0's parameters
    back on the model: the checkpointed block was recomputed in the backward with member 0's weights, and members 1
    and 2 trained on wrong gradients without a word (0.03 to 0.07 off their solo runs after three steps)."""
    batches = make_batches(3)
    ens = ensemble.stack(_random_states(_Checkpointed))
    step = ensemble.train_step(_loss, donated=donated)
    losses = []
    for batch in batches:
        ens, metrics = step(ens, batch)
        losses.append(metrics["loss"])
    assert step.draws_random
    _assert_bitwise_solo_runs(ens, _Checkpointed, batches, losses)


UNBATCHABLE_MODELS = {
    "activation checkpointing": (functools.partial(_Checkpointed, dropout=False),
                                 "don't yet support saved tensor hooks"),
    "an autograd.Function without setup_context": (_CustomFunction, "it must override the setup_context staticmethod"),
}


@pytest.mark.parametrize("model", list(UNBATCHABLE_MODELS))
def test_a_model_torch_func_cannot_differentiate_trains_one_member_at_a_time_as_the_solo_runs(model, make_batches):
    """Before, torch's raw "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks" (or "... it
    must override the setup_context staticmethod") escaped the step, though the members train solo; now it warns once
    and runs one member at a time, each member's gradients by autograd, as its solo run's (bitwise)."""
    make_model, said = UNBATCHABLE_MODELS[model]
    batches = make_batches(3)
    ens = ensemble.stack(_random_states(make_model))
    step = ensemble.train_step(_loss, donated=True)
    losses = []
    with pytest.warns(RuntimeWarning, match=rf"cannot run under vmap \(.*{re.escape(said)}"):
        for batch in batches:
            ens, metrics = step(ens, batch)
            losses.append(metrics["loss"])
    assert step.unbatchable and not step.draws_random
    _assert_bitwise_solo_runs(ens, make_model, batches, losses)


@pytest.mark.parametrize("loss_fn", [_loss, _noisy_loss])
def test_one_member_at_a_time_does_not_walk_the_graph_for_the_parameters_the_loss_reaches(loss_fn, make_batches,
                                                                                          monkeypatch):
    """Before, each member's loss had its whole autograd graph walked in Python (_reached, 4-9% of a step of a deep
    model), though its gradients come from torch.autograd.grad(allow_unused=True), which leaves out those the loss
    does not reach itself (tested above). The vmapped call still walks it (torch.func.grad gives them zeros)."""
    walks = []
    reached = ensemble._reached
    monkeypatch.setattr(ensemble, "_reached", lambda loss, inputs: walks.append(1) or reached(loss, inputs))
    step = ensemble.train_step(loss_fn, donated=True)
    ens = ensemble.stack(_states())
    for batch in make_batches(2):
        ens, _ = step(ens, batch)
    assert step.draws_random == (loss_fn is _noisy_loss)
    assert len(walks) == (0 if step.draws_random else 2)


def test_a_drawing_loss_fn_that_raises_for_one_member_leaves_the_ensemble_and_the_global_rng_as_they_were(
        make_batches, take_snapshot, assert_trees_equal):
    """One member at a time, member 1's call raises after member 0's drew: nothing of the ensemble changed (its
    members' RNGs included), the caller's global RNG is put back, and the ensemble trains on as if never called."""
    batches = make_batches(2)
    calls = []

    def flaky(model, batch):
        calls.append(1)
        if len(calls) == 3:  # (1: the vmapped attempt, refused; 2: member 0; 3: member 1)
            torch.rand(5)
            raise KeyError("the loss_fn's own bug")
        return _noisy_loss(model, batch)

    make_model = RANDOM["dropout"][0]
    ens = ensemble.stack(_random_states(make_model))
    before = [take_snapshot(m) for m in ens.members]
    global_before = torch.get_rng_state()
    with pytest.raises(KeyError, match="own bug") as error:
        ensemble.train_step(flaky, donated=True)(ens, batches[0])
    assert torch.equal(torch.get_rng_state(), global_before)
    assert loopkit.state_at_error(error.value) is ens
    for member, snap in zip(ens.members, before):
        member.check_usable()
        assert_trees_equal(take_snapshot(member), snap)
    step = ensemble.train_step(_noisy_loss, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    _assert_random_follow_solo(ens, make_model, _noisy_loss, batches)


def _frozen_solo(state, batches, unfreeze_at=None):
    """``state`` trained alone on ``batches`` (the loss of :func:`_solo`), its first layer unfrozen before batch
    ``unfreeze_at``."""
    step = loopkit.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    for i, batch in enumerate(batches):
        if i == unfreeze_at:
            state.model[0].weight.requires_grad_(True)
        state, _ = step(state, batch)
    return state


def _unfrozen_in_every_member_trains_as_the_solo_runs(batches: list) -> None:
    """Fine-tuning: the first layer frozen in every member, then unfrozen in every member after two donated steps;
    each member equals its solo run."""

    def states():
        out = [_sgd(_mlp(seed)) for seed in range(3)]
        for state in out:
            state.model[0].weight.requires_grad_(False)
        return out

    ens = ensemble.stack(states())
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    for i, batch in enumerate(batches):
        if i == 2:
            for member in ens.members:
                member.model[0].weight.requires_grad_(True)
        ens, _ = step(ens, batch)
    for k, state in enumerate(states()):
        solo = _frozen_solo(state, batches, unfreeze_at=2)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"member {k} {name}")
    assert not torch.equal(ens.members[1].model[0].weight, _mlp(1)[0].weight)  # (it trained, once unfrozen)


@pytest.mark.parametrize("frozen_in", [0, 1])
def test_a_donated_step_refuses_a_parameter_frozen_in_one_member_since_stacking(frozen_in, make_batches):
    """Before, it trained member 1 wrongly without a word: frozen in member 1 only, its weight moved anyway (by 0.04
    in 3 steps); frozen in member 0 only, member 1's never trained (the trainable set was member 0's). Refused as
    stack refuses it, the ensemble stays usable; set back, it trains on as its members' solo runs. Unfrozen in every
    member (fine-tuning), it trains as their solo runs."""
    _unfrozen_in_every_member_trains_as_the_solo_runs(make_batches(4))
    batches = make_batches(3)
    states = [_sgd(_mlp(seed)) for seed in range(3)]
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    ens, _ = step(ensemble.stack(states), batches[0])
    before = {n: p.clone() for n, p in ens.params.items()}
    ens.members[frozen_in].model[0].weight.requires_grad_(False)
    flags = {0: (True, False), 1: (False, True)}[frozen_in]  # (member 1's, member 0's)
    with pytest.raises(ValueError, match=rf"ensemble.train_step: parameter '0.weight' has requires_grad={flags[0]} in "
                                         rf"member 1 and {flags[1]} in member 0 \(changed since they were stacked\); "
                                         "every member must freeze the same parameters") as error:
        step(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    ens.check_usable()
    assert all(torch.equal(ens.params[n], before[n]) for n in before)
    ens.members[frozen_in].model[0].weight.requires_grad_(True)
    for batch in batches[1:]:
        ens, _ = step(ens, batch)
    _assert_follow_solo(ens, states, batches)


CHANGES = {  # member 1's values changed after stacking, each in another way (the step ran member 0's for it)
    "proj replaced": lambda m: setattr(m, "proj", torch.eye(4)),
    "proj changed in place": lambda m: m.proj.mul_(2.0),
    "cfg changed in place": lambda m: m.cfg.update(scale=3.0),
}


def _changed_alike_trains_as_the_solo_runs(batches: list) -> None:
    """The same new projection in every member (each its own tensor) after stacking: the donated step trains on, each
    member as its solo run with that projection, and later calls take the new values as checked."""
    states = [_sgd(_Projected(k, ("proj", "cfg", "_shift"))) for k in range(2)]
    ens = ensemble.stack(states)
    for member in ens.members:
        member.model.proj = torch.eye(4) * 2.0
    step = ensemble.train_step(_loss, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    for state in states:
        state.model.proj = torch.eye(4) * 2.0
    _assert_follow_solo(ens, states, batches)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_donated_step_refuses_a_value_changed_in_one_member_since_stacking(change, make_batches):
    """Before, a plain tensor attribute (not a buffer) set on member 1 after stacking was ignored: member 1 trained with
    member 0's value (its loss 1.31 where its solo run's is 2.27). Refused as stack refuses it, the ensemble usable.
    Changed alike in every member, it trains on (see :func:`_changed_alike_trains_as_the_solo_runs`). A ``_private``
    value is ``stack``'s to compare only: between calls it may be the forward's own counter, which runs on member 0's
    modules (see test_a_forwards_own_private_counter_is_not_taken_for_a_member_changed_since_stacking)."""
    _changed_alike_trains_as_the_solo_runs(make_batches(3))
    batches = make_batches(2)
    ens = ensemble.stack([_sgd(_Projected(k, ("proj", "cfg", "_shift"))) for k in range(2)])
    step = ensemble.train_step(_loss, donated=True)
    ens, _ = step(ens, batches[0])
    CHANGES[change](ens.members[1].model)
    attr = change.split()[0]
    with pytest.raises(ValueError, match=rf"ensemble.train_step: member 1's module \(model\) \(_Projected\) has "
                                         rf"another '{attr}' than member 0's") as error:
        step(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    ens.check_usable()
    assert [m.step for m in ens.members] == [1, 1]


def test_stacking_members_of_different_dtypes_is_refused_naming_the_parameter_and_both_dtypes():
    """Before, the refusal's own message failed: TypeError: '<' not supported between instances of 'torch.dtype'."""
    with pytest.raises(ValueError, match=r"ensemble.stack: member 1's model differs from member 0's \(parameter "
                                         r"'0.bias' has shape \(16,\), dtype torch.float64, device cpu where member "
                                         r"0's has shape \(16,\), dtype torch.float32, device cpu\)"):
        ensemble.stack([_sgd(_mlp(0)), _sgd(_mlp(1).double())])
    with pytest.raises(ValueError, match=r"member 1's model differs from member 0's \(a Linear where member 0's is a "
                                         r"Sequential\)"):
        ensemble.stack([_sgd(_mlp(0)), _sgd(nn.Linear(4, 2))])


def _mse_loss(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _item_loss(model, batch):
    """A metric taken with ``.item()``, as a Lightning habit has it (vmap refuses it)."""
    loss, aux = _loss(model, batch)
    return loss, {"mae": aux["mae"].item()}


def _branching_loss(model, batch):
    """A branch on the loss's value (vmap refuses data-dependent control flow)."""
    loss, _ = _loss(model, batch)
    return loss * 2.0 if loss > 0.9 else loss


def _nonzero_loss(model, batch):
    """``nonzero``, whose output's shape depends on the data (vmap refuses it)."""
    out = model(batch[0])
    return ((out - batch[1]) ** 2).mean() + 0.01 * out.flatten()[(out.flatten() > 0).nonzero()].sum()


UNBATCHABLE = {"item": _item_loss, "branch": _branching_loss, "nonzero": _nonzero_loss}


@pytest.mark.parametrize("donated", [False, True])
@pytest.mark.parametrize("unbatchable", list(UNBATCHABLE))
def test_a_loss_fn_vmap_cannot_run_trains_one_member_at_a_time_as_the_solo_runs(unbatchable, donated, make_batches):
    """Before, it failed with torch's raw functorch error ("vmap: It looks like you're calling .item() ..."), though it
    trains solo, and in an ensemble whose model draws (one member at a time). It warns once."""
    loss_fn = UNBATCHABLE[unbatchable]
    batches = make_batches(3)
    step = ensemble.train_step(loss_fn, donated=donated)
    ens = ensemble.stack(_states())
    with pytest.warns(RuntimeWarning, match=rf"loopkit.ensemble.train_step: loss_fn {loss_fn.__name__} cannot run "
                                            "under vmap .*one member at a time") as caught:
        losses = []
        for batch in batches:
            ens, metrics = step(ens, batch)
            losses.append(metrics["loss"])
    assert len([w for w in caught if "cannot run under vmap" in str(w.message)]) == 1
    assert step.unbatchable and not step.draws_random
    for k, solo in enumerate(_states()):
        solo_step = loopkit.train_step(loss_fn)
        for i, batch in enumerate(batches):
            solo, solo_metrics = solo_step(solo, batch)
            torch.testing.assert_close(losses[i][k], solo_metrics["loss"], rtol=1e-6, atol=1e-7)
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"member {k} {name}")


def test_the_loss_fns_own_error_under_vmap_propagates_as_it_is(make_batches):
    """A shape error is the loss_fn's own: torch's error as solo, unwrapped, no fallback, no warning."""
    def bad_shape(model, batch):
        return ((model(batch[0]) - batch[1][:, :1].repeat(1, 3)) ** 2).mean()

    batch = make_batches(1)[0]
    with pytest.raises(RuntimeError) as solo_error:
        loopkit.train_step(bad_shape)(_states()[0], batch)
    step = ensemble.train_step(bad_shape, donated=True)
    ens = ensemble.stack(_states())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError) as error:
            step(ens, batch)
    same = str(solo_error.value).split(" at non-singleton")[0]  # (vmap counts its batch dimension among the others)
    assert str(error.value).startswith(same) and "must match the size" in same
    assert not step.unbatchable
    ens.check_usable()


def test_a_failed_vmapped_attempt_leaves_nothing_for_the_one_member_at_a_time_step(make_batches, take_snapshot,
                                                                                   assert_trees_equal):
    """The first call's vmapped attempt runs the forward up to the .item(): what it set on member 0's modules (a list
    its forward appends to) is undone before the members run, as their solo runs saw it. A loss_fn that then raises
    for member 1 leaves the donated ensemble as it was, usable; it trains on as the solo runs."""
    def item_loss(model, batch):
        loss = (model(batch[0]) - batch[1]).pow(2).mean()  # (the forward appends to model.widths first)
        return loss, {"rmse": loss.detach().sqrt().item()}

    calls = []

    def flaky(model, batch):
        calls.append(1)
        if len(calls) == 3:  # (1: the vmapped attempt, refused at .item(); 2: member 0; 3: member 1)
            raise KeyError("the loss_fn's own bug")
        return item_loss(model, batch)

    batches = make_batches(2)
    states = [_sgd(_SeenWidth(seed)) for seed in range(3)]
    ens = ensemble.stack(states)
    before = [take_snapshot(m) for m in ens.members]
    with pytest.warns(RuntimeWarning, match="cannot run under vmap"), pytest.raises(KeyError, match="own bug") as error:
        ensemble.train_step(flaky, donated=True)(ens, batches[0])
    assert loopkit.state_at_error(error.value) is ens
    for member, snap in zip(ens.members, before):
        member.check_usable()
        assert_trees_equal(take_snapshot(member), snap)
    step = ensemble.train_step(item_loss, donated=True)
    with pytest.warns(RuntimeWarning, match="cannot run under vmap"):
        for batch in batches:
            ens, _ = step(ens, batch)
    for k, state in enumerate(states):
        solo_step = loopkit.train_step(item_loss)
        solo = state
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        assert ens.members[k].model.widths == solo.model.widths == [4, 4], f"member {k}"
        torch.testing.assert_close(ens.members[k].model.l.weight, solo.model.l.weight, rtol=1e-6, atol=1e-7)


def _spectral(seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 16)), nn.Tanh(), nn.Linear(16, 2))


def test_spectral_norm_members_in_training_mode_are_refused_naming_the_ensemble_step_and_the_buffers(make_batches):
    """Its power iteration (an out= op: "Batching rule not implemented for aten::div.out") got torch's raw error; run
    one member at a time it writes its u and v buffers in the forward, which the step refuses by name. In eval mode
    (no power iteration) the members train as their solo runs."""
    batches = make_batches(2)
    ens = ensemble.stack([_sgd(_spectral(k)) for k in range(2)])
    with pytest.warns(RuntimeWarning, match="aten::div.out"), pytest.raises(
            RuntimeError, match=r"ensemble.train_step: loss_fn _loss changed the buffer\(s\) "
                                r"'0.parametrizations.weight.0._u', '0.parametrizations.weight.0._v' in its forward"):
        ensemble.train_step(_loss)(ens, batches[0])
    states = [_sgd(_spectral(k).eval()) for k in range(2)]
    _assert_follow_solo(_together(states, batches), states, batches, rtol=1e-5, atol=1e-6)


def _pruned(seed: int) -> nn.Sequential:
    model = _mlp(seed)
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)  # each member its own mask
    return model


@pytest.mark.parametrize("donated", [False, True])
def test_members_pruned_by_torch_train_as_their_solo_runs(donated, make_batches):
    """They were refused ("has another 'weight' than member 0's ... register a tensor as a buffer"): prune's forward
    pre-hook computes weight from weight_orig * weight_mask, both stacked per member."""
    batches = make_batches(3)
    states = [_sgd(_pruned(seed)) for seed in range(3)]
    assert not torch.equal(states[0].model[0].weight_mask, states[1].model[0].weight_mask)
    ens = _together(states, batches, donated=donated)
    _assert_follow_solo(ens, states, batches)
    x = batches[0][0]
    for k, (state, member) in enumerate(zip(states, ensemble.unstack(ens))):
        solo = _solo(state, batches)
        torch.testing.assert_close(member.model(x), solo.model(x), rtol=1e-6, atol=1e-7, msg=f"member {k}")
        assert torch.equal(member.model[0].weight == 0, solo.model[0].weight == 0)  # (each its own mask kept)


class _CountsCalls(nn.Module):
    """Scales its output up over its first calls, counted in a plain int attribute ``counter`` (``_private``: an
    in-module warm-up the check between calls leaves alone; public: a setting each member's forward sets)."""

    def __init__(self, seed, counter="calls"):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.counter = counter
        setattr(self, counter, 0)

    def forward(self, x):
        setattr(self, self.counter, getattr(self, self.counter) + 1)
        return self.lin(x) * min(1.0, getattr(self, self.counter) / 10)


class _PeakNormalized(nn.Module):
    """Divides by the largest output it has seen, a plain float read with ``.item()``: each member's own value, kept
    in the attribute ``attr`` (public, or ``_private``)."""

    def __init__(self, seed, attr="peak"):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.attr = attr
        setattr(self, attr, 1.0)

    def forward(self, x):
        out = self.lin(x)
        setattr(self, self.attr, max(getattr(self, self.attr), out.detach().abs().max().item()))
        return out / getattr(self, self.attr)


def _members(cls, k):
    return [loopkit.TrainState.create(m := cls(i), torch.optim.SGD(m.parameters(), lr=0.1), seed=i) for i in range(k)]


def test_a_forwards_own_private_counter_is_not_taken_for_a_member_changed_since_stacking():
    """The donated step's check between calls compared ``_private`` values too: the forward's own counter, advanced on
    member 0's modules only, was refused at the second call as a change to one member. Reference: the solo runs."""
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(3)]
    ens, step = ensemble.stack(_members(functools.partial(_CountsCalls, counter="_calls"), 3)), ensemble.train_step(loss_fn, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    for k, solo in enumerate(_members(functools.partial(_CountsCalls, counter="_calls"), 3)):
        for batch in batches:
            solo, _ = loopkit.train_step(loss_fn)(solo, batch)
        for p, q in zip(solo.model.parameters(), ens.members[k].model.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("attr", ["peak", "_peak"])
def test_members_run_one_at_a_time_whose_forwards_set_a_setting_each_its_own_are_refused_the_ensemble_usable(attr):
    """One member at a time (``.item()``: vmap cannot run it), a forward may set a plain value from its own member's
    outputs; every member shares member 0's modules, so the value of the last member ran was every member's next:
    members but the last left their solo runs, silently. Refused now, naming the value, before any update; a
    ``_private`` value too (it was not compared: the last member's silently became every member's)."""
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=generator) * 3, torch.randn(8, 1, generator=generator))
    make = functools.partial(_PeakNormalized, attr=attr)
    ens, step = ensemble.stack(_members(make, 3)), ensemble.train_step(loss_fn, donated=True)
    before = [p.detach().clone() for p in ens.members[1].model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        with pytest.raises(ValueError, match=rf"set '{attr}' of module \(model\) to .* for member 1 and .* for member 0"):
            step(ens, batch)
    assert all(torch.equal(p, q) for p, q in zip(ens.members[1].model.parameters(), before))
    assert getattr(ens.skeleton, attr) == 1.0  # (the settings as before the call)


@pytest.mark.parametrize("k", [1, 2])
def test_one_member_at_a_time_undoes_what_the_refused_vmapped_attempt_set_also_for_one_member(k):
    """The failed vmapped attempt (``.item()``) runs the forward, which counts the call; each member's forward must
    start from the settings before it, as its solo one does. With one member there was no other member's copy to put
    back from: the attempt counted, and the trajectory left the solo run's at the first call."""
    def loss_fn(model, batch):
        loss = ((model(batch[0]) - batch[1]) ** 2).mean()
        if loss.item() > 1e6:
            raise FloatingPointError("diverged")
        return loss

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(3)]
    ens, step = ensemble.stack(_members(_CountsCalls, k)), ensemble.train_step(loss_fn, donated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for batch in batches:
            ens, _ = step(ens, batch)
    for i, solo in enumerate(_members(_CountsCalls, k)):
        for batch in batches:
            solo, _ = loopkit.train_step(loss_fn)(solo, batch)
        assert ens.members[i].model.calls == solo.model.calls == 3
        for p, q in zip(solo.model.parameters(), ens.members[i].model.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


class _SetsNaN(nn.Module):
    """Its forward sets a plain value to a fresh NaN, alike for every member (a statistic of an empty selection)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin, self.drop = nn.Linear(4, 1), nn.Dropout(0.2)
        self.last = 0.0

    def forward(self, x):
        self.last = float("nan")
        return self.lin(self.drop(x))


def test_one_member_at_a_time_takes_a_setting_every_member_sets_to_nan_alike():
    """Each member's settings were compared with ==, where NaN never equals NaN: a value set alike was refused as set
    otherwise, naming nothing. Reference: the solo runs (dropout: one member at a time, each with its own masks)."""
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    batch = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    ens, _ = ensemble.train_step(loss_fn, donated=True)(ensemble.stack(_members(_SetsNaN, 2)), batch)
    for k, solo in enumerate(_members(_SetsNaN, 2)):
        solo, _ = loopkit.train_step(loss_fn)(solo, batch)
        for p, q in zip(solo.model.parameters(), ens.members[k].model.parameters()):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def _warm_up_members(k):
    return _members(functools.partial(_CountsCalls, counter="_calls"), k)


def _four_batches():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(4)]


def _assert_members_are_their_solo_runs(ens, loss_fn, batches):
    """Each member of ``ens`` (K ``_CountsCalls`` counting in ``_calls``, trained on ``batches``), as it is, unstacked
    and stacked again, is its solo run's model: the same count, parameters and outputs (the output is scaled by the
    count: min(1, calls / 10))."""
    alone, again = ensemble.unstack(ens), ensemble.stack(list(ens.members))  # (refused before: member 1's count was 0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for k, solo in enumerate(_warm_up_members(len(ens))):
        for batch in batches:
            solo, _ = loopkit.train_step(loss_fn)(solo, batch)
        models = {"member": ens.members[k].model, "unstacked": alone[k].model, "stacked again": again.members[k].model}
        for name, model in models.items():
            assert model._calls == solo.model._calls == len(batches), f"{name} {k}"
            for p, q in zip(solo.model.parameters(), model.parameters()):
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
        with torch.no_grad():  # (each model counts this call too)
            expected = solo.model(x)
            for name, model in models.items():
                torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7, msg=f"{name} {k}'s output")


@pytest.mark.parametrize("donated", [False, True])
def test_a_forwards_own_private_counter_reaches_every_member_as_in_its_solo_run(donated):
    """Under vmap only member 0's modules run the forward, and only the public values it set reached the other
    members: members 1 and 2 kept ``_calls == 0``, so each, used alone after training (``members[k]``, ``unstack``),
    scaled its output by 0 where its solo run's scales it by 0.4; the trained members did not stack again, and the
    default, non-donated step (which stacks its members again) refused them at its second call. Reference: each
    member's solo run."""
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    batches = _four_batches()
    ens, step = ensemble.stack(_warm_up_members(3)), ensemble.train_step(loss_fn, donated=donated)
    for batch in batches:
        ens, _ = step(ens, batch)
    _assert_members_are_their_solo_runs(ens, loss_fn, batches)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("donated", [False, True])
def test_one_member_at_a_time_keeps_each_members_private_counter_as_its_solo_run(donated, k):
    """One member at a time (``.item()``: vmap cannot run it), a ``_private`` counter was neither put back before
    each member's forward nor given to the other members: member 0's counted the refused vmapped attempt and every
    member's call (16 after 5 steps of 3 members) and the others' stayed 0, so no member followed its solo run.
    Reference: each member's solo run."""
    def loss_fn(model, batch):
        loss = ((model(batch[0]) - batch[1]) ** 2).mean()
        if loss.item() > 1e6:
            raise FloatingPointError("diverged")
        return loss

    batches = _four_batches()
    ens, step = ensemble.stack(_warm_up_members(k)), ensemble.train_step(loss_fn, donated=donated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        for batch in batches:
            ens, _ = step(ens, batch)
    assert step.unbatchable
    _assert_members_are_their_solo_runs(ens, loss_fn, batches)


class _CountsInADict(nn.Module):
    """Scales its output up over its first calls, counted in a dict attribute ``attr`` changed in place
    (``self.stats["calls"] += 1``; ``nested``: also a dict and a list inside it), alike for every member."""

    def __init__(self, seed, attr="stats", nested=False):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.attr, self.nested = attr, nested
        setattr(self, attr, {"calls": 0, "seen": {"rows": 0, "widths": []}} if nested else {"calls": 0})

    def forward(self, x):
        stats = getattr(self, self.attr)
        stats["calls"] += 1
        if self.nested:
            stats["seen"]["rows"] += x.shape[0]
            stats["seen"]["widths"].append(x.shape[-1])
        return self.lin(x) * min(1.0, stats["calls"] / 10)


def _checked_loss(model, batch):
    """A loss vmap cannot run (``.item()``): the members run one at a time."""
    loss = ((model(batch[0]) - batch[1]) ** 2).mean()
    if loss.item() > 1e6:
        raise FloatingPointError("diverged")
    return loss


def _assert_dict_counters_are_their_solo_runs(ens, make, loss_fn, batches):
    """Each member of ``ens`` (K ``make(k)`` models, trained on ``batches``), as it is, unstacked and stacked again,
    is its solo run's model: the same dict, parameters and outputs; and no two members share the dict or what it
    holds (a later change of one member's would change the others')."""
    attr = ens.skeleton.attr
    alone, again = ensemble.unstack(ens), ensemble.stack(list(ens.members))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for k, solo in enumerate(_members(make, len(ens))):
        for batch in batches:
            solo, _ = loopkit.train_step(loss_fn)(solo, batch)
        assert getattr(solo.model, attr)["calls"] == len(batches)
        models = {"member": ens.members[k].model, "unstacked": alone[k].model, "stacked again": again.members[k].model}
        for name, model in models.items():
            assert getattr(model, attr) == getattr(solo.model, attr), f"{name} {k}"
            for p, q in zip(solo.model.parameters(), model.parameters()):
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
        with torch.no_grad():  # (each model counts this call too)
            expected = solo.model(x)
            for name, model in models.items():
                torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-7, msg=f"{name} {k}'s output")
    dicts = [getattr(m.model, attr) for m in ens.members]
    assert len({id(d) for d in dicts}) == len(dicts)
    if ens.skeleton.nested:
        assert len({id(d["seen"]["widths"]) for d in dicts}) == len(dicts)


@pytest.mark.parametrize(("attr", "nested"), [("stats", False), ("_stats", True)])
@pytest.mark.parametrize("donated", [False, True])
def test_a_forwards_counter_in_a_dict_reaches_every_member_as_in_its_solo_run(donated, attr, nested):
    """Only plain values (numbers, lists of them) the forward set reached the other members, not a dict it changed in
    place (``self.stats["calls"] += 1``), which stack and the donated step's check compare: the step refused the
    members at its second call, donated or not, saying member 1's 'stats' differed from member 0's as if the user had
    made them differ. Reference: each member's solo run (K = 3, vmapped)."""
    loss_fn = _mse_loss
    make = functools.partial(_CountsInADict, attr=attr, nested=nested)
    batches = _four_batches()
    ens, step = ensemble.stack(_members(make, 3)), ensemble.train_step(loss_fn, donated=donated)
    for batch in batches:
        ens, _ = step(ens, batch)
    assert not step.unbatchable
    _assert_dict_counters_are_their_solo_runs(ens, make, loss_fn, batches)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("donated", [False, True])
def test_one_member_at_a_time_keeps_each_members_dict_counter_as_its_solo_run(donated, k):
    """One member at a time (``.item()``), each member's forward must start from the dict as it was before the call
    (not counting the refused vmapped attempt, nor the members before it), and every member must get it. Reference:
    each member's solo run."""
    make = functools.partial(_CountsInADict, attr="_stats", nested=True)
    batches = _four_batches()
    ens, step = ensemble.stack(_members(make, k)), ensemble.train_step(_checked_loss, donated=donated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        for batch in batches:
            ens, _ = step(ens, batch)
    assert step.unbatchable
    _assert_dict_counters_are_their_solo_runs(ens, make, _checked_loss, batches)


class _PeakInADict(nn.Module):
    """Divides by the largest output it has seen, kept in a dict (``attr``) from ``.item()``: each member's own."""

    def __init__(self, seed, attr="stats"):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.attr = attr
        setattr(self, attr, {"peak": 1.0})

    def forward(self, x):
        out = self.lin(x)
        stats = getattr(self, self.attr)
        stats["peak"] = max(stats["peak"], out.detach().abs().max().item())
        return out / stats["peak"]


@pytest.mark.parametrize("attr", ["stats", "_stats"])
@pytest.mark.parametrize("donated", [False, True])
def test_members_run_one_at_a_time_whose_forwards_set_a_dict_each_its_own_are_refused(donated, attr):
    """A dict set from each member's own outputs cannot be kept for each member (every member runs member 0's
    modules): refused naming it, before any update, the dict as before the call, the members usable."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=generator) * 3, torch.randn(8, 1, generator=generator))
    make = functools.partial(_PeakInADict, attr=attr)
    ens = ensemble.stack(_members(make, 3))
    before = [p.detach().clone() for p in ens.params.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        with pytest.raises(ValueError, match=rf"set '{attr}' of module \(model\) to \{{'peak': .*\}} for member 1 and "
                                             r"\{'peak': .*\} for member 0"):
            ensemble.train_step(_mse_loss, donated=donated)(ens, batch)
    assert all(torch.equal(p, q) for p, q in zip(ens.params.values(), before))
    assert [getattr(m.model, attr) for m in ensemble.unstack(ens)] == [{"peak": 1.0}] * 3


class _CountsInATensor(nn.Module):
    """Counts its calls in a plain tensor attribute (no buffer): ``self.n = self.n + 1``."""

    def __init__(self, seed, attr="n"):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.attr = attr
        setattr(self, attr, torch.zeros(()))

    def forward(self, x):
        setattr(self, self.attr, getattr(self, self.attr) + 1)
        return self.lin(x) * getattr(self, self.attr).clamp(max=1)


@pytest.mark.parametrize("loss_fn", [_mse_loss, _checked_loss],
                         ids=["vmapped", "one member at a time"])
@pytest.mark.parametrize("attr", ["n", "_n"])
@pytest.mark.parametrize("donated", [False, True])
def test_a_forwards_counter_in_a_tensor_attribute_is_refused_naming_it_and_put_back(donated, attr, loss_fn):
    """The forward's ``self.n + 1`` is a tensor of the transformed call (it cannot be kept for any member): it was
    refused as a tensor "kept" for inspection, and the attribute set to None, in member 0 and (a plain value the
    forward set) in every member: the counter was lost. Now the refusal says the forward replaced it and how to keep
    a count, and the counter is as it was in every member, the ensemble usable."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator))
    make = functools.partial(_CountsInATensor, attr=attr)
    ens = ensemble.stack(_members(make, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        with pytest.raises(RuntimeError, match=rf"replaced the tensor attribute\(s\) '{attr}' of module \(model\) "
                                               r"in its forward \(put back as they were\).* as a Python number"):
            ensemble.train_step(loss_fn, donated=donated)(ens, batch)
    for member in ensemble.unstack(ens):
        assert torch.equal(getattr(member.model, attr), torch.zeros(()))


class _SwapsTensors(nn.Module):
    """Swaps two plain tensor attributes (no buffers) in its forward: ``self.t, self.u = self.u, self.t``."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 1)
        self.t, self.u = torch.zeros(()), torch.ones(())

    def forward(self, x):
        self.t, self.u = self.u, self.t
        return self.lin(x) * (1 + self.t)


@pytest.mark.parametrize("loss_fn", [_mse_loss, _checked_loss], ids=["vmapped", "one member at a time"])
@pytest.mark.parametrize("donated", [False, True])
def test_a_forward_that_swaps_tensor_attributes_is_refused_naming_them_and_put_back(donated, loss_fn):
    """Before, the swap (tensors of no transformed call) changed member 0's modules only: the first call passed, and
    the next one refused the members blaming member 1 ("member 1's module (model) (_SwapsTensors) has another 't'
    than member 0's"), though no member had been changed by hand. Now the first call refuses it naming the attributes
    and why, before any member updates, and puts them back in member 0."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator))
    ens = ensemble.stack(_members(_SwapsTensors, 3))
    before = [p.clone() for p in ens.params.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (that it runs one member at a time)
        with pytest.raises(RuntimeError, match=r"replaced the tensor attribute\(s\) 't' of module \(model\), 'u' of "
                                               r"module \(model\) with another tensor in its forward \(put back as "
                                               r"they were\).* pick the tensor in the forward without assigning it"):
            ensemble.train_step(loss_fn, donated=donated)(ens, batch)
    assert all(torch.equal(p, q) for p, q in zip(ens.params.values(), before))
    for member in ensemble.unstack(ens):
        assert torch.equal(member.model.t, torch.zeros(())) and torch.equal(member.model.u, torch.ones(()))
        assert member.step == 0


# --- forward hooks: the step runs member 0's modules, and so their hooks, for every member -------------------------


def _halve(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 0.5


def _double(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2.0


def _halving() -> Callable[..., torch.Tensor]:
    """A new lambda (the same code, no closure) at each call, as a loop registering one on each member makes."""
    return lambda module, args, out: out * 0.5


class _Recorder:
    """Counts the calls of the module it hooks (a bound method's object outside the member)."""

    def __init__(self) -> None:
        self.calls = 0

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1


class _SelfHooked(nn.Module):
    """Scales its first layer's output by its own ``scale`` in a forward hook that is a method of its own."""

    def __init__(self, seed: int, scale: float = 0.5) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.scale = scale
        self.a.register_forward_hook(self._scaled)

    def _scaled(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _hooked(seed: int, *hooks: Any, pre: bool = False) -> loopkit.TrainState:
    """An MLP of :func:`_mlp` whose first layer has ``hooks`` (forward hooks, or with ``pre`` forward pre-hooks)."""
    model = _mlp(seed)
    for hook in hooks:
        (model[0].register_forward_pre_hook if pre else model[0].register_forward_hook)(hook)
    return _sgd(model)


def _scaled_by(module: nn.Module, args: tuple, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return out * scale


class _Scale:
    """A callable hook object: scales a module's output by its ``scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale


def _scaling(scale: float) -> Callable[..., torch.Tensor]:
    return lambda module, args, out: out * scale


HOOKS_THAT_DIFFER = {  # member 0's and member 1's, and what the refusal says of them
    "one in member 1 only": ((), (_halve,), False, "forward hook _halve where member 0's has none"),
    "another function": ((_halve,), (_double,), False, "forward hook _double where member 0's has forward hook _halve"),
    "one more": ((_halve,), (_halve, _halve), False,
                 "forward hook _halve, forward hook _halve where member 0's has forward hook _halve"),
    "a lambda made for each member": ((lambda m, a, o: o * 2.0,), (lambda m, a, o: o * 2.0,), False,
                                      "forward hook <lambda> where member 0's has forward hook <lambda>"),
    "a method of each member's own recorder": ((_Recorder().hook,), (_Recorder().hook,), True,
                                               "forward pre-hook _Recorder.hook where member 0's has forward pre-hook "
                                               "_Recorder.hook"),
    "a partial with another argument": ((functools.partial(_scaled_by, scale=0.5),),
                                        (functools.partial(_scaled_by, scale=2.0),), False,
                                        "forward hook partial where member 0's has forward hook partial"),
    "a callable object with another setting": ((_Scale(0.5),), (_Scale(2.0),), False,
                                               "forward hook _Scale where member 0's has forward hook _Scale"),
    "a lambda closing over another number": ((_scaling(0.5),), (_scaling(2.0),), False,
                                             "forward hook _scaling.<locals>.<lambda> where member 0's has forward "
                                             "hook _scaling.<locals>.<lambda>"),
}


@pytest.mark.parametrize("differ", list(HOOKS_THAT_DIFFER))
def test_members_whose_forward_hooks_differ_are_refused_naming_the_module(differ):
    """Before, they stacked without a word and every member ran member 0's hooks: member 1's own hook was never called
    (its loss 0.55 where its solo run's is 0.67), or member 0's ran on it."""
    first, second, pre, said = HOOKS_THAT_DIFFER[differ]
    with pytest.raises(ValueError, match=r"ensemble.stack: member 1's module 0 \(Linear\) has other forward hooks than "
                                         rf"member 0's \({re.escape(said)}\); the vmapped step runs member 0's modules, "
                                         "with their hooks, for all"):
        ensemble.stack([_hooked(0, *first, pre=pre), _hooked(1, *second, pre=pre)])


def test_members_with_the_same_hook_function_or_a_method_of_their_own_module_follow_their_solo_runs(make_batches):
    """One function for every member, a recorder shared by all, a lambda of the same code made for each member (no
    closure), and a method of each member's own module (bound to it: alike by its place in the member; the ``scale``
    it reads is a setting, compared as settings are) stack and train as their solo runs."""
    batches = make_batches(3)
    recorder = _Recorder()
    for make in (lambda k: _hooked(k, _halve), lambda k: _hooked(k, recorder.hook, pre=True),
                 lambda k: _hooked(k, _halving()), lambda k: _sgd(_SelfHooked(k))):
        states = [make(k) for k in range(3)]
        _assert_follow_solo(_together(states, batches), states, batches)
    assert recorder.calls > 0
    with pytest.raises(ValueError, match=r"member 1's module \(model\) \(_SelfHooked\) has scale=2.0 where member 0's "
                                         r"has scale=0.5"):
        ensemble.stack([_sgd(_SelfHooked(0)), _sgd(_SelfHooked(1, scale=2.0))])


def test_a_forward_hook_keeping_features_the_loss_fn_reads_in_the_call_trains_each_member_as_its_raw_loop(make_batches):
    """A hook that keeps a layer's output in a dict outside the members, which the loss_fn reads in the same call (a
    feature loss): vmapped, the kept tensor is the batched call's, alive within it, so each member trains as its own
    raw loop with that hook (a first cut refused any tensor a hook kept outside the members)."""
    feats: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        feats["h"] = out

    def loss_fn(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean() + 0.1 * feats["h"].pow(2).mean()

    batches = make_batches(3)
    expected = []
    for seed in range(3):  # the raw loops
        model = _mlp(seed)
        model[0].register_forward_hook(keep)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in batches:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        expected.append(model)
    ens = ensemble.stack([_hooked(seed, keep) for seed in range(3)])
    step = ensemble.train_step(loss_fn, donated=True)
    for batch in batches:
        ens, _ = step(ens, batch)
    for member, model in zip(ens.members, expected, strict=True):
        for got, want in zip(member.model.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_member_at_a_time_a_hook_keeps_each_members_own_tensors_as_its_solo_run_does(make_batches):
    """A loss_fn that draws (dropout) runs one member at a time: the hook runs for each member, on its own output, as in
    its solo run (the wrapper the first, vmapped, attempt left is taken out without a refusal)."""
    kept: list[torch.Tensor] = []
    batch = make_batches(1)[0]
    models = [_mlp(seed, dropout=True) for seed in range(3)]
    expected = [model[0](batch[0]).detach() for model in models]
    for model in models:
        model[0].register_forward_hook(lambda module, args, out: kept.append(out.detach()))
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    step(ensemble.stack([_sgd(model) for model in models]), batch)
    assert step.draws_random and len(kept) == 3
    for own, solo in zip(kept, expected):
        torch.testing.assert_close(own, solo)


def test_a_donated_step_refuses_a_hook_added_to_one_member_since_stacking_and_trains_on_once_alike(make_batches):
    """Before, a hook added to member 1 after stacking was never called (the step runs member 0's modules). Refused as
    stack refuses it, the ensemble usable; added alike to every member, it trains on as the solo runs do."""
    batches = make_batches(3)
    states = [_sgd(_mlp(seed)) for seed in range(3)]
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    ens, _ = step(ensemble.stack(states), batches[0])
    before = {n: p.clone() for n, p in ens.params.items()}
    ens.members[1].model[0].register_forward_hook(_halve)
    with pytest.raises(ValueError, match=r"ensemble.train_step: member 1's module 0 \(Linear\) has other forward hooks "
                                         r"than member 0's \(forward hook _halve where member 0's has none\)") as error:
        step(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    assert all(torch.equal(ens.params[n], before[n]) for n in before)
    for member in (ens.members[0], ens.members[2]):
        member.model[0].register_forward_hook(_halve)
    for batch in batches[1:]:
        ens, _ = step(ens, batch)
    _assert_members_train_as_solos_hooked_after(ens, states, batches, 1, 0, _halve)


def _assert_members_train_as_solos_hooked_after(ens, states, batches, done, layer, hook, replace=False):
    """Each member of ``ens`` is its state trained alone on ``batches``, ``hook`` added to its layer ``layer`` after
    the first ``done`` batches (with ``replace``: in place of its forward hooks; reference: the plain loop of
    ``_solo``)."""
    for k, state in enumerate(states):
        solo = _solo(state, batches[:done])
        if replace:
            solo.model[layer]._forward_hooks.clear()
        solo.model[layer].register_forward_hook(hook)
        solo = _solo(solo, batches[done:])
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=f"member {k} {name}")


def test_a_donated_step_refuses_a_hook_replaced_in_one_member_only_and_trains_on_once_alike(make_batches):
    """A hook replaced on a module already hooked (its module stays hooked: the same modules have hooks) in member 1
    only, between donated calls, is refused as stack refuses it (member 1 would run member 0's ``_halve``), the
    ensemble usable; replaced alike in every member, it trains on as the solo runs do."""
    batches = make_batches(3)
    states = [_hooked(seed, _halve) for seed in range(3)]
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    ens, _ = step(ensemble.stack(states), batches[0])
    before = {n: p.clone() for n, p in ens.params.items()}
    ens.members[1].model[0]._forward_hooks.clear()
    ens.members[1].model[0].register_forward_hook(_double)
    with pytest.raises(ValueError, match=r"ensemble.train_step: member 1's module 0 \(Linear\) has other forward hooks "
                                         r"than member 0's \(forward hook _double where member 0's has forward hook "
                                         r"_halve\)") as error:
        step(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens
    assert all(torch.equal(ens.params[n], before[n]) for n in before)
    for member in (ens.members[0], ens.members[2]):
        member.model[0]._forward_hooks.clear()
        member.model[0].register_forward_hook(_double)
    for batch in batches[1:]:
        ens, _ = step(ens, batch)
    _assert_members_train_as_solos_hooked_after(ens, states, batches, 1, 0, _double, replace=True)


def test_a_donated_step_compares_the_hooks_again_only_when_one_was_added_or_removed(make_batches, monkeypatch):
    """Before, every donated step built every member's hook keys again (``_hook_key`` for each hook of each member,
    40% more time in the step's checks for a model with a hook on each layer), though none had changed. Now the hooks
    are compared by identity between calls and their keys built when one was added or removed (then refused as
    before, see above, or kept when alike)."""
    built = []
    key = ensemble._hook_key
    monkeypatch.setattr(ensemble, "_hook_key", lambda hook, places: built.append(hook) or key(hook, places))
    batches = make_batches(4)
    states = [_hooked(seed, _halve) for seed in range(3)]
    step = ensemble.train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), donated=True)
    ens = ensemble.stack(states)
    assert built  # (stack compares them)
    built.clear()
    for batch in batches[:2]:
        ens, _ = step(ens, batch)
    assert not built
    for member in ens.members:
        member.model[2].register_forward_pre_hook(_Recorder().hook)
    with pytest.raises(ValueError, match="has other forward hooks than member 0's"):
        step(ens, batches[2])
    assert built
    for member in ens.members:
        member.model[2]._forward_pre_hooks.clear()
        member.model[2].register_forward_hook(_double)
    built.clear()
    ens, _ = step(ens, batches[2])
    assert len(built) == 2 * 4  # (members 1 and 2 against member 0: two hooks each)
    built.clear()
    ens, _ = step(ens, batches[3])
    assert not built
    _assert_members_train_as_solos_hooked_after(ens, states, batches, 2, 2, _double)


# --- functions held as attributes: the step runs member 0's modules, and so their functions, for every member -------


class _Activated(nn.Module):
    """Keeps its activation as an attribute: a function given (``torch.relu``), a lambda made in ``__init__`` (the
    same code in every member), or a method of its own (bound to each member's module)."""

    def __init__(self, seed: int, act: Any = torch.tanh) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        made = {"lambda": lambda x: torch.tanh(2.0 * x), "method": self._soft, "other method": self._hard,
                "weighted by a": _weighted(self.a), "weighted by b": _weighted(self.b)}
        self.act = made.get(act, act) if isinstance(act, str) else act

    def _soft(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softsign(x)

    def _hard(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.hardtanh(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def _times(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.tanh(x) * scale


def _leaky(slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(x: torch.Tensor, slope: float = slope) -> torch.Tensor:
        return nn.functional.leaky_relu(x, slope)
    return act


def _kw_leaky(slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(x: torch.Tensor, *, slope: float = slope) -> torch.Tensor:  # (a keyword-only default, no closure)
        return nn.functional.leaky_relu(x, slope)
    return act


def _weighted(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation closing over ``layer`` (a module of the member's own): scales by its weight's mean."""
    return lambda x: torch.tanh(x) * layer.weight.mean()


class _Scaler:
    """A plain object (no module) whose method ``apply`` is kept as an activation: scales by its ``s``."""

    def __init__(self, s: float) -> None:
        self.s = s

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.s


FUNCTIONS_THAT_DIFFER = {  # member 0's activation and member 1's, and how the refusal names them
    "builtin": (torch.relu, torch.tanh, r"torch\.tanh where member 0's is torch\.relu"),
    "python function": (nn.functional.relu, nn.functional.silu,
                        r"torch\.nn\.functional\.silu where member 0's is torch\.nn\.functional\.relu"),
    "closing over another scale": (_times(1.0), _times(2.0),
                                   r"\S*_times\.<locals>\.<lambda> where member 0's is \S*_times\.<locals>\.<lambda>"),
    "another method": ("method", "other method", r"\S*_Activated\._hard where member 0's is \S*_Activated\._soft"),
    "a partial with another argument": (
        functools.partial(nn.functional.leaky_relu, negative_slope=0.1),
        functools.partial(nn.functional.leaky_relu, negative_slope=0.3),
        r"functools\.partial\(torch\.nn\.functional\.leaky_relu, \.\.\.\) where member 0's is "
        r"functools\.partial\(torch\.nn\.functional\.leaky_relu, \.\.\.\)"),
    "a nested function with another default": (
        _leaky(0.1), _leaky(0.3), r"\S*_leaky\.<locals>\.act where member 0's is \S*_leaky\.<locals>\.act"),
    "a nested function with another keyword-only default": (
        _kw_leaky(0.1), _kw_leaky(0.3),
        r"\S*_kw_leaky\.<locals>\.act where member 0's is \S*_kw_leaky\.<locals>\.act"),
    "a partial with another positional argument": (
        functools.partial(torch.mul, 0.5), functools.partial(torch.mul, 2.0),
        r"functools\.partial\(torch\.mul, \.\.\.\) where member 0's is functools\.partial\(torch\.mul, \.\.\.\)"),
    "a lambda closing over its own module at another place": (
        "weighted by a", "weighted by b",
        r"\S*_weighted\.<locals>\.<lambda> where member 0's is \S*_weighted\.<locals>\.<lambda>"),
    "a method of a plain object with another value": (
        _Scaler(1.0).apply, _Scaler(3.0).apply, r"\S*_Scaler\.apply where member 0's is \S*_Scaler\.apply"),
}


@pytest.mark.parametrize("differ", list(FUNCTIONS_THAT_DIFFER))
def test_members_whose_function_attributes_differ_are_refused_naming_the_attribute(differ):
    """Before, they stacked and every member ran member 0's function: member 1 (tanh) trained with relu, its loss 0.59
    where its solo run's is 0.55; a method of a plain object (``Scaler(3.0).apply``, no module) was compared by its
    function only, member 1 running member 0's ``Scaler(1.0)``: its loss 0.42 where its solo run's is 1.93. (Each is
    accepted where alike: see the made-alike test below, which compares with the solo runs.)"""
    first, second, said = FUNCTIONS_THAT_DIFFER[differ]
    with pytest.raises(ValueError, match=r"ensemble.stack: member 1's module \(model\) \(_Activated\) has another 'act' "
                                         rf"than member 0's \({said}\); the vmapped step runs member 0's modules, with "
                                         "their values, for all"):
        ensemble.stack([_sgd(_Activated(0, first)), _sgd(_Activated(1, second))])


@pytest.mark.parametrize("act", ["function", "lambda made in __init__", "method of its own"])
def test_members_with_the_same_function_attribute_follow_their_solo_runs(act, make_batches):
    """The same function, a lambda of the same code made by each member's ``__init__``, or a method of each member's
    own module: alike, so they stack and train as their solo runs (and a donated step refuses member 1's replaced)."""
    given = {"function": torch.relu, "lambda made in __init__": "lambda", "method of its own": "method"}[act]
    batches = make_batches(3)
    states = [_sgd(_Activated(k, given)) for k in range(3)]
    _assert_follow_solo(_together(states, batches), states, batches)
    ens = _together(states, batches[:1])
    ens.members[1].model.act = torch.tanh
    with pytest.raises(ValueError, match=r"ensemble.train_step: member 1's module \(model\) \(_Activated\) has another "
                                         r"'act' than member 0's") as error:
        ensemble.train_step(_mse_loss, donated=True)(ens, batches[1])
    assert loopkit.state_at_error(error.value) is ens


class _MadeAlike(nn.Module):
    """A model whose ``__init__`` makes a hook on its first layer, or its activation, anew for each member, in one of
    the usual ways (``kind``): each member's object computes what member 0's does (on its own module)."""

    def __init__(self, seed: int, kind: str) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.scale = 0.5
        scale, slope = 0.5, 0.1

        def nested(module: nn.Module, args: tuple, out: torch.Tensor, factor: float = 0.5) -> torch.Tensor:
            return out * factor

        def act(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
            return nn.functional.leaky_relu(x, slope)

        def kw_act(x: torch.Tensor, *, slope: float = 0.1) -> torch.Tensor:
            return nn.functional.leaky_relu(x, slope)

        hooks = {
            "a partial of a function": lambda: functools.partial(_scaled_by, scale=0.5),
            "a partial of its own method": lambda: functools.partial(self._scaled, 0.5),
            "a lambda closing over its module": lambda: lambda module, args, out: out * self.scale,
            "a lambda closing over an equal number": lambda: lambda module, args, out: out * scale,
            "a callable object": lambda: _Scale(0.5),
            "a nested function with a default": lambda: nested,
        }
        acts = {
            "activation: a lambda closing over its module": lambda: lambda x: torch.tanh(x) * self.scale,
            "activation: a nested function with a default": lambda: act,
            "activation: a lambda closing over an equal number": lambda: lambda x: nn.functional.leaky_relu(x, slope),
            "activation: a partial": lambda: functools.partial(nn.functional.leaky_relu, negative_slope=0.1),
            "activation: a nested function with a keyword-only default": lambda: kw_act,
            "activation: a partial with a positional argument": lambda: functools.partial(torch.mul, 0.5),
            "activation: a lambda closing over one of its layers": lambda: _weighted(self.a),
            "activation: a method of a plain object": lambda: _Scaler(0.5).apply,
        }
        if kind in hooks:
            self.a.register_forward_hook(hooks[kind]())
        self.act = acts[kind]() if kind in acts else torch.tanh

    def _scaled(self, scale: float, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


MADE_ALIKE = ["a partial of a function", "a partial of its own method", "a lambda closing over its module",
              "a lambda closing over an equal number", "a callable object", "a nested function with a default",
              "activation: a lambda closing over its module", "activation: a nested function with a default",
              "activation: a lambda closing over an equal number", "activation: a partial",
              "activation: a nested function with a keyword-only default",
              "activation: a partial with a positional argument", "activation: a lambda closing over one of its layers",
              "activation: a method of a plain object"]


@pytest.mark.parametrize("donated", [False, True])
@pytest.mark.parametrize("kind", MADE_ALIKE)
def test_members_whose_hooks_or_functions_are_made_alike_for_each_member_follow_their_solo_runs(kind, donated,
                                                                                                make_batches):
    """Before, stack refused them (hooks and function attributes alike only as one object, bound methods, or one code
    without closure or defaults), though each member's copy computes the same: a partial (compared by its function
    and arguments), a lambda or nested function closing over its own module (by its place in the member) or over an
    equal value, or with defaults, keyword-only ones too (by value), a callable hook object, or a method of a plain
    object made for each member (by its class and attributes; a plain object's was accepted whatever its attributes
    before, see above)."""
    batches = make_batches(3)
    states = [_sgd(_MadeAlike(k, kind)) for k in range(3)]
    _assert_follow_solo(_together(states, batches, donated=donated), states, batches)


# --- buffers: stacked for the step, checked as the parameters are ---------------------------------------------------


class _Masked(nn.Module):
    """Scales its output by the mean of a ``mask`` buffer (a mask or position table of its own length and dtype)."""

    def __init__(self, seed: int, n: int = 4, dtype: torch.dtype = torch.float32, mask: bool = True) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.l = nn.Linear(4, 2)
        self.register_buffer("mask", torch.ones(n, dtype=dtype) if mask else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x) * (self.mask.mean() if self.mask is not None else 1.0)


BUFFERS_THAT_DIFFER = {  # member 1's _Masked, and what the refusal says (member 0's: 4 float32 ones)
    "shape": ({"n": 6}, "buffer 'mask' has shape (6,), dtype torch.float32, device cpu where member 0's has shape (4,), "
                        "dtype torch.float32, device cpu"),
    "dtype": ({"dtype": torch.float64}, "buffer 'mask' has shape (4,), dtype torch.float64, device cpu where member "
                                        "0's has shape (4,), dtype torch.float32, device cpu"),
    "missing": ({"mask": False}, "no buffer 'mask' where member 0's has shape (4,), dtype torch.float32, device cpu"),
}


@pytest.mark.parametrize("differ", list(BUFFERS_THAT_DIFFER))
def test_members_whose_buffers_differ_are_refused_naming_the_buffer(differ):
    """Before, a buffer of another shape got torch's bare "stack expects each tensor to be equal size" (naming neither
    member nor buffer), one of another dtype was promoted without a word (member 0's float32 buffer ran as float64),
    and one missing was named as a module of another architecture ("(model): _Masked() where member 0 has (model):
    _Masked")."""
    given, said = BUFFERS_THAT_DIFFER[differ]
    with pytest.raises(ValueError, match=r"ensemble.stack: member 1's model differs from member 0's "
                                         rf"\({re.escape(said)}\); every member must have the same architecture, its "
                                         "parameters and buffers of the same shapes, dtypes and devices"):
        ensemble.stack([_sgd(_Masked(0)), _sgd(_Masked(1, **given))])


def _instance_normed(seed: int, track_running_stats: bool = True, train: bool = True) -> loopkit.TrainState:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, track_running_stats=track_running_stats),
                              nn.Flatten(), nn.Linear(3 * 6, 1))
    if track_running_stats:
        with torch.no_grad():
            model[1].running_mean.fill_(0.1 * seed)
            model[1].running_var.fill_(1.0 + seed)
    return _sgd(model.train(train))


def test_instancenorm_updating_running_statistics_is_refused_by_stack_as_batchnorm_is():
    """Before, stack took it (it refused only BatchNorm), and the first donated step failed on the buffers it updated
    and used the ensemble up. Reading its statistics (eval mode), or with none (track_running_stats=False), it trains
    as the solo runs."""
    with pytest.raises(TypeError, match=r"ensemble.stack: member 0 has InstanceNorm1d in training mode with running "
                                        r"statistics, which a vmapped step cannot update in place; freeze it"):
        ensemble.stack([_instance_normed(k) for k in range(2)])
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 2, 8, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(3)]
    for kwargs in ({"train": False}, {"track_running_stats": False}):
        states = [_instance_normed(k, **kwargs) for k in range(3)]
        _assert_follow_solo(_together(states, batches), states, batches)


def _scaled_loss(model, batch):
    """:func:`_mse_loss` times 100: gradients large enough for a clamp to bite."""
    return _mse_loss(model, batch) * 100


def _checked_scaled_loss(model, batch):
    """:func:`_scaled_loss` with a ``.item()`` check vmap cannot run: the members run one at a time."""
    loss = _scaled_loss(model, batch)
    if loss.item() > 1e9:
        raise FloatingPointError("diverged")
    return loss


def _refuse_large(grad):
    """A gradient hook that checks the gradient (as a check that gradients are finite would) and raises."""
    if grad.abs().max() > 1e3:
        raise FloatingPointError("gradient too large")


@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
def test_a_gradient_hook_that_raises_leaves_the_donated_ensemble_usable_as_a_solo_step_leaves_its_state(
        path, make_batches, take_snapshot, assert_trees_equal):
    """The hooks run on every member's gradient before any member updates: a hook's error leaves the donated ensemble
    usable (state_at_error returns it), each member as it was, as loopkit.donate leaves one state whose backward's
    hook raised; without the hook it trains on."""
    loss_fn = _scaled_loss if path == "vmapped" else _checked_scaled_loss
    big = [(x, 100 * y) for x, y in make_batches(2)]
    solo = _states()[2]
    handle = solo.model[0].weight.register_hook(_refuse_large)
    with pytest.raises(FloatingPointError) as solo_error:
        loopkit.donate(loopkit.train_step(loss_fn))(solo, big[0])
    assert loopkit.state_at_error(solo_error.value) is solo
    ens = ensemble.stack(_states())
    hook = ens.members[2].model[0].weight.register_hook(_refuse_large)  # member 2's only
    before = [take_snapshot(m) for m in ens.members]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(FloatingPointError, match="gradient too large") as error:
            ensemble.train_step(loss_fn, donated=True)(ens, big[0])
    assert loopkit.state_at_error(error.value) is ens
    for member, snap in zip(ens.members, before):
        member.check_usable()
        assert_trees_equal(take_snapshot(member), snap)
    hook.remove()
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ens, _ = ensemble.train_step(loss_fn, donated=True)(ens, big[1])
    assert [m.step for m in ens.members] == [1, 1, 1]


def _refuse_large_accumulated(param):
    """A post-accumulate-grad hook that checks the accumulated gradient (as a check that gradients are finite would)
    and raises."""
    if param.grad.abs().max() > 1e3:
        raise FloatingPointError("accumulated gradient too large")


def _moves_its_parameter(param):
    """A post-accumulate-grad hook that changes its parameter in place (as an optimizer stepping in the backward)."""
    with torch.no_grad():
        param.add_(1.0)


@pytest.mark.parametrize("path", ["vmapped", "one member at a time"])
def test_a_post_accumulate_grad_hook_that_raises_leaves_the_donated_ensemble_as_it_was_and_trains_on_as_the_solo_runs(
        path, make_batches, take_snapshot, assert_trees_equal):
    """Before, each member's gradients were set (its post-accumulate-grad hooks run) and its optimizer stepped one
    member at a time: member 2's hook raising left members 0 and 1 updated and the ensemble used up (state_at_error
    None). Now every member's hooks run before any member's optimizer steps: the error gives the gradients back (None,
    as the call found them) and leaves the ensemble whole, each member as it was (parameters, optimizer state, RNG,
    counters), as the solo step's failed backward leaves its parameters and optimizer state (the solo step uses its
    state up, not knowing whether a post-accumulate-grad hook moved a parameter); the hook removed, the ensemble
    trains on as the solo runs do."""
    loss_fn = _scaled_loss if path == "vmapped" else _checked_scaled_loss
    big = [(x, 100 * y) for x, y in make_batches(2)]
    solo = _states()[2]
    solo_before = take_snapshot(solo)
    solo.model[0].weight.register_post_accumulate_grad_hook(_refuse_large_accumulated)
    with pytest.raises(FloatingPointError, match="accumulated gradient too large") as solo_error:
        loopkit.donate(loopkit.train_step(loss_fn))(solo, big[0])
    assert loopkit.state_at_error(solo_error.value) is None
    solo_after = take_snapshot(solo)
    for part in ("params", "optimizer", "rng", "counters"):
        assert_trees_equal(solo_after[part], solo_before[part])
    ens = ensemble.stack(_states())
    hook = ens.members[2].model[0].weight.register_post_accumulate_grad_hook(_refuse_large_accumulated)
    before = [take_snapshot(m) for m in ens.members]
    step = ensemble.train_step(loss_fn, donated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (one member at a time: said once)
        with pytest.raises(FloatingPointError, match="accumulated gradient too large") as error:
            step(ens, big[0])
    assert loopkit.state_at_error(error.value) is ens
    ens.check_usable()
    for member, snap in zip(ens.members, before):
        member.check_usable()
        assert_trees_equal(take_snapshot(member), snap)
    hook.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ens, _ = step(ens, big[1])
    assert [m.step for m in ens.members] == [1, 1, 1]
    exact = {"rtol": 0, "atol": 0} if path != "vmapped" else {"rtol": 1e-5, "atol": 1e-6}
    for k, solo in enumerate(_states()):
        solo, _ = loopkit.train_step(loss_fn)(solo, big[1])
        for (name, p), q in zip(solo.model.named_parameters(), ens.members[k].model.parameters()):
            torch.testing.assert_close(q, p, **exact, msg=f"member {k} {name}: differs from its solo run")


def test_a_post_accumulate_grad_hook_error_after_a_hook_moved_a_parameter_uses_the_donated_ensemble_up():
    """Member 0's post-accumulate-grad hook changes its parameter in place (an optimizer stepping in the backward)
    before member 2's raises: giving the gradients back would not undo it, so the donated ensemble is used up
    (state_at_error None), as a solo step's backward error under such a hook uses its state up."""
    batch = (torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.full((6, 2), 1e3))
    ens = ensemble.stack(_states())
    ens.members[0].model[0].weight.register_post_accumulate_grad_hook(_moves_its_parameter)
    ens.members[2].model[0].weight.register_post_accumulate_grad_hook(_refuse_large_accumulated)
    with pytest.raises(FloatingPointError, match="accumulated gradient too large") as error:
        ensemble.train_step(_scaled_loss, donated=True)(ens, batch)
    assert loopkit.state_at_error(error.value) is None
    with pytest.raises(loopkit.DonatedStateError):
        ens.check_usable()


def _halve_grad(param):
    param.grad.mul_(0.5)


def _hooked_states():
    """The members of MEMBERS, every parameter's gradient clamped by a tensor hook (clipping by value), member 1's
    halved after accumulation (a post-accumulate-grad hook)."""
    states = _states()
    for k, state in enumerate(states):
        for p in state.model.parameters():
            p.register_hook(lambda g: g.clamp(-0.01, 0.01))
            if k == 1:
                p.register_post_accumulate_grad_hook(_halve_grad)
    return states


@pytest.mark.parametrize(("path", "donated"), [("vmapped", True), ("one member at a time", False)])
def test_gradient_hooks_on_a_members_parameters_run_on_its_gradient_as_in_its_solo_run(path, donated, make_batches):
    """Before, stack dropped the hooks of the members' parameters (new views) and the step's torch.func gradients
    would not have run them: a member clipping its gradients by value trained 1.8e5 off its solo run, silently. Now
    each member's hooks run on its own gradient (a hook registered on a member after stacking too), as its solo
    backward runs them: equal to its solo train_step run and its hand-written loop (bitwise one member at a time)."""
    loss_fn = _scaled_loss if path == "vmapped" else _checked_scaled_loss
    batches = make_batches(3)
    ens = ensemble.stack(_hooked_states())
    ens.members[2].model[0].weight.register_hook(lambda g: g * 0)  # member 2's only, after stacking
    step = ensemble.train_step(loss_fn, donated=donated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (one member at a time: said once)
        for batch in batches:
            ens, _ = step(ens, batch)
    assert step.unbatchable == (path != "vmapped")
    exact = {"rtol": 0, "atol": 0} if path != "vmapped" else {"rtol": 1e-5, "atol": 1e-6}
    for k, (solo, raw) in enumerate(zip(_hooked_states(), _hooked_states())):
        if k == 2:
            solo.model[0].weight.register_hook(lambda g: g * 0)
            raw.model[0].weight.register_hook(lambda g: g * 0)
        _, make_opt, make_sched = MEMBERS[k]
        _raw_loop(raw.model, make_opt, make_sched, loss_fn, batches)
        solo_step = loopkit.train_step(loss_fn)
        for batch in batches:
            solo, _ = solo_step(solo, batch)
        for (name, p), q, r in zip(solo.model.named_parameters(), ens.members[k].model.parameters(),
                                   raw.model.parameters()):
            torch.testing.assert_close(q, p, **exact, msg=f"member {k} {name}: differs from its solo run")
            torch.testing.assert_close(q, r, **exact, msg=f"member {k} {name}: differs from its hand-written loop")


@pytest.mark.parametrize("loss_fn, match", [
    (lambda batch: batch[0].sum(), r"^ensemble.train_step: loss_fn must take \(model, batch\); .*<lambda>\(batch\) cannot"),
    (lambda m, x, y: x, r"^ensemble.train_step: loss_fn must take \(model, batch\); .*missing"),
    (nn.MSELoss(), r"^ensemble.train_step: loss_fn must take \(model, batch\), and it is a torch.nn.Module \(MSELoss\)"),
], ids=["one-arg", "three-args", "criterion"])
def test_a_loss_fn_of_the_wrong_signature_is_refused_when_the_step_is_built_as_by_loopkit_train_step(loss_fn, match):
    with pytest.raises(TypeError, match=match):
        ensemble.train_step(loss_fn)
    with pytest.raises(TypeError, match=match.replace("ensemble.train_step", "train_step")):
        loopkit.train_step(loss_fn)  # (the reference: loopkit.train_step's own check)
