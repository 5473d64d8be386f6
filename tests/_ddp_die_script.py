"""A 2-rank run in which rank 1 dies at call 3 (or, ``evaluate``, at its means' all-reduce; ``build``, at the
gathers of with_ddp's wrapper build): rank 0 must fail fast, naming the failed collective.

Started by :func:`launch` (tests/test_distributed.py, tests/transforms/test_ddp.py) with torchrun's environment
variables set by hand (one process per rank), so that the survivor is not stopped by a launcher and its error is seen.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
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


def launch(args: list[str], timeout: float = 20, seconds: float = 60) -> tuple[list[int], list[str]]:
    """Run this script with ``args`` on two ranks (``timeout``: the process group's, in seconds), and wait for both
    (``seconds`` at most: a hang fails the test); their exit codes and outputs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "LOOPKIT_TEST_TIMEOUT": str(timeout)}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      stdin=subprocess.DEVNULL))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=seconds)[0])  # bounded: a hang fails the test
    finally:
        for proc in procs:
            proc.kill()
    return [proc.returncode for proc in procs], outputs


def _dies(*args, **kwargs) -> None:
    print("rank 1 dies at the wrapper's build", flush=True)
    os._exit(3)


def _build(where: str, out: str) -> None:
    """Rank 1 leaves before the gathers of with_ddp's wrapper build (``build``: before its first step; ``rebuild``:
    after one, at the check of the buffers of the wrapper built anew for a frozen layer; ``run_epochs``: at its first
    step under run_epochs); rank 0 records the error of its failed gather and what ``state_at_error`` gives then."""
    from loopkit.transforms import ddp as ddp_module
    from tests import _ddp_script as ddp

    data = ddp.make_data(2)
    state = ddp.sgd_state(ddp.make_model())
    step = loopkit.donate(loopkit.with_ddp(loopkit.train_step(ddp.mse)))
    rank = distributed.rank()
    if where == "rebuild":
        state, _ = step(state, data[0, rank])  # (the wrapper built, the momentum kept)
        state.model[0].requires_grad_(False)  # (alike on both ranks: the next call builds the wrapper anew)
    if rank == 1 and where == "build":
        _dies()
    if rank == 1 and where == "rebuild":
        ddp_module._check_same_buffers = _dies
    if rank == 1 and where == "run_epochs":
        ddp_module.DDPSync.module = _dies
    before = ddp._observed(state)
    try:
        if where == "run_epochs":
            loopkit.run_epochs(step, state, [data[1, rank]], epochs=1, progress=False)
        else:
            step(state, data[1, rank])
        error: BaseException | None = None
    except RuntimeError as e:
        error = e
    left = loopkit.state_at_error(error) if error is not None else None
    torch.save({"error": str(error), "left_is_state": left is state, "before": before,
                "left": None if left is None else ddp._observed(left)}, os.path.join(out, "rank0.pt"))
    print("rank 0 recorded", flush=True)
    os._exit(0)  # (no shutdown: the group is broken)


def main() -> None:
    distributed.init(timeout=datetime.timedelta(seconds=float(os.environ.get("LOOPKIT_TEST_TIMEOUT", "20"))))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    step = loopkit.with_ddp(loopkit.train_step(lambda m, b: m(b).pow(2).mean()))
    if sys.argv[1:2] == ["build"]:  # (argv[2]: where rank 1 leaves; argv[3]: the folder of rank 0's record)
        _build(sys.argv[2], sys.argv[3])
        return
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
