"""The worker that tests/transforms/test_ddp.py and tests/test_distributed.py start with torchrun.

``torchrun --nproc-per-node 2 tests/_ddp_script.py OUT_DIR SCENARIO [SCENARIO ...]`` runs the
scenarios one after the other in one process group (gloo, 20 s collective timeout) and writes
``OUT_DIR/<scenario>_rank<r>.pt`` with what each rank saw. The tests build the single-process
references themselves from the same data (``make_data``, ``make_model``), so this file holds
no expected values. Scenarios:

- ``plain``: ``with_ddp(train_step)``, rank 1 starting from other weights (DDP broadcasts rank 0's).
- ``pure``, ``pure_accum``, ``pure_two_heads``: steps that are not donated (each call trains a copy of the state it
  is given, which is recorded before and after), against the same steps donated and a hand-written DDP loop; plain,
  inside ``with_logging`` and ``with_checkpointing``, under ``with_grad_accum`` (and a flush), and with
  ``find_unused_parameters`` (two heads; SparseAdam over a sparse embedding).
- ``accum``: ``with_grad_accum(with_ddp(...), every=2)`` with a comm hook counting all-reduces.
- ``accum_outer``: ``with_ddp(with_grad_clip(with_grad_hook(with_grad_accum(...))))``, the other order (the hook
  reports the norm of the gradients it sees).
- ``bucket_views``: ``with_grad_accum(with_grad_clip(with_ddp(..., gradient_as_bucket_view=True)))``:
  per-micro-batch clipping, whose stashed gradients are views the next backward writes.
- ``static_graph``: ``with_grad_accum(with_ddp(..., static_graph=True), every=2)``.
- ``flush``: ``with_grad_accum(every=3)`` over 4 calls, then ``flush``: the partial group's
  gradients, kept local under ``no_sync``, are averaged over the ranks before the update.
- ``two_heads``: a body and two heads chosen by the data, ``find_unused_parameters=True``,
  ``every=2`` over 3 batches a rank (``run_epochs`` flushes the partial last group, in which
  rank 0 uses head ``a`` and rank 1 head ``b``): ``inner`` is ``with_grad_accum(with_ddp(...))``,
  ``outer`` ``with_ddp(with_grad_accum(...))``, ``big_b`` the first with a larger head ``b`` (the
  ranks' gradients of the partial group then have different sizes), and ``none_on_rank1`` flushes
  by hand after dropping rank 1's gradients, as micro-batches that used no parameter leave them.
- ``nan_skip``: ``with_nan_guard(skip)``; rank 1 sees NaN inputs at call 1 and a NaN loss with
  finite gradients at call 3 (only an agreed flag keeps the ranks together there).
- ``nan_raise``: ``with_nan_guard(raise)``, a NaN loss on rank 1 only at call 1: every rank raises.
- ``fp16``: float16 ``with_amp`` with an infinite input on rank 1 at call 1.
- ``fit``: ``run_epochs`` over ``shard``-ed data (23 samples: padded) with validation over 7
  samples (``pad=False``), then ``evaluate`` of the same.
- ``val_one_sample``: ``run_epochs`` validating over a set of 1 sample, ``shard``-ed with ``pad=False`` (rank 1's
  shard is empty), given as it is and made by a factory each epoch, and over a rank's own batches, none on rank 1,
  with a fraction ``limit_val_batches``; ``val_all_empty``: a validation set empty on every rank (refused by every
  rank).
- ``validating_evaluate``: ``with step.validating(state): loopkit.evaluate(...)`` of a BatchNorm model whose ranks'
  running statistics differ (2 updates under ``with_ddp``), and ``evaluate`` after the block.
- ``stop_one_rank``: a callback asks to stop on rank 0 only; ``stop_votes``: the votes on the stop of fits without
  callbacks, with monitors that never stop, with those and a callback that stops on rank 0; ``uneven``: 3 batches on rank 0, 2
  on rank 1; ``apart``: rank 1 starts from step 2 (each refused before a step, by every rank).
- ``signal_one_rank``: rank 1 alone gets SIGTERM in its 3rd step; ``signal_apart``: rank 0 gets it in
  its 2nd step, rank 1 in its 3rd. Every rank stops after the same step and saves (``with_checkpointing``
  on the stop); the run is then resumed from that checkpoint, in the same process, to its end.
  ``signal_in_group``: the same under ``with_grad_accum(every=2)``, rank 0 signalled in its 2nd call.
  These vote every step; ``signal_spaced_votes`` (100 batches an epoch) spaces its votes as run_epochs does.
- ``lr_find_ranks``: ``lr_find`` under ``with_ddp`` and under ``with_fsdp``, each rank its own batches (rank 1's
  losses diverge sooner), then a fit of ``result.apply(state)``.
- ``loss_error``: the loss_fn raises on every rank, at a fit's first call, then at another's 4th, whose
  ``state_at_error`` trains on to the epoch's end.
- ``kept_sampler``: ``shard`` of DataLoaders with samplers of their own (``kept_loader``: a
  ``SubsetRandomSampler`` of a split, a ``WeightedRandomSampler``), states seeded apart and each rank's
  global RNG elsewhere; each rank's indices of 2 epochs, through ``run_epochs`` and by hand (unpadded).
- ``unfreeze``: ``run_epochs`` of a model whose first layer is frozen until epoch 1 (docs/from_lightning.md's
  ``BackboneFinetuning`` recipe: ``requires_grad_(True)`` and ``add_param_group``), 3 epochs of 2 batches, and the same
  run stopped after epoch 1 (before the unfreeze) and after epoch 2, each resumed from its state dict to the end.
- ``flags_apart``: ``requires_grad`` set otherwise on each rank, mid-fit (each rank rebuilds its wrapper) and at a
  first call: refused on every rank, the state left usable (the flags put alike, the fit goes on); then the ranks'
  optimizers apart at a first call (rank 1's lr, class, or a group without the last bias): refused alike, and the
  lr mended, the fit goes on.
  ``flags_apart_epoch``: ``unfreeze``'s fit with the layer unfrozen on rank 1 alone in ``on_epoch_start``, then a fit
  whose last bias rank 1 froze alone before it: refused at the epoch's start, the state left usable.
- ``resume``: ``run_epochs`` with ``with_checkpointing(every_n_steps=1)`` from the newest
  checkpoint in ``OUT_DIR/ckpt``; with ``LOOPKIT_TEST_DIE=N`` rank 1 of the first attempt exits
  hard in batch N + 1, after the checkpoint of batch N (written once batch N's hooks have run).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch
from torch import nn

if not __package__:  # run as a file (torchrun's workers): the repository's root on the path, for tests' helpers
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._finetune import UNFREEZE_AT, UNFREEZE_EPOCHS, Unfreeze, frozen_state  # noqa: E402

STEPS = 4
BATCH = 4
D_IN, D_OUT = 3, 2


def make_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT))


def make_data(calls: int, world: int = 2) -> torch.Tensor:
    """``[call, rank, sample, feature]``: inputs and targets side by side in the last axis."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(calls, world, BATCH, D_IN + D_OUT, generator=gen)


def make_dataset(n: int, seed: int) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, D_IN, generator=gen), torch.randn(n, D_OUT, generator=gen))


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        batch = batch[:, :D_IN], batch[:, D_IN:]
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def sgd_state(model: nn.Module, seed: int = 0, momentum: float = 0.9) -> Any:
    import loopkit

    return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), seed=seed)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _loop(step: Any, state: Any, batches: list[Any]) -> tuple[Any, list[dict[str, float]]]:
    seen = []
    for batch in batches:
        state, metrics = step(state, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
    return state, seen


def plain(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(STEPS)
    state = sgd_state(make_model(seed=rank))  # rank 1 starts elsewhere: DDP broadcasts rank 0's weights
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
    seen, averaged = [], []
    for i in range(STEPS):
        state, metrics = step(state, data[i, rank])
        seen.append({k: float(v) for k, v in metrics.items()})
        averaged.append(loopkit.distributed.mean_over_ranks(metrics))
    return {"params": _params(state.model), "metrics": seen, "averaged": averaged, "step": state.step,
            "keys": list(state.model.state_dict())}


def _counting_hook(counter, bucket):  # no annotations: DDP checks them, and these would be strings
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter.append(1)
    return allreduce_hook(None, bucket)


def accum(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(2 * STEPS)
    counter: list[int] = []
    inner = loopkit.with_ddp(loopkit.train_step(mse), comm_hook=_counting_hook, comm_state=counter)
    step = loopkit.donate(loopkit.with_grad_accum(inner, every=2))
    state = sgd_state(make_model())
    counts, steps = [], []
    for i in range(2 * STEPS):
        state, _ = step(state, data[i, rank])
        counts.append(len(counter))
        steps.append(state.step)
    return {"params": _params(state.model), "counts": counts, "steps": steps}


def accum_scheduled(rank: int) -> dict[str, Any]:
    """``with_grad_accum(every={0: 2, 1: 4})`` in a loop of one's own: 4 calls in epoch 0, then 4 in epoch 1."""
    import loopkit

    data = make_data(2 * STEPS)
    counter: list[int] = []
    inner = loopkit.with_ddp(loopkit.train_step(mse), comm_hook=_counting_hook, comm_state=counter)
    step = loopkit.donate(loopkit.with_grad_accum(inner, every={0: 2, 1: 4}))
    state = sgd_state(make_model())
    counts, steps = [], []
    for i in range(2 * STEPS):
        if i == STEPS:
            state = state.evolve(epoch=1, batch_index=0)
        state, _ = step(state, data[i, rank])
        counts.append(len(counter))
        steps.append(state.step)
    return {"params": _params(state.model), "counts": counts, "steps": steps}


def accum_outer(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(2 * STEPS)
    inner = loopkit.with_grad_accum(loopkit.train_step(mse), every=2)

    def hook(state):  # with_grad_hook sees what the clip sees: the group's gradient averaged over the ranks
        return {"hook/norm": torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in state.model.parameters()]))}

    step = loopkit.donate(loopkit.with_ddp(loopkit.with_grad_clip(loopkit.with_grad_hook(inner, hook), max_norm=0.3)))
    state = sgd_state(make_model())
    state, seen = _loop(step, state, [data[i, rank] for i in range(2 * STEPS)])
    return {"params": _params(state.model), "metrics": seen}


def bucket_views(rank: int) -> dict[str, Any]:
    """Per-micro-batch clipping under accumulation, DDP's gradients being views of its buckets."""
    import loopkit

    data = make_data(2 * STEPS)
    inner = loopkit.with_grad_clip(loopkit.with_ddp(loopkit.train_step(mse), gradient_as_bucket_view=True), max_norm=0.3)
    step = loopkit.donate(loopkit.with_grad_accum(inner, every=2))
    state, _ = _loop(step, sgd_state(make_model()), [data[i, rank] for i in range(2 * STEPS)])
    return {"params": _params(state.model)}


def static_graph(rank: int) -> dict[str, Any]:
    """``static_graph=True`` under accumulation: the first micro-step (local otherwise) must all-reduce."""
    import loopkit

    data = make_data(2 * STEPS)
    step = loopkit.donate(loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse), static_graph=True), every=2))
    state, _ = _loop(step, sgd_state(make_model()), [data[i, rank] for i in range(2 * STEPS)])
    return {"params": _params(state.model)}


def flush(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(4)
    step = loopkit.donate(loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse)), every=3))
    state = sgd_state(make_model())
    state, _ = _loop(step, state, [data[i, rank] for i in range(4)])
    state, _ = step.flush(state)  # a partial group of one micro-batch, whose gradient stayed on each rank
    return {"params": _params(state.model), "step": state.step}


class SparseNet(nn.Module):
    """An ``nn.Embedding(sparse=True)`` (its gradient: 1 sparse dimension, the rows) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb, self.head = nn.Embedding(6, 3, sparse=True), nn.Linear(3, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb((x[:, 0].abs() * 3).long() % 6))


class RoutedSparseNet(SparseNet):
    """SparseNet whose embedding a batch may leave out (``use=False``: the head reads zeros)."""

    def forward(self, x: torch.Tensor, use: bool = True) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) if use else self.head(torch.zeros(len(x), 3))


def sparse_flush(rank: int) -> dict[str, Any]:
    """A partial group flushed with a sparse gradient, SGD with momentum (which takes the layout as it is)."""
    import loopkit

    data = make_data(3)
    step = loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse)), every=2)
    state = sgd_state(SparseNet(), momentum=0.9)
    state, history = loopkit.run_epochs(step, state, [data[i, rank] for i in range(3)], epochs=2, progress=False)

    # SparseAdam (sparse gradients only), the flushed micro-batch of rank 1 not using the embedding: its mean must
    # come sparse on rank 1 too
    def routed(model, batch):
        x, use = batch
        return (model(x, use) ** 2).mean()

    model = RoutedSparseNet()
    optimizer = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.1)
    other = loopkit.TrainState.create(model, optimizer)
    sparse_step = loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(routed), find_unused_parameters=True), every=2)
    batches = [(data[i, rank], not (rank == 1 and i == 2)) for i in range(3)]
    other, _ = loopkit.run_epochs(sparse_step, other, batches, epochs=1, progress=False)
    return {"params": _params(state.model), "step": state.step, "sparse_adam": _params(other.model),
            "sparse_adam_step": other.step}


def stop_in_group(rank: int) -> dict[str, Any]:
    """A callback's stop (a Timer's, say) inside an accumulation group: the fit goes on to the group's end, as a
    graceful stop does (the other ranks' partial gradients, kept local, would be in no checkpoint)."""
    import loopkit

    class StopAt(loopkit.Callback):  # asks at one batch only (a "loss below a threshold" rule): the ask is kept
        def __init__(self, at):
            self.at = at

        def on_batch_end(self, state, metrics):
            self.should_stop = state.batch_index == self.at

    data = make_data(8)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    step = loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse)), every=3)
    state, history = loopkit.run_epochs(step, sgd_state(make_model()), [data[i, rank] for i in range(8)], epochs=2,
                                        progress=False, callbacks=[StopAt(4)])
    # asked at an epoch's last batch, inside a group its flush ends: the stop's validation still comes
    _, last = loopkit.run_epochs(step, sgd_state(make_model()), [data[i, rank] for i in range(5)], epochs=2,
                                 progress=False, callbacks=[StopAt(5)], val=(evaluator, [data[7, rank]]),
                                 val_every_n_epochs=None, val_every_n_steps=100, sanity_val_batches=0)
    return {"params": _params(state.model), "step": state.step, "batch_index": state.batch_index,
            "epochs": len(history), "last": last}


class TwoHeads(nn.Module):
    """A body and two heads: each ``BATCH``-row chunk of the input goes through head ``a`` when its first
    input is > 0, else through head ``b`` (a branch chosen by the data: ``find_unused_parameters``). On a
    rank a batch is one chunk; the single-process reference over the concatenated batches routes each
    rank's chunk as that rank did. ``big_b``: head ``b`` has more parameters than ``a``."""

    def __init__(self, big_b: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.body, self.a = nn.Linear(D_IN, 8), nn.Linear(8, D_OUT)
            self.b = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, D_OUT)) if big_b else nn.Linear(8, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return torch.cat([(self.a if float(c[0, 0]) > 0 else self.b)(hc) for c, hc in zip(x.split(BATCH), h.split(BATCH))])


def two_head_data(heads_of_batch: tuple = ((1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))) -> torch.Tensor:
    """3 batches a rank (``[batch, rank, sample, feature]``): both ranks use head a in batch 0, head b in
    batch 1; in batch 2 (the partial group under ``every=2``) rank 0 uses a, rank 1 uses b (the signs of
    ``heads_of_batch``: a for 1, b for -1)."""
    data = make_data(3)
    for i, heads in enumerate(heads_of_batch):
        for r, sign in enumerate(heads):
            data[i, r, 0, 0] = sign
    return data


#: head a in batches 0 and 1 on both ranks, the flushed batch 2 through a on rank 0 and b on rank 1
A_THEN_B = ((1.0, 1.0), (1.0, 1.0), (1.0, -1.0))


def two_heads(rank: int) -> dict[str, Any]:
    import loopkit

    batches = [b for b in two_head_data()[:, rank]]
    out: dict[str, Any] = {}
    for name, big_b in (("inner", False), ("outer", False), ("big_b", True)):
        if name == "outer":
            step = loopkit.with_ddp(loopkit.with_grad_accum(loopkit.train_step(mse), every=2), find_unused_parameters=True)
        else:
            step = loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse), find_unused_parameters=True), every=2)
        state, _ = loopkit.run_epochs(step, sgd_state(TwoHeads(big_b)), batches, epochs=1, progress=False)
        out[name] = {"params": _params(state.model), "step": state.step}
    step = loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse), find_unused_parameters=True), every=2)
    a_then_b = [b for b in two_head_data(A_THEN_B)[:, rank]]  # (the next epoch's first group uses no head b)
    # (plain SGD: head b, unused by every rank in the next group, gets a zero gradient there, see flush_, where one
    # process leaves it None: momentum would move it)
    state, _ = loopkit.run_epochs(step, sgd_state(TwoHeads(), momentum=0.0), a_then_b, epochs=2, progress=False)
    out["two_epochs"] = {"params": _params(state.model), "step": state.step}
    step = loopkit.donate(loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse), find_unused_parameters=True), every=2))
    state, _ = _loop(step, sgd_state(TwoHeads()), batches)
    if rank == 1:  # the partial group left no gradient on this rank
        for p in state.model.parameters():
            p.grad = None
    state, _ = step.flush(state)
    out["none_on_rank1"] = {"params": _params(state.model), "step": state.step}
    return out


