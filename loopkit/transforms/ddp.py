"""``with_ddp``: data-parallel training over ``torch.nn.parallel.DistributedDataParallel``.

Start the processes with ``torchrun`` and call ``loopkit.distributed.init()`` before
building the step; each rank trains on its own shard of the data
(``loopkit.distributed.shard``), and DDP averages the gradients during backward.

>>> import torch, torch.distributed as dist
>>> from loopkit.steps import train_step
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> with_ddp(train_step(lambda m, b: m(b).sum())).applied
('train_step', 'with_ddp')
>>> dist.destroy_process_group()

In one process, without torchrun (``loopkit.distributed.init()`` makes no group there), the step
is the plain one:

>>> with_ddp(train_step(lambda m, b: m(b).sum())).sync is None
True
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from loopkit import _collective
from loopkit._agreement import ddp_ignored, named_callable, refuse_apart
from loopkit.steps import _ACCUM_COUNT, Step, SyncRefusal, TrainStep, changing_nothing, sync_unchanged
from loopkit.transforms._compose import check_option_names, require_train_step

__all__ = ["DDPSync", "with_ddp"]

#: an extras key: True when the step's last forward through the wrapper ran under ``no_sync`` (a micro-step that does
#: not finish its accumulation group, the last one of a flushed partial group); absent after a synced one. DDP then
#: does not broadcast rank 0's buffers before the next forward (its ``require_forward_param_sync`` flag): a wrapper
#: built anew (a resumed run, a step that is not donated) takes the flag from here, as the one wrapper would have it
UNSYNCED_FORWARD = "ddp/unsynced_forward"

#: a parameter's ``requires_grad`` (the flags a wrapper was built with: :meth:`DDPSync.module`)
_REQUIRES_GRAD = operator.attrgetter("requires_grad")

_NO_GROUP = (
    "with_ddp needs a torch.distributed process group, and none is initialised. Start the script "
    "with torchrun, e.g. `torchrun --nproc-per-node 2 script.py`, and call loopkit.distributed.init() "
    "before building the step"
)


#: the ``DistributedDataParallel`` options every rank must give alike (:attr:`DDPSync.agreed_options`), with the
#: value torch takes for one not given (the buffers' broadcasts: :func:`_buffer_syncs`). ``bucket_cap_mb=None`` is
#: not 25: torch gives the default's first bucket 1 MiB (``dist._DEFAULT_FIRST_BUCKET_BYTES``), an explicit 25 one
#: of 25 MiB, and under ``find_unused_parameters`` (which keeps the buckets each rank made) the ranks' all-reduces
#: then differ in size once the parameters pass 1 MiB: gloo aborts ("Received data size doesn't match")
_AGREED_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {"find_unused_parameters": False, "bucket_cap_mb": None, "bucket_cap_mb_list": None, "static_graph": False,
     "skip_all_reduce_unused_params": False})


#: whether this torch's ``DistributedDataParallel`` takes ``broadcast_buffers=None`` as its default, True (from torch
#: 2.13, with ``forward_sync_buffers``); before, None was a falsy flag, False
_NONE_BROADCASTS: bool = inspect.signature(DistributedDataParallel).parameters["broadcast_buffers"].default is None


def _buffer_syncs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Where ``DistributedDataParallel`` broadcasts rank 0's buffers, as torch reads its options: before each forward
    (``forward_sync_buffers``, else ``broadcast_buffers``, a flag; ``None`` is this torch's default: see
    ``_NONE_BROADCASTS``), and what its building broadcasts (``init_sync=False``: nothing; ``broadcast_buffers=False``:
    the parameters alone).

    >>> _buffer_syncs({}) == _buffer_syncs({"broadcast_buffers": True}) == _buffer_syncs({"forward_sync_buffers": 1})
    True
    >>> _buffer_syncs({"broadcast_buffers": False})
    {'broadcast_buffers': False, 'init_sync': 'parameters'}
    """
    forward = options.get("forward_sync_buffers")
    if forward is None:
        given = options.get("broadcast_buffers", True)
        forward = at_init = _NONE_BROADCASTS if given is None else bool(given)
    else:  # (torch then ignores broadcast_buffers, and always broadcasts the buffers when it builds the wrapper)
        forward, at_init = bool(forward), True
    init = ("parameters and buffers" if at_init else "parameters") if options.get("init_sync", True) else "nothing"
    return {"broadcast_buffers": forward, "init_sync": init}


