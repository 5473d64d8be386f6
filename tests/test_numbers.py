"""Numeric options given as numpy numbers (np.arange's int64, a float32 array's items) work as the Python
numbers they stand for: each option is checked against the same run with Python numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopkit
from loopkit._numbers import as_float32, as_int, as_real
from loopkit.transforms import with_ema, with_grad_accum, with_grad_clip, with_pruning


def test_as_int_and_as_real_keep_python_numbers_and_refuse_bools():
    assert as_int(np.int64(3)) == 3 and type(as_int(np.int64(3))) is int
    assert as_int(np.uint8(7)) == 7
    for no in (True, np.bool_(True), 3.0, np.float32(3), "3", None, torch.tensor(3)):
        assert as_int(no) is None, no
    assert type(as_real(np.float32(0.5))) is float and as_real(np.float32(0.5)) == 0.5
    assert type(as_real(np.int32(2))) is int
    for no in (False, np.bool_(False), 1j, "0.5", None):
        assert as_real(no) is None, no



def test_as_float32_rounds_as_a_float32_tensor_does():
    for value in (0.3, 0.2999999999, 1e39, -1e39, 1e-50, np.float64(0.1), torch.tensor(0.1, dtype=torch.float64), 2):
        expected = torch.tensor(float(value), dtype=torch.float32).item()
        assert type(as_float32(value)) is float and as_float32(value) == expected, value
    assert np.isnan(as_float32(float("nan")))

def _params(state):
    return [p.detach().clone() for p in state.model.parameters()]


def _run(make_step, make_mlp, make_sgd_state, batches, **driver):
    state = make_sgd_state(make_mlp(0))
    state, history = loopkit.run_epochs(make_step(), state, batches, progress=False, **driver)
    return _params(state), state, history


@pytest.mark.parametrize(
    "build",
    [
        lambda s, n: with_grad_accum(s, n(2)),
        lambda s, n: with_grad_clip(s, max_norm=n(0.5, float), max_value=n(0.25, float), norm_type=n(2)),
        lambda s, n: with_ema(s, n(0.5, float)),
        lambda s, n: with_pruning(s, n(0.5, float), schedule=[n(1), n(3)]),
    ],
    ids=["grad_accum", "grad_clip", "ema", "pruning"],
)
def test_transform_options_may_be_numpy_numbers(build, make_mlp, make_sgd_state, mse_loss, batches):
    python = lambda value, kind=int: kind(value)  # noqa: E731
    numpy = lambda value, kind=int: (np.float32 if kind is float else np.int64)(value)  # noqa: E731
    want, _, _ = _run(lambda: build(loopkit.train_step(mse_loss), python), make_mlp, make_sgd_state, batches, epochs=1)
    got, _, _ = _run(lambda: build(loopkit.train_step(mse_loss), numpy), make_mlp, make_sgd_state, batches, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_run_epochs_options_may_be_numpy_numbers(make_mlp, make_sgd_state, mse_loss, batches):
    step = lambda: loopkit.train_step(mse_loss)  # noqa: E731
    val = (loopkit.eval_step(lambda m, b: {"mse": mse_loss(m, b)}), batches)
    options = dict(epochs=2, max_steps=5, val_every_n_epochs=1, val_every_n_steps=2, sanity_val_batches=1,
                   limit_train_batches=3, limit_val_batches=0.5)
    want, _, want_history = _run(step, make_mlp, make_sgd_state, batches, val=val, **options)
    as_numpy = {k: np.float32(v) if isinstance(v, float) else np.int64(v) for k, v in options.items()}
    got, state, history = _run(step, make_mlp, make_sgd_state, batches, val=val, **as_numpy)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert history == want_history and state.step == 5
    assert loopkit.evaluate(val[0], state, batches, limit=np.int64(2)) == loopkit.evaluate(val[0], state, batches, limit=2)
    assert len(loopkit.predict(lambda m, b: m(b[0]), state, batches, limit=np.int64(2))) == 2


def test_early_stopping_options_may_be_numpy_numbers():
    numpy = loopkit.EarlyStopping("val/loss", patience=np.int64(2), min_delta=np.float32(0.5))
    assert (numpy.patience, numpy.min_delta) == (2, 0.5)
    with pytest.raises(ValueError, match=r"patience must be an int >= 0, got np.int64\(-1\)"):
        loopkit.EarlyStopping("val/loss", patience=np.int64(-1))
    assert loopkit.EarlyStopping("val/loss", min_delta=np.float32(-1)).min_delta == -1.0  # (a tolerance, as in Lightning)
    with pytest.raises(ValueError, match="min_delta must be a finite number"):
        loopkit.EarlyStopping("val/loss", min_delta=np.float64("nan"))


def test_distributed_options_may_be_numpy_numbers():
    import datetime

    from loopkit import distributed
    from loopkit.distributed import _check_timeout

    data = list(range(10))
    shards = distributed.shard(data, np.int64(3), batch_size=np.int64(4))
    assert [len(b) for b in shards] == [len(b) for b in distributed.shard(data, 3, batch_size=4)]
    pairs = zip(distributed.shard(data, np.int64(3), batch_size=4), distributed.shard(data, 3, batch_size=4))
    assert all(torch.equal(a, b) for a, b in pairs)
    _check_timeout(np.int64(30))
    _check_timeout(datetime.timedelta(seconds=30))
    with pytest.raises(TypeError, match="timeout must be seconds or a timedelta"):
        _check_timeout("30")
