"""Errors raised by geodnn; each message says what is wrong and how to fix it."""


class GeodnnError(Exception):
    """Base class of user-facing errors of the learning package."""


class CheckpointError(GeodnnError):
    """A checkpoint file is missing, unreadable or of another format."""


class DivergenceError(GeodnnError):
    """Training produced non-finite values or an exploding loss: what happened (`diagnosis`)
    and, apart, what to do (`fix`), so that a caller with other means (`geodnn run`) can give
    its own fix with the same diagnosis. `local`: only this rank saw it (a layer of its block
    diverged; the other ranks learn that some rank did), so this rank reports it."""

    def __init__(self, diagnosis: str, fix: str = "", local: bool = False) -> None:
        super().__init__(diagnosis, fix, local)  # all in args: the error pickles across ranks
        self.diagnosis, self.fix, self.local = diagnosis, fix, local

    def __str__(self) -> str:
        return f"{self.diagnosis}; {self.fix}" if self.fix else self.diagnosis
