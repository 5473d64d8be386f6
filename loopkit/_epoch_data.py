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
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from loopkit._calls import cannot_call
from loopkit._calls import fn_name as factory_name
from loopkit.rng import global_rngs_kept

__all__ = [
    "TRAIN", "call_seeded", "check_factory", "factory_name", "is_factory", "not_data", "val_stream",
]

#: the train factory's stream of global RNG seeds (a validation set's: :func:`val_stream`)
TRAIN: tuple[int, ...] = (1,)
_VAL = 2


def val_stream(name: str | None) -> tuple[int, ...]:
    """The stream of global RNG seeds of the validation set ``name`` (None: the one unnamed set): apart from the
    train factory's and from every other set's, and derived from the name alone (the same in a resumed run, and
    whatever other sets the fit has). Its words: the set's name in UTF-8, after its length (a name is never the
    unnamed set's nor a prefix of another).

    >>> val_stream(None), val_stream("ab"), val_stream("dataloader_idx_0") != val_stream("dataloader_idx_1")
    ((2,), (2, 2, 97, 98), True)
    """
    if name is None:
        return (_VAL,)
    encoded = name.encode()
    return (_VAL, len(encoded), *encoded)


def not_data(source: Any, where: str, *, factories: bool) -> None:
    """Refuse a class (a ``Dataset`` class where its instance was meant: it has ``__getitem__``, and would pass
    as data) and a torch ``Module`` (a model where the data goes; an ``nn.Sequential`` is even iterable) given as
    data, naming ``where``; ``factories``: a function of the epoch is data there too, which the message offers.

    >>> try:
    ...     not_data(torch.utils.data.TensorDataset, "run_epochs: train_data", factories=True)
    ... except TypeError as error:
    ...     for part in str(error).split(": "):
    ...         print(part)
    run_epochs
    train_data is the class TensorDataset, not data
    pass an instance, a DataLoader, or a function of the epoch that returns one
    """
    if isinstance(source, type):
        fix = "an instance, a DataLoader, or a function of the epoch that returns one" if factories else (
            "an instance or a DataLoader")
        raise TypeError(f"{where} is the class {source.__qualname__}, not data: pass {fix}")
    if isinstance(source, torch.nn.Module):
        data = "an iterable of batches (a list, a DataLoader)" + (
            " or a function of the epoch that returns one" if factories else "")
        raise TypeError(f"{where} is a torch Module ({type(source).__qualname__}), not data: the order is "
                        f"(step, state, data), as in run_epochs(step, state, train_data), and data is {data}")


def is_factory(source: Any) -> bool:
    """Whether ``source`` is a factory of an epoch's data: callable, not a class, and not iterable."""
    return (
        callable(source) and not isinstance(source, type)
        and not (hasattr(source, "__iter__") or hasattr(source, "__getitem__"))
    )


def check_factory(fn: Callable[..., Any], where: str) -> None:
    """Refuse a factory that cannot be called as ``fn(epoch)`` (its signature, where Python can read one),
    and a model passed as data (a ``Module`` is callable and not iterable), naming ``where``."""
    not_data(fn, where, factories=True)
    why = cannot_call(fn, 0)
    if why is not None:
        raise TypeError(
            f"{where} ({why}) is a function, taken as a factory of the epoch's data, which is called as fn(epoch) "
            "with the 0-based epoch, and it cannot take that: give it one parameter, e.g. "
            "lambda epoch: DataLoader(curriculum(epoch), batch_size=32)"
        )


def call_seeded(fn: Callable[[int], Iterable], seed: int, epoch: int, stream: tuple[int, ...], where: str) -> Any:
    """``fn(epoch)`` with torch's (CPU), numpy's and Python's global RNGs seeded from ``(seed, epoch, *stream)``,
    and put back after it: what the factory draws (a random subset, a shuffled curriculum) is the same in a
    run resumed from a checkpoint as in the uninterrupted run, and the caller's global RNGs are untouched.
    An exception out of the factory is raised as it is (its type, its traceback), with a note naming ``where``
    (``train_data``, ``val's data['hard']``), the factory and the epoch.

    >>> def make(epoch):
    ...     raise KeyError(epoch)
    >>> try:
    ...     call_seeded(make, 0, 3, TRAIN, "train_data")
    ... except KeyError as error:
    ...     error.__notes__
    ['(raised by train_data, a factory (make), called for epoch 3)']
    """
    words = np.random.SeedSequence([seed, epoch, *stream]).generate_state(3, np.uint32)
    with global_rngs_kept():
        torch.default_generator.manual_seed((int(words[0]) << 32) | int(words[1]))
        np.random.seed(int(words[2]))
        random.seed(int(words[0]) ^ (int(words[2]) << 32))
        try:
            return fn(epoch)
        except Exception as error:
            with contextlib.suppress(TypeError):  # (__notes__ set to something not a list: the error as it is)
                error.add_note(f"(raised by {where}, a factory ({factory_name(fn)}), called for epoch {epoch})")
            raise
