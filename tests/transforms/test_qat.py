"""with_qat: bitwise a raw eager-mode QAT loop (torch.ao.quantization.prepare_qat), pure, resumable, convertible."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import loopkit
from loopkit.transforms.qat import is_prepared, quantized_model

STEPS = 6


@pytest.fixture(autouse=True)
def _quiet_torch_ao():
    """torch.ao.quantization's deprecation warnings, from the raw reference loops of this file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _net(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = torch.ao.quantization
        return nn.Sequential(q.QuantStub(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2), q.DeQuantStub())


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _sgd_trained(model: nn.Module, batches: list, lr: float) -> None:
    """The raw loop, as a reference: ``model`` trained in place by SGD on :func:`_mse` over ``batches``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        opt.zero_grad()
        _mse(model, batch).backward()
        opt.step()


def _state(seed: int = 0) -> loopkit.TrainState:
    model = _net(seed)
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seed=seed)


def _raw_qat(data):
    """The reference: PyTorch's eager-mode QAT recipe in a hand-written loop."""
    q = torch.ao.quantization
    model = _net(0)
    model.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for batch in data:
        opt.zero_grad()
        loss = _mse(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, losses


def test_equals_a_raw_eager_mode_qat_loop_bitwise(make_batches, assert_trees_equal):
    data = make_batches(STEPS)
    ref, ref_losses = _raw_qat(data)
    state, losses = _state(), []
    step = loopkit.with_qat(loopkit.train_step(_mse))
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    assert_trees_equal(losses, ref_losses)
    # weights, biases and every fake-quantizer's scale, zero point and observer range
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    assert sum("fake_quant" in k for k in state.model.state_dict()) > 10


def test_run_epochs_trains_the_same_as_calling_the_step(make_batches, assert_trees_equal):
    data = make_batches(STEPS)
    ref, _ = _raw_qat(data)
    state, _ = loopkit.run_epochs(loopkit.with_qat(loopkit.train_step(_mse)), _state(), data, epochs=1, progress=False)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))


def test_validation_changes_no_observer_so_training_equals_the_raw_loop(make_batches, assert_trees_equal):
    """Lightning's QAT callback pauses the observers outside training: a validation (and the sanity one)
    reads the fake-quantized model without moving its ranges, so the run equals the raw loop (no validation)."""
    data = make_batches(STEPS)
    ref, _ = _raw_qat(data)
    val = (loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}), make_batches(3, seed=9))
    state, history = loopkit.run_epochs(loopkit.with_qat(loopkit.train_step(_mse)), _state(), data, epochs=1,
                                        val=val, val_every_n_steps=2, progress=False)
    assert "val/mse" in history[0]
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    loopkit.evaluate(val[0], state, val[1])
    loopkit.predict(lambda m, b: m(b[0]), state, val[1])
    assert_trees_equal(dict(state.model.state_dict()), before)  # the observer flags are back as they were too


def test_a_pure_call_leaves_the_given_state_unprepared_and_unchanged(make_batches, take_snapshot, assert_trees_equal):
    state = _state()
    before = take_snapshot(state)
    new, _ = loopkit.check_purity(loopkit.with_qat(loopkit.train_step(_mse)), state, make_batches(1)[0])
    assert is_prepared(new.model) and not is_prepared(state.model)
    assert_trees_equal(take_snapshot(state), before)
    again, _ = loopkit.check_purity(loopkit.with_qat(loopkit.train_step(_mse)), new, make_batches(2)[1])  # prepared
    assert again.step == 2


