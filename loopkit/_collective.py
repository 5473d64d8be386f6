"""Metric sums and means, and the one collective the driver and the logging transform make.

A low-layer helper (it imports torch only): :func:`fold` sums metric tensors on their device,
:func:`read` turns tensors into floats in one transfer, and :func:`means` divides sums by
counts; in a process group of more than one rank it all-reduces the sums and counts of
every rank in one collective first, so that every rank reads the same means, weighted by
how many values each rank contributed. :func:`is_rank_zero` says which process writes.

>>> import torch
>>> means({"loss": torch.tensor(3.0)}, {"loss": 2}, who="evaluate")
{'loss': 1.5}
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "active", "agree_max", "any_rank", "broadcast_from_rank_zero", "check_same", "differs_from_rank_zero", "failing_as",
    "failure", "fold", "from_rank_zero", "gather", "is_rank_zero", "max_over_ranks", "mean_over_ranks", "means", "rank_and_size", "rank_zero_values",
    "read", "ready", "sum_dtype", "widest_float",
]


def active() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one rank.

    >>> active()
    False
    """
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero(*, quiet: bool = False) -> bool:
    """Whether this process is rank 0, the one that writes logs and checkpoints: in an initialised
    ``torch.distributed`` process group, the group's rank; without one, torchrun's ``RANK`` when the
    environment sets it (an int) with a ``WORLD_SIZE`` above 1, else True (a single process).

    Without the environment's word, under torchrun every process would be "rank 0" until
    ``loopkit.distributed.init()``, and a write before it (``logger.log_hparams(cfg)`` at the top of
    the script, a ``with_checkpointing`` folder made when the step is built) would happen on every
    rank; Lightning's ``rank_zero_only.rank`` reads the environment alike (at import: ``RANK``, then
    ``LOCAL_RANK``, ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK``; only torchrun's ``RANK`` is read here,
    the variable ``loopkit.distributed.init()`` forms its group from). Read at each call, so it holds
    after ``loopkit.distributed.shutdown()`` too. A process the environment says is not rank 0, without a group,
    is warned that it writes nothing, unless ``quiet``: a call made there before ``init()`` by design
    (``logger.log_hparams(cfg)`` at the top of the script, as the README has it).

    >>> is_rank_zero()
    True
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = _environment_rank()
    if rank in (None, 0):
        return True
    if quiet:
        return False
    warnings.warn(  # (stacklevel 1: one place, so Python's default filter shows it once a process)
        f"loopkit: this process is rank {rank} of {os.environ.get('WORLD_SIZE')} by its environment (torchrun's RANK and "
        "WORLD_SIZE), and no process group exists (before loopkit.distributed.init(), or after shutdown()): rank 0 "
        "alone writes logs and checkpoints. Call loopkit.distributed.init() first; for independent processes, unset RANK",
        RuntimeWarning,
        stacklevel=1,
    )
    return False


def _environment_rank() -> int | None:
    """torchrun's ``RANK`` from the environment, None when it is not set (or not an int), or when its
    ``WORLD_SIZE`` does not say more than one process (a ``RANK`` leaked into a single process: it writes)."""
    value, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if value is None or size is None:
        return None
    try:
        rank, size_ = int(value), int(size)
    except ValueError:  # (not torchrun's: loopkit.distributed.init() names it, should a group be made from it)
        return None
    return rank if size_ > 1 else None


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` outside a process group).

    >>> rank_and_size()
    (0, 1)
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(
    value: object, *, who: str, what: str, to_rank_zero: bool = False, advice: str = ""
) -> list[object] | None:
    """Every rank's ``value`` (picklable; CPU tensors), in rank order, on every rank (or on rank 0 alone,
    None elsewhere, with ``to_rank_zero``): a collective every rank must call at the same point;
    ``[value]`` outside a process group. A failed gather (another rank died) raises :func:`failure`'s
    error, naming ``who`` calls it, ``what`` it gathers and this rank (and giving ``advice``, where given).

    >>> gather({"n": 1}, who="run_epochs", what="the gather of every rank's count")
    [{'n': 1}]
    """
    if not active():
        return [value]
    dist = torch.distributed
    gathered: list[object] = [None] * dist.get_world_size()
    rank_zero = dist.get_rank() == 0
    with failing_as(who, what, advice):
        if not to_rank_zero:
            dist.all_gather_object(gathered, value)
        else:
            dist.gather_object(value, gathered if rank_zero else None, dst=0)
    return gathered if rank_zero or not to_rank_zero else None


def widest_float(device: torch.device) -> torch.dtype:
    """The widest float dtype on ``device``: float64, or float32 on MPS, which has no float64.

    >>> widest_float(torch.device("cpu")), widest_float(torch.device("mps"))
    (torch.float64, torch.float32)
    """
    return torch.float32 if device.type == "mps" else torch.float64


def sum_dtype(values: torch.Tensor) -> torch.dtype:
    """The dtype metrics like ``values`` are summed in: float64 for float64 and int64 ones (no precision
    lost to float32's 24 bits: token counts, float64 models), float32 for the rest. (A metric given as
    a Python int or a numpy float64 becomes such a tensor; a Python float becomes float32.)

    >>> sum_dtype(torch.ones(2)), sum_dtype(torch.ones(2, dtype=torch.float64)), sum_dtype(torch.ones(2, dtype=torch.int64))
    (torch.float32, torch.float64, torch.float64)
    """
    if values.dtype in (torch.float64, torch.int64):
        return widest_float(values.device)
    return torch.float32


def fold(
    sums: Mapping[str, torch.Tensor], counts: Mapping[str, Any], records: Iterable[Mapping[str, torch.Tensor]],
    *, skip_flag: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """New sums and counts with every record's metrics added: one stack-and-sum per key (:func:`sum_dtype`, no sync).

    ``skip_flag``: the key of a record's skip flag (``with_nan_guard``'s ``nan_guard/skipped``, 1.0 on a skipped
    update): a record that carries it weighs ``1 - flag`` in every other key's sum and count, on the device (its values
    summed as ``where(flag, 0, value)``, a NaN loss included; the key's count a device sum of the weights, read with
    the sums by :func:`means`), so that a skipped call adds nothing to the means; so do the records without the flag
    just before it (the micro-batches of the accumulation group whose update it flags). The flag itself is counted as
    any metric (its mean: the fraction of updates skipped). Records without it and no flagged one after them are
    summed as they are, counted by the host.

    >>> s, c = fold({}, {}, [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0), "acc": torch.tensor(1)}])
    >>> {k: float(v) for k, v in s.items()}, c
    ({'loss': 3.0, 'acc': 1.0}, {'loss': 2, 'acc': 1})
    >>> records = [{"loss": torch.tensor(1.0), "skip": torch.tensor(0.0)},
    ...            {"loss": torch.tensor(float("nan")), "skip": torch.tensor(1.0)}]
    >>> s, c = fold({}, {}, records, skip_flag="skip")
    >>> float(s["loss"]), float(c["loss"]), float(s["skip"]), c["skip"]
    (1.0, 1.0, 1.0, 2)
    >>> group = [{"loss": torch.tensor(float("nan"))}, records[1]]  # the micro-batches of a skipped group
    >>> s, c = fold({}, {}, [records[0], *group], skip_flag="skip")
    >>> float(s["loss"]), float(c["loss"])
    (1.0, 1.0)
    """
    new_sums, new_counts = dict(sums), dict(counts)
    values: dict[str, list[torch.Tensor]] = {}
    flags: dict[str, dict[int, torch.Tensor]] = {}  # key -> {index among its values: the skip flag of that record}
    waiting: list[dict[str, int]] = []  # the places of the records without the flag since the last one with it
    records = tuple(records)
    weighed = skip_flag is not None and any(skip_flag in record for record in records)
    for record in records:
        if not weighed:  # (plain records: as they are)
            for key, value in record.items():
                values.setdefault(key, []).append(value)
            continue
        placed: dict[str, int] = {}
        for key, value in record.items():
            held = values.setdefault(key, [])
            placed[key] = len(held)
            held.append(value)
        flag = record.get(skip_flag)  # type: ignore[arg-type]
        if flag is None:
            waiting.append(placed)
            continue
        for places in (*waiting, placed):  # (an accumulation group's micro-batches take its update's flag)
            for key, i in places.items():
                if key != skip_flag:
                    flags.setdefault(key, {})[i] = flag
        waiting = []
    for key, tensors in values.items():
        stacked = _stacked(tensors)
        marks = flags.get(key)
        if marks is None:
            total = stacked.sum(dtype=sum_dtype(stacked))
            count: Any = len(tensors)
        else:
            skipped = _skipped(marks, len(tensors), stacked.device)
            total = stacked.masked_fill(skipped, 0).sum(dtype=sum_dtype(stacked))
            count = (~skipped).sum(dtype=widest_float(stacked.device))
        new_sums[key] = total if key not in new_sums else new_sums[key] + total
        new_counts[key] = count if key not in new_counts else _added(new_counts[key], count)
    return new_sums, new_counts


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` in one tensor on the first one's device (stack promotes mixed dtypes)."""
    try:  # the common case: one device; no per-tensor conversion
        return torch.stack(tensors)
    except RuntimeError:  # metrics of one key on several devices
        device = tensors[0].device
        return torch.stack([t.to(device) for t in tensors])


