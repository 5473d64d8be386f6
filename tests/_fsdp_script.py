"""The worker that tests/transforms/test_fsdp.py starts with torchrun.

``torchrun --nproc-per-node 2 tests/_fsdp_script.py OUT_DIR SCENARIO [SCENARIO ...]`` runs the
scenarios one after the other in one process group (gloo, 20 s collective timeout) and writes
``OUT_DIR/<scenario>_rank<r>.pt`` with what each rank saw (the parameters gathered whole). Each
rank trains on its half of every global batch of ``make_data``; the test builds the references
(raw PyTorch loops over the whole global batches, no loopkit) itself. Scenarios:

- ``sgd``: ``run_epochs(with_logging(with_fsdp(train_step)))``, SGD with momentum, 2 epochs of 3 batches,
  validation each epoch, then ``evaluate``, ``predict``, ``state.state_dict()`` and ``export_weights``.
- ``adam``: Adam with a ``StepLR`` scheduler, ``reshard_after_forward=False`` (SHARD_GRAD_OP).
- ``accum``: ``with_grad_accum(with_fsdp(...), every=2)``, Adam with ``StepLR``, 2 epochs of 5 batches: each
  epoch ends in a partial group of one, which ``run_epochs`` flushes.
- ``accum_outer``: ``with_fsdp(with_grad_accum(...))`` in a loop of one's own, 3 calls then
  ``flush``; records whether the first call left the sharded gradients unset (no reduce-scatter).
- ``clip``: ``with_grad_clip(with_grad_hook(with_grad_norm(with_fsdp(...)), fn), max_norm=0.05)``, Adam; records
  each call's ``grad_norm``, ``with_grad_norm``'s norms and the hook's (all of the unclipped gradients).
- ``nan``: ``with_nan_guard(with_fsdp(...))``; rank 1 alone sees a NaN input at call 1.
- ``uneven``: 3 batches on rank 0, 2 on rank 1 (refused).
- ``nan_raise``: the same guard raising, rank 1's third batch of a fit NaN; the fit resumed from ``state_at_error``.
- ``bf16``: ``with_amp(with_fsdp(...), dtype=torch.bfloat16)``.
- ``cut``: ``accum``'s run under ``with_checkpointing(every_n_steps=1)``, cut at ``max_steps=4``.
- ``resume`` (run in a second launch, new processes): a new model, optimizer, scheduler and step,
  as a restarted script builds them, restored from ``cut``'s checkpoints with ``loopkit.restore``
  and trained to the end.
- ``bn``, ``bn_ddp``: a model with BatchNorm (rank 1's data shifted), ``with_grad_accum(with_fsdp(...), every=2)``
  and the same under ``with_ddp``, 2 epochs of 4 batches validated each; ``bn`` records the buffers each forward
  starts from. ``bn_cut`` / ``bn_resume`` (second launch): ``bn`` checkpointed, cut at ``max_steps=3``, resumed.
- ``bn_nobroadcast``: ``with_fsdp(broadcast_buffers=False)``, two calls, the buffers each forward starts from, then
  ``evaluate(reduce=False)`` inside ``step.validating(state)``.
- ``gather_to_rank_zero``: checkpoints at each of 2 updates and ``export_weights``, ``DTensor.full_tensor`` watched:
  the whole tensors each rank still holds at each gather and after.
- ``unfreeze``: docs/from_lightning.md's ``BackboneFinetuning`` recipe, the first layer frozen until epoch 1, 3 epochs
  of 2 batches, and the same run stopped after epoch 1 (before the unfreeze) and after epoch 2, each resumed from its
  state dict to the end.
- ``stream_val`` (a launch of its own, with a short collective timeout: it hung): validation data streamed
  unevenly (3 batches on rank 0, 2 on rank 1) with a ``len()`` of 3 and without one, through ``evaluate``,
  ``predict`` and a fit's validations.
- ``uneven_val_fit``: a fit validated on data of 3 batches on rank 0 and 2 on rank 1, and of 1 and none: refused
  at its start; the state and step then trained with ``limit_val_batches`` the fewest. The same data made by a
  factory (refused at the epoch's validation), and a stream whose ``len()`` says 3 and 2 (read while both have one).
- ``apart`` (a launch of its own: gloo aborted it): the ranks' ``requires_grad`` or optimizers apart (a frozen weight,
  an lr, an optimizer class, a group's size; a group added mid-fit with another lr and flag), each refused, then
  mended and trained on.
- ``norm_collectives``: the all-reduces of ``with_grad_norm``'s and ``with_grad_clip``'s gradient hooks on sharded
  gradients, counted, with their norms and clipped gradients.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

if not __package__:  # run as a file (torchrun's workers): the repository's root on the path, for tests' helpers
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._finetune import UNFREEZE_AT, UNFREEZE_EPOCHS, Unfreeze, frozen_state  # noqa: E402

BATCH = 4  # samples a rank, per batch: a global batch is twice that
D_IN, D_HID, D_OUT = 3, 5, 2  # 5: the first layer's weight is sharded unevenly (3 rows and 2)
SHARD = {nn.Linear}


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def make_data(n: int, seed: int = 1234, world: int = 2) -> torch.Tensor:
    """``[batch, rank, sample, feature]``: inputs and targets side by side in the last axis."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, world, BATCH, D_IN + D_OUT, generator=gen)


