"""The loggers: run folders, file formats read back with their own readers, rank-0-only writing."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import threading
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import loopkit
from loopkit import loggers as loggers_module
from loopkit.loggers import ConsoleLogger, CSVLogger, JSONLLogger, TensorBoardLogger, claim_version_dir


def read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def read_csv(log_dir: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(os.path.join(log_dir, "metrics.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# --- run folders ---------------------------------------------------------------------------------


def test_each_logger_takes_the_next_version_and_never_overwrites(tmp_path):
    first = CSVLogger(tmp_path, "exp")
    first.log_metrics({"loss": 1.0}, 1)
    before = open(os.path.join(first.log_dir, "metrics.csv")).read()
    second = CSVLogger(tmp_path, "exp")
    second.log_metrics({"loss": 2.0}, 1)
    assert os.path.relpath(first.log_dir, tmp_path) == os.path.join("exp", "version_0")
    assert os.path.relpath(second.log_dir, tmp_path) == os.path.join("exp", "version_1")
    assert open(os.path.join(first.log_dir, "metrics.csv")).read() == before
    other = JSONLLogger(tmp_path, "other")  # another name counts on its own
    assert os.path.basename(other.log_dir) == "version_0"



@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_version_is_the_number_of_the_folder_the_logger_writes_to_once_claimed(tmp_path, make):
    """Reference: the ``version_N`` folder each logger writes to (``log_dir``). ``logger.version`` stayed None after
    the logger wrote ``version_0`` (Lightning's gives 0); it is now N once the folder is claimed, that of the leader
    for a logger sharing its folder, and the next one after a fresh fit moves the logger on; a given version as
    given."""

    def number(logger):
        return int(os.path.basename(logger.log_dir).split("_")[1])

    first, second = make(tmp_path, "exp"), make(tmp_path, "exp")
    assert first.version is None and not os.path.exists(tmp_path / "exp")  # (reading it claims nothing)
    first.resume_at(0)  # (a fit from a fresh state, as with_logging tells it)
    first.log_metrics({"loss": 1.0}, 1)
    second.log_metrics({"loss": 1.0}, 1)
    assert (first.version, second.version) == (number(first), number(second)) == (0, 1)
    follower = CSVLogger(tmp_path, "shared") if make is not CSVLogger else JSONLLogger(tmp_path, "shared")
    leader = make(tmp_path, "shared")
    CSVLogger(tmp_path, "shared").log_metrics({"loss": 1.0}, 1)  # (another run takes version_0 first)
    assert follower.share_run_dir(leader) and follower.version is None
    leader.log_metrics({"loss": 1.0}, 1)
    assert follower.version == leader.version == number(follower) == 1
    first.finalize()
    first.resume_at(0)  # another fit from a fresh state after one it logged: the next free version
    first.log_metrics({"loss": 2.0}, 1)
    assert first.version == number(first) == 2
    assert make(tmp_path, "exp", version=7).version == 7 and make(tmp_path, "exp", version="fold0").version == "fold0"
    first.finalize(), second.finalize(), leader.finalize(), follower.finalize()


def test_log_hyperparams_is_log_hparams_under_lightnings_name(tmp_path):
    """Reference: a logger given the same calls through ``log_hparams``. (``log_hyperparams``, as Lightning's
    loggers name it, raised AttributeError.)"""
    by_lightnings_name, by_ours = CSVLogger(tmp_path, "a"), CSVLogger(tmp_path, "b")
    by_lightnings_name.log_hyperparams({"lr": 0.1, "model": {"depth": 2}})
    by_lightnings_name.log_hyperparams({"batch_size": 8}, {"val/loss": 0.5})
    by_ours.log_hparams({"lr": 0.1, "model": {"depth": 2}})
    by_ours.log_hparams({"batch_size": 8}, {"val/loss": 0.5})
    by_lightnings_name.finalize(), by_ours.finalize()
    assert by_lightnings_name.hparams == by_ours.hparams
    assert _hparams_json(by_lightnings_name.log_dir) == _hparams_json(by_ours.log_dir)

def test_version_counts_up_past_gaps_and_ignores_other_folders(tmp_path):
    for name in ("version_0", "version_3", "version_x", "notes"):
        os.makedirs(tmp_path / "exp" / name)
    assert os.path.basename(CSVLogger(tmp_path, "exp").log_dir) == "version_4"


def test_claim_retries_when_another_run_takes_the_number_first(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "version_0")
    real = loggers_module._next_version
    calls = []

    def stale_first(base):  # the first look sees a listing from before another run created version_0
        calls.append(base)
        return 0 if len(calls) == 1 else real(base)

    monkeypatch.setattr(loggers_module, "_next_version", stale_first)
    assert os.path.basename(claim_version_dir(str(tmp_path))) == "version_1"
    assert len(calls) == 2
    assert os.listdir(tmp_path / "version_0") == []  # the other run's folder was left alone


def test_runs_starting_at_once_get_distinct_folders(tmp_path):
    barrier = threading.Barrier(12)
    claimed: list[str] = []

    def start():
        barrier.wait()
        claimed.append(CSVLogger(tmp_path, "race").log_dir)

    threads = [threading.Thread(target=start) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(os.path.basename(p) for p in claimed) == sorted(f"version_{i}" for i in range(12))


def test_explicit_version_reuses_its_folder_and_the_csv_continues(tmp_path):
    logger = CSVLogger(tmp_path, "exp", version=2)
    logger.log_metrics({"a": 1.0}, 1)
    assert os.path.basename(logger.log_dir) == "version_2"
    again = CSVLogger(tmp_path, "exp", version=2)  # continuing the run: the file is extended, not replaced
    again.log_metrics({"b": 2.0}, 2)
    columns, rows = read_csv(again.log_dir)
    assert columns == ["step", "a", "b"]
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("1", "1.0", ""), ("2", "", "2.0")]
    assert os.path.basename(CSVLogger(tmp_path, "exp", version="named").log_dir) == "named"


def _events_in(folder) -> list:
    """Every event of every event file in ``folder``, read with TensorBoard's own loader, in file-name order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    names = sorted(n for n in os.listdir(folder) if n.startswith("events.out.tfevents"))
    return [e for n in names for e in EventFileLoader(os.path.join(folder, n)).Load()]


def _crashed_run(tmp_path, make, steps=(1, 2, 3, 4)):
    """A logger of version 0 that logged ``train/loss`` = 1/step at ``steps`` and was never finalized."""
    logger = make(tmp_path, "run", version=0)
    for step in steps:
        logger.log_metrics({"train/loss": 1 / step}, step)
    return logger


#: a run's records, as a fit logs them: at step 2 a checkpoint is saved after the training window and the
#: per-step learning rate, before the validation and the epoch record (which log the rate again)
_BEFORE = [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5}), (2, {"lr": 0.1})]
_AFTER = [(2, {"val/acc": 0.25}), (2, {"epoch": 0.0, "lr": 0.1}), (3, {"train/loss": 0.3}),
          (4, {"train/loss": 0.2, "val/acc": 0.75})]


def _logged(folder, make):
    """What a logger of kind ``make`` left in ``folder``: the file's text, or each TensorBoard scalar series."""
    if make is TensorBoardLogger:
        events = read_events(folder)
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    with open(os.path.join(folder, make.filename)) as f:
        return f.read()


def _log_all(logger, records):
    for step, metrics in records:
        logger.log_metrics(metrics, step)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_resume_at_drops_what_the_folder_holds_after_the_step_and_replaces_what_is_logged_again_there(tmp_path, make):
    """Reference: the records logged once, straight. The crashed run logged past its checkpoint of step 2
    (other values there, and a step 5); the resumed one logs the records after the checkpoint again."""
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, _BEFORE + _AFTER)
    straight.finalize()
    crashed = make(tmp_path / "b", "run", version=0)
    _log_all(crashed, _BEFORE + [(step, {k: v + 1 for k, v in m.items()}) for step, m in _AFTER] + [(5, {"lr": 0.5})])
    crashed.finalize()
    resumed = make(tmp_path / "b", "run", version=0)
    resumed.resume_at(2)
    _log_all(resumed, _AFTER)
    resumed.finalize()
    assert _logged(resumed.log_dir, make) == _logged(straight.log_dir, make)
    if make is TensorBoardLogger:  # and a TensorBoard that read the crashed run's files drops steps 3 on
        starts = [e for e in _events_in(resumed.log_dir) if e.HasField("session_log")]
        assert [(e.step, e.session_log.status) for e in starts] == [(3, 1)]  # SessionLog.START


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_logger_that_has_written_rewinds_to_an_earlier_step_and_goes_on_from_its_last_step(tmp_path, make):
    """A fit retried in the same process with the same logger, from a checkpoint of step 2: its records after
    step 2 go; a second fit going on from where the first ended drops nothing (reference: logged once, straight)."""
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, _BEFORE + _AFTER + [(6, {"train/loss": 0.1})])
    straight.finalize()
    logger = make(tmp_path / "b", "run", version=0)
    _log_all(logger, _BEFORE + [(2, {"val/acc": 0.5}), (3, {"train/loss": 9.0})])  # failed after step 3
    logger.resume_at(2)
    _log_all(logger, _AFTER)
    logger.resume_at(4)
    _log_all(logger, [(6, {"train/loss": 0.1})])
    logger.finalize()
    assert _logged(logger.log_dir, make) == _logged(straight.log_dir, make)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_fresh_run_into_a_version_folder_replaces_the_earlier_records_with_a_warning(tmp_path, make):
    earlier = make(tmp_path, "run", version=0)
    earlier.log_hparams({"lr": 0.1, "old": True})
    _log_all(earlier, _BEFORE + _AFTER)
    earlier.finalize()
    fresh = make(tmp_path, "run", version=0)
    fresh.resume_at(0)
    with pytest.warns(UserWarning, match="replaces them"):
        _log_all(fresh, [(1, {"train/loss": 2.0})])
    fresh.finalize()
    reference = make(tmp_path / "ref", "run", version=0)
    _log_all(reference, [(1, {"train/loss": 2.0})])
    reference.finalize()
    assert _logged(fresh.log_dir, make) == _logged(reference.log_dir, make)
    assert not [v for e in _events_in(fresh.log_dir) for v in e.summary.value if v.tag.startswith("_hparams_/")]