def _skipped(marks: Mapping[int, torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """A bool tensor of ``n`` on ``device``: True where ``marks`` holds a non-zero skip flag (the records without
    one, not skipped)."""
    if len(marks) == n:
        flags = _stacked([f.reshape(()) for f in marks.values()]).to(device)
    else:
        zero = torch.zeros((), device=device)
        flags = _stacked([marks[i].reshape(()).to(device) if i in marks else zero for i in range(n)])
    return flags != 0


def _added(count: Any, more: Any) -> Any:
    """Two counts added, a device count (a tensor) moved to the other's device where both are tensors."""
    if isinstance(count, torch.Tensor) and isinstance(more, torch.Tensor):
        return count + more.to(count.device)
    return count + more


def read(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each 0-dim tensor as a float, read in one transfer (the only host sync): stacked on the first one's device
    in float64, or in float32 on MPS, which has no float64 (its tensors, and :func:`sum_dtype`'s sums there, are
    float32 at most: nothing is lost).

    >>> read({"a": torch.tensor(0.5), "b": torch.tensor(2)})
    {'a': 0.5, 'b': 2.0}
    """
    if not tensors:
        return {}
    keys = list(tensors)
    device = tensors[keys[0]].device
    dtype = widest_float(device)
    values = torch.stack([tensors[k].detach().reshape(()).to(device, dtype) for k in keys]).tolist()
    return dict(zip(keys, values))


def any_rank(flag: bool, what: str = "the ranks' agreement (an all-reduce)", who: str = "run_epochs") -> bool:
    """``flag`` or-ed over all ranks (a collective every rank must call at the same point); ``flag`` alone
    outside a process group. A failed all-reduce (another rank died) raises :func:`failure`'s error, naming
    ``who``, ``what`` and this rank.

    >>> any_rank(True), any_rank(False)
    (True, False)
    """
    return bool(max_over_ranks(int(flag), what, who))


def max_over_ranks(value: int, what: str = "the ranks' agreement (an all-reduce)", who: str = "run_epochs") -> int:
    """The largest of every rank's ``value`` (a small int: several flags in one all-reduce), a collective every
    rank must call at the same point; ``value`` alone outside a process group. A failed all-reduce (another rank
    died) raises :func:`failure`'s error, naming ``who``, ``what`` and this rank.

    >>> max_over_ranks(2)
    2
    """
    if not active():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    told = torch.tensor(int(value), device=device)
    with failing_as(who, what):
        torch.distributed.all_reduce(told, op=torch.distributed.ReduceOp.MAX)
    return int(told.item())


def from_rank_zero(value: int, *, who: str, what: str) -> int:
    """Rank 0's ``value`` (a small int) on every rank: one broadcast, a collective every rank must call at the
    same point; ``value`` itself outside a process group of more than one rank. A failed broadcast (another rank
    died) raises :func:`failure`'s error, naming ``who`` calls it, ``what`` it tells and this rank.

    >>> from_rank_zero(2, who="with_checkpointing", what="the broadcast of rank 0's word on a save")
    2
    """
    if not active():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    told = torch.tensor(value, dtype=torch.int64, device=device)
    with failing_as(who, what):
        torch.distributed.broadcast(told, src=0)
    return int(told.item())


def check_same(
    values: Mapping[str, object], what: str | Mapping[str, str], who: str = "run_epochs", *,
    error: Callable[[str], Exception] = RuntimeError, advice: str = "",
) -> None:
    """Raise ``error`` (a ``RuntimeError`` unless given) naming the first rank whose ``values`` differ from rank
    0's, the values that differ and the keys one of them lacks (:func:`_held`): a collective every rank must
    call at the same point; nothing outside a process group. ``what`` begins the message: one text, or one for
    each key (several facts checked in one gather; the texts of the keys that differ begin it, see
    :func:`_what_differs`). A failed gather raises :func:`failure`'s error naming ``who`` (and giving ``advice``:
    how every rank reaches it).

    >>> check_same({"step": 3}, "run_epochs")
    """
    if not active():
        return
    gathered: list[dict[str, object]] = gather(  # type: ignore[assignment]
        dict(values), who=who, what="the gather that checks every rank agrees with rank 0", advice=advice)
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            differs = {**_unlike(other, gathered[0]), **_unlike(gathered[0], other)}
            raise error(f"{_what_differs(what, differs)}: rank {rank} has {_held(other, gathered[0])}, "
                        f"rank 0 has {_held(gathered[0], other)}")


def _what_differs(what: str | Mapping[str, str], differs: Mapping[str, object]) -> str:
    """The beginning of :func:`check_same`'s message: ``what`` itself, or the texts ``what`` gives the keys that
    differ (or a rank lacks), each once, joined by "; " (all of its texts where it has none of them).

    >>> texts = {"batches": "another number of batches", "flags": "other flags"}
    >>> _what_differs("the ranks differ", {"a": 1}), _what_differs(texts, {"flags": []})
    ('the ranks differ', 'other flags')
    """
    if isinstance(what, str):
        return what
    texts = [what[key] for key in differs if key in what] or list(what.values())
    return "; ".join(dict.fromkeys(texts))


def _unlike(values: dict[str, object], others: dict[str, object]) -> dict[str, object]:
    """The items of ``values`` that ``others`` holds otherwise, or lacks.

    >>> _unlike({"a": 1, "b": 2}, {"a": 1, "b": 3}), _unlike({"a": 1, "c": 2}, {"a": 1, "d": 2})
    ({'b': 2}, {'c': 2})
    """
    return {key: value for key, value in values.items() if key not in others or value != others[key]}


def _held(values: dict[str, object], others: dict[str, object]) -> str:
    """What :func:`check_same`'s message says a rank has: the items of ``values`` that ``others`` holds otherwise or
    lacks (:func:`_unlike`), and the keys of ``others`` that ``values`` lacks; not the values alike.

    >>> _held({"a": 1, "b": 2}, {"a": 1, "b": 3})
    "{'b': 2}"
    >>> _held({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}), _held({"a": 1}, {"a": 1, "d": 4})
    ("{'b': 2, 'c': 3} and no 'd'", "no 'd'")
    """
    unlike = _unlike(values, others)
    lacks = [repr(key) for key in others if key not in values]
    if not lacks:
        return str(unlike)
    return f"{unlike} and no {', '.join(lacks)}" if unlike else f"no {', '.join(lacks)}"


def _reduce_device(sums: Mapping[str, torch.Tensor]) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def means(
    sums: Mapping[str, torch.Tensor], counts: Mapping[str, Any], *, who: str, advice: str = "", reduce: bool = True
) -> dict[str, float]:
    """``sums[k] / counts[k]`` for each key, over all ranks when a process group is active (and ``reduce``).
    A count may be a number or a device tensor (a weighed count of :func:`fold`), read with the sums, in the same
    transfer; a key whose count is 0 (every call of it skipped) has no mean.

    Under a process group every rank must call this at the same point (it is a collective).
    The keys of all ranks are joined first, so a rank that saw no value of a metric (or no
    batch at all) still takes part; the sums and counts then travel in one all-reduce. Where either
    fails (a rank never came, or died) :func:`failure`'s error names ``who`` asks for the means, this rank
    and ``advice`` (how to call ``who`` on every rank).

    >>> means({"loss": torch.tensor(3.0)}, {"loss": 2}, who="evaluate")
    {'loss': 1.5}
    """
    if not (reduce and active()):
        weighed = {k: c for k, c in counts.items() if isinstance(c, torch.Tensor)}
        if not weighed:
            return {k: total / counts[k] for k, total in read(sums).items()}
        values = read({**{f"sum {k}": v for k, v in sums.items()}, **{f"count {k}": c for k, c in weighed.items()}})
        read_counts = {k: values.get(f"count {k}", counts[k]) for k in sums}
        return {k: values[f"sum {k}"] / read_counts[k] for k in sums if read_counts[k] > 0}
    keys, packed = _summed_over_ranks(sums, counts, who, advice)
    values = packed.tolist()
    n = len(keys)
    return {k: values[i] / values[n + i] for i, k in enumerate(keys) if values[n + i] > 0}


def _summed_over_ranks(
    sums: Mapping[str, torch.Tensor], counts: Mapping[str, float], who: str, advice: str
) -> tuple[list[str], torch.Tensor]:
    """The keys of all ranks, and one float64 tensor of their sums then their counts, all-reduced (one
    all-gather of the keys, one all-reduce: a rank that saw no value of a metric still takes part); a failed
    collective raises :func:`failure`'s error naming ``who`` and giving ``advice`` (see :func:`means`)."""
    dist = torch.distributed
    what = "the reduction of the means over the ranks"
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    with failing_as(who, what, advice):  # (the first collective of the means: where a rank that never came is found out)
        dist.all_gather_object(gathered, list(sums))
    keys: list[str] = []
    for rank_keys in gathered:
        keys.extend(k for k in rank_keys or () if k not in keys)
    device = _reduce_device(sums)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = [sums[k].detach().reshape(()).to(device, torch.float64) if k in sums else zero for k in keys]
    plain = [0.0 if isinstance(counts.get(k), torch.Tensor) else float(counts.get(k, 0)) for k in keys]
    numbers = torch.tensor(plain, dtype=torch.float64, device=device)
    for i, k in enumerate(keys):  # weighed counts (skipped calls weigh 0, :func:`fold`): device sums, added there
        if isinstance(counts.get(k), torch.Tensor):
            numbers[i] += counts[k].detach().reshape(()).to(device, torch.float64)
    packed = torch.cat([torch.stack(totals), numbers]) if keys else numbers
    if keys:
        with failing_as(who, what, advice):
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return keys, packed


def ready() -> bool:
    """True inside an initialised ``torch.distributed`` process group, of any size.

    >>> ready()
    False
    """
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def failure(transform: str, collective: str, error: BaseException, where: str = "", advice: str = "") -> RuntimeError:
    """The error a data-parallel ``transform`` (or the function that calls ``collective``) raises when
    ``collective`` failed: it names the collective, this rank and the likely cause; ``advice``, where given,
    says how every rank reaches it (a parenthesis, as " (call evaluate on every rank)").

    >>> str(failure("with_ddp", "the gradient all-reduce", RuntimeError("reset by peer")))[:52]
    'with_ddp: the gradient all-reduce failed on rank 0 o'
    """
    rank, size = rank_and_size()
    reach = f"every rank must reach it at the same point{advice}, or " if advice else ""
    return RuntimeError(
        f"{transform}: {collective} failed on rank {rank} of {size}{where}: {reach}another rank has probably died or "
        f"stopped (see its log), or the process group's timeout ran out. The error was: {error}"
    )


@contextlib.contextmanager
def failing_as(who: str, what: str, advice: str = "") -> Iterator[None]:
    """The context of one collective call: a ``RuntimeError`` it raises (gloo's raw "Connection reset by peer",
    its timeout, NCCL's ``DistBackendError``) is raised again as :func:`failure`'s error naming ``who``, ``what``
    and this rank (the original as its cause).

    >>> with failing_as("evaluate", "the all-reduce of the means"):
    ...     raise RuntimeError("Connection reset by peer")
    Traceback (most recent call last):
    RuntimeError: evaluate: the all-reduce of the means failed on rank 0 of 1: another rank has probably died or stopped (see its log), or the process group's timeout ran out. The error was: Connection reset by peer
    """
    try:
        yield
    except RuntimeError as error:
        raise failure(who, what, error, advice=advice) from error


def broadcast_from_rank_zero(
    tensors: Iterable[torch.Tensor], failed: Callable[[str, BaseException], RuntimeError], what: str,
    group: Any = None,
) -> None:
    """Copy rank 0's ``tensors`` (buffers: the same names, shapes and dtypes on every rank) into every rank's, in
    place: one broadcast per device and dtype, on device tensors (no host read); a failed broadcast raises
    ``failed(what, error)``. A collective every rank must call at the same point (of ``group``, from its rank 0;
    the default group when None).

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> mean = torch.ones(2)
    >>> broadcast_from_rank_zero([mean], lambda what, e: RuntimeError(what), "the broadcast")
    >>> mean
    tensor([1., 1.])
    >>> dist.destroy_process_group()
    """
    source = 0 if group is None else torch.distributed.get_global_rank(group, 0)
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    with torch.no_grad():
        for members in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in members]) if len(members) > 1 else members[0].reshape(-1).clone()
            try:
                torch.distributed.broadcast(flat, src=source, group=group)
            except RuntimeError as e:
                raise failed(what, e) from e
            for t, part in zip(members, flat.split([t.numel() for t in members])):
                t.copy_(part.view(t.shape))


