"""Whether a function given to loopkit can be called as loopkit will call it, judged by its signature.

One check for every function loopkit takes (a step, a loss_fn, a callback's hook, a logger's method, a schedule):
a wrong one is refused where it is given, naming it and the call it must take, before any state is used. It never
refuses what would work: a callable whose signature Python cannot read (some builtins and C callables) is taken as
it is, and ``functools.partial``, bound methods, callable instances, ``*args``/``**kwargs`` and defaults are read
as Python binds a call.
"""

from __future__ import annotations

import inspect
from typing import Any


def fn_name(fn: Any) -> str:
    """A callable's name for messages: its ``__qualname__``, or its class's.

    >>> fn_name(len), fn_name(lambda x: x)
    ('len', '<lambda>')
    """
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def cannot_call(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """Why ``fn(*args, **kwargs)`` cannot be called (``fn`` is not callable, or its signature cannot bind the
    arguments), or None: it can, or its signature cannot be read. A wrapper (``functools.wraps``) is refused only
    when both its own signature and the wrapped function's refuse the call.

    >>> cannot_call(lambda state: state, 1, 2)
    '<lambda>(state) cannot: too many positional arguments'
    >>> cannot_call(lambda *args, scale=1.0: None, 1, 2) is None, cannot_call(print, 1, 2) is None
    (True, True)
    >>> cannot_call(5)
    'a int is not callable'
    """
    if not callable(fn):
        return f"a {type(fn).__qualname__} is not callable"
    why = None
    for follow_wrapped in (True, False):
        try:
            signature = inspect.signature(fn, follow_wrapped=follow_wrapped)
        except (TypeError, ValueError):  # (no signature to judge by: its call will tell)
            return None
        try:
            signature.bind(*args, **kwargs)
        except TypeError as e:
            why = why or f"{fn_name(fn)}{signature} cannot: {e}"
        else:
            return None
        if not hasattr(fn, "__wrapped__"):
            break
    return why


def takes(fn: Any, *args: Any, **kwargs: Any) -> bool:
    """Whether ``fn(*args, **kwargs)`` can be called, by :func:`cannot_call` (True when the signature cannot be read).

    >>> takes(lambda state, batch=None: None, 1), takes(lambda: None, 1)
    (True, False)
    """
    return cannot_call(fn, *args, **kwargs) is None


def check_call(fn: Any, must: str, *args: Any, hint: str = "", **kwargs: Any) -> None:
    """Raise ``TypeError`` if ``fn(*args, **kwargs)`` cannot be called (:func:`cannot_call`): ``must`` says what
    ``fn`` is and the call it must take, ``hint`` (from "; ") what to do.

    >>> check_call(lambda: 1.0, "with_pruning: schedule must take (step)", 0)
    Traceback (most recent call last):
    ...
    TypeError: with_pruning: schedule must take (step); <lambda>() cannot: too many positional arguments
    """
    why = cannot_call(fn, *args, **kwargs)
    if why is not None:
        raise TypeError(f"{must}; {why}{hint}")
