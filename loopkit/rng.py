"""The random-number state a step draws from, kept in the train state rather than in globals.

A step installs the state's generator states as torch's default generators for the length
of the call (dropout and any ``torch.rand`` inside draw from them), reads the advanced
states back into the new train state, and puts the caller's global states back. So two runs
with the same seed draw the same dropout masks whatever else touched the global RNG.

A state made with ``TrainState.create(..., global_rng=True)`` holds no RNG (``state.rng`` is
empty): its steps draw from torch's global RNG, as a plain PyTorch loop does, and skip the
install and read-back.

>>> import torch
>>> rng = create_rng(0)
>>> scope = RNGScope(rng, None)
>>> a = torch.rand(1); rng_after = scope.close()
>>> scope = RNGScope(rng, None)
>>> bool(torch.equal(a, torch.rand(1)))
True
>>> _ = scope.close()
"""

from __future__ import annotations

import contextlib
import numbers
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

__all__ = [
    "RNGScope", "RankWorkerSeeds", "batch_rngs", "create_rng", "cuda_index", "epoch_order_seed", "global_rng_state",
    "global_rngs_kept", "seed_epoch_start", "seed_everything",
]

RNG = Mapping[str, torch.Tensor]


def create_rng(seed: int) -> dict[str, torch.Tensor]:
    """A fresh RNG state for a train state: the CPU generator seeded with ``seed``.

    Accelerator generators are added on first use, seeded from the same ``seed``.

    >>> sorted(create_rng(0))
    ['cpu']
    """
    return {"cpu": torch.Generator().manual_seed(seed).get_state()}


def global_rng_state(cuda_index: int | None) -> dict[str, torch.Tensor]:
    """A copy of torch's global RNG state, in a train state's form (the CPU's, and CUDA device ``cuda_index``'s).

    An evaluation of a state that draws from the global RNG installs this copy and puts it back,
    so it draws what a step would draw next and leaves the global RNG where it was.

    >>> import torch
    >>> state = global_rng_state(None)
    >>> sorted(state), bool(torch.equal(state["cpu"], torch.get_rng_state()))
    (['cpu'], True)
    """
    rng = {"cpu": torch.default_generator.get_state()}
    if cuda_index is not None:
        rng[f"cuda:{cuda_index}"] = torch.cuda.get_rng_state(cuda_index)
    return rng


