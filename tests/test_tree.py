"""Tests of loopkit.tree: to_device over nested batches, and the plain encoding of state.

Movement is observed on the ``meta`` device, which every machine has: a tensor that was
moved reports ``device.type == "meta"``; one that was not still says ``cpu``.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections import OrderedDict, UserDict, namedtuple

import numpy as np
import pytest
import torch

import loopkit
from loopkit.errors import StateMismatchError
from loopkit.tree import (
    compact_views, copy_tensors, from_plain, named_nodes, named_tensors, path_str, to_device, to_plain,
)

Pair = namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    label: str
    extra: list


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: torch.Tensor
    n: int


class Movable:
    """Not a tensor nor a container, but with ``.to(device)``."""

    def __init__(self, value: torch.Tensor, device=None):
        self.value, self.device = value, device

    def to(self, device):
        return Movable(self.value.to(device), device)


def on_meta(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def test_to_device_moves_a_plain_tensor():
    t = torch.ones(2, 3)
    moved = to_device(t, "meta")
    assert on_meta(moved) and moved.shape == (2, 3) and moved.dtype == t.dtype
    assert t.device.type == "cpu"  # the input is not changed


def test_to_device_nested_tuples_lists_dicts():
    batch = ({"x": torch.ones(2), "ids": [torch.zeros(1), (torch.ones(3), torch.ones(1))]}, [torch.ones(4)])
    moved = to_device(batch, "meta")
    assert type(moved) is tuple and type(moved[0]) is dict and type(moved[1]) is list
    assert on_meta(moved[0]["x"]) and on_meta(moved[0]["ids"][0])
    assert type(moved[0]["ids"][1]) is tuple and all(on_meta(t) for t in moved[0]["ids"][1])
    assert on_meta(moved[1][0])


def test_to_device_keeps_the_mapping_type():
    moved = to_device(OrderedDict([("b", torch.ones(1)), ("a", torch.ones(1))]), "meta")
    assert type(moved) is OrderedDict and list(moved) == ["b", "a"] and all(on_meta(v) for v in moved.values())


def test_to_device_namedtuple():
    moved = to_device(Pair(torch.ones(2), [torch.ones(1)]), "meta")
    assert type(moved) is Pair and on_meta(moved.x) and on_meta(moved.y[0])


def test_to_device_dataclasses():
    moved = to_device(Batch(torch.ones(2), "cat", [torch.ones(1), 3]), "meta")
    assert type(moved) is Batch and on_meta(moved.x) and moved.label == "cat"
    assert on_meta(moved.extra[0]) and moved.extra[1] == 3
    frozen = to_device(FrozenBatch(torch.ones(1), 5), "meta")
    assert type(frozen) is FrozenBatch and on_meta(frozen.x) and frozen.n == 5


def test_to_device_moves_dataclass_fields_set_after_init_and_keeps_a_defaultdicts_factory():
    from collections import defaultdict

    @dataclasses.dataclass
    class Masked:
        x: torch.Tensor
        mask: torch.Tensor = dataclasses.field(default=None, init=False)

    batch = Masked(torch.ones(2))
    batch.mask = torch.zeros(2)
    moved = to_device(batch, "meta")
    assert on_meta(moved.x) and on_meta(moved.mask) and not on_meta(batch.mask)  # the original untouched
    counts = defaultdict(list, {"a": torch.ones(1)})
    moved = to_device(counts, "meta")
    assert type(moved) is defaultdict and moved.default_factory is list and on_meta(moved["a"])


def test_to_device_objects_with_to():
    moved = to_device({"m": Movable(torch.ones(2))}, "meta")
    assert isinstance(moved["m"], Movable) and on_meta(moved["m"].value)
    assert moved["m"].device == torch.device("meta")


def test_to_device_moves_a_packed_sequence_as_its_own_to_does():
    """Its batch_sizes stay on the CPU (torch refuses them elsewhere); it was moved as a namedtuple, which failed."""
    packed = torch.nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(1, 2)])
    moved, reference = to_device({"x": packed}, "meta")["x"], packed.to("meta")
    assert type(moved) is type(packed) and on_meta(moved.data)
    assert [None if t is None else t.device for t in moved] == [None if t is None else t.device for t in reference]
    assert moved.batch_sizes.device == torch.device("cpu")


class EncodingLike(UserDict):
    """The shape of transformers' BatchEncoding: a mapping with attributes of its own and a ``.to`` that keeps them."""

    def __init__(self, data=None, encodings=None):
        super().__init__(data)
        self.encodings = encodings

    def to(self, device):
        self.data = {k: v.to(device) for k, v in self.data.items()}
        return self