def _bucket_caps(options: Mapping[str, Any]) -> dict[str, Any]:
    """``bucket_cap_mb`` and ``bucket_cap_mb_list`` as torch takes them (its ``_BucketCapacityConfig``): a non-empty
    list sizes the buckets and ``bucket_cap_mb`` is then ignored (None here); an empty one is no list (None).

    >>> _bucket_caps({"bucket_cap_mb": 25, "bucket_cap_mb_list": (5, 10)})
    {'bucket_cap_mb': None, 'bucket_cap_mb_list': [5, 10]}
    >>> _bucket_caps({"bucket_cap_mb_list": []}) == _bucket_caps({})
    True
    """
    caps = options.get("bucket_cap_mb_list")
    if caps:  # (torch's own test: `if bucket_cap_mb_list:`)
        return {"bucket_cap_mb": None, "bucket_cap_mb_list": list(caps)}
    return {"bucket_cap_mb": options.get("bucket_cap_mb"), "bucket_cap_mb_list": None}


class DDPSync:
    """The data-parallel hook of a :class:`loopkit.TrainStep` (its ``sync`` field).

    Builds the ``DistributedDataParallel`` wrapper of a state's model once per model object
    (building it is a collective that broadcasts rank 0's parameters and buffers: every rank
    builds it at the same call), and keeps the latest one; the model object itself stays the
    user's module. DDP reduces the gradients of the parameters that required them when it was
    built: a change of the model's ``requires_grad`` flags (a backbone unfrozen mid-fit) builds
    the wrapper anew, at the next call. A state restored from a checkpoint, or copied, gets a
    new wrapper: so does the copy a step that is not donated trains at each call (its purity's
    cost: one wrapper, and its broadcast, a call, with the all-gather that checks the ranks' flags agree: see
    :meth:`module`), while a donated step's calls reuse one.

    >>> DDPSync({}).name
    'with_ddp'
    """

    name = "with_ddp"
    #: a step that is not donated runs on a copy of the state, with the copy's own wrapper
    requires_donation = None
    backward_collective = "the gradient all-reduce in backward (DistributedDataParallel)"
    refuses: Mapping[str, str] = types.MappingProxyType({})  # (it goes with every transform)

    def __init__(self, options: dict[str, Any], comm_hook: Callable | None = None, comm_state: Any = None) -> None:
        self.options = dict(options)
        self.comm_hook = comm_hook
        self.comm_state = comm_state
        self._model: weakref.ref | None = None
        self._ddp: DistributedDataParallel | None = None
        self._params: tuple[torch.nn.Parameter, ...] = ()  # the wrapped model's parameters, and their requires_grad
        self._flags: tuple[bool, ...] = ()  # flags when the wrapper was built: another flag builds it anew
        self._sync_first = False  # a static graph's first backward must all-reduce (DDP records the graph then)

    @property
    def agreed_options(self) -> dict[str, Any]:
        """The ``DistributedDataParallel`` options that decide its collectives, as torch takes them (a buffers'
        broadcast before each forward and when it is built, the unused parameters' all-reduce, the buckets' sizes, a
        static graph's first backward; an option given as its default is the option not given, ``bucket_cap_mb``
        beside a ``bucket_cap_mb_list`` that torch takes instead is not given, an empty list is no list:
        :func:`_bucket_caps`) and the comm hook, by its module and name (:func:`loopkit._agreement.named_callable`):
        every rank must give the same (see :attr:`loopkit.steps.Step.rank_agreed`).

        >>> DDPSync({"find_unused_parameters": True}).agreed_options["find_unused_parameters"]
        True
        >>> DDPSync({"broadcast_buffers": True, "static_graph": False}).agreed_options == DDPSync({}).agreed_options
        True
        """
        agreed = _buffer_syncs(self.options)
        agreed.update((option, self.options.get(option, default)) for option, default in _AGREED_DEFAULTS.items())
        agreed.update(_bucket_caps(self.options))
        agreed["comm_hook"] = named_callable(self.comm_hook)
        return agreed

    @property
    def grads_are_views(self) -> bool:
        """Whether the gradients are views of DDP's buckets (``gradient_as_bucket_view``), which the next backward overwrites."""
        return bool(self.options.get("gradient_as_bucket_view"))

    def wraps(self, model: torch.nn.Module) -> bool:
        """Whether the wrapper of ``model`` is built, with its parameters' ``requires_grad`` as they are now
        (:meth:`module` then builds nothing): a question, which changes nothing (one attribute read a parameter).

        >>> DDPSync({}).wraps(torch.nn.Linear(1, 1))
        False
        """
        ref = self._model
        return ref is not None and ref() is model and tuple(map(_REQUIRES_GRAD, self._params)) == self._flags

    def module(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> tuple[DistributedDataParallel, bool]:
        """The DDP wrapper of ``model``, and whether this call built it (its build broadcast rank 0's parameters: an
        error later in the call finds them changed). It is built at the first call with this model object, and
        built anew when the ``requires_grad`` of one of its parameters changed since (``optimizer`` is compared over
        the ranks where the wrapper is built, with the flags: see below); the flags are compared once a call (:meth:`wraps`), and nothing is kept from one call to the next but the
        wrapper.

        DDP registers, when it is built, the parameters that require a gradient, and reduces theirs alone: a
        parameter unfrozen later (``requires_grad_(True)``, Lightning's ``BackboneFinetuning``) would train on each
        rank's own gradient, the ranks apart. The flags are compared at each call (one attribute read a parameter,
        no device sync); the new wrapper's build broadcasts rank 0's parameters, the same on every rank by then, and
        its buffers as the next forward would (see below), so that the run goes on as a run resumed there, with a
        wrapper built with the new flags, bit for bit. Inside an accumulation group (``with_grad_accum``: extras'
        count of micro-steps) a parameter unfrozen trains on the group's later micro-batches, as in one process; one
        frozen while it holds the group's gradient (which the new wrapper would not reduce, and the optimizer would
        still apply) is refused, with a ``ValueError`` on every rank: change the flags between groups (an
        ``on_epoch_start`` at ``batch_index == 0``, or after a group's last micro-batch). Every rank must change
        the flags alike: each build compares them over the ranks first, with the optimizer (its class, each param
        group's size and hyper-parameters: ranks that update the averaged gradients otherwise drift apart, unwarned),
        in one small all-gather a wrapper built, none when the wrapper is reused; flags or optimizers that differ are
        refused on every rank with a :class:`loopkit.steps.SyncRefusal` (a ``ValueError``) naming what differs and
        the ranks, before anything changed (where each rank built with its own flags, gloo aborted the processes);
        a rank that changed them
        alone builds alone, and its comparison waits for the others until the process group's timeout, its error
        then saying so (under ``run_epochs`` a change made on some ranks only in ``on_epoch_start``, or before the
        fit, is refused at the epoch's start instead, on every rank, before the epoch's first step). Every error
        raised before the wrapper's build (these checks, a failed gather of theirs: a rank that died or left, the
        timeout) is marked with :func:`loopkit.steps.sync_unchanged` (:func:`loopkit.steps.changing_nothing`): the
        step leaves the state usable.

        ``extras`` is the state's: where it says the last forward ran under ``no_sync``
        (:data:`UNSYNCED_FORWARD`, :meth:`after_forward`), a new wrapper is what the one wrapper of an uninterrupted
        run is then: each rank keeps its own buffers (its build broadcasts rank 0's; they are put back) and the next
        forward broadcasts none (DDP's ``require_forward_param_sync`` is False), so that a run resumed after a
        flushed partial group, or a step that is not donated inside a group, updates and validates with each rank's
        own BatchNorm statistics, as the uninterrupted donated run does.
        """
        if self.wraps(model):
            return self._ddp, False  # type: ignore[return-value]
        with changing_nothing():  # (the checks and their gathers, a failed one too: nothing of the model changed yet)
            if not _collective.ready():
                raise RuntimeError(_NO_GROUP)
            _refuse_flags_apart(model, optimizer)
            if extras is not None and extras.get(_ACCUM_COUNT):
                _refuse_frozen_held(model)
            self._model = self._ddp = None
            self._params = self._flags = ()
            options = dict(self.options)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            if device.type == "cuda" and "device_ids" not in options:
                options["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
            _check_same_buffers(model)
            unsynced = extras is not None and bool(extras.get(UNSYNCED_FORWARD))
            own = [(b, b.detach().clone()) for b in model.buffers()] if unsynced else []
        ddp = _wrapper(model, options)
        if unsynced:  # (once a wrapper, not a call: a donated step's calls reuse it)
            with torch.no_grad():
                for buffer, value in own:
                    buffer.copy_(value)
            ddp.require_forward_param_sync = False
        if self.comm_hook is not None:
            ddp.register_comm_hook(self.comm_state, self.comm_hook)
        if options.get("find_unused_parameters") and not options.get("static_graph"):
            _count_held_gradients_used(ddp)
        self._model, self._ddp = weakref.ref(model), ddp
        self._params = tuple(model.parameters())
        self._flags = tuple(map(_REQUIRES_GRAD, self._params))
        self._sync_first = bool(options.get("static_graph"))
        return ddp, True

    def after_forward(self, module: DistributedDataParallel, extras: dict[str, Any]) -> None:
        """Record in ``extras`` (the new state's) whether the forward that just ran was under ``no_sync``
        (:data:`UNSYNCED_FORWARD`), as DDP's ``require_forward_param_sync`` says: a Python flag, no host sync.

        >>> extras = {UNSYNCED_FORWARD: True}
        >>> DDPSync({}).after_forward(types.SimpleNamespace(require_forward_param_sync=True), extras)
        >>> extras
        {}
        """
        if getattr(module, "require_forward_param_sync", True):
            extras.pop(UNSYNCED_FORWARD, None)
        else:
            extras[UNSYNCED_FORWARD] = True

    def before_forward(self, model: torch.nn.Module) -> None:
        """Nothing: DistributedDataParallel broadcasts rank 0's buffers itself, in its forward
        (``broadcast_buffers=True``, its default); ``with_fsdp``'s hook does it by hand.

        >>> DDPSync({}).before_forward(torch.nn.BatchNorm1d(2))
        """

    def validating(self, model: torch.nn.Module, extras: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
        """The context of an evaluation of ``model`` (``run_epochs``' validations): inside, the model holds the buffers
        the wrapper's next forward would see, as Lightning's validation through the wrapper sees them, rank 0's
        (BatchNorm's running statistics, broadcast) unless ``broadcast_buffers`` is off or the last forward ran under
        ``no_sync`` (``extras``: :data:`UNSYNCED_FORWARD`); on exit each rank's own are put back, so the state's
        buffers (and a resumed run) are as they were. One broadcast per dtype and device of the buffers, and a copy
        of this rank's; nothing for a model without buffers. Every rank must enter it at the same point.

        >>> with DDPSync({"broadcast_buffers": False}).validating(torch.nn.BatchNorm1d(2), {}):
        ...     pass
        """
        ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))  # (DDP's own opt-out: not broadcast)
        buffers = [b for name, b in model.named_buffers() if name not in ignored]
        if not buffers or not _buffer_syncs(self.options)["broadcast_buffers"] or extras.get(UNSYNCED_FORWARD):
            return contextlib.nullcontext()
        what = "the broadcast of rank 0's buffers before a validation"
        return _collective.rank_zero_values(buffers, self.failure, what, self.options.get("process_group"))

    def no_sync(self, module: DistributedDataParallel) -> Any:
        """The context of a micro-step whose gradients stay on this rank (no all-reduce).

        Under ``static_graph`` a new wrapper's first backward all-reduces anyway (DDP refuses
        to record its graph under ``no_sync``); the group's sum is the same, as the ranks'
        mean of an already averaged gradient is that gradient.
        """
        if self._sync_first:
            self._sync_first = False
            return contextlib.nullcontext()
        return module.no_sync()

    def failure(self, collective: str, error: BaseException, where: str = "") -> RuntimeError:
        """The error to raise when ``collective`` failed: it names the collective, this rank and why.

        >>> str(DDPSync({}).failure("the gradient all-reduce", RuntimeError("reset by peer")))[:52]
        'with_ddp: the gradient all-reduce failed on rank 0 o'
        """
        return _collective.failure("with_ddp", collective, error, where)

    def agree(self, flags: torch.Tensor) -> torch.Tensor:
        """``flags``' maximum over all ranks (one all-reduce): 1.0 anywhere is 1.0 everywhere."""
        return _collective.agree_max(flags, self.failure)

    def reduce_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Average a flushed partial group's gradients (kept on each rank under ``no_sync``) over the ranks.

        The collective is the same on every rank, whatever each rank's micro-batches used (under
        ``find_unused_parameters`` one rank may hold gradients of one head, another of another, or
        none at all): every parameter of the optimizer, in its order (the same on every rank), a
        rank without a gradient for one contributing zeros, with a flag a parameter saying whether
        it had one. As DDP's own all-reduce does, a parameter with a gradient on some rank gets the
        ranks' mean on every rank (made where this rank had none), one with a gradient on no rank
        keeps none, and one DDP was told to ignore keeps this rank's own.
        """
        ignored = self._ignored()
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in ignored]
        sparse = self._sparse_params()
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:  # one all-reduce per device and dtype (usually one)
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), members in by_kind.items():
            grads = [None if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad for p in members]
            means = _collective.mean_over_ranks(grads, [p.numel() for p in members], dtype, device, self.failure)
            for p, mean in zip(members, means):
                if mean is None:
                    continue
                if p.grad is not None and not p.grad.is_sparse:
                    p.grad.copy_(mean.view(p.shape))
                elif p.grad is not None:  # sparse: in its own layout (an Embedding's: 1 sparse dim, its rows)
                    p.grad = mean.view(p.shape).to_sparse(p.grad.sparse_dim())
                elif id(p) in sparse:  # none here, sparse on the ranks that had one: the same layout on every rank
                    p.grad = mean.view(p.shape).to_sparse(1)
                else:
                    p.grad = mean.view(p.shape).clone()

    def marked_used(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Under ``find_unused_parameters``, the parameters this rank's no-sync micro-batches used (those with a
        gradient before a flush): DDP's reducer has marked them used, and its next synced backward expects their
        gradients defined (``reduce_grads`` runs outside it). Empty otherwise."""
        ddp = self._ddp
        if ddp is None or not getattr(ddp, "find_unused_parameters", False):
            return []
        return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None and not p.grad.is_sparse]

    def _sparse_params(self) -> set[int]:
        """The ids of the weights whose gradients are sparse (``Embedding``/``EmbeddingBag`` with ``sparse=True``)."""
        ddp = self._ddp
        if ddp is None:
            return set()
        kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
        return {id(m.weight) for m in ddp.module.modules() if isinstance(m, kinds) and m.sparse}

    def _ignored(self) -> set[int]:
        """The parameters DDP was told to ignore (``_ddp_params_and_buffers_to_ignore``), by id."""
        ddp = self._ddp
        names = getattr(ddp, "parameters_to_ignore", ()) if ddp is not None else ()
        return {id(p) for n, p in ddp.module.named_parameters() if n in names} if names else set()