def _observed(state: Any) -> dict[str, Any]:
    """Copies of what a caller sees of ``state``: its state dict (parameters, buffers, optimizer and scheduler
    state, counters, RNG, extras) and its gradients (a group's local ones)."""
    import copy

    return {"state_dict": _dense(copy.deepcopy(state.state_dict())),
            "grads": {n: None if p.grad is None else _dense(p.grad.clone()) for n, p in state.model.named_parameters()}}


def _dense(tree: Any) -> Any:
    """``tree`` with each sparse tensor as ``("sparse", its dense values)`` (torch.equal takes no sparse tensor)."""
    if isinstance(tree, torch.Tensor) and tree.is_sparse:
        return ("sparse", tree.to_dense())
    if isinstance(tree, dict):
        return {k: _dense(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_dense(v) for v in tree)
    return tree


def _pure_loop(step: Any, state: Any, batches: list[Any]) -> tuple[Any, list[dict[str, Any]]]:
    """``step`` (not donated) over ``batches``, each call's given state observed before and after it."""
    calls = []
    for batch in batches:
        before = _observed(state)
        new, metrics = step(state, batch)
        calls.append({"before": before, "after": _observed(state), "loss": float(metrics["loss"]) if metrics else None})
        state = new
    return state, calls


def _raw_ddp(rank: int, batches: list[Any], every: int = 1, model: nn.Module | None = None,
             **options: Any) -> dict[str, torch.Tensor]:
    """A hand-written DistributedDataParallel + SGD loop (momentum 0.9): each loss divided by ``every``, the first
    ``every - 1`` micro-batches of a group under ``no_sync``."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    model = model if model is not None else make_model(seed=rank)
    net = DistributedDataParallel(model, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, batch in enumerate(batches):
        last = (i + 1) % every == 0
        with contextlib.nullcontext() if last else net.no_sync():
            (mse(net, batch) / every).backward() if every > 1 else mse(net, batch).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
    return _params(model)


def pure(rank: int, out_dir: str) -> dict[str, Any]:
    """``with_ddp(train_step)`` not donated in a loop of one's own (rank 1 starting from other weights), the same
    donated, and a hand-written DDP loop; inside ``with_logging`` and ``with_checkpointing`` (``OUT_DIR/pure``)."""
    import loopkit

    data = make_data(STEPS)
    batches = [data[i, rank] for i in range(STEPS)]
    state, calls = _pure_loop(loopkit.with_ddp(loopkit.train_step(mse)), sgd_state(make_model(seed=rank)), batches)
    donate = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
    donated, _ = _loop(donate, sgd_state(make_model(seed=rank)), batches)
    # whole-step transforms around it, and check_purity (two calls on one state, every rank at once)
    logged = loopkit.with_logging(loopkit.with_ddp(loopkit.train_step(mse)), loopkit.ConsoleLogger(), every_n_steps=1)
    saving = loopkit.with_checkpointing(logged, os.path.join(out_dir, "pure"), every_n_steps=2, keep_last=1)
    wrapped, wrapped_calls = _pure_loop(saving, sgd_state(make_model(seed=rank)), batches)
    torch.distributed.barrier()  # (rank 0 has written its checkpoints)
    restored = loopkit.restore(sgd_state(make_model(seed=5)), os.path.join(out_dir, "pure"))
    checked, _ = loopkit.check_purity(loopkit.with_ddp(loopkit.train_step(mse)), state, batches[0])
    return {"params": _params(state.model), "step": state.step, "calls": calls, "donated": _params(donated.model),
            "raw": _raw_ddp(rank, batches), "wrapped": _params(wrapped.model), "wrapped_calls": wrapped_calls,
            "checked": _params(checked.model), "restored": _params(restored.model), "restored_step": restored.step}


def pure_accum(rank: int) -> dict[str, Any]:
    """``with_grad_accum(with_ddp(train_step), every=2)`` not donated (the given state of a group's second call holds
    the first's local gradients), the same donated, and a hand-written DDP loop with ``no_sync``; then ``every=3``
    over 4 calls and a flush that is not donated, against the same donated."""
    import loopkit

    data = make_data(2 * STEPS)
    batches = [data[i, rank] for i in range(2 * STEPS)]
    build = lambda every: loopkit.with_grad_accum(loopkit.with_ddp(loopkit.train_step(mse)), every=every)  # noqa: E731
    state, calls = _pure_loop(build(2), sgd_state(make_model()), batches)
    donated, _ = _loop(loopkit.donate(build(2)), sgd_state(make_model()), batches)
    in_group, _ = _loop(loopkit.donate(build(2)), sgd_state(make_model()), batches[:1])
    checked, _ = loopkit.check_purity(build(2), in_group, batches[1])  # a group's local gradients in the state
    partial, flush_calls = _pure_loop(build(3), sgd_state(make_model()), batches[:4])
    before = _observed(partial)
    flushed, _ = build(3).flush(partial)
    flush_calls.append({"before": before, "after": _observed(partial), "loss": None})
    donated_partial, _ = _loop(loopkit.donate(build(3)), sgd_state(make_model()), batches[:4])
    donated_flushed, _ = loopkit.donate(build(3)).flush(donated_partial)
    return {"params": _params(state.model), "step": state.step, "calls": calls, "donated": _params(donated.model),
            "raw": _raw_ddp(rank, batches, every=2), "checked": _params(checked.model),
            "checked_donated": _params(_loop(loopkit.donate(build(2)), in_group, batches[1:2])[0].model),
            "flushed": _params(flushed.model), "flushed_step": flushed.step, "flush_calls": flush_calls,
            "donated_flushed": _params(donated_flushed.model)}


def pure_two_heads(rank: int) -> dict[str, Any]:
    """``find_unused_parameters`` under ``with_grad_accum(every=2)``, not donated: the group's first micro-batch uses
    head b on both ranks, its second head a on both (b's local gradients, unused by the synced backward's forward,
    must still be averaged), then a partial group (a on rank 0, b on rank 1) flushed; against the same donated."""
    import loopkit

    batches = [b for b in two_head_data(((-1.0, -1.0), (1.0, 1.0), (1.0, -1.0)))[:, rank]]
    build = lambda: loopkit.with_grad_accum(  # noqa: E731
        loopkit.with_ddp(loopkit.train_step(mse), find_unused_parameters=True), every=2)
    state, calls = _pure_loop(build(), sgd_state(TwoHeads()), batches)
    flushed, _ = build().flush(state)
    donated, _ = _loop(loopkit.donate(build()), sgd_state(TwoHeads()), batches)
    donated_flushed, _ = loopkit.donate(build()).flush(donated)
    # sparse_flush's SparseAdam run, not donated: rank 1's flushed micro-batch leaves the embedding no gradient
    data = make_data(3)
    routed = [(data[i, rank], not (rank == 1 and i == 2)) for i in range(3)]
    sparse = lambda: loopkit.with_grad_accum(  # noqa: E731
        loopkit.with_ddp(loopkit.train_step(_routed_loss), find_unused_parameters=True), every=2)
    sparse_adam = lambda: loopkit.TrainState.create(model := RoutedSparseNet(),  # noqa: E731
                                                    torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.1))
    sparse_state, sparse_calls = _pure_loop(sparse(), sparse_adam(), routed)
    before = _observed(sparse_state)
    sparse_flushed, _ = sparse().flush(sparse_state)
    sparse_calls.append({"before": before, "after": _observed(sparse_state), "loss": None})
    sparse_donated, _ = _loop(loopkit.donate(sparse()), sparse_adam(), routed)
    sparse_donated, _ = loopkit.donate(sparse()).flush(sparse_donated)
    return {"params": _params(flushed.model), "step": flushed.step, "calls": calls + sparse_calls,
            "donated": _params(donated_flushed.model), "group": _params(state.model),
            "raw": _raw_ddp(rank, batches[:2], every=2, model=TwoHeads(), find_unused_parameters=True),
            "sparse": _params(sparse_flushed.model), "sparse_donated": _params(sparse_donated.model)}


def _routed_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, use = batch
    return (model(x, use) ** 2).mean()


def averaged_pruned(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(STEPS)
    inner = loopkit.with_pruning(loopkit.with_ddp(loopkit.train_step(mse)), 0.5, [2, STEPS])
    step = loopkit.donate(loopkit.with_ema(inner, 0.8))
    state, _ = _loop(step, sgd_state(make_model(seed=rank)), [data[i, rank] for i in range(STEPS)])
    averages = {n: p.detach().clone() for n, p in loopkit.ema_state(state).model.named_parameters()}
    return {"params": _params(state.model), "averages": averages, "masks": dict(state.extras["pruning/masks"])}


def swa_from_start(rank: int) -> dict[str, Any]:
    """``with_swa(with_ddp(...))`` averaging from the first epoch, rank 1 starting from other weights: the first
    average is taken at the run's first call, before which the wrapper's build broadcasts rank 0's weights (rank 1
    averaged its own untrained ones in)."""
    import loopkit

    data = make_data(2)
    step = loopkit.with_swa(loopkit.with_ddp(loopkit.train_step(mse)), swa_lrs=0.02, swa_epoch_start=1,
                            annealing_epochs=1)
    state, _ = loopkit.run_epochs(step, sgd_state(make_model(seed=rank)), [data[i, rank] for i in range(2)], epochs=3,
                                  progress=False)
    return {"params": _params(state.model), "averages": _params(loopkit.swa_state(state).model)}


def _nan_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, poison = batch
    loss = mse(model, x)
    return loss + poison  # a NaN here leaves the gradients finite


def nan_batches(rank: int) -> list[Any]:
    """Rank 1: NaN inputs at call 1, a NaN added to the loss at call 3; rank 0: clean."""
    data = make_data(STEPS + 1)
    out = []
    for i in range(STEPS + 1):
        x, poison = data[i, rank].clone(), torch.tensor(0.0)
        if rank == 1 and i == 1:
            x[0, 0] = float("nan")
        if rank == 1 and i == 3:
            poison = torch.tensor(float("nan"))
        out.append((x, poison))
    return out


def nan_skip(rank: int) -> dict[str, Any]:
    import loopkit

    step = loopkit.donate(loopkit.with_nan_guard(loopkit.with_ddp(loopkit.train_step(_nan_loss)), policy="skip"))
    state = sgd_state(make_model())
    state, seen = _loop(step, state, nan_batches(rank))
    return {"params": _params(state.model), "metrics": seen, "step": state.step,
            "skipped_total": state.extras.get("nan_guard/skipped_total", 0)}


def nan_raise(rank: int) -> dict[str, Any]:
    import loopkit

    step = loopkit.donate(loopkit.with_ddp(loopkit.with_nan_guard(loopkit.train_step(_nan_loss), policy="raise")))
    state = sgd_state(make_model())
    batches = [(x, torch.tensor(float("nan")) if (rank == 1 and i == 1) else p) for i, (x, p) in
               enumerate((make_data(3)[i, rank], torch.tensor(0.0)) for i in range(3))]
    raised, calls = None, 0
    try:
        for batch in batches:
            state, _ = step(state, batch)
            calls += 1
    except loopkit.NonFiniteError as exc:
        raised = str(exc)
    torch.distributed.barrier()  # both ranks reach here, or the launch times out
    return {"raised": raised, "calls": calls}


def nan_raise_resumed(rank: int) -> dict[str, Any]:
    """``with_nan_guard(with_ddp(...), policy="raise")``: a NaN batch refused on every rank leaves the state whole.

    ``fit``: ``run_epochs`` over 4 batches, rank 1's third NaN: both ranks raise, and the fit resumed from
    ``state_at_error`` with that batch mended (``resumed``) against the fit that never saw it (``clean``).
    ``bn``: a BatchNorm model's calls, rank 0's second batch NaN: the refused call's state (``kept``: step, gradients,
    parameters and buffers, against ``before``), and the next call from it (``after``) against a run whose second
    call was never made (``skipped``). It was used up (``state_at_error`` None)."""
    import loopkit

    data = make_data(4)
    clean = [data[i, rank] for i in range(4)]
    bad = [b.clone() for b in clean]
    if rank == 1:
        bad[2][0, 0] = float("nan")

    def guarded() -> Any:
        return loopkit.with_nan_guard(loopkit.with_ddp(loopkit.train_step(mse)), policy="raise")

    result: dict[str, Any] = {}
    try:
        loopkit.run_epochs(guarded(), sgd_state(make_model()), bad, epochs=1, progress=False)
    except loopkit.NonFiniteError as error:
        left = loopkit.state_at_error(error)
        result["left_at"] = None if left is None else (left.step, left.batch_index)
    if result.get("left_at") is not None:
        state, _ = loopkit.run_epochs(guarded(), left, clean, epochs=1, progress=False)
        result["resumed"] = _params(state.model)
    state, _ = loopkit.run_epochs(guarded(), sgd_state(make_model()), clean, epochs=1, progress=False)
    result["clean"] = _params(state.model)

    def bn_model() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, D_OUT))

    def whole(state: Any) -> dict[str, Any]:
        return {"step": state.step, "model": {k: v.clone() for k, v in state.model.state_dict().items()},
                "grads": [p.grad for p in state.model.parameters()]}

    nan = clean[1].clone()
    if rank == 0:
        nan[0, 0] = float("nan")
    step = loopkit.donate(guarded())
    state, _ = step(sgd_state(bn_model()), clean[0])
    result["before"] = whole(state)
    try:
        step(state, nan)
    except loopkit.NonFiniteError as error:
        kept = loopkit.state_at_error(error)
        result["kept"] = None if kept is None else whole(kept)
    if result.get("kept") is not None:
        result["after"] = whole(step(kept, clean[2])[0])
    other = loopkit.donate(guarded())
    result["skipped"] = whole(other(other(sgd_state(bn_model()), clean[0])[0], clean[2])[0])
    return result


def fp16(rank: int) -> dict[str, Any]:
    import loopkit

    data = make_data(STEPS)
    batches = [data[i, rank].clone() for i in range(STEPS)]
    if rank == 1:
        batches[1][0, 0] = float("inf")
    step = loopkit.donate(loopkit.with_ddp(loopkit.with_amp(loopkit.train_step(mse), dtype=torch.float16)))
    state = sgd_state(make_model())
    state, seen = _loop(step, state, batches)
    return {"params": _params(state.model), "metrics": seen, "step": state.step,
            "scale": float(state.extras["amp/scale"])}


def _sharded_fit(train_n: int, val_n: int) -> tuple[Any, Any, Any, Any, Any]:
    """``(state, train, val, evaluator, step)``: ``train_n`` training samples sharded (padded), ``val_n`` validation
    samples sharded without padding (each on one rank), an mse evaluator and a ``with_ddp`` train step."""
    import loopkit
    from loopkit import distributed

    train_set, val_set = make_dataset(train_n, 1), make_dataset(val_n, 2)
    state = sgd_state(make_model(), seed=5)
    train = distributed.shard(train_set, state, batch_size=BATCH)
    val = distributed.shard(val_set, state, batch_size=3, pad=False)
    return state, train, val, loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), loopkit.with_ddp(loopkit.train_step(mse))


def fit(rank: int) -> dict[str, Any]:
    import loopkit

    state, train, val, evaluator, step = _sharded_fit(23, 7)
    state, history = loopkit.run_epochs(step, state, train, epochs=2, val=(evaluator, val), progress=False)
    local = loopkit.evaluate(evaluator, state, val, reduce=False)
    return {"params": _params(state.model), "history": history, "evaluate": loopkit.evaluate(evaluator, state, val),
            "local": local, "val_len": len(val.sampler), "train_len": len(train.sampler)}


class _EpochParams:
    """Keeps the weights each epoch's validation saw (on_epoch_end comes after it, before any update)."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, state: Any, record: Any) -> None:
        self.params.append(_params(state.model))