@contextlib.contextmanager
def rank_zero_values(
    tensors: Iterable[torch.Tensor], failed: Callable[[str, BaseException], RuntimeError], what: str,
    group: Any = None,
) -> Iterator[None]:
    """Inside, ``tensors`` hold rank 0's values on every rank (:func:`broadcast_from_rank_zero`); on exit, even
    after an error, each rank's own are copied back in place (a copy of them is kept meanwhile).

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> mean = torch.ones(2)
    >>> with rank_zero_values([mean], lambda what, e: RuntimeError(what), "the broadcast"):
    ...     _ = mean.add_(1)
    >>> mean
    tensor([1., 1.])
    >>> dist.destroy_process_group()
    """
    tensors = list(tensors)
    own = [t.detach().clone() for t in tensors]
    try:
        broadcast_from_rank_zero(tensors, failed, what, group)
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, own):
                t.copy_(value)


def agree_max(flags: torch.Tensor, failed: Callable[[str, BaseException], RuntimeError]) -> torch.Tensor:
    """``flags``' maximum over all ranks (one all-reduce, on a float copy): 1.0 anywhere is 1.0 everywhere;
    a failed all-reduce raises ``failed(collective, error)``.

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> agree_max(torch.tensor([0.0, 1.0]), lambda what, e: RuntimeError(what))
    tensor([0., 1.])
    >>> dist.destroy_process_group()
    """
    agreed = flags.detach().float().clone()
    try:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    except RuntimeError as e:
        raise failed("the all-reduce that agrees on skipping the update", e) from e
    return agreed


