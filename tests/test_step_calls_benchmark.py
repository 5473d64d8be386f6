"""benchmarks/step_calls.py: its exact accounting of what a loopkit step adds to a raw loop.

The counts are the hot path's, written out here: a donated plain step on the CPU enters five
functions of loopkit's own and the loss_fn (which a raw loop writes inline), makes one torch op
(the loss's ``detach`` for its metrics) and, with the state's own RNG, installs and reads back
the generator (two ``get_state``, two ``set_state``); ``global_rng=True`` makes no generator call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import step_calls  # noqa: E402

SHORT, LONG = 10, 40


def _added(row: str) -> dict[tuple[str, str], float]:
    raw = {**step_calls.per_step("raw", step_calls.python_calls, SHORT, LONG),
           **step_calls.per_step("raw", step_calls.torch_ops, SHORT, LONG)}
    counts = {**step_calls.per_step(row, step_calls.python_calls, SHORT, LONG),
              **step_calls.per_step(row, step_calls.torch_ops, SHORT, LONG)}
    return step_calls.added(counts, raw)


@pytest.mark.parametrize("row, generator_calls", [("donated", 4), ("donated_global", 0)])
def test_a_donated_plain_step_adds_only_its_known_calls(row, generator_calls):
    added = _added(row)
    functions = sorted(name.split(":")[-1] for (kind, name), n in added.items() if kind == "py" for _ in range(round(n)))
    assert functions == sorted(["__call__", "_run_plain_cpu", "<listcomp>", "make_state", "keep_graph", "loss_fn"]), added
    assert {name for (kind, name) in added if kind == "op"} == {"aten::detach", "detach"}, added
    assert added[("op", "aten::detach")] == 1
    generator = sum(n for (kind, name), n in added.items() if kind == "c" and name.startswith("Generator."))
    assert generator == generator_calls, added
    assert all(n > 0 and n == round(n) for n in added.values()), added  # nothing every n steps, nothing fewer


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        step_calls.main(["--only", "nope"])
    with pytest.raises(SystemExit):
        step_calls.main(["--short", "5", "--long", "5"])
