"""Progress bars for long steps (prediction, polygons; `geodnn train` uses them too)."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class LineStream:
    """What tqdm writes, as whole lines, for a stream that is not a terminal (a log file): a
    bar redraw ('\\r' + bar) becomes its own line, and tqdm's clearing of the bar (spaces after
    '\\r') is dropped, so a log line written between two redraws starts on a line of its own
    instead of after the bar's text."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; in a terminal redrawn twice a second, in a log file one line every
    30 s (so a long job logged to a file still shows it is moving, line by line)."""
    terminal = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr if terminal else LineStream(sys.stderr),
        mininterval=0.5 if terminal else 30.0,
    )
