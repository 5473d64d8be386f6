"""Every ``with_*`` transform, alone and in every ordered pair with every other, keeps the step contract.

The transforms: the gradient transforms ``with_amp`` (bfloat16, float16), ``with_grad_accum``,
``with_grad_clip``, ``with_grad_norm``, ``with_grad_hook`` (halving the gradients, reporting a metric), ``with_nan_guard``, and the whole-step transforms ``with_logging`` (into an
in-memory logger), ``with_checkpointing`` (into a fresh directory per pipeline), ``with_ema``, ``with_pruning``,
``with_qat`` (whose prepared modules a restore template gets from ``step.prepare``), ``with_swa`` (from the first
epoch on: it averages, sets SWALR's rate and holds the state's scheduler still from the first call) and
``with_epoch_scheduler`` (the scheduler held still within the epoch) and ``with_step_scheduler`` (stepped every
second batch's update).

For each pipeline: purity (the input state is unchanged), determinism (two calls give identical
results), exact resume from ``state_dict`` mid-accumulation, float32 parameters stay float32,
``step.applied`` lists the transforms, ``run_epochs`` equals calling the step by hand, and a NaN
batch never reaches the parameters of a pipeline that guards against it; with logging, the
loggers get the finite means of the metrics the step returned; with checkpointing, each update
leaves a checkpoint that ``loopkit.restore`` turns back into the state the step returned. Pairs
without a meaning (a gradient transform around a whole-step transform, a second precision, an
accumulation of an accumulation) are refused with a ``TypeError`` naming both transforms when
the step is built.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import loopkit
from loopkit import checkpoint


class MemoryLogger:
    """A logger that keeps what it is given: ``records`` is a list of ``(step, metrics)``."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.hparams: list[tuple[dict[str, Any], Any]] = []
        self.finalized = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        self.hparams.append((dict(hparams), metrics))

    def finalize(self) -> None:
        self.finalized += 1


