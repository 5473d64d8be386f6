"""with_ema: the averages equal torch.optim.swa_utils.AveragedModel's EMA in a raw loop, bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import loopkit
from loopkit import checkpoint
from tests.conftest import (
    assert_refused_before_the_update,
    prefixed,
    restored_in_float64,
    saved_by_an_older_loopkit,
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


def test_an_integer_parameter_is_averaged_as_averaged_model_averages_it(make_batches, assert_trees_equal):
    """AveragedModel's EMA falls back to (ema * decay + p * (1 - decay)) cast back for a non-float dtype. The integer
    parameter (frozen to the optimizer) is set by hand before each batch, so that its average moves: a frozen one's
    average is itself, whatever the weights. Reference: AveragedModel updated after each update of a raw loop."""
    loss_fn = lambda m, b: ((m(b[0][:, :3]) - b[1]) ** 2).mean()  # noqa: E731
    data = make_batches(5)
    tables = _tables(len(data))
    ref = _WithIndexTable()
    opt = torch.optim.SGD(ref.lin.parameters(), lr=0.1)
    averaged = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for table, batch in zip(tables, data):
        with torch.no_grad():
            ref.table.copy_(table)
        loss_fn(ref, batch).backward()
        opt.step()
        opt.zero_grad()
        averaged.update_parameters(ref)

    model = _WithIndexTable()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.lin.parameters(), lr=0.1))
    state, _ = loopkit.run_epochs(loopkit.with_ema(loopkit.train_step(loss_fn), DECAY), state, data, epochs=1,
                                  callbacks=[_SetTable(tables)], progress=False)
    assert_trees_equal(_ema_params(state), _averaged_params(averaged))
    table = _ema_params(state)["table"]
    assert table.dtype == torch.int64 and int(table[3]) not in {int(t[3]) for t in tables}  # (an average of them)


def test_decay_is_agreed_over_the_ranks():
    """Each rank averages its replica: another decay on one rank gave the ranks other averaged models (rank 0's
    checkpointed, each rank's evaluated), and run_epochs compared no option of with_ema. decay now is one."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert loopkit.with_ema(base, decay=0.9).rank_agreed == (("with_ema decay", 0.9),)


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
