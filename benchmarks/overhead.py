#!/usr/bin/env python
"""Per-step overhead of loopkit against a raw PyTorch loop, Lightning (Trainer, Fabric) and Ignite.

Two workloads (``_workloads.WORKLOADS``): a tiny MLP 32-64-64-10 (batch 32) and a small MLP
784-256-256-10 (batch 64), Adam, cross-entropy, synthetic batches held in memory, one torch
thread. Every contender trains its own copy of the same initial model on the same list of
batches. Two rows add ``with_logging`` (TensorBoard, every 50 steps) to ``run_epochs``, one
with the progress bar drawn on a pseudo-terminal (issue 4: target ≤ 1.05× the raw loop).
Timing is interleaved: after ``--warmup`` untimed passes per contender, each of ``--rounds``
rounds times one pass of ``--steps`` steps of every contender, in a freshly shuffled order;
the reported time is the median over rounds of (pass time / steps), and a ratio is the
median over rounds of the per-round ratio (the pairing cancels slow drifts in the machine's
load). Peak memory is the growth of the peak RSS over the baseline in a fresh
child process per contender and workload. Last, each main row is paired step by step with
the raw loop (``StepPairs``; per place of a cycle of 800 pairs, the median over the cycles of the
per-pair difference, averaged over the cycle: stable where whole passes are not, and work done every
20, 32 or 50 steps counts). See benchmarks/README.md for the method in full.

Usage::

    python benchmarks/overhead.py            # defaults: 12 rounds x 100 steps, 4500 step pairs per row
    python benchmarks/overhead.py --quick    # smoke run (4 min on a loaded 2-core machine), meaningless numbers
    python benchmarks/overhead.py --rounds 30 --steps 200 --breakdown
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _workloads import (  # noqa: E402
    WORKLOADS,
    Batch,
    Batches,
    Workload,
    loss_fn,
    machine_info,
    peak_rss_kb,
    pin_mmap_threshold,
    quiet_frameworks,
    release_free_memory,
    reset_peak_rss,
    rss_kb,
    setup_process,
)

perf_counter = time.perf_counter


class Runner(Protocol):
    """A contender set up on one model: ``run`` trains one pass over ``batches``.

    Returns ``(window_s, call_s)``: the seconds of the per-step work (for a driver, from its
    own epoch-start hook to its epoch-end hook) and of the whole call (driver set-up included).
    """

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]: ...


# --- hand-written PyTorch loops ------------------------------------------------------------------


class RawLoop:
    """The reference: zero_grad, forward, loss, backward, step."""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        self.model, self.opt = model, workload.optimizer(model)

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        model, opt, ce = self.model, self.opt, F.cross_entropy
        t0 = perf_counter()
        for x, y in batches:
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            opt.step()
        t = perf_counter() - t0
        return t, t


class RawClipLoop(RawLoop):
    """The raw loop with ``clip_grad_norm_(max_norm=1)`` before the update."""

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        model, opt, ce, clip = self.model, self.opt, F.cross_entropy, nn.utils.clip_grad_norm_
        params = list(model.parameters())
        t0 = perf_counter()
        for x, y in batches:
            opt.zero_grad()
            loss = ce(model(x), y)
            loss.backward()
            clip(params, 1.0)
            opt.step()
        t = perf_counter() - t0
        return t, t


class RawAccumLoop(RawLoop):
    """The raw loop accumulating 4 micro-batches per update (loss / 4); timed per call."""

    every = 4

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        super().__init__(workload, model)
        self.count = 0

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        model, opt, ce, every, count = self.model, self.opt, F.cross_entropy, self.every, self.count
        t0 = perf_counter()
        for x, y in batches:
            loss = ce(model(x), y) / every
            loss.backward()
            count += 1
            if count == every:
                opt.step()
                opt.zero_grad()
                count = 0
        t = perf_counter() - t0
        self.count = count
        return t, t


class RawAmpLoop(RawLoop):
    """The raw loop with the forward and loss under ``torch.autocast("cpu", bfloat16)``."""

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        model, opt, ce, autocast = self.model, self.opt, F.cross_entropy, torch.autocast
        t0 = perf_counter()
        for x, y in batches:
            opt.zero_grad()
            with autocast("cpu", dtype=torch.bfloat16):
                loss = ce(model(x), y)
            loss.backward()
            opt.step()
        t = perf_counter() - t0
        return t, t


# --- loopkit -------------------------------------------------------------------------------------


class StepLoop:
    """A loopkit step called in a plain Python loop: ``state, metrics = step(state, batch)``."""

    def __init__(self, workload: Workload, model: nn.Module, step: Callable[..., Any], global_rng: bool = False) -> None:
        import loopkit

        self.state = loopkit.TrainState.create(model, workload.optimizer(model), global_rng=global_rng)
        self.step = step

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        step, state = self.step, self.state
        t0 = perf_counter()
        for batch in batches:
            state, _ = step(state, batch)
        t = perf_counter() - t0
        self.state = state
        return t, t


def _loopkit_step(
    *transforms: Callable[[Any], Any], donated: bool = True, global_rng: bool = False
) -> Callable[[Workload, nn.Module], StepLoop]:
    def build(workload: Workload, model: nn.Module) -> StepLoop:
        import loopkit

        step: Any = loopkit.train_step(loss_fn)
        for transform in transforms:
            step = transform(step)
        return StepLoop(workload, model, loopkit.donate(step) if donated else step, global_rng)

    return build


class _EpochClock:
    """``run_epochs`` callback timing the epoch (only epoch hooks: the per-batch path is untouched)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_epoch_start(self, state: Any) -> None:
        self.start = perf_counter()

    def on_epoch_end(self, state: Any, record: Any) -> None:
        self.end = perf_counter()


class RunEpochs:
    """``loopkit.run_epochs`` for one epoch over the pass's batches (it donates internally)."""

    global_rng = False  # the state's own RNG (the default), or torch's global one

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        import loopkit

        self.run_epochs = loopkit.run_epochs
        self.state = loopkit.TrainState.create(model, workload.optimizer(model), global_rng=self.global_rng)
        self.step = loopkit.train_step(loss_fn)
        self.clock = _EpochClock()

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        t0 = perf_counter()
        self.state, _ = self.run_epochs(
            self.step, self.state, batches, epochs=self.state.epoch + 1,
            progress=False, sanity_val_batches=0, callbacks=[self.clock],
        )
        call = perf_counter() - t0
        return self.clock.end - self.clock.start, call


class RunEpochsGlobalRNG(RunEpochs):
    """:class:`RunEpochs` with a state that draws from the global RNG (``global_rng=True``)."""

    global_rng = True


class _TerminalText(io.TextIOWrapper):
    """The text stream on a pseudo-terminal's slave side (``isatty()`` is True); counts writes."""

    written = 0  # characters
    redraws = 0  # carriage returns: tqdm starts each redraw of its line with one

    def write(self, text: str) -> int:
        self.written += len(text)
        self.redraws += text.count("\r")
        return super().write(text)


