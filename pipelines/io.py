"""File helpers shared by the jobs: atomic text writes, atomic figure saves, folder clean-up."""

from __future__ import annotations

from pathlib import Path

from geodnn.atomic import atomic_path, atomic_write_text

__all__ = ["atomic_write_text", "remove_if_empty", "save_figure"]


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Save a matplotlib Figure as PNG atomically (no pyplot: safe inside Jupyter kernels)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def remove_if_empty(folder: Path) -> bool:
    """Remove `folder` if nothing is left in it; True if it was (False: files in it, or it
    could not be removed)."""
    try:
        folder.rmdir()  # refused for a folder that holds anything
    except OSError:
        return False
    return True
