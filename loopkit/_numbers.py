"""Numeric options as plain Python numbers.

An option may come from numpy (``np.arange`` gives ``np.int64``, a float32 array gives
``np.float32``); it is checked and kept as the Python number it stands for. A bool is no number.

>>> import numpy as np
>>> as_int(np.int64(3)), as_int(3.0), as_int(True)
(3, None, None)
>>> as_real(np.float32(0.5)), as_real(2), as_real("0.5")
(0.5, 2, None)
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["as_int", "as_real"]


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