def _count_held_gradients_used(ddp: DistributedDataParallel) -> None:
    """Let a new wrapper's reducer count the parameters holding gradients as used, as the wrapper that made them would.

    Gradients held when a wrapper is built were kept on this rank under ``no_sync`` by earlier micro-steps
    of an accumulation group (a pure call trains a copy of the state, with a wrapper of its own, at each
    call; or a flush left them zero). Under ``find_unused_parameters`` DDP reduces, at the group's synced
    backward, the parameters some rank used in any micro-step since the last sync, which its reducer
    recorded during them; a new reducer has no such record, and would leave a held gradient of a
    parameter the synced micro-batch uses on no rank unreduced, apart on each rank. A backward of a
    negative zero into each held gradient under ``no_sync`` records it, as a no-sync micro-step that used
    that parameter would, and changes no gradient: ``x + -0.0`` is ``x``, bit for bit, for every ``x``
    (a gradient hook registered on such a parameter, ``register_hook``, sees that zero too).
    """
    ignored = set(getattr(ddp, "parameters_to_ignore", ()))
    held = [p for n, p in ddp.module.named_parameters() if p.requires_grad and p.grad is not None and n not in ignored]
    if not held:
        return
    zeros = []
    for p in held:
        g = p.grad
        if g.is_sparse:  # an empty sparse gradient of the same layout (a dense one would make the sum dense)
            dims = g.sparse_dim()
            zeros.append(torch.sparse_coo_tensor(
                torch.empty((dims, 0), dtype=torch.long, device=g.device),
                torch.empty((0, *g.shape[dims:]), dtype=g.dtype, device=g.device), g.shape))
        else:
            zeros.append(torch.full_like(p, -0.0, memory_format=torch.preserve_format))
    with ddp.no_sync():
        torch.autograd.backward(held, zeros)