class Sinks:
    """Where the whole-step transforms of one built pipeline write: a fresh logger or directory each.

    ``loggers`` and ``directories`` are in build order (innermost transform first).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loggers: list[MemoryLogger] = []
        self.directories: list[Path] = []
        self.hooks = 0

    def next_hook(self) -> int:
        self.hooks += 1
        return self.hooks

    def logger(self) -> MemoryLogger:
        self.loggers.append(MemoryLogger())
        return self.loggers[-1]

    def directory(self) -> Path:
        self.directories.append(self.root / f"checkpoints{len(self.directories)}")
        return self.directories[-1]


def _halving_hook(sinks: Sinks | None):
    """A with_grad_hook function: halves every gradient, reports their sum under a name of its own in the pipeline."""
    name = f"hook{sinks.next_hook() if sinks is not None else 0}/grad_sum"

    def hook(state: loopkit.TrainState) -> dict[str, torch.Tensor]:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, 0.5)
        return {name: sum(g.sum() for g in grads)}

    return hook


LOG_EVERY = 2  # with_logging's window: two optimizer updates (four calls under with_grad_accum)

TRANSFORMS = {
    "amp_bf16": ("with_amp", lambda s, sinks: loopkit.with_amp(s, dtype=torch.bfloat16)),
    "amp_fp16": ("with_amp", lambda s, sinks: loopkit.with_amp(s, dtype=torch.float16, init_scale=2.0**10)),
    "grad_accum": ("with_grad_accum", lambda s, sinks: loopkit.with_grad_accum(s, every=2)),
    "grad_clip": ("with_grad_clip", lambda s, sinks: loopkit.with_grad_clip(s, max_norm=0.3)),
    "grad_norm": ("with_grad_norm", lambda s, sinks: loopkit.with_grad_norm(s)),
    "grad_hook": ("with_grad_hook", lambda s, sinks: loopkit.with_grad_hook(s, _halving_hook(sinks))),
    "nan_guard": ("with_nan_guard", lambda s, sinks: loopkit.with_nan_guard(s)),
    "logging": ("with_logging", lambda s, sinks: loopkit.with_logging(s, sinks.logger(), every_n_steps=LOG_EVERY)),
    "checkpointing": ("with_checkpointing", lambda s, sinks: loopkit.with_checkpointing(s, sinks.directory(), every_n_steps=1)),
    "ema": ("with_ema", lambda s, sinks: loopkit.with_ema(s, decay=0.8)),
    "pruning": ("with_pruning", lambda s, sinks: loopkit.with_pruning(s, 0.5, [1, 2])),
    "qat": ("with_qat", lambda s, sinks: loopkit.with_qat(s)),
    "swa": ("with_swa", lambda s, sinks: loopkit.with_swa(s, 0.05, swa_epoch_start=1, annealing_epochs=1)),
    "epoch_scheduler": ("with_epoch_scheduler", lambda s, sinks: loopkit.with_epoch_scheduler(s)),
    "step_scheduler": ("with_step_scheduler", lambda s, sinks: loopkit.with_step_scheduler(s, frequency=2)),
}
WHOLE_STEP = ["logging", "checkpointing", "ema", "pruning", "qat", "swa", "epoch_scheduler", "step_scheduler"]  # wrap any step; nothing that needs the train step can wrap them
GRADIENT = [name for name in TRANSFORMS if name not in WHOLE_STEP]
GRADIENT_ONLY = ["grad_accum", "grad_clip", "grad_norm", "grad_hook", "nan_guard"]  # need gradients: refuse an eval_step


def _refused(inner: str, outer: str) -> bool:
    """A gradient transform cannot reach the train step through a whole-step transform; and some
    pairs of gradient transforms have no meaning: a second precision, accumulating an accumulation, and
    a second clipping or norm on the same side of the accumulation, whose metrics would replace the first one's, and a
    second guard, which the inner one leaves nothing to act on."""
    if outer in GRADIENT and inner in WHOLE_STEP:
        return True
    if inner == outer and inner in ("logging", "ema", "pruning", "qat", "swa", "epoch_scheduler", "step_scheduler",
                                    "grad_clip", "grad_norm", "nan_guard"):
        return True
    if outer == "qat" and inner.startswith("amp"):  # fake quantization runs in float32 only
        return True
    if (inner, outer) in (("checkpointing", "ema"), ("checkpointing", "pruning"), ("ema", "pruning")):
        return True  # the checkpoint or the averages would miss the outer transform's change of this update
    if (inner, outer) in (("checkpointing", "swa"), ("checkpointing", "epoch_scheduler"), ("checkpointing", "step_scheduler")):
        return True  # with_swa (in SWA epochs) and the scheduler transforms hand their inner step the state without its scheduler
    if (inner, outer) in (("epoch_scheduler", "swa"), ("step_scheduler", "swa")):
        return True  # in SWA epochs with_swa hands its inner step the state without its scheduler (SWALR takes over)
    if {inner, outer} == {"epoch_scheduler", "step_scheduler"}:
        return True  # both step the one scheduler
    return TRANSFORMS[inner][0] == TRANSFORMS[outer][0] and TRANSFORMS[inner][0] in ("with_amp", "with_grad_accum")


def _label(names) -> str:
    return "(".join(reversed(names)) + ")" * len(names)


PAIRS = list(itertools.product(TRANSFORMS, repeat=2))
TRIPLES = [  # whole-step stacks as they are used: over gradient transforms, in both orders
    ("grad_accum", "logging", "checkpointing"),
    ("amp_fp16", "checkpointing", "logging"),
    ("nan_guard", "logging", "checkpointing"),
    ("grad_accum", "ema", "checkpointing"),
    ("grad_accum", "pruning", "ema"),
    ("grad_accum", "qat", "checkpointing"),
    ("nan_guard", "qat", "logging"),
    ("grad_accum", "swa", "checkpointing"),
    ("nan_guard", "swa", "ema"),
    ("grad_accum", "step_scheduler", "checkpointing"),
    ("swa", "epoch_scheduler", "checkpointing"),  # Lightning's [opt], [scheduler] with StochasticWeightAveraging
]
PIPELINES = [(name,) for name in TRANSFORMS] + [pair for pair in PAIRS if not _refused(*pair)] + TRIPLES
LOGGED = [names for names in PIPELINES if "logging" in names]
CHECKPOINTED = [names for names in PIPELINES if "checkpointing" in names]



def _mse(model, batch):
    x, y = batch
    return ((model(x).float() - y) ** 2).mean()


def _build(names, sinks: Sinks | None = None):
    step = loopkit.train_step(_mse)
    for name in names:  # innermost first
        step = TRANSFORMS[name][1](step, sinks)
    return step


def _nan_batch(batch):
    x, y = batch
    x = x.clone()
    x[:, 0] = float("nan")
    return x, y


def _position(state) -> tuple[int, int, int]:
    return state.step, state.epoch, state.batch_index


def _positions(directory: Path) -> list[tuple[int, int, int]]:
    return [(c.step, c.epoch, c.batch_index) for c in checkpoint.list_checkpoints(directory)]


def _without_logging(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict without ``with_logging``'s window: what a checkpoint taken inside it lacks."""
    extras = {k: v for k, v in sd.get("extras", {}).items() if not k.startswith("logging/")}
    return {**sd, "extras": extras}


