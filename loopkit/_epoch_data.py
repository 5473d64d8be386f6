"""Data given as a factory of the epoch, ``fn(epoch) -> iterable of batches``: Lightning's
``reload_dataloaders_every_n_epochs`` (a curriculum, data that changes from epoch to epoch).

The rule that tells a factory from data: a factory is callable and not iterable (no ``__iter__``,
no ``__getitem__``), and not a class; data (a list, a tensor, a ``DataLoader``) is iterable and
not callable. Something both callable and iterable is data.

>>> is_factory(lambda epoch: [epoch]), is_factory([1, 2]), is_factory(list)
(True, False, False)
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["TRAIN", "VAL", "call_seeded", "check_factory", "factory_name", "global_rngs_kept", "is_factory"]

#: the streams of the factories' global RNG seeds (a train and a val factory of one epoch draw apart)
TRAIN, VAL = 1, 2


def is_factory(source: Any) -> bool:
    """Whether ``source`` is a factory of an epoch's data: callable, not a class, and not iterable."""
    return (
        callable(source) and not isinstance(source, type)
        and not (hasattr(source, "__iter__") or hasattr(source, "__getitem__"))
    )


def factory_name(fn: Callable[..., Any]) -> str:
    """A factory's name for messages: its ``__qualname__``, or its class's."""
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def check_factory(fn: Callable[..., Any], where: str) -> None:
    """Refuse a factory that cannot be called as ``fn(epoch)`` (its signature, where Python can read one),
    and a model passed as data (a ``Module`` is callable and not iterable), naming ``where``."""
    if isinstance(fn, torch.nn.Module):
        raise TypeError(f"{where} is a torch Module ({type(fn).__qualname__}), not data: the order is "
                        "run_epochs(step, state, train_data), and data is an iterable of batches or a function of "
                        "the epoch that returns one")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (a builtin without a signature: called as it is)
        return
    try:
        signature.bind(0)
    except TypeError:
        raise TypeError(
            f"{where} ({factory_name(fn)}{signature}) is a function, taken as a factory of the epoch's data, which is "
            "called as fn(epoch) with the 0-based epoch, and it cannot take that: give it one parameter, e.g. "
            "lambda epoch: DataLoader(curriculum(epoch), batch_size=32)"
        ) from None


@contextlib.contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Put torch's (CPU), numpy's and Python's global RNGs back as they were when the block ends."""
    saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def call_seeded(fn: Callable[[int], Iterable], seed: int, epoch: int, stream: int) -> Any:
    """``fn(epoch)`` with torch's (CPU), numpy's and Python's global RNGs seeded from ``(seed, epoch, stream)``,
    and put back after it: what the factory draws (a random subset, a shuffled curriculum) is the same in a
    run resumed from a checkpoint as in the uninterrupted run, and the caller's global RNGs are untouched."""
    words = np.random.SeedSequence([seed, epoch, stream]).generate_state(3, np.uint32)
    with global_rngs_kept():
        torch.default_generator.manual_seed((int(words[0]) << 32) | int(words[1]))
        np.random.seed(int(words[2]))
        random.seed(int(words[0]) ^ (int(words[2]) << 32))
        return fn(epoch)
