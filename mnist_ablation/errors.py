"""Errors a user can fix, kept import-light so a command can report them without loading TensorFlow."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


class QueueError(RuntimeError):
    """The cell queue's Optuna storage cannot be used."""
