"""Shared pieces of the benchmark scripts: workloads, in-memory data, the loss, process setup.

A workload is an MLP trained with Adam on synthetic classification batches held in memory
as a list of ``(x, y)`` tensors, so that no benchmark measures a data pipeline.

>>> w = WORKLOADS["tiny"]
>>> batches = w.batches(3)
>>> len(batches), tuple(batches[0][0].shape), tuple(w.model()(batches[0][0]).shape)
(3, (32, 32), (32, 10))
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WORKLOADS",
    "Batches",
    "Workload",
    "loss_fn",
    "machine_info",
    "peak_rss_kb",
    "pin_mmap_threshold",
    "quiet_frameworks",
    "release_free_memory",
    "reset_peak_rss",
    "rss_kb",
    "setup_process",
]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """An MLP ``dims[0] -> ... -> dims[-1]`` (ReLU between layers), its batch size, Adam's lr.

    >>> Workload("x", (4, 8, 2), 16).describe()
    'MLP 4-8-2, batch 16, Adam(lr=0.001), cross-entropy'
    """

    name: str
    dims: tuple[int, ...]
    batch_size: int
    lr: float = 1e-3

    def model(self, seed: int = 0) -> nn.Sequential:
        """The model, initialised from ``seed`` (the caller's global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for i, (fan_in, fan_out) in enumerate(zip(self.dims, self.dims[1:])):
                if i:
                    layers.append(nn.ReLU())
                layers.append(nn.Linear(fan_in, fan_out))
            return nn.Sequential(*layers)

    def optimizer(self, model: nn.Module) -> torch.optim.Adam:
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def batches(self, count: int, *, pool: int = 64, seed: int = 1) -> list[Batch]:
        """``count`` batches cycling over ``min(count, pool)`` distinct random ones."""
        gen = torch.Generator().manual_seed(seed)
        distinct = [
            (
                torch.randn(self.batch_size, self.dims[0], generator=gen),
                torch.randint(0, self.dims[-1], (self.batch_size,), generator=gen),
            )
            for _ in range(max(1, min(count, pool)))
        ]
        return [distinct[i % len(distinct)] for i in range(count)]

    def describe(self) -> str:
        dims = "-".join(str(d) for d in self.dims)
        return f"MLP {dims}, batch {self.batch_size}, Adam(lr={self.lr:g}), cross-entropy"


WORKLOADS: dict[str, Workload] = {
    "tiny": Workload("tiny", (32, 64, 64, 10), 32),
    "small": Workload("small", (784, 256, 256, 10), 64),
}


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loopkit ``loss_fn``: cross-entropy of ``model(x)`` against ``y``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


class Batches:
    """An iterable over a list of batches that is not itself a list.

    Lightning reads a plain list passed as ``train_dataloaders`` as a *collection of
    loaders*; wrapped, it iterates the very same list, so the data path is the raw loop's.

    >>> list(Batches([1, 2])), len(Batches([1, 2]))
    ([1, 2], 2)
    """

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def setup_process(threads: int = 1) -> None:
    """One intra-op thread, and the frameworks' info lines, tips and warnings silenced."""
    torch.set_num_threads(threads)
    os.environ.setdefault("POSSIBLE_USER_WARNING", "off")  # Lightning's switch for PossibleUserWarning
    for module in (r"lightning(_fabric|_utilities)?(\..*)?", r"pytorch_lightning(\..*)?", r"ignite(\..*)?"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch pytree deprecation, raised inside Lightning
    quiet_frameworks()


def quiet_frameworks() -> None:
    """Raise the frameworks' loggers to ERROR; call again after importing Lightning (it resets them)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning", "ignite"):
        logging.getLogger(name).setLevel(logging.ERROR)


def pin_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mmap (glibc ``mallopt``).

    A fixed threshold turns off glibc's dynamic one, so that freed tensor memory goes back
    to the OS at once and a peak RSS reflects the memory that was live, not heap
    fragmentation (which otherwise moves it by a MiB or more from run to run). False where
    unsupported.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info() -> dict[str, str]:
    """The machine and library versions, for the header of a benchmark report."""
    return {
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical CPUs)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "loopkit": _version("loopkit"),
        "lightning": _version("lightning"),
        "pytorch-ignite": _version("pytorch-ignite"),
        "os": platform.platform(),
        "load average (1, 5, 15 min)": _load(),
    }


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# --- resident memory (Linux /proc; ru_maxrss elsewhere) -------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kb() -> int:
    """The current resident set size in KiB."""
    value = _status_kb("VmRSS")
    if value is not None:
        return value
    return peak_rss_kb()


def peak_rss_kb() -> int:
    """The peak resident set size in KiB (since the last :func:`reset_peak_rss` on Linux)."""
    value = _status_kb("VmHWM")
    if value is not None:
        return value
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak
