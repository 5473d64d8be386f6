"""with_grad_clip: bitwise torch.nn.utils clipping in a raw loop; its place relative to accumulation."""

from __future__ import annotations

import pytest
import torch

import loopkit
from tests.conftest import assert_grad_norms_and_params

MAX_NORM = 0.3  # the tiny MLP's gradients have norms around 1-2: clipping is active
MAX_VALUE = 0.05


def _raw_clipped_loop(model, data, loss_fn, clip):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    norms = []
    for batch in data:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        norms.append(clip(list(model.parameters())))
        opt.step()
    return opt, norms


def _clip_norm(params):
    return torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


def _clip_value(params):
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grad_value_(params, MAX_VALUE)
    return norm


def _clip_both(params):
    norm = _clip_value(params)
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    return norm


def _clip_nothing(params):
    """The bare ``with_grad_clip(step)`` (the SPEC's defaults; Lightning's gradient_clip_val=None): the norm only."""
    return torch.nn.utils.get_total_norm([p.grad for p in params])


@pytest.mark.parametrize(
    "options, clip",
    [
        ({"max_norm": MAX_NORM}, _clip_norm), ({"max_value": MAX_VALUE}, _clip_value),
        ({"max_norm": MAX_NORM, "max_value": MAX_VALUE}, _clip_both), ({}, _clip_nothing),
    ],
    ids=["max_norm", "max_value", "both", "neither"],
)
def test_clipping_is_bitwise_torch_nn_utils_in_a_raw_loop(options, clip, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(4)
    ref_model = make_mlp(0)
    ref_opt, ref_norms = _raw_clipped_loop(ref_model, data, mse_loss, clip)
    assert all(n > MAX_NORM for n in ref_norms)  # every update was clipped

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_grad_clip(loopkit.train_step(mse_loss), **options)
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())
    assert_trees_equal(norms, ref_norms)  # grad_norm is the norm before clipping


def test_clipping_changes_the_result(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(2)
    plain, clipped = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    for batch in data:
        plain, _ = loopkit.train_step(mse_loss)(plain, batch)
        clipped, _ = loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=MAX_NORM)(clipped, batch)
    assert not torch.equal(plain.model[0].weight, clipped.model[0].weight)


# --- order relative to gradient accumulation -------------------------------------------------------


def _raw_clip_per_update(model, data, loss_fn, every):
    """Accumulate (loss / every) over the group, clip the summed gradient once, step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    norms = []
    for start in range(0, len(data), every):
        for batch in data[start : start + every]:
            (loss_fn(model, batch) / every).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
        opt.step()
        opt.zero_grad()
    return norms


def _raw_clip_per_micro_batch(model, data, loss_fn, every):
    """Clip each micro-batch's own gradient, then update with the group's mean of the clipped gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    norms = []
    for start in range(0, len(data), every):
        total = None
        for batch in data[start : start + every]:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
            share = [p.grad / every for p in params]
            total = share if total is None else [t + s for t, s in zip(total, share)]
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
        opt.zero_grad()
    return norms


def test_clip_outside_accumulation_clips_the_summed_gradient_once(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(6)
    ref_model = make_mlp(0)
    ref_norms = _raw_clip_per_update(ref_model, data, mse_loss, every=2)

    step = loopkit.with_grad_clip(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), max_norm=MAX_NORM)
    assert step.applied == ("train_step", "with_grad_accum", "with_grad_clip")
    state = make_sgd_state(make_mlp(0))
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        if "grad_norm" in metrics:
            norms.append(metrics["grad_norm"])
    assert len(norms) == 3  # reported once per update
    assert_trees_equal(norms, ref_norms)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def test_clip_inside_accumulation_clips_each_micro_batch(make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal):
    data = make_batches(6)
    ref_model = make_mlp(0)
    ref_norms = _raw_clip_per_micro_batch(ref_model, data, mse_loss, every=2)

    step = loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=MAX_NORM), every=2)
    assert step.applied == ("train_step", "with_grad_clip", "with_grad_accum")
    state = make_sgd_state(make_mlp(0))
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])  # reported on every call: each micro-batch's own norm
    assert_trees_equal(norms, ref_norms)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def test_a_value_clip_per_micro_batch_and_a_norm_clip_per_update_are_both_applied_and_reported(
    make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """Across with_grad_accum the two clips act at two places (one with_grad_clip cannot): each micro-batch's
    gradient is clamped, the group's sum is clipped by norm. Each reports its own grad_norm: the inner one's on the
    micro-batch that makes no update, the outer one's on the call that updates."""
    data = make_batches(4)
    ref_model = make_mlp(0)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    params = list(ref_model.parameters())
    ref_norms = []
    for start in range(0, len(data), 2):
        total = None
        for i, batch in enumerate(data[start : start + 2]):
            opt.zero_grad()
            mse_loss(ref_model, batch).backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grad_value_(params, 0.01)
            if i == 0:
                ref_norms.append(norm)
            share = [p.grad / 2 for p in params]
            total = share if total is None else [t + s for t, s in zip(total, share)]
        for p, g in zip(params, total):
            p.grad = g
        ref_norms.append(torch.nn.utils.clip_grad_norm_(params, MAX_NORM))
        opt.step()

    inner = loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_value=0.01), every=2)
    step = loopkit.with_grad_clip(inner, max_norm=MAX_NORM)
    assert_grad_norms_and_params(step, make_sgd_state(make_mlp(0)), data, ref_norms, ref_model)


