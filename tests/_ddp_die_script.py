"""A 2-rank run in which rank 1 dies at call 3: rank 0 must fail fast, naming the failed collective.

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


def main() -> None:
    distributed.init(timeout=datetime.timedelta(seconds=float(os.environ.get("LOOPKIT_TEST_TIMEOUT", "20"))))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(lambda m, b: m(b).pow(2).mean())))
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
