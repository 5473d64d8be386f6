"""``with_qat``: quantization-aware training with PyTorch's eager-mode QAT (``torch.ao.quantization``).

>>> from loopkit.steps import train_step
>>> with_qat(train_step(lambda m, b: None)).applied
('train_step', 'with_qat')
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from loopkit._numbers import as_int
from loopkit.state import TrainState, copy_model, fork, leave_intact
from loopkit.steps import Metrics, Step, WrapperStep, kept_observers, run_of
from loopkit.transforms._compose import refuse_wrapping, require_step

__all__ = ["QATStep", "is_prepared", "quantized_model", "with_qat"]

_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it moves to torchao; the API still works in torch 2.x."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        yield


def _quantization() -> Any:
    with _quiet():
        import torch.ao.quantization as quantization
    return quantization


def is_prepared(model: nn.Module) -> bool:
    """Whether ``prepare_qat`` ran on ``model``: it holds a QAT module (``torch.ao.nn.qat`` and
    ``torch.ao.nn.intrinsic.qat`` forms, each with its ``weight_fake_quant``) or a fake-quantizer.
    With an observer-only qconfig (``get_default_qconfig``) the QAT modules hold plain observers
    and no fake-quantizer; their classes (and so this answer) survive a checkpoint's restore
    into a template prepared as :meth:`QATStep.prepare` does.

    >>> is_prepared(torch.nn.Linear(2, 2))
    False
    """
    base = _quantization().FakeQuantizeBase
    return any(isinstance(m, base) or isinstance(getattr(m, "weight_fake_quant", None), nn.Module)
               for m in model.modules())


def _observed_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a QAT module's forward fake-quantizes: a fused Conv-BN folds the BatchNorm scale in."""
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    weight = module.weight.detach()
    if isinstance(module, _ConvBnNd):  # as _ConvBnNd._forward_approximate does
        bn = module.bn
        if bn.weight is None or bn.running_var is None:
            return None
        shape = [1] * weight.ndim
        shape[0] = -1
        weight = weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(shape)
    return weight


def _refused(model: nn.Module, qconfig: Any) -> Exception | None:
    """Why QAT cannot start on ``model`` (told before anything changes), else None: a model in eval mode, or a
    floating-point parameter of a module ``prepare_qat`` swaps (:func:`_swapped`, ``qconfig`` as :func:`_prepare`
    takes it) that is not float32 (torch's fake-quantize kernels take float32 alone: a float64, bfloat16 or float16
    layer fails inside them with a bare "expected scalar type Float"; a part QAT leaves alone may be any dtype).

    >>> qconfig = _quantization().get_default_qat_qconfig("x86")
    >>> print(_refused(torch.nn.Sequential(torch.nn.Linear(2, 2)).double(), qconfig))
    with_qat: the model's parameter '0.weight' is torch.float64: fake quantization simulates int8 arithmetic in float32, and its kernels refuse other dtypes; train QAT in float32 (model.float() before with_qat's first call, or that module's qconfig = None to leave it out; nothing changed)
    """
    if not model.training:
        return ValueError("with_qat: the model must be in training mode (model.train()) when QAT starts")
    for prefix, module in _swapped(model, qconfig):
        for name, param in module.named_parameters(prefix):
            if param.is_floating_point() and param.dtype != torch.float32:
                return TypeError(
                    f"with_qat: the model's parameter {name!r} is {param.dtype}: fake quantization simulates int8 "
                    "arithmetic in float32, and its kernels refuse other dtypes; train QAT in float32 (model.float() "
                    "before with_qat's first call, or that module's qconfig = None to leave it out; nothing changed)"
                )
    return None