def global_batch(data: torch.Tensor, i: int) -> torch.Tensor:
    """The whole global batch ``i`` (both ranks' halves, rank 0's first), for a one-process reference."""
    return data[i].reshape(-1, D_IN + D_OUT)


def mse(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :D_IN], batch[:, D_IN:]
    return ((model(x).float() - y) ** 2).mean()


def make_optimizer(kind: str, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5) if kind == "adam_sched" else None
    return optimizer, scheduler


def make_state(kind: str) -> Any:
    import loopkit

    model = make_model()
    optimizer, scheduler = make_optimizer(kind, model)
    return loopkit.TrainState.create(model, optimizer, scheduler, seed=3)


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters, each gathered whole (a collective on every rank)."""
    from loopkit._sharded import full

    return full({n: p.detach() for n, p in model.named_parameters()})


def _fit(step: Any, state: Any, data: torch.Tensor, rank: int, epochs: int, **options: Any) -> tuple[Any, Any]:
    import loopkit

    return loopkit.run_epochs(step, state, [data[i, rank] for i in range(len(data))], epochs=epochs,
                              progress=False, **options)


def _loop(step: Any, state: Any, batches: list[torch.Tensor]) -> tuple[Any, list[dict[str, float]]]:
    import loopkit

    step, seen = loopkit.donate(step), []
    for batch in batches:
        state, metrics = step(state, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
    return state, seen


def sgd(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data, val = make_data(3), make_data(2, seed=99)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    val_batches = [val[i, rank] for i in range(len(val))]
    logger = loopkit.JSONLLogger(os.path.join(out_dir, "logs"), version=0)
    step = loopkit.with_logging(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), logger, every_n_steps=3)
    state, history = _fit(step, make_state("sgd"), data, rank, 2, val=(evaluator, val_batches))
    sd = state.state_dict()  # (gathered on every rank)
    path = loopkit.export_weights(state, os.path.join(out_dir, "sgd.safetensors"))
    return {"params": full_params(state.model), "history": history, "step": state.step,
            "evaluate": loopkit.evaluate(evaluator, state, val_batches), "state_dict": sd,
            "predict": loopkit.predict(lambda m, b: m(b[:, :D_IN]), state, val_batches),
            "sharded": [type(p).__name__ for p in state.model.parameters()],
            "local_shapes": [tuple(p.to_local().shape) for p in state.model.parameters()],
            "exported": path.exists()}


def adam(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(3)
    step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD, reshard_after_forward=False)
    state, history = _fit(step, make_state("adam_sched"), data, rank, 2)
    return {"params": full_params(state.model), "history": history, "step": state.step,
            "lr": state.optimizer.param_groups[0]["lr"]}


def accum(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(5)
    step = loopkit.with_grad_accum(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), every=2)
    state, history = _fit(step, make_state("adam_sched"), data, rank, 2)
    return {"params": full_params(state.model), "history": history, "step": state.step}


def accum_outer(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(3)
    step = loopkit.donate(loopkit.with_fsdp(loopkit.with_grad_accum(loopkit.train_step(mse), every=2), shard=SHARD))
    state = make_state("adam")
    state, _ = step(state, data[0, rank])
    unreduced = all(p.grad is None for p in state.model.parameters())  # held unsharded: no reduce-scatter yet
    state, _ = step(state, data[1, rank])
    state, _ = step(state, data[2, rank])
    state, _ = step.flush(state)
    return {"params": full_params(state.model), "step": state.step, "unreduced_after_first": unreduced}


def clip(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(4)
    step = loopkit.with_grad_norm(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD))  # sees the unclipped

    def hook(state):  # each p.grad a DTensor (this rank's shard): the sum is gathered to its whole value
        return {"hook/norm": sum(p.grad.pow(2).sum() for p in state.model.parameters()) ** 0.5}

    step = loopkit.donate(loopkit.with_grad_clip(loopkit.with_grad_hook(step, hook), max_norm=0.05))
    state, seen, plain = make_state("adam"), [], True
    for i in range(len(data)):
        state, metrics = step(state, data[i, rank])
        plain = plain and all(type(v) is torch.Tensor for v in metrics.values())  # no DTensor left for a logger
        seen.append({k: float(v) for k, v in metrics.items()})
    return {"plain_metrics": plain, "params": full_params(state.model), "grad_norms": [m["grad_norm"] for m in seen],
            "norm_totals": [m["grad_2.0_norm_total"] for m in seen], "hook_norms": [m["hook/norm"] for m in seen],
            "first_norms": {k: v for k, v in seen[0].items() if k.startswith("grad_2.0_norm/")}}


def nan(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(4).clone()
    if rank == 1:
        data[1, 1, 0, 0] = float("nan")
    step = loopkit.with_nan_guard(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD))
    state, seen = _loop(step, make_state("sgd"), [data[i, rank] for i in range(len(data))])
    return {"params": full_params(state.model), "skipped": [m["nan_guard/skipped"] for m in seen], "step": state.step}


def nan_raise(rank: int, out_dir: str) -> dict[str, Any]:
    """``with_nan_guard(with_fsdp(...), policy="raise")`` fitting 4 batches, rank 1's third NaN: every rank raises,
    the state left at the refused batch (it was used up), and the fit resumed from it with the batch mended
    (``resumed``) against the fit that never saw it (``clean``)."""
    import loopkit

    data = make_data(4)
    bad = data.clone()
    if rank == 1:
        bad[2, 1, 0, 0] = float("nan")
    step = loopkit.with_nan_guard(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), policy="raise")
    result: dict[str, Any] = {"left_at": None}
    try:
        _fit(step, make_state("sgd"), bad, rank, 1)
    except loopkit.NonFiniteError as error:
        left = loopkit.state_at_error(error)
        if left is not None:
            result["left_at"] = (left.step, left.batch_index)
            result["resumed"] = full_params(_fit(step, left, data, rank, 1)[0].model)
    clean = loopkit.with_nan_guard(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), policy="raise")
    result["clean"] = full_params(_fit(clean, make_state("sgd"), data, rank, 1)[0].model)
    return result


def uneven(rank: int, out_dir: str) -> dict[str, Any]:
    """Rank 0 has 3 batches an epoch, rank 1 has 2: refused on every rank before a step, naming with_fsdp."""
    import loopkit

    step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD)
    try:
        _fit(step, make_state("sgd"), make_data(3 - rank), rank, 1)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def bf16(rank: int, out_dir: str) -> dict[str, Any]:
    import loopkit

    data = make_data(4)
    step = loopkit.with_amp(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), dtype=torch.bfloat16)
    state, seen = _loop(step, make_state("sgd"), [data[i, rank] for i in range(len(data))])
    return {"params": full_params(state.model), "losses": [m["loss"] for m in seen]}


def _checkpointed(directory: str) -> Any:
    import loopkit

    inner = loopkit.with_grad_accum(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), every=2)
    return loopkit.with_checkpointing(inner, directory, every_n_steps=1)


def cut(rank: int, out_dir: str) -> dict[str, Any]:
    """``accum``'s run, checkpointed at every update, cut at ``max_steps=4`` (mid-epoch 1): the processes end."""
    state, _ = _fit(_checkpointed(os.path.join(out_dir, "ckpt")), make_state("adam_sched"), make_data(5), rank, 2,
                    max_steps=4)
    return {"params": full_params(state.model), "step": state.step}