def _hparams_json(folder):
    with open(os.path.join(folder, "hparams.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_fresh_fit_after_one_a_logger_of_no_fixed_version_logged_takes_the_next_version(tmp_path, make, caplog):
    """Cross-validation with one logger: each fold's fit starts from a fresh state (step 0). The second fold's
    first write dropped the first fold's records, with a warning ("replaces them"), so the folder ended with the
    last fold alone (Lightning's CSVLogger reused over Trainers keeps every fold). A fresh fit after one this
    logger logged is another run: the next version_N, as SPEC's "N counting up per run" (hyper-parameters
    written there again, said once at INFO). References: the first folder as the first fold left it, and a logger
    made anew for the second fold. Records logged before the first fit (step 0) and a retry from a checkpoint
    (step 2) stay in their folder, as before."""
    folds = [_BEFORE + _AFTER, [(1, {"train/loss": 7.0}), (2, {"val/acc": 0.5}), (3, {"train/loss": 6.0})]]
    logger = make(tmp_path / "reused", "cv")
    logger.log_hparams({"lr": 0.1})
    _log_all(logger, [(0, {"val/acc": 0.125})])  # before the first fit: kept by it, no move
    logger.resume_at(0)
    _log_all(logger, folds[0][:3] + [(3, {"train/loss": 9.0})])  # failed after step 3
    first = logger.log_dir
    logger.resume_at(2)  # a retry from a checkpoint of step 2: rewinds in its folder, as before
    _log_all(logger, folds[0][3:])
    logger.finalize()
    assert logger.log_dir == first
    kept = _logged(first, make)
    with caplog.at_level("INFO", logger="loopkit.loggers"), warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing of the first fold replaced)
        logger.resume_at(0)
        _log_all(logger, folds[1])
        logger.finalize()
    assert os.path.basename(first) == "version_0" and os.path.basename(logger.log_dir) == "version_1"
    moved = [r.getMessage() for r in caplog.records if r.name == "loopkit.loggers"]
    assert len(moved) == 1 and first in moved[0] and logger.log_dir in moved[0]
    straight = make(tmp_path / "a", "cv")
    straight.log_hparams({"lr": 0.1})
    _log_all(straight, [(0, {"val/acc": 0.125})] + folds[0])
    straight.finalize()
    fresh = make(tmp_path / "b", "cv")
    fresh.log_hparams({"lr": 0.1})
    fresh.resume_at(0)
    _log_all(fresh, folds[1])
    fresh.finalize()
    assert _logged(first, make) == kept == _logged(straight.log_dir, make)
    assert _logged(logger.log_dir, make) == _logged(fresh.log_dir, make)
    assert _hparams_json(first) == _hparams_json(logger.log_dir) == {"lr": 0.1}
    if make is TensorBoardLogger:  # the HPARAMS tab: one summary in each folder, the fold's own final metrics
        for folder, reference in ((first, straight.log_dir), (logger.log_dir, fresh.log_dir)):
            infos = [_hparams_content(read_events(f))["_hparams_/session_start_info"].session_start_info.hparams
                     for f in (folder, reference)]
            assert infos[0] == infos[1]
            tags = [v.tag for e in _events_in(folder) for v in e.summary.value if v.tag.startswith("_hparams_/")]
            assert tags == ["_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"]


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_fit_going_on_from_a_state_logged_to_another_folder_leaves_the_run_this_logger_wrote_since(tmp_path, make):
    """Model A's fit (version_0), then model B's (version_1), then A going on from its state of step 2: its
    resume_at(2) rewound version_1, B's folder, dropping B's records after step 2. Told first where A's rows went
    (``continues_from``, as with_logging does from the state), the logger leaves version_1 as it was for version_2,
    with a warning naming both. Reference: B's folder read before. Told its own folder (a retry), or with a fixed
    version, it stays and rewinds as before."""
    logger = make(tmp_path, "r")
    logger.resume_at(0)
    _log_all(logger, _BEFORE)
    a_dir = logger.log_dir
    logger.resume_at(0)
    _log_all(logger, _BEFORE + _AFTER)
    b_dir = logger.log_dir
    kept = _logged(b_dir, make)
    with pytest.warns(UserWarning, match="version_0.*version_1"):
        logger.continues_from(a_dir)
    logger.resume_at(2, 0, 1)
    _log_all(logger, [(3, {"train/loss": 9.0})])
    logger.finalize()
    assert [os.path.basename(f) for f in (a_dir, b_dir, logger.log_dir)] == ["version_0", "version_1", "version_2"]
    assert _logged(b_dir, make) == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.continues_from(logger.log_dir)  # (its own folder: a retry goes on there)
        assert os.path.basename(logger.log_dir) == "version_2"
        pinned = make(tmp_path, "r", version=1)
        pinned.resume_at(2)
        _log_all(pinned, [(3, {"train/loss": 8.0})])
        pinned.continues_from(a_dir)  # (a fixed version: the folder named)
        assert pinned.log_dir == b_dir



@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_folder_claimed_for_a_fit_that_wrote_no_record_is_left_by_the_next_fresh_fit(tmp_path, make, caplog):
    """Model A's fit claims its folder at its first step (``claim_for_fit``, as with_logging does) and fails before
    its first record, its hyper-parameters written as it ends; model B's fresh fit next wrote its records into
    version_0 (A logged nothing there), which A's state records: A going on from it rewound them. Now B takes
    version_1, said at INFO, and version_0 holds none of its records. A retry from A's own state goes on in its
    folder, and a fixed version stays, as before."""
    logger = make(tmp_path, "r")
    logger.log_hparams({"lr": 0.1})
    logger.resume_at(0)
    a_dir = logger.claim_for_fit()
    logger.finalize("failed")  # (hparams.json written: the fit's resume_at applied in version_0)
    with caplog.at_level("INFO", logger="loopkit.loggers"):
        logger.resume_at(0)  # (model B, fresh)
    _log_all(logger, _BEFORE)
    logger.finalize()
    b_dir = logger.log_dir
    assert [os.path.basename(f) for f in (a_dir, b_dir)] == ["version_0", "version_1"]
    assert len([r for r in caplog.records if "version_1" in r.getMessage()]) == 1
    assert os.path.exists(os.path.join(a_dir, "hparams.json"))
    if make is TensorBoardLogger:
        assert _logged(a_dir, make) == {}
    else:
        assert not os.path.exists(os.path.join(a_dir, make.filename))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retried = make(tmp_path, "s")
        retried.resume_at(0)
        folder = retried.claim_for_fit()
        retried.finalize("failed")
        retried.continues_from(folder)  # (A again from the state its failure left, at step 2)
        retried.resume_at(2, 0, 2)
        _log_all(retried, [(4, {"train/loss": 0.3})])
        assert retried.log_dir == folder
        pinned = make(tmp_path, "p", version=0)
        pinned.resume_at(0)
        folder = pinned.claim_for_fit()
        pinned.resume_at(0)
        assert pinned.log_dir == folder

def test_writes_before_a_resumed_fit_do_not_keep_the_crashed_runs_records(tmp_path):
    """A script that reads log_dir, logs hyper-parameters or writes through tb.writer before run_epochs: the
    resume_at of the fit's beginning still applies (the writer's file is closed and rewritten with the rest)."""
    straight = TensorBoardLogger(tmp_path / "a", "run", version=0), CSVLogger(tmp_path / "a", "run", version=0)
    crashed = TensorBoardLogger(tmp_path / "b", "run", version=0), CSVLogger(tmp_path / "b", "run", version=0)
    for logger in straight + crashed:
        logger.log_hparams({"lr": 0.1})
    for logger in straight:
        _log_all(logger, _BEFORE + _AFTER)
    for logger in crashed:
        _log_all(logger, _BEFORE + [(step, {k: v + 1 for k, v in m.items()}) for step, m in _AFTER])
    for logger in straight + crashed:
        logger.finalize()
    tb, csv_logger = TensorBoardLogger(tmp_path / "b", "run", version=0), CSVLogger(tmp_path / "b", "run", version=0)
    tb.writer.add_text("config", "lr=0.1", 0)
    assert csv_logger.log_dir
    for logger in (tb, csv_logger):
        logger.log_hparams({"lr": 0.1})
        logger.resume_at(2)  # (run_epochs, as the fit begins)
        _log_all(logger, _AFTER)
        logger.finalize()
    for logger, reference in zip((tb, csv_logger), straight):
        assert _logged(logger.log_dir, type(logger)) == _logged(reference.log_dir, type(reference))
    metrics = [[m.name.tag for m in _hparams_content(read_events(lg.log_dir))["_hparams_/experiment"].experiment.metric_infos]
               for lg in (tb, straight[0])]
    assert metrics[0] == metrics[1] == ["train/loss", "lr", "val/acc"]  # the HPARAMS tab's, as unresumed
    assert len(read_events(tb.log_dir).Tensors("config/text_summary")) == 1  # the writer's text, once


def test_a_fresh_run_keeps_what_its_own_logger_wrote_before_the_fit_and_a_fit_going_on_reopens_nothing(tmp_path):
    """Replacing an earlier run (step 0) drops the earlier run's records, not the text and hyper-parameters the new
    run's logger wrote just before its fit; a fit continuing from the last one's step keeps writing its file."""
    _log_all(_crashed_run(tmp_path, TensorBoardLogger), [])
    logger = TensorBoardLogger(tmp_path, "run", version=0)
    logger.writer.add_text("config", "lr=0.1", 0)
    logger.log_hparams({"lr": 0.1})
    assert logger.log_dir and os.path.exists(os.path.join(logger.log_dir, "hparams.json"))
    logger.open()
    logger.resume_at(0)  # the fit begins
    with pytest.warns(UserWarning, match="replaces them"):
        logger.log_metrics({"train/loss": 2.0}, 1)
    opened = logger._file.path
    logger.resume_at(1)  # a second fit, from where the first ended
    logger.log_metrics({"train/loss": 1.0}, 2)
    assert logger._file.path == opened
    logger.finalize()
    events = read_events(logger.log_dir)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0)]
    assert len(events.Tensors("config/text_summary")) == 1
    assert os.path.exists(os.path.join(logger.log_dir, "hparams.json"))


def test_a_tensorboard_logger_reopened_many_times_in_one_second_keeps_its_files_in_order(tmp_path):
    """TensorBoard reads a folder's event files in name order: the 10th reopen sorted before the 2nd."""
    logger = TensorBoardLogger(tmp_path)
    for step in range(1, 13):
        logger.log_metrics({"train/loss": float(step)}, step)
        logger.finalize()
    assert [e.step for e in read_events(logger.log_dir).Scalars("train/loss")] == list(range(1, 13))


def test_resume_at_drops_the_torn_last_row_of_a_killed_csv_run(tmp_path):
    crashed = _crashed_run(tmp_path, CSVLogger, steps=(1, 2))
    with open(os.path.join(crashed.log_dir, "metrics.csv"), "a") as f:
        f.write("3,0.3")  # killed mid-write: "3,0.33" would have been a whole row with its newline
    resumed = CSVLogger(tmp_path, "run", version=0)
    resumed.resume_at(2)
    resumed.log_metrics({"train/loss": 0.25}, 3)
    assert [(r["step"], r["train/loss"]) for r in read_csv(resumed.log_dir)[1]] == [("1", "1.0"), ("2", "0.5"), ("3", "0.25")]


@pytest.mark.parametrize("torn", ["2", "20,0.0", "20"])
def test_a_torn_last_row_is_dropped_even_where_its_step_would_be_kept(tmp_path, torn):
    """Killed mid-write of a row after step 30's: read back, the fragment is a row of step 2 or 20, which a
    resume at step 20 keeps (while it drops step 30's, rewriting the file); it is dropped as torn, not written
    back as a whole row, and the next row starts a line of its own."""
    crashed = _crashed_run(tmp_path, CSVLogger, steps=(10, 20, 30))
    with open(os.path.join(crashed.log_dir, "metrics.csv"), "a") as f:
        f.write(torn)
    resumed = CSVLogger(tmp_path, "run", version=0)
    resumed.resume_at(20)
    resumed.log_metrics({"train/loss": 0.04}, 25)
    with open(os.path.join(resumed.log_dir, "metrics.csv"), newline="") as f:
        assert f.read() == "step,train/loss\r\n10,0.1\r\n20,0.05\r\n25,0.04\r\n"


@pytest.mark.parametrize("metrics", [{"train/loss": 0.04}, {"val/acc": 0.5}])  # (appended; a new column: rewritten)
def test_a_run_continued_without_resume_at_drops_a_torn_last_row_first(tmp_path, metrics):
    """A fixed version logged to again in a loop of one's own (no resume_at): the fragment "2" of a killed
    write is dropped, not run on into the next row ("225,0.04": a row of step 225) nor kept as a row of step 2."""
    crashed = _crashed_run(tmp_path, CSVLogger, steps=(10, 20))
    with open(os.path.join(crashed.log_dir, "metrics.csv"), "a") as f:
        f.write("2")
    again = CSVLogger(tmp_path, "run", version=0)
    again.log_metrics(metrics, 25)
    again.log_metrics({"train/loss": 0.03}, 30)
    columns, rows = read_csv(again.log_dir)
    assert columns == ["step", *{"train/loss": None, **metrics}]
    assert [{k: v for k, v in row.items() if v} for row in rows] == [
        {"step": "10", "train/loss": "0.1"}, {"step": "20", "train/loss": "0.05"},
        {"step": "25", **{k: str(v) for k, v in metrics.items()}}, {"step": "30", "train/loss": "0.03"},
    ]


def test_a_foreign_csv_without_a_last_newline_is_refused_and_left_as_it_is(tmp_path):
    folder = tmp_path / "run" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,loss\n5,0.1")  # its last row is whole: only a CSVLogger's is cut
    with pytest.raises(ValueError, match="metrics.csv.*not written by a CSVLogger.*'epoch'"):
        CSVLogger(tmp_path, "run", version=0).log_metrics({"loss": 0.2}, 2)
    assert (folder / "metrics.csv").read_text() == "epoch,loss\n5,0.1"


def _file_bytes(logger) -> bytes:
    with open(os.path.join(logger.log_dir, type(logger).filename), "rb") as f:
        return f.read()


def _tear(logger, cut: int) -> None:
    """A kill mid-write of the file's last record: its last ``cut`` bytes never written."""
    path = os.path.join(logger.log_dir, type(logger).filename)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-cut])


@pytest.mark.parametrize("resume", [None, 30])
def test_a_csv_row_torn_between_its_cr_and_lf_is_kept_and_its_line_ended(tmp_path, resume):
    """CSVLogger ends each row with the csv module's "\\r\\n": a file ending in "\\r" lost only the "\\n" of a
    whole row. Continued (a loop of one's own, or resumed at that row's step), the file is what a run never
    killed writes: the row kept, not dropped as torn."""
    reference = _crashed_run(tmp_path / "ref", CSVLogger, steps=(10, 20, 30, 35))
    crashed = _crashed_run(tmp_path, CSVLogger, steps=(10, 20, 30))
    assert _file_bytes(crashed).endswith(b"\r\n")
    _tear(crashed, 1)
    again = CSVLogger(tmp_path, "run", version=0)
    if resume is not None:
        again.resume_at(resume)
    again.log_metrics({"train/loss": 1 / 35}, 35)
    assert _file_bytes(again) == _file_bytes(reference)


@pytest.mark.parametrize(("crashed", "cut", "then"), [
    ((10, 20, 30), 1, (40,)),  # only step 30's newline lost: its record is whole
    ((10, 20, 30), 5, (30, 40)),  # torn inside a value
    ((10, 20, 30), 30, (30, 40)),  # torn inside a name
    ((10,), 5, (10, 20)),  # the first record torn: no whole line in the file
], ids=["newline", "mid-value", "mid-name", "first-record"])
def test_a_jsonl_run_continued_without_resume_at_after_a_kill_mid_write_is_what_an_uninterrupted_run_writes(
        tmp_path, crashed, cut, then):
    """A fixed version logged to again in a loop of one's own (no resume_at), after a kill while the last line
    was written: a torn fragment is dropped, not run on into the next record (a line no reader can read); a
    record that lost only its newline is kept, its line ended."""
    reference = _crashed_run(tmp_path / "ref", JSONLLogger, steps=sorted({*crashed, *then}))
    _tear(_crashed_run(tmp_path, JSONLLogger, steps=crashed), cut)
    again = JSONLLogger(tmp_path, "run", version=0)
    _log_all(again, [(step, {"train/loss": 1 / step}) for step in then])
    assert _file_bytes(again) == _file_bytes(reference)


