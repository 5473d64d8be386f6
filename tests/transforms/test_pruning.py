"""with_pruning: the weights equal a raw loop pruned with torch.nn.utils.prune.global_unstructured, bitwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import loopkit
from loopkit import checkpoint
from loopkit.state import fork
from loopkit.transforms.pruning import cubic_sparsity, default_prunable
from tests.conftest import (
    assert_refused_before_the_update,
    prefixed,
    restored_in_float64,
    saved_by_an_older_loopkit,
    through_a_file,
)

AMOUNT = 0.7
POINTS = [2, 4, 6]


def _wide_mlp(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _pruned_weight_count(model) -> int:
    return sum(int((getattr(model, i).weight == 0).sum()) for i in ("0", "2"))


def _raw_pruned_loop(model, opt, data, loss_fn, modules=None, *, clip=None, norms=None, update=None):
    """The reference: torch.nn.utils.prune's reparametrisation (weight = weight_orig * weight_mask), pruned
    globally by L1 after the updates in POINTS, each time by the count that brings the total to the ramp.
    ``modules`` maps the names to report to the modules whose ``weight`` is pruned (default: an MLP's two
    Linears); ``clip``: clip_grad_norm_ over the optimizer's parameters (weight_orig among them), the
    norms appended to ``norms``; ``update(model, opt, batch)``: a batch's updates written by hand (instead of
    one of ``loss_fn``). Its optimizer updates weight_orig, whose gradient is the weight's times the mask."""
    modules = modules if modules is not None else {"0.weight": model[0], "2.weight": model[2]}
    targets = [(m, "weight") for m in modules.values()]
    total = sum(m.weight.numel() for m, _ in targets)
    pruned = 0
    for k, batch in enumerate(data, start=1):
        if update is not None:
            update(model, opt, batch)
        elif isinstance(opt, torch.optim.LBFGS):  # its closure runs the forward (weight_orig * mask) and backward again
            def closure(batch=batch):
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                return loss
            opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            if clip is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], clip))
            opt.step()
        if k in POINTS:
            want = round(cubic_sparsity(AMOUNT, POINTS, k) * total)
            # rank by the weights as they are now (a pruned module's .weight is the stale one of the last forward)
            current = {(m, n): m.weight_orig * m.weight_mask for m, n in targets if prune.is_pruned(m)}
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=want - pruned,
                                      importance_scores=current or None)
            pruned = want
    return {name: (m.weight_orig * m.weight_mask).detach() for name, m in modules.items()}


VOCAB, WIDTH = 12, 6


class _TiedLM(nn.Module):
    """A language model whose head shares the embedding's weight (``head.weight = emb.weight``)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.emb, self.mid = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        _init(self, seed)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


class _RawTiedLM(nn.Module):
    """The reference's model: the shared tensor is the embedding's weight, which torch.nn.utils.prune recomputes
    (weight_orig * weight_mask) when the embedding runs, before the head reads it: pruned once, seen by both."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.emb, self.mid = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH)
        _init(self, seed)

    def forward(self, tokens):
        return nn.functional.linear(torch.tanh(self.mid(self.emb(tokens))), self.emb.weight)


def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # emb.weight (once, tied or not), mid.weight, mid.bias
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _lm_loss(model, tokens):
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _token_batches(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (4, 5), generator=g) for _ in range(n)]


def test_weights_are_bitwise_global_unstructured_l1_in_a_raw_loop(make_batches, mse_loss, make_adam_state, assert_trees_equal):
    data = make_batches(8, d_in=4, d_out=2)
    ref_model = _wide_mlp(0)
    expected = _raw_pruned_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, mse_loss)

    state = make_adam_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    got = {name: p.detach() for name, p in state.model.named_parameters() if name.endswith("weight")}
    assert_trees_equal(got, expected)
    assert_trees_equal(state.model[0].bias.detach(), ref_model[0].bias.detach())
    assert _pruned_weight_count(state.model) == round(AMOUNT * (64 + 32))


def test_sparsity_follows_the_cubic_ramp_and_pruned_weights_stay_zero(make_batches, mse_loss, make_adam_state):
    data = make_batches(9, d_in=4, d_out=2)
    state = make_adam_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    counts, zero_masks = [], None
    for batch in data:
        state, _ = step(state, batch)
        counts.append(_pruned_weight_count(state.model))
        if zero_masks is not None:  # once pruned, a weight stays zero although Adam keeps moving it
            assert all(bool((getattr(state.model, i).weight[zero_masks[i]] == 0).all()) for i in ("0", "2"))
        if state.step == POINTS[0]:
            zero_masks = {i: getattr(state.model, i).weight == 0 for i in ("0", "2")}
    assert counts == [0] + [round(cubic_sparsity(AMOUNT, POINTS, s) * 96) for s in range(2, 10)]
    assert counts[1] < counts[3] < counts[5] == counts[-1]
    assert state.extras["pruning/sparsity"] == pytest.approx(AMOUNT)


def test_a_function_schedule_prunes_once_and_parameters_choose_the_tensors(make_batches, mse_loss, make_sgd_state):
    data = make_batches(5, d_in=4, d_out=2)
    state = make_sgd_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, lambda s: 1.0 if s >= 3 else 0.0, parameters=["0.weight"])
    zeros = []
    for batch in data:
        state, _ = step(state, batch)
        zeros.append((int((state.model[0].weight == 0).sum()), int((state.model[2].weight == 0).sum())))
    assert zeros == [(0, 0), (0, 0), (32, 0), (32, 0), (32, 0)]


def test_the_step_is_pure_and_donation_reproduces_it(make_batches, mse_loss, make_adam_state, take_snapshot, assert_trees_equal):
    data = make_batches(5, d_in=4, d_out=2)
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    pure, donated = make_adam_state(_wide_mlp(0)), make_adam_state(_wide_mlp(0))
    for batch in data:
        before = take_snapshot(pure)
        new, _ = step(pure, batch)
        assert_trees_equal(take_snapshot(pure), before)
        pure = new
        donated, _ = loopkit.donate(step)(donated, batch)
    assert_trees_equal(take_snapshot(pure), take_snapshot(donated))


