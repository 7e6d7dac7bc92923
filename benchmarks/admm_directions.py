"""How well ADMM's layer-local W-steps follow the real network's gradient, layer by layer.

The pipelined schedule updates each layer from a request that left the head 2 (L - 1 - l)
iterations earlier and passed through weights that have moved since, so its direction could be
stale. This measures it: after a warm-up, for every W-step of the next iterations, the cosine of
the step [dW, db] with (a) -grad of the real network's class-weighted loss on the same slot's
crops at the weights before the step, and (b) the input-whitened gradient -grad (G + lam I)^-1
(G: the layer's running patch Gram, the metric the ridge W-step works in), plus the step's size
relative to the weights. Reported per distance from the head (0 = the head), beside the relative
step sizes of Adam (lr 3e-3, batch 16, as in solver_accuracy.py) after as many steps.

    python benchmarks/admm_directions.py --quick    # Vegas, depth 16, about a minute
    python benchmarks/admm_directions.py            # both scenes, longer warm-up
The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field

import torch
from solver_accuracy import (
    ADAM_BATCH,
    ADAM_LR,
    RandomCrops,
    add_power_option,
    load_scene,
    make_model,
    split,
)

from geodnn.data import class_weights
from geodnn.runtime import retain_freed_memory
from geodnn.solvers import AdamSettings, AdamSolver, AdmmSettings, AdmmSolver
from geodnn.solvers.admm import LayerState, Message
from geodnn.solvers.subproblems import weight_matrix, weighted_cross_entropy


@dataclass
class Alignment:
    """Per distance from the head: cosines of the W-steps and their relative sizes."""

    raw: dict[int, list[float]] = field(default_factory=dict)
    whitened: dict[int, list[float]] = field(default_factory=dict)
    size: dict[int, list[float]] = field(default_factory=dict)

    def add(self, distance: int, raw: float, whitened: float, size: float) -> None:
        for table, value in ((self.raw, raw), (self.whitened, whitened), (self.size, size)):
            table.setdefault(distance, []).append(value)

    def summary(self) -> dict:
        counts = {d: len(v) for d, v in sorted(self.raw.items())}
        return {
            "cosine_with_gradient": _mean_by_distance(self.raw),
            "cosine_with_whitened_gradient": _mean_by_distance(self.whitened),
            "relative_step": _mean_by_distance(self.size),
            "steps": counts,
        }


def _rounded(value: float) -> float:
    return float(f"{value:.3g}")


def _mean_or_none(values: list[float]) -> float | None:
    """The rounded mean, or None (JSON null) where no step reached those layers."""
    return _rounded(sum(values) / len(values)) if values else None


def _mean_by_distance(table: dict[int, list[float]]) -> dict[int, float]:
    return {d: _rounded(sum(v) / len(v)) for d, v in sorted(table.items())}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


def _network_at(model, states: list[LayerState]):
    """A copy of `model` holding the states' raw weights, for autograd."""
    net = copy.deepcopy(model)
    for state, layer in zip(states, net.layers):
        layer.conv.weight.data.copy_(state.weight)
        layer.conv.bias.data.copy_(state.bias)
    return net


def _slot_of(solver: AdmmSolver, layer: int, requests: list[Message | None], t: int):
    """(slot, generation) the layer's W-step at iteration t was about: the head's fresh input,
    else the request it got from above."""
    if layer == len(solver.states) - 1:
        return solver.pool.slot_at(t, layer), solver.pool.generation(t, layer)
    message = requests[layer + 1]
    return (message.slot, message.generation) if message is not None else None


