"""Progress bars for long steps (prediction, polygons; `geodnn train` uses them too)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; in a terminal redrawn twice a second, in a log file every 30 s (so
    a long job logged to a file still shows it is moving, without a line per update)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
