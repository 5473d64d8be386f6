"""Tests of the progress bar: only on a terminal, and never a per-batch host sync.

References: the per-batch losses a recording callback saw (the bar must show the latest one
at each refresh), the epoch means in the history, and counted tensor -> Python conversions.
"""

from __future__ import annotations

import io
import itertools
import re
import sys

import pytest
import torch
import tqdm.auto
import tqdm.std
from torch import nn

from loopkit import TrainState, eval_step, run_epochs, train_step
from loopkit import progress as progress_module
from loopkit.progress import ProgressBar, progress_wanted

REFRESH = 20  # batches between two readings of the latest metrics (loopkit.progress._READ_EVERY)


def make_state() -> TrainState:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
    return TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.05))


def make_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


class FakeTTY:
    """A stderr stand-in that says it is a terminal and records what is written."""

    def __init__(self):
        self.parts: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.parts)


class EveryUpdateTqdm(tqdm.std.tqdm):
    """tqdm that prints on every update (no time-based throttling) and starts no monitor thread."""

    monitor_interval = 0
    created: list[EveryUpdateTqdm] = []

    def __init__(self, *args, **kwargs):
        kwargs.update(mininterval=0, miniters=1)
        super().__init__(*args, **kwargs)
        self.first_total = self.total  # (the total it was made with)
        EveryUpdateTqdm.created.append(self)


class LossRecorder:
    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_batch_end(self, state, metrics):
        self.losses.append(metrics["loss"])


def use_fake_tty(monkeypatch) -> FakeTTY:
    """Make ``sys.stderr`` a fake terminal and tqdm unthrottled (call in the test body: pytest's
    output capture re-installs its own ``sys.stderr`` between a fixture's setup and the test)."""
    stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stream)
    EveryUpdateTqdm.created = []
    monkeypatch.setattr(tqdm.auto, "tqdm", EveryUpdateTqdm)
    return stream


@pytest.fixture(autouse=True)
def _close_bars():
    """Close the bars a test left open (one that failed half-way): an open bar would move the next test's below it."""
    yield
    for bar in EveryUpdateTqdm.created:
        bar.close()
    EveryUpdateTqdm.created = []


@pytest.fixture
def no_tqdm(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("tqdm must not be created")

    monkeypatch.setattr(tqdm.auto, "tqdm", refuse)
    return calls


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch, no_tqdm):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    state, history = run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, progress=True)
    assert no_tqdm == [] and len(history) == 2 and sys.stderr.getvalue() == ""


def test_no_bar_when_progress_is_false_even_on_a_terminal(monkeypatch, no_tqdm):
    stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", stream)
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, progress=False)
    assert no_tqdm == [] and stream.text == ""


def test_progress_wanted():
    assert progress_wanted(True, FakeTTY())
    assert not progress_wanted(False, FakeTTY())
    assert not progress_wanted(True, io.StringIO())


@pytest.mark.filterwarnings("ignore:loopkit. this process is rank:RuntimeWarning")
def test_only_rank_0_draws_a_bar(monkeypatch):
    """As Lightning's bar, which every rank but 0 disables (torchrun's environment for rank 1 of 2, no group yet)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not progress_wanted(True, FakeTTY())
    monkeypatch.setenv("RANK", "0")
    assert progress_wanted(True, FakeTTY())
    assert not progress_wanted(True, object())  # no isatty at all


def test_progress_wanted_without_tqdm_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    assert not progress_wanted(True, FakeTTY())


def test_bar_on_a_terminal_shows_the_epoch_and_the_latest_loss(monkeypatch):
    fake_tty = use_fake_tty(monkeypatch)
    rec = LossRecorder()
    _, history = run_epochs(train_step(mse), make_state(), make_data(45), epochs=2, callbacks=[rec], progress=True)
    text = fake_tty.text
    assert "epoch 0" in text and "epoch 1" in text
    assert len(EveryUpdateTqdm.created) == 2 and [b.total for b in EveryUpdateTqdm.created] == [45, 45]
    assert all(b.n == 45 for b in EveryUpdateTqdm.created)
    # the in-epoch postfix is the loss of the batch at each refresh: batches 20 and 40 of each epoch
    shown = re.findall(r"(?<![\w/])loss=([^,\s\]|]+)", text)
    losses = [float(v) for v in rec.losses]
    expected = [f"{losses[e * 45 + i - 1]:.4g}" for e in range(2) for i in (REFRESH, 2 * REFRESH)]
    assert sorted(set(shown)) == sorted(set(expected))
    # the closing postfix is the epoch mean, as in the history
    closing = re.findall(r"train/loss=([^,\s\]|]+)", text)
    assert sorted(set(closing)) == sorted({f"{h['train/loss']:.4g}" for h in history})


class CountingTqdm(EveryUpdateTqdm):
    """Records the count each ``update`` call adds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.added: list[int] = []

    def update(self, n=1):
        self.added.append(n)
        return super().update(n)


