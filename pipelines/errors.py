"""Errors of the job layer (configs, run folders); one line, naming the file and the fix."""

from pathlib import Path


class PipelineError(Exception):
    """A config, run folder or job argument is wrong."""


class DamagedRunError(PipelineError):
    """A run folder to resume lost or damaged a file it needs (`path`: what is wrong, `what`);
    the fix depends on the command (`geodnn train --overwrite`, `geodnn run --force`)."""

    def __init__(self, path: Path, what: str, fix: str) -> None:
        super().__init__(f"{path}: {what}; {fix}")
        self.path, self.what = path, what