@pytest.mark.parametrize(("logger", "held"), [
    (CSVLogger, b"step,train/loss\r"),  # torn between its "\r" and "\n"
    (CSVLogger, b"step,tra"), (CSVLogger, b"step,"), (CSVLogger, b"ste"),  # torn before (a power loss: a header is
    # written by a rename)
    (JSONLLogger, b'{"ste'), (JSONLLogger, b"{"),  # the first record torn before its '{"step": ' was written
], ids=["csv-cr", "csv-mid-name", "csv-comma", "csv-ste", "jsonl-ste", "jsonl-brace"])
@pytest.mark.parametrize("resume", [None, 0])
def test_a_file_holding_only_a_torn_first_line_is_what_an_uninterrupted_run_writes(tmp_path, logger, held, resume):
    """A run killed as its first write ended. CSV torn at the "\r": the header was whole but left unended, so the
    next row ran on from it ("step,train/loss\r1,0.5\r\n": one line for line-based tools); torn before, it holds
    no record, and was kept as the first columns ('tra' a bogus one). JSONL: the fragment is the start of a
    JSONLLogger's line, not another program's file; it is dropped. Reference: an uninterrupted run's file."""
    reference = _crashed_run(tmp_path / "ref", logger, steps=(1, 2))
    filename = "metrics.csv" if logger is CSVLogger else "metrics.jsonl"
    folder = tmp_path / "run" / "version_0"
    folder.mkdir(parents=True)
    (folder / filename).write_bytes(held)
    again = logger(tmp_path, "run", version=0)
    if resume is not None:
        again.resume_at(resume)
    _log_all(again, [(step, {"train/loss": 1 / step}) for step in (1, 2)])
    assert _file_bytes(again) == _file_bytes(reference)


@pytest.mark.parametrize(("cut", "resume"), [(1, 30), (1, 20), (5, 30), (5, 20)])
def test_a_jsonl_run_resumed_after_a_kill_mid_write_is_what_an_uninterrupted_run_writes(tmp_path, cut, resume):
    """Resumed at a step that keeps the last record (30) or drops it (20): a record that lost only its newline
    is kept or dropped as a whole one is, and the next record starts a line of its own (it ran on from the kept
    record when the resume dropped nothing); a torn fragment is dropped either way."""
    reference = _crashed_run(tmp_path / "ref", JSONLLogger, steps=(10, 20, 30, 40))
    _tear(_crashed_run(tmp_path, JSONLLogger, steps=(10, 20, 30)), cut)
    resumed = JSONLLogger(tmp_path, "run", version=0)
    resumed.resume_at(resume)
    _log_all(resumed, [(step, {"train/loss": 1 / step}) for step in (30, 40) if step > resume or cut > 1])
    assert _file_bytes(resumed) == _file_bytes(reference)


@pytest.mark.parametrize("resume", [None, 1])
def test_a_foreign_jsonl_is_refused_and_left_as_it_is(tmp_path, resume):
    """A metrics.jsonl another program wrote (its last line unfinished too): neither cut nor rewritten, nor
    written to."""
    folder = tmp_path / "run" / "version_0"
    folder.mkdir(parents=True)
    foreign = '{"epoch": 5, "loss": 0.1}\nnot json\n{"epoch": 6, "lo'
    (folder / "metrics.jsonl").write_text(foreign)
    logger = JSONLLogger(tmp_path, "run", version=0)
    if resume is not None:
        logger.resume_at(resume)
        assert logger.log_dir
        logger.log_hparams({"lr": 0.1})  # (written into the folder now: the resume applied first)
    with pytest.raises(ValueError, match=r"metrics.jsonl was not written by a JSONLLogger.*first line.*step"):
        logger.log_metrics({"loss": 0.2}, 2)
    assert (folder / "metrics.jsonl").read_text() == foreign


@pytest.mark.parametrize("make, foreign", [(CSVLogger, "epoch,loss\n5,0.1\n"),
                                           (JSONLLogger, '{"epoch": 5, "loss": 0.1}\n')], ids=["csv", "jsonl"])
def test_a_refused_foreign_file_leaves_the_logger_as_it_was(tmp_path, make, foreign):
    """The refusal comes before the logger changes anything (its pending resume_at, what it tracks of its
    records): once the run's own file is put back, the logger writes what one that never met the foreign file
    writes (without the fix, the resume was spent on the foreign file: the records after step 2 stayed)."""
    reference = _crashed_run(tmp_path / "reference", make, steps=(1, 2, 3))
    own = _file_bytes(reference)
    crashed = _crashed_run(tmp_path / "met", make, steps=(1, 2, 3))
    path = os.path.join(crashed.log_dir, make.filename)
    with open(path, "w") as f:
        f.write(foreign)  # another program's file in the run's folder
    resumed = make(tmp_path / "met", "run", version=0)
    resumed.resume_at(2)
    assert resumed.log_dir
    before = copy.deepcopy(vars(resumed))
    with pytest.raises(ValueError, match=f"{make.filename} was not written by a {make.__name__}"):
        resumed.log_metrics({"train/loss": 0.2}, 3)
    assert vars(resumed) == before
    with open(path) as f:
        assert f.read() == foreign
    with open(path, "wb") as f:
        f.write(own)  # the user puts the run's own file back
    resumed.log_metrics({"train/loss": 0.2}, 3)
    fresh = make(tmp_path / "reference", "run", version=0)
    fresh.resume_at(2)
    fresh.log_metrics({"train/loss": 0.2}, 3)
    assert _file_bytes(resumed) == _file_bytes(fresh)
    assert _file_bytes(fresh).count(b"0.2") == 1 and b"0.3333" not in _file_bytes(fresh)  # step 3 replaced


def _bumped(records):
    """What a crashed run logged instead: other values (an epoch's record still of its epoch)."""
    return [(step, {k: v if k == "epoch" else v + 1 for k, v in m.items()}) for step, m in records]


_LOSS, _VAL = {"train/loss": 0.5}, {"val/acc": 0.25}


@pytest.mark.parametrize(
    "before, after, position",
    [
        # epochs 1 and 2 make no update: epochs 0, 1 and 2 validate and record at step 2; resumed at epoch 2's start
        ([(1, _LOSS), (2, _LOSS), (2, _VAL), (2, {"epoch": 0.0, "train/loss_epoch": 0.7}), (2, _VAL), (2, {"epoch": 1.0})],
         [(2, _VAL), (2, {"epoch": 2.0}), (3, _LOSS), (3, _VAL), (3, {"epoch": 3.0, "train/loss_epoch": 0.5})],
         (2, 2, 0)),
        # epoch 0 makes no update: it records at step 0; resumed at epoch 1's start (step 0, but no fresh run)
        ([(0, _VAL), (0, {"epoch": 0.0})], [(1, _LOSS), (1, _VAL), (1, {"epoch": 1.0, "train/loss_epoch": 0.5})],
         (0, 1, 0)),
        # in epoch 1, which has made no update yet (step 2, as epoch 0's records): its rate at batch 0 was logged
        # before the checkpoint, its validation after (logged again: it replaces the crashed run's, not epoch 0's)
        ([(1, _LOSS), (2, _LOSS), (2, _VAL), (2, {"epoch": 0.0}), (2, {"lr": 0.1})],
         [(2, _VAL), (2, {"epoch": 1.0}), (3, _LOSS)],
         (2, 1, 1)),
    ],
)
@pytest.mark.parametrize("same_logger", [False, True])
@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_resume_at_tells_the_epochs_that_share_a_step_apart(tmp_path, make, same_logger, before, after, position):
    """Reference: the records logged once, straight. Epochs that make no update record at the step of the one before:
    resumed at (step, epoch, batch_index), the records of the epochs before it at that step stay (those of the same
    metrics were dropped when the resumed run logged its own there), and a resume at step 0 past epoch 0 is no fresh
    run (epoch 0's records were dropped, with a warning). In a new logger after a restore, or the crashed one."""
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, before + after)
    straight.finalize()
    crashed = make(tmp_path / "b", "run", version=0)
    _log_all(crashed, before + _bumped(after) + [(9, {"lr": 0.5})])
    crashed.finalize()
    resumed = crashed if same_logger else make(tmp_path / "b", "run", version=0)
    resumed.resume_at(*position)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _log_all(resumed, after)
    resumed.finalize()
    assert _logged(resumed.log_dir, make) == _logged(straight.log_dir, make)


@pytest.mark.parametrize(
    "before, after",
    [
        # the crash came at the end of epoch 0's validation: the retry logs it, then epoch 1 (no update) validates at
        # step 2 too (of the same metrics: it dropped the retry's own epoch-0 validation)
        ([(1, _LOSS), (2, _LOSS)],
         [(2, _VAL), (2, {"epoch": 0.0, "train/loss_epoch": 0.7}), (2, {"val/acc": 0.5}), (2, {"epoch": 1.0}),
          (3, _LOSS)]),
        # the crash came at epoch 0's end, after a validation due at its last update, which the retry does not log
        # again: epoch 1's validation at step 2 dropped the crashed fit's of epoch 0 as the same record logged again
        ([(1, _LOSS), (2, _LOSS), (2, _VAL)],
         [(2, {"epoch": 0.0, "train/loss_epoch": 0.7}), (2, {"val/acc": 0.5}), (2, {"epoch": 1.0}), (3, _LOSS)]),
    ],
)
@pytest.mark.parametrize("same_logger", [False, True])
@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_fit_resumed_where_the_crashed_one_stopped_keeps_what_it_logs_at_a_step_its_epochs_share(
    tmp_path, make, same_logger, before, after
):
    """Reference: the records logged once, straight. The crashed fit logged ``before`` and stopped at the end of
    epoch 0 (step 2, batch 2); the retry (the same logger, or a new one) goes on from there, and epoch 1 makes no
    update: its records are at step 2 too. A record of epoch 1 is not epoch 0's of the same metrics logged again."""
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, before + after)
    straight.finalize()
    crashed = make(tmp_path / "b", "run", version=0)
    _log_all(crashed, before)
    crashed.finalize()
    resumed = crashed if same_logger else make(tmp_path / "b", "run", version=0)
    resumed.resume_at(2, 0, 2)
    _log_all(resumed, after)
    resumed.finalize()
    assert _logged(resumed.log_dir, make) == _logged(straight.log_dir, make)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_fits_rewind_and_redo_never_drop_a_record_the_fit_logged_itself(tmp_path, make):
    """The same logger, resumed at its last step (by step alone): a record of metrics it had logged there (``lr``) is
    logged again, so the records from before the fit are rewound there and that one is replaced; the fit's own
    records at that step (``val/acc``, logged before and after it) all stay. Reference: those records, logged
    straight into a logger of their own."""
    logger = make(tmp_path / "b", "run", version=0)
    _log_all(logger, _BEFORE)
    logger.resume_at(2)
    own = [(2, {"val/acc": 0.25}), (2, {"lr": 0.2}), (2, {"val/acc": 0.5}), (3, {"train/loss": 0.3})]
    _log_all(logger, own)
    logger.finalize()
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, _BEFORE[:-1] + own)
    straight.finalize()
    assert _logged(logger.log_dir, make) == _logged(straight.log_dir, make)


@pytest.mark.parametrize("same_logger", [False, True])
@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_told_again_that_the_fit_goes_on_in_the_cut_epoch_after_a_record_there_drops_the_cuts_record(
    tmp_path, make, same_logger
):
    """Reference: the records logged straight. A fit cut at step 2, mid-epoch 0, recorded the epoch there; the fit
    going on from it (the same logger, or a new one) first logs the validation owed there, told resume_at(2, 0, 2)
    (whether it goes on in the epoch not known yet), then is told again, finishes_epoch=True, and records the epoch
    whole at its end. The cut's record stayed (the logger's last record was at that step), and once it went, the
    validation's went too (logged after the cut's record, the file takes it for epoch 1's)."""
    cut = [(1, _LOSS), (2, _LOSS)]
    after = [(3, {"train/loss": 0.3}), (3, {"epoch": 0.0, "train/loss_epoch": 0.4})]
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, cut + [(2, _VAL)] + after)
    straight.finalize()
    first = make(tmp_path / "b", "run", version=0)
    _log_all(first, cut + [(2, {"epoch": 0.0, "train/loss_epoch": 0.5})])
    first.finalize()
    resumed = first if same_logger else make(tmp_path / "b", "run", version=0)
    resumed.resume_at(2, 0, 2)
    _log_all(resumed, [(2, _VAL)])
    resumed.resume_at(2, 0, 2, finishes_epoch=True)
    _log_all(resumed, after)
    resumed.finalize()
    assert _logged(resumed.log_dir, make) == _logged(straight.log_dir, make)


def _row(epoch, metrics):
    """A row as ``with_logging`` logs it: its metrics with the epoch of its step (as Lightning's rows)."""
    return {"epoch": float(epoch), **metrics}


