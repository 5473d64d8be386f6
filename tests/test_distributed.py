"""loopkit.distributed: one process (no-ops, shards), two "nodes" under torchrun, and a rank killed mid-run."""

from __future__ import annotations

import functools
import inspect
import os
import random
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

import loopkit
from loopkit import distributed
from tests import _ddp_die_script as die_script
from tests import _ddp_script as ddp

# --- one process -------------------------------------------------------------------------------


def test_in_one_process_everything_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank(), distributed.is_rank_zero()) == (0, 1, 0, True)
    distributed.shutdown()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("timeout, error", [(-1, ValueError), (0, ValueError), ("60", TypeError)])
def test_init_refuses_a_timeout_that_is_not_positive_seconds_in_one_process_too(monkeypatch, timeout, error):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(error, match="distributed.init: timeout must be"):
        distributed.init(timeout=timeout)


def test_init_names_the_missing_torchrun_variables(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="sets RANK, WORLD_SIZE but not MASTER_ADDR, MASTER_PORT.*torchrun"):
        distributed.init()


def test_shard_in_one_process_is_the_whole_data_in_the_epoch_order_of_the_seed():
    data = TensorDataset(torch.arange(10.0))
    state = loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=3)
    loader = distributed.shard(data, state, batch_size=4)
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and loader.sampler.seed == 3
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)  # what run_epochs does at each epoch
        orders.append(torch.cat([b[0] for b in loader]).tolist())
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1] and orders[0] == orders[2]


def test_shard_keeps_a_loaders_options_and_shuffling():
    loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=2, shuffle=False, drop_last=True)
    sharded = distributed.shard(loader, 0)
    assert sharded.batch_size == 2 and sharded.drop_last and not sharded.sampler.shuffle
    assert [b[0].tolist() for b in sharded] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert distributed.shard(DataLoader(loader.dataset, batch_size=2, shuffle=True)).sampler.shuffle


def test_shard_refuses_what_it_cannot_shard():
    with pytest.raises(TypeError, match="needs batch_size"):
        distributed.shard(TensorDataset(torch.arange(3.0)))
    with pytest.raises(TypeError, match="map-style Dataset"):
        distributed.shard(iter([1, 2]), batch_size=1)
    with pytest.raises(TypeError, match="state must be a TrainState"):
        distributed.shard(TensorDataset(torch.arange(3.0)), "seed", batch_size=1)


@pytest.mark.parametrize("n", [7, 8, 1])
def test_unpadded_shards_hold_each_sample_exactly_once(n):
    data = TensorDataset(torch.arange(float(n)))
    shards = [list(distributed._ShardSampler(data, num_replicas=2, rank=r, seed=4)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    assert [len(distributed._ShardSampler(data, num_replicas=2, rank=r)) for r in (0, 1)] == [len(s) for s in shards]
    padded = [list(torch.utils.data.DistributedSampler(data, num_replicas=2, rank=r, seed=4)) for r in (0, 1)]
    assert [p[: len(s)] for p, s in zip(padded, shards)] == shards  # the same order, less the padding


def _epochs_of(loader, seed: int, epochs: int = 2) -> list[list[int]]:
    """The sample indices ``run_epochs`` feeds a step from ``loader``, epoch by epoch, for a state of ``seed``."""
    seen: list[list[int]] = [[] for _ in range(epochs)]

    def record(state, batch):
        seen[state.epoch].extend(int(v) for v in batch[0])
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    loopkit.run_epochs(record, loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=seed), loader, epochs=epochs,
                       progress=False)
    return seen


def test_shard_of_a_loader_with_a_subset_sampler_is_that_subset_in_the_loaders_order():
    """The usual train/val split of one dataset: the shard trains on the train indices only, each once an epoch,
    in the order the loader itself gives under run_epochs for the same seed (not a DistributedSampler's)."""
    train_idx = [0, 2, 3, 5, 7, 8, 11, 12, 14]  # the rest held out

    def loader():
        return DataLoader(TensorDataset(torch.arange(16)), batch_size=4, sampler=SubsetRandomSampler(train_idx))

    own = _epochs_of(loader(), seed=3)
    sharded = distributed.shard(loader(), 3)
    got = _epochs_of(sharded, seed=3)
    for epoch in got:
        assert sorted(epoch) == train_idx  # each train sample once, no held-out one
    assert got == own and got[0] != got[1]
    for pad in (True, False):  # by hand (set_epoch, as run_epochs calls it): the same samples, each once
        sharded = distributed.shard(loader(), 3, pad=pad)
        for epoch in (0, 1):
            sharded.sampler.set_epoch(epoch)
            assert sorted(int(v) for (b,) in sharded for v in b) == train_idx
        assert len(sharded) == 3 and len(sharded.sampler) == len(train_idx)


def test_shard_of_a_loader_with_a_weighted_sampler_draws_as_the_sampler():
    weights = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 1.0, 0.0])  # 0, 2, 4, 7 never drawn

    def loader():
        return DataLoader(TensorDataset(torch.arange(8)), batch_size=5, sampler=WeightedRandomSampler(weights, 12))

    got = _epochs_of(distributed.shard(loader(), 4), seed=4, epochs=3)
    assert all(len(epoch) == 12 and set(epoch) <= {1, 3, 5, 6} for epoch in got)
    assert got == _epochs_of(loader(), seed=4, epochs=3)
    sharded = distributed.shard(loader(), 4)
    assert len({tuple(int(v) for (b,) in sharded for v in b) for _ in range(3)}) == 1  # one draw per (seed, epoch)


def test_shard_of_a_loader_with_a_batch_sampler():
    data = TensorDataset(torch.arange(10))
    torch_batches = DataLoader(data, batch_sampler=BatchSampler(SubsetRandomSampler([1, 4, 6, 8, 9]), 2, drop_last=True))
    sharded = distributed.shard(torch_batches, 0)  # torch's BatchSampler: its sampler kept, batched as it batches
    assert (sharded.batch_size, sharded.drop_last) == (2, True)
    assert _epochs_of(sharded, seed=0) == _epochs_of(torch_batches, seed=0)
    assert all(len(e) == 4 and set(e) <= {1, 4, 6, 8, 9} for e in _epochs_of(sharded, seed=0))

    class Buckets(torch.utils.data.Sampler):
        def __iter__(self):
            return iter([[0, 1, 2], [3, 4]])

        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="batch_sampler, a .*Buckets, makes batches that shard cannot split"):
        distributed.shard(DataLoader(data, batch_sampler=Buckets()), 0)
    with pytest.raises(TypeError, match="shuffle= does not apply .* SubsetRandomSampler"):
        distributed.shard(DataLoader(data, batch_size=2, sampler=SubsetRandomSampler([1, 2])), 0, shuffle=True)


def test_shard_keeps_a_users_distributed_sampler_and_resumes_in_its_order(monkeypatch):
    """A loader with the user's own DistributedSampler (seed=42, drop_last=True), as rank 1 of 2 (faked): shard keeps
    it as it is (as Lightning does), so each epoch under run_epochs is that sampler's own draw for the epoch, and a
    run stopped mid-epoch resumes to the uninterrupted order. One built for another group, one that differs between
    the ranks, shuffle= and pad=False with a sampler that drops samples are refused, naming why."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    data = TensorDataset(torch.arange(21))

    def loader(**kwargs):
        kwargs = {"num_replicas": 2, "rank": 1, "seed": 42, "drop_last": True, **kwargs}
        return DataLoader(data, batch_size=4, sampler=torch.utils.data.DistributedSampler(data, **kwargs))

    user = loader()
    sharded = distributed.shard(user, 0)  # the state's seed (0) is not the sampler's
    assert sharded.sampler is user.sampler and len(sharded.sampler) == 10
    expected = []
    for epoch in range(3):  # the reference: torch's DistributedSampler itself
        reference = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=42, drop_last=True)
        reference.set_epoch(epoch)
        expected.append(list(reference))
    assert _epochs_of(sharded, seed=0, epochs=3) == expected and expected[0] != expected[1]

    seen: list[list[int]] = [[] for _ in range(3)]

    def record(state, batch):
        seen[state.epoch].extend(int(v) for v in batch[0])
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    fresh = loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=0)
    stopped, _ = loopkit.run_epochs(record, fresh, distributed.shard(loader(), 0), epochs=3, max_steps=4,
                                    progress=False)
    assert (stopped.epoch, stopped.batch_index) == (1, 1)  # mid-epoch 1
    restored = loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=0).load_state_dict(stopped.state_dict())
    loopkit.run_epochs(record, restored, distributed.shard(loader(), 0), epochs=3, progress=False)
    assert seen == expected

    with pytest.raises(ValueError, match=r"on rank 1, the DataLoader's DistributedSampler splits the data for rank 0 "
                                         r"of num_replicas=2, but this process is rank 1 of 2"):
        distributed.shard(loader(rank=0), 0)
    with pytest.raises(ValueError, match=r"pad=False gives each sample to exactly one rank.*drops 1 of the 21"):
        distributed.shard(loader(), 0, pad=False)
    assert distributed.shard(loader(drop_last=False, num_replicas=2), 0, pad=True).sampler.total_size == 22
    with pytest.raises(TypeError, match=r"shuffle= does not apply .* DistributedSampler"):
        distributed.shard(loader(), 0, shuffle=False)
    other_rank = [(0, (7, True, True), None)]  # rank 0 built its sampler with seed=7
    monkeypatch.setattr(loopkit._collective, "gather", lambda value, **_: other_rank + [value])
    with pytest.raises(ValueError, match=r"DistributedSamplers differ .* \[\(7, True, True\), \(42, True, True\)\]"):
        distributed.shard(loader(), 0)


def test_a_loader_shard_made_is_sharded_again_as_its_dataset_would_be():
    """shard's own DistributedSampler is not one of the user's (kept as it is): a loader shard made, sharded again,
    takes the new seed (each epoch's order torch's DistributedSampler's for it), and shuffle= applies to it."""
    data = TensorDataset(torch.arange(20))
    first = distributed.shard(data, 0, batch_size=4, shuffle=True)
    again = distributed.shard(first, 5)
    expected = []
    for epoch in range(2):  # the reference: torch's DistributedSampler of the seed 5, epoch by epoch
        reference = torch.utils.data.DistributedSampler(data, num_replicas=1, rank=0, seed=5, shuffle=True)
        reference.set_epoch(epoch)
        expected.append(list(reference))
    assert _epochs_of(again, seed=5) == expected == _epochs_of(distributed.shard(data, 5, batch_size=4), seed=5)
    assert expected != _epochs_of(first, seed=0)
    in_order = distributed.shard(first, 5, shuffle=False)
    assert _epochs_of(in_order, seed=5) == [list(range(20))] * 2


# --- several processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_on_loopback(tmp_path):
    """``torchrun --nnodes 2`` started twice (one process each) trains to the one-process result."""
    port = _free_port()
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=loopkit-test", "--rdzv-conf=join_timeout=60"]
    results: list[subprocess.CompletedProcess | BaseException] = [None, None]  # type: ignore[list-item]

    def node(i: int) -> None:
        try:
            results[i] = ddp.torchrun(str(tmp_path), ["plain"], launcher=launcher, timeout=90)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=node, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in results:
        assert isinstance(r, subprocess.CompletedProcess) and r.returncode == 0, getattr(r, "stdout", r)
    ranks = ddp.load(str(tmp_path), "plain")
    _assert_the_one_process_run_of_plain(ranks)
    _assert_the_means_over_ranks_of_plain(ranks)


@pytest.mark.slow
def test_two_ranks_split_the_indices_a_loaders_own_sampler_draws(tmp_path):
    """``torchrun --nproc-per-node 2``: states seeded apart, a SubsetRandomSampler's and a WeightedRandomSampler's
    loader sharded. Each epoch the ranks split the one draw of the sampler, the one-process loader's for rank 0's
    seed, as a DistributedSampler splits indices: rank r takes r, r + 2, ...; padded, the first ones repeat."""
    port = _free_port()
    launcher = ["--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=loopkit-kept-sampler"]
    done = ddp.torchrun(str(tmp_path), ["kept_sampler"], launcher=launcher, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    ranks = ddp.load(str(tmp_path), "kept_sampler")
    for name in ("subset", "weighted", "numpy"):  # (numpy: a sampler shuffling with numpy's global RNG)
        reference = _epochs_of(ddp.kept_loader(name), seed=ddp.KEPT_SEED)  # the loader's own, in one process
        for epoch, drawn in enumerate(reference):
            if name != "weighted":
                assert sorted(drawn) == ddp.KEPT_TRAIN
            else:
                assert len(drawn) == 15 and all(i % 2 == 0 for i in drawn)
            r0, r1 = ranks[0][name + "_unpadded"][epoch], ranks[1][name + "_unpadded"][epoch]
            assert sorted(r0 + r1) == sorted(drawn) and (r0, r1) == (drawn[0::2], drawn[1::2])
            padded = drawn + drawn[: len(drawn) % 2]
            r0, r1 = ranks[0][name][epoch], ranks[1][name][epoch]
            assert len(r0) == len(r1) == len(padded) // 2 and (r0, r1) == (padded[0::2], padded[1::2])
            if name != "weighted":  # each sample on one rank, the one padding sample on both
                assert set(r0).isdisjoint(ranks[1][name + "_unpadded"][epoch]) and set(r0) & set(r1) == {drawn[0]}
        assert reference[0] != reference[1]


def _assert_the_one_process_run_of_plain(ranks: list[dict]) -> None:
    """Both ranks of ``_ddp_script.plain`` hold the same parameters, those of one process stepping on both halves."""
    data = ddp.make_data(ddp.STEPS)
    state = ddp.sgd_state(ddp.make_model())
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    for i in range(ddp.STEPS):
        state, _ = step(state, torch.cat([data[i, 0], data[i, 1]]))
    for name, p in state.model.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
        assert (ranks[0]["params"][name] - p.detach()).abs().max() <= 1e-6


def _assert_the_means_over_ranks_of_plain(ranks: list[dict]) -> None:
    """``distributed.mean_over_ranks`` of each step's metrics in ``_ddp_script.plain``: on both ranks, the loss of one
    process stepping on both halves (the mean of the halves' mean losses); the step's own are each rank's."""
    data = ddp.make_data(ddp.STEPS)
    state = ddp.sgd_state(ddp.make_model())
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    for i in range(ddp.STEPS):
        state, metrics = step(state, torch.cat([data[i, 0], data[i, 1]]))
        whole = float(metrics["loss"])
        for r in (0, 1):
            assert ranks[r]["averaged"][i].keys() == {"loss"}
            assert abs(ranks[r]["averaged"][i]["loss"] - whole) <= 1e-6 * max(1.0, whole)
        assert ranks[0]["metrics"][i]["loss"] != ranks[1]["metrics"][i]["loss"]


def _uninterrupted_resume_reference():
    """The 2-rank run in one process (each step on both ranks' batches); its state and each epoch's mean loss."""
    train_set = ddp.make_dataset(24, 1)
    state = ddp.sgd_state(ddp.make_model(), seed=5)
    step = loopkit.donate(loopkit.train_step(ddp.mse))
    means = []
    for epoch in range(2):
        losses = []
        samplers = [torch.utils.data.DistributedSampler(train_set, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
        for s in samplers:
            s.set_epoch(epoch)
        idx = [list(s) for s in samplers]
        for i in range(0, 12, ddp.BATCH):
            x0, y0 = train_set[idx[0][i:i + ddp.BATCH]]
            x1, y1 = train_set[idx[1][i:i + ddp.BATCH]]
            state, metrics = step(state, (torch.cat([x0, x1]), torch.cat([y0, y1])))
            losses.append(float(metrics["loss"]))
        means.append(sum(losses) / len(losses))
    return state, means


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_a_restart_resumes_from_the_newest_checkpoint(tmp_path):
    out = str(tmp_path)
    env = {"LOOPKIT_TEST_DIE": "2", "LOOPKIT_TEST_TIMEOUT": "15"}
    done = ddp.torchrun(out, ["resume"], launcher=["--standalone", "--nproc-per-node=2", "--max-restarts=1",
                                                   "--monitor-interval=0.5"], env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "rank 1 dies after the checkpoint of batch 2" in done.stdout
    assert "exitcode  : 3" in done.stdout or "exitcode: 3" in done.stdout or "Worker group FAILED" in done.stdout, done.stdout[-3000:]
    ranks = ddp.load(out, "resume")
    assert [r["start"] for r in ranks] == [(2, 0, 2), (2, 0, 2)]  # both restored the checkpoint of step 2
    reference, epoch_means = _uninterrupted_resume_reference()
    for name, p in reference.model.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])
        assert (ranks[0]["params"][name] - p.detach()).abs().max() <= 1e-6
    assert ranks[0]["step"] == 6
    # the interrupted epoch's record counts every rank's batches before the crash too (the checkpoint holds
    # their sums; rank 0's alone stood for both before)
    for r in ranks:
        assert [h["epoch"] for h in r["history"]] == [0, 1]
        assert [h["train/loss"] for h in r["history"]] == pytest.approx(epoch_means, rel=1e-6)
    # and bit for bit the same 2-process run uninterrupted: each rank's running sums came back as they were
    whole_out = os.path.join(out, "whole")
    os.makedirs(whole_out)
    done = ddp.torchrun(whole_out, ["resume"], launcher=["--standalone", "--nproc-per-node=2"], env={}, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    for resumed, whole in zip(ranks, ddp.load(whole_out, "resume")):
        assert whole["start"] == (0, 0, 0) and resumed["history"] == whole["history"]
        for name, p in whole["params"].items():
            assert torch.equal(resumed["params"][name], p)


@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun_and_passes_its_bar():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = _free_port()  # an explicit free port rather than --standalone's default, which an earlier run may hold
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopkit-example", os.path.join(root, "examples", "ddp.py"),
           "--quick"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy:") == 1  # printed by rank 0 only
    assert "world size: 2" in proc.stdout
    assert float(proc.stdout.split("test accuracy:")[1].split()[0]) >= 0.80


@pytest.mark.slow
@pytest.mark.parametrize("where, named", [
    ("step", "with_ddp: the gradient all-reduce in backward (DistributedDataParallel) failed on rank 0 of 2"),
    ("run_epochs", "run_epochs: the ranks' vote on the callbacks' should_stop failed on rank 0 of 2"),
    ("checkpoint", "with_checkpointing: the save's gather of every rank's running means, RNG and buffers failed on "
                   "rank 0 of 2"),
    ("clock", "with_checkpointing: the broadcast of rank 0's clock (whether train_time_interval passed) failed on rank "
              "0 of 2"),
    ("evaluate", "evaluate: the reduction of the means over the ranks failed on rank 0 of 2: every rank must reach it "
                 "at the same point (call evaluate on every rank"),
])
def test_when_a_rank_dies_the_other_fails_within_the_timeout_naming_the_collective(where, named, tmp_path):
    """Two processes with torchrun's variables; rank 1 exits at call 3, rank 0 must not hang. Under run_epochs with
    a batch hook rank 0's next collective is the driver's own vote (it raised gloo's bare "Connection closed"); under
    with_checkpointing(every_n_steps=3) it is the save's gather (it raised gloo's bare "Connection reset by peer"); under
    with_checkpointing(train_time_interval=...) the broadcast of rank 0's clock, and under evaluate (rank 1 exiting
    after the all-gather of the means' names) the all-reduce of their sums (both raised gloo's bare error)."""
    args = {"step": [], "run_epochs": ["run_epochs"], "checkpoint": ["checkpoint", str(tmp_path)],
            "clock": ["clock", str(tmp_path)], "evaluate": ["evaluate"]}[where]
    codes, outputs = die_script.launch(args)
    assert codes[1] == 3 and "rank 1 dies at" in outputs[1]
    assert codes[0] != 0 and "rank 0 finished" not in outputs[0]
    assert named in outputs[0] and "another rank has probably died" in outputs[0]
    if where == "step":
        assert "at step 3 (epoch 0, batch 3)" in outputs[0]


# --- processes of torch.multiprocessing.spawn: init(rank=..., world_size=...) ----------------------------

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture
def bare_env(monkeypatch):
    """No torchrun variable in the environment (and, after the test, no process group left)."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    distributed.shutdown()


def _spawned_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    # rank 0 passes the port, rank 1 reads the MASTER_PORT the parent set (the two agree); the address defaults
    assert distributed.init(rank=rank, world_size=2, master_port=port if rank == 0 else None, timeout=30) is True
    try:
        seen = (distributed.rank(), distributed.world_size(), distributed.local_rank())
        data = ddp.make_data(ddp.STEPS)
        state = ddp.sgd_state(ddp.make_model(seed=rank))  # rank 1 starts elsewhere: DDP broadcasts rank 0's weights
        step = loopkit.with_ddp(loopkit.train_step(ddp.mse))
        batches = [data[i, rank] for i in range(ddp.STEPS)]
        state, _ = loopkit.run_epochs(step, state, batches, epochs=1, progress=False)
        params = {n: p.detach().clone() for n, p in state.model.named_parameters()}
        torch.save({"seen": seen, "params": params, "step": state.step}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_spawned_workers_pass_their_ranks_to_init_and_train_to_the_one_process_result(tmp_path, bare_env):
    port = _free_port()
    bare_env.setenv("MASTER_PORT", str(port))  # inherited by the spawned workers, as Lightning's launcher does
    _spawn_and_join(_spawned_worker, (port, str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert [r["seen"] for r in ranks] == [(0, 2, 0), (1, 2, 1)]  # local_rank() is the rank on one machine
    assert [r["step"] for r in ranks] == [ddp.STEPS, ddp.STEPS]
    _assert_the_one_process_run_of_plain(ranks)


def _spawn_and_join(worker, args: tuple, seconds: float = 60) -> None:
    context = torch.multiprocessing.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the spawned workers did not finish within {seconds} s")


def _seeded_apart_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = TensorDataset(torch.arange(18.0))
        state = loopkit.TrainState.create(torch.nn.Linear(1, 1), seed=5 + rank)  # the README's seed=s + rank
        shards = {}
        for pad in (True, False):
            loader = distributed.shard(data, state, batch_size=4, pad=pad)
            shards[pad] = []
            for epoch in (0, 1):
                loader.sampler.set_epoch(epoch)
                shards[pad].append([int(v) for (b,) in loader for v in b])
        torch.save(shards, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_ranks_seeded_apart_get_shards_of_one_order(tmp_path, bare_env):
    """States seeded per rank (their own dropout masks) shard by rank 0's seed: the two shards of each epoch
    are the one-process DistributedSampler's of that seed (each sample once unpadded, and the training shards'
    padding as torch pads), not two overlapping orders."""
    _spawn_and_join(_seeded_apart_worker, (_free_port(), str(tmp_path)))
    got = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    for epoch in (0, 1):
        for r in (0, 1):
            sampler = torch.utils.data.DistributedSampler(range(18), num_replicas=2, rank=r, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            assert got[r][True][epoch] == list(sampler)
        assert sorted(got[0][False][epoch] + got[1][False][epoch]) == list(range(18))


class _Augmented(torch.utils.data.Dataset):
    """Each index with a "random augmentation" drawn from the worker's torch, numpy and Python RNGs."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i):
        noted = getattr(self, "noted", 0.0)
        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random(), noted])


def _noting_worker(worker_id: int) -> None:
    """A loader's own worker_init_fn: still called, after the rank's seeding."""
    torch.utils.data.get_worker_info().dataset.noted = 1.0


def _worker_draws_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        def fit(persistent: bool, state=None, **limits):
            seen, dataset = [], _Augmented()
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=0)
            loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2, worker_init_fn=_noting_worker,
                                persistent_workers=persistent)

            def loss(model, batch):
                seen.append(batch)
                return ddp.mse(model, (batch[:, 1:], batch[:, :1]))

            torch.manual_seed(0)
            state = state or ddp.sgd_state(torch.nn.Linear(4, 1))
            step = loopkit.with_ddp(loopkit.train_step(loss))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (a resumed loader with fresh persistent workers is warned of)
                state, _ = loopkit.run_epochs(step, state, loader, progress=False, **limits)
            assert loader.worker_init_fn is _noting_worker  # the loader is left as it was given
            return state, [row.tolist() for b in seen for row in b]

        _, whole = fit(False, epochs=1)
        cut, first = fit(True, max_steps=2)
        _, rest = fit(True, cut, epochs=1)  # resumed mid-epoch, with fresh (persistent) workers
        torch.save({"whole": whole, "resumed": first + rest}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_dataloader_workers_draw_streams_of_their_own_on_each_rank(tmp_path, bare_env):
    """Seeded from the epoch's order seed, worker w of each rank drew the same augmentation: every rank's k-th
    sample got the same "random" crop. Each rank's workers now mix the rank into their torch, numpy and Python
    seeds (as Lightning's seed_everything(workers=True)), the same from run to run and in a run resumed mid-epoch,
    persistent workers too; the loader's own worker_init_fn is still called; the order is DistributedSampler's."""
    _spawn_and_join(_worker_draws_worker, (_free_port(), str(tmp_path)), seconds=180)
    got = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    for r in (0, 1):
        assert got[r]["resumed"] == got[r]["whole"]  # a second run, cut and resumed mid-epoch (persistent workers)
        assert all(row[4] == 1.0 for row in got[r]["whole"])  # the loader's own worker_init_fn ran
        sampler = torch.utils.data.DistributedSampler(range(16), num_replicas=2, rank=r, shuffle=True, seed=0)
        assert [int(row[0]) for row in got[r]["whole"]] == list(sampler)
    for a, b in zip(got[0]["whole"], got[1]["whole"]):  # every draw of rank 0's k-th sample differs from rank 1's
        assert all(x != y for x, y in zip(a[1:4], b[1:4]))


def _evaluating_on_rank_zero_only_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=3)
    message = "rank 1 never evaluates"
    if rank == 0:  # a Lightning habit: `if trainer.is_global_zero: ...`
        state = loopkit.TrainState.create(torch.nn.Identity())
        try:
            loopkit.evaluate(loopkit.eval_step(lambda m, b: {"x": b.mean()}), state, [torch.ones(3)])
            message = "no error"
        except RuntimeError as e:
            message = str(e)
    else:
        time.sleep(8)  # past rank 0's timeout, without a collective
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    os._exit(0)  # (no shutdown: rank 0's group is broken)


