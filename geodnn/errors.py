"""Errors raised by geodnn; each message says what is wrong and how to fix it."""


class GeodnnError(Exception):
    """Base class of user-facing errors of the learning package."""


class CheckpointError(GeodnnError):
    """A checkpoint file is missing, unreadable or of another format."""


class DivergenceError(GeodnnError):
    """Training produced non-finite values or an exploding loss: what happened (`diagnosis`)
    and, apart, what to do (`fix`), so that a caller with other means (`geodnn run`) can give
    its own fix with the same diagnosis."""

    def __init__(self, diagnosis: str, fix: str = "") -> None:
        super().__init__(diagnosis, fix)  # both in args: the error pickles across ranks
        self.diagnosis, self.fix = diagnosis, fix

    def __str__(self) -> str:
        return f"{self.diagnosis}; {self.fix}" if self.fix else self.diagnosis