def cuda_index(device: torch.device) -> int | None:
    """The index of the CUDA device ``device`` (the current one where it names none), whose generator a step on it
    draws from; None for another kind of device.

    >>> cuda_index(torch.device("cpu")) is None
    True
    """
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def batch_rngs(start: RNG, cuda_index: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless RNG states, one for each batch of an evaluation after its first, drawn from ``start``: the CPU
    generator (and CUDA device ``cuda_index``'s) seeded with the next number of a generator started at
    ``start["cpu"]``. So each batch of a stochastic evaluation (MC dropout, a diffusion model's random timesteps)
    draws fresh numbers, as a raw loop's batches do, and the same ones for the same ``start``; nothing global moves.

    >>> import torch
    >>> rngs = batch_rngs(create_rng(0), None)
    >>> a, b = next(rngs), next(rngs)
    >>> torch.equal(a["cpu"], b["cpu"]), torch.equal(a["cpu"], next(batch_rngs(create_rng(0), None))["cpu"])
    (False, True)
    """
    seeds = torch.Generator()
    seeds.set_state(start["cpu"])
    while True:
        seed = int(torch.randint(2**62, (), generator=seeds))
        rng = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if cuda_index is not None:
            rng[f"cuda:{cuda_index}"] = torch.Generator(device=f"cuda:{cuda_index}").manual_seed(seed).get_state()
        yield rng


def _cuda_state(rng: RNG, index: int, seed: int) -> torch.Tensor:
    key = f"cuda:{index}"
    if key in rng:
        return rng[key]
    gen = torch.Generator(device=f"cuda:{index}")
    gen.manual_seed(seed)
    return gen.get_state()


class RNGScope:
    """Installs a train state's RNG as torch's global RNG until :meth:`close`.

    ``cuda_index`` names the CUDA device whose generator the step uses (None on CPU).
    ``close()`` returns the advanced RNG state and restores the caller's global state. An empty
    ``rng`` (a state that draws from the global RNG) installs nothing: the step draws from the
    global RNG and ``close()`` returns the empty mapping.

    >>> import torch
    >>> scope = RNGScope(create_rng(1), None)
    >>> new_rng = scope.close()
    >>> torch.equal(new_rng["cpu"], create_rng(1)["cpu"])
    True
    """

    __slots__ = ("_rng", "_saved_cpu", "_cuda_index", "_saved_cuda")

    def __init__(self, rng: RNG, cuda_index: int | None, seed: int = 0) -> None:
        self._rng = rng
        self._cuda_index = cuda_index
        self._saved_cuda = None
        if not rng:  # the global RNG is the step's own
            self._saved_cpu = None
            return
        cpu = torch.default_generator
        self._saved_cpu = cpu.get_state()
        cpu.set_state(rng["cpu"])
        if cuda_index is not None:
            self._saved_cuda = torch.cuda.get_rng_state(cuda_index)
            torch.cuda.set_rng_state(_cuda_state(rng, cuda_index, seed), cuda_index)

    def close(self) -> dict[str, torch.Tensor]:
        """Restore the global RNG and return the advanced state."""
        if self._saved_cpu is None:
            return self._rng  # type: ignore[return-value]
        cpu = torch.default_generator
        if self._cuda_index is None and len(self._rng) == 1:
            new = {"cpu": cpu.get_state()}
            cpu.set_state(self._saved_cpu)
            return new
        new = dict(self._rng)
        new["cpu"] = cpu.get_state()
        cpu.set_state(self._saved_cpu)
        if self._cuda_index is not None:
            new[f"cuda:{self._cuda_index}"] = torch.cuda.get_rng_state(self._cuda_index)
            torch.cuda.set_rng_state(self._saved_cuda, self._cuda_index)
        return new

    def discard(self) -> None:
        """Restore the global RNG without keeping the advanced state (used by pure evaluation)."""
        if self._saved_cpu is None:
            return
        torch.default_generator.set_state(self._saved_cpu)
        if self._cuda_index is not None:
            torch.cuda.set_rng_state(self._saved_cuda, self._cuda_index)


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's data order: what ``run_epochs`` seeds a loader's generators (and torch's global
    one) with at the epoch's start, and what ``distributed.shard`` draws a kept sampler's indices with.

    >>> epoch_order_seed(0, 1) == epoch_order_seed(0, 1) != epoch_order_seed(0, 2)
    True
    """
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


#: the stream of :func:`seed_epoch_start`'s seeds (the factories' are 1 and 2: :mod:`loopkit._epoch_data`)
_EPOCH_START = 3


def seed_epoch_start(seed: int, epoch: int) -> None:
    """Seed numpy's and Python's global RNGs from ``(seed, epoch)``: what ``run_epochs`` seeds them with while an
    epoch's iterator starts (a sampler of one's own may shuffle with them; torch's is :func:`epoch_order_seed`),
    and ``distributed.shard`` while it draws a kept sampler's indices (from rank 0's seed: every rank the same).
    The caller puts them back (:func:`global_rngs_kept`).

    >>> import numpy as np
    >>> with global_rngs_kept():
    ...     seed_epoch_start(0, 1); a = np.random.rand()
    ...     seed_epoch_start(0, 1); b = np.random.rand()
    >>> a == b
    True
    """
    words = np.random.SeedSequence([seed, epoch, _EPOCH_START]).generate_state(3, np.uint32)
    np.random.seed(int(words[0]))
    random.seed((int(words[1]) << 32) | int(words[2]))


class RankWorkerSeeds:
    """A DataLoader's ``worker_init_fn`` that reseeds the worker's torch, numpy and Python RNGs from its torch seed
    (the loader's base seed plus the worker id, as torch seeds each worker), the worker id and ``rank``, then calls
    ``then`` (the loader's own ``worker_init_fn``; None: none): what Lightning's ``seed_everything(workers=True)``
    adds to a loader (``pl_worker_init_function``). ``run_epochs`` gives it to the workers it starts under a process
    group of several ranks, whose base seeds, drawn from the epoch's order seed, are the same on every rank: worker
    ``w`` of each rank then draws a stream of its own, the same from run to run. Picklable (for spawned workers)
    where ``then`` is.

    >>> def draw(rank):
    ...     with global_rngs_kept():
    ...         _ = torch.manual_seed(10 + 1)  # what torch seeds worker 1 with from a base seed of 10
    ...         RankWorkerSeeds(rank, None)(1)
    ...         return torch.rand(1).item(), np.random.rand(), random.random()
    >>> draw(0) == draw(0) and all(a != b for a, b in zip(draw(0), draw(1)))
    True
    """

    def __init__(self, rank: int, then: Callable[[int], object] | None) -> None:
        self.rank, self.then = rank, then

    def __call__(self, worker_id: int) -> None:
        base_seed = torch.initial_seed() - worker_id
        words = [int(w) for w in np.random.SeedSequence([base_seed, worker_id, self.rank]).generate_state(8, np.uint32)]
        torch.manual_seed((words[0] << 32) | words[1])
        random.seed((words[2] << 32) | words[3])
        np.random.seed(words[4:])
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Put torch's (CPU), numpy's and Python's global RNGs back as they were when the block ends.

    >>> before = torch.rand(1); _ = torch.manual_seed(3); a = torch.rand(1)
    >>> _ = torch.manual_seed(3)
    >>> with global_rngs_kept():
    ...     _ = torch.rand(5)
    >>> bool(torch.equal(torch.rand(1), a))
    True
    """
    saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


GLOBAL_SEED_VARIABLE = "LOOPKIT_GLOBAL_SEED"


def _seed_from_environment() -> int:
    """The seed ``LOOPKIT_GLOBAL_SEED`` holds, or 0 with a warning when it is unset."""
    text = os.environ.get(GLOBAL_SEED_VARIABLE)
    if text is None:
        warnings.warn(f"seed_everything: no seed given and {GLOBAL_SEED_VARIABLE} is unset: seed set to 0", stacklevel=3)
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"seed_everything: {GLOBAL_SEED_VARIABLE} must hold an int in [0, 2**32), got {text!r}") from None


def seed_everything(seed: int | None = None, workers: bool = False) -> int:
    """Seed Python's ``random``, NumPy, and torch (CPU and every CUDA device); return ``seed``.

    With no ``seed`` (Lightning's ``seed_everything()``), the seed is read from the
    ``LOOPKIT_GLOBAL_SEED`` environment variable, which every call sets, so processes started
    afterwards (``torch.multiprocessing.spawn``) that call ``seed_everything()`` take the parent's
    seed; with the variable unset it is 0, with a warning, as in Lightning.

    ``workers`` is Lightning's flag, taken for its signature and changing nothing here: a DataLoader's
    workers get RNG streams of their own and distinct (torch seeds each worker's ``random``, NumPy and torch
    from the loader's base seed, which ``run_epochs`` draws from the state's seed and the epoch; under a process
    group of several ranks :class:`RankWorkerSeeds` mixes the rank in), the same from run to run, which is what
    Lightning's ``workers=True`` adds to its Trainer.

    Also sets ``PYTHONHASHSEED``, which processes started afterwards read: spawned ones
    (``multiprocessing_context="spawn"`` data-loader workers, ``torch.multiprocessing.spawn``).
    It cannot change this process's string hashing, nor that of workers forked from it (Linux's
    default), which keep this process's: for ``hash(str)`` the same in every run, start Python
    with ``PYTHONHASHSEED`` set. A numpy integer is taken as the int it is.

    >>> import torch
    >>> _ = seed_everything(7); a = torch.rand(1)
    >>> _ = seed_everything(7); bool(torch.equal(a, torch.rand(1)))
    True
    """
    if not isinstance(workers, bool):
        raise TypeError(f"seed_everything: workers must be True or False, got {workers!r}")
    seed = _seed_from_environment() if seed is None else seed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed_everything: seed must be an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    os.environ[GLOBAL_SEED_VARIABLE] = str(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed
