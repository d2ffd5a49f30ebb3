"""Errors a user can fix, kept import-light so a command can report them without loading TensorFlow.

The command layer prints these as one line (``error: ...``) and exits 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Base of the errors whose message tells the user what to fix."""


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


class StorageError(UserError, RuntimeError):
    """An Optuna storage (cell queue, tuning) cannot be opened or used."""


class QueueError(StorageError):
    """The cell queue cannot hand out a study's cells (e.g. a round whose creator died)."""


class StudyError(UserError, ValueError):
    """A study, its arms or its runs cannot be used as asked (unknown study, no finished runs, ...)."""


class StoreDataError(UserError, ValueError):
    """Something read from the tracking store is not what this library writes: a model that could run code or
    has the wrong shape, predictions with impossible labels, a cell run with a bad tag. Never trusted."""
