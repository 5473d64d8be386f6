"""Multi-process and multi-node training: the process group from ``torchrun`` (or given), and sharded data.

Start one process per device with ``torchrun`` (one machine:
``torchrun --nproc-per-node 2 train.py``; two machines: the same command on each with
``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``), then::

    loopkit.distributed.init()                      # reads torchrun's environment
    state = loopkit.TrainState.create(model, optimizer, seed=0)
    step = loopkit.with_ddp(loopkit.train_step(loss_fn))
    data = loopkit.distributed.shard(train_set, state, batch_size=32)
    state, history = loopkit.run_epochs(step, state, data, epochs=10)
    loopkit.distributed.shutdown()

Processes started with ``torch.multiprocessing.spawn`` (Lightning's ``strategy="ddp_spawn"``)
pass their ranks instead, as to ``torch.distributed.init_process_group``; every worker gets
the same port (no environment needed: the address defaults to ``127.0.0.1``)::

    def worker(rank, port):
        loopkit.distributed.init(rank=rank, world_size=2, master_port=port)  # or init_method="tcp://HOST:PORT"
        ...                                                                  # then as above

    torch.multiprocessing.spawn(worker, args=(29500,), nprocs=2)

In a single process (no ``torchrun`` environment, no ranks given) ``init`` does nothing,
``rank()`` is 0, ``world_size()`` is 1 and ``shard`` gives the whole data (all that a
DataLoader yields, with a sampler of its own too).

>>> init(), rank(), world_size(), is_rank_zero()
(False, 0, 1, True)
"""

from __future__ import annotations

import datetime
import numbers
import os
import sys
import time
from collections.abc import Iterator, Sized
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler,
)

from loopkit import _collective
from loopkit._numbers import as_int, as_real
from loopkit.rng import epoch_order_seed, global_rngs_kept, seed_epoch_start
from loopkit.state import TrainState

