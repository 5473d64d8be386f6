"""The SPEC's Errors rule across the public names: a mistake a Lightning user makes gets an error
naming what was wrong and where, before anything is lost (the state stays usable).

The references are the mistakes themselves: each case passes before the input is fixed and
fails in the named way with it; each case was an internal traceback, a late failure or a silent
acceptance before.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loopkit
from loopkit import TrainState, eval_step, evaluate, predict, run_epochs, train_step
from tests._driver_helpers import make_data, make_state, mse


def _metric(m, b):
    return {"mse": mse(m, b)}


# --- the state -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (lambda: {"model": nn.Linear(3, 1)}, ValueError, "evolve: optimizer param_groups.*not a parameter of the model"),
        (lambda: {"optimizer": torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1)}, ValueError, "not a parameter"),
        (lambda: {"model": None}, TypeError, "evolve: model must be a torch.nn.Module"),
        (lambda: {"rng": None}, TypeError, "evolve: rng must be a mapping"),
        (lambda: {"step": "3"}, ValueError, "evolve: step must be a non-negative int"),
        (lambda: {"epoch": -1}, ValueError, "evolve: epoch must be a non-negative int"),
        (lambda: {"bogus": 1}, TypeError, "evolve: no field 'bogus'"),
    ],
    ids=["model", "optimizer", "none-model", "rng", "step", "epoch", "unknown"],
)
def test_evolve_checks_what_create_checks(changes, error, match):
    """Before, a new model with the old optimizer trained nothing, silently."""
    state = make_state()
    with pytest.raises(error, match=match):
        state.evolve(**changes())
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    assert state.evolve(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).model is model


# --- steps and what they return ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda s, b: s, "returned a TrainState; a step returns \\(new_state, metrics\\)"),
        (lambda s, b: ({}, s), "returned a \\(dict, TrainState\\) pair"),
        (lambda s, b: (s, torch.ones(())), "returned a \\(TrainState, Tensor\\) pair"),
        (lambda m, b: {"mse": torch.ones(())}, "returned a dict.*pass eval_step\\(metric_fn\\)"),
    ],
    ids=["state-only", "swapped", "tensor-metrics", "metric_fn"],
)
def test_a_function_step_returning_the_wrong_shape_is_named(fn, match):
    with pytest.raises(TypeError, match=match):
        evaluate(fn, make_state(), make_data(2))


def test_a_loss_fn_given_as_the_step_is_named_and_the_state_is_kept():
    state = make_state()
    with pytest.raises(TypeError, match="called the TrainState as a model.*train_step\\(loss_fn\\)"):
        run_epochs(mse, state, make_data(2), epochs=1, progress=False)
    state.check_usable()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: train_step(lambda batch: batch), "train_step: loss_fn must take \\(model, batch\\); .*<lambda>\\(batch\\) cannot"),
        (lambda: train_step(lambda m, x, y: x), "train_step: loss_fn must take \\(model, batch\\).*missing"),
        (lambda: eval_step(lambda batch: {}), "eval_step: metric_fn must take \\(model, batch\\)"),
        (lambda: predict(lambda batch: batch, make_state(), make_data(1)), "predict: fn must take \\(model, batch\\)"),
    ],
    ids=["one-arg", "three-args", "metric_fn", "predict"],
)
def test_a_function_of_the_wrong_signature_is_refused_when_the_step_is_built(build, match):
    with pytest.raises(TypeError, match=match):
        build()


# --- run_epochs' arguments ----------------------------------------------------------------------------


class _LightningNamed:
    def on_train_epoch_end(self, trainer, module):
        pass


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(callbacks=[loopkit.EarlyStopping]), TypeError, "callbacks\\[0\\] is the class EarlyStopping; pass an instance"),
        (dict(callbacks=["x"]), TypeError, "callbacks\\[0\\] \\(str\\) has none of the hooks"),
        (dict(callbacks=[_LightningNamed()]), TypeError, "rename on_train_epoch_end -> on_epoch_end"),
        (dict(donate="no"), TypeError, "donate must be True or False"),
        (dict(progress="no"), TypeError, "progress must be True or False"),
        (dict(val=(train_step(mse), make_data(2))), TypeError, "val's step is a train_step"),
        (dict(step=eval_step(_metric)), TypeError, "the step is an eval_step, which updates nothing"),
        (dict(val=(eval_step(_metric), [])), ValueError, "val's data is empty"),
        (dict(val_every_n_steps=2), ValueError, "val_every_n_steps=2 without val"),
        (dict(val=(eval_step(_metric), (b for b in make_data(2)))), TypeError, "val's data is an iterator"),
        (dict(train_data=None), TypeError, "train_data must be an iterable of batches"),
        (dict(state=nn.Linear(3, 1)), TypeError, "state must be a loopkit.TrainState, got Linear: wrap the model"),
        # a Dataset class (it has __getitem__) and an nn.Sequential (it has __iter__) would pass as data
        (dict(train_data=torch.utils.data.TensorDataset), TypeError,
         "run_epochs: train_data is the class TensorDataset, not data: pass an instance, a DataLoader, or a function"),
        (dict(val=(eval_step(_metric), {"a": torch.utils.data.TensorDataset})), TypeError,
         r"run_epochs: val's data\['a'\] is the class TensorDataset, not data"),
        (dict(train_data=nn.Sequential(nn.Linear(3, 1))), TypeError,
         r"run_epochs: train_data is a torch Module \(Sequential\), not data: the order is"),
        (dict(val=(eval_step(_metric), nn.Sequential(nn.Linear(3, 1)))), TypeError,
         r"run_epochs: val's data is a torch Module \(Sequential\), not data"),
    ],
    ids=["class", "str", "lightning-hook", "donate", "progress", "train-step-val", "eval-step-train", "empty-val",
         "val-steps-without-val", "val-generator", "no-data", "model", "data-class", "val-data-class",
         "data-sequential", "val-data-sequential"],
)
def test_run_epochs_refuses_misused_arguments_before_any_step(options, error, match):
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        return mse(m, b)

    state = make_state()
    kwargs = dict(step=train_step(loss_fn), state=state, train_data=make_data(2), epochs=1, progress=False)
    kwargs.update(options)
    with pytest.raises(error, match=match):
        run_epochs(**kwargs)
    assert calls == []
    state.check_usable()


def test_run_epochs_takes_callbacks_none_as_no_callbacks_as_lightning_does():
    """Lightning's Trainer(callbacks=None), its default, means none; it was refused. Reference: the same fit with
    callbacks=() (bitwise the same parameters and history). A non-list is still refused."""
    fits = [run_epochs(train_step(mse), make_state(), make_data(3), epochs=2, callbacks=callbacks, progress=False)
            for callbacks in (None, ())]
    (state, history), (ref, ref_history) = fits
    assert history == ref_history and state.step == ref.step == 6
    assert all(torch.equal(a, b) for a, b in zip(state.model.parameters(), ref.model.parameters()))
    with pytest.raises(TypeError, match="callbacks must be a list of callbacks, got int"):
        run_epochs(train_step(mse), make_state(), make_data(3), epochs=1, callbacks=5, progress=False)


# --- callbacks ported from Lightning -----------------------------------------------------------------

# Lightning 2.6.6's Callback hooks that loopkit never calls (read off lightning/pytorch/callbacks/callback.py; its
# on_fit_start, on_fit_end, on_validation_end, state_dict and load_state_dict are loopkit's names too), each with
# what the refusal must say: the loopkit hook to rename it to, or that there is none
_LIGHTNING_ONLY = {
    "setup": "rename setup -> on_fit_start", "teardown": "rename teardown -> on_fit_end",
    "on_train_start": "rename on_train_start -> on_fit_start", "on_train_end": "rename on_train_end -> on_fit_end",
    "on_train_epoch_start": "rename on_train_epoch_start -> on_epoch_start",
    "on_train_epoch_end": "rename on_train_epoch_end -> on_epoch_end",
    "on_train_batch_start": "rename on_train_batch_start -> on_batch_start",
    "on_train_batch_end": "rename on_train_batch_end -> on_batch_end",
    "on_validation_epoch_end": "rename on_validation_epoch_end -> on_validation_end",
    **{name: f"{name}: no loopkit hook" for name in (
        "on_sanity_check_start", "on_sanity_check_end", "on_validation_start", "on_validation_epoch_start",
        "on_validation_batch_start", "on_validation_batch_end", "on_test_start", "on_test_end",
        "on_test_epoch_start", "on_test_epoch_end", "on_test_batch_start", "on_test_batch_end", "on_predict_start",
        "on_predict_end", "on_predict_epoch_start", "on_predict_epoch_end", "on_predict_batch_start",
        "on_predict_batch_end", "on_exception", "on_save_checkpoint", "on_load_checkpoint", "on_before_backward",
        "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")},
}


def _hook(calls: list[str], name: str):
    def hook(self, *args):
        calls.append(name)
    return hook


def _fit_refused(callback, match: str) -> str:
    """``run_epochs`` with ``callback`` raises a TypeError matching ``match`` before any step or hook runs, the
    state still usable; the message."""
    steps, state = [], make_state()

    def loss_fn(m, b):
        steps.append(1)
        return mse(m, b)

    with pytest.raises(TypeError, match=match) as caught:
        run_epochs(train_step(loss_fn), state, make_data(2), epochs=1, callbacks=[callback], progress=False)
    assert steps == []
    state.check_usable()
    return str(caught.value)


@pytest.mark.parametrize("name", sorted(_LIGHTNING_ONLY))
def test_a_callback_subclass_defining_a_lightning_named_hook_is_refused_naming_it(name):
    """Before: a loopkit.Callback subclass (it has every loopkit hook, inherited) with a hook under Lightning's name
    ran, the hook never called, with no word. Reference: the hook's own record of its calls, and Lightning 2.6.6's
    Callback's hook names above."""
    calls: list[str] = []
    ported = type("Ported", (loopkit.Callback,), {name: _hook(calls, name)})()
    message = _fit_refused(ported, "callbacks\\[0\\] \\(Ported\\) defines hooks under Lightning's names")
    assert _LIGHTNING_ONLY[name] in message
    assert calls == []


