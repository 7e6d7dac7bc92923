"""ADMM (gradient-free, layer-parallel) vs Adam (backprop) on the two labeled sample scenes.

Spatial split (left 70 % of columns train, right 30 % validation, a gap of 2 x depth + 8
columns between them: training crops lie inside the training region and validation is its own
forward, so no input crosses it), random crops, class-weighted cross-entropy. For each scene and
depth both solvers get the same wall-clock budget; reported: validation IoU of the positive
class (mean of six snapshots over the last quarter of the budget) and, threshold-free, its
average precision (`ap_ratio_admm_vs_adam_depth*`: whether ADMM ranks pixels as well as Adam
even where the argmax puts its threshold elsewhere), the real network's
training loss at equal iterations and at equal time, time per iteration, ADMM's ideal
layer-parallel time per iteration (its slowest layer step) and memory per layer.

Each solver runs at its own default batch: ADMM 8 crops in 8 slots (an ADMM iteration then costs
0.5-0.9x an Adam step, from depth 32 to 8, and requests make more round trips per second), Adam
16 (ADAM_BATCH changes it; at depth 16 and power 1 Adam with batch 8 scored 0.092 / 0.214 against
0.127-0.153 / 0.18-0.22 with 16, Vegas / Atlanta). "Equal iterations" therefore means equal
updates, not equal crops.

    python benchmarks/solver_accuracy.py            # full: depths 8, 16, 32, both scenes
    python benchmarks/solver_accuracy.py --quick    # about two minutes (2 x 40 s + validation)
The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import numpy as np
import rasterio
import torch
from rasterio.features import rasterize

from geodnn.data import class_weights
from geodnn.errors import GeodnnError
from geodnn.metrics import best_iou_threshold
from geodnn.metrics import scores as segmentation_scores
from geodnn.model import build_model
from geodnn.runtime import retain_freed_memory, wait_for_device
from geodnn.solvers import AdamSettings, AdamSolver, AdmmSettings, AdmmSolver
from geodnn.solvers.admm import average_step_decay, layer_memory_for, layer_state_bytes
from geodnn.solvers.base import settings_overrides
from pipelines.config import DEFAULTS

DATA = Path(__file__).resolve().parent.parent / "data"
ADAM_LR = float(os.environ.get("ADAM_LR", "3e-3"))
ADAM_BATCH = int(os.environ.get("ADAM_BATCH", "16"))


def load_scene(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(bands, H, W) float32 image with NaN nodata, (H, W) int64 labels 0/1."""
    folder = DATA / name
    with rasterio.open(folder / "image.tif") as src:
        image = src.read().astype(np.float32)
        if src.nodata is not None:
            image[image == src.nodata] = np.nan
        shape, transform, crs = (src.height, src.width), src.transform, src.crs
    if (folder / "roads.tif").exists():
        with rasterio.open(folder / "roads.tif") as src:
            labels = (src.read(1) > 0).astype(np.int64)
    else:
        import geopandas as gpd  # only this scene's labels are vectors

        shapes = gpd.read_file(folder / "buildings.geojson").to_crs(crs).geometry
        labels = rasterize(
            ((g, 1) for g in shapes if g is not None),
            out_shape=shape,
            transform=transform,
            fill=0,
            dtype="uint8",
        ).astype(np.int64)
    return image, labels


class RandomCrops:
    """Crop i of a region: its position is a pure function of (seed, i); a Batches."""

    def __init__(self, image, labels, crop: int, count: int, seed: int) -> None:
        self.image, self.labels, self.crop, self.count = image, labels, crop, count
        rng = np.random.default_rng(seed)
        h, w = labels.shape
        self.rows = rng.integers(0, h - crop + 1, count)
        self.cols = rng.integers(0, w - crop + 1, count)

    def __len__(self) -> int:
        return self.count

    def get(self, indices):
        c = self.crop
        xs = [
            self.image[:, r : r + c, q : q + c]
            for r, q in zip(self.rows[indices], self.cols[indices])
        ]
        ys = [
            self.labels[r : r + c, q : q + c]
            for r, q in zip(self.rows[indices], self.cols[indices])
        ]
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def split(image, labels, gap: int):
    w = labels.shape[1]
    cut = int(0.7 * w)
    return (image[:, :, :cut], labels[:, :cut]), (image[:, :, cut + gap :], labels[:, cut + gap :])


@dataclass
class Scores:
    """One validation snapshot: the argmax IoU of class 1, its average precision and, when a
    calibration region is given, the IoU at the class-1 probability threshold that maximizes
    the IoU on that (training) region."""

    iou: float
    ap: float
    iou_calibrated: float | None = None
    threshold: float | None = None


