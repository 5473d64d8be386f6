"""``loopkit.plot``: draw runs' curves from the ``metrics.csv`` that :class:`loopkit.CSVLogger` writes.

One subplot per metric, one line per run (runs overlaid), against the global step. Needs
matplotlib, an optional extra (``pip install 'loopkit[plot]'``). From a shell::

    python -m loopkit plot runs/default/version_0 runs/default/version_1 -o curves.png

>>> import os, tempfile
>>> from loopkit.loggers import CSVLogger
>>> tmp = tempfile.TemporaryDirectory()
>>> logger = CSVLogger(tmp.name)
>>> for step in (1, 2, 3):
...     logger.log_metrics({"train/loss": 1.0 / step}, step)
>>> fig = plot_runs([logger.log_dir], os.path.join(tmp.name, "curves.png"))
>>> [ax.get_title() for ax in fig.axes]
['train/loss']
>>> tmp.cleanup()
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from loopkit._numbers import as_int

__all__ = ["find_runs", "output_path", "plot_runs", "read_metrics"]

METRICS_FILE = "metrics.csv"


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "loopkit.plot needs matplotlib, an optional extra: pip install 'loopkit[plot]' (or pip install matplotlib)"
        ) from e
    return Figure, FigureCanvasAgg


def find_runs(path: str | os.PathLike) -> list[str]:
    """The run folders ``path`` names: itself if it holds ``metrics.csv``, else its ``version_*`` runs.

    The runs come in natural order: names compared with the numbers in them as numbers (``version_9`` before
    ``version_10``; a folder of another name by its name, ``b`` before ``version_0`` before ``zz``). A path to a
    ``metrics.csv`` file names its folder. Raises ``FileNotFoundError`` naming the path when there is no
    ``metrics.csv`` to read.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> find_runs(tmp.name)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: no metrics.csv in ... (a run folder written by loopkit.CSVLogger, e.g. runs/default/version_0)
    >>> tmp.cleanup()
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == METRICS_FILE:
        return [os.path.dirname(path) or "."]
    if not os.path.exists(path):
        raise FileNotFoundError(f"run folder {path} does not exist")
    if os.path.isfile(os.path.join(path, METRICS_FILE)):
        return [path]
    versions = sorted(
        (d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, METRICS_FILE))),
        key=_natural_key,
    ) if os.path.isdir(path) else []
    if versions:
        return [os.path.join(path, d) for d in versions]
    raise FileNotFoundError(
        f"no {METRICS_FILE} in {path} (a run folder written by loopkit.CSVLogger, e.g. runs/default/version_0)"
    )


def _natural_key(name: str) -> tuple[list[str | int], str]:
    """Sort key of a folder name with its runs of digits compared as numbers (the name itself breaks ties:
    ``v01`` and ``v1``).

    >>> sorted(["version_10", "zz", "version_9", "b"], key=_natural_key)
    ['b', 'version_9', 'version_10', 'zz']
    """
    parts: list[str | int] = [int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))]
    return parts, name  # (text at even places, numbers at odd ones: never a number compared with text)


def _unique_runs(runs: list[str]) -> list[str]:
    """``runs`` without a run named again (by another path to the same folder: ``exp`` and ``exp/version_0``,
    or a path given twice), first-seen order kept."""
    seen: set[str] = set()
    unique = []
    for run in runs:
        real = os.path.realpath(run)
        if real not in seen:
            seen.add(real)
            unique.append(run)
    return unique