def _no_batch_warnings(caught: list[Any]) -> list[str]:
    return [str(w.message) for w in caught if "no batch" in str(w.message) or "no means" in str(w.message)]


def val_one_sample(rank: int) -> dict[str, Any]:
    """A validation set smaller than the world size: rank 1's shard (pad=False) is empty, and the fit validates over
    rank 0's sample, as evaluate does (it was refused on rank 1 alone, and rank 0 died in the next collective)."""
    import warnings

    import loopkit
    from loopkit import distributed

    state, train, val, evaluator, step = _sharded_fit(16, 1)
    val_set = make_dataset(1, 2)  # (the set _sharded_fit sharded, for the factory's shards)
    kept = _EpochParams()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, history = loopkit.run_epochs(
            step, state, train, epochs=2, progress=False, callbacks=[kept],
            val=(evaluator, {"given": val,
                             "made": lambda epoch: distributed.shard(val_set, 0, batch_size=3, pad=False)}))
        # a fraction of an empty shard is no batch (rank 0: 1 of its 2 batches)
        own = [val_set[:1], val_set[:1]] if rank == 0 else []
        fraction = _EpochParams()
        state, fraction_history = loopkit.run_epochs(step, state, train, epochs=3, progress=False, val=(evaluator, own),
                                                     limit_val_batches=0.5, callbacks=[fraction])
    return {"history": history, "epoch_params": kept.params, "fraction_history": fraction_history,
            "fraction_params": fraction.params, "val_len": len(val), "warnings": _no_batch_warnings(caught)}


def val_all_empty(rank: int) -> dict[str, Any]:
    """A validation set empty on every rank, given as it is or made by a factory: every rank refuses it, no hang."""
    import loopkit
    from loopkit import distributed

    train_set, val_set = make_dataset(16, 1), make_dataset(0, 2)
    state = sgd_state(make_model(), seed=5)
    train = distributed.shard(train_set, state, batch_size=BATCH)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    step = loopkit.with_ddp(loopkit.train_step(mse))
    errors = {}
    for kind, data in (("given", distributed.shard(val_set, state, batch_size=3, pad=False)),
                       ("made", lambda epoch: distributed.shard(val_set, 0, batch_size=3, pad=False))):
        try:
            loopkit.run_epochs(step, state, train, epochs=1, val=(evaluator, data), progress=False)
            errors[kind] = "not refused"
        except ValueError as e:
            errors[kind] = f"ValueError: {e}"
        state = sgd_state(make_model(), seed=5)
    return {"errors": errors}


#: lr_find_ranks' search: on its data, rank 1's own losses diverge one update before rank 0's
LR_FIND = dict(min_lr=1e-3, max_lr=10.0, num_training=20)


def lr_find_data() -> torch.Tensor:
    """lr_find_ranks' batches, ``[call, rank, sample, feature]`` (make_data's, the ranks' halves swapped)."""
    return make_data(LR_FIND["num_training"]).flip(1)


def lr_find_ranks(rank: int) -> dict[str, Any]:
    """``lr_find`` under ``with_ddp`` and under ``with_fsdp`` (each rank its own batches), then a fit of
    ``result.apply(state)``: each rank's result, and the rate and step its fit ended with (or the refusal)."""
    import loopkit

    seen: dict[str, Any] = {}
    for name, wrap in (("ddp", loopkit.with_ddp), ("fsdp", lambda s: loopkit.with_fsdp(s, shard=()))):
        state = sgd_state(make_model())
        step = wrap(loopkit.train_step(mse))
        batches = list(lr_find_data()[:, rank])
        result = loopkit.lr_find(step, state, batches, **LR_FIND)
        seen[name] = {"lr": result.results["lr"], "loss": result.results["loss"], "stopped": result.stopped_early,
                      "suggestion": result.suggestion()}
        try:
            fitted, _ = loopkit.run_epochs(step, result.apply(state), batches[:2], epochs=1, progress=False)
            seen[name]["fit"] = (fitted.step, fitted.optimizer.param_groups[0]["lr"])
        except Exception as e:  # (a SyncRefusal where the ranks' rates differ: recorded, for the test to show)
            seen[name]["fit"] = f"{type(e).__name__}: {e}"
    return seen


def stop_one_rank(rank: int) -> dict[str, Any]:
    """A callback asks to stop on rank 0 only (a time limit reached there first): both ranks stop together."""
    import loopkit

    class StopAfter:
        def on_batch_end(self, state: Any, metrics: Any) -> None:
            self.should_stop = rank == 0 and state.step >= 3

    state = sgd_state(make_model(), seed=5)
    step = loopkit.with_ddp(loopkit.train_step(mse))
    batches = [b for b in make_data(6)[:, rank]]
    state, history = loopkit.run_epochs(step, state, batches, epochs=2, callbacks=[StopAfter()], progress=False)
    return {"step": state.step, "params": _params(state.model)}


def callbacks_on_rank0(rank: int) -> dict[str, Any]:
    """Only rank 0 has callbacks (one printing, one stopping it there): the ranks still make the same
    collectives, so neither waits for the other (it hung until the timeout)."""
    import loopkit

    class Printer:
        def on_batch_end(self, state: Any, metrics: Any) -> None:
            pass

    callbacks = [Printer(), loopkit.LearningRateMonitor(), loopkit.EarlyStopping("train/loss", patience=1)] if rank == 0 else []
    step = loopkit.with_ddp(loopkit.train_step(mse))
    batches = [b for b in make_data(4)[:, rank]]
    state, _ = loopkit.run_epochs(step, sgd_state(make_model(), seed=5), batches, epochs=3, callbacks=callbacks,
                                  progress=False)
    return {"step": state.step, "params": _params(state.model)}


def stop_votes(rank: int) -> dict[str, Any]:
    """The ranks' votes on should_stop (``_collective.max_over_ranks`` of that vote, counted) in a fit of 2 epochs
    of 6 batches without callbacks, with a per-step ``LearningRateMonitor`` and a ``ThroughputMonitor`` (which
    never stop), and with those and a callback that stops on rank 0 alone after step 3 (one of its own; a
    ``LearningRateMonitor`` subclass whose ``on_batch_end`` stops): each fit's votes, step and parameters."""
    import loopkit
    from loopkit import _collective

    class StopAfter:
        def on_batch_end(self, state: Any, metrics: Any) -> None:
            self.should_stop = rank == 0 and state.step >= 3

    class StoppingMonitor(loopkit.LearningRateMonitor):
        def on_batch_end(self, state: Any, metrics: Any) -> Any:
            self.should_stop = rank == 0 and state.step >= 3
            return super().on_batch_end(state, metrics)

    def monitors() -> list[Any]:
        return [loopkit.LearningRateMonitor(logging_interval="step"), loopkit.ThroughputMonitor(len)]

    fits = {"none": [], "monitors": monitors(), "stop": [*monitors(), StopAfter()],
            "stopping_monitor": [StoppingMonitor(logging_interval="step")]}
    counted = _collective.max_over_ranks
    votes = [0]

    def counting(value: int, what: str = "", who: str = "run_epochs") -> int:
        votes[0] += what == "the ranks' vote on the callbacks' should_stop"
        return counted(value, what, who)

    step = loopkit.with_ddp(loopkit.train_step(mse))
    batches = [b for b in make_data(6)[:, rank]]
    found = {}
    _collective.max_over_ranks = counting
    try:
        for name, callbacks in fits.items():
            votes[0] = 0
            state, _ = loopkit.run_epochs(step, sgd_state(make_model(), seed=5), batches, epochs=2, callbacks=callbacks,
                                          progress=False)
            found[name] = {"votes": votes[0], "step": state.step, "params": _params(state.model)}
    finally:
        _collective.max_over_ranks = counted
    return found