def validation_iou(model, region) -> float:
    """IoU of class 1 over the whole validation region, in one plain forward (see
    `validation_scores`)."""
    return validation_scores(model, region).iou


def _class1(model, region) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-1 probability and truth (bool) of every pixel of a region, one plain forward."""
    image, labels = region
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(image[None])).to(model.band_mean.device)
        score = torch.softmax(model(x).float(), 1)[0, 1].cpu().reshape(-1)
    return score, torch.from_numpy(labels).reshape(-1) == 1


def validation_scores(model, region, calibration=None) -> Scores:
    """`Scores` over the whole validation region, in one plain forward (and one over the
    `calibration` region, the training one, when given).

    One forward over the region (not tiles): zero padding at tile edges would touch most pixels
    of a small tile once the receptive radius (61 px at depth 16) nears the tile size. The
    average precision ranks every pixel by its class-1 probability, so it does not depend on
    where the class weights put the decision threshold, which the IoU does; the calibrated IoU
    moves that threshold to the training region's best, as a user could without validation
    labels."""
    score, truth = _class1(model, region)
    scores = Scores(_iou_at(score, truth, 0.5), average_precision(score, truth))
    if calibration is not None:
        scores.threshold = best_iou_threshold(*_class1(model, calibration))
        scores.iou_calibrated = _iou_at(score, truth, scores.threshold)
    return scores


def _iou_at(score: torch.Tensor, truth: torch.Tensor, threshold: float) -> float:
    """IoU of class 1 when pixels scoring above `threshold` are called class 1 (0.5: the
    argmax of two classes)."""
    return segmentation_scores(score > threshold, truth, 2).iou[1]


def average_precision(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Mean over the positives of the precision among the pixels ranked up to them, by score
    (ties in a stable sort's order; the area under the precision-recall curve, step-wise); 0
    without positives."""
    hits = positive[torch.argsort(score, descending=True, stable=True)].double()
    if not hits.sum():
        return 0.0
    precision = hits.cumsum(0) / torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def make_model(image, depth: int, width: int, seed: int, device: str = "cpu"):
    model = build_model(image.shape[0], 2, depth=depth, width=width, seed=seed)
    mean = np.nanmean(image.reshape(image.shape[0], -1), axis=1)
    std = np.nanstd(image.reshape(image.shape[0], -1), axis=1)
    model.set_normalization(mean, std)
    return model.to(device)


