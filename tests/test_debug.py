"""loopkit.check_purity: the contract's promises checked, and each broken one named."""

from __future__ import annotations

import collections
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import loopkit
from loopkit.steps import WrapperStep
from loopkit import ImpurityError, check_purity


def _state(make_bn_dropout, make_adam_state):
    return make_adam_state(make_bn_dropout(0), seed=1, scheduler=True)


@pytest.mark.parametrize("pipeline", ["plain", "transforms", "eval"])
def test_loopkit_steps_pass_and_the_result_is_the_steps_own(pipeline, make_bn_dropout, make_adam_state, batches, mse_loss,
                                                            assert_trees_equal, take_snapshot):
    step = loopkit.train_step(mse_loss)
    if pipeline == "transforms":
        step = loopkit.with_grad_clip(loopkit.with_grad_accum(loopkit.with_nan_guard(step), every=2), max_norm=0.5)
    if pipeline == "eval":
        step = loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)})
    state = _state(make_bn_dropout, make_adam_state)
    new, metrics = check_purity(step, state, batches[0])
    direct, direct_metrics = step(state, batches[0])
    assert_trees_equal(take_snapshot(new), take_snapshot(direct))
    assert_trees_equal(metrics, direct_metrics)


def test_the_layers_that_write_the_runs_files_are_left_out_and_the_steps_inside_checked(
    tmp_path, make_mlp, make_sgd_state, batches, mse_loss, take_snapshot, assert_trees_equal
):
    """A probe through with_checkpointing(every_n_steps=1) wrote a checkpoint of the probe's batch into the run's
    folder (then taken for the run's own step 1), and through with_logging its rows into the run's logs."""
    logger = loopkit.CSVLogger(tmp_path / "logs")
    inner = loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=0.5)
    pipeline = loopkit.with_checkpointing(loopkit.with_logging(inner, logger, every_n_steps=1), tmp_path / "ckpt",
                                          every_n_steps=1)
    state = make_sgd_state(make_mlp(0))
    new, _ = check_purity(pipeline, state, batches[0])
    assert loopkit.checkpoint.list_checkpoints(tmp_path / "ckpt") == [] and not (tmp_path / "logs").exists()
    assert_trees_equal(take_snapshot(new), take_snapshot(inner(state, batches[0])[0]))

    def sloppy(state, batch):  # a step inside them is still checked
        with torch.no_grad():
            state.model[0].weight.sub_(0.1)
        return state.evolve(step=state.step + 1), {}

    with pytest.raises(ImpurityError, match="changed the state it was given"):
        check_purity(loopkit.with_checkpointing(sloppy, tmp_path / "ckpt2", every_n_steps=1), state, batches[0])

    class Scaled(WrapperStep):  # a wrapper of one's own that attrs did not make (another __init__): called as it is
        def __init__(self, inner, factor):
            object.__setattr__(self, "inner", inner)
            object.__setattr__(self, "factor", factor)
            object.__setattr__(self, "donated", False)

        def run_(self, state, batch):
            new, metrics = self.inner.run_(state, batch)
            return new, {k: v * self.factor for k, v in metrics.items()}

    logged = loopkit.with_logging(inner, loopkit.CSVLogger(tmp_path / "own"), every_n_steps=100)
    new, metrics = check_purity(Scaled(logged, 2.0), state, batches[0])
    assert torch.equal(metrics["loss"], 2.0 * inner(state, batches[0])[1]["loss"])


def test_a_step_changing_the_callers_parameters_is_named(make_mlp, make_sgd_state, batches):
    def sloppy(state, batch):
        with torch.no_grad():
            state.model[2].bias.add_(0.5)
        return state.evolve(step=state.step + 1), {}

    with pytest.raises(ImpurityError, match=r"step .*sloppy changed the state it was given: model\.2\.bias differs \(max abs difference 0\.5\)"):
        check_purity(sloppy, make_sgd_state(make_mlp(0)), batches[0])


