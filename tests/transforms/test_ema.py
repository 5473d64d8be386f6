"""with_ema: the averages equal torch.optim.swa_utils.AveragedModel's EMA in a raw loop, bitwise (updated by Lightning's
EMAWeightAveraging rule, written out, for its options); ema_state of a pruned run keeps the pruned weights pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

import loopkit
from loopkit import checkpoint
from tests.conftest import (
    assert_refused_before_the_update,
    prefixed,
    restored_in_float64,
    saved_by_an_older_loopkit,
    sgd_state,
    through_a_file,
)

DECAY = 0.9


def _raw_ema_loop(model, opt, data, loss_fn, *, every=1, skip=()):
    """The reference: AveragedModel(EMA) updated after each optimizer update; batches in ``skip`` make no update."""
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for k, batch in enumerate(data):
        if k in skip:
            continue
        (loss_fn(model, batch) / every).backward()
        if (k + 1) % every == 0:
            opt.step()
            opt.zero_grad()
            averaged.update_parameters(model)
    return averaged


def _averaging(formula):
    """AveragedModel's keyword for with_ema's ``formula``: get_ema_avg_fn (Lightning's) or get_ema_multi_avg_fn."""
    if formula == "weighted_sum":
        return {"avg_fn": get_ema_avg_fn(DECAY)}
    return {"multi_avg_fn": get_ema_multi_avg_fn(DECAY)}


def _ema_params(state) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in loopkit.ema_state(state).model.named_parameters()}


def _averaged_params(averaged) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in averaged.module.named_parameters()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_averages_are_bitwise_averaged_model_in_a_raw_loop(optimizer, make_mlp, make_batches, mse_loss, make_sgd_state,
                                                          make_adam_state, assert_trees_equal):
    data = make_batches(6)
    make_state = make_sgd_state if optimizer == "sgd" else make_adam_state
    ref_state = make_state(make_mlp(0))
    averaged = _raw_ema_loop(ref_state.model, ref_state.optimizer, data, mse_loss)

    state = make_state(make_mlp(0))
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_state.model.named_parameters()))
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))
    assert not torch.equal(_ema_params(state)["0.weight"], state.model[0].weight)  # the averages lag


def test_under_accumulation_the_averages_move_once_per_update(make_mlp, make_batches, mse_loss, make_sgd_state,
                                                              assert_trees_equal):
    data = make_batches(8)
    ref_state = make_sgd_state(make_mlp(0))
    averaged = _raw_ema_loop(ref_state.model, ref_state.optimizer, data, mse_loss, every=4)

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_ema(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=4), DECAY)
    for batch in data:
        state, _ = step(state, batch)
    assert state.step == 2
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))


def test_a_skipped_update_leaves_the_averages_alone(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(5)
    x, y = data[2]
    data[2] = (torch.full_like(x, float("nan")), y)
    ref_state = make_sgd_state(make_mlp(0))
    averaged = _raw_ema_loop(ref_state.model, ref_state.optimizer, data, mse_loss, skip={2})

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_ema(loopkit.with_nan_guard(loopkit.train_step(mse_loss)), DECAY)
    for batch in data:
        state, _ = step(state, batch)
    assert state.step == 4
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))


def test_the_step_is_pure_and_ema_state_changes_nothing(make_mlp, batches, mse_loss, make_adam_state, take_snapshot,
                                                        assert_trees_equal):
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    state = make_adam_state(make_mlp(0))
    for batch in batches[:2]:
        state, _ = step(state, batch)
    before = take_snapshot(state)
    first, _ = step(state, batches[2])
    second, _ = step(state, batches[2])
    assert_trees_equal(take_snapshot(state), before)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))
    averaged = loopkit.ema_state(state)
    assert_trees_equal(take_snapshot(state), before)
    assert averaged.optimizer is None and averaged.model is not state.model
    assert_trees_equal(dict(averaged.model.named_parameters()), dict(state.extras["ema/params"]))


def test_before_any_update_the_averages_are_the_parameters(make_mlp, make_sgd_state, assert_trees_equal):
    state = make_sgd_state(make_mlp(0))
    assert_trees_equal(dict(loopkit.ema_state(state).model.named_parameters()), dict(state.model.named_parameters()))


def test_a_state_trained_without_with_ema_is_refused_rather_than_given_its_raw_weights(make_mlp, make_batches, mse_loss,
                                                                                        make_sgd_state):
    """(As swa_state refuses a state without averages: its weights are not an average, which the caller asked for.)"""
    trained, _ = loopkit.run_epochs(loopkit.train_step(mse_loss), make_sgd_state(make_mlp(0)), make_batches(3),
                                    epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"ema_state: the state \(step 3\) holds no EMA averages"):
        loopkit.ema_state(trained)


