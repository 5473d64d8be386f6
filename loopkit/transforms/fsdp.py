"""``with_fsdp``: fully sharded data-parallel training over torch's FSDP2 (``fully_shard``).

Lightning's ``Trainer(strategy="fsdp")`` / ``FSDPStrategy``. Start the processes with
``torchrun`` and call ``loopkit.distributed.init()`` before building the step; each rank
trains on its own shard of the data (``loopkit.distributed.shard``). Each rank holds only its
shard of every parameter, gradient and optimizer moment: the forward all-gathers a module's
parameters when it runs, and the backward reduce-scatters its gradients (averaged over the ranks).

>>> import torch, torch.distributed as dist
>>> from loopkit.steps import train_step
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> with_fsdp(train_step(lambda m, b: m(b).sum())).applied
('train_step', 'with_fsdp')
>>> dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loopkit._sharded import held_grads as _held_grads
from loopkit._sharded import is_dtensor, local
from loopkit import _collective
from loopkit._agreement import named_callable, refuse_apart
from loopkit.steps import Step, SyncRefusal, TrainStep, changing_nothing
from loopkit.transforms._compose import check_option_names, refuse_wrapping, require_train_step

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["FSDPSync", "with_fsdp"]

_NO_GROUP = (
    "with_fsdp needs a torch.distributed process group, and none is initialised. Start the script "
    "with torchrun, e.g. `torchrun --nproc-per-node 2 script.py`, and call loopkit.distributed.init() "
    "before building the step (in one process, leave with_fsdp out)"
)

_DONATE = (
    "with_fsdp: the step must be donated: call loopkit.donate(step) and pass each returned state to the "
    "next call (run_epochs donates for you). fully_shard replaces the model's parameters with sharded ones "
    "in place, at the step's first call, and points the optimizer at them; a step that is not donated "
    "works on a fresh copy of the state at every call, which it cannot follow"
)

#: the transforms that cannot go around (or inside) ``with_fsdp``, and why (``FSDPSync.refuses``)
_REFUSED: Mapping[str, str] = types.MappingProxyType({
    "with_ema": "the averages would be copies of this rank's shards of the parameters, which neither the "
                "checkpoint's full state dict nor an evaluation of the averaged model can use; average in one "
                "process (or under with_ddp)",
    "with_swa": "its averaged model would be a copy of this rank's shards, and its BatchNorm update a forward "
                "outside the sharded model; use with_ddp for SWA",
    "with_pruning": "its masks and torch.nn.utils.prune's reparametrisation need whole parameters, and "
                    "fully_shard's are sharded DTensors; prune in one process or under with_ddp",
    "with_qat": "it swaps the model's modules at its first call, after which fully_shard's sharded parameters "
                "would belong to modules that are gone; use with_ddp for quantization-aware training",
    "with_compile": "torch.compile of a fully_shard-ed model is not supported by loopkit yet (its graph breaks "
                    "at every all-gather hook); leave with_compile out",
    "with_amp(float16)": "float16 needs a loss scaler, which loopkit does not run over sharded gradients yet; "
                         "use with_amp(dtype=torch.bfloat16), or with_fsdp(mp_policy=MixedPrecisionPolicy(...))",
})

_UNSUPPORTED_OPTIONS: Mapping[str, str] = types.MappingProxyType({
    "offload_policy": "CPU offload (Lightning's cpu_offload=True) is not supported by with_fsdp",
    "ignored_params": "with_fsdp averages every trained parameter's gradient over the ranks; parameters left "
                      "out of fully_shard would keep this rank's own",
    "module": "the module is the state's model; do not pass module=",
})


class FSDPSync:
    """The fully-sharded data-parallel hook of a :class:`loopkit.TrainStep` (its ``sync`` field).

    Shards a state's model once per model object, at the first call with it: rank 0's
    parameters and buffers are broadcast to every rank, ``fully_shard`` is applied to each
    submodule chosen by ``shard`` (innermost first) and then to the model, and the optimizer's
    ``param_groups`` (and the state it holds, cut into this rank's shards) are pointed at the
    new, sharded parameters. The model object stays the user's module (its class becomes
    torch's ``FSDP<Class>``, its state dict keys are unchanged).

    >>> FSDPSync(()).name
    'with_fsdp'
    """

    name = "with_fsdp"
    requires_donation = _DONATE
    grads_are_views = False
    backward_collective = "the gradient reduce-scatter in backward (fully_shard)"
    refuses = _REFUSED

    def __init__(
        self, shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool] = (),
        options: Mapping[str, Any] | None = None, broadcast_buffers: bool = True,
    ) -> None:
        self.shard = shard
        self.options = dict(options or {})
        self.broadcast_buffers = broadcast_buffers
        self._model: weakref.ref | None = None
        self._groups = 0  # the optimizer's param groups when last checked (module): one added since is checked

    @property
    def agreed_options(self) -> dict[str, Any]:
        """What decides the collectives, as it acts, which every rank must give alike (see
        :attr:`loopkit.steps.Step.rank_agreed`): ``broadcast_buffers`` (a broadcast before each group's forward),
        ``reshard_after_forward`` (the backward's all-gathers), ``shard`` (which submodules are ``fully_shard`` groups
        of their own, each with its all-gather and reduce-scatter: :func:`_shard_described`), ``mp_policy`` (the
        dtypes those gather and reduce in: :func:`_precision_described`) and ``shard_placement_fn`` (how each
        parameter is cut, by name).

        >>> agreed = FSDPSync({torch.nn.Linear}, {"reshard_after_forward": False}).agreed_options
        >>> agreed["reshard_after_forward"], agreed["shard"], agreed["mp_policy"]
        (False, ('torch.nn.modules.linear.Linear',), {'param_dtype': None, 'reduce_dtype': None})
        """
        return {"broadcast_buffers": self.broadcast_buffers,
                "reshard_after_forward": self.options.get("reshard_after_forward", True),
                "shard": _shard_described(self.shard),
                "mp_policy": _precision_described(self.options.get("mp_policy")),
                "shard_placement_fn": named_callable(self.options.get("shard_placement_fn"))}

    def wraps(self, model: nn.Module) -> bool:
        """Whether ``model`` is sharded already by this hook (:meth:`module` then changes nothing of it).

        >>> FSDPSync(()).wraps(torch.nn.Linear(1, 1))
        False
        """
        ref = self._model
        return ref is not None and ref() is model

    def module(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, extras: Mapping[str, Any] | None = None
    ) -> tuple[nn.Module, bool]:
        """``model``, sharded at the first call with this model object (``optimizer`` pointed at the shards);
        at a later call with it, ``model`` as it is; and whether this call took the model on (sharded it: an error
        later in the call finds its parameters replaced). Raises ``RuntimeError`` without a process group and
        ``ValueError`` without an optimizer (or for one that trains a parameter not of the model). Where it shards
        the model, and at a call that finds a param group added since the last, it compares the parameters'
        ``requires_grad`` and the optimizer (its class, each group's size and hyper-parameters) over the ranks (one
        small all-gather; none at the other calls) and refuses, on every rank, flags or optimizers that differ with a
        :class:`loopkit.steps.SyncRefusal` naming what differs and the ranks, before anything changed
        (:func:`_refuse_apart`). Every error raised before the broadcast of rank 0's weights and ``fully_shard``
        (these, no process group, no optimizer, :func:`_refuse_unshardable`'s) is a ``SyncRefusal`` or marked with
        :func:`loopkit.steps.sync_unchanged`: the step leaves the state usable; one raised from the broadcast on
        may find the model changed half-way, and is not. ``extras`` (the
        state's) is not used: where rank 0's buffers are broadcast is decided by the state's accumulation count
        alone (:meth:`before_forward`), the same in a resumed run.

        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = torch.nn.Linear(2, 1)
        >>> sync = FSDPSync(())
        >>> sharded, built = sync.module(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> sharded is model, built, type(model.weight).__name__, sync.wraps(model)
        (True, True, 'DTensor', True)
        >>> dist.destroy_process_group()
        """
        if self.wraps(model):
            if optimizer is not None and len(optimizer.param_groups) != self._groups:  # a group added since
                with changing_nothing():
                    _refuse_foreign(model, optimizer, _STALE)
                    _refuse_apart(model, optimizer)
                self._groups = len(optimizer.param_groups)
            return model, False
        with changing_nothing():
            if not _collective.ready():
                raise RuntimeError(_NO_GROUP)
            if optimizer is None:
                raise ValueError("with_fsdp needs a state with an optimizer (TrainState.create(model, optimizer))")
            self._model = None
            unsharded = not any(is_dtensor(p) for p in model.parameters())  # (one you sharded yourself is taken as is)
            if unsharded:
                _refuse_unshardable(model, optimizer, self.shard)
            _refuse_apart(model, optimizer)
        if unsharded:
            _shard(model, optimizer, self.shard, self.options)
        self._model, self._groups = weakref.ref(model), len(optimizer.param_groups)
        return model, True

    def after_forward(self, module: nn.Module, extras: dict[str, Any]) -> None:
        """Nothing: the buffers' broadcast needs no record of the last forward (see :meth:`module`).

        >>> FSDPSync(()).after_forward(torch.nn.Linear(1, 1), {})
        """

    def before_forward(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics), as DDP does before a forward with
        ``broadcast_buffers=True``: the step calls it before the forward of a call that starts an accumulation
        group (every call without one). One broadcast per dtype and device of the buffers, on device tensors (no
        host read); nothing with ``broadcast_buffers=False``, in one process, or for a model without buffers.

        >>> FSDPSync(()).before_forward(torch.nn.BatchNorm1d(2))  # (no process group: one process)
        """
        if not self._broadcasts():
            return
        what = "the broadcast of rank 0's buffers before the forward"
        _collective.broadcast_from_rank_zero(model.buffers(), self.failure, what)

    def _broadcasts(self) -> bool:
        """Whether rank 0's buffers are broadcast: ``broadcast_buffers`` on, under a process group of several ranks."""
        return self.broadcast_buffers and _collective.ready() and torch.distributed.get_world_size() > 1

    def validating(self, model: nn.Module, extras: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
        """The context of an evaluation of ``model`` (``run_epochs``' validations, which come between accumulation
        groups): inside, every rank's model holds rank 0's buffers, as the next group's forward would
        (:meth:`before_forward`; ``with_ddp`` validates so too), and each rank's own again on exit; nothing with
        ``broadcast_buffers=False``, in one process, or for a model without buffers (``extras`` is not used).

        >>> with FSDPSync(()).validating(torch.nn.BatchNorm1d(2), {}):  # (no process group: one process)
        ...     pass
        """
        buffers = list(model.buffers())
        if not buffers or not self._broadcasts():
            return contextlib.nullcontext()
        return _collective.rank_zero_values(buffers, self.failure, "the broadcast of rank 0's buffers before a validation")

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The context of a micro-step whose gradients stay on this rank, unsharded (no reduce-scatter):
        ``fully_shard``'s gradient sync off inside it, back on after.

        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = torch.nn.Linear(2, 1)
        >>> sync = FSDPSync(())
        >>> model, _ = sync.module(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> with sync.no_sync(model):
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> from loopkit._sharded import holds_unreduced_grads
        >>> model.weight.grad is None, holds_unreduced_grads(model)  # (held unsharded, for reduce_grads)
        (True, True)
        >>> dist.destroy_process_group()
        """
        return _without_gradient_sync(module)

    def failure(self, collective: str, error: BaseException, where: str = "") -> RuntimeError:
        """The error to raise when ``collective`` failed: it names the collective, this rank and why.

        >>> str(FSDPSync(()).failure("the all-gather", RuntimeError("reset by peer")))[:45]
        'with_fsdp: the all-gather failed on rank 0 of'
        """
        return _collective.failure("with_fsdp", collective, error, where)

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """``flags``' maximum over all ranks (one all-reduce, of this rank's part of a ``DTensor``): 1.0 anywhere
        is 1.0 everywhere, so that every rank skips the same updates.

        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> FSDPSync(()).agree(torch.tensor([0.0, 1.0]))
        tensor([0., 1.])
        >>> dist.destroy_process_group()
        """
        return _collective.agree_max(local(flags), self.failure)

    def reduce_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Reduce a flushed partial group's gradients, which ``fully_shard`` holds unsharded on each rank
        (their backwards ran without gradient sync), into the sharded parameters' gradients: the ranks'
        mean, cut into this rank's shard, as the reduce-scatter of a synced backward gives it.

        Every rank makes the same collective (one all-reduce per dtype), whatever its micro-batches used:
        a parameter with a gradient on some rank gets the mean on every rank, one with none on any keeps none.

        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sync = FSDPSync(())
        >>> model, _ = sync.module(model, optimizer)
        >>> with sync.no_sync(model):
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> sync.reduce_grads(optimizer)
        >>> from loopkit._sharded import holds_unreduced_grads
        >>> model.weight.grad.full_tensor(), holds_unreduced_grads(model)
        (tensor([[1., 1.]]), False)
        >>> dist.destroy_process_group()
        """
        model = self._model() if self._model is not None else None
        if model is None:
            return
        held = _held_grads(model)
        by_dtype: dict[torch.dtype, list[tuple[Any, torch.Tensor | None]]] = {}
        for fsdp_param, grad in held:
            by_dtype.setdefault(fsdp_param.sharded_param.dtype, []).append((fsdp_param, grad))
        for dtype, members in by_dtype.items():
            shapes = [fsdp_param.sharded_param.shape for fsdp_param, _ in members]
            device = local(members[0][0].sharded_param).device
            grads = [None if grad is None else local(grad) for _, grad in members]
            means = _collective.mean_over_ranks(grads, [s.numel() for s in shapes], dtype, device, self.failure)
            for (fsdp_param, _), shape, mean in zip(members, shapes, means):
                _drop_held_grad(fsdp_param)
                if mean is not None:
                    _add_sharded_grad(fsdp_param.sharded_param, mean.view(shape))

    def marked_used(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Nothing to mark: ``fully_shard`` keeps no record of the parameters a backward used (unlike DDP's reducer
        under ``find_unused_parameters``, whose used parameters a flush leaves with zero gradients).

        >>> FSDPSync(()).marked_used(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))
        []
        """
        return []


@contextlib.contextmanager
def _without_gradient_sync(module: nn.Module) -> Iterator[None]:
    """``fully_shard``'s gradient sync turned off for the backward inside (DDP's ``no_sync``), back on after."""
    module.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]


def _chosen(shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    """The test of a submodule that ``shard`` (module classes, or a predicate) picks for a ``fully_shard`` of its own."""
    if callable(shard) and not isinstance(shard, type):
        return shard  # type: ignore[return-value]
    classes = tuple(shard)  # type: ignore[arg-type]
    return lambda module: isinstance(module, classes)


def _shard_described(shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool]) -> tuple[str, ...] | str:
    """``shard`` as it picks: its classes by name, sorted, each once (``{nn.Linear}``, ``[nn.Linear, nn.Linear]`` and
    ``(nn.Linear,)`` pick alike; ``()`` and ``set()`` pick none), or a predicate by its module and name (a lambda's by its
    line too: :func:`loopkit._agreement.named_callable`).

    >>> _shard_described([nn.ReLU, nn.Linear, nn.ReLU]), _shard_described(set())
    (('torch.nn.modules.activation.ReLU', 'torch.nn.modules.linear.Linear'), ())
    >>> _shard_described(callable)
    'predicate builtins.callable'
    """
    if callable(shard) and not isinstance(shard, type):
        return f"predicate {named_callable(shard)}"
    return tuple(sorted({f"{cls.__module__}.{cls.__qualname__}" for cls in shard}))  # type: ignore[union-attr]


def _precision_described(policy: MixedPrecisionPolicy | None) -> dict[str, str | None]:
    """``mp_policy`` as it acts on the collectives: the dtype the parameters are all-gathered in and the one the
    gradients are reduced in (torch's ``reduce_dtype=None`` reduces in ``param_dtype``; no policy is
    ``MixedPrecisionPolicy()``, both None: the parameters' own). ``output_dtype`` and ``cast_forward_inputs`` act on
    the forward alone. (A ``param_dtype`` that is the parameters' own dtype acts as None, which this cannot tell
    without the model: such a pair is refused.)

    >>> from torch.distributed.fsdp import MixedPrecisionPolicy
    >>> _precision_described(MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    {'param_dtype': 'torch.bfloat16', 'reduce_dtype': 'torch.bfloat16'}
    >>> _precision_described(None) == _precision_described(MixedPrecisionPolicy(output_dtype=torch.float16))
    True
    """
    param = getattr(policy, "param_dtype", None)
    reduce = getattr(policy, "reduce_dtype", None) or param
    return {"param_dtype": None if param is None else str(param),
            "reduce_dtype": None if reduce is None else str(reduce)}


def _shard(
    model: nn.Module, optimizer: torch.optim.Optimizer, shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool],
    options: Mapping[str, Any],
) -> None:
    """Shard ``model`` in place (rank 0's weights on every rank first) and point ``optimizer`` at the shards: after
    :func:`_refuse_unshardable` and :func:`_refuse_apart` (an error here may find the model changed half-way)."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    picked = _chosen(shard)
    _broadcast_from_rank_zero(model)
    for module in reversed([m for m in model.modules() if m is not model and picked(m)]):  # innermost first
        fully_shard(module, **options)
    fully_shard(model, **options)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        old = group["params"]
        group["params"] = [sharded[names[id(p)]] for p in old]
        for before, after in zip(old, group["params"]):
            entry = optimizer.state.pop(before, None)
            if entry is not None:
                optimizer.state[after] = {k: _shard_like(v, before, after) for k, v in entry.items()}


def _refuse_unshardable(
    model: nn.Module, optimizer: torch.optim.Optimizer, shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool],
) -> None:
    """Refuse what :func:`_shard` cannot shard, before it changes anything: an optimizer that trains a parameter not
    of ``model`` (:func:`_refuse_foreign`), a tied weight ``shard`` splits (:func:`_refuse_split_ties`), tensors
    that differ from rank 0's (:func:`_refuse_other_tensors`, one all-gather).

    >>> _refuse_unshardable(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), ())
    Traceback (most recent call last):
    ...
    loopkit.steps.SyncRefusal: with_fsdp: the optimizer's param group 0 trains a parameter of shape (1, 2) that is not one of the model's; fully_shard shards the model's parameters only (build the optimizer over model.parameters())
    """
    _refuse_foreign(model, optimizer, _NOT_OF_MODEL)
    _refuse_split_ties(model, _chosen(shard))
    _refuse_other_tensors(model)


_NOT_OF_MODEL = ("fully_shard shards the model's parameters only (build the optimizer over model.parameters())")
_STALE = ("a parameter taken before the step's first call, which fully_shard replaced with a sharded one, would never "
          "train; add the group with the model's parameters as they are when you add it, e.g. "
          "optimizer.add_param_group({'params': list(state.model.backbone.parameters())}) in a callback's "
          "on_epoch_start (docs/from_lightning.md, BackboneFinetuning)")


def _refuse_foreign(model: nn.Module, optimizer: torch.optim.Optimizer, advice: str) -> None:
    """Refuse (:class:`loopkit.steps.SyncRefusal`, a ``ValueError``) an optimizer that trains a parameter not of
    ``model`` (by identity), naming its group, its shape and ``advice``.

    >>> model = torch.nn.Linear(2, 1)
    >>> _refuse_foreign(model, torch.optim.SGD(model.parameters(), lr=0.1), "")
    >>> _refuse_foreign(model, torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), "advice")
    Traceback (most recent call last):
    loopkit.steps.SyncRefusal: with_fsdp: the optimizer's param group 0 trains a parameter of shape (1, 2) that is not one of the model's; advice
    """
    mine = {id(p) for p in model.parameters()}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in mine:
                raise SyncRefusal(f"with_fsdp: the optimizer's param group {index} trains a parameter of shape "
                                  f"{tuple(p.shape)} that is not one of the model's; {advice}")


def _refuse_split_ties(model: nn.Module, picked: Callable[[nn.Module], bool]) -> None:
    """Refuse a parameter tied across modules (the same tensor in two places, an embedding shared with the output
    layer) that ``shard`` would put into two ``fully_shard`` groups: each occurrence belongs to the innermost picked
    module that holds it (the model's own group where none does), and torch refuses a parameter of two groups at the
    step's first forward ("shared with a parameter already managed by another FSDP group"). Raised here, before
    anything is sharded, naming both places and what to pick instead. A group is a module object, not a name: one
    module reused in two places (``nn.ModuleList([block, block])``, ALBERT's shared layer) is one group, sharded
    once, and its weights are in it wherever it runs.

    >>> block = nn.Linear(2, 2)
    >>> _refuse_split_ties(nn.Sequential(block, block), lambda m: isinstance(m, nn.Linear))  # one group: allowed
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> b.weight = a.weight
    >>> _refuse_split_ties(nn.Sequential(a, b), lambda m: isinstance(m, nn.Linear))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: with_fsdp: the parameter '0.weight' is tied to '1.weight' (the same tensor), and shard= puts them ...
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    chosen = {name for name, module in modules.items() if module is not model and picked(module)}

    def group_of(param_name: str) -> str:
        """The name (one of its names) of the innermost picked module holding ``param_name``; "" for the model."""
        parts = param_name.split(".")[:-1]
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in chosen:
                return ".".join(parts[:i])
        return ""

    def described(group: str) -> str:
        return f"'{group}' ({type(modules[group]).__name__}, picked by shard=)" if group else "the model's own group"

    first: dict[int, tuple[str, str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        group = group_of(name)
        seen = first.setdefault(id(p), (name, group))
        if modules[seen[1]] is not modules[group]:
            raise ValueError(
                f"with_fsdp: the parameter '{seen[0]}' is tied to '{name}' (the same tensor), and shard= puts them into "
                f"two fully_shard groups, {described(seen[1])} and {described(group)}; torch's FSDP2 refuses a "
                "parameter managed by two groups. Leave every module that holds the tied weight out of shard=, so "
                "that the model's own group holds it (e.g. shard the blocks between them: shard={Block}; shard=() "
                "works), or pick a module that holds all of its places"
            )


def _shard_like(value: Any, before: torch.Tensor, after: torch.Tensor) -> Any:
    """An optimizer state value of ``before`` for its sharded ``after``: a tensor of the parameter's shape (a
    moment) becomes this rank's shard of it, as ``after`` is of ``before``; the rest (a step count) stays."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape != before.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach(), after.device_mesh, after.placements, src_data_rank=None)


def _refuse_other_tensors(model: nn.Module) -> None:
    """Refuse, on every rank, a model whose tensors differ from rank 0's in name, shape or dtype (one all-gather):
    :func:`_broadcast_from_rank_zero` broadcasts them. A failed collective (another rank died) raises
    :func:`loopkit._collective.failure`'s error naming it."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    mine = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    detail = _collective.differs_from_rank_zero(mine, "parameters and buffers", who="with_fsdp")
    if detail is not None:
        raise ValueError(
            f"with_fsdp: the model's parameters or buffers differ between ranks (name, shape, dtype): {detail}; "
            "every rank must build the same model"
        )


def _refuse_apart(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, on every rank, parameters whose ``requires_grad`` differs from rank 0's, or an optimizer that differs
    from rank 0's (its class, a param group's size or hyper-parameters), naming what differs and the first rank
    that differs (:func:`loopkit._agreement.refuse_apart`, as ``with_ddp`` refuses them where it builds its
    wrapper): ``fully_shard`` reduce-scatters the gradients of the parameters that require one, and ranks with
    other flags made gloo abort the processes at the first backward; each rank updates its own shard of every
    parameter with its own optimizer, and ranks with other optimizers trained a mix of them, unwarned. A
    :class:`loopkit.steps.SyncRefusal` raised before anything changed (nothing sharded; the state stays usable).
    One small all-gather, where the model is sharded and where a param group was added since the last call; none
    in a group of one rank.

    >>> _refuse_apart(torch.nn.Linear(1, 1), None)  # (no process group of several ranks: nothing to compare)
    """
    refuse_apart(
        model, optimizer, "with_fsdp", "fully_shard reduce-scatters the gradients of the parameters that require "
        "one, and each rank updates its own shard of every parameter: every rank must reduce the same and update "
        "alike", advice=" (a param group added is compared over the ranks at the next call: a rank that added one "
        "alone compares alone; add param groups alike on every rank)")


def _broadcast_from_rank_zero(model: nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's (as DDP does when it wraps a model): ``fully_shard``
    keeps each rank's own shard of its own weights, so ranks that built different ones would train a mix (refused
    before, where the ranks' tensors differ: :func:`_refuse_other_tensors`). A failed collective (another rank died)
    raises :func:`loopkit._collective.failure`'s error naming it."""
    dist = torch.distributed
    if dist.get_world_size() == 1:
        return
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad(), _collective.failing_as("with_fsdp", "the broadcast of rank 0's parameters and buffers"):
        for _, t in tensors:
            dist.broadcast(t.data, src=0)


def _drop_held_grad(fsdp_param: Any) -> None:
    fsdp_param.unsharded_accumulated_grad = None
    if hasattr(fsdp_param, "_unsharded_param"):
        fsdp_param._unsharded_param.grad = None


def _add_sharded_grad(param: torch.Tensor, mean: torch.Tensor) -> None:
    """Add this rank's shard of ``mean`` (a whole gradient) to the sharded ``param``'s gradient."""
    from torch.distributed.tensor import distribute_tensor

    grad = distribute_tensor(mean.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _check_shard(shard: Any) -> None:
    if callable(shard) and not isinstance(shard, type):
        return
    if isinstance(shard, type) or isinstance(shard, (str, bytes)) or not hasattr(shard, "__iter__"):
        raise TypeError(
            "with_fsdp: shard must be a collection of module classes (e.g. {nn.TransformerEncoderLayer}) or a "
            f"predicate module -> bool, got {shard!r}"
        )
    for cls in shard:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"with_fsdp: shard must hold torch.nn.Module subclasses, got {cls!r}")


def _check_fully_shard_options(mp_policy: Any, options: Mapping[str, Any]) -> None:
    """Refuse, with a ``TypeError`` naming ``with_fsdp`` and the option, what ``fully_shard`` would refuse only at the
    step's first call, after rank 0's weights were broadcast and some submodules sharded: a name it does not take
    (the nearest valid one suggested), an ``mp_policy`` that is not a ``MixedPrecisionPolicy``, a ``mesh`` that is
    not a ``DeviceMesh``, a ``shard_placement_fn`` that is not callable.

    >>> _check_fully_shard_options(None, {"mesh": None})
    >>> _check_fully_shard_options("bf16", {})
    Traceback (most recent call last):
    ...
    TypeError: with_fsdp: mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy (e.g. MixedPrecisionPolicy(param_dtype=torch.bfloat16)) or None, got 'bf16'
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_option_names("with_fsdp", options, fully_shard, "fully_shard", not_passed=_UNSUPPORTED_OPTIONS,
                       own=("shard", "reshard_after_forward", "mp_policy", "broadcast_buffers"))
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError("with_fsdp: mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy (e.g. "
                        f"MixedPrecisionPolicy(param_dtype=torch.bfloat16)) or None, got {mp_policy!r}")
    mesh = options.get("mesh")
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"with_fsdp: mesh must be a torch.distributed.device_mesh.DeviceMesh or None, got {mesh!r}")
    placement = options.get("shard_placement_fn")
    if placement is not None and not callable(placement):
        raise TypeError(f"with_fsdp: shard_placement_fn must be callable as fn(parameter) or None, got {placement!r}")


def with_fsdp(
    step: Any,
    *,
    shard: Collection[type[nn.Module]] | Callable[[nn.Module], bool] = (),
    reshard_after_forward: bool | int = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    broadcast_buffers: bool = True,
    **fully_shard_options: Any,
) -> Step:
    """Train on every rank of a ``torch.distributed`` process group, the model fully sharded (FSDP2).

    Lightning's ``Trainer(strategy=FSDPStrategy(...))``. At the step's first call with a model
    object, every rank takes rank 0's parameters and buffers, then ``fully_shard`` is applied to
    each submodule ``shard`` picks (a collection of module classes, Lightning's
    ``auto_wrap_policy={nn.TransformerEncoderLayer}``, or a predicate ``module -> bool``), innermost
    first, and then to the whole model. ``reshard_after_forward=False`` keeps the parameters
    gathered from the forward to the backward (Lightning's ``sharding_strategy="SHARD_GRAD_OP"``;
    ``True``, the default, is ``"FULL_SHARD"``). ``mp_policy`` is torch's
    ``MixedPrecisionPolicy`` (Lightning's ``mixed_precision``); ``fully_shard_options`` go to
    ``fully_shard`` as they are (``mesh``, ``shard_placement_fn``).

    ``fully_shard`` replaces the model's parameters with new, sharded ones (``DTensor``), so the
    state is built as usual, ``TrainState.create(model, optimizer, scheduler)`` with the optimizer
    over ``model.parameters()``, and the first call points the optimizer's ``param_groups`` at the
    sharded parameters; any state the optimizer holds already (a restored checkpoint's) is cut
    into this rank's shards with them. The scheduler keeps working on the same param groups. A
    group added later (a backbone unfrozen mid-fit: ``requires_grad_(True)``, which ``fully_shard``
    follows, and ``add_param_group``) must hold the model's parameters as they are then, the
    sharded ones (``list(state.model.backbone.parameters())`` in the callback): a group holding
    parameters taken before the first call, which would never train, is refused (``ValueError``)
    at the next call. Every rank must hold the same flags and optimizer: where the model is
    sharded, and at the call after a group was added, the parameters' ``requires_grad`` and the
    optimizer (its class, each param group's size and hyper-parameters) are compared over the
    ranks, and any that differ are refused on every rank (:class:`loopkit.steps.SyncRefusal`, a
    ``ValueError``, naming what differs and the ranks) before anything changed: the state stays
    usable (ranks with other flags made gloo abort the processes at the first backward; ranks
    with other optimizers each updated its own shard with its own, a mixed model). A change of
    ``requires_grad`` on some ranks alone, without a group added, is not seen there.

    Buffers (BatchNorm's running statistics) are not sharded: each rank holds them whole. With
    ``broadcast_buffers=True`` (the default, DDP's) every rank takes rank 0's before the forward
    of each call that starts an accumulation group (each call without ``with_grad_accum``), as
    DDP broadcasts them before a forward that follows a synced backward (after a flushed partial
    group DDP does not; ``with_fsdp`` does, so that a run resumed from the epoch's end is the
    same), and then updates them from its own batch, as under DDP. ``with_checkpointing`` keeps
    every rank's buffers and ``run_epochs`` gives each rank its own back on resume, so a resumed
    run is the uninterrupted one, validation included. ``broadcast_buffers=False`` leaves each
    rank updating its own (they drift apart, and a validation reads each rank's own): a
    checkpoint's model holds rank 0's, and a resume is exact for the parameters only.

    Tied weights (one tensor in two modules, an embedding shared with the output layer): no
    module ``shard`` picks may hold the tied weight unless it holds every place of it, since
    ``fully_shard`` puts each parameter into one group. Leave the tied modules out of ``shard``
    (the model's own group then holds the weight: shard the blocks between them), or
    ``shard=()``; the step's first call refuses (``ValueError``) a ``shard`` that splits them,
    naming both places, before anything changed (the state stays usable: build the step with
    another ``shard``). One module object reused in several places (``nn.ModuleList([block, block])``,
    ALBERT-style) is one group, sharded once: ``shard={Block}`` trains it. torch's ``fully_shard``
    refuses a 0-dim (scalar) parameter: make it of shape ``(1,)``.

    With the other transforms, in any order:

    - ``with_grad_accum(every=n)``: the first n-1 calls of a group run their backward without
      gradient sync (``set_requires_gradient_sync(False)``, DDP's ``no_sync``: the gradients are
      summed unsharded on each rank), the n-th reduce-scatters the sum. A partial group that
      ``run_epochs`` flushes at an epoch's end is averaged over the ranks by the flush. Gradient
      transforms inside the accumulation (per micro-batch) make every call sync.
    - ``with_grad_clip`` clips by the norm over every rank's shards (the global norm, as one
      process would); ``with_nan_guard``'s skip flag is all-reduced (MAX) before it is read, so
      every rank skips the same updates; bfloat16 ``with_amp`` runs the forward under autocast.
      float16 ``with_amp`` is refused (no loss scaler over sharded gradients yet).
    - ``with_ddp``, ``with_ema``, ``with_swa``, ``with_pruning``, ``with_qat`` and
      ``with_compile`` are refused (``TypeError`` naming both), in either order.

    Checkpoints hold the full, unsharded state (Lightning's ``state_dict_type="full"``), in the
    format of an unsharded state's: ``state.state_dict()`` of a sharded state gathers every
    sharded tensor whole on every rank (a collective: every rank calls it, and each holds the whole
    state while it keeps the result). ``with_checkpointing`` decides on rank 0 first whether it
    writes (a score that does not rank, a position already saved: nothing is gathered) and then
    gathers into rank 0's CPU memory alone, which writes; ``export_weights`` (called on every rank)
    gathers likewise. The other ranks take part in each gather and drop each whole tensor at once,
    as torch's ``get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))``. To resume, restore into an unsharded state built as
    usual (``loopkit.restore(TrainState.create(...), directory)``, on every rank) and give it to
    the ``with_fsdp`` step, which shards it; such a checkpoint also restores into a plain model
    in one process. ``load_state_dict`` of a sharded state is refused. ``loopkit.checkpoint.save``
    gathers as ``state_dict`` does, but writes on every rank that calls it: save through
    ``with_checkpointing`` (its own saves, and its ``.save()`` called on every rank, write on rank 0).
    Inside a ``with_grad_accum`` group the micro-batches' partial gradients are each rank's own,
    held unsharded by ``fully_shard``, so no full state exists there: ``state_dict`` (and so
    ``checkpoint.save`` and ``.save()``) refuses (``RuntimeError``; flush the group first with
    ``step.flush(state)``, or save at an update). ``with_checkpointing``'s own saves come at
    updates and epoch ends, and a graceful stop (SIGTERM) under ``run_epochs`` waits for the
    group's end before it saves, on one rank as on several.

    A sharded model cannot be copied (the copy would need ``fully_shard``'s state of its own):
    what copies a state refuses it (``TypeError``) before anything changes: ``lr_find`` and
    ``scale_batch_size`` (run them on the unsharded state, before the ``with_fsdp`` step's first
    call with it: they shard copies of it and leave it unsharded), ``run_epochs(..., donate=False)``,
    ``LRFinderResult.apply``, a step that is not donated, ``check_purity`` and ``loopkit.state.fork``.

    The step must be donated (``loopkit.donate``; ``run_epochs`` donates): a call that is not
    raises ``TypeError``. Every rank must call the step, and validate, the same number of times
    (shard the data with ``loopkit.distributed.shard``; ``run_epochs``, ``evaluate`` and ``predict`` refuse data
    with a length of another number of batches on one rank, and read a stream, with a ``len()`` or without, while
    every rank has a batch), and, as torch's FSDP requires, run the
    same sharded submodules in each forward and give gradients to the same parameters in each
    backward (no data-dependent branches that skip a layer on one rank: its all-gather or
    reduce-scatter would wait for the others); a ``loss_fn`` that returns None (skips the batch)
    must do so on every rank at once (on one rank alone, the others wait in their collectives
    until the process group's timeout, as under ``with_ddp``); metric means read by ``run_epochs``, ``evaluate``
    and ``with_logging`` are means over all ranks.

    Raises ``RuntimeError`` when no process group is initialised (start with ``torchrun`` and
    call ``loopkit.distributed.init()``), ``TypeError`` for a refused transform or option: an option
    ``fully_shard`` does not take (the nearest name suggested), an ``mp_policy`` that is not a
    ``MixedPrecisionPolicy``, a ``mesh`` that is not a ``DeviceMesh``, a ``shard_placement_fn`` that is
    not callable (checked when the step is built, before the process group is looked for). An error of the step's
    first call raised before rank 0's weights are broadcast (no process group any more, the checks above) leaves
    the state usable (``loopkit.state_at_error``); one from the broadcast or ``fully_shard`` on does not.

    >>> import torch, torch.distributed as dist
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import donate, train_step
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1))
    >>> state = TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))
    >>> step = donate(with_fsdp(train_step(lambda m, b: m(b).pow(2).mean()), shard={torch.nn.Linear}))
    >>> state, metrics = step(state, torch.ones(4, 2))
    >>> state.step, type(state.model[0].weight).__name__, list(state.state_dict()["model"])
    (1, 'DTensor', ['0.weight', '0.bias', '1.weight', '1.bias'])
    >>> import loopkit
    >>> del step, state, metrics, model  # (the sharded model holds the process group)
    >>> loopkit.distributed.shutdown()  # (gloo's threads let go of the step's collectives before anything is freed)
    """
    refuse_wrapping(step, "with_fsdp", {name: reason for name, reason in _REFUSED.items()})
    base = require_train_step(step, "with_fsdp")
    if base.sync is not None:
        if base.sync.name == "with_fsdp":
            raise TypeError("with_fsdp cannot wrap with_fsdp: the model is sharded once; apply with_fsdp once")
        raise TypeError(f"with_fsdp cannot wrap {base.sync.name}: both make the step data-parallel; use one of them")
    if "with_compile" in base.transforms:
        raise TypeError(f"with_fsdp cannot wrap with_compile: {_REFUSED['with_compile']}")
    if base.precision is not None and base.precision.scales_loss:
        raise TypeError(f"with_fsdp cannot wrap float16 with_amp: {_REFUSED['with_amp(float16)']}")
    for option, reason in _UNSUPPORTED_OPTIONS.items():
        if option in fully_shard_options:
            raise TypeError(f"with_fsdp: {option}=: {reason}")
    _check_shard(shard)
    if not isinstance(reshard_after_forward, (bool, int)):
        raise TypeError(f"with_fsdp: reshard_after_forward must be True, False or an int, got {reshard_after_forward!r}")
    if not isinstance(broadcast_buffers, bool):
        raise TypeError(f"with_fsdp: broadcast_buffers must be True or False, got {broadcast_buffers!r}")
    _check_fully_shard_options(mp_policy, fully_shard_options)
    if not _collective.ready():
        raise RuntimeError(_NO_GROUP)
    options = dict(fully_shard_options, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    return base.with_transform("with_fsdp", sync=FSDPSync(shard, options, broadcast_buffers))