@pytest.mark.parametrize("slow", [False, True])
def test_the_count_moves_per_batch_only_when_batches_are_slow(monkeypatch, slow):
    use_fake_tty(monkeypatch)
    monkeypatch.setattr(tqdm.auto, "tqdm", CountingTqdm)
    if slow:  # every batch takes longer than the bar's count interval
        monkeypatch.setattr(progress_module, "_COUNT_EVERY_S", 0.0)
    run_epochs(train_step(mse), make_state(), make_data(45), epochs=1, progress=True)
    (bar,) = EveryUpdateTqdm.created
    assert bar.n == 45 and sum(bar.added) == 45
    if slow:
        assert bar.added == [1] * 45
    else:  # fast batches are counted in bunches, never across a reading of the metrics (batches 20, 40)
        assert len(bar.added) <= 8, bar.added
        assert {20, 40} <= set(itertools.accumulate(bar.added))


def test_batches_without_metrics_are_counted_in_bunches_too(monkeypatch):
    use_fake_tty(monkeypatch)
    monkeypatch.setattr(tqdm.auto, "tqdm", CountingTqdm)
    run_epochs(train_step(lambda m, b: None), make_state(), make_data(45), epochs=1, progress=True)  # every batch skipped
    (bar,) = EveryUpdateTqdm.created
    assert bar.n == 45 and len(bar.added) <= 8, bar.added


def test_bar_reads_the_metrics_once_per_refresh_not_per_batch(monkeypatch, conversions):
    fake_tty = use_fake_tty(monkeypatch)
    used = []
    for n in (40, 80):
        start = conversions["n"]
        run_epochs(train_step(mse), make_state(), make_data(n), epochs=1, progress=True)
        used.append(conversions["n"] - start)
    assert fake_tty.text  # the bar was really drawn
    # 40 more batches are 2 more refreshes, each reading the one metric once
    assert used[1] - used[0] == (80 - 40) // REFRESH
    assert used[0] <= 40 // REFRESH + 1 + 2  # refreshes, the epoch mean, and no per-batch reads


def test_the_progress_bar_unit(monkeypatch):
    fake_tty = use_fake_tty(monkeypatch)
    bar = ProgressBar(enabled=True, total=3, desc="epoch 7")
    bar.update()
    bar.update({"loss": 0.123456})
    bar.update(None, n=1)
    bar.close({"train/loss": 0.5})
    text = fake_tty.text
    assert "epoch 7" in text and "loss=0.1235" in text and "train/loss=0.5" in text and "3/3" in text


def test_a_disabled_bar_writes_nothing(monkeypatch):
    fake_tty = use_fake_tty(monkeypatch)
    bar = ProgressBar(enabled=False, total=3, desc="epoch 0")
    bar.update({"loss": 1.0})
    bar.close({"train/loss": 1.0})
    assert fake_tty.text == "" and EveryUpdateTqdm.created == []


