"""The exceptions loopkit raises.

>>> issubclass(DonatedStateError, RuntimeError)
True
"""

from __future__ import annotations

__all__ = ["CheckpointCorruptError", "CheckpointLoadError", "DonatedStateError", "ImpurityError", "NonFiniteError", "StateMismatchError"]


class DonatedStateError(RuntimeError):
    """A state given to a donated step was used again.

    A donated step reuses its input state's storage, so the old state now
    aliases the new one; loopkit refuses to read it.

    >>> raise DonatedStateError("state was donated")
    Traceback (most recent call last):
    ...
    loopkit.errors.DonatedStateError: state was donated
    """


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite under ``with_nan_guard(policy="raise")``.

    >>> raise NonFiniteError("non-finite loss at step 3")
    Traceback (most recent call last):
    ...
    loopkit.errors.NonFiniteError: non-finite loss at step 3
    """


class StateMismatchError(ValueError):
    """A state dict does not fit the state it is loaded into (missing, unexpected or mis-shaped key).

    >>> raise StateMismatchError("missing key 'model.fc.bias'")
    Traceback (most recent call last):
    ...
    loopkit.errors.StateMismatchError: missing key 'model.fc.bias'
    """


class CheckpointCorruptError(RuntimeError):
    """A checkpoint on disk is incomplete, corrupt, or unsafe to load.

    >>> raise CheckpointCorruptError("checkpoint step_10: checksum mismatch")
    Traceback (most recent call last):
    ...
    loopkit.errors.CheckpointCorruptError: checkpoint step_10: checksum mismatch
    """


class CheckpointLoadError(RuntimeError):
    """A checkpoint that is intact on disk (its files match its manifest) cannot be loaded by this process.

    Written by a newer loopkit (a format version this one does not read), holding objects that
    ``torch.load(weights_only=True)`` refuses, or failing to load here (out of memory). Unlike a
    corrupt checkpoint, :func:`loopkit.restore` does not skip it: falling back to an older one or
    to the given state would let the relaunched fit's rotation delete it. Nothing is changed.

    >>> raise CheckpointLoadError("checkpoint ckpt-000003-step12-epoch2-batch4 has format version 2")
    Traceback (most recent call last):
    ...
    loopkit.errors.CheckpointLoadError: checkpoint ckpt-000003-step12-epoch2-batch4 has format version 2
    """


class ImpurityError(AssertionError):
    """A step broke the purity contract (:func:`loopkit.debug.check_purity` names how).

    >>> raise ImpurityError("step f changed the state it was given: model.weight differs")
    Traceback (most recent call last):
    ...
    loopkit.errors.ImpurityError: step f changed the state it was given: model.weight differs
    """