@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_rows_that_hold_their_epoch_are_told_from_the_epochs_record_when_resumed_mid_epoch(tmp_path, make, cut):
    """Reference: the records logged straight. Every row holds ``epoch`` (as with_logging writes them); the epoch's
    record is the one with its means (``train/loss_epoch``). Resumed in epoch 0 at step 2 (batch 2): the rows of
    that epoch up to step 2 stay, those after go. With ``cut``, a fit cut at step 2 recorded epoch 0 there, and the
    resumed fit goes on in that epoch (``finishes_epoch``): only that record goes, replaced by the whole epoch's."""
    head = [(1, _row(0, {"train/loss": 1.0})), (2, _row(0, {"train/loss": 0.5})), (2, _row(0, {"val/acc": 0.25}))]
    after = [(3, _row(0, {"train/loss": 0.3})), (4, _row(0, {"train/loss": 0.2})),
             (4, _row(0, {"train/loss_epoch": 0.5})), (5, _row(1, {"train/loss": 0.1}))]
    straight = make(tmp_path / "a", "run", version=0)
    _log_all(straight, head + after)
    straight.finalize()
    crashed = make(tmp_path / "b", "run", version=0)
    if cut:  # (the cut's record of epoch 0)
        tail = [(2, _row(0, {"train/loss_epoch": 0.7}))]
    else:  # (the crashed run's rows after the checkpoint)
        tail = [(3, _row(0, {"train/loss": 9.0})), (4, _row(0, {"val/acc": 9.0}))]
    _log_all(crashed, head + tail)
    crashed.finalize()
    resumed = make(tmp_path / "b", "run", version=0)
    resumed.resume_at(2, 0, 2, finishes_epoch=cut)
    _log_all(resumed, after)
    resumed.finalize()
    assert _logged(resumed.log_dir, make) == _logged(straight.log_dir, make)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_folder_without_epoch_records_resumes_by_step_alone(tmp_path, make):
    """A folder whose records hold no epoch (written before the loggers told epochs apart, or by a loop of one's own
    without epoch records): resumed at a position with an epoch, its records at the step stay and those logged again
    there are replaced, as before; those after it go. Reference: the uninterrupted run's file, written out."""
    folder = tmp_path / "run" / "version_0"
    folder.mkdir(parents=True)
    head = [(1, {"train/loss": 1.0}), (2, {"train/loss": 0.5}), (2, {"lr": 0.1})]
    if make is TensorBoardLogger:  # (its event files are as they were)
        _log_all(make(tmp_path, "run", version=0), head + [(2, {"val/acc": 0.5}), (3, {"train/loss": 0.4})])
        straight = make(tmp_path / "ref", "run", version=0)
        _log_all(straight, head + [(2, {"val/acc": 0.25}), (3, {"train/loss": 0.3})])
        straight.finalize()
    elif make is CSVLogger:
        crashed = "step,train/loss,lr,val/acc\n1,1.0,,\n2,0.5,,\n2,,0.1,\n2,,,0.5\n3,0.4,,\n"
        straight = "step,train/loss,lr,val/acc\n1,1.0,,\n2,0.5,,\n2,,0.1,\n2,,,0.25\n3,0.3,,\n"
    else:
        rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}, {"step": 2, "lr": 0.1}]
        crashed = "".join(json.dumps(r) + "\n" for r in rows + [{"step": 2, "val/acc": 0.5}, {"step": 3, "train/loss": 0.4}])
        straight = "".join(json.dumps(r) + "\n" for r in rows + [{"step": 2, "val/acc": 0.25}, {"step": 3, "train/loss": 0.3}])
    if make is not TensorBoardLogger:
        (folder / make.filename).write_text(crashed)
    resumed = make(tmp_path, "run", version=0)
    resumed.resume_at(2, 1, 0)  # at epoch 1's start: the records at step 2, of no known epoch, are placed by step
    _log_all(resumed, [(2, {"val/acc": 0.25}), (3, {"train/loss": 0.3})])
    resumed.finalize()
    if make is TensorBoardLogger:
        assert _logged(str(folder), make) == _logged(straight.log_dir, make)
    else:
        assert (folder / make.filename).read_text() == straight


def test_resume_at_refuses_an_epoch_or_batch_index_that_is_not_a_count(tmp_path):
    for bad in (-1, True, 1.5, "3"):
        for where in ({"epoch": bad}, {"batch_index": bad}):
            with pytest.raises(ValueError, match=f"resume_at: {next(iter(where))} must be an int >= 0"):
                CSVLogger(tmp_path).resume_at(2, **where)


def test_resume_at_refuses_a_step_that_is_not_a_count(tmp_path):
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="resume_at: step must be an int >= 0"):
            CSVLogger(tmp_path).resume_at(bad)


def test_resume_at_drops_the_torn_last_line_of_a_killed_jsonl_run_and_keeps_a_foreign_csv(tmp_path):
    _crashed_run(tmp_path / "j", JSONLLogger, steps=(1, 2))
    path = tmp_path / "j" / "run" / "version_0" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-write
    resumed = JSONLLogger(tmp_path / "j", "run", version=0)
    resumed.resume_at(2)
    resumed.log_metrics({"train/loss": 0.3}, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}, {"step": 3, "train/loss": 0.3}]
    folder = tmp_path / "c" / "run" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,loss\n5,0.1\n")  # not a file a CSVLogger wrote: refused, left as it is
    resumed = CSVLogger(tmp_path / "c", "run", version=0)
    resumed.resume_at(1)
    with pytest.raises(ValueError, match="metrics.csv.*not written by a CSVLogger.*'epoch'"):
        resumed.log_metrics({"loss": 0.2}, 2)
    assert (folder / "metrics.csv").read_text() == "epoch,loss\n5,0.1\n"


def test_a_resumed_tensorboard_run_sorts_after_the_earlier_files_and_keeps_one_set_of_hparams(tmp_path, monkeypatch):
    crashed = _crashed_run(tmp_path, TensorBoardLogger, steps=(1, 2, 3))
    crashed.log_hparams({"lr": 0.1})
    crashed.finalize()
    (name,) = [n for n in os.listdir(crashed.log_dir) if n.startswith("events")]
    parts = name.split(".")
    future = int(parts[3]) + 100  # the earlier run's clock was ahead: TensorBoard reads files in name order
    moved = os.path.join(crashed.log_dir, ".".join(parts[:3] + [str(future)] + parts[4:]))
    os.rename(os.path.join(crashed.log_dir, name), moved)
    with open(moved, "ab") as f:
        f.write(b"\x07\x00\x00")  # a torn record: killed mid-write
    resumed = TensorBoardLogger(tmp_path, "run", version=0)
    resumed.log_hparams({"lr": 0.1})
    resumed.resume_at(1)
    resumed.log_metrics({"train/loss": 0.75}, 2)
    resumed.finalize()
    names = sorted(n for n in os.listdir(resumed.log_dir) if n.startswith("events"))
    assert len(names) == 2 and int(names[1].split(".")[3]) > future
    assert [(e.step, e.value) for e in read_events(resumed.log_dir).Scalars("train/loss")] == [(1, 1.0), (2, 0.75)]
    starts = [v for e in _events_in(resumed.log_dir) for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert len(starts) == 1


def test_nothing_is_created_until_something_is_written(tmp_path):
    TensorBoardLogger(tmp_path).finalize()
    CSVLogger(tmp_path).finalize()
    assert not os.path.exists(tmp_path / "default")


@pytest.mark.filterwarnings("ignore:loopkit. this process is rank:RuntimeWarning")
def test_a_process_torchrun_says_is_rank_1_writes_no_log_or_checkpoint_before_the_process_group_exists(
    tmp_path, monkeypatch
):
    """torchrun's ``RANK`` says which process writes until ``loopkit.distributed.init()`` makes the group (as
    Lightning's ``rank_zero_only.rank``): rank 1 makes no version folder and no checkpoint folder, writes no record."""
    assert not torch.distributed.is_initialized()
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    with pytest.warns(RuntimeWarning, match="rank 1 of 2 by its environment .* rank 0 alone writes logs and checkpoints"):
        assert not loopkit.distributed.is_rank_zero() and loopkit.distributed.rank() == 0  # (no group yet)
    loggers = [CSVLogger(tmp_path), TensorBoardLogger(tmp_path, "tb"), JSONLLogger(tmp_path, "j", version=0)]
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), *loggers, every_n_steps=1)
    step = loopkit.with_checkpointing(step, tmp_path / "ckpt", every_n_steps=1)
    for logger in loggers:
        logger.log_hparams({"lr": 0.1})
    loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 2, epochs=1, progress=False)
    assert os.listdir(tmp_path) == []
    assert loggers[0].log_dir == str(tmp_path / "default" / "version_0")  # the folder rank 0 is likely to take
    monkeypatch.setenv("RANK", "0")
    assert loopkit.distributed.is_rank_zero()
    loggers[0].log_metrics({"loss": 1.0}, step=1)
    assert os.listdir(tmp_path) == ["default"]


def test_log_hparams_before_init_on_a_rank_that_does_not_write_is_unwarned(tmp_path, monkeypatch):
    """The README's ``logger.log_hparams(cfg)`` at the top of a torchrun script, before ``distributed.init()``:
    rank 1 warned that it writes nothing without a group (meant for independent processes under torchrun), for a
    call made there by design. Now it is quiet and writes nothing; a record logged there without a group still
    warns."""
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    loggers = [CSVLogger(tmp_path), TensorBoardLogger(tmp_path, "tb"), JSONLLogger(tmp_path, "j", version=0),
               ConsoleLogger()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logger in loggers:
            logger.log_hparams({"lr": 0.1}, {"best/loss": 1.0})
    assert not caught and os.listdir(tmp_path) == [] and loggers[0].hparams == {"lr": 0.1}
    with pytest.warns(RuntimeWarning, match="rank 1 of 2 by its environment"):
        loggers[0].log_metrics({"loss": 1.0}, step=1)


@pytest.mark.parametrize("world_size", [None, "1"])
def test_a_rank_left_in_the_environment_of_a_single_process_does_not_stop_its_writes(tmp_path, monkeypatch, world_size):
    """A RANK leaked into one process (a notebook started from a job's shell): no WORLD_SIZE above 1, so it is
    the only process and writes its logs and checkpoints, as Lightning's ModelCheckpoint does with devices=1."""
    monkeypatch.setenv("RANK", "1")
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    assert loopkit.distributed.is_rank_zero()
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), CSVLogger(tmp_path), every_n_steps=1)
    step = loopkit.with_checkpointing(step, tmp_path / "ckpt", every_n_steps=1)
    loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 2, epochs=1, progress=False)
    assert (tmp_path / "default" / "version_0" / "metrics.csv").is_file()
    assert [c.step for c in loopkit.checkpoint.list_checkpoints(tmp_path / "ckpt")][-1] == 2


def test_loggers_of_one_root_and_name_can_share_a_run_folder(tmp_path):
    tb, csv_logger, jsonl = TensorBoardLogger(tmp_path), CSVLogger(tmp_path), JSONLLogger(tmp_path)
    csv_logger.log_hparams({"lr": 0.1})  # held back: the folder is not claimed yet
    assert csv_logger.share_run_dir(tb) and jsonl.share_run_dir(csv_logger)
    for logger in (tb, csv_logger, jsonl):
        logger.log_metrics({"loss": 1.0}, 1)
        logger.finalize()
    assert tb.log_dir == csv_logger.log_dir == jsonl.log_dir
    assert os.listdir(tmp_path / "default") == ["version_0"]
    assert json.load(open(os.path.join(tb.log_dir, "hparams.json"))) == {"lr": 0.1}
    # a different name, a fixed version, or a folder already claimed is not shared
    assert not CSVLogger(tmp_path, "other").share_run_dir(tb)
    assert not CSVLogger(tmp_path, version=5).share_run_dir(tb)
    claimed = CSVLogger(tmp_path)
    claimed.log_metrics({"loss": 1.0}, 1)
    assert not claimed.share_run_dir(tb) and claimed.log_dir != tb.log_dir


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda p: CSVLogger(p, "../b"), ValueError),
        (lambda p: CSVLogger(p, 3), TypeError),
        (lambda p: CSVLogger(p, version=-1), ValueError),
        (lambda p: CSVLogger(p, version=1.5), TypeError),
        (lambda p: CSVLogger(42), TypeError),
        (lambda p: TensorBoardLogger(p, histogram_every_n_steps=0), ValueError),
        (lambda p: ConsoleLogger(digits=0), ValueError),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, make, error):
    with pytest.raises(error, match=r"(name|version|root|histogram_every_n_steps|digits)"):
        make(tmp_path)


@pytest.mark.parametrize("version", [None, 3, "fold0/seed1"])
def test_a_file_in_the_run_folders_way_is_refused_when_built_naming_the_logger(tmp_path, version):
    """A file at root/name (or on the way to the folder a fixed version names) was accepted, and the fit's first step
    raised os.makedirs' bare FileExistsError with its state lost; the root alone was checked."""
    (tmp_path / "run").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "version_3").write_text("x")
    (tmp_path / "other" / "fold0").write_text("x")
    for make in (loopkit.CSVLogger, loopkit.JSONLLogger, loopkit.TensorBoardLogger):
        who = make.__name__
        with pytest.raises(NotADirectoryError, match=rf"{who}: the run folder .*run.* cannot be made: .*run' is a "
                                                     r"file; remove it, or give another name \(or version\)"):
            make(tmp_path, "run", version=version)
        if version is not None:
            with pytest.raises(NotADirectoryError, match=rf"{who}: the run folder .* cannot be made: "
                                                         rf".*other.{'version_3' if version == 3 else 'fold0'}' is a file"):
                make(tmp_path, "other", version=version)
        make(tmp_path, "fresh", version=version)  # (none in the way)


