"""examples/autoencoder.py, gan.py and lstsq.py, and docs/from_lightning.md, run as documented.

Each example runs in a fresh interpreter (``sys.executable``, ``--quick``, a timeout); the
tests check the exit status and what it prints against an independent reading (the CSV
file the logger wrote, the printed history) and that each example's own check can fail.
The steps written by hand are also checked in this process: the GAN step against a raw
PyTorch loop with two Adam optimizers, the least-squares step against ``torch.linalg.lstsq``
through a checkpoint taken mid-epoch. The guide's loopkit code blocks run in order.
"""

from __future__ import annotations

import copy
import csv
import importlib
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

import loopkit
from tests._driver_helpers import forking_step

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "from_lightning.md"


def run_example(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python examples/<name> args...`` from the repository root; this checkout's loopkit first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def found(pattern: str, proc: subprocess.CompletedProcess[str]) -> tuple[str, ...]:
    match = re.search(pattern, proc.stdout, re.MULTILINE)
    assert match, f"no line matching {pattern!r}\n{output_of(proc)}"
    return match.groups()


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# --- examples/autoencoder.py ----------------------------------------------------------------


@pytest.mark.slow
def test_autoencoder_reconstruction_falls_and_the_csv_holds_what_the_history_printed(tmp_path):
    proc = run_example("autoencoder.py", "--quick", "--log-dir", str(tmp_path))
    assert proc.returncode == 0, output_of(proc)
    first, final = map(float, found(r"after epoch 0 ([0-9.]+), final ([0-9.]+) \(ratio", proc))
    assert final < 0.5 * first, output_of(proc)
    assert found(r"^codes of the validation images: \((\d+), (\d+)\)", proc) == ("270", "3")  # forward = encoder

    epochs = re.findall(r"^epoch\s+(\d+)\s+step\s+(\d+)\s+train/loss ([0-9.]+)\s+val/loss ([0-9.]+)$",
                        proc.stdout, re.MULTILINE)
    assert [int(e[0]) for e in epochs] == list(range(20)), output_of(proc)  # --quick: 20 epochs
    # The CSV, read here: window rows every 10 updates, and the epoch and validation means
    # that run_epochs printed from its history.
    with open(tmp_path / "autoencoder" / "version_0" / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    last_step = int(epochs[-1][1])
    windows = [r["step"] for r in rows if "train/loss" in r]
    assert windows == [float(s) for s in range(10, last_step + 1, 10)]
    assert [f"{r['train/loss_epoch']:.5f}" for r in rows if "train/loss_epoch" in r] == [e[2] for e in epochs]
    assert [f"{r['val/loss']:.5f}" for r in rows if "val/loss" in r] == [e[3] for e in epochs]
    assert [r["step"] for r in rows if "val/loss" in r] == [float(e[1]) for e in epochs]


@pytest.mark.slow
def test_autoencoder_fails_when_the_loss_has_not_halved():
    """Two epochs cannot halve the first epoch's loss: the script says so, with status 1."""
    proc = run_example("autoencoder.py", "--epochs", "2")
    assert proc.returncode == 1, output_of(proc)
    first, final = map(float, found(r"after epoch 0 ([0-9.]+), final ([0-9.]+) \(ratio", proc))
    assert final > 0.5 * first
    assert "FAILED: the validation loss fell only" in proc.stderr, output_of(proc)


@pytest.mark.parametrize("args, message", [(("--epochs", "1"), "--epochs must be at least 2"),
                                           (("--log-every", "0"), "--log-every must be at least 1")])
def test_autoencoder_refuses_bad_counts_naming_the_option(args, message):
    proc = run_example("autoencoder.py", *args)
    assert proc.returncode == 2 and message in proc.stderr, output_of(proc)


# --- examples/gan.py ------------------------------------------------------------------------


@pytest.mark.slow
def test_gan_learns_logs_checkpoints_restores_and_resumes_exactly():
    proc = run_example("gan.py", "--quick")
    assert proc.returncode == 0, output_of(proc)
    mean0, mean1, std0, std1, steps = found(
        r"^GAN errors: mean ([0-9.]+) -> ([0-9.]+), std ([0-9.]+) -> ([0-9.]+) \((\d+) steps", proc
    )
    assert float(mean1) < 0.5 * float(mean0) and float(std1) < 0.5 * float(std0), output_of(proc)
    assert int(steps) == 12 * (4096 // 128)  # one step per batch, 12 epochs
    assert found(r"^with_logging wrote (\d+) train/g_loss rows", proc) == (str(int(steps) // 16),)
    assert re.search(rf"^restored the newest checkpoint \(step {steps}\): equals the final state$", proc.stdout, re.MULTILINE)
    assert re.search(r"^resumed from ckpt-\S+-epoch1-batch0: the same final weights, bit for bit$", proc.stdout, re.MULTILINE)


def test_gan_fails_when_the_generator_does_not_learn():
    """With the generator group's learning rate at 0 the samples never move: status 1."""
    proc = run_example("gan.py", "--epochs", "2", "--lr-g", "0")
    assert proc.returncode == 1, output_of(proc)
    mean0, mean1, std0, std1 = found(r"^GAN errors: mean ([0-9.]+) -> ([0-9.]+), std ([0-9.]+) -> ([0-9.]+)", proc)
    assert (mean0, std0) == (mean1, std1)
    assert "FAILED: the generated mean's error" in proc.stderr, output_of(proc)


def test_gan_step_equals_a_raw_loop_with_two_adam_optimizers(take_snapshot, assert_trees_equal):
    """One Adam with two groups, each update giving gradients to one network, is two Adams, bit for bit."""
    gan = load_example("gan")
    state = gan.make_state(seed=3, lr_g=1e-3, lr_d=2e-3)  # different rates: swapped groups would show
    generator, discriminator = (copy.deepcopy(state.model[k]) for k in ("generator", "discriminator"))
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    noise = torch.Generator().manual_seed(3)  # what TrainState.create(seed=3) puts in state.rng
    data = torch.Generator().manual_seed(7)
    before = take_snapshot(state)
    first = state
    for _ in range(6):
        real = gan.TARGET_MEAN + gan.TARGET_STD * torch.randn(32, 2, generator=data)
        global_rng = torch.get_rng_state()
        state, metrics = gan.gan_step(state, real)
        assert torch.equal(torch.get_rng_state(), global_rng), "the step left torch's global RNG changed"

        z = torch.randn(32, gan.NOISE, generator=noise)
        fake = generator(z)
        opt_d.zero_grad()
        d_loss = bce(discriminator(real), torch.ones(32, 1)) + bce(discriminator(fake.detach()), torch.zeros(32, 1))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = bce(discriminator(fake), torch.ones(32, 1))
        g_loss.backward()
        opt_g.step()
        assert torch.equal(metrics["d_loss"], d_loss.detach()) and torch.equal(metrics["g_loss"], g_loss.detach())
    assert (state.step, state.batch_index) == (6, 6)
    for name, raw, opt in (("generator", generator, opt_g), ("discriminator", discriminator, opt_d)):
        for p, q in zip(state.model[name].parameters(), raw.parameters()):
            assert torch.equal(p, q), f"{name} weights differ from the raw loop's"
            assert_trees_equal(state.optimizer.state[p], opt.state[q])
    assert_trees_equal(take_snapshot(first), before)  # pure: the first state is untouched
    again, _ = gan.gan_step(first, real)  # the noise comes from the state: the same again
    torch.rand(3)  # whatever else draws from the global RNG in between
    third, _ = gan.gan_step(first, real)
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), third.model.parameters()))


def _without_the_fits_own(extras):
    """A state's extras less the marks ``run_epochs`` leaves at a fit's end (the epoch a ``max_steps`` cut short)."""
    return {k: v for k, v in extras.items() if not k.startswith("run_epochs/")}


def test_gan_step_raising_mid_fit_leaves_the_fits_updates_before_the_failure(take_snapshot, assert_trees_equal):
    """The step forks first, so an error in it changed nothing of the state it was given: a malformed batch at
    batch 3 of run_epochs used to leave state_at_error None, the fit lost. Reference: the fit stopped before that
    batch (max_steps=3), as a whole state, bit for bit."""
    gan = load_example("gan")
    good = [gan.TARGET_MEAN + gan.TARGET_STD * torch.randn(16, 2, generator=torch.Generator().manual_seed(i))
            for i in range(5)]
    bad = good[:3] + [torch.randn(16, 3)] + good[4:]  # the discriminator's forward fails on batch 3
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as info:
        loopkit.run_epochs(gan.gan_step, gan.make_state(0, 1e-3, 1e-3), bad, epochs=1, progress=False)
    at = loopkit.state_at_error(info.value)
    assert at is not None, "the fit's updates before the failure were lost"
    stopped, _ = loopkit.run_epochs(gan.gan_step, gan.make_state(0, 1e-3, 1e-3), good, max_steps=3, progress=False)
    got, expected = take_snapshot(at), take_snapshot(stopped)
    got["extras"], expected["extras"] = _without_the_fits_own(got["extras"]), _without_the_fits_own(expected["extras"])
    assert (at.step, at.batch_index) == (3, 3)
    assert_trees_equal(got, expected)


# --- examples/lstsq.py ----------------------------------------------------------------------


def test_lstsq_matches_torch_linalg_lstsq():
    proc = run_example("lstsq.py", "--quick")
    assert proc.returncode == 0, output_of(proc)
    (diff,) = found(r"^closed-form weights vs torch\.linalg\.lstsq: max abs difference ([0-9.e+-]+) ", proc)
    assert float(diff) <= 1e-9, output_of(proc)
    epochs = re.findall(r"^epoch (\d)  solves (\d)  batch mse before the solve ([0-9.]+)  fit mse ([0-9.]+)$",
                        proc.stdout, re.MULTILINE)
    assert [(e[0], e[1]) for e in epochs] == [("0", "1"), ("1", "2")], output_of(proc)
    # the fit's MSE from the sums alone equals the next epoch's MSE computed batch by batch
    assert epochs[0][3] == epochs[1][2], output_of(proc)
    (val_mse,) = found(r"^validation mse ([0-9.]+) ", proc)
    assert float(val_mse) < 1.5 * 0.1**2  # held-out error at the noise level


def test_lstsq_fails_when_the_fit_misses_data():
    """Solving on 3 of 16 batches gives other weights than lstsq on all the data: status 1."""
    proc = run_example("lstsq.py", "--quick", "--limit-train-batches", "3")
    assert proc.returncode == 1, output_of(proc)
    (diff,) = found(r"max abs difference ([0-9.e+-]+) ", proc)
    assert float(diff) > 1e-3
    assert "FAILED: the weights differ from torch.linalg.lstsq" in proc.stderr, output_of(proc)


def test_lstsq_sums_survive_a_checkpoint_mid_epoch_and_the_steps_are_pure(tmp_path, take_snapshot, assert_trees_equal):
    lstsq = load_example("lstsq")
    x, y = lstsq.make_data(600, seed=5)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 600, 100)]

    def fresh() -> loopkit.TrainState:
        return loopkit.TrainState.create(nn.Linear(lstsq.FEATURES, lstsq.OUTPUTS, dtype=torch.float64))

    whole = fresh()
    for i, batch in enumerate(batches):
        before = take_snapshot(whole)
        new, _ = lstsq.lstsq_step(whole, batch)
        assert_trees_equal(take_snapshot(whole), before)
        whole = new
        if i == 2:  # a checkpoint after three batches, restored into a fresh state
            saved = loopkit.checkpoint.save(whole, tmp_path)
    before = take_snapshot(whole)
    solved, metrics = lstsq.solve(whole)
    assert_trees_equal(take_snapshot(whole), before)
    assert solved.step == 1 and not any(k.startswith("lstsq/") for k in solved.extras)

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # restore sets the global RNGs to the saved ones
        resumed = loopkit.restore(fresh(), saved)
    random.setstate(py_state)
    np.random.set_state(np_state)
    for batch in batches[3:]:
        resumed, _ = lstsq.lstsq_step(resumed, batch)
    resumed, _ = lstsq.solve(resumed)
    for p, q in zip(resumed.model.parameters(), solved.model.parameters()):
        assert torch.equal(p, q)

    reference = torch.linalg.lstsq(lstsq.with_ones(x), y).solution
    fitted = torch.cat([solved.model.weight.detach().T, solved.model.bias.detach()[None]])
    assert float((fitted - reference).abs().max()) < 1e-9
    residual = lstsq.with_ones(x) @ reference - y
    assert float(metrics["fit_mse"]) == pytest.approx(float(residual.pow(2).mean()), rel=1e-9)