def test_buffers_are_the_models_own(make_bn_dropout, batches, mse_loss, make_sgd_state, assert_trees_equal):
    state = make_sgd_state(make_bn_dropout(0))
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    for batch in batches[:3]:
        state, _ = step(state, batch)
    assert_trees_equal(dict(loopkit.ema_state(state).model.named_buffers()), dict(state.model.named_buffers()))


def test_a_restored_checkpoint_resumes_the_averages_exactly(tmp_path, make_mlp, make_batches, mse_loss, make_adam_state,
                                                            assert_trees_equal):
    data = make_batches(6)
    step = loopkit.with_checkpointing(loopkit.with_ema(loopkit.train_step(mse_loss), DECAY), tmp_path, every_n_steps=3)
    uninterrupted = make_adam_state(make_mlp(0))
    for batch in data:
        uninterrupted, _ = step(uninterrupted, batch)

    resumed = loopkit.restore(make_adam_state(make_mlp(1)), checkpoint.list_checkpoints(tmp_path)[0].path)
    assert resumed.step == 3
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(_ema_params(resumed), _ema_params(uninterrupted))
    assert_trees_equal(dict(resumed.model.named_parameters()), dict(uninterrupted.model.named_parameters()))


def test_evaluate_the_averaged_weights(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(4)
    state = make_sgd_state(make_mlp(0))
    state, _ = loopkit.run_epochs(loopkit.with_ema(loopkit.train_step(mse_loss), DECAY), state, data, epochs=2, progress=False)
    metric = loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)})
    averaged = loopkit.ema_state(state)
    with torch.no_grad():
        by_hand = sum(float(mse_loss(averaged.model, b)) for b in data) / len(data)
    assert loopkit.evaluate(metric, averaged, data)["mse"] == pytest.approx(by_hand, rel=1e-6)
    assert loopkit.evaluate(metric, state, data)["mse"] != pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, "0.9", True, None])
def test_a_decay_out_of_range_is_refused(decay, mse_loss):
    with pytest.raises(ValueError, match="with_ema: decay"):
        loopkit.with_ema(loopkit.train_step(mse_loss), decay)


def test_meaningless_orders_are_refused_when_built(tmp_path, mse_loss):
    ema = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    with pytest.raises(TypeError, match="with_ema cannot wrap with_ema"):
        loopkit.with_ema(ema, DECAY)
    with pytest.raises(TypeError, match="with_ema cannot wrap with_checkpointing"):
        loopkit.with_ema(loopkit.with_checkpointing(loopkit.train_step(mse_loss), tmp_path), DECAY)
    with pytest.raises(TypeError, match="with_ema cannot wrap eval_step"):
        loopkit.with_ema(loopkit.eval_step(lambda m, b: {}), DECAY)
    with pytest.raises(TypeError, match="with_grad_clip cannot wrap with_ema"):
        loopkit.with_grad_clip(ema, max_norm=1.0)
    with pytest.raises(TypeError, match="donate"):
        loopkit.with_ema(loopkit.donate(loopkit.train_step(mse_loss)), DECAY)


def test_a_donated_ema_step_reproduces_the_pure_one(make_mlp, batches, mse_loss, make_sgd_state, take_snapshot,
                                                    assert_trees_equal):
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    pure, donated = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    for batch in batches:
        pure, _ = step(pure, batch)
        donated, _ = loopkit.donate(step)(donated, batch)
    assert_trees_equal(take_snapshot(pure), take_snapshot(donated))


def test_a_float32_checkpoint_restored_into_a_float64_template_averages_in_float64(make_mlp, make_batches, mse_loss,
                                                                                  assert_trees_equal):
    # before, the model and optimizer were cast, the averages stayed float32, and the next update failed in lerp
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    saved, restored, rest = restored_in_float64(step, make_mlp, make_batches(4))

    got = restored()
    for batch in rest:
        got, _ = step(got, batch)
    assert {a.dtype for a in got.extras["ema/params"].values()} == {torch.float64}
    # the reference: the float64 run by hand, its EMA an AveragedModel that starts from the checkpoint's averages
    ref = restored()
    averaged = AveragedModel(ref.model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    with torch.no_grad():
        for name, p in averaged.module.named_parameters():
            p.copy_(saved["extras"]["ema/params"][name])  # float32 into float64, as the model's own load casts
    averaged.n_averaged.fill_(2)
    for batch in rest:
        ref.optimizer.zero_grad()
        mse_loss(ref.model, batch).backward()
        ref.optimizer.step()
        averaged.update_parameters(ref.model)
    assert_trees_equal(dict(got.model.named_parameters()), dict(ref.model.named_parameters()))
    assert_trees_equal(_ema_params(got), _averaged_params(averaged))


def test_a_model_moved_to_float64_in_place_gets_its_averages_cast(make_mlp, make_batches, mse_loss, assert_trees_equal):
    # run_epochs(device=...) moves the state's model in place, not the extras: the step must notice, although the
    # averages mapping and the model object are the ones it last checked (here a dtype: the CPU has one device)
    data = make_batches(3)
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))  # no optimizer state to cast
    step = loopkit.donate(loopkit.with_ema(loopkit.train_step(mse_loss), DECAY))
    for batch in data[:2]:
        state, _ = step(state, batch)
    before = {k: v.double() for k, v in state.extras["ema/params"].items()}
    state.model.double()
    x, y = data[2]
    state, _ = step(state, (x.double(), y.double()))
    expected = {k: torch.lerp(before[k], p.detach(), 1 - DECAY) for k, p in state.model.named_parameters()}
    assert_trees_equal(dict(state.extras["ema/params"]), expected)