def test_a_step_changing_the_callers_optimizer_state_is_named(make_mlp, make_adam_state, batches, mse_loss):
    state = loopkit.train_step(mse_loss)(make_adam_state(make_mlp(0)), batches[0])[0]  # Adam has moments now

    def in_place(state, batch):  # the core of a step, without the copy a pure step makes
        return loopkit.train_step(mse_loss).run_(state, batch)

    with pytest.raises(ImpurityError, match=r"changed the state it was given: model\.0\.weight differs"):
        check_purity(in_place, state, batches[1])

    def moments_only(state, batch):
        for moments in state.optimizer.state.values():
            moments["exp_avg"].mul_(0.5)
        return state.evolve(step=state.step + 1), {}

    with pytest.raises(ImpurityError, match=r"optimizer\.state\.0\.exp_avg differs"):
        check_purity(moments_only, state, batches[1])


def test_a_step_drawing_from_the_global_rng_is_named(make_mlp, make_sgd_state, batches):
    def noisy(state, batch):
        return state, {"noise": torch.rand(())}

    def noisy_and_sloppy(state, batch):
        torch.rand(())
        with torch.no_grad():
            state.model[0].weight.add_(1.0)
        return state, {}

    caller = torch.get_rng_state()
    with pytest.raises(ImpurityError, match="left torch's global RNG advanced"):
        check_purity(noisy, make_sgd_state(make_mlp(0)), batches[0])
    assert torch.equal(torch.get_rng_state(), caller)  # the check put the caller's RNG back
    with pytest.raises(ImpurityError, match="changed the state it was given"):
        check_purity(noisy_and_sloppy, make_sgd_state(make_mlp(0)), batches[0])
    assert torch.equal(torch.get_rng_state(), caller)  # on every way out


def test_a_step_reading_something_besides_state_and_batch_is_named(make_mlp, make_sgd_state, batches):
    calls = []

    def counting(state, batch):
        calls.append(1)
        return state.evolve(extras={"calls": len(calls)}), {"calls": torch.tensor(float(len(calls)))}

    with pytest.raises(ImpurityError, match=r"two different results for the same state and batch: extras\.calls changed from 1 to 2"):
        check_purity(counting, make_sgd_state(make_mlp(0)), batches[0])
    check_purity(counting, make_sgd_state(make_mlp(0)), batches[0], deterministic=False)


def test_the_gan_examples_hand_written_step_keeps_the_contract():
    path = Path(__file__).resolve().parents[1] / "examples" / "gan.py"
    spec = importlib.util.spec_from_file_location("example_gan_purity", path)
    gan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gan)
    state = gan.make_state(0, 1e-3, 1e-3)
    state, _ = gan.gan_step(state, torch.randn(16, 2))  # Adam moments exist from here
    check_purity(gan.gan_step, state, torch.randn(16, 2))


def test_donated_steps_and_other_states_are_refused(make_mlp, make_sgd_state, batches, mse_loss):
    with pytest.raises(TypeError, match="is donated, so it may change the state"):
        check_purity(loopkit.donate(loopkit.train_step(mse_loss)), make_sgd_state(make_mlp(0)), batches[0])
    with pytest.raises(TypeError, match="state must be a loopkit.TrainState"):
        check_purity(loopkit.train_step(mse_loss), {"model": make_mlp(0)}, batches[0])
    with pytest.raises(TypeError, match="step must be callable as step\\(state, batch\\), got NoneType"):
        check_purity(None, make_sgd_state(make_mlp(0)), batches[0])