def resume(rank: int, out_dir: str) -> dict[str, Any]:
    """In new processes: a new state, as a restarted script builds it, restored from ``cut``'s checkpoints."""
    import loopkit

    directory = os.path.join(out_dir, "ckpt")
    restored = loopkit.restore(make_state("adam_sched"), directory)  # (every rank reads the shared directory)
    start = (restored.step, restored.epoch, restored.batch_index)
    state, _ = _fit(_checkpointed(directory), restored, make_data(5), rank, 2)
    return {"params": full_params(state.model), "start": start, "step": state.step}


def make_bn_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D_IN, D_HID), nn.BatchNorm1d(D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def make_bn_state() -> Any:
    import loopkit

    model = make_bn_model()
    return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.05), seed=3)


def make_bn_data(n: int, seed: int = 1234) -> torch.Tensor:
    """``make_data`` with rank 1's half shifted: the ranks' BatchNorm statistics differ."""
    data = make_data(n, seed).clone()
    data[:, 1] += 2.0
    return data


def _bn_fit(kind: str, rank: int, out_dir: str, **options: Any) -> tuple[Any, Any, list]:
    """2 epochs of 4 batches in groups of 2, validated each epoch, of the BatchNorm model: ``kind`` "fsdp" (its
    loss_fn records the buffers each call's forward starts from), "ddp", or "fsdp_ckpt" (checkpointed at each
    update into OUT/bn_ckpt; ``state=`` a restored state to start from)."""
    import loopkit

    seen: list[list[torch.Tensor]] = []

    def loss(model, batch):
        if kind != "ddp":
            seen.append([b.detach().clone() for b in model.buffers()])
        return mse(model, batch)

    sync = loopkit.with_ddp if kind == "ddp" else (lambda s: loopkit.with_fsdp(s, shard=SHARD))
    step = loopkit.with_grad_accum(sync(loopkit.train_step(loss)), every=2)
    if kind == "fsdp_ckpt":
        step = loopkit.with_checkpointing(step, os.path.join(out_dir, "bn_ckpt"), every_n_steps=1)
    val = make_bn_data(2, seed=99)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    state = options.pop("state", None)
    state = make_bn_state() if state is None else state
    state, history = _fit(step, state, make_bn_data(4), rank, 2, val=(evaluator, [val[i, rank] for i in range(2)]),
                          sanity_val_batches=0, **options)
    return state, history, seen


