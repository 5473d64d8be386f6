"""Smoke tests of benchmarks/overhead.py: ``--quick`` runs end to end in a subprocess.

No timing is asserted (timings depend on the machine and its load). The quick run must
exit 0, print a row of the main table for every contender with a time for each workload
(or ``n/a`` where an optional framework is not installed), have timed every round, and
have measured the peak memory of every contender in its own child process. The logging
rows (issue 4) must have really logged (TensorBoard event files in their folder), the
progress-bar row must have really drawn its bar on the pseudo-terminal, and no temporary
log folder may outlive the run, in the main process or in the memory children.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"

# The rows the benchmark must report (its labels, written out here independently).
CONTENDER_ROWS = {
    "raw": "raw PyTorch loop",
    "run_epochs": "loopkit run_epochs",
    "logging": "loopkit run_epochs + with_logging(TensorBoard/50), no bar",
    "logging_bar": "loopkit run_epochs + with_logging(TensorBoard/50) + progress bar",
    "pure": "loopkit pure step, plain loop",
    "donated": "loopkit donated step, plain loop",
    "run_epochs_global": "loopkit run_epochs, global_rng=True",
    "donated_global": "loopkit donated step, global_rng=True",
    "clip": "+ with_grad_clip(max_norm=1)",
    "accum": "+ with_grad_accum(every=4), per call",
    "nan_guard": "+ with_nan_guard",
    "grad_hook": "+ with_grad_hook(a no-op fn)",
    "amp": "+ with_amp(bf16)",
    "trainer": "Lightning Trainer",
    "fabric": "Lightning Fabric",
    "ignite": "Ignite Engine",
}
OPTIONAL = {"trainer", "fabric", "ignite"}  # n/a where Lightning or Ignite is not installed
WORKLOADS = ("tiny", "small")
QUICK_ROUNDS = 2
QUICK_STEPS = 8
ISSUE_4_TARGET = "≤ 1.05×"


def _main_table(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = lines.index("## Time per training step and peak memory")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| :---") and not line.startswith("| contender"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_quick_run_reports_every_contender(tmp_path):
    results_file = tmp_path / "results.json"
    # A short private TMPDIR (the forkserver's socket lives there too: AF_UNIX paths are short).
    with tempfile.TemporaryDirectory(prefix="lkb-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--json", str(results_file)],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        leftovers = sorted(name for name in os.listdir(tmp) if name.startswith("loopkit-bench-"))
        results = json.loads(results_file.read_text())["results"]
        log_dirs = [results[w][k]["extra"]["log_dir"] for w in WORKLOADS for k in ("logging", "logging_bar")]
        assert all(d.startswith(tmp + os.sep) for d in log_dirs), log_dirs  # made in the private TMPDIR
    assert leftovers == [], f"temporary log folders left behind: {leftovers}"
    rows = {row[0]: row for row in _main_table(proc.stdout)}
    for key, label in CONTENDER_ROWS.items():
        assert label in rows, f"no table row for {label!r}; rows: {sorted(rows)}"
        row = rows[label]
        for i, workload in enumerate(WORKLOADS):
            us_cell = row[1 + 3 * i]
            record = results[workload][key]
            if us_cell.startswith("n/a"):
                assert key in OPTIONAL, f"{label} on {workload}: {us_cell}"
                continue
            assert math.isfinite(float(us_cell)) and float(us_cell) > 0, f"{label} on {workload}: {us_cell!r}"
            assert record["error"] is None
            assert len(record["per_step_s"]) == QUICK_ROUNDS, f"{label} on {workload}: not timed every round"
            memory = record["memory"]
            assert isinstance(memory, dict), f"{label} on {workload}: memory not measured: {memory!r}"
            assert memory["peak_kb"] >= memory["baseline_kb"] > 0
    # Adam's moments alone (2 x 1 MiB for the small MLP) must show in the raw loop's growth.
    assert results["small"]["raw"]["memory"]["growth_kb"] > 2 * 1024
    for key in ("logging", "logging_bar"):
        assert rows[CONTENDER_ROWS[key]][-1].startswith(ISSUE_4_TARGET), rows[CONTENDER_ROWS[key]]
    assert "pseudo-terminal" in proc.stdout  # the method is stated in the report
    _check_logging_rows(results)
    _check_step_pairs(results, proc.stdout)


PAIRED = ("raw", "run_epochs", "logging", "logging_bar", "pure", "donated", "run_epochs_global", "donated_global",
          "trainer", "fabric", "ignite")
QUICK_PAIRS = 20 - 20 // 10  # --quick pairs 20 steps and drops the first 10%


def _check_step_pairs(results: dict, stdout: str) -> None:
    """Every main-group row was paired step by step with the raw loop; the transform rows were not."""
    assert "## Step pairs" in stdout
    for workload in WORKLOADS:
        for key in CONTENDER_ROWS:
            record = results[workload][key]
            if key not in PAIRED or (key in OPTIONAL and record["error"] is not None):
                assert "pairs" not in record, (workload, key)
                continue
            pairs = record["pairs"]
            assert pairs["error"] is None, (workload, key, pairs["error"])
            assert len(pairs["raw_s"]) == len(pairs["own_s"]) == QUICK_PAIRS, (workload, key)
            assert all(t > 0 for t in pairs["raw_s"] + pairs["own_s"]), (workload, key)


def test_step_pairs_train_the_raw_model_as_a_raw_loop_and_time_the_consumer():
    """StepPairs against independent references: its raw steps train their model exactly as a hand-written
    loop over the same batches, and the time it gives a consumer covers that consumer's own work."""
    import time

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import overhead
        from _workloads import WORKLOADS as BENCH_WORKLOADS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    tiny = BENCH_WORKLOADS["tiny"]
    batches = tiny.batches(6)
    pairs = overhead.StepPairs(batches, overhead.RawLoop(tiny, tiny.model()))
    handed = []
    for batch in pairs:
        handed.append(batch)
        time.sleep(0.004)
    assert [b is a for a, b in zip(batches, handed)] == [True] * 6
    assert len(pairs.raw_s) == len(pairs.own_s) == 6
    assert min(pairs.own_s) >= 0.004
    reference = tiny.model()
    opt = tiny.optimizer(reference)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(pairs.raw.model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    result = overhead.Pairs(raw_s=[1e-4] * 10, own_s=[1.5e-4] * 10)
    assert abs(result.delta_us() - 50) < 1e-6 and abs(result.ratio() - 1.5) < 1e-9
    assert result.spread() == []  # too short for 3 cycles


def _bench_module(name: str):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_step_pairs_count_work_done_every_n_steps_and_leave_out_stalls():
    """Pairs' Δ keeps work done once in many steps at its rate (a log point every 50 steps, a fold every 32,
    a reading every 20: their mean cost per step, computed here by hand) and leaves out a few stalls of the
    machine, on synthetic timings; a median over single pairs would give the +10 µs alone."""
    overhead = _bench_module("overhead")
    n = 4050  # --pair-steps' default 4500, less the 10% dropped: 5 cycles of 800
    raw = [100e-6 + 1e-6 * (i % 7) for i in range(n)]  # a raw step of 100-106 µs
    own = [r + 10e-6 for r in raw]  # +10 µs every step
    for i in range(n):
        own[i] += (5e-3 if i % 50 == 49 else 0) + (640e-6 if i % 32 == 31 else 0) + (60e-6 if i % 20 == 19 else 0)
    for i in (17, 333, 1001, 1666, 2222, 3456):  # stalls: 20 ms in six steps of the contender, two of the raw loop
        own[i] += 20e-3
    for i in (90, 1500):
        raw[i] += 20e-3
    expected = 10 + 5000 / 50 + 640 / 32 + 60 / 20  # µs a step
    pairs = overhead.Pairs(raw_s=raw, own_s=own)
    assert abs(pairs.delta_us() - expected) < 0.5, pairs.delta_us()
    raw_us = sum(100 + i % 7 for i in range(n)) / n
    assert abs(pairs.raw_us() - raw_us) < 0.5 and abs(pairs.ratio() - (1 + expected / raw_us)) < 0.005
    spread = pairs.spread()  # each of the 5 cycles of 800 left out in turn
    assert len(spread) == 5 and all(abs(r - pairs.ratio()) < 0.005 for r in spread), spread
    short = overhead.Pairs(raw_s=raw[:540], own_s=own[:540])  # 5 cycles of 100: the fold (1 in 8 cycles) left out
    assert abs(short.delta_us() - (expected - 640 / 32)) < 0.5, short.delta_us()


def test_transform_table_is_printed_without_the_donated_row_and_only_adds_it():
    """--only clip,raw_clip times the donated step too (said in the report's settings); a report without it still
    gives the transform table, with "—" where the donated step is needed (×raw and ×ref computed by hand)."""
    overhead = _bench_module("overhead")
    wanted, added = overhead.selected("clip,raw_clip")
    assert sorted(wanted) == ["clip", "donated", "raw", "raw_clip"] and added == ["raw", "donated"]
    assert overhead.selected("donated,clip,raw_clip")[1] == ["raw"]
    timings = {"tiny": {"raw": overhead.Timings(per_step=[1e-4, 2e-4]), "clip": overhead.Timings(per_step=[3e-4, 4e-4]),
                        "raw_clip": overhead.Timings(per_step=[2e-4, 2e-4])}}
    contenders = [overhead.BY_KEY[k] for k in ("raw", "clip", "raw_clip")]
    lines = overhead.report({}, contenders, timings, {}).splitlines()
    start = lines.index("## What each transform adds (donated step in a plain loop)")
    row = next(line for line in lines[start:] if line.startswith("| + with_grad_clip(max_norm=1)"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:] == ["—", f"{(3 / 1 + 4 / 2) / 2:.3f}×", f"{(3 / 2 + 4 / 2) / 2:.3f}×", "ref: raw + clip_grad_norm_(1)"]


def test_lightning_trainer_is_timed_by_the_modules_epoch_hooks_without_a_callback():
    """The Trainer row's clock adds no per-batch work: no callback is given to the Trainer (Lightning calls each
    hook of a pl.Callback every batch), and the timed window is the module's own epoch hooks' (a stub Trainer
    stands in for Lightning, which the tests never import)."""
    import types

    overhead = _bench_module("overhead")
    given = {}

    class Trainer:
        def __init__(self, **options):
            given.update(options)

        def fit(self, module, train_dataloaders):
            module.clock_start = 1.0  # as the module's on_train_epoch_start and on_train_epoch_end would
            given["batches"] = list(train_dataloaders)
            module.clock_end = 3.5

    runner = object.__new__(overhead.LightningTrainer)
    runner.pl, runner.module = types.SimpleNamespace(Trainer=Trainer), types.SimpleNamespace()
    runner.clock = types.SimpleNamespace(start=0.0, end=0.0)  # (a callback clock, were one still given)
    window, call = runner.run([1, 2, 3])
    assert window == 2.5 and call > 0 and given["batches"] == [1, 2, 3]
    assert not given.get("callbacks"), given


def _check_logging_rows(results: dict) -> None:
    """The logging rows logged to TensorBoard; the bar row drew a complete bar, the other none."""
    passes = 1 + QUICK_ROUNDS  # warm-up pass, then one per round
    for workload in WORKLOADS:
        for key in ("logging", "logging_bar"):
            extra = results[workload][key]["extra"]
            assert extra["passes"] == passes, (workload, key, extra)
            # every call reopens the writer (finalized at the end of each fit), and epoch means are logged
            assert extra["event_files"] == passes and extra["event_bytes"] > 0, (workload, key, extra)
        assert "terminal_chars_written" not in results[workload]["logging"]["extra"]
        bar = results[workload]["logging_bar"]["extra"]
        assert bar["terminal_redraws"] >= 2 * passes, bar  # at least the opening and closing frames
        assert bar["terminal_bytes_received"] >= bar["terminal_chars_written"] > 0, bar  # it reached the terminal
        frame = bar["terminal_last_frame"]
        # the closing frame of the last epoch, as tqdm formats it: description, count, loss postfix
        assert frame.startswith(f"epoch {passes - 1}: 100%"), frame
        assert f"{QUICK_STEPS}/{QUICK_STEPS}" in frame and "train/loss=" in frame, frame


def test_bad_options_are_refused_by_name():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--rounds", "0"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "--rounds must be >= 1" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "raw,lightspeed"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "lightspeed" in proc.stderr