@pytest.mark.slow
def test_evaluate_on_one_rank_fails_at_the_timeout_saying_what_to_do(tmp_path, bare_env):
    _spawn_and_join(_evaluating_on_rank_zero_only_worker, (_free_port(), str(tmp_path)))
    with open(os.path.join(tmp_path, "rank0.txt")) as f:
        message = f.read()
    assert "evaluate: the reduction of the means over the ranks failed on rank 0 of 2: every rank must reach it at " \
           "the same point (call evaluate on every rank, or evaluate(..., reduce=False)" in message, message


def _hand_written(synced: bool):
    """A step of one's own (Lightning's manual optimization) that averages the gradients over the ranks itself when
    ``synced`` (and says so, ``syncs_ranks``), or not; ``scale`` multiplies the loss (bound with functools.partial)."""
    def step(state, batch, scale=1.0):
        state = loopkit.state.fork(state)
        state.optimizer.zero_grad()
        loss = scale * ddp.mse(state.model, batch)
        loss.backward()
        if synced:
            for p in state.model.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= torch.distributed.get_world_size()
        state.optimizer.step()
        return state.evolve(step=state.step + 1), {"loss": loss.detach()}

    if synced:
        step.syncs_ranks = True
    return step


def _ranks_apart_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        batches = [data[i, rank] for i in range(ddp.STEPS)]  # each rank its own shard
        steps = {"plain": _hand_written(False), "synced": _hand_written(True), "train_step": loopkit.train_step(ddp.mse),
                 "with_ddp": loopkit.with_ddp(loopkit.train_step(ddp.mse)),
                 "plain_partial": functools.partial(_hand_written(False), scale=1.0),
                 "synced_partial": functools.partial(_hand_written(True), scale=1.0)}
        result = {}
        for name, step in steps.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state, _ = loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)), batches, epochs=2,
                                              progress=False)
            result[name] = {"params": {n: p.detach().clone() for n, p in state.model.named_parameters()},
                            "warned": [str(w.message) for w in caught if "neither with_ddp nor with_fsdp" in str(w.message)]}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_a_step_without_ddp_under_a_process_group_is_warned_of_once_a_fit_unless_it_syncs_itself(tmp_path, bare_env):
    """run_epochs under two ranks with a step that neither with_ddp nor with_fsdp makes data-parallel trains each
    rank apart (the replicas drift): every rank is warned, once a fit, naming the step and the fix. A step of one's
    own that averages the gradients itself says so (syncs_ranks = True) and is not warned of: its ranks stay alike,
    and train as with_ddp(train_step) does. Given as functools.partial(step, scale=...) the same: the flag was
    read off the partial only (a synced one warned of), the hint said to set partial.syncs_ranks and the warning
    named the step "partial": it names the function under the partial."""
    _spawn_and_join(_ranks_apart_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    for r in ranks:
        (plain,), (bare,), (partial,) = r["plain"]["warned"], r["train_step"]["warned"], r["plain_partial"]["warned"]
        assert "the step (_hand_written.<locals>.step)" in plain and "2 ranks" in plain
        assert "loopkit.with_ddp(loopkit.train_step(loss_fn))" in plain and "step.syncs_ranks = True" in plain
        assert "the step (train_step)" in bare and "wrap it in with_ddp" in bare
        assert "step.syncs_ranks = True" in partial and "partial.syncs_ranks" not in partial
        assert "the step (_hand_written.<locals>.step)" in partial and "(partial)" not in partial
        assert r["synced"]["warned"] == r["with_ddp"]["warned"] == r["synced_partial"]["warned"] == []
    for name in ("plain", "train_step"):  # what the warning is about
        assert any(not torch.equal(a, ranks[1][name]["params"][k]) for k, a in ranks[0][name]["params"].items())
    for r in ranks:
        for k, a in r["synced"]["params"].items():
            assert torch.equal(a, ranks[0]["synced"]["params"][k])
            assert torch.equal(r["synced_partial"]["params"][k], a)
            torch.testing.assert_close(a, r["with_ddp"]["params"][k], rtol=1e-6, atol=1e-7)


def test_init_with_world_size_one_makes_a_real_group_without_a_port(bare_env):
    assert distributed.init(rank=0, world_size=1, timeout=10) is True
    assert torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.init(rank=0, world_size=1) is True  # the active group's ranks: nothing to do
    assert distributed.init() is True
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(lambda m, b: m(b).pow(2).mean())))
    state, _ = step(state, torch.ones(4, 2))
    assert state.step == 1
    distributed.shutdown()
    assert not torch.distributed.is_initialized() and distributed.init() is False