def test_resume_from_a_checkpoint_into_a_prepared_template_is_exact(make_batches, tmp_path, assert_trees_equal):
    data = make_batches(STEPS)
    qat = loopkit.with_qat(loopkit.train_step(_mse))
    whole, _ = loopkit.run_epochs(qat, _state(), data, epochs=2, progress=False)

    saving = loopkit.with_checkpointing(qat, tmp_path, every_n_steps=STEPS + 2)
    loopkit.run_epochs(saving, _state(), data, max_steps=STEPS + 2, epochs=2, progress=False)
    with pytest.raises(loopkit.StateMismatchError, match="fake_quant"):
        loopkit.restore(_state(5), tmp_path)  # an unprepared template does not fit
    restored = loopkit.restore(qat.prepare(_state(5)), tmp_path)
    assert (restored.step, restored.batch_index) == (STEPS + 2, 2)
    resumed, _ = loopkit.run_epochs(qat, restored, data, epochs=2, progress=False)
    assert_trees_equal(dict(resumed.model.state_dict()), dict(whole.model.state_dict()))
    assert_trees_equal(resumed.optimizer.state_dict(), whole.optimizer.state_dict())


def test_a_plain_checkpoint_into_a_prepared_template_says_to_restore_into_the_unprepared_one(make_batches, tmp_path, assert_trees_equal):
    """A checkpoint without QAT's buffers (a plain run's, e.g. a pretraining one) into a prepared template: refused,
    saying to restore into the unprepared template, which then loads it and trains on under with_qat."""
    data = make_batches(STEPS)
    plain = loopkit.train_step(_mse)
    saved, _ = loopkit.run_epochs(loopkit.with_checkpointing(plain, tmp_path, every_n_steps=STEPS), _state(), data,
                                  epochs=1, progress=False)
    qat = loopkit.with_qat(plain)
    with pytest.raises(loopkit.StateMismatchError, match=r"fake_quant.*not prepared for quantization-aware training"
                       r".*prepared; load it into the unprepared template: loopkit\.restore\(template, directory\)"):
        loopkit.restore(qat.prepare(_state(5)), tmp_path)
    restored = loopkit.restore(_state(5), tmp_path)  # as the message says
    assert_trees_equal(dict(restored.model.state_dict()), dict(saved.model.state_dict()))
    trained, _ = qat(restored, data[0])
    assert is_prepared(trained.model) and trained.step == STEPS + 1


def _scale(state):
    return state.model[1].weight_fake_quant.scale.clone()


def test_observers_freeze_after_the_given_update(make_batches):
    data = make_batches(STEPS)
    scales = {}
    for freeze in (None, 2):
        state = _state()
        step = loopkit.with_qat(loopkit.train_step(_mse), freeze_observers_after=freeze)
        seen = []
        for batch in data:
            state, _ = step(state, batch)
            seen.append(_scale(state))
        scales[freeze] = seen
    assert not torch.equal(scales[None][3], scales[None][5])  # without freezing the ranges follow the weights
    assert all(torch.equal(scales[2][2], s) for s in scales[2][2:])  # frozen from the call after update 2
    assert torch.equal(scales[2][1], scales[None][1])


def test_the_int8_model_computes_what_the_fake_quantized_one_does(make_batches):
    """qnnpack's recipe quantizes over the full 8-bit range, as its int8 kernels do (x86's QAT config
    simulates 7-bit activations), so the trained fake-quantized model is the int8 model's simulation."""
    state = _state()
    step = loopkit.with_qat(loopkit.train_step(_mse), backend="qnnpack")
    for batch in make_batches(STEPS):
        state, _ = step(state, batch)
    int8 = quantized_model(state)
    assert isinstance(int8[1], torch.ao.nn.quantized.Linear)
    assert is_prepared(state.model) and state.model.training  # the state's model is untouched
    x = make_batches(1, seed=7)[0][0]
    simulation = copy.deepcopy(state.model).eval()
    simulation.apply(torch.ao.quantization.disable_observer)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        out = int8(x)
    finally:
        torch.backends.quantized.engine = engine
    with torch.no_grad():
        simulated = simulation(x)
    # the same int8 arithmetic, simulated in float: within an output quantization step (rounding)
    assert (out - simulated).abs().max() <= 1.01 * float(int8[3].scale)
    assert not torch.equal(out, torch.zeros_like(out))