def test_every_lightning_named_hook_of_a_ported_callback_is_named_with_its_loopkit_name():
    calls: list[str] = []

    class Ported(loopkit.Callback):  # a Lightning callback ported by changing its base class
        on_train_epoch_end = _hook(calls, "on_train_epoch_end")
        on_train_batch_end = _hook(calls, "on_train_batch_end")
        on_exception = _hook(calls, "on_exception")

    message = _fit_refused(Ported(), "rename on_train_epoch_end -> on_epoch_end")
    assert "rename on_train_batch_end -> on_batch_end" in message
    assert "on_exception: no loopkit hook (wrap run_epochs in try/except)" in message
    assert calls == []


def test_a_plain_callback_with_one_loopkit_hook_and_lightning_named_ones_is_refused():
    """Before: the check for Lightning's names ran only for an object with none of loopkit's hooks."""
    calls: list[str] = []

    class Half:
        on_batch_end = _hook(calls, "on_batch_end")
        on_train_epoch_end = _hook(calls, "on_train_epoch_end")
        on_validation_epoch_end = _hook(calls, "on_validation_epoch_end")

    message = _fit_refused(Half(), "rename on_train_epoch_end -> on_epoch_end")
    assert "rename on_validation_epoch_end -> on_validation_end" in message
    assert calls == []