def test_the_bar_shows_the_latest_validation_as_lightnings_shows_val_loss(monkeypatch):
    """Epoch 0's bar closes with its validation's mean; epoch 1's bar shows it beside the loss until its own
    (drawn as soon as it is known, before the bar closes)."""
    from loopkit import eval_step

    fake_tty = use_fake_tty(monkeypatch)
    val = (eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(3))
    _, history = run_epochs(train_step(mse), make_state(), make_data(45), epochs=2, val=val, progress=True,
                            sanity_val_batches=1)
    lines = re.split(r"[\r\n]", fake_tty.text)
    first = [line for line in lines if line.startswith("epoch 0") and "train/loss=" in line]
    assert first and f"val/mse={history[0]['val/mse']:.4g}" in first[-1]
    during = [line for line in lines if line.startswith("epoch 1") and "loss=" in line and "train/loss=" not in line]
    assert during and all(f"val/mse={history[0]['val/mse']:.4g}" in line for line in during[:-1])
    assert f"val/mse={history[1]['val/mse']:.4g}" in during[-1]  # (right after epoch 1's validation)
    closing = [line for line in lines if line.startswith("epoch 1") and "train/loss=" in line]
    assert closing and f"val/mse={history[1]['val/mse']:.4g}" in closing[-1]
    # the sanity check's means are not shown: epoch 0's bar has none until its validation
    before = [line for line in lines if line.startswith("epoch 0") and "train/loss=" not in line]
    assert not any("val/mse" in line for line in before[:-1])
    assert f"val/mse={history[0]['val/mse']:.4g}" in before[-1]


def visible_lines(text: str) -> list[str]:
    """What a terminal shows of each line of ``text``: each carriage return writes over the line from its start."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def epoch_bars() -> list[EveryUpdateTqdm]:
    return [bar for bar in EveryUpdateTqdm.created if bar.desc.startswith("epoch")]


class BarAtValidation:
    """A validation metric that records, at each validation's first batch, the epoch bar's count and the bar line last
    drawn (the validations run while the epoch's bar is open)."""

    def __init__(self, fake_tty: FakeTTY):
        self.fake_tty = fake_tty
        self.seen: list[tuple[int, str]] = []
        self._batches = 0

    def __call__(self, model, batch):
        if self._batches % 3 == 0:  # (3 batches a validation)
            bar = epoch_bars()[-1]
            drawn = [line for line in re.split(r"[\r\n]", self.fake_tty.text) if line.startswith("epoch")]
            self.seen.append((bar.n, drawn[-1]))
        self._batches += 1
        return {"mse": mse(model, batch)}


def test_the_count_is_caught_up_and_drawn_before_each_validation(monkeypatch):
    """Fast batches are counted in bunches; a validation, at an epoch's end or after an update, finds the count
    caught up and drawn (as Lightning's bar shows 10/10 while the epoch's validation runs), not where the last
    bunch left it."""
    fake_tty = use_fake_tty(monkeypatch)
    metric = BarAtValidation(fake_tty)
    run_epochs(train_step(mse), make_state(), make_data(10), epochs=1, val=(eval_step(metric), make_data(3)),
               val_every_n_steps=4, sanity_val_batches=0, progress=True)
    # validations after updates 4 and 8, then the epoch's
    assert [n for n, _ in metric.seen] == [4, 8, 10]
    assert [re.search(r"(\d+)/10\b", line).group(1) for _, line in metric.seen] == ["4", "8", "10"]


class ShownAtValidationEnd:
    """Records the epoch bar's line last drawn when a validation's means reach the callbacks."""

    def __init__(self, fake_tty: FakeTTY):
        self.fake_tty = fake_tty
        self.seen: list[tuple[float, str]] = []

    def on_validation_end(self, state, metrics):
        drawn = [line for line in re.split(r"[\r\n]", self.fake_tty.text) if line.startswith("epoch")]
        self.seen.append((metrics["val/mse"], drawn[-1]))


def test_the_latest_validation_is_shown_from_the_bars_first_draw_and_right_after_each_validation(monkeypatch):
    """As Lightning's bar, which shows val_loss from an epoch's first draw: not only from the 20th batch's reading
    of the metrics (an epoch of fewer batches never showed it before closing)."""
    fake_tty = use_fake_tty(monkeypatch)
    shown = ShownAtValidationEnd(fake_tty)
    _, history = run_epochs(train_step(mse), make_state(), make_data(10), epochs=2,
                            val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(3)), val_every_n_steps=5,
                            sanity_val_batches=0, callbacks=[shown], progress=True)
    assert len(shown.seen) == 4  # (after updates 5, 10, 15 and 20: the 10th and 20th stand for their epochs')
    for value, line in shown.seen:
        assert f"val/mse={value:.4g}" in line
    epoch_1 = [line for line in re.split(r"[\r\n]", fake_tty.text) if line.startswith("epoch 1")]
    assert "0/10" in epoch_1[0] and f"val/mse={history[0]['val/mse']:.4g}" in epoch_1[0]


