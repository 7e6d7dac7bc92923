"""File helpers shared by the jobs: atomic text writes and atomic figure saves."""

from __future__ import annotations

from pathlib import Path

from geodnn.atomic import atomic_path, atomic_write_text

__all__ = ["atomic_write_text", "save_figure"]


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Save a matplotlib Figure as PNG atomically (no pyplot: safe inside Jupyter kernels)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
