"""A tqdm progress bar that only appears on a terminal, and never reads a tensor by itself; and
:func:`write_line`, which prints a message without breaking an open bar.

>>> bar = ProgressBar(enabled=False, total=10, desc="epoch 0")
>>> bar.update({"loss": 0.5}); bar.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import torch

from loopkit import _collective

__all__ = ["ProgressBar", "progress_wanted", "write_line"]

_READ_EVERY = 20  # batches between two readings of the latest metrics (a host sync each)
_COUNT_EVERY_S = 0.05  # seconds between count updates (tqdm redraws at most every 0.1 s)


def progress_wanted(progress: bool, stream: Any = None) -> bool:
    """Whether to show a bar: asked for, tqdm installed, the stream is a terminal, and this process is rank 0
    (as Lightning's bar, which the other ranks disable).

    >>> progress_wanted(False)
    False
    """
    if not progress or not _collective.is_rank_zero():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def write_line(line: str, stream: IO[str]) -> None:
    """Write ``line`` and a newline to ``stream``, through tqdm when it is installed: an open bar is cleared
    first and drawn again below the line, where a plain ``print`` would write over it (what the loggers,
    the callbacks' messages and a fit's signal notice print while a bar may be open). Flushed.

    >>> write_line("epoch 0 done", sys.stdout)
    epoch 0 done
    """
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=stream)
    else:
        tqdm.write(line, file=stream)
    flush = getattr(stream, "flush", None)  # (a stream of one's own may have none)
    if flush is not None:
        flush()


class ProgressBar:
    """One epoch's bar: :meth:`tick` once per batch, :meth:`close` at the end of the epoch.

    The count moves in bunches of about 0.05 s of batches (every batch when a batch takes
    that long), so a fast loop pays for the bar once in many batches and a slow one still sees
    each batch; the latest metrics are read (one host sync) on every 20th batch.
    ``update(postfix)`` takes floats; ``shown`` (the latest validation's means, as Lightning's bar
    keeps ``val_loss``) follows them in every postfix, from the bar's first draw on; :meth:`refresh` catches
    the count up and shows ``shown`` anew (around a validation). A metric named with a ``/`` (a transform's,
    ``amp/skipped``, or one of ``with_grad_norm``'s per parameter) stays out of the bar. ``initial``: the
    batches counted before the bar (a resumed epoch's); ``leave=False``: the bar is cleared when it closes
    (a validation's, under the epoch's).

    >>> bar = ProgressBar(enabled=False, total=None, desc="x")
    >>> bar.enabled, bar.every
    (False, 1)
    """

    def __init__(
        self, *, enabled: bool, total: int | None, desc: str, shown: Mapping[str, float] | None = None,
        initial: int = 0, leave: bool = True,
    ) -> None:
        self.enabled = enabled
        #: values shown after the metrics in every postfix (the latest validation's, which the caller keeps up to date)
        self.shown = {} if shown is None else shown
        self.every = 1  # batches per count update
        self._uncounted = 0
        self._unread = 0
        self._own: dict[str, float] = {}  # the metrics of the latest postfix (shown again by refresh)
        self._last = time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            # (``shown`` from the first draw on, as Lightning's bar shows val_loss at an epoch's start)
            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True,
                             postfix=self._text() or None)

    def tick(self, metrics: Mapping[str, torch.Tensor]) -> None:
        """One more batch, whose ``metrics`` the bar shows when it is a 20th batch."""
        self._uncounted += 1
        if self._uncounted >= self.every:
            self._advance(metrics)

    def _advance(self, metrics: Mapping[str, torch.Tensor]) -> None:
        n, self._uncounted = self._uncounted, 0
        self._unread += n
        postfix = None
        if self._unread >= _READ_EVERY:
            self._unread = 0
            postfix = _collective.read(metrics) if metrics else None
        self.update(postfix, n)
        now = time.perf_counter()
        per_batch, self._last = (now - self._last) / n, now
        timely = int(_COUNT_EVERY_S / per_batch) if per_batch > 0 else _READ_EVERY
        self.every = max(1, min(timely, _READ_EVERY - self._unread))  # the next reading on its 20th batch

    def update(self, postfix: Mapping[str, float] | None = None, n: int = 1) -> None:
        if self._bar is None:
            return
        if postfix:
            self._postfix(postfix)
        self._bar.update(n)

    def _postfix(self, values: Mapping[str, float]) -> None:
        # the step's own metrics (``loss``, ``train/loss``): those of a transform or a part (``amp/skipped``,
        # ``grad_2.0_norm/<parameter>``, ``train/nan_guard/skipped``) stay in the logs, as Lightning's bar shows prog_bar ones
        self._own = {k: v for k, v in values.items() if "/" not in (k[6:] if k.startswith("train/") else k)}
        self._bar.set_postfix_str(self._text(), refresh=False)  # type: ignore[union-attr]

    def _text(self) -> str:
        """The postfix: the latest metrics, then ``shown``."""
        return ", ".join(f"{k}={v:.4g}" for k, v in {**self._own, **self.shown}.items())

    def refresh(self) -> None:
        """Count the batches not counted yet and draw the bar now, with ``shown`` as it is now: before a
        validation (which would otherwise find the count behind, as Lightning's shows 10/10 then), and after
        it (its means at once). No metric is read."""
        if self._bar is None:
            return
        n, self._uncounted = self._uncounted, 0
        self._unread += n  # (below the next reading: every stops the count there)
        self.every = max(1, min(self.every - n, _READ_EVERY - self._unread))
        self._bar.set_postfix_str(self._text(), refresh=False)
        if n:
            self._bar.update(n)
        self._bar.refresh()
        self._last = time.perf_counter()  # (a validation's time is no batch's)

    def close(self, postfix: Mapping[str, float] | None = None) -> None:
        """Count the batches not counted yet, show ``postfix`` (the epoch means) and close (once: again does nothing)."""
        if self._bar is None:
            return
        if postfix:
            self._postfix(postfix)
        if self._uncounted:
            self._bar.update(self._uncounted)
            self._uncounted = 0
        if self._bar.total is not None and self._bar.n > self._bar.total:  # a total that was an estimate (max_steps')
            self._bar.total = self._bar.n
        self._bar.close()
        self._bar = None