def test_a_lightning_named_hook_set_on_the_instance_is_refused():
    callback = loopkit.Callback()
    callback.on_train_batch_end = lambda *args: None
    _fit_refused(callback, "rename on_train_batch_end -> on_batch_end")


def test_a_callback_written_for_both_trainers_runs_with_a_warning_naming_what_loopkit_never_calls():
    """A class defining Lightning's on_train_epoch_end beside loopkit's on_epoch_end serves both trainers: it runs,
    its loopkit hook called each epoch, and a warning names the Lightning-named hooks loopkit never calls."""
    calls: list[str] = []

    class Both:
        on_epoch_end = _hook(calls, "on_epoch_end")
        on_train_epoch_end = _hook(calls, "on_train_epoch_end")
        on_exception = _hook(calls, "on_exception")

    with pytest.warns(UserWarning, match="run_epochs never calls on_train_epoch_end, on_exception") as caught:
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=[Both()], progress=False)
    assert calls == ["on_epoch_end", "on_epoch_end"]
    assert "on_train_epoch_end beside on_epoch_end" in str(caught[0].message)


def test_a_callback_for_both_trainers_missing_one_loopkit_hook_is_refused():
    """Its on_train_batch_end has no on_batch_end beside it: that one is a port left half done."""

    class Both:
        on_epoch_end = _hook([], "on_epoch_end")
        on_train_epoch_end = _hook([], "on_train_epoch_end")
        on_train_batch_end = _hook([], "on_train_batch_end")

    _fit_refused(Both(), "rename on_train_epoch_end -> on_epoch_end; rename on_train_batch_end -> on_batch_end")


class _LightningBase:
    """A stand-in for Lightning's Callback (tests do not import lightning): every hook, a no-op of its module."""

    __module__ = "lightning.pytorch.callbacks.callback"


for _name in _LIGHTNING_ONLY:
    setattr(_LightningBase, _name, _hook([], _name))


def test_the_lightning_named_hooks_of_a_lightning_base_class_are_not_the_callbacks_own():
    calls: list[str] = []

    class Mixed(loopkit.Callback, _LightningBase):
        on_epoch_end = _hook(calls, "on_epoch_end")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Mixed()], progress=False)
    assert calls == ["on_epoch_end"]

    class Ported(loopkit.Callback, _LightningBase):
        on_train_epoch_end = _hook(calls, "on_train_epoch_end")

    message = _fit_refused(Ported(), "rename on_train_epoch_end -> on_epoch_end")
    assert "on_exception" not in message  # (the base's, not the class's own)


def _lightning_hook(name: str):
    """A hook as Lightning's Callback has it: ``(trainer, pl_module)``, recording its calls on the object."""
    def hook(self, trainer, pl_module):
        self.calls.append(name)
    return hook


def _state_dict(self):
    self.calls.append("state_dict")
    return {}


def _load_state_dict(self, state_dict):
    self.calls.append("load_state_dict")


def _stand_in(module: str, name: str, base: type = object, **more) -> type:
    """A stand-in for a Lightning callback class (tests do not import lightning): its ``__module__`` is
    Lightning's, its hooks sharing loopkit's names (``on_fit_start``, ``on_fit_end``, ``on_validation_end``,
    ``state_dict``, ``load_state_dict``) take Lightning 2.6.6's arguments; each records its calls on the object."""
    hooks = {hook: _lightning_hook(hook) for hook in ("on_fit_start", "on_fit_end", "on_validation_end")}
    cls = type(name, (base,), {"__module__": module, "__init__": lambda self: setattr(self, "calls", []),
                               "state_dict": _state_dict, "load_state_dict": _load_state_dict, **hooks, **more})
    return cls