def test_the_two_orders_differ(make_mlp, make_batches, mse_loss, make_sgd_state):
    data = make_batches(4)
    outside = loopkit.with_grad_clip(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2), max_norm=MAX_NORM)
    inside = loopkit.with_grad_accum(loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=MAX_NORM), every=2)
    a, b = make_sgd_state(make_mlp(0)), make_sgd_state(make_mlp(0))
    for batch in data:
        a, _ = outside(a, batch)
        b, _ = inside(b, batch)
    assert a.step == b.step == 2
    assert not torch.equal(a.model[0].weight, b.model[0].weight)


def test_clip_inside_accumulation_does_not_depend_on_every(make_mlp, make_batches, mse_loss, make_sgd_state):
    """A micro-batch's clipped gradient and its grad_norm are the same whatever the group size."""
    batch = make_batches(1)[0]
    alone = loopkit.with_grad_clip(loopkit.train_step(mse_loss), max_norm=MAX_NORM)
    _, metrics_alone = alone(make_sgd_state(make_mlp(0)), batch)
    for every in (2, 3):
        _, metrics = loopkit.with_grad_accum(alone, every=every)(make_sgd_state(make_mlp(0)), batch)
        assert torch.equal(metrics["grad_norm"], metrics_alone["grad_norm"])