def test_init_takes_an_init_method_url(bare_env):
    assert distributed.init(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=10) is True
    assert torch.distributed.is_initialized() and distributed.world_size() == 1


def test_local_rank_of_a_spawned_worker_is_the_environments_when_set(bare_env):
    bare_env.setenv("LOCAL_RANK", "3")  # several machines: the worker's rank on its own
    assert distributed.init(rank=0, world_size=1) is True
    assert distributed.local_rank() == 3


def test_init_refuses_ranks_that_contradict_the_active_group(bare_env):
    assert distributed.init(rank=0, world_size=1)
    message = r"rank=0, world_size=2 contradict the process group already initialised \(rank 0 of 1\)"
    with pytest.raises(ValueError, match=message):
        distributed.init(rank=0, world_size=2, master_port=29500)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rank": 0}, TypeError, r"pass both rank= and world_size= \(got rank=\)"),
    ({"world_size": 2}, TypeError, r"pass both rank= and world_size= \(got world_size=\)"),
    ({"master_port": 29500}, TypeError, r"pass both rank= and world_size= \(got master_port=\)"),
    ({"init_method": "tcp://127.0.0.1:29500"}, TypeError, r"pass both rank= and world_size= \(got init_method=\)"),
    ({"rank": True, "world_size": 2}, TypeError, "rank must be an int, got True"),
    ({"rank": 0.0, "world_size": 2}, TypeError, "rank must be an int, got 0.0"),
    ({"rank": "0", "world_size": 2}, TypeError, "rank must be an int, got '0'"),
    ({"rank": 0, "world_size": True}, TypeError, "world_size must be an int, got True"),
    ({"rank": 0, "world_size": 2.0}, TypeError, "world_size must be an int, got 2.0"),
    ({"rank": 0, "world_size": 0}, ValueError, "world_size must be at least 1, got world_size=0"),
    ({"rank": 0, "world_size": -2}, ValueError, "world_size must be at least 1, got world_size=-2"),
    ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, world_size=2\), got rank=2"),
    ({"rank": -1, "world_size": 2}, ValueError, r"rank must be in \[0, world_size=2\), got rank=-1"),
    ({"rank": 0, "world_size": 2}, ValueError,
     "world_size=2 needs master_port= .or MASTER_PORT in the environment.*does not pick"),
    ({"rank": 0, "world_size": 2, "master_port": 0}, ValueError, r"master_port must be in \[1, 65535\], got master_port=0"),
    ({"rank": 0, "world_size": 2, "master_port": 65536}, ValueError, r"master_port must be in \[1, 65535\]"),
    ({"rank": 0, "world_size": 2, "master_port": "29500"}, TypeError, "master_port must be an int, got '29500'"),
    ({"rank": 0, "world_size": 2, "master_port": True}, TypeError, "master_port must be an int, got True"),
    ({"rank": 0, "world_size": 2, "master_port": 29500, "master_addr": ""}, ValueError, "master_addr must be a host"),
    ({"rank": 0, "world_size": 2, "master_port": 29500, "master_addr": 127}, TypeError, "master_addr must be a host"),
    ({"rank": 0, "world_size": 2, "init_method": "127.0.0.1:29500"}, ValueError, "init_method must be a URL"),
    ({"rank": 0, "world_size": 2, "init_method": 29500}, TypeError, "init_method must be a URL"),
    ({"rank": 0, "world_size": 2, "init_method": "tcp://127.0.0.1:29500", "master_port": 29500}, TypeError,
     "give init_method= or master_addr=/master_port=, not both"),
    ({"rank": 0, "world_size": 2, "master_port": 29500, "timeout": 0}, ValueError, "timeout must be positive"),
])
def test_init_refuses_bad_ranks_and_addresses_before_making_a_group(bare_env, kwargs, error, message):
    with pytest.raises(error, match="loopkit.distributed.init: " + message):
        distributed.init(**kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("env, value, kwargs, message", [
    ("RANK", "1", {"rank": 0, "world_size": 2, "master_port": 29500}, "rank=0 contradicts the environment's RANK='1'"),
    ("WORLD_SIZE", "4", {"rank": 0, "world_size": 2, "master_port": 29500},
     "world_size=2 contradicts the environment's WORLD_SIZE='4'"),
    ("MASTER_PORT", "29501", {"rank": 0, "world_size": 2, "master_port": 29500},
     "master_port=29500 contradicts the environment's MASTER_PORT='29501'"),
    ("MASTER_ADDR", "10.0.0.1", {"rank": 0, "world_size": 2, "master_port": 29500, "master_addr": "127.0.0.1"},
     "master_addr='127.0.0.1' contradicts the environment's MASTER_ADDR='10.0.0.1'"),
    ("MASTER_PORT", "http", {"rank": 0, "world_size": 2}, "the environment's MASTER_PORT='http' is not a port"),
])
def test_init_refuses_arguments_that_contradict_the_environment(bare_env, env, value, kwargs, message):
    bare_env.setenv(env, value)
    with pytest.raises(ValueError, match="loopkit.distributed.init: " + message):
        distributed.init(**kwargs)
    assert not torch.distributed.is_initialized()


def _restore_after_fit_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        if rank == 0:  # a slow disk: rank 0's writes take a while
            from loopkit import checkpoint

            write = checkpoint.write

            def slow_write(*args, **kwargs):
                time.sleep(0.5)
                return write(*args, **kwargs)

            checkpoint.write = slow_write
        data = ddp.make_data(ddp.STEPS)
        step = loopkit.with_checkpointing(loopkit.with_ddp(loopkit.train_step(ddp.mse)), os.path.join(out, "ckpt"),
                                          every_n_epochs=1)
        state, _ = loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)), [data[i, rank] for i in
                                                                                    range(ddp.STEPS)], epochs=2,
                                      progress=False)
        back = loopkit.restore(ddp.sgd_state(ddp.make_model(seed=0)), os.path.join(out, "ckpt"))
        torch.save({"trained": state.step, "restored": back.step}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_every_rank_restores_the_fits_last_checkpoint_right_after_the_fit(tmp_path, bare_env):
    """run_epochs returned on rank 1 while rank 0 was still writing the fit's last checkpoint (only rank 0 writes):
    a restore right after the fit gave rank 1 an older one (step 10 of 15 in 3 of 3 runs), so the ranks held
    different models. Lightning's save ends in a barrier. Reference: the step the fit trained to."""
    _spawn_and_join(_restore_after_fit_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert [r["restored"] for r in ranks] == [r["trained"] for r in ranks] == [2 * ddp.STEPS] * 2


def _time_interval_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    import types

    from loopkit.transforms import checkpointing

    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        now = [0.0]  # rank 0's updates take 3 s, rank 1's none: only rank 0's clock passes the interval
        checkpointing.time = types.SimpleNamespace(monotonic=lambda: now[0])

        def loss(model, batch):
            now[0] += 3.0 if rank == 0 else 0.0
            return ddp.mse(model, batch)

        data = ddp.make_data(ddp.STEPS)
        step = loopkit.with_checkpointing(loopkit.with_ddp(loopkit.train_step(loss)), os.path.join(out, "ckpt"),
                                          train_time_interval=5, keep_last=None)
        state, _ = loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)),
                                      [data[i, rank] for i in range(ddp.STEPS)], epochs=2, progress=False)
        saved = [c.step for c in loopkit.checkpoint.list_checkpoints(os.path.join(out, "ckpt"))]
        torch.save({"trained": state.step, "saved": saved}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_train_time_interval_saves_where_rank_zeros_clock_says_on_every_rank(tmp_path, bare_env):
    """with_checkpointing(train_time_interval=5): a save is a collective (every rank's running means), so the ranks
    must agree on it; rank 0's clock decides, as Lightning broadcasts its decision. Reference: by hand, rank 0's
    updates ending at 3, 6, ..., 24 s from the fit's start at 0: saves at steps 2 (6 s), 4 (12 s), 6 (18 s), 8 (24 s);
    rank 1's clock, which never moves, would save none (and without the agreement the fit hangs or fails)."""
    _spawn_and_join(_time_interval_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert [r["trained"] for r in ranks] == [2 * ddp.STEPS] * 2
    assert [r["saved"] for r in ranks] == [[2, 4, 6, 8]] * 2


def _log_dir_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        logger = loopkit.CSVLogger(os.path.join(out, "logs"), "exp")
        if rank == 0:
            os.makedirs(os.path.join(out, "logs", "exp", "version_0"))  # an earlier run's folder
        step = loopkit.with_logging(loopkit.with_ddp(loopkit.train_step(ddp.mse)), logger, every_n_steps=1)
        loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)), [data[i, rank] for i in range(ddp.STEPS)],
                           epochs=1, progress=False)
        torch.save({"log_dir": logger.log_dir}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_every_rank_reports_the_run_folder_rank_zero_writes(tmp_path, bare_env):
    """Rank 1's log_dir was a guess of the next free version, made again at each read: once rank 0 had claimed
    its folder, the guess was the next run's (Lightning's trainer.log_dir is rank 0's). Reference: the folder
    holding metrics.csv."""
    _spawn_and_join(_log_dir_worker, (_free_port(), str(tmp_path)))
    dirs = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"))["log_dir"] for r in (0, 1)]
    assert dirs[0] == dirs[1] == os.path.join(str(tmp_path), "logs", "exp", "version_1")
    assert os.path.isfile(os.path.join(dirs[1], "metrics.csv"))


def _folds_log_dir_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        logger = loopkit.CSVLogger(os.path.join(out, "logs"), "cv")
        step = loopkit.with_logging(loopkit.with_ddp(loopkit.train_step(ddp.mse)), logger, every_n_steps=1)
        seen = []
        for fold in range(2):  # each fold from a fresh state: a run of its own
            loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=fold)),
                               [data[i, rank] for i in range(ddp.STEPS)], epochs=1, progress=False)
            seen.append(logger.log_dir)
        torch.save({"log_dirs": seen}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_every_rank_reports_the_new_version_a_fresh_fit_after_another_moves_the_logger_to(tmp_path, bare_env):
    """A logger reused for a second fold (a fresh state) moves to the next version on rank 0; rank 1 kept the folder
    agreed at the first fold. Reference: the folders holding each fold's metrics.csv."""
    _spawn_and_join(_folds_log_dir_worker, (_free_port(), str(tmp_path)))
    dirs = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"))["log_dirs"] for r in (0, 1)]
    expected = [os.path.join(str(tmp_path), "logs", "cv", f"version_{k}") for k in (0, 1)]
    assert dirs[0] == dirs[1] == expected
    assert all(os.path.isfile(os.path.join(d, "metrics.csv")) for d in expected)


class _AsksOnRankOne(loopkit.Callback):
    """Asks to stop at the end of the first epoch, on rank 1 only."""

    def on_epoch_end(self, state, record):
        if distributed.rank() == 1:
            self.should_stop = True


def _val_sets_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        val_sets = {"a": ddp.make_dataset(10, seed=1), "b": ddp.make_dataset(7, seed=2)}
        shards = {name: distributed.shard(ds, None, batch_size=3, shuffle=False, pad=False) for name, ds in val_sets.items()}
        metric = loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)})
        state, history = loopkit.run_epochs(
            loopkit.with_ddp(loopkit.train_step(ddp.mse)), ddp.sgd_state(ddp.make_model(seed=0)),
            [data[i, rank] for i in range(ddp.STEPS)], epochs=5, min_epochs=2, val=(metric, shards),
            callbacks=[_AsksOnRankOne()], progress=False)
        torch.save({"history": history, "params": {n: p.detach().clone() for n, p in state.model.named_parameters()}},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_ranks_validate_each_set_over_both_shards_and_hold_a_stop_off_until_min_epochs(tmp_path, bare_env):
    """Reference: the one-process mean over each whole validation set, with the weights the ranks ended with; a stop
    asked on rank 1 alone after the first epoch ends the fit on both at min_epochs=2."""
    _spawn_and_join(_val_sets_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert [len(r["history"]) for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]
    model = ddp.make_model(seed=0)
    model.load_state_dict(ranks[0]["params"])
    for name, seed, n in (("a", 1, 10), ("b", 2, 7)):
        x, y = ddp.make_dataset(n, seed=seed).tensors
        with torch.no_grad():
            whole = float(((model(x) - y) ** 2).mean(dim=1).double().mean())
        assert ranks[0]["history"][-1][f"val/mse/{name}"] == pytest.approx(whole, rel=1e-5)


# --- validation shards: one rank's empty, or every rank's ------------------------------------------


def _one_process_mse(params: dict, batches: list) -> float:
    model = ddp.make_model(seed=0)
    model.load_state_dict(params)
    state = loopkit.TrainState.create(model)
    return loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)}), state, batches)["mse"]