def read_metrics(run_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Each metric's ``(steps, values)`` from a run's ``metrics.csv``, skipping blank cells.

    A column blank in every row has no values: it is left out (no empty series).

    >>> import tempfile
    >>> from loopkit.loggers import CSVLogger
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = CSVLogger(tmp.name)
    >>> logger.log_metrics({"a": 1.0}, 1); logger.log_metrics({"b": 2.0}, 2)
    >>> read_metrics(logger.log_dir)
    {'a': ([1], [1.0]), 'b': ([2], [2.0])}
    >>> tmp.cleanup()
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {os.fspath(run_dir)}: is it a run folder written by loopkit.CSVLogger?")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column: it was not written by loopkit.CSVLogger")
        series: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in reader.fieldnames if k != "step"}
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
                for key, (steps, values) in series.items():
                    if row.get(key) not in ("", None):
                        value = float(row[key])
                        steps.append(step)
                        values.append(value)
            except (TypeError, ValueError, OverflowError) as e:  # (OverflowError: a step of inf)
                raise ValueError(f"{path}, line {line}: not a number ({e})") from e
    return {k: v for k, v in series.items() if v[0]}


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    columns: int = 3,
) -> Any:
    """Draw every run's curves, one subplot per metric, the runs overlaid; save to ``output``.

    ``run_dirs`` are run folders (or ``root/name`` folders, meaning all their ``version_*``
    runs: ``root`` itself for a logger of ``name=None``); ``metrics`` picks and orders the subplots
    (default: all, in order of first appearance: the runs in order, each run's columns in order; but the ``epoch``
    column, the counter :func:`loopkit.with_logging` writes on every row, drawn only when named). The subplots fill a grid
    row by row, ``columns`` wide (fewer when there are fewer metrics), with as many rows as
    they need. Each run's label is its ``name/version_N``; when two runs share that (alike
    runs under different roots), every run is labelled by its path. A run named twice (``exp`` and
    ``exp/version_0``, or one path given twice) is drawn once, where first named. Returns the matplotlib ``Figure``;
    ``output`` (PNG, SVG, PDF, by suffix; see :func:`output_path`) is written when given.

    >>> import os, tempfile
    >>> from loopkit.loggers import CSVLogger
    >>> tmp = tempfile.TemporaryDirectory()
    >>> runs = [CSVLogger(tmp.name, "demo") for _ in range(2)]
    >>> for i, run in enumerate(runs):
    ...     run.log_metrics({"train/loss": 1.0 + i, "val/acc": 0.5}, step=10)
    >>> fig = plot_runs([os.path.join(tmp.name, "demo")], metrics=["train/loss"])
    >>> [line.get_label() for line in fig.axes[0].get_lines()]
    ['demo/version_0', 'demo/version_1']
    >>> tmp.cleanup()
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    path = None if output is None else output_path(output)
    if not run_dirs:
        raise ValueError("plot_runs: give at least one run folder")
    if (as_int(columns) or 0) < 1:
        raise ValueError(f"plot_runs: columns must be a positive int, got {columns!r}")
    columns = as_int(columns)
    Figure, FigureCanvasAgg = _matplotlib()
    runs = _unique_runs([run for path in run_dirs for run in find_runs(path)])
    data = {run: read_metrics(run) for run in runs}
    names = _metric_names(data, metrics)
    labels = _labels(runs)
    ncols = min(columns, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for k, run in enumerate(runs):  # (one colour per run in every panel, also where an earlier run lacks the metric)
            if name in data[run]:
                steps, values = data[run][name]
                ax.plot(steps, values, label=labels[run], color=f"C{k % 10}", marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    if path is not None:  # the format given, so that matplotlib writes the very file output_path names
        fig.savefig(path, format=os.path.splitext(path)[1][1:])
    return fig


def output_path(output: str | os.PathLike) -> str:
    """Where :func:`plot_runs` writes ``output``: the path itself, with ``.png`` added when it has no suffix.

    A name that ends in ``.`` has no suffix either. An ``output`` that names a folder (one that ends in
    a separator, or an existing folder) is a ``ValueError``.

    >>> output_path("curves"), output_path("curves."), output_path("curves.svg")
    ('curves.png', 'curves.png', 'curves.svg')
    >>> output_path("out/")
    Traceback (most recent call last):
    ...
    ValueError: output 'out/' names a folder, not an image file (give a file name, e.g. out/curves.png)
    """
    path = os.fspath(output)
    if not os.path.basename(path).strip(".") or os.path.isdir(path):
        example = os.path.join(path, "curves.png")
        raise ValueError(f"output {path!r} names a folder, not an image file (give a file name, e.g. {example})")
    return path if os.path.splitext(path)[1] not in ("", ".") else path.rstrip(".") + ".png"


#: the column that is no metric: the epoch counter :func:`loopkit.with_logging` puts on every row (as Lightning's
#: logger connector does), drawn only when named in ``metrics``
COUNTER = "epoch"


def _metric_names(data: dict[str, dict[str, Any]], wanted: Sequence[str] | None) -> list[str]:
    """The panels: ``wanted``, each found in some run; else every column found but :data:`COUNTER`.

    >>> _metric_names({"run": {"epoch": ([1], [0.0]), "train/loss": ([1], [0.5])}}, None)
    ['train/loss']
    """
    found: list[str] = []
    for series in data.values():
        found.extend(k for k in series if k not in found)
    if wanted is not None and not wanted:
        raise ValueError("plot_runs: metrics is empty; name at least one metric, or pass None for all of them")
    if wanted is None:
        metrics = [k for k in found if k != COUNTER]
        if not metrics:
            raise ValueError(f"no metric values to plot in {', '.join(data)}")
        return metrics
    missing = [m for m in wanted if m not in found]
    if missing:
        raise ValueError(f"metric(s) {missing} not found in any run; the runs have {found}")
    return list(wanted)


def _labels(runs: list[str]) -> dict[str, str]:
    """Each run's label: its last two path parts (``name/version_N``), the full path if that is ambiguous."""
    short = {run: os.path.join(*os.path.normpath(os.path.abspath(run)).split(os.sep)[-2:]) for run in runs}
    if len(set(short.values())) < len(runs):
        return {run: os.fspath(run) for run in runs}
    return short
