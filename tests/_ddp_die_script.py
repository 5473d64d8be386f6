"""A 2-rank run in which rank 1 dies at call 3 (or, ``evaluate``, at its means' all-reduce): rank 0 must fail
fast, naming the failed collective.

Started by tests/test_distributed.py with torchrun's environment variables set by hand (one
process per rank), so that the survivor is not stopped by a launcher and its error is seen.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loopkit  # noqa: E402
from loopkit import distributed  # noqa: E402


class _DiesAfterItsUpdate(loopkit.Callback):
    """On rank 1, exits after update 3, before the ranks' per-batch vote on should_stop that run_epochs makes
    (a batch hook): rank 0's next collective is that vote."""

    def on_batch_end(self, state, metrics):
        if distributed.rank() == 1 and state.step == 3:
            print("rank 1 dies at call 3", flush=True)
            os._exit(3)


_UPDATES = [0]  # (the updates made so far in this process)


def _dies_after_its_third_update(optimizer, args, kwargs) -> None:
    """On rank 1, exits right after its 3rd update, before with_checkpointing's save at step 3 (every_n_steps=3):
    rank 0's next collective is that save's gather of every rank's running means."""
    _UPDATES[0] += 1
    if distributed.rank() == 1 and _UPDATES[0] == 3:
        print("rank 1 dies at call 3", flush=True)
        os._exit(3)


def _dies_at_the_all_reduce(*args, **kwargs) -> None:
    """Rank 1's ``torch.distributed.all_reduce`` under ``evaluate``: it exits instead, after the all-gather of the
    means' names, so rank 0's next collective is the all-reduce of their sums and counts."""
    print("rank 1 dies at its means' all-reduce", flush=True)
    os._exit(3)


def main() -> None:
    distributed.init(timeout=datetime.timedelta(seconds=float(os.environ.get("LOOPKIT_TEST_TIMEOUT", "20"))))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_ddp(loopkit.train_step(lambda m, b: m(b).pow(2).mean()))
    if sys.argv[1:2] == ["checkpoint"]:  # (argv[2]: the checkpoint folder)
        step = loopkit.donate(loopkit.with_checkpointing(step, sys.argv[2], every_n_steps=3))
        state.optimizer.register_step_post_hook(_dies_after_its_third_update)
        loopkit.run_epochs(step, state, [torch.randn(8, 4) for _ in range(6)], epochs=1, progress=False)
        print(f"rank {distributed.rank()} finished", flush=True)
        return
    if sys.argv[1:2] == ["clock"]:  # (argv[2]: the checkpoint folder) rank 0's next collective: with_checkpointing's broadcast of its clock
        step = loopkit.donate(loopkit.with_checkpointing(step, sys.argv[2], train_time_interval=3600))
        state.optimizer.register_step_post_hook(_dies_after_its_third_update)
        loopkit.run_epochs(step, state, [torch.randn(8, 4) for _ in range(6)], epochs=1, progress=False)
        print(f"rank {distributed.rank()} finished", flush=True)
        return
    if sys.argv[1:] == ["evaluate"]:
        if distributed.rank() == 1:
            torch.distributed.all_reduce = _dies_at_the_all_reduce
        loopkit.evaluate(loopkit.eval_step(lambda m, b: {"mean": m(b).mean()}), state, [torch.randn(8, 4)])
        print(f"rank {distributed.rank()} finished", flush=True)
        return
    step = loopkit.donate(step)
    if sys.argv[1:] == ["run_epochs"]:
        data = [torch.randn(8, 4) for _ in range(10)]
        loopkit.run_epochs(step, state, data, epochs=1, callbacks=[_DiesAfterItsUpdate()], progress=False)
        print(f"rank {distributed.rank()} finished", flush=True)
        return
    for call in range(10):
        if distributed.rank() == 1 and call == 3:
            print("rank 1 dies at call 3", flush=True)
            os._exit(3)
        state, _ = step(state, torch.randn(8, 4))
    print(f"rank {distributed.rank()} finished", flush=True)


if __name__ == "__main__":
    main()
