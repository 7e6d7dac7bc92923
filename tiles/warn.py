"""What people see besides results. Warnings: attributed to the first line outside geodnn's own
packages (the user's call, a notebook cell), not to the library line that noticed, whichever
depth that is (Python 3.12's `skip_file_prefixes`, for 3.11 too). Libraries' logs: held quiet
while geodnn works (`HeldLevel`), and left as found afterwards."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# tiles, geodnn and pipelines are installed side by side (one distribution); frames name files
# by the path they were imported from, a symlink's or its target's
_ROOTS = {Path(__file__).parent.parent, Path(__file__).resolve().parent.parent}
OWN_PREFIXES = tuple(
    str(root / name) + os.sep for root in _ROOTS for name in ("tiles", "geodnn", "pipelines")
)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message)` at the nearest caller outside our packages."""
    frame, level = sys._getframe(1), 2  # level 2: the caller of warn_user
    while frame is not None and frame.f_code.co_filename.startswith(OWN_PREFIXES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@dataclass
class HeldLevel:
    """Logger `name` held at `level` while any scope (`held`) is open: scopes may overlap
    (threads, a generator left open), and the last one out restores the level the first found.
    `unless_set`: a logger whose level the user set is left to them."""

    name: str
    level: int
    unless_set: bool = False
    open: int = 0
    kept: int = logging.NOTSET
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def held(self) -> Iterator[None]:
        logger = logging.getLogger(self.name)
        with self.lock:
            ours = self.open > 0 or not (self.unless_set and logger.level != logging.NOTSET)
            if ours:
                if self.open == 0:
                    self.kept = logger.level
                    logger.setLevel(self.level)
                self.open += 1
        try:
            yield
        finally:
            if ours:
                with self.lock:
                    self.open -= 1
                    if self.open == 0:
                        logger.setLevel(self.kept)