def _logging_outside(names, index: int) -> bool:
    """Whether a with_logging is applied after (around) the transform at ``index`` of ``names``."""
    return "logging" in names[index + 1:]


@pytest.fixture(params=PIPELINES, ids=_label)
def pipeline(request):
    return request.param


@pytest.fixture
def fresh_state(make_bn_dropout, make_adam_state):
    def fresh(model_seed=0):
        return make_adam_state(make_bn_dropout(model_seed), seed=5, scheduler=True)

    return fresh


@pytest.fixture
def make_sinks(tmp_path):
    """``make_sinks()``: a fresh :class:`Sinks` under the test's ``tmp_path``, one per built pipeline."""
    count = itertools.count()
    return lambda: Sinks(tmp_path / f"sinks{next(count)}")


@pytest.fixture
def sinks(make_sinks):
    return make_sinks()


@pytest.fixture
def assert_checkpoints_hold(fresh_state, assert_trees_equal):
    """``assert_checkpoints_hold(names, step, sinks, state)``: each checkpoint directory's newest checkpoint
    is at ``state``'s position and ``loopkit.restore`` of it into a fresh state (prepared by ``step``:
    with_qat's modules) gives ``state``."""

    def check(names, step, sinks: Sinks, state) -> None:
        indices = [i for i, name in enumerate(names) if name == "checkpointing"]
        assert len(indices) == len(sinks.directories)
        for index, directory in zip(indices, sinks.directories):
            assert _positions(directory)[-1] == _position(state)
            other = step.prepare(fresh_state(model_seed=1))
            assert not torch.equal(next(other.model.parameters()), next(state.model.parameters()))
            restored = loopkit.restore(other, directory)
            assert_trees_equal(dict(restored.model.named_parameters()), dict(state.model.named_parameters()))
            got, expected = restored.state_dict(), state.state_dict()
            if _logging_outside(names, index):  # saved before that with_logging added this call's metrics
                got, expected = _without_logging(got), _without_logging(expected)
            assert_trees_equal(got, expected)

    return check


# --- building ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner, outer", PAIRS, ids=[f"{o}({i})" for i, o in PAIRS])
def test_building_a_pair_works_or_is_refused_naming_both(inner, outer, sinks):
    inner_name, outer_name = TRANSFORMS[inner][0], TRANSFORMS[outer][0]
    if _refused(inner, outer):
        with pytest.raises(TypeError) as info:
            _build((inner, outer), sinks)
        message = str(info.value)
        assert f"{outer_name} cannot wrap {inner_name}" in message
    else:
        step = _build((inner, outer), sinks)
        assert step.applied == ("train_step", inner_name, outer_name)


DEEP = [(i, w, o) for i in GRADIENT for w in WHOLE_STEP for o in GRADIENT if not _refused(i, w)]