def test_a_restored_checkpoint_resumes_with_its_masks(tmp_path, make_batches, mse_loss, make_adam_state, take_snapshot,
                                                      assert_trees_equal):
    data = make_batches(8, d_in=4, d_out=2)
    step = loopkit.with_checkpointing(loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS), tmp_path,
                                      every_n_steps=3)
    uninterrupted = make_adam_state(_wide_mlp(0))
    for batch in data:
        uninterrupted, _ = step(uninterrupted, batch)
    resumed = loopkit.restore(make_adam_state(_wide_mlp(1)), checkpoint.list_checkpoints(tmp_path)[0].path)
    assert resumed.step == 3 and sorted(resumed.extras["pruning/masks"]) == ["0.weight", "2.weight"]
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


def test_default_prunable_takes_linear_and_conv_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    assert default_prunable(model) == ["0.weight", "3.weight"]
    assert default_prunable(nn.Linear(2, 2)) == ["weight"]


def _normed_mlp(seed: int = 0) -> nn.Sequential:
    """``_wide_mlp`` whose first layer's weight is parametrized (weight_norm): computed, no parameter to mask."""
    model = _wide_mlp(seed)
    nn.utils.parametrizations.weight_norm(model[0])
    return model


def test_a_parametrized_weight_is_left_to_its_parametrization_and_named_when_asked_for(make_batches, mse_loss,
                                                                                       make_adam_state,
                                                                                       assert_trees_equal):
    assert default_prunable(_normed_mlp()) == ["2.weight"]
    data = make_batches(6, d_in=4, d_out=2)
    # the default prunes the plain layer only, as a raw loop pruning that layer alone
    ref_model = _normed_mlp(0)
    expected = _raw_pruned_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, mse_loss,
                                modules={"2.weight": ref_model[2]})
    state = make_adam_state(_normed_mlp(0))
    state, _ = loopkit.run_epochs(loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS), state, data,
                                  epochs=1, progress=False)
    assert_trees_equal(state.model[2].weight.detach(), expected["2.weight"])
    assert_trees_equal(state.model[0].weight.detach(), ref_model[0].weight.detach())
    # named by hand: refused before any update, naming where its parameters are
    fresh = make_adam_state(_normed_mlp(0))
    step = loopkit.donate(loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1], parameters=["0.weight"]))
    with pytest.raises(KeyError, match=r"'0.weight' is parametrized .* under '0.parametrizations.weight'"):
        step(fresh, data[0])
    fresh.check_usable()


@pytest.mark.parametrize(
    "amount, schedule, error, match",
    [
        (0.0, [1], ValueError, "amount must be a fraction"),
        (1.0, [1], ValueError, "amount must be a fraction"),
        ("0.5", [1], ValueError, "amount must be a fraction"),
        (0.5, [], TypeError, "schedule must be a non-empty list"),
        (0.5, [3, 2], ValueError, "schedule must be increasing"),
        (0.5, [0, 2], ValueError, "schedule must be increasing"),
        (0.5, "10", TypeError, "schedule must be"),
    ],
)
def test_bad_options_are_refused_by_name(mse_loss, amount, schedule, error, match):
    with pytest.raises(error, match=f"with_pruning: {match}"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), amount, schedule)


def test_a_schedule_out_of_range_or_a_missing_parameter_is_named(make_batches, mse_loss, make_sgd_state):
    batch = make_batches(1, d_in=4, d_out=2)[0]
    state = make_sgd_state(_wide_mlp(0))
    with pytest.raises(ValueError, match=r"schedule\(1\) must be a fraction in \[0, 1\], got 2"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, lambda s: 2)(state, batch)
    with pytest.raises(KeyError, match="no parameter 'head.weight'"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, [1], parameters=["head.weight"])(state, batch)


@pytest.mark.parametrize("every", [1, 2])
def test_a_schedule_value_out_of_range_later_in_a_fit_is_refused_before_the_update_it_follows(
    every, make_batches, mse_loss, make_sgd_state, take_snapshot, assert_trees_equal
):
    """schedule(3) is out of range: the error comes before update 3 (under every=2: at the micro-batch that starts
    its group), and the fit's state after update 2 is whole, as a fit of 2 updates leaves it."""
    data = make_batches(5 if every == 2 else 4, d_in=4, d_out=2)

    def step(schedule):
        inner = loopkit.train_step(mse_loss) if every == 1 else loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2)
        return loopkit.with_pruning(inner, 0.5, schedule)

    with pytest.raises(ValueError, match=r"schedule\(3\) must be a fraction in \[0, 1\], got 2.0") as caught:
        loopkit.run_epochs(step(lambda s: 0.5 if s < 3 else 2.0), make_sgd_state(_wide_mlp(0)), data, epochs=1,
                           progress=False)
    left = loopkit.state_at_error(caught.value)
    assert left is not None and left.step == 2
    two, _ = loopkit.run_epochs(step(lambda s: 0.5), make_sgd_state(_wide_mlp(0)), data[:2 * every], epochs=1,
                                progress=False)
    assert_trees_equal(take_snapshot(left)["params"], take_snapshot(two)["params"])


def test_meaningless_orders_are_refused_when_built(tmp_path, mse_loss):
    base = loopkit.train_step(mse_loss)
    for inner, name in [(loopkit.with_pruning(base, 0.5, [1]), "with_pruning"), (loopkit.with_ema(base, 0.9), "with_ema"),
                        (loopkit.with_checkpointing(base, tmp_path), "with_checkpointing")]:
        with pytest.raises(TypeError, match=f"with_pruning cannot wrap {name}"):
            loopkit.with_pruning(inner, 0.5, [1])
    with pytest.raises(TypeError, match="with_pruning cannot wrap eval_step"):
        loopkit.with_pruning(loopkit.eval_step(lambda m, b: {}), 0.5, [1])
    with pytest.raises(TypeError, match="with_grad_clip cannot wrap with_pruning"):
        loopkit.with_grad_clip(loopkit.with_pruning(base, 0.5, [1]), max_norm=1.0)
    assert loopkit.with_ema(loopkit.with_pruning(base, 0.5, [1]), 0.9).applied == ("train_step", "with_pruning", "with_ema")


@pytest.mark.parametrize("parameters, masked", [(None, ["mid.weight", "head.weight"]),
                                                (["emb.weight", "mid.weight", "head.weight"], ["emb.weight", "mid.weight"])])