def _bn_result(state: Any, history: Any, seen: list) -> dict[str, Any]:
    return {"params": full_params(state.model), "history": history, "step": state.step, "seen": seen,
            "buffers": {n: b.detach().clone() for n, b in state.model.named_buffers()}}


def bn(rank: int, out_dir: str) -> dict[str, Any]:
    """The BatchNorm model under with_fsdp, uninterrupted."""
    return _bn_result(*_bn_fit("fsdp", rank, out_dir))


def bn_ddp(rank: int, out_dir: str) -> dict[str, Any]:
    """The same under with_ddp (its default broadcast_buffers=True): the reference for the buffers."""
    return _bn_result(*_bn_fit("ddp", rank, out_dir))


def bn_cut(rank: int, out_dir: str) -> dict[str, Any]:
    """``bn``'s run checkpointed at each update, cut at max_steps=3 (mid-epoch 1)."""
    return _bn_result(*_bn_fit("fsdp_ckpt", rank, out_dir, max_steps=3))


def bn_resume(rank: int, out_dir: str) -> dict[str, Any]:
    """In new processes: restored from ``bn_cut``'s checkpoints, trained to the end."""
    import loopkit

    restored = loopkit.restore(make_bn_state(), os.path.join(out_dir, "bn_ckpt"))
    return _bn_result(*_bn_fit("fsdp_ckpt", rank, out_dir, state=restored))


def bn_nobroadcast(rank: int, out_dir: str) -> dict[str, Any]:
    """``broadcast_buffers=False``: 2 calls, each recording the buffers its forward starts from, then each rank's
    ``evaluate(reduce=False)`` of its batch of ``make_bn_data(1, seed=7)`` inside ``step.validating(state)``, with the
    buffers there."""
    import loopkit

    seen: list[list[torch.Tensor]] = []

    def loss(model, batch):
        seen.append([b.detach().clone() for b in model.buffers()])
        return mse(model, batch)

    step = loopkit.with_fsdp(loopkit.train_step(loss), shard=SHARD, broadcast_buffers=False)
    data = make_bn_data(2)
    state, _ = _loop(step, make_bn_state(), [data[i, rank] for i in range(2)])
    own = {n: b.detach().clone() for n, b in state.model.named_buffers()}
    with step.validating(state):
        inside = loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mse": mse(m, b)}), state,
                                  [make_bn_data(1, seed=7)[0, rank]], reduce=False)
        inside_buffers = {n: b.detach().clone() for n, b in state.model.named_buffers()}
    return {"seen": seen, "params": full_params(state.model), "own": own, "inside": inside,
            "inside_buffers": inside_buffers}