@pytest.mark.parametrize("inner, whole, outer", DEEP, ids=[f"{o}({w}({i}))" for i, w, o in DEEP])
def test_a_gradient_transform_is_refused_around_a_whole_step_at_any_depth(inner, whole, outer, sinks):
    built = _build((inner, whole), sinks)  # the train step is there, one level down
    with pytest.raises(TypeError) as info:
        TRANSFORMS[outer][1](built, sinks)
    message = str(info.value)
    outer_name, whole_name = TRANSFORMS[outer][0], TRANSFORMS[whole][0]
    assert f"{outer_name} cannot wrap {whole_name}" in message
    if _refused(outer, whole):  # the other order is refused too (with_amp and with_qat): none is suggested
        assert "nor go inside it" in message and "train_step(...)" not in message
    else:
        assert f"{whole_name}({outer_name}(train_step(...))" in message  # and says which order works


def test_the_refused_pairs_are_exactly_the_meaningless_ones():
    refused = {(TRANSFORMS[i][0], TRANSFORMS[o][0]) for i, o in PAIRS if _refused(i, o)}
    gradient_names = {"with_amp", "with_grad_accum", "with_grad_clip", "with_grad_norm", "with_grad_hook", "with_nan_guard"}
    wholes = ("with_logging", "with_checkpointing", "with_ema", "with_pruning", "with_qat", "with_swa",
              "with_epoch_scheduler", "with_step_scheduler")
    around_whole = {(w, g) for w in wholes for g in gradient_names}
    doubled = {(t, t) for t in ("with_amp", "with_grad_accum", "with_logging", "with_ema", "with_pruning", "with_qat",
                                "with_swa", "with_epoch_scheduler", "with_step_scheduler", "with_grad_clip", "with_grad_norm",
                                "with_nan_guard")}
    too_late = {("with_checkpointing", "with_ema"), ("with_checkpointing", "with_pruning"), ("with_ema", "with_pruning"),
                ("with_checkpointing", "with_swa"), ("with_checkpointing", "with_epoch_scheduler"),
                ("with_checkpointing", "with_step_scheduler")}
    schedulers = ("with_epoch_scheduler", "with_step_scheduler")
    one_schedule = {(a, b) for a in schedulers for b in schedulers if a != b} | {(a, "with_swa") for a in schedulers}
    float32_only = {("with_amp", "with_qat")}
    assert refused == doubled | around_whole | too_late | one_schedule | float32_only
    # pairs of keys: amp doubled 4, accum 1, whole around gradient 8 * 7, seven wholes doubled, clip, norm and guard
    # doubled 3, too late 6, one schedule 4 (the two scheduler transforms, and with_swa around either), qat(amp) 2
    assert sum(_refused(*pair) for pair in PAIRS) == 4 + 1 + 8 * 7 + 7 + 3 + 6 + 4 + 2
    assert len(PIPELINES) == 15 + 225 - 83 + len(TRIPLES)
    # every whole-step transform is covered around every other transform, and checkpointing around itself
    unwrappable = {("logging", "logging"), ("ema", "ema"), ("pruning", "pruning"), ("qat", "qat"), ("checkpointing", "ema"),
                   ("checkpointing", "pruning"), ("ema", "pruning"), ("amp_bf16", "qat"), ("amp_fp16", "qat"),
                   ("swa", "swa"), ("checkpointing", "swa"), ("epoch_scheduler", "epoch_scheduler"),
                   ("checkpointing", "epoch_scheduler"), ("epoch_scheduler", "swa"),
                   ("step_scheduler", "step_scheduler"), ("checkpointing", "step_scheduler"), ("step_scheduler", "swa"), ("epoch_scheduler", "step_scheduler"), ("step_scheduler", "epoch_scheduler")}
    for whole in WHOLE_STEP:
        assert all((name, whole) in PIPELINES for name in TRANSFORMS if (name, whole) not in unwrappable)


@pytest.mark.parametrize("name", GRADIENT_ONLY)
def test_gradient_transform_refuses_an_eval_step(name):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](loopkit.eval_step(lambda m, b: {}), None)
    message = str(info.value)
    assert TRANSFORMS[name][0] in message and "eval_step" in message


