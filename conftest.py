"""The whole suite's (tests and doctests) environment for the experiment trackers: no network.

Weights & Biases runs offline, quiet, without system metrics, git or code capture, and keeps its
cache and settings in a temporary folder (not ``~/.cache/wandb``); MLflow sends no telemetry and a
``MLFLOW_TRACKING_URI`` of the developer's own is not used (every logger of the suite is given a
local store). Set before any test imports wandb or mlflow, and put back afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_QUIET = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB__DISABLE_STATS": "true",
    "WANDB__DISABLE_META": "true",
    "WANDB__DISABLE_MACHINE_INFO": "true",
    "WANDB__SAVE_REQUIREMENTS": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
_FOLDERS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
_UNSET = ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME")


def pytest_configure(config: Any) -> None:
    home = tempfile.mkdtemp(prefix="loopkit-trackers-")
    changes = dict(_QUIET, **{name: os.path.join(home, name.lower()) for name in _FOLDERS})
    config._trackers_env = ({name: os.environ.get(name) for name in (*changes, *_UNSET)}, home)
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(changes)


def pytest_unconfigure(config: Any) -> None:
    saved, home = getattr(config, "_trackers_env", ({}, None))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
