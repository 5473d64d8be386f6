"""Optimizers of one's own whose state dicts hold more than torch's ``state`` and ``param_groups`` (an entry beside
them, an entry of ``state`` under a name, a wrapper's own layout), shared by tests/test_state.py and
tests/transforms/test_fsdp.py; the states they train (on the mean square of the output, ``squares``).

>>> state = fresh_state(CountingSGD)
>>> sorted(state.optimizer.state_dict())
['param_groups', 'scales', 'state', 'updates']
"""

from __future__ import annotations

import torch
from torch import nn

import loopkit


def squares(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The loss: the mean square of the model's output."""
    return model(batch).pow(2).mean()


class CountingSGD(torch.optim.SGD):
    """SGD halving its rate at every third update, counting the updates in an attribute its state_dict() carries
    beside torch's entries (with the rates it took, a list)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.updates, self.scales = 0, []

    @torch.no_grad()
    def step(self, closure=None):
        self.updates += 1
        self.scales.append(0.5 if self.updates % 3 == 0 else 1.0)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] * self.scales[-1])

    def state_dict(self):
        return {**super().state_dict(), "updates": self.updates, "scales": list(self.scales)}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.updates, self.scales = state_dict.pop("updates", 0), list(state_dict.pop("scales", []))
        super().load_state_dict(state_dict)


class GlobalCountSGD(torch.optim.Optimizer):
    """An optimizer keeping an entry of its own in ``self.state`` under a name, not a parameter (torch's state dict
    keeps it under that name): its rate falls as 1/n with the update count n."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        entry = self.state["global"]
        entry["n"] = entry.get("n", 0) + 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] / entry["n"])


class Lookahead(torch.optim.Optimizer):
    """A Lookahead-style wrapper whose state_dict() is laid out its own way: ``{"fast": ..., "slow": ...}``."""

    def __init__(self, params, lr, k=2, alpha=0.5):
        self.inner, self.k, self.alpha = torch.optim.Adam(params, lr=lr), k, alpha
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.param_groups = self.inner.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        for group in self.param_groups:
            for p in group["params"]:
                entry = self.state[p]
                if "slow" not in entry:
                    entry["slow"], entry["n"] = p.detach().clone(), 0
                entry["n"] += 1
                if entry["n"] % self.k == 0:
                    entry["slow"].add_(p - entry["slow"], alpha=self.alpha)
                    p.copy_(entry["slow"])

    def state_dict(self):
        return {"fast": self.inner.state_dict(), "slow": super().state_dict()}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict["fast"])
        super().load_state_dict(state_dict["slow"])


def fresh_state(optimizer_class):
    """``nn.Linear(3, 1)`` made after ``manual_seed(0)``, trained by ``optimizer_class(lr=0.1)`` (as the raw loop of
    tests/test_state.py's ``_raw_trained`` starts)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return loopkit.TrainState.create(model, optimizer_class(model.parameters(), lr=0.1), seed=0)


EIGHT_BATCHES = [torch.randn(4, 3, generator=torch.Generator().manual_seed(k)) for k in range(8)]
