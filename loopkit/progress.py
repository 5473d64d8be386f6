"""A tqdm progress bar that only appears on a terminal, and never reads a tensor by itself.

>>> bar = ProgressBar(enabled=False, total=10, desc="epoch 0")
>>> bar.update({"loss": 0.5}); bar.close()
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["ProgressBar", "progress_wanted"]


def progress_wanted(progress: bool, stream: Any = None) -> bool:
    """Whether to show a bar: asked for, tqdm installed, and the stream is a terminal.

    >>> progress_wanted(False)
    False
    """
    if not progress:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """One epoch's bar. ``update(postfix)`` advances it; pass floats only (read at log points).

    >>> ProgressBar(enabled=False, total=None, desc="x").enabled
    False
    """

    def __init__(self, *, enabled: bool, total: int | None, desc: str) -> None:
        self.enabled = enabled
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)

    def update(self, postfix: Mapping[str, float] | None = None, n: int = 1) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self, postfix: Mapping[str, float] | None = None) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.close()