def test_checkpointing_refuses_an_eval_step(sinks):
    with pytest.raises(TypeError) as info:
        TRANSFORMS["checkpointing"][1](loopkit.eval_step(lambda m, b: {}), sinks)
    assert "with_checkpointing cannot wrap eval_step" in str(info.value)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_transform_refuses_a_plain_function_step(name):
    def my_custom_step(state, batch):
        return state, {}

    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](my_custom_step, None)
    message = str(info.value)
    assert TRANSFORMS[name][0] in message and "my_custom_step" in message


class _StepOfOnesOwn(loopkit.Step):
    """A step of one's own as ``loopkit.Step``'s docstring has it: a subclass that implements ``run_``."""

    def run_(self, state, batch):
        return state.evolve(step=state.step + 1), {}


def _plain_core(state, batch):
    return state, {}


BUILDS = {name: build for name, (_, build) in TRANSFORMS.items() if name in GRADIENT}
BUILDS.update(compile=lambda s, sinks: loopkit.with_compile(s, backend="eager"), ddp=lambda s, sinks: loopkit.with_ddp(s))


@pytest.mark.parametrize("name", BUILDS)
def test_gradient_transform_refuses_a_step_subclass_of_ones_own_naming_it(name):
    """A Step subclass has no transforms applied (``applied == ()``): the refusal named it from ``applied[-1]``, an
    IndexError; it is the TypeError a plain function gets, naming the class."""
    with pytest.raises(TypeError, match=r"with_\w+ needs a loopkit train_step.* got the step _StepOfOnesOwn \(a loopkit"):
        BUILDS[name](_StepOfOnesOwn(), None)


@pytest.mark.parametrize("core", ["plain", "subclass"])
@pytest.mark.parametrize("whole", ["logging", "ema", "swa"])
@pytest.mark.parametrize("name", BUILDS)
def test_a_gradient_transform_around_a_whole_step_of_a_plain_core_names_the_core_not_an_order(name, whole, core, sinks):
    """Around a whole-step transform of a train_step the refusal says which order works; of a plain function (or a
    Step subclass) no order works, and the refusal says what is at the core instead of sending one to another."""
    inner = TRANSFORMS[whole][1](_plain_core if core == "plain" else _StepOfOnesOwn(), sinks)
    with pytest.raises(TypeError) as info:
        BUILDS[name](inner, sinks)
    message = str(info.value)
    named = "the plain step _plain_core" if core == "plain" else "the step _StepOfOnesOwn"
    assert "needs a loopkit train_step" in message and f"{named}" in message
    assert f"inside {TRANSFORMS[whole][0]}" in message and " first" not in message


def test_a_transform_around_a_whole_step_of_an_eval_step_suggests_an_order_only_where_it_takes_one(sinks):
    logged = loopkit.with_logging(loopkit.eval_step(lambda m, b: {}), sinks.logger())
    with pytest.raises(TypeError, match=r"with_grad_clip cannot wrap eval_step, inside with_logging: .*computes none"):
        loopkit.with_grad_clip(logged, max_norm=1.0)
    with pytest.raises(TypeError, match=r"apply with_amp first, e\.g\. with_logging\(with_amp\(eval_step\(\.\.\.\)\)"):
        loopkit.with_amp(logged, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", WHOLE_STEP)
def test_whole_step_transform_wraps_a_plain_function_step(name, sinks, fresh_state, take_snapshot, assert_trees_equal):
    def my_custom_step(state, batch):  # pure: a new state, one update per call
        return state.evolve(step=state.step + 1, batch_index=state.batch_index + 1), {"value": torch.tensor(float(batch))}

    step = TRANSFORMS[name][1](my_custom_step, sinks)
    assert step.applied[-1] == TRANSFORMS[name][0] and step.applied[0].endswith("my_custom_step")
    state = start = fresh_state()
    before = take_snapshot(start)
    for batch in (1, 2, 3, 4):
        state, metrics = step(state, batch)
        assert float(metrics["value"]) == batch
    assert_trees_equal(take_snapshot(start), before)
    assert state.step == 4
    for logger in sinks.loggers:
        assert logger.records == [(2, {"epoch": 0, "train/value": 1.5}), (4, {"epoch": 0, "train/value": 3.5})]
    for directory in sinks.directories:
        assert [p[0] for p in _positions(directory)] == [2, 3, 4]  # keep_last=3


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_refuses_a_donated_step(name, sinks):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1](loopkit.donate(loopkit.train_step(_mse)), sinks)
    assert TRANSFORMS[name][0] in str(info.value) and "donate" in str(info.value)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_refuses_a_non_callable(name, sinks):
    with pytest.raises(TypeError) as info:
        TRANSFORMS[name][1]("train_step", sinks)
    assert str(info.value).startswith(f"{TRANSFORMS[name][0]}: the step must be callable") and "got str" in str(info.value)


