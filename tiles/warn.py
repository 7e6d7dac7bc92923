"""Warnings for people: attributed to the first line outside geodnn's own packages (the user's
call, a notebook cell), not to the library line that noticed, whichever depth that is (Python
3.12's `skip_file_prefixes`, for 3.11 too)."""

from __future__ import annotations

import os
import sys
import warnings
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