def test_a_tied_weight_is_pruned_once_as_a_raw_loop_prunes_the_shared_tensor(parameters, masked, make_adam_state,
                                                                              assert_trees_equal):
    data = _token_batches(8)
    ref_model = _RawTiedLM(0)
    expected = _raw_pruned_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, _lm_loss,
                                {"emb.weight": ref_model.emb, "mid.weight": ref_model.mid})

    state = make_adam_state(_TiedLM(0))
    step = loopkit.with_pruning(loopkit.train_step(_lm_loss), AMOUNT, POINTS, parameters=parameters)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    model = state.model
    assert model.head.weight is model.emb.weight and list(state.extras["pruning/masks"]) == masked
    got = {"emb.weight": model.emb.weight.detach(), "mid.weight": model.mid.weight.detach()}
    assert_trees_equal(got, expected)
    assert_trees_equal(model.mid.bias.detach(), ref_model.mid.bias.detach())
    assert int((model.emb.weight == 0).sum() + (model.mid.weight == 0).sum()) == round(AMOUNT * (VOCAB + WIDTH) * WIDTH)


def test_a_missing_parameter_is_refused_before_a_resumed_run_trains(make_batches, mse_loss, make_sgd_state, take_snapshot,
                                                                     assert_trees_equal):
    data = make_batches(3, d_in=4, d_out=2)
    state = make_sgd_state(_wide_mlp(0))
    for batch in data[:2]:  # a run resumed at step 2, its first prune (update 4) still ahead
        state, _ = loopkit.train_step(mse_loss)(state, batch)
    before = take_snapshot(state)
    step = loopkit.donate(loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, [4], parameters=["0.weight", "head.weight"]))
    with pytest.raises(KeyError, match="with_pruning: the model has no parameter 'head.weight'"):
        step(state, data[2])
    assert_trees_equal(take_snapshot(state), before)  # not one update: the donated state is intact, and usable
    state, _ = loopkit.train_step(mse_loss)(state, data[2])


def _fused_qat_net() -> nn.Sequential:
    """Conv-BN-ReLU fused for QAT (PyTorch's recipe): prepare_qat names the fused conv's weight '1.weight', where the
    model as given has '1.0.weight'."""
    q = torch.ao.quantization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(q.QuantStub(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 2), q.DeQuantStub())
    return q.fuse_modules_qat(model.train(), [["1", "2", "3"]])


def _fused_qat_data(n):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(n)]


@pytest.mark.filterwarnings("ignore")  # torch.ao.quantization's deprecation warnings
@pytest.mark.parametrize("qat_outside", [False, True])
def test_a_fused_qat_models_prepared_names_prune_it_as_a_raw_loop_in_either_order(qat_outside, mse_loss,
                                                                                  assert_trees_equal):
    """parameters= names the model as with_qat prepares it ('1.weight'), with with_qat inside (checked against a
    prepared copy before the first call prepares the model) or outside; the weight is bitwise a raw prepare_qat loop's
    pruned by torch.nn.utils.prune (the prepared name was refused at the first call, the given one at the second)."""
    q = torch.ao.quantization
    data = _fused_qat_data(7)
    ref = _fused_qat_net()
    ref.qconfig = q.get_default_qat_qconfig("x86")
    q.prepare_qat(ref, inplace=True)
    expected = _raw_pruned_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.01), data, mse_loss, {"1.weight": ref[1]})

    model = _fused_qat_net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01))
    base = loopkit.train_step(mse_loss)
    if qat_outside:
        step = loopkit.with_qat(loopkit.with_pruning(base, AMOUNT, POINTS, parameters=["1.weight"]))
    else:
        step = loopkit.with_pruning(loopkit.with_qat(base), AMOUNT, POINTS, parameters=["1.weight"])
    for batch in data:
        state, _ = step(state, batch)
    assert list(state.extras["pruning/masks"]) == ["1.weight"]
    assert_trees_equal({"1.weight": state.model[1].weight.detach()}, expected)


@pytest.mark.filterwarnings("ignore")
def test_a_name_that_with_qat_inside_renames_is_refused_at_the_first_call_saying_what_it_becomes(
    mse_loss, take_snapshot, assert_trees_equal
):
    model = _fused_qat_net()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.01))
    before = take_snapshot(state)
    step = loopkit.donate(loopkit.with_pruning(loopkit.with_qat(loopkit.train_step(mse_loss)), AMOUNT, POINTS,
                                               parameters=["1.0.weight"]))
    with pytest.raises(KeyError, match=r"parameter '1.0.weight' is renamed when the with_qat inside prepares the "
                                       r"model: prepare_qat makes module '1' a ConvBnReLU2d, whose parameters are "
                                       r"'1.weight', .*with_qat\(with_pruning\(step, ...\)\)"):
        step(state, _fused_qat_data(1)[0])
    assert "1.0.weight" in dict(state.model.named_parameters())  # not prepared: the donated state is intact
    assert_trees_equal(take_snapshot(state), before)
    with pytest.raises(KeyError, match="with_pruning: the model has no parameter '1.nothing'"):  # no hint to give
        loopkit.with_pruning(loopkit.with_qat(loopkit.train_step(mse_loss)), AMOUNT, POINTS,
                             parameters=["1.weight", "1.nothing"])(state, _fused_qat_data(1)[0])


@pytest.mark.parametrize("max_norm", [0.5, 3.0])
def test_clipping_inside_sees_the_gradients_of_weight_orig_as_in_a_raw_loop(max_norm, make_batches, mse_loss,
                                                                            assert_trees_equal):
    data = make_batches(9, d_in=4, d_out=2)
    ref_model, raw_norms = _wide_mlp(0), []
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    expected = _raw_pruned_loop(ref_model, ref_opt, data, mse_loss, clip=max_norm, norms=raw_norms)

    model = _wide_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    step = loopkit.with_pruning(loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=max_norm), AMOUNT, POINTS)
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])
    assert_trees_equal(norms, raw_norms)  # after the first prune too: the pruned entries' gradients count as zero
    got = {name: p.detach() for name, p in state.model.named_parameters() if name.endswith("weight")}
    assert_trees_equal(got, expected)
    assert_trees_equal([state.model[i].bias.detach() for i in (0, 2)], [ref_model[i].bias.detach() for i in (0, 2)])


def test_adafactor_reading_gradients_across_entries_follows_the_raw_loop(make_batches, mse_loss, assert_trees_equal):
    # Adafactor's second moment is factored over each weight's rows and columns, and its update is scaled by
    # the update's RMS: both read every entry's gradient. eps2 above the weights' RMS makes its step size
    # eps2 * lr, not the parameter's RMS (which here reads the pruned weight, there weight_orig: see with_pruning)
    adafactor = lambda params: torch.optim.Adafactor(params, lr=0.01, eps=(None, 10.0))  # noqa: E731
    _assert_pruned_as_the_raw_loop(adafactor, make_batches(9, d_in=4, d_out=2), mse_loss, assert_trees_equal)