class _WithWeightNorm(nn.Module):
    """A float front layer under the hook-based ``torch.nn.utils.weight_norm`` (left unquantized), then QAT's layers:
    the module keeps ``weight`` as a tensor autograd computed, which ``copy.deepcopy`` of the model refuses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.front = nn.utils.weight_norm(nn.Linear(4, 4))
        self.front.qconfig = None
        self.body = _net(0)

    def forward(self, x):
        return self.body(self.front(x))


def test_quantized_model_of_a_model_with_hook_based_weight_norm_is_torchs_convert_of_it(make_batches):
    """quantized_model copies the model as loopkit's state copy does (torch's deep copy refuses the hook-based
    weight_norm); the reference is torch's convert of the trained model itself, in place, once the copy is made."""
    model = _WithWeightNorm()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    step = loopkit.with_qat(loopkit.train_step(_mse))
    for batch in make_batches(STEPS):
        state, _ = step(state, batch)
    int8 = quantized_model(state)
    assert isinstance(int8.body[1], torch.ao.nn.quantized.Linear)
    assert is_prepared(state.model) and state.model.training  # the state's model is untouched
    assert int8.front.weight_v is not state.model.front.weight_v
    x = make_batches(1, seed=7)[0][0]
    reference = torch.ao.quantization.convert(state.model.eval(), inplace=True)
    with torch.no_grad():
        assert torch.equal(int8(x), reference(x))


def test_bad_input_is_named(make_batches):
    with pytest.raises(ValueError, match="backend must be one of"):
        loopkit.with_qat(loopkit.train_step(_mse), backend="tpu")
    with pytest.raises(ValueError, match="freeze_observers_after must be a non-negative int"):
        loopkit.with_qat(loopkit.train_step(_mse), freeze_observers_after=-1)
    with pytest.raises(TypeError, match="with_qat cannot wrap eval_step"):
        loopkit.with_qat(loopkit.eval_step(lambda m, b: {}))
    with pytest.raises(TypeError, match="with_qat cannot wrap with_qat"):
        loopkit.with_qat(loopkit.with_qat(loopkit.train_step(_mse)))
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match="with_qat cannot wrap with_amp"):
            loopkit.with_qat(loopkit.with_amp(loopkit.train_step(_mse), dtype=dtype))
        with pytest.raises(TypeError, match="with_amp cannot wrap with_qat"):
            loopkit.with_amp(loopkit.with_qat(loopkit.train_step(_mse)), dtype=dtype)
    model = nn.Sequential(nn.Tanh())
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no module that eager-mode QAT quantizes"):
        loopkit.with_qat(loopkit.train_step(lambda m, b: (m(b) * m.scale).sum()))(state, torch.ones(2))
    frozen = _state()
    frozen.model.eval()
    with pytest.raises(ValueError, match="must be in training mode"):
        loopkit.with_qat(loopkit.train_step(_mse))(frozen, make_batches(1)[0])
    with pytest.raises(ValueError, match="not trained with with_qat"):
        quantized_model(_state())


def _conv_bn_net() -> nn.Sequential:
    """Conv-BN-ReLU fused for QAT (as PyTorch's recipe does), with BatchNorm statistics as if pretrained."""
    q = torch.ao.quantization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(q.QuantStub(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 2), q.DeQuantStub())
    with torch.no_grad():
        model[2].weight.fill_(0.5)
        model[2].running_var.fill_(9.0)
    return q.fuse_modules_qat(model.train(), [["1", "2", "3"]])


def test_fused_conv_bn_equals_the_raw_recipe_bitwise(assert_trees_equal):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(4)]
    q = torch.ao.quantization
    ref = _conv_bn_net()
    ref.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(ref, inplace=True)
    _sgd_trained(ref, data, lr=0.01)
    model = _conv_bn_net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01))
    step = loopkit.with_qat(loopkit.train_step(_mse))
    for batch in data:
        state, _ = step(state, batch)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))


