"""The `geodnn` command: one subcommand per job, each defined in its own module.

A job module exposes `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from .errors import system_refusal

# Only the standard library at import: PyTorch and GDAL load in `main`, where Ctrl-C during
# the seconds that takes is answered in one line too.

# Each job (its module pipelines.<name>) and the line `geodnn --help` lists it with, in that
# order. Only the job a command runs is imported: its modules load PyTorch and GDAL (seconds).
JOBS = {
    "tile": "build a tile store (images, labels, spatial split, statistics) for training",
    "train": "train a model from a tile store (ADMM, Adam or pipeline)",
    "evaluate": "score a checkpoint against labels (IoU, F1, accuracy)",
    "predict": "predict a GeoTIFF scene into a class map (GeoTIFF/COG) and polygons (GeoPackage)",
    "run": "tile, train, evaluate, predict and export in one go",
}
JOB_MODULES = list(JOBS)


def user_errors() -> tuple[type[Exception], ...]:
    """What a command reports in one line: bad input or a bad environment, not a bug."""
    from geodnn.errors import GeodnnError
    from tiles.errors import TilesError

    from .errors import PipelineError

    return (GeodnnError, TilesError, PipelineError)


def installed_version() -> str:
    """The installed package's version (pyproject.toml), for bug reports."""
    try:
        return importlib.metadata.version("geodnn")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line, as geodnn's own: the usage block it prints
    first buried the error among a dozen lines of options."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser(jobs: Sequence[str] = JOB_MODULES) -> argparse.ArgumentParser:
    """The `geodnn` parser with the full options of `jobs`; the others are listed by name and
    summary only (enough for `geodnn --help` and for refusing an unknown command)."""
    parser = OneLineParser(
        prog="geodnn",
        description="Train very deep FCNs without backprop and map GeoTIFF scenes with them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"geodnn {installed_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, summary in JOBS.items():
        if name not in jobs:
            sub.add_parser(name, help=summary)
            continue
        try:
            module = importlib.import_module(f"pipelines.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pipelines.{name}":
                raise
            continue
        module.register(sub)
    return parser


def chosen_jobs(argv: Sequence[str]) -> list[str]:
    """The job a command line names (its first word that is one), or none."""
    return next(([word] for word in argv if word in JOBS), [])


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings read like errors: one line naming the file and the fix, no source location."""
    return str(message)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # the job's own, or one while its modules were still loading
        print("geodnn: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser(chosen_jobs(argv)).parse_args(argv)  # --help ends here, quickly

    from rasterio.errors import NotGeoreferencedWarning

    from geodnn.runtime import StopSignal, raise_if_stopped, stop_signals_raise
    from tiles.wording import command_line

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="geodnn: %(levelname)s: %(message)s",
    )
    # GDAL's own messages about an error geodnn reports in one line anyway (INFO in rasterio)
    logging.getLogger("rasterio").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.captureWarnings(True)
    # rasterio warns so for every in-memory window it burns labels into; geodnn checks a scene's
    # georeferencing itself (tiles.raster: no CRS warns, GCPs only is refused)
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    warnings.formatwarning = one_line_warning
    try:
        with stop_signals_raise():  # SIGTERM, SIGHUP unwind like Ctrl-C: no temporary file left
            with command_line():  # messages name flags, not Python keywords
                code = int(args.func(args) or 0)
            raise_if_stopped()  # one swallowed on the way still ends the command as stopped
            return code
    except user_errors() as exc:
        print(f"geodnn: error: {exc}", file=sys.stderr)
        return 2
    except StopSignal as stop:
        print(f"geodnn: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    except (OSError, MemoryError, RuntimeError) as exc:
        line = system_refusal(exc)
        if line is None:  # a read error, a lost connection, a bug...: its traceback
            raise
        logging.getLogger(__name__).debug("the refused operation:", exc_info=True)  # -v
        print(f"geodnn: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
