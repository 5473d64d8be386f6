"""The exceptions loopkit raises.

>>> issubclass(DonatedStateError, RuntimeError)
True
"""

from __future__ import annotations

__all__ = ["CheckpointCorruptError", "DonatedStateError", "ImpurityError", "NonFiniteError", "StateMismatchError"]


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


class ImpurityError(AssertionError):
    """A step broke the purity contract (:func:`loopkit.debug.check_purity` names how).

    >>> raise ImpurityError("step f changed the state it was given: model.weight differs")
    Traceback (most recent call last):
    ...
    loopkit.errors.ImpurityError: step f changed the state it was given: model.weight differs
    """
