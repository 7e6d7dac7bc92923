"""Errors of the job layer (configs, run folders); one line, naming the file and the fix."""


class PipelineError(Exception):
    """A config, run folder or job argument is wrong."""