def differs_from_rank_zero(described: list[tuple[str, tuple[int, ...], str]], kind: str, *, who: str) -> str | None:
    """How this process group's ranks' ``described`` tensors (``(name, shape, dtype)`` each, in order) differ
    from rank 0's, in words naming the ranks and the first difference; None where every rank's are the same.
    One all-gather: every rank calls it at the same point (a failed one raises :func:`failure`'s error naming
    ``who`` checks). ``kind`` names the tensors ("buffers").

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> print(differs_from_rank_zero([("w", (2,), "torch.float32")], "parameters", who="with_ddp"))
    None
    >>> dist.destroy_process_group()
    """
    every: list[Any] = [None] * torch.distributed.get_world_size()
    with failing_as(who, f"the all-gather of every rank's {kind} (names, shapes, dtypes)"):
        torch.distributed.all_gather_object(every, described)
    for rank, theirs in enumerate(every):
        if theirs != every[0]:
            diff = next(((a, b) for a, b in zip(every[0], theirs) if a != b), None)
            if diff is not None:
                return f"rank 0 has {diff[0]}, rank {rank} has {diff[1]}"
            only = sorted({n for n, *_ in every[0]} ^ {n for n, *_ in theirs})
            return f"rank 0 has {len(every[0])} {kind}, rank {rank} has {len(theirs)}: {only} on one of them only"
    return None


