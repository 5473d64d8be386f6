"""Tests of loopkit.checkpoint: the on-disk format, atomic saves, verification, safe loading,
restore, and the safetensors export.

References: checksums computed here with Python integers and hashlib; the state the checkpoint was saved from
(and training continued from it, side by side); the ``safetensors`` package reading the
export; ``torch.load(weights_only=False)`` proving a planted pickle really would run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import loopkit
from loopkit import CheckpointCorruptError, CheckpointLoadError, StateMismatchError, TrainState, checkpoint, train_step, with_grad_accum
from tests._driver_helpers import make_data, make_state, mse

# --- helpers -----------------------------------------------------------------------------------


def _state(make_mlp, seed: int = 0, **sizes) -> TrainState:
    model = make_mlp(seed, **sizes)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return TrainState.create(model, opt, sched, seed=seed)


def _trained(make_mlp, make_batches, mse_loss, n: int = 3, **sizes) -> TrainState:
    """A state mid-accumulation: optimizer and scheduler state, partial gradients, an extras counter."""
    state = _state(make_mlp, **sizes)
    step = with_grad_accum(train_step(mse_loss), every=2)
    d_in = sizes.get("d_in", 4)
    d_out = sizes.get("d_out", 2)
    for batch in make_batches(n, d_in=d_in, d_out=d_out):
        state, _ = step(state, batch)
    return state


def _reference_checksum(raw: bytes, *, crc: bool = True) -> str:
    """The manifest's checksum, written independently: 4 KiB blocks XOR-ed as Python integers, the
    CRC-32 of the whole (``crc=False``: the checksum of manifests keyed ``fold_sha256``), then sha256."""
    whole = len(raw) - len(raw) % 4096
    fold = 0
    for start in range(0, whole, 4096):
        fold ^= int.from_bytes(raw[start : start + 4096], "little")
    folded = fold.to_bytes(4096, "little") if whole else b""
    crc32 = zlib.crc32(raw).to_bytes(4, "little") if crc else b""
    return hashlib.sha256(folded + raw[whole:] + crc32 + len(raw).to_bytes(8, "little")).hexdigest()


def _resign(ckpt: Path) -> None:
    """Rewrite the manifest for the files as they are now (checksums computed here, independently)."""
    files = {}
    for name in ("state.pt", "meta.json"):
        raw = (ckpt / name).read_bytes()
        files[name] = {"size": len(raw), "fold_crc32_sha256": _reference_checksum(raw)}
    manifest = {"format": "loopkit-checkpoint", "version": 1, "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _flip_middle(file: Path, n: int = 4) -> None:
    raw = bytearray(file.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, middle + n):
        raw[i] ^= 0xFF
    file.write_bytes(bytes(raw))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def _sd(state: TrainState) -> dict:
    return state.state_dict()


# --- the format --------------------------------------------------------------------------------


def test_save_writes_payload_meta_and_a_manifest_of_sizes_and_checksums(tmp_path, make_mlp, make_batches, mse_loss):
    state = _trained(make_mlp, make_batches, mse_loss)
    path = checkpoint.save(state, tmp_path, reason="test")
    assert path.parent == tmp_path and path.name == f"ckpt-000001-step{state.step}-epoch0-batch3"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.json", "state.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("state.pt", "meta.json"):
        raw = (path / name).read_bytes()
        assert manifest["files"][name] == {"size": len(raw), "fold_crc32_sha256": _reference_checksum(raw)}
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["step"], meta["epoch"], meta["batch_index"], meta["reason"]) == (state.step, 0, 3, "test")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_the_checksum_equals_an_independent_reference(size):
    raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert checkpoint.checksum(raw) == _reference_checksum(raw)


def test_the_checksum_changes_with_any_damage_inside_one_4k_window():
    gen = np.random.default_rng(0)
    raw = gen.integers(0, 256, 64 * 4096 + 100, dtype=np.uint8).tobytes()
    good = checkpoint.checksum(raw)
    for trial in range(300):
        damaged = bytearray(raw)
        start = int(gen.integers(0, len(raw) - 1))
        length = int(gen.integers(1, 4097 - start % 4096))  # stays inside the window of `start`
        if trial % 3 == 0:
            damaged[start : start + length] = bytes(len(damaged[start : start + length]))  # a zeroed run
        else:
            for i in gen.integers(start, min(start + length, len(raw)), size=int(gen.integers(1, 8))):
                damaged[i] ^= 1 << int(gen.integers(0, 8))  # flipped bits
        if bytes(damaged) != raw:
            assert checkpoint.checksum(bytes(damaged)) != good, (trial, start, length)
    assert checkpoint.checksum(raw[:-1]) != good and checkpoint.checksum(raw + b"\0") != good


def test_the_checksum_changes_when_equal_pages_are_zeroed_where_the_fold_alone_cancels():
    raw = bytearray(np.full(16 * 4096 // 4, 0.5, dtype=np.float32).tobytes())  # constant pages, as a constant init
    damaged = bytearray(raw)
    damaged[4096:8192] = bytes(4096)
    damaged[3 * 4096 : 4 * 4096] = bytes(4096)  # two lost pages of the same content
    assert _reference_checksum(bytes(damaged), crc=False) == _reference_checksum(bytes(raw), crc=False)
    assert checkpoint.checksum(bytes(damaged)) != checkpoint.checksum(bytes(raw))


def test_a_checkpoint_whose_manifest_has_the_fold_only_checksum_still_verifies(tmp_path, make_mlp, make_batches, mse_loss):
    state = _trained(make_mlp, make_batches, mse_loss)
    path = checkpoint.save(state, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("state.pt", "meta.json"):
        raw = (path / name).read_bytes()
        manifest["files"][name] = {"size": len(raw), "fold_sha256": _reference_checksum(raw, crc=False)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    checkpoint.verify(path)
    _flip_middle(path / "state.pt")
    with pytest.raises(loopkit.CheckpointCorruptError, match="checksum"):
        checkpoint.verify(path)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "no-fsync"])
def test_a_durable_save_fsyncs_every_file_and_directory_and_durable_false_none(
    tmp_path, make_mlp, make_batches, mse_loss, monkeypatch, durable
):
    state = _trained(make_mlp, make_batches, mse_loss)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = checkpoint.save(state, tmp_path, durable=durable)
    assert len(synced) == (5 if durable else 0)  # state.pt, meta.json, manifest.json, the checkpoint, its parent
    checkpoint.verify(path)
    restored = checkpoint.restore(_state(make_mlp, seed=1), path)
    for name, value in state.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], value)
    assert restored.step == state.step and restored.batch_index == state.batch_index


def test_a_copied_snapshot_is_written_as_it_was_taken_after_training_changed_the_state_in_place(
    tmp_path, make_mlp, make_batches, mse_loss, round_trip, assert_trees_equal
):
    """``snapshot(copy=True)`` (what ``async_save`` writes in the background) holds the state as it was when taken,
    though donated training updates its parameters, optimizer state and gradients in place before it is written.
    Reference: the state dict through ``torch.save`` when the snapshot was taken."""
    state = _trained(make_mlp, make_batches, mse_loss)
    taken = round_trip(state.state_dict())
    snap = checkpoint.snapshot(state, copy=True)
    step = loopkit.donate(with_grad_accum(train_step(mse_loss), every=2))
    for batch in make_batches(3, seed=1):
        state, _ = step(state, batch)
    assert not torch.equal(state.model[0].weight, taken["model"]["0.weight"])  # (training did change it)
    written = checkpoint.load(checkpoint.write(snap, tmp_path))
    assert_trees_equal(written["state"], taken)


def test_a_second_save_never_writes_over_the_first(tmp_path, make_mlp):
    state = _state(make_mlp)
    first = checkpoint.save(state, tmp_path)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = checkpoint.save(state, tmp_path)  # the very same position
    assert second != first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [c.path for c in checkpoint.list_checkpoints(tmp_path)] == [first, second]


def test_everything_saved_is_tensors_numbers_and_strings(tmp_path, make_mlp, make_batches, mse_loss):
    path = checkpoint.save(_trained(make_mlp, make_batches, mse_loss), tmp_path)
    payload = torch.load(path / "state.pt", weights_only=True)

    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str), f"{where}: key {k!r}"
                walk(v, f"{where}.{k}")
        else:
            assert type(value) in (torch.Tensor, int, float, str, bool), f"{where}: {type(value)}"

    walk(payload, "payload")
    rng = payload["global_rng"]
    assert rng["numpy"]["keys"].dtype == torch.int64 and rng["python"]["state"].dtype == torch.int64
    assert rng["torch"].dtype == torch.uint8


def test_torch_load_is_always_called_with_weights_only_true(tmp_path, make_mlp, monkeypatch):
    path = checkpoint.save(_state(make_mlp), tmp_path)
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only", "not passed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    checkpoint.restore(_state(make_mlp, seed=1), path)
    checkpoint.restore(_state(make_mlp, seed=1), tmp_path)
    assert calls == [True, True]


# --- restore -----------------------------------------------------------------------------------


def test_restore_is_exact_and_training_continues_identically(
    tmp_path, make_mlp, make_batches, mse_loss, take_snapshot, assert_trees_equal
):
    state = _trained(make_mlp, make_batches, mse_loss)
    checkpoint.save(state, tmp_path)
    other = _state(make_mlp, seed=5)  # different weights, seed and RNG
    given = take_snapshot(other)
    restored = checkpoint.restore(other, tmp_path)
    assert_trees_equal(take_snapshot(restored), take_snapshot(state))
    assert_trees_equal(take_snapshot(other), given)  # the given state is untouched
    step = with_grad_accum(train_step(mse_loss), every=2)
    for batch in make_batches(5, seed=3):  # the original and the restored state go on side by side
        state, _ = step(state, batch)
        restored, _ = step(restored, batch)
    assert_trees_equal(take_snapshot(restored), take_snapshot(state))


def test_restore_puts_the_global_rngs_back(tmp_path, make_mlp):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()  # a cached gaussian in numpy's state, and in Python's, as well
    random.gauss(0, 1)
    checkpoint.save(_state(make_mlp), tmp_path)

    def draw():
        python = [random.random() for _ in range(3)] + [random.gauss(0, 1)]
        return torch.rand(3), np.random.rand(3), np.random.randn(), python

    expected = draw()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    checkpoint.restore(_state(make_mlp), tmp_path)
    got = draw()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_restore_without_checkpoints_returns_the_given_state(tmp_path, make_mlp):
    state = _state(make_mlp)
    assert checkpoint.restore(state, tmp_path / "never-created") is state
    assert checkpoint.restore(state, tmp_path) is state
    with pytest.raises(FileNotFoundError, match="ckpt-000009-step1-epoch0-batch1"):
        checkpoint.restore(state, tmp_path / "ckpt-000009-step1-epoch0-batch1")


def test_restore_of_a_folder_of_lightning_checkpoints_warns_and_returns_the_given_state(tmp_path, make_mlp):
    """Before: a folder holding only Lightning's checkpoints gave the template silently, and the fit started afresh.
    Reference: the given state (SPEC: restore gives it where there is no checkpoint), and no warning for an empty
    folder nor once a loopkit checkpoint is there."""
    state = _state(make_mlp)
    for name in ("epoch=3-step=16.ckpt", "last.ckpt"):  # the layout of Lightning's (torch.save of a dict)
        weights = {f"net.{k}": v for k, v in state.model.state_dict().items()}
        torch.save({"epoch": 3, "global_step": 16, "state_dict": weights, "pytorch-lightning_version": "2.6.6"},
                   tmp_path / name)
    foreign = r"holds no loopkit checkpoint, but epoch=3-step=16\.ckpt, last\.ckpt"
    with pytest.warns(RuntimeWarning, match=foreign) as caught:
        assert checkpoint.restore(state, tmp_path) is state
    assert str(tmp_path) in str(caught[0].message) and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.restore(state, tmp_path / "empty") is state
        checkpoint.save(state.evolve(step=3), tmp_path)
        assert checkpoint.restore(state, tmp_path).step == 3


@pytest.mark.parametrize("name", ["epoch=1-step=8.ckpt", "last.CKPT", "model.pt", "model.pth", "model.safetensors",
                                  "notes.txt"])
def test_restore_of_a_single_file_of_another_kind_gives_the_hint_the_folder_of_them_gets(tmp_path, make_mlp, name):
    """docs/from_lightning.md maps load_from_checkpoint(path) to loopkit.restore(template, path): given Lightning's
    .ckpt file (or a torch.save / safetensors file) restore raised a bare NotADirectoryError, where a folder of them
    gets a warning saying how to start from one. Reference: that warning's text; a file of no such kind is named
    as before, without it."""
    state = _state(make_mlp)
    torch.save({"epoch": 1, "global_step": 8, "pytorch-lightning_version": "2.6.6",
                "state_dict": {f"net.{k}": v for k, v in state.model.state_dict().items()}}, tmp_path / name)
    (tmp_path / "folder").mkdir()
    torch.save({}, tmp_path / "folder" / "last.ckpt")
    with pytest.warns(RuntimeWarning) as caught:
        checkpoint.restore(state, tmp_path / "folder")
    hint = re.search(r"To start from such a file, .*weights_only=True\)", str(caught[0].message)).group(0)
    with pytest.raises(NotADirectoryError, match="is neither a checkpoint nor a directory of checkpoints") as info:
        loopkit.restore(state, tmp_path / name)
    message = str(info.value)
    assert str(tmp_path / name) in message
    assert (hint in message) == (name != "notes.txt")
    assert ("safetensors.torch.load_file(path)" in message) == name.endswith(".safetensors")


@pytest.mark.parametrize("path", [None, 3, ["ckpt"]])
def test_restore_names_a_path_that_is_not_one(make_mlp, path):
    """Before, restore(state, None) raised Path's bare "expected str, bytes or os.PathLike object"."""
    message = rf"restore: path must be a checkpoint or a directory of checkpoints .*got {type(path).__name__}"
    with pytest.raises(TypeError, match=message):
        loopkit.restore(_state(make_mlp), path)