def _refuse_flags_apart(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse, on every rank, parameters whose ``requires_grad`` differs from rank 0's, or an optimizer that differs
    from rank 0's (its class, a param group's size or hyper-parameters), naming what differs and the first rank
    that differs (:func:`loopkit._agreement.refuse_apart`): DDP builds its buckets from the parameters that require
    a gradient, and ranks with other flags made gloo abort the processes (its check of the parameters' shapes) or
    wait for each other until the process group's timeout; ranks with other optimizers updated the averaged
    gradients otherwise, the replicas apart, unwarned. A :class:`loopkit.steps.SyncRefusal` raised before anything
    changed (the state stays usable: put the flags and the optimizer alike on every rank and call again). One small
    all-gather a wrapper built (a first call, a change of the flags; never a call that reuses the wrapper), none in
    a group of one rank. A rank that changed its flags alone builds its wrapper alone: this gather then waits for
    the others until the process group's timeout, and its error says so (``run_epochs`` compares the flags at each
    epoch's start, and refuses such a change there, on every rank, before the epoch's first step: a change in
    ``on_epoch_start`` or before the fit).

    >>> _refuse_flags_apart(torch.nn.Linear(1, 1), None)  # (no process group of several ranks: nothing to compare)
    """
    refuse_apart(
        model, optimizer, "with_ddp", "DistributedDataParallel reduces the parameters that require a gradient, and "
        "every rank must reduce the same and update them alike",
        ignored=ddp_ignored(model),  # (DDP's own opt-out: not reduced)
        advice=" (a change of requires_grad builds the wrapper anew at the next call: a rank that changed it alone "
        "builds it alone; change it alike on every rank)")


def _refuse_frozen_held(model: torch.nn.Module) -> None:
    """Refuse a wrapper built inside an accumulation group while a parameter that does not require a gradient holds
    one (the group's sum so far, kept on this rank under ``no_sync``): frozen since the group began, DDP would not
    reduce it, and the optimizer would apply each rank's own. No collective: every rank that changed the flags alike
    refuses at the same call.

    >>> model = torch.nn.Linear(1, 1)
    >>> model.weight.grad = torch.zeros(1, 1)
    >>> try:
    ...     _refuse_frozen_held(model.requires_grad_(False))
    ... except ValueError as error:
    ...     print(str(error)[:71])
    with_ddp: requires_grad of weight was turned off inside an accumulation
    """
    held = [name for name, p in model.named_parameters() if p.grad is not None and not p.requires_grad]
    if held:
        names = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise SyncRefusal(
            f"with_ddp: requires_grad of {names} was turned off inside an accumulation group (it holds the "
            "group's gradient, kept on this rank, which DistributedDataParallel would not average); change "
            "requires_grad between groups (e.g. in on_epoch_start)")


#: the options under which DistributedDataParallel's collectives are not all on the default process group, or its
#: building changes the model before its first one (:func:`_wrapper` cannot tell then whether it changed anything)
_UNTOLD: frozenset[str] = frozenset({"process_group", "device_mesh", "delay_all_reduce_named_params"})


def _wrapper(model: torch.nn.Module, options: Mapping[str, Any]) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **options)``. An error it raises before its first collective (torch refusing
    the model: no parameter that requires a gradient, parameters not yet initialised, on devices of several types)
    changed nothing, and is marked so (:func:`loopkit.steps.sync_unchanged`: the step leaves the state usable); the
    default process group's count of collectives (its sequence number) tells, one read before and one after an
    error. Not marked where that count cannot tell (``_UNTOLD``, or a torch without it).

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> try:
    ...     _wrapper(torch.nn.Linear(1, 1).requires_grad_(False), {})
    ... except RuntimeError as error:
    ...     print(getattr(error, "_loopkit_sync_unchanged", False))
    True
    >>> dist.destroy_process_group()
    """
    count = None if _UNTOLD & options.keys() else _collectives_so_far()
    try:
        return DistributedDataParallel(model, **options)
    except Exception as error:
        if count is not None and _collectives_so_far() == count:
            sync_unchanged(error)
        raise


def _collectives_so_far() -> int | None:
    """The default process group's count of collectives (None where this torch does not say)."""
    try:
        return torch.distributed.distributed_c10d._get_default_group()._get_sequence_number_for_group()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _check_same_buffers(model: torch.nn.Module) -> None:
    """Refuse, on every rank, buffers that differ from rank 0's (names, shapes, dtypes): building the wrapper
    broadcasts them, and torch checks only the parameters (other buffers left every rank waiting for the
    process group's timeout, 30 minutes by default). One small all-gather, once per wrapper; a refusal is a
    :class:`loopkit.steps.SyncRefusal` (a ``ValueError``), raised before anything changed: the state stays usable."""
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))  # (DDP's own opt-out: not broadcast)
    mine = [(name, tuple(b.shape), str(b.dtype)) for name, b in model.named_buffers() if name not in ignored]
    detail = _collective.differs_from_rank_zero(mine, "buffers", who="with_ddp")
    if detail is not None:  # (refused on every rank, before anything changed)
        raise SyncRefusal(
            "with_ddp: the model's buffers differ between ranks (name, shape, dtype): " + detail +
            "; DistributedDataParallel broadcasts rank 0's to every rank, so every rank must build the same model"
        )


