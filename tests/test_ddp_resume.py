"""run_epochs under DDP, 2 processes on gloo over loopback started with torch.multiprocessing: what a
resume gives each rank back (its running means, its own RNG), and the misuses named on every rank.

Each scenario runs in two spawned processes (``_spawn``, bounded in time) that save what they saw;
the test compares it with a reference computed here (a one-process run, an uninterrupted run).
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import pytest
import torch
from torch import nn

import loopkit
from loopkit import distributed

BATCH = 8  # a rank's half is 4 samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, scenario, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=__import__("datetime").timedelta(seconds=30))
    try:
        result = scenario(rank, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()  # (a no-op after a scenario's own; it lets gloo's threads settle before exit)


def _spawn(tmp_path, scenario, *args, timeout: float = 90.0) -> list:
    """Run ``scenario(rank, *args)`` in 2 processes; each rank's result (raises if a process failed)."""
    out = str(tmp_path)
    context = torch.multiprocessing.start_processes(
        _worker, args=(scenario, _free_port(), out, args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"{scenario.__name__} did not finish within {timeout} s")
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1)]


def _model(dropout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 16), nn.Tanh()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(16, 1)]
    return nn.Sequential(*layers)


def _state(seed: int = 0, dropout: bool = False) -> loopkit.TrainState:
    model = _model(dropout)
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed=seed)


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(BATCH, 3, generator=gen), torch.randn(BATCH, 1, generator=gen)) for _ in range(n)]