def _assert_pruned_as_the_raw_loop(optimizer, data, mse_loss, assert_trees_equal) -> loopkit.TrainState:
    """``run_epochs`` of ``with_pruning`` over ``data`` against :func:`_raw_pruned_loop`, bitwise; its state."""
    ref_model = _wide_mlp(0)
    expected = _raw_pruned_loop(ref_model, optimizer(ref_model.parameters()), data, mse_loss)
    model = _wide_mlp(0)
    state = loopkit.TrainState.create(model, optimizer(model.parameters()))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    got = {name: p.detach() for name, p in state.model.named_parameters() if name.endswith("weight")}
    assert_trees_equal(got, expected)
    assert_trees_equal([state.model[i].bias.detach() for i in (0, 2)], [ref_model[i].bias.detach() for i in (0, 2)])
    return state


def test_the_gradient_hooks_last_one_call_and_purity_holds_once_pruned(make_batches, mse_loss, make_adam_state):
    data = make_batches(4, d_in=4, d_out=2)
    step = loopkit.with_pruning(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), AMOUNT, [1])
    state = make_adam_state(_wide_mlp(0))
    for batch in data[:2]:
        state, _ = step(state, batch)
    assert "pruning/masks" in state.extras
    state, _ = loopkit.check_purity(step, state, data[2])  # a micro-batch with the masks' hooks on its parameters
    masks = state.extras["pruning/masks"]
    assert all(bool((state.model.get_parameter(n).grad[masks[n] == 0] == 0).all()) for n in masks)
    donated = loopkit.donate(step)
    state, _ = donated(state, data[3])
    assert all(not p._backward_hooks for p in state.model.parameters())


_LBFGS = {"max_iter=1": dict(max_iter=1), "max_iter=5": dict(max_iter=5),
          "strong_wolfe": dict(max_iter=5, line_search_fn="strong_wolfe")}


@pytest.mark.parametrize("options", list(_LBFGS.values()), ids=list(_LBFGS))
def test_lbfgs_forwards_inside_an_update_see_the_pruned_weights_zero_as_in_a_raw_loop(options, make_batches, mse_loss,
                                                                                       assert_trees_equal):
    # LBFGS's closure runs the forward several times per update, and its history (from before the prune) moves
    # pruned entries: the raw loop's forwards compute weight_orig * mask each time, so must loopkit's
    lbfgs = lambda params: torch.optim.LBFGS(params, lr=0.5, **options)  # noqa: E731
    state = _assert_pruned_as_the_raw_loop(lbfgs, make_batches(8, d_in=4, d_out=2), mse_loss, assert_trees_equal)
    assert all(not m._forward_pre_hooks for m in state.model.modules())  # the call's hooks are gone


class _Twice(nn.Module):
    """One layer applied twice in a forward: the graph saves its weight at the first use (its input needs a gradient)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.first, self.inner, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        _init(self, seed)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(torch.tanh(self.first(x)))))))


class _TiedTwice(_Twice):
    """:class:`_Twice` whose second application is a module of its own, tied to the first (weight and bias)."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.again = nn.Linear(4, 4)
        self.again.weight, self.again.bias = self.inner.weight, self.inner.bias

    def forward(self, x):
        return self.out(torch.tanh(self.again(torch.tanh(self.inner(torch.tanh(self.first(x)))))))


@pytest.mark.parametrize("twice", [_Twice, _TiedTwice])
def test_lbfgs_with_a_tied_weight_or_a_layer_applied_twice_masks_it_once_per_forward(twice, make_batches, mse_loss,
                                                                                      assert_trees_equal):
    # a tensor read twice by one forward is masked before its first use only: masking it again in place between
    # the two would change a tensor the graph saved (autograd refuses); the raw loop recomputes the product
    lbfgs = lambda params: torch.optim.LBFGS(params, lr=0.5, max_iter=4)  # noqa: E731
    data = _token_batches(8)
    ref_model = _RawTiedLM(0)
    expected = _raw_pruned_loop(ref_model, lbfgs(ref_model.parameters()), data, _lm_loss,
                                {"emb.weight": ref_model.emb, "mid.weight": ref_model.mid})
    model = _TiedLM(0)
    state = loopkit.TrainState.create(model, lbfgs(model.parameters()))
    step = loopkit.with_pruning(loopkit.train_step(_lm_loss), AMOUNT, POINTS, parameters=["emb.weight", "mid.weight"])
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    assert_trees_equal({"emb.weight": state.model.emb.weight.detach(), "mid.weight": state.model.mid.weight.detach()},
                       expected)

    data = make_batches(8, d_in=4, d_out=2)
    ref_model = _Twice(0)
    names = ["first.weight", "inner.weight", "out.weight"]
    expected = _raw_pruned_loop(ref_model, lbfgs(ref_model.parameters()), data, mse_loss,
                                {name: ref_model.get_submodule(name[:-7]) for name in names})
    model = twice(0)  # _TiedTwice: two modules hold the tensor; the first one's hook masks it
    state = loopkit.TrainState.create(model, lbfgs(model.parameters()))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS)
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    assert_trees_equal({name: state.model.get_parameter(name).detach() for name in names}, expected)


def test_an_optimizer_without_a_closure_gets_no_forward_hook(make_batches, make_adam_state):
    data = make_batches(3, d_in=4, d_out=2)
    seen = []

    def loss_fn(model, batch):
        seen.append(sum(len(m._forward_pre_hooks) for m in model.modules()))
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    state = make_adam_state(_wide_mlp(0))
    step = loopkit.with_pruning(loopkit.train_step(loss_fn), AMOUNT, [1])
    for batch in data:
        state, _ = step(state, batch)
    assert "pruning/masks" in state.extras and seen == [0, 0, 0]


def _pruned_state(make_batches, step):
    """A state whose two Linear weights (16 x 4, 2 x 16) are pruned, after a first epoch, and the batches to go on with."""
    data = make_batches(4, d_in=4, d_out=2)
    model = _wide_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))
    state, _ = loopkit.run_epochs(step, state, data[:2], epochs=1, progress=False)
    assert state.epoch == 1 and sorted(state.extras["pruning/masks"]) == ["0.weight", "2.weight"]
    return state, data[2:]