# --- the step contract, for every pipeline --------------------------------------------------------


def test_applied_lists_the_transforms(pipeline, sinks):
    assert _build(pipeline, sinks).applied == ("train_step",) + tuple(TRANSFORMS[n][0] for n in pipeline)


def test_pure(pipeline, sinks, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline, sinks)
    state, _ = step(fresh_state(), batches[0])  # mid-group under accumulation: gradients are held
    if "logging" in pipeline:
        assert state.extras["logging/pending"]  # the input below holds a partial window
    before = take_snapshot(state)
    new, _ = step(state, batches[1])
    assert_trees_equal(take_snapshot(state), before)
    assert new.batch_index == state.batch_index + 1
    flushed, _ = step.flush(state)
    assert_trees_equal(take_snapshot(state), before)
    assert flushed.step == state.step + ("grad_accum" in pipeline)


def test_two_calls_give_identical_results(pipeline, sinks, fresh_state, batches, take_snapshot, assert_trees_equal):
    step = _build(pipeline, sinks)
    state, _ = step(fresh_state(), batches[0])
    records = [len(logger.records) for logger in sinks.loggers]
    saved = [_positions(d) for d in sinks.directories]
    a, metrics_a = step(state, batches[1])
    logged_a = [logger.records[n:] for logger, n in zip(sinks.loggers, records)]
    torch.rand(10)  # the global RNG is not the step's
    b, metrics_b = step(state, batches[1])
    assert_trees_equal(take_snapshot(a), take_snapshot(b))
    assert_trees_equal(metrics_a, metrics_b)
    for logger, n, first in zip(sinks.loggers, records, logged_a):
        assert logger.records[n:] == first + first  # the same means, logged once per call
    for directory, before in zip(sinks.directories, saved):
        # the second call's state is at the position the first one saved: it is not saved twice
        expected = before + [_position(a)] if a.step != state.step else before
        assert _positions(directory) == expected[-3:]


def test_state_dict_round_trip_mid_accumulation(
    pipeline, make_sinks, fresh_state, batches, take_snapshot, assert_trees_equal
):
    uninterrupted_sinks, resumed_sinks = make_sinks(), make_sinks()
    step, resumed_step = _build(pipeline, uninterrupted_sinks), _build(pipeline, resumed_sinks)
    state, _ = step(fresh_state(), batches[0])
    if "grad_accum" in pipeline:
        assert state.extras["accum/count"] == 1 and state.step == 0
    if "logging" in pipeline:
        assert state.extras["logging/pending"]  # a partial window travels in the state dict
    logged = [len(logger.records) for logger in uninterrupted_sinks.loggers]
    restored = resumed_step.prepare(fresh_state(model_seed=1)).load_state_dict(state.state_dict())
    for batch in batches[1:4]:
        state, _ = step(state, batch)
        restored, _ = resumed_step(restored, batch)
    assert state.step >= 1
    assert_trees_equal(take_snapshot(restored), take_snapshot(state))
    for logger, resumed, n in zip(uninterrupted_sinks.loggers, resumed_sinks.loggers, logged):
        assert resumed.records == logger.records[n:] and resumed.records  # the same means, bitwise
    for directory, resumed in zip(uninterrupted_sinks.directories, resumed_sinks.directories):
        assert _positions(resumed) == _positions(directory)[-len(_positions(resumed)):]
        assert _positions(resumed)[-1] == _position(state)