def stop_mid_group(rank: int, out_dir: str) -> dict[str, Any]:
    """A callback's stop inside an accumulation group (a Timer's, say): the fit goes on to the group's end (its
    gradients, held by fully_shard, are in no state dict) and saves there."""
    import loopkit

    class StopAtBatch4(loopkit.Callback):
        def on_batch_end(self, state, metrics):
            if state.batch_index == 4:
                self.should_stop = True

    directory = os.path.join(out_dir, "stop_mid_group")
    step = loopkit.with_fsdp(loopkit.with_grad_accum(loopkit.train_step(mse), every=3), shard=SHARD)
    step = loopkit.with_checkpointing(step, directory, every_n_steps=1)
    state, _ = _fit(step, make_state("sgd"), make_data(8), rank, 1, callbacks=[StopAtBatch4()])
    return {"params": full_params(state.model), "step": state.step, "batch_index": state.batch_index,
            "saved": [(c.step, c.batch_index) for c in loopkit.checkpoint.list_checkpoints(directory)]}


def gather_to_rank_zero(rank: int, out_dir: str) -> dict[str, Any]:
    """``with_checkpointing(every_n_steps=1)`` over 2 calls, then ``export_weights``, with ``DTensor.full_tensor``
    watched: at each gather, how many whole tensors this rank still holds from earlier gathers (weakrefs), and after
    the saves. Rank 1 should hold none: each one it gathers for rank 0 is dropped at once."""
    import weakref

    import loopkit
    from torch.distributed.tensor import DTensor

    gathered: list[weakref.ref] = []
    alive_at_gather: list[int] = []
    original = DTensor.full_tensor

    def watched(self, *args, **kwargs):
        alive_at_gather.append(sum(ref() is not None for ref in gathered))
        whole = original(self, *args, **kwargs)
        gathered.append(weakref.ref(whole))
        return whole

    directory = os.path.join(out_dir, "gather_ckpt")
    step = loopkit.with_checkpointing(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), directory,
                                      every_n_steps=1, keep_last=None)
    data = make_data(2)
    DTensor.full_tensor = watched
    try:
        state, _ = _loop(step, make_state("adam"), [data[i, rank] for i in range(len(data))])
        loopkit.export_weights(state, os.path.join(out_dir, "gather.safetensors"))
        alive_after = sum(ref() is not None for ref in gathered)
    finally:
        DTensor.full_tensor = original
    return {"params": full_params(state.model), "gathers": len(alive_at_gather), "alive_at_gather": alive_at_gather,
            "alive_after": alive_after, "step": state.step}


