"""Per-rank checkpoints: every rank saves its own state; a checkpoint counts once all ranks did.

Files in the run folder: `rank{r}-of-{N}-it{t}.pt` (one per rank, atomic) and `ranks-latest.txt`
(written by rank 0 after a barrier, naming the last iteration every rank saved). A crash in the
middle of a save leaves the previous complete checkpoint as the one resumed from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from ..atomic import atomic_write_text
from ..checkpoint import atomic_torch_save, read_torch_file
from ..errors import CheckpointError
from .group import RankContext, wait_or_fail

LATEST = "ranks-latest.txt"


def rank_file(folder: Path, rank: int, world_size: int, iteration: int) -> Path:
    return Path(folder) / f"rank{rank}-of-{world_size}-it{iteration}.pt"


def _latest_fields(folder: str | os.PathLike) -> dict[str, int] | None:
    """The marker's iteration and world_size (None: no marker); a damaged one is one line."""
    path = Path(folder) / LATEST
    if not path.exists():
        return None
    try:
        text = path.read_text()
        fields = dict(line.split("=", 1) for line in text.split() if "=" in line)
        return {key: int(fields[key]) for key in ("iteration", "world_size")}
    except (OSError, UnicodeDecodeError, KeyError, ValueError):
        raise CheckpointError(
            f"{path}: unreadable or damaged (it names the last iteration every rank saved, as "
            "'iteration=N world_size=R'); restore it, or start the run again with --overwrite"
        ) from None


def latest_iteration(folder: str | os.PathLike) -> int | None:
    """The last iteration saved by every rank, or None when the folder has no rank checkpoint."""
    fields = _latest_fields(folder)
    return None if fields is None else fields["iteration"]


def latest_world_size(folder: str | os.PathLike) -> int | None:
    """How many ranks wrote the folder's last complete checkpoint (None: no rank checkpoint)."""
    fields = _latest_fields(folder)
    return None if fields is None else fields["world_size"]


def save_rank_checkpoint(folder: str | os.PathLike, ctx: RankContext, state: dict) -> Path:
    """Save this rank's `state` (must hold "iteration"); collective: every rank must call it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iteration = int(state["iteration"])
    previous = latest_iteration(folder)
    path = rank_file(folder, ctx.rank, ctx.world_size, iteration)
    atomic_torch_save(state, path)
    wait_or_fail(dist.barrier(async_op=True), ctx, None, "the checkpoint (every rank saved)")
    if ctx.rank == 0:
        atomic_write_text(folder / LATEST, f"iteration={iteration}\nworld_size={ctx.world_size}\n")
    wait_or_fail(dist.barrier(async_op=True), ctx, None, "the checkpoint (marker written)")
    if previous is not None and previous != iteration:
        rank_file(folder, ctx.rank, ctx.world_size, previous).unlink(missing_ok=True)
    return path


def load_rank_checkpoint(folder: str | os.PathLike, ctx: RankContext) -> dict | None:
    """This rank's state from the last complete checkpoint in `folder` (None if there is none)."""
    folder = Path(folder)
    iteration = latest_iteration(folder)
    if iteration is None:
        return None
    path = rank_file(folder, ctx.rank, ctx.world_size, iteration)
    if not path.exists():
        raise CheckpointError(
            f"{path} is missing: resume with the same number of workers the run was started with "
            f"(see {folder / LATEST})"
        )
    try:
        return read_torch_file(path, ctx.device)
    except CheckpointError:
        raise CheckpointError(
            f"{path}: this rank's checkpoint cannot be read (empty or damaged); restore it, or "
            "start the run again with --overwrite (instead of --resume)"
        ) from None