def _raw_frozen_qat(data, *, observers_at=None, bn_at=None, model=None):
    """The reference for the freezing options: PyTorch's recipe on :func:`_conv_bn_net` (or ``model``, prepared
    already) in a hand-written loop that calls torch.ao.quantization's own ``disable_observer`` / ``freeze_bn_stats``
    before the update at index ``observers_at`` / ``bn_at`` (the batch trained when that many updates are done) and
    every one after."""
    q = torch.ao.quantization
    if model is None:
        model = _conv_bn_net()
        model.qconfig = q.get_default_qat_qconfig("x86")
        q.prepare_qat(model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i, batch in enumerate(data):
        if observers_at is not None and i >= observers_at:
            model.apply(q.disable_observer)
        if bn_at is not None and i >= bn_at:
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        opt.zero_grad()
        _mse(model, batch).backward()
        opt.step()
    return model


def _conv_bn_data(n):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 6, 6, generator=gen) + i, torch.randn(8, 2, generator=gen)) for i in range(n)]


@pytest.mark.parametrize("at", [1, 2, 3])
@pytest.mark.parametrize("option", ["freeze_observers_after", "freeze_bn_after"])
def test_freezing_starts_at_the_call_whose_state_step_is_the_given_count(option, at, assert_trees_equal):
    """The docstring's boundary, exactly: from the call whose ``state.step`` is ``at`` (``at`` updates done) on, the
    quantization ranges (or the fused BatchNorm's running statistics) stop moving; the call before still moves them.
    Reference: a raw loop calling torch.ao.quantization's own disable_observer / freeze_bn_stats at that step (an
    off-by-one, freezing a call later or earlier, passed the previous test, which looked at the frozen calls only)."""
    data = _conv_bn_data(5)
    model = _conv_bn_net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01))
    step = loopkit.with_qat(loopkit.train_step(_mse), **{option: at})
    seen = []
    for batch in data:
        state, _ = step(state, batch)
        seen.append({k: v.clone() for k, v in state.model.state_dict().items()})
    name = "observers_at" if option == "freeze_observers_after" else "bn_at"
    assert_trees_equal(dict(state.model.state_dict()), dict(_raw_frozen_qat(data, **{name: at}).state_dict()))
    for other in (at - 1, at + 1):  # (the boundary shows: a call earlier or later trains another model)
        assert not torch.equal(state.model[1].weight, _raw_frozen_qat(data, **{name: other})[1].weight)
    key = "1.weight_fake_quant.scale" if option == "freeze_observers_after" else "1.bn.running_mean"
    assert all(torch.equal(seen[at - 1][key], later[key]) for later in seen[at:])  # the call at step `at` on


@pytest.mark.parametrize("done", [0, 2])
def test_observers_frozen_from_the_call_that_prepares_the_model_are_refused(done, take_snapshot, assert_trees_equal):
    """freeze_observers_after=0 (or a count a state has reached before QAT starts) would prepare the model with its
    observers off: no activation range ever observed (the observers' initial scales), the weights' ranges from the
    initial weights only; neither the raw recipe nor usable, refused before anything changes (a donated state too)."""
    model = _conv_bn_net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01)).evolve(step=done)
    before = take_snapshot(state)
    step = loopkit.donate(loopkit.with_qat(loopkit.train_step(_mse), freeze_observers_after=done))
    with pytest.raises(ValueError, match=rf"freeze_observers_after={done} freezes the observers .* never record a "
                                         rf"range.* freeze_observers_after > {done}.* prepare and calibrate"):
        step(state, _conv_bn_data(1)[0])
    assert not is_prepared(state.model)
    assert_trees_equal(take_snapshot(state), before)
    state, _ = loopkit.donate(loopkit.with_qat(loopkit.train_step(_mse), freeze_observers_after=done + 1))(
        state, _conv_bn_data(1)[0])  # the state is intact: it trains
    assert is_prepared(state.model)


