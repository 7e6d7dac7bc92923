"""The accuracy reference: backpropagation with Adam on the same ChainNet, batches and loss."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from ..data import Batches
from ..errors import GeodnnError
from ..model import ChainNet
from .admm import make_pool
from .base import LossWatch, check_class_weights, check_same_stream, settings_from_dict
from .subproblems import weighted_cross_entropy


@dataclass
class AdamSettings:
    """Hyperparameters of the Adam baseline (the [adam] table of a training config)."""

    batch_size: int = 16  # crops per step
    lr: float = 3e-3  # Adam learning rate
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    slots: int = 4  # a crop pool like ADMM's stem's: CropPool(slots, refresh_every)
    refresh_every: int = 0  # 0: auto, S R >= 2 x number of layers (ADMM's default rule)
    stagger_refresh: bool = True  # as ADMM's: slots change crops at evenly spread times
    class_weights: list[float] | None = None  # per-class loss weights (None = equal)
    max_iterations: int = 0  # stopping rule (0 = no limit)
    patience: int = 0  # stop after this many steps without a new best loss (0 = never)
    divergence_factor: float = 20.0  # DivergenceError when loss > factor x best loss so far
    divergence_warmup: int = 10

    @classmethod
    def from_dict(cls, values: dict, table: str = "adam") -> AdamSettings:
        """Settings from a config table (`table`: [adam], or [pipeline], which takes the same
        settings); errors name that table."""
        settings = settings_from_dict(cls, values, table)
        settings.check(table)
        return settings

    def check(self, table: str = "adam") -> None:
        """Every setting in its range, or a GeodnnError naming the ones that are not."""
        rules = {
            "batch_size": lambda v: v >= 1,
            "slots": lambda v: v >= 1,
            "lr": lambda v: v > 0,
            "beta1": lambda v: 0 <= v < 1,
            "beta2": lambda v: 0 <= v < 1,
            "weight_decay": lambda v: v >= 0,
            "refresh_every": lambda v: v >= 0,
            "max_iterations": lambda v: v >= 0,
            "patience": lambda v: v >= 0,
            "divergence_factor": lambda v: v > 0,
            "divergence_warmup": lambda v: v >= 0,
        }
        bad = [name for name, ok in rules.items() if not _holds(ok, getattr(self, name))]
        if bad:
            raise GeodnnError(
                f"invalid [{table}] setting(s) {', '.join(bad)}: batch_size, slots >= 1; lr, "
                "divergence_factor > 0; 0 <= beta1, beta2 < 1; the others >= 0 (numbers, "
                "not text)"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _holds(rule, value) -> bool:
    """`rule(value)` for a number (a bool or text is never in range)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(rule(value))


def restore_optimizer(
    optimizer: torch.optim.Optimizer, saved: dict, settings: AdamSettings
) -> None:
    """Load a saved Adam state with the settings' lr, betas and weight decay in every parameter
    group (the saved ones come back otherwise, and a resumed run may lower the step size after a
    divergence). Step counters loaded onto a GPU go back to the CPU, where torch's Adam keeps
    them: read there, each parameter's step would wait for the GPU."""
    optimizer.load_state_dict(saved)
    betas = (settings.beta1, settings.beta2)
    for group in optimizer.param_groups:
        group.update(lr=settings.lr, betas=betas, weight_decay=settings.weight_decay)
        if group.get("capturable") or group.get("fused"):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].cpu()


class AdamSolver:
    """Backprop + Adam; batch t is the crop pool's stem batch of iteration t, as in ADMM."""

    def __init__(self, model: ChainNet, data: Batches, settings: AdamSettings, seed: int) -> None:
        check_class_weights(settings, model, "adam")
        self.model = model
        self.data = data
        self.settings = settings
        self.seed = int(seed)
        self.pool = make_pool(settings, len(data), len(model.layers), self.seed)
        self.optimizer = torch.optim.Adam(
            model.parameters(),
            lr=settings.lr,
            betas=(settings.beta1, settings.beta2),
            weight_decay=settings.weight_decay,
        )
        cw = settings.class_weights
        self._weights = torch.tensor(cw, dtype=torch.float32) if cw else None
        self.iteration = 0
        self.watch = LossWatch.from_settings(settings)

    def step(self) -> dict[str, float]:
        x, y = self.data.get(self.pool.batch_at(self.iteration))
        device = self.model.band_mean.device
        weights = None if self._weights is None else self._weights.to(device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = weighted_cross_entropy(self.model(x.to(device)), y.to(device), weights)
        value = float(loss.detach())
        self.watch.update(value, self.iteration, "Adam")
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return {"loss": value}

    def finished(self) -> str | None:
        return self.watch.finished(self.iteration)

    def state_dict(self) -> dict:
        return {
            "solver": "adam",
            "iteration": self.iteration,
            "seed": self.seed,
            "settings": self.settings.to_dict(),
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            # a copy: the optimizer's moments change in place as training goes on
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("solver") != "adam":
            raise GeodnnError(
                "checkpoint solver state is not Adam's; resume with the solver it was made by"
            )
        self.model.load_state_dict(state["model"])
        check_same_stream(state, self.settings, self.seed, "adam")
        # a copy: the caller's state must not change as the optimizer steps on
        restore_optimizer(self.optimizer, copy.deepcopy(state["optimizer"]), self.settings)
        self.iteration = int(state["iteration"])
        self.watch.load_state_dict(state["watch"])