def _swapped(model: nn.Module, qconfig: Any) -> Iterator[tuple[str, nn.Module]]:
    """The modules ``prepare_qat`` fake-quantizes, by name, by torch's rules: a module's ``qconfig`` attribute (None
    too) overrides its parent's; one of a class in the default QAT mapping with a qconfig is swapped whole, and a leaf
    of a class torch quantizes (``get_default_qconfig_propagation_list``: a ``LayerNorm``, a ``ReLU``) with a qconfig
    gets an output fake-quantizer. ``qconfig``: the model's (:func:`_prepare` sets it; None: the model's own).

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Linear(2, 1))
    >>> model[2].qconfig = None
    >>> [name for name, _ in _swapped(model, _quantization().get_default_qat_qconfig("x86"))]
    ['0', '1']
    """
    quantization = _quantization()
    mapping = quantization.get_default_qat_module_mappings()
    observed = quantization.get_default_qconfig_propagation_list()

    def walk(prefix: str, module: nn.Module, own: Any) -> Iterator[tuple[str, nn.Module]]:
        kind = type_before_parametrizations(module)
        leaf = not any(True for _ in module.named_children())
        if own is not None and (kind in mapping or (leaf and kind in observed and kind is not nn.Sequential)):
            yield prefix, module
            return
        for name, child in module.named_children():
            yield from walk(f"{prefix}.{name}" if prefix else name, child, getattr(child, "qconfig", own))

    yield from walk("", model, qconfig if qconfig is not None else getattr(model, "qconfig", None))


def _prepare(model: nn.Module, qconfig: Any) -> None:
    """``prepare_qat`` in place, then every weight fake-quantizer observes its weight once, so that
    the per-channel scales have their final shapes before any checkpoint (a fresh template
    prepared the same way then loads a trained one). The first training forward observes the
    same weight again, which leaves a moving-average observer's values as they are. A plain weight
    observer (an observer-only qconfig) is left to its first forward, as in a raw loop: it has no
    scale buffer, and its ranges are resized as a checkpoint loads. ``qconfig`` None keeps a
    ``qconfig`` the model already has."""
    quantization = _quantization()
    refused = _refused(model, qconfig)
    if refused is not None:
        raise refused
    # the QAT modules are built by their float classes' __init__, whose weight init draws from
    # torch's global RNG (then the trained weights replace it): the caller's RNG is put back
    with _quiet(), torch.random.fork_rng(devices=[]):
        if qconfig is not None:
            model.qconfig = qconfig
        quantization.prepare_qat(model, inplace=True)
        found = False
        with torch.no_grad():
            for module in model.modules():
                fake_quant = getattr(module, "weight_fake_quant", None)
                if fake_quant is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                    found = True
                    weight = _observed_weight(module)
                    if weight is not None and isinstance(fake_quant, quantization.FakeQuantizeBase):
                        fake_quant(weight)
    if not found:
        raise ValueError(
            "with_qat: the model has no module that eager-mode QAT quantizes (nn.Linear, nn.Conv1d/2d/3d, "
            "and their fused forms)"
        )


