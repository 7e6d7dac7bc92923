"""Errors raised by geodnn; each message says what is wrong and how to fix it."""


class GeodnnError(Exception):
    """Base class of user-facing errors of the learning package."""


class CheckpointError(GeodnnError):
    """A checkpoint file is missing, unreadable or of another format."""


class DivergenceError(GeodnnError):
    """Training produced non-finite values or an exploding loss."""