def norm_collectives(rank: int, out_dir: str) -> dict[str, Any]:
    """The all-reduces (``torch.distributed.all_reduce`` and the functional one DTensor uses) that with_grad_norm's
    and with_grad_clip's gradient hooks make on sharded gradients, and their values against the gathered gradients'
    own (torch's formulas on whole tensors): norms, clipped gradients."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    import loopkit
    from loopkit._sharded import full
    from loopkit.steps import GradContext
    from loopkit.transforms.grad_clip import ClipGrad
    from loopkit.transforms.grad_norm import GradNorm

    data = make_data(2)
    step = loopkit.donate(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD))
    state, _ = step(make_state("sgd"), data[0, rank])
    counted = [0]
    originals = (dist.all_reduce, funcol.all_reduce)

    def counting(original):
        def call(*args, **kwargs):
            counted[0] += 1
            return original(*args, **kwargs)
        return call

    def run(hook):
        for p in state.model.parameters():
            p.grad = None
        mse(state.model, data[1, rank]).backward()  # (fully_shard's reduce-scatter: DTensor gradients)
        before = {n: full(p.grad) for n, p in state.model.named_parameters()}
        ctx = GradContext(state, {}, None, None)
        counted[0] = 0
        dist.all_reduce, funcol.all_reduce = counting(originals[0]), counting(originals[1])
        try:
            hook.on_grads(ctx)
        finally:
            dist.all_reduce, funcol.all_reduce = originals
        after = {n: full(p.grad) for n, p in state.model.named_parameters()}
        return {"collectives": counted[0], "before": before, "after": after,
                "metrics": {k: (type(v).__name__, v.dtype, float(v)) for k, v in ctx.metrics.items()}}

    hooks = {"norm_2": GradNorm(2.0), "norm_inf": GradNorm(float("inf")), "norm_3": GradNorm(3.0),
             "clip_2": ClipGrad(max_norm=0.05), "clip_inf": ClipGrad(max_norm=0.05, norm_type=float("inf")),
             "clip_1": ClipGrad(max_norm=0.05, norm_type=1.0), "clip_both": ClipGrad(max_norm=0.05, max_value=0.02)}
    return {name: run(hook) for name, hook in hooks.items()}


def empty_shard(rank: int, out_dir: str) -> dict[str, Any]:
    """A layer with fewer rows than ranks (``Linear(D_HID, 1)``: rank 1's shards of it are empty): the inf norm of
    with_grad_norm and with_grad_clip (torch's _foreach_norm refuses an empty tensor's); and export_weights with
    bad metadata, which every rank refuses (rank 0 alone did, after the gather, and rank 1 returned the path)."""
    import loopkit
    from loopkit._sharded import full

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, 1))
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    data = make_data(1)

    def loss(model, batch):
        return (model(batch[:, :D_IN]) ** 2).mean()

    grads = {}

    def keep(state):
        grads.update({n: full(p.grad) for n, p in state.model.named_parameters()})

    step = loopkit.with_grad_hook(loopkit.with_fsdp(loopkit.train_step(loss), shard=SHARD), keep)
    step = loopkit.donate(loopkit.with_grad_clip(loopkit.with_grad_norm(step, "inf"), max_norm=0.05, norm_type=float("inf")))
    state, metrics = step(state, data[0, rank])
    try:
        loopkit.export_weights(state, os.path.join(out_dir, "empty_shard.safetensors"), metadata={"step": 5})
        refused = None
    except TypeError as error:
        refused = str(error)
    return {"grads": grads, "metrics": {k: float(v) for k, v in metrics.items()}, "export_refused": refused}


def shard_grad_op(rank: int, out_dir: str) -> dict[str, Any]:
    """``reshard_after_forward=False`` (SHARD_GRAD_OP): a validation's forward (no backward) leaves fully_shard's
    parameters whole; put back sharded after it, the epoch-end checkpoints gather on every rank (they hung) and the
    state dict after an evaluate is whole. ``sgd``'s run otherwise (the raw loop's reference)."""
    import loopkit

    data, val = make_data(3), make_data(2, seed=99)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    val_batches = [val[i, rank] for i in range(len(val))]
    step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD, reshard_after_forward=False)
    step = loopkit.with_checkpointing(step, os.path.join(out_dir, "sgo_ckpt"), every_n_epochs=1)
    state, history = _fit(step, make_state("sgd"), data, rank, 2, val=(evaluator, val_batches))
    means = loopkit.evaluate(evaluator, state, val_batches)
    return {"params": full_params(state.model), "history": history, "evaluate": means,
            "sharded": sorted({type(p).__name__ for p in state.model.parameters()}),
            "state_dict_types": sorted({type(t).__name__ for t in state.state_dict()["model"].values()})}


def uneven_val(rank: int, out_dir: str) -> dict[str, Any]:
    """Validation data of 2 batches on rank 0 and 1 on rank 1 (``shard(..., pad=False)`` of 5 samples): each rank's
    forward gathers from the others, so it is refused on every rank before the first batch, naming the counts."""
    import loopkit

    data, val = make_data(1), make_data(2, seed=99)
    state, _ = _loop(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), make_state("sgd"), [data[0, rank]])
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    refused = {}
    for name, call in (("evaluate", lambda d: loopkit.evaluate(evaluator, state, d)),
                       ("predict", lambda d: loopkit.predict(lambda m, b: m(b[:, :D_IN]), state, d))):
        try:
            call([val[i, rank] for i in range(2 - rank)])
        except ValueError as error:
            refused[name] = str(error)
    return {"refused": refused, "then": loopkit.evaluate(evaluator, state, [val[0, rank]])}  # (the ranks still agree)


class _Stream(torch.utils.data.IterableDataset):
    """``batches``, a stream's shard: no ``len()`` (a DataLoader over it has none)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class _SizedStream(_Stream):
    """A ``_Stream`` whose ``len()`` says ``length`` batches (an estimate, as torch takes an IterableDataset's)."""

    def __init__(self, batches: list[torch.Tensor], length: int) -> None:
        super().__init__(batches)
        self.length = length

    def __len__(self) -> int:
        return self.length