def _refused(run: Any) -> str:
    try:
        run()
    except RuntimeError as e:
        return str(e)
    return "not refused"


def uneven(rank: int) -> dict[str, Any]:
    """Rank 0 has 3 batches an epoch, rank 1 has 2: refused before a step (it hung, or drifted apart)."""
    import loopkit

    batches = [b for b in make_data(3)[:, rank]][: 3 - rank]
    step = loopkit.with_ddp(loopkit.train_step(mse))
    return {"error": _refused(lambda: loopkit.run_epochs(step, sgd_state(make_model()), batches, epochs=1, progress=False))}


def apart(rank: int) -> dict[str, Any]:
    """Rank 1 starts from another step (each rank restored its own checkpoint folder): refused."""
    import loopkit

    state = sgd_state(make_model())
    if rank == 1:
        state = state.evolve(step=2)
    step = loopkit.with_ddp(loopkit.train_step(mse))
    batches = [b for b in make_data(2)[:, rank]]
    return {"error": _refused(lambda: loopkit.run_epochs(step, state, batches, epochs=1, progress=False))}


def buffers_apart(rank: int) -> dict[str, Any]:
    """Rank 1's model has a buffer rank 0's lacks, and another of another shape: refused at the first call
    on every rank, naming them (DDP's broadcast of rank 0's buffers waited for the timeout)."""
    import loopkit

    results = {}
    for case in ("extra", "shape"):
        model = make_model()
        if case == "extra" and rank == 1:
            model.register_buffer("counts", torch.zeros(3))
        if case == "shape":
            model.register_buffer("counts", torch.zeros(3 + rank))
        step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
        try:
            step(sgd_state(model), make_data(1)[0, rank])
            results[case] = "not refused"
        except ValueError as e:
            results[case] = str(e)
    return results


def _fails_at(at: int) -> Any:
    """``mse`` that raises in its call number ``at`` (from 1)."""
    calls = []

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError(f"loss_fn fails at call {at}")
        return mse(model, batch)

    return loss


def loss_error(rank: int) -> dict[str, Any]:
    """The loss_fn raises on every rank: at the first call (the DDP wrapper was just built, broadcasting rank
    0's parameters: nothing is whole), then at the 4th of another fit, whose state_at_error goes on to the end."""
    import loopkit

    batches = [b for b in make_data(6)[:, rank]]
    seen = {}
    for at in (1, 4):
        state = sgd_state(make_model(seed=rank))  # rank 1 starts elsewhere: the wrapper broadcasts rank 0's
        try:
            loopkit.run_epochs(loopkit.with_ddp(loopkit.train_step(_fails_at(at))), state, batches, epochs=1,
                               progress=False)
        except RuntimeError as e:
            seen[at] = loopkit.state_at_error(e)
    whole = seen[4]
    position = (whole.step, whole.epoch, whole.batch_index)
    whole, _ = loopkit.run_epochs(loopkit.with_ddp(loopkit.train_step(mse)), whole, batches, epochs=1, progress=False)
    return {"first": seen[1] is None, "position": position, "step": whole.step, "params": _params(whole.model)}


SIGNAL_STEPS = 6  # batches an epoch of the signal scenarios (2 epochs)
SPACED_STEPS = 100  # and of the one with run_epochs' own spacing of the votes


def _signalling(at: int | None) -> Any:
    """``mse`` that sends SIGTERM to this process in its call number ``at`` (from 1; never for None)."""
    calls = []

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return mse(model, batch)

    return loss


def _signal_stop(rank: int, out_dir: str, name: str, at: int | None, every: int = 1, batches: int = 0,
                 vote_every_seconds: float = 0.0) -> dict[str, Any]:
    """SIGTERM in call ``at`` of this rank's loss_fn; the fit's stop, then its resume. ``vote_every_seconds=0``:
    a vote every step (the stop steps the tests name); else run_epochs' own spacing of the votes."""
    from loopkit import driver

    default = driver._StopOnSignal.vote_every_seconds
    driver._StopOnSignal.vote_every_seconds = vote_every_seconds
    try:
        return _signal_stopped(rank, out_dir, name, at, every, batches or SIGNAL_STEPS)
    finally:
        driver._StopOnSignal.vote_every_seconds = default


def _signal_stopped(rank: int, out_dir: str, name: str, at: int | None, every: int, n: int) -> dict[str, Any]:
    import loopkit

    def build(loss: Any) -> Any:
        step = loopkit.with_ddp(loopkit.train_step(loss))
        if every > 1:
            step = loopkit.with_grad_accum(step, every=every)
        return loopkit.with_checkpointing(step, directory)

    directory = os.path.join(out_dir, name)
    batches = [b for b in make_data(n)[:, rank]]
    state, history = loopkit.run_epochs(build(_signalling(at)), sgd_state(make_model(), seed=5), batches, epochs=2,
                                        progress=False)
    stopped, handler = state.step, signal.getsignal(signal.SIGTERM)
    torch.distributed.barrier()  # rank 0 has written the checkpoint (a relaunch finds it written)
    state = loopkit.restore(sgd_state(make_model(), seed=5), directory)
    restored = state.step
    state, more = loopkit.run_epochs(build(mse), state, batches, epochs=2, progress=False)
    return {"stopped": stopped, "restored": restored, "step": state.step, "params": _params(state.model),
            "history": history + more, "handler_restored": handler is signal.SIG_DFL}


def signal_one_rank(rank: int, out_dir: str) -> dict[str, Any]:
    return _signal_stop(rank, out_dir, "signal_one_rank", None if rank == 0 else 3)


def signal_apart(rank: int, out_dir: str) -> dict[str, Any]:
    return _signal_stop(rank, out_dir, "signal_apart", 2 if rank == 0 else 3)


def signal_spaced_votes(rank: int, out_dir: str) -> dict[str, Any]:
    """run_epochs' own spacing of the votes (steps of a millisecond or two: many steps between votes)."""
    return _signal_stop(rank, out_dir, "signal_spaced_votes", None if rank == 0 else 3, batches=SPACED_STEPS,
                        vote_every_seconds=0.05)


def signal_in_group(rank: int, out_dir: str) -> dict[str, Any]:
    """Under ``with_grad_accum(every=2)`` the vote agrees after call 3, inside a group: the ranks stop at its end."""
    return _signal_stop(rank, out_dir, "signal_in_group", 2 if rank == 0 else None, every=2)


KEPT_N, KEPT_SEED = 20, 11
KEPT_TRAIN = [0, 2, 3, 5, 7, 8, 11, 12, 14, 15, 17, 18, 19]  # 13 of 20 (odd: the padded shards repeat one)


class _NumpyShuffled(torch.utils.data.Sampler):
    """``indices`` shuffled with numpy's global RNG when the epoch's iterator starts (as bucketing samplers do)."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        import numpy as np

        return iter([self.indices[i] for i in np.random.permutation(len(self.indices))])


def kept_loader(name: str) -> torch.utils.data.DataLoader:
    """A DataLoader over ``KEPT_N`` samples (their indices) whose sampler is its own: ``shard`` keeps it."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

    data = TensorDataset(torch.arange(KEPT_N))
    if name == "weighted":  # the odd indices never drawn
        weights = torch.tensor([float(i + 1) if i % 2 == 0 else 0.0 for i in range(KEPT_N)])
        return DataLoader(data, batch_size=3, sampler=WeightedRandomSampler(weights, 15))
    if name == "numpy":
        return DataLoader(data, batch_size=4, sampler=_NumpyShuffled(KEPT_TRAIN))
    return DataLoader(data, batch_size=4, sampler=SubsetRandomSampler(KEPT_TRAIN))