def test_lstsq_steps_raising_mid_fit_leave_the_fits_sums_and_solves_before_the_failure(take_snapshot, assert_trees_equal):
    """Neither the step nor its flush changes the state it is given: an error in either (a batch of the wrong width at
    batch 2 of the second epoch; a singular fit at the first epoch's solve) used to leave state_at_error None.
    Reference: the same calls made by hand up to the failure."""
    lstsq = load_example("lstsq")
    x, y = lstsq.make_data(300, seed=2)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)]

    def fresh() -> loopkit.TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same initial weights each time
            return loopkit.TrainState.create(nn.Linear(lstsq.FEATURES, lstsq.OUTPUTS, dtype=torch.float64))

    class Data:  # the second pass's third batch is malformed
        passes = 0

        def __iter__(self):
            self.passes += 1
            for i, batch in enumerate(batches):
                yield (batch[0], batch[1][:, :1].repeat(1, 3)) if (self.passes, i) == (2, 2) else batch

    by_hand = fresh()
    for batch in batches:
        by_hand, _ = lstsq.lstsq_step(by_hand, batch)
    by_hand, _ = lstsq.solve(by_hand)
    by_hand = by_hand.evolve(epoch=1, batch_index=0)
    for batch in batches[:2]:
        by_hand, _ = lstsq.lstsq_step(by_hand, batch)
    with pytest.raises(RuntimeError) as info:
        loopkit.run_epochs(lstsq.lstsq_step, fresh(), Data(), epochs=2, progress=False)
    at = loopkit.state_at_error(info.value)
    assert at is not None and (at.step, at.epoch, at.batch_index) == (1, 1, 2)
    got, expected = take_snapshot(at), take_snapshot(by_hand)
    got["extras"] = _without_the_fits_own(got["extras"])
    assert_trees_equal(got, expected)

    flat = [(torch.zeros_like(bx), by) for bx, by in batches]  # X^T X of constant features is singular
    by_hand = fresh()
    for batch in flat:
        by_hand, _ = lstsq.lstsq_step(by_hand, batch)
    with pytest.raises(RuntimeError, match="singular") as info:
        loopkit.run_epochs(lstsq.lstsq_step, fresh(), flat, epochs=1, progress=False)
    at = loopkit.state_at_error(info.value)
    assert at is not None and (at.step, at.batch_index) == (0, 3)
    got, expected = take_snapshot(at), take_snapshot(by_hand)
    got["extras"] = _without_the_fits_own(got["extras"])
    assert_trees_equal(got, expected)