@dataclasses.dataclass
class OwnMoveBatch:
    x: torch.Tensor
    ids: np.ndarray  # left where it is by the batch's own .to (to_device alone refuses an array)

    def to(self, device):
        return OwnMoveBatch(self.x.to(device), self.ids)


def test_to_device_moves_a_mapping_or_a_dataclass_with_its_own_to_by_it_as_lightning_does():
    """Reference: the object's own .to (Lightning's move_data_to_device calls it before taking a mapping or a
    dataclass apart); taken apart, the mapping lost its encodings and the dataclass's array was refused."""
    encoding = EncodingLike({"input_ids": torch.ones(2, 3)}, encodings=[[None, 0, 1]])
    reference = EncodingLike({"input_ids": torch.ones(2, 3)}, encodings=[[None, 0, 1]]).to("meta")
    moved = to_device({"enc": encoding}, "meta")["enc"]
    assert type(moved) is EncodingLike and moved.encodings == reference.encodings == [[None, 0, 1]]
    assert list(moved) == list(reference) and on_meta(moved["input_ids"]) and on_meta(reference["input_ids"])
    batch = OwnMoveBatch(torch.ones(2), np.arange(2))
    moved, reference = to_device([batch], "meta")[0], batch.to("meta")
    assert type(moved) is OwnMoveBatch and on_meta(moved.x) and on_meta(reference.x)
    assert moved.ids is reference.ids is batch.ids


class MovedInPlace:
    """A graph-like batch whose ``.to`` moves its tensors in place and returns nothing."""

    def __init__(self):
        self.x = torch.ones(2)

    def to(self, device, **kwargs):
        self.x = self.x.to(device)


def test_to_device_keeps_an_object_whose_to_moves_it_in_place_and_returns_none_as_lightning_does():
    """Reference: the object after its own .to, in place (Lightning's batch_to returns the object when .to returns
    None); it became None."""
    graph, reference = MovedInPlace(), MovedInPlace()
    reference.to("meta")
    moved = to_device({"g": graph, "y": torch.zeros(1)}, "meta")
    assert moved["g"] is graph and on_meta(graph.x) and on_meta(reference.x) and on_meta(moved["y"])


def test_to_device_passes_strings_numbers_and_none_through():
    leaves = ["text", b"raw", 3, 2.5, 1j, True, None, np.float32(1.5), np.int64(2), np.bool_(True), np.float64(3.0)]
    moved = to_device([torch.ones(1)] + leaves, "meta")
    assert on_meta(moved[0])
    assert all(a is b for a, b in zip(moved[1:], leaves))


@pytest.mark.parametrize(
    "batch, path",
    [
        ([{"x": object()}], "batch[0]['x']"),
        ({"a": (torch.ones(1), object())}, "batch['a'][1]"),
        (Pair(torch.ones(1), object()), "batch.y"),
        (Batch(torch.ones(1), "ok", [object()]), "batch.extra[0]"),
        (object(), "batch of type"),
    ],
)
def test_to_device_names_the_path_and_type_it_cannot_move(batch, path):
    with pytest.raises(TypeError) as info:
        to_device(batch, "meta")
    message = str(info.value)
    assert path in message and "object" in message and "meta" in message