@pytest.mark.parametrize("returns, got", [
    (lambda state: state, r"a TrainState; a step returns \(new_state, metrics\)"),
    (lambda state: (state, None), r"a \(TrainState, NoneType\) pair; a step returns \(new_state, metrics\)"),
    (lambda state: {"loss": 1.0}, r"a dict; a step returns \(new_state, metrics\).*pass eval_step\(metric_fn\)"),
])
def test_a_step_returning_the_wrong_shape_is_named_as_run_epochs_names_it(returns, got, make_mlp, make_sgd_state,
                                                                         batches):
    def shapeless(state, batch):
        return returns(state)

    match = r"step test_a_step_.*\.shapeless returned " + got
    with pytest.raises(TypeError, match=match):
        loopkit.run_epochs(shapeless, make_sgd_state(make_mlp(0)), batches[:1], epochs=1, progress=False)
    with pytest.raises(TypeError, match=match):
        check_purity(shapeless, make_sgd_state(make_mlp(0)), batches[0])


@pytest.mark.parametrize("change, where", [
    (lambda m: m.eval(), r"modules\.<root>\.training changed from True to False"),
    (lambda m: m[0].weight.requires_grad_(False), r"modules\.0\.requires_grad\.weight changed from True to False"),
    (lambda m: m[1].register_forward_hook(lambda *a: None), r"modules\.1\.hooks\.0 changed from 0 to 1"),
    (lambda m: m.__setitem__(1, torch.nn.Identity()), r"modules\.1\.class changed from 'Tanh' to 'Identity'"),
    # a plain setting a forward reads, a gradient hook on a parameter, a parameter the optimizer no longer holds
    (lambda m: setattr(m[0], "in_features", 99), r"modules\.0\.settings\.in_features changed from \d+ to 99"),
    (lambda m: setattr(m[0], "temperature", 2.0), r"modules\.0\.settings\.temperature is new"),
    (lambda m: m[0].weight.register_hook(lambda g: g), r"modules\.0\.gradient hooks\.weight\.0 changed from 0 to 1"),
    (lambda m: m[0].weight.register_post_accumulate_grad_hook(lambda p: None),
     r"modules\.0\.gradient hooks\.weight\.1 changed from 0 to 1"),
    (lambda m: m[1].register_full_backward_pre_hook(lambda *a: None), r"modules\.1\.hooks\.3 changed from 0 to 1"),
    (lambda m: setattr(m[0], "weight", torch.nn.Parameter(m[0].weight.detach().clone())),
     r"optimizer parameters\.0\.0 changed from '0\.weight' to None"),
])
def test_changes_outside_the_state_dict_are_named(change, where, make_mlp, make_sgd_state, batches):
    with pytest.raises(ImpurityError, match="changed the state it was given: " + where):
        check_purity(_meddling(lambda state: change(state.model)), make_sgd_state(make_mlp(0)), batches[0])