class PseudoTerminal:
    """A pseudo-terminal standing in for the user's terminal, so that a progress bar really draws.

    ``stream`` writes to the slave side: a text file whose ``isatty()`` is True, sized
    ``columns`` x ``rows`` (tqdm reads the width from it). Another process (``cat``) drains
    the master side into ``capture``, as a terminal emulator would: writes never block, and
    no thread of this process competes with the timed loop for the GIL. :meth:`close`
    closes the slave side, which ends ``cat``, and waits for it.
    """

    def __init__(self, capture: str, columns: int = 120, rows: int = 40) -> None:
        import fcntl
        import struct
        import termios

        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
            self.capture = capture
            with open(capture, "wb") as sink:
                # cat ends with EIO on its read once the slave side is closed: its complaint is expected
                self._drain = subprocess.Popen(["cat"], stdin=master, stdout=sink, stderr=subprocess.DEVNULL)
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)  # cat holds its own copy
        self.stream = _TerminalText(io.FileIO(slave, "w", closefd=True), encoding="utf-8", line_buffering=True)

    def close(self) -> None:
        """Close the terminal and wait for everything written to reach ``capture``."""
        if self.stream.closed:
            return
        self.stream.close()
        try:
            self._drain.wait(timeout=30)
        except Exception:
            self._drain.kill()
            self._drain.wait()

    def received(self) -> bytes:
        """What the terminal received (complete after :meth:`close`)."""
        with open(self.capture, "rb") as f:
            return f.read()

    def last_frame(self) -> str:
        """The last line drawn: the text after the last carriage return or newline."""
        text = self.received()[-1024:].decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
        return text.replace("\n", "\r").rsplit("\r", 1)[-1].strip()


class LoggedRunEpochs:
    """``run_epochs`` of ``with_logging(train_step, TensorBoardLogger(tmp, "bench"), every_n_steps=50)``.

    With ``bar``, ``progress=True`` and, for the length of the call, ``sys.stderr`` is a
    :class:`PseudoTerminal` so that ``run_epochs`` shows its tqdm bar and tqdm really formats
    and writes it. The logger's folder is a fresh temporary directory, removed by :meth:`close`
    (or, failing that, when the runner is collected or the process exits normally). The
    TensorBoard event file, which the logger opens on its first write and closes at the end of the
    fit, is opened before each call (a once-per-fit cost: in the call, outside the timed epoch).
    """

    every_n_steps = 50

    def __init__(self, workload: Workload, model: nn.Module, *, bar: bool) -> None:
        import loopkit

        self.run_epochs = loopkit.run_epochs
        self.state = loopkit.TrainState.create(model, workload.optimizer(model))
        self.dir = tempfile.mkdtemp(prefix="loopkit-bench-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)
        self.logger = loopkit.TensorBoardLogger(root=self.dir, name="bench")
        self.step = loopkit.with_logging(loopkit.train_step(loss_fn), self.logger, every_n_steps=self.every_n_steps)
        self.terminal = PseudoTerminal(os.path.join(self.dir, "terminal.out")) if bar else None
        self.clock = _EpochClock()
        self.passes = 0

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        saved = sys.stderr
        t0 = perf_counter()
        self.logger.open()  # open the event file now: in a long fit it is open from the first log on
        try:
            if self.terminal is not None:
                sys.stderr = self.terminal.stream
            self.state, _ = self.run_epochs(
                self.step, self.state, batches, epochs=self.state.epoch + 1,
                progress=self.terminal is not None, sanity_val_batches=0, callbacks=[self.clock],
            )
        finally:
            sys.stderr = saved
        call = perf_counter() - t0
        self.passes += 1
        return self.clock.end - self.clock.start, call

    def extra(self) -> dict[str, Any]:
        """What was really written: event files and, with the bar, the terminal's output.

        Called once the timed passes are over: it closes the terminal (to read all it received).
        """
        events = [f for f in os.listdir(self.logger.log_dir) if f.startswith("events.out.tfevents")]
        out: dict[str, Any] = {
            "passes": self.passes,
            "log_dir": self.logger.log_dir,
            "event_files": len(events),
            "event_bytes": sum(os.path.getsize(os.path.join(self.logger.log_dir, f)) for f in events),
        }
        if self.terminal is not None:
            self.terminal.close()
            out["terminal_chars_written"] = self.terminal.stream.written
            out["terminal_redraws"] = self.terminal.stream.redraws
            out["terminal_bytes_received"] = len(self.terminal.received())
            out["terminal_last_frame"] = self.terminal.last_frame()
        return out

    def close(self) -> None:
        try:
            if self.terminal is not None:
                self.terminal.close()
            self.logger.finalize()
        finally:
            self._cleanup()


def _logged_run_epochs(*, bar: bool) -> Callable[[Workload, nn.Module], LoggedRunEpochs]:
    def build(workload: Workload, model: nn.Module) -> LoggedRunEpochs:
        return LoggedRunEpochs(workload, model, bar=bar)

    return build


def _close(runner: Any) -> None:
    """Release what a runner holds (temporary folders, terminals); most hold nothing."""
    close = getattr(runner, "close", None)
    if close is not None:
        close()


# --- Lightning and Ignite ------------------------------------------------------------------------

_LIT_MODULE: list[type] = []


def _lit_module_class() -> type:
    if not _LIT_MODULE:
        import lightning.pytorch as pl

        class LitMLP(pl.LightningModule):
            def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
                super().__init__()
                self.net = net
                self._optimizer = optimizer  # one optimizer across fits, as the other contenders keep Adam's state

            # the clock: the module's own epoch hooks, which Lightning calls anyway (a Callback's every hook,
            # defined by pl.Callback, would be called every batch: per-batch work of the clock's own)
            def on_train_epoch_start(self) -> None:
                self.clock_start = perf_counter()

            def on_train_epoch_end(self) -> None:
                self.clock_end = perf_counter()

            def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
                x, y = batch
                return F.cross_entropy(self.net(x), y)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return self._optimizer

        _LIT_MODULE.append(LitMLP)
    return _LIT_MODULE[0]


class LightningTrainer:
    """``lightning.pytorch.Trainer(max_epochs=1, ...)``: a new Trainer and one ``fit`` per pass, timed from the
    module's own ``on_train_epoch_start`` to its ``on_train_epoch_end`` (no callback: Lightning calls every hook
    of a ``pl.Callback`` every batch)."""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        import lightning.pytorch as pl

        quiet_frameworks()
        self.pl = pl
        self.module = _lit_module_class()(model, workload.optimizer(model))

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        t0 = perf_counter()
        trainer = self.pl.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(self.module, train_dataloaders=Batches(batches))
        call = perf_counter() - t0
        return self.module.clock_end - self.module.clock_start, call


class FabricLoop:
    """``lightning.fabric.Fabric(accelerator="cpu", devices=1)``: setup once, ``fabric.backward``."""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        from lightning.fabric import Fabric

        quiet_frameworks()
        self.fabric = Fabric(accelerator="cpu", devices=1)
        self.model, self.opt = self.fabric.setup(model, workload.optimizer(model))

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        fabric, model, opt, ce = self.fabric, self.model, self.opt, F.cross_entropy
        t0 = perf_counter()
        for x, y in batches:
            opt.zero_grad()
            loss = ce(model(x), y)
            fabric.backward(loss)
            opt.step()
        t = perf_counter() - t0
        return t, t


class IgniteEngine:
    """``ignite.engine.create_supervised_trainer``; one ``engine.run(batches, max_epochs=1)`` per pass."""

    def __init__(self, workload: Workload, model: nn.Module) -> None:
        from ignite.engine import Events, create_supervised_trainer

        self.engine = create_supervised_trainer(model, workload.optimizer(model), F.cross_entropy)
        self.start = self.end = 0.0
        self.engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        self.engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Any) -> None:
        self.start = perf_counter()

    def _completed(self, engine: Any) -> None:
        self.end = perf_counter()

    def run(self, batches: Sequence[Batch]) -> tuple[float, float]:
        t0 = perf_counter()
        self.engine.run(batches, max_epochs=1)
        call = perf_counter() - t0
        return self.end - self.start, call


