"""What every solver offers the trainer, and how one is built from a config table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Protocol

from ..data import Batches
from ..errors import DivergenceError, GeodnnError
from ..model import ChainNet


class Solver(Protocol):
    """A training method for a ChainNet; `model` holds the current weights after every step."""

    model: ChainNet
    iteration: int

    def step(self) -> dict[str, float]:
        """One iteration; returns at least {"loss": the real network's loss on this batch}."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (weights_only-loadable)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def finished(self) -> str | None:
        """Why training should stop now (stopping rule), or None to go on."""
        ...


def settings_from_dict(cls, values: dict, table: str):
    """A settings dataclass from a config table; unknown keys are an error that names them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GeodnnError(
            f"unknown [{table}] setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**values)


def check_same_stream(state: dict, settings, seed: int, solver: str, keys=None) -> None:
    """A saved solver state continues only the crop stream it came from: same seed, batch size,
    slots (and refresh for Adam); else a GeodnnError naming what differs."""
    saved = state.get("settings", {})
    keys = keys or ("batch_size", "slots", "refresh_every", "stagger_refresh")
    differ = [k for k in keys if k in saved and saved[k] != getattr(settings, k)]
    differ += ["seed"] if "seed" in state and int(state["seed"]) != int(seed) else []
    if differ:
        raise GeodnnError(
            f"saved {solver} state was made with other {', '.join(differ)}; resume with the "
            "settings and seed it was started with"
        )


def check_class_weights(settings, model: ChainNet, solver: str) -> None:
    """One class weight per class of the model (a mismatch fails later, inside the loss)."""
    weights = settings.class_weights
    if weights is not None and len(weights) != model.config.classes:
        raise GeodnnError(
            f"[{solver}] class_weights has {len(weights)} values for a model of "
            f"{model.config.classes} classes; give one per class"
        )


def settings_overrides(items: Iterable[str], table: str) -> dict:
    """KEY=VALUE strings (the benchmarks' --admm) as a settings dict: each value read as JSON
    (0.5, true, [1, 2]), else kept as text; an item without '=' is an error naming it."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GeodnnError(f"[{table}] override {item!r} is not KEY=VALUE (e.g. lam=0.02)")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@dataclass
class LossWatch:
    """Best-loss bookkeeping on a smoothed loss: divergence detection and the stopping rule.

    Per-batch losses vary a lot (a batch with few positives has a tiny loss), so the explosion
    check and the no-improvement rule use an exponential moving average of the loss. A loss
    diverges when it exceeds `factor` x its best AND the untrained network's (the first loss):
    once the best is tiny (a well-fit run, 0.02), a swing to 20x is still a trained network.
    """

    factor: float
    warmup: int
    max_iterations: int = 0
    patience: int = 0
    smoothing: float = 0.1
    average: float = math.nan
    best: float = math.inf
    best_iteration: int = -1
    start: float = math.nan  # the first loss seen (the untrained network's)

    @classmethod
    def from_settings(cls, settings) -> LossWatch:
        """The watch a solver's settings ask for (divergence factor, warm-up, stopping rule)."""
        return cls(
            settings.divergence_factor,
            settings.divergence_warmup,
            settings.max_iterations,
            settings.patience,
        )

    def update(self, loss: float, iteration: int, solver: str) -> None:
        """Record `loss`; raise DivergenceError when it is non-finite or explodes."""
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{solver} diverged: the loss is {loss} at iteration {iteration}",
                "lower the step size (adam: lr; admm: raise head_nu or lam) and resume from the "
                "last checkpoint",
            )
        a = self.smoothing
        self.average = loss if math.isnan(self.average) else (1 - a) * self.average + a * loss
        self.start = loss if math.isnan(self.start) else self.start
        if iteration >= self.warmup and exploded(self.average, self.best, self.start, self.factor):
            raise DivergenceError(
                f"{solver} diverged: smoothed loss {self.average:.4g} at iteration {iteration} is "
                f"more than {self.factor:g}x its best {self.best:.4g} and above its first "
                f"{self.start:.4g}",
                "lower the step size and resume from the last checkpoint",
            )
        if self.average < self.best * (1 - 1e-4):
            self.best, self.best_iteration = self.average, iteration

    def finished(self, iteration: int) -> str | None:
        """A reason to stop (max_iterations, or patience without a new best), else None."""
        if self.max_iterations and iteration >= self.max_iterations:
            return f"reached max_iterations={self.max_iterations}"
        stale = iteration - self.best_iteration > self.patience
        if self.patience and self.best_iteration >= 0 and stale:
            return f"no new best loss for {self.patience} iterations"
        return None

    def state_dict(self) -> dict:
        return {
            "average": self.average,
            "best": self.best,
            "best_iteration": self.best_iteration,
            "start": self.start,
        }

    def load_state_dict(self, d: dict) -> None:
        self.average, self.best = float(d["average"]), float(d["best"])
        self.best_iteration = int(d["best_iteration"])
        self.start = float(d.get("start", math.nan))  # states saved before it was kept


def exploded(loss: float, best: float, start: float, factor: float) -> bool:
    """`loss` is over `factor` x `best` and over `start` (an unknown start, NaN, counts as
    passed): the divergence test of LossWatch and of the training loop's epochs."""
    return loss > factor * max(best, 1e-6) and not loss <= start


def make_solver(name: str, model: ChainNet, data: Batches, settings: dict, seed: int) -> Solver:
    """Build the solver `name` ("admm" or "adam") from its config table (plus batch_size and
    class_weights)."""
    if name == "admm":
        from .admm import AdmmSettings, AdmmSolver

        return AdmmSolver(model, data, AdmmSettings.from_dict(dict(settings)), seed)
    if name == "adam":
        from .adam import AdamSettings, AdamSolver

        return AdamSolver(model, data, AdamSettings.from_dict(dict(settings)), seed)
    raise GeodnnError(f"unknown solver {name!r}; use 'admm' or 'adam'")