def stream_val(rank: int, out_dir: str) -> dict[str, Any]:
    """Validation data that streams 3 batches on rank 0 and 2 on rank 1, through a DataLoader whose ``len()`` says
    3 on both (torch's estimate of an IterableDataset's), and without a length: ``evaluate``, ``predict`` and a
    fit's validations end after 2 batches on both ranks, rank 0's third dropped with a warning (they hung: rank 0's
    third forward waited in its all-gather while rank 1 had ended). One step of ``sgd``'s first, then a fit of one
    epoch validated on the sized stream; the warnings each call gave (their messages)."""
    import warnings

    import loopkit
    from torch.utils.data import DataLoader

    data, val = make_data(1), make_data(3, seed=99)
    state, _ = _loop(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), make_state("sgd"), [data[0, rank]])
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    mine = [val[i, rank] for i in range(3 - rank)]
    loaders = {"sized": lambda: DataLoader(_SizedStream(mine, 3), batch_size=None),
               "unsized": lambda: DataLoader(_Stream(mine), batch_size=None)}
    result: dict[str, Any] = {}

    def caught(name: str, call: Any) -> None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result[name] = call()
        result[f"{name}_warnings"] = [str(w.message) for w in seen]

    for kind, loader in loaders.items():
        caught(f"evaluate_{kind}", lambda: loopkit.evaluate(evaluator, state, loader()))
        caught(f"predict_{kind}", lambda: loopkit.predict(lambda m, b: m(b[:, :D_IN]), state, loader()))
    # 2 batches on each rank, a list on rank 0 and a stream on rank 1: rank 0 votes too (the votes crossed its
    # forwards' all-gathers, both ranks waiting until the timeout)
    mixed = lambda: [val[i, rank] for i in range(2)] if rank == 0 else _Stream([val[i, rank] for i in range(2)])  # noqa: E731
    caught("evaluate_mixed", lambda: loopkit.evaluate(evaluator, state, mixed()))
    caught("predict_mixed", lambda: loopkit.predict(lambda m, b: m(b[:, :D_IN]), state, mixed()))
    fit_step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD)
    caught("fit", lambda: _fit(fit_step, make_state("sgd"), data, rank, 1,
                               val=(evaluator, loaders["sized"]()))[1])
    result["then"] = loopkit.evaluate(evaluator, state, [val[0, rank]])  # (the ranks still agree)
    return result


def _attempt(call: Any) -> tuple[Any, str | None]:
    """``call()``'s value and None, or None and its error (type and message): a scenario that goes on either way."""
    try:
        return call(), None
    except Exception as error:  # noqa: BLE001 (recorded: the test asserts on it)
        return None, f"{type(error).__name__}: {error}"


def uneven_val_fit(rank: int, out_dir: str) -> dict[str, Any]:
    """A fit (one epoch of ``sgd``'s 3 batches) validated on data of 3 batches on rank 0 and 2 on rank 1, and of 1
    and none (an empty shard, which with_ddp takes): refused on every rank at the fit's start, before any update
    (they trained a whole epoch, then the epoch's validation refused them, naming evaluate and limit=); the state
    given and the step then train the same fit with ``limit_val_batches`` the fewest. Validation data a factory
    makes (checked once made, at the epoch's validation), and a DataLoader of a stream whose ``len()`` says 3 and
    2 (an estimate: read while every rank has a batch, not refused)."""
    import warnings

    import loopkit
    from torch.utils.data import DataLoader

    data, val = make_data(3), make_data(3, seed=99)
    evaluator = loopkit.eval_step(lambda m, b: {"mse": mse(m, b)})
    result: dict[str, Any] = {}
    for case, counts in (("uneven", (3, 2)), ("empty", (1, 0))):
        mine = [val[i, rank] for i in range(counts[rank])]
        state, step = make_state("sgd"), loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD)
        _, result[f"{case}_refused"] = _attempt(lambda: _fit(step, state, data, rank, 1, val=(evaluator, mine)))
        result[f"{case}_before"] = _attempt(lambda: (state.step, {n: p.detach().clone()
                                                                  for n, p in state.model.named_parameters()}))
        fitted, result[f"{case}_retry_error"] = _attempt(lambda: _fit(
            step, state, data, rank, 1, val=(evaluator, mine), limit_val_batches=min(counts)))
        if fitted is not None:
            result[f"{case}_params"], result[f"{case}_history"] = full_params(fitted[0].model), fitted[1]
    mine = [val[i, rank] for i in range(3 - rank)]
    step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD)
    _, result["factory_refused"] = _attempt(lambda: _fit(step, make_state("sgd"), data, rank, 1,
                                                         val=(evaluator, lambda epoch: mine)))
    step, stream = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD), _SizedStream(mine, 3 - rank)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fitted, result["stream_error"] = _attempt(lambda: _fit(
            step, make_state("sgd"), data, rank, 1, val=(evaluator, DataLoader(stream, batch_size=None))))
    result["stream_history"] = None if fitted is None else fitted[1]
    result["stream_warnings"] = [str(w.message) for w in seen]
    return result