def with_ddp(
    step: Any, *, comm_hook: Callable | None = None, comm_state: Any = None, **ddp_options: Any
) -> Step:
    """Train on every rank of a ``torch.distributed`` process group, gradients averaged by DDP.

    The loss_fn receives the ``DistributedDataParallel`` wrapper of ``state.model`` (call it
    as the model; its ``.module`` is the model), so DDP's all-reduce of the gradients
    overlaps the backward pass; ``state.model`` stays the plain module, so checkpoints and
    ``state_dict`` keys carry no ``module.`` prefix. ``ddp_options`` go to
    ``DistributedDataParallel`` (``find_unused_parameters``, ``bucket_cap_mb``,
    ``gradient_as_bucket_view``, ``static_graph``, ...); ``comm_hook`` / ``comm_state`` are
    registered with ``register_comm_hook`` (e.g. ``fp16_compress_hook``). The wrapper is
    built at the first call with a model object, and building it broadcasts rank 0's
    parameters and buffers to all ranks. DDP reduces the gradients of the parameters that
    required them when it was built: a change of ``requires_grad`` (a backbone unfrozen by a
    callback) builds the wrapper anew at the next call, as a resumed run would (every rank
    must change the flags alike, and update with the same optimizer: flags, an optimizer class,
    or a param group's size or hyper-parameters that differ between the ranks are refused on
    every rank when the wrapper is built, and a change of the flags by ``run_epochs`` at each
    epoch's start; see :meth:`DDPSync.module`, and for a change inside an accumulation group).

    With the other transforms, in any order:

    - ``with_grad_accum(every=n)``: the first n-1 calls of a group run forward and backward
      under ``no_sync`` (no all-reduce), the n-th all-reduces the summed gradients. With
      gradient transforms *inside* the accumulation (per micro-batch), every call syncs, so
      that they see the micro-batch's gradient over all ranks. A partial group that
      ``run_epochs`` flushes at an epoch's end is averaged over the ranks by the flush. After a
      forward under ``no_sync`` DDP broadcasts no buffers before the next one; the state records
      it (``extras["ddp/unsynced_forward"]``, checkpointed), so that a wrapper built anew (a run
      resumed from the epoch's end, a call that is not donated) keeps each rank's own BatchNorm
      statistics too (its build's broadcast of rank 0's undone), as the one wrapper would. Under
      ``find_unused_parameters`` DDP then still counts the parameters that group used on this
      rank as used, and its next synced backward needs their gradients: they are left zero
      (not None) after the flush, so one of them that no rank uses in the next group updates
      with a zero gradient there (no change under plain SGD; momentum, weight decay or Adam's
      moments move it, where one process would skip it).
    - ``run_epochs``' validations (:meth:`loopkit.steps.Step.validating`): with ``broadcast_buffers`` on (the
      default) every rank validates with rank 0's buffers (BatchNorm's running statistics), those the wrapper's next
      forward would broadcast, as Lightning validates through the wrapper (each rank's own after a forward under
      ``no_sync``, as there); the state keeps each rank's own, put back after the validation.
    - ``with_grad_clip``, ``with_nan_guard``, float16 ``with_amp`` act on the averaged
      gradients, and their skip flag is all-reduced (MAX) before it is read: every rank skips
      the same updates, and with ``policy="raise"`` every rank raises.

    The step is pure as any step: a call that is not donated leaves the state it is given as it
    was (gradients a group keeps on this rank included) and trains a copy of it, with a wrapper
    of the copy's own, built at that call (a collective that broadcasts rank 0's parameters,
    equal on every rank by then): the same new state as the donated call, at that cost a call.
    ``run_epochs`` donates, and so may a loop of one's own (``loopkit.donate(step)``): its
    calls reuse one wrapper. (Under ``find_unused_parameters`` the new wrapper of a call
    inside an accumulation group is told which parameters the group's earlier micro-batches
    used, as the one wrapper of donated calls knows: a backward of ``-0.0`` into their held
    gradients, which changes none.) Every rank must call the step the same number of times (shard
    the data with ``loopkit.distributed.shard``), and a loss_fn that returns None must do so
    on every rank at once. Metric means read by ``run_epochs``, ``evaluate`` and
    ``with_logging`` are means over all ranks (a step's own metrics are its rank's, on the device:
    a loop of one's own reads their means with ``loopkit.distributed.mean_over_ranks(metrics)``, on
    every rank); only rank 0 writes logs and checkpoints.

    In one process (no process group, and no torchrun environment: ``WORLD_SIZE`` unset or 1,
    where ``loopkit.distributed.init()`` makes none) the step trains as the step without
    ``with_ddp``, bit for bit, and no process group is made: a torchrun script runs as
    ``python script.py`` too (Lightning's ``strategy="ddp"`` on one device). ``applied``
    still names ``with_ddp``; the loss_fn gets the model itself (``ddp_options`` and
    ``comm_hook`` are not used). Such a step checks at each call that no process group of
    several ranks has been made since (a ``torch.multiprocessing.spawn`` worker that built the
    step before ``distributed.init(rank=..., world_size=...)``): it raises then, where it would
    train each rank on its own.

    A step that is not donated builds a new wrapper for the copy each call trains (see above);
    building one broadcasts rank 0's parameters (and, with ``broadcast_buffers`` on, its buffers,
    as its forwards do anyway; with it off, each rank keeps its own, as torch's ``DistributedDataParallel``
    leaves them), and ``static_graph=True`` learns its graph anew at each call (donate the step).

    Raises ``RuntimeError`` when the torchrun environment says there are several processes
    (``WORLD_SIZE`` > 1) and no process group is initialised (call
    ``loopkit.distributed.init()`` before building the step), and ``TypeError`` when applied
    twice. An option ``DistributedDataParallel`` does not take (the nearest name suggested) and a
    ``comm_hook`` its ``register_comm_hook`` refuses (:func:`_check_comm_hook`) raise ``TypeError``
    when the step is built, in one process too (torch refused them at the first step under a process
    group). An error of ``DistributedDataParallel`` raised when the wrapper is built, before its first
    collective (torch refusing the model: no parameter that requires a gradient), or of the checks before it
    (a failed gather of theirs too: a rank that died or left, the process group's timeout), leaves the state
    usable (``loopkit.state_at_error``); one after its broadcast of rank 0's parameters does not.

    >>> import torch, torch.distributed as dist
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import donate, train_step
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = donate(with_ddp(train_step(lambda m, b: m(b).pow(2).mean())))
    >>> state, metrics = step(state, torch.ones(4, 2))
    >>> state.step, list(state.model.state_dict())
    (1, ['weight', 'bias'])
    >>> import loopkit
    >>> del step, state, metrics  # (the step's DDP wrapper holds the process group)
    >>> loopkit.distributed.shutdown()  # (gloo's threads let go of the step's collectives before anything is freed)
    """
    base = require_train_step(step, "with_ddp")
    if base.sync is not None or "with_ddp" in base.transforms:  # (in one process with_ddp records its name alone)
        name = "with_ddp" if base.sync is None else base.sync.name
        if name != "with_ddp":
            raise TypeError(f"with_ddp cannot wrap {name}: both make the step data-parallel; use one of them")
        raise TypeError(f"with_ddp cannot wrap {name}: the step is already data-parallel; apply with_ddp once")
    if comm_hook is not None:
        _check_comm_hook(comm_hook)
    if "module" in ddp_options:
        raise TypeError("with_ddp: the module is the state's model; do not pass module=")
    check_option_names("with_ddp", ddp_options, DistributedDataParallel.__init__, "DistributedDataParallel",
                       not_passed={"module"}, own=("comm_hook", "comm_state"))
    if not _collective.ready():
        if not _one_process():
            raise RuntimeError(_NO_GROUP)
        return base.with_transform("with_ddp", one_process=True)  # one process: the plain step (no wrapper, no group)
    return base.with_transform("with_ddp", sync=DDPSync(ddp_options, comm_hook, comm_state))


