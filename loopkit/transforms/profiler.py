"""``with_profiler``: ``torch.profiler`` over a few calls of a step, traces written to a folder.

>>> import tempfile
>>> from loopkit.steps import train_step
>>> tmp = tempfile.TemporaryDirectory()
>>> with_profiler(train_step(lambda m, b: None), tmp.name).applied
('train_step', 'with_profiler')
>>> tmp.cleanup()
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

from loopkit._collective import is_rank_zero
from loopkit._numbers import as_int
from loopkit._window import EPOCH, guarded, leave_updated
from loopkit.state import TrainState, leave_intact
from loopkit.steps import Metrics, Step, WrapperStep, run_of
from loopkit.transforms._compose import refuse_wrapping, require_step

__all__ = ["ProfilerStep", "with_profiler"]

SUMMARY = "summary.txt"


class _Session:
    """The live ``torch.profiler.profile`` of one profiled step: started by the first call,
    stopped when its schedule is done, at the end of a fit, or when a call fails."""

    def __init__(self) -> None:
        self.profiler: profile | None = None
        self.calls = 0
        self.done = False
        self.at_exit: Any = None

    def begin(self, options: ProfilerStep) -> profile | None:
        if self.done:
            return None
        if self.profiler is None:
            if torch.autograd.profiler._is_profiler_enabled:
                raise RuntimeError(
                    "with_profiler: another torch profiler is running in this process (two that overlap crash "
                    "it); close the other one first (a with_profiler step's close())"
                )
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.profiler = profile(
                activities=activities,
                schedule=schedule(wait=options.wait, warmup=options.warmup, active=options.active, repeat=1),
                on_trace_ready=tensorboard_trace_handler(str(options.directory)),
                record_shapes=options.record_shapes,
                profile_memory=options.profile_memory,
                with_stack=options.with_stack,
            )
            self.profiler.start()
            # a loop of your own that ends before the schedule and never calls close(): a profiler left
            # running crashes the interpreter as it shuts down, so it is stopped (its trace written) at exit
            # (the step itself is held: a donated call works on a copy of it, gone after the call)
            self.at_exit = functools.partial(self.close, options)
            atexit.register(self.at_exit)
        return self.profiler

    def advance(self, options: ProfilerStep) -> None:
        self.profiler.step()  # type: ignore[union-attr]
        self.calls += 1
        if self.calls >= options.wait + options.warmup + options.active:
            self.close(options)

    def close(self, options: ProfilerStep) -> None:
        """Stop profiling (a trace of the calls recorded so far is written) and write the summary."""
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        self.done = True
        atexit.unregister(self.at_exit)
        recorded = self.calls > options.wait + options.warmup
        profiler.stop()
        if recorded and is_rank_zero():
            sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort_by, row_limit=40)
            (options.directory / SUMMARY).write_text(table + "\n", encoding="utf-8")


def _note(error: BaseException, note: str) -> None:
    """Add ``note`` to ``error`` (nothing when its ``__notes__`` is not a list)."""
    with contextlib.suppress(TypeError):
        error.add_note(note)


@attrs.frozen(eq=False, kw_only=True)
class ProfilerStep(WrapperStep):
    """The step :func:`with_profiler` returns; :meth:`close` ends a profile a loop of your own left open.

    >>> import tempfile
    >>> from loopkit.steps import as_step
    >>> tmp = tempfile.TemporaryDirectory()
    >>> ProfilerStep(inner=as_step(lambda s, b: (s, {})), directory=Path(tmp.name)).name
    'with_profiler'
    >>> tmp.cleanup()
    """

    directory: Path
    wait: int = 1
    warmup: int = 1
    active: int = 3
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    session: _Session = attrs.field(factory=_Session, repr=False)

    @property
    def name(self) -> str:
        return "with_profiler"

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        try:
            profiling = self.session.begin(self) is not None
        except BaseException as error:  # refused (another torch profiler runs): before the step, nothing changed
            raise leave_intact(error, state)
        if not profiling:  # the profile is over: the step runs as it is
            return run_of(self.inner)(state, batch)
        try:
            with record_function("loopkit.step"):
                new, metrics = run_of(self.inner)(state, batch)
        except BaseException as error:
            self._close_after(error)
            raise
        try:
            self.session.advance(self)
        except BaseException as error:  # the trace's write (its folder gone, a full disk): the update is done, whole
            _note(error, f"(with_profiler: writing the profile to {str(self.directory)!r} failed after this call's "
                         "update; loopkit.state_at_error(e) is the updated state)")
            self._close_after(error)
            raise leave_updated(error, new, metrics, guarded(EPOCH, self.inner))
        return new, metrics

    def _close_after(self, error: BaseException) -> None:
        """Stop profiling after ``error``; a failure of that (the trace's write) is a note on ``error``, not raised."""
        try:
            self.close()
        except Exception as also:
            _note(error, f"(with_profiler: stopping the profile after this error failed too: {also!r})")

    def on_event(self, event: str, state: TrainState, metrics: Mapping[str, float]) -> None:
        if event in ("stop", "fit_end", "abort", "evaluate_end"):
            self.close()

    def close(self) -> None:
        """Stop profiling now, writing what was recorded (``run_epochs`` calls it at the end of the fit)."""
        self.session.close(self)


def with_profiler(
    step: Any,
    directory: str | os.PathLike,
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    record_shapes: bool = False,
    profile_memory: bool = False,
    with_stack: bool = False,
) -> Step:
    """Profile calls of ``step`` with ``torch.profiler``; traces and a summary go to ``directory``.

    The first ``wait`` calls run unprofiled, the next ``warmup`` calls warm the profiler up,
    the ``active`` calls after them are recorded (each call is a ``ProfilerStep#n`` holding a
    ``loopkit.step`` range); then profiling stops and later calls cost nothing extra. The trace
    (``<host>_<pid>.<n>.pt.trace.json``, one per process) opens in TensorBoard's profiler
    plugin, ``chrome://tracing`` or Perfetto; ``summary.txt`` (rank 0) is the table of operators
    by self time, written when at least one call was recorded (none when the profile stops in
    the wait or the warm-up). ``record_shapes`` (each operator's input shapes, in the trace),
    ``profile_memory`` (allocations: ``[memory]`` events, and memory columns in the summary) and
    ``with_stack`` (the Python calls, in the trace) are ``torch.profiler.profile``'s options of
    those names, True or False, off by default. CUDA activity is recorded too where CUDA is available. A fit that ends before
    the schedule does (``run_epochs`` tells the step) or a call that raises stops the profile
    and writes what it recorded; in a loop of your own, ``step.close()`` does. A trace that
    cannot be written (its folder gone, a full disk) raises from the call that ends the active
    window, after that call's update, and leaves that update's state whole, as ``with_logging``'s
    failed write does (:func:`loopkit.state_at_error`), with that call's metrics in ``run_epochs``'
    epoch means and in the window of a ``with_logging`` outside (its row at that update, if one is
    due, logged first by the fit given the state): a fit given it trains on (the same step, its
    profile over, unprofiled), with the uninterrupted run's epoch means and rows. A write that fails
    after a call's own error is a note on that error, which is the one raised. Another torch
    profiler running when profiling would start (a ``with torch.profiler.profile():`` around the
    fit) is refused before the step runs, leaving the state as it was. Works on an ``eval_step`` as well. The state is never touched:
    a profiled step gives the same results.

    >>> import os, tempfile, torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_profiler(train_step(lambda m, b: m(b).pow(2).mean()), tmp.name, wait=0, warmup=1, active=2)
    >>> for _ in range(4):
    ...     state, _ = step(state, torch.ones(4, 2))
    >>> sorted("trace" if f.endswith(".pt.trace.json") else f for f in os.listdir(tmp.name))
    ['summary.txt', 'trace']
    >>> tmp.cleanup()
    """
    for name, value, minimum in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1)):
        if as_int(value) is None or as_int(value) < minimum:
            raise ValueError(f"with_profiler: {name} must be an int >= {minimum}, got {value!r}")
    wait, warmup, active = as_int(wait), as_int(warmup), as_int(active)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"with_profiler: directory must be a path, got {type(directory).__qualname__}")
    for name, flag in (("record_shapes", record_shapes), ("profile_memory", profile_memory), ("with_stack", with_stack)):
        if not isinstance(flag, bool):
            raise TypeError(f"with_profiler: {name} must be True or False, got {flag!r}")
    inner = require_step(step, "with_profiler")
    refuse_wrapping(inner, "with_profiler", {  # torch.profiler: one session at a time (two that overlap crash)
        "with_profiler": "torch.profiler runs one profile at a time in a process; profile the step once",
    })
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"with_profiler: {str(path)!r} exists and is not a directory")
    _make_directory(path)
    return ProfilerStep(
        inner=inner,
        directory=path,
        wait=wait,
        warmup=warmup,
        active=active,
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )


def _make_directory(path: Path) -> None:
    """Make the traces' folder now, naming with_profiler and what is in the way (a file on the path) if it cannot be.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = open(os.path.join(tmp.name, "file"), "w").close()
    >>> _make_directory(Path(tmp.name, "file", "prof"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    NotADirectoryError: [Errno 20] with_profiler: cannot make the folder '.../file/prof' for its traces: '.../file' is a file
    >>> tmp.cleanup()
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # (a file on the path, a read-only file system)
        in_the_way = next((p for p in path.parents if p.exists()), None)
        why = f"{str(in_the_way)!r} is a file" if in_the_way is not None and not in_the_way.is_dir() else \
            error.strerror or str(error)
        raise type(error)(error.errno, f"with_profiler: cannot make the folder {str(path)!r} for its traces: "
                                       f"{why}") from error