class _Sizes(torch.nn.Module):
    """A linear layer whose forward appends each batch's length to a list setting of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.seen_sizes, self.history = torch.nn.Linear(2, 1), [], [[]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_sizes.append(len(x))
        return self.lin(x)


@pytest.mark.parametrize("change, where", [
    (lambda m: m(torch.ones(4, 2)), r"modules\.<root>\.settings\.seen_sizes changed length from 0 to 1"),
    (lambda m: m.history[0].append(1.5), r"modules\.<root>\.settings\.history\.0 changed length from 0 to 1"),
])
def test_a_list_setting_changed_in_place_is_named_and_a_pure_steps_forward_passes(change, where):
    """As a counter setting reassigned (self.calls += 1): the snapshot holds a copy of the list, not the list."""
    def state():
        model = _Sizes()
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    with pytest.raises(ImpurityError, match="changed the state it was given: " + where):
        check_purity(_meddling(lambda s: change(s.model)), state(), None)
    given = state()
    check_purity(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), given, torch.ones(4, 2))  # its copy's list
    assert given.model.seen_sizes == [] and given.model.history == [[]]


def _meddling(change):
    """A step that calls ``change(state)`` on the state it is given, and counts an update."""
    def meddling(state, batch):
        change(state)
        return state.evolve(step=state.step + 1), {}

    return meddling


@pytest.mark.parametrize("change, where", [
    (lambda o: o.register_step_pre_hook(lambda *a: None), r"optimizer facts\.hooks\.0 changed from 0 to 1"),
    (lambda o: o.register_step_post_hook(lambda *a: None), r"optimizer facts\.hooks\.1 changed from 0 to 1"),
    (lambda o: o.defaults.__setitem__("lr", 5.0), r"optimizer facts\.defaults\.lr changed from 0\.1 to 5\.0"),
])
def test_changes_to_the_optimizer_outside_its_state_dict_are_named(change, where, make_mlp, make_sgd_state, batches):
    """(Later steps run such a hook; a group added later takes the changed defaults.)"""
    with pytest.raises(ImpurityError, match="changed the state it was given: " + where):
        check_purity(_meddling(lambda state: change(state.optimizer)), make_sgd_state(make_mlp(0)), batches[0])


def test_a_step_changing_a_non_persistent_buffer_is_named(make_mlp, make_sgd_state, batches):
    """A state dict leaves non-persistent buffers out; the check does not."""
    state = make_sgd_state(make_mlp(0))
    state.model[1].register_buffer("calls", torch.zeros(()), persistent=False)

    def counting(state, batch):
        state.model[1].calls += 1  # the caller's module
        return state.evolve(step=state.step + 1), {}

    with pytest.raises(ImpurityError, match=r"changed the state it was given: buffers\.1\.calls"):
        check_purity(counting, state, batches[0])


def test_sparse_gradients_mid_accumulation_are_compared_by_value():
    """An nn.Embedding(sparse=True) mid-group holds a sparse gradient: the check compares what it
    stands for, passes the pure step, and names a step that adds to the caller's gradient."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(10, 3, sparse=True)
    state = loopkit.TrainState.create(model, torch.optim.SparseAdam(model.parameters(), lr=0.1))
    step = loopkit.with_grad_accum(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), every=3)
    state, _ = step(state, torch.tensor([[1, 2]]))
    assert state.model.weight.grad.is_sparse
    new, _ = check_purity(step, state, torch.tensor([[2, 3]]))
    assert new.extras["accum/count"] == 2

    def sloppy(state, batch):  # adds to the caller's accumulated gradient in place
        state.model.weight.grad.add_(torch.sparse_coo_tensor([[4]], torch.ones(1, 3), (10, 3)))
        return step(state, batch)

    with pytest.raises(ImpurityError, match="weight"):
        check_purity(sloppy, state, torch.tensor([[2, 3]]))


class _Counting(torch.nn.Module):
    """A model keeping plain tensors as attributes (no parameters or buffers), which fork copies as state: a counter
    its forward updates, and a dict of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.seen = torch.zeros(())
        self.cache = {"last": torch.zeros(4), "labels": ["a", "b"]}

    def forward(self, x):
        self.seen.add_(1)  # in place, on the model the step was given: the pure step's copy
        self.cache["last"] = x.detach().mean(0)
        return self.linear(x)


@pytest.mark.parametrize("change, where", [
    (lambda m: m.seen.add_(1), r"attributes\.seen differs \(max abs difference 1\)"),
    (lambda m: m.cache["last"].fill_(3.0), r"attributes\.cache\.last differs \(max abs difference 3\)"),
])
def test_a_step_changing_a_plain_tensor_attribute_of_the_callers_model_is_named(change, where, batches, mse_loss):
    """fork copies a module's plain tensor attributes (and the dicts holding them) as state, so train_step leaves
    the caller's alone: the check compares them too, and names a step that changes the caller's."""
    torch.manual_seed(0)
    model = _Counting()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    batch = torch.randn(8, 4)
    new, _ = check_purity(step, state, batch)  # the pure step's forward updates its copy's attributes
    direct, _ = step(state, batch)  # the reference: a pure step leaves the caller's attributes as they were
    assert float(state.model.seen) == 0.0 and float(direct.model.seen) == float(new.model.seen) == 1.0
    assert torch.equal(state.model.cache["last"], torch.zeros(4))

    with pytest.raises(ImpurityError, match="changed the state it was given: " + where):
        check_purity(_meddling(lambda state: change(state.model)), state, batch)


_Stats = collections.namedtuple("_Stats", "mean count")


class _Ids(list):
    pass


@pytest.mark.parametrize("holder", [
    lambda a, b: _Stats(a, b), lambda a, b: collections.deque([a, b]), lambda a, b: _Ids([a, b]),
], ids=["namedtuple", "deque", "list subclass"])
def test_tensors_cached_in_a_namedtuple_deque_or_list_subclass_attribute_are_compared(holder):
    """The check looked inside a plain list or tuple attribute only: a step changing a tensor the caller's model keeps
    in a namedtuple, a deque or a list subclass passed (and a pure step's copy shared them: its forward counted
    into the caller's model, unseen)."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 1)
            self.stats = holder(torch.zeros(1), torch.zeros(1))

        def forward(self, x):
            self.stats[1].add_(1)  # a counter cached as a module attribute, updated in place
            return self.fc(x)

    model = Counting()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = check_purity(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), state, torch.ones(4, 2))
    assert float(state.model.stats[1]) == 0.0 and float(new.model.stats[1]) == 1.0
    with pytest.raises(ImpurityError, match=r"given: attributes\.stats\.1 differs \(max abs difference 2\)"):
        check_purity(_meddling(lambda s: s.model.stats[1].add_(2)), state, None)