def test_restore_picks_the_newest_by_save_order(tmp_path, make_mlp):
    state = _state(make_mlp)
    checkpoint.save(state.evolve(step=9), tmp_path)
    checkpoint.save(state.evolve(step=4), tmp_path)  # a run resumed from an older point saves later
    assert checkpoint.restore(state, tmp_path).step == 4


# --- corrupt and incomplete checkpoints ---------------------------------------------------------


def test_a_newest_checkpoint_that_is_a_link_to_nothing_is_skipped_as_corrupt(tmp_path, make_mlp):
    """A checkpoint moved to another disk and linked back, that disk not mounted: restore took the dangling link
    for one rotation had removed, listed the folder again a thousand times and raised."""
    state = _state(make_mlp)
    checkpoint.save(state.evolve(step=1), tmp_path)
    newest = checkpoint.save(state.evolve(step=2), tmp_path)
    import shutil

    shutil.rmtree(newest)
    os.symlink(tmp_path / "elsewhere" / newest.name, newest)
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint {re.escape(str(newest))}"):
        assert checkpoint.restore(state, tmp_path).step == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):  # (by its own path: named, as a path to nothing)
        checkpoint.restore(state, newest)


def _two_checkpoints(tmp_path, make_mlp, make_batches, mse_loss):
    """Two checkpoints of a model big enough that the middle of state.pt is tensor data."""
    sizes = {"d_in": 64, "hidden": 256}
    state = _trained(make_mlp, make_batches, mse_loss, n=2, **sizes)
    older = checkpoint.save(state, tmp_path)
    state, _ = with_grad_accum(train_step(mse_loss), every=2)(state, make_batches(1, d_in=64)[0])
    newest = checkpoint.save(state, tmp_path)
    return older, newest, _state(make_mlp, seed=3, **sizes)


def _truncate(ckpt: Path) -> None:
    with open(ckpt / "state.pt", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "state.pt") // 2)


def _no_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