def _check_comm_hook(hook: Any) -> None:
    """Refuse, with a ``TypeError`` (``ValueError`` for an annotation) naming ``with_ddp``, a ``comm_hook`` that
    torch's ``register_comm_hook`` refuses only when the wrapper is built, at the first step: one not callable as
    ``hook(state, bucket)``, without a parameter named ``bucket`` (torch reads its annotation by that name), with
    another annotation of it than ``dist.GradBucket`` or of its result than ``torch.futures.Future[torch.Tensor]``,
    or without the ``__name__`` and ``__qualname__`` torch reads (a ``functools.partial``: wrap it in a function).

    >>> from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    >>> _check_comm_hook(allreduce_hook)
    >>> _check_comm_hook(lambda bucket: bucket)
    Traceback (most recent call last):
    ...
    TypeError: with_ddp: comm_hook must be callable as hook(state, bucket), got <lambda>(bucket)
    """
    if not callable(hook):
        raise TypeError(f"with_ddp: comm_hook must be callable as hook(state, bucket), got {type(hook).__qualname__}")
    name = getattr(hook, "__qualname__", type(hook).__qualname__)
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # (no signature to read: torch's check reads it at the first step)
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(f"with_ddp: comm_hook must be callable as hook(state, bucket), got {name}{signature}") from None
    bucket = signature.parameters.get("bucket")
    if bucket is None:
        raise TypeError(f"with_ddp: comm_hook's second parameter must be named bucket (torch's register_comm_hook "
                        f"reads it by that name), got {name}{signature}")
    if bucket.annotation not in (inspect.Parameter.empty, torch.distributed.GradBucket):
        raise ValueError(f"with_ddp: comm_hook's bucket annotation must be torch.distributed.GradBucket (or none), "
                         f"got {name}{signature}")
    if signature.return_annotation not in (inspect.Signature.empty, torch.futures.Future[torch.Tensor]):
        raise ValueError(f"with_ddp: comm_hook's return annotation must be torch.futures.Future[torch.Tensor] (or "
                         f"none), got {name}{signature}")
    if not (hasattr(hook, "__name__") and hasattr(hook, "__qualname__")):
        raise TypeError(f"with_ddp: torch's register_comm_hook reads the comm_hook's __name__ and __qualname__, and "
                        f"{name} has none: pass a function (def or lambda) that calls it")


def _one_process() -> bool:
    """Whether the environment says this is the only process: no torchrun ``WORLD_SIZE``, or one of 1 (a
    ``WORLD_SIZE`` above 1, or one that is not a number, is torchrun's word that there are others).

    >>> _one_process()
    True
    """
    size = os.environ.get("WORLD_SIZE")
    if size is None:
        return True
    try:
        return int(size) <= 1
    except ValueError:
        return False