def test_observers_frozen_from_the_first_call_on_a_calibrated_model_train_as_the_raw_recipe(assert_trees_equal):
    """freeze_observers_after=0 for a model prepared and calibrated by hand: its observed ranges are kept from the
    first update on, as a raw loop disabling the observers before every update keeps them."""
    q = torch.ao.quantization

    def calibrated():
        model = _conv_bn_net()
        model.qconfig = q.get_default_qat_qconfig("x86")
        q.prepare_qat(model, inplace=True)
        with torch.no_grad():
            for x, _ in _conv_bn_data(3):
                model(x)
        return model

    data = _conv_bn_data(4)
    state = loopkit.TrainState.create(model := calibrated(), torch.optim.SGD(model.parameters(), lr=0.01))
    step = loopkit.with_qat(loopkit.train_step(_mse), freeze_observers_after=0)
    for batch in data:
        state, _ = step(state, batch)
    ref = _raw_frozen_qat(data, observers_at=0, model=calibrated())
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    assert torch.equal(state.model[1].weight_fake_quant.scale, calibrated()[1].weight_fake_quant.scale)


def test_a_qconfig_set_on_the_model_is_kept(make_batches):
    state = _state()
    state.model.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")  # full 8-bit activations
    new, _ = loopkit.with_qat(loopkit.train_step(_mse))(state, make_batches(1)[0])
    assert new.model[1].activation_post_process.quant_max == 255
    other, _ = loopkit.with_qat(loopkit.train_step(_mse))(_state(), make_batches(1)[0])
    assert other.model[1].activation_post_process.quant_max == 127  # x86's default: 7-bit activations


def test_a_nan_batch_skipped_by_nan_guard_leaves_the_observers_as_they_were(make_batches, mse_loss):
    """The forward of a NaN batch moves the activation observers to NaN; a skip puts them back, and training goes on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    step = loopkit.with_qat(loopkit.with_nan_guard(loopkit.train_step(mse_loss)))
    data = make_batches(3)
    state, _ = step(state, data[0])
    before = {k: v.clone() for k, v in state.model.named_buffers()}
    bad_x = data[1][0].clone()
    bad_x[0, 0] = float("nan")
    state, metrics = step(state, (bad_x, data[1][1]))
    assert float(metrics["nan_guard/skipped"]) == 1.0 and state.step == 1
    after = dict(state.model.named_buffers())
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    state, metrics = step(state, data[2])
    assert torch.isfinite(metrics["loss"]) and state.step == 2
    assert all(bool(torch.isfinite(b).all()) for b in state.model.buffers() if b.is_floating_point())


def test_a_donated_first_call_whose_loss_fails_leaves_the_prepared_state_whole(make_batches, assert_trees_equal):
    """The first call prepares the model in place, then the loss is refused before any update: the state is whole
    (prepared, as every later call finds it), and training it on equals a raw QAT loop whose first forward
    (the failed one, which moved the observers as any forward does) ran once before the same updates."""
    bad = lambda m, b: (m(b[0]) - b[1]) ** 2  # noqa: E731 (not reduced to a scalar)
    data = make_batches(3, d_in=4, d_out=2)
    state = _state()
    with pytest.raises(ValueError, match="scalar") as caught:
        loopkit.donate(loopkit.with_qat(loopkit.train_step(bad)))(state, data[0])
    assert loopkit.state_at_error(caught.value) is state
    state.check_usable()
    assert is_prepared(state.model) and state.step == 0
    trained, _ = loopkit.run_epochs(loopkit.with_qat(loopkit.train_step(_mse)), state, data, epochs=1, progress=False)
    q = torch.ao.quantization
    model = _net(0)
    model.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(model, inplace=True)
    model(data[0][0])  # the failed call's forward
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for batch in data:
        opt.zero_grad()
        _mse(model, batch).backward()
        opt.step()
    assert_trees_equal(trained.model.state_dict(), model.state_dict())


def test_quantized_model_of_a_model_without_a_quant_stub_is_refused_naming_it(make_batches):
    """It converted, and the int8 model's first call failed in torch ("Could not run 'quantized::linear' with
    arguments from the 'CPU' backend"): its layers got float inputs."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.with_qat(loopkit.train_step(lambda m, b: m(b[0]).pow(2).mean()))(state, make_batches(1)[0])
    with pytest.raises(ValueError, match="quantized_model: the model has no QuantStub.*QuantWrapper"):
        loopkit.quantized_model(state)