def _trained(make_mlp, make_batches, mse_loss, step):
    """A state after an epoch of ``step`` (a 4-8-2 MLP) and the batches to go on with."""
    data = make_batches(4)
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.run_epochs(step, state, data[:2], epochs=1, progress=False)
    return state, data[2:]


def _another(state, model):
    return state.evolve(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


_OTHER_MODELS = {
    "wider": (lambda s: _another(s, nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))),
              r"with_ema: the average of parameter '0\.weight' has shape \(8, 4\), but the parameter has shape \(16, 4\)"),
    "deeper": (lambda s: _another(s, nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Tanh(), nn.Linear(2, 2))),
               r"with_ema: the state's averages hold no average of parameter '4\.weight' \(shape \(2, 2\)\)"),
    "no bias": (lambda s: _another(s, nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2, bias=False))),
                r"with_ema: the state's averages hold one of '2\.bias', which is not a parameter of the model"),
    "mis-shaped averages": (
        lambda s: s.evolve(extras={**s.extras, "ema/params": {**s.extras["ema/params"],
                                                              "2.weight": s.extras["ema/params"]["2.weight"][:1]}}),
        r"with_ema: the average of parameter '2\.weight' has shape \(1, 8\), but the parameter has shape \(2, 8\)"),
}


@pytest.mark.parametrize("case", list(_OTHER_MODELS))
def test_averages_of_another_model_are_refused_before_the_update(case, make_mlp, make_batches, mse_loss, take_snapshot,
                                                                 assert_trees_equal):
    # before, the step updated the model, then failed in lerp with torch's bare size mismatch, naming neither
    # with_ema nor the parameter, and under run_epochs the state was lost (state_at_error None); an extra average
    # was dropped, and one of shape (1, 8) broadcast against its (2, 8) parameter, without a word
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    state, data = _trained(make_mlp, make_batches, mse_loss, step)  # the same step: it saw these averages fit
    make_bad, match = _OTHER_MODELS[case]
    bad = make_bad(state)
    assert_refused_before_the_update(step, bad, data, match, "drop 'ema/params' from the state's extras",
                                     take_snapshot, assert_trees_equal)
    with pytest.raises(ValueError, match=match.replace("with_ema", "ema_state")):
        loopkit.ema_state(bad)
    fresh = bad.evolve(extras={k: v for k, v in bad.extras.items() if k != "ema/params"})  # what the message says
    fresh, _ = loopkit.run_epochs(step, fresh, data, epochs=2, progress=False)
    assert fresh.step == bad.step + len(data)


def test_the_averages_are_checked_once_for_a_run_and_again_for_a_state_with_another_model(monkeypatch, make_mlp,
                                                                                         make_batches, mse_loss):
    from loopkit.transforms import ema

    checks, fitted = [], ema._fitted

    def counted(averages, model, where):
        checks.append(where)
        return fitted(averages, model, where)

    monkeypatch.setattr(ema, "_fitted", counted)
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    state, data = _trained(make_mlp, make_batches, mse_loss, step)
    state, _ = loopkit.run_epochs(step, state, data, epochs=2, progress=False)
    assert checks == []  # each call's averages were made from the model the next call trains: nothing to check
    state, _ = step(state, data[0])  # a pure call trains a copy of the model: checked
    assert checks == ["with_ema"]
    other = make_mlp(1)
    with pytest.raises(ValueError):  # the same averages mapping, another (wider) model: checked again
        step(_another(state, nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))), data[0])
    assert checks == ["with_ema"] * 2
    state, _ = loopkit.run_epochs(step, _another(state, other), data, epochs=3, progress=False)  # same shapes: fits
    assert checks == ["with_ema"] * 3


