"""Tests of loopkit.summary against hand counts of each model's parameters (``numel`` summed by hand) and
against the table Lightning 2.6.6's ``summarize`` printed for the same model (its columns but FLOPs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loopkit
from loopkit.summary import human_count, summarize


class Tied(nn.Module):
    """An embedding whose weight the decoder shares, a frozen projection and a BatchNorm in eval mode."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)           # 40
        self.frozen = nn.Linear(4, 4)              # 20, frozen
        self.norm = nn.BatchNorm1d(4).eval()       # 8 (running stats are buffers)
        self.decoder = nn.Linear(4, 10, bias=False)  # 40, the embedding's weight
        self.decoder.weight = self.embed.weight
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_counts_a_shared_parameter_once_and_frozen_ones_as_not_trainable():
    s = summarize(Tied())
    assert [(layer.name, layer.type, layer.parameters, layer.mode) for layer in s.layers] == [
        ("embed", "Embedding", 40, "train"), ("frozen", "Linear", 20, "train"), ("norm", "BatchNorm1d", 8, "eval"),
        ("decoder", "Linear", 40, "train"),
    ]
    assert (s.total_parameters, s.trainable_parameters) == (40 + 20 + 8, 40 + 8)
    assert (s.modules_in_train_mode, s.modules_in_eval_mode) == (3, 1)
    assert s.size_mb == 68 * 4 / 1e6


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.act, self.drop, self.l2 = nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10)
        self.drop.eval()


# printed by Lightning 2.6.6's summarize() of a LightningModule with _Net's four layers (the same attributes)
_LIGHTNING_TABLE = """\
  | Name | Type    | Params | Mode  | FLOPs
-------------------------------------------------
0 | l1   | Linear  | 100 K  | train | 0
1 | act  | ReLU    | 0      | train | 0
2 | drop | Dropout | 0      | eval  | 0
3 | l2   | Linear  | 1.3 K  | train | 0
-------------------------------------------------
101 K     Trainable params
0         Non-trainable params
101 K     Total params
0.407     Total estimated model params size (MB)
3         Modules in train mode
1         Modules in eval mode
0         Total Flops"""


def test_the_table_is_lightnings_without_its_flops():
    """Lightning's table with its FLOPs column (all 0 without an example_input_array) and rule lines left out."""
    expected = [
        line.rsplit(" | ", 1)[0].rstrip() if " | " in line else line
        for line in _LIGHTNING_TABLE.splitlines() if not line.startswith("---") and "Flops" not in line
    ]
    lines = [line for line in str(summarize(_Net())).splitlines() if not line.startswith("---")]
    assert lines == expected


@pytest.mark.parametrize("depth, names", [
    (0, []), (1, ["enc", "head"]), (2, ["enc", "enc.0", "enc.1", "head"]),
    (-1, ["enc", "enc.0", "enc.1", "enc.1.0", "head"]),
])
def test_max_depth(depth, names):
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3))))
    model.add_module("head", nn.Linear(3, 1))
    s = summarize(model, max_depth=depth)
    assert [layer.name for layer in s.layers] == names
    assert s.total_parameters == 9 + 12 + 4


def test_a_state_a_compiled_model_and_a_bfloat16_model():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert summarize(state).size_mb == 8 * 2 / 1e6
    compiled = torch.compile(nn.Sequential(nn.Linear(3, 2)))
    assert [layer.name for layer in summarize(compiled).layers] == ["0"]  # not "_orig_mod"


def test_a_lazy_module_counts_zero_and_says_so():
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 1))
    s = summarize(model)
    assert s.uninitialized and s.total_parameters == 5 and "lazy module" in str(s)
    model(torch.zeros(2, 3))
    assert summarize(model).total_parameters == 16 + 5 and not summarize(model).uninitialized


def test_human_count_is_lightnings():
    """Lightning's get_human_readable_count docstring examples, and its largest unit."""
    assert [human_count(n) for n in (0, 123, 1234, 2_000_000, 3_000_000_000, 4 * 10**14, 5 * 10**15)] == [
        "0  ", "123  ", "1.2 K", "2.0 M", "3.0 B", "400 T", "5,000 T"]


@pytest.mark.parametrize("target, depth, error, match", [
    ("model", 1, TypeError, "nn.Module or a TrainState, got str"),
    (nn.Linear(1, 1), -2, ValueError, "max_depth must be an int >= -1"),
    (nn.Linear(1, 1), 1.5, ValueError, "max_depth"),
])
def test_bad_input_is_named(target, depth, error, match):
    with pytest.raises(error, match=match):
        summarize(target, max_depth=depth)


class _WithToken(nn.Module):
    """A parameter on the model itself (a cls token), which no layer holds."""

    def __init__(self):
        super().__init__()
        self.lin, self.cls = nn.Linear(3, 4), nn.Parameter(torch.zeros(5))


# printed by Lightning 2.6.6's summarize() of a LightningModule with _WithToken's lin and cls, at max_depth 1 and 0
_LIGHTNING_OTHER_PARAMS = {
    1: """\
  | Name         | Type   | Params | Mode  | FLOPs
--------------------------------------------------------
0 | lin          | Linear | 16     | train | 0
  | other params | n/a    | 5      | n/a   | n/a""",
    0: """\
  | Name         | Type | Params | Mode | FLOPs
-----------------------------------------------------
  | other params | n/a  | 21     | n/a  | n/a""",
}


@pytest.mark.parametrize("depth", [1, 0])
def test_parameters_no_layer_holds_are_an_other_params_row_as_in_lightning(depth):
    """They were in the totals but in no row (at max_depth=0 the table had none)."""
    expected = [line.rsplit(" | ", 1)[0].rstrip() for line in _LIGHTNING_OTHER_PARAMS[depth].splitlines()
                if not line.startswith("---")]
    rows = [line for line in str(summarize(_WithToken(), max_depth=depth)).splitlines()[:4] if not line.startswith("---")]
    assert rows == expected


def test_a_child_reached_under_two_names_is_a_row_under_each_at_depth_one_as_in_lightning():
    """Lightning lists named_children(): a layer held by ``enc`` and as ``head`` is two rows; it was one."""
    model = nn.Module()
    shared = nn.Linear(3, 3)
    model.enc, model.head = nn.Sequential(shared), shared
    assert [(layer.name, layer.parameters) for layer in summarize(model).layers] == [("enc", 12), ("head", 12)]
    assert summarize(model).other_parameters == 0