# --- docs/from_lightning.md -----------------------------------------------------------------


def guide_blocks() -> list[str]:
    """The guide's python blocks marked ``<!-- loopkit -->`` (the Lightning blocks are not run)."""
    return re.findall(r"^<!-- loopkit -->\n```python\n(.*?)^```$", GUIDE.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def test_guide_loopkit_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    blocks = guide_blocks()
    assert len(blocks) >= 5, "the guide should hold the converted classifier and the flag examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "from_lightning"}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):  # seed_everything and restore set the global RNGs
            for i, block in enumerate(blocks):
                exec(compile(block, f"docs/from_lightning.md loopkit block {i + 1}", "exec"), namespace)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    assert namespace["test"]["acc"] > 0.85
    assert namespace["resumed"].epoch == namespace["state"].epoch + 2
    assert (tmp_path / "classifier.safetensors").stat().st_size > 0
    assert (tmp_path / "runs" / "classifier" / "version_0" / "metrics.csv").exists()
    assert "epoch 2: val/acc" in capsys.readouterr().out


def _resolves(dotted: str) -> bool:
    """Whether ``loopkit.a.b`` names an attribute or module of loopkit."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            try:
                obj = importlib.import_module(".".join(parts[: i + 1]))
                continue
            except ImportError:
                return False
        obj = getattr(obj, part)
    return True


def test_guide_names_only_what_loopkit_has():
    """Every ``loopkit.x`` and ``with_x`` in the guide exists, except on lines that say "not yet";
    and what those lines call planned does not exist yet (update the guide when it lands)."""
    planned = set()
    for lineno, line in enumerate(GUIDE.read_text(encoding="utf-8").splitlines(), start=1):
        names = re.findall(r"\bloopkit(?:\.[A-Za-z_]\w*)+", line)
        names += [f"loopkit.{n}" for n in re.findall(r"\b(with_[a-z_]+)\b", line)]
        for name in names:
            if "not yet" in line:
                planned.add(name)
            else:
                assert _resolves(name), f"docs/from_lightning.md:{lineno} names {name}, which loopkit does not have"
    landed = sorted(n for n in planned if _resolves(n))
    assert not landed, f"docs/from_lightning.md calls {landed} 'not yet' available, but they exist now"


def test_guide_maps_the_hooks_and_flags_a_lightning_user_reaches_for():
    text = GUIDE.read_text(encoding="utf-8")
    hooks = ["training_step", "validation_step", "test_step", "predict_step", "configure_optimizers",
             "self.log", "save_hyperparameters", "on_train_epoch_end", "on_train_epoch_start",
             "on_train_batch_end", "on_validation_epoch_end", "on_fit_start", "on_fit_end",
             "automatic_optimization", "LightningDataModule"]
    flags = ["max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val",
             "gradient_clip_algorithm", '"16-mixed"', '"bf16-mixed"', "val_check_interval",
             "check_val_every_n_epoch", "num_sanity_val_steps", "limit_train_batches", "limit_val_batches",
             "callbacks=", "logger=", "enable_progress_bar", "deterministic", "CUBLAS_WORKSPACE_CONFIG", "barebones=True", "seed_everything",
             "default_root_dir", 'ckpt_path="last"', "detect_anomaly", "fast_dev_run", "devices=", 'strategy="ddp"',
             "num_nodes", "WandbLogger(", "MLFlowLogger("]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    code = " ".join(span for row in rows for span in re.findall(r"`([^`]+)`", row))  # the tables' code
    missing = [name for name in hooks + flags if name not in code]
    assert not missing, f"docs/from_lightning.md does not map {missing}"
    assert "class LitClassifier(L.LightningModule)" in text


def test_the_guide_says_how_to_predict_under_the_fits_mixed_precision():
    """Lightning's trainer.predict runs predict_step under the Trainer's precision (autocast); with_amp wraps steps
    and refuses a predict fn, so the guide's predict_step and mixed-precision rows say that fn autocasts itself,
    and the fn they give predicts as a raw autocast loop over the model in eval mode (the reference)."""
    rows = [line for line in GUIDE.read_text(encoding="utf-8").splitlines() if line.startswith(("| `predict_step`",
            '| `precision="16-mixed"`', '| `precision="bf16-mixed"`'))]
    assert len(rows) == 3 and all("predict" in row and "torch.autocast(" in row for row in rows)
    with pytest.raises(TypeError, match="with_amp needs a loopkit train_step"):
        loopkit.with_amp(lambda model, batch: model(batch[0]), dtype=torch.bfloat16)

    def fn(model, batch):  # as the predict_step row writes it
        with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, cache_enabled=False):
            return model(batch[0])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    data = [(torch.randn(3, 4),) for _ in range(2)]
    reference = copy.deepcopy(model).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = [reference(x) for (x,) in data]
    got = loopkit.predict(fn, loopkit.TrainState.create(model), data)
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, e) for g, e in zip(got, expected))


def test_the_guides_training_step_row_says_a_skipped_batch_is_no_step_unlike_lightnings():
    """A ``loss_fn`` returning None makes no update: ``state.step`` and the scheduler stay (Lightning counts the
    batch in ``global_step`` and steps an ``interval="step"`` scheduler); the guide's ``training_step`` row says so."""
    row = next(line for line in GUIDE.read_text(encoding="utf-8").splitlines()
               if line.startswith("| `training_step(batch, batch_idx)`"))
    assert "global_step" in row and "max_steps" in row and "every_n_steps" in row and "scheduler" in row
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = loopkit.TrainState.create(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5))
    data = [torch.ones(1, 2) * i for i in range(4)]
    step = loopkit.train_step(lambda m, b: None if float(b.sum()) == 2 else m(b).sum())
    state, _ = loopkit.run_epochs(step, state, data, epochs=1, progress=False)
    assert (state.step, state.batch_index, state.scheduler.last_epoch) == (3, 0, 3)