def test_a_namedtuple_setting_is_compared_and_a_pure_step_passes():
    """A module holding a namedtuple of plain values (a config): the snapshot rebuilt it as type(t)(items), which the
    namedtuple's constructor refuses: check_purity raised a TypeError on a pure step."""
    Cfg = collections.namedtuple("Cfg", "scale shift")

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.cfg = torch.nn.Linear(2, 1), Cfg(2.0, 0.5)

        def forward(self, x):
            return self.fc(x) * self.cfg.scale + self.cfg.shift

    model = Scaled()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    new, _ = check_purity(step, state, torch.ones(4, 2))
    assert torch.equal(new.model.fc.weight, step(state, torch.ones(4, 2))[0].model.fc.weight)
    with pytest.raises(ImpurityError, match=r"modules\.<root>\.settings\.cfg\.0 changed from 2\.0 to 3\.0"):
        check_purity(_meddling(lambda s: setattr(s.model, "cfg", Cfg(3.0, 0.5))), state, None)


def test_a_change_of_a_complex_parameters_imaginary_part_is_named_by_its_size():
    """The gap was computed with .double(), which drops the imaginary part (a ComplexWarning): 'max abs difference
    0' for a real change. Reference: |0.5j - 0| = 0.5, and |3 + 4j| = 5."""

    class Complex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    for change, gap in ((0.5j, "0.5"), (3 + 4j, "5")):
        state = loopkit.TrainState.create(Complex())

        def sloppy(state):
            with torch.no_grad():
                state.model.w.add_(change)

        with pytest.raises(ImpurityError, match=rf"model\.w differs \(max abs difference {gap}\)$"):
            check_purity(_meddling(sloppy), state, None)


def test_the_profiler_layer_is_left_out_and_the_run_is_profiled_as_configured(tmp_path, make_mlp, make_sgd_state,
                                                                               batches, mse_loss, take_snapshot,
                                                                               assert_trees_equal):
    """A probe through with_profiler wrote its summary and trace into the run's folder and used up the schedule, so
    the run's own calls were not profiled."""
    inner = loopkit.train_step(mse_loss)
    step = loopkit.with_profiler(inner, tmp_path / "prof", wait=0, warmup=1, active=1)
    state = make_sgd_state(make_mlp(0))
    new, _ = check_purity(step, state, batches[0])
    assert list((tmp_path / "prof").iterdir()) == []
    assert_trees_equal(take_snapshot(new), take_snapshot(inner(state, batches[0])[0]))
    for batch in batches[:2]:  # the run's own calls: the ones profiled
        state, _ = step(state, batch)
    summary = (tmp_path / "prof" / "summary.txt").read_text()
    assert "loopkit.step" in summary and sum(1 for f in (tmp_path / "prof").iterdir() if f.name.endswith(".pt.trace.json")) == 1