def test_the_progress_bar_refresh_unit(monkeypatch):
    """refresh: the uncounted batches counted and drawn, with ``shown`` as it is now; no metric read, and the next
    reading still on the 20th batch."""
    use_fake_tty(monkeypatch)
    monkeypatch.setattr(tqdm.auto, "tqdm", CountingTqdm)
    shown = {"val/mse": 1.0}
    bar = ProgressBar(enabled=True, total=45, desc="epoch 0", shown=shown)
    (tq,) = EveryUpdateTqdm.created
    assert tq.postfix == "val/mse=1"
    read = []
    monkeypatch.setattr(progress_module._collective, "read", lambda metrics: read.append(1) or {"loss": 0.5})
    metrics = {"loss": torch.tensor(0.5)}
    bar.every = 5
    for _ in range(3):
        bar.tick(metrics)
    assert tq.n == 0
    shown["val/mse"] = 2.0
    bar.refresh()
    assert tq.n == 3 and tq.postfix == "val/mse=2" and read == []
    monkeypatch.setattr(progress_module, "_COUNT_EVERY_S", 0.0)  # (from here on every batch is counted)
    for _ in range(16):
        bar.tick(metrics)
    assert tq.n == 19 and read == []
    bar.tick(metrics)
    assert tq.n == 20 and read == [1] and tq.postfix == "loss=0.5, val/mse=2"
    bar.close()


def resumed_mid_epoch(batches_done: int, n: int = 10) -> TrainState:
    """A state stopped after ``batches_done`` batches of epoch 0 (of ``n``), as a checkpoint of it restores."""
    state, _ = run_epochs(train_step(mse), make_state(), make_data(n), max_steps=batches_done, progress=False)
    assert (state.epoch, state.batch_index) == (0, batches_done)
    return state


def test_a_resumed_epochs_bar_counts_from_where_it_resumed(monkeypatch):
    """As the uninterrupted run's bar, and Lightning's (n = batch_idx + 1 of the epoch's batches): 7/10 to 10/10,
    not 0/3 to 3/3."""
    state = resumed_mid_epoch(7)
    fake_tty = use_fake_tty(monkeypatch)
    run_epochs(train_step(mse), state, make_data(10), epochs=1, progress=True)
    (bar,) = EveryUpdateTqdm.created
    assert (bar.initial, bar.n, bar.total) == (7, 10, 10)
    drawn = [line for line in re.split(r"[\r\n]", fake_tty.text) if line.startswith("epoch 0")]
    assert "7/10" in drawn[0] and "10/10" in drawn[-1]


def test_a_run_resumed_at_an_epochs_end_shows_it_full(monkeypatch, tmp_path):
    """A step checkpoint of an epoch's last update, its validation not made (a crash in it): the resumed run only
    validates and records that epoch; its bar shows 10/10, not 0it."""
    from loopkit import restore, with_checkpointing

    calls = []

    def crashing(model, batch):
        calls.append(1)
        if len(calls) == 2:  # (the first validation after the sanity check's batch)
            raise RuntimeError("crash in the validation")
        return {"mse": mse(model, batch)}

    step = with_checkpointing(train_step(mse), str(tmp_path), every_n_steps=10)
    with pytest.raises(RuntimeError, match="crash in the validation"):
        run_epochs(step, make_state(), make_data(10), epochs=2, val=(eval_step(crashing), make_data(1)),
                   sanity_val_batches=1, progress=False)
    state = restore(make_state(), str(tmp_path))
    assert (state.epoch, state.batch_index, state.step) == (0, 10, 10)
    fake_tty = use_fake_tty(monkeypatch)
    run_epochs(train_step(mse), state, make_data(10), epochs=2,
               val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(1)), sanity_val_batches=0, progress=True)
    assert [(bar.desc, bar.n, bar.total) for bar in epoch_bars()] == [("epoch 0", 10, 10), ("epoch 1", 10, 10)]
    assert not re.search(r"epoch 0:[^\r\n]*\b0it", fake_tty.text)