def test_the_guides_plateau_callback_cuts_the_rate_a_forking_step_of_ones_own_trains_with():
    """The guide's ReduceLROnPlateau callback, taken from the guide, with a step of one's own that forks the state
    (examples/gan.py's pattern: a new optimizer at every call): its cuts reach the rate the step trains with, as a
    raw loop's ReduceLROnPlateau does (it cut the fit's first optimizer, which nothing trained with any more)."""
    code = re.search(r"(class ReduceLROnPlateau\(loopkit\.Callback\).*?)\n\n\nclass ", GUIDE.read_text(encoding="utf-8"),
                     re.DOTALL).group(1)
    namespace = {"loopkit": loopkit, "torch": torch}
    exec(code, namespace)
    generator = torch.Generator().manual_seed(0)
    train = [(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(4)]
    val = [(torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator))]
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    options = {"factor": 0.5, "patience": 0, "threshold": 0.5}  # a cut at every epoch

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    model, optimizer = fresh()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **options)
    for _ in range(3):
        for batch in train:
            optimizer.zero_grad()
            loss(model, batch).backward()
            optimizer.step()
        with torch.no_grad():
            scheduler.step(loss(model, val[0]).item())
    final, _ = loopkit.run_epochs(
        forking_step(loss), loopkit.TrainState.create(*fresh()), train, epochs=3,
        val=(loopkit.eval_step(lambda m, b: {"loss": loss(m, b)}), val),
        callbacks=[namespace["ReduceLROnPlateau"]("val/loss", **options)], progress=False,
    )
    assert final.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.125
    assert torch.equal(final.model.weight, model.weight) and torch.equal(final.model.bias, model.bias)