def _bad_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text('{"format": "loopkit-checkpoint", "vers')


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: _flip_middle(c / "state.pt"), "checksum"),
        (_truncate, "bytes, the manifest says"),
        (_no_manifest, "incomplete"),
        (_bad_manifest, "cannot be read as JSON"),
        (lambda c: _flip_middle(c / "meta.json", 1), "meta.json"),
    ],
    ids=["flipped-bytes", "truncated", "no-manifest", "bad-manifest", "meta-flipped"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(
    tmp_path, make_mlp, make_batches, mse_loss, damage, message
):
    older, newest, fresh = _two_checkpoints(tmp_path, make_mlp, make_batches, mse_loss)
    expected = checkpoint.load(older)["state"]
    damage(newest)
    with pytest.warns(RuntimeWarning, match=newest.name) as caught:
        restored = checkpoint.restore(fresh, tmp_path)
    assert message in str(caught[0].message)
    assert restored.step == expected["step"] and restored.batch_index == expected["batch_index"]
    for name, value in restored.model.state_dict().items():
        assert torch.equal(value, expected["model"][name])
    with pytest.raises(CheckpointCorruptError, match=message):
        checkpoint.restore(fresh, newest)


def test_a_manifest_of_sha256_checksums_from_earlier_builds_still_verifies(tmp_path, make_mlp, make_batches, mse_loss):
    _, newest, fresh = _two_checkpoints(tmp_path, make_mlp, make_batches, mse_loss)
    manifest = json.loads((newest / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry.pop("fold_crc32_sha256")
        entry["sha256"] = hashlib.sha256((newest / name).read_bytes()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.restore(fresh, newest).step == json.loads((newest / "meta.json").read_text())["step"]
    _flip_middle(newest / "state.pt")
    with pytest.raises(CheckpointCorruptError, match=r"state\.pt is corrupt: its checksum"):
        checkpoint.restore(fresh, newest)


def test_flipped_tensor_bytes_load_silently_so_only_the_checksum_catches_them(
    tmp_path, make_mlp, make_batches, mse_loss
):
    _, newest, fresh = _two_checkpoints(tmp_path, make_mlp, make_batches, mse_loss)
    good = torch.load(newest / "state.pt", weights_only=True)
    _flip_middle(newest / "state.pt")
    bad = torch.load(newest / "state.pt", weights_only=True)  # no error from torch...
    changed = [k for k, v in good["state"]["model"].items() if not torch.equal(v, bad["state"]["model"][k])]
    changed += [k for k, v in good["state"]["grads"].items() if not torch.equal(v, bad["state"]["grads"][k])]
    opt_good, opt_bad = good["state"]["optimizer"]["state"], bad["state"]["optimizer"]["state"]
    changed += [f"{i}.{k}" for i in opt_good for k, v in opt_good[i].items() if not torch.equal(v, opt_bad[i][k])]
    assert changed, "the flipped bytes were expected inside a tensor's data"
    with pytest.raises(CheckpointCorruptError, match=r"state\.pt is corrupt: its checksum"):  # ...but the manifest
        checkpoint.restore(fresh, newest)


def test_only_corrupt_checkpoints_return_the_given_state_with_a_warning_each(
    tmp_path, make_mlp, make_batches, mse_loss
):
    older, newest, fresh = _two_checkpoints(tmp_path, make_mlp, make_batches, mse_loss)
    _flip_middle(older / "state.pt")
    _truncate(newest)
    with pytest.warns(RuntimeWarning) as caught:
        assert checkpoint.restore(fresh, tmp_path) is fresh
    messages = [str(w.message) for w in caught]
    assert any(newest.name in m for m in messages) and any(older.name in m for m in messages), messages


# --- unsafe files ------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would call os.mkdir(marker): code running at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path, make_mlp, monkeypatch):
    """A verified file that weights_only refuses is intact, not corrupt: restore of its folder raises too (it used to
    skip it with a warning and return the template, from which a fit rotated the checkpoints away)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not switch the safe loader off
    older = checkpoint.save(_state(make_mlp), tmp_path / "run")
    ckpt = checkpoint.save(_state(make_mlp).evolve(step=1), tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"format": "loopkit-checkpoint", "version": 1, "state": {"step": _Payload(marker)}}, ckpt / "state.pt")
    _resign(ckpt)  # a valid manifest: the refusal must come from the safe loader itself
    checkpoint.verify(ckpt)
    for path in (ckpt, tmp_path / "run"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(CheckpointLoadError, match=r"state\.pt was refused: .*weights_only=True") as info:
                checkpoint.restore(_state(make_mlp), path)
        assert "move it out of" in str(info.value)
    assert [c.path for c in checkpoint.list_checkpoints(tmp_path / "run")] == [older, ckpt]
    assert not marker.exists()
    torch.load(ckpt / "state.pt", weights_only=False)  # the planted file is live: an unsafe load runs it
    assert marker.exists()


def _fit_into(directory: Path, epochs: int = 3):
    """A fit with step checkpoints every 4 updates and keep_last=2, from ``loopkit.restore`` of ``directory`` (the
    relaunch README's crash-safe training prescribes)."""
    def fresh() -> TrainState:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1), seed=0)

    batches = [(torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
               for i in range(4)]
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    step = loopkit.with_checkpointing(train_step(loss), directory, every_n_steps=4, keep_last=2)
    return loopkit.run_epochs(step, loopkit.restore(fresh(), directory), batches, epochs=epochs, progress=False)[0]


def test_a_checkpoint_that_verifies_but_fails_to_load_raises_and_nothing_is_deleted(tmp_path, monkeypatch):
    """A load that fails on a smaller machine (out of memory) made every intact checkpoint 'corrupt': restore
    returned the template, the relaunch trained from step 0 and keep_last deleted them. Reference: the checkpoints
    the first fit left, still there; a load that works again resumes from the newest (step 12)."""
    _fit_into(tmp_path)
    before = checkpoint.list_checkpoints(tmp_path)
    assert [c.step for c in before] == [8, 12]
    failure = getattr(torch, "OutOfMemoryError", MemoryError)

    def oom(*args, **kwargs):
        raise failure("simulated: not enough memory to load it")

    monkeypatch.setattr(torch, "load", oom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not skipped as corrupt
        with pytest.raises(CheckpointLoadError) as info:
            _fit_into(tmp_path)
    message = str(info.value)
    assert before[-1].name in message and "is intact" in message and "not enough memory" in message
    assert "free memory" in message and "restore again" in message
    assert isinstance(info.value.__cause__, failure)
    assert checkpoint.list_checkpoints(tmp_path) == before
    monkeypatch.undo()
    assert _fit_into(tmp_path, epochs=4).step == 16  # resumed at 12


def test_a_checkpoint_of_a_newer_format_version_raises_and_nothing_is_deleted(tmp_path):
    """A newer loopkit's checkpoints (manifest version 2) were skipped as corrupt and then deleted by keep_last.
    Reference: the checkpoints the first fit left, still there; with_checkpointing refuses the folder as well
    (a fit without restore), and a malformed version is still corrupt and skipped."""
    _fit_into(tmp_path)
    before = checkpoint.list_checkpoints(tmp_path)
    for info in before:
        manifest = json.loads((info.path / "manifest.json").read_text())
        (info.path / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(CheckpointLoadError, match=rf"{before[-1].name} has format version 2 .*newer loopkit.*Upgrade"):
        _fit_into(tmp_path)
    with pytest.raises(CheckpointLoadError, match="holds a checkpoint this loopkit cannot read"):
        loopkit.run_epochs(loopkit.with_checkpointing(train_step(lambda m, b: m(b[0]).sum()), tmp_path, keep_last=1,
                                                      every_n_steps=1), TrainState.create(nn.Linear(4, 3)),
                           [(torch.ones(2, 4), None)], epochs=1, progress=False)
    assert checkpoint.list_checkpoints(tmp_path) == before
    newest = before[-1].path / "manifest.json"
    newest.write_text(json.dumps({**json.loads(newest.read_text()), "version": "2"}))
    with pytest.warns(RuntimeWarning, match="skipping checkpoint .*format version '2'"):
        with pytest.raises(CheckpointLoadError, match=f"{before[0].name} has format version 2"):
            checkpoint.restore(TrainState.create(nn.Linear(4, 3)), tmp_path)


# --- a checkpoint of another model -------------------------------------------------------------


@pytest.mark.parametrize(
    "other_sizes, key",
    [({"hidden": 16}, "mis-shaped key 'model.0.weight'"), ({"d_out": 3}, "mis-shaped key 'model.2.weight'")],
)
def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(
    tmp_path, make_mlp, take_snapshot, assert_trees_equal, other_sizes, key
):
    checkpoint.save(_state(make_mlp), tmp_path)
    other = _state(make_mlp, seed=2, **other_sizes)
    before, rng_before = take_snapshot(other), torch.get_rng_state()
    with pytest.raises(StateMismatchError, match=key) as info:
        checkpoint.restore(other, tmp_path)
    assert "ckpt-000001" in str(info.value)
    assert_trees_equal(take_snapshot(other), before)
    assert torch.equal(torch.get_rng_state(), rng_before)  # not even the global RNG was set


def test_missing_and_unexpected_keys_are_named(tmp_path):
    small = nn.Sequential(nn.Linear(2, 2))
    big = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    checkpoint.save(TrainState.create(small), tmp_path / "small")
    checkpoint.save(TrainState.create(big), tmp_path / "big")
    with pytest.raises(StateMismatchError, match="missing key 'model.1.weight'"):
        checkpoint.restore(TrainState.create(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), tmp_path / "small")
    with pytest.raises(StateMismatchError, match="unexpected key 'model.1.weight'"):
        checkpoint.restore(TrainState.create(nn.Sequential(nn.Linear(2, 2))), tmp_path / "big")


def test_a_save_of_a_scheduler_transforms_inner_state_records_the_scheduler_it_holds_still(tmp_path, make_mlp,
                                                                                            make_batches, mse_loss):
    """A step of one's own under with_step_scheduler that saves the state it is given (its scheduler a HeldScheduler):
    the checkpoint holds the StepLR's class and state (not the held stand-in's class, which a restore into the
    state's template refused), and restores into the template as the state was."""
    saved = []

    def own(state, batch):
        saved.append((checkpoint.save(state, tmp_path / str(state.step)), state.scheduler.state_dict()))
        state.optimizer.zero_grad()
        mse_loss(state.model, batch).backward()
        state.optimizer.step()
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {}

    loopkit.run_epochs(loopkit.with_step_scheduler(own), _state(make_mlp), make_batches(3), epochs=1, progress=False)
    assert [scheduler["last_epoch"] for _, scheduler in saved] == [0, 1, 2]  # (stepped by the transform alone)
    for path, scheduler in saved:
        assert checkpoint.read_structure(path)["scheduler"] == {"type": "StepLR"}
        restored = checkpoint.restore(_state(make_mlp, seed=1), path)
        assert type(restored.scheduler) is torch.optim.lr_scheduler.StepLR
        assert restored.scheduler.state_dict() == scheduler


def test_meta_records_the_structure_that_read_structure_reads_without_the_tensors(tmp_path, make_mlp, monkeypatch):
    state = _state(make_mlp, hidden=16)
    path = checkpoint.save(state, tmp_path)
    expected = {
        "model": {"0.weight": [16, 4], "0.bias": [16], "2.weight": [2, 16], "2.bias": [2]},
        "optimizer": {"type": "AdamW", "param_groups": [4]},
        "scheduler": {"type": "StepLR"},
    }
    assert checkpoint.structure(state) == expected
    assert json.loads((path / "meta.json").read_text())["structure"] == expected
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    assert checkpoint.read_structure(path) == expected and loads == []  # the payload is not even opened
    monkeypatch.undo()
    assert checkpoint.structure_mismatch(expected, checkpoint.structure(_state(make_mlp, seed=3, hidden=16))) is None
    other = checkpoint.structure(_state(make_mlp, hidden=8))
    assert checkpoint.structure_mismatch(expected, other) == (
        "key 'model.0.weight' has shape (16, 4) there and (8, 4) in this model"
    )
    meta = json.loads((path / "meta.json").read_text())
    meta["structure"]["model"]["0.weight"] = "16x4"
    (path / "meta.json").write_text(json.dumps(meta))
    _resign(path)
    with pytest.raises(CheckpointCorruptError, match="has a malformed 'structure'"):
        checkpoint.read_structure(path)


def test_read_structure_of_a_checkpoint_saved_before_meta_held_it_reads_the_payload(tmp_path, make_mlp):
    """Old checkpoints: the keys and shapes from the payload (memory-mapped), the optimizer class unknown."""
    path = checkpoint.save(_state(make_mlp), tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["structure"]
    (path / "meta.json").write_text(json.dumps(meta))
    _resign(path)
    found = checkpoint.read_structure(path)
    assert found == {
        "model": {"0.weight": [8, 4], "0.bias": [8], "2.weight": [2, 8], "2.bias": [2]},
        "optimizer": {"type": None, "param_groups": [4]},
    }
    assert checkpoint.structure_mismatch(found, checkpoint.structure(_state(make_mlp, seed=1))) is None
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    sgd = TrainState.create(model, torch.optim.SGD(groups, lr=0.1))
    assert checkpoint.structure_mismatch(found, checkpoint.structure(sgd)) is None  # (groups are not compared)
    wider = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    assert checkpoint.structure_mismatch(found, checkpoint.structure(TrainState.create(wider))) == (
        "key 'model.0.weight' has shape (8, 4) there and (16, 4) in this model"
    )
    (path / "meta.json").write_text("{}")  # the manifest no longer vouches for it
    with pytest.raises(CheckpointCorruptError, match="meta.json is corrupt"):
        checkpoint.read_structure(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match="is incomplete"):
        checkpoint.read_structure(path)


def test_optimizer_state_of_the_same_size_from_another_model_is_refused(
    tmp_path, make_batches, mse_loss, take_snapshot, assert_trees_equal
):
    def adam(model):
        state = TrainState.create(model, torch.optim.Adam(model.parameters()))
        state, _ = train_step(lambda m, b: m(b).pow(2).mean())(state, torch.ones(3, model[0].in_features))
        return state

    mine = adam(nn.Sequential(nn.Linear(4, 3)))  # weight (3, 4), bias (3,)
    theirs = adam(nn.Sequential(nn.Linear(6, 2)))  # weight (2, 6): the same 12 numbers, bias (2,)
    ckpt = checkpoint.save(mine, tmp_path)
    payload = torch.load(ckpt / "state.pt", weights_only=True)
    payload["state"]["optimizer"] = theirs.state_dict()["optimizer"]
    torch.save(payload, ckpt / "state.pt")
    _resign(ckpt)
    before = take_snapshot(mine)
    with pytest.raises(StateMismatchError, match=r"mis-shaped key 'optimizer\.state\.0\.exp_avg'.*\(2, 6\)"):
        checkpoint.restore(mine, ckpt)
    assert_trees_equal(take_snapshot(mine), before)


# --- failures while saving ---------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoints_and_says_so(tmp_path, make_mlp, monkeypatch):
    state = _state(make_mlp)
    first = checkpoint.save(state, tmp_path)
    contents = {p.name: p.read_bytes() for p in first.iterdir()}

    def full_disk(payload, path, durable):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_payload", full_disk)
    with pytest.raises(OSError) as info:
        checkpoint.save(state.evolve(step=1), tmp_path)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "no space left on device" in message and str(tmp_path) in message
    assert "previous checkpoints are intact" in message and first.name in message
    assert [c.path for c in checkpoint.list_checkpoints(tmp_path)] == [first]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == contents
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert checkpoint.restore(_state(make_mlp, seed=1), tmp_path).step == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_real_full_disk_during_the_payload_write_is_the_oserror_that_says_so(tmp_path, make_mlp, monkeypatch):
    """The test above fakes the OSError; a real full disk made torch.save (given a path, its own C++ stream) raise
    RuntimeError('[enforce fail at inline_container.cc] unexpected pos ...'), passed on without errno or message.
    Here the payload's bytes go to /dev/full, whose every write the kernel answers with ENOSPC, written the way
    torch.save is called (to a path: /dev/full's path; to a file object: /dev/full opened). Reference: the message
    of the faked full disk above, and the first checkpoint as it was."""
    state = _state(make_mlp)
    first = checkpoint.save(state, tmp_path)
    real_save = torch.save

    def onto_full_disk(obj, f, *args, **kwargs):
        if not str(getattr(f, "name", f)).endswith("state.pt"):
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            return real_save(obj, "/dev/full", *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return real_save(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", onto_full_disk)
    with pytest.raises(OSError) as info:
        checkpoint.save(state.evolve(step=1), tmp_path)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "no space left on device" in message and str(tmp_path) in message
    assert "previous checkpoints are intact" in message and first.name in message
    assert [c.path for c in checkpoint.list_checkpoints(tmp_path)] == [first] and _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert checkpoint.restore(_state(make_mlp, seed=1), tmp_path).step == 0


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_directory_without_permission_is_named(tmp_path, make_mlp):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=str(locked)):
            checkpoint.save(_state(make_mlp), locked)
        with pytest.raises(PermissionError, match=str(locked)):
            loopkit.with_checkpointing(train_step(lambda m, b: None), locked)
        locked.chmod(0o000)
        with pytest.raises(PermissionError, match=str(locked)):
            checkpoint.restore(_state(make_mlp), locked)
    finally:
        locked.chmod(0o700)


def test_permission_errors_name_the_directory_even_as_root(tmp_path, make_mlp, monkeypatch):
    """The same error paths, with the denial simulated (root is never denied by chmod)."""
    state = _state(make_mlp)
    first = checkpoint.save(state, tmp_path)
    real_mkdir, real_scandir = os.mkdir, os.scandir

    def deny_mkdir(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", deny_mkdir)
    with pytest.raises(PermissionError, match=f"could not save checkpoint .* in {tmp_path}: permission denied"):
        checkpoint.save(state, tmp_path)
    assert [c.path for c in checkpoint.list_checkpoints(tmp_path)] == [first] and _leftovers(tmp_path) == []
    with pytest.raises(PermissionError, match=f"cannot create the checkpoint directory {tmp_path / 'new'}"):
        loopkit.with_checkpointing(train_step(lambda m, b: None), tmp_path / "new" / "ckpt")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"cannot write checkpoints in {tmp_path}"):
        loopkit.with_checkpointing(train_step(lambda m, b: None), tmp_path)

    def deny_scandir(path="."):
        if Path(path) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny_scandir)
    with pytest.raises(PermissionError, match=f"cannot list checkpoints in {tmp_path}"):
        checkpoint.restore(state, tmp_path)


# --- temporaries -------------------------------------------------------------------------------


def _crashed_save(directory: Path) -> list[Path]:
    """What a save killed midway leaves: a temporary with a payload and no manifest, and trash."""
    tmp = directory / ".tmp-ckpt-000007-step7-epoch0-batch7-0badc0de"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"partial")
    trash = directory / ".trash-ckpt-000001-step1-epoch0-batch1-deadbeef"
    trash.mkdir()
    (trash / "state.pt").write_bytes(b"old")
    return [tmp, trash]


@pytest.mark.parametrize("then", ["save", "restore"])
def test_the_next_save_or_restore_removes_what_a_crashed_save_left(tmp_path, make_mlp, then):
    state = _state(make_mlp)
    checkpoint.save(state, tmp_path)
    _crashed_save(tmp_path)
    assert len(_leftovers(tmp_path)) == 2
    if then == "save":
        checkpoint.save(state, tmp_path)
    else:
        checkpoint.restore(state, tmp_path)
    assert _leftovers(tmp_path) == []


def test_restore_and_save_remove_only_what_loopkit_left_and_restore_leaves_a_folder_without_checkpoints_alone(
        tmp_path, make_mlp):
    """restore rmtree'd any '.tmp-*' or '.trash-*' entry of the folder it was given (a user's '.tmp-dataset-cache/',
    '.trash-old-notes.txt'), and made '.lock' in a folder without checkpoints (the project root given by mistake).
    Reference: the folder's entries before, and the names loopkit gives its temporaries and trash."""
    (tmp_path / ".tmp-dataset-cache").mkdir()
    (tmp_path / ".tmp-dataset-cache" / "shard0.bin").write_bytes(b"user data")
    (tmp_path / ".trash-old-notes.txt").write_text("user notes")
    (tmp_path / ".tmp-ckpt-notes").write_text("user notes")  # (named almost like a save's temporary)
    (tmp_path / ".tmp-ckpt-000009-step9-epoch0-batch9-0badc0de").mkdir()  # a crashed save's, left by the first save
    before = sorted(p.name for p in tmp_path.iterdir())
    state = _state(make_mlp)
    assert checkpoint.restore(state, tmp_path) is state
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    checkpoint.save(state, tmp_path)
    ours = _crashed_save(tmp_path) + [tmp_path / ".tmp-scores.json-0badc0de"]
    ours[-1].write_text("{}")
    for then in (lambda: checkpoint.restore(state, tmp_path), lambda: checkpoint.save(state, tmp_path)):
        then()
        assert not any(p.exists() for p in ours)
        assert [n for n in before if not (tmp_path / n).exists()] == [".tmp-ckpt-000009-step9-epoch0-batch9-0badc0de"]
        assert (tmp_path / ".tmp-dataset-cache" / "shard0.bin").read_bytes() == b"user data"
        ours = _crashed_save(tmp_path)



def test_a_removal_of_a_renamed_checkpoint_killed_midway_leaves_trash_the_next_restore_removes(tmp_path, make_mlp,
                                                                                               monkeypatch):
    """remove() takes a checkpoint renamed by hand (its manifest says what it is); its trash, left by a removal killed
    before the deletion, must carry a name the cleaner knows, now that it removes no other '.trash-*'. Reference:
    the trash of a checkpoint of loopkit's name, which goes alike."""
    state = _state(make_mlp)
    best = checkpoint.save(state, tmp_path).rename(tmp_path / "best")
    newest = checkpoint.save(state.evolve(step=1), tmp_path)
    monkeypatch.setattr(checkpoint, "_delete", lambda trash: None)  # killed after the rename
    checkpoint.remove(best)
    checkpoint.remove(newest)
    assert len(_leftovers(tmp_path)) == 2
    monkeypatch.undo()
    checkpoint.save(state, tmp_path)
    checkpoint.restore(state, tmp_path)
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(checkpoint.fcntl is None, reason="needs POSIX advisory locks")
def test_a_killed_saves_temporary_goes_though_its_forked_workers_still_hold_the_lock(tmp_path, make_mlp):
    """DataLoader workers forked while a background save held the shared lock keep it after the saving process is
    killed (a lock lives as long as any descriptor of it), so no later save could prove the killed save's
    temporary stale: a whole checkpoint's payload stayed for good. A temporary of a process that is gone, on this
    machine and in this PID namespace, goes; one of a running process (a save in progress) stays, and so does one of
    another machine or namespace (its pid means nothing here)."""
    import subprocess
    import sys

    checkpoint.save(_state(make_mlp), tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = checkpoint._where()  # (this machine and PID namespace)
    dead = tmp_path / f".tmp-ckpt-000002-step2-epoch0-batch2-p{int(gone.stdout)}h{host}-0badc0de"
    alive = tmp_path / f".tmp-ckpt-000003-step3-epoch0-batch3-p{os.getpid()}h{host}-0badc0de"
    other_machine = tmp_path / f".tmp-ckpt-000004-step4-epoch0-batch4-p{int(gone.stdout)}h0000beef-0badc0de"  # (or ns)
    for tmp in (dead, alive, other_machine):
        tmp.mkdir()
        (tmp / "state.pt").write_bytes(b"partial")
    holder = subprocess.Popen(  # the orphaned worker: holds the shared lock
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)", str(tmp_path / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        checkpoint.save(_state(make_mlp), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert not dead.exists() and alive.exists() and other_machine.exists()


@pytest.mark.skipif(checkpoint.fcntl is None, reason="needs POSIX advisory locks")
def test_a_save_in_progress_elsewhere_is_left_alone(tmp_path, make_mlp):
    checkpoint.save(_state(make_mlp), tmp_path)
    leftovers = _crashed_save(tmp_path)
    fd = os.open(tmp_path / ".lock", os.O_RDWR)  # another process's save holds the shared lock
    try:
        checkpoint.fcntl.flock(fd, checkpoint.fcntl.LOCK_SH)
        checkpoint.restore(_state(make_mlp), tmp_path)
        assert all(p.exists() for p in leftovers)
    finally:
        os.close(fd)
    checkpoint.restore(_state(make_mlp), tmp_path)
    assert _leftovers(tmp_path) == []


def test_an_interrupted_save_leaves_nothing(tmp_path, make_mlp, monkeypatch):
    def interrupted(tmp, manifest, durable):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_state(make_mlp), tmp_path)
    assert checkpoint.list_checkpoints(tmp_path) == [] and _leftovers(tmp_path) == []


# --- safetensors export ------------------------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5)  # float buffers and an int64 num_batches_tracked
        self.register_buffer("fp16", torch.randn(4, 2).half())
        self.register_buffer("bf16", torch.randn(3).bfloat16())
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("scalar", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
        self.register_buffer("ints", torch.tensor([-3, 7], dtype=torch.int16))


def test_export_weights_is_read_back_bitwise_by_the_safetensors_package(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _Mixed()
    state = TrainState.create(model).evolve(step=12, epoch=3)
    path = loopkit.export_weights(state, tmp_path / "weights.safetensors", metadata={"run": "test"})
    loaded = load_file(path)
    expected = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "12", "epoch": "3", "run": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOSPC, errno.EROFS])
def test_export_weights_that_cannot_be_written_names_the_path_given_not_its_temporary(tmp_path, monkeypatch, error):
    """Before: "[Errno 13] Permission denied: '/sys/.tmp-w.safetensors-81a78fa9'"."""
    target = tmp_path / "w.safetensors"

    def denied(file, *args, **kwargs):
        raise OSError(error, os.strerror(error), str(file))

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)  # (root is never denied by chmod)
    with pytest.raises(OSError) as info:
        loopkit.export_weights(TrainState.create(nn.Linear(2, 2)), target)
    message = str(info.value)
    assert info.value.errno == error and isinstance(info.value, PermissionError) == (error == errno.EACCES)
    assert f"export_weights: could not write {str(target)!r}" in message and ".tmp-" not in message
    assert list(tmp_path.iterdir()) == []


def test_export_weights_refuses_what_safetensors_cannot_hold(tmp_path):
    model = nn.Linear(2, 2)
    model.register_buffer("complex128", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(TypeError, match="'complex128' has dtype torch.complex128"):
        loopkit.export_weights(TrainState.create(model), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata, got", [
    ([("author", "me")], "list"), ("author=me", "str"), ({"step": 3}, "'step': 3"), ({1: "one"}, "1: 'one'"),
])
def test_export_weights_refuses_metadata_that_is_no_mapping_of_strings_by_its_own_type_error(tmp_path, metadata, got):
    """A list or a string as metadata died with AttributeError: "'list' object has no attribute 'items'"."""
    with pytest.raises(TypeError, match=rf"^export_weights: metadata must .*{re.escape(got)}"):
        loopkit.export_weights(TrainState.create(nn.Linear(2, 1)), tmp_path / "w.safetensors", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_export_weights_writes_tied_weights_under_each_name_and_loads_strictly_as_a_state_dict(tmp_path):
    """As the docstring says: an embedding tied to the output head is written under both its names (as the
    state_dict holds it), so the file loads strictly by load_state_dict(load_file(path)), into a new model whose
    head stays tied. Reference: the model's own state_dict."""
    from safetensors.torch import load_file

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = TiedLM()
    path = loopkit.export_weights(TrainState.create(model), tmp_path / "lm.safetensors")
    loaded = load_file(path)
    assert sorted(loaded) == sorted(model.state_dict()) == ["emb.weight", "head.weight"]
    fresh = TiedLM()
    fresh.load_state_dict(loaded)  # strict
    assert torch.equal(fresh.emb.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight


def test_the_listing_ignores_what_is_not_a_checkpoint(tmp_path, make_mlp):
    checkpoint.save(_state(make_mlp), tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "ckpt-latest").mkdir()
    (tmp_path / "scores.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [c.seq for c in checkpoint.list_checkpoints(tmp_path)] == [1]
        assert checkpoint.restore(_state(make_mlp, seed=1), tmp_path).seed == 0


def test_a_malformed_global_rng_entry_is_corrupt_and_skipped(tmp_path, make_mlp):
    state = _state(make_mlp)
    checkpoint.save(state.evolve(step=1), tmp_path)
    bad = checkpoint.save(state.evolve(step=2), tmp_path)
    payload = torch.load(bad / "state.pt", weights_only=True)
    payload["global_rng"]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)
    torch.save(payload, bad / "state.pt")
    _resign(bad)
    with pytest.raises(CheckpointCorruptError, match="global RNG entry 'numpy'"):
        checkpoint.restore(state, bad)
    with pytest.warns(RuntimeWarning, match="global RNG entry 'numpy'"):
        assert checkpoint.restore(state, tmp_path).step == 1


# --- restore while another process rotates, another optimizer class, stray files --------------


def _rotating(monkeypatch, name: str, newer: TrainState, root: Path) -> list[Path]:
    """Patch ``checkpoint.<name>`` so that its first call, while restore reads a checkpoint, first does what
    another process rotating with keep_last=1 does: save a newer checkpoint, then remove the one being read."""
    original, calls = getattr(checkpoint, name), []

    def rotate_first(path, *args, **kwargs):
        if not calls:
            calls.append(Path(path))
            reading = Path(path).parent if Path(path).name in (checkpoint.PAYLOAD, checkpoint.META) else Path(path)
            checkpoint.save(newer, root)
            checkpoint.remove(reading)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, name, rotate_first)
    return calls


@pytest.mark.parametrize("moment", ["load", "_safe_load", "_digest"])  # (load: removed after listing, before reading)
def test_a_checkpoint_removed_by_rotation_while_restore_reads_it_gives_the_newer_one(tmp_path, make_mlp, monkeypatch,
                                                                                    moment):
    """Reference: the checkpoint in the directory when restore returns (there was one at every moment). Before:
    the template came back ("incomplete" warning), or a bare FileNotFoundError from the checksum thread."""
    template = _state(make_mlp)
    checkpoint.save(template.evolve(step=1), tmp_path)
    newer = template.evolve(step=2)
    calls = _rotating(monkeypatch, moment, newer, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint that is gone is not corrupt: no warning
        restored = checkpoint.restore(template, tmp_path)
    assert calls, "the rotation was not simulated"
    (left,) = checkpoint.list_checkpoints(tmp_path)
    assert restored is not template and restored.step == left.step == 2


def test_a_checkpoint_named_directly_that_is_removed_while_read_says_it_was_removed(tmp_path, make_mlp, monkeypatch):
    template = _state(make_mlp)
    path = checkpoint.save(template.evolve(step=1), tmp_path)
    _rotating(monkeypatch, "_digest", template.evolve(step=2), tmp_path)
    with pytest.raises(FileNotFoundError, match="was removed while it was read"):
        checkpoint.load(path)


@pytest.mark.parametrize("named", ["directory", "checkpoint"])
def test_restore_refuses_a_checkpoint_of_another_optimizer_class_as_with_checkpointing_does(
    tmp_path, take_snapshot, assert_trees_equal, named
):
    """Reference: with_checkpointing's refusal of the same pairing. Before: Adam's state went into the AdamW
    template, with Adam's weight_decay=0."""
    def made(opt_class, **options) -> TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Linear(4, 2)
        return TrainState.create(model, opt_class(model.parameters(), lr=0.1, **options))

    adam = made(torch.optim.Adam)
    adam, _ = train_step(lambda m, b: m(b).pow(2).mean())(adam, torch.ones(3, 4))
    path = checkpoint.save(adam, tmp_path)
    template = made(torch.optim.AdamW, weight_decay=0.01)
    with pytest.raises(StateMismatchError) as reference:
        loopkit.run_epochs(loopkit.with_checkpointing(train_step(lambda m, b: m(b).sum()), tmp_path, every_n_steps=1),
                           template, [torch.ones(3, 4)], epochs=1, progress=False)
    expected = re.search(r"\((its optimizer is .*?)\)", str(reference.value)).group(1)
    assert expected == "its optimizer is Adam, and this state's AdamW"
    before, rng_before = take_snapshot(template), torch.get_rng_state()
    with pytest.raises(StateMismatchError, match=re.escape(expected)) as info:
        checkpoint.restore(template, tmp_path if named == "directory" else path)
    assert path.name in str(info.value)
    assert_trees_equal(take_snapshot(template), before)
    assert template.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_restore_refuses_a_checkpoint_of_another_scheduler_class_and_resumes_one_of_its_own(tmp_path, assert_trees_equal):
    """Reference: the uninterrupted run. Before: a LambdaLR's checkpoint (the keys a MultiplicativeLR's state has)
    restored into a MultiplicativeLR silently, and the rates then followed the other rule. A SequentialLR running
    other schedulers is refused too; a checkpoint saved before the scheduler's class was recorded still loads."""
    lr = torch.optim.lr_scheduler
    lambda_lr = lambda o: lr.LambdaLR(o, lambda epoch: 0.9)  # noqa: E731
    multiplicative = lambda o: lr.MultiplicativeLR(o, lambda epoch: 0.9)  # noqa: E731

    def made(make_scheduler) -> TrainState:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainState.create(model, optimizer, make_scheduler(optimizer))

    step = loopkit.donate(train_step(lambda m, b: m(b).pow(2).mean()))
    batches = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    uninterrupted = made(lambda_lr)
    for k, batch in enumerate(batches):
        uninterrupted, _ = step(uninterrupted, batch)
        if k == 1:
            path = checkpoint.save(uninterrupted, tmp_path / "a")
    expected = "its scheduler is LambdaLR, and this state's MultiplicativeLR"
    with pytest.raises(StateMismatchError, match=re.escape(expected)) as info:
        checkpoint.restore(made(multiplicative), tmp_path / "a")
    assert path.name in str(info.value)
    assert checkpoint.structure_mismatch(checkpoint.read_structure(path), checkpoint.structure(made(multiplicative))) == (
        expected  # (what restore refuses; with_checkpointing's folder check leaves schedulers out: see test_checkpointing)
    )
    resumed = checkpoint.restore(made(lambda_lr), tmp_path / "a")
    for batch in batches[2:]:
        resumed, _ = step(resumed, batch)
    assert_trees_equal(resumed.state_dict(), uninterrupted.state_dict())

    def sequential(first):
        return lambda o: lr.SequentialLR(o, [first(o), lr.ExponentialLR(o, 0.5)], milestones=[2])

    seq = checkpoint.save(made(sequential(lambda_lr)), tmp_path / "b")
    with pytest.raises(StateMismatchError, match=re.escape(
            "its scheduler is SequentialLR of LambdaLR, ExponentialLR, and this state's SequentialLR of "
            "MultiplicativeLR, ExponentialLR")):
        checkpoint.restore(made(sequential(multiplicative)), seq)
    meta = json.loads((path / "meta.json").read_text())
    del meta["structure"]["scheduler"]  # saved by a loopkit that did not record it: any scheduler matches
    (path / "meta.json").write_text(json.dumps(meta))
    _resign(path)
    assert checkpoint.restore(made(multiplicative), path).step == 2


def test_a_state_pt_of_ones_own_beside_the_checkpoints_does_not_make_the_folder_a_checkpoint(tmp_path, make_mlp):
    """The README's manual recipe (torch.save(state.state_dict(), path)) can leave one there. Reference: the
    checkpoint beside it, restored by its own path."""
    state = _state(make_mlp)
    path = checkpoint.save(state.evolve(step=5), tmp_path)
    torch.save(state.state_dict(), tmp_path / "state.pt")
    assert not checkpoint.is_checkpoint(tmp_path) and checkpoint.is_checkpoint(path)
    restored, reference = checkpoint.restore(state, tmp_path), checkpoint.restore(state, path)
    assert restored.step == reference.step == 5


def test_two_writers_taking_the_same_name_both_save(tmp_path, make_mlp, monkeypatch):
    """Another process's checkpoint renamed to the name this save chose (two runs in one folder): the save
    takes the next one. Before: OSError 'Directory not empty'."""
    state = _state(make_mlp)
    original, calls = checkpoint._write_manifest, []

    def other_writer_first(*args, **kwargs):
        if not calls:
            calls.append(True)
            checkpoint.save(state.evolve(step=3), tmp_path)  # takes ckpt-000001-step3-epoch0-batch0
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write_manifest", other_writer_first)
    mine = checkpoint.save(state.evolve(step=3), tmp_path)
    assert [(c.seq, c.step) for c in checkpoint.list_checkpoints(tmp_path)] == [(1, 3), (2, 3)]
    assert mine.name == "ckpt-000002-step3-epoch0-batch0"
    assert checkpoint.remove(mine) and not checkpoint.remove(mine, missing_ok=True)
    with pytest.raises(FileNotFoundError):
        checkpoint.remove(mine)


def _extra_state_model() -> nn.Module:
    class Counting(nn.Linear):
        def __init__(self) -> None:
            super().__init__(2, 2)
            self.calls = 3

        def get_extra_state(self):
            return {"calls": self.calls}

        def set_extra_state(self, value) -> None:
            self.calls = value["calls"]

    return nn.Sequential(Counting())


class _Vocabulary(nn.Linear):
    """A layer whose ``get_extra_state()`` is a list and a tuple in a dict (a vocabulary, a version)."""

    def __init__(self, words: list[str]) -> None:
        super().__init__(2, 2)
        self.words = words

    def get_extra_state(self):
        return {"words": self.words, "version": (1, 0)}

    def set_extra_state(self, value) -> None:
        self.words = value["words"]


def test_a_checkpoint_of_a_model_with_extra_state_holding_lists_restores_as_torchs_load_state_dict_does(tmp_path):
    """Reference: torch's model.load_state_dict(model.state_dict()), which hands the extra state to
    set_extra_state. Before: restore refused every such checkpoint ("holds a list, expected a mapping")."""
    torch.manual_seed(0)
    model = _Vocabulary(["a", "b"])
    state = TrainState.create(model, torch.optim.Adam(model.parameters(), lr=0.1))
    state, _ = train_step(lambda m, b: m(b).pow(2).mean())(state, torch.ones(3, 2))
    checkpoint.save(state, tmp_path)
    reference = _Vocabulary([])
    reference.load_state_dict(state.model.state_dict())
    template = _Vocabulary([])
    restored = checkpoint.restore(TrainState.create(template, torch.optim.Adam(template.parameters(), lr=0.1)), tmp_path)
    assert restored.model.words == reference.words == ["a", "b"]
    assert restored.step == 1 and torch.equal(restored.model.weight, state.model.weight)
    assert torch.equal(restored.optimizer.state_dict()["state"][0]["exp_avg"], state.optimizer.state_dict()["state"][0]["exp_avg"])


def _int8_model() -> nn.Module:
    from torch.ao.quantization import DeQuantStub, QuantStub

    model = nn.Sequential(QuantStub(), nn.Linear(4, 2), DeQuantStub())
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state, _ = loopkit.with_qat(train_step(lambda m, b: m(b).pow(2).mean()))(state, torch.randn(8, 4))
    return loopkit.quantized_model(state)


@pytest.mark.parametrize("make, names, todo", [
    (_extra_state_model, ["'0._extra_state' (a dict)"], "get_extra_state"),
    (_int8_model, ["'1._packed_params.dtype' (a dtype)", "'1._packed_params._packed_params' (a tuple)"],
     "export the float model"),
])
def test_export_weights_refuses_non_tensor_entries_naming_them_as_safetensors_refuses_them(tmp_path, make, names, todo):
    """Reference: safetensors' own save_file refuses such a state dict too (ValueError for the first key).
    Before: AttributeError "'dict' object has no attribute 'dtype'", naming nothing."""
    from safetensors.torch import save_file

    model = make()
    with pytest.raises(ValueError, match="expected torch.Tensor"):
        save_file(model.state_dict(), str(tmp_path / "reference.safetensors"))
    with pytest.raises(TypeError) as info:
        loopkit.export_weights(TrainState.create(model), tmp_path / "w.safetensors")
    message = str(info.value)
    assert all(name in message for name in names) and todo in message
    assert not (tmp_path / "w.safetensors").exists() and not list(tmp_path.glob(".tmp-*"))


def test_save_of_what_is_not_a_train_state_is_refused_naming_it(tmp_path):
    """As run_epochs refuses it. Before: AttributeError: 'Ensemble' object has no attribute 'extras'."""
    models = [nn.Linear(2, 1) for _ in range(2)]
    states = [TrainState.create(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models]
    with pytest.raises(TypeError, match=r"save: state must be a loopkit.TrainState, got Ensemble .*ensemble.unstack"):
        checkpoint.save(loopkit.ensemble.stack(states), tmp_path)
    with pytest.raises(TypeError, match="save: state must be a loopkit.TrainState, got Linear"):
        checkpoint.save(nn.Linear(2, 1), tmp_path)
    assert checkpoint.list_checkpoints(tmp_path) == []


def test_load_of_a_path_that_never_was_a_checkpoint_says_so_and_blames_no_other_process(tmp_path):
    """A typo, or a plain torch.save file: the error is the one it was before restore learnt of checkpoints
    removed while read (it blamed another process rotating the directory)."""
    plain = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    for path in (tmp_path / "no-such-checkpoint", plain):
        with pytest.raises(loopkit.CheckpointCorruptError, match="does not exist or is not a directory") as info:
            checkpoint.load(path)
        assert "removed while it was read" not in str(info.value)


def test_remove_refuses_what_is_not_a_checkpoint_and_deletes_nothing(tmp_path):
    """It deleted a whole folder of checkpoints, and hid a file of one's own under a trash name."""
    state = TrainState.create(torch.nn.Linear(2, 1))
    kept = checkpoint.save(state, tmp_path / "ckpt")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    named_like_one = tmp_path / "ckpt-000001-step1-epoch0-batch0"  # a file of one's own, though named as one
    named_like_one.write_text("mine too")
    for path in (tmp_path / "ckpt", notes, named_like_one):
        with pytest.raises(ValueError, match="is not a checkpoint.*nothing was deleted"):
            checkpoint.remove(path)
    assert kept.exists() and notes.read_text() == "mine" and named_like_one.read_text() == "mine too"
    assert checkpoint.remove(kept) and not kept.exists()


def test_remove_of_a_checkpoint_already_gone_is_false_with_missing_ok_and_says_it_is_missing_without(tmp_path):
    """A renamed checkpoint already removed raised "is not a checkpoint" in both cases."""
    state = TrainState.create(torch.nn.Linear(2, 1))
    renamed = tmp_path / "best"
    os.rename(checkpoint.save(state, tmp_path / "ckpt"), renamed)
    assert checkpoint.is_checkpoint(renamed) and checkpoint.remove(renamed)
    for gone in (renamed, tmp_path / "ckpt" / "ckpt-000009-step9-epoch0-batch9"):
        assert checkpoint.remove(gone, missing_ok=True) is False
        with pytest.raises(FileNotFoundError, match=f"remove: there is no checkpoint at {gone}"):
            checkpoint.remove(gone)


def test_read_meta_and_load_name_a_folder_of_checkpoints_and_a_missing_path_as_such(tmp_path):
    """They said "incomplete: manifest.json is missing (the save did not finish)" of both."""
    checkpoint.save(TrainState.create(torch.nn.Linear(2, 1)), tmp_path / "ckpt")
    for read in (checkpoint.read_meta, checkpoint.load):
        with pytest.raises(CheckpointCorruptError, match="is a folder of checkpoints, not one"):
            read(tmp_path / "ckpt")
    with pytest.raises(CheckpointCorruptError, match="does not exist"):
        checkpoint.read_meta(tmp_path / "nowhere")


def test_a_state_holding_numpy_numbers_restores(tmp_path):
    """An optimizer built from a numpy grid (lr=np.logspace(...)[1], a float64) made every checkpoint unloadable
    under weights_only=True, and restore went back to the fresh template with warnings only. Reference: the
    trained state, and the uninterrupted run's parameters after two more steps."""
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return loopkit.TrainState.create(model, torch.optim.Adam(model.parameters(), lr=np.logspace(-3, -1, 3)[1],
                                                                 betas=(np.float64(0.9), np.float64(0.99))))

    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    step = loopkit.with_checkpointing(loopkit.train_step(loss), tmp_path, every_n_steps=3)
    trained, _ = loopkit.run_epochs(step, fresh(), batches[:3], epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = loopkit.restore(fresh(), tmp_path)
    assert restored.step == 3 and restored.optimizer.param_groups[0]["lr"] == 0.01
    assert all(torch.equal(a, b) for a, b in zip(restored.model.parameters(), trained.model.parameters()))
    ref, _ = loopkit.run_epochs(loopkit.train_step(loss), fresh(), batches[:3], epochs=2, progress=False)
    go_on, _ = loopkit.run_epochs(loopkit.train_step(loss), restored, batches[:3], epochs=2, progress=False)
    assert go_on.step == 6
    assert all(torch.equal(a, b) for a, b in zip(go_on.model.parameters(), ref.model.parameters()))


def test_a_state_whose_lazy_modules_never_ran_is_refused_at_save(tmp_path):
    """Its state dict held UninitializedParameter objects: the save wrote them, and restore then skipped the
    checkpoint as needing arbitrary unpickling (restoring it by path raised CheckpointCorruptError)."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"lazy modules have not run a forward yet \(0.bias, 0.weight"):
        checkpoint.save(state, tmp_path)
    assert checkpoint.list_checkpoints(tmp_path) == []
    trained, _ = loopkit.donate(train_step(lambda m, b: m(b).pow(2).mean()))(state, torch.ones(2, 4))
    checkpoint.save(trained, tmp_path)  # shaped by its first forward: saved, and restored
    again = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    restored = loopkit.restore(TrainState.create(again, torch.optim.SGD(again.parameters(), lr=0.1)), tmp_path)
    assert torch.equal(restored.model[0].weight, trained.model[0].weight)


# --- the best checkpoint (Lightning's best_model_path) ------------------------------------------------------------


def _scored_run(directory, values, mode, **options):
    """A fit whose epoch e validates to ``values[e]``, saved by with_checkpointing(monitor="val/score")."""
    def metric(state, batch):
        return state, {"score": torch.tensor(values[state.epoch - 1])}

    step = loopkit.with_checkpointing(train_step(mse), directory, monitor="val/score", mode=mode, **options)
    loopkit.run_epochs(step, make_state(), make_data(2), epochs=len(values), val=(metric, [0]), sanity_val_batches=0,
                       progress=False)


@pytest.mark.parametrize("values, mode, best_epoch", [
    ([3.0, 1.0, 2.0, 1.5], "min", 2),
    ([3.0, 1.0, 2.0, 1.5], "max", 1),
    ([2.0, 1.0, 1.0, 3.0], "min", 2),  # a tie: the older, as Lightning keeps the first
    ([2.0, float("nan"), 1.0, 3.0], "min", 3),  # NaN is never the best
    ([float("nan"), 5.0, 4.0], "max", 2),
])
def test_best_checkpoint_is_the_best_scored_epochs_by_the_recorded_mode(tmp_path, values, mode, best_epoch):
    _scored_run(tmp_path, values, mode, keep_best=2, keep_last=1)
    best = checkpoint.best_checkpoint(tmp_path)
    assert checkpoint.read_meta(best)["epoch"] == best_epoch  # reference: the epoch picked from the values by hand
    assert loopkit.restore(make_state(), best).epoch == best_epoch
    (tmp_path / checkpoint.SCORES).unlink()  # a run killed before scores.json was written: meta.json has the scores
    assert checkpoint.best_checkpoint(tmp_path) == best
    assert checkpoint.best_checkpoint(tmp_path, "val/other", mode) is None
    with pytest.raises(ValueError, match="was recorded with mode="):
        checkpoint.best_checkpoint(tmp_path, "val/score", "max" if mode == "min" else "min")


def test_best_checkpoint_of_a_monitor_given_alone_takes_the_mode_recorded_with_it(tmp_path):
    _scored_run(tmp_path, [3.0, 1.0, 2.0], "min", keep_best=3, keep_last=1)  # val/score, min: best at epoch 2

    def metric(state, batch):
        return state, {"acc": torch.tensor([0.1, 0.9, 0.5][state.epoch - 4])}

    state = loopkit.restore(make_state(), tmp_path)
    step = loopkit.with_checkpointing(train_step(mse), tmp_path, monitor="val/acc", mode="max", keep_last=None)
    loopkit.run_epochs(step, state, make_data(2), epochs=6, val=(metric, [0]), sanity_val_batches=0, progress=False)
    assert checkpoint.read_meta(checkpoint.best_checkpoint(tmp_path))["epoch"] == 5  # scores.json's: val/acc, max
    assert checkpoint.read_meta(checkpoint.best_checkpoint(tmp_path, "val/score"))["epoch"] == 2  # its meta.json: min
    # scores(directory) as the guide calls it: the recorded monitor's (a monitor alone: the mode recorded with it)
    by_epoch = lambda found: {checkpoint.read_meta(tmp_path / n)["epoch"]: v for n, v in found.items()}  # noqa: E731
    assert by_epoch(checkpoint.scores(tmp_path)) == by_epoch(checkpoint.scores(tmp_path, "val/acc", "max"))
    assert by_epoch(checkpoint.scores(tmp_path)) == {4: pytest.approx(0.1), 5: pytest.approx(0.9)}
    assert by_epoch(checkpoint.scores(tmp_path, "val/score")) == {1: 3.0, 2: 1.0, 3: 2.0}
    with pytest.raises(ValueError, match="scores: 'val/acc' was recorded with mode='max', not 'min'"):
        checkpoint.scores(tmp_path, mode="min")
    with pytest.raises(ValueError, match="'val/score' was recorded with mode='min', not 'max'"):
        checkpoint.best_checkpoint(tmp_path, "val/score", "max")


def test_best_checkpoint_skips_one_removed_and_is_none_without_scores(tmp_path):
    _scored_run(tmp_path / "scored", [3.0, 1.0, 2.0], "min", keep_best=2, keep_last=1)
    best = checkpoint.best_checkpoint(tmp_path / "scored")
    assert checkpoint.read_meta(best)["epoch"] == 2
    checkpoint.remove(best)
    assert checkpoint.read_meta(checkpoint.best_checkpoint(tmp_path / "scored"))["epoch"] == 3
    loopkit.run_epochs(loopkit.with_checkpointing(train_step(mse), tmp_path / "plain"), make_state(), make_data(2),
                       epochs=2, progress=False)  # no monitor: no scores
    assert len(checkpoint.list_checkpoints(tmp_path / "plain")) == 2
    assert checkpoint.best_checkpoint(tmp_path / "plain") is None
    assert checkpoint.best_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'lowest'"):
        checkpoint.best_checkpoint(tmp_path / "scored", "val/score", "lowest")