@pytest.mark.parametrize("case", ["another model", "mis-shaped masks", "a mask of no parameter"])
def test_masks_that_do_not_fit_the_model_are_refused_before_the_update(case, make_batches, mse_loss, take_snapshot,
                                                                       assert_trees_equal):
    # before, the mask multiplied the gradient in the backward and failed there with torch's bare size mismatch,
    # the donated state used up (state_at_error None)
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1])
    state, data = _pruned_state(make_batches, step)
    masks = state.extras["pruning/masks"]
    if case == "another model":  # a state given a wider model, its masks kept (a fine-tune from a checkpoint)
        wide = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
        bad = state.evolve(model=wide, optimizer=torch.optim.SGD(wide.parameters(), lr=0.05))
        match = r"with_pruning: the mask of parameter '0\.weight' has shape \(16, 4\), but the parameter has shape \(32, 4\)"
    elif case == "mis-shaped masks":
        bad = state.evolve(extras={**state.extras, "pruning/masks": {**masks, "2.weight": masks["2.weight"][:, :8]}})
        match = r"with_pruning: the mask of parameter '2\.weight' has shape \(2, 8\), but the parameter has shape \(2, 16\)"
    else:
        bad = state.evolve(extras={**state.extras, "pruning/masks": {**masks, "4.weight": masks["2.weight"]}})
        match = (r"with_pruning: the model has no parameter '4\.weight', "
                 r"which the masks in state\.extras\['pruning/masks'\] name")
    assert_refused_before_the_update(step, bad, data, match, "drop 'pruning/masks' and 'pruning/sparsity'",
                                     take_snapshot, assert_trees_equal)
    fresh = bad.evolve(extras={k: v for k, v in bad.extras.items() if not k.startswith("pruning/")})
    fresh, _ = loopkit.run_epochs(step, fresh, data, epochs=2, progress=False)  # what the message says to do
    assert fresh.step == bad.step + len(data)


def test_a_float32_checkpoint_restored_into_a_float64_template_prunes_in_float64(make_batches, mse_loss,
                                                                                 assert_trees_equal):
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1])
    _, restored, rest = restored_in_float64(step, _wide_mlp, make_batches(5, d_in=4, d_out=2))

    got = restored()
    assert {m.dtype for m in got.extras["pruning/masks"].values()} == {torch.float32}  # as the checkpoint holds them
    for batch in rest:
        got, _ = step(got, batch)
    assert {m.dtype for m in got.extras["pruning/masks"].values()} == {torch.float64}  # cast once, kept in the state
    # the reference: torch.nn.utils.prune's reparametrisation with the checkpoint's masks, its float64 loop by hand
    ref = restored()
    for name, mask in ref.extras["pruning/masks"].items():
        prune.custom_from_mask(ref.model.get_submodule(name.rsplit(".", 1)[0]), "weight", mask.double())
    for batch in rest:
        ref.optimizer.zero_grad()
        mse_loss(ref.model, batch).backward()
        ref.optimizer.step()
    assert_trees_equal({n: got.model.get_parameter(n).detach() for n in ("0.weight", "2.weight")},
                       {f"{i}.weight": (ref.model[i].weight_orig * ref.model[i].weight_mask).detach() for i in (0, 2)})
    assert_trees_equal(got.model[0].bias.detach(), ref.model[0].bias.detach())


def test_a_compiled_models_own_names_name_the_tensors_to_prune(make_batches, mse_loss):
    """``parameters=`` as the compiled model lists them (``_orig_mod.0.weight``) or as the plain one does: the same."""
    data = make_batches(3, d_in=4, d_out=2)
    pruned = []
    for names in (["_orig_mod.0.weight"], ["0.weight"]):
        model = torch.compile(_wide_mlp(0), backend="eager")
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
        step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1], parameters=names)
        state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
        assert list(state.extras["pruning/masks"]) == ["0.weight"]
        pruned.append(state.model._orig_mod[0].weight.detach().clone())
    assert torch.equal(pruned[0], pruned[1]) and int((pruned[0] == 0).sum()) > 0


@pytest.mark.parametrize("into", ["plain", "compiled"])
def test_an_older_checkpoint_of_a_compiled_model_resumes_with_its_masks(into, make_batches, mse_loss, make_adam_state,
                                                                        assert_trees_equal):
    """Its masks are named as the compiled model names its parameters (``_orig_mod.0.weight``): they were refused
    ('the model has no parameter _orig_mod.0.weight ... drop pruning/masks'), the model's own tensors loading."""
    data = make_batches(8, d_in=4, d_out=2)
    step = loopkit.donate(loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, POINTS))
    uninterrupted = make_adam_state(torch.compile(_wide_mlp(0), backend="eager"))
    for k, batch in enumerate(data, start=1):
        uninterrupted, _ = step(uninterrupted, batch)
        if k == 3:  # pruned once (POINTS): the next points grow the checkpoint's masks
            older = saved_by_an_older_loopkit(uninterrupted, "pruning/masks")
            today = through_a_file(uninterrupted.state_dict())
    assert sorted(older["extras"]["pruning/masks"]) == ["_orig_mod.0.weight", "_orig_mod.2.weight"]

    resumed = {}
    for name, saved in (("older", older), ("today", today)):
        template = _wide_mlp(1) if into == "plain" else torch.compile(_wide_mlp(1), backend="eager")
        state = make_adam_state(template).load_state_dict(saved)
        for batch in data[3:]:
            state, _ = step(state, batch)
        resumed[name] = state
    assert sorted(resumed["older"].extras["pruning/masks"]) == ["0.weight", "2.weight"]
    assert_trees_equal(resumed["older"].state_dict(), resumed["today"].state_dict())  # masks, model, optimizer
    assert_trees_equal(resumed["older"].state_dict(), uninterrupted.state_dict())