__all__ = ["init", "is_rank_zero", "local_rank", "mean_over_ranks", "rank", "shard", "shutdown", "world_size"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _group() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    if not isinstance(timeout, datetime.timedelta) and as_real(timeout) is None:
        raise TypeError(f"loopkit.distributed.init: timeout must be seconds or a timedelta, got {timeout!r}")
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    if not seconds > 0:
        raise ValueError(f"loopkit.distributed.init: timeout must be positive seconds, got {timeout!r}")


def _check_int(name: str, value: Any) -> int:
    if as_int(value) is None:
        raise TypeError(f"loopkit.distributed.init: {name} must be an int, got {value!r}")
    return as_int(value)


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except ValueError:
        return None


def _explicit_group(
    init_method: Any, rank: Any, world_size: Any, master_addr: Any, master_port: Any
) -> tuple[int, int, str | None] | None:
    """``(rank, world_size, init_method)`` from ``init``'s keyword arguments; None when none is given.

    Checks every value and the environment's agreement before a process group is made. The
    init_method is None for a one-process group (a ``HashStore``: no address, no port).
    """
    given = [name for name, value in (("init_method", init_method), ("rank", rank), ("world_size", world_size),
                                      ("master_addr", master_addr), ("master_port", master_port)) if value is not None]
    if not given:
        return None
    if rank is None or world_size is None:
        raise TypeError(
            f"loopkit.distributed.init: pass both rank= and world_size= (got {', '.join(n + '=' for n in given)}); "
            "in a torch.multiprocessing.spawn worker call e.g. init(rank=rank, world_size=2, master_port=29500); "
            "under torchrun pass none of them"
        )
    _check_int("world_size", world_size)
    _check_int("rank", rank)
    if world_size < 1:
        raise ValueError(f"loopkit.distributed.init: world_size must be at least 1, got world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"loopkit.distributed.init: rank must be in [0, world_size={world_size}), got rank={rank}")
    if init_method is not None:
        if not isinstance(init_method, str) or "://" not in init_method:
            raise (ValueError if isinstance(init_method, str) else TypeError)(
                "loopkit.distributed.init: init_method must be a URL string such as 'tcp://127.0.0.1:29500' or "
                f"'file:///tmp/rendezvous', got {init_method!r}"
            )
        if master_addr is not None or master_port is not None:
            raise TypeError(
                f"loopkit.distributed.init: give init_method= or master_addr=/master_port=, not both (got "
                f"init_method={init_method!r} and {', '.join(n + '=' for n in given if n.startswith('master_'))})"
            )
    if master_addr is not None and (not isinstance(master_addr, str) or not master_addr.strip()):
        raise (ValueError if isinstance(master_addr, str) else TypeError)(
            f"loopkit.distributed.init: master_addr must be a host name or address, got {master_addr!r}"
        )
    if master_port is not None:
        _check_int("master_port", master_port)
        if not 1 <= master_port <= 65535:
            raise ValueError(
                f"loopkit.distributed.init: master_port must be in [1, 65535], got master_port={master_port} "
                "(port 0 would let each rank pick its own, and they would not meet)"
            )
    for name, env, value in (("rank", "RANK", rank), ("world_size", "WORLD_SIZE", world_size),
                             ("master_addr", "MASTER_ADDR", master_addr), ("master_port", "MASTER_PORT", master_port)):
        if value is None or env not in os.environ:
            continue
        agrees = os.environ[env] == value if isinstance(value, str) else _env_int(env) == value
        if not agrees:
            raise ValueError(
                f"loopkit.distributed.init: {name}={value!r} contradicts the environment's {env}={os.environ[env]!r}; "
                f"pass the environment's value, or leave {name}= out (or unset {env}) to use the other"
            )
    if init_method is not None or world_size == 1:
        return rank, world_size, init_method
    host = master_addr if master_addr is not None else os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master_port is None:
        if "MASTER_PORT" not in os.environ:
            raise ValueError(
                f"loopkit.distributed.init: world_size={world_size} needs master_port= (or MASTER_PORT in the "
                "environment): every rank must meet rank 0 at the same port, so loopkit does not pick one. Pick a "
                "free port in the parent before torch.multiprocessing.spawn and pass it to every worker"
            )
        master_port = _env_int("MASTER_PORT")
        if master_port is None or not 1 <= master_port <= 65535:
            raise ValueError(
                f"loopkit.distributed.init: the environment's MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port "
                "in [1, 65535]"
            )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address in a URL
    return rank, world_size, f"tcp://{host}:{master_port}"


def init(
    backend: str | None = None,
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout: float | datetime.timedelta | None = None,
) -> bool:
    """Initialise the default process group, from torchrun's environment or the ranks given; True when one is.

    **Under torchrun** (no keyword but ``timeout``): the group comes from ``RANK`` /
    ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``. A no-op returning False in a single
    process (none of them in the environment); a ``RuntimeError`` names the missing ones
    when only some are set.

    **In a worker of ``torch.multiprocessing.spawn``** (Lightning's ``"ddp_spawn"``), pass
    the ranks as ``torch.distributed.init_process_group`` takes them:
    ``init(rank=rank, world_size=n, master_port=port)``, or ``init_method=`` (a URL such
    as ``"tcp://HOST:PORT"`` or ``"file:///shared/path"``) instead of ``master_addr`` /
    ``master_port``. ``rank`` and ``world_size`` go together; ``master_addr`` defaults to
    ``MASTER_ADDR`` from the environment, else ``"127.0.0.1"``; ``master_port`` defaults to
    ``MASTER_PORT`` from the environment and is required otherwise (when ``world_size`` > 1):
    loopkit never picks a port, since each rank would pick its own. ``world_size=1`` makes a
    real one-process group (in memory, no port needed), so ``with_ddp`` works as with more
    ranks, as Lightning's ``"ddp_spawn"`` on one device makes a group too. The local rank
    (``local_rank()``, the GPU with CUDA) is ``LOCAL_RANK`` from the environment when set,
    else the rank: one machine (on several, set ``LOCAL_RANK`` in each worker first). An
    argument that the environment contradicts (``rank=0`` with ``RANK=1``), a rank outside
    ``[0, world_size)``, ``world_size`` < 1, or a value that is not an int (a bool included)
    raises before any process group is made. Returns True at once when a group is already
    initialised (the ranks given must be that group's).

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise; with
    CUDA, the process uses the GPU ``local_rank()``. ``timeout`` (seconds or a timedelta)
    bounds every collective: a rank whose peer died raises after it instead of waiting
    (torch's default is 30 minutes for gloo and nccl).

    >>> init()                                # one process, no torchrun environment: a no-op
    False
    >>> init(rank=0, world_size=1)            # a spawn worker alone: a real one-process group
    True
    >>> rank(), world_size(), local_rank()
    (0, 1, 0)
    >>> shutdown()
    """
    explicit = _explicit_group(init_method, rank, world_size, master_addr, master_port)
    if explicit is None:
        if _group():
            return True
        _check_timeout(timeout)  # (in one process too: the script's mistake shows before it meets torchrun)
        present = [name for name in _TORCHRUN_VARS if name in os.environ]
        if not present:
            return False
        if len(present) < len(_TORCHRUN_VARS):
            missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
            raise RuntimeError(
                f"loopkit.distributed.init: the environment sets {', '.join(present)} but not {', '.join(missing)}; "
                "start the script with torchrun (e.g. `torchrun --nproc-per-node 2 script.py`), which sets all of "
                "them, or pass rank= and world_size= (and master_port=) in a torch.multiprocessing.spawn worker"
            )
    else:
        _check_timeout(timeout)
        the_rank, size, url = explicit
        if _group():
            active = (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if active != (the_rank, size):
                raise ValueError(
                    f"loopkit.distributed.init: rank={the_rank}, world_size={size} contradict the process group "
                    f"already initialised (rank {active[0]} of {active[1]})"
                )
            return True
    if not torch.distributed.is_available():
        raise RuntimeError("loopkit.distributed.init: this build of torch has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" or (torch.cuda.is_available() and "nccl" in backend):
        torch.cuda.set_device(local_rank() if explicit is None else int(os.environ.get("LOCAL_RANK", explicit[0])))
    if as_real(timeout) is not None:
        timeout = datetime.timedelta(seconds=as_real(timeout))
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if explicit is None:
        store = _attempt_store(timeout)
        if store is not None:
            options.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        the_rank, size, url = explicit
        options.update(rank=the_rank, world_size=size)
        under_agent = init_method is None and all(name in os.environ for name in _TORCHRUN_VARS)
        store = _attempt_store(timeout) if url is not None and under_agent else None
        if store is not None:  # under torchrun's agent, with the ranks passed too (they agree with its environment)
            options.update(store=store)
        elif url is not None:
            options.update(init_method=url)
        else:
            options.update(store=torch.distributed.HashStore())
    torch.distributed.init_process_group(backend, **options)
    return True


def _attempt_store(timeout: datetime.timedelta | None) -> Any:
    """The torchrun agent's store, with keys of this restart attempt only (None: let torch make the store).

    After ``--max-restarts`` the workers of a new attempt share the agent's store with the dead
    attempt's keys; gloo then may read a dead rank's address and fail to connect. A prefix
    per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps each attempt's rendezvous apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    dist = torch.distributed
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]), is_master=False,
        timeout=timeout or datetime.timedelta(minutes=5),
    )
    return dist.PrefixStore(f"loopkit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def rank() -> int:
    """This process's rank in the default process group; 0 without one.

    >>> rank()
    0
    """
    return _collective.rank_and_size()[0]


def world_size() -> int:
    """The number of processes in the default process group; 1 without one.

    >>> world_size()
    1
    """
    return _collective.rank_and_size()[1]


def local_rank() -> int:
    """This process's rank on its machine: ``LOCAL_RANK`` (from torchrun) when set, else the process
    group's rank while one is active (workers of ``torch.multiprocessing.spawn`` on one machine; on
    several, set ``LOCAL_RANK`` in each), else 0.

    >>> local_rank()
    0
    """
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.distributed.get_rank() if _group() else 0


def is_rank_zero() -> bool:
    """True on rank 0 and in a single process: the rank that writes logs and checkpoints. Before the
    process group exists (or without one, or after :func:`shutdown`), torchrun's ``RANK`` when set with a
    ``WORLD_SIZE`` above 1, as Lightning's ``rank_zero_only.rank``: under torchrun, a logger written to or a
    checkpoint folder made before :func:`init` is rank 0's alone (while :func:`rank` is 0 until then). Such
    a process writes nothing even without a group (workers torchrun starts as independent processes:
    unset ``RANK`` there); a ``RuntimeWarning`` says so once.

    >>> is_rank_zero()
    True
    """
    return _collective.is_rank_zero()


def mean_over_ranks(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each of a step's ``metrics`` as its mean over all ranks, as Python floats: what ``run_epochs``,
    ``evaluate`` and ``with_logging`` read from a ``with_ddp`` step, for a loop of one's own (a step's metrics
    are each rank's own, kept on the device: averaging them at every step would cost a collective per step).

    A collective (one all-gather of the names, one all-reduce of the values): every rank calls it at the same
    point, so read it on every rank, not under ``if rank() == 0``. A metric only some ranks report is the mean
    over those. In one process, the metrics as floats.

    A value may be a 1-element tensor or a Python number; anything else is refused, naming the metric.

    >>> import torch
    >>> mean_over_ranks({"loss": torch.tensor(0.5), "acc": 0.75})
    {'loss': 0.5, 'acc': 0.75}
    """
    return _collective.means({name: _as_metric(name, value) for name, value in metrics.items()}, dict.fromkeys(metrics, 1),
                             who="loopkit.distributed.mean_over_ranks", advice=" (call it on every rank)")


def _as_metric(name: str, value: Any) -> torch.Tensor:
    """``value`` as the 0-dim tensor :func:`mean_over_ranks` reduces: a 1-element tensor's, a Python number's."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"loopkit.distributed.mean_over_ranks: metric {name!r} is not a number or a 1-element real tensor "
                    f"(got {type(value).__qualname__}{'' if not isinstance(value, torch.Tensor) else f' of shape {tuple(value.shape)}'})")


def shutdown() -> None:
    """Wait for every rank, then destroy the default process group; a no-op without one.

    Called while an exception propagates (in a ``finally`` or ``except`` block) it does not wait: the
    other ranks may be waiting in a collective this rank will never join, and a barrier would hold
    this rank until the process group's timeout; destroying the group at once fails them instead.

    >>> shutdown()
    """
    if not _group():
        return
    try:
        if sys.exc_info()[0] is None:
            torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
        _let_gloo_workers_settle()


def _let_gloo_workers_settle(seconds: float = 0.1) -> None:
    """Release the GIL for a moment so gloo's worker threads drop their finished collectives now.

    A gloo worker thread frees a finished collective after the rank that waited on it has
    moved on, and a barrier keeps the collectives before it alive until then. When such a
    collective holds a tensor that Python has already let go of, freeing it takes the GIL;
    if the interpreter is shutting down by then, the thread is torn down inside a C++
    destructor and the process aborts ("terminate called without an active exception",
    SIGABRT) although training finished. DDP objects keep the process group, and so these
    threads, alive after ``destroy_process_group``. Sleeping here lets the threads finish
    while the interpreter is still whole; nothing else waits on them.
    """
    time.sleep(seconds)


class _ShardSampler(DistributedSampler):
    """A ``DistributedSampler`` that never pads: each sample goes to exactly one rank.

    Ranks then hold ``len // world`` or one more samples, which suits evaluation (each
    sample counted once) but not DDP training (every rank must take the same number of steps).
    """

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=gen).tolist()  # type: ignore[arg-type]
        else:
            order = list(range(len(self.dataset)))  # type: ignore[arg-type]
        return iter(order[self.rank : len(order) : self.num_replicas])

    def __len__(self) -> int:
        return _unpadded_share(len(self.dataset), self.num_replicas, self.rank)  # type: ignore[arg-type]


def _unpadded_share(n: int, world: int, rank: int) -> int:
    """How many of ``n`` indices rank ``rank`` of ``world`` takes when each goes to one rank (``r, r + world, ...``)."""
    return n // world + (1 if rank < n % world else 0)


class _SamplerShard(Sampler[int]):
    """This rank's share of the indices a loader's own sampler draws (Lightning's ``DistributedSamplerWrapper``).

    Each epoch the sampler's indices are drawn once, here in the main process, with torch's global
    generator, the sampler's generator and the loader's (``loader_generator``), numpy's and Python's
    global RNGs seeded as ``run_epochs`` seeds the loader's epoch, from ``(seed, epoch)``: ``seed`` is rank 0's, so every rank draws the same
    indices whatever its own RNG holds, and in one process the draw is the loader's own for the same
    seed. The generators are put back afterwards. The indices are then split as a ``DistributedSampler``
    with ``shuffle=False`` splits a dataset's (rank ``r`` takes indices ``r``, ``r + world``, ...), the
    sampler's order kept: ``pad=True`` repeats the first ones so that every rank takes as many,
    ``pad=False`` gives each drawn index to one rank only.
    """

    def __init__(
        self, sampler: Sampler, loader_generator: torch.Generator | None, *, num_replicas: int, rank: int, seed: int,
        pad: bool,
    ) -> None:
        self.sampler = sampler
        self.loader_generator = loader_generator
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose indices the next iteration draws; told to the sampler too when it takes it."""
        self.epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def _draw(self) -> list[int]:
        """The sampler's indices this epoch, drawn as the loader's iterator draws them (the workers' base seed
        from the loader's generator, else torch's global one, first), from generators seeded for the epoch."""
        order_seed = epoch_order_seed(self.seed, self.epoch)
        generators = [torch.default_generator]
        for generator in (self.loader_generator, getattr(self.sampler, "generator", None)):
            if isinstance(generator, torch.Generator) and all(generator is not g for g in generators):
                generators.append(generator)
        saved = [g.get_state() for g in generators]
        try:
            with global_rngs_kept():  # (numpy's and Python's too: a sampler of one's own may shuffle with them)
                for generator in generators:
                    generator.manual_seed(order_seed)
                seed_epoch_start(self.seed, self.epoch)
                torch.empty((), dtype=torch.int64).random_(generator=self.loader_generator)
                return list(self.sampler)
        finally:
            for generator, state in zip(generators, saved):
                generator.set_state(state)

    def __iter__(self) -> Iterator[int]:
        indices = self._draw()
        if self.pad and indices:
            total = -(-len(indices) // self.num_replicas) * self.num_replicas
            indices = (indices * -(-total // len(indices)))[:total]
        return iter(indices[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        if self.pad:
            return -(-n // self.num_replicas)
        return _unpadded_share(n, self.num_replicas, self.rank)


_LOADER_OPTIONS = (
    "batch_size", "num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
    "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order",
)


def _loader_options(loader: DataLoader) -> tuple[dict[str, Any], Sampler]:
    """The options of ``loader`` that a shard keeps, and the sampler its batches are drawn from."""
    sampler = loader.sampler
    options = {name: getattr(loader, name) for name in _LOADER_OPTIONS if hasattr(loader, name)}
    if loader.batch_size is None:
        batches = loader.batch_sampler
        if batches is None:
            raise ValueError(
                "loopkit.distributed.shard: the DataLoader has batch_size=None (no batching); shard the dataset "
                "instead: shard(loader.dataset, state, batch_size=...)"
            )
        if type(batches) is not BatchSampler:
            raise ValueError(
                f"loopkit.distributed.shard: the DataLoader's batch_sampler, a {type(batches).__qualname__}, makes "
                "batches that shard cannot split across ranks (it shards the indices of a sampler, and batches them "
                "with torch's BatchSampler); give the DataLoader a sampler= and batch_size= instead, shard the "
                "dataset (shard(loader.dataset, state, batch_size=...)), or build each rank's batch sampler over "
                "its own share of the indices"
            )
        sampler = batches.sampler  # torch's BatchSampler given as batch_sampler=: its sampler, batched the same way
        options.update(batch_size=batches.batch_size, drop_last=batches.drop_last)
    if options.get("num_workers", 0) == 0:
        options.pop("prefetch_factor", None)
        options.pop("persistent_workers", None)
    return options, sampler


#: the attribute that marks a ``DistributedSampler`` ``shard`` made (one the user built has none)
_MADE_BY_SHARD = "_loopkit_shard"


def _sampler_to_keep(sampler: Sampler, dataset: Any) -> Sampler | None:
    """The sampler a shard draws from (and splits across ranks), or None when it is a plain one over the whole
    ``dataset`` (sequential, or a permutation of it, or a ``DistributedSampler`` a shard made: a new
    ``DistributedSampler`` over the dataset replaces it). A ``DistributedSampler`` of the user's own is not one
    (:func:`_users_distributed_sampler` keeps it as it is)."""
    if isinstance(sampler, _SamplerShard):
        return sampler.sampler  # a shard sharded again: its loader's sampler
    if isinstance(sampler, DistributedSampler):
        return None
    if type(sampler) is SequentialSampler and sampler.data_source is dataset:
        return None
    if (type(sampler) is RandomSampler and sampler.data_source is dataset and not sampler.replacement
            and sampler.num_samples == len(dataset)):
        return None
    if not isinstance(sampler, Sized):
        raise TypeError(
            f"loopkit.distributed.shard: the DataLoader's sampler, a {type(sampler).__qualname__}, has no len(); "
            "shard splits a sampler's indices across ranks, every rank taking as many, and needs its length"
        )
    return sampler


def _users_distributed_sampler(sampler: Sampler) -> DistributedSampler | None:
    """``sampler`` when it is a ``DistributedSampler`` the user built (not one a shard made), else None."""
    if isinstance(sampler, DistributedSampler) and not getattr(sampler, _MADE_BY_SHARD, False):
        return sampler
    return None


def _users_sampler_problem(sampler: DistributedSampler, pad: bool) -> str | None:
    """Why the user's ``DistributedSampler`` cannot be kept, or None: it splits the data for another process group
    than this one (its ``num_replicas`` and ``rank``), or ``pad=False`` asks for each sample exactly once and it
    pads or drops some (``drop_last``)."""
    if (sampler.num_replicas, sampler.rank) != (world_size(), rank()):
        return (f"on rank {rank()}, the DataLoader's DistributedSampler splits the data for rank {sampler.rank} of "
                f"num_replicas={sampler.num_replicas}, but this process is rank {rank()} of {world_size()}; build it "
                "with num_replicas=loopkit.distributed.world_size() and rank=loopkit.distributed.rank() (its "
                "defaults, after loopkit.distributed.init()), or give shard the dataset or a DataLoader without it")
    n = len(sampler.dataset)  # type: ignore[arg-type]
    if not pad and sampler.total_size != n:
        how = "drops" if sampler.drop_last else "pads with"
        return (f"on rank {rank()}, pad=False gives each sample to exactly one rank, but the DataLoader's own DistributedSampler (kept "
                f"as it is) {how} {abs(sampler.total_size - n)} of the {n} samples over {sampler.num_replicas} ranks; "
                "shard the dataset instead (shard(loader.dataset, state, batch_size=..., pad=False)), or leave pad= "
                "out to keep the sampler")
    return None


def _agreed_seed(seed: int, users: DistributedSampler | None, pad: bool) -> int:
    """Rank 0's ``seed``, after refusing on every rank (one gather, a collective) a user's ``DistributedSampler``
    that some rank cannot keep (:func:`_users_sampler_problem`) or that differs between the ranks (seed, shuffle,
    drop_last; one rank with one, another without): their shards would not split one order."""
    problem = None if users is None else _users_sampler_problem(users, pad)
    described = None if users is None else (users.seed, users.shuffle, users.drop_last)
    seen = _collective.gather((seed, described, problem), who="loopkit.distributed.shard",
                              what="the gather of every rank's seed and DistributedSampler")
    for _, _, other in seen:  # type: ignore[union-attr,misc]
        if other is not None:
            raise ValueError(f"loopkit.distributed.shard: {other}")
    if any(other[1] != seen[0][1] for other in seen):  # type: ignore[index,union-attr]
        raise ValueError(
            "loopkit.distributed.shard: the ranks' DataLoaders' own DistributedSamplers differ (seed, shuffle, "
            f"drop_last; None: no DistributedSampler), rank by rank: {[other[1] for other in seen]}; "  # type: ignore[index,union-attr]
            "every rank must build the same one, or none"
        )
    return int(seen[0][0])  # type: ignore[index]


def shard(
    data: Dataset | DataLoader,
    state: TrainState | int | None = None,
    *,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    pad: bool = True,
    **loader_options: Any,
) -> DataLoader:
    """A ``DataLoader`` over this rank's shard of ``data``, in an order fixed by the state's seed.

    ``data`` is a map-style dataset (then pass ``batch_size``) or a ``DataLoader`` (its
    batch size, collate_fn, workers, ... are kept; ``shuffle`` defaults to whether it
    shuffled). The sampler is a ``DistributedSampler`` seeded with ``state.seed`` (or the
    int given) of rank 0: the shards split one order only when every rank draws it, so ranks
    whose states are seeded apart (``seed=s + rank``, for their own dropout masks) take rank
    0's, which makes ``shard`` a collective that every rank calls at the same point under a
    process group. ``run_epochs`` calls its ``set_epoch(epoch)`` at each epoch, so every epoch
    has its own order and a resumed run sees the same order as an uninterrupted one.

    A ``DataLoader`` with a sampler of its own (anything but torch's ``SequentialSampler``,
    or a ``RandomSampler`` permuting its whole dataset: a ``SubsetRandomSampler`` of a
    train/val split, a ``WeightedRandomSampler``, your own) keeps it, as Lightning's
    ``DistributedSamplerWrapper`` does: each epoch the sampler's indices are drawn once, in
    the main process, from generators seeded with rank 0's seed and the epoch as
    ``run_epochs`` seeds an epoch's order, and split across the ranks as a
    ``DistributedSampler`` splits a dataset (rank ``r`` takes indices ``r``, ``r + world``, ...,
    padded or not as below); so the shards hold only the samples the loader draws (the
    held-out ones never), and ``shuffle=`` does not apply. A loader whose sampler is a
    ``DistributedSampler`` of your own keeps it as it is (as Lightning leaves it): its seed,
    ``shuffle`` and ``drop_last`` decide this rank's samples, not the state's seed nor ``pad=True``
    (``run_epochs`` calls its ``set_epoch`` each epoch, so a resumed run sees the same order);
    ``shuffle=`` does not apply, and it is refused, on every rank, when its ``num_replicas`` and
    ``rank`` are not this process group's, when the ranks' samplers differ (seed, shuffle,
    drop_last), or under ``pad=False`` when it pads or drops samples. A ``batch_sampler=`` is sharded
    when it is torch's ``BatchSampler`` (its sampler as above, its batch size and drop_last
    kept); another is refused, naming it.

    ``pad=True`` (training) gives every rank the same number of samples, repeating a few
    when the data does not divide by the world size, as DDP needs (every rank takes the
    same number of steps). ``pad=False`` (evaluation) gives each sample to exactly one rank,
    so that ``evaluate`` counts each once. In a single process the shard is the whole data:
    a dataset's every sample, or what the loader yields (with a sampler of its own, in the
    loader's order under ``run_epochs`` for the same seed).

    Resuming under another world size works (a checkpoint holds nothing per rank, and every
    rank restores the same one), and each epoch's order over all ranks stays fixed by the
    seed; but the shards change with the world size, so a run resumed *mid-epoch* skips
    ``state.batch_index`` batches of the new shards, which are not the samples the old ranks
    had consumed: for an exact continuation, resume at an epoch boundary or with the same
    world size.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> loader = shard(TensorDataset(torch.arange(10.0)), 0, batch_size=4, shuffle=False)
    >>> [len(b[0]) for b in loader], type(loader.sampler).__name__
    ([4, 4, 2], 'DistributedSampler')
    >>> from torch.utils.data import DataLoader, SubsetRandomSampler
    >>> train = DataLoader(loader.dataset, batch_size=4, sampler=SubsetRandomSampler(range(6)))  # 6..9 held out
    >>> sorted(int(v) for b in shard(train, 0) for v in b[0])
    [0, 1, 2, 3, 4, 5]
    """
    if isinstance(state, TrainState):
        seed = state.seed
    elif state is None:
        seed = 0
    elif as_int(state) is not None:  # (numpy's integers too)
        seed = as_int(state)
    else:
        raise TypeError(f"loopkit.distributed.shard: state must be a TrainState, an int seed or None, got {type(state).__qualname__}")
    kept, generator, users = None, None, None
    if isinstance(data, DataLoader):
        options, own = _loader_options(data)
        users = _users_distributed_sampler(own)
        kept = _sampler_to_keep(own, data.dataset)
        generator = own.loader_generator if isinstance(own, _SamplerShard) else data.generator
        if (kept or users) is not None and shuffle is not None:
            raise TypeError(
                f"loopkit.distributed.shard: shuffle= does not apply to a DataLoader with its own sampler (a "
                f"{type(kept or users).__qualname__}): shard keeps it, and its indices are this shard's order; "
                "leave shuffle= out"
            )
        if shuffle is None:
            shuffle = isinstance(own, RandomSampler) or isinstance(own, DistributedSampler) and own.shuffle
        if batch_size is not None:
            options["batch_size"] = batch_size
        options.update(loader_options)
        dataset = data.dataset
    else:
        if not (isinstance(data, Sized) and hasattr(data, "__getitem__")):
            raise TypeError(
                "loopkit.distributed.shard: data must be a map-style Dataset (with __len__ and __getitem__) or a "
                f"DataLoader over one, got {type(data).__qualname__}"
            )
        if batch_size is None:
            raise TypeError("loopkit.distributed.shard: a dataset needs batch_size= (or pass a DataLoader)")
        options = {"batch_size": batch_size, **loader_options}
        dataset = data
        shuffle = True if shuffle is None else shuffle
    if (as_int(options.get("batch_size")) or 0) < 1:
        raise ValueError(f"loopkit.distributed.shard: batch_size must be a positive int, got {options.get('batch_size')!r}")
    options["batch_size"] = as_int(options["batch_size"])
    for name in ("shuffle", "sampler", "batch_sampler"):
        if name in options:
            raise TypeError(f"loopkit.distributed.shard: {name}= is not an option here; the sampler is the shard")
    seed = _agreed_seed(seed, users, pad)  # rank 0's (see above)
    if users is not None:  # kept as it is, as Lightning keeps it (run_epochs calls its set_epoch)
        return DataLoader(dataset, sampler=users, **options)
    sampler: Sampler
    if kept is not None:
        sampler = _SamplerShard(kept, generator, num_replicas=world_size(), rank=rank(), seed=seed, pad=pad)
    else:
        kind = DistributedSampler if pad else _ShardSampler
        sampler = kind(dataset, num_replicas=world_size(), rank=rank(), shuffle=bool(shuffle), seed=seed)
        setattr(sampler, _MADE_BY_SHARD, True)
    return DataLoader(dataset, sampler=sampler, **options)
