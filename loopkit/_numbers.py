"""Numeric options as plain Python numbers.

An option may come from numpy (``np.arange`` gives ``np.int64``, a float32 array gives
``np.float32``); it is checked and kept as the Python number it stands for. A bool is no number.

>>> import numpy as np
>>> as_int(np.int64(3)), as_int(3.0), as_int(True)
(3, None, None)
>>> as_real(np.float32(0.5)), as_real(2), as_real("0.5")
(0.5, 2, None)
>>> as_float32(0.2999999999) == as_float32(0.3) == float(np.float32(0.3))
True
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["as_float32", "as_int", "as_norm_type", "as_real"]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int, or None when it is no integer (a float, a bool, a string)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def as_real(value: Any) -> int | float | None:
    """``value`` as a Python int or float, or None when it is no real number (a bool, a complex, a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def as_float32(value: Any) -> float:
    """``value`` (a Python or numpy number, a 0-dim tensor) rounded to float32, as a Python float: the value a metric
    has once Lightning logs it (its ``ModelCheckpoint`` and ``EarlyStopping`` compare those); beyond float32's range,
    ±inf; NaN stays NaN.

    >>> as_float32(0.1) == 0.1, as_float32(1e39), as_float32(torch.tensor(0.5, dtype=torch.float64))
    (False, inf, 0.5)
    """
    return float(torch.tensor(float(value), dtype=torch.float32))


def as_norm_type(value: Any) -> float | None:
    """A norm's order as a positive float, as Lightning's and torch's ``float(norm_type)`` read it (a number, or a
    string: ``"2"``, ``"inf"``); None when it is none (zero, negative, NaN, a bool, another string).

    >>> as_norm_type("inf"), as_norm_type(2), as_norm_type("x"), as_norm_type(0)
    (inf, 2.0, None, None)
    """
    if isinstance(value, str):
        try:
            real: int | float | None = float(value)
        except ValueError:
            return None
    else:
        real = as_real(value)
    return float(real) if real is not None and real > 0 else None  # (NaN > 0 is False)