# --- the contenders --------------------------------------------------------------------------------


def _clip(step: Any) -> Any:
    from loopkit import with_grad_clip

    return with_grad_clip(step, max_norm=1.0)


def _accum(step: Any) -> Any:
    from loopkit import with_grad_accum

    return with_grad_accum(step, every=4)


def _nan_guard(step: Any) -> Any:
    from loopkit import with_nan_guard

    return with_nan_guard(step)


def _grad_hook(step: Any) -> Any:
    from loopkit import with_grad_hook

    return with_grad_hook(step, lambda state: None)


def _amp(step: Any) -> Any:
    from loopkit import with_amp

    return with_amp(step, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Contender:
    """One row of the table: how to build its runner, and what it is compared with."""

    key: str
    label: str
    build: Callable[[Workload, nn.Module], Runner]
    group: str = "main"  # "main", "transform" (Δ vs the donated step) or "reference"
    reference: str = "raw"  # the row of its own-reference ratio
    needs: tuple[str, ...] = ()  # optional modules it imports
    driver: bool = False  # timed by epoch hooks; its whole call is reported separately
    target: str = ""


CONTENDERS: tuple[Contender, ...] = (
    Contender("raw", "raw PyTorch loop", RawLoop, target="reference"),
    Contender("run_epochs", "loopkit run_epochs", RunEpochs, driver=True, target="≤ 1.03×"),
    Contender("logging", "loopkit run_epochs + with_logging(TensorBoard/50), no bar", _logged_run_epochs(bar=False),
              needs=("tensorboardX",), driver=True, target="≤ 1.05× (issue 4)"),
    Contender("logging_bar", "loopkit run_epochs + with_logging(TensorBoard/50) + progress bar",
              _logged_run_epochs(bar=True), needs=("tensorboardX", "tqdm"), driver=True, target="≤ 1.05× (issue 4)"),
    Contender("pure", "loopkit pure step, plain loop", _loopkit_step(donated=False), target="≤ 1.3×"),
    Contender("donated", "loopkit donated step, plain loop", _loopkit_step(), target="≤ 1.03×"),
    Contender("run_epochs_global", "loopkit run_epochs, global_rng=True", RunEpochsGlobalRNG, driver=True,
              target="≤ 1.03×"),
    Contender("donated_global", "loopkit donated step, global_rng=True", _loopkit_step(global_rng=True),
              target="≤ 1.03×"),
    Contender("clip", "+ with_grad_clip(max_norm=1)", _loopkit_step(_clip), "transform", "raw_clip"),
    Contender("accum", "+ with_grad_accum(every=4), per call", _loopkit_step(_accum), "transform", "raw_accum"),
    Contender("nan_guard", "+ with_nan_guard", _loopkit_step(_nan_guard), "transform", "raw"),
    Contender("grad_hook", "+ with_grad_hook(a no-op fn)", _loopkit_step(_grad_hook), "transform", "raw"),
    Contender("amp", "+ with_amp(bf16)", _loopkit_step(_amp), "transform", "raw_amp"),
    Contender("raw_clip", "ref: raw + clip_grad_norm_(1)", RawClipLoop, "reference"),
    Contender("raw_accum", "ref: raw, accumulate 4, per call", RawAccumLoop, "reference"),
    Contender("raw_amp", "ref: raw under autocast(bf16)", RawAmpLoop, "reference"),
    Contender("trainer", "Lightning Trainer", LightningTrainer, needs=("lightning.pytorch",), driver=True,
              target="~1.5–2×"),
    Contender("fabric", "Lightning Fabric", FabricLoop, needs=("lightning.fabric",), target="+20–90 µs"),
    Contender("ignite", "Ignite Engine", IgniteEngine, needs=("ignite.engine",), driver=True, target="~1.1×"),
)
BY_KEY = {c.key: c for c in CONTENDERS}


def _missing(contender: Contender) -> str | None:
    for module in contender.needs:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"n/a ({module.split('.')[0]} not installed: {exc.name})"
    return None


# --- timing ----------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Per-round samples of one contender on one workload."""

    per_step: list[float] = field(default_factory=list)  # seconds per step (or per call)
    fixed: list[float] = field(default_factory=list)  # whole call minus the timed window, seconds
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the runner reports it did (runner.extra())


def time_workload(
    workload: Workload, contenders: Sequence[Contender], *, rounds: int, steps: int, warmup: int, seed: int
) -> dict[str, Timings]:
    """Interleaved timing: ``warmup`` untimed passes each, then ``rounds`` shuffled rounds."""
    batches = workload.batches(steps)
    results = {c.key: Timings() for c in contenders}
    runners: dict[str, Runner] = {}
    try:
        for c in contenders:
            reason = _missing(c)
            if reason is not None:
                results[c.key].error = reason
                continue
            try:
                runners[c.key] = c.build(workload, workload.model())
                for _ in range(warmup):
                    runners[c.key].run(batches)
            except Exception:
                results[c.key].error = "error: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
                _close(runners.pop(c.key, None))
        _timed_rounds(runners, results, batches, rounds=rounds, steps=steps, seed=seed)
        for key, runner in runners.items():
            extra = getattr(runner, "extra", None)
            if extra is not None:
                results[key].extra = extra()
    finally:
        for runner in runners.values():
            _close(runner)
    return results


def _timed_rounds(
    runners: dict[str, Runner], results: dict[str, Timings], batches: Sequence[Batch], *, rounds: int, steps: int,
    seed: int,
) -> None:
    """``rounds`` rounds of one timed pass of every runner, in an order shuffled each round."""
    order = list(runners)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for key in list(order):
            gc.collect()
            try:
                window, call = runners[key].run(batches)
            except Exception:
                results[key].error = "error: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
                order.remove(key)
                continue
            results[key].per_step.append(window / steps)
            results[key].fixed.append(call - window)


# --- step pairs: each contender step next to one raw step ----------------------------------------------


class StepPairs:
    """The pass's batches, each handed out next to one timed step of a raw loop on a model of its own.

    A contender's time for a batch runs from handing the batch out to being asked for the next
    one: its whole per-batch work, driver included (plus one generator resumption, ~0.05 µs).
    The two steps of a pair are adjacent in time, so the machine's load changes cancel in the
    per-pair difference (:class:`Pairs` takes a median over the cycles of each place in a cycle of steps).
    The order alternates (raw, contender, contender, raw, raw, ...): each side runs as often
    right after itself as after the other, so cache warmth favours neither (with the raw step
    always first, the raw loop paired with itself measured 0.986×). The raw step keeps its last
    loss until its next one, as a loop's ``loss`` variable does (the next forward reuses the
    parameters' gradient accumulators that graph holds).
    Every contender that iterates its data itself can be paired (Lightning's one-batch prefetch
    keeps one hand-out per loop iteration).

    >>> pairs = StepPairs([(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))] * 3, RawLoop(UNIT, UNIT.model()))
    >>> [len(b) for b in pairs], len(pairs.raw_s), len(pairs.own_s)
    ([2, 2, 2], 3, 3)
    """

    def __init__(self, batches: Sequence[Batch], raw: RawLoop) -> None:
        self.batches, self.raw = batches, raw
        self.raw_s: list[float] = []
        self.own_s: list[float] = []
        self.last_loss: torch.Tensor | None = None  # the raw loop's ``loss`` variable

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        raw_s, own_s = self.raw_s, self.own_s
        for i, batch in enumerate(self.batches):
            if i % 2 == 0:  # the raw step first
                raw_s.append(self._raw_step(batch))
                t = perf_counter()
                yield batch
                own_s.append(perf_counter() - t)
            else:  # the contender's step first
                t = perf_counter()
                yield batch
                own_s.append(perf_counter() - t)
                raw_s.append(self._raw_step(batch))

    def _raw_step(self, batch: Batch) -> float:
        model, opt, (x, y) = self.raw.model, self.raw.opt, batch
        t0 = perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        self.last_loss = loss  # frees the previous graph inside the clock, as a loop's rebinding does
        return perf_counter() - t0


#: the cycles of :func:`cycle_mean`, longest first: 800 = lcm(20, 32, 50) steps holds loopkit's periodic work in
#: the rows at fixed places (``with_logging``'s log point every 50 steps, the bar's reading of the loss every 20
#: batches, ``_window.Window``'s fold every 32 steps); 100 = lcm(20, 50), for a pass too short for 3 cycles of 800
#: (the fold then falls on a given place once in 8 cycles, and is left out: about 1/32 of a fold a step)
CYCLES = (800, 100)


def cycle_length(count: int, cycles: Sequence[int] = CYCLES, least: int = 3) -> int | None:
    """The longest cycle in ``cycles`` that ``count`` samples hold at least ``least`` times (None: none does).

    >>> cycle_length(2700), cycle_length(540), cycle_length(18)
    (800, 100, None)
    """
    return next((length for length in cycles if count // length >= least), None)


def cycle_mean(samples: Sequence[float], cycles: Sequence[int] = CYCLES, least: int = 3) -> float:
    """A robust mean per step that keeps periodic work: the mean over the places of a cycle of the median of
    each place over the cycles, for the longest cycle in ``cycles`` that the samples hold at least ``least``
    times (:func:`cycle_length`; a shorter tail left out); the plain mean where none fits.

    Work done every n steps, n dividing the cycle, lies at the same places in every cycle, so each such
    place's median keeps it; a stall of the machine hits a place in one cycle and not in the others, and
    its median leaves it out.

    >>> base = [1.0, 1.0, 1.0, 1.0, 5.0]  # 4 more every 5th step
    >>> cycle_mean(base * 3, cycles=(5,)), statistics.median(base * 3)  # the median over steps drops it
    (1.8, 1.0)
    >>> cycle_mean(base + [1.0, 1.0, 100.0, 1.0, 5.0] + base, cycles=(5,))  # a stall in one cycle: left out
    1.8
    >>> cycle_mean([1.0, 2.0], cycles=(5,))
    1.5
    """
    length = cycle_length(len(samples), cycles, least)
    if length is None:
        return statistics.fmean(samples) if samples else float("nan")
    count = len(samples) // length
    return statistics.fmean(statistics.median(samples[place:count * length:length]) for place in range(length))


@dataclass
class Pairs:
    """One contender's step pairs: per-pair seconds of the raw step and of its own.

    Each statistic is a :func:`cycle_mean` (per pair: the contender's step minus the raw step; the raw step's):
    work done once in many steps (a log point, the bar's reading) is counted at its rate, while a rare stall
    of the machine is left out. (A median over single pairs would drop any work done less often than every
    other step.)

    >>> own = ([1.1e-4] * 99 + [2.11e-3]) * 3  # +10 µs a step, and 2 ms more every 100 steps
    >>> own[150] += 0.05  # a stall of 50 ms
    >>> p = Pairs(raw_s=[1e-4] * 300, own_s=own)
    >>> round(p.delta_us(), 3), round(p.ratio(), 3)
    (30.0, 1.3)
    """

    raw_s: list[float] = field(default_factory=list)
    own_s: list[float] = field(default_factory=list)
    error: str | None = None

    def delta_us(self) -> float:
        """µs a step the contender adds to the raw step."""
        return cycle_mean([own - raw for own, raw in zip(self.own_s, self.raw_s)]) * 1e6

    def raw_us(self) -> float:
        """µs a raw step takes."""
        return cycle_mean(self.raw_s) * 1e6

    def ratio(self) -> float:
        """The contender's step over the raw step: 1 + Δ / raw."""
        return 1 + self.delta_us() / self.raw_us()

    def spread(self) -> list[float]:
        """The ratio with each cycle of the pass left out in turn (:func:`cycle_length`; at least 3 cycles
        left): how much the ratio rests on any one cycle, the method's own spread ([] in a pass too short).

        >>> [round(r, 9) for r in Pairs(raw_s=[1e-4] * 400, own_s=[1.5e-4] * 400).spread()]
        [1.5, 1.5, 1.5, 1.5]
        """
        length = cycle_length(len(self.raw_s), least=4)
        if length is None:
            return []
        end, deltas = len(self.raw_s) // length * length, [o - r for o, r in zip(self.own_s, self.raw_s)]
        out = []
        for start in range(0, end, length):  # the cycle left out
            raw, delta = self.raw_s[:start] + self.raw_s[start + length:end], deltas[:start] + deltas[start + length:end]
            out.append(1 + cycle_mean(delta, (length,)) / cycle_mean(raw, (length,)))
        return out


#: the rows paired against the plain raw step (the transform rows have references of their own)
PAIRED_GROUPS = ("main",)


def pair_workload(workload: Workload, contenders: Sequence[Contender], *, steps: int, warmup: int) -> dict[str, Pairs]:
    """One pass of ``steps`` step pairs per contender, after ``warmup`` plain passes; the first 10% dropped."""
    batches = workload.batches(steps)
    results: dict[str, Pairs] = {}
    for c in contenders:
        if c.group not in PAIRED_GROUPS or _missing(c) is not None:
            continue
        runner = None
        try:
            runner = c.build(workload, workload.model())
            for _ in range(warmup):
                runner.run(batches)
            pairs = StepPairs(batches, RawLoop(workload, workload.model()))
            gc.collect()
            runner.run(pairs)  # type: ignore[arg-type]
            skip = len(pairs.own_s) // 10
            results[c.key] = Pairs(pairs.raw_s[skip:], pairs.own_s[skip:])
        except Exception:
            results[c.key] = Pairs(error="error: " + traceback.format_exc(limit=3).strip().splitlines()[-1])
        finally:
            _close(runner)
    return results


def pairs_report(contenders: Sequence[Contender], pairs: dict[str, dict[str, Pairs]], steps: int) -> list[str]:
    """The step-pair table: Δ µs and ×raw (:class:`Pairs`), and their spread (:meth:`Pairs.spread`)."""
    names = list(pairs)
    out = [f"## Step pairs: each step next to one raw step ({steps} pairs per contender, first 10% dropped)", "",
           "Δ µs: per pair (contender step − raw step), the mean over the places of a cycle of 800 pairs "
           "(100 in a pass of fewer than 2400 pairs, the plain mean under 300) of each place's median over the "
           "cycles: work done every 20, 32 or 50 steps (the bar's reading, the window's fold, a log point) counts "
           "at its rate, a stall of the machine in one cycle does not; raw µs: the same of the raw step; ×raw = "
           "1 + Δ / raw µs; spread: ×raw with each cycle left out in turn (min–max; with 4 cycles or more), the "
           "method's own spread. "
           "The order alternates "
           "(raw, contender, contender, raw, ...). The raw row pairs the raw loop with itself: its ×raw is the "
           "method's bias.", ""]
    header = ["contender"]
    for w in names:
        header += [f"{w} raw µs", f"{w} Δ µs", f"{w} ×raw", f"{w} spread"]
    header.append("target")
    rows = []
    for c in contenders:
        if not any(c.key in pairs[w] for w in names):
            continue
        row = [c.label]
        for w in names:
            p = pairs[w].get(c.key)
            if p is None or p.error:
                row += [p.error if p else "—", "", "", ""]
                continue
            spread = p.spread()
            row += [
                _fmt(p.raw_us(), ".1f"),
                _fmt(p.delta_us(), "+.2f"),
                _fmt(p.ratio(), ".4f", "×"),
                f"{min(spread):.3f}–{max(spread):.3f}" if spread else "—",
            ]
        row.append(c.target)
        rows.append(row)
    return out + [_table(header, rows), ""]


# --- peak memory in a fresh process per contender ---------------------------------------------------


MICRO = Workload("micro", (8, 8, 8, 4), 4)


def warm_up(
    contenders: Sequence[Contender], workload: Workload = MICRO, steps: int = 4, *, before_fork: bool = True
) -> None:
    """Run each contender twice over ``steps`` batches on a throwaway model of ``workload``.

    Done before a memory baseline, it moves first-use costs out of the measurement: the
    frameworks' lazy imports, torch's kernel and dispatch set-up, and the shared-library
    code pages a forked child faults in again. The memory it freed goes back to the OS.
    ``before_fork`` (the forkserver's warm-up) also stops the thread that tqdm's first bar
    started, so that no child is forked while that thread holds tqdm's lock.
    """
    batches = workload.batches(steps)
    for c in contenders:
        if _missing(c) is not None:
            continue
        runner = None
        try:
            runner = c.build(workload, workload.model(seed=1))
            runner.run(batches)
            runner.run(batches)
        except Exception:
            pass  # the measured run reports the error
        finally:
            _close(runner)
        runner = None
    if before_fork:
        _stop_tqdm_monitor()
    release_free_memory()


def _stop_tqdm_monitor() -> None:
    """Stop tqdm's monitor thread, if a bar started one (the next bar starts a new one)."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    classes, seen = [std.tqdm], []
    while classes:  # the monitor is an attribute of the class that made the bar (tqdm.auto's subclass)
        cls = classes.pop()
        seen.append(cls)
        classes += cls.__subclasses__()
    for cls in seen:
        monitor = cls.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None


def _memory_child(key: str, workload_name: str, steps: int) -> dict[str, Any]:
    """In a fresh process: the peak-RSS growth of one contender training ``steps`` steps."""
    setup_process()
    pinned = pin_mmap_threshold()
    contender = BY_KEY[key]
    for module in ("loopkit",) + contender.needs:
        importlib.import_module(module)
    workload = WORKLOADS[workload_name]
    warm_up([contender], workload, before_fork=False)
    batches = workload.batches(steps)
    model = workload.model()
    release_free_memory()
    exact = reset_peak_rss()
    baseline = rss_kb()
    runner = contender.build(workload, model)
    try:
        runner.run(batches)
        peak = peak_rss_kb()
    finally:
        _close(runner)
    return {"baseline_kb": baseline, "peak_kb": peak, "growth_kb": peak - baseline, "exact": exact, "pinned": pinned}


def _child_entry(conn: Any, key: str, workload_name: str, steps: int) -> None:
    try:
        conn.send(("ok", _memory_child(key, workload_name, steps)))
    except BaseException:
        conn.send(("error", traceback.format_exc(limit=3).strip().splitlines()[-1]))
    finally:
        conn.close()


def _mp_context() -> Any:
    """A forkserver whose server imported everything and ran ``warm_up`` (benchmarks/_memwarm.py)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The server gets no sys.path from us before Python 3.12 (nor __main__): PYTHONPATH it is.
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ctx.set_forkserver_preload(["_memwarm"])
        return ctx
    return multiprocessing.get_context("spawn")


def _start_method() -> str:
    if "forkserver" in multiprocessing.get_all_start_methods():
        return ("forked from a server that imported every framework; each child first warms its contender "
                "up on a throwaway model of the workload")
    return "spawned; each child first warms its contender up on a throwaway model of the workload"


def measure_memory(
    workload: Workload, contenders: Sequence[Contender], *, steps: int, ctx: Any, timeout: float = 300.0
) -> dict[str, dict[str, Any] | str]:
    """Run each contender once in its own child; return its memory record or an error line."""
    out: dict[str, dict[str, Any] | str] = {}
    for c in contenders:
        reason = _missing(c)
        if reason is not None:
            out[c.key] = reason
            continue
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_entry, args=(send, c.key, workload.name, steps), daemon=True)
        proc.start()
        send.close()
        if receive.poll(timeout):
            try:
                status, value = receive.recv()
            except EOFError:  # the child died before it could answer
                status, value = "error", "memory child exited without a result"
            out[c.key] = value if status == "ok" else f"error: {value}"
        else:
            out[c.key] = "error: memory child timed out"
            proc.kill()
        proc.join()
    return out


# --- where the loopkit step spends its time -----------------------------------------------------------


def _per_call_us(fn: Callable[[], Any], reps: int) -> float:
    best = []
    for _ in range(5):
        t0 = perf_counter()
        for _ in range(reps):
            fn()
        best.append((perf_counter() - t0) / reps)
    return statistics.median(best) * 1e6


UNIT = Workload("unit", (1, 2), 1)  # one Linear(1, 2), batch 1: the arithmetic is next to nothing


def fixed_overhead(rounds: int, steps: int, seed: int) -> list[list[str]]:
    """Per-step overhead in µs on the unit model, where the step's arithmetic is negligible:
    what each loopkit form adds to *any* step, over the raw loop and over its own reference."""
    keys = ("raw", "run_epochs", "pure", "donated", "clip", "accum", "nan_guard", "amp",
            "raw_clip", "raw_accum", "raw_amp")
    timings = time_workload(UNIT, [BY_KEY[k] for k in keys], rounds=rounds, steps=steps, warmup=1, seed=seed)
    raw = timings["raw"]
    rows = []
    for key in keys:
        t, c = timings[key], BY_KEY[key]
        own = timings[c.reference] if c.group == "transform" and c.reference != "raw" else None
        best = min(t.per_step, default=float("nan")) - min(raw.per_step, default=float("nan"))
        rows.append([
            c.label,
            _fmt(_median(t.per_step) * 1e6, ".1f"),
            _fmt(_paired_delta_us(t, raw), "+.1f") if key != "raw" else "",
            _fmt(best * 1e6, "+.1f") if key != "raw" else "",
            _fmt(_paired_delta_us(t, own), "+.1f") if own is not None else "",
        ])
    return rows


def _ladder_loops(workload: Workload) -> dict[str, Callable[[Any, Sequence[Batch]], Any]]:
    """The raw step, growing one loopkit piece at a time into the donated loopkit step."""
    import loopkit
    from loopkit import steps as lk_steps
    from loopkit.rng import RNGScope

    split, advance = getattr(lk_steps, "_split_loss", None), getattr(lk_steps, "_advance", None)
    core = loopkit.train_step(loss_fn)
    donated = loopkit.donate(core)

    def raw(state: Any, batches: Sequence[Batch]) -> Any:
        model, opt = state.model, state.optimizer
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return state

    def rng(state: Any, batches: Sequence[Batch]) -> Any:
        model, opt, rng_state = state.model, state.optimizer, state.rng
        for x, y in batches:
            scope = RNGScope(rng_state, None, 0)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rng_state = scope.close()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return state

    def bookkeeping(state: Any, batches: Sequence[Batch]) -> Any:
        model, opt = state.model, state.optimizer
        for batch in batches:
            scope = RNGScope(state.rng, None, state.seed)
            loss, _ = split(loss_fn(model, batch), loss_fn)
            loss.backward()
            rng_state = scope.close()
            _ = {"loss": loss.detach()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            state = advance(state, state.step + 1, rng_state, state.extras)
        return state

    def run_(state: Any, batches: Sequence[Batch]) -> Any:
        for batch in batches:
            state, _ = core.run_(state, batch)
        return state

    def call(state: Any, batches: Sequence[Batch]) -> Any:
        for batch in batches:
            state, _ = donated(state, batch)
        return state

    loops = {
        "raw loop (zero_grad after the step, as loopkit)": raw,
        "+ RNGScope around forward/backward": rng,
        "+ loss_fn call, _split_loss, metrics dict, new TrainState": bookkeeping,
        "TrainStep.run_ (the real in-place core)": run_,
        "donate(train_step)(state, batch) (adds Step.__call__/_invoke)": call,
    }
    if split is None or advance is None:  # private helpers renamed: skip that rung
        del loops["+ loss_fn call, _split_loss, metrics dict, new TrainState"]
    return loops


def ladder(workload: Workload, rounds: int, steps: int, seed: int) -> list[list[str]]:
    """Interleaved timing of :func:`_ladder_loops`; cumulative Δ µs/step over the raw loop."""
    import loopkit

    batches = workload.batches(steps)
    loops = _ladder_loops(workload)
    states = {}
    for name, loop in loops.items():
        model = workload.model()
        states[name] = loop(loopkit.TrainState.create(model, workload.optimizer(model)), batches)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in loops}
    order, shuffle = list(loops), random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            gc.collect()
            t0 = perf_counter()
            states[name] = loops[name](states[name], batches)
            samples[name].append((perf_counter() - t0) / steps)
    base = samples[next(iter(loops))]
    rows = []
    for name, values in samples.items():
        rows.append([
            name,
            _fmt(_median(values) * 1e6, ".1f"),
            _fmt(_median([v - b for v, b in zip(values, base)]) * 1e6, "+.1f"),
            _fmt((min(values) - min(base)) * 1e6, "+.1f"),
        ])
    return rows


def breakdown(workload: Workload) -> list[tuple[str, float]]:
    """Micro-timings (µs per call, hot caches) of the pieces a loopkit step adds to the raw step."""
    import attrs

    import loopkit
    from loopkit import state as lk_state
    from loopkit import steps as lk_steps
    from loopkit.rng import RNGScope

    batches = workload.batches(8)
    model = workload.model()
    state = loopkit.TrainState.create(model, workload.optimizer(model))
    state, _ = loopkit.train_step(loss_fn)(state, batches[0])  # Adam's state exists from here on
    loss = loss_fn(state.model, batches[1])
    opt = state.optimizer
    rows: list[tuple[str, float]] = []

    def piece(name: str, fn: Callable[[], Any], n: int = 2000) -> None:
        try:
            rows.append((name, _per_call_us(fn, n)))
        except Exception as exc:  # private pieces may be renamed by later optimisation
            rows.append((f"{name} (unavailable: {type(exc).__name__})", float("nan")))

    chain = [state]

    def fork_chain() -> None:  # as in the pure loop: each copy is made from the previous one
        chain[0] = lk_state.fork(chain[0])

    piece("Step._invoke checks: isinstance + check_usable + mark_consumed", lambda: (
        isinstance(state, loopkit.TrainState), state.check_usable(), object.__setattr__(state, "_consumed", False)))
    piece("RNGScope(rng, None) + close(): 2 get_rng_state + 2 set_rng_state + dict",
          lambda: RNGScope(state.rng, None, state.seed).close())
    piece("  of which torch.get_rng_state()", torch.get_rng_state)
    piece("  of which torch.set_rng_state(rng['cpu'])", lambda: torch.set_rng_state(state.rng["cpu"]))
    piece("device lookup: optimizer.param_groups[0]['params'][0].device",
          lambda: opt.param_groups[0]["params"][0].device)
    piece("_split_loss(loss, loss_fn): checks of the loss", lambda: lk_steps._split_loss(loss, loss_fn))
    piece("metrics dict {'loss': loss.detach()}", lambda: {"loss": loss.detach()})
    piece("_advance(state, ...): the new TrainState (extras converter)",
          lambda: lk_steps._advance(state, state.step + 1, state.rng, state.extras))
    piece("attrs.evolve(state), for comparison", lambda: attrs.evolve(state))
    piece("fork(state): pure step's copy of params + Adam state (hot caches)", fork_chain, 200)
    return rows


# --- report ------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired_ratio(a: Timings, b: Timings) -> float:
    if a.error or b.error or not a.per_step or not b.per_step:
        return float("nan")
    return _median([x / y for x, y in zip(a.per_step, b.per_step)])


def _paired_delta_us(a: Timings, b: Timings) -> float:
    if a.error or b.error or not a.per_step or not b.per_step:
        return float("nan")
    return _median([x - y for x, y in zip(a.per_step, b.per_step)]) * 1e6


def _spread(t: Timings) -> float:
    if len(t.per_step) < 4:
        return float("nan")
    q = statistics.quantiles(t.per_step, n=4)
    return (q[2] - q[0]) / _median(t.per_step)


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    if value != value:  # nan
        return "—"
    return format(value, spec) + suffix


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mem_ratio(mem: dict[str, Any], key: str) -> str:
    rec, raw = mem.get(key), mem.get("raw")
    if isinstance(rec, str):
        return "n/a" if rec.startswith("n/a") else "error"
    if not isinstance(rec, dict) or not isinstance(raw, dict) or raw["growth_kb"] <= 0:
        return "—"
    return f"{rec['growth_kb'] / raw['growth_kb']:.2f}×"


def report(
    settings: dict[str, Any],
    contenders: Sequence[Contender],
    timings: dict[str, dict[str, Timings]],
    memory: dict[str, dict[str, Any]],
) -> str:
    names = list(timings)
    out = ["# loopkit overhead benchmark", ""]
    out += [f"- {k}: {v}" for k, v in machine_info().items()]
    out += [f"- {k}: {v}" for k, v in settings.items()]
    out += [f"- workload {w}: {WORKLOADS[w].describe()}" for w in names]
    out += ["", "## Time per training step and peak memory", ""]
    header = ["contender"]
    for w in names:
        header += [f"{w} µs/step", f"{w} ×raw", f"{w} mem ×raw"]
    header.append("target")
    rows = []
    for c in contenders:
        row = [c.label]
        for w in names:
            t = timings[w][c.key]
            if t.error:
                row += [t.error, "", ""]
                continue
            row += [
                _fmt(_median(t.per_step) * 1e6, ".1f"),
                _fmt(_paired_ratio(t, timings[w]["raw"]), ".3f", "×"),
                _mem_ratio(memory.get(w, {}), c.key),
            ]
        row.append(c.target)
        rows.append(row)
    out += [_table(header, rows, "l" + "r" * (len(header) - 2) + "l"), ""]

    transforms = [c for c in contenders if c.group == "transform" or c.key == "fabric"]
    if transforms:
        out += ["## What each transform adds (donated step in a plain loop)", ""]
        header = ["row"]
        for w in names:
            header += [f"{w} Δµs vs donated", f"{w} ×raw", f"{w} ×ref"]
        header.append("ref (own reference)")
        rows = []
        for c in transforms:
            base = "raw" if c.key == "fabric" else "donated"
            row = [c.label + (" (Δ vs raw)" if base == "raw" else "")]
            for w in names:
                t = timings[w][c.key]
                if t.error:
                    row += [t.error, "", ""]
                    continue
                ref, against = timings[w].get(c.reference), timings[w].get(base)
                row += [
                    _fmt(_paired_delta_us(t, against), "+.1f") if against is not None else "—",
                    _fmt(_paired_ratio(t, timings[w]["raw"]), ".3f", "×"),
                    _fmt(_paired_ratio(t, ref), ".3f", "×") if ref is not None else "—",
                ]
            row.append(BY_KEY[c.reference].label if c.reference in BY_KEY else c.reference)
            rows.append(row)
        out += [_table(header, rows, "l" + "r" * (len(header) - 2) + "l"), ""]

    if memory:
        out += ["## Peak memory: growth of peak RSS over the baseline (MiB)", ""]
        header = ["contender"] + [f"{w} MiB" for w in names] + [f"{w} baseline MiB" for w in names]
        rows = []
        for c in contenders:
            row, cells = [c.label], []
            for w in names:
                rec = memory.get(w, {}).get(c.key)
                if isinstance(rec, dict):
                    row.append(f"{rec['growth_kb'] / 1024:.2f}")
                    cells.append(f"{rec['baseline_kb'] / 1024:.0f}")
                else:
                    row.append(str(rec) if rec else "—")
                    cells.append("")
            rows.append(row + cells)
        out += [_table(header, rows), ""]

    out += _logging_section(names, timings)

    drivers = [c for c in contenders if c.driver]
    if drivers:
        out += ["## Drivers: fixed cost per call, outside the timed epoch (not in µs/step)", ""]
        header = ["driver"] + [f"{w} ms/call" for w in names]
        rows = [[c.label] + [_fmt(_median(timings[w][c.key].fixed) * 1e3, ".2f") for w in names] for c in drivers]
        out += [_table(header, rows), ""]

    out += ["## Noise: spread over rounds, and the fastest pass (robust to background load)", ""]
    header = ["contender"]
    for w in names:
        header += [f"{w} IQR/median", f"{w} min µs", f"{w} min ×raw min"]
    rows = []
    for c in contenders:
        row = [c.label]
        for w in names:
            t, raw = timings[w][c.key], timings[w]["raw"]
            best = min(t.per_step, default=float("nan"))
            row += [
                _fmt(_spread(t) * 100, ".1f", "%"),
                _fmt(best * 1e6, ".1f"),
                _fmt(best / min(raw.per_step, default=float("nan")), ".3f", "×"),
            ]
        rows.append(row)
    out += [_table(header, rows), ""]
    return "\n".join(out)


def _logging_section(names: Sequence[str], timings: dict[str, dict[str, Timings]]) -> list[str]:
    """What ``with_logging`` and then the progress bar add to ``run_epochs``, and what the bar drew."""
    steps = [("logging", "run_epochs", "+ with_logging(TensorBoard/50), no bar"),
             ("logging_bar", "logging", "+ progress bar on a pseudo-terminal"),
             ("logging_bar", "run_epochs", "both: with_logging + progress bar")]
    rows = []
    for key, base, label in steps:
        if not all(key in timings[w] and base in timings[w] for w in names):
            continue
        row = [label, BY_KEY[base].label]
        for w in names:
            t, b = timings[w][key], timings[w][base]
            row += [_fmt(_paired_delta_us(t, b), "+.1f"), _fmt(_paired_ratio(t, b), ".3f", "×")]
        rows.append(row)
    if not rows:
        return []
    header = ["added", "to"]
    for w in names:
        header += [f"{w} Δµs", f"{w} ×to"]
    out = ["## What logging and the progress bar add to run_epochs (paired medians)", "",
           _table(header, rows, "ll" + "r" * (len(header) - 2)), ""]
    for w in names:
        extra = timings[w].get("logging_bar", Timings()).extra
        passes = extra.get("passes") or 0
        if passes:
            out.append(
                f"- {w}: the bar wrote {extra['terminal_chars_written'] / passes:.0f} characters in "
                f"{extra['terminal_redraws'] / passes:.1f} redraws per pass (warm-up included); last frame: "
                f"`{extra['terminal_last_frame']}`"
            )
    return out + [""]


def _json_results(timings: dict[str, dict[str, Timings]], memory: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for w, per in timings.items():
        data[w] = {}
        for key, t in per.items():
            data[w][key] = {
                "us_per_step": _median(t.per_step) * 1e6 if t.per_step else None,
                "ratio_to_raw": _paired_ratio(t, per["raw"]) if "raw" in per else None,
                "per_step_s": t.per_step,
                "fixed_s": t.fixed,
                "error": t.error,
                "memory": memory.get(w, {}).get(key),
                "extra": t.extra,
            }
    return data


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 8 steps; numbers meaningless")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per workload (default 12)")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed pass (default 100)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes per contender first (default 1)")
    p.add_argument("--memory-steps", type=int, default=None, help="steps of the memory run (default: --steps)")
    p.add_argument("--workloads", default="tiny,small", help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--only", default=None, help="comma-separated contender keys (raw is always added; a transform's "
                   "donated step and own reference too): "
                   + ", ".join(BY_KEY))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--breakdown", action="store_true", help="also time the pieces of one loopkit step")
    p.add_argument("--pair-steps", type=int, default=None,
                   help="step pairs per contender in the step-pair table (default 4500; 0: no table)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffling")
    p.add_argument("--json", default=None, help="also write the raw samples to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (2 if quick else 12)
    args.steps = args.steps if args.steps is not None else (8 if quick else 100)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.memory_steps = args.memory_steps if args.memory_steps is not None else args.steps
    args.pair_steps = args.pair_steps if args.pair_steps is not None else (20 if quick else 4500)
    if args.pair_steps < 0:
        p.error("--pair-steps must be >= 0")
    for name in ("rounds", "steps", "memory_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        p.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        bad = [k for k in keys if k not in BY_KEY]
        if bad:
            p.error(f"--only: unknown {bad}; choose from {list(BY_KEY)}")
    return args


def _settings(args: argparse.Namespace) -> dict[str, str]:
    quick = " [--quick: numbers are meaningless]" if args.quick else ""
    memory = "not measured (--no-memory)" if args.no_memory else (
        f"peak-RSS growth over the baseline, one fresh child per contender and workload training "
        f"{args.memory_steps} steps ({_start_method()}); the baseline is the RSS after imports, warm-up, "
        "data and model creation, the peak the kernel's VmHWM reset at the baseline (/proc/self/clear_refs)"
    )
    return {
        "settings": f"rounds={args.rounds}, steps/pass={args.steps}, warm-up passes={args.warmup}, "
                    f"order shuffled each round (seed {args.seed}){quick}",
        "µs/step": "median over rounds of pass time / steps; ×raw = median over rounds of the per-round ratio",
        "drivers": "run_epochs, Trainer and Ignite timed from their epoch-start to epoch-end hooks "
                   "(per-call set-up reported separately below)",
        "memory": memory,
        "logging rows": "with_logging(train_step, TensorBoardLogger(<temp dir>, 'bench'), every_n_steps=50) under "
                        "run_epochs; the event file is opened before each call (once per fit; in the call's fixed cost); "
                        "with the bar, progress=True and sys.stderr is a pseudo-terminal (os.openpty, 120x40, "
                        "isatty() True; its master side drained by a `cat` process, as a terminal emulator would) "
                        "for the call, so tqdm formats and writes; temp dirs removed afterwards",
    }


def _print_breakdown(args: argparse.Namespace, workloads: Sequence[Workload]) -> None:
    steps = args.steps if args.quick else max(args.steps, 200)
    delta = ["Δ µs (paired median)", "Δ µs (min − min)"]
    print("## Breakdown 1: fixed per-step cost on a unit model (Linear(1, 2), batch 1), Δ vs raw\n")
    rows = fixed_overhead(args.rounds, steps, args.seed)
    header = ["contender", "µs/step", "Δ µs vs raw (paired median)", "Δ µs vs raw (min − min)",
              "Δ µs vs own ref (paired median)"]
    print(_table(header, rows) + "\n")
    print("## Breakdown 2: the raw step grown into the loopkit step, piece by piece (cumulative Δ µs)\n")
    for w in (UNIT, *workloads):
        rows = ladder(w, args.rounds, steps, args.seed)
        print(f"### {w.name}\n\n" + _table(["loop", "µs/step", *delta], rows) + "\n")
    print("## Breakdown 3: pieces micro-timed alone (µs per call, hot caches: a lower bound)\n")
    for w in workloads:
        rows = [[name, _fmt(us, ".2f")] for name, us in breakdown(w)]
        print(f"### {w.name}\n\n" + _table(["piece", "µs"], rows) + "\n")


def _failures(timings: dict[str, dict[str, Timings]], memory: dict[str, dict[str, Any]]) -> list[str]:
    failed = [f"{w}/{k}: {t.error}" for w, per in timings.items() for k, t in per.items()
              if t.error and t.error.startswith("error")]
    failed += [f"{w}/{k} memory: {rec}" for w, per in memory.items() for k, rec in per.items()
               if isinstance(rec, str) and rec.startswith("error")]
    return failed


def selected(only: str | None) -> tuple[set[str], list[str]]:
    """The contender keys to time for ``--only`` (every one without it), and those added to the selection:
    the raw loop, and for a transform row the donated step and its own reference, which the table *What each
    transform adds* compares it with.

    >>> wanted, added = selected("clip,raw_clip")
    >>> sorted(wanted), added
    (['clip', 'donated', 'raw', 'raw_clip'], ['raw', 'donated'])
    >>> selected(None)[1]
    []
    """
    if not only:
        return set(BY_KEY), []
    wanted = {k for k in only.split(",") if k}
    needed = ["raw"]
    for c in CONTENDERS:
        if c.key in wanted and c.group == "transform":
            needed += ["donated", c.reference]
    added = [k for k in dict.fromkeys(needed) if k not in wanted]
    return wanted | set(added), added


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; 1 if a contender failed, else 0."""
    args = parse_args(argv)
    setup_process()
    wanted, added = selected(args.only)
    contenders = [c for c in CONTENDERS if c.key in wanted]
    workloads = [WORKLOADS[w] for w in args.workloads.split(",")]
    started = perf_counter()
    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:  # first, so that the forkserver's start does not overlap the timing
        ctx = _mp_context()
        for w in workloads:
            memory[w.name] = measure_memory(w, contenders, steps=args.memory_steps, ctx=ctx)
    timings = {
        w.name: time_workload(w, contenders, rounds=args.rounds, steps=args.steps, warmup=args.warmup, seed=args.seed)
        for w in workloads
    }
    pairs = {
        w.name: pair_workload(w, contenders, steps=args.pair_steps, warmup=max(args.warmup, 1)) for w in workloads
    } if args.pair_steps else {}
    settings = _settings(args)
    if added:
        settings["added"] = f"{', '.join(added)}: what the selected rows are compared with (--only)"
    print(report(settings, contenders, timings, memory))
    if pairs:
        print("\n".join(pairs_report(contenders, pairs, args.pair_steps)))
    if args.breakdown:
        _print_breakdown(args, workloads)
    print(f"total time: {perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            results = _json_results(timings, memory)
            for w, per in pairs.items():
                for key, p in per.items():
                    results[w][key]["pairs"] = {"raw_s": p.raw_s, "own_s": p.own_s, "error": p.error}
            json.dump({"settings": vars(args), "results": results}, f, indent=1, default=str)
    failed = _failures(timings, memory)
    failed += [f"{w}/{k} pairs: {p.error}" for w, per in pairs.items() for k, p in per.items() if p.error]
    for line in failed:
        print("FAILED " + line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