@attrs.frozen(eq=False)
class QATStep(WrapperStep):
    """The step :func:`with_qat` returns: prepares the model for QAT on its first call, then trains it.

    >>> from loopkit.steps import as_step
    >>> QATStep(as_step(lambda s, b: (s, {}))).name
    'with_qat'
    """

    backend: str = "x86"
    qconfig: Any = None
    #: transforms that can go neither inside nor around this one, and why
    refused_inside = {
        "with_amp": "fake quantization simulates int8 arithmetic in float32, and its kernels refuse the "
        "float16/bfloat16 activations autocast makes; train QAT in float32",
    }
    freeze_observers_after: int | None = None
    freeze_bn_after: int | None = None

    @property
    def name(self) -> str:
        return "with_qat"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """What decides the fake quantization and when its observers and BatchNorm statistics freeze: a rank with
        others would compute its gradients through another forward than the others' (see
        :attr:`loopkit.steps.Step.rank_agreed`; a ``qconfig`` given is not compared)."""
        return {"backend": self.backend, "freeze_observers_after": self.freeze_observers_after,
                "freeze_bn_after": self.freeze_bn_after}

    @property
    def changes_state(self) -> bool:  # type: ignore[override]
        return True  # the first call changes the model's modules

    def _qconfig(self, model: nn.Module) -> Any:
        """This step's ``qconfig``; else the one the model has; else ``backend``'s default (None: keep the model's)."""
        if self.qconfig is not None:
            return self.qconfig
        if any(getattr(module, "qconfig", None) is not None for module in model.modules()):
            return None  # (one set on a submodule alone quantizes that part alone, as prepare_qat does)
        with _quiet():
            return _quantization().get_default_qat_qconfig(self.backend)

    def prepare(self, state: TrainState) -> TrainState:
        """A copy of ``state`` with its model prepared as this step prepares it (``state`` unchanged).

        For a template to restore a QAT checkpoint into: ``restore(step.prepare(template), dir)``,
        with ``step`` this one or any pipeline around it (:meth:`loopkit.Step.prepare`).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> is_prepared(with_qat(lambda s, b: (s, {})).prepare(state).model), is_prepared(state.model)
        (True, False)
        """
        new = fork(state)
        if not is_prepared(new.model):
            _prepare(new.model, self._qconfig(new.model))
        return self.inner.prepare(new)

    def run_(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        model = state.model
        if not is_prepared(model):  # the first call (a restored QAT checkpoint's template is prepared already)
            refused = _refused(model, self._qconfig(model))
            if refused is None and self._observers_frozen(state.step):
                refused = self._never_observed(state.step)
            if refused is not None:
                raise leave_intact(refused, state)
            # in place: the state now holds the prepared model, whole, also for an error of the inner step
            _prepare(model, self._qconfig(model))
        self._freeze(model, state.step)
        if self._observers_frozen(state.step):
            # plain observers (an observer-only qconfig) have no switch: their buffers are put back after the call
            with kept_observers(model.modules()):
                return run_of(self.inner)(state, batch)
        return run_of(self.inner)(state, batch)

    def _observers_frozen(self, step: int) -> bool:
        return self.freeze_observers_after is not None and step >= self.freeze_observers_after

    def _never_observed(self, step: int) -> ValueError:
        """The error for observers frozen from the call that prepares the model: no range would ever be observed."""
        return ValueError(
            f"with_qat: freeze_observers_after={self.freeze_observers_after} freezes the observers from this call "
            f"(state.step={step}) on, and this call prepares the model: its observers would never record a range "
            "(the activations fake-quantized with the observers' initial scales, never the data's); give "
            f"freeze_observers_after > {step} (at least one update observed), or prepare and calibrate the model "
            "first (torch.ao.quantization.prepare_qat, then forwards with the observers on), which with_qat takes as "
            "it is"
        )

    def _freeze(self, model: nn.Module, step: int) -> None:
        quantization = _quantization()
        if self._observers_frozen(step):
            model.apply(quantization.disable_observer)
        if self.freeze_bn_after is not None and step >= self.freeze_bn_after:
            from torch.ao.nn.intrinsic.qat import freeze_bn_stats

            model.apply(freeze_bn_stats)


def with_qat(
    step: Any,
    *,
    backend: str = "x86",
    qconfig: Any = None,
    freeze_observers_after: int | None = None,
    freeze_bn_after: int | None = None,
) -> Step:
    """Quantization-aware training: the model trains through fake quantization of its weights and activations.

    On its first call the step prepares the state's model with PyTorch's eager-mode
    ``torch.ao.quantization.prepare_qat`` and your ``qconfig`` (else the ``qconfig`` already set
    on the model or its submodules, else ``get_default_qat_qconfig(backend)``): ``nn.Linear`` and ``nn.Conv`` modules become their QAT forms, which share
    the original parameters (the optimizer keeps them) and add fake-quantizers whose scales
    and observers are buffers of the model, so purity, checkpoints and DDP cover them. Fuse
    Conv-BN-ReLU first (``torch.ao.quantization.fuse_modules_qat``) as PyTorch's QAT recipe
    says, and put ``QuantStub``/``DeQuantStub`` around what should run quantized to convert
    the result with :func:`quantized_model`. An observer-only ``qconfig``
    (``get_default_qconfig(backend)``, what Lightning 1.x's ``QuantizationAwareTraining(observer_type="histogram")``
    sets) is prepared once too: the model then trains in float while plain observers record the
    ranges that :func:`quantized_model` converts with. From the call whose ``state.step`` is
    ``freeze_observers_after`` on (that many updates done), the quantization ranges stop moving
    (``torch.ao.quantization.disable_observer`` before that call's forward; a plain observer, which
    torch gives no switch, observes and has its buffers put back after the call); a model that the
    call freezing them would prepare is refused (its observers would never record a range): a
    ``freeze_observers_after`` of 0 is for a model prepared and calibrated before (``prepare_qat``,
    then forwards with the observers on), which this step takes as it is; from the call whose
    ``state.step`` is ``freeze_bn_after`` on, fused BatchNorm running statistics freeze
    (``freeze_bn_stats``). To restore a checkpoint, prepare the template the same way:
    ``restore(step.prepare(template), directory)``, where ``step`` is this step or any
    pipeline built around it (an unprepared template is refused: a ``StateMismatchError`` that says so). A checkpoint
    without QAT's buffers (a plain run's, or one saved before this step's first call) goes into the unprepared
    template, whose model this step prepares at its first call (a prepared template refuses it, saying so).

    The model trains in float32 (torch's fake-quantize kernels take no other dtype): a model with a float64,
    bfloat16 or float16 parameter is refused at the first call (a ``TypeError`` naming the parameter and its dtype,
    before anything changes), as ``with_amp`` is refused around or inside this step.

    ``torch.ao.quantization`` is deprecated in favour of torchao (it still works in torch
    2.x); its deprecation warnings are silenced inside this step.

    >>> import torch
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_qat(train_step(lambda m, b: m(b).pow(2).mean()))
    >>> new, _ = step(state, torch.randn(16, 4))
    >>> is_prepared(new.model), is_prepared(state.model)
    (True, False)
    """
    if backend not in _BACKENDS:
        raise ValueError(f"with_qat: backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if qconfig is not None and not (hasattr(qconfig, "activation") and hasattr(qconfig, "weight")):
        raise TypeError(
            "with_qat: qconfig must be a torch.ao.quantization.QConfig (e.g. get_default_qat_qconfig('x86')) or None, "
            f"got {type(qconfig).__qualname__}"
        )
    for name, value in (("freeze_observers_after", freeze_observers_after), ("freeze_bn_after", freeze_bn_after)):
        if value is not None and (as_int(value) is None or as_int(value) < 0):
            raise ValueError(f"with_qat: {name} must be a non-negative int (an update count) or None, got {value!r}")
    freeze_observers_after, freeze_bn_after = (None if v is None else as_int(v) for v in (freeze_observers_after, freeze_bn_after))
    inner = require_step(step, "with_qat", no_eval="an eval_step does not train; evaluate the QAT model with eval_step as it is")
    refuse_wrapping(inner, "with_qat", {"with_qat": "the model is prepared once; apply with_qat once"})
    if "with_amp" in inner.applied:  # torch's fake-quantize kernels take float32 only
        raise TypeError(f"with_qat cannot wrap with_amp: {QATStep.refused_inside['with_amp']}")
    return QATStep(inner, backend=backend, qconfig=qconfig, freeze_observers_after=freeze_observers_after,
                   freeze_bn_after=freeze_bn_after)


def quantized_model(state: TrainState) -> nn.Module:
    """An int8 copy of a QAT-trained ``state.model`` for inference (``torch.ao.quantization.convert``).

    The model needs ``QuantStub``/``DeQuantStub`` where its quantized part starts and ends
    (eager mode quantizes between them). ``state`` is unchanged: its model is copied as ``copy.deepcopy(state)``
    copies it (:func:`loopkit.state.copy_model`), so a model with the hook-based ``torch.nn.utils.weight_norm`` or
    ``spectral_norm``, which ``copy.deepcopy(model)`` refuses, converts too.

    >>> import torch
    >>> from torch.ao.quantization import QuantStub, DeQuantStub
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Sequential(QuantStub(), torch.nn.Linear(4, 2), DeQuantStub())
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> state, _ = with_qat(train_step(lambda m, b: m(b).pow(2).mean()))(state, torch.randn(8, 4))
    >>> int8 = quantized_model(state)
    >>> type(int8[1]).__module__, int8(torch.randn(3, 4)).shape
    ('torch.ao.nn.quantized.modules.linear', torch.Size([3, 2]))
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"quantized_model: give the TrainState that with_qat trained, got {type(state).__qualname__}")
    if not is_prepared(state.model):
        raise ValueError("quantized_model: the state's model was not trained with with_qat (no QAT modules: "
                         "prepare_qat never ran on it)")
    from torch.ao.quantization import QuantStub

    if not any(isinstance(module, QuantStub) for module in state.model.modules()):
        raise ValueError(
            "quantized_model: the model has no QuantStub, so its int8 layers would be given float inputs (torch then "
            "fails at the first call: \"Could not run 'quantized::linear' ... from the 'CPU' backend\"); put "
            "torch.ao.quantization.QuantStub() where the quantized part starts and DeQuantStub() where it ends (or "
            "wrap the model: torch.ao.quantization.QuantWrapper(model)) before with_qat"
        )
    with _quiet():  # (loopkit's copy: torch's deep copy refuses the hook-based weight_norm and spectral_norm)
        return _quantization().convert(copy_model(state.model).eval(), inplace=True)