def _lazy_state(global_rng: bool) -> loopkit.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1), global_rng=global_rng)


@pytest.mark.parametrize("global_rng", [False, True])
def test_a_lazy_module_before_its_first_forward_is_checked(global_rng, take_snapshot, assert_trees_equal):
    """An uninitialized parameter has no values to copy: the check crashed with torch's ValueError. Now the pure
    step passes (its copies are initialized alike on both calls, the caller's module stays lazy), and a step running
    the caller's own forward, which initializes the caller's parameters, is named."""
    batch = torch.randn(8, 4)
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    state = _lazy_state(global_rng)
    new, _ = check_purity(step, state, batch)
    assert isinstance(state.model[0], torch.nn.LazyLinear)
    assert isinstance(state.model[0].weight, torch.nn.parameter.UninitializedParameter)
    if not global_rng:  # the reference: the step called directly (a state with its own RNG initializes alike)
        assert_trees_equal(take_snapshot(new), take_snapshot(step(_lazy_state(global_rng), batch)[0]))

    def forward_on_the_callers_model(state, batch):
        state.model(batch)
        return state.evolve(step=state.step + 1), {}

    with pytest.raises(ImpurityError, match=r"changed the state it was given: model\.0\.weight changed from "
                                            r"uninitialized .* to a tensor torch\.float32\[3, 4\]"):
        check_purity(forward_on_the_callers_model, state, batch)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_step_changing_the_callers_batch_in_place_is_named(deterministic, make_mlp, make_sgd_state, batches):
    """The check never looked at the batch: a clamp_ (the same on both calls) passed, and a mul_ with
    deterministic=True was blamed on the RNG. The changed entry is named, before the calls are compared."""
    state = make_sgd_state(make_mlp(0))
    x, y = batches[0][0] * 3, batches[0][1]

    def clamping(model, batch):
        inputs, target = batch
        inputs.clamp_(-1, 1)
        return ((model(inputs) - target) ** 2).mean()

    with pytest.raises(ImpurityError, match=r"changed the batch it was given in place: batch\[0\] differs"):
        check_purity(loopkit.train_step(clamping), state, (x.clone(), y), deterministic=deterministic)

    def doubling(model, batch):
        batch["x"].mul_(2)
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    with pytest.raises(ImpurityError, match=r"changed the batch it was given in place: batch\['x'\] differs"):
        check_purity(loopkit.train_step(doubling), state, {"x": x.clone(), "y": y, "id": "a"},
                     deterministic=deterministic)
    clean = (x.clone(), y)
    check_purity(loopkit.train_step(lambda m, b: ((m(b[0].clamp(-1, 1)) - b[1]) ** 2).mean()), state, clean,
                 deterministic=deterministic)
    assert torch.equal(clean[0], x)


class _ListNorm(torch.nn.Module):
    """A BatchNorm kept outside the registered tree (in a plain list, or a plain dict: a pure step's copy shares it),
    or registered (nn.ModuleList: copied)."""

    def __init__(self, holder):
        super().__init__()
        self.head = torch.nn.Linear(3, 1)
        self.norms = holder(torch.nn.BatchNorm1d(3))

    def forward(self, x):
        norm = self.norms["bn"] if isinstance(self.norms, (dict, torch.nn.ModuleDict)) else self.norms[0]
        return self.head(norm(x))