def _lightning_only_hook(name: str):
    def hook(self, trainer, pl_module, *args):
        self.calls.append(name)
    return hook


# Lightning 2.6.6's Callback: every hook of its (those of loopkit's names above, and the others)
_PLCallback = _stand_in("lightning.pytorch.callbacks.callback", "Callback",
                        **{name: _lightning_only_hook(name) for name in _LIGHTNING_ONLY})
_PLEarlyStopping = _stand_in("lightning.pytorch.callbacks.early_stopping", "EarlyStopping", _PLCallback)
_PLModelCheckpoint = _stand_in("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint", _PLCallback)
_PLLearningRateMonitor = _stand_in("lightning.pytorch.callbacks.lr_monitor", "LearningRateMonitor", _PLCallback)
_OldEarlyStopping = _stand_in("pytorch_lightning.callbacks.early_stopping", "EarlyStopping",
                              _stand_in("pytorch_lightning.callbacks.callback", "Callback"))


class _MyFitStart(_PLCallback):
    """A bare subclass of Lightning's Callback that overrides only a hook loopkit shares the name of."""

    def on_fit_start(self, trainer, pl_module):
        self.calls.append("own on_fit_start")


class _MyEarlyStopping(_OldEarlyStopping):
    pass


_FabricThing = _stand_in("lightning_fabric.utilities.thing", "Thing")


@pytest.mark.parametrize("make, match", [
    (_PLEarlyStopping, r"callbacks\[0\] \(EarlyStopping\) is Lightning's lightning\.pytorch\.callbacks\.early_stopping"
                       r"\.EarlyStopping, whose hooks take \(trainer, pl_module\).*use loopkit\.EarlyStopping\("),
    (_PLModelCheckpoint, r"\(ModelCheckpoint\) is Lightning's .*use loopkit\.with_checkpointing\(step, directory"),
    (_PLLearningRateMonitor, r"\(LearningRateMonitor\) is Lightning's .*use loopkit\.LearningRateMonitor\(\)"),
    (_PLCallback, r"\(Callback\) is Lightning's lightning\.pytorch\.callbacks\.callback\.Callback.*"
                  r"port it to loopkit's hooks .*docs/from_lightning\.md"),
    (_MyFitStart, r"\(_MyFitStart\) derives from Lightning's lightning\.pytorch\.callbacks\.callback\.Callback.*"
                  r"docs/from_lightning\.md"),
    (_MyEarlyStopping, r"\(_MyEarlyStopping\) derives from Lightning's pytorch_lightning\.callbacks\.early_stopping"
                       r"\.EarlyStopping.*use loopkit\.EarlyStopping\("),
    (_FabricThing, r"\(Thing\) is Lightning's lightning_fabric\.utilities\.thing\.Thing.*docs/from_lightning\.md"),
], ids=["EarlyStopping", "ModelCheckpoint", "LearningRateMonitor", "Callback", "subclass-of-Callback",
        "subclass-of-pytorch_lightning-EarlyStopping", "lightning_fabric"])
def test_a_lightning_callback_is_refused_at_the_fit_start_naming_loopkits_counterpart(make, match):
    """Before: it passed the check (its Lightning hooks are its base's) and failed in on_fit_start with
    "missing 1 required positional argument: 'pl_module'". Reference: the stand-in's own record of its calls."""
    callback = make()
    _fit_refused(callback, match)
    assert callback.calls == []


# Lightning 2.6.6's callbacks (lightning.pytorch.callbacks.<module>.<class>, its base: RichModelSummary's is
# ModelSummary, EMAWeightAveraging's WeightAveraging) that loopkit has a counterpart of, and that counterpart
_PL_WITH_COUNTERPART = [
    ("timer", "Timer", None, "loopkit.Timer("),
    ("throughput_monitor", "ThroughputMonitor", None, "loopkit.ThroughputMonitor("),
    ("stochastic_weight_avg", "StochasticWeightAveraging", None, "loopkit.with_swa("),
    ("weight_averaging", "EMAWeightAveraging", "WeightAveraging", "loopkit.with_ema("),
    ("pruning", "ModelPruning", None, "loopkit.with_pruning("),
    ("gradient_accumulation_scheduler", "GradientAccumulationScheduler", None, "loopkit.with_grad_accum("),
    ("model_summary", "ModelSummary", None, "loopkit.summarize("),
    ("rich_model_summary", "RichModelSummary", "ModelSummary", "loopkit.summarize("),
    ("lr_finder", "LearningRateFinder", None, "loopkit.lr_find("),
    ("batch_size_finder", "BatchSizeFinder", None, "loopkit.scale_batch_size("),
]


@pytest.mark.parametrize("module, name, base, counterpart", _PL_WITH_COUNTERPART,
                         ids=[case[1] for case in _PL_WITH_COUNTERPART])