def _group_added_and_stepped(make, steps: int = 12, *, append_base_lr: bool = False) -> None:
    """The BackboneFinetuning row's case in a plain loop: a scheduler made over one group, a second group added after
    the first step (with ``base_lrs`` extended when asked), then ``steps`` optimizer and scheduler steps."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    scheduler = make(optimizer)
    for step in range(steps):
        if step == 1:
            optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
            if append_base_lr:
                scheduler.base_lrs.append(0.01)
        optimizer.step()
        scheduler.step(1.0) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) else scheduler.step()


def test_the_guides_backbone_finetuning_row_sorts_the_schedulers_as_torch_does():
    """The row's list of schedulers that take a group added mid-fit as the others, and of those that refuse it
    (CosineAnnealingLR at its T_max + 1-th step) unless the new group's rate is appended to base_lrs."""
    import torch

    lr = torch.optim.lr_scheduler
    row = next(line for line in GUIDE.read_text().splitlines() if line.startswith("| `BackboneFinetuning`"))
    takes = {"StepLR": lambda o: lr.StepLR(o, 2), "MultiStepLR": lambda o: lr.MultiStepLR(o, [2, 5]),
             "ExponentialLR": lambda o: lr.ExponentialLR(o, 0.9), "LinearLR": lambda o: lr.LinearLR(o),
             "ConstantLR": lambda o: lr.ConstantLR(o), "PolynomialLR": lambda o: lr.PolynomialLR(o),
             "ReduceLROnPlateau": lambda o: lr.ReduceLROnPlateau(o)}
    listed = re.search(r"one that steps each group from its own rate \(([^:]*):", row).group(1)
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(takes)
    for make in takes.values():
        _group_added_and_stepped(make)
    cosine = lambda o: lr.CosineAnnealingLR(o, T_max=3)  # noqa: E731
    assert "`CosineAnnealingLR` (at its `T_max + 1`-th step)" in row
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is"):
        _group_added_and_stepped(cosine)
    _group_added_and_stepped(cosine, append_base_lr=True)  # the row's remedy
