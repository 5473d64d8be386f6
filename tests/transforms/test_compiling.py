"""with_compile: torch.compile'd steps equal the eager ones, compile once, and stay pure."""

from __future__ import annotations

import pytest
import torch

import loopkit


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return graph_module.forward


def _run(step, state, data):
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_step_equals_the_eager_one(make_mlp, make_batches, mse_loss, make_adam_state):
    data = make_batches(5)
    eager, eager_losses = _run(loopkit.train_step(mse_loss), make_adam_state(make_mlp(0)), data)
    compiled_step = loopkit.with_compile(loopkit.train_step(mse_loss), backend="aot_eager")
    compiled, compiled_losses = _run(compiled_step, make_adam_state(make_mlp(0)), data)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(compiled.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_pure_calls_on_copies_of_the_model_compile_once(make_bn_dropout, batches, mse_loss, make_adam_state,
                                                         take_snapshot, assert_trees_equal):
    backend = CountingBackend()
    step = loopkit.with_compile(loopkit.train_step(mse_loss), backend=backend)
    state = make_adam_state(make_bn_dropout(0))
    before = take_snapshot(state)
    first, _ = step(state, batches[0])
    second, _ = step(state, batches[0])  # the same state again: a fresh copy of the model each call
    assert_trees_equal(take_snapshot(state), before)
    assert_trees_equal(take_snapshot(first), take_snapshot(second))  # dropout drew from the state's RNG both times
    for batch in batches[1:]:
        first, _ = step(first, batch)
    assert backend.compiles == 1


def test_a_compiled_eval_step_gives_the_same_means(make_mlp, batches, mse_loss, make_sgd_state):
    def metrics(model, batch):
        return {"mse": mse_loss(model, batch)}

    state = make_sgd_state(make_mlp(0))
    backend = CountingBackend()
    compiled = loopkit.evaluate(loopkit.with_compile(loopkit.eval_step(metrics), backend=backend), state, batches)
    assert compiled == pytest.approx(loopkit.evaluate(loopkit.eval_step(metrics), state, batches), rel=1e-6)
    assert backend.compiles == 1


def test_it_composes_with_the_gradient_transforms(make_mlp, make_batches, mse_loss, make_adam_state):
    def build(compiled: bool):
        step = loopkit.train_step(mse_loss)
        if compiled:
            step = loopkit.with_compile(step, backend="aot_eager")
        step = loopkit.with_amp(step, dtype=torch.bfloat16)
        return loopkit.with_grad_clip(loopkit.with_grad_accum(step, every=2), max_norm=0.3)

    data = make_batches(6)
    eager, _ = _run(build(False), make_adam_state(make_mlp(0)), data)
    compiled, _ = _run(build(True), make_adam_state(make_mlp(0)), data)
    assert compiled.step == eager.step == 3
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bad_uses_are_refused_when_built(tmp_path, mse_loss):
    base = loopkit.train_step(mse_loss)
    with pytest.raises(TypeError, match="bogus"):
        loopkit.with_compile(base, bogus=1)
    with pytest.raises(TypeError, match="with_compile cannot wrap with_compile"):
        loopkit.with_compile(loopkit.with_compile(base, backend="eager"), backend="eager")
    with pytest.raises(TypeError, match="with_compile cannot wrap with_logging"):
        loopkit.with_compile(loopkit.with_logging(base, loopkit.CSVLogger(tmp_path)), backend="eager")
    with pytest.raises(TypeError, match="with_compile needs a loopkit train_step"):
        loopkit.with_compile(lambda state, batch: (state, {}), backend="eager")
    with pytest.raises(TypeError, match="donate"):
        loopkit.with_compile(loopkit.donate(base), backend="eager")


@pytest.mark.slow
def test_the_default_inductor_backend_trains_like_eager(make_mlp, make_batches, mse_loss, make_adam_state):
    data = make_batches(3)
    eager, eager_losses = _run(loopkit.train_step(mse_loss), make_adam_state(make_mlp(0)), data)
    compiled, compiled_losses = _run(loopkit.with_compile(loopkit.train_step(mse_loss)), make_adam_state(make_mlp(0)), data)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