@pytest.mark.parametrize("epochs, max_steps, expected", [
    (None, 7, [(7, 7)]),  # as Lightning's bar: min(the epoch's batches, the updates left)
    (None, 13, [(10, 10), (3, 3)]),
    (5, 13, [(10, 10), (3, 3)]),  # (Lightning caps only without max_epochs: its last bar ends at 3/10)
    (None, 20, [(10, 10), (10, 10)]),
])
def test_the_last_bar_ends_full_where_max_steps_ends_the_fit_inside_its_epoch(monkeypatch, epochs, max_steps, expected):
    use_fake_tty(monkeypatch)
    run_epochs(train_step(mse), make_state(), make_data(10), epochs=epochs, max_steps=max_steps, progress=True)
    assert [(bar.n, bar.total) for bar in epoch_bars()] == expected
    assert all(bar.first_total == bar.total for bar in epoch_bars())  # (sized so from the start)


class _Stream(torch.utils.data.IterableDataset):
    """Data of no length: 10 batches an epoch, as make_data(10), that the bar cannot count."""

    def __iter__(self):
        return iter(make_data(10))


@pytest.mark.parametrize("epochs, expected", [
    (None, [(13, 13)]),  # as Lightning's bar: min(inf, the updates left), in one epoch of a stream long enough
    (2, [(10, None), (3, None)]),  # (with max_epochs Lightning's bar has no total either)
])
def test_data_of_no_length_gets_the_batches_max_steps_leaves_without_epochs(monkeypatch, epochs, expected):
    use_fake_tty(monkeypatch)
    stream = torch.utils.data.DataLoader(_Stream(), batch_size=None)
    data = stream if epochs else itertools.chain.from_iterable(itertools.repeat(make_data(10), 2))
    state, _ = run_epochs(train_step(mse), make_state(), data, epochs=epochs, max_steps=13, progress=True)
    assert state.step == 13 and [(bar.n, bar.total) for bar in epoch_bars()] == expected


def test_the_capped_total_counts_the_accumulated_batches_of_each_update(monkeypatch):
    """with_grad_accum's factor of each epoch (a schedule: 1, then 3): the batches the remaining updates take."""
    from loopkit import with_grad_accum

    use_fake_tty(monkeypatch)
    step = with_grad_accum(train_step(mse), every={0: 1, 1: 3})
    state, _ = run_epochs(step, make_state(), make_data(10), max_steps=12, progress=True)
    assert state.step == 12 and [(bar.first_total, bar.n, bar.total) for bar in epoch_bars()] == [(10, 10, 10), (6, 6, 6)]


class StopAt:
    """Asks to stop after ``batches`` batches."""

    def __init__(self, batches: int):
        self.batches, self.seen, self.should_stop = batches, 0, False

    def on_batch_end(self, state, metrics):
        self.seen += 1
        self.should_stop = self.seen >= self.batches


def test_the_capped_total_of_a_run_resumed_inside_an_accumulation_group(monkeypatch):
    """Stopped after batch 4 under every=3 (one micro-batch of the second group held): to reach update 2 the resumed
    run trains batches 5 and 6, and its bar goes from 4 to 6 of 6."""
    from loopkit import with_grad_accum
    from loopkit.steps import accumulated

    step = with_grad_accum(train_step(mse), every=3)
    state, _ = run_epochs(step, make_state(), make_data(10), epochs=1, callbacks=[StopAt(4)], progress=False)
    assert (state.batch_index, state.step, accumulated(state)) == (4, 1, 1)
    use_fake_tty(monkeypatch)
    state, _ = run_epochs(step, state, make_data(10), max_steps=2, progress=True)
    assert (state.batch_index, state.step) == (6, 2)
    ((bar),) = epoch_bars()
    assert (bar.initial, bar.first_total, bar.n, bar.total) == (4, 6, 6, 6)


def test_a_bar_whose_total_was_too_low_closes_at_its_count(monkeypatch):
    """The capped total is an estimate (a batch whose loss_fn skips it makes no update): the bar then closes at the
    count it reached, not past its total (5 updates from 10 batches, 2 skipped: 7 batches, where 5 were expected)."""
    use_fake_tty(monkeypatch)
    skips = iter([True, True] + [False] * 20)
    run_epochs(train_step(lambda m, b: None if next(skips) else mse(m, b)), make_state(), make_data(10), max_steps=5,
               progress=True)
    ((bar),) = epoch_bars()
    assert (bar.first_total, bar.n, bar.total) == (5, 7, 7)


