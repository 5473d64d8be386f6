"""Shared tiny fixtures: small models, synthetic data, a loss, and state snapshots.

Kept small and generic so that any test file can use them. Each helper is a plain function
and is also exposed as a fixture of the same purpose (fixtures are the way to use them:
``def test_x(make_mlp, make_batches): ...``), so a test never has to import this module.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

import loopkit

D_IN, HIDDEN, D_OUT = 4, 8, 2


# --- models and data ---------------------------------------------------------------------------


def tiny_mlp(seed: int = 0, d_in: int = D_IN, hidden: int = HIDDEN, d_out: int = D_OUT) -> nn.Sequential:
    """``Linear -> Tanh -> Linear``, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def bn_dropout_net(seed: int = 0, d_in: int = D_IN, hidden: int = HIDDEN, d_out: int = D_OUT, p: float = 0.5) -> nn.Sequential:
    """``Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear``: buffers and randomness in one model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, d_out)
        )


def synthetic_batches(
    n: int, batch_size: int = 8, d_in: int = D_IN, d_out: int = D_OUT, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` regression batches ``(x, y)`` from a fixed generator (the global RNG is not used)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [
        (torch.randn(batch_size, d_in, generator=gen), torch.randn(batch_size, d_out, generator=gen))
        for _ in range(n)
    ]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``model(x)`` against ``y`` (computed in float32 under autocast too)."""
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def assert_grad_norms_and_params(step: Any, state: loopkit.TrainState, data: list[Any], ref_norms: list[torch.Tensor],
                                 ref_model: nn.Module) -> None:
    """``step`` over ``data`` from ``state`` reports ``grad_norm`` on every call equal to ``ref_norms`` and ends with
    ``ref_model``'s parameters, bit for bit (a raw loop's)."""
    norms = []
    for batch in data:
        state, metrics = step(state, batch)
        norms.append(metrics["grad_norm"])
    assert_equal_trees(norms, ref_norms)
    assert_equal_trees(dict(state.model.named_parameters()), dict(ref_model.named_parameters()))


def assert_params_close(params: dict[str, torch.Tensor], model: nn.Module, tol: float = 1e-6) -> None:
    """A rank's parameters (by name) within ``tol`` (max abs) of the reference ``model``'s."""
    for name, p in model.named_parameters():
        diff = (params[name] - p.detach()).abs().max().item()
        assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"


def assert_ranks_identical(results: list[dict[str, Any]]) -> None:
    """Two ranks' ``params`` bitwise equal."""
    a, b = results[0]["params"], results[1]["params"]
    for name in a:
        assert torch.equal(a[name], b[name]), f"ranks differ at {name}"


def loss_with_mae(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error, with the mean absolute error as an aux metric ``mae``."""
    x, y = batch
    err = model(x) - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def mse_metric(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``eval_step`` metric_fn: ``{"mse": ...}``."""
    x, y = batch
    return {"mse": ((model(x) - y) ** 2).mean()}


def sgd_state(model: nn.Module, seed: int = 0, *, lr: float = 0.1, momentum: float = 0.9) -> loopkit.TrainState:
    """A state with SGD (momentum) over ``model``."""
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), seed=seed)