def test_a_head_replaced_in_place_with_a_new_optimizer_is_refused_before_the_update(make_mlp, make_batches, mse_loss,
                                                                                    take_snapshot, assert_trees_equal):
    """Fine-tuning's new head: the same model object, changed in place, with a new optimizer. The step had seen
    these averages fit that model object, and skipped the check: the old head's (1, 8) average broadcast
    against the new (2, 8) weight without a word."""
    step = loopkit.donate(loopkit.with_ema(loopkit.train_step(mse_loss), DECAY))
    state, data = _trained(make_mlp, make_batches, mse_loss, loopkit.with_ema(loopkit.train_step(mse_loss), DECAY))
    narrow = dict(state.extras["ema/params"])
    narrow["2.weight"], narrow["2.bias"] = narrow["2.weight"][:1], narrow["2.bias"][:1]
    state = state.evolve(extras={**state.extras, "ema/params": narrow})
    model = state.model
    model[2] = nn.Linear(8, 1)  # the head the averages were made for
    state = state.evolve(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = step(state, (data[0][0], data[0][1][:, :1]))  # (the step now knows these averages fit this model)
    model[2] = nn.Linear(8, 2)  # the new head, in place
    state = state.evolve(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    before = take_snapshot(state)
    with pytest.raises(ValueError, match=r"average of parameter '2\.weight' has shape \(1, 8\), but the parameter has "
                                         r"shape \(2, 8\)") as info:
        step(state, data[0])
    assert loopkit.state_at_error(info.value) is state
    assert_trees_equal(take_snapshot(state), before)


@pytest.mark.parametrize("into", ["plain", "compiled"])
def test_an_older_checkpoint_of_a_compiled_model_resumes_its_averages_exactly(into, make_mlp, make_batches, mse_loss,
                                                                             make_adam_state, assert_trees_equal):
    """Its averages are named as the compiled model names its parameters (``_orig_mod.0.weight``): they were
    refused ('hold no average of parameter 0.weight ... drop ema/params'), the model's own tensors loading."""
    data = make_batches(6)
    step = loopkit.donate(loopkit.with_ema(loopkit.train_step(mse_loss), DECAY))
    uninterrupted = make_adam_state(torch.compile(make_mlp(0), backend="eager"))
    for k, batch in enumerate(data):
        uninterrupted, _ = step(uninterrupted, batch)
        if k == 2:
            older = saved_by_an_older_loopkit(uninterrupted, "ema/params")
            today = through_a_file(uninterrupted.state_dict())
    assert sorted(older["extras"]["ema/params"]) == sorted(prefixed(dict(make_mlp(0).named_parameters())))

    resumed = {}
    for name, saved in (("older", older), ("today", today)):
        template = make_mlp(1) if into == "plain" else torch.compile(make_mlp(1), backend="eager")
        state = make_adam_state(template).load_state_dict(saved)
        averaged = loopkit.state.core_module(loopkit.ema_state(state).model)  # ema_state takes them too
        assert_trees_equal({k: v.detach() for k, v in averaged.named_parameters()}, today["extras"]["ema/params"])
        for batch in data[3:]:
            state, _ = step(state, batch)
        resumed[name] = state
    assert sorted(resumed["older"].extras["ema/params"]) == sorted(today["extras"]["ema/params"])  # the plain names
    assert_trees_equal(resumed["older"].state_dict(), resumed["today"].state_dict())  # averages, model, optimizer
    assert_trees_equal(resumed["older"].state_dict(), uninterrupted.state_dict())


def test_older_prefixed_averages_that_do_not_fit_the_model_are_still_refused(make_mlp, make_batches, mse_loss,
                                                                            take_snapshot, assert_trees_equal):
    """Only averages all named ``_orig_mod.<a parameter>`` are taken under the plain names; then checked as any."""
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY)
    state, data = _trained(make_mlp, make_batches, mse_loss, step)
    averages = dict(state.extras["ema/params"])
    cases = {
        "a mix of both names": (
            {"_orig_mod.0.weight": averages["0.weight"], **{k: v for k, v in averages.items() if k != "0.weight"}},
            r"with_ema: the state's averages hold no average of parameter '0\.weight' \(shape \(8, 4\)\)"),
        "mis-shaped": (prefixed({**averages, "2.weight": averages["2.weight"][:1]}),
                       r"with_ema: the average of parameter '2\.weight' has shape \(1, 8\), but the parameter has "
                       r"shape \(2, 8\)"),
        "of no parameter": (prefixed({**averages, "4.weight": averages["2.weight"]}),
                            r"with_ema: the state's averages hold one of '4\.weight', which is not a parameter"),
    }
    for bad_averages, match in cases.values():
        bad = state.evolve(extras={**state.extras, "ema/params": bad_averages})
        assert_refused_before_the_update(step, bad, data, match, "drop 'ema/params' from the state's extras",
                                         take_snapshot, assert_trees_equal)
        with pytest.raises(ValueError, match=match.replace("with_ema", "ema_state")):
            loopkit.ema_state(bad)
    fits = state.evolve(extras={**state.extras, "ema/params": prefixed(averages)})  # all prefixed, all fit
    assert_trees_equal(step(fits, data[0])[0].extras["ema/params"], step(state, data[0])[0].extras["ema/params"])


class _WithIndexTable(nn.Module):
    """A model holding an integer Parameter (frozen): an index table."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 2)
        self.table = nn.Parameter(torch.tensor([0, 2, 1, 7]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, self.table[:3]])


def _tables(n: int) -> list[torch.Tensor]:
    """The integer table set by hand before each of ``n`` batches: the forward's indices turn, the unused entry grows."""
    return [torch.tensor([k % 3, (k + 1) % 3, (k + 2) % 3, 7 + 10 * k]) for k in range(n)]


class _SetTable(loopkit.Callback):
    def __init__(self, tables: list[torch.Tensor]) -> None:
        self.tables = iter(tables)

    def on_batch_start(self, state, batch):
        with torch.no_grad():
            state.model.table.copy_(next(self.tables))


@pytest.mark.parametrize("formula", ["lerp", "weighted_sum"])
def test_an_integer_parameter_is_averaged_as_averaged_model_averages_it(formula, make_batches, assert_trees_equal):
    """AveragedModel's EMA falls back to (ema * decay + p * (1 - decay)) cast back for a non-float dtype (its avg_fn
    get_ema_avg_fn, Lightning's, computes that too, copied into the integer average). The integer parameter (frozen
    to the optimizer) is set by hand before each batch, so that its average moves: a frozen one's average is itself,
    whatever the weights. Reference: AveragedModel updated after each update of a raw loop."""
    loss_fn = lambda m, b: ((m(b[0][:, :3]) - b[1]) ** 2).mean()  # noqa: E731
    data = make_batches(5)
    tables = _tables(len(data))
    ref = _WithIndexTable()
    opt = torch.optim.SGD(ref.lin.parameters(), lr=0.1)
    averaged = AveragedModel(ref, **_averaging(formula))
    for table, batch in zip(tables, data):
        with torch.no_grad():
            ref.table.copy_(table)
        loss_fn(ref, batch).backward()
        opt.step()
        opt.zero_grad()
        averaged.update_parameters(ref)

    model = _WithIndexTable()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.lin.parameters(), lr=0.1))
    state, _ = loopkit.run_epochs(loopkit.with_ema(loopkit.train_step(loss_fn), DECAY, formula=formula), state, data,
                                  epochs=1, callbacks=[_SetTable(tables)], progress=False)
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))
    table = _ema_params(state)["table"]
    assert table.dtype == torch.int64 and int(table[3]) not in {int(t[3]) for t in tables}  # (an average of them)