def test_older_prefixed_masks_that_do_not_fit_the_model_are_still_refused(make_batches, mse_loss, take_snapshot,
                                                                          assert_trees_equal):
    """Only masks all named ``_orig_mod.<a parameter>`` are taken under the plain names; then checked as any."""
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1])
    state, data = _pruned_state(make_batches, step)
    masks = dict(state.extras["pruning/masks"])
    cases = {
        "a mix of both names": ({"_orig_mod.0.weight": masks["0.weight"], "2.weight": masks["2.weight"]},
                                r"with_pruning: the model has no parameter '_orig_mod\.0\.weight', "
                                r"which the masks in state\.extras\['pruning/masks'\] name"),
        "mis-shaped": (prefixed({**masks, "2.weight": masks["2.weight"][:, :8]}),
                       r"with_pruning: the mask of parameter '2\.weight' has shape \(2, 8\), but the parameter has "
                       r"shape \(2, 16\)"),
        "of no parameter": (prefixed({**masks, "4.weight": masks["2.weight"]}),
                            r"with_pruning: the model has no parameter '4\.weight', which the masks"),
    }
    for bad_masks, match in cases.values():
        bad = state.evolve(extras={**state.extras, "pruning/masks": bad_masks})
        assert_refused_before_the_update(step, bad, data, match, "drop 'pruning/masks' and 'pruning/sparsity'",
                                         take_snapshot, assert_trees_equal)
    fits = state.evolve(extras={**state.extras, "pruning/masks": prefixed(masks)})  # all prefixed, all fit
    assert_trees_equal(step(fits, data[0])[0].state_dict(), step(state, data[0])[0].state_dict())


def _two_networks(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.ModuleDict({"g": nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)),
                           "d": nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))})
    return model, torch.optim.Adam([{"params": model["g"].parameters()}, {"params": model["d"].parameters(), "lr": 0.05}])


def _two_updates(model, opt, x):
    """A GAN's pattern: update d, then a forward through the updated d to update g (one optimizer)."""
    opt.zero_grad(set_to_none=True)
    (model["d"](x) - 1).pow(2).mean().backward(inputs=list(model["d"].parameters()))
    opt.step()
    opt.zero_grad(set_to_none=True)
    model["d"](model["g"](x)).pow(2).mean().backward(inputs=list(model["g"].parameters()))
    opt.step()
    opt.zero_grad(set_to_none=True)


def _two_update_step(state, x):
    """A step of one's own, pure as examples/gan.py's: it copies the state first (fork) and updates the copy twice."""
    state = fork(state)
    _two_updates(state.model, state.optimizer, x)
    return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}


def train_step(state, x):  # a step of one's own under the name most such steps have (not loopkit's train_step)
    return _two_update_step(state, x)


@pytest.mark.parametrize("named", ["_two_update_step", "train_step"])
@pytest.mark.parametrize("donated", [False, True])
def test_a_step_of_ones_own_with_two_updates_sees_pruned_weights_zero_between_them(donated, named, assert_trees_equal):
    """The second update's forward runs through weights the first update moved (Adam's momentum moves pruned
    entries off zero): as in the raw torch.nn.utils.prune loop, it sees them zero. The hooks that do it are
    the call's only: the state returned (the step's own copy) keeps none, call after call."""
    data = [torch.randn(16, 3, generator=torch.Generator().manual_seed(k)) for k in range(8)]
    ref_model, ref_opt = _two_networks()
    names = [f"{net}.{i}.weight" for net in ("g", "d") for i in (0, 2)]
    modules = {name: ref_model.get_submodule(name.removesuffix(".weight")) for name in names}
    expected = _raw_pruned_loop(ref_model, ref_opt, data, None, modules, update=_two_updates)
    step = loopkit.with_pruning(globals()[named], AMOUNT, POINTS)
    step = loopkit.donate(step) if donated else step
    state = loopkit.TrainState.create(*_two_networks())
    for x in data:
        given = state
        state, _ = step(given, x)
        assert all(not p._backward_hooks for p in state.model.parameters())
        assert all(not m._forward_pre_hooks for m in state.model.modules())
        if not donated:
            assert all(not p._backward_hooks for p in given.model.parameters())
    assert_trees_equal({name: state.model.get_parameter(name).detach() for name in names}, expected)


def _prune_once(step: int) -> float:
    return 1.0 if step >= 2 else 0.0