# --- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"max_norm": -1.0}, "max_norm must be a positive number, got -1.0"),
        ({"max_norm": 0}, "max_norm must be a positive number, got 0"),
        ({"max_value": -0.5}, "max_value must be a positive number, got -0.5"),
        ({"max_norm": "1"}, "max_norm must be a positive number, got '1'"),
        ({"max_norm": 1.0, "norm_type": -2}, "norm_type must be a positive number or 'inf', got -2"),
        ({"max_norm": 1.0, "norm_type": "two"}, "norm_type must be a positive number or 'inf', got 'two'"),
    ],
    ids=["negative-norm", "zero-norm", "negative-value", "string-norm", "bad-norm-type", "string-norm-type"],
)
def test_bad_options_are_refused_naming_the_option(options, fragment, mse_loss):
    with pytest.raises(ValueError) as info:
        loopkit.with_grad_clip(loopkit.train_step(mse_loss), **options)
    assert str(info.value).startswith("with_grad_clip: ") and fragment in str(info.value)


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"max_value": 0.1}])
def test_sparse_gradients_are_refused_by_name(options):
    """torch's clip_grad_norm_/clip_grad_value_ take no sparse gradient; the error names the parameter."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(10, 3, sparse=True)
    state = loopkit.TrainState.create(model, torch.optim.SparseAdam(model.parameters(), lr=0.1))
    step = loopkit.with_grad_clip(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), **options)
    with pytest.raises(TypeError, match="with_grad_clip: parameter 'weight' has a sparse gradient"):
        step(state, torch.tensor([[1, 2]]))


class _Complex(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1 + 2j, -3 + 0.5j]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).abs().pow(2).sum(-1)


def test_a_complex_gradient_is_clipped_by_norm_as_torch_clips_it_and_refused_by_value_naming_it():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    loss_fn = lambda m, b: m(b).mean()  # noqa: E731
    ref = _Complex()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_fn(ref, x).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()
    model = _Complex()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    new, _ = loopkit.with_grad_clip(loopkit.train_step(loss_fn), max_norm=0.5)(state, x)
    assert torch.equal(new.model.w, ref.w)
    # clip_grad_value_ clamps real numbers only: the error names the parameter and the option
    with pytest.raises(TypeError, match="with_grad_clip: parameter 'w' has a complex gradient.*max_value"):
        loopkit.with_grad_clip(loopkit.train_step(loss_fn), max_value=0.1)(state, x)


class _Embedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 3, sparse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x).sum(-1)


def _refused_case(kind: str) -> tuple[loopkit.TrainState, dict, list]:
    """A state, clip options and batches whose gradient the clip refuses after the backward."""
    if kind == "complex":
        model: torch.nn.Module = _Complex()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        return loopkit.TrainState.create(model, optimizer), {"max_value": 0.1}, [torch.ones(3, 2)] * 2
    model = _Embedding()
    optimizer = torch.optim.SparseAdam(model.parameters(), lr=0.1)
    options = {"max_norm": 1.0} if kind == "sparse-norm" else {"max_value": 0.1}
    return loopkit.TrainState.create(model, optimizer), options, [torch.tensor([[1, 2]])] * 2


@pytest.mark.parametrize("kind", ["sparse-norm", "sparse-value", "complex"])
def test_a_refused_gradient_leaves_the_state_whole_as_before_the_call(kind, take_snapshot, assert_trees_equal):
    """The refusal comes after the backward: the parameters get their gradients (none) back, so run_epochs' state at
    the error is the state it was given, bitwise."""
    state, options, data = _refused_case(kind)
    before = take_snapshot(state)
    step = loopkit.with_grad_clip(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), **options)
    with pytest.raises(TypeError, match="with_grad_clip: parameter ") as info:
        loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    whole = loopkit.state_at_error(info.value)
    assert whole is not None
    assert all(p.grad is None for p in whole.model.parameters())
    assert_trees_equal(take_snapshot(whole), before)


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
        return self.a(x) if head == "a" else self.b(x)


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"max_value": 0.1}, {}], ids=["max_norm", "max_value", "neither"])
def test_grad_norm_is_reported_as_torch_s_zero_when_no_parameter_of_the_optimizer_got_a_gradient(options):
    """A batch routed to a head the optimizer does not train: torch's clip_grad_norm_ of no gradients is 0.0; the
    metric set stays the same from call to call."""
    model = _TwoHeads()
    optimizer = torch.optim.SGD(model.b.parameters(), lr=0.1)
    step = loopkit.with_grad_clip(loopkit.train_step(lambda m, b: m(b[0], b[1]).pow(2).mean()), **options)
    state = loopkit.TrainState.create(model, optimizer)
    state, trained = step(state, (torch.ones(3, 4), "b"))
    _, untrained = step(state, (torch.ones(3, 4), "a"))
    reference = torch.nn.utils.clip_grad_norm_([p for p in model.b.parameters() if p.grad is not None], 1.0)
    assert sorted(untrained) == sorted(trained) == ["grad_norm", "loss"]
    norm = untrained["grad_norm"]
    assert (norm.shape, norm.dtype, norm.device) == (reference.shape, reference.dtype, reference.device)
    assert torch.equal(norm, reference)


@pytest.mark.parametrize("kind", ["sparse-norm", "sparse-value", "complex"])
def test_a_refused_gradient_outside_accumulation_is_refused_at_the_group_s_first_call_leaving_the_state_whole(
    kind, take_snapshot, assert_trees_equal
):
    """Clipping outside with_grad_accum acts at a group's last call, when the gradients of the group's earlier calls
    are summed in the parameters' own: a refusal then could not give them back. The kind of gradient is known at the
    group's first call, which refuses it, so run_epochs' state at the error is the state it was given."""
    state, options, data = _refused_case(kind)
    before = take_snapshot(state)
    step = loopkit.with_grad_clip(
        loopkit.with_grad_accum(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), every=2), **options
    )
    with pytest.raises(TypeError, match="with_grad_clip: parameter ") as info:
        loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    whole = loopkit.state_at_error(info.value)
    assert whole is not None and whole.batch_index == 0 and "accum/count" not in whole.extras
    assert all(p.grad is None for p in whole.model.parameters())
    assert_trees_equal(take_snapshot(whole), before)


class _EmbeddingHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4, sparse=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x)).pow(2).mean()


def _densify(state):
    for p in state.model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


@pytest.mark.parametrize("case", ["embedding not trained", "hook inside accumulation", "hook before the clip"])
def test_the_early_refusal_judges_only_what_the_clip_will_see(case, assert_trees_equal):
    """The group's-first-call refusal looks at the gradients the clipping will take: the optimizer's (a sparse one of
    a parameter it does not train is no matter), and none when a transform acts on them first (a hook that makes a
    sparse gradient dense, as the error advises). Each trains as the raw loop that clips the dense sum, every 2."""
    loss_fn = lambda m, b: m(b)  # noqa: E731
    reference = _EmbeddingHead()
    trained = reference.head.parameters() if case == "embedding not trained" else reference.parameters()
    optimizer = torch.optim.SGD(trained, lr=0.1)
    batches = [torch.tensor([1, 2, 3]), torch.tensor([2, 5, 7])] * 2
    for i, batch in enumerate(batches):
        (loss_fn(reference, batch) / 2).backward()
        if i % 2 == 1:
            if case != "embedding not trained":
                reference.emb.weight.grad = reference.emb.weight.grad.to_dense()
            torch.nn.utils.clip_grad_norm_(list(optimizer.param_groups[0]["params"]), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    base = loopkit.train_step(loss_fn)
    if case == "hook inside accumulation":
        step = loopkit.with_grad_clip(loopkit.with_grad_accum(loopkit.with_grad_hook(base, _densify), every=2), max_norm=1.0)
    elif case == "hook before the clip":
        step = loopkit.with_grad_clip(loopkit.with_grad_hook(loopkit.with_grad_accum(base, every=2), _densify), max_norm=1.0)
    else:
        step = loopkit.with_grad_clip(loopkit.with_grad_accum(base, every=2), max_norm=1.0)
    model = _EmbeddingHead()
    params = model.head.parameters() if case == "embedding not trained" else model.parameters()
    state = loopkit.TrainState.create(model, torch.optim.SGD(params, lr=0.1))
    for batch in batches:
        state, _ = step(state, batch)
    assert state.step == 2
    assert torch.allclose(state.model.head.weight, reference.head.weight, rtol=1e-6, atol=1e-7)
    assert torch.allclose(state.model.emb.weight, reference.emb.weight, rtol=1e-6, atol=1e-7)


# --- other norm types ------------------------------------------------------------------------------


def _clip_of_norm_type(options: dict, norm_type: float):
    """The raw loop's clipping for ``options`` (as the bitwise test's references) in the ``norm_type``-norm."""
    def clip(params):
        if "max_value" not in options and "max_norm" in options:
            return torch.nn.utils.clip_grad_norm_(params, options["max_norm"], norm_type=norm_type)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
        if "max_value" in options:
            torch.nn.utils.clip_grad_value_(params, options["max_value"])
        if "max_norm" in options:
            torch.nn.utils.clip_grad_norm_(params, options["max_norm"], norm_type=norm_type)
        return norm
    return clip


@pytest.mark.parametrize("norm_type", [float("inf"), "inf", 1.0], ids=["inf", "inf-string", "1"])
@pytest.mark.parametrize(
    "options",
    [{"max_norm": MAX_NORM}, {"max_value": MAX_VALUE}, {"max_norm": MAX_NORM, "max_value": MAX_VALUE}, {}],
    ids=["max_norm", "max_value", "both", "neither"],
)
def test_a_norm_type_other_than_2_clips_and_reports_as_torch_nn_utils_in_a_raw_loop(
    options, norm_type, make_mlp, make_batches, mse_loss, make_sgd_state, assert_trees_equal
):
    """``norm_type`` reaches torch's clipping and the reported ``grad_norm`` on every branch, not only under
    ``with_fsdp``. Reference: the raw loop with ``torch.nn.utils`` given the same ``norm_type``; the 2-norm differs."""
    data = make_batches(4)
    ref_model = make_mlp(0)
    ref_opt, ref_norms = _raw_clipped_loop(ref_model, data, mse_loss, _clip_of_norm_type(options, float(norm_type)))
    _, two_norms = _raw_clipped_loop(make_mlp(0), data, mse_loss, _clip_of_norm_type(options, 2.0))
    if options == {"max_norm": MAX_NORM}:
        assert all(n > MAX_NORM for n in ref_norms)  # clipping by norm is active in this norm too
    assert all(not torch.equal(a, b) for a, b in zip(ref_norms, two_norms))

    state = make_sgd_state(make_mlp(0))
    step = loopkit.with_grad_clip(loopkit.train_step(mse_loss), norm_type=norm_type, **options)
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])
    assert_trees_equal(norms, ref_norms)
    assert_trees_equal(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))
    assert_trees_equal(state.optimizer.state_dict(), ref_opt.state_dict())


def test_clip_options_are_agreed_over_the_ranks():
    """Under with_fsdp the sharded clip all-reduces the norm (norm_type picks sum or max; max_value with max_norm adds
    a second), and a rank clipping otherwise updates by other gradients: run_epochs compared none of them, and a rank
    given max_value alone aborted in gloo. Each is now among the options the ranks must share."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    agreed = lambda **kw: dict(loopkit.with_grad_clip(base, **kw).rank_agreed)  # noqa: E731
    assert agreed(max_norm=1.0) == {"with_grad_clip max_norm": 1.0, "with_grad_clip max_value": None,
                                    "with_grad_clip norm_type": 2.0}
    assert agreed(max_norm=1, norm_type=2) == agreed(max_norm=1.0)  # (as torch takes them)
    kinds = [agreed(max_norm=1.0), agreed(max_norm=0.5), agreed(max_norm=1.0, max_value=0.1),
             agreed(max_norm=1.0, norm_type=float("inf")), agreed()]
    assert all(a != b for i, a in enumerate(kinds) for b in kinds[i + 1:])