def test_lightnings_callbacks_that_loopkit_has_a_counterpart_of_are_refused_naming_it(module, name, base, counterpart):
    """Before: "port it to loopkit's hooks", though loopkit ships the counterpart. Reference: loopkit's public
    names (the counterpart named exists)."""
    parent = _PLCallback
    if base is not None:  # (defined in the same module as the class, or in ModelSummary's)
        parent = _stand_in(f"lightning.pytorch.callbacks.{'model_summary' if base == 'ModelSummary' else module}",
                           base, _PLCallback)
    callback = _stand_in(f"lightning.pytorch.callbacks.{module}", name, parent)()
    message = _fit_refused(callback, rf"\({name}\) is Lightning's lightning\.pytorch\.callbacks\.{module}\.{name}, "
                                     r"whose hooks take \(trainer, pl_module\).*use ")
    assert counterpart in message and "port it" not in message and callback.calls == []
    assert callable(getattr(loopkit, counterpart[len("loopkit."):-1]))


def test_a_loopkit_callback_ahead_of_a_lightning_base_runs_and_behind_it_is_refused():
    """Mixed with loopkit.Callback first, loopkit's hooks are the ones called; with Lightning's base first and no
    hook of Lightning's of its own (not written for both trainers), it is a Lightning callback."""
    calls: list[str] = []

    class Ahead(loopkit.Callback, _PLCallback):
        on_epoch_end = _hook(calls, "on_epoch_end")

    ahead = Ahead()
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[ahead], progress=False)
    assert calls == ["on_epoch_end"] and ahead.calls == []

    class Behind(_PLCallback, loopkit.Callback):
        on_epoch_end = _hook(calls, "on_epoch_end")

    behind = Behind()
    _fit_refused(behind, r"\.Behind\) derives from Lightning's lightning\.pytorch\.callbacks\.callback\.Callback")
    assert calls == ["on_epoch_end"] and behind.calls == []


class _Dual:
    """The hooks of a callback written for both trainers: Lightning's on_train_epoch_end, loopkit's on_epoch_end."""

    def __init__(self):
        self.calls = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.calls.append("on_train_epoch_end")

    def on_epoch_end(self, state, metrics):
        self.calls.append("on_epoch_end")


@pytest.mark.parametrize("bases", [(_PLCallback,), (_PLCallback, loopkit.Callback)], ids=["L", "L-then-loopkit"])
def test_a_callback_for_both_trainers_on_lightnings_base_runs_none_of_the_bases_hooks(bases):
    """Before: docs and loopkit.Callback promised that a callback for both trainers runs, but one Lightning's Trainer
    can run must subclass Lightning's Callback (the Trainer calls every hook), and such a class was refused (before
    that, its base's on_fit_start(trainer, pl_module) was called with the state: "missing 'pl_module'"). Now loopkit
    calls its own hooks and none of the base's, those under loopkit's names included. Reference: the stand-in's
    record of its calls, its hooks taking Lightning 2.6.6's arguments."""
    dual = type("Dual", (_Dual, *bases), {})()
    assert not loopkit.callbacks.may_change_state_early(dual)  # (its on_fit_start, on_validation_end: the base's)
    with pytest.warns(UserWarning, match="run_epochs never calls on_train_epoch_end, nor its Lightning base's "
                                         "on_fit_start, on_validation_end, on_fit_end, state_dict, load_state_dict"):
        final, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=[dual],
                                    val=(eval_step(_metric), make_data(1)), progress=False)
    assert dual.calls == ["on_epoch_end", "on_epoch_end"]
    assert len(history) == 2 and not any(key.startswith("callbacks/") for key in final.extras)


@pytest.mark.parametrize("hook", ["on_fit_start", "on_fit_end"])
def test_a_hook_set_on_an_instance_of_a_callback_for_both_trainers_is_its_own_and_called(hook):
    """A hook of loopkit's name assigned on the object itself (``cb.on_fit_end = fn``) is the callback's own, though
    its class inherits that name from Lightning's Callback: called with loopkit's arguments, the base's still not.
    Reference: the assigned hook's record of its calls, and the stand-in's of its base's."""
    dual = type("Dual", (_Dual, _PLCallback), {})()
    got: list[tuple] = []
    setattr(dual, hook, lambda state, *rest: got.append((state.step, len(rest))))
    with pytest.warns(UserWarning, match="run_epochs never calls on_train_epoch_end") as caught:
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[dual], progress=False)
    assert got == ([(0, 0)] if hook == "on_fit_start" else [(2, 1)])  # (on_fit_end: the state and the history)
    assert dual.calls == ["on_epoch_end"]
    assert all(hook not in str(w.message) for w in caught)  # (not among the base's hooks it never calls)


