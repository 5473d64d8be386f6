"""Transforms: ``with_x(step, **options) -> step``.

>>> from loopkit.transforms import with_amp, with_ema, with_grad_accum, with_grad_clip, with_logging, with_nan_guard
"""

from loopkit.transforms.amp import with_amp
from loopkit.transforms.checkpointing import with_checkpointing
from loopkit.transforms.compiling import with_compile
from loopkit.transforms.ddp import with_ddp
from loopkit.transforms.ema import ema_state, with_ema
from loopkit.transforms.fsdp import with_fsdp
from loopkit.transforms.epoch_scheduler import with_epoch_scheduler
from loopkit.transforms.grad_accum import with_grad_accum
from loopkit.transforms.grad_clip import with_grad_clip
from loopkit.transforms.grad_hook import with_grad_hook
from loopkit.transforms.grad_norm import with_grad_norm
from loopkit.transforms.logging import with_logging
from loopkit.transforms.nan_guard import with_nan_guard
from loopkit.transforms.profiler import with_profiler
from loopkit.transforms.pruning import with_pruning
from loopkit.transforms.qat import quantized_model, with_qat
from loopkit.transforms.step_scheduler import with_step_scheduler
from loopkit.transforms.swa import swa_state, with_swa

__all__ = [
    "ema_state",
    "swa_state",
    "with_amp",
    "with_checkpointing",
    "with_compile",
    "with_ddp",
    "with_ema",
    "with_epoch_scheduler",
    "with_fsdp",
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
    "with_swa",
    "quantized_model",
]
