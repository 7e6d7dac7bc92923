"""Layer-partitioned model parallelism on torch.distributed.

Each rank owns a contiguous block of layers and exchanges only boundary messages with its
neighbours (`exchange`, optionally compressed: `compress`); blocks are balanced by measured cost
(`partition`); `admm_rank` runs the gradient-free solver on N ranks, `pipeline` the backprop
baseline (GPipe / 1F1B); `rankstate` saves and resumes per-rank state; `launch` starts ranks.
"""

from typing import TYPE_CHECKING

from .admm_rank import RankAdmmSolver, plan_blocks, profile_admm_layers, single_process_state
from .compress import CompressionSettings
from .exchange import BoundaryExchange, ExchangeStats
from .group import (
    RankContext,
    RankFailureError,
    all_gather_rows,
    all_reduce_sum,
    free_port,
    init_ranks,
    rank_group,
    share_module,
    shutdown,
)
from .launch import launch, spawn, torchrun_command
from .partition import LayerCost, Plan, balance, even_blocks, profile_layers
from .rankstate import latest_iteration, load_rank_checkpoint, save_rank_checkpoint

if TYPE_CHECKING:  # loaded on first use (`__getattr__`): it imports torch.distributed.pipelining
    from .pipeline import PipelineSolver

__all__ = [
    "BoundaryExchange",
    "CompressionSettings",
    "ExchangeStats",
    "LayerCost",
    "PipelineSolver",
    "Plan",
    "RankAdmmSolver",
    "RankContext",
    "RankFailureError",
    "all_gather_rows",
    "all_reduce_sum",
    "balance",
    "even_blocks",
    "free_port",
    "init_ranks",
    "launch",
    "latest_iteration",
    "load_rank_checkpoint",
    "plan_blocks",
    "profile_admm_layers",
    "profile_layers",
    "rank_group",
    "save_rank_checkpoint",
    "share_module",
    "shutdown",
    "single_process_state",
    "spawn",
    "torchrun_command",
]


def __getattr__(name: str):
    """`PipelineSolver` on first use: its module loads torch.distributed.pipelining (and sympy,
    1-2 s), which every command's start and `--help` would otherwise pay."""
    if name == "PipelineSolver":
        from .pipeline import PipelineSolver

        return PipelineSolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