def test_parameter_dtype_is_kept(pipeline, sinks, fresh_state, batches, assert_checkpoints_hold):
    step = _build(pipeline, sinks)
    state = fresh_state()
    for batch in batches[:4]:  # ends on an update, under with_grad_accum too
        state, metrics = step(state, batch)
        assert all(v.ndim == 0 for v in metrics.values())
    for p in state.model.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    for entry in state.optimizer.state.values():
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.float32
    created = {n: b.dtype for n, b in step.prepare(fresh_state()).model.named_buffers()}  # with_qat's included
    assert {n: b.dtype for n, b in state.model.named_buffers()} == created
    assert_checkpoints_hold(pipeline, step, sinks, state)  # restored from disk with the dtypes it had


def test_run_epochs_matches_calling_the_step(pipeline, make_sinks, fresh_state, batches, take_snapshot, assert_trees_equal):
    hand_sinks, driven_sinks = make_sinks(), make_sinks()
    step = _build(pipeline, hand_sinks)
    by_hand = fresh_state()
    for batch in batches[:5]:
        by_hand, _ = step(by_hand, batch)
    by_hand, _ = step.flush(by_hand)
    driven, _ = loopkit.run_epochs(
        _build(pipeline, driven_sinks), fresh_state(), batches[:5], epochs=1, progress=False, sanity_val_batches=0
    )
    assert driven.epoch == 1
    assert_trees_equal(take_snapshot(driven)["params"], take_snapshot(by_hand)["params"])
    assert_trees_equal(take_snapshot(driven)["optimizer"], take_snapshot(by_hand)["optimizer"])
    for hand, logger in zip(hand_sinks.loggers, driven_sinks.loggers):
        # the driver adds the epoch's record (its means, train/*_epoch); every row holds the epoch, 0
        per_window = [(s, m) for s, m in logger.records if "train/loss_epoch" not in m]
        assert per_window == hand.records and hand.records
        assert [m["epoch"] for _, m in logger.records if "train/loss_epoch" in m] == [0]
        assert logger.finalized == 1 and hand.finalized == 0
    for hand, directory in zip(hand_sinks.directories, driven_sinks.directories):
        assert _positions(directory) == _positions(hand) and _positions(hand)[-1][0] == by_hand.step


# --- what the whole-step transforms write ---------------------------------------------------------


@pytest.mark.parametrize("names", LOGGED, ids=_label)
def test_loggers_get_finite_means_of_the_metrics_the_step_returned(names, sinks, fresh_state, batches):
    step = _build(names, sinks)
    state = fresh_state()
    window: dict[str, list[torch.Tensor]] = {}  # the reference: this test's own record of each call's metrics
    expected: list[tuple[int, dict[str, float]]] = []
    for batch in batches[:6]:
        before = state.step
        state, metrics = step(state, batch)
        for key, value in metrics.items():
            window.setdefault(key, []).append(value.detach().clone())
        if state.step != before and state.step % LOG_EVERY == 0:
            means = {f"train/{k}": torch.stack(v).sum().item() / len(v) for k, v in window.items()}
            expected.append((state.step, {"epoch": state.epoch, **means}))  # (every row holds its epoch)
            window = {}
    assert len(expected) >= 1
    for logger in sinks.loggers:
        assert [s for s, _ in logger.records] == [s for s, _ in expected]
        for (_, got), (_, want) in zip(logger.records, expected):
            assert set(got) == set(want) and "train/loss" in got
            assert all(math.isfinite(v) for v in got.values())
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("names", CHECKPOINTED, ids=_label)
def test_each_update_leaves_a_checkpoint_that_restores_the_state(names, sinks, fresh_state, batches, assert_checkpoints_hold):
    step = _build(names, sinks)
    state = fresh_state()
    assert all(_positions(d) == [] for d in sinks.directories)
    for batch in batches[:4]:
        before = state.step
        saved = [_positions(d) for d in sinks.directories]
        state, _ = step(state, batch)
        if state.step == before:  # mid-group under accumulation: no update, no checkpoint
            assert [_positions(d) for d in sinks.directories] == saved
        else:
            assert_checkpoints_hold(names, step, sinks, state)
    assert state.step >= 2