def test_named_tensors_names_each_tensor_where_to_device_names_it():
    """A namedtuple's fields were named batch[0], batch[1] where to_device names them batch.x, batch.y (so
    check_purity's 'changed the batch' named another path than to_device's error). Reference: to_device's error for
    something it cannot move put in each tensor's place."""

    def batch(bad=None):
        leaves = [object() if i == bad else torch.ones(1) for i in range(4)]
        return {"pair": Pair(leaves[0], [leaves[1], "id"]), "d": Batch(leaves[2], "ok", [Pair(1, leaves[3])])}

    names = [name for name, _ in named_tensors(batch())]
    assert names == ["batch['pair'].x", "batch['pair'].y[0]", "batch['d'].x", "batch['d'].extra[0].y"]
    for i, name in enumerate(names):
        with pytest.raises(TypeError, match=f"cannot move {re.escape(name)} of type object"):
            to_device(batch(bad=i), "meta")


def test_named_nodes_names_every_node_where_to_device_names_it_and_its_tensors_as_named_tensors():
    """What check_purity's batch snapshot walks (numpy arrays, lists, plain values, not only tensors). Reference:
    to_device's error for something it cannot move put in each leaf's place, and named_tensors for the tensors."""

    def batch(bad=None):
        array = np.zeros(2) if bad is None else torch.zeros(2)  # (an array, which to_device does not move, when walked)
        leaves = [object() if i == bad else leaf for i, leaf in enumerate([torch.ones(1), "id", array, 3])]
        return {"pair": Pair(leaves[0], [leaves[1]]), "d": Batch(leaves[2], "ok", [Pair(1, leaves[3])])}

    nodes = dict(named_nodes(batch()))
    assert [name for name, node in nodes.items() if isinstance(node, torch.Tensor)] == [
        name for name, _ in named_tensors(batch())]
    assert isinstance(nodes["batch['pair'].y"], list) and isinstance(nodes["batch['d'].x"], np.ndarray)
    assert nodes["batch['d'].extra[0].y"] == 3
    for i, name in enumerate(["batch['pair'].x", "batch['pair'].y[0]", "batch['d'].x", "batch['d'].extra[0].y"]):
        assert name in nodes
        with pytest.raises(TypeError, match=f"cannot move {re.escape(name)} of type object"):
            to_device(batch(bad=i), "meta")


def test_to_device_refuses_a_set_and_a_class():
    with pytest.raises(TypeError, match=r"batch\[1\] of type set"):
        to_device([torch.ones(1), {1, 2}], "cpu")
    with pytest.raises(TypeError, match="batch of type type"):
        to_device(Movable, "cpu")  # a class has an unbound .to: not movable


def test_to_device_is_the_public_name():
    assert loopkit.to_device is to_device


# --- the plain encoding used by state_dict ----------------------------------------------------


def test_to_plain_and_from_plain_round_trip():
    template = {"lr": 0.1, "betas": (0.9, 0.99), "name": "adam", "buf": torch.zeros(2), "groups": [1, 2], "x": None}
    value = {"lr": 0.5, "betas": (0.8, 0.9), "name": "sgd", "buf": torch.ones(2), "groups": [3, 4], "x": None}
    plain = to_plain(value)
    assert plain["betas"] == {"0": 0.8, "1": 0.9} and "x" not in plain
    decoded = from_plain(plain, template)
    assert decoded["betas"] == (0.8, 0.9) and decoded["groups"] == [3, 4] and decoded["name"] == "sgd"
    assert torch.equal(decoded["buf"], torch.ones(2)) and decoded["x"] is None


def test_copy_tensors_and_from_plain_keep_a_namedtuple_and_a_subclass_of_list_or_tuple():
    """Both rebuilt every tuple as type(t)(items), which a namedtuple's constructor refuses (it takes the fields one
    by one); from_plain also gave a list subclass back as a plain list. Reference: the template's own values."""

    class Ids(list):
        pass

    tensor = torch.ones(2)
    copied = copy_tensors({"p": Pair(tensor, 2), "ids": Ids([tensor])})
    assert type(copied["p"]) is Pair and copied["p"].y == 2 and type(copied["ids"]) is Ids
    assert copied["p"].x is not tensor and torch.equal(copied["p"].x, tensor) and copied["ids"][0] is not tensor
    template = {"betas": Pair(0.9, 0.99), "ids": Ids([1, 2])}
    decoded = from_plain(to_plain(template), template)
    assert decoded == template and type(decoded["betas"]) is Pair and type(decoded["ids"]) is Ids


