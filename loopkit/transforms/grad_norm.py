"""``with_grad_norm``: report each parameter's gradient norm and their total, as Lightning's ``grad_norm``.

>>> from loopkit.steps import train_step
>>> with_grad_norm(train_step(lambda m, b: None)).applied
('train_step', 'with_grad_norm')
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import torch

from loopkit._numbers import as_norm_type
from loopkit._sharded import norms as sharded_norms
from loopkit.state import TrainState, core_module
from loopkit.steps import GradContext, Step
from loopkit.transforms._compose import require_train_step

__all__ = ["GradNorm", "with_grad_norm"]


@attrs.frozen
class GradNorm:
    """Reports ``grad_<p>_norm/<name>`` for each parameter with a gradient and ``grad_<p>_norm_total``.

    >>> GradNorm(2.0).prefix
    'grad_2.0_norm'
    """

    norm_type: float = 2.0
    name: str = "with_grad_norm"

    @property
    def agreed_options(self) -> dict[str, Any]:
        """``norm_type``, which every rank must give alike (see :attr:`loopkit.steps.Step.rank_agreed`): under
        ``with_fsdp`` it picks the op of the norms' all-reduce (sum of powers, or max for inf), and the metrics' means
        over the ranks would mix norms of two kinds.

        >>> GradNorm(2.0).agreed_options
        {'norm_type': 2.0}
        """
        return {"norm_type": self.norm_type}

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names it reports, as a prefix (``*``): a loss_fn's aux metric may not take one of them."""
        return (f"{self.prefix}*",)

    @property
    def prefix(self) -> str:
        """``grad_<norm_type>_norm``, Lightning's name (``norm_type`` as a float: ``grad_2.0_norm``, ``grad_inf_norm``)."""
        return f"grad_{self.norm_type}_norm"

    def on_loss(self, loss: torch.Tensor, state: TrainState, ctx: GradContext) -> None:
        pass

    def on_grads(self, ctx: GradContext) -> None:
        named = [(name, p.grad.detach()) for name, p in core_module(ctx.state.model).named_parameters() if p.grad is not None]
        # (each p.grad.norm(p), as Lightning's; under with_fsdp over every rank's shard, in one all-reduce)
        values = sharded_norms([g for _, g in named], self.norm_type)
        norms = {f"{self.prefix}/{name}": value for (name, _), value in zip(named, values)}
        if norms:  # as Lightning's: the total is the norm of the parameters' norms, in their dtype (on the first's device)
            values = list(norms.values())
            dtype = functools.reduce(torch.promote_types, (n.dtype for n in values))
            stacked = torch.stack([n.to(device=values[0].device, dtype=dtype) for n in values])
            norms[f"{self.prefix}_total"] = stacked.norm(self.norm_type)
        ctx.metrics.update(norms)


def with_grad_norm(step: Any, norm_type: float | str = 2.0) -> Step:
    """Report the gradients' norms as metrics: Lightning's ``grad_norm(module, norm_type)``, which a
    ``LightningModule`` logs from ``on_before_optimizer_step``.

    The metrics are ``grad_<p>_norm/<parameter name>`` for each parameter with a gradient and
    ``grad_<p>_norm_total``, the ``norm_type``-norm of those norms (the norm of all gradients as one
    vector), with Lightning's names relative to ``state.model`` (``grad_2.0_norm/0.weight``; a
    LightningModule holding the network as ``self.model`` names it ``grad_2.0_norm/model.0.weight``),
    in the gradients' dtype; a loss_fn's aux metric may not take such a name. They stay on the device, as every
    metric, until a logger reads them (``with_logging`` logs them as ``train/grad_2.0_norm/...``).
    ``norm_type`` is a positive number or ``"inf"``.

    What they measure follows the nesting, as for the other gradient transforms: outside
    ``with_grad_accum`` the summed gradient once per update (Lightning's hook sees it there),
    inside it each micro-batch's; under float16 ``with_amp`` the gradients are unscaled first;
    inside ``with_grad_clip`` (``with_grad_clip(with_grad_norm(step), ...)``) the norms before
    clipping, as in Lightning, whose hook runs before its clipping; outside it, after. Under
    ``with_fsdp`` each norm is over every rank's shard of the gradient (the whole gradient's), all of
    them in one all-reduce a step (``loopkit._sharded.norms``).

    >>> import torch
    >>> from loopkit.state import TrainState
    >>> from loopkit.steps import train_step
    >>> model = torch.nn.Linear(2, 1)
    >>> state = TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> step = with_grad_norm(train_step(lambda m, b: m(b).sum()))
    >>> state, metrics = step(state, torch.ones(3, 2))
    >>> sorted(metrics), float(metrics["grad_2.0_norm/bias"])
    (['grad_2.0_norm/bias', 'grad_2.0_norm/weight', 'grad_2.0_norm_total', 'loss'], 3.0)
    """
    value = as_norm_type(norm_type)  # as Lightning's float(norm_type): "2", "inf", "Infinity"
    if value is None:
        raise ValueError(f"with_grad_norm: norm_type must be a positive number or 'inf', got {norm_type!r}")
    base = require_train_step(step, "with_grad_norm")
    return base.add_grad_transform(GradNorm(value))