def test_a_callback_for_both_trainers_with_loopkits_base_ahead_is_warned_that_lightning_fails_on_it():
    """class Dual(loopkit.Callback, L.Callback) runs here, but Lightning's Trainer calls loopkit.Callback's
    on_fit_start(state) with (trainer, pl_module) (Lightning 2.6.6: "takes 2 positional arguments but 3 were given");
    the warning says so and how to order the bases. A plain class is told to subclass Lightning's Callback."""
    dual = type("Dual", (_Dual, loopkit.Callback, _PLCallback), {})()
    with pytest.raises(TypeError):
        dual.on_fit_start("trainer", "pl_module")  # (what Lightning's Trainer does)
    with pytest.warns(UserWarning, match=r"would call loopkit\.Callback's on_fit_start\(state\) with \(trainer, "
                                         r"pl_module\) and fail: put Lightning's Callback ahead of loopkit\.Callback"):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[dual], progress=False)
    assert dual.calls == ["on_epoch_end"]
    with pytest.warns(UserWarning, match="subclass lightning.pytorch.Callback for it"):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[_Dual()], progress=False)


@pytest.mark.parametrize("bases, hook", [((_PLCallback,), "on_fit_start"), ((), "on_fit_end"),
                                         ((loopkit.Callback,), "on_validation_end")], ids=["L", "plain", "loopkit"])
def test_a_loopkit_named_hook_taking_lightnings_trainer_and_pl_module_is_refused(bases, hook):
    """Before: a hook of a name both trainers share, written for Lightning's Trainer, was called with the state:
    on_fit_start failed with "missing 'pl_module'", on_fit_end and on_validation_end took the state for the trainer
    (and the history, the metrics for pl_module), silently. Reference: the hook's own record of its calls."""
    dual = type("Dual", (_Dual, *bases), {hook: _lightning_hook(f"own {hook}")})()
    _fit_refused(dual, rf"\(Dual\): its {hook} takes Lightning's \(trainer, pl_module\), but run_epochs calls it "
                       "with the state")
    assert dual.calls == []


def test_a_setup_helper_of_ones_own_is_not_taken_for_lightnings_setup():
    """``setup``/``teardown`` are common names: only one taking Lightning's (trainer, pl_module, stage) is its hook."""
    calls: list[str] = []

    class WithHelper(loopkit.Callback):
        def setup(self):
            calls.append("setup")

        def on_epoch_start(self, state):
            self.setup()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[WithHelper()], progress=False)
    assert calls == ["setup"]

    class Ported(loopkit.Callback):
        def setup(self, trainer, pl_module, stage):
            calls.append("lightning setup")

    _fit_refused(Ported(), "rename setup -> on_fit_start")
    assert calls == ["setup"]