def kept_sampler(rank: int) -> dict[str, Any]:
    import loopkit
    from loopkit import distributed

    result: dict[str, Any] = {}
    for name in ("subset", "weighted", "numpy"):
        state = loopkit.TrainState.create(nn.Linear(1, 1), seed=KEPT_SEED + rank)  # seeded apart: rank 0's orders
        seen: list[list[int]] = [[], []]

        def record(state: Any, batch: Any) -> Any:
            seen[state.epoch].extend(int(v) for v in batch[0])
            return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

        loopkit.run_epochs(record, state, distributed.shard(kept_loader(name), state), epochs=2, progress=False)
        result[name] = seen
        unpadded = distributed.shard(kept_loader(name), KEPT_SEED + rank, pad=False)
        torch.manual_seed(100 + rank)  # each rank's global RNG elsewhere: the draw must not depend on it
        result[name + "_unpadded"] = []
        for epoch in (0, 1):
            unpadded.sampler.set_epoch(epoch)
            result[name + "_unpadded"].append([int(v) for (b,) in unpadded for v in b])
    return result


def resume(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit
    from loopkit import distributed

    directory = os.path.join(out_dir, "ckpt")
    train_set = make_dataset(24, 1)
    state = sgd_state(make_model(), seed=5)
    state = loopkit.restore(state, directory)
    start = (state.step, state.epoch, state.batch_index)
    train = distributed.shard(train_set, state, batch_size=BATCH)
    die = int(os.environ.get("LOOPKIT_TEST_DIE", "0"))
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if die and rank == 1 and first_attempt:
        def kill(state: Any, metrics: Any) -> None:
            if state.batch_index == die + 1:
                torch.distributed.barrier()  # rank 0 has saved the checkpoint of batch `die` too
                print(f"rank 1 dies after the checkpoint of batch {die}", flush=True)
                os._exit(3)
        callbacks = [type("Die", (), {"on_batch_end": staticmethod(kill)})()]
    else:
        callbacks = []
        if die and rank == 0 and first_attempt:
            def wait(state: Any, metrics: Any) -> None:
                if state.batch_index == die + 1:
                    torch.distributed.barrier()
            callbacks = [type("Wait", (), {"on_batch_end": staticmethod(wait)})()]
    step = loopkit.with_checkpointing(loopkit.with_ddp(loopkit.train_step(mse)), directory, every_n_steps=1)
    state, history = loopkit.run_epochs(step, state, train, epochs=2, progress=False, callbacks=callbacks)
    return {"params": _params(state.model), "start": start, "step": state.step, "history": history}


class _Stream(torch.utils.data.IterableDataset):
    """``n`` batches of this rank's own, without a length (a stream's shard)."""

    def __init__(self, rank: int, n: int) -> None:
        self.rank, self.n = rank, n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.rank)
        for _ in range(self.n):
            yield torch.randn(BATCH, D_IN + D_OUT, generator=g)


class _SizedStream(_Stream):
    """A ``_Stream`` whose ``len()`` says ``length`` batches (an estimate, as torch takes an IterableDataset's)."""

    def __init__(self, rank: int, n: int, length: int) -> None:
        super().__init__(rank, n)
        self.length = length

    def __len__(self) -> int:
        return self.length


def _stream_fit(rank: int, batches: int, data: Any = None) -> dict[str, Any]:
    import warnings

    import loopkit

    state = sgd_state(make_model())
    step = loopkit.with_ddp(loopkit.train_step(mse))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = _Stream(rank, batches) if data is None else data
        state, history = loopkit.run_epochs(step, state, data, epochs=2, progress=False)
    return {"params": _params(state.model), "step": state.step, "history": history,
            "warnings": [str(w.message) for w in caught if "another rank's train_data ended" in str(w.message)]}


def uneven_stream(rank: int) -> dict[str, Any]:
    """Data without a length, 3 batches an epoch on rank 0 and 2 on rank 1: each epoch ends after 2 on both (it
    hung: rank 1 went on to the epoch's end while rank 0 waited in its third step's all-reduce)."""
    return _stream_fit(rank, 3 if rank == 0 else 2)


def uneven_sized_stream(rank: int) -> dict[str, Any]:
    """``uneven_stream`` through a DataLoader whose ``len()`` says 3 batches on both ranks (torch's estimate of an
    IterableDataset's): each epoch ends after 2 on both, as for data without a length (it hung: the counts agreed,
    and rank 0 waited in its third step's all-reduce while rank 1 waited in the epoch's means)."""
    from torch.utils.data import DataLoader

    n = 3 if rank == 0 else 2
    return _stream_fit(rank, n, DataLoader(_SizedStream(rank, n, 3), batch_size=None))


def even_stream(rank: int) -> dict[str, Any]:
    """``uneven_stream`` with rank 0's third batch left out of its data: the reference."""
    return _stream_fit(rank, 2)


def stream_runs_dry(rank: int) -> dict[str, Any]:
    """Data without a length that yields nothing on rank 1: in the first epoch (both ranks refuse the fit) and in
    the second (both warn and stop after the first). It hung: rank 1 raised or stopped alone."""
    import warnings

    import loopkit

    step = loopkit.with_ddp(loopkit.train_step(mse))
    result: dict[str, Any] = {}
    try:
        loopkit.run_epochs(step, sgd_state(make_model()), _Stream(rank, 0 if rank == 1 else 2), epochs=1, progress=False)
    except ValueError as error:
        result["refused"] = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, history = loopkit.run_epochs(
            step, sgd_state(make_model()), lambda epoch: _Stream(rank, 0 if rank == 1 and epoch == 1 else 2), epochs=3,
            progress=False)
    result.update(step=state.step, epochs=len(history), params=_params(state.model),
                  warnings=[str(w.message) for w in caught if "yielded no batches" in str(w.message)])
    return result


def export_rank_zero(rank: int, out_dir: str) -> dict[str, Any]:
    """``export_weights`` on every rank of a BatchNorm model (each rank's running statistics its own after the last
    step: DDP broadcasts rank 0's at the next forward), rank 0 first, then rank 1: the file must hold rank 0's."""
    import loopkit

    state = sgd_state(make_bn_model())
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
    for batch in make_data(2)[:, rank]:
        state, _ = step(state, batch)
    path = os.path.join(out_dir, "exported.safetensors")
    for turn in (0, 1):
        if rank == turn:
            loopkit.export_weights(state, path)
        torch.distributed.barrier()
    with open(path, "rb") as f:
        exported = f.read()
    return {"buffers": _buffers(state.model), "params": _params(state.model), "file": exported}


def make_bn_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.Linear(8, D_OUT))


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def validating_evaluate(rank: int) -> dict[str, Any]:
    """The documented pattern for an evaluation of one's own, ``with step.validating(state): loopkit.evaluate(...)``,
    of a BatchNorm model after 2 updates under ``with_ddp`` (each rank's running statistics its own: DDP broadcasts
    rank 0's at the next forward). Each rank evaluates its half of ``make_dataset(16, 3)`` (2 batches) inside the
    block (reduced and not) and after it (not reduced), recording its buffers before, inside and after."""
    import loopkit

    state = sgd_state(make_bn_model())
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
    for batch in make_data(2)[:, rank]:
        state, _ = step(state, batch + 2.0 * rank)  # (rank 1's shifted: its statistics move away from rank 0's)
    x, y = make_dataset(16, 3)[8 * rank:8 * rank + 8]
    val = [(x[:4], y[:4]), (x[4:], y[4:])]
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    own = _buffers(state.model)
    with step.validating(state):
        inside = {"reduced": loopkit.evaluate(evaluator, state, val), "local": loopkit.evaluate(evaluator, state, val,
                                                                                               reduce=False)}
        inside_buffers = _buffers(state.model)
    after = loopkit.evaluate(evaluator, state, val, reduce=False)
    return {"params": _params(state.model), "own": own, "inside": inside, "inside_buffers": inside_buffers,
            "after": after, "after_buffers": _buffers(state.model)}


def unfreeze(rank: int) -> dict[str, Any]:
    """A fit that unfreezes its first layer at epoch 1 (DDP then reduces its gradients too), uninterrupted and
    stopped before or after the unfreeze then resumed, each resume from a template with the run's groups then."""
    import loopkit

    data = list(make_data(2)[:, rank])
    step = loopkit.with_ddp(loopkit.train_step(mse))

    def fit(state: Any, epochs: int) -> Any:
        return loopkit.run_epochs(step, state, data, epochs=epochs, callbacks=[Unfreeze()], progress=False)[0]

    whole = fit(frozen_state(make_model()), UNFREEZE_EPOCHS)
    resumed = {}
    for cut in (UNFREEZE_AT, UNFREEZE_AT + 1):
        saved = fit(frozen_state(make_model()), cut).state_dict()
        template = frozen_state(make_model(), 2 if cut > UNFREEZE_AT else 1)
        resumed[cut] = _params(fit(template.load_state_dict(saved), UNFREEZE_EPOCHS).model)
    return {"params": _params(whole.model), "step": whole.step, "resumed": resumed}