TAIL = (0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # budget fractions of the validation snapshots


class WeightAverage:
    """Adam's weights averaged as ADMM averages each layer's (bias-corrected EMA, same decay),
    so that both solvers' averaged networks are compared too."""

    def __init__(self, model, decay: float) -> None:
        self.model, self.decay, self.count = model, decay, 0
        self.average = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        d = average_step_decay(self.decay, self.count)
        for a, p in zip(self.average, self.model.parameters()):
            a.lerp_(p.detach(), 1 - d)
        self.count += 1


@torch.no_grad()
def iou_with(model, parameters: list, region) -> float:
    """Validation IoU of `model` with other values of its parameters (restored after)."""
    kept = [p.detach().clone() for p in model.parameters()]
    for p, value in zip(model.parameters(), parameters, strict=True):
        p.copy_(value)
    iou = validation_iou(model, region)
    for p, value in zip(model.parameters(), kept):
        p.copy_(value)
    return iou


def run_solver(
    kind, model, data, weights, budget, seed, val, admm_overrides=None, probe=None, train=None
):
    """Train for `budget` seconds; returns the loss curve [(iteration, seconds, loss)], the
    validation IoU snapshots at the TAIL fractions of the budget (for Adam also those of its
    averaged weights) with the average precision (and, given the `train` region, the
    calibrated IoU) at the same snapshots, and ADMM's layer times.

    The raw iterate's IoU swings by up to +-0.1 from one snapshot to the next (the
    class-weighted loss moves the decision threshold), so one end-of-budget snapshot is mostly
    noise; the mean over the last quarter is the figure compared. With --admm average_decay=D
    ADMM's model holds its averaged weights (which swing 2-6x less), its raw iterate and Adam's
    weights averaged alike are scored too, and Adam's better figure is compared. `probe` =
    (iteration, callback): callback(model) runs once when that iteration is reached. Neither
    counts in the budget."""
    common = {"class_weights": weights}  # each solver at its own default batch (module notes)
    average = None
    if kind == "admm":
        settings = AdmmSettings.from_dict({**common, **(admm_overrides or {})})
        solver = AdmmSolver(model, data, settings, seed)
    else:
        settings = AdamSettings.from_dict({**common, "batch_size": ADAM_BATCH, "lr": ADAM_LR})
        solver = AdamSolver(model, data, settings, seed)
        decay = AdmmSettings.from_dict(admm_overrides or {}).average_decay  # as ADMM's
        average = WeightAverage(model, decay) if decay > 0 else None
    curve, compute, max_layer, sum_layer, tail, tail_other = [], 0.0, 0.0, 0.0, [], []
    while compute < budget:
        start = time.perf_counter()
        stats = solver.step()
        wait_for_device(model.band_mean.device)  # a GPU step's queued work is its cost too
        elapsed = time.perf_counter() - start
        if kind == "admm":  # the monitoring forward is not part of the method's cost
            elapsed = stats["sum_layer_s"]
            max_layer += stats["max_layer_s"]
            sum_layer += stats["sum_layer_s"]
        compute += elapsed
        if average is not None:  # not counted: Adam's own figure is the raw one
            average.update()
        curve.append((solver.iteration, compute, stats["loss"]))
        if probe is not None and solver.iteration == probe[0]:
            probe[1](model)
        if len(tail) < len(TAIL) and compute >= TAIL[len(tail)] * budget:
            tail.append(validation_scores(model, val, train))
            if average is not None:  # Adam: its averaged weights as well
                tail_other.append(iou_with(model, average.average, val))
            elif kind == "admm" and solver.settings.average_decay > 0:  # ADMM: its raw iterate
                raw = [t for s in solver.states for t in (s.weight, s.bias)]
                tail_other.append(iou_with(model, raw, val))
    return solver, curve, (tail, tail_other), max_layer, sum_layer


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# Iterations averaged for a training-loss figure. Each iteration's loss is one mini-batch's (ADMM
# cycles through 8 slots of crops); 100 span a dozen slot cycles (10 did before stop 29). The
# ADMM figures at equal iterations and at equal time still differ 2x with 100 (stop 29: 0.126 /
# 0.281, 170 iterations apart): its real-network loss swings over hundreds of iterations, as
# its validation IoU snapshots do, which is not mini-batch noise.
LOSS_WINDOW = 100


def loss_at(curve, iteration=None, seconds=None, window=LOSS_WINDOW):
    """Mean training loss over the `window` iterations ending at an iteration or a time."""
    if iteration is not None:
        end = min(iteration, len(curve))
    else:
        end = max(1, sum(1 for c in curve if c[1] <= seconds))
    seg = [c[2] for c in curve[max(0, end - window) : end]]
    return sum(seg) / len(seg)


def adam_top_layers(model, data, weights, budget, seed, val, top: int) -> float:
    """Mean validation IoU of Adam training only the `top` layers nearest the head, the lower
    ones left at their random initial weights: how much of Adam's score the low layers make."""
    for layer in model.layers[: len(model.layers) - top]:
        layer.requires_grad_(False)
    _, _, (tail, _), _, _ = run_solver("adam", model, data, weights, budget, seed, val)
    return fmean(t.iou for t in tail)


def compare(
    scene,
    region_train,
    region_val,
    weights,
    depth: int,
    budget: float,
    seed: int,
    crop: int = 64,
    admm: dict | None = None,
    device: str = "cpu",
    adam_top: tuple[int, ...] = (),
):
    """Both solvers on one scene and depth with the same compute budget (and Adam on only the
    top layers, one run per entry of `adam_top`)."""
    data = RandomCrops(*region_train, crop, 4096, seed)
    out, at_equal = {}, {}
    for kind in ("admm", "adam"):
        model = make_model(region_train[0], depth, 16, seed, device)
        probe = None
        if kind == "adam":  # Adam's validation IoU after as many iterations as ADMM made
            probe = (
                out["admm"]["iterations"],
                lambda m: at_equal.setdefault("iou", validation_iou(m, region_val)),
            )
        solver, curve, (tail, other), max_layer, sum_layer = run_solver(
            kind, model, data, weights, budget, seed, region_val, admm, probe, region_train
        )
        n = len(curve)
        out[kind] = {
            "iterations": n,
            "seconds": curve[-1][1],
            "curve": curve,
            "val_iou": fmean(t.iou for t in tail),
            "val_iou_snapshots": [round(t.iou, 4) for t in tail],
            "val_ap": fmean(t.ap for t in tail),
            "val_iou_calibrated": fmean(t.iou_calibrated for t in tail),
            "thresholds": [round(t.threshold, 4) for t in tail],
            # Adam: its averaged weights; ADMM (averaging on): its raw iterate
            "val_iou_other": fmean(other) if other else None,
            "s_per_iter": curve[-1][1] / n,
            "batch": solver.settings.batch_size,
        }
        if kind == "admm":
            out[kind]["ideal_parallel_s_per_iter"] = max_layer / n
            states = solver.states
            out[kind]["memory_per_layer_bytes_measured"] = max(layer_state_bytes(s) for s in states)
            layer = model.layers[1]
            out[kind]["memory_per_layer_bytes_formula"] = layer_memory_for(
                solver.settings,
                16,
                16,
                layer.spec.kernel_size,
                solver.pool.crops,
                crop,
                crop,
                head=False,
            )
    a, m = out["adam"], out["admm"]
    # Adam's figure is the better of its raw and its averaged weights (ADMM has only its own)
    adam_best = max(a["val_iou"], a["val_iou_other"] or 0.0)
    n_eq = min(a["iterations"], m["iterations"])
    t_eq = min(a["seconds"], m["seconds"])
    row = {
        "scene": scene,
        "seed": seed,
        "depth": depth,
        "crop": crop,
        "budget_s": budget,
        "val_iou_adam": round(adam_best, 4),
        "val_iou_admm": round(m["val_iou"], 4),
        # threshold-free: how well each ranks the pixels (mean over the same snapshots)
        "val_ap_adam": round(a["val_ap"], 4),
        "val_ap_admm": round(m["val_ap"], 4),
        # IoU at the class-1 threshold that is best on the TRAINING region (both solvers alike)
        "val_iou_calibrated_adam": round(a["val_iou_calibrated"], 4),
        "val_iou_calibrated_admm": round(m["val_iou_calibrated"], 4),
        "calibrated_thresholds_adam": a["thresholds"],
        "calibrated_thresholds_admm": m["thresholds"],
        "val_iou_adam_raw": round(a["val_iou"], 4),
        # null when averaging is off (--admm average_decay=D turns it on for both)
        "val_iou_adam_averaged": _rounded(a["val_iou_other"]),
        "val_iou_admm_raw_iterate": _rounded(m["val_iou_other"]),
        "val_iou_snapshots_adam": a["val_iou_snapshots"],
        "val_iou_snapshots_admm": m["val_iou_snapshots"],
        "val_iou_adam_at_admm_iterations": round(at_equal["iou"], 4) if at_equal else None,
        "iou_ratio_admm_vs_adam": round(m["val_iou"] / adam_best, 3) if adam_best > 0 else None,
        "batch_adam": a["batch"],
        "batch_admm": m["batch"],
        "iterations_adam": a["iterations"],
        "iterations_admm": m["iterations"],
        "equal_iterations": n_eq,
        "train_loss_adam_at_equal_iterations": round(loss_at(a["curve"], iteration=n_eq), 4),
        "train_loss_admm_at_equal_iterations": round(loss_at(m["curve"], iteration=n_eq), 4),
        "equal_time_s": round(t_eq, 2),
        "train_loss_window_iterations": LOSS_WINDOW,
        "train_loss_adam_at_equal_time": round(loss_at(a["curve"], seconds=t_eq), 4),
        "train_loss_admm_at_equal_time": round(loss_at(m["curve"], seconds=t_eq), 4),
        "time_per_iter_ratio_admm_sequential_vs_adam": round(m["s_per_iter"] / a["s_per_iter"], 3),
        "time_per_iter_ratio_admm_ideal_parallel_vs_adam": round(
            m["ideal_parallel_s_per_iter"] / a["s_per_iter"], 3
        ),
        "admm_memory_per_layer_bytes_formula": m["memory_per_layer_bytes_formula"],
        "admm_memory_per_layer_bytes_measured": m["memory_per_layer_bytes_measured"],
    }
    for top in adam_top:
        model = make_model(region_train[0], depth, 16, seed, device)
        iou = adam_top_layers(model, data, weights, budget, seed, region_val, top)
        row[f"val_iou_adam_top{top}_layers"] = round(iou, 4)
    print(json.dumps(row), flush=True)
    return row


def _pooled_ratio(rows: list[dict], figure: str = "val_iou", digits: int = 3) -> float | None:
    """ADMM's `figure` (validation IoU by default) over Adam's, each summed over `rows`
    (scenes pooled)."""
    adam = sum(r[f"{figure}_adam"] for r in rows)
    return round(sum(r[f"{figure}_admm"] for r in rows) / adam, digits) if adam else None


def add_power_option(parser: argparse.ArgumentParser) -> None:
    """--class-weight-power, defaulting to the product's: the benchmarks weight the loss as
    `geodnn train` does unless told otherwise."""
    parser.add_argument(
        "--class-weight-power",
        type=float,
        default=DEFAULTS["train"]["class_weight_power"],
        metavar="P",
        help="class weight = (pixel frequency) ** -P on the training region (default: the "
        "product's [train] class_weight_power, %(default)s; the figures before stop 19 used 1)",
    )


PLATEAU_IOU = 0.1  # mean Adam validation IoU that counts as clearly past the plateau


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Vegas, depth 16 only (~2 minutes)")
    parser.add_argument("--budget", type=float, help="seconds of training per solver and run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="S",
        help="run every scene and depth once per seed (model, crops, pool order); the ratios "
        "pool all runs and are also given per seed (overrides --seed)",
    )
    parser.add_argument("--crop", type=int, help="training crop size (default 64; quick: 32)")
    parser.add_argument("--scenes", nargs="+", help="subset of vegas-roads atlanta-buildings")
    parser.add_argument("--depths", nargs="+", type=int, help="subset of depths (default 8 16 32)")
    parser.add_argument(
        "--admm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override [admm] settings, e.g. --admm request_gain=0.9 step_scale=0.3",
    )
    parser.add_argument(
        "--adam-top",
        nargs="+",
        type=int,
        default=[],
        metavar="K",
        help="also run Adam training only the top K layers (the rest stay random), per K",
    )
    add_power_option(parser)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both solvers compute (the figures in README are on the CPU)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no GPU here; use --device cpu")
    try:
        admm = settings_overrides(args.admm, "admm")
    except GeodnnError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)
    retain_freed_memory()  # as `geodnn train` does
    torch.set_flush_denormal(True)
    scenes = args.scenes or (
        ["vegas-roads"] if args.quick else ["vegas-roads", "atlanta-buildings"]
    )
    depths = args.depths or ([16] if args.quick else [8, 16, 32])
    budget = args.budget or (40.0 if args.quick else 120.0)
    crop = args.crop or (32 if args.quick else 64)
    seeds = args.seeds or [args.seed]
    rows = []
    for scene in scenes:
        image, labels = load_scene(scene)
        depth_max = max(depths)
        train, val = split(image, labels, gap=2 * depth_max + 8)
        power = args.class_weight_power
        weights = class_weights(torch.from_numpy(train[1]), 2, power=power).tolist()
        for seed in seeds:
            for depth in depths:
                row = compare(
                    scene,
                    train,
                    val,
                    weights,
                    depth,
                    budget,
                    seed,
                    crop,
                    admm,
                    args.device,
                    tuple(args.adam_top),
                )
                rows.append(row)
    admm_defaults = AdmmSettings.from_dict(admm).to_dict()
    admm_defaults.pop("class_weights")
    summary = {
        "quick": args.quick,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "scenes": scenes,  # the ratios below pool these scenes only
        "seeds": seeds,
        "budget_s_per_solver": budget,
        "crop": crop,
        "class_weight_power": args.class_weight_power,
        "adam_lr": ADAM_LR,
        "adam_batch": ADAM_BATCH,
        "admm_settings": admm_defaults,
        "runs": rows,
    }
    for depth in depths:
        at_depth = [r for r in rows if r["depth"] == depth]
        iou_a = sum(r["val_iou_adam"] for r in at_depth)
        summary[f"iou_ratio_admm_vs_adam_depth{depth}"] = _pooled_ratio(at_depth)
        if len(seeds) > 1:  # the spread a single seed's ratio carries
            summary[f"iou_ratio_admm_vs_adam_depth{depth}_per_seed"] = [
                _pooled_ratio([r for r in at_depth if r["seed"] == seed]) for seed in seeds
            ]
        # the ratio means something only once Adam is clearly past the all-background plateau
        # (every Adam run of the probes sat at IoU 0 first); below PLATEAU_IOU it is flagged
        adam_mean = iou_a / max(1, len(at_depth))
        summary[f"adam_past_plateau_depth{depth}"] = adam_mean > PLATEAU_IOU
        summary[f"ap_ratio_admm_vs_adam_depth{depth}"] = _pooled_ratio(at_depth, "val_ap", 4)
        summary[f"calibrated_iou_ratio_admm_vs_adam_depth{depth}"] = _pooled_ratio(
            at_depth, "val_iou_calibrated", 4
        )
        for top in args.adam_top:  # Adam on the top layers only, pooled like the ratio
            iou_t = sum(r[f"val_iou_adam_top{top}_layers"] for r in at_depth)
            key = f"iou_ratio_adam_top{top}_layers_vs_adam_depth{depth}"
            summary[key] = round(iou_t / iou_a, 3) if iou_a else None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