def _half(batch, rank: int):
    return tuple(t[rank * BATCH // 2:(rank + 1) * BATCH // 2] for t in batch)


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


class _Losses(loopkit.Callback):
    def __init__(self):
        self.seen = []

    def on_batch_end(self, state, metrics):
        self.seen.append(float(metrics["loss"]))


def _params(state) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


# --- a checkpoint of one process resumed on two ----------------------------------------------


def _resume_on_two(rank: int, directory: str) -> dict:
    state = loopkit.restore(_state(), directory)
    start = state.step
    losses = _Losses()
    step = loopkit.with_ddp(loopkit.train_step(_mse))
    state, history = loopkit.run_epochs(step, state, [_half(b, rank) for b in _batches()], epochs=1,
                                        callbacks=[losses], progress=False)
    return {"start": start, "history": history, "losses": losses.seen, "params": _params(state)}


def _each_update_weighed_alike(one_process: list[float], ranks: list[dict]) -> float:
    """The epoch mean of a run resumed on two ranks from one process's records, each update weighing alike:
    an update of one process is one record, one of two ranks two (one a rank)."""
    after = ranks[0]["losses"] + ranks[1]["losses"]
    return (2 * sum(one_process) + sum(after)) / (2 * len(one_process) + len(after))


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_of_one_process_resumed_on_two_weighs_each_update_alike(tmp_path):
    """Reference: the uninterrupted one-process epoch (the halves' mean loss is the whole batch's). Every rank
    took the whole saved epoch window once, so the records before the resume counted twice; then rank 0 took
    them, each once, so an update before the resume counted half as much as one after it."""
    directory = tmp_path / "ckpt"
    one = _Losses()
    step = loopkit.with_checkpointing(loopkit.train_step(_mse), directory, every_n_steps=1)
    loopkit.run_epochs(step, _state(), _batches(), max_steps=2, callbacks=[one], progress=False)
    ranks = _spawn(tmp_path, _resume_on_two, str(directory))
    assert [r["start"] for r in ranks] == [2, 2]
    reference, (whole,) = loopkit.run_epochs(loopkit.train_step(_mse), _state(), _batches(), epochs=1,
                                             progress=False)
    assert len(one.seen) + len(ranks[0]["losses"]) + len(ranks[1]["losses"]) == 6
    for r in ranks:
        (record,) = r["history"]
        assert record["train/loss"] == pytest.approx(_each_update_weighed_alike(one.seen, ranks), rel=1e-6)
        assert record["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-6)
    for name, p in reference.model.named_parameters():  # (the halves' mean gradient is the whole batch's)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
        assert (ranks[0]["params"][name] - p.detach()).abs().max() <= 1e-6


# --- each rank's own RNG -----------------------------------------------------------------------


def _seeded_per_rank(rank: int, directory: str) -> dict:
    data = [_half(b, rank) for b in _batches()]

    def fit(state, **options):
        step = loopkit.with_checkpointing(loopkit.with_ddp(loopkit.train_step(_mse)), directory, every_n_steps=1)
        return loopkit.run_epochs(step, state, data, progress=False, **options)[0]

    whole = _params(loopkit.run_epochs(loopkit.with_ddp(loopkit.train_step(_mse)), _state(5 + rank, dropout=True),
                                       data, epochs=2, progress=False)[0])
    fit(_state(5 + rank, dropout=True), max_steps=3)
    torch.distributed.barrier()  # (rank 0 has written the checkpoint)
    resumed = fit(loopkit.restore(_state(5 + rank, dropout=True), directory), epochs=2)
    return {"whole": whole, "resumed": _params(resumed), "step": resumed.step}


@pytest.mark.slow
def test_ranks_seeded_apart_resume_their_own_dropout_masks(tmp_path):
    """``seed=s + rank``: a checkpoint held rank 0's RNG alone, so rank 1 drew rank 0's masks after a resume."""
    ranks = _spawn(tmp_path, _seeded_per_rank, str(tmp_path / "ckpt"))
    for r in ranks:
        assert r["step"] == 8
        for name, p in r["whole"].items():
            assert torch.equal(r["resumed"][name], p), name


def _batchnorm_validated(rank: int, directory: str) -> dict:
    data = [_half(b, rank) for b in _batches()]

    class Validations(loopkit.Callback):
        def __init__(self):
            self.seen = []

        def on_validation_end(self, state, metrics):
            self.seen.append((state.step, dict(metrics)))

    class CrashAt3(loopkit.Callback):  # on every rank, after the checkpoint of step 2 and its validation
        def on_batch_end(self, state, metrics):
            if state.step == 3:
                raise RuntimeError("crash")

    def fit(state, every=None, crash=False):
        step = loopkit.with_ddp(loopkit.train_step(_mse))
        if every:
            step = loopkit.with_checkpointing(step, directory, every_n_steps=every)
        seen = Validations()
        val = (loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}), data)
        try:
            loopkit.run_epochs(step, state, data, val=val, val_every_n_steps=2, sanity_val_batches=0, epochs=1,
                               callbacks=[seen] + ([CrashAt3()] if crash else []), progress=False)
        except RuntimeError as e:
            assert crash and "crash" in str(e)
        return seen.seen

    def bn_state():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    whole = fit(bn_state())
    fit(bn_state(), every=2, crash=True)
    torch.distributed.barrier()  # (rank 0 has written the checkpoint)
    resumed = fit(loopkit.restore(bn_state(), directory))
    return {"whole": whole, "resumed": resumed}


@pytest.mark.slow
def test_the_validation_a_resumed_run_owes_reads_the_uninterrupted_runs_batchnorm_statistics(tmp_path):
    """The checkpoint held rank 0's buffers alone: rank 1 validated with rank 0's running statistics before
    the next training forward broadcast them anyway (its val means, and so every rank's, differed; validations
    now read rank 0's, broadcast, and the resumed run's equal the uninterrupted run's still)."""
    ranks = _spawn(tmp_path, _batchnorm_validated, str(tmp_path / "ckpt"))
    for r in ranks:
        assert [step for step, _ in r["whole"]] == [2, 4]
        assert r["resumed"] == r["whole"]  # the step-2 validation it owed first, then step 4's


def _mse_or_skip(model, batch):
    """The loss, or None (the batch skipped) for a batch marked so: after the model's forward, which ran."""
    x, y, skip = batch
    loss = _mse(model, (x, y))
    return None if skip else loss


def _accumulated_batchnorm(rank: int, directory: str, skip_last: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(2, 3, generator=gen), torch.randn(2, 1, generator=gen)) for _ in range(10)][rank::2]
    train = [(x, y, skip_last and k == 4) for k, (x, y) in enumerate(train)]
    updates = 2 if skip_last else 3  # an epoch's
    val = [(torch.randn(5, 3, generator=gen), torch.randn(5, 1, generator=gen)) for _ in range(2)][rank:rank + 1]

    def bn_state():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def fit(state, max_steps, epochs=2):  # 5 batches a rank: groups of 2, 2, then 1 flushed at the epoch's end (or skipped)
        step = loopkit.with_ddp(loopkit.with_grad_accum(loopkit.train_step(_mse_or_skip), every=2))
        step = loopkit.with_checkpointing(step, directory, every_n_epochs=1)
        state, _ = loopkit.run_epochs(step, state, train, epochs=epochs, max_steps=max_steps, progress=False,
                                      sanity_val_batches=0)
        metrics = loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}), state, val)
        return {"buffers": {n: b.clone() for n, b in state.model.named_buffers()}, "params": _params(state),
                "val": metrics["mse"], "step": state.step}

    whole = fit(bn_state(), updates + 1)  # (its own checkpoints, removed before the interrupted run writes its own)
    torch.distributed.barrier()
    if rank == 0:
        import shutil
        shutil.rmtree(directory)
    torch.distributed.barrier()
    fit(bn_state(), None, epochs=1)  # epoch 0 (its skipped last batch too), checkpointed at its end
    torch.distributed.barrier()  # (rank 0 has written the checkpoint)
    return {"whole": whole, "resumed": fit(loopkit.restore(bn_state(), directory), updates + 1), "rank": rank}