def test_decay_is_agreed_over_the_ranks():
    """Each rank averages its replica: another decay on one rank gave the ranks other averaged models (rank 0's
    checkpointed, each rank's evaluated), and run_epochs compared no option of with_ema. decay now is one."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert dict(loopkit.with_ema(base, decay=0.9).rank_agreed)["with_ema decay"] == 0.9


# --- a pruned run: ema_state puts the averages under the masks ----------------------------------------------------


def _raw_pruned_ema_loop(model, opt, data, loss_fn, masks, prune_at):
    """The reference: a raw loop pruned after update ``prune_at`` (the weights times ``masks`` after each update from
    then on, the gradients times them before each later update, as ``weight_orig * weight_mask`` trains), and an
    AveragedModel(EMA) updated after each update."""
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for k, batch in enumerate(data, start=1):
        loss_fn(model, batch).backward()
        if k > prune_at:
            for name, mask in masks.items():
                model.get_parameter(name).grad.mul_(mask)
        opt.step()
        opt.zero_grad()
        if k >= prune_at:
            with torch.no_grad():
                for name, mask in masks.items():
                    model.get_parameter(name).mul_(mask)
        averaged.update_parameters(model)
    return averaged


def test_ema_state_of_a_pruned_run_keeps_the_pruned_weights_pruned(make_mlp, make_batches, mse_loss, make_sgd_state,
                                                                   assert_trees_equal):
    """with_ema(with_pruning(...)) (the documented order): the trained model is zero wherever it is pruned, but
    ema_state gave the averages as they are, dense (an average of weights pruned lately decays toward zero, never
    reaching it): pruned weights came back in the exported model. Now they are put under the masks, as swa_state
    does (and as Lightning's averaged weight_orig is seen through weight_mask); the averages kept are left alone.
    Reference: a raw pruned loop with AveragedModel, its averages times the masks."""
    data, prune_at = make_batches(6), 3
    step = loopkit.with_ema(loopkit.with_pruning(loopkit.train_step(mse_loss), amount=0.5, schedule=[prune_at]), DECAY)
    state, _ = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=1, progress=False)
    masks = state.extras["pruning/masks"]
    assert sorted(masks) == ["0.weight", "2.weight"] and all(bool((m == 0).any()) for m in masks.values())

    ref = make_sgd_state(make_mlp(0))
    averaged = _raw_pruned_ema_loop(ref.model, ref.optimizer, data, mse_loss, masks, prune_at)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.model.named_parameters()))
    assert_trees_equal(dict(state.extras["ema/params"]), _averaged_params(averaged))  # kept as they are
    expected = {name: p * masks[name] if name in masks else p for name, p in _averaged_params(averaged).items()}
    assert_trees_equal(_ema_params(state), expected)
    for name, mask in masks.items():  # (the averages themselves are not zero there: the masks make them so)
        assert bool((state.extras["ema/params"][name][mask == 0] != 0).all())
        assert bool((_ema_params(state)[name][mask == 0] == 0).all())


def test_ema_state_before_the_pruning_point_is_the_plain_average(make_mlp, make_batches, mse_loss, make_sgd_state,
                                                                 assert_trees_equal):
    data = make_batches(4)
    step = loopkit.with_ema(loopkit.with_pruning(loopkit.train_step(mse_loss), amount=0.5, schedule=[10]), DECAY)
    state, _ = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), data, epochs=1, progress=False)
    assert "pruning/masks" not in state.extras
    ref = make_sgd_state(make_mlp(0))
    assert_trees_equal(_ema_params(state), _averaged_params(_raw_ema_loop(ref.model, ref.optimizer, data, mse_loss)))


def test_ema_state_refuses_masks_of_another_model(make_mlp, make_batches, mse_loss, make_sgd_state):
    step = loopkit.with_ema(loopkit.with_pruning(loopkit.train_step(mse_loss), amount=0.5, schedule=[1]), DECAY)
    state, _ = loopkit.run_epochs(step, make_sgd_state(make_mlp(0)), make_batches(2), epochs=1, progress=False)
    masks = dict(state.extras["pruning/masks"])
    masks["2.weight"] = masks["2.weight"][:1]
    bad = state.evolve(extras={**state.extras, "pruning/masks": masks})
    with pytest.raises(ValueError, match=r"the mask of parameter '2\.weight' has shape \(1, 8\), but the parameter "
                                         r"has shape \(2, 8\)"):
        loopkit.ema_state(bad)


# --- Lightning's EMAWeightAveraging options: update_every_n_steps, update_starting_at_step/_epoch, its formula -------


def _lightning_should_update(step_idx=None, epoch_idx=None, *, every=1, start_step=None, start_epoch=None):
    """Lightning 2.6.6's ``EMAWeightAveraging.should_update``, written out: after the optimizer step of 0-based index
    ``step_idx`` when it is at least ``start_step`` and a multiple of ``every`` (> 0); at the end of epoch
    ``epoch_idx`` when that is at least ``start_epoch``."""
    if step_idx is not None:
        return (start_step is None or step_idx >= start_step) and every > 0 and step_idx % every == 0
    return start_epoch is not None and epoch_idx >= start_epoch


def _raw_lightning_ema_loop(model, opt, data, loss_fn, epochs, avg, *, accum=1, **rule):
    """The reference: a raw loop of ``epochs`` epochs (``len(data)`` a multiple of ``accum``) with an AveragedModel
    updated as Lightning's WeightAveraging callback updates it: at each batch's end when an optimizer step was taken
    since its last step update and the rule says so (``on_train_batch_end``), and at each epoch's end once
    (``on_train_epoch_end``). ``avg`` is the AveragedModel's keyword: avg_fn (Lightning's) or multi_avg_fn."""
    averaged = AveragedModel(model, **avg)
    global_step, latest_step, latest_epoch = 0, 0, -1
    for epoch in range(epochs):
        for k, batch in enumerate(data):
            (loss_fn(model, batch) / accum).backward()
            if (k + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
                global_step += 1
            if global_step > latest_step and _lightning_should_update(step_idx=global_step - 1, **rule):
                averaged.update_parameters(model)
                latest_step = global_step
        if epoch > latest_epoch and _lightning_should_update(epoch_idx=epoch, **rule):
            averaged.update_parameters(model)
            latest_epoch = epoch
    return averaged


_RULES = {  # (Lightning's options, with_grad_accum's every); 4 batches an epoch, 3 epochs
    "every update": ({}, 1),
    "from update 5": ({"update_starting_at_step": 5}, 1),
    "every 3rd index from 4 (counted from 0)": ({"update_every_n_steps": 3, "update_starting_at_step": 4}, 1),
    "epoch ends only, from epoch 1": ({"update_every_n_steps": 0, "update_starting_at_epoch": 1}, 1),
    "every update and epoch ends from 1 (twice there)": ({"update_starting_at_epoch": 1}, 1),
    "accumulated, every 2nd from 1, epoch ends from 2": (
        {"update_every_n_steps": 2, "update_starting_at_step": 1, "update_starting_at_epoch": 2}, 2),
}


def _options(rule):
    return {"every": rule.get("update_every_n_steps", 1), "start_step": rule.get("update_starting_at_step"),
            "start_epoch": rule.get("update_starting_at_epoch")}


def _run_with(rule, accum, formula, make_mlp, data, loss_fn):
    """The state after 3 epochs of with_ema(rule, formula) over ``data``, accumulating ``accum`` batches."""
    inner = loopkit.train_step(loss_fn)
    if accum > 1:
        inner = loopkit.with_grad_accum(inner, every=accum)
    step = loopkit.with_ema(inner, DECAY, formula=formula, **rule)
    return loopkit.run_epochs(step, sgd_state(make_mlp(0)), data, epochs=3, progress=False)[0]


@pytest.mark.parametrize("formula", ["weighted_sum", "lerp"])
@pytest.mark.parametrize("case", list(_RULES))
def test_lightnings_update_options_average_as_its_callback_does(case, formula, make_mlp, make_batches, mse_loss,
                                                                 assert_trees_equal):
    """EMAWeightAveraging's update_every_n_steps, update_starting_at_step and update_starting_at_epoch had no with_ema
    option. Reference: a raw loop with AveragedModel updated by Lightning's rule written out; formula="weighted_sum"
    is its avg_fn (get_ema_avg_fn, Lightning's), "lerp" get_ema_multi_avg_fn (AveragedModel's), bitwise either."""
    rule, accum = _RULES[case]
    data = make_batches(4)
    ref = sgd_state(make_mlp(0))
    averaged = _raw_lightning_ema_loop(ref.model, ref.optimizer, data, mse_loss, 3, _averaging(formula), accum=accum,
                                       **_options(rule))
    state = _run_with(rule, accum, formula, make_mlp, data, mse_loss)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref.model.named_parameters()))
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))


def test_the_rule_cases_average_differently(make_mlp, make_batches, mse_loss):
    """(What makes the test above tell the rules apart: each case gives other averages, and the two formulas differ.)"""
    data = make_batches(4)
    got = [_ema_params(_run_with(rule, accum, "weighted_sum", make_mlp, data, mse_loss)) for rule, accum in
           _RULES.values()][:-1]  # (the last case trains otherwise: accumulated)
    for i, a in enumerate(got):
        for b in got[i + 1:]:
            assert not all(torch.equal(a[k], b[k]) for k in a)
    lerp = _ema_params(_run_with({}, 1, "lerp", make_mlp, data, mse_loss))
    assert not all(torch.equal(lerp[k], got[0][k]) for k in lerp)


def test_the_first_update_after_the_warm_up_copies_the_weights(make_mlp, make_batches, mse_loss, make_sgd_state,
                                                               assert_trees_equal):
    """As AveragedModel's first update_parameters (Lightning's first update after update_starting_at_step): no
    averages before it (ema_state says why), the weights themselves at it."""
    data = make_batches(4)
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY, update_starting_at_step=2)
    state = make_sgd_state(make_mlp(0))
    for batch in data[:2]:
        state, _ = step(state, batch)
    assert "ema/params" not in state.extras
    with pytest.raises(ValueError, match=r"holds no EMA averages.*update_starting_at_step"):
        loopkit.ema_state(state)
    state, _ = step(state, data[2])  # the update of index 2
    assert_trees_equal(dict(state.extras["ema/params"]), {k: v.detach() for k, v in state.model.named_parameters()})


def test_an_epoch_end_is_averaged_in_once_however_often_it_is_flushed(make_mlp, make_batches, mse_loss,
                                                                      make_sgd_state, take_snapshot, assert_trees_equal):
    """As Lightning's _latest_update_epoch: a second flush of one epoch (a relaunch from a state saved after its flush)
    must not average its weights in again."""
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY, update_every_n_steps=0, update_starting_at_epoch=0)
    state = make_sgd_state(make_mlp(0))
    for batch in make_batches(2):
        state, _ = step(state, batch)
    assert "ema/params" not in state.extras
    flushed, _ = step.flush(state)
    assert flushed.extras["ema/latest_update_epoch"] == 0
    again, _ = step.flush(flushed)
    assert_trees_equal(take_snapshot(again), take_snapshot(flushed))
    later, _ = step.flush(flushed.evolve(epoch=1))
    assert later.extras["ema/latest_update_epoch"] == 1


def _resume_step(directory, every, loss_fn):
    """All the options, accumulating ``every`` batches, a checkpoint after every update."""
    ema = loopkit.with_ema(loopkit.with_grad_accum(loopkit.train_step(loss_fn), every=every), DECAY,
                           update_every_n_steps=2, update_starting_at_step=1, update_starting_at_epoch=1,
                           formula="weighted_sum")
    return loopkit.with_checkpointing(ema, directory, every_n_steps=1, keep_last=100)


@pytest.mark.parametrize("batches, every", [(4, 2), (5, 2)], ids=["whole groups", "a partial group flushed"])
def test_every_checkpoint_of_a_run_with_the_options_resumes_it_exactly(batches, every, tmp_path, make_mlp,
                                                                       make_batches, mse_loss, take_snapshot,
                                                                       assert_trees_equal):
    """The options act on state.step and state.epoch, and the last epoch averaged in is kept in the extras: a run
    restored from any of its checkpoints (one at an update a flush made too, past which the epoch's end is
    flushed again) ends as the uninterrupted one, bitwise."""
    data = make_batches(batches)
    uninterrupted, _ = loopkit.run_epochs(_resume_step(tmp_path / "a", every, mse_loss), sgd_state(make_mlp(0)), data,
                                          epochs=3, progress=False)
    saved = checkpoint.list_checkpoints(tmp_path / "a")
    assert len(saved) >= 5
    for k, saved_one in enumerate(saved):
        restored = loopkit.restore(sgd_state(make_mlp(1)), saved_one.path)
        resumed, _ = loopkit.run_epochs(_resume_step(tmp_path / f"b{k}", every, mse_loss), restored, data, epochs=3,
                                        progress=False)
        assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


def test_a_run_stopped_mid_epoch_resumes_exactly(make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal):
    """A fit stopped mid-epoch (max_steps) leaves the epoch's end to the run that finishes it, from its state dict."""
    data = make_batches(4)
    step = loopkit.with_ema(loopkit.train_step(mse_loss), DECAY, update_every_n_steps=3, update_starting_at_epoch=0)
    uninterrupted, _ = loopkit.run_epochs(step, sgd_state(make_mlp(0)), data, epochs=3, progress=False)
    part, _ = loopkit.run_epochs(step, sgd_state(make_mlp(0)), data, max_steps=6, progress=False)
    assert (part.epoch, part.batch_index) == (1, 2)
    part = sgd_state(make_mlp(1)).load_state_dict(part.state_dict())
    resumed, _ = loopkit.run_epochs(step, part, data, epochs=3, progress=False)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