@pytest.mark.slow
def test_a_validation_set_smaller_than_the_world_size_validates_over_the_rank_that_holds_it(tmp_path):
    """1 validation sample over 2 ranks (shard pad=False): rank 1's shard is empty. run_epochs refused it on rank 1
    alone (rank 0 then died in a collective); evaluate took it. Reference: a one-process evaluate over the whole set
    with the weights each validation saw; the same for a factory's shard and for a fraction of a rank's own batches
    (none on rank 1)."""
    done = ddp.torchrun(str(tmp_path), ["val_one_sample"], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    ranks = ddp.load(str(tmp_path), "val_one_sample")
    assert [r["val_len"] for r in ranks] == [1, 0]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["fraction_history"] == ranks[1]["fraction_history"]
    val_set = ddp.make_dataset(1, seed=2)
    for r in ranks:
        assert r["warnings"] == []  # (no "read no batch" for rank 1's empty shard: rank 0's gave the means)
        assert [h["epoch"] for h in r["history"]] == [0, 1]
        for h, params in zip(r["history"], ranks[0]["epoch_params"], strict=True):
            whole = _one_process_mse(params, [val_set[:]])
            assert h["val/mse/given"] == pytest.approx(whole, rel=1e-6)
            assert h["val/mse/made"] == pytest.approx(whole, rel=1e-6)
        (h,) = r["fraction_history"]  # limit_val_batches=0.5: 1 of rank 0's 2 batches, none of rank 1's 0
        assert h["val/mse"] == pytest.approx(_one_process_mse(ranks[0]["fraction_params"][0], [val_set[:1]]), rel=1e-6)


@pytest.mark.slow
def test_a_validation_set_empty_on_every_rank_is_refused_by_every_rank(tmp_path):
    """Given as it is or made by a factory: the clear error on both ranks, within the timeout (no hang, no gloo
    error)."""
    done = ddp.torchrun(str(tmp_path), ["val_all_empty"], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    for r in ddp.load(str(tmp_path), "val_all_empty"):
        assert r["errors"]["given"].startswith("ValueError: run_epochs: val's data is empty (len() is 0) on every rank "
                                               "(2 ranks)")
        assert "what val's data, a factory" in r["errors"]["made"]
        assert "is empty (len() is 0) on every rank (2 ranks)" in r["errors"]["made"]


# --- the ranks agree: a callback's stop, and the step's collectives ----------------------------------------------


class _LocalMetric(loopkit.Callback):
    """A metric of the rank's own shard (an AUROC over it), as on_validation_end may add: it improves on rank 0 and
    worsens on rank 1."""

    def on_validation_end(self, state, metrics):
        return {"val/local": -float(state.epoch) if distributed.rank() == 0 else float(state.epoch)}


def _stop_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        stopper = loopkit.EarlyStopping("val/local", patience=1, mode="min")
        metric = loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)})
        _, history = loopkit.run_epochs(
            loopkit.with_ddp(loopkit.train_step(ddp.mse)), ddp.sgd_state(ddp.make_model(seed=0)),
            [data[i, rank] for i in range(ddp.STEPS)], epochs=6, val=(metric, [data[0, rank]]),
            callbacks=[_LocalMetric(), stopper], sanity_val_batches=0, progress=False)
        torch.save({"epochs": len(history), "state": stopper.state_dict(), "stopped_epoch": stopper.stopped_epoch,
                    "reason": stopper.stopping_reason.name}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_an_early_stopping_that_asks_on_one_rank_stops_every_ranks_copy_as_lightnings_reduces_its_decision(tmp_path,
                                                                                                          bare_env):
    """Lightning's EarlyStopping reduces its decision over the ranks (any rank) and every rank's copy says it stopped:
    rank 0's, which logs and saves, said "not stopped" (a fit relaunched from its checkpoint trained on)."""
    _spawn_and_join(_stop_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 2  # (rank 1's value worsened at its second validation)
    for found in ranks:
        assert found["state"]["should_stop"] and found["stopped_epoch"] == 1 and found["reason"] == "PATIENCE_EXHAUSTED"


def _unlike_steps_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        step = loopkit.with_ddp(loopkit.train_step(ddp.mse))
        if distributed.is_rank_zero():  # the usual pattern of a plain loop: the writer on rank 0 alone
            step = loopkit.with_logging(step, loopkit.CSVLogger(out), every_n_steps=1)
        data = ddp.make_data(ddp.STEPS)
        started = time.monotonic()
        try:
            loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)), [data[i, rank] for i in range(ddp.STEPS)],
                               epochs=1, progress=False)
        except RuntimeError as error:
            torch.save({"error": str(error), "seconds": time.monotonic() - started}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_a_step_wrapped_otherwise_on_one_rank_is_refused_at_once_naming_it(tmp_path, bare_env):
    """with_logging on rank 0 alone made a log point's means a collective rank 1 never joined: both ranks waited for
    the process group's timeout (30 minutes by default). Refused when the fit starts, on every rank, naming both."""
    _spawn_and_join(_unlike_steps_worker, (_free_port(), str(tmp_path)))
    for r in (0, 1):
        found = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        assert "the ranks have other steps (transforms, loggers)" in found["error"] and "with_logging" in found["error"]
        assert found["seconds"] < 10


def _check_same_worker(rank: int, port: int, out: str) -> None:
    from loopkit import _collective

    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    alike = {f"option {i}": [i] * 20 for i in range(20)}  # (long values, alike on both ranks)
    cases = {
        "values": {**alike, "epochs": 2 + rank},
        "keys": {**alike, "epochs": 2 + rank, **({"max_steps": 9} if rank else {"min_steps": 4})},
        "lacks": {**alike, **({} if rank else {"max_steps": 9})},
    }
    found = {}
    try:
        for name, values in cases.items():
            try:
                _collective.check_same(values, {"epochs": "other epochs", "max_steps": "another max_steps",
                                                "option 0": "other options"})
            except RuntimeError as error:
                found[name] = str(error)
        torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_the_ranks_disagreement_names_only_what_differs_also_where_their_keys_differ(tmp_path, bare_env):
    """Where the ranks' keys differed, the message printed every value of both ranks (all the options alike too);
    it names, as where the keys agree, the values that differ, and each rank's keys the other lacks."""
    _spawn_and_join(_check_same_worker, (_free_port(), str(tmp_path)))
    for r in (0, 1):
        found = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        assert found == {
            "values": "other epochs: rank 1 has {'epochs': 3}, rank 0 has {'epochs': 2}",
            "keys": "other epochs; another max_steps: rank 1 has {'epochs': 3, 'max_steps': 9} and no 'min_steps', "
                    "rank 0 has {'epochs': 2, 'min_steps': 4} and no 'max_steps'",
            "lacks": "another max_steps: rank 1 has no 'max_steps', rank 0 has {'max_steps': 9}",
        }, (r, found)


def test_mean_over_ranks_takes_numbers_and_names_a_metric_that_is_none():
    """A Python number (a metric a loss_fn made with .item()) raised AttributeError; in one process the mean is the
    value itself."""
    assert distributed.mean_over_ranks({"loss": torch.tensor([0.5]), "acc": 0.75, "n": 3}) == {"loss": 0.5, "acc": 0.75,
                                                                                                 "n": 3.0}
    with pytest.raises(TypeError, match="mean_over_ranks: metric 'bad' is not a number or a 1-element real tensor"):
        distributed.mean_over_ranks({"bad": "high"})
    with pytest.raises(TypeError, match=r"metric 'vec' .* of shape \(2,\)"):
        distributed.mean_over_ranks({"vec": torch.ones(2)})


class _ReadOnlyStop:
    """A callback of one's own whose should_stop is a read-only property: it asks on rank 0 after step 3."""

    def __init__(self):
        self.step = 0

    @property
    def should_stop(self):
        return distributed.rank() == 0 and self.step >= 3

    def on_batch_end(self, state, metrics):
        self.step = state.step


def _read_only_stop_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        state, _ = loopkit.run_epochs(loopkit.with_ddp(loopkit.train_step(ddp.mse)), ddp.sgd_state(ddp.make_model(seed=0)),
                                      [data[i, rank] for i in range(ddp.STEPS)], epochs=3, callbacks=[_ReadOnlyStop()],
                                      progress=False)
        torch.save({"step": state.step}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_a_stop_shared_over_the_ranks_leaves_a_read_only_should_stop_as_it_is(tmp_path, bare_env):
    """Telling rank 1's copy of the callback that rank 0's asked set its should_stop, which a property of one's own
    refuses: rank 1 raised and rank 0 waited for the timeout. Both ranks now stop at step 3."""
    _spawn_and_join(_read_only_stop_worker, (_free_port(), str(tmp_path)))
    assert [torch.load(os.path.join(tmp_path, f"rank{r}.pt"))["step"] for r in (0, 1)] == [3, 3]


class _TwoLocalMetrics(loopkit.Callback):
    """Two metrics of the rank's own shard: both improve on rank 0; on rank 1 ``val/a`` worsens from the first
    validation on, ``val/b`` from the third."""

    def on_validation_end(self, state, metrics):
        e = float(state.epoch)
        return {"val/a": -e if distributed.rank() == 0 else e,
                "val/b": -e if distributed.rank() == 0 or e < 3 else e}


def _later_stop_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        first, later = (loopkit.EarlyStopping(m, patience=0, mode="min") for m in ("val/a", "val/b"))
        metric = loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)})
        _, history = loopkit.run_epochs(
            loopkit.with_ddp(loopkit.train_step(ddp.mse)), ddp.sgd_state(ddp.make_model(seed=0)),
            [data[i, rank] for i in range(ddp.STEPS)], epochs=8, min_epochs=4, val=(metric, [data[0, rank]]),
            callbacks=[_TwoLocalMetrics(), first, later], sanity_val_batches=0, progress=False)
        torch.save({"epochs": len(history), "said": [(s.should_stop, s.stopped_epoch, s.stopping_reason.name)
                                                     for s in (first, later)]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_while_min_epochs_holds_an_earlier_one_reaches_every_ranks_copy_too(tmp_path,
                                                                                                    bare_env):
    """The stops were shared once a fit, at the first check where a rank asked: a second EarlyStopping that asked on
    rank 1 alone while min_epochs held the first one's stop said "not stopped" on rank 0 (whose copy logs and
    saves). Every rank's copy of each now says it stopped, and why, at the epoch of the last check where a rank
    asked, as Lightning's, which reduces the decision at each check and sets ``stopped_epoch`` where any rank asks:
    rank 1 asks at epochs 1, 2, 3 (``val/a``) and 2, 3 (``val/b``) while min_epochs holds the stop; rank 0's copies
    had kept the first ask's epochs (1 and 2)."""
    _spawn_and_join(_later_stop_worker, (_free_port(), str(tmp_path)))
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 4  # (held until min_epochs)
    for found in ranks:
        assert found["said"] == [(True, 3, "PATIENCE_EXHAUSTED"), (True, 3, "PATIENCE_EXHAUSTED")]


def _stop_held_by_checkpoint_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    try:
        data = ddp.make_data(ddp.STEPS)
        batches = [data[i, rank] for i in range(ddp.STEPS)]
        metric = loopkit.eval_step(lambda m, b: {"mse": ddp.mse(m, b)})
        found = {}
        folder = os.path.join(out, "checkpoints")
        stopper = loopkit.EarlyStopping("val/a", patience=0, mode="min")  # (asks on rank 1 at the second epoch's end)
        step = loopkit.with_checkpointing(loopkit.with_ddp(loopkit.train_step(ddp.mse)), folder, every_n_epochs=1)
        _, history = loopkit.run_epochs(step, ddp.sgd_state(ddp.make_model(seed=0)), batches, epochs=4,
                                        val=(metric, [data[0, rank]]), callbacks=[_TwoLocalMetrics(), stopper],
                                        sanity_val_batches=0, progress=False)
        newest = loopkit.restore(ddp.sgd_state(ddp.make_model(seed=0)), folder)
        held = newest.extras["callbacks/" + stopper.state_key]
        again = loopkit.EarlyStopping("val/a", patience=0, mode="min")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the restored callback that asks to stop at once: said so)
            _, relaunched = loopkit.run_epochs(step, newest, batches, epochs=4, val=(metric, [data[0, rank]]),
                                               callbacks=[_TwoLocalMetrics(), again], sanity_val_batches=0,
                                               progress=False)
        torch.save({"epochs": len(history), "step": newest.step, "held": held["should_stop"],
                    "relaunched": len(relaunched)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_a_stop_asked_on_one_rank_at_a_validation_is_held_by_the_checkpoint_saved_there(tmp_path, bare_env):
    """A stop rank 1's EarlyStopping asked at an epoch's validation was told to rank 0's copy at the next loop check,
    after the epoch's checkpoint: rank 0's checkpoint (every rank restores it) said "not stopped", and a fit
    relaunched from it trained on. It is now told before the callbacks' counters are kept."""
    _spawn_and_join(_stop_held_by_checkpoint_worker, (_free_port(), str(tmp_path)), seconds=90)
    for r in (0, 1):  # (as one process whose EarlyStopping asked holds it: stopped after 2 epochs, and says so)
        found = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        assert found == {"epochs": 2, "step": 2 * ddp.STEPS, "held": True, "relaunched": 0}, (r, found)


def _fit_each_case(cases, rank: int, out: str, epochs: int, with_params: bool = False) -> None:
    """Fit each case's step on this rank's batches, save per case its step count (and parameters) or its error and
    how long it took to ``out/rank{rank}.pt``, then shut the process group down."""
    data = ddp.make_data(ddp.STEPS)
    found = {}
    try:
        for name, make in cases.items():
            started = time.monotonic()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (torch's word that broadcast_buffers is deprecated)
                    state, _ = loopkit.run_epochs(make(), ddp.sgd_state(ddp.make_model(seed=0)),
                                                  [data[i, rank] for i in range(ddp.STEPS)], epochs=epochs,
                                                  progress=False)
                found[name] = {"step": state.step}
                if with_params:
                    found[name]["params"] = {n: p.detach().clone() for n, p in state.model.named_parameters()}
            except RuntimeError as error:
                found[name] = {"error": str(error), "seconds": time.monotonic() - started}
        torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def _unlike_options_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    mine = (lambda zero, one: zero if rank == 0 else one)
    base = loopkit.with_ddp(loopkit.train_step(ddp.mse))
    cases = {
        "log": lambda: loopkit.with_logging(base, loopkit.CSVLogger(os.path.join(out, "logs")),
                                            every_n_steps=mine(2, 3)),
        "ckpt": lambda: loopkit.with_checkpointing(base, os.path.join(out, "ckpt"), every_n_epochs=mine(2, 3)),
        "accum": lambda: loopkit.with_ddp(loopkit.with_grad_accum(loopkit.train_step(ddp.mse), every=mine(2, 3))),
        # the same options on every rank, with_profiler on rank 0 alone: trains
        "alike": lambda: mine(lambda s: loopkit.with_profiler(s, os.path.join(out, "prof"), wait=0, warmup=0, active=1),
                              lambda s: s)(loopkit.with_logging(base, loopkit.CSVLogger(os.path.join(out, "logs2")),
                                                                every_n_steps=2)),
    }
    _fit_each_case(cases, rank, out, epochs=1)


@pytest.mark.slow
def test_transform_options_that_differ_between_ranks_are_refused_at_once_naming_them(tmp_path, bare_env):
    """The fit-start check compared the transforms' names alone: with_logging(every_n_steps=2) on rank 0 and 3 on
    rank 1 (a log point's means), with_checkpointing's every_n_epochs (a save's gather), with_grad_accum's every
    (the gradients' all-reduce) made collectives at other steps, and both ranks waited for the process group's
    timeout. Refused when the fit starts, on every rank, naming the option and both values."""
    _spawn_and_join(_unlike_options_worker, (_free_port(), str(tmp_path)), seconds=90)
    named = {"log": "'with_logging every_n_steps': 3}, rank 0 has {'with_logging every_n_steps': 2}",
             "ckpt": "'with_checkpointing every_n_epochs': 3}, rank 0 has {'with_checkpointing every_n_epochs': 2}",
             "accum": "'with_grad_accum every': 3}, rank 0 has {'with_grad_accum every': 2}"}
    for r in (0, 1):
        found = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        for case, values in named.items():
            assert "the ranks have other options of the transforms" in found[case]["error"], (r, case, found[case])
            assert f"rank 1 has {{{values}" in found[case]["error"] and found[case]["seconds"] < 10
        assert found["alike"] == {"step": ddp.STEPS}


def allreduce_hook(state, bucket):
    """A comm hook of the name of torch's ``default_hooks.allreduce_hook``, in another module (computing the same)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(state, bucket)


def _callables_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    mine = (lambda zero, one: zero if rank == 0 else one)
    ddp_step = lambda: loopkit.with_ddp(loopkit.train_step(ddp.mse))  # noqa: E731
    pruned = lambda schedule: loopkit.with_pruning(ddp_step(), amount=0.5, schedule=schedule)  # noqa: E731
    cases = {  # refused: two functions of one name, on two ranks
        "hook": lambda: loopkit.with_ddp(loopkit.train_step(ddp.mse),
                                         comm_hook=mine(default_hooks.allreduce_hook, allreduce_hook)),
        "lambda": lambda: pruned(mine(lambda step: 0.0,
                                      lambda step: 1.0)),
        # trained: one lambda (one line of one module) on both ranks
        "lambda_same": lambda: pruned(lambda step: float(step >= 2)),
    }
    _fit_each_case(cases, rank, out, epochs=1)


@pytest.mark.slow
def test_callable_options_are_agreed_by_module_name_and_a_lambdas_line(tmp_path, bare_env):
    """Callable options were compared over the ranks by name alone: with_ddp's comm_hook by its qualname (torch's
    allreduce_hook on rank 0 and a function of that name in another module on rank 1), with_pruning's schedule as
    module.<lambda> (a lambda that never prunes on rank 0, one that prunes at once on rank 1), and each rank trained
    with its own. Refused now on every rank, naming the option and both values; one lambda on both ranks trains."""
    _spawn_and_join(_callables_worker, (_free_port(), str(tmp_path)), seconds=90)
    named = {"hook": f"{{'with_ddp comm_hook': '{__name__}.allreduce_hook'}}, rank 0 has {{'with_ddp comm_hook': "
                     "'torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook'}",
             "lambda": "{'with_pruning schedule': "}
    for r in (0, 1):
        found = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        for case, values in named.items():
            assert "the ranks have other options of the transforms" in found[case]["error"], (r, case, found[case])
            assert f"rank 1 has {values}" in found[case]["error"] and found[case]["seconds"] < 10, found[case]
        lines = found["lambda"]["error"].split("rank 1 has ")[1]
        assert f"'{__name__}._callables_worker.<locals>." in lines and lines.count("<lambda> (line ") == 2
        assert found["lambda_same"] == {"step": ddp.STEPS}


def _agreement_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.set_num_threads(1)
    distributed.init(rank=rank, world_size=2, master_port=port, timeout=30)
    mine = (lambda zero, one: zero if rank == 0 else one)
    fsdp = lambda: loopkit.with_fsdp(loopkit.train_step(ddp.mse), shard={torch.nn.Linear})  # noqa: E731
    accum = lambda every: loopkit.with_ddp(  # noqa: E731
        loopkit.with_grad_accum(loopkit.train_step(ddp.mse), every=every))
    cases = {  # refused: under FSDP each made other collectives (gloo aborted a rank: a "collective mismatch")
        "clip": lambda: loopkit.with_grad_clip(fsdp(), max_norm=0.01, max_value=mine(None, 0.001)),
        "shard": lambda: loopkit.with_fsdp(loopkit.train_step(ddp.mse), shard=mine({torch.nn.Linear}, ())),
        "mp": lambda: loopkit.with_fsdp(loopkit.train_step(ddp.mse), shard={torch.nn.Linear},
                                        mp_policy=mine(MixedPrecisionPolicy(param_dtype=torch.bfloat16), None)),
        # trained: other spellings of one option, each against the same spelling on both ranks
        "accum": lambda: accum(mine(2, {0: 2})), "accum_same": lambda: accum(2),
        "sched": lambda: accum(mine({0: 2, 1: 2}, {0: 2})), "sched_same": lambda: accum({0: 2}),
        "buffers": lambda: loopkit.with_ddp(loopkit.train_step(ddp.mse), broadcast_buffers=mine(None, True)),
        "buffers_same": lambda: loopkit.with_ddp(loopkit.train_step(ddp.mse)),
    }
    _fit_each_case(cases, rank, out, epochs=2, with_params=True)


@pytest.mark.slow
def test_options_that_decide_collectives_are_agreed_as_they_act(tmp_path, bare_env):
    """with_fsdp's shard and mp_policy and with_grad_clip's max_value were not compared when the fit started: a rank
    with another made other collectives (another fully_shard group, gathers in another dtype, a second all-reduce of
    the norm) and gloo aborted a rank. Refused now on every rank, naming the option. And options spelt otherwise that
    act alike (with_grad_accum every=2 and {0: 2}, a schedule's entry repeating the factor before it, with_ddp's
    broadcast_buffers=None, torch's default) were refused: they train now, as the same spelling on both ranks does."""
    _spawn_and_join(_agreement_worker, (_free_port(), str(tmp_path)), seconds=120)
    # torch's own default (2.13's None: True; before, None was a falsy flag, and refused next to True)
    none_is_default = inspect.signature(DistributedDataParallel).parameters["broadcast_buffers"].default is None
    named = {"clip": "'with_grad_clip max_value': 0.001}, rank 0 has {'with_grad_clip max_value': None}",
             "shard": "'with_fsdp shard': ()}, rank 0 has {'with_fsdp shard': ('torch.nn.modules.linear.Linear',)}",
             "mp": "'with_fsdp mp_policy': {'param_dtype': None, 'reduce_dtype': None}}, rank 0 has "
                   "{'with_fsdp mp_policy': {'param_dtype': 'torch.bfloat16', 'reduce_dtype': 'torch.bfloat16'}}"}
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in (0, 1)]
    for found in ranks:
        for case, values in named.items():
            assert "the ranks have other options of the transforms" in found[case]["error"], (case, found[case])
            assert f"rank 1 has {{{values}" in found[case]["error"] and found[case]["seconds"] < 10
        alike = ("accum", "sched") + (("buffers",) if none_is_default else ())
        assert ("error" in found["buffers"]) is not none_is_default
        for case in alike:
            assert "error" not in found[case], found[case]
            assert found[case]["step"] == found[f"{case}_same"]["step"] == {"buffers": 2}.get(case, 1) * ddp.STEPS
            for name, value in found[f"{case}_same"]["params"].items():
                assert torch.equal(found[case]["params"][name], value), (case, name)