def test_to_plain_names_the_path_of_a_leaf_it_refuses():
    with pytest.raises(TypeError, match="'extras.scaler.fn' is a function"):
        to_plain({"scaler": {"fn": lambda: 0}}, ("extras",))


@pytest.mark.parametrize(
    "plain, match",
    [
        ({"a": {"w": torch.zeros(2)}}, "missing key 'opt.a.b'"),
        ({"a": {"w": torch.zeros(2), "b": 1, "c": 2}}, "unexpected key 'opt.a.c'"),
        ({"a": {"w": torch.zeros(3), "b": 1}}, r"mis-shaped key 'opt.a.w'.*\(3,\).*\(2,\)"),
        ({"a": {"w": 1.0, "b": 1}}, "'opt.a.w' holds a float, expected a tensor"),
        ({"a": {"w": torch.zeros(2), "b": "x"}}, "'opt.a.b' holds a str, expected a number"),
    ],
)
def test_from_plain_names_the_first_bad_key(plain, match):
    template = {"a": {"w": torch.zeros(2), "b": 0}}
    with pytest.raises(StateMismatchError, match=match):
        from_plain(plain, template, ("opt",))


def test_path_str():
    assert path_str(("optimizer", "state", "0")) == "optimizer.state.0"


def test_number_like_leaves_are_held_as_plain_python_values():
    """numpy's float64 (a float subclass) went through as it was, and torch.load(weights_only=True) then refused
    the whole file; numpy's other numbers were refused at save time though every loopkit option takes them.
    Reference: the Python value each stands for, and a weights_only load of the encoding."""
    import enum
    import io

    from loopkit.tree import decode_tree, encode_tree

    class Level(enum.IntEnum):
        HIGH = 2

    class Mode(str, enum.Enum):
        MAX = "max"

    tree = {"lr": np.float64(0.01), "f32": np.float32(1.5), "n": np.int64(3), "flag": np.bool_(True),
            "level": Level.HIGH, "mode": Mode.MAX}
    expected = {"lr": 0.01, "f32": 1.5, "n": 3, "flag": True, "level": 2, "mode": "max"}
    for encode in (to_plain, encode_tree):
        plain = encode(tree)
        assert plain == expected and all(type(plain[k]) is type(v) for k, v in expected.items())
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True) == expected
    assert decode_tree(encode_tree(tree)) == expected


def test_compact_views_copies_out_the_part_of_a_larger_storage_that_views_use_and_keeps_ties():
    """torch.save writes a view's whole storage: a slice [k] of a stacked [K, ...] tensor (an ensemble member's
    parameter) wrote all K. The views of one storage are copied together (they still share one, as tied weights do);
    tensors that span their storage (a buffer and a slice of it, together) are kept as they are, not copied."""
    stacked, moments = torch.randn(8, 16, 16), torch.randn(8, 16)
    whole = torch.randn(10)
    head = whole[:4]
    tree = {"model": {"w": stacked[3], "tied": stacked[3], "t": stacked[3].t(), "b": whole, "head": head},
            "opt": [moments[5], (1, "x")]}
    out = compact_views(tree)
    for path in [("model", "w"), ("model", "tied"), ("model", "t")]:
        assert torch.equal(out[path[0]][path[1]], tree[path[0]][path[1]])
    assert out["model"]["w"].untyped_storage().nbytes() == 16 * 16 * 4  # member 3's alone, not 8 members'
    assert out["model"]["tied"].untyped_storage().data_ptr() == out["model"]["w"].untyped_storage().data_ptr()
    assert out["model"]["t"].stride() == (1, 16) and out["model"]["t"].data_ptr() == out["model"]["w"].data_ptr()
    assert torch.equal(out["opt"][0], moments[5]) and out["opt"][0].untyped_storage().nbytes() == 16 * 4
    assert out["model"]["b"] is whole and out["model"]["head"] is head and out["opt"][1] == (1, "x")
    sizes = []
    for saved in (tree, out):
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        sizes.append(buffer.tell())
    assert sizes[1] < sizes[0] / 3
    plain = {"w": torch.ones(3), "n": 1}
    assert compact_views(plain) is plain  # nothing to copy: the same tree, its tensors shared
