"""Checkpoints on disk: atomic saves, manifests with checksums, safe loading, exact restore.

A checkpoint is a directory ``ckpt-<seq>-step<S>-epoch<E>-batch<B>`` holding

* ``state.pt``: the whole train state (``TrainState.state_dict()``) and every global RNG
  the run draws from (torch CPU, CUDA when in use, NumPy, Python ``random``), all stored
  as tensors, numbers and strings, so it loads with ``torch.load(weights_only=True)``;
* ``meta.json``: step, epoch, batch index, seed, why it was saved, and the structure of the
  model, optimizer and scheduler (see :func:`structure`), which tells a checkpoint of another
  model without loading its tensors;
* ``manifest.json``: each file's size and checksum (see :func:`checksum`), written last.

A save writes everything into a temporary directory inside the target directory,
fsyncs the files, writes the manifest, fsyncs, renames the directory to its final name
and fsyncs the parent: a checkpoint is visible only once complete, and an existing one
is never written over. ``<seq>`` counts up per directory, so the newest checkpoint is
the one saved last. Temporaries left by a crashed save are removed by the next save or
restore (of a folder holding a checkpoint; only the names loopkit gives them, see :func:`clean`).
Every file is read with an explicit ``torch.load(..., weights_only=True)`` or as JSON: a file
that would need arbitrary unpickling is refused and nothing in it runs.

>>> import tempfile, torch
>>> tmp = tempfile.TemporaryDirectory()
>>> from loopkit.state import TrainState
>>> model = torch.nn.Linear(2, 1)
>>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)).evolve(step=3)
>>> root = tmp.name
>>> path = save(state, root)
>>> path.name
'ckpt-000001-step3-epoch0-batch0'
>>> fresh = TrainState.create(torch.nn.Linear(2, 1), seed=0)
>>> fresh = TrainState.create(fresh.model, torch.optim.SGD(fresh.model.parameters(), lr=0.1))
>>> restored = restore(fresh, root)
>>> restored.step, bool(torch.equal(restored.model.weight, model.weight))
(3, True)
>>> tmp.cleanup()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import pickle
import random
import re
import secrets
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from loopkit import _collective
from loopkit._sharded import full, is_sharded
from loopkit._window import OVER_RANKS, over_ranks, own_share
from loopkit.errors import CheckpointCorruptError, CheckpointLoadError, StateMismatchError
from loopkit.state import (
    TrainState, _uninitialized, core_module, held_scheduler, model_device, not_a_state, replace_extras,
)
from loopkit.tree import copy_tensors

try:  # POSIX: advisory locks keep a cleaner away from another process's save in progress
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CheckpointInfo",
    "Snapshot",
    "best_checkpoint",
    "capture_global_rng",
    "checksum",
    "clean",
    "export_weights",
    "install_global_rng",
    "is_checkpoint",
    "list_checkpoints",
    "make_directory",
    "load",
    "read_meta",
    "read_score",
    "read_scores",
    "read_structure",
    "remove",
    "restore",
    "save",
    "scores",
    "snapshot",
    "structure",
    "structure_mismatch",
    "verify",
    "write",
    "write_late_score",
    "write_scores",
]

FORMAT = "loopkit-checkpoint"
VERSION = 1
PAYLOAD = "state.pt"
META = "meta.json"
MANIFEST = "manifest.json"
SCORES = "scores.json"
LATE_SCORE = "score.json"  # in a checkpoint: the score a validation gave it after it was written (see write_late_score)
_REQUIRED = (PAYLOAD, META)
_LOCK = ".lock"
_TMP = ".tmp-"
_TRASH = ".trash-"
_NAME = re.compile(r"^ckpt-(\d+)-step(\d+)-epoch(\d+)-batch(\d+)$")
# what a crashed save, removal or rewrite of scores.json leaves: a save's temporary, a removed checkpoint's trash
_LEFTOVER = re.compile(
    r"^\.tmp-ckpt-\d+-step\d+-epoch\d+-batch\d+-[0-9A-Za-z-]+$|^\.trash-ckpt-.+-[0-9a-f]{8}$|^\.tmp-scores\.json-[0-9a-f]+$"
)
_FOLD = 4096
_CHECKSUM = "fold_crc32_sha256"  # the manifest key of checksum()
_FOLD_ONLY = "fold_sha256"  # the key of manifests written before the CRC joined the fold
_STALE_WITHOUT_LOCKS_S = 600.0  # where advisory locks do not exist, a temporary this old is stale


# --- what is on disk ---------------------------------------------------------------------------


@attrs.frozen(order=False)
class CheckpointInfo:
    """A checkpoint directory as its name describes it (nothing is read or verified).

    >>> info = CheckpointInfo.parse(Path("runs/ckpt-000004-step120-epoch2-batch8"))
    >>> info.seq, info.step, info.epoch, info.batch_index
    (4, 120, 2, 8)
    """

    path: Path
    seq: int
    step: int
    epoch: int
    batch_index: int

    @classmethod
    def parse(cls, path: Path) -> CheckpointInfo | None:
        """The info that ``path``'s name encodes, or None when it is not a checkpoint name."""
        match = _NAME.match(Path(path).name)
        if match is None:
            return None
        seq, step, epoch, batch = (int(g) for g in match.groups())
        return cls(Path(path), seq, step, epoch, batch)

    @property
    def name(self) -> str:
        return self.path.name


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """The checkpoints in ``directory``, oldest first (by save order); nothing is verified.

    Temporaries of a save in progress (or of a crashed one) are not checkpoints and are
    not listed. A directory that does not exist has none.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> root = tmp.name
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> _ = save(state, root); _ = save(state.evolve(step=1), root)
    >>> [c.name for c in list_checkpoints(root)]
    ['ckpt-000001-step0-epoch0-batch0', 'ckpt-000002-step1-epoch0-batch0']
    >>> tmp.cleanup()
    """
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"cannot list checkpoints in {directory}: permission denied", str(directory)
        ) from e
    found = [CheckpointInfo.parse(directory / entry.name) for entry in entries]
    return sorted((c for c in found if c is not None), key=lambda c: (c.seq, c.step, c.epoch, c.batch_index))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one checkpoint (rather than a directory of checkpoints).

    A checkpoint's name, or a directory holding a manifest, or both a payload and its metadata
    (a checkpoint renamed, perhaps incomplete). A ``state.pt`` of one's own alone (the manual
    ``torch.save(state.state_dict(), path)`` recipe) does not make a directory of checkpoints one.

    >>> is_checkpoint("runs/ckpt-000001-step3-epoch0-batch3"), is_checkpoint("runs")
    (True, False)
    """
    path = Path(path)
    if _NAME.match(path.name) is not None or (path / MANIFEST).exists():
        return True
    return (path / PAYLOAD).exists() and (path / META).exists()


# --- the global RNGs, as tensors ---------------------------------------------------------------


def capture_global_rng() -> dict[str, Any]:
    """Every global RNG state the run may draw from, as tensors, numbers and strings.

    torch's CPU generator, each CUDA device's (only where CUDA is already in use, so a
    CPU run never initialises it), NumPy's legacy global generator and Python's
    ``random``. :func:`restore` puts them back.

    >>> sorted(capture_global_rng())
    ['numpy', 'python', 'torch']
    """
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    rng["numpy"] = {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    version, internal, gauss_next = random.getstate()
    python: dict[str, Any] = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64)}
    if gauss_next is not None:
        python["gauss_next"] = float(gauss_next)
    rng["python"] = python
    return rng


def install_global_rng(plain: Any, where: str) -> None:
    """Put back the global RNGs :func:`capture_global_rng` captured; ``where`` names them in the error raised
    when ``plain`` is not such a capture.

    >>> import torch
    >>> saved = capture_global_rng()
    >>> first = torch.rand(2)
    >>> install_global_rng(saved, "demo")
    >>> torch.equal(torch.rand(2), first)
    True
    """
    _decode_global_rng(plain, where)()


def _rng_error(where: str, key: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where}: global RNG entry '{key}' {what}")


def _decode_global_rng(plain: Any, where: str) -> Callable[[], None]:
    """Check a captured global RNG state; return the function that installs it."""
    if not isinstance(plain, Mapping):
        raise _rng_error(where, "global_rng", "is not a mapping")
    torch_state = plain.get("torch")
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8:
        raise _rng_error(where, "torch", "is not a uint8 generator-state tensor")
    cuda = plain.get("cuda", {})
    if not isinstance(cuda, Mapping) or not all(
        isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda.values()
    ):
        raise _rng_error(where, "cuda", "is not a mapping of uint8 generator-state tensors")
    numpy_state = _decode_numpy_rng(plain.get("numpy"), where)
    python_state = _decode_python_rng(plain.get("python"), where)

    def install() -> None:
        torch.set_rng_state(torch_state)
        if cuda and torch.cuda.is_available():
            for index, state in cuda.items():
                if int(index) < torch.cuda.device_count():
                    torch.cuda.set_rng_state(state, int(index))
        np.random.set_state(numpy_state)
        random.setstate(python_state)

    return install


def _decode_numpy_rng(plain: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(plain, Mapping):
        raise _rng_error(where, "numpy", "is missing")
    keys = plain.get("keys")
    if plain.get("kind") != "MT19937" or not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (624,):
        raise _rng_error(where, "numpy", "is not an MT19937 state of 624 keys")
    try:
        return ("MT19937", keys.numpy().astype(np.uint32), int(plain["pos"]), int(plain["has_gauss"]),
                float(plain["cached_gaussian"]))
    except (KeyError, TypeError, ValueError) as e:
        raise _rng_error(where, "numpy", f"is incomplete ({e!r})") from e


def _decode_python_rng(plain: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(plain, Mapping):
        raise _rng_error(where, "python", "is missing")
    internal = plain.get("state")
    if not isinstance(internal, torch.Tensor) or internal.ndim != 1:
        raise _rng_error(where, "python", "is not a 1-d state tensor")
    gauss = plain.get("gauss_next")
    decoded = (int(plain.get("version", 3)), tuple(int(v) for v in internal.tolist()),
               None if gauss is None else float(gauss))
    try:  # validate without touching the global generator
        random.Random().setstate(decoded)
    except (TypeError, ValueError) as e:
        raise _rng_error(where, "python", f"is not a valid random.Random state ({e})") from e
    return decoded


# --- taking a snapshot and writing it ----------------------------------------------------------


@attrs.frozen
class Snapshot:
    """Everything one checkpoint holds, ready to write; made by :func:`snapshot`.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> snap = snapshot(TrainState.create(torch.nn.Linear(1, 1)), reason="manual")
    >>> snap.meta["reason"], sorted(snap.payload)
    ('manual', ['extras_devices', 'format', 'global_rng', 'state', 'version'])
    """

    payload: dict[str, Any]
    meta: dict[str, Any]
    step: int
    epoch: int
    batch_index: int

    def name(self, seq: int) -> str:
        return f"ckpt-{seq:06d}-step{self.step}-epoch{self.epoch}-batch{self.batch_index}"


def _devices(tree: Any) -> Any:
    """The devices of the non-CPU tensors in ``tree``, as a tree of strings (empty dicts elsewhere)."""
    if isinstance(tree, torch.Tensor):
        return None if tree.device.type == "cpu" else str(tree.device)
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            d = _devices(v)
            if d:
                out[k] = d
        return out
    return None


def snapshot(
    state: TrainState, *, reason: str = "", copy: bool = False, state_dict: Mapping[str, Any] | None = None
) -> Snapshot:
    """Capture ``state`` and the global RNGs for a checkpoint.

    With ``copy=True`` every tensor is copied to CPU memory, so training may go on
    changing the state in place while the snapshot is written in the background.
    ``state_dict`` is ``state.state_dict()`` where the caller has it already: a state that
    ``with_fsdp`` sharded gathers it on every rank (a collective), and one rank writes it.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> shared, copied = snapshot(state), snapshot(state, copy=True)
    >>> with torch.no_grad():
    ...     _ = state.model.weight.add_(1.0)  # training goes on in place
    >>> torch.equal(shared.payload["state"]["model"]["weight"], state.model.weight)
    True
    >>> torch.equal(copied.payload["state"]["model"]["weight"], state.model.weight)
    False
    """
    if OVER_RANKS not in state.extras and not _collective.active():  # windows marked as one rank's (any save)
        marked = over_ranks(state.extras)
        if marked is not state.extras:
            state = replace_extras(state, marked)
    lazy = _uninitialized(state.model)
    if lazy:
        raise ValueError(
            f"cannot checkpoint a state whose lazy modules have not run a forward yet ({', '.join(sorted(lazy)[:3])}: "
            "their shapes are not known, and such a checkpoint could not be loaded); save after the first step"
        )
    sd = state.state_dict() if state_dict is None else dict(state_dict)
    extras_devices = _devices(sd.get("extras", {})) or {}
    if copy:
        sd = copy_tensors(sd, "cpu")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "state": sd,
        "global_rng": capture_global_rng(),
        "extras_devices": extras_devices,
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "batch_index": state.batch_index,
        "seed": state.seed,
        "reason": reason,
        "created_unix": time.time(),
        "torch": torch.__version__,
        "structure": _structure(sd["model"], state.optimizer, state.scheduler),
    }
    return Snapshot(payload, meta, state.step, state.epoch, state.batch_index)


def save(state: TrainState, directory: str | os.PathLike, *, reason: str = "", durable: bool = True) -> Path:
    """Atomically save ``state`` (and the global RNGs) as a new checkpoint in ``directory``.

    Returns the checkpoint's path. Raises ``OSError`` (``PermissionError`` for a
    directory without permission, errno ``ENOSPC`` for a full disk) naming the
    directory; then no temporary is left and the previous checkpoints are intact.
    ``durable=False`` skips the fsyncs: the checkpoint survives the process being killed
    (the data is in the operating system's page cache) but not a power loss or an OS
    crash, after which :func:`restore`'s checksums find it torn and fall back to an older
    one; it saves about as fast as a bare ``torch.save``.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)), tmp.name, reason="manual")
    >>> sorted(p.name for p in path.iterdir())
    ['manifest.json', 'meta.json', 'state.pt']
    >>> tmp.cleanup()
    """
    _require_state("save", state)
    return write(snapshot(state, reason=reason), directory, durable=durable)


def _require_state(caller: str, state: Any) -> None:
    """Raise a TypeError naming what ``state`` is when it is not a :class:`TrainState`.

    >>> _require_state("save", torch.nn.Linear(1, 1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: save: state must be a loopkit.TrainState, got Linear: wrap the model, ...
    """
    if not isinstance(state, TrainState):
        raise not_a_state(caller, state)


def write(snap: Snapshot, directory: str | os.PathLike, *, durable: bool = True) -> Path:
    """Write a :class:`Snapshot` as a new checkpoint in ``directory`` (see :func:`save`).

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> write(snapshot(TrainState.create(torch.nn.Linear(1, 1))), tmp.name).name
    'ckpt-000001-step0-epoch0-batch0'
    >>> tmp.cleanup()
    """
    directory = Path(directory)
    make_directory(directory)
    with _writer_lock(directory):
        existing = list_checkpoints(directory)
        seq = existing[-1].seq + 1 if existing else 1
        final = directory / snap.name(seq)
        while final.exists():  # never over an existing checkpoint
            seq += 1
            final = directory / snap.name(seq)
        tmp = directory / f"{_TMP}{final.name}-{_writer_tag()}-{secrets.token_hex(4)}"
        try:
            _mkdir(tmp)
            files = {PAYLOAD: _write_payload(snap.payload, tmp / PAYLOAD, durable)}
            files[META] = _write_json(tmp / META, snap.meta, durable)
            _write_manifest(tmp, {"format": FORMAT, "version": VERSION, "files": files}, durable)
            if durable:
                _fsync_dir(tmp)
            final = _rename_into_place(tmp, directory, snap, final)
            if durable:
                _fsync_dir(directory)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _save_error(e, directory, final.name, existing) from e
            raise
    return final


def _rename_into_place(tmp: Path, directory: Path, snap: Snapshot, final: Path) -> Path:
    """Rename the complete temporary to ``final``; where another process took that name meanwhile (two
    runs sharing a directory), to the next free sequence number. Returns the name it got."""
    seq = int(_NAME.match(final.name).group(1))  # type: ignore[union-attr]
    while True:
        try:
            os.rename(tmp, final)
            return final
        except OSError as e:  # a non-empty directory of that name: never written over
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        seq += 1
        final = directory / snap.name(seq)


def _save_error(e: OSError, directory: Path, name: str, existing: list[CheckpointInfo]) -> OSError:
    kept = ", ".join(c.name for c in existing) if existing else "there were none"
    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    elif isinstance(e, PermissionError):
        what = "permission denied"
    else:
        what = e.strerror or type(e).__name__
    message = (
        f"could not save checkpoint {name} in {directory}: {what} ({e}); the partial save was "
        f"removed (no temporary is left) and the previous checkpoints are intact ({kept})"
    )
    if isinstance(e, PermissionError):
        return PermissionError(e.errno or errno.EACCES, message)
    return OSError(e.errno, message) if e.errno is not None else OSError(message)


def make_directory(directory: str | os.PathLike) -> None:
    """Create ``directory`` (and its parents) for checkpoints; errors name it and say why.

    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> make_directory(pathlib.Path(tmp.name) / "a" / "b"); (pathlib.Path(tmp.name) / "a" / "b").is_dir()
    True
    >>> tmp.cleanup()
    """
    directory = Path(directory)
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise PermissionError(
            e.errno or errno.EACCES, f"cannot create the checkpoint directory {directory}: permission denied"
        ) from e
    except FileExistsError as e:
        raise NotADirectoryError(errno.ENOTDIR, f"checkpoint directory {directory} is not a directory") from e


def _mkdir(path: Path) -> None:
    os.mkdir(path)


def _write_payload(payload: Mapping[str, Any], path: Path, durable: bool = True) -> dict[str, Any]:
    """``torch.save`` the payload to ``path``, fsync it (when ``durable``); return its size and checksum.

    The fsync runs in a second thread while this one reads the file back from the page cache
    to checksum it (both release the GIL). torch writes through a file object of ours: a failed
    write then raises the ``OSError`` it got (``ENOSPC``: a full disk), where a path's own C++ stream
    raises a ``RuntimeError`` (``unexpected pos``) that says nothing of the cause.
    """
    with open(path, "xb") as f:
        torch.save(payload, f)
    if not durable:
        return _digest(path)
    with open(path, "r+b") as f:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loopkit-fsync") as pool:
            try:
                synced = pool.submit(os.fsync, f.fileno())
            except RuntimeError:  # the interpreter is exiting (a background save finishing): no new threads
                digest = _digest(path)
                os.fsync(f.fileno())
                return digest
            digest = _digest(path)
            synced.result()
    return digest


def _write_json(path: Path, data: Mapping[str, Any], durable: bool = True) -> dict[str, Any]:
    raw = json.dumps(data, indent=1, sort_keys=True).encode()
    with open(path, "xb") as f:
        f.write(raw)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return {"size": len(raw), _CHECKSUM: checksum(raw)}


def _write_manifest(tmp: Path, manifest: Mapping[str, Any], durable: bool = True) -> None:
    """Write the manifest last: the checkpoint is complete once it exists."""
    _write_json(tmp / MANIFEST, manifest, durable)


def checksum(data: Any) -> str:
    """The checksum a manifest records: sha256 of ``data`` XOR-folded onto one 4 KiB block, and of its CRC-32.

    ``data`` is any bytes-like object (a memory-mapped file, ``bytes``). The 8-byte words at
    the same offset of every 4096-byte block are XOR-ed together; the sha256 of those 4096
    bytes, of the bytes after the last whole block, of the CRC-32 of all of ``data`` and of
    the length is the checksum. Both read the data at memory speed (together about 7x faster
    than sha256 over every byte). Any change confined to one 4 KiB-aligned window always
    changes the fold (a flipped bit, a torn page, a zeroed or overwritten sector), as does
    any truncation; the CRC depends on where each byte is, so changes in several windows
    that cancel in the fold (two equal pages zeroed) change it. It guards against
    accidents, not an attacker: what stops a crafted file is ``weights_only`` loading.

    >>> checksum(b"abc") == checksum(b"abc"), checksum(bytes(8192)) == checksum(bytes(8191) + b"1")
    (True, False)
    """
    return _checksum(data, crc=True)


def _checksum(data: Any, *, crc: bool) -> str:
    """:func:`checksum`; without ``crc``, that of manifests keyed ``fold_sha256`` (written before the CRC)."""
    view = memoryview(data).cast("B")
    size = len(view)
    whole = size - size % _FOLD
    digest = hashlib.sha256()
    if whole:
        blocks = np.frombuffer(view, dtype=np.uint64, count=whole // 8).reshape(-1, _FOLD // 8)
        digest.update(np.bitwise_xor.reduce(blocks, axis=0).tobytes())
        del blocks  # releases the buffer before the view
    digest.update(view[whole:])
    if crc:
        digest.update(zlib.crc32(view).to_bytes(4, "little"))  # zlib releases the GIL over a large buffer
    digest.update(size.to_bytes(8, "little"))
    view.release()
    return digest.hexdigest()


def _digest(path: Path, kind: str = _CHECKSUM) -> dict[str, Any]:
    """The size and the ``kind`` checksum (:func:`checksum`, or a manifest's older one) of a file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"size": 0, kind: _checksum(b"", crc=kind == _CHECKSUM)}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return {"size": size, kind: _checksum(mapped, crc=kind == _CHECKSUM)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- temporaries, locks, removal ---------------------------------------------------------------


@contextlib.contextmanager
def _writer_lock(directory: Path, *, clean: bool = True) -> Iterator[None]:
    """Hold a shared lock on ``directory/.lock`` while a temporary of ours is there (a checkpoint's being saved,
    ``scores.json``'s being replaced), after cleaning stale temporaries (with ``clean``): a cleaner removes them
    only under the exclusive lock."""
    fd = _open_lock(directory)
    try:
        if clean:
            _clean_stale(directory, fd)
        if fd is not None and fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _open_lock(directory: Path) -> int | None:
    """The lock file's descriptor, or None where it cannot be opened (a read-only directory)."""
    try:
        return os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


def _clean_stale(directory: Path, fd: int | None) -> None:
    """Remove temporaries and trash of crashed saves, unless some process is saving right now.

    A save (and a rewrite of ``scores.json``) holds a shared lock on ``.lock`` from before its
    temporary exists until it is renamed, so an exclusive lock means every temporary there is stale. Where locks are
    unavailable, only temporaries older than ``_STALE_WITHOUT_LOCKS_S`` are removed.
    """
    max_age = _STALE_WITHOUT_LOCKS_S
    if fd is not None and fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another save is in progress (or a lock outlives a killed save: see _writer_tag)
            _clean_orphans(directory)
            return
        max_age = 0.0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not _is_leftover(entry.name):
            continue
        try:
            if max_age and now - entry.stat(follow_symlinks=False).st_mtime < max_age:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _is_leftover(name: str) -> bool:
    """Whether ``name`` is one loopkit gives a temporary or trash in a folder of checkpoints (:func:`write`,
    :func:`remove`, :func:`write_scores`): the cleaner removes those alone, never another's ``.tmp-*``.

    >>> _is_leftover(".tmp-ckpt-000002-step8-epoch1-batch4-p41h0a1b2c3d-9f8e7d6c"), _is_leftover(".tmp-scores.json-9f8e7d6c")
    (True, True)
    >>> _is_leftover(".trash-ckpt-000001-step4-epoch0-batch4-9f8e7d6c"), _is_leftover(".trash-ckpt-best-9f8e7d6c")
    (True, True)
    >>> _is_leftover(".tmp-dataset-cache"), _is_leftover(".trash-old-notes.txt")
    (False, False)
    """
    return _LEFTOVER.match(name) is not None


def _writer_tag() -> str:
    """What a checkpoint temporary's name says of the process writing it: ``p<pid>h<where>``, ``where`` a hash of
    the machine (host name and boot) and of the PID namespace its ``pid`` means something in.

    The shared lock a save holds lives as long as any process holds its descriptor: DataLoader
    workers forked while a background save holds it keep it after the saving process was killed,
    and then no later save can take the exclusive lock that proves its temporaries stale. A
    temporary whose writer, in this very PID namespace of this machine, is no longer running is stale all the same.
    """
    return f"p{os.getpid()}h{_where()}"


def _where() -> str:
    """A hash of this machine (host name, boot id) and of this process's PID namespace: a pid is comparable only
    between processes of one such place (two containers of one host with the host's name have two namespaces)."""
    import socket

    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


_ORPHAN = re.compile(r"-p(\d+)h([0-9a-f]{8})-[0-9a-f]{8}$")


def _clean_orphans(directory: Path) -> None:
    """Remove the checkpoint temporaries whose writer (see :func:`_writer_tag`) was a process of this machine and
    PID namespace that is no longer running; those of running processes, and of other machines or namespaces, are
    left."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(_TMP) and _is_leftover(e.name)]
    except OSError:
        return
    here = _where()
    for entry in entries:
        found = _ORPHAN.search(entry.name)
        if found is None or found.group(2) != here or _running(int(found.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts as gone: it writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def clean(directory: str | os.PathLike) -> None:
    """Remove what crashed saves left in ``directory`` (never a save in progress elsewhere, nor an entry named
    ``.tmp-*`` or ``.trash-*`` that loopkit did not write): temporaries of checkpoints and of ``scores.json``,
    trash of removed checkpoints. Makes the lock file ``.lock`` the cleaner and the writers share.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = Path(tmp.name); (root / ".tmp-ckpt-000001-step1-epoch0-batch1-ab").mkdir()
    >>> clean(root); sorted(p.name for p in root.iterdir())
    ['.lock']
    >>> tmp.cleanup()
    """
    directory = Path(directory)
    fd = _open_lock(directory)
    try:
        _clean_stale(directory, fd)
    finally:
        if fd is not None:
            os.close(fd)


def remove(path: str | os.PathLike, *, missing_ok: bool = False) -> bool:
    """Delete one checkpoint: renamed out of sight first, so it never looks half-deleted.

    Returns whether it was there to delete. With ``missing_ok`` a checkpoint already gone
    (another process removed it) is no error: False is returned; without it, that raises
    ``FileNotFoundError``.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> root = tmp.name
    >>> remove(save(TrainState.create(torch.nn.Linear(1, 1)), root))
    True
    >>> list_checkpoints(root)
    []
    >>> tmp.cleanup()
    """
    path = Path(path)
    if not os.path.lexists(path):  # (gone: removed by another process, or never there; a link to nothing is there)
        if missing_ok:
            return False
        raise FileNotFoundError(errno.ENOENT, f"remove: there is no checkpoint at {path}", str(path))
    # (not a folder of checkpoints, nor a file or folder of one's own that merely has such a name)
    if not path.is_dir() or (_NAME.match(path.name) is None and not (path / MANIFEST).is_file()):
        raise ValueError(f"remove: {path} is not a checkpoint (a folder named ckpt-...-step...-epoch...-batch...); "
                         "nothing was deleted")
    prefix = "" if _NAME.match(path.name) else "ckpt-"  # (a checkpoint renamed: its trash named as the cleaner knows)
    trash = path.with_name(f"{_TRASH}{prefix}{path.name}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise
    _delete(trash)
    return True


def _delete(trash: Path) -> None:
    """Delete a checkpoint already renamed out of sight (a crash here leaves only trash)."""
    shutil.rmtree(trash, ignore_errors=True)


# --- verifying and loading ---------------------------------------------------------------------


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check one checkpoint against its manifest (sizes and checksums); return the manifest.

    Raises :class:`loopkit.CheckpointCorruptError` naming the file that is missing,
    truncated or altered (or the missing manifest of an incomplete save).

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)), tmp.name)
    >>> sorted(verify(path)["files"])
    ['meta.json', 'state.pt']
    >>> with open(path / "state.pt", "r+b") as f:
    ...     _ = f.truncate(100)
    >>> verify(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    loopkit.errors.CheckpointCorruptError: checkpoint file .../state.pt is corrupt: 100 bytes, the manifest says ...
    >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointCorruptError(f"checkpoint {path} does not exist or is not a directory")
    manifest, files = _manifest(path)
    for name, expected in files.items():  # sizes first: cheap, and catches truncation at once
        _check_size(path, name, expected)
    for name, expected in files.items():
        _check_checksum(path, name, expected)
    return manifest


def _manifest(path: Path) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The manifest of the checkpoint at ``path`` and its files, checked to be one this loopkit reads."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() and not path.exists():
        raise CheckpointCorruptError(f"checkpoint {path} does not exist")
    if not manifest_path.is_file() and _NAME.match(path.name) is None and path.is_dir() and list_checkpoints(path):
        raise CheckpointCorruptError(
            f"{path} is a folder of checkpoints, not one: name one of them (loopkit.checkpoint.list_checkpoints), "
            "or loopkit.restore(state, folder) for the newest that verifies"
        )
    if not manifest_path.is_file():
        raise CheckpointCorruptError(
            f"checkpoint {path} is incomplete: {manifest_path} is missing (the save did not finish)"
        )
    manifest = _read_json(manifest_path, "manifest")
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, Mapping):
        raise CheckpointCorruptError(f"checkpoint manifest {manifest_path} is not a {FORMAT} manifest")
    _check_version(manifest.get("version"), manifest_path)
    for name in _REQUIRED:
        if name not in files:
            raise CheckpointCorruptError(f"checkpoint manifest {manifest_path} does not list {name}")
    return manifest, files


def _check_version(version: Any, file: Path) -> None:
    """Refuse a manifest's or payload's format version other than :data:`VERSION`: one written by a newer loopkit
    is intact (:class:`loopkit.CheckpointLoadError`: an upgrade reads it, and restore must not skip it for an
    older checkpoint that a fit would then rotate it away with); anything else is a malformed file.

    >>> _check_version(2, Path("runs/ckpt-000003-step12-epoch2-batch4/manifest.json"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    loopkit.errors.CheckpointLoadError: checkpoint runs/ckpt-000003-step12-epoch2-batch4 has format version 2 ...
    """
    if version == VERSION:
        return
    if type(version) is int and version > VERSION:
        raise CheckpointLoadError(
            f"checkpoint {file.parent} has format version {version} (its {file.name}), and this loopkit reads "
            f"version {VERSION}: it was written by a newer loopkit. Upgrade loopkit to load it; restore does not "
            "skip it for an older checkpoint (a fit from that would rotate it away)"
        )
    raise CheckpointCorruptError(f"checkpoint file {file} has format version {version!r}; this loopkit reads "
                                 f"version {VERSION}")


def _check_checksum(path: Path, name: str, expected: Mapping[str, Any]) -> None:
    kind = next((k for k in (_FOLD_ONLY, "sha256") if k in expected and _CHECKSUM not in expected), _CHECKSUM)
    try:
        got = _sha256(path / name) if kind == "sha256" else _digest(path / name, kind)[kind]
    except FileNotFoundError:  # (removed since its size was checked: rotation by another process)
        raise CheckpointCorruptError(f"checkpoint file {path / name} is missing") from None
    if got != expected.get(kind):
        raise CheckpointCorruptError(
            f"checkpoint file {path / name} is corrupt: its checksum {got} does not match the manifest's "
            f"{expected.get(kind)}"
        )


def _sha256(path: Path) -> str:
    """The checksum of manifests written before :func:`checksum` (loopkit 0.1.0 development builds)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_size(path: Path, name: Any, expected: Any) -> None:
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(expected, Mapping):
        raise CheckpointCorruptError(f"checkpoint manifest {path / MANIFEST} has an invalid entry {name!r}")
    file = path / name
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorruptError(f"checkpoint file {file} is missing") from None
    if size != expected.get("size"):
        raise CheckpointCorruptError(
            f"checkpoint file {file} is corrupt: {size} bytes, the manifest says {expected.get('size')}"
        )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointCorruptError(f"checkpoint {what} {path} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointCorruptError(f"checkpoint {what} {path} is not a JSON object")
    return data


def _safe_load(file: Path) -> Any:
    """``torch.load`` with an explicit ``weights_only=True``: no environment variable can turn it off.

    The tensors are read into memory of their own (no memory map): nothing that is returned
    refers to the file, which checkpoint rotation may delete. Any failure raises
    :class:`loopkit.CheckpointLoadError`, which :func:`_load` replaces with the
    :class:`loopkit.CheckpointCorruptError` of a file that does not verify: a file that verifies
    and fails to load is intact (out of memory here; objects that ``weights_only`` refuses).
    """
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        folder = file.parent.parent
        if isinstance(e, pickle.UnpicklingError):  # anything but tensors, numbers, strings, containers
            raise CheckpointLoadError(
                f"checkpoint file {file} was refused: it cannot be loaded with torch.load(weights_only=True) "
                f"({detail}); loopkit never unpickles arbitrary objects, and nothing in the file was run. Its files "
                "match its manifest: it holds objects of another kind (written by another program, or by a newer "
                "loopkit or torch). restore does not skip it for an older checkpoint (a fit from that would rotate "
                f"it away): load it with what wrote it, or move it out of {folder} to resume from the one before"
            ) from e
        raise CheckpointLoadError(
            f"checkpoint {file.parent} is intact (its files match its manifest) but could not be loaded here "
            f"({detail}). restore does not skip it for an older checkpoint or the given state (a fit from those "
            "would rotate it away): remove the cause (free memory, on a machine with too little) and restore "
            f"again, or move it out of {folder} to resume from the one before"
        ) from e
    return loaded


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Verify one checkpoint and load it safely; return its payload (``state``, ``global_rng``, ``meta``).

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)).evolve(step=2), tmp.name)
    >>> payload = load(path)
    >>> payload["state"]["step"], payload["meta"]["step"]
    (2, 2)
    >>> tmp.cleanup()

    Raises :class:`loopkit.CheckpointCorruptError` for a checkpoint that does not verify (a file missing,
    truncated or altered, a malformed manifest or payload), and :class:`loopkit.CheckpointLoadError` for one
    that verifies but cannot be loaded (written by a newer loopkit, holding what ``weights_only`` refuses, or
    a load that fails here, out of memory).
    """
    path = Path(path)
    was_there = path.is_dir()
    try:
        return _load(path)
    except (CheckpointCorruptError, CheckpointLoadError, FileNotFoundError) as e:
        if not was_there or path.is_dir():  # (a wrong path, damage, or a failed load: said as it is)
            raise
        raise _VanishedError(
            errno.ENOENT, f"checkpoint {path} was removed while it was read (another process rotating the "
            "checkpoints of this directory)", str(path)
        ) from e


class _VanishedError(FileNotFoundError):
    """A checkpoint that was removed (by checkpoint rotation) while it was being read: gone, not corrupt."""


def _load(path: Path) -> dict[str, Any]:
    """:func:`load`, where a file missing or unreadable may mean the checkpoint was removed meanwhile."""
    # The checksums are computed while the payload loads (NumPy and hashlib release the GIL); nothing
    # loaded is used before they verify, and loading runs no code (weights_only=True).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        verified = pool.submit(verify, path)
        try:
            payload = _safe_load(path / PAYLOAD)
        except CheckpointLoadError:
            verified.result()  # a corrupt file explains the failure best
            raise
        verified.result()
    meta = _read_json(path / META, "metadata")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointCorruptError(f"checkpoint file {path / PAYLOAD} is not a {FORMAT} payload")
    _check_version(payload.get("version"), path / PAYLOAD)
    if not isinstance(payload.get("state"), Mapping):
        raise CheckpointCorruptError(f"checkpoint file {path / PAYLOAD} holds no state")
    payload["meta"] = meta
    return payload


# --- which model a checkpoint is of ------------------------------------------------------------


def structure(state: TrainState) -> dict[str, Any]:
    """What tells the model and optimizer of ``state`` from another's, as JSON: each key of the
    model's state dict with its shape (parameters and persistent buffers), the optimizer's class
    and the number of parameters in each of its param groups, and for a state with a scheduler its
    class (and a SequentialLR's or ChainedScheduler's schedulers' classes, in their order). Every
    checkpoint keeps it in its ``meta.json``; :func:`structure_mismatch` compares two.

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> model = torch.nn.Linear(3, 1)
    >>> structure(TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    {'model': {'weight': [1, 3], 'bias': [1]}, 'optimizer': {'type': 'SGD', 'param_groups': [2]}}
    """
    return _structure(core_module(state.model).state_dict(), state.optimizer, state.scheduler)


def _structure(
    model_sd: Mapping[str, Any], optimizer: torch.optim.Optimizer | None, scheduler: Any = None
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "model": {key: _shape(value) for key, value in model_sd.items()},
        "optimizer": None if optimizer is None else {
            "type": type(optimizer).__qualname__,
            "param_groups": [len(group["params"]) for group in optimizer.param_groups],
        },
    }
    if scheduler is not None:  # (no key without one: a checkpoint saved before schedulers were recorded reads alike)
        found["scheduler"] = _scheduler_structure(scheduler)
    return found


def _scheduler_structure(scheduler: Any) -> dict[str, Any]:
    """A scheduler's class, and the classes of the schedulers a SequentialLR or ChainedScheduler runs.

    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> lr = torch.optim.lr_scheduler
    >>> _scheduler_structure(lr.SequentialLR(opt, [lr.ConstantLR(opt), lr.ExponentialLR(opt, 0.9)], [2]))
    {'type': 'SequentialLR', 'schedulers': ['ConstantLR', 'ExponentialLR']}
    """
    scheduler = held_scheduler(scheduler)  # (a scheduler transform's inner state: the scheduler it holds still)
    found: dict[str, Any] = {"type": type(scheduler).__qualname__}
    inner = getattr(scheduler, "_schedulers", None)
    if isinstance(inner, (list, tuple)):
        found["schedulers"] = [type(s).__qualname__ for s in inner]
    return found


def _shape(value: Any) -> list[int] | None:
    """A tensor's shape as a list; None for a lazy module's parameter not yet initialised (its shape comes with
    the first forward) and for anything but a tensor (a module's extra state)."""
    if not isinstance(value, torch.Tensor) or torch.nn.parameter.is_lazy(value):
        return None
    return list(value.shape)


def structure_mismatch(
    found: Mapping[str, Any], expected: Mapping[str, Any], *, scheduler: bool = True
) -> str | None:
    """The first difference between the :func:`structure` of a checkpoint (``found``) and of a state
    (``expected``), in words; None when they agree. A shape or an optimizer or scheduler class that
    either side does not know (None, or not recorded) matches any; ``scheduler=False`` leaves the
    scheduler out (a run may switch schedulers between its phases in one folder).

    >>> a = {"model": {"weight": [1, 3], "bias": [1]}, "optimizer": {"type": "SGD", "param_groups": [2]}}
    >>> structure_mismatch(a, a) is None
    True
    >>> print(structure_mismatch(a, {"model": {"weight": [4, 3], "bias": [4]}, "optimizer": a["optimizer"]}))
    key 'model.weight' has shape (1, 3) there and (4, 3) in this model
    >>> print(structure_mismatch(a, {"model": a["model"], "optimizer": {"type": "Adam", "param_groups": [2]}}))
    its optimizer is SGD, and this state's Adam
    >>> print(structure_mismatch({**a, "scheduler": {"type": "LambdaLR"}}, {**a, "scheduler": {"type": "StepLR"}}))
    its scheduler is LambdaLR, and this state's StepLR
    """
    theirs, mine = found.get("model") or {}, expected.get("model") or {}
    for key, shape in mine.items():
        if key not in theirs:
            return f"it has no key 'model.{key}', which this model has{'' if shape is None else ','}{_with_shape(shape)}"
        there = theirs[key]
        if shape is not None and there is not None and list(there) != list(shape):
            return f"key 'model.{key}' has shape {tuple(there)} there and {tuple(shape)} in this model"
    for key, shape in theirs.items():
        if key not in mine:
            return f"it has a key 'model.{key}'{_with_shape(shape)}, which this model has not"
    differs = _optimizer_mismatch(found.get("optimizer"), expected.get("optimizer"))
    if differs is None and scheduler:
        differs = _scheduler_mismatch(found.get("scheduler"), expected.get("scheduler"))
    return differs


def _scheduler_mismatch(theirs: Any, mine: Any) -> str | None:
    """The scheduler part of :func:`structure_mismatch`: its class (and the classes of the schedulers it runs)
    where both sides record one; with or without a scheduler is ``load_state_dict``'s to judge (a missing or
    unexpected key). Another class with the same state-dict keys (a LambdaLR's into a MultiplicativeLR) would
    load silently and change the rates."""
    if not isinstance(theirs, Mapping) or not isinstance(mine, Mapping):
        return None  # (one side without a scheduler, one saved before they were recorded, or a malformed record)
    kind, own = theirs.get("type"), mine.get("type")
    if not isinstance(kind, str) or not isinstance(own, str):
        return None
    inner, own_inner = theirs.get("schedulers"), mine.get("schedulers")
    if kind == own and (not isinstance(inner, list) or not isinstance(own_inner, list) or inner == own_inner):
        return None
    if kind == own:
        kind, own = f"{kind} of {', '.join(map(str, inner))}", f"{own} of {', '.join(map(str, own_inner))}"
    return f"its scheduler is {kind}, and this state's {own}"


def _optimizer_mismatch(theirs: Mapping[str, Any] | None, mine: Mapping[str, Any] | None) -> str | None:
    """The optimizer part of :func:`structure_mismatch`: its presence and class."""
    if theirs is not None and not isinstance(theirs, Mapping):
        return None  # (a malformed record: the payload's own checks decide)
    if (theirs is None) != (mine is None):
        if mine is None:
            return f"it holds an optimizer ({theirs.get('type') or 'of a class not recorded'}), and this state none"
        return f"it holds no optimizer, and this state has one ({mine.get('type')})"
    if theirs is None or mine is None:
        return None
    if theirs.get("type") is not None and mine.get("type") is not None and theirs["type"] != mine["type"]:
        return f"its optimizer is {theirs['type']}, and this state's {mine['type']}"
    # (param groups are not compared: a fine-tuning run adds groups as it unfreezes layers, so the same
    # script run again starts with fewer than its newest checkpoint holds)
    return None


def _with_shape(shape: Any) -> str:
    return "" if shape is None else f" of shape {tuple(shape)}"


def read_structure(path: str | os.PathLike) -> dict[str, Any]:
    """The :func:`structure` of the model and optimizer that checkpoint ``path`` holds, without loading its tensors.

    Read from its ``meta.json``, once the manifest vouches for that file (its size and checksum;
    the payload is not read). A checkpoint saved before ``meta.json`` held the structure gives
    it from the payload's keys and shapes, loaded memory-mapped (with ``weights_only=True``: no
    tensor data is read) and without the optimizer's class, which such a payload does not
    record. Raises :class:`loopkit.CheckpointCorruptError` for a checkpoint that is incomplete,
    or whose manifest, metadata or payload cannot be read.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> path = save(TrainState.create(torch.nn.Linear(2, 1)), tmp.name)
    >>> read_structure(path)
    {'model': {'bias': [1], 'weight': [1, 2]}, 'optimizer': None}
    >>> tmp.cleanup()
    """
    path = Path(path)
    found = read_meta(path).get("structure")
    if found is None:  # saved by an earlier loopkit
        _, files = _manifest(path)
        _check_size(path, PAYLOAD, files[PAYLOAD])
        return _payload_structure(path / PAYLOAD)
    shapes = found.get("model") if isinstance(found, Mapping) else None
    optimizer = found.get("optimizer") if isinstance(found, Mapping) else None
    if (not isinstance(shapes, Mapping) or not all(_is_shape(shape) for shape in shapes.values())
            or not (optimizer is None or isinstance(optimizer, Mapping) and _is_shape(optimizer.get("param_groups")))):
        raise CheckpointCorruptError(f"checkpoint metadata {path / META} has a malformed 'structure'")
    return dict(found)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of checkpoint ``path``, once its manifest vouches for it (size and checksum).

    The payload is not read. Raises :class:`loopkit.CheckpointCorruptError` for a checkpoint that is
    incomplete, or whose manifest or metadata is damaged, and :class:`loopkit.CheckpointLoadError` for one
    of a newer loopkit's format version.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> read_meta(save(TrainState.create(torch.nn.Linear(2, 1)).evolve(step=4), tmp.name))["step"]
    4
    >>> tmp.cleanup()
    """
    path = Path(path)
    _, files = _manifest(path)
    _check_size(path, META, files[META])
    _check_checksum(path, META, files[META])
    return _read_json(path / META, "metadata")


def _is_shape(shape: Any) -> bool:
    return shape is None or (isinstance(shape, list) and all(type(d) is int for d in shape))


def _payload_structure(file: Path) -> dict[str, Any]:
    """:func:`read_structure` from a payload (memory-mapped: its tensors' data is never read)."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        sd = payload["state"]
        model = {str(key): _shape(value) for key, value in sd["model"].items()}
        optimizer = sd.get("optimizer")
        if optimizer is not None:
            groups = optimizer["param_groups"]
            ordered = [groups[k] for k in sorted(groups, key=int)] if isinstance(groups, Mapping) else list(groups)
            optimizer = {"type": None, "param_groups": [len(group["params"]) for group in ordered]}
    except Exception as e:  # not a loopkit payload, or one that cannot be loaded safely
        raise CheckpointCorruptError(
            f"checkpoint file {file} was refused: its keys and shapes cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    return {"model": model, "optimizer": optimizer}


# --- restoring ---------------------------------------------------------------------------------


def restore(state: TrainState, path: str | os.PathLike) -> TrainState:
    """The state saved in a checkpoint, loaded into ``state``'s model, optimizer and scheduler.

    ``path`` is one checkpoint, or a directory of them: then the newest whose manifest
    verifies is used, and each incomplete or corrupt one is skipped with a warning (what crashed
    saves left there is removed first, see :func:`clean`); where there is none (or no such
    directory) ``state`` itself is returned, and the directory is left as it is (with a warning where the directory holds
    files that look like checkpoints of another kind: Lightning's ``*.ckpt``, a ``*.pt`` or ``*.pth``; such a file
    given as ``path`` raises ``NotADirectoryError`` saying how to load its weights yourself). A corrupt checkpoint
    named directly raises :class:`loopkit.CheckpointCorruptError` naming the bad file. A checkpoint
    that verifies but cannot be loaded (written by a newer loopkit, holding what
    ``torch.load(weights_only=True)`` refuses, or a load that fails here, out of memory) is not
    skipped, named directly or in a directory: it raises :class:`loopkit.CheckpointLoadError`
    naming it and the cause (falling back to an older checkpoint or to ``state`` would let the
    relaunched fit's rotation delete it). A
    checkpoint of another model raises :class:`loopkit.StateMismatchError` naming the first
    missing, unexpected or mis-shaped key. Nothing is changed before everything checks out:
    ``state`` is never modified (a new state is returned); the global RNGs (torch, CUDA,
    NumPy, Python) are set to the saved ones last.

    >>> import tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> root = tmp.name
    >>> state = TrainState.create(torch.nn.Linear(2, 1), seed=5)
    >>> restore(state, root) is state  # nothing saved yet
    True
    >>> _ = save(state.evolve(epoch=2, batch_index=7), root)
    >>> resumed = restore(state, root)
    >>> resumed.epoch, resumed.batch_index, resumed.seed
    (2, 7, 5)
    >>> tmp.cleanup()
    """
    _require_state("restore", state)
    state.check_usable()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"restore: path must be a checkpoint or a directory of checkpoints (a str or os.PathLike), "
            f"got {type(path).__qualname__}"
        )
    path = Path(path)
    if is_checkpoint(path):
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"restore: checkpoint {path} does not exist", str(path))
        return _restore_from(state, *_prepare(load(path), path, state), path)
    if not path.exists():
        return state
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, _not_a_directory(path), str(path))
    if list_checkpoints(path):  # (a folder holding none is left as it is: nothing cleaned, no lock file made)
        clean(path)
    found = _newest_intact(path, state)
    if found is None:
        _warn_of_foreign(path)
        return state
    return _restore_from(state, *found[1], found[0])


_FOREIGN_SUFFIXES = (".ckpt", ".pt", ".pth")  # Lightning's, torch.save's (not export_weights' weights alone)
_START_FROM_FOREIGN = (
    "To start from such a file, load its weights into the model yourself (Lightning's: torch.load(path)['state_dict'], "
    "keys prefixed with the LightningModule's attribute name; a torch.save(state.state_dict(), path) of loopkit's "
    "Resume recipe: template.load_state_dict(torch.load(path, weights_only=True))"
)


def _not_a_directory(path: Path) -> str:
    """What :func:`restore` says of a ``path`` that is a file: with :data:`_START_FROM_FOREIGN` where it looks like
    a checkpoint of another kind (``last.ckpt``, ``model.pt``; ``model.safetensors``, export_weights' weights).

    >>> print(_not_a_directory(Path("notes.txt")))
    restore: notes.txt is neither a checkpoint nor a directory of checkpoints
    >>> print(_not_a_directory(Path("last.ckpt")))  # doctest: +ELLIPSIS
    restore: last.ckpt is neither a checkpoint nor a directory of checkpoints: ...torch.load(path)['state_dict']...
    """
    said = f"restore: {path} is neither a checkpoint nor a directory of checkpoints"
    suffix = path.suffix.lower()
    if suffix not in (*_FOREIGN_SUFFIXES, ".safetensors"):
        return said
    weights = ("; a safetensors file's, as export_weights writes: "
               "state.model.load_state_dict(safetensors.torch.load_file(path)))") if suffix == ".safetensors" else ")"
    return (f"{said}: a file, which looks like a checkpoint of another kind (Lightning's *.ckpt, a torch.save file, "
            f"safetensors weights): restore loads loopkit's checkpoints alone (folders ckpt-..., as with_checkpointing "
            f"and loopkit.checkpoint.save write them). {_START_FROM_FOREIGN}{weights}")


def _foreign_checkpoints(directory: str | os.PathLike) -> str | None:
    """The entries of ``directory`` that look like checkpoints of another kind (Lightning's ``epoch=3-step=16.ckpt``,
    ``last.ckpt``; a ``model.pt``), listed for a message, where it holds no loopkit checkpoint; else None.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _foreign_checkpoints(tmp.name) is None
    True
    >>> for name in ("last.ckpt", "epoch=3-step=16.ckpt", "notes.txt"):
    ...     _ = open(os.path.join(tmp.name, name), "w").close()
    >>> _foreign_checkpoints(tmp.name)
    'epoch=3-step=16.ckpt, last.ckpt'
    >>> tmp.cleanup()
    """
    if list_checkpoints(directory):
        return None
    try:
        entries = os.scandir(directory)
    except OSError:  # (none there, or not a folder)
        return None
    with entries:
        foreign = sorted(e.name for e in entries if e.name.lower().endswith(_FOREIGN_SUFFIXES))
    if not foreign:
        return None
    return ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")


def _warn_of_foreign(directory: Path) -> None:
    """Warn when ``directory``, holding no loopkit checkpoint (any there were corrupt, each warned of as skipped),
    holds another trainer's: restore gives the template, and a fit from it would start afresh beside them."""
    shown = _foreign_checkpoints(directory)
    if shown is None:
        return
    warnings.warn(
        f"loopkit.restore: {directory} holds no loopkit checkpoint, but {shown}, which look like checkpoints of "
        "another kind (Lightning's *.ckpt, a torch.save file): restore cannot load them and returns the state it "
        "was given, so a fit from it starts from that state (a with_checkpointing run there would save beside them). "
        f"{_START_FROM_FOREIGN}); resume loopkit runs from a directory of their own",
        RuntimeWarning,
        stacklevel=3,
    )


_RELISTS = 1000  # a writer rotating faster than restore reads for this long is not one to wait for


def _newest_intact(directory: Path, state: TrainState) -> tuple[Path, tuple[Any, ...]] | None:
    """The newest checkpoint in ``directory`` that verifies, loaded and prepared for ``state``; None if none.

    Each corrupt or incomplete one is skipped with a warning (once); one that verifies but cannot be loaded
    raises :class:`loopkit.CheckpointLoadError` (not skipped: see :func:`restore`). One that vanished while it was
    read was removed by a writer rotating the checkpoints, which does so only after it saved a newer
    one: the directory is listed again, so the template is never returned while an intact one exists.
    """
    corrupt: set[str] = set()
    for _ in range(_RELISTS):
        vanished = False
        for info in reversed(list_checkpoints(directory)):
            if info.name in corrupt:
                continue
            try:
                return info.path, _prepare(load(info.path), info.path, state)
            except _VanishedError:
                vanished = True
                break
            except CheckpointCorruptError as e:
                if not os.path.lexists(info.path):  # removed between the listing and the load: rotated away, not
                    # corrupt (a link whose target is gone is there, and corrupt: a disk not mounted)
                    vanished = True
                    break
                corrupt.add(info.name)
                warnings.warn(f"loopkit.restore: skipping checkpoint {info.path}: {e}", RuntimeWarning, stacklevel=3)
        if not vanished:
            return None
    raise RuntimeError(
        f"restore: the checkpoints of {directory} were removed faster than they could be read, {_RELISTS} times; "
        "another process is rotating them (keep_last) at every step: restore once it has saved"
    )


def _prepare(
    payload: dict[str, Any], path: Path, state: TrainState
) -> tuple[dict[str, Any], Any, Callable[[], None]]:
    """The state dict, the devices of its extras, and the function that installs the global RNGs.

    Raises :class:`loopkit.StateMismatchError` for a checkpoint of another optimizer class than
    ``state``'s (as ``with_checkpointing`` refuses it): its state would load into this optimizer
    with that one's hyperparameters (Adam's ``weight_decay=0`` into an ``AdamW``); and for one of
    another scheduler class (a LambdaLR's state loads into a MultiplicativeLR: the same keys).
    """
    install_rng = _decode_global_rng(payload.get("global_rng"), str(path / PAYLOAD))
    found = payload["meta"].get("structure")
    found = found if isinstance(found, Mapping) else {}
    mine = _structure({}, state.optimizer, state.scheduler)
    theirs = found.get("optimizer")
    differs = None
    if theirs is not None and mine["optimizer"] is not None:  # (with or without one is load_state_dict's to judge)
        differs = _optimizer_mismatch(theirs, mine["optimizer"])
    differs = differs or _scheduler_mismatch(found.get("scheduler"), mine.get("scheduler"))
    if differs is not None:
        raise StateMismatchError(f"checkpoint {path} does not fit this state: {differs}")
    return dict(payload["state"]), payload.get("extras_devices") or {}, install_rng


def _restore_from(
    state: TrainState, sd: dict[str, Any], devices: Any, install_rng: Callable[[], None], path: Path
) -> TrainState:
    if "extras" in sd:
        sd["extras"] = _place(sd["extras"], devices, model_device(state.model))
    try:
        new = state.load_state_dict(sd, copy=False)  # the tensors were just read: nothing else holds them
    except StateMismatchError as e:
        raise StateMismatchError(f"checkpoint {path} does not fit this state: {e}") from e
    install_rng()
    if OVER_RANKS in new.extras and not _collective.active():  # one process: every saved rank's records are its own
        new = replace_extras(new, own_share(new.extras, 0, 1, model_device(new.model)))
    return new


def _place(tree: Any, devices: Any, device: torch.device) -> Any:
    """Put the extras' tensors that were on an accelerator on the model's device (when it has one)."""
    if device.type == "cpu" or not devices:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(device) if isinstance(devices, str) else tree
    if isinstance(tree, Mapping) and isinstance(devices, Mapping):
        return {k: _place(v, devices.get(k), device) for k, v in tree.items()}
    return tree


# --- the best-by-metric index ------------------------------------------------------------------


def read_scores(directory: str | os.PathLike) -> dict[str, Any]:
    """The monitored scores recorded in ``directory/scores.json`` (empty when there are none).

    A corrupt index is reported with a warning and treated as empty.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = tmp.name
    >>> write_scores(root, {"monitor": "val/loss", "mode": "min", "scores": {"ckpt-000001-step4-epoch1-batch0": 0.5}})
    >>> read_scores(root)["scores"]
    {'ckpt-000001-step4-epoch1-batch0': 0.5}
    >>> tmp.cleanup()
    """
    path = Path(directory) / SCORES
    if not path.exists():
        return {}
    try:
        data = _read_json(path, "score index")
    except CheckpointCorruptError as e:
        warnings.warn(f"loopkit: ignoring the score index: {e}", RuntimeWarning, stacklevel=2)
        return {}
    scores = data.get("scores")
    if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) for v in scores.values()):
        warnings.warn(f"loopkit: ignoring the score index {path}: malformed scores", RuntimeWarning, stacklevel=2)
        return {}
    return data


def _ranked(value: Any) -> bool:
    """Whether a recorded score takes part in the ranking: any number (±inf included) but NaN (with_checkpointing's
    rule too).

    >>> _ranked(0.5), _ranked(float("nan")), _ranked(True)
    (True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def scores(directory: str | os.PathLike, monitor: str | None = None, mode: str | None = None) -> dict[str, float]:
    """The scores of ``monitor`` (ranked in ``mode``) of the checkpoints in ``directory``, by name.

    ``monitor`` and ``mode`` default to those ``with_checkpointing`` recorded, as :func:`best_checkpoint`'s do
    (none recorded: ``{}``).

    ``scores.json``'s, for the checkpoints still there (one removed by hand or by :func:`remove` has
    none), completed from the checkpoints' own records (:func:`read_score`: a run killed after a scored
    checkpoint was renamed into place, before ``scores.json`` was rewritten, or ``scores.json`` lost; a
    NaN there, which ranks nowhere, is left out).

    >>> import tempfile, torch
    >>> from loopkit.state import TrainState
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)), tmp.name)
    >>> write_scores(tmp.name, {"monitor": "val/loss", "mode": "min", "scores": {path.name: 0.5}})
    >>> scores(tmp.name, "val/loss", "min") == {path.name: 0.5} == scores(tmp.name)
    True
    >>> tmp.cleanup()
    """
    if mode not in (None, "min", "max"):
        raise ValueError(f"scores: mode must be 'min' or 'max', got {mode!r}")
    if monitor is None:
        recorded = _recorded_monitor(directory)
        if recorded is None:
            return {}
        if mode is not None and mode != recorded[1]:
            raise ValueError(f"scores: {recorded[0]!r} was recorded with mode={recorded[1]!r}, not {mode!r}: leave "
                             "mode out, or name the monitor")
        monitor, mode = recorded
    elif mode is None:
        recorded = _recorded_monitor(directory, monitor)
        if recorded is None:
            return {}
        mode = recorded[1]
    data = read_scores(directory)
    found = list_checkpoints(directory)
    there = {c.name for c in found}
    same = data.get("monitor") == monitor and data.get("mode") == mode
    known = {n: float(v) for n, v in data["scores"].items() if n in there} if same else {}
    for info in found:
        if info.name in known:
            continue
        try:
            record = read_score(info.path)
        except (CheckpointCorruptError, OSError):  # damaged or gone: nothing to rank
            continue
        if not isinstance(record, Mapping) or (record.get("monitor"), record.get("mode")) != (monitor, mode):
            continue
        if _ranked(record.get("value")):
            known[info.name] = float(record["value"])
    return known


def best_checkpoint(directory: str | os.PathLike, monitor: str | None = None, mode: str | None = None) -> Path | None:
    """The checkpoint in ``directory`` with the best ``monitor`` score: Lightning's
    ``ModelCheckpoint.best_model_path``, so ``trainer.test(ckpt_path="best")`` is
    ``evaluate(eval_step, restore(template, best_checkpoint(directory)), test_data)``.

    ``monitor`` and ``mode`` default to those ``with_checkpointing`` recorded in ``scores.json`` (or,
    without one, in the newest scored checkpoint's ``meta.json``; a ``monitor`` given alone takes the
    mode recorded with it). Of equal scores the older
    checkpoint is the best, as Lightning keeps the first; a NaN score is never the best. None
    when no checkpoint has a score (a run without ``monitor``: restore the directory, the newest).

    >>> import tempfile, torch
    >>> from loopkit.state import TrainState
    >>> tmp = tempfile.TemporaryDirectory()
    >>> state = TrainState.create(torch.nn.Linear(1, 1))
    >>> a, b = save(state, tmp.name), save(state.evolve(step=1), tmp.name)
    >>> write_scores(tmp.name, {"monitor": "val/acc", "mode": "max", "scores": {a.name: 0.9, b.name: 0.8}})
    >>> best_checkpoint(tmp.name) == a
    True
    >>> tmp.cleanup()
    """
    if mode not in (None, "min", "max"):
        raise ValueError(f"best_checkpoint: mode must be 'min' or 'max', got {mode!r}")
    recorded = _recorded_monitor(directory, monitor)
    if recorded is None:
        return None
    if mode is not None and mode != recorded[1]:
        raise ValueError(f"best_checkpoint: {recorded[0]!r} was recorded with mode={recorded[1]!r}, not {mode!r}: "
                         "leave mode out")
    monitor, mode = recorded
    found = [(v, n) for n, v in scores(directory, monitor, mode).items() if not math.isnan(v)]
    if not found:
        return None
    order = {c.name: i for i, c in enumerate(list_checkpoints(directory))}
    best = min(found, key=lambda item: ((item[0] if mode == "min" else -item[0]), order.get(item[1], 0)))
    return Path(directory) / best[1]


def _recorded_monitor(directory: str | os.PathLike, monitor: str | None = None) -> tuple[str, str] | None:
    """``(monitor, mode)`` of ``scores.json``, else of the newest checkpoint whose ``meta.json`` has a score
    (of ``monitor``, when given)."""
    def fits(record: Any) -> bool:
        return (isinstance(record, Mapping) and isinstance(record.get("monitor"), str) and record.get("mode") in ("min", "max")
                and (monitor is None or record["monitor"] == monitor))

    data = read_scores(directory)
    if fits(data):
        return data["monitor"], data["mode"]
    for info in reversed(list_checkpoints(directory)):
        try:
            record = read_score(info.path)
        except (CheckpointCorruptError, OSError):
            continue
        if fits(record):
            return record["monitor"], record["mode"]
    return None


def read_score(path: str | os.PathLike) -> Any:
    """The score record (``{"monitor", "mode", "value"}``) of checkpoint ``path``: its ``meta.json``'s, once its
    manifest vouches for it, or the one :func:`write_late_score` put beside it later (which wins); None when it has
    neither.

    Raises :class:`loopkit.CheckpointCorruptError` for a checkpoint whose manifest or metadata is damaged.

    >>> import tempfile, torch
    >>> from loopkit.state import TrainState
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)), tmp.name)
    >>> print(read_score(path))
    None
    >>> write_late_score(path, {"monitor": "val/loss", "mode": "min", "value": 0.5})
    True
    >>> read_score(path)["value"]
    0.5
    >>> tmp.cleanup()
    """
    path = Path(path)
    record = read_meta(path).get("score")
    late = path / LATE_SCORE
    if not late.is_file():
        return record
    try:  # (the later record: a relaunch that took this checkpoint over may score it again)
        return _read_json(late, "score")
    except CheckpointCorruptError as e:  # (written atomically: only damage on disk gets here)
        warnings.warn(f"loopkit: ignoring the score of {path.name}: {e}", RuntimeWarning, stacklevel=2)
        return record


def write_late_score(path: str | os.PathLike, record: Mapping[str, Any], *, durable: bool = True) -> bool:
    """Atomically write the score ``record`` a validation gave checkpoint ``path`` after it was written (a step
    checkpoint at the validation's update) into the checkpoint's folder as ``score.json``: it is kept with the
    checkpoint, not only in the folder's ``scores.json`` index, which :func:`scores` completes from it.
    False, and nothing written, where the checkpoint is gone (removed meanwhile: nothing left to score).
    ``durable=False`` skips the fsyncs, as ``with_checkpointing(durable=False)`` does.

    >>> import tempfile, torch
    >>> from loopkit.state import TrainState
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save(TrainState.create(torch.nn.Linear(1, 1)), tmp.name)
    >>> write_late_score(path, {"monitor": "val/loss", "mode": "min", "value": 0.25})
    True
    >>> (path / "score.json").is_file()
    True
    >>> tmp.cleanup()
    """
    raw = json.dumps(dict(record), sort_keys=True).encode()
    try:
        _replace_atomically(Path(path) / LATE_SCORE, lambda f: f.write(raw), durable=durable)
    except FileNotFoundError:
        if Path(path).is_dir():  # (not the checkpoint's absence: a fault of its own)
            raise
        return False
    return True


def write_scores(directory: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Atomically replace ``directory/scores.json`` (written to a temporary, fsynced, renamed).

    The temporary is written under the shared lock a save holds, so a :func:`restore` or :func:`clean`
    of another process never takes it for a crashed save's and removes it.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> write_scores(tmp.name, {"monitor": "val/acc", "mode": "max", "scores": {}})
    >>> sorted(p.name for p in Path(tmp.name).iterdir())
    ['.lock', 'scores.json']
    >>> tmp.cleanup()
    """
    raw = json.dumps(data, indent=1, sort_keys=True).encode()
    with _writer_lock(Path(directory), clean=False):
        _replace_atomically(Path(directory) / SCORES, lambda f: f.write(raw))


def _replace_atomically(path: Path, fill: Callable[[Any], object], durable: bool = True) -> None:
    """Write ``path`` whole or not at all: ``fill`` writes a temporary beside it, fsync, rename, fsync the folder
    (``durable=False``: no fsync)."""
    tmp = path.with_name(f"{_TMP}{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- exporting weights as safetensors ----------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _dtype, _code in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _dtype):
        _SAFETENSORS_DTYPES[getattr(torch, _dtype)] = _code


def export_weights(
    state: TrainState, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the model's weights (its ``state_dict``) to ``path`` in the safetensors format.

    Written by loopkit itself (safetensors is not a dependency): an 8-byte little-endian
    header length, a JSON header with each tensor's dtype, shape and data offsets, then the
    raw little-endian bytes. The file is written atomically (temporary, fsync, rename).
    ``metadata`` (a mapping of str to str) adds string pairs to the header's ``__metadata__``
    (``format``, ``step`` and ``epoch`` are always there).

    Every entry of the ``state_dict`` is written under its own name, tied weights (an
    embedding shared with the output head) under each of theirs, so that the file loads
    strictly into the model as a state dict does:
    ``model.load_state_dict(safetensors.torch.load_file(path))``. safetensors'
    ``load_model(model, path)`` expects a tied tensor under one name alone (as its
    ``save_model`` writes it) and refuses such a file's second name as unexpected: load it
    with ``load_state_dict(load_file(path))``.

    A state that ``with_fsdp`` sharded gives the full weights: every rank must call it (each
    sharded tensor is gathered whole, a collective, into rank 0's CPU memory alone: the other
    ranks hold one whole tensor at a time, never the model), and rank 0 writes the file. Under
    any process group of several ranks (``with_ddp``) only rank 0 writes, as for checkpoints:
    the other ranks check their arguments and return the path without writing (their
    BatchNorm statistics, for one, may differ from rank 0's), at once: a rank that reads the
    file must wait for rank 0 first (``torch.distributed.barrier()``), and a path of each
    rank's own gets rank 0's file alone.

    >>> import json, struct, tempfile, torch
    >>> tmp = tempfile.TemporaryDirectory()
    >>> from loopkit.state import TrainState
    >>> path = export_weights(TrainState.create(torch.nn.Linear(3, 2)), Path(tmp.name) / "model.safetensors")
    >>> raw = path.read_bytes()
    >>> header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    >>> header["weight"]["dtype"], header["weight"]["shape"], header["__metadata__"]["format"]
    ('F32', [2, 3], 'pt')
    >>> tmp.cleanup()
    """
    _require_state("export_weights", state)
    state.check_usable()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_weights: path must be a file path such as 'model.safetensors', got {type(path).__qualname__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_weights: {str(path)!r} is a folder; give a file path, e.g. {str(path / 'model.safetensors')!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"export_weights: the folder {str(path.parent)!r} of {str(path)!r} does not exist")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(
            f"export_weights: metadata must be a mapping of str to str (a dict), got {type(metadata).__qualname__}")
    info: dict[str, Any] = {"format": "pt", "step": str(state.step), "epoch": str(state.epoch)}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"export_weights: metadata must map str to str, got {key!r}: {value!r}")
        info[key] = value
    model = core_module(state.model)
    sd = model.state_dict()
    _refuse_non_tensors(sd)  # (on every rank, before a gather that rank 0 alone would leave)
    if is_sharded(model):  # under with_fsdp: gathered into rank 0's CPU memory alone (a collective), written there
        sd = full(sd, to_rank_zero=True)
        if sd is None:  # (not rank 0)
            return path
    elif _collective.active() and not _collective.is_rank_zero():  # (under DDP each rank's copy: rank 0's is written)
        return path
    tensors = {name: _raw_bytes(name, t) for name, t in sd.items()}
    header: dict[str, Any] = {"__metadata__": info}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data to 8 bytes, as the format recommends

    def fill(f: Any) -> None:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, _, raw in tensors.values():
            f.write(raw.data)

    try:
        _replace_atomically(path, fill)
    except OSError as e:  # named after the path given, not the temporary beside it
        what = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        message = f"export_weights: could not write {str(path)!r}: {what}; nothing was written (no temporary is left)"
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    return path


def _refuse_non_tensors(sd: Mapping[str, Any]) -> None:
    """Raise a TypeError naming every state-dict entry that is not a tensor (safetensors holds tensors only).

    As safetensors' own ``save_file`` does (a ``ValueError`` for the first such key), nothing is
    skipped silently: a file without the entries would not load back into the model.

    >>> _refuse_non_tensors({"weight": torch.zeros(1), "0._extra_state": {"calls": 3}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: export_weights: the model's state_dict entry '0._extra_state' (a dict) is not a tensor; ...
    """
    bad = {name: value for name, value in sd.items() if not isinstance(value, torch.Tensor)}
    if not bad:
        return
    named = ", ".join(f"{name!r} (a {type(value).__qualname__})" for name, value in bad.items())
    entries = "entry" if len(bad) == 1 else "entries"
    verb = "is not a tensor" if len(bad) == 1 else "are not tensors"
    if any(name.endswith("_packed_params") or name.endswith("_packed_params.dtype") for name in bad):
        todo = (
            "a quantized model's packed parameters cannot be stored in safetensors: export the float model "
            "(the state before loopkit.quantized_model) and convert after loading, or keep the quantized one "
            "with torch.save(model.state_dict(), path)"
        )
    else:
        todo = (
            "safetensors holds tensors only, and a file without them would not load back into this model: "
            "save what get_extra_state() returns yourself (e.g. as JSON), or export with a loopkit checkpoint "
            "(loopkit.checkpoint.save), which holds them"
        )
    raise TypeError(f"export_weights: the model's state_dict {entries} {named} {verb}; {todo}")


def _raw_bytes(name: str, tensor: torch.Tensor) -> tuple[str, list[int], np.ndarray]:
    code = _SAFETENSORS_DTYPES.get(tensor.dtype)
    if code is None:
        raise TypeError(f"export_weights: tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
    if tensor.layout != torch.strided:
        raise TypeError(
            f"export_weights: tensor '{name}' has layout {tensor.layout}; only dense tensors can be exported"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover - big-endian hosts
        raw = raw.reshape(-1, flat.element_size())[:, ::-1].copy().reshape(-1)
    return code, list(tensor.shape), raw