def unfreeze(rank: int, out_dir: str) -> dict[str, Any]:
    """A fit that unfreezes its first layer at epoch 1, uninterrupted, and stopped before or after the unfreeze then
    resumed (each from its gathered state dict, in a template with the run's groups then); records whether the
    added group holds the sharded parameters."""
    import loopkit

    data = list(make_data(2)[:, rank])
    step = loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD)

    def fit(state: Any, epochs: int) -> Any:
        return loopkit.run_epochs(step, state, data, epochs=epochs, callbacks=[Unfreeze()], progress=False)[0]

    whole = fit(frozen_state(make_model()), UNFREEZE_EPOCHS)
    added = whole.optimizer.param_groups[1]["params"]
    holds_shards = all(type(p).__name__ == "DTensor" and any(p is q for q in whole.model.parameters()) for p in added)
    resumed = {}
    for cut in (UNFREEZE_AT, UNFREEZE_AT + 1):
        saved = fit(frozen_state(make_model()), cut).state_dict()
        template = frozen_state(make_model(), 2 if cut > UNFREEZE_AT else 1)
        resumed[cut] = full_params(fit(template.load_state_dict(saved), UNFREEZE_EPOCHS).model)
    return {"params": full_params(whole.model), "step": whole.step, "resumed": resumed, "holds_shards": holds_shards,
            "groups": len(whole.optimizer.param_groups)}


def apart(rank: int, out_dir: str) -> dict[str, Any]:
    """The ranks' flags or optimizers apart, each refused on every rank before anything changed, then mended and
    trained on: at the first call, rank 1's first weight frozen (before: gloo aborted the processes at the first
    backward), its SGD's lr 0.0, an Adam, or a group without the last bias (before: each rank updated its shard with
    its own optimizer, a mix); then a group added mid-fit, with another lr and another flag on rank 1."""
    import loopkit
    from loopkit._sharded import is_sharded

    data, seen = make_data(APART_CALLS), {}
    step = loopkit.donate(loopkit.with_fsdp(loopkit.train_step(mse), shard=SHARD))

    def refused(state: Any, batch: torch.Tensor, sharded: bool = False) -> str:
        """The refusal's message, and whether it left ``state`` usable (``sharded`` as it was: nothing sharded)."""
        try:
            step(state, batch)
            return "not refused"
        except loopkit.steps.SyncRefusal as error:
            intact = loopkit.state_at_error(error) is state and is_sharded(state.model) == sharded
            return str(error) + ("" if intact else " (the state changed)")

    state = make_state("sgd")
    state.model[0].weight.requires_grad_(rank == 0)
    seen["flags"] = refused(state, data[0, rank])
    state.model[0].weight.requires_grad_(True)
    state.optimizer.param_groups[0]["lr"] = 0.1 if rank == 0 else 0.0
    seen["lr"] = refused(state, data[0, rank])
    state.optimizer.param_groups[0]["lr"] = 0.1  # mended: the fit equals one process's
    state, _ = _loop(step, state, [data[i, rank] for i in range(APART_CALLS)])
    seen["params"] = full_params(state.model)
    for kind in ("class", "group"):
        model = make_model()
        params = list(model.parameters())
        optimizer = (torch.optim.Adam(params, lr=0.1) if kind == "class" else
                     torch.optim.SGD(params[:-1], lr=0.1, momentum=0.9)) if rank == 1 else make_optimizer("sgd", model)[0]
        seen[kind] = refused(loopkit.TrainState.create(model, optimizer), data[0, rank])
    state = frozen_state(make_model())
    state, _ = step(state, data[0, rank])
    (state.model[0] if rank == 0 else state.model[0].weight).requires_grad_(True)
    state.optimizer.add_param_group({"params": list(state.model[0].parameters()), "lr": 0.05 if rank == 0 else 0.01})
    seen["added"] = refused(state, data[1, rank], sharded=True)
    state.model[0].requires_grad_(True)
    state.optimizer.param_groups[1]["lr"] = 0.05  # mended: the fit goes on
    state, _ = _loop(step, state, [data[i, rank] for i in range(1, APART_CALLS)])
    return {**seen, "added_params": full_params(state.model)}


APART_CALLS = 3

SCENARIOS = {f.__name__: f for f in (sgd, adam, accum, accum_outer, clip, nan, nan_raise, uneven, bf16, cut, resume, bn, bn_ddp, bn_cut,
                                     bn_nobroadcast, bn_resume, stop_mid_group, gather_to_rank_zero, norm_collectives, empty_shard,
                                     shard_grad_op, uneven_val, stream_val, uneven_val_fit, unfreeze, apart)}


def main(out_dir: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    from loopkit import distributed

    assert distributed.init(timeout=float(os.environ.get("LOOPKIT_TEST_TIMEOUT", "20")))
    rank = distributed.rank()
    for name in scenarios:
        torch.save(SCENARIOS[name](rank, out_dir), os.path.join(out_dir, f"{name}_rank{rank}.pt"))
        print(f"rank {rank} done {name}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
