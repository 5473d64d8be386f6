"""with_grad_norm against Lightning's grad_norm written out: each parameter's p.grad.norm(p) in a raw loop, the
total as Lightning computes it (torch.tensor of the norms, then its norm), before clipping as its hook runs."""

from __future__ import annotations

import pytest
import torch

import loopkit


def _lightning_grad_norm(model, norm_type):
    """lightning.pytorch.utilities.grad_norm(model, norm_type), as it reads in Lightning 2.6."""
    norms = {f"grad_{float(norm_type)}_norm/{n}": p.grad.data.norm(norm_type)
             for n, p in model.named_parameters() if p.grad is not None}
    if norms:
        norms[f"grad_{float(norm_type)}_norm_total"] = torch.tensor(list(norms.values())).norm(norm_type)
    return norms


def _assert_same(metrics, reference):
    assert {k for k in metrics if k.startswith("grad_") and k != "grad_norm"} == set(reference)
    for k, v in reference.items():
        assert torch.equal(metrics[k], v), k


@pytest.mark.parametrize("norm_type", [2.0, 1, "inf"])
def test_the_norms_are_lightnings_before_clipping_in_a_raw_loop(norm_type, make_mlp, make_batches, mse_loss):
    data = make_batches(4)
    p = float("inf") if norm_type == "inf" else float(norm_type)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for batch in data:
        ref_opt.zero_grad()
        mse_loss(ref_model, batch).backward()
        expected.append(_lightning_grad_norm(ref_model, p))  # on_before_optimizer_step: before the clipping
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.1)
        ref_opt.step()

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    step = loopkit.with_grad_clip(loopkit.with_grad_norm(loopkit.train_step(mse_loss), norm_type), max_norm=0.1)
    for batch, reference in zip(data, expected):
        state, metrics = step(state, batch)
        _assert_same(metrics, reference)
    for a, b in zip(state.model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_outside_accumulation_it_measures_each_updates_summed_gradient(make_mlp, make_batches, mse_loss):
    data = make_batches(4)
    ref_model = make_mlp(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    expected = []
    for k, batch in enumerate(data, start=1):
        (mse_loss(ref_model, batch) / 2).backward()
        if k % 2 == 0:
            expected.append(_lightning_grad_norm(ref_model, 2.0))
            ref_opt.step()
            ref_opt.zero_grad()

    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_grad_norm(loopkit.with_grad_accum(loopkit.train_step(mse_loss), every=2))
    seen = []
    for batch in data:
        state, metrics = step(state, batch)
        seen.append(metrics)
    assert not any(k.startswith("grad_") for k in seen[0]) and not any(k.startswith("grad_") for k in seen[2])  # micro
    _assert_same(seen[1], expected[0])
    _assert_same(seen[3], expected[1])


def test_the_norms_are_logged_as_train_metrics(make_mlp, make_batches, mse_loss):
    logger = _Memory()
    model = make_mlp(0)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_logging(loopkit.with_grad_norm(loopkit.train_step(mse_loss)), logger, every_n_steps=1)
    loopkit.run_epochs(step, state, make_batches(3), max_steps=3, progress=False)
    rows = [row for row in logger.rows if "train/grad_2.0_norm_total" in row]
    assert len(rows) == 3 and all("train/grad_2.0_norm/0.weight" in row for row in rows)


class _Memory(loopkit.Logger):
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append(dict(metrics))


@pytest.mark.parametrize("norm_type", [0, -1, float("nan"), "two", None])
def test_a_bad_norm_type_is_refused(norm_type, mse_loss):
    with pytest.raises(ValueError, match="with_grad_norm: norm_type must be a positive number or 'inf'"):
        loopkit.with_grad_norm(loopkit.train_step(mse_loss), norm_type)


def test_it_refuses_an_eval_step_and_a_plain_function():
    with pytest.raises(TypeError, match="with_grad_norm"):
        loopkit.with_grad_norm(loopkit.eval_step(lambda m, b: {}))
    with pytest.raises(TypeError, match="with_grad_norm"):
        loopkit.with_grad_norm(lambda state, batch: (state, {}))


class _MixedDtypes(torch.nn.Module):
    """A bfloat16 embedding table (first, so the first norm is bfloat16) before a float32 head."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = torch.nn.Parameter(torch.randn(5, 3).bfloat16())
            self.head = torch.nn.Linear(3, 1)

    def forward(self, ids):
        return self.head(self.emb[ids].float())


def _mixed_loss(model, ids):
    return model(ids).pow(2).mean() * 1000.123  # (large gradients: a total rounded to bfloat16 shows)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, "inf"])
def test_parameters_of_two_dtypes_give_the_total_lightning_and_torch_compute(norm_type):
    """Each parameter's norm in its own dtype (bfloat16 for the embedding, as p.grad.norm gives it), the total over
    those norms in the promoted dtype (float32), as Lightning's torch.tensor(norms).norm and torch's get_total_norm
    compute it; a total in the first parameter's dtype (bfloat16) was not caught by any test."""
    p = float(norm_type)
    ids = torch.tensor([0, 1, 2])
    ref_model = _MixedDtypes()
    _mixed_loss(ref_model, ids).backward()
    reference = _lightning_grad_norm(ref_model, p)
    total = reference[f"grad_{p}_norm_total"]
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm([q.grad for q in ref_model.parameters()], p),
                               rtol=1e-6, atol=0)

    model = _MixedDtypes()
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _, metrics = loopkit.with_grad_norm(loopkit.train_step(_mixed_loss), norm_type)(state, ids)
    _assert_same(metrics, reference)
    assert metrics[f"grad_{p}_norm/emb"].dtype == torch.bfloat16
    assert metrics[f"grad_{p}_norm_total"].dtype == torch.float32
    if p == 2.0:  # (the bfloat16 rounding of the total would show: 848.0 for 848.27)
        assert not torch.equal(total.bfloat16().float(), total)


def test_norm_type_is_agreed_over_the_ranks():
    """Under with_fsdp norm_type picks the op of the norms' all-reduce (sum of powers, or max for inf): a rank with
    another reduced its norms with the others' by another op, and run_epochs did not compare it. Now it does."""
    base = loopkit.train_step(lambda m, b: m(b).sum())
    assert dict(loopkit.with_grad_norm(base, "inf").rank_agreed) == {"with_grad_norm norm_type": float("inf")}
    assert loopkit.with_grad_norm(base, 2).rank_agreed == loopkit.with_grad_norm(base, "2.0").rank_agreed
    assert loopkit.with_grad_norm(base, 1).rank_agreed != loopkit.with_grad_norm(base, 2).rank_agreed