def test_numpy_numbers_are_logged_as_floats(tmp_path):
    import numpy as np

    logger = JSONLLogger(tmp_path)
    logger.log_metrics({"a": np.float32(0.5), "b": np.int64(3), "c": np.float64(0.25)}, 1)
    with open(os.path.join(logger.log_dir, "metrics.jsonl")) as f:
        assert json.loads(f.readline()) == {"step": 1, "a": 0.5, "b": 3.0, "c": 0.25}
    with pytest.raises(TypeError, match="metric 'flag' is a bool"):
        logger.log_metrics({"flag": np.bool_(True)}, 2)


class _Recorder(loopkit.Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    def _write_metrics(self, metrics, step):
        self.rows.append((step, metrics))


class _PlainRecorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def finalize(self):
        pass


def _typed(rows):
    return [(step, {k: (type(v), v) for k, v in metrics.items()}) for step, metrics in rows]


def test_a_logger_subclass_gets_a_whole_epoch_as_an_int_as_a_plain_logger_and_the_files_do(tmp_path):
    """A loopkit.Logger subclass (the documented way to write one's own) was given each row's epoch as a float
    (0.0), where a plain logger object gets with_logging's int and the file loggers write an int. Its rows equal a
    plain logger's, types too; an epoch given as a whole float is an int, a fraction stays a float."""
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    recorder, plain, jsonl = _Recorder(), _PlainRecorder(), JSONLLogger(tmp_path)
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), recorder, plain, jsonl,
                                every_n_steps=1)
    loopkit.run_epochs(step, state, [torch.ones(2, 2)] * 2, epochs=2, progress=False)
    assert _typed(recorder.rows) == _typed(plain.rows) and len(recorder.rows) == 6
    with open(os.path.join(jsonl.log_dir, "metrics.jsonl")) as f:
        assert _typed((r.pop("step"), r) for r in map(json.loads, f)) == _typed(recorder.rows)
    recorder.log_metrics({"epoch": 3.0, "x": 1}, 7)
    recorder.log_metrics({"epoch": 0.5, "x": 1}, 8)
    assert _typed(recorder.rows[-2:]) == [(7, {"epoch": (int, 3), "x": (float, 1.0)}),
                                          (8, {"epoch": (float, 0.5), "x": (float, 1.0)})]


class _NoSuperInit(loopkit.Logger):
    def __init__(self):  # (no super().__init__(): Lightning's Logger base needs none)
        self.rows = []

    def _write_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def test_a_logger_subclass_that_skips_super_init_logs_hparams_as_one_that_calls_it(tmp_path):
    """A subclass whose __init__ skips super().__init__() logged metrics, but log_hparams, log_hyperparams and
    .hparams raised AttributeError: '_hparams'. It does what one calling super().__init__() does; two such
    loggers keep their own hyper-parameters."""
    skipping, calling, other = _NoSuperInit(), _Recorder(), _NoSuperInit()
    for logger in (skipping, calling):
        assert logger.hparams == {}
        logger.log_hparams({"lr": 0.1, "opt": {"beta": 0.9}}, {"best": 1.0})
        logger.log_hyperparams({"batch": 32})
        logger.log_metrics({"x": 1.0}, 1)
        logger.finalize()
    assert skipping.hparams == calling.hparams == {"lr": 0.1, "opt": {"beta": 0.9}, "batch": 32}
    assert skipping.rows == calling.rows == [(1, {"x": 1.0})] and other.hparams == {}


def test_bad_metrics_are_refused_naming_the_metric(tmp_path):
    logger = JSONLLogger(tmp_path)
    with pytest.raises(TypeError, match="metric 'acc' is a str"):
        logger.log_metrics({"acc": "high"}, 1)
    with pytest.raises(TypeError, match="step must be an int"):
        logger.log_metrics({"acc": 1.0}, 1.5)
    with pytest.raises(TypeError, match="hparams must be a dict"):
        logger.log_hparams(["lr"])


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger, ConsoleLogger])
def test_metrics_a_logger_cannot_write_as_one_number_are_refused_naming_them(tmp_path, cls):
    logger = cls(stream=io.StringIO()) if cls is ConsoleLogger else cls(tmp_path)
    cases = [
        ({"step": 123.0}, ValueError, "a metric named 'step' would take the place of the step"),
        ({"acc": torch.tensor([0.5, 0.7])}, TypeError, "metric 'acc' is a 2 torch.float32 tensor"),
        ({"acc": torch.tensor(1 + 1j)}, TypeError, "metric 'acc' is a 0-dim torch.complex64 tensor"),
        ({"flag": torch.tensor(True)}, TypeError, "metric 'flag' is a 0-dim torch.bool tensor"),
        ({"acc": np.complex64(1)}, TypeError, "metric 'acc' is a complex64"),
    ]
    for metrics, error, match in cases:
        with pytest.raises(error, match=f"{cls.__name__}.log_metrics: {match}"):
            logger.log_metrics(metrics, 7)
    logger.log_metrics({"acc": torch.tensor([0.5]), "n": np.int64(3)}, 7)  # one number each: written
    if cls is CSVLogger:
        assert read_csv(logger.log_dir)[1] == [{"step": "7", "acc": "0.5", "n": "3.0"}]


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger, ConsoleLogger])
def test_an_int_past_the_largest_float_and_a_meta_tensor_are_refused_naming_the_metric_and_the_logger(tmp_path, cls):
    """log_metrics({'x': 10**400}) raised a bare OverflowError ('int too large to convert to float'), a meta tensor
    torch's 'Tensor.item() cannot be called on meta tensors', naming neither the metric nor the logger, where every
    other bad value does. Now both do, log_hparams' metrics too, and nothing is written; the largest int a float
    holds is logged."""
    out = io.StringIO()
    logger = cls(stream=out) if cls is ConsoleLogger else cls(tmp_path)
    name = cls.__name__
    cases = [({"samples_seen": 10**400}, OverflowError, "metric 'samples_seen' is an int too large for a float"),
             ({"acc": torch.tensor(0.5, device="meta")}, TypeError, "metric 'acc' is a meta tensor")]
    for metrics, error, match in cases:
        with pytest.raises(error, match=f"^{name}.log_metrics: {match}"):
            logger.log_metrics({"fine": 1.0, **metrics}, 1)
        with pytest.raises(error, match=f"^{name}.log_hparams: {match}"):
            logger.log_hparams({"lr": 0.1}, metrics)
    assert logger.hparams == {} and out.getvalue() == ""
    if cls is not ConsoleLogger:
        assert not os.path.exists(os.path.join(tmp_path, "default"))  # (nothing written: no folder claimed)
    largest = int(sys.float_info.max)
    logger.log_metrics({"n": largest}, 1)
    if cls is JSONLLogger:
        with open(os.path.join(logger.log_dir, "metrics.jsonl")) as f:
            assert json.loads(f.read()) == {"step": 1, "n": sys.float_info.max}