@pytest.mark.parametrize("holder, registered, where", [
    (lambda bn: [bn], lambda bn: torch.nn.ModuleList([bn]), "norms.0"),
    (lambda bn: {"bn": bn}, lambda bn: torch.nn.ModuleDict({"bn": bn}), "norms.bn"),
], ids=["list", "dict"])
def test_a_module_kept_outside_the_models_tree_is_compared(holder, registered, where):
    """fork shares a module kept in a plain list or dict attribute (deliberately: a frozen teacher), so a pure step's
    forward in train mode updated the caller's running statistics, and check_purity, which compared the registered
    tree only, passed it. Reference: the caller's running_mean before the call. Registered with nn.ModuleList or
    nn.ModuleDict, the module is copied: the step passes, and its copy's statistics equal a raw PyTorch forward's."""
    torch.manual_seed(0)
    model = _ListNorm(holder)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.train_step(lambda m, b: m(b).pow(2).mean())
    batch = torch.randn(8, 3)
    norm = model.norms[0] if isinstance(model.norms, list) else model.norms["bn"]
    before = norm.running_mean.clone()
    step(state, batch)
    assert not torch.equal(norm.running_mean, before)  # the defect is real: the caller's statistics moved
    with pytest.raises(ImpurityError, match=rf"changed the state it was given: shared modules\.{where}\.running_mean "
                                            r"differs .*register it with nn\.ModuleList or nn\.ModuleDict"):
        check_purity(step, state, batch)

    torch.manual_seed(0)
    model = _ListNorm(registered)
    raw = copy.deepcopy(model)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = check_purity(step, state, batch)
    raw(batch)  # the reference: one raw forward in train mode
    assert torch.equal(state.model.state_dict()[f"{where}.running_mean"], torch.zeros(3))
    assert torch.equal(new.model.state_dict()[f"{where}.running_mean"], raw.state_dict()[f"{where}.running_mean"])


def test_a_frozen_teacher_outside_the_tree_passes_and_a_change_to_it_is_named():
    """A frozen teacher in eval mode kept in a list (shared by design) leaves nothing changed: a distillation step
    passes. A step that changes its weight, or one whose teacher takes gradients (the backward fills the caller's
    teacher's .grad), is named."""
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    student.teacher = [torch.nn.Linear(3, 2).requires_grad_(False).eval()]
    state = loopkit.TrainState.create(student, torch.optim.SGD(student.parameters(), lr=0.1))
    distill = loopkit.train_step(lambda m, b: (m(b) - m.teacher[0](b)).pow(2).mean())
    new, _ = check_purity(distill, state, torch.randn(8, 3))
    assert new.model.teacher[0] is student.teacher[0] and student.teacher[0].weight.grad is None

    def nudging(model):
        with torch.no_grad():
            model.teacher[0].weight.add_(0.5)

    with pytest.raises(ImpurityError, match=r"shared modules\.teacher\.0\.weight differs \(max abs difference 0\.5\)"):
        check_purity(_meddling(lambda s: nudging(s.model)), state, None)
    student.teacher[0].requires_grad_(True)
    with pytest.raises(ImpurityError, match=r"shared modules\.teacher\.0\.weight\.grad is new"):
        check_purity(distill, state, torch.randn(8, 3))


def _clipping(model, batch):
    x = batch[0]
    np.clip(x, -0.5, 0.5, out=x)  # the numpy twin of inputs.clamp_: changes the caller's array
    return model(torch.as_tensor(x)).pow(2).mean()


def _appending(model, batch):
    batch["seen"].append(len(batch["seen"]))  # grows the caller's list at every call
    return model(batch["x"]).pow(2).mean()


def _adding_a_key(model, batch):
    batch["mask"] = torch.ones(4)
    return model(batch["x"]).pow(2).mean()


def _widening(model, batch):
    batch[0] = batch[0].astype(np.float64)  # puts another array in the caller's list
    return model(torch.as_tensor(batch[0], dtype=torch.float32)).pow(2).mean()


def _renaming(model, batch):
    batch["id"] = "b"
    return model(batch["x"]).pow(2).mean()


def _numpy_batch():
    return [np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)]