def test_validation_data_without_a_length_is_not_taken_for_empty():
    """An IterableDataset's DataLoader is Sized but its len() raises: the empty-val check must not call it."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(make_data(2))

    loader = DataLoader(Stream(), batch_size=None)
    _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False,
                            val=(eval_step(_metric), loader))
    assert "val/mse" in history[0]


def test_evaluate_refuses_a_train_step():
    state = make_state()
    before = [p.clone() for p in state.model.parameters()]
    with pytest.raises(TypeError, match="evaluate: the step is a train_step"):
        evaluate(train_step(mse), state, make_data(2))
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


@pytest.mark.parametrize("device, match", [("gpu", "device='gpu' is not a device torch knows"),
                                           ("meta", "device='meta' holds no values"),
                                           ("cuda:99", r"device='cuda:99' is not available here \(torch ")])
def test_a_device_torch_cannot_use_is_refused_before_anything_moves(device, match):
    state = make_state()
    before = [p.clone() for p in state.model.parameters()]
    with pytest.raises(ValueError, match=f"run_epochs: {match}"):
        run_epochs(train_step(mse), state, make_data(2), epochs=1, device=device, progress=False)
    with pytest.raises(ValueError, match=f"evaluate: {match}"):
        evaluate(eval_step(_metric), state, make_data(2), device=device)
    with pytest.raises(ValueError, match=f"predict: {match}"):
        predict(lambda m, b: m(b[0]), state, make_data(2), device=device)
    state.check_usable()
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))


@pytest.mark.parametrize("returned, error, match", [
    ("best", TypeError, "Extra.on_epoch_end returned a str; return None or a dict of numbers"),
    ({1: 0.5}, TypeError, "Extra.on_epoch_end returned the name 1; the history record's names are strings"),
    (torch.tensor([1.0, 2.0]), TypeError, "Extra.on_epoch_end returned a Tensor; return None or a dict"),
    ({"epoch": 7}, ValueError, "Extra.on_epoch_end returned 'epoch', which the epoch's record has already"),
    ({"train/loss": 0.0}, ValueError, "returned 'train/loss', which the epoch's record has already"),
])
def test_what_on_epoch_end_returns_must_be_new_numbers_for_the_record(returned, error, match):
    class Extra(loopkit.Callback):
        def on_epoch_end(self, state, metrics):
            return returned

    with pytest.raises(error, match=match):
        run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, callbacks=[Extra()], progress=False)


def test_a_single_callback_is_taken_as_lightning_takes_it():
    stopper = loopkit.EarlyStopping("train/loss", patience=1)
    run_epochs(train_step(mse), make_state(), make_data(2), epochs=2, callbacks=stopper, progress=False)
    assert stopper.best < float("inf")


def test_a_dataset_passed_as_the_data_is_warned_about():
    data = TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    with pytest.warns(RuntimeWarning, match="is a torch Dataset.*DataLoader\\(dataset, batch_size"):
        run_epochs(train_step(lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()), make_state(), data, epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_epochs(train_step(mse), make_state(), DataLoader(data, batch_size=2), epochs=1, progress=False)


def test_a_misspelt_validation_monitor_is_warned_about_after_the_sanity_check():
    """The first validation raises for it, after an epoch of training; the sanity check already knows."""
    with pytest.warns(RuntimeWarning, match="EarlyStopping monitors 'val/mae', which the sanity validation did not report \\(it reported val/mse\\)"):
        with pytest.raises(KeyError, match="val/mae"):
            run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, val=(eval_step(_metric), make_data(2)),
                       callbacks=[loopkit.EarlyStopping("val/mae")], progress=False)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: predict(s, lambda m, b: m(b[0]), make_data(1)), TypeError, "predict: fn must be callable"),
        (lambda s: predict(lambda m, b: m(b[0]), s.model, make_data(1)), TypeError, "predict: state must be a loopkit.TrainState"),
        (lambda s: evaluate(eval_step(_metric), s.model, make_data(1)), TypeError, "evaluate: state must be a loopkit.TrainState"),
        (lambda s: evaluate(eval_step(_metric), s, None), TypeError, "evaluate: data must be an iterable"),
        (lambda s: loopkit.to_device(make_data(1), None), TypeError, "to_device: device must be"),
        (lambda s: loopkit.to_device(make_data(1), "gpu"), ValueError, "to_device: 'gpu' is not a device"),
        (lambda s: loopkit.to_device(make_data(1), "cuda:99"), ValueError,
         r"to_device: device 'cuda:99' is not available here \(torch .*: \d+ cuda device\(s\)\)"),
        (lambda s: loopkit.quantized_model(s.model), TypeError, "quantized_model: give the TrainState"),
        (lambda s: loopkit.export_weights(s, None), TypeError, "export_weights: path must be a file path .* got NoneType"),
    ],
    ids=["predict-swapped", "predict-model", "evaluate-model", "evaluate-none", "device-none", "device-gpu", "device-absent",
         "quantized", "export-none"],
)
def test_helpers_name_a_misplaced_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(make_state())


# --- transforms, loggers, callbacks: refused when built -------------------------------------------------


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda p: loopkit.with_grad_clip(train_step(mse), max_norm=True), ValueError, "max_norm must be a positive number"),
        (lambda p: loopkit.with_grad_accum(4, train_step(mse)), TypeError, "the step comes first"),
        (lambda p: loopkit.with_compile(train_step(mse), dynamic=3), TypeError, "with_compile: dynamic must be True, False or None"),
        (lambda p: loopkit.with_compile(train_step(mse), fullgraph="yes"), TypeError, "with_compile: fullgraph must be"),
        (lambda p: loopkit.with_qat(train_step(mse), qconfig="x"), TypeError, "with_qat: qconfig must be a torch.ao.quantization.QConfig"),
        (lambda p: loopkit.EarlyStopping("val/loss", patience=True), ValueError, "patience must be an int >= 0"),
        (lambda p: loopkit.EarlyStopping("val/loss", min_delta="0"), ValueError, "min_delta must be a finite number"),
        (lambda p: loopkit.with_logging(train_step(mse), loopkit.CSVLogger), TypeError, "logger 0 is the class CSVLogger"),
        (lambda p: loopkit.ConsoleLogger(stream="stdout"), TypeError, "ConsoleLogger: stream must be a text stream"),
        (lambda p: loopkit.CSVLogger(p / "file"), NotADirectoryError, "CSVLogger: root .* is a file"),
        (lambda p: loopkit.TensorBoardLogger(p / "file" / "deeper"), NotADirectoryError, "TensorBoardLogger: root"),
        (lambda p: loopkit.with_checkpointing(train_step(mse), p / "file" / "ckpt"), NotADirectoryError,
         "with_checkpointing: cannot make the folder .*ckpt' for its checkpoints"),
    ],
    ids=["clip-bool", "accum-order", "compile-dynamic", "compile-fullgraph", "qconfig", "patience-bool", "min-delta-str", "logger-class", "stream", "root-file",
         "root-under-file", "checkpoints-under-file"],
)
def test_options_are_refused_when_built(build, error, match, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(error, match=match):
        build(tmp_path)


def test_a_logger_root_that_cannot_be_made_is_refused_when_built(tmp_path, monkeypatch):
    """(os.access answers as for a user without write access: this suite may run as root, who has it.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(locked))
    with pytest.raises(PermissionError, match="CSVLogger: root .* cannot be made: .*locked' is not writable"):
        loopkit.CSVLogger(locked / "runs")
    loopkit.CSVLogger(locked)  # an existing folder: its own permission is the first write's to tell