def test_other_numpy_hparams_are_written_as_text_and_a_numpy_step_as_an_int(tmp_path):
    """Complex, datetime and bytes scalars came out of .item() as values json cannot write."""
    hparams = {"z": np.complex128(1 + 2j), "when": np.datetime64("2026-12-02"), "tag": np.bytes_(b"x")}
    for cls in (CSVLogger, JSONLLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams(hparams)
        logger.log_metrics({"loss": 1.0}, np.int64(3))
        written = json.load(open(os.path.join(logger.log_dir, "hparams.json")))
        assert written == {k: str(v) for k, v in hparams.items()}
    assert [json.loads(line)["step"] for line in open(os.path.join(logger.log_dir, "metrics.jsonl"))] == [3]


class _Net:
    def act(self, x):
        return x


class _Opaque:  # (a default repr: "<...._Opaque object at 0x7f...>")
    pass


def test_class_and_function_hparams_are_written_by_name_without_a_memory_address(tmp_path):
    """A class or function's repr holds a memory address, different in every run: written by name (``__qualname__``,
    a builtin's ``__name__``; Lightning's WandbLogger writes ``__name__``), a partial as its function and arguments,
    another object with a default repr without its address; in hparams.json and TensorBoard's hparams alike."""
    import functools

    def init_fn(x):
        return x

    hparams = {"activation": torch.nn.ReLU, "init": init_fn, "act": _Net.act, "bound": _Net().act, "op": torch.tanh,
               "sched": functools.partial(init_fn, 2, k=_Net), "opaque": _Opaque(), "layers": [torch.nn.Tanh, 8]}
    expected = {"activation": "ReLU", "op": "tanh", "act": "_Net.act", "bound": "_Net.act", "layers": ["Tanh", 8],
                "init": f"{init_fn.__qualname__}",
                "sched": f"functools.partial({init_fn.__qualname__}, 2, k='_Net')", "opaque": f"<{__name__}._Opaque object>"}
    assert expected["init"] == "test_class_and_function_hparams_are_written_by_name_without_a_memory_address.<locals>.init_fn"
    for cls in (CSVLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams(hparams)
        logger.log_metrics({"loss": 1.0}, 1)
        logger.finalize()
        assert json.load(open(os.path.join(logger.log_dir, "hparams.json"))) == expected
    start = _hparams_content(read_events(logger.log_dir))["_hparams_/session_start_info"].session_start_info.hparams
    assert start["activation"].string_value == "ReLU" and start["sched"].string_value == expected["sched"]


def test_numpy_hparams_are_numbers_in_hparams_json_and_tensorboard(tmp_path):
    hparams = {"batch_size": np.int64(32), "lr": np.float32(0.5), "amsgrad": np.bool_(True), "decay": np.array(0.25)}
    expected = {"batch_size": 32, "lr": 0.5, "amsgrad": True, "decay": 0.25}
    for cls in (CSVLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams(hparams, {"val/loss": 1.0})
        logger.log_metrics({"val/loss": 1.0}, 1)
        logger.finalize()
        written = json.load(open(os.path.join(logger.log_dir, "hparams.json")))
        assert {k: written[k] for k in expected} == expected
        assert all(type(written[k]) is type(v) for k, v in expected.items())
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert start["batch_size"].number_value == 32 and start["lr"].number_value == 0.5


def test_tensorboard_writes_an_int_outside_int64_as_lightnings_tensorboard_logger_does(
    tmp_path, make_mlp, make_batches, make_sgd_state, mse_loss
):
    """A 128-bit seed (numpy's ``SeedSequence().entropy``) failed at the fit's end, when the summary was written
    (tensorboardX's ``make_np`` on it); Lightning's summary (``torch.utils.tensorboard``) holds it as the double
    ``float(seed)``. An int no float holds is written as text (Lightning's raises ``OverflowError``)."""
    logger = TensorBoardLogger(tmp_path)
    hparams = {"seed": 2**100, "low": -2**63 - 1, "huge": 10**400, "lr": 0.1, "depth": 3}
    logger.log_hparams(hparams)
    step = loopkit.with_logging(loopkit.train_step(mse_loss), logger, every_n_steps=2)
    loopkit.run_epochs(step, make_sgd_state(make_mlp()), make_batches(4), epochs=1, progress=False)
    start = _hparams_content(read_events(logger.log_dir))["_hparams_/session_start_info"].session_start_info.hparams
    assert start["seed"].number_value == float(2**100) and start["low"].number_value == float(-2**63 - 1)
    assert start["huge"].string_value == str(10**400)
    assert start["lr"].number_value == 0.1 and start["depth"].number_value == 3
    assert json.load(open(os.path.join(logger.log_dir, "hparams.json"))) == hparams  # (exact there)


def test_a_later_log_hparams_adds_to_the_earlier_ones_as_lightnings_loggers_do(tmp_path):
    """A second call replaced the first one's hyper-parameters (Lightning's loggers update theirs: hparams.update)."""
    for cls in (CSVLogger, JSONLLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams({"lr": 0.1, "model": {"hidden": 8}})
        logger.log_metrics({"train/loss": 1.0}, 1)
        logger.log_hparams({"batch_size": 32, "lr": 0.2}, {"best/loss": 0.5})
        logger.finalize()
        written = json.load(open(os.path.join(logger.log_dir, "hparams.json")))
        assert written == {"lr": 0.2, "model": {"hidden": 8}, "batch_size": 32}
        assert json.load(open(os.path.join(logger.log_dir, "hparams_metrics.json"))) == {"best/loss": 0.5}


@dataclasses.dataclass
class _Optim:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)


@dataclasses.dataclass
class _Config:
    optim: _Optim = dataclasses.field(default_factory=_Optim)
    depth: int = 3


def test_dataclass_and_namespace_hparams_are_nested_and_flattened_as_lightnings_flatten_dict_does(tmp_path):
    """A dataclass or argparse.Namespace value became one string ("_Optim(lr=0.1, ...)"): TensorBoard's tab
    could not sort by opt/lr. Lightning's _flatten_dict turns them into dicts (asdict, vars), nested ones too."""
    hparams = {"cfg": _Config(), "ns": argparse.Namespace(width=8, inner=argparse.Namespace(p=0.5)), "batch": 32,
               "cls": _Optim}
    nested = {"cfg": {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "depth": 3},
              "ns": {"width": 8, "inner": {"p": 0.5}}, "batch": 32, "cls": "_Optim"}  # (a class: its name, no repr)
    for cls in (CSVLogger, JSONLLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams(hparams)
        logger.finalize()
        assert logger.hparams == nested
        assert json.load(open(os.path.join(logger.log_dir, "hparams.json"))) == nested
    start = _hparams_content(read_events(logger.log_dir))["_hparams_/session_start_info"].session_start_info.hparams
    assert sorted(start) == ["batch", "cfg/depth", "cfg/optim/betas", "cfg/optim/lr", "cls", "ns/inner/p", "ns/width"]
    assert start["cfg/optim/lr"].number_value == 0.1 and start["ns/inner/p"].number_value == 0.5
    out = io.StringIO()
    ConsoleLogger(stream=out).log_hparams({"opt": _Optim()})
    assert out.getvalue() == "hparams  opt/lr=0.1  opt/betas=[0.9, 0.99]\n"


class _Betas(NamedTuple):
    beta1: float
    beta2: float


class _Sched(NamedTuple):
    name: str
    betas: _Betas


def test_namedtuple_hparams_keep_their_field_names_as_dataclasses_do(tmp_path):
    """A NamedTuple value was written as a list ([0.1, 0.99]: hparams.json and TensorBoard's tab lost the field
    names). It is nested as the dataclass of the same fields is (Lightning's CSVLogger keeps the fields too); a
    plain tuple stays a list."""
    sched = _Sched("cosine", _Betas(0.9, 0.99))
    dataclass = dataclasses.make_dataclass("Sched", [("name", str), ("betas", dict)])("cosine", {"beta1": 0.9,
                                                                                               "beta2": 0.99})
    for cls in (CSVLogger, JSONLLogger, TensorBoardLogger):
        got, want = cls(tmp_path, f"{cls.__name__}-nt"), cls(tmp_path, f"{cls.__name__}-dc")
        for logger, value in ((got, sched), (want, dataclass)):
            logger.log_hparams({"sched": value, "plain": (1, 2)})
            logger.finalize()
        assert got.hparams == want.hparams == {"sched": {"name": "cosine", "betas": {"beta1": 0.9, "beta2": 0.99}},
                                               "plain": [1, 2]}
        assert json.load(open(os.path.join(got.log_dir, "hparams.json"))) == got.hparams
    start = _hparams_content(read_events(got.log_dir))["_hparams_/session_start_info"].session_start_info.hparams
    assert sorted(start) == ["plain", "sched/betas/beta1", "sched/betas/beta2", "sched/name"]
    assert start["sched/betas/beta2"].number_value == 0.99


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger, ConsoleLogger])
def test_log_hparams_takes_an_argparse_namespace_as_lightnings_log_hyperparams_does(tmp_path, cls):
    """An argparse script's logger.log_hparams(args): refused with "hparams must be a dict"."""
    logger = cls(stream=io.StringIO()) if cls is ConsoleLogger else cls(tmp_path)
    logger.log_hparams(argparse.Namespace(lr=0.1, depth=3))
    logger.log_hparams(argparse.Namespace(depth=4))  # adds to (and updates) the first, as a dict would
    assert logger.hparams == {"lr": 0.1, "depth": 4}
    if cls is not ConsoleLogger:
        logger.finalize()  # (hparams.json is written once the run folder is claimed)
        assert json.load(open(os.path.join(logger.log_dir, "hparams.json"))) == {"lr": 0.1, "depth": 4}
    with pytest.raises(TypeError, match="hparams must be a dict or an argparse.Namespace, got _Optim"):
        logger.log_hparams(_Optim())  # (as Lightning's: a dataclass is taken as a value, not as the hparams)
    assert logger.hparams == {"lr": 0.1, "depth": 4}


def test_log_hparams_metrics_never_take_the_place_of_a_hyper_parameter_named_metrics(tmp_path):
    """hparams.json was {**hparams, "metrics": metrics}: a hyper-parameter named "metrics" was replaced by the final
    metrics there, and a later log_hparams without metrics dropped them again. Now hparams.json holds the
    hyper-parameters alone (as Lightning's hparams.yaml), hparams_metrics.json the metrics (all the calls')."""
    for cls in (CSVLogger, JSONLLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams({"lr": 0.1, "metrics": ["acc", "f1"]})
        logger.log_metrics({"val/acc": 0.9}, step=1)
        logger.log_hparams({"batch_size": 4}, {"best/acc": 0.9})
        logger.log_hparams({"wd": 0.0})  # no metrics: those given before stay
        logger.log_hparams({}, {"test/acc": 0.8})  # more: added to them
        logger.finalize()
        hparams = json.load(open(os.path.join(logger.log_dir, "hparams.json")))
        assert hparams == logger.hparams == {"lr": 0.1, "metrics": ["acc", "f1"], "batch_size": 4, "wd": 0.0}
        metrics = json.load(open(os.path.join(logger.log_dir, "hparams_metrics.json")))
        assert metrics == {"best/acc": 0.9, "test/acc": 0.8}
    start = _hparams_content(read_events(logger.log_dir))  # TensorBoard's tab: the given metrics, all of them
    assert {m.name.tag for m in start["_hparams_/experiment"].experiment.metric_infos} == {"best/acc", "test/acc"}
    assert start["_hparams_/session_start_info"].session_start_info.hparams["metrics"].string_value == "['acc', 'f1']"


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_new_run_in_a_fixed_version_logging_hparams_without_metrics_leaves_no_earlier_hparams_metrics(tmp_path, cls):
    """A folder reused (version=0) by a new run whose log_hparams gives no metrics: the earlier run's
    hparams_metrics.json goes, so the folder's JSON files hold what the new logger's calls gave, as a folder
    of its own would (reference)."""
    first = cls(tmp_path / "reused", version=0)
    first.log_hparams({"lr": 0.1}, {"val/acc": 0.9})
    first.log_metrics({"train/loss": 0.5}, step=1)
    first.finalize()
    assert os.path.exists(os.path.join(first.log_dir, "hparams_metrics.json"))
    folders = []
    for root in ("reused", "fresh"):
        second = cls(tmp_path / root, version=0)
        second.log_hparams({"lr": 0.2})
        second.log_metrics({"train/loss": 0.4}, step=1)
        second.finalize()
        folders.append(second.log_dir)
    written = [{f: open(os.path.join(d, f)).read() for f in os.listdir(d) if f.endswith(".json")} for d in folders]
    assert written[0] == written[1] and sorted(written[0]) == ["hparams.json"]


def test_tensorboards_hparams_tab_shows_what_log_hparams_gives_after_the_fit_when_given_before_too(tmp_path):
    """The guide's flow: log_hparams(cfg) before run_epochs, log_hparams(cfg, {"best/loss": ...}) after. The second
    summary went to a second event file, and TensorBoard reads a tag's first metadata: the tab kept the first."""
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams({"lr": 0.1})
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=1)
    loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 3, epochs=1, progress=False)
    logger.log_hparams({"tag": "final"}, {"best/loss": 0.5})
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert [info.name.tag for info in experiment.metric_infos] == ["best/loss"]
    assert sorted(start.hparams) == ["lr", "tag"] and start.hparams["tag"].string_value == "final"


def test_two_loggers_of_one_class_in_one_folder_are_refused_however_the_version_is_spelt(tmp_path):
    step = loopkit.train_step(lambda m, b: m(b).sum())
    for other in ("version_3", os.path.join(".", "version_3")):
        with pytest.raises(ValueError, match="both CSVLoggers of one run folder"):
            loopkit.with_logging(step, CSVLogger(tmp_path, "r", version=3), CSVLogger(tmp_path, "r", version=other))
    claimed = CSVLogger(tmp_path, "s")
    with pytest.raises(ValueError, match="both CSVLoggers of one run folder"):  # one claimed version_0, one fixed at it
        loopkit.with_logging(step, CSVLogger(tmp_path, "s", version=int(os.path.basename(claimed.log_dir)[8:])), claimed)


def test_loggers_whose_log_dir_was_read_before_the_run_still_share_one_folder_as_lightnings_do(tmp_path):
    """Reading log_dir claimed a folder for each: version_0 and version_1 for one run (Lightning's: version_0 for
    both, its log_dir claims nothing). One a logger wrote in stays its own."""
    tb, csv_ = TensorBoardLogger(tmp_path, "demo"), CSVLogger(tmp_path, "demo")
    assert (os.path.basename(tb.log_dir), os.path.basename(csv_.log_dir)) == ("version_0", "version_1")
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), tb, csv_, every_n_steps=1)
    loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 2, epochs=1, progress=False)
    assert csv_.log_dir == tb.log_dir and sorted(os.listdir(tmp_path / "demo")) == ["version_0"]
    used = CSVLogger(tmp_path, "used")
    used.log_metrics({"a": 1.0}, 1)
    other = CSVLogger(tmp_path, "used")
    assert not used.share_run_dir(other) and os.path.basename(used.log_dir) == "version_0"
    for order in ("tb first", "csv first"):  # one read alone keeps its folder, and the other follows it
        root = tmp_path / order.replace(" ", "_")
        tb, csv_ = TensorBoardLogger(root, "one"), CSVLogger(root, "one")
        read = tb.log_dir
        loggers = (tb, csv_) if order == "tb first" else (csv_, tb)
        step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), *loggers, every_n_steps=1)
        loopkit.run_epochs(step, loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                           [torch.ones(4, 2)] * 2, epochs=1, progress=False)
        assert tb.log_dir == csv_.log_dir == read and sorted(os.listdir(root / "one")) == ["version_0"]


def test_loggers_sharing_a_folder_reused_for_a_fresh_fit_move_together_to_the_next_version(tmp_path):
    """Cross-validation with a CSVLogger and a JSONLLogger sharing one folder: the second fold (a fresh state)
    moves both to one new folder, version_1 (the first logger to write claimed it for both; the second must not
    claim a version_2 of its own and leave version_1 without its file). Reference: each fold logged by a pair of
    loggers made anew for it."""
    data = [(torch.full((4, 3), float(i)), torch.full((4, 1), float(i % 2))) for i in range(4)]

    def fit(step, fold):
        torch.manual_seed(fold)
        model = torch.nn.Linear(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=fold)
        loopkit.run_epochs(step, state, data, epochs=1, progress=False)

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    reused = CSVLogger(tmp_path / "reused"), JSONLLogger(tmp_path / "reused")
    step = loopkit.with_logging(loopkit.train_step(loss), *reused, every_n_steps=2)
    references = []
    for fold in range(2):
        fit(step, fold)
        assert reused[0].log_dir == reused[1].log_dir
        assert os.path.basename(reused[0].log_dir) == f"version_{fold}"
        fresh = CSVLogger(tmp_path / f"fold{fold}"), JSONLLogger(tmp_path / f"fold{fold}")
        fit(loopkit.with_logging(loopkit.train_step(loss), *fresh, every_n_steps=2), fold)
        references.append(fresh[0].log_dir)
    assert sorted(os.listdir(tmp_path / "reused" / "default")) == ["version_0", "version_1"]
    for fold, reference in enumerate(references):
        folder = tmp_path / "reused" / "default" / f"version_{fold}"
        assert files_under(folder) == files_under(reference)
        for make in (CSVLogger, JSONLLogger):
            assert _logged(folder, make) == _logged(reference, make)


# --- file formats ------------------------------------------------------------------------------


def test_csv_columns_grow_with_one_header_and_blanks(tmp_path):
    logger = CSVLogger(tmp_path)
    logged = [({"a": 0.1 + 0.2}, 1), ({"a": 1e-30, "b": -3.5}, 2), ({"c": float("nan")}, 3), ({"b": 7.0}, 4)]
    for metrics, step in logged:
        logger.log_metrics(metrics, step)
    text = open(os.path.join(logger.log_dir, "metrics.csv")).read()
    assert text.splitlines()[0] == "step,a,b,c" and text.count("step") == 1
    columns, rows = read_csv(logger.log_dir)
    assert columns == ["step", "a", "b", "c"]
    assert len(rows) == len(logged)
    for row, (metrics, step) in zip(rows, logged):
        assert int(row["step"]) == step
        for column in ("a", "b", "c"):
            if column in metrics:
                value = float(row[column])
                assert value == metrics[column] or (value != value and metrics[column] != metrics[column])
            else:
                assert row[column] == ""


def test_csv_holds_no_rows_in_memory_and_a_late_column_keeps_every_row_as_written(tmp_path):
    """A long run's rows go to the file, not to memory: a new column re-reads them from the file."""
    import tracemalloc

    logger = CSVLogger(tmp_path)
    tracemalloc.start()
    try:
        logger.log_metrics({"a": 0.1}, 0)
        before = tracemalloc.get_traced_memory()[0]
        for step in range(1, 3001):
            logger.log_metrics({"a": step / 7}, step)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000  # rows kept in memory would take ~0.5 MB here
    logger.log_metrics({"b": 1.5}, 3001)
    columns, rows = read_csv(logger.log_dir)
    assert columns == ["step", "a", "b"] and len(rows) == 3002
    assert [float(r["a"]) for r in rows[:-1]] == [0.1] + [step / 7 for step in range(1, 3001)]
    assert rows[-1] == {"step": "3001", "a": "", "b": "1.5"}


