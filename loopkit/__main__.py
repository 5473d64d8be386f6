"""``python -m loopkit``: command-line tools.

``python -m loopkit plot RUN_DIR [RUN_DIR ...] -o curves.png`` draws the runs' curves from
their ``metrics.csv`` (see :mod:`loopkit.plot`; needs matplotlib).

>>> main(["plot", "/nonexistent/run"])  # prints "loopkit plot: error: run folder ... does not exist"
1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loopkit", description="loopkit command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="draw runs' curves from their metrics.csv (needs matplotlib)")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR",
                      help="a run folder (root/name/version_N) or root/name (root for a logger of name None)")
    plot.add_argument("-o", "--output", default="curves.png", help="the image to write (default: curves.png)")
    plot.add_argument("-m", "--metrics", nargs="+", default=None, help="the metrics to draw (default: all)")
    plot.add_argument("--columns", type=int, default=3, help="subplots per row (default: 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Errors (a missing ``metrics.csv``, matplotlib not installed) are printed as one line
    naming what was wrong, and give exit status 1; an output that names a folder is a usage
    error, printed as one line, with exit status 2 (as argparse's own).

    >>> import tempfile, os
    >>> from loopkit.loggers import CSVLogger
    >>> tmp = tempfile.TemporaryDirectory()
    >>> logger = CSVLogger(tmp.name); logger.log_metrics({"train/loss": 0.5}, 1)
    >>> main(["plot", logger.log_dir, "-o", os.path.join(tmp.name, "c.png")])  # doctest: +ELLIPSIS
    wrote ...c.png
    0
    >>> tmp.cleanup()
    """
    args = _parser().parse_args(argv)
    if args.command == "plot":
        from loopkit.plot import output_path, plot_runs

        try:
            output = output_path(args.output)
        except ValueError as e:
            print(f"loopkit plot: error: {e}", file=sys.stderr)
            return 2
        try:
            plot_runs(args.runs, output, metrics=args.metrics, columns=args.columns)
        except (ImportError, OSError, ValueError) as e:
            print(f"loopkit plot: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