def flags_apart(rank: int) -> dict[str, Any]:
    """``requires_grad`` set otherwise on each rank: mid-fit (both ranks change it, differently: each builds its
    wrapper anew), then at the first call of another model (rank 1 freezes a bias). Each is refused on every rank,
    naming the parameters and the ranks, leaving the state usable: the flags put alike, the fit goes on (before:
    gloo aborted both processes, in DDP's check of the parameters' shapes)."""
    import loopkit

    data = make_data(FLAGS_APART_STEPS)
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))
    state = sgd_state(make_model())
    state.model[0].requires_grad_(False)
    state, _ = step(state, data[0, rank])
    (state.model[0].weight if rank == 0 else state.model[0].bias).requires_grad_(True)
    seen: dict[str, Any] = {}
    try:
        step(state, data[1, rank])
        seen["mid_fit"] = "not refused"
    except loopkit.steps.SyncRefusal as e:
        seen["mid_fit"], seen["intact"] = str(e), loopkit.state_at_error(e) is state
    state.model[0].requires_grad_(True)  # alike on every rank: the fit goes on
    for i in range(1, FLAGS_APART_STEPS):
        state, _ = step(state, data[i, rank])
    fresh = sgd_state(make_model())
    fresh.model[2].bias.requires_grad_(rank == 0)
    try:
        loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse)))(fresh, data[0, rank])
        seen["first_call"] = "not refused"
    except loopkit.steps.SyncRefusal as e:
        seen["first_call"] = str(e)
    seen.update(_optimizers_apart(rank, data))
    return {**seen, "params": _params(state.model), "step": state.step}


class LoneUnfreeze:
    """``Unfreeze`` on the ranks in ``ranks`` only: the first layer unfrozen (and its group added) at epoch
    ``UNFREEZE_AT``, once (a later fit of a rank that unfroze it already leaves it)."""

    def __init__(self, rank: int, ranks: set[int]) -> None:
        self.rank, self.ranks = rank, ranks

    def on_epoch_start(self, state: Any) -> None:
        layer = state.model[0]
        due = state.epoch == UNFREEZE_AT and state.batch_index == 0 and self.rank in self.ranks
        if due and not layer.weight.requires_grad:
            layer.requires_grad_(True)
            state.optimizer.add_param_group({"params": list(layer.parameters()), "lr": 0.05})


def flags_apart_epoch(rank: int) -> dict[str, Any]:
    """``unfreeze``'s fit with the layer unfrozen on rank 1 alone (``LoneUnfreeze``), then a fit whose state rank 1
    changed alone before it (its last bias frozen): each refused on every rank at the epoch's start, before any
    step of it (before: rank 1 built its wrapper alone at the epoch's first step, and waited in its check of the
    flags until the timeout), leaving a usable state: the flags put alike, the fit goes on from it."""
    import loopkit

    data = list(make_data(2)[:, rank])
    step = loopkit.with_ddp(loopkit.train_step(mse))
    lone = LoneUnfreeze(rank, {1})
    seen: dict[str, Any] = {}

    def fit(state: Any, epochs: int = UNFREEZE_EPOCHS) -> Any:
        return loopkit.run_epochs(step, state, data, epochs=epochs, callbacks=[lone], progress=False)[0]

    state = frozen_state(make_model())
    try:
        fit(state)
        seen["epoch"] = "not refused"
    except RuntimeError as e:
        seen["epoch"], state = str(e), loopkit.state_at_error(e)
        seen["at"] = (state.epoch, state.batch_index, state.step)
    lone.ranks = {0, 1}  # alike on every rank: the fit goes on from the state the error left
    state = fit(state)
    fresh = frozen_state(make_model())
    fresh.model[2].bias.requires_grad_(rank == 0)
    try:
        fit(fresh, 1)
        seen["before_fit"] = "not refused"
    except RuntimeError as e:
        seen["before_fit"], left = str(e), loopkit.state_at_error(e)
        seen["before_fit_at"] = (left.epoch, left.batch_index, left.step)
    return {**seen, "params": _params(state.model), "step": state.step}


def _optimizers_apart(rank: int, data: torch.Tensor) -> dict[str, Any]:
    """Rank 1's optimizer otherwise at a first call: its SGD's lr 0.0, an Adam, a group without the last bias
    (before: the ranks updated the averaged gradients each with its own, their replicas apart, unwarned). Each
    refusal's message (and whether the state stayed usable); then rank 1's lr mended, the fit's parameters."""
    import loopkit

    step, seen = loopkit.donate(loopkit.with_ddp(loopkit.train_step(mse))), {}
    kept = None
    for kind in ("lr", "class", "group"):
        model = make_model()
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if rank == 1:
            optimizer = {"lr": lambda: torch.optim.SGD(params, lr=0.0, momentum=0.9),
                         "class": lambda: torch.optim.Adam(params, lr=0.1),
                         "group": lambda: torch.optim.SGD(params[:-1], lr=0.1, momentum=0.9)}[kind]()
        state = loopkit.TrainState.create(model, optimizer)
        try:
            state, _ = step(state, data[0, rank])
            seen[kind] = "not refused"
        except loopkit.steps.SyncRefusal as e:
            seen[kind] = str(e) + ("" if loopkit.state_at_error(e) is state else " (the state changed)")
        kept = state if kept is None else kept
    kept.optimizer.param_groups[0]["lr"] = 0.1  # mended: the fit goes on
    for i in range(kept.step, FLAGS_APART_STEPS):
        kept, _ = step(kept, data[i, rank])
    return {**seen, "mended": _params(kept.model)}


FLAGS_APART_STEPS = 4

SCENARIOS = {
    f.__name__: f
    for f in (plain, pure_accum, pure_two_heads, accum, accum_scheduled, accum_outer, bucket_views, static_graph, flush, two_heads, averaged_pruned, nan_skip, nan_raise, nan_raise_resumed, fp16, fit,
              stop_one_rank, callbacks_on_rank0, stop_votes, uneven, apart, swa_from_start, loss_error, buffers_apart, sparse_flush, stop_in_group,
              uneven_stream, uneven_sized_stream, even_stream, stream_runs_dry, val_one_sample, val_all_empty, kept_sampler, validating_evaluate,
              unfreeze, flags_apart, flags_apart_epoch, lr_find_ranks)
}

WITH_OUT_DIR = {f.__name__: f for f in (pure, resume, signal_one_rank, signal_apart, signal_in_group, signal_spaced_votes,
                                         export_rank_zero)}


def main(out_dir: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    from loopkit import distributed

    assert distributed.init(timeout=float(os.environ.get("LOOPKIT_TEST_TIMEOUT", "20")))
    rank = distributed.rank()
    for name in scenarios:
        if name in WITH_OUT_DIR:
            result = WITH_OUT_DIR[name](rank, out_dir)
        else:
            result = SCENARIOS[name](rank)
        torch.save(result, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        print(f"rank {rank} done {name}", flush=True)
    distributed.shutdown()


def torchrun(out_dir: str, scenarios: list[str], *, nproc: int = 2, timeout: float = 90.0,
             launcher: list[str] | None = None, env: dict[str, str] | None = None, script: str | None = None) -> Any:
    """Run this script (or ``script``) under ``python -m torch.distributed.run`` and wait at most ``timeout`` seconds.

    ``launcher`` replaces the default ``--standalone --nproc-per-node N`` (a free port on
    127.0.0.1). On a timeout the whole process group (agent and workers) is killed and
    ``subprocess.TimeoutExpired`` raised. The test reads the output on failure.
    """
    import signal
    import subprocess

    args = launcher if launcher is not None else ["--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, script or os.path.abspath(__file__), out_dir, *scenarios]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def load(out_dir: str, name: str, world: int = 2) -> list[dict[str, Any]]:
    """Each rank's result of scenario ``name``."""
    return [torch.load(os.path.join(out_dir, f"{name}_rank{r}.pt")) for r in range(world)]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