@pytest.mark.slow
@pytest.mark.parametrize("skip_last", [False, True], ids=["flushed", "skipped"])
def test_a_resume_after_a_flushed_partial_group_keeps_each_ranks_batchnorm_statistics(tmp_path, skip_last):
    """The epoch's last, partial group ran under no_sync, so DDP broadcast no buffers before the next epoch's first
    forward; the resumed run's new wrapper did (it starts as after a synced forward, and its build broadcasts rank 0's):
    rank 1's running statistics, and the validation's mean over the ranks, were not the uninterrupted run's. Also when
    that last micro-batch's loss_fn ran the forward (under no_sync) and then skipped the batch (returned None): its
    state did not record the forward, and the resumed run broadcast rank 0's buffers."""
    start = time.monotonic()
    ranks = _spawn(tmp_path, _accumulated_batchnorm, str(tmp_path / "ckpt"), skip_last)
    assert time.monotonic() - start < 60
    assert ranks[0]["whole"]["buffers"]["1.running_mean"].ne(ranks[1]["whole"]["buffers"]["1.running_mean"]).any()
    for r in ranks:
        whole, resumed = r["whole"], r["resumed"]
        assert whole["step"] == resumed["step"] == (3 if skip_last else 4)
        for name, p in whole["params"].items():
            assert torch.equal(resumed["params"][name], p), name
        for name, b in whole["buffers"].items():
            assert torch.equal(resumed["buffers"][name], b), (r["rank"], name)
    for r in ranks:  # (a mean over the ranks)
        assert r["resumed"]["val"] == r["whole"]["val"]


# --- validation with rank 0's buffers ----------------------------------------------------------


def _bn_val_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=gen)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(30, 1, generator=gen)
    return torch.utils.data.TensorDataset(x[:22], y[:22]), torch.utils.data.TensorDataset(x[22:], y[22:])


def _bn_state() -> loopkit.TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=0)


def _bn_validations(rank: int, every: int = 1) -> dict:
    train, val_set = _bn_val_data()

    class Kept(loopkit.Callback):  # each validation's model (its buffers this rank's own, as the state holds them)
        def __init__(self):
            self.models = []

        def on_validation_end(self, state, metrics):
            self.models.append({k: v.clone() for k, v in state.model.state_dict().items()})

    def fit(validate: bool):
        state, kept = _bn_state(), Kept()
        step = loopkit.with_ddp(loopkit.with_grad_accum(loopkit.train_step(_mse), every=every))
        validation = (loopkit.eval_step(lambda m, b: {"loss": _mse(m, b)}), val_shard) if validate else None
        state, history = loopkit.run_epochs(step, state, distributed.shard(train, state, batch_size=4), epochs=2,
                                            val=validation, callbacks=[kept], progress=False)
        buffers = {n: b.clone() for n, b in state.model.named_buffers()}
        return history, kept.models, buffers

    val_shard = distributed.shard(val_set, _bn_state(), batch_size=2, pad=False, shuffle=False)
    history, models, buffers = fit(True)
    _, _, unvalidated = fit(False)
    return {"history": history, "models": models, "buffers": buffers, "unvalidated": unvalidated,
            "val_shard": list(val_shard)}