@pytest.mark.parametrize("loss, batch, where", [
    (_clipping, _numpy_batch, r"batch\[0\] differs \(max abs difference 0\.[0-9]+\)"),
    (_appending, lambda: {"x": torch.ones(4, 3), "seen": []},
     r"batch\['seen'\] changed from a list of 0 items to a list of 1 item"),
    (_adding_a_key, lambda: {"x": torch.ones(4, 3)},
     r"batch changed from a dict with keys \['x'\] to a dict with keys \['x', 'mask'\]"),
    (_widening, _numpy_batch, r"batch\[0\] changed from float32\[4, 3\] to float64\[4, 3\]"),
    (_renaming, lambda: {"x": torch.ones(4, 3), "id": "a"}, r"batch\['id'\] changed from 'a' to 'b'"),
], ids=["numpy clip out=", "list append", "new key", "array replaced", "string replaced"])
def test_a_step_changing_non_tensor_parts_of_the_batch_is_named(loss, batch, where):
    """The batch snapshot held its tensors only: np.clip(x, out=x) on a numpy array and an append to a list of the
    batch passed, though the same change of a tensor is named. Reference: the batch's repr before and after a call."""
    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    given = batch()
    shown = repr(given)
    loopkit.train_step(loss)(state, given)
    assert repr(given) != shown  # the defect is real: the step changes the caller's batch
    with pytest.raises(ImpurityError, match="changed the batch it was given in place: " + where):
        check_purity(loopkit.train_step(loss), state, batch())


def test_a_pure_step_over_a_batch_of_numpy_arrays_lists_and_objects_passes():
    """Arrays with NaNs, nested lists and dicts, a set, plain values and an object of one's own, all read only: the
    check passes and leaves the batch as it was."""

    class Meta:
        pass

    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    x[0, 0] = np.nan
    batch = {"x": x, "ids": [1, "a", None, 2.5, np.int64(3)], "nested": {"tags": {"b", "c"}, "meta": Meta()},
             "labels": np.array(["a", "b"]), "mask": np.ones(4, dtype=bool)}
    shown = repr(batch)
    check_purity(loopkit.train_step(lambda m, b: m(torch.as_tensor(np.nan_to_num(b["x"]))).pow(2).mean()), state, batch)
    assert repr(batch) == shown


def _batch_of_dates_and_objects():
    return {"x": torch.ones(2, 3), "boxes": np.array([np.zeros((1, 4)), np.zeros((3, 4))], dtype=object),
            "day": np.array(["2020-01-01", "NaT"], dtype="datetime64[D]"),
            "wait": np.array([1, "NaT"], dtype="timedelta64[s]"), "files": np.array(["a.jpg", np.nan], dtype=object)}


def test_a_pure_step_over_ragged_object_arrays_and_nat_passes():
    """A ragged object array (per-image boxes) crashed the comparison, and NaT (datetime64, timedelta64) and an
    object array's NaN were named as changed for a step that never touches them. Reference: the batch's repr before
    and after the check."""
    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = _batch_of_dates_and_objects()
    shown = repr(batch)
    check_purity(loopkit.train_step(lambda m, b: m(b["x"]).pow(2).mean()), state, batch)
    assert repr(batch) == shown


def _renaming_a_file(model, batch):
    batch["files"][0] = "b.jpg"
    return model(batch["x"]).pow(2).mean()


def _shifting_a_day(model, batch):
    batch["day"][0] += 1
    return model(batch["x"]).pow(2).mean()


@pytest.mark.parametrize("loss, where", [
    (_renaming_a_file, r"batch\['files'\]\[0\] changed from 'a.jpg' to 'b.jpg'"),
    (_shifting_a_day, r"batch\['day'\] differs"),
], ids=["object array element", "datetime64 array"])
def test_a_step_changing_an_object_or_date_array_of_the_batch_is_named(loss, where):
    """Element by element for an object array, by bytes for the others. Reference: the batch's repr before and after
    a direct call."""
    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    given = _batch_of_dates_and_objects()
    shown = repr(given)
    loopkit.train_step(loss)(state, given)
    assert repr(given) != shown
    with pytest.raises(ImpurityError, match="changed the batch it was given in place: " + where):
        check_purity(loopkit.train_step(loss), state, _batch_of_dates_and_objects())
