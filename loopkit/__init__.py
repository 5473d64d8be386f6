"""loopkit: training as a pure step function ``(state, batch) -> (state, metrics)``.

>>> import torch, loopkit
>>> model = torch.nn.Linear(2, 1)
>>> state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
>>> step = loopkit.with_grad_clip(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), max_norm=1.0)
>>> state, metrics = step(state, torch.ones(4, 2))
>>> state.step
1
"""

from typing import TYPE_CHECKING

from loopkit.callbacks import Callback, EarlyStopping, EarlyStoppingReason, LearningRateMonitor, Timer
from loopkit.throughput import ThroughputMonitor, measure_flops
from loopkit.checkpoint import export_weights, restore
from loopkit.driver import estimated_stepping_batches, evaluate, predict, run_epochs
from loopkit.errors import CheckpointCorruptError, CheckpointLoadError, DonatedStateError, ImpurityError, NonFiniteError, StateMismatchError
from loopkit.loggers import ConsoleLogger, CSVLogger, JSONLLogger, Logger, TensorBoardLogger
from loopkit.trackers import MLFlowLogger, WandbLogger  # (wandb and mlflow are imported only when a logger starts)
from loopkit.rng import seed_everything
from loopkit.state import TrainState, state_at_error
from loopkit.steps import EvalStep, Step, TrainStep, donate, eval_step, train_step
from loopkit.transforms import ema_state, quantized_model, with_amp, with_checkpointing, with_compile, with_ddp, with_ema, with_epoch_scheduler, with_grad_accum, with_grad_clip, with_grad_norm, with_logging, with_nan_guard, with_profiler, with_pruning, with_qat, with_step_scheduler
from loopkit.transforms import swa_state, with_fsdp, with_swa
from loopkit.transforms import with_grad_hook
from loopkit.tree import to_device
from loopkit.debug import check_purity
from loopkit.summary import ModelSummary, summarize
from loopkit import distributed  # noqa: E402  (an integration: imports the layers above)
from loopkit import ensemble  # noqa: E402  (an integration: imports the layers above)
from loopkit.lr_finder import LRFinderResult, lr_find  # noqa: E402  (an integration: imports the driver)
from loopkit.batch_size_finder import scale_batch_size  # noqa: E402  (an integration: imports the driver)

__version__ = "0.1.0"

if TYPE_CHECKING:  # a type checker sees the module (``loopkit.tune.create_study``); at run time it comes on first use
    from loopkit import tune


def __getattr__(name: str) -> object:
    """``loopkit.tune`` on first use (``from loopkit import *`` too): Optuna, which it needs (the ``tune`` extra), is
    imported only when one of its functions is called."""
    if name == "tune":
        import importlib

        return importlib.import_module("loopkit.tune")
    raise AttributeError(f"module 'loopkit' has no attribute {name!r}")


__all__ = [
    "CSVLogger",
    "Callback",
    "CheckpointCorruptError",
    "CheckpointLoadError",
    "ConsoleLogger",
    "DonatedStateError",
    "EarlyStopping",
    "EarlyStoppingReason",
    "EvalStep",
    "ImpurityError",
    "JSONLLogger",
    "LRFinderResult",
    "LearningRateMonitor",
    "Logger",
    "MLFlowLogger",
    "ModelSummary",
    "NonFiniteError",
    "StateMismatchError",
    "Step",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "Timer",
    "TrainState",
    "TrainStep",
    "WandbLogger",
    "check_purity",
    "distributed",
    "ensemble",
    "donate",
    "estimated_stepping_batches",
    "ema_state",
    "swa_state",
    "eval_step",
    "evaluate",
    "export_weights",
    "lr_find",
    "measure_flops",
    "predict",
    "quantized_model",
    "restore",
    "run_epochs",
    "scale_batch_size",
    "seed_everything",
    "state_at_error",
    "summarize",
    "to_device",
    "train_step",
    "tune",
    "with_amp",
    "with_checkpointing",
    "with_compile",
    "with_ddp",
    "with_fsdp",
    "with_ema",
    "with_epoch_scheduler",
    "with_swa",
    "with_grad_accum",
    "with_grad_clip",
    "with_grad_hook",
    "with_grad_norm",
    "with_logging",
    "with_nan_guard",
    "with_profiler",
    "with_pruning",
    "with_qat",
    "with_step_scheduler",
]
