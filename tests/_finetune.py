"""docs/from_lightning.md's ``BackboneFinetuning`` recipe, shared by the data-parallel workers' ``unfreeze`` scenario
(tests/_ddp_script.py, tests/_fsdp_script.py) and the tests that build its references.

The workers run as files under torchrun (their folder, not the repository's root, on ``sys.path``): they put the
root on the path before importing this module. Like them, it imports loopkit only where it is used.

>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
>>> state = frozen_state(model)
>>> state.model[0].weight.requires_grad, len(state.optimizer.param_groups)
(False, 1)
>>> Unfreeze().on_epoch_start(state.evolve(epoch=UNFREEZE_AT))
>>> state.model[0].weight.requires_grad, len(state.optimizer.param_groups)
(True, 2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

UNFREEZE_EPOCHS, UNFREEZE_AT = 3, 1


class Unfreeze:
    """At epoch ``UNFREEZE_AT`` the first layer trains too, in a group of its own (taken from the model then: under
    ``with_fsdp`` the sharded parameters); a resumed fit past that point unfreezes it at its start (the group is in
    the optimizer)."""

    def on_fit_start(self, state: Any) -> None:
        if (state.epoch, state.batch_index) > (UNFREEZE_AT, 0):
            state.model[0].requires_grad_(True)

    def on_epoch_start(self, state: Any) -> None:
        if state.epoch == UNFREEZE_AT and state.batch_index == 0:
            state.model[0].requires_grad_(True)
            state.optimizer.add_param_group({"params": list(state.model[0].parameters()), "lr": 0.05})


def frozen_state(model: nn.Module, groups: int = 1) -> Any:
    """A state of ``model`` (``Sequential(Linear, Tanh, Linear)``) with its first layer frozen, SGD (momentum 0.9)
    over the last; ``groups=2``: the first layer's group added (still frozen), a resume's template after the
    unfreeze."""
    import loopkit

    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    if groups == 2:
        optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})
    return loopkit.TrainState.create(model, optimizer)