class _CountedName(str):
    """A metric name that counts the comparisons made with it (each row's names are new objects, as a dict built
    anew each step has them: no identity shortcut)."""

    compared = 0

    def __eq__(self, other):
        _CountedName.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_csv_row_of_many_metrics_costs_a_look_up_per_metric_not_a_scan_of_the_columns(tmp_path):
    """Each row's metrics were looked for in the list of columns: quadratic in the number of metrics (20 000
    per-layer norms: seconds a row, where Lightning's CSVLogger takes milliseconds). A set beside the list: the
    comparisons grow as the metrics do; the file is the one written before."""
    n, logger = 2000, CSVLogger(tmp_path)
    for step in range(3):
        row = {_CountedName(f"layer{i}/grad_norm"): float(i + step) for i in range(n)}
        _CountedName.compared = 0
        logger.log_metrics(row, step)
    assert _CountedName.compared < 20 * n  # (a few per metric; a scan of the list: ~n * n / 2)
    columns, rows = read_csv(logger.log_dir)
    assert columns == ["step"] + [f"layer{i}/grad_norm" for i in range(n)]
    assert [[float(r[f"layer{i}/grad_norm"]) for i in (0, n - 1)] for r in rows] == [[s, n - 1 + s] for s in range(3)]


def test_every_file_logger_writes_hparams_json(tmp_path):
    hparams = {"lr": 0.1, "model": {"hidden": 8}, "optimizer": torch.optim.SGD, "betas": (0.9, 0.99)}
    for cls in (CSVLogger, JSONLLogger, TensorBoardLogger):
        logger = cls(tmp_path, cls.__name__)
        logger.log_hparams(hparams)
        logger.log_metrics({"loss": 1.0}, 1)
        written = json.load(open(os.path.join(logger.log_dir, "hparams.json")))
        assert written == {"lr": 0.1, "model": {"hidden": 8}, "optimizer": "SGD", "betas": [0.9, 0.99]}
        logger.log_hparams({"lr": 0.2}, {"val/loss": 0.5})  # once the folder exists, written at once (added to the first)
        assert json.load(open(os.path.join(logger.log_dir, "hparams.json"))) == {
            "lr": 0.2, "model": {"hidden": 8}, "optimizer": "SGD", "betas": [0.9, 0.99],
        }
        assert json.load(open(os.path.join(logger.log_dir, "hparams_metrics.json"))) == {"val/loss": 0.5}


def _strict_json(path):
    """The file read as RFC 8259 JSON: NaN, Infinity and -Infinity refused, as jq and JavaScript's JSON.parse do."""

    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_non_finite_hparams_and_metrics_are_valid_json_in_hparams_json_and_hparams_metrics_json(tmp_path, cls):
    """hparams.json and hparams_metrics.json held bare NaN / Infinity for non-finite values, which is not JSON:
    jq, JavaScript, Go's and Rust's readers refused the files. They are written as the strings "nan", "inf",
    "-inf" (float() reads them back), nested ones too; the logger's hparams keep the numbers."""
    nan, inf = float("nan"), float("inf")
    logger = cls(tmp_path)
    logger.log_hparams({"wd": nan, "clip": inf, "opt": {"floor": -inf, "lr": 0.1}, "grid": (inf, 1)},
                       {"best/loss": nan, "worst": -inf, "epoch": 2})
    logger.log_metrics({"x": 1.0}, 1)
    logger.finalize()
    hparams = _strict_json(os.path.join(logger.log_dir, "hparams.json"))
    assert hparams == {"wd": "nan", "clip": "inf", "opt": {"floor": "-inf", "lr": 0.1}, "grid": ["inf", 1]}
    metrics = _strict_json(os.path.join(logger.log_dir, "hparams_metrics.json"))
    assert metrics == {"best/loss": "nan", "worst": "-inf", "epoch": 2}
    assert [float(metrics[k]) for k in ("worst", "epoch")] == [-inf, 2.0] and math.isnan(float(metrics["best/loss"]))
    assert logger.hparams["clip"] == inf and math.isnan(logger.hparams["wd"])


def test_jsonl_is_one_object_per_line(tmp_path):
    logger = JSONLLogger(tmp_path)
    logger.log_metrics({"train/loss": 0.25, "epoch": 0}, 10)
    logger.log_metrics({"val/acc": 0.75}, 20)
    lines = open(os.path.join(logger.log_dir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "train/loss": 0.25, "epoch": 0.0}, {"step": 20, "val/acc": 0.75}]


def test_console_prints_a_compact_line(tmp_path):
    out = io.StringIO()
    logger = ConsoleLogger(stream=out, digits=3)
    logger.log_metrics({"train/loss": 0.123456, "epoch": 2.0}, 50)
    logger.log_hparams({"lr": 0.1, "model": {"hidden": 8}})
    assert out.getvalue().splitlines() == ["step 50  train/loss=0.123  epoch=2", "hparams  lr=0.1  model/hidden=8"]
    assert logger.log_dir is None


def test_tensorboard_scalars_read_back_with_tensorboards_reader(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    written = {"train/loss": [(5, 0.5), (10, 0.25)], "val/acc": [(10, 0.875)]}
    for step in (5, 10):
        logger.log_metrics({tag: v for tag, points in written.items() for s, v in points if s == step}, step)
    logger.finalize()
    events = read_events(logger.log_dir)
    assert sorted(events.Tags()["scalars"]) == sorted(written)
    for tag, points in written.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == points  # the values are exact in float32


def _hparams_content(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in events.PluginTagToContent("hparams").items()}


def test_tensorboard_writes_hparams_with_the_final_metrics(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_hparams({"lr": 0.01, "optimizer": {"name": "adam"}, "layers": [4, 8]})
    logger.log_metrics({"train/loss": 1.0}, 1)
    logger.log_metrics({"train/loss": 0.5, "val/acc": 0.75}, 2)
    logger.finalize()
    content = _hparams_content(read_events(logger.log_dir))
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    assert start["lr"].number_value == 0.01
    assert start["optimizer/name"].string_value == "adam"
    assert start["layers"].string_value == "[4, 8]"
    metrics = {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos}
    assert metrics == {"train/loss", "val/acc"}


def test_tensorboard_hparams_leave_out_the_epoch_counter_with_logging_logs_unless_given(tmp_path):
    """The HPARAMS tab listed ``epoch``, the counter with_logging puts on every row (Lightning's logger connector
    logs its ``current_epoch`` so), among the final metrics runs are compared by; Lightning's TensorBoardLogger puts
    there the metrics given to log_hyperparams alone. Now the last value of every tag but ``epoch``; given, it stays."""
    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    logger = TensorBoardLogger(tmp_path, "run")
    logger.log_hparams({"lr": 0.1})
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=1)
    loopkit.run_epochs(step, state, [torch.ones(2, 3)] * 2, epochs=2, progress=False)
    events = read_events(logger.log_dir)
    assert "epoch" in events.Tags()["scalars"]  # logged, as Lightning's
    content = _hparams_content(events)
    assert {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos} == {"train/loss", "train/loss_epoch"}

    given = TensorBoardLogger(tmp_path, "given")
    given.log_hparams({"lr": 0.1}, {"epoch": 2, "best/loss": 0.5})
    given.finalize()
    content = _hparams_content(read_events(given.log_dir))
    assert {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos} == {"epoch", "best/loss"}


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger, TensorBoardLogger, ConsoleLogger])
def test_log_hparams_metrics_errors_name_log_hparams_and_a_metric_may_be_named_step(tmp_path, cls):
    """A bad metric given to log_hparams was reported as a log_metrics error, sending the user to the wrong call,
    and one named 'step' refused ("would take the place of the step") though those metrics have no step column.
    The errors name log_hparams (log_metrics' keep their name) and 'step' is a metric as any other there."""
    logger = cls(stream=io.StringIO()) if cls is ConsoleLogger else cls(tmp_path)
    name = cls.__name__
    for metrics, error, match in (({"best": "n/a"}, TypeError, "metric 'best' is a str"),
                                  ([1.0], TypeError, "metrics must be a dict"),
                                  ({1: 1.0}, TypeError, "metric names must be strings"),
                                  ({"t": torch.ones(2)}, TypeError, "metric 't' is a 2 torch.float32 tensor")):
        with pytest.raises(error, match=f"^{name}.log_hparams: {match}"):
            logger.log_hparams({"lr": 0.1}, metrics)
    with pytest.raises(TypeError, match=f"^{name}.log_metrics: metric 'best' is a str"):
        logger.log_metrics({"best": "n/a"}, 1)
    with pytest.raises(ValueError, match=f"^{name}.log_metrics: a metric named 'step' would take the place"):
        logger.log_metrics({"step": 1.0}, 1)
    assert logger.hparams == {}
    logger.log_hparams({"lr": 0.1}, {"step": 120, "best": 0.5})
    logger.finalize()
    assert logger.hparams == {"lr": 0.1}
    if cls is not ConsoleLogger:
        with open(os.path.join(logger.log_dir, "hparams_metrics.json")) as f:
            assert json.load(f) == {"step": 120.0, "best": 0.5}
    if cls is TensorBoardLogger:
        infos = _hparams_content(read_events(logger.log_dir))["_hparams_/experiment"].experiment.metric_infos
        assert {m.name.tag for m in infos} == {"step", "best"}


def test_tensorboard_hparams_metrics_given_explicitly_are_added_as_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0}, 3)
    logger.log_hparams({"lr": 0.1}, metrics={"hp/final": 0.25})
    logger.finalize()
    events = read_events(logger.log_dir)
    assert [(e.step, e.value) for e in events.Scalars("hp/final")] == [(3, 0.25)]
    assert {m.name.tag for m in _hparams_content(events)["_hparams_/experiment"].experiment.metric_infos} == {"hp/final"}


def test_tensorboard_hparams_given_after_the_fit_finalized_the_logger_are_written(tmp_path):
    """As Lightning's log_hyperparams after fit: run_epochs has finalized the logger, and no later
    finalize comes; before, they never reached the event files."""
    logger = TensorBoardLogger(tmp_path)
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=2)
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _, history = loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 4, epochs=1, progress=False)
    logger.log_hparams({"lr": 0.1}, metrics={"train/loss": history[-1]["train/loss"]})
    events = read_events(logger.log_dir)
    content = _hparams_content(events)
    assert content["_hparams_/session_start_info"].session_start_info.hparams["lr"].number_value == 0.1
    assert {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos} == {"train/loss"}
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]  # the run's scalars are all still there


@pytest.mark.parametrize("after_fit", ["log_metrics", "writer"])
def test_tensorboard_hparams_given_after_a_test_evaluation_logged_after_the_fit_are_written(tmp_path, after_fit):
    """The guide's flow: run_epochs, then a test evaluation logged (or text through the writer), then
    log_hparams(cfg, {"test/loss": ...}). The write after the fit reopened the event file and made the logger
    forget it was finalized, so the summary waited for a finalize nobody calls: the run was missing from the tab."""
    logger = TensorBoardLogger(tmp_path)
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=2)
    model = torch.nn.Linear(2, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.run_epochs(step, state, [torch.ones(4, 2)] * 4, epochs=1, progress=False)
    if after_fit == "log_metrics":
        logger.log_metrics({"test/loss": 0.5}, step=state.step)
    else:
        logger.writer.add_text("notes", "a test evaluation follows", state.step)
        logger.writer.flush()
    logger.log_hparams({"lr": 0.1, "hidden": 8}, {"test/loss": 0.5})  # no finalize after it
    content = _hparams_content(read_events(logger.log_dir))
    assert sorted(content["_hparams_/session_start_info"].session_start_info.hparams) == ["hidden", "lr"]
    assert {m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos} == {"test/loss"}
    logger.log_hparams({"lr": 0.2})  # again after the fit: this one replaces it at once (the tab reads the first)
    start = _hparams_content(read_events(logger.log_dir))["_hparams_/session_start_info"].session_start_info
    assert start.hparams["lr"].number_value == 0.2


class _HparamsAtFitStart(loopkit.Callback):
    def __init__(self, logger) -> None:
        self.logger = logger

    def on_fit_start(self, state):
        self.logger.log_hparams({"lr": 0.1})


def test_tensorboard_hparams_given_as_a_second_fit_with_the_logger_begins_wait_for_its_finalize(tmp_path):
    """The same logger (version=0) for a fit going on from the first: hyper-parameters given as it begins wait for
    its finalize, so the HPARAMS tab lists the metrics it logs first (val/loss), as TensorBoard reads the folder's
    scalars; they were written at once (the first fit's finalize still counted), with the first fit's metrics, into
    an event file of their own. Reference: a twin whose second fit is given no hyper-parameters (its event files)."""
    data = [(torch.full((4, 3), float(i)), torch.full((4, 1), float(i % 2))) for i in range(4)]

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    val = (loopkit.eval_step(lambda m, b: {"loss": loss(m, b)}), data[:2])
    folders = []
    for hparams_again in (True, False):
        tb = TensorBoardLogger(tmp_path / str(hparams_again), version=0)
        step = loopkit.with_logging(loopkit.train_step(loss), tb, every_n_steps=2)
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
        state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False, callbacks=[_HparamsAtFitStart(tb)])
        loopkit.run_epochs(step, state, data, epochs=2, progress=False, val=val, sanity_val_batches=0,
                           callbacks=[_HparamsAtFitStart(tb)] if hparams_again else [])
        folders.append(tb.log_dir)
    events = read_events(folders[0])
    listed = [m.name.tag for m in _hparams_content(events)["_hparams_/experiment"].experiment.metric_infos]
    assert "val/loss" in listed and sorted(listed) == sorted(set(events.Tags()["scalars"]) - {"epoch"})
    assert [_logged(folder, TensorBoardLogger) for folder in folders] == [_logged(folders[1], TensorBoardLogger)] * 2
    files = [sorted(n for n in os.listdir(folder) if n.startswith("events.out.tfevents")) for folder in folders]
    assert len(files[0]) == len(files[1])
    tags = [v.tag for e in _events_in(folders[0]) for v in e.summary.value if v.tag.startswith("_hparams_/")]
    assert tags == ["_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"]