def test_nested_logging_is_refused_and_one_logging_takes_every_logger(fresh_state, batches, tmp_path):
    """with_logging keeps one window in the state: a second layer is refused; one layer serves all loggers."""
    with pytest.raises(TypeError, match="with_logging cannot wrap with_logging"):
        loopkit.with_logging(loopkit.with_checkpointing(
            loopkit.with_logging(loopkit.train_step(_mse), MemoryLogger(), every_n_steps=2), tmp_path), MemoryLogger())
    a, b, alone = MemoryLogger(), MemoryLogger(), MemoryLogger()
    both = loopkit.with_logging(loopkit.train_step(_mse), a, b, every_n_steps=2)
    single = loopkit.with_logging(loopkit.train_step(_mse), alone, every_n_steps=2)
    state_both = state_alone = fresh_state()
    for batch in batches:
        state_both, _ = both(state_both, batch)
        state_alone, _ = single(state_alone, batch)
    assert a.records == b.records == alone.records and len(alone.records) >= 2


# --- a NaN batch ------------------------------------------------------------------------------------


GUARDED = [names for names in PIPELINES if {"nan_guard", "amp_fp16"} & set(names)]


@pytest.mark.parametrize("guarded", GUARDED, ids=_label)
def test_a_nan_batch_never_reaches_guarded_parameters(guarded, sinks, fresh_state, batches, take_snapshot, assert_trees_equal):
    pipeline = guarded
    step = _build(pipeline, sinks)
    start = fresh_state()
    state, _ = step(start, _nan_batch(batches[0]))
    if "grad_accum" in pipeline:
        state, _ = step(state, batches[1])  # a clean second micro-batch: the group is dropped anyway
    assert state.step == 0
    assert_trees_equal(take_snapshot(state)["params"], take_snapshot(start)["params"])
    if "nan_guard" in pipeline:  # its skip also puts back the buffers (BatchNorm statistics, QAT observers)
        assert_trees_equal(take_snapshot(state)["buffers"], take_snapshot(step.prepare(start))["buffers"])
    assert all(p.grad is None for p in state.model.parameters())
    assert all(_positions(d) == [] for d in sinks.directories)  # a dropped update saves nothing
    state, _ = step(state, batches[2])
    state, _ = step(state, batches[3])
    assert state.step >= 1 and all(bool(torch.isfinite(p).all()) for p in state.model.parameters())
    for directory in sinks.directories:
        assert _positions(directory)[-1] == _position(state)


# --- orders that mean the same thing give the same result ----------------------------------------


COMMUTING = [
    pair
    for pair in itertools.combinations(GRADIENT, 2)
    if not _refused(*pair) and ({"amp_bf16", "amp_fp16"} & set(pair) or set(pair) == {"grad_clip", "nan_guard"})
]


@pytest.mark.parametrize("pair", COMMUTING, ids=["+".join(p) for p in COMMUTING])
def test_orders_with_one_meaning_give_bitwise_the_same_result(pair, fresh_state, batches, take_snapshot, assert_trees_equal):
    forward, backward = _build(pair), _build(pair[::-1])
    a, b = fresh_state(), fresh_state()
    for batch in batches[:4]:
        a, metrics_a = forward(a, batch)
        b, metrics_b = backward(b, batch)
        assert_trees_equal(metrics_a, metrics_b)
    assert_trees_equal(take_snapshot(a), take_snapshot(b))


def test_with_amp_and_with_compile_are_typed_to_return_the_kind_of_step_they_are_given():
    """Their one signature returned TrainStep | EvalStep, so ``step = with_amp(step)`` on a TrainStep failed a
    type checker (mypy: incompatible types in assignment)."""
    import typing

    from loopkit.steps import EvalStep, TrainStep

    for transform in (loopkit.with_amp, loopkit.with_compile):
        pairs = [(typing.get_type_hints(o)["step"], typing.get_type_hints(o)["return"]) for o in typing.get_overloads(transform)]
        assert (TrainStep, TrainStep) in pairs and (EvalStep, EvalStep) in pairs