@pytest.mark.parametrize("option, value, match", [
    ("update_every_n_steps", -1, "update_every_n_steps must be an int >= 0, got -1"),
    ("update_every_n_steps", 1.5, "update_every_n_steps must be an int >= 0, got 1.5"),
    ("update_every_n_steps", None, "update_every_n_steps must be an int >= 0, got None"),
    ("update_starting_at_step", -2, "update_starting_at_step must be an int >= 0 or None, got -2"),
    ("update_starting_at_step", True, "update_starting_at_step must be an int >= 0 or None, got True"),
    ("update_starting_at_epoch", "1", "update_starting_at_epoch must be an int >= 0 or None, got '1'"),
    ("formula", "lightning", "formula must be 'lerp' .* or 'weighted_sum'"),
])
def test_bad_options_are_refused_naming_them(option, value, match, mse_loss):
    with pytest.raises(ValueError, match=f"with_ema: {match}"):
        loopkit.with_ema(loopkit.train_step(mse_loss), DECAY, **{option: value})


def test_options_that_never_update_are_refused(mse_loss):
    with pytest.raises(ValueError, match="with_ema: update_every_n_steps=0 .* would never move; give "
                                         "update_starting_at_epoch"):
        loopkit.with_ema(loopkit.train_step(mse_loss), DECAY, update_every_n_steps=0)


def test_the_options_are_agreed_over_the_ranks_as_they_act():
    base = loopkit.train_step(lambda m, b: m(b).sum())
    agreed = lambda **kw: dict(loopkit.with_ema(base, 0.9, **kw).rank_agreed)  # noqa: E731
    assert agreed() == {"with_ema decay": 0.9, "with_ema formula": "lerp", "with_ema update_every_n_steps": 1,
                        "with_ema update_starting_at_step": 0, "with_ema update_starting_at_epoch": None}
    assert agreed(update_starting_at_step=None) == agreed(update_starting_at_step=0)  # alike, as they act
    assert agreed(update_every_n_steps=0, update_starting_at_step=7, update_starting_at_epoch=1) == agreed(
        update_every_n_steps=0, update_starting_at_epoch=1)  # no step update: the start step acts on nothing
    for other in ({"formula": "weighted_sum"}, {"update_every_n_steps": 2}, {"update_starting_at_step": 3},
                  {"update_starting_at_epoch": 0}):
        assert agreed(**other) != agreed(), other
