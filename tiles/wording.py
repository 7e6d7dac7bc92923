"""How a message names an option: as the command line's flag inside a `geodnn` command
(`--gap 0`), as the Python keyword everywhere else (`gap=0`), so that an error met in a notebook
names what the notebook can change."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_UNSET = object()
# process-wide (a command owns its process, Dask's threads included): how many command-line
# scopes are open, so that scopes left in any order across threads end it exactly
_command_line = [0]
_count_lock = threading.Lock()


@contextmanager
def command_line() -> Iterator[None]:
    """Messages raised inside name command-line flags (the CLI's entry points enter it)."""
    with _count_lock:
        _command_line[0] += 1
    try:
        yield
    finally:
        with _count_lock:
            _command_line[0] -= 1


def option(name: str, value: object = _UNSET, keyword: str | None = None) -> str:
    """Option `name` (as spelt on the command line, 'class-attribute') with `value` if given:
    `--gap 0` / `gap=0`; value True is a switch: `--overwrite` / `overwrite=True`; without a
    value `--gap` / `` `gap` `` (quoted: a bare word in a sentence). `keyword`:
    the Python name where it is not the flag's ('run_dir' for --out)."""
    if _command_line[0] > 0:
        return f"--{name}" if value is _UNSET or value is True else f"--{name} {value}"
    keyword = keyword or name.replace("-", "_")
    return f"`{keyword}`" if value is _UNSET else f"{keyword}={value!r}"


def command_line_only(text: str) -> str:
    """`text` inside a `geodnn` command, nothing elsewhere: for a flag with no Python keyword
    (`--iterations` beside the config's [train] iterations)."""
    return text if _command_line[0] > 0 else ""