def adam_state(model: nn.Module, seed: int = 0, *, lr: float = 0.01, scheduler: bool = False) -> loopkit.TrainState:
    """A state with Adam over ``model``, optionally with a per-step ``StepLR(step_size=1, gamma=0.9)``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9) if scheduler else None
    return loopkit.TrainState.create(model, opt, sched, seed=seed)


# --- comparing states --------------------------------------------------------------------------


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def snapshot(state: loopkit.TrainState) -> dict[str, Any]:
    """A deep copy of everything the caller can observe in ``state``.

    Parameters, gradients, buffers (BatchNorm running stats and ``num_batches_tracked``),
    optimizer state and hyper-parameters, scheduler state, counters, RNG, extras, and each
    module's training flag.
    """
    model = state.model
    snap: dict[str, Any] = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "counters": (state.step, state.epoch, state.batch_index, state.seed),
        "rng": {k: v.clone() for k, v in state.rng.items()},
        "extras": _copy(dict(state.extras)),
    }
    if state.optimizer is not None:
        snap["optimizer"] = _copy(state.optimizer.state_dict())
    if state.scheduler is not None:
        sched = {k: v for k, v in state.scheduler.__dict__.items() if k in ("last_epoch", "_step_count", "_last_lr", "base_lrs")}
        snap["scheduler"] = _copy(sched)
    return snap


def assert_equal_trees(a: Any, b: Any, path: str = "") -> None:
    """Assert two nested structures are equal, tensors bitwise (same dtype, shape and values; NaN == NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(
            torch.nan_to_num(a), torch.nan_to_num(b))), f"{path}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{path}: {type(a)} vs {type(b)}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_equal_trees(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Run torch ops on one thread during the tests, then put the setting back.

    The tests use tiny tensors, which gain nothing from intra-op threads; on a busy 2-core
    machine the idle OpenMP threads' spinning makes each op 10-100x slower instead.
    Results are unaffected: ops this small never split their work across threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def through_a_file(tree: Any) -> Any:
    """``tree`` saved with ``torch.save`` and loaded back (``weights_only``): fresh tensors, as a checkpoint gives."""
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def prefixed(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` named as a ``torch.compile``'d model names its own (``_orig_mod.<name>``)."""
    return {f"_orig_mod.{name}": t for name, t in tensors.items()}


def saved_by_an_older_loopkit(state: loopkit.TrainState, extras_key: str) -> dict[str, Any]:
    """``state``'s state dict (through a file) as loopkit saved a compiled model's before naming its tensors after
    the plain model: the model's, the gradients' and ``extras[extras_key]``'s names carry ``_orig_mod.``."""
    sd = state.state_dict()
    extras = {**sd["extras"], extras_key: prefixed(sd["extras"][extras_key])}
    return through_a_file({**sd, "model": prefixed(sd["model"]), "grads": prefixed(sd["grads"]), "extras": extras})


def restored_in_float64(step: Any, make_model: Any, data: list[Any], trained: int = 2) -> tuple[Any, Any, list[Any]]:
    """``step`` (with Adam) over ``data[:trained]`` from ``make_model(0)``, saved through a file: ``(saved,
    restore, rest)``, where ``restore()`` loads it into a float64 template (``make_model(1).double()``) and
    ``rest`` is the other batches in float64 (a float32 checkpoint resumed in float64)."""
    state = adam_state(make_model(0))
    for batch in data[:trained]:
        state, _ = step(state, batch)
    saved = through_a_file(state.state_dict())
    rest = [(x.double(), y.double()) for x, y in data[trained:]]
    return saved, lambda: adam_state(make_model(1).double()).load_state_dict(saved), rest


def assert_refused_before_the_update(step: Any, bad: Any, data: list[Any], match: str, fix: str,
                                     take_snapshot: Any, assert_trees_equal: Any) -> None:
    """``step`` refuses ``bad`` (a ValueError matching ``match``, then ``fix``, what to do) on its own and under
    ``run_epochs``, before any update: ``state_at_error`` gives ``bad`` back, unchanged and usable."""
    before = take_snapshot(bad)
    with pytest.raises(ValueError, match=match + ".*" + fix):
        step(bad, data[0])
    with pytest.raises(ValueError, match=match) as info:
        loopkit.run_epochs(step, bad, data, epochs=2, progress=False)
    assert loopkit.state_at_error(info.value) is bad  # not one update: the donated state is intact, and usable
    assert_trees_equal(take_snapshot(bad), before)


@pytest.fixture
def round_trip():
    """``round_trip(tree)``: the tree through ``torch.save``/``torch.load`` in memory (see :func:`through_a_file`)."""
    return through_a_file


@pytest.fixture
def make_mlp():
    """Factory ``make_mlp(seed=0, d_in=4, hidden=8, d_out=2)`` of a tiny ``Linear-Tanh-Linear`` model."""
    return tiny_mlp


@pytest.fixture
def make_bn_dropout():
    """Factory ``make_bn_dropout(seed=0, ...)`` of a model with BatchNorm1d and Dropout."""
    return bn_dropout_net


@pytest.fixture
def make_batches():
    """Factory ``make_batches(n, batch_size=8, d_in=4, d_out=2, seed=0)`` of ``(x, y)`` batches."""
    return synthetic_batches


@pytest.fixture
def batches():
    """Six regression batches of 8 samples, 4 features in, 2 out."""
    return synthetic_batches(6)


@pytest.fixture
def mse_loss():
    """The ``loss_fn(model, batch)`` used throughout: mean squared error, in float32."""
    return mse


@pytest.fixture
def take_snapshot():
    """``take_snapshot(state)``: a deep copy of everything observable in a state."""
    return snapshot


@pytest.fixture
def assert_trees_equal():
    """``assert_trees_equal(a, b)``: nested structures equal, tensors bitwise."""
    return assert_equal_trees


@pytest.fixture
def make_sgd_state():
    """``make_sgd_state(model, seed=0, lr=0.1, momentum=0.9)``: a state with SGD over ``model``."""
    return sgd_state


@pytest.fixture
def make_adam_state():
    """``make_adam_state(model, seed=0, lr=0.01, scheduler=False)``: a state with Adam (and a per-step StepLR)."""
    return adam_state


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts tensor -> Python conversions (``.item()``, ``float()``, ...) while the test runs."""
    from tests._driver_helpers import CONVERSIONS

    counts = {"n": 0}
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow SQLite store, made once: creating one runs MLflow's schema migrations (seconds)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_dir(_mlflow_template):
    """``mlflow_dir(path)``: ``path`` made a fresh, empty MLflow store (``path/mlflow.db``, copied from a template
    made once a session) and returned: the ``save_dir`` of an ``MLFlowLogger`` that starts at once."""

    def fresh(path):
        os.makedirs(path, exist_ok=True)
        shutil.copyfile(_mlflow_template, os.path.join(path, "mlflow.db"))
        return path

    return fresh