def test_what_and_when_it_prunes_is_agreed_over_the_ranks():
    """A rank pruning more, at other steps or other weights zeroes other weights of its replica: run_epochs compared no
    option of with_pruning. Each is now shared; a schedule function by its name."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    def agreed(**kw):
        return dict(loopkit.with_pruning(base, **{"amount": 0.5, "schedule": [2, 4], **kw}).rank_agreed)

    assert agreed() == {"with_pruning amount": 0.5, "with_pruning schedule": (2, 4), "with_pruning parameters": None,
                        "with_pruning pruning_fn": "l1_unstructured", "with_pruning use_global_unstructured": True,
                        "with_pruning pruning_dim": None, "with_pruning pruning_norm": None}
    assert agreed(schedule=_prune_once)["with_pruning schedule"] == f"{__name__}._prune_once"
    local = {"use_global_unstructured": False}
    kinds = [agreed(), agreed(amount=0.6), agreed(schedule=[2, 5]), agreed(parameters=["weight"]), agreed(amount=5),
             agreed(pruning_fn="random_unstructured"), agreed(**local),
             agreed(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, **local),
             agreed(pruning_fn="ln_structured", pruning_dim=1, pruning_norm=2, **local),
             agreed(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=1, **local),
             agreed(pruning_fn="random_structured", pruning_dim=0, **local)]
    assert all(a != b for i, a in enumerate(kinds) for b in kinds[i + 1:])


# --- Lightning's ModelPruning options: pruning_fn, use_global_unstructured, pruning_dim/norm, an int amount ------

_RAW_FUNCTIONS = {"l1_unstructured": prune.l1_unstructured, "random_unstructured": prune.random_unstructured,
                  "ln_structured": prune.ln_structured, "random_structured": prune.random_structured}
_RANKED = ("l1_unstructured", "ln_structured")  # (the random ones draw, whatever the weights)
_RAW_METHODS = {"l1_unstructured": prune.L1Unstructured, "random_unstructured": prune.RandomUnstructured}
#: (pruning_fn, use_global_unstructured, amount, pruning_dim, pruning_norm): each Lightning option, and an int amount
_OPTIONS = {
    "l1 global int": ("l1_unstructured", True, 40, None, None),
    "random global": ("random_unstructured", True, AMOUNT, None, None),
    "l1 per tensor": ("l1_unstructured", False, AMOUNT, None, None),
    "l1 per tensor int": ("l1_unstructured", False, 20, None, None),
    "random per tensor": ("random_unstructured", False, AMOUNT, None, None),
    "ln rows": ("ln_structured", False, AMOUNT, 0, 2),
    "ln columns int": ("ln_structured", False, 3, 1, 1),
    "ln inf norm": ("ln_structured", False, 0.5, -1, float("inf")),
    "random rows": ("random_structured", False, AMOUNT, 0, None),
    "random columns int": ("random_structured", False, 3, -1, None),
}


def _dropout_mlp(seed: int = 0) -> nn.Sequential:
    """``_wide_mlp`` with a Dropout between its layers (its masks draw from the RNG, before a random pruning's draw);
    its weights are '0.weight' (16 x 4) and '3.weight' (2 x 16)."""
    model = _wide_mlp(seed)
    return nn.Sequential(model[0], model[1], nn.Dropout(0.25), model[2])


def _options_step(loss_fn, name):
    fn, use_global, amount, dim, norm = _OPTIONS[name]
    return loopkit.with_pruning(loopkit.train_step(loss_fn), amount, POINTS, pruning_fn=fn,
                                use_global_unstructured=use_global, pruning_dim=dim, pruning_norm=norm)


def _raw_options_loop(model, opt, data, loss_fn, name, seed):
    """The reference: a raw loop seeding torch's global RNG with ``seed`` (dropout and random pruning draw from it),
    pruning with torch.nn.utils.prune after the updates in POINTS to the cubic ramp's count: globally by
    ``global_unstructured``, or each tensor by its own function (``l1_unstructured``, ``ln_structured``, ...), each
    time by the count still to prune, which torch ranks (or draws) among the units not pruned yet. A float amount
    counts a fraction of the units (entries, or channels along the dim), an int one the units themselves."""
    fn, use_global, amount, dim, norm = _OPTIONS[name]
    modules = [model[0], model[3]]
    units = [m.weight.numel() if dim is None else m.weight.shape[dim] for m in modules]
    extra = {"n": norm, "dim": dim} if fn == "ln_structured" else {"dim": dim} if dim is not None else {}

    def count(k, n):
        target = cubic_sparsity(amount, POINTS, k)
        return round(target) if isinstance(amount, int) else round(target * n)

    torch.manual_seed(seed)
    pruned = [0] * len(modules)
    for k, batch in enumerate(data, start=1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if k not in POINTS:
            continue
        if use_global:
            want = count(k, sum(units))
            current = {(m, "weight"): m.weight_orig * m.weight_mask for m in modules if prune.is_pruned(m)}
            prune.global_unstructured([(m, "weight") for m in modules], pruning_method=_RAW_METHODS[fn],
                                      amount=want - pruned[0], importance_scores=current or None)
            pruned = [want]
            continue
        for i, m in enumerate(modules):
            want = count(k, units[i])
            # rank by the weights as they are now, as above (torch ranks a pruned tensor by its last forward's)
            scores = {"importance_scores": m.weight_orig * m.weight_mask} if prune.is_pruned(m) and fn in _RANKED else {}
            _RAW_FUNCTIONS[fn](m, "weight", amount=want - pruned[i], **extra, **scores)
            pruned[i] = want
    return ({"0.weight": modules[0].weight_mask, "3.weight": modules[1].weight_mask},
            {"0.weight": (modules[0].weight_orig * modules[0].weight_mask).detach(),
             "3.weight": (modules[1].weight_orig * modules[1].weight_mask).detach()})


@pytest.mark.parametrize("name", list(_OPTIONS))
def test_each_lightning_pruning_option_is_bitwise_a_raw_torch_prune_loop(name, make_batches, mse_loss, make_adam_state,
                                                                         assert_trees_equal):
    """Lightning's ModelPruning takes pruning_fn "random_unstructured", "ln_structured" (pruning_dim, pruning_norm),
    "random_structured", use_global_unstructured=False and an int amount: with_pruning took none of them (an int
    amount was refused, 'a fraction in (0, 1)'). Each now makes torch.nn.utils.prune's own masks, bit for bit: the
    random ones drawn from the state's RNG where the raw loop's global RNG stands (after the step's dropout)."""
    data = make_batches(8, d_in=4, d_out=2)
    ref_model = _dropout_mlp(0)
    masks, weights = _raw_options_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, mse_loss,
                                       name, seed=5)
    state = make_adam_state(_dropout_mlp(0), seed=5)
    state, _ = loopkit.run_epochs(_options_step(mse_loss, name), state, data, epochs=1, progress=False)
    assert_trees_equal(dict(state.extras["pruning/masks"]), masks)
    assert_trees_equal({n: state.model.get_parameter(n).detach() for n in weights}, weights)
    assert_trees_equal(state.model[0].bias.detach(), ref_model[0].bias.detach())
    if _OPTIONS[name][3] is not None:  # whole channels: every entry of a pruned one is zero
        dim = _OPTIONS[name][3] % 2
        assert all(bool(((m.sum(dim=1 - dim) == 0) | (m.sum(dim=1 - dim) == m.shape[1 - dim])).all()) for m in masks.values())


@pytest.mark.parametrize("name", ["random global", "random per tensor", "random rows"])
def test_a_state_drawing_from_the_global_rng_prunes_at_random_from_it(name, make_batches, mse_loss, assert_trees_equal):
    data = make_batches(8, d_in=4, d_out=2)
    ref_model = _dropout_mlp(0)
    masks, weights = _raw_options_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=0.01), data, mse_loss,
                                       name, seed=9)
    model = _dropout_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.01), global_rng=True)
    torch.manual_seed(9)
    state, _ = loopkit.run_epochs(_options_step(mse_loss, name), state, data, epochs=1, progress=False)
    assert_trees_equal(dict(state.extras["pruning/masks"]), masks)
    assert_trees_equal({n: state.model.get_parameter(n).detach() for n in weights}, weights)