@pytest.mark.slow
def test_a_validation_under_broadcast_buffers_reads_rank_zeros_batchnorm_statistics(tmp_path):
    """Each rank validated its shard with its own BatchNorm running statistics: val/loss (and EarlyStopping, a
    monitor) was a blend of rank 0's and rank 1's, no model's; Lightning's validation through the DDP wrapper, whose
    forward broadcasts rank 0's first, reads rank 0's on every rank. The state's buffers stay each rank's own."""
    ranks = _spawn(tmp_path, _bn_validations)
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["buffers"]["1.running_mean"].ne(ranks[1]["buffers"]["1.running_mean"]).any()  # (apart)
    _, val = _bn_val_data()
    metric = loopkit.eval_step(lambda m, b: {"loss": _mse(m, b)})
    for record, weights in zip(ranks[0]["history"], ranks[0]["models"], strict=True):
        model = _bn_state().model
        model.load_state_dict(weights)
        reference = loopkit.evaluate(metric, loopkit.TrainState.create(model), [val.tensors])["loss"]
        assert record["val/loss"] == pytest.approx(reference, rel=1e-6, abs=0)
    for r in ranks:  # (the validation put each rank's own back: the same as a fit that never validated)
        for name, b in r["unvalidated"].items():
            assert torch.equal(r["buffers"][name], b), name


@pytest.mark.slow
def test_a_validation_after_a_flushed_partial_group_reads_each_ranks_own_batchnorm_statistics(tmp_path):
    """The epoch's last, partial group ran under no_sync, after which DDP broadcasts no buffers before its next
    forward (Lightning's validation through the wrapper reads each rank's own then): so does run_epochs'. The val
    means are each rank's model on its own shard, summed over the ranks; without with_grad_accum, rank 0's."""
    ranks = _spawn(tmp_path, _bn_validations, 2)  # 3 batches a rank: groups of 2, then 1 flushed
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["buffers"]["1.running_mean"].ne(ranks[1]["buffers"]["1.running_mean"]).any()
    for k, record in enumerate(ranks[0]["history"]):
        total, count = 0.0, 0
        for r in ranks:
            model = _bn_state().model
            model.load_state_dict(r["models"][k])
            model.eval()
            with torch.no_grad():
                for x, y in r["val_shard"]:
                    total += float(((model(x) - y) ** 2).mean()) * len(x)
                    count += len(x)
        assert count == 8
        assert record["val/loss"] == pytest.approx(total / count, rel=1e-6, abs=0)
    for r in ranks:
        for name, b in r["unvalidated"].items():
            assert torch.equal(r["buffers"][name], b), name


# --- misuses named on every rank ---------------------------------------------------------------


def _misuses(rank: int) -> dict:
    data = [_half(b, rank) for b in _batches()]
    step = loopkit.with_ddp(loopkit.train_step(_mse))
    val = (loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)}), data) if rank == 0 else None
    try:
        loopkit.run_epochs(step, _state(), data, epochs=1, val=val, progress=False)
        refused = "not refused"
    except RuntimeError as e:
        refused = str(e)
    metric = loopkit.eval_step(lambda m, b: {"mse": _mse(m, b)})
    try:
        loopkit.run_epochs(step, _state(), data, epochs=1, val=(metric, {"a": data, ("b" if rank == 0 else "c"): data}),
                           progress=False)
        other_sets = "not refused"
    except RuntimeError as e:
        other_sets = str(e)
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1)),
                                             batch_size=4, shuffle=True)
        loopkit.run_epochs(step, _state(), loader, epochs=1, progress=False)
    with warnings.catch_warnings(record=True) as sharded:
        warnings.simplefilter("always")
        loopkit.run_epochs(step, _state(), data, epochs=1, progress=False)
    return {"refused": refused, "other_sets": other_sets, "same": [str(w.message) for w in same],
            "sharded": [str(w.message) for w in sharded]}