def mean_over_ranks(
    grads: list[torch.Tensor | None], sizes: list[int], dtype: torch.dtype, device: torch.device,
    failed: Callable[[str, BaseException], RuntimeError],
) -> list[torch.Tensor | None]:
    """Each of this rank's dense ``grads`` (None where it has none; ``sizes`` their numbers of elements)
    averaged over the ranks, flat (1-D views of one new tensor), None where no rank had one: one all-reduce
    of them all packed with a flag each (``dtype``, ``device``), and one read of the flags. Every rank calls
    it at the same point with the same sizes in the same order (a collective), whatever gradients it holds;
    a rank without one contributes zeros. A failed all-reduce raises ``failed(collective, error)``.

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> mean_over_ranks([torch.ones(2, 1), None], [2, 3], torch.float32, torch.device("cpu"), lambda w, e: e)
    [tensor([1., 1.]), None]
    >>> dist.destroy_process_group()
    """
    total = sum(sizes)
    flat = torch.zeros(total + len(sizes), dtype=dtype, device=device)
    for part, grad in zip(flat[:total].split(sizes), grads):
        if grad is not None:
            part.copy_(grad.reshape(-1))
    flat[total:] = torch.tensor([grad is not None for grad in grads], dtype=dtype)
    try:
        torch.distributed.all_reduce(flat)
    except RuntimeError as e:
        raise failed("the all-reduce of a flushed group's gradients", e) from e
    flat[:total].div_(torch.distributed.get_world_size())
    anywhere = flat[total:].tolist()  # (one read per flush)
    return [part if some_rank_had else None for part, some_rank_had in zip(flat[:total].split(sizes), anywhere)]
