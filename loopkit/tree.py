"""Helpers for nested structures: moving batches to a device, and encoding state as plain data.

>>> import torch
>>> to_device({"x": torch.ones(2), "ids": [torch.zeros(1)]}, "cpu")["ids"][0].device.type
'cpu'
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from loopkit.errors import StateMismatchError

__all__ = [
    "compact_views", "copy_tensors", "decode_tree", "device_available", "devices_here", "encode_tree", "from_plain",
    "named_nodes", "named_tensors", "path_str", "sequence_like",
    "tensors",
    "to_device", "to_plain",
]

#: the key under which :func:`encode_tree` records what a mapping it made stands for
KIND = "__loopkit_kind__"

_PASS_THROUGH = (str, bytes, numbers.Number, bool, type(None), np.generic)  # (numpy's scalars: np.float32, np.bool_)


def to_device(batch: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """Move every tensor in a nested batch to ``device``.

    Handles tensors, tuples, lists, dicts, namedtuples, dataclasses and any object with a
    ``.to(device)`` method. An object with its own ``.to`` is moved by it, not taken apart, even a mapping or a
    dataclass (a ``PackedSequence``, transformers' ``BatchEncoding``), as Lightning's ``move_data_to_device``
    does; one whose ``.to`` moves it in place and returns None is returned itself. Strings, numbers (numpy's
    scalars too) and ``None`` pass through unchanged. Anything else raises ``TypeError`` naming where in the
    batch it sits.

    >>> import torch
    >>> from collections import namedtuple
    >>> Pair = namedtuple("Pair", "x y")
    >>> moved = to_device(Pair(torch.ones(1), "label"), "cpu")
    >>> moved.y
    'label'
    >>> to_device([object()], "cpu")
    Traceback (most recent call last):
    ...
    TypeError: to_device cannot move batch[0] of type object to cpu: only tensors, tuples, lists, dicts, dataclasses, namedtuples, objects with .to(device), strings, numbers and None are supported
    """
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise TypeError(f"to_device: device must be a torch.device or a string such as 'cuda', got {type(device).__qualname__}"
                        " (the order is to_device(batch, device))")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"to_device: {device!r} is not a device ('cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    try:
        return _move(batch, device, non_blocking, "batch")
    except (AssertionError, RuntimeError) as error:  # (looked into only when a move failed)
        if device.type == "cpu" or device_available(device):
            raise
        raise ValueError(f"to_device: device {str(device)!r} is not available here ({devices_here(device)})") from error


def _device_count(device: torch.device) -> int:
    module = getattr(torch, device.type, None)
    try:
        return int(module.device_count()) if module is not None and hasattr(module, "device_count") else 0
    except (RuntimeError, AssertionError):
        return 0


def device_available(device: torch.device) -> bool:
    """Whether ``device`` (not the CPU) exists in this process: its backend is built and running, and its index
    is below the count (a plugged-in backend without ``device_count`` is taken as there).

    >>> device_available(torch.device("cuda:99"))
    False
    """
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "device_count"):
        return True
    count = _device_count(device)
    return count > 0 and (device.index is None or device.index < count)


def devices_here(device: torch.device) -> str:
    """What this process has of ``device``'s kind, for an error saying it is not available.

    >>> devices_here(torch.device("cuda:99")).startswith("torch ")
    True
    """
    return f"torch {torch.__version__}: {_device_count(device)} {device.type} device(s)"


def tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors of a batch, depth first through mappings, lists, tuples and dataclasses.

    >>> [tuple(t.shape) for t in tensors({"x": torch.zeros(2, 3), "meta": ("id", torch.ones(2))})]
    [(2, 3), (2,)]
    """
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors(value)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from tensors(getattr(tree, f.name, None))


def named_tensors(tree: Any, path: str = "batch") -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors :func:`tensors` finds, in its order, each with where it sits (as :func:`to_device` names it:
    a namedtuple's by field).

    >>> [name for name, _ in named_tensors({"x": torch.zeros(2), "ids": [torch.ones(1), "id"]})]
    ["batch['x']", "batch['ids'][0]"]
    >>> Pair = collections.namedtuple("Pair", "x y")
    >>> [name for name, _ in named_tensors(Pair(torch.zeros(2), torch.ones(1)))]
    ['batch.x', 'batch.y']
    """
    return ((name, node) for name, node in named_nodes(tree, path) if isinstance(node, torch.Tensor))


def named_nodes(tree: Any, path: str = "batch") -> Iterator[tuple[str, Any]]:
    """Everything in a batch, depth first, each with where it sits (as :func:`named_tensors` names it): a container
    (a mapping, list, tuple or dataclass) before what it holds, and each leaf (a tensor, a numpy array, a string).

    >>> [name for name, _ in named_nodes({"x": torch.zeros(2), "ids": [3, "id"]})]
    ['batch', "batch['x']", "batch['ids']", "batch['ids'][0]", "batch['ids'][1]"]
    """
    yield path, tree
    if isinstance(tree, torch.Tensor):
        return
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from named_nodes(value, f"{path}[{key!r}]")
    elif isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        for field, value in zip(tree._fields, tree):
            yield from named_nodes(value, f"{path}.{field}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from named_nodes(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from named_nodes(getattr(tree, f.name, None), f"{path}.{f.name}")


def _move(obj: Any, device: torch.device, non_blocking: bool, path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, _PASS_THROUGH):
        return obj
    # one that moves itself, by its own .to before any taking apart, as Lightning's move_data_to_device: a
    # PackedSequence (its batch_sizes stay on the CPU, as torch's own .to keeps them), a Mapping (transformers'
    # BatchEncoding keeps its other attributes), a dataclass (its .to knows its fields). One whose .to moves it in
    # place and returns None is kept, as Lightning keeps it
    if callable(getattr(obj, "to", None)) and not isinstance(obj, type):
        moved = obj.to(device)
        return obj if moved is None else moved
    if isinstance(obj, Mapping):
        moved = {k: _move(v, device, non_blocking, f"{path}[{k!r}]") for k, v in obj.items()}
        return moved if type(obj) is dict else _rebuild_mapping(obj, moved)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return sequence_like(obj, [_move(v, device, non_blocking, f"{path}.{f}") for f, v in zip(obj._fields, obj)])
    if isinstance(obj, (list, tuple)):
        return sequence_like(obj, [_move(v, device, non_blocking, f"{path}[{i}]") for i, v in enumerate(obj)])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # a copy with every field moved, init=False ones too (dataclasses.replace would reset those)
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            if hasattr(obj, f.name):
                object.__setattr__(new, f.name, _move(getattr(obj, f.name), device, non_blocking, f"{path}.{f.name}"))
        return new
    raise TypeError(
        f"to_device cannot move {path} of type {type(obj).__qualname__} to {device}: only tensors, "
        "tuples, lists, dicts, dataclasses, namedtuples, objects with .to(device), strings, numbers "
        "and None are supported"
    )


def sequence_like(template: list | tuple, items: list[Any]) -> list | tuple:
    """``items`` (a new list) as a list or tuple of ``template``'s own type: a plain list as it is, a namedtuple
    by position (its constructor takes the fields one by one), any other tuple and a subclass of list or tuple
    from the list.

    >>> Pair = collections.namedtuple("Pair", "a b")
    >>> sequence_like(Pair(1, 2), [3, 4]), sequence_like((1, 2), [3, 4]), sequence_like([1], [5])
    (Pair(a=3, b=4), (3, 4), [5])
    """
    kind = type(template)
    if kind is list:
        return items
    if kind is not tuple and hasattr(template, "_fields") and isinstance(template, tuple):
        return kind(*items)
    return kind(items)


def _rebuild_mapping(original: Mapping, moved: dict) -> Mapping:
    if isinstance(original, collections.defaultdict):  # its factory is the constructor's first argument
        return type(original)(original.default_factory, moved)
    try:
        return type(original)(moved)
    except TypeError:
        return moved


def copy_tensors(tree: Any, device: torch.device | str | None = None) -> Any:
    """``tree`` with every tensor copied (detached; to ``device`` if given), mappings as dicts.

    >>> t = torch.ones(2)
    >>> copy = copy_tensors({"a": (t, 1)})
    >>> copy["a"][0] is t, bool(torch.equal(copy["a"][0], t)), copy["a"][1]
    (False, True, 1)
    """
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone() if device is None else tree.detach().to(device, copy=True)
    if isinstance(tree, Mapping):
        return {k: copy_tensors(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return sequence_like(tree, [copy_tensors(v, device) for v in tree])
    return tree


def compact_views(tree: Any) -> Any:
    """``tree`` (mappings, lists, tuples) with the tensors that use only part of their storage copied out compactly,
    for saving: ``torch.save`` writes a tensor's whole storage, so a view of part of a larger one (a member of a live
    ``loopkit.ensemble``: its parameters are slices ``[k]`` of the stacked ``[K, ...]`` storage) would write every
    member's. The tensors of one storage are copied together, as views of one copy of the bytes they span: tensors
    that share a storage (tied weights) still share one, and tensors that span their whole storage are kept as they
    are (not copied). A tree with no such tensor comes back as it is (the same object); else a new one, mappings as
    dicts. Plain strided tensors only (a tensor subclass, a quantized, conjugated or meta tensor is kept as it is).

    >>> stacked = torch.arange(8.0).reshape(4, 2)
    >>> out = compact_views({"w": stacked[1], "tied": stacked[1], "all": torch.ones(3)})
    >>> out["w"].tolist(), out["w"].untyped_storage().nbytes(), out["tied"].data_ptr() == out["w"].data_ptr()
    ([2.0, 3.0], 8, True)
    >>> tree = {"w": torch.ones(3)}
    >>> compact_views(tree) is tree
    True
    """
    groups: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
    for t in tensors(tree):
        if type(t) is torch.Tensor and t.layout is torch.strided and t.device.type != "meta" and not (
                t.is_quantized or t.is_conj() or t.is_neg()):
            storage = t.untyped_storage()
            if storage.nbytes():
                groups.setdefault((t.device, storage.data_ptr()), []).append(t)
    copies: dict[int, torch.Tensor] = {}
    for group in groups.values():
        copies.update(_compacted(group))
    return _with_tensors(tree, copies) if copies else tree


def _compacted(group: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """For tensors of one storage: ``id`` of each -> its view of one copy of the bytes they span, if they span less
    than the whole storage (and each starts a whole number of its elements into that span); else nothing."""
    spans = []
    for t in group:
        size = t.element_size()
        extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * step for n, step in zip(t.shape, t.stride()))
        spans.append((t.storage_offset() * size, (t.storage_offset() + extent) * size))
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    storage = group[0].untyped_storage()
    if end - start >= storage.nbytes() or any((a - start) % t.element_size() for t, (a, _) in zip(group, spans)):
        return {}
    with torch.no_grad():
        part = torch.empty(0, dtype=torch.uint8, device=group[0].device).set_(storage)[start:end].clone()
        held = part.untyped_storage()
        return {id(t): torch.empty(0, dtype=t.dtype, device=t.device).set_(
            held, (a - start) // t.element_size(), t.size(), t.stride()) for t, (a, _) in zip(group, spans)}


def _with_tensors(tree: Any, copies: Mapping[int, torch.Tensor]) -> Any:
    """``tree`` with each tensor whose ``id`` is in ``copies`` replaced by its copy (mappings as dicts)."""
    if isinstance(tree, torch.Tensor):
        return copies.get(id(tree), tree)
    if isinstance(tree, Mapping):
        return {k: _with_tensors(v, copies) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return sequence_like(tree, [_with_tensors(v, copies) for v in tree])
    return tree


def path_str(path: tuple[str, ...]) -> str:
    """Join a key path with dots, as error messages name it.

    >>> path_str(("model", "fc.weight"))
    'model.fc.weight'
    """
    return ".".join(path)


#: the leaves a state dict holds as they are
_PLAIN = frozenset((bool, int, float, str))
#: leaves held as the plain value they stand for: a subclass of those (numpy's float64, an IntEnum) and numpy's
#: other real numbers, which ``torch.load(weights_only=True)`` refuses to unpickle
_NUMBER_LIKE = (bool, int, float, str, np.bool_, np.integer, np.floating)


def _plain_leaf(obj: Any) -> bool | int | float | str:
    """``obj`` (one of :data:`_NUMBER_LIKE`) as a plain ``bool``, ``int``, ``float`` or ``str``.

    >>> _plain_leaf(np.float64(0.5)), _plain_leaf(np.int64(3)), _plain_leaf(np.bool_(True))
    (0.5, 3, True)
    """
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return str.__str__(obj)  # (a str subclass's own text: an Enum mixing str in prints otherwise)


def to_plain(obj: Any, path: tuple[str, ...] = ()) -> Any:
    """Encode ``obj`` as nested dicts whose leaves are tensors, numbers and strings only.

    Lists and tuples become dicts keyed ``"0"``, ``"1"``, ...; ``None`` values are dropped
    (a loader keeps its own); any other leaf raises ``TypeError`` naming its path.

    >>> to_plain({"lr": 0.1, "betas": (0.9, 0.99), "foreach": None})
    {'lr': 0.1, 'betas': {'0': 0.9, '1': 0.99}}
    """
    if isinstance(obj, torch.Tensor):
        return obj
    if type(obj) in _PLAIN:
        return obj
    if isinstance(obj, _NUMBER_LIKE):
        return _plain_leaf(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, path + (str(k),)) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return {str(i): to_plain(v, path + (str(i),)) for i, v in enumerate(obj) if v is not None}
    raise TypeError(
        f"state at '{path_str(path)}' is a {type(obj).__qualname__}; a state dict holds tensors, "
        "numbers and strings only"
    )


def encode_tree(obj: Any, path: tuple[str, ...] = ()) -> Any:
    """Encode ``obj`` as :func:`to_plain` does, but so that :func:`decode_tree` gives it back as it was.

    Leaves are tensors, numbers and strings; a list, tuple or ``None``, and a mapping with keys
    that are not all strings, become a mapping that records what it was under the string key
    :data:`KIND`. For state without a template to decode it by (``TrainState.extras``).

    >>> encode_tree({"seen": (1, 2), "by_epoch": {0: 0.5}, "best": None})["seen"]
    {'0': 1, '1': 2, '__loopkit_kind__': 'tuple'}
    >>> tree = {"seen": (1, 2), "by_epoch": {0: 0.5}, "best": None, "names": ["a"]}
    >>> decode_tree(encode_tree(tree)) == tree
    True
    """
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, _NUMBER_LIKE):
        return _plain_leaf(obj)
    if obj is None:
        return {KIND: "none"}
    if isinstance(obj, (list, tuple)):
        out = {str(i): encode_tree(v, path + (str(i),)) for i, v in enumerate(obj)}
        out[KIND] = "list" if isinstance(obj, list) else "tuple"
        return out
    if isinstance(obj, Mapping):
        if all(type(k) is str for k in obj) and KIND not in obj:
            return {k: encode_tree(v, path + (k,)) for k, v in obj.items()}
        keys = {str(i): encode_tree(k, path + (str(k),)) for i, k in enumerate(obj)}
        values = {str(i): encode_tree(v, path + (str(k),)) for i, (k, v) in enumerate(obj.items())}
        return {KIND: "mapping", "keys": keys, "values": values}
    raise TypeError(
        f"state at '{path_str(path)}' is a {type(obj).__qualname__}; a state dict holds tensors, "
        "numbers and strings only"
    )


def decode_tree(plain: Any, path: tuple[str, ...] = ()) -> Any:
    """The structure :func:`encode_tree` encoded as ``plain``; a mapping without its tag stays a dict.

    Raises :class:`loopkit.StateMismatchError` naming a leaf that is not a tensor, number or string.

    >>> decode_tree({"n": {"0": 3, "__loopkit_kind__": "list"}})
    {'n': [3]}
    """
    if isinstance(plain, (torch.Tensor, bool, int, float, str)):
        return plain
    if not isinstance(plain, Mapping):
        raise _mismatch(f"key '{path_str(path)}' holds a {type(plain).__qualname__}; a state dict holds tensors, "
                        "numbers and strings only")
    kind = plain.get(KIND)
    if kind is None:
        return {k: decode_tree(v, path + (str(k),)) for k, v in plain.items()}
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        missing = [str(i) for i in range(len(plain) - 1) if str(i) not in plain]
        if missing:
            raise _mismatch(f"missing key '{path_str(path + (missing[0],))}' of a {kind}")
        items = [decode_tree(plain[str(i)], path + (str(i),)) for i in range(len(plain) - 1)]
        return items if kind == "list" else tuple(items)
    if kind == "mapping":
        try:
            keys, values = plain["keys"], plain["values"]
            return {decode_tree(keys[i], path + (i,)): decode_tree(values[i], path + (i,)) for i in sorted(keys, key=int)}
        except (KeyError, TypeError, ValueError) as e:
            raise _mismatch(f"key '{path_str(path)}' holds a malformed tagged mapping ({e!r})") from None
    raise _mismatch(f"key '{path_str(path + (KIND,))}' holds {kind!r}, which no loopkit state dict writes")


def from_plain(plain: Any, template: Any, path: tuple[str, ...] = ()) -> Any:
    """Decode ``plain`` (as made by :func:`to_plain`) into the structure of ``template``.

    Raises :class:`loopkit.StateMismatchError` naming the first missing, unexpected or
    mis-shaped key. Returns the decoded structure; nothing is modified.

    >>> from_plain({"lr": 0.5, "betas": {"0": 0.8, "1": 0.9}}, {"lr": 0.1, "betas": (0.9, 0.99), "foreach": None})
    {'lr': 0.5, 'betas': (0.8, 0.9), 'foreach': None}
    >>> from_plain({"lr": 0.5, "momentum": 0.9}, {"lr": 0.1})
    Traceback (most recent call last):
    ...
    loopkit.errors.StateMismatchError: unexpected key 'momentum'
    """
    if template is None:
        return None
    if isinstance(template, torch.Tensor):
        if not isinstance(plain, torch.Tensor):
            raise _mismatch(f"key '{path_str(path)}' holds a {type(plain).__qualname__}, expected a tensor")
        if plain.shape != template.shape:
            raise _mismatch(
                f"mis-shaped key '{path_str(path)}': the state dict has shape {tuple(plain.shape)}, "
                f"the state has {tuple(template.shape)}"
            )
        return plain
    if isinstance(template, _NUMBER_LIKE) and not isinstance(template, str):  # (numpy's numbers too: a template's
        if isinstance(plain, torch.Tensor) or not isinstance(plain, (bool, int, float)):  # np.float32 hyper-parameter)
            raise _mismatch(f"key '{path_str(path)}' holds a {type(plain).__qualname__}, expected a number")
        return plain
    if isinstance(template, str):
        if not isinstance(plain, str):
            raise _mismatch(f"key '{path_str(path)}' holds a {type(plain).__qualname__}, expected a string")
        return plain
    if isinstance(template, (Mapping, list, tuple)):
        if not isinstance(plain, Mapping):
            raise _mismatch(f"key '{path_str(path)}' holds a {type(plain).__qualname__}, expected a mapping")
        items = template.items() if isinstance(template, Mapping) else enumerate(template)
        decoded: dict = {}
        for k, v in items:
            key = str(k)
            if v is not None and key not in plain:
                raise _mismatch(f"missing key '{path_str(path + (key,))}'")
            decoded[k] = from_plain(plain.get(key), v, path + (key,))
        known = {str(k) for k, _ in (template.items() if isinstance(template, Mapping) else enumerate(template))}
        for key in plain:
            if key not in known:
                raise _mismatch(f"unexpected key '{path_str(path + (key,))}'")
        if isinstance(template, Mapping):
            return _like(template, decoded)
        return sequence_like(template, list(decoded.values()))
    raise TypeError(f"cannot decode state at '{path_str(path)}' into a {type(template).__qualname__}")


def _like(template: Mapping[Any, Any], decoded: dict[Any, Any]) -> Mapping[Any, Any]:
    """``decoded`` as a mapping of ``template``'s own type (a scheduler's ``Counter`` of milestones), a dict
    when that type cannot be copied and filled."""
    if type(template) is dict:
        return decoded
    try:
        out = copy.copy(template)
        out.clear()  # type: ignore[attr-defined]
        out.update(decoded)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return decoded
    return out


def _mismatch(message: str) -> StateMismatchError:
    return StateMismatchError(message)
