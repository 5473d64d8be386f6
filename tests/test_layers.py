"""The package's layers: a module imports only from its own layer or lower ones, lazily or not.

Lowest first: state and pytree helpers -> steps -> transforms -> driver -> integrations (logging
back-ends, distributed, tune, ensemble, the finders). The imports are read from the source (``ast``),
so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "loopkit"

#: each module's layer; a module a new file adds must be placed here (the test says so)
LAYERS: dict[str, int] = {
    **dict.fromkeys(["errors", "rng", "_numbers", "_collective", "_sharded", "tree", "plot", "_calls"], 0),
    **dict.fromkeys(["state", "_epoch_data", "progress"], 1),
    **dict.fromkeys(["steps", "_window", "_agreement", "checkpoint", "debug", "summary"], 2),
    "transforms": 3,  # (the package and each transform's module)
    **dict.fromkeys(["callbacks", "driver"], 4),
    **dict.fromkeys(["loggers", "trackers", "distributed", "tune", "lr_finder", "batch_size_finder", "_search",
                     "throughput", "ensemble", "__main__", "__init__"], 5),
}


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def _name(path: pathlib.Path) -> str:
    """``loopkit/transforms/amp.py`` -> ``transforms``; ``loopkit/state.py`` -> ``state``."""
    return path.relative_to(ROOT).with_suffix("").parts[0]


def _imported(path: pathlib.Path) -> set[str]:
    """The loopkit modules ``path`` imports, by their layer names (``from loopkit import state`` counts)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "loopkit":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names if (ROOT / f"{alias.name}.py").exists()
                             or (ROOT / alias.name).is_dir())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "loopkit" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    assert sorted({_name(p) for p in _modules()} - set(LAYERS)) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_nothing_from_a_higher_layer(path):
    own = LAYERS[_name(path)]
    higher = sorted(m for m in _imported(path) if LAYERS.get(m, -1) > own)
    assert higher == [], f"{path.relative_to(ROOT.parent)} (layer {own}) imports {higher} from a higher layer"


def test_the_reader_sees_a_lazy_import_of_a_higher_layer(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from loopkit.loggers import CSVLogger\n    import loopkit.driver\n")
    assert _imported(source) == {"loggers", "driver"}