def test_the_quantization_and_its_freezing_are_agreed_over_the_ranks():
    """A rank whose observers or BatchNorm statistics freeze at another step (or of another backend) computes its
    gradients through another forward: run_epochs compared no option of with_qat. Those are now shared."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert dict(loopkit.with_qat(base, freeze_bn_after=3).rank_agreed) == {
        "with_qat backend": "x86", "with_qat freeze_observers_after": None, "with_qat freeze_bn_after": 3}
    assert loopkit.with_qat(base, freeze_observers_after=2).rank_agreed != loopkit.with_qat(base).rank_agreed


# --- an observer-only qconfig (get_default_qconfig: plain observers, no fake-quantizer), as Lightning 1.x's
# QuantizationAwareTraining(observer_type="histogram") sets. prepare_qat ran again at every call (is_prepared looked
# for fake-quantizers only): one more observer hook per call, other observer values, and quantized_model refused it.


def _observer_qconfig():
    return torch.ao.quantization.get_default_qconfig("x86")


def _raw_observer_qat(data, *, keep_observers_at=None):
    """The reference: prepare_qat once with the observer-only qconfig, then a hand-written loop. With
    ``keep_observers_at`` it also returns a copy of the observer buffers after that many updates."""
    q = torch.ao.quantization
    model = _net(0)
    model.qconfig = _observer_qconfig()
    q.prepare_qat(model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kept = None
    for i, batch in enumerate(data):
        if i == keep_observers_at:
            kept = {k: v.clone() for k, v in model.state_dict().items() if "activation_post_process" in k
                    or "weight_fake_quant" in k}
        opt.zero_grad()
        _mse(model, batch).backward()
        opt.step()
    return model, kept


def _hooks(model):
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


def _observer_step(**options):
    return loopkit.with_qat(loopkit.train_step(_mse), qconfig=_observer_qconfig(), **options)


def _assert_converts_as_the_raw_model(state, ref, x):
    q = torch.ao.quantization
    raw_int8 = q.convert(copy.deepcopy(ref).eval(), inplace=False)
    int8 = quantized_model(state)
    assert isinstance(int8[1], torch.ao.nn.quantized.Linear)
    assert torch.equal(int8(x), raw_int8(x))


def test_an_observer_only_qconfig_is_prepared_once_and_trains_as_the_raw_loop(make_batches, assert_trees_equal):
    data = make_batches(STEPS)
    ref, _ = _raw_observer_qat(data + data)
    state, _ = loopkit.run_epochs(_observer_step(), _state(), data, epochs=2, progress=False)
    assert _hooks(state.model) == _hooks(ref)  # one observer hook each, as prepare_qat once puts in
    assert _hooks(state.model)["1"] == 1
    assert is_prepared(state.model)
    assert not any(isinstance(m, torch.ao.quantization.FakeQuantizeBase) for m in state.model.modules())
    # weights, biases and every observer's histogram and range
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    assert sum("histogram" in k for k in state.model.state_dict()) == 3
    _assert_converts_as_the_raw_model(state, ref, make_batches(1, seed=7)[0][0])


def test_an_observer_only_qconfig_resumes_from_a_checkpoint_exactly(make_batches, tmp_path, assert_trees_equal):
    data = make_batches(STEPS)
    ref, _ = _raw_observer_qat(data + data)
    qat = _observer_step()
    saving = loopkit.with_checkpointing(qat, tmp_path, every_n_steps=STEPS + 2)
    loopkit.run_epochs(saving, _state(), data, max_steps=STEPS + 2, epochs=2, progress=False)
    restored = loopkit.restore(qat.prepare(_state(5)), tmp_path)
    assert is_prepared(restored.model) and restored.step == STEPS + 2
    resumed, _ = loopkit.run_epochs(qat, restored, data, epochs=2, progress=False)
    assert _hooks(resumed.model) == _hooks(ref)  # the restored model is not prepared again
    assert_trees_equal(dict(resumed.model.state_dict()), dict(ref.state_dict()))
    _assert_converts_as_the_raw_model(resumed, ref, make_batches(1, seed=7)[0][0])


@pytest.mark.parametrize("at", [1, 3])
def test_an_observer_only_qconfig_freezes_its_observers_after_the_given_update(at, make_batches, assert_trees_equal):
    """torch's disable_observer acts on fake-quantizers only; a plain observer only records (the model trains in
    float), so frozen from the call whose state.step is ``at``: the raw loop's weights, and the observers as the raw
    loop had them after ``at`` updates."""
    data = make_batches(STEPS)
    ref, kept = _raw_observer_qat(data, keep_observers_at=at)
    state, _ = loopkit.run_epochs(_observer_step(freeze_observers_after=at), _state(), data, epochs=1, progress=False)
    trained = dict(state.model.state_dict())
    assert_trees_equal({k: trained[k] for k in kept}, kept)
    assert_trees_equal({k: v for k, v in trained.items() if k not in kept},
                       {k: v for k, v in ref.state_dict().items() if k not in kept})
    assert not torch.equal(trained["1.activation_post_process.histogram"],
                           ref.state_dict()["1.activation_post_process.histogram"])  # (freezing showed)


def test_an_observer_only_qconfig_is_not_observed_by_an_evaluation(make_batches, assert_trees_equal):
    data = make_batches(STEPS)
    ref, _ = _raw_observer_qat(data)
    val = (loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}), make_batches(3, seed=9))
    state, history = loopkit.run_epochs(_observer_step(), _state(), data, epochs=1, val=val, val_every_n_steps=2,
                                        progress=False)
    assert "val/mse" in history[0]
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    loopkit.evaluate(val[0], state, val[1])
    loopkit.predict(lambda m, b: m(b[0]), state, val[1])
    assert_trees_equal(dict(state.model.state_dict()), before)


def test_a_plain_weight_observer_sees_each_weight_as_often_as_in_the_raw_loop(make_batches, assert_trees_equal):
    """The first call made every weight quantizer observe its weight once before the forward (for the per-channel
    scales' shapes of fake-quantizers); a plain histogram observer then counted the first weights twice."""
    q = torch.ao.quantization
    qconfig = q.QConfig(activation=q.HistogramObserver.with_args(reduce_range=True),
                        weight=q.HistogramObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    data = make_batches(3)
    ref = _net(0)
    ref.qconfig = qconfig
    q.prepare_qat(ref, inplace=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for batch in data:
        opt.zero_grad()
        _mse(ref, batch).backward()
        opt.step()
    step = loopkit.with_qat(loopkit.train_step(_mse), qconfig=qconfig)
    state, _ = loopkit.run_epochs(step, _state(), data, epochs=1, progress=False)
    assert_trees_equal(dict(state.model.state_dict()), dict(ref.state_dict()))
    assert "1.weight_fake_quant.histogram" in ref.state_dict()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_model_not_in_float32_is_refused_naming_the_parameter_and_its_dtype_before_anything_changes(
    dtype, make_batches, take_snapshot, assert_trees_equal
):
    """torch's fake-quantize kernels take float32 alone: a float64/bfloat16/float16 model failed inside them with a bare
    "expected scalar type Float but found Double". Refused as with_amp is, naming with_qat, the parameter and its
    dtype, at the first call (a donated state stays usable) and by prepare()."""
    model = _net().to(dtype)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    before = take_snapshot(state)
    x, y = make_batches(1)[0]
    step = loopkit.with_qat(loopkit.train_step(_mse))
    message = rf"with_qat: the model's parameter '1.weight' is {dtype}: .* float32"
    with pytest.raises(TypeError, match=message):
        loopkit.donate(step)(state, (x.to(dtype), y.to(dtype)))
    with pytest.raises(TypeError, match=message):
        step.prepare(state)
    assert not is_prepared(state.model)
    assert_trees_equal(take_snapshot(state), before)
    state.model.float()  # the state is intact: in float32 it trains
    state, _ = loopkit.donate(step)(state, (x, y))
    assert is_prepared(state.model)


class _Float64Head(nn.Module):
    """A float32 quantized body and a float64 head left out of QAT (``qconfig = None``, torch's way)."""

    def __init__(self):
        super().__init__()
        self.body = _net()
        self.head = nn.Linear(2, 1).double()
        self.head.qconfig = None

    def forward(self, x):
        return self.head(self.body(x).double()).float()


def test_a_part_left_out_of_qat_may_be_another_dtype_and_trains_as_a_raw_prepare_qat_loop(make_batches):
    """The float32 check covers only the modules prepare_qat swaps: a float64 head with ``qconfig = None`` trains, as
    in a raw loop (a first cut refused every non-float32 parameter of the model). Reference: torch's prepare_qat with
    the same qconfig and SGD, by hand."""
    batches = [(x, y[:, :1]) for x, y in make_batches(3)]
    qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw = _Float64Head()
        raw.qconfig = qconfig
        torch.ao.quantization.prepare_qat(raw, inplace=True)
    _sgd_trained(raw, batches, lr=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Float64Head()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    step = loopkit.donate(loopkit.with_qat(loopkit.train_step(_mse), qconfig=qconfig))
    for batch in batches:
        state, _ = step(state, batch)
    assert state.model.head.weight.dtype == torch.float64
    for (name, got), (_, want) in zip(state.model.named_parameters(), raw.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


class _Float64Norm(nn.Module):
    """A float32 Linear, then a float64 LayerNorm that inherits the qconfig: prepare_qat gives it an output
    fake-quantizer (a leaf of a class torch quantizes), which takes float32 alone."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4).double()

    def forward(self, x):
        return self.norm(self.lin(x).double()).float()


def test_a_float64_leaf_that_prepare_qat_observes_is_refused_before_anything_changes():
    """The float32 check covers the leaves prepare_qat gives an output fake-quantizer, not only the modules it swaps (a
    first cut let a float64 LayerNorm through to torch's bare "expected scalar type Float")."""
    model = _Float64Norm()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    with pytest.raises(TypeError, match=r"with_qat: the model's parameter 'norm.weight' is torch.float64"):
        loopkit.donate(loopkit.with_qat(loopkit.train_step(_mse)))(state, (torch.randn(3, 4), torch.zeros(3, 4)))
    assert not is_prepared(state.model) and not hasattr(state.model, "qconfig")


def test_a_qconfig_set_on_a_submodule_alone_quantizes_that_part_alone_as_prepare_qat_does(make_batches):
    """with_qat() without a qconfig keeps one the model's submodules have (its docstring): set on the first Linear
    alone, only that one is swapped, as a raw prepare_qat swaps it (the backend's default was set on the root, and
    every module without its own inherited it). Reference: prepare_qat by hand, the same swapped modules and training."""
    def net():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        model[0].qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
        return model

    batches = make_batches(3)
    raw = net()
    with torch.random.fork_rng(devices=[]):
        torch.ao.quantization.prepare_qat(raw, inplace=True)
    _sgd_trained(raw, batches, lr=0.05)
    model = net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    step = loopkit.donate(loopkit.with_qat(loopkit.train_step(_mse)))
    for batch in batches:
        state, _ = step(state, batch)
    swapped = [name for name, module in state.model.named_modules() if hasattr(module, "weight_fake_quant")]
    assert swapped == [name for name, module in raw.named_modules() if hasattr(module, "weight_fake_quant")] == ["0"]
    for got, want in zip(state.model.parameters(), raw.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
