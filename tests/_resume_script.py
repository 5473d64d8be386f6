"""The training run that tests/test_resume_crash.py starts, kills and resumes in subprocesses.

``python tests/_resume_script.py CHECKPOINT_DIR OUT_FILE`` restores the newest intact
checkpoint in CHECKPOINT_DIR (if any), trains to the end with ``run_epochs`` and
``with_checkpointing(every_n_steps=1)``, and writes the final ``state_dict()`` to OUT_FILE.
The pipeline has dropout, a shuffled DataLoader, an AdamW optimizer, a StepLR scheduler and
``with_grad_accum(every=2)``.

Printed, one line each, flushed: ``start <step> <epoch> <batch>`` (after restoring),
``batch <epoch> <batch_index> <step>`` after every batch, ``saving`` once a checkpoint's
payload is on disk but before its manifest, ``pruning`` once an old checkpoint is renamed
out of sight but before it is deleted, then ``stopped <step>`` or ``done <step>``.

Environment (to let the test kill it at chosen moments): ``LOOPKIT_TEST_HANG=saving:N``
(or ``pruning:N``) hangs for 60 s right after printing the N-th ``saving`` (``pruning``);
``LOOPKIT_TEST_WAIT=N:FILE`` waits after the N-th batch of this run until FILE exists.
"""

from __future__ import annotations

import os
import sys
import time


def main(directory: str, out: str) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import loopkit
    from loopkit import checkpoint

    torch.set_num_threads(1)
    _slow_down(checkpoint)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:].sum(1) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)  # 12 batches per epoch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    state = loopkit.TrainState.create(model, opt, sched, seed=7)
    state = loopkit.restore(state, directory)
    print(f"start {state.step} {state.epoch} {state.batch_index}", flush=True)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(m(inputs), targets)

    step = loopkit.with_checkpointing(
        loopkit.with_grad_accum(loopkit.train_step(loss_fn), every=2), directory, every_n_steps=1, keep_last=2
    )
    wait_at, _, wait_for = os.environ.get("LOOPKIT_TEST_WAIT", "").partition(":")
    batches = 0

    class Printer:
        def on_batch_end(self, s: loopkit.TrainState, metrics: dict) -> None:
            nonlocal batches
            batches += 1
            print(f"batch {s.epoch} {s.batch_index} {s.step}", flush=True)
            if wait_at and batches == int(wait_at):  # hold still until the test has sent its signal
                deadline = time.monotonic() + 60
                while not os.path.exists(wait_for) and time.monotonic() < deadline:
                    time.sleep(0.01)

    epochs = 2
    state, _ = loopkit.run_epochs(step, state, loader, epochs=epochs, progress=False, callbacks=[Printer()])
    torch.save(state.state_dict(), out)
    print(f"{'done' if state.epoch == epochs else 'stopped'} {state.step}", flush=True)


def _slow_down(checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Wrap two private steps of a save, to mark the moments a kill should hit (and hang there)."""
    hang = os.environ.get("LOOPKIT_TEST_HANG", "")
    where, _, nth = hang.partition(":")
    seen = {"saving": 0, "pruning": 0}
    write_manifest, delete = checkpoint._write_manifest, checkpoint._delete

    def mark(moment: str) -> None:
        seen[moment] += 1
        print(moment, flush=True)
        if moment == where and seen[moment] == int(nth):
            time.sleep(60)  # the test kills the process here

    def slow_manifest(tmp, manifest, *durable):  # type: ignore[no-untyped-def]
        mark("saving")
        write_manifest(tmp, manifest, *durable)

    def slow_delete(trash):  # type: ignore[no-untyped-def]
        mark("pruning")
        delete(trash)

    checkpoint._write_manifest = slow_manifest
    checkpoint._delete = slow_delete


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