def test_a_validation_bar_counts_each_validations_batches_and_is_cleared(monkeypatch, conversions):
    """As Lightning's 'Sanity Checking' and 'Validation' bars (leave=False, under the train bar); no metric read."""
    use_fake_tty(monkeypatch)
    val = (eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(45))
    before = conversions["n"]
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, val=val, sanity_val_batches=2, progress=True)
    with_bars = conversions["n"] - before
    bars = [(bar.desc, bar.n, bar.total, bar.leave) for bar in EveryUpdateTqdm.created]
    assert bars == [("Sanity Checking", 2, 2, False), ("epoch 0", 3, 3, True), ("Validation", 45, 45, False),
                    ("epoch 1", 3, 3, True), ("Validation", 45, 45, False)]
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal: no bar
    before = conversions["n"]
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, val=val, sanity_val_batches=2, progress=True)
    assert with_bars == conversions["n"] - before  # (epochs of 3 batches: the train bar reads nothing either)


def test_each_named_validation_set_has_its_bar(monkeypatch):
    use_fake_tty(monkeypatch)
    val = (eval_step(lambda m, b: {"mse": mse(m, b)}), {"clean": make_data(2), "noisy": make_data(3)})
    run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, val=val, sanity_val_batches=1, progress=True)
    assert [(bar.desc, bar.n, bar.total) for bar in EveryUpdateTqdm.created if not bar.desc.startswith("epoch")] == [
        ("Sanity Checking clean", 1, 1), ("Sanity Checking noisy", 1, 1), ("Validation clean", 2, 2),
        ("Validation noisy", 3, 3)]


def test_evaluate_called_directly_draws_no_bar(monkeypatch, no_tqdm):
    from loopkit import evaluate

    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert evaluate(eval_step(lambda m, b: {"mse": mse(m, b)}), make_state(), make_data(3))
    assert no_tqdm == []


def test_write_line_draws_an_open_bar_again_below_the_line(monkeypatch):
    fake_tty = use_fake_tty(monkeypatch)
    bar = ProgressBar(enabled=True, total=3, desc="epoch 0")
    bar.update()
    progress_module.write_line("a message", sys.stderr)
    bar.close()
    lines = visible_lines(fake_tty.text)
    (at,) = [i for i, line in enumerate(lines) if "a message" in line]
    assert lines[at] == "a message" and lines[at + 1].startswith("epoch 0")


def _early_stopping_fit():
    from loopkit import EarlyStopping

    return dict(val=(eval_step(lambda m, b: {"mse": mse(m, b)}), make_data(2)), sanity_val_batches=0,
                callbacks=[EarlyStopping("val/mse", patience=3, verbose=True)]), "Metric val/mse improved"


def _timer_fit():
    from loopkit import Timer

    ticks = itertools.count()  # (a second a reading)
    return dict(callbacks=[Timer(5, clock=lambda: next(ticks))]), "Timer: time limit reached"


def _signal_fit():
    import os
    import signal

    def loss(model, batch):
        loss.calls += 1
        if loss.calls == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return mse(model, batch)

    loss.calls = 0
    return dict(step=train_step(loss)), "run_epochs: SIGINT received"


@pytest.mark.parametrize("fit", [_early_stopping_fit, _timer_fit, _signal_fit])
def test_loopkits_messages_during_a_fit_leave_the_bar_whole(monkeypatch, fit):
    """EarlyStopping's and Timer's verbose messages and the stop signal's notice go through tqdm (as ConsoleLogger's
    lines): on a line of their own, the bar drawn again below, not written on at its end."""
    kwargs, message = fit()
    fake_tty = use_fake_tty(monkeypatch)
    step = kwargs.pop("step", train_step(mse))
    run_epochs(step, make_state(), make_data(10), epochs=2, progress=True, **kwargs)
    lines = visible_lines(fake_tty.text)
    said = [i for i, line in enumerate(lines) if message in line]
    assert said, fake_tty.text
    for i in said:
        assert lines[i].startswith(message) and "it/s" not in lines[i], lines[i]
        assert lines[i + 1].startswith("epoch")