def test_pruning_names_a_missing_parameter_before_the_step_changes_anything():
    state = make_state()
    step = loopkit.with_pruning(train_step(mse), 0.5, lambda s: 0.5, parameters=["nope"])
    with pytest.raises(KeyError, match="with_pruning: the model has no parameter 'nope'"):
        run_epochs(step, state, make_data(2), epochs=1, progress=False)
    state.check_usable()  # before, the first update had already used it up


def test_export_weights_names_the_path_not_its_temporary(tmp_path):
    state = make_state()
    with pytest.raises(IsADirectoryError, match=f"export_weights: '{tmp_path}' is a folder"):
        loopkit.export_weights(state, tmp_path)
    with pytest.raises(FileNotFoundError, match="export_weights: the folder .*nope.* does not exist"):
        loopkit.export_weights(state, tmp_path / "nope" / "m.safetensors")


# --- ensembles -------------------------------------------------------------------------------------------


def _member(activation: nn.Module) -> TrainState:
    model = nn.Sequential(nn.Linear(2, 3), activation, nn.Linear(3, 1))
    return TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_ensemble_members_of_another_architecture_with_the_same_shapes_are_refused():
    """Before, member 1 (Tanh) trained through member 0's ReLU forward, off its solo trajectory."""
    with pytest.raises(ValueError, match="member 1's model differs from member 0's \\(1: Tanh\\(\\) where member 0 has 1: ReLU\\(\\)\\)"):
        loopkit.ensemble.stack([_member(nn.ReLU()), _member(nn.Tanh())])
    with pytest.raises(TypeError, match="ensemble.unstack: give the Ensemble"):
        loopkit.ensemble.unstack(_member(nn.ReLU()))


# --- tune ------------------------------------------------------------------------------------------------


def test_tune_refuses_what_optuna_would_fail_on_later(tmp_path):
    pytest.importorskip("optuna")
    from loopkit import tune

    (tmp_path / "file").write_text("x")
    for options, error, match in (
        (dict(pruner="median"), TypeError, "pruner must be an optuna pruner"),
        (dict(sampler="tpe"), TypeError, "sampler must be an optuna sampler"),
        (dict(directory=tmp_path / "file"), NotADirectoryError, "cannot be made: .*file' is a file"),
    ):
        with pytest.raises(error, match=match):
            tune.create_study("s", **({"directory": tmp_path} | options))
    with pytest.raises(TypeError, match="objective must be callable"):
        tune.optimize(None, n_trials=1, directory=tmp_path)
    with pytest.raises(TypeError, match="PruningCallback: trial must be an optuna trial"):
        tune.PruningCallback(None)


def test_tune_fit_refuses_a_lightning_callback_before_the_trial_reports_anything():
    optuna = pytest.importorskip("optuna")
    from loopkit import tune

    steps, state, callback = [], make_state(), _PLEarlyStopping()

    def loss_fn(m, b):
        steps.append(1)
        return mse(m, b)

    trial = optuna.create_study().ask()
    with pytest.raises(TypeError, match=r"\(EarlyStopping\) is Lightning's .*use loopkit\.EarlyStopping\("):
        tune.fit(trial, train_step(loss_fn), state, make_data(2), monitor="train/loss", epochs=1, progress=False,
                 callbacks=[callback])
    assert steps == [] and callback.calls == [] and trial.user_attrs == {}
    state.check_usable()


def test_numpy_counters_are_ints_to_evolve():
    import numpy as np

    state = make_state().evolve(step=np.int64(3))
    assert state.step == 3 and type(state.step) is int


def test_a_malformed_tagged_extras_entry_is_named():
    sd = make_state().state_dict()
    for bad in ({"__loopkit_kind__": "mapping", "keys": {"0": "a"}}, {"__loopkit_kind__": "tuple", "1": 2},
                {"__loopkit_kind__": "mine"}):
        sd["extras"] = {"x": bad}
        with pytest.raises(loopkit.StateMismatchError, match="extras.x"):
            make_state().load_state_dict(sd)


def test_a_validation_whose_data_yields_nothing_is_warned_about():
    """A val set without len() that yields nothing ran a whole fit without val/ metrics and without a word (evaluate
    warns of the same data; a val loader of len() 0 is refused)."""
    from tests._driver_helpers import stream

    with pytest.warns(RuntimeWarning, match="run_epochs: a validation read no batch: val's data yielded none"):
        _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False,
                                val=(eval_step(_metric), stream([])))
    assert not any(k.startswith("val/") for k in history[0])


def test_a_validation_whose_metrics_come_from_a_callback_alone_is_not_warned_about():
    """The guide's AUROC recipe: an eval step that returns no metric, the metric made over the whole validation set in
    on_validation_end. The data was read, so nothing is wrong."""
    import warnings

    class WholeSet(loopkit.Callback):
        def on_validation_end(self, state, metrics):
            return {"val/auroc": 0.5}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, history = run_epochs(train_step(mse), make_state(), make_data(2), epochs=1, progress=False,
                                val=(eval_step(lambda m, b: {}), make_data(2)), callbacks=[WholeSet()])
    assert history[0]["val/auroc"] == 0.5
