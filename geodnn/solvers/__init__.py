"""Training methods for ChainNet: layer-parallel ADMM (gradient-free) and the Adam baseline."""

from .adam import AdamSettings, AdamSolver
from .admm import (
    AdmmSettings,
    AdmmSolver,
    LayerState,
    Message,
    StepResult,
    init_layer_states,
    layer_step,
    write_back,
)
from .base import Solver, make_solver
from .pool import CropPool

__all__ = [
    "AdamSettings",
    "AdamSolver",
    "AdmmSettings",
    "AdmmSolver",
    "CropPool",
    "LayerState",
    "Message",
    "Solver",
    "StepResult",
    "init_layer_states",
    "layer_step",
    "make_solver",
    "write_back",
]