def test_tensorboard_without_hparams_writes_no_hparams(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"train/loss": 1.0}, 1)
    logger.finalize()
    with pytest.raises(KeyError, match="hparams"):
        read_events(logger.log_dir).PluginTagToContent("hparams")


def test_tensorboard_histograms_of_parameters_and_gradients(tmp_path):
    logger = TensorBoardLogger(tmp_path, histogram_every_n_steps=3)
    assert [s for s in range(1, 10) if logger.wants_model(s)] == [3, 6, 9]
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    logger.log_model(model, 3)
    logger.finalize()
    events = read_events(logger.log_dir)
    assert sorted(events.Tags()["histograms"]) == ["grads/bias", "grads/weight", "params/bias", "params/weight"]
    for tag, tensor in [("params/weight", model.weight), ("grads/weight", model.weight.grad), ("grads/bias", model.bias.grad)]:
        (event,) = events.Histograms(tag)
        h, t = event.histogram_value, tensor.detach().double()
        assert event.step == 3 and h.num == t.numel()
        assert h.min == pytest.approx(t.min().item(), rel=1e-6) and h.max == pytest.approx(t.max().item(), rel=1e-6)
        assert h.sum == pytest.approx(t.sum().item(), rel=1e-5, abs=1e-6)
        assert h.sum_squares == pytest.approx(t.pow(2).sum().item(), rel=1e-5)
    assert not TensorBoardLogger(tmp_path).wants_model(3)  # histograms are off by default


def test_a_logger_can_log_again_after_finalize(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, 1)
    logger.finalize()
    logger.log_metrics({"loss": 0.5}, 2)
    logger.finalize()
    assert [(e.step, e.value) for e in read_events(logger.log_dir).Scalars("loss")] == [(1, 1.0), (2, 0.5)]


def test_tensorboard_writes_in_the_calling_thread_and_a_killed_run_keeps_its_scalars(tmp_path):
    script = f"""
import os, threading
from loopkit.loggers import TensorBoardLogger
logger = TensorBoardLogger({str(tmp_path)!r})
before = threading.active_count()
logger.log_metrics({{"train/loss": 0.5, "train/acc": 0.25}}, 50)
logger.log_metrics({{"train/loss": 0.375}}, 100)
assert threading.active_count() == before, threading.enumerate()
os._exit(0)  # killed: no finalize, no interpreter shutdown
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = read_events(os.path.join(tmp_path, "default", "version_0"))
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(50, 0.5), (100, 0.375)]
    assert [(e.step, e.value) for e in events.Scalars("train/acc")] == [(50, 0.25)]


def test_tensorboard_summary_writer_shares_the_run_folder(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"train/loss": 0.5}, 1)
    logger.writer.add_scalar("custom/lr", 0.125, 1)
    logger.finalize()
    events = read_events(logger.log_dir)
    assert sorted(events.Tags()["scalars"]) == ["custom/lr", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("custom/lr")] == [(1, 0.125)]


# --- only rank 0 writes ------------------------------------------------------------------------


def _pretend_rank(monkeypatch, rank: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_writes(tmp_path, monkeypatch, rank):
    _pretend_rank(monkeypatch, rank)
    out = io.StringIO()
    tb = TensorBoardLogger(tmp_path, histogram_every_n_steps=1)
    file_loggers = [tb, CSVLogger(tmp_path, "csv"), JSONLLogger(tmp_path, "jsonl")]
    for logger in file_loggers + [ConsoleLogger(stream=out)]:
        logger.log_hparams({"lr": 0.1})
        logger.log_metrics({"loss": 1.0}, 1)
        logger.finalize()
    if tb.wants_model(1):
        tb.log_model(torch.nn.Linear(1, 1), 1)
        tb.finalize()
    # what code outside the loggers writes on every rank (Lightning's logger.experiment is a DummyExperiment off
    # rank 0): the writer of images and text, and an event file opened by hand
    tb.writer.add_text("sample", "written by every rank", 1)
    tb.writer.flush()
    tb.open()
    tb.finalize()
    if rank == 0:  # the control: the same calls write everything on rank 0
        assert "events.out.tfevents" in " ".join(files_under(tmp_path))
        assert {"csv/version_0/metrics.csv", "jsonl/version_0/metrics.jsonl"} <= set(files_under(tmp_path))
        assert out.getvalue()
    else:
        assert files_under(tmp_path) == [] and not os.listdir(tmp_path)
        assert out.getvalue() == ""
        assert all(logger.log_dir.endswith("version_0") for logger in file_loggers)  # named, not created


def test_public_names():
    assert loopkit.TensorBoardLogger is TensorBoardLogger and loopkit.CSVLogger is CSVLogger
    assert loopkit.JSONLLogger is JSONLLogger and loopkit.ConsoleLogger is ConsoleLogger


def test_open_creates_the_event_file_that_the_first_write_then_uses(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.open()
    (opened,) = [f for f in os.listdir(logger.log_dir) if f.startswith("events.out.tfevents")]
    logger.open()  # already open: no second file
    logger.log_metrics({"train/loss": 0.5}, 1)
    logger.finalize()
    assert [f for f in os.listdir(logger.log_dir) if f.startswith("events.out.tfevents")] == [opened]
    assert [(e.step, e.value) for e in read_events(logger.log_dir).Scalars("train/loss")] == [(1, 0.5)]


@pytest.mark.parametrize("version", ["..", "../elsewhere", "a/../../b", "/abs/path"])
def test_a_version_string_outside_root_name_is_refused(tmp_path, version):
    """version="../x" put the run folder outside root/name (an absolute path anywhere)."""
    for make in (loopkit.CSVLogger, loopkit.JSONLLogger, loopkit.TensorBoardLogger):
        with pytest.raises(ValueError, match="a version given as a string is a folder inside root/name"):
            make(tmp_path, "run", version=version)


@pytest.mark.parametrize("version, folder", [("", ""), ("fold0/seed1", "fold0/seed1")])
def test_version_strings_lightning_takes_name_folders_inside_root_name(tmp_path, version, folder):
    """Lightning's idioms: version="" logs into root/name itself, a nested version into that folder."""
    logger = loopkit.CSVLogger(tmp_path, "run", version=version)
    assert os.path.normpath(logger.log_dir) == os.path.normpath(os.path.join(str(tmp_path), "run", folder))


@pytest.mark.parametrize("name", ["", None])
@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_name_of_none_or_empty_logs_in_root_itself_as_lightnings_loggers_do(tmp_path, make, name):
    """name="" and name=None were refused; Lightning 2.6.6's loggers log to save_dir/version_N then (no name folder;
    their ``name`` is ""). Reference: Lightning's layout, written out."""
    first, second = make(tmp_path, name), make(tmp_path, name)
    for logger in (first, second):
        logger.log_metrics({"loss": 1.0}, 1)
        logger.finalize()
    assert [os.path.relpath(lg.log_dir, tmp_path) for lg in (first, second)] == ["version_0", "version_1"]
    assert first.name == "" and (first.version, second.version) == (0, 1)
    assert sorted(os.listdir(tmp_path)) == ["version_0", "version_1"]
    assert os.path.relpath(make(tmp_path, name, version=3).log_dir, tmp_path) == "version_3"
    (tmp_path / "file").write_text("x")  # (root itself in the way)
    with pytest.raises(NotADirectoryError, match=rf"{make.__name__}: root .*file.* cannot be a folder"):
        make(tmp_path / "file", name)


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger, TensorBoardLogger])
def test_a_nested_name_logs_in_its_subfolders_as_lightnings_loggers_do(tmp_path, make):
    """name="exp/run" was refused; Lightning 2.6.6's loggers log to save_dir/exp/run/version_N. Reference: Lightning's
    layout, written out. Spelt with a trailing separator it is the same root/name: its loggers share one folder."""
    first, second = make(tmp_path, "exp/run"), make(tmp_path, "exp/run")
    for logger in (first, second):
        logger.log_metrics({"loss": 1.0}, 1)
        logger.finalize()
    assert [os.path.relpath(lg.log_dir, tmp_path) for lg in (first, second)] == [
        os.path.join("exp", "run", "version_0"), os.path.join("exp", "run", "version_1")]
    assert os.listdir(tmp_path) == ["exp"] and os.listdir(tmp_path / "exp") == ["run"]
    tb, csv_ = TensorBoardLogger(tmp_path / "shared", "exp/run"), CSVLogger(tmp_path / "shared", "exp/run/")
    assert csv_.share_run_dir(tb) and os.path.relpath(csv_.log_dir, tmp_path / "shared") == os.path.join(
        "exp", "run", "version_0")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "exp").write_text("x")  # (a file on the way to root/name)
    with pytest.raises(NotADirectoryError, match=rf"{make.__name__}: the run folder .*exp.run.* cannot be made"):
        make(tmp_path / "blocked", "exp/run")


@pytest.mark.parametrize("name", ["/abs/path", "..", "../elsewhere", "a/../../b"])
def test_a_name_outside_root_is_refused(tmp_path, name):
    """Refused as a version string outside root/name is (Lightning takes them, and writes outside save_dir)."""
    for make in (loopkit.CSVLogger, loopkit.JSONLLogger, loopkit.TensorBoardLogger):
        with pytest.raises(ValueError, match=r"name is a folder inside root \('' or None for root itself"):
            make(tmp_path, name)
    assert os.listdir(tmp_path) == []


def test_a_fit_with_name_none_shares_one_folder_in_root_resumes_there_and_leaves_another_runs_folder(tmp_path):
    """name=None was refused. A TensorBoard and a CSV logger of one with_logging share root/version_0; the fit cut by
    max_steps and resumed from the state it returned goes on there (its rows those of the uninterrupted run,
    reference: a run of name "ref" never cut); a fresh fit next (model B) takes root/version_1, and model A trained
    further then goes on in root/version_2, with a warning, leaving B's rows as they were."""
    torch.manual_seed(0)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(6)]

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    def fit(loggers, state, **budget):
        step = loopkit.with_logging(loopkit.train_step(loss), *loggers, every_n_steps=2)
        return loopkit.run_epochs(step, state, data, progress=False, **budget)[0]

    def fresh(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 1)
        return loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=seed)

    reference = TensorBoardLogger(tmp_path / "ref", "ref"), CSVLogger(tmp_path / "ref", "ref")
    fit(reference, fresh(0), epochs=2)
    loggers = TensorBoardLogger(tmp_path / "runs", None), CSVLogger(tmp_path / "runs", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = fit(loggers, fresh(0), epochs=2, max_steps=4)
        a = fit(loggers, a, epochs=2)
    a_dir = str(tmp_path / "runs" / "version_0")
    assert loggers[0].log_dir == loggers[1].log_dir == a_dir and os.listdir(tmp_path / "runs") == ["version_0"]
    for make, logger in zip((TensorBoardLogger, CSVLogger), reference):
        assert _logged(a_dir, make) == _logged(logger.log_dir, make)
    fit(loggers, fresh(1), epochs=1)
    b_dir = str(tmp_path / "runs" / "version_1")
    b_rows = _logged(b_dir, CSVLogger)
    with pytest.warns(UserWarning, match="version_0.*version_1"):
        fit(loggers, a, epochs=3)
    assert loggers[1].log_dir == str(tmp_path / "runs" / "version_2") and _logged(b_dir, CSVLogger) == b_rows
    assert sorted(os.listdir(tmp_path / "runs")) == ["version_0", "version_1", "version_2"]


@pytest.mark.parametrize("make", [CSVLogger, JSONLLogger])
def test_the_file_loggers_write_the_epoch_as_an_int(tmp_path, make):
    """``epoch`` (with_logging's count, Lightning's ``current_epoch``) came out as ``0.0`` (every metric is taken as a
    float); Lightning's CSV writes ``0``. Now a whole epoch is written as an int, in the CSV and in the JSONL, and
    a resumed logger still tells the records' epochs apart (the record of epoch 1 dropped, epoch 0's kept).
    Reference: the text Lightning's CSV writes, and the JSON of the ints."""
    logger = make(tmp_path, "r", version=0)
    _log_all(logger, [(2, {"epoch": 0.0, "train/loss": 0.5}), (2, {"epoch": np.float32(0), "train/loss_epoch": 0.5}),
                      (4, {"epoch": 1, "train/loss": 0.25}), (5, {"epoch": 1.5})])
    logger.finalize()
    path = os.path.join(logger.log_dir, make.filename)
    if make is CSVLogger:
        with open(path, newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "0", "1", "1.5"]
    else:
        with open(path) as f:
            epochs = [json.loads(line)["epoch"] for line in f]
        assert epochs == [0, 0, 1, 1.5] and [type(e) for e in epochs] == [int, int, int, float]
    resumed = make(tmp_path, "r", version=0)
    resumed.resume_at(2, 1, 0)
    resumed.log_metrics({"epoch": 1.0, "train/loss": 0.125}, 3)
    resumed.finalize()
    with open(path) as f:
        text = f.read()
    assert "0.25" not in text and "1.5" not in text and text.count("0.5") == 2 and "0.125" in text
