"""loopkit._calls: a function given to loopkit is refused when Python would refuse the call loopkit makes, and only then.

The reference for each case is the call itself: ``cannot_call(fn, *args)`` is None exactly when ``fn(*args)`` runs
without a TypeError from binding its arguments."""

from __future__ import annotations

import functools

import pytest
import torch

from loopkit._calls import cannot_call, check_call, takes


def _wrapping(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def _injecting(fn):  # (a decorator that gives the wrapped function an argument of its own: its call works)
    @functools.wraps(fn)
    def wrapper(batch):
        return fn(None, batch)
    return wrapper


class _Callable:
    def __call__(self, state, batch, scale=1.0):
        return state


class _Methods:
    def step(self, state, batch):
        return state

    def one(self, state):
        return state


def _two(a, b):
    return a


def _three(a, b, c):
    return a


CASES = [
    ("lambda of two", lambda a, b: a),
    ("lambda of one", lambda a: a),
    ("lambda of three", lambda a, b, c: a),
    ("*args", lambda *args: args),
    ("**kwargs only", lambda **kwargs: kwargs),
    ("a default", lambda a, b=None, c=None: a),
    ("keyword-only without default", lambda a, b, *, c: a),
    ("partial of three", functools.partial(_three, 1)),
    ("partial of two", functools.partial(_two, 1)),
    ("partial by keyword", functools.partial(_two, b=1)),
    ("bound method", _Methods().step),
    ("bound method of one", _Methods().one),
    ("callable instance", _Callable()),
    ("wraps(*args)", _wrapping(_two)),
    ("wraps(*args) of three", _wrapping(_three)),
    ("wraps, injecting", _injecting(_two)),
    ("builtin", max),
    ("C callable", torch.add),
]


def _runs(fn, *args):
    """Whether ``fn(*args)`` gets past binding its arguments (an error of its body counts as a call that ran)."""
    try:
        fn(*args)
    except TypeError as e:
        return "argument" not in str(e) and "positional" not in str(e)
    except Exception:
        return True
    return True


@pytest.mark.parametrize("name, fn", CASES, ids=[name for name, _ in CASES])
@pytest.mark.parametrize("args", [(1, 2)], ids=["two"])
def test_a_call_is_refused_exactly_when_python_refuses_it(name, fn, args):
    if cannot_call(fn, *args) is not None:
        assert not _runs(fn, *args)  # never refuses what works
    if name in _LEFT_TO_THE_CALL:
        assert cannot_call(fn, *args) is None
    else:
        assert (cannot_call(fn, *args) is None) == _runs(fn, *args)


#: taken as they are: no signature to judge by, or a wrapper (functools.wraps) or the wrapped function takes the call
_LEFT_TO_THE_CALL = ("builtin", "C callable", "wraps(*args) of three", "wraps, injecting")


def test_a_wrapper_taking_the_call_is_taken_although_the_wrapped_function_would_not():
    assert takes(_injecting(_two), 1)
    assert not takes(_injecting(_three), 1, 2)  # (both refuse)


def test_what_is_not_callable_is_refused_by_its_type():
    with pytest.raises(TypeError, match=r"^schedule must take \(step\); a int is not callable$"):
        check_call(5, "schedule must take (step)", 0)


def test_the_message_names_the_function_its_signature_and_the_call():
    with pytest.raises(TypeError, match=r"^f must take \(state, batch\); .*<lambda>\(state\) cannot: too many positional "
                                        r"arguments; hint$"):
        check_call(lambda state: state, "f must take (state, batch)", None, None, hint="; hint")


def test_keywords_are_bound_as_given():
    assert takes(lambda step, *, finishes_epoch=False: None, 1, finishes_epoch=True)
    assert not takes(lambda step: None, 1, finishes_epoch=True)