def measure(solver: AdmmSolver, data, weights: torch.Tensor, iterations: int) -> Alignment:
    """Step the solver `iterations` times, comparing every W-step with the gradient."""
    found = Alignment()
    n, lam = len(solver.states), solver.settings.lam
    for _ in range(iterations):
        before, requests, t = solver.states, list(solver.downs), solver.iteration
        net = _network_at(solver.model, before)
        solver.step()
        for layer, (old, new) in enumerate(zip(before, solver.states)):
            where = _slot_of(solver, layer, requests, t)
            if new.updates == old.updates or where is None:
                continue
            x, y = data.get(solver.pool.indices(*where))
            net.zero_grad()
            weighted_cross_entropy(net(x), y, weights).backward()
            conv = net.layers[layer].conv
            grad = weight_matrix(conv.weight.grad, conv.bias.grad)
            step = weight_matrix(new.weight, new.bias) - weight_matrix(old.weight, old.bias)
            eye = torch.eye(new.gram.shape[0], dtype=new.gram.dtype)
            whitened = torch.linalg.solve(new.gram + lam * eye, grad.T).T
            size = float(step.norm() / weight_matrix(old.weight, old.bias).norm())
            found.add(n - 1 - layer, _cosine(step, -grad), _cosine(step, -whitened), size)
    return found


def adam_steps(model, data, weights: torch.Tensor, warmup: int, iterations: int, seed: int):
    """Adam's relative step size per distance from the head over `iterations` steps after
    `warmup` (its lr and batch as in solver_accuracy.py)."""
    settings = {"class_weights": weights.tolist(), "batch_size": ADAM_BATCH, "lr": ADAM_LR}
    solver = AdamSolver(model, data, AdamSettings.from_dict(settings), seed)
    for _ in range(warmup):
        solver.step()
    sizes: dict[int, list[float]] = {}
    n = len(model.layers)
    for _ in range(iterations):
        before = [weight_matrix(m.conv.weight, m.conv.bias).detach().clone() for m in model.layers]
        solver.step()
        for layer, (old, m) in enumerate(zip(before, model.layers)):
            step = weight_matrix(m.conv.weight, m.conv.bias).detach() - old
            sizes.setdefault(n - 1 - layer, []).append(float(step.norm() / old.norm()))
    return _mean_by_distance(sizes)


def run(scene: str, depth: int, warmup: int, iterations: int, seed: int, power: float) -> dict:
    image, labels = load_scene(scene)
    train, _ = split(image, labels, gap=2 * depth + 8)
    weights = class_weights(torch.from_numpy(train[1]), 2, power=power)
    data = RandomCrops(*train, 64, 4096, seed)
    model = make_model(train[0], depth, 16, seed)
    settings = AdmmSettings.from_dict({"class_weights": weights.tolist(), "monitor": False})
    solver = AdmmSolver(model, data, settings, seed)
    for _ in range(warmup):
        solver.step()
    found = measure(solver, data, weights, iterations).summary()
    adam = make_model(train[0], depth, 16, seed)
    found["adam_relative_step"] = adam_steps(adam, data, weights, warmup, iterations, seed)
    row = {"scene": scene, "depth": depth, "warmup": warmup, "iterations": iterations, **found}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Vegas, depth 16 (~1 minute)")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--warmup", type=int, help="ADMM iterations before measuring")
    parser.add_argument("--iterations", type=int, default=12, help="iterations measured")
    parser.add_argument("--seed", type=int, default=0)
    add_power_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    retain_freed_memory()
    torch.manual_seed(args.seed)
    scenes = ["vegas-roads"] if args.quick else ["vegas-roads", "atlanta-buildings"]
    warmup = args.warmup or (150 if args.quick else 400)
    trip = 2 * (args.depth + 2)  # head to stem: one layer per iteration, down and back up
    if warmup < trip:
        parser.error(
            f"--warmup {warmup} is shorter than the {trip} iterations a request needs to reach "
            f"the stem at depth {args.depth}, so the low layers take no step: use {trip} or more"
        )
    power = args.class_weight_power
    rows = [run(s, args.depth, warmup, args.iterations, args.seed, power) for s in scenes]
    summary = {"quick": args.quick, "depth": args.depth, "class_weight_power": power, "runs": rows}
    keys = ("cosine_with_gradient", "cosine_with_whitened_gradient", "relative_step")
    for key in (*keys, "adam_relative_step"):
        top = [v for r in rows for d, v in r[key].items() if d < 5]  # head + four below
        low = [v for r in rows for d, v in r[key].items() if d >= max(r[key]) - 4]  # lowest five
        summary[f"{key}_top5"] = _mean_or_none(top)
        summary[f"{key}_lowest5"] = _mean_or_none(low)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