@pytest.mark.parametrize("name", ["random global", "l1 per tensor int", "ln columns int", "random rows"])
def test_each_option_is_pure_and_resumes_bitwise(name, tmp_path, make_batches, mse_loss, make_adam_state, take_snapshot,
                                                 assert_trees_equal):
    """A checkpoint after the first pruning point resumes to the uninterrupted run's state (masks, weights, RNG)."""
    data = make_batches(8, d_in=4, d_out=2)
    step = loopkit.with_checkpointing(_options_step(mse_loss, name), tmp_path, every_n_steps=3)
    uninterrupted = make_adam_state(_dropout_mlp(0), seed=3)
    for batch in data:
        before = take_snapshot(uninterrupted)
        new, _ = step(uninterrupted, batch)
        assert_trees_equal(take_snapshot(uninterrupted), before)  # pure: the random draw too moves the new state's RNG
        uninterrupted = new
    resumed = loopkit.restore(make_adam_state(_dropout_mlp(1), seed=3), checkpoint.list_checkpoints(tmp_path)[0].path)
    assert resumed.step == 3 and sorted(resumed.extras["pruning/masks"]) == ["0.weight", "3.weight"]
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(take_snapshot(resumed), take_snapshot(uninterrupted))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"amount": 0}, ValueError, r"amount must be a fraction in \(0, 1\), e\.g\. 0\.5, or a count >= 1"),
        ({"amount": 3.0}, ValueError, "amount must be a fraction"),
        ({"amount": True}, ValueError, "amount must be a fraction"),
        ({"pruning_fn": "l2_unstructured"}, ValueError, "pruning_fn must be one of 'l1_unstructured', 'random_unstructured'"),
        ({"pruning_fn": prune.L1Unstructured}, ValueError, "pruning_fn must be one of"),
        ({"use_global_unstructured": "no"}, TypeError, "use_global_unstructured must be True or False"),
        ({"pruning_fn": "ln_structured", "pruning_dim": 0, "pruning_norm": 2}, ValueError,
         "ln_structured prunes each tensor's channels by its own count: pass use_global_unstructured=False"),
        ({"pruning_fn": "random_structured", "use_global_unstructured": False}, ValueError,
         "random_structured needs pruning_dim"),
        ({"pruning_fn": "ln_structured", "pruning_dim": 0, "use_global_unstructured": False}, ValueError,
         "ln_structured needs pruning_norm"),
        ({"pruning_fn": "ln_structured", "pruning_dim": 0.5, "pruning_norm": 2, "use_global_unstructured": False},
         TypeError, "pruning_dim must be an int"),
        ({"pruning_fn": "ln_structured", "pruning_dim": 0, "pruning_norm": "nuc", "use_global_unstructured": False},
         ValueError, "pruning_norm must be a number"),
        ({"pruning_dim": 0}, ValueError, "pruning_dim is for the structured methods, not l1_unstructured"),
        ({"pruning_fn": "random_structured", "pruning_dim": 0, "pruning_norm": 2, "use_global_unstructured": False},
         ValueError, "pruning_norm is for ln_structured, not random_structured"),
        # (an empty list was accepted, and the first prune failed inside torch.cat after the update, the state lost)
        ({"parameters": []}, ValueError, r"parameters is empty, naming no tensor to prune: name some"),
        ({"parameters": "0.weight"}, TypeError, "parameters must be a list of parameter names"),
        ({"parameters": 3}, TypeError, "parameters must be a list of parameter names"),
    ],
)
def test_bad_lightning_options_are_refused_by_name(mse_loss, options, error, match):
    with pytest.raises(error, match=f"with_pruning: {match}"):
        loopkit.with_pruning(loopkit.train_step(mse_loss), **{"amount": 0.5, "schedule": [1], **options})


def test_parameters_given_as_an_iterator_are_taken_whole(mse_loss):
    """(Checking the names used up a generator, which then named nothing.)"""
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), 0.5, [1], parameters=iter(["0.weight", "head.weight"]))
    assert step.parameters == ("0.weight", "head.weight")


@pytest.mark.parametrize("case", ["global count", "per-tensor count", "channel count", "a dim the weight lacks",
                                  "a tensor without channels"])
def test_options_that_do_not_fit_a_tensor_are_refused_before_the_update(case, make_batches, mse_loss, make_sgd_state,
                                                                         take_snapshot, assert_trees_equal):
    """Torch's methods failed only in the pruning, after the update ('amount=... should be smaller than the number
    of parameters to prune', an IndexError): each is now named before the step changes anything."""
    local = {"use_global_unstructured": False}
    rows = {"pruning_fn": "ln_structured", "pruning_norm": 2, **local}
    amount, options, match = {
        "global count": (97, {}, r"amount=97 weights, but the tensors it prunes \(0\.weight, 2\.weight\) hold 96"),
        "per-tensor count": (40, local, r"amount=40 weights of each tensor, but parameter '2\.weight' of shape "
                                        r"\(2, 16\) has 32"),
        "channel count": (3, {**rows, "pruning_dim": 0}, r"amount=3 channels along dim 0 of each tensor, but parameter "
                                                         r"'2\.weight' of shape \(2, 16\) has 2"),
        "a dim the weight lacks": (0.5, {**rows, "pruning_dim": 2}, r"ln_structured prunes channels along pruning_dim=2, "
                                                                    r"which parameter '0\.weight' of shape \(16, 4\) lacks"),
        "a tensor without channels": (0.5, {**rows, "pruning_dim": 0, "parameters": ["0.bias"]},
                                      r"parameter '0\.bias' of shape \(16,\) lacks"),
    }[case]
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), amount, [2], **options)
    data = make_batches(3, d_in=4, d_out=2)
    assert_refused_before_the_update(step, make_sgd_state(_wide_mlp(0)), data, match, "", take_snapshot,
                                     assert_trees_equal)


def test_options_that_do_not_fit_a_pruned_state_are_refused_before_the_next_pruning_update(make_batches, mse_loss,
                                                                                            take_snapshot,
                                                                                            assert_trees_equal):
    """A pruned state (its masks in the state) given a step whose options do not fit its tensors: refused before the
    update that would prune, not after it."""
    state, data = _pruned_state(make_batches, loopkit.with_pruning(loopkit.train_step(mse_loss), AMOUNT, [1]))
    step = loopkit.with_pruning(loopkit.train_step(mse_loss), 0.9, [state.step + 1], pruning_fn="ln_structured",
                                pruning_dim=3, pruning_norm=2, use_global_unstructured=False)
    assert_refused_before_the_update(step, state, data, r"pruning_dim=3, which parameter '0\.weight' of shape \(16, 4\) "
                                     "lacks", "", take_snapshot, assert_trees_equal)


@pytest.mark.parametrize("schedule", [lambda: 1.0, lambda step, total: 1.0], ids=["none", "two"])
def test_a_schedule_function_that_cannot_take_the_step_is_refused_when_the_step_is_built(schedule):
    with pytest.raises(TypeError, match=r"^with_pruning: schedule must take \(step\); .*<lambda>\(.*\) cannot"):
        loopkit.with_pruning(loopkit.train_step(lambda m, b: m(b).sum()), AMOUNT, schedule)
    loopkit.with_pruning(loopkit.train_step(lambda m, b: m(b).sum()), AMOUNT, lambda step, total=10: 1.0)