@pytest.mark.slow
def test_val_on_one_rank_is_refused_on_both_and_unsharded_data_is_warned_about(tmp_path):
    """val= given on rank 0 only left both ranks waiting until the timeout; a plain DataLoader gave every rank
    the same batches without a word."""
    start = time.monotonic()
    ranks = _spawn(tmp_path, _misuses)
    assert time.monotonic() - start < 60
    for r in ranks:
        assert "the ranks have other validation options" in r["refused"] and "rank 1 has" in r["refused"]
        assert "the same named sets" in r["other_sets"] and "'val sets': ['a', 'c']" in r["other_sets"]
        assert any("every rank got the same first batch" in m for m in r["same"])
        assert not any("same first batch" in m for m in r["sharded"])


# --- shutdown while an error propagates ----------------------------------------------------------


def _fails_on_one_rank(rank: int) -> dict:
    class Fail(loopkit.Callback):
        def on_epoch_end(self, state, metrics):
            if rank == 1:
                raise RuntimeError("rank 1 fails")

    started = time.monotonic()
    try:
        try:
            step = loopkit.with_ddp(loopkit.train_step(_mse))
            loopkit.run_epochs(step, _state(), [_half(b, rank) for b in _batches()], epochs=3, callbacks=[Fail()],
                               progress=False)
        finally:
            distributed.shutdown()  # as a script's `try: main() finally: shutdown()` does
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.monotonic() - started}
    return {"error": "", "seconds": time.monotonic() - started}


@pytest.mark.slow
def test_shutdown_while_an_error_propagates_does_not_wait_for_the_other_ranks(tmp_path):
    """Its barrier waited for a rank that was itself waiting in run_epochs' next collective: the error became
    a wait for the whole timeout (30 minutes by torch's default); a rank that failed leaves at once."""
    ranks = _spawn(tmp_path, _fails_on_one_rank)
    assert "rank 1 fails" in ranks[1]["error"]
    assert ranks[0]["error"]  # rank 0 learnt of it from the broken collective
    assert max(r["seconds"] for r in ranks) < 20  # (the process group's timeout is 30 s)


@pytest.mark.slow
def test_a_checkpoint_saved_by_hand_in_one_process_resumed_on_two_weighs_each_update_alike(tmp_path):
    """The one-rank mark was made by with_checkpointing's own saves only: loopkit.checkpoint.save (or the step's
    save()) wrote none, and every rank took the whole saved window again."""
    directory = tmp_path / "ckpt"
    one = _Losses()
    state, _ = loopkit.run_epochs(loopkit.train_step(_mse), _state(), _batches(), max_steps=2, callbacks=[one],
                                  progress=False)
    loopkit.checkpoint.save(state, directory)
    ranks = _spawn(tmp_path, _resume_on_two, str(directory))
    for r in ranks:
        (record,) = r["history"]
        assert record["train/loss"] == pytest.approx(_each_update_weighed_alike(one.seen, ranks), rel=1e-6)


# --- a step built before the process group -----------------------------------------------------------------


def _built_before_init(rank: int, step) -> dict:
    state = _state()
    try:
        step(state, _half(_batches(1)[0], rank))
    except RuntimeError as e:
        return {"error": str(e), "intact": not state._consumed}
    return {"error": "", "intact": True}


@pytest.mark.slow
def test_with_ddp_built_before_a_spawned_workers_init_is_refused_at_its_first_call(tmp_path, monkeypatch):
    """Built where no group existed (nor a torchrun WORLD_SIZE), with_ddp is the plain step of one process; called in
    workers whose group has two ranks it trained each rank on its own, silently (the ranks drifted apart)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for step in (loopkit.with_ddp(loopkit.train_step(_mse)), loopkit.donate(loopkit.with_ddp(loopkit.train_step(_mse)))):
        ranks = _spawn(tmp_path, _built_before_init, step)
        for r in ranks:
            assert "with_ddp(step) was built before a torch.distributed process group" in r["error"] and r["intact"]
