"""`geodnn train CONFIG`: train the chain network with ADMM, Adam or the pipeline baseline.

The run folder holds everything: config.toml (the config as run), metrics.csv (one row per epoch),
curves.png, last.pt (checkpoint of the latest epoch, usable by `geodnn predict`), state.pt (solver
state for an exact `--resume`; with --workers one rank*-of-N-it*.pt per rank and ranks-latest.txt)
and model.pt (the final checkpoint). Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import tomli_w
import torch

import geodnn
from geodnn.atomic import atomic_path
from geodnn.checkpoint import atomic_torch_save, cut_short, read_torch_file
from geodnn.data import Batches, weights_from_counts
from geodnn.errors import CheckpointError, DivergenceError
from geodnn.metrics import (
    IGNORE_INDEX,
    SegmentationScores,
    best_iou_threshold,
    confusion_matrix,
    threshold_scale,
)
from geodnn.parallel import (
    RankContext,
    RankFailureError,
    all_gather_rows,
    all_reduce_sum,
    share_module,
)
from geodnn.parallel.launch import EXIT_CODES_ENV, report_exit_code
from geodnn.parallel.rankstate import (
    LATEST,
    latest_iteration,
    latest_world_size,
    save_rank_checkpoint,
)
from geodnn.runtime import StopSignal, raise_if_stopped, retain_freed_memory, stop_signals_raise
from geodnn.solvers.base import exploded
from tiles.errors import StoreError
from tiles.progress import progress_bar
from tiles.scratch import held_or_refused
from tiles.split import warn_if_gap_below_radius
from tiles.store import TileStore
from tiles.warn import warn_user
from tiles.wording import command_line, command_line_only, option

from .arguments import flag
from .cli import JOBS
from .config import (
    DEFAULTS,
    OVERRIDE_FLAGS,
    SOLVERS,
    Config,
    check_pipeline_batch,
    load_config,
    revalidated,
)
from .datasets import Interleaved, SceneStores, ValidationWindows, spread_evenly
from .device import DEVICES, auto_device, training_device
from .errors import DamagedRunError, PipelineError, system_refusal
from .io import atomic_write_text, remove_if_empty, save_figure
from .options import integer
from .report import score_text

log = logging.getLogger(__name__)

STATE_FORMAT = "geodnn.trainstate"


@dataclass
class EpochRecord:
    """One row of metrics.csv: where training stands at the end of an epoch."""

    iteration: int
    elapsed_s: float
    train_loss: float
    val_loss: float
    val_iou: list[float]
    val_f1: list[float]
    pixel_accuracy: float
    extra: dict[str, float] = field(default_factory=dict)

    def row(self, class_names: list[str]) -> dict[str, float]:
        row = {
            "iteration": self.iteration,
            "elapsed_s": round(self.elapsed_s, 3),
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "pixel_accuracy": self.pixel_accuracy,
        }
        row.update({f"val_iou_{n}": v for n, v in zip(class_names, self.val_iou)})
        row.update({f"val_f1_{n}": v for n, v in zip(class_names, self.val_f1)})
        row.update(self.extra)
        return row


@dataclass
class TrainSetup:
    """What a training run needs, built once from the config."""

    config: Config
    run_dir: Path
    model: geodnn.ChainNet
    stores: SceneStores  # the tile stores trained on (their splits, for the checkpoint)
    train_data: Batches  # every store's training crops (`SceneStores.training_data`)
    val_data: ValidationWindows | Interleaved  # validation tiles with a receptive-radius halo
    class_weights: torch.Tensor
    class_names: list[str]
    class_colors: list
    class_values: list | None = None  # each class's value in the label file (None: unknown)
    device: str = "cpu"  # where this process computes: "cpu" or "cuda" (resolved, never "auto")
    # training tiles (with halo) that fit each checkpoint's decision threshold; None: argmax
    calibration_data: ValidationWindows | Interleaved | None = None

    @property
    def solver_name(self) -> str:
        return self.config.solver


def check_writable_run_dir(run_dir: Path) -> None:
    """Refuse in one line, before any rank starts, a run folder that cannot be made or takes no
    file (read-only disk, permissions, a file on its path). The probe is an unnamed temporary
    file in the run folder or, before it exists, the nearest folder above it: nothing is made
    or left behind, so a command refused later leaves no empty folder either."""
    if run_dir.is_file():
        return  # `check_run_dir` says so
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():  # a file where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PipelineError(
            f"{run_dir}: cannot write the run folder here ({exc.strerror}); pick another "
            f"{run_dir_option()}"
        ) from None


def store_paths(config: Config) -> list[Path]:
    """The config's tile stores ([data] store: one path, or a list of them, one per scene)."""
    given = config["data"]["store"]
    if not given:
        raise PipelineError(
            f"{config.path}: [data] store is not set; run `geodnn tile` and set it to the store "
            '(or to a list of stores, store = ["a.zarr", "b.zarr"])'
        )
    paths = [config.resolve(p) for p in ([given] if isinstance(given, str) else given)]
    missing = next((p for p in paths if not p.exists()), None)
    if missing is not None:  # before a run folder is made for it
        raise PipelineError(f"{missing}: tile store not found; build it with `geodnn tile`")
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise PipelineError(
            f"{config.path}: [data] store lists {', '.join(twice)} more than once; list each "
            "store once"
        )
    return paths


def build_setup(config: Config, run_dir: Path) -> TrainSetup:
    """Open the tile stores, build the model with their normalization, weigh the classes.
    The validation splits are read lazily: only the scored tiles (val_tiles) and their
    neighbours are ever read (loading a 16k scene's split cost 0.4 GB). Of several ranks,
    rank 0 alone warns of the data (each said it once)."""
    with warnings.catch_warnings():
        if not is_leader():
            warnings.simplefilter("ignore", UserWarning)
        return _build_setup(config, run_dir)


def _build_setup(config: Config, run_dir: Path) -> TrainSetup:
    data, model_cfg, train = config["data"], config["model"], config["train"]
    paths = store_paths(config)
    stores = SceneStores.open(paths, crop=data["crop"], seed=train["seed"])
    named = ", ".join(map(str, paths))
    if not sum(map(len, stores.train)) or not sum(map(len, stores.val)):
        many = "these stores have" if len(paths) > 1 else "the store has"
        raise PipelineError(
            f"{named}: {many} no training or no validation tiles; "
            f"re-tile with another {option('split')}"
        )
    first = stores.first
    model = geodnn.build_model(
        bands=first.bands, classes=len(first.class_names), seed=train["seed"], **model_cfg
    )
    model.set_normalization(*stores.band_stats)
    for part in stores.train:
        warn_if_halo_crosses_split(part.store.path, part.store.attrs, model.receptive_radius)
    check_labeled_pixels(named, stores, data["val_tiles"])
    warn_of_rare_classes(named, stores, data["crop"])
    weights = class_weights(named, stores, train)
    device = training_device(train["device"], f"{config.path}: [train] device")
    warn_if_too_short_to_train(config, len(model.layers))
    calibrate = model.config.classes == 2 and data["calibrate_tiles"] > 0
    if data["calibrate_tiles"] > 0 and not calibrate:
        warn_user(
            f"{config.path}: [data] calibrate_tiles has no effect on a model of "
            f"{model.config.classes} classes (it fits the one threshold of a 2-class model); "
            "its classes are the plain argmax; drop it"
        )
    return TrainSetup(
        config=config,
        run_dir=run_dir,
        model=model,
        train_data=stores.training_data(),
        val_data=stores.validation_windows(model.receptive_radius),
        class_weights=weights,
        class_names=list(first.class_names),
        class_colors=[list(c) for c in first.class_colors],
        class_values=first.class_values,
        device=device,
        # whole training tiles with their halo, for `fit_decision` (2-class models with
        # [data] calibrate_tiles > 0; each rank scores a share); read lazily
        calibration_data=stores.calibration_windows(model.receptive_radius) if calibrate else None,
        stores=stores,
    )


def check_labeled_pixels(named: str, stores: SceneStores, val_tiles: int) -> None:
    """Refuse stores whose training regions, or whose scored validation tiles (the first
    [data] val_tiles), hold no labeled pixel: training would learn nothing and metrics.csv would
    show zeros that look like scores. Warn for classes without training pixels (weight 0)."""
    counts = np.asarray(stores.class_counts)
    if counts.sum() == 0:
        raise PipelineError(
            f"{named}: the training region has no labeled pixels; re-tile with another "
            f"{option('split')} "
            "or labels that cover it"
        )
    scored = stores.scored_labels(val_tiles)
    validated = sum(1 for part in stores.val if len(part))  # stores with validation tiles
    if len(scored) < validated:
        warn_user(
            f"{named}: [data] val_tiles = {val_tiles} scores the validation tiles of "
            f"{len(scored)} of the {validated} stores; raise it to at least {validated} to "
            "score every scene"
        )
    if not any((labels != IGNORE_INDEX).any() for labels in scored):
        raise PipelineError(
            f"{named}: the {sum(map(len, scored))} validation tile(s) scored ([data] "
            "val_tiles) hold no labeled pixels; raise val_tiles or re-tile with another "
            f"{option('split')}"
        )
    missing = [n for n, c in zip(stores.first.class_names, counts.tolist()) if c == 0]
    if missing:
        warn_user(
            f"{named}: class(es) {', '.join(missing)} have no training pixels, so training "
            f"gives them no signal (weight 0); re-tile with another {option('split')} to train them"
        )


def warn_if_too_short_to_train(config: Config, layers: int) -> None:
    """ADMM's layers update in a pipeline: crops reach the head after one iteration a layer
    and its requests come back down as slowly, so a run shorter than that trip leaves the low
    layers (or every layer) as they started, while it reports 'trained'."""
    total = config["train"]["iterations"]
    if config.solver != "admm" or total >= 2 * layers:
        return
    which = "no layer" if total <= layers else "the layers far from the head"
    warn_user(
        f"{config.path}: {total} iterations is too few for ADMM on {layers} layers: the head "
        f"first updates at about iteration {layers} and its requests reach the stem at about "
        f"{2 * layers}, so {which} will be updated; raise [train] iterations to {2 * layers} "
        "or more"
    )


def warn_of_rare_classes(named: str, stores: SceneStores, crop: int) -> None:
    """A class with fewer labeled training pixels than one crop is almost never in a batch:
    the model cannot learn it, and its class weight is the largest."""
    counts = np.asarray(stores.class_counts)
    rare = [
        f"{name} ({count} px)"
        for name, count in zip(stores.first.class_names, counts.tolist())
        if 0 < count < crop * crop
    ]
    if rare:
        warn_user(
            f"{named}: class(es) {', '.join(rare)} have fewer labeled training pixels than one "
            f"{crop}x{crop} crop, too few to learn; label more of them or merge them into "
            "another class"
        )


def class_weights(named: str, stores: SceneStores, train: dict) -> torch.Tensor:
    """The loss's class weights from the training pixels, capped by [train]
    class_weight_max_ratio; says when the cap changed them."""
    counts, power = stores.class_counts, train["class_weight_power"]
    ratio = train["class_weight_max_ratio"]
    weights = weights_from_counts(counts, power, ratio)
    uncapped = weights_from_counts(counts, power)
    present = uncapped > 0
    if present.any() and uncapped[present].max() > ratio * uncapped[present].min() * (1 + 1e-6):
        spread = float(uncapped[present].max() / uncapped[present].min())
        warn_user(
            f"{named}: the class weights from [train] class_weight_power = {power} would span "
            f"{spread:.3g}x; capped at [train] class_weight_max_ratio = {ratio:g}"
        )
    return weights


def warn_if_halo_crosses_split(store: Path, attrs: dict, radius: int) -> None:
    """The guard band must be at least the receptive radius, or validation sees training pixels."""
    warn_if_gap_below_radius(store, int(attrs.get("split", {}).get("gap", radius)), radius)


def solver_settings(setup: TrainSetup) -> dict:
    config = setup.config
    name = setup.solver_name
    settings = dict(config[name]) if name in config.tables else {}
    settings.setdefault("batch_size", config["train"]["batch_size"])  # a solver's own, if set
    settings["class_weights"] = setup.class_weights.tolist()
    return settings


@torch.no_grad()
def validate(
    model: geodnn.ChainNet,
    data: Batches,
    weights: torch.Tensor,
    limit: int,
    class_scale: list[float] | None = None,
    batch: int = 8,
    ranks: RankContext | None = None,
) -> tuple[float, SegmentationScores]:
    """Real-network loss and scores on validation tiles (plain forward pass, no solver state),
    each tile read with its validation neighbours as context (`ValidationWindows`) so that its
    border pixels are scored as `geodnn predict` would see them; computed where the model lives,
    the confusion matrix summed on the CPU. With `ranks` (collective: every rank holds the whole
    model) each rank scores every N-th tile and the sums are reduced: no rank idles while
    another validates, and the scores are those of one process."""
    model.eval()
    device = model.band_mean.device
    weights = weights.to(device)
    classes = model.config.classes
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    loss_sum, weight_sum = 0.0, 0.0
    for logits, y in tile_logits(model, data, my_share(range(min(len(data), limit)), ranks), batch):
        loss = torch.nn.functional.cross_entropy(
            logits, y, weight=weights, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss_sum += float(loss)
        weight_sum += float(weights[y[y != IGNORE_INDEX]].sum())
        confusion += confusion_matrix(decide(logits, class_scale), y, classes).cpu()
    if ranks is not None:
        totals = torch.tensor([loss_sum, weight_sum], dtype=torch.float64)
        sums = torch.cat([totals, confusion.reshape(-1).double()])
        sums = all_reduce_sum(ranks, sums.to(device), "the validation scores").cpu()
        loss_sum, weight_sum = float(sums[0]), float(sums[1])
        confusion = sums[2:].round().long().reshape(classes, classes)
    # the class-weighted mean, as the training loss (F.cross_entropy's weighted mean)
    return loss_sum / weight_sum if weight_sum > 0 else 0.0, SegmentationScores(confusion)


def my_share(indices, ranks: RankContext | None) -> list[int]:
    """This rank's tiles of `indices` (every N-th, from its rank on); all of them alone."""
    indices = list(indices)
    return indices if ranks is None else indices[ranks.rank :: ranks.world_size]


def tile_logits(model: geodnn.ChainNet, data: Batches, indices, batch: int):
    """(logits, labels) of the tiles at `indices` (of `ValidationWindows`, or several stores'
    in turn), `batch` at a time, on the model's device: each window's forward, cropped to its
    tile (the halo, half the window's excess over the tile, only gives context)."""
    device = model.band_mean.device
    indices = list(indices)
    for start in range(0, len(indices), batch):
        x, y = data.get(indices[start : start + batch])
        x, y = x.to(device), y.to(device)
        h = (x.shape[2] - y.shape[1]) // 2
        yield model(x)[:, :, h : h + y.shape[1], h : h + y.shape[2]], y


@torch.no_grad()
def fit_decision(
    model: geodnn.ChainNet,
    data: Batches,
    limit: int,
    batch: int = 8,
    ranks: RankContext | None = None,
) -> list[float]:
    """The class-1 probability threshold with the best IoU on up to `limit` training tiles
    (spread evenly over the training region, each with its halo of context), as the per-class
    factors `geodnn predict` applies (`tiles.stitch.decide`).

    Class weights push a model's probabilities towards the rare class, so the argmax over-calls
    it. With full inverse-frequency weights (power 1; depth 16, 60 s, two seeds, two runs) the
    threshold fitted on training pixels raised the validation IoU of roads and buildings from
    0.13-0.27 to 0.21-0.38 for both solvers (benchmarks/solver_accuracy.py); with the configs'
    power 0.5 (`geodnn run pipelines/configs/vegas-roads.toml`, one run) it moved Adam's road
    IoU 0.264 -> 0.279 and ADMM's 0.230 -> 0.212, the training region holding twice the
    validation region's share of roads. Hence opt-in ([data] calibrate_tiles > 0).

    With `ranks` (collective) each rank scores a share of the tiles and every rank gets the
    threshold of all of them (the pixels' order does not change it: ties are never split)."""
    model.eval()
    picks = (  # every store's share of the tiles, spread over it
        data.spread(limit)
        if isinstance(data, Interleaved)
        else spread_evenly(len(data), limit).tolist()
    )
    pixels = [torch.zeros(0, 2, device=model.band_mean.device)]  # (score, is positive) rows
    for logits, y in tile_logits(model, data, my_share(picks, ranks), batch):
        keep = y != IGNORE_INDEX
        score = torch.softmax(logits.float(), 1)[:, 1][keep]
        pixels.append(torch.stack([score, (y[keep] == 1).float()], dim=1))
    rows = torch.cat(pixels)
    if ranks is not None:
        rows = all_gather_rows(ranks, rows, "the calibration scores")
    rows = rows.cpu()
    return threshold_scale(best_iou_threshold(rows[:, 0], rows[:, 1] > 0.5))


def decide(logits: torch.Tensor, class_scale: list[float] | None) -> torch.Tensor:
    """Classes of (B, C, h, w) logits: the argmax, or that of the probabilities times
    `class_scale` (as `tiles.stitch.decide` does for `geodnn predict`)."""
    if class_scale is None:
        return logits.argmax(1)
    scale = torch.tensor(class_scale, dtype=torch.float32, device=logits.device)
    return (torch.softmax(logits.float(), 1) * scale.view(1, -1, 1, 1)).argmax(1)


def write_metrics(path: Path, records: list[EpochRecord], class_names: list[str]) -> None:
    rows = [r.row(class_names) for r in records]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ADMM's ranks log the head's loss on its pipelined input, not a forward of the whole network
RANK_TRAIN_LOSS = "train (head, on its pipelined input)"
MARKED_POINTS = 30  # curves of up to this many epochs mark each point (one alone is no line)


def plot_curves(
    path: Path,
    records: list[EpochRecord],
    class_names: list[str],
    title: str,
    train_label: str | None = None,
) -> None:
    """Training loss, validation loss and validation IoU per class against iterations
    (`train_label`: what the training loss measures, the real network's by default)."""
    from matplotlib.figure import Figure  # here: a command's start and --help skip matplotlib

    its = [r.iteration for r in records]
    style = {"marker": "o", "markersize": 4} if len(records) <= MARKED_POINTS else {}
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_iou = fig.subplots(1, 2)
    label = train_label or "train (real network)"
    ax_loss.plot(its, [r.train_loss for r in records], label=label, **style)
    ax_loss.plot(its, [r.val_loss for r in records], label="validation", **style)
    ax_loss.set(xlabel="iteration", ylabel="weighted cross-entropy", title=f"{title}: loss")
    ax_loss.legend(loc="best")
    for c, name in enumerate(class_names):
        ax_iou.plot(its, [r.val_iou[c] for r in records], label=name, **style)
    ax_iou.set(xlabel="iteration", ylabel="IoU", ylim=(0, 1), title=f"{title}: validation IoU")
    # beside the panel: IoUs fill it from 0 (rare classes) to near 1 (background)
    ax_iou.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    for ax in (ax_loss, ax_iou):
        iteration_axis(ax, its)
    save_figure(fig, path)


def iteration_axis(ax, its: list[int]) -> None:
    """Iterations from 0 (the untrained network) to just past the last epoch, whole numbers
    only: one epoch alone would otherwise get a span of +-4 % around its iteration."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, max(its, default=1) * 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def iou_summary(class_names: list[str], ious: list[float]) -> str:
    """Per-class IoUs for a person: 'background 0.944, roads 0.037' ('roads absent' for a
    class validation did not see: NaN)."""
    return ", ".join(f"{name} {score_text(iou)}" for name, iou in zip(class_names, ious))


@dataclass
class TrainResult:
    """What `train` made: its run folder, the final checkpoint (model.pt) and one record per
    epoch (the rows of metrics.csv). It stands for its checkpoint wherever a path is taken:
    `predict_scene(result, ...)`, `load_checkpoint(result)`."""

    run_dir: Path
    checkpoint: Path
    records: list[EpochRecord]
    class_names: list[str] = field(default_factory=list)  # of the records' per-class scores

    def __fspath__(self) -> str:
        return os.fspath(self.checkpoint)


STORE_RECORD = "store.json"  # which tile store the run trains on, by content
RUN_FILES = (
    "config.toml", "metrics.csv", "curves.png", "last.pt", "model.pt", "state.pt", STORE_RECORD
)  # fmt: skip
RANK_FILES = (LATEST, "rank*-of-*-it*.pt")


def ranked(solver) -> bool:
    """True for a solver that is one rank of a torch.distributed job."""
    return hasattr(solver, "ctx")


def has_state(run_dir: Path) -> bool:
    return (run_dir / "state.pt").is_file() or latest_iteration(run_dir) is not None


def holds_run(run_dir: Path) -> bool:
    """A run (finished or not) is in `run_dir`: starting another there needs --overwrite. A
    damaged rank checkpoint marker counts as one (so --overwrite, which its error advises, can
    clear it); a model.pt without the config.toml every run writes first is a user's file."""
    try:
        return has_state(run_dir) or (
            (run_dir / "model.pt").exists() and (run_dir / "config.toml").exists()
        )
    except CheckpointError:
        return True


# what a run writes before its first checkpoint: a folder holding only these is no one else's
EARLY_RUN_FILES = ("config.toml", STORE_RECORD, "metrics.csv", "curves.png")


def check_not_foreign(run_dir: Path) -> None:
    """Refuse a folder that holds files but no run (a user's own; `geodnn run` refuses its
    like): a run's files would be mixed into it, a model.pt of theirs replaced."""
    if not run_dir.is_dir() or holds_run(run_dir) or (run_dir / "config.toml").is_file():
        return  # a run's folder, finished or not (its state removed, say)
    others = sorted(  # hidden entries (.ipynb_checkpoints, .DS_Store) are no one's files
        p.name for p in run_dir.iterdir() if p.name not in EARLY_RUN_FILES and p.name[0] != "."
    )
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise PipelineError(
            f"{run_dir}: holds files but no geodnn training run ({shown}); pick an empty or new "
            f"{run_dir_option()} (or pass {option('overwrite', True)} to write the run beside "
            "them)"
        )


def save_solver_state(setup: TrainSetup, solver, elapsed: float) -> None:
    """One state.pt, or one file per rank plus a marker written once every rank has saved."""
    state = {
        "format": STATE_FORMAT,
        "iteration": solver.iteration,
        "elapsed_s": elapsed,
        "solver": setup.solver_name,
        "solver_state": solver.state_dict(),
    }
    if ranked(solver):
        save_rank_checkpoint(setup.run_dir, solver.ctx, state)
    else:
        atomic_torch_save(state, setup.run_dir / "state.pt")


def save_epoch(
    setup: TrainSetup, solver, records: list[EpochRecord], class_scale: list[float] | None = None
) -> None:
    """Checkpoint (with the decision rule `fit_decision` found, if any), then metrics and
    curves (the solver state is saved after them, by `end_epoch`)."""
    run_dir = setup.run_dir
    meta = {
        "class_names": setup.class_names,
        "class_colors": setup.class_colors,
        "solver": setup.solver_name,
        "iteration": solver.iteration,
    }
    if class_scale is not None:
        meta["class_scale"] = class_scale
    if setup.class_values is not None:  # lets `geodnn evaluate` number other labels the same
        meta["class_values"] = setup.class_values
    meta.update(store_metadata(setup.stores))
    geodnn.save_checkpoint(solver.model, run_dir / "last.pt", **meta)
    write_metrics(run_dir / "metrics.csv", records, setup.class_names)
    plot_curves(
        run_dir / "curves.png",
        records,
        setup.class_names,
        setup.solver_name,
        train_label=train_loss_label(solver, setup.solver_name),
    )


def train_loss_label(solver, solver_name: str) -> str | None:
    """What the training loss of metrics.csv measures, when not the real network's loss."""
    return RANK_TRAIN_LOSS if ranked(solver) and solver_name == "admm" else None


def store_metadata(stores: SceneStores) -> dict:
    """What a checkpoint records of its tile stores: where its training pixels lie (one
    record, or one per store, for `geodnn evaluate` to score held-out pixels) and the ground
    size of their pixels (one, or each distinct one), for `geodnn predict` to warn of a scene
    at another resolution than every one trained on."""
    one = len(stores.train) == 1
    records = [training_split_record(p.store) for p in stores.train]
    meta: dict = {"training_split": records[0] if one else records}
    sizes = sorted({s for s in (p.store.pixel_size_m for p in stores.train) if s is not None})
    if sizes:
        meta["pixel_size_m"] = sizes[0] if len(sizes) == 1 else sizes
    attribute = stores.first.store.attrs.get("class_attribute")
    if attribute is not None:  # what `geodnn evaluate` scores labels by, unless told otherwise
        meta["class_attribute"] = attribute
    return meta


def training_split_record(store: TileStore) -> dict:
    """Where a model's training pixels lie: its store's split and scene grid."""
    split = store.attrs["split"]
    return {
        "split": f"{split['axis']}:{split['fraction']:g}",
        "gap": int(split["gap"]),
        "scene_name": store.scene_path.name,
        "scene_shape": list(store.scene_shape),
        "scene_transform": list(tuple(store.scene_transform)[:6]),
        "crs": store.attrs.get("crs"),  # WKT or None: evaluate compares the ground of stores
    }


def read_metrics(path: Path, class_names: list[str], upto: int) -> list[EpochRecord]:
    """Rows of the run's metrics.csv up to iteration `upto`, the state's (an exact resume);
    refused when it cannot be read or lacks that row (the earlier epochs' rows would vanish:
    each row is written before the state of its iteration)."""
    try:
        with path.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["iteration"]) <= upto]
        records = [metrics_record(row, class_names) for row in rows]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        raise damaged_run_file(path, "the run's metrics are unreadable") from None
    if not records or records[-1].iteration != upto:
        raise damaged_run_file(path, lacking_row(upto))
    return records


def metrics_record(row: dict, class_names: list[str]) -> EpochRecord:
    """One metrics.csv row as the EpochRecord that wrote it."""
    known = {"iteration", "elapsed_s", "train_loss", "val_loss", "pixel_accuracy"}
    known |= {f"val_iou_{n}" for n in class_names} | {f"val_f1_{n}" for n in class_names}
    return EpochRecord(
        int(row["iteration"]),
        float(row["elapsed_s"]),
        float(row["train_loss"]),
        float(row["val_loss"]),
        [float(row[f"val_iou_{n}"]) for n in class_names],
        [float(row[f"val_f1_{n}"]) for n in class_names],
        float(row["pixel_accuracy"]),
        {k: float(v) for k, v in row.items() if k not in known and v != ""},
    )


def run_dir_option() -> str:
    """The run folder as messages name it: `--out` on the command line, `run_dir` in Python."""
    return option("out", keyword="run_dir")


def damaged_run_file(path: Path, what: str) -> DamagedRunError:
    """The one-line refusal of a resume whose run folder lost or damaged a file it needs."""
    fix = (
        f"restore the file, or start the run again with {option('overwrite', True)} (instead "
        f"of {option('resume', True)})"
    )
    return DamagedRunError(path, what, fix)


MISSING = "missing, yet the run folder holds a training state to resume"


def check_resume_files(run_dir: Path) -> None:
    """Refuse, before anything is written, a resume whose state.pt is empty or cut short, or
    whose metrics.csv is missing or unreadable (resuming would drop the earlier epochs' rows);
    config.toml is checked by `check_resume_config`."""
    state = run_dir / "state.pt"
    if state.is_file() and not state_file_is_whole(state):
        raise unreadable_state(state)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise damaged_run_file(metrics, MISSING)
    rows = metrics_iterations(metrics)
    if not rows:
        raise damaged_run_file(metrics, "the run's metrics are unreadable (no rows of numbers)")
    ranked = latest_iteration(run_dir)  # a rank run's state is checked here, before launch
    if ranked is not None and ranked not in rows:
        raise damaged_run_file(metrics, lacking_row(ranked))


def check_not_past(config: Config, run_dir: Path, done: int) -> None:
    """Refuse to resume a run already past the iterations asked for: its config.toml would
    claim fewer iterations than its state and metrics hold."""
    total = config["train"]["iterations"]
    if done > total:
        raise PipelineError(
            f"{run_dir}: the run is at iteration {done}, past the {total} asked for "
            f"([train] iterations{command_line_only(' or --iterations')}); ask for {done} or "
            "more"
        )


def unreadable_state(path: Path) -> PipelineError:
    return damaged_run_file(path, "the run's training state is unreadable (empty or damaged)")


def state_file_is_whole(path: Path) -> bool:
    """False for an empty or foreign file, or a zip (torch.save's format) cut short: one
    without its central directory. Cheap; damage inside a whole file shows in `read_state`."""
    try:
        return not cut_short(path)
    except CheckpointError:  # an unreadable file included
        return False


def read_state(path: Path, device: str) -> dict:
    """A single-process run's state.pt (safe loading), a damaged one refused in one line."""
    try:
        return read_torch_file(path, device)
    except CheckpointError:
        raise unreadable_state(path) from None


def metrics_iterations(path: Path) -> list[int]:
    """The iterations of a metrics.csv's rows; empty when it has none or a row is not all
    numbers (or blanks: columns an epoch did not have)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not all(numeric_row(row) for row in rows):
        return []
    return [int(row["iteration"]) for row in rows]


def lacking_row(iteration: int) -> str:
    return f"the run's metrics lack the row of iteration {iteration}, where its state stands"


def numeric_row(row: dict) -> bool:
    """A csv.DictReader row with an iteration and numbers (a short or long row fails: None
    values or a None key)."""
    try:
        int(row["iteration"])
        for value in row.values():
            if value != "":
                float(value)
    except (KeyError, TypeError, ValueError):
        return False
    return True


# the temporary names `geodnn.atomic.atomic_path` (under atomic_write_text, atomic_torch_save,
# save_figure and rankstate's writers) gives a write to NAME in the run folder: '.NAME.',
# mkstemp's 8 random characters, '.tmp' and NAME's suffix; a process killed mid-write leaves one
_RUN_TARGETS = [(re.escape(n), Path(n).suffix) for n in (*RUN_FILES, LATEST)]
_RUN_TARGETS.append((r"rank\d+-of-\d+-it\d+\.pt", ".pt"))
STALE_TEMP = re.compile(
    "|".join(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}" for name, suffix in _RUN_TARGETS)
)


def remove_stale_temps(run_dir: Path) -> int:
    """Remove the temporary files geodnn's atomic writers left in `run_dir` when a process was
    killed mid-write (nothing else: only names `STALE_TEMP` matches); returns how many."""
    if not run_dir.is_dir():
        return 0
    stale = [p for p in run_dir.iterdir() if STALE_TEMP.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(
            "%s: removed %d temporary file(s) left by an interrupted write", run_dir, len(stale)
        )
    return len(stale)


def clear_run_dir(run_dir: Path) -> None:
    """Remove what an earlier run wrote (and nothing else a user keeps in the folder)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for pattern in RANK_FILES:
        for path in run_dir.glob(pattern):
            path.unlink()
    remove_stale_temps(run_dir)


def check_run_dir(config: Config, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """What `prepare_run_dir` refuses, checked without writing anything (the launcher of
    --workers N checks it before starting any rank)."""
    store_paths(config)  # set and listed once, before a run folder is made for it
    if resume and overwrite:
        both = f"{option('resume', True)} and {option('overwrite', True)}"
        raise PipelineError(f"{run_dir}: {both} contradict; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(
            f"{run_dir}: is a file, not a run folder; pick another {run_dir_option()}"
        )
    if not overwrite:  # --overwrite: replace what is there, a user's files beside it kept
        check_not_foreign(run_dir)
    if resume:
        if not has_state(run_dir):
            raise PipelineError(
                f"{run_dir}: nothing to resume (no saved state); drop {option('resume', True)}"
            )
        check_resume_files(run_dir)
        ranked = latest_iteration(run_dir)  # a rank run's iteration, known before launch
        if ranked is not None:
            check_not_past(config, run_dir, ranked)
        check_resume_config(config, run_dir)
        check_resume_store(config, run_dir)
    elif holds_run(run_dir) and not overwrite:
        raise PipelineError(
            f"{run_dir}: run folder already holds a run; pass {option('resume', True)} to "
            f"continue it or {option('overwrite', True)} to start again"
        )


def prepare_run_dir(config: Config, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check the run folder (`check_run_dir`) and remove temporary files of interrupted writes
    (only once the checks pass: a refused command must not touch a live run's files); for a new
    run, clear an earlier one and record the config as run and the tile store."""
    check_run_dir(config, run_dir, resume, overwrite)
    remove_stale_temps(run_dir)
    if resume:
        return  # config.toml and a lost store record are written once the state is read
    if holds_run(run_dir):
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", config_as_run(config))
    record_store(config, run_dir)


def record_store(config: Config, run_dir: Path) -> None:
    """Write which tile store (by content) the run trains on, for `check_resume_store`."""
    record = store_record(config)
    if record is not None:
        atomic_write_text(run_dir / STORE_RECORD, json.dumps(record, indent=1))


def store_record(config: Config) -> dict | None:
    """The config's tile store(s) and a hash of their metadata (scene, labels, grid, split,
    classes, statistics, tiles): a store rebuilt from other data at the same path hashes
    differently, and so does another list of stores. None when a store does not open, or the
    setting is wrong (training itself then says why)."""
    try:
        paths = store_paths(config)
        attrs = [TileStore.open(path).attrs for path in paths]
    except (StoreError, PipelineError):  # build_setup reports it with the config's context
        return None
    if len(paths) == 1:
        return {"store": str(paths[0]), "sha256": _digest(attrs[0])}
    # the list's hash, and each store's in order, to name the one that changed
    return {"stores": {str(p): _digest(a) for p, a in zip(paths, attrs)}, "sha256": _digest(attrs)}


def _digest(attrs: dict | list) -> str:
    """SHA-256 of store metadata (one store's, or a list's) as canonical JSON."""
    blob = json.dumps(attrs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_resume_store(config: Config, run_dir: Path) -> None:
    """Refuse to resume on a tile store whose content changed since the run started (e.g.
    re-tiled from another scene at the same path); runs from before the record pass."""
    saved_path = run_dir / STORE_RECORD
    if not saved_path.is_file():
        return
    try:
        record = json.loads(saved_path.read_text())
        saved, stores = record["sha256"], record.get("stores", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PipelineError(
            f"{saved_path}: unreadable record of the run's tile store; restore it, or start a "
            f"new run with another {run_dir_option()}"
        ) from None
    current = store_record(config)
    if current is not None and current["sha256"] != saved:
        changed = [p for p, h in current.get("stores", {}).items() if stores.get(p, h) != h]
        changed = changed or list(current.get("stores", {})) or [current.get("store", "")]
        raise PipelineError(
            f"{', '.join(changed)}: the tile store changed since this run "
            "started (re-tiled from other data?); resume on the store it was trained on, or "
            f"start a new run with another {run_dir_option()}"
        )


# settings a resumed run may change: how long it runs, how often it reports, how long it waits
RESUME_MAY_CHANGE = {
    ("parallel", "workers"),  # checked against the checkpoint's ranks instead
    ("train", "compare"),  # `geodnn run`'s: which solvers it trains besides [train] solver
    ("train", "iterations"),
    ("train", "epoch"),
    ("data", "val_tiles"),
    ("parallel", "timeout_s"),
}
# step sizes, penalties and stopping rules: changed on resume after a divergence (with a
# warning: the run then no longer continues exactly); the rest shapes the solver's state
STEP_SETTINGS = {
    "admm": (
        "head_nu", "head_nu_growth", "head_nu_max", "head_newton_steps", "nu", "rho", "relu_fit",
        "lam", "max_rel_step", "momentum", "normalized_step", "cg_steps", "p_rho", "p_damping",
        "request_gain", "step_scale",
    ),
    "adam": ("lr", "beta1", "beta2", "weight_decay"),
    "pipeline": ("lr", "beta1", "beta2", "weight_decay"),
}  # fmt: skip
STOPPING = ("max_iterations", "patience", "divergence_factor", "divergence_warmup")
RESUME_MAY_TUNE = {(t, k) for t, keys in STEP_SETTINGS.items() for k in (*keys, *STOPPING)}
RESUME_MAY_TUNE.add(("train", "divergence_factor"))
RESUME_MAY_TUNE.add(("train", "threads"))  # the same state; sums in another order
# what to turn in the config after a solver diverged (`geodnn run` says it per solver)
STEP_SIZE_FIX = {
    "adam": "lower [adam] lr",
    "pipeline": "lower [pipeline] lr",
    "admm": "raise [admm] head_nu or lam, or lower max_rel_step",
}
RECOVERY = (
    "the last good checkpoint (if an epoch finished) is kept: in the config, "
    f"{STEP_SIZE_FIX['adam']} or {STEP_SIZE_FIX['pipeline']}, or {STEP_SIZE_FIX['admm']}; "
    "then rerun with --resume, which continues from that checkpoint"
)


def train_divergence(config: Config, run_dir: Path, exc: DivergenceError) -> DivergenceError:
    """The divergence with the fix for `geodnn train`: the diverged solver's own setting, and a
    rerun that resumes only where an epoch's checkpoint was saved."""
    if has_state(run_dir):
        then = "rerun with --resume, which continues from the last good checkpoint"
    else:
        then = "rerun the same command (no epoch finished, so no checkpoint was saved)"
    return DivergenceError(
        exc.diagnosis, f"{STEP_SIZE_FIX[config.solver]} in {config.path}; {then}"
    )


def config_as_run(config: Config) -> str:
    """The merged config (defaults, file, command-line overrides) as TOML, paths made absolute.
    Without a [scene] image (a config for `geodnn train`, not `geodnn run`) the [scene] and
    [tile] tables are left out: they did not make the store (its metadata and store.json say
    how it was tiled), and their defaults would read as its tiling."""
    tables = {}
    builds_store = bool(config.tables.get("scene", {}).get("image"))
    for name, values in config.tables.items():
        if name in ("scene", "tile") and not builds_store:
            continue
        table = {k: v for k, v in values.items() if v is not None}
        for key in ("store", "image", "labels"):
            if key in table and name in ("data", "scene"):
                table[key] = absolute_paths(config, table[key])
        tables[name] = table
    return tomli_w.dumps(tables)


def absolute_paths(config: Config, value: str | list[str]) -> str | list[str]:
    """A path setting (one path, or a list of them) made absolute, as text."""
    if isinstance(value, str):
        return str(config.resolve(value))
    return [str(config.resolve(v)) for v in value]


def changed_settings(saved: dict, current: dict) -> set[tuple[str, str]]:
    """The (table, key) pairs whose values differ between two sets of config tables."""

    def table(tables: dict, name: str) -> dict:
        return tables[name] if isinstance(tables.get(name), dict) else {}  # a hand-edited file

    return {
        (t, k)
        for t in saved.keys() | current.keys()
        for k in table(saved, t).keys() | table(current, t).keys()
        if table(saved, t).get(k, saved) != table(current, t).get(k, current)
    }


def settings_without_effect(saved: dict, current: dict) -> set[tuple[str, str]]:
    """Changed settings that change nothing here: a device name that resolves to the same
    device ('cpu' and 'auto' without a GPU), compress_bits of a one-process run (it quantizes
    only the messages between ranks)."""
    same = set()
    devices = [tables.get("train", {}).get("device", "auto") for tables in (saved, current)]
    resolved = {auto_device() if d == "auto" else d for d in devices}
    if all(d in DEVICES for d in devices) and len(resolved) == 1:
        same.add(("train", "device"))
    workers = [tables.get("parallel", {}).get("workers", 1) for tables in (saved, current)]
    if workers == [1, 1]:
        same.add(("parallel", "compress_bits"))
    return same


def setting_change(saved: dict, current: dict, table: str, key: str) -> str:
    """ "[train] solver 'admm' -> 'adam' (--solver)": what changed, and the command-line option
    that sets it (the value may have come from there, not from the file)."""
    before, after = (tables.get(table, {}).get(key) for tables in (saved, current))
    flag = OVERRIDE_FLAGS.get((table, key))
    return f"[{table}] {key} {before!r} -> {after!r}" + (f" ({flag})" if flag else "")


def check_resume_config(config: Config, run_dir: Path) -> None:
    """Resuming with other hyperparameters would not continue the same run: refuse it."""
    saved_path = run_dir / "config.toml"
    saved = read_saved_config(saved_path)
    added = with_new_defaults(saved)
    current = tomllib.loads(config_as_run(config))
    ignored = {"scene", "tile", "predict", *SOLVERS} - {config.solver}
    changed = sorted(
        (t, k)
        for t, k in changed_settings(saved, current) - settings_without_effect(saved, current)
        if t not in ignored and (t, k) not in RESUME_MAY_CHANGE
    )
    fixed = [
        setting_change(saved, current, t, k) for t, k in changed if (t, k) not in RESUME_MAY_TUNE
    ]
    if fixed:
        raise PipelineError(
            f"{saved_path}: the run was started with other settings ({'; '.join(fixed)}); "
            "resume with the same config and options, or start a new run with another "
            f"{run_dir_option()}"
        )
    if added:
        log.warning(
            "%s: the run began before geodnn had %s; it goes on with the default(s), so where "
            "they change its course it no longer repeats an uninterrupted run",
            saved_path,
            ", ".join(f"[{t}] {k} = {v!r}" for t, k, v in added),
        )
    if changed:
        tuned = ", ".join(f"[{t}] {k}" for t, k in changed)
        log.warning(
            "%s: resuming with changed %s; the run goes on from its checkpoint with them "
            "(it no longer repeats an uninterrupted run exactly)",
            saved_path,
            tuned,
        )


def with_new_defaults(saved: dict) -> list[tuple[str, str, object]]:
    """A run begun by an earlier geodnn lacks the settings added since: they count as their
    defaults (filled into `saved`), so an upgrade alone refuses no resume; the settings
    filled, as (table, key, default)."""
    added = []
    for table, defaults in DEFAULTS.items():
        values = saved.get(table)  # a table left out ([scene] of a training run) stays out
        if not isinstance(values, dict):
            continue
        for key, value in defaults.items():
            if value is not None and key not in values:
                values[key] = value
                added.append((table, key, value))
    return added


def read_saved_config(path: Path) -> dict:
    """The run folder's config.toml, the settings the run started with; refused in one line
    when missing or unreadable (the settings check would be skipped)."""
    if not path.is_file():
        raise damaged_run_file(path, MISSING)
    try:
        saved = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise damaged_run_file(path, f"the run's config is unreadable ({exc})") from None
    if not saved:
        raise damaged_run_file(path, "the run's config is empty")
    return saved


def check_state(state: dict | None, path: Path, solver_name: str) -> dict:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise PipelineError(f"{path}: not a geodnn training state; drop {option('resume', True)}")
    if state["solver"] != solver_name:
        raise PipelineError(
            f"{path}: was trained with solver '{state['solver']}', not '{solver_name}'; "
            "resume with the same --solver"
        )
    return state


def make_solver_for(setup: TrainSetup, resume: bool) -> tuple[object, dict | None]:
    """The solver for this process, and its saved state when resuming."""
    name = setup.solver_name
    if name == "pipeline" or distributed_world() > 1:
        from .distributed import make_rank_solver

        solver, state = make_rank_solver(setup, solver_settings(setup), resume)
        path = setup.run_dir / LATEST
    else:
        from geodnn.solvers import make_solver

        seed = setup.config["train"]["seed"]
        setup.model.to(setup.device)
        solver = make_solver(name, setup.model, setup.train_data, solver_settings(setup), seed)
        path = setup.run_dir / "state.pt"
        state = read_state(path, setup.device) if resume else None
    return solver, (check_state(state, path, name) if resume else None)


def distributed_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank() -> bool:
    """True in a process torchrun (or `spawn`) started as one rank of a job, even of one."""
    return "RANK" in os.environ


def ranks_to_launch(config: Config) -> int:
    """The ranks `geodnn train` starts for `config` (pipeline runs always have ranks); 0 when
    it trains in this process."""
    workers = config["parallel"]["workers"]
    return workers if workers > 1 or config.solver == "pipeline" else 0


def check_parallel(config: Config) -> None:
    """[parallel] settings the ranks could not run, refused before any rank starts: a solver
    without a multi-rank form, more ranks than layers, micro-batches that do not divide the
    batch, compression outside 1..8 bits; compression that would be ignored is warned of."""
    parallel, ranks = config["parallel"], world_size_for(config)
    if ranks > 1 and config.solver not in ("admm", "pipeline"):
        raise PipelineError(
            f"{config.path}: solver '{config.solver}' runs in one process; use --solver admm "
            "(layer-parallel) or --solver pipeline (GPipe / 1F1B) with several workers"
        )
    layers = config["model"]["depth"] + 2  # stem, hidden layers, head: each rank owns some
    if ranks > layers:
        raise PipelineError(
            f"{config.path}: {ranks} workers for a chain of {layers} layers; pass --workers "
            f"{layers} or fewer (each rank owns at least one layer)"
        )
    check_pipeline_batch(config.tables, config.path)
    bits = parallel["compress_bits"]
    if bits and not 1 <= bits <= 8:
        raise PipelineError(
            f"{config.path}: compress_bits {bits} (--compress-bits, else [parallel] "
            "compress_bits); pass 1 to 8 (quantized messages) or 0 (plain)"
        )
    ignored = config.solver != "admm" or ranks < 2
    if bits and ignored and is_leader() and not launched_rank():
        warn_user(
            f"{config.path}: compress_bits {bits} (--compress-bits, else [parallel] "
            f"compress_bits) has no effect on this run (solver {config.solver}, {ranks} "
            "worker(s)): it quantizes only ADMM's boundary messages with --workers 2 or more; "
            "drop it, or pass --solver admm --workers N"
        )


def launched_rank() -> bool:
    """True in a rank `geodnn train --workers N` started: its launcher ran the pre-launch
    checks and warned already (a rank torchrun started directly has no launcher)."""
    return is_rank() and EXIT_CODES_ENV in os.environ


def world_size_for(config: Config) -> int:
    """The ranks a run of `config` has: this job's when this process is a rank, else the
    ranks `geodnn train` would start (1: this process alone)."""
    return distributed_world() if is_rank() else max(ranks_to_launch(config), 1)


def check_resume_world(run_dir: Path, world_size: int) -> None:
    """A run folder is resumed by as many ranks as wrote it (a single-process run by none)."""
    saved = latest_world_size(run_dir)
    if saved is not None and saved != world_size:
        raise PipelineError(
            f"{run_dir}: holds a checkpoint of a {saved}-rank run; resume it with --workers {saved}"
        )
    if saved is None and (run_dir / "state.pt").is_file() and world_size > 1:
        raise PipelineError(
            f"{run_dir}: holds a single-process run; resume it without --workers (or start a "
            "new run with --out)"
        )


def is_leader() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


DIVERGENCE_WINDOW = 50  # iterations: the epoch check compares losses over at least this many


@dataclass
class EpochLosses:
    """The epochs' mean training losses, compared for divergence over windows of at least
    DIVERGENCE_WINDOW iterations (`span` epochs): an epoch of 10 batches of 4 crops is about as
    noisy as one batch, and one lucky epoch of 0.03 made the next ordinary one (0.68) look like a
    divergence. The epochs' losses come back from metrics.csv on resume."""

    span: int
    losses: list[float] = field(default_factory=list)

    @classmethod
    def from_records(cls, records: list[EpochRecord], epoch: int) -> EpochLosses:
        finite = [r.train_loss for r in records if math.isfinite(r.train_loss)]
        return cls(max(1, math.ceil(DIVERGENCE_WINDOW / epoch)), finite)

    def check(self, loss: float, iteration: int, factor: float, untrained: float) -> None:
        """Add an epoch's mean loss and raise DivergenceError when it is non-finite, or when the
        mean of the latest `span` epochs is over `factor` x the best earlier full window (before
        there is one: `untrained`) and over `untrained`, the untrained network's loss (the
        solver's first, kept in its state: a resumed run compares with the same value)."""
        self.losses.append(loss)
        n = self.span
        recent = self.losses[-n:]
        earlier = [sum(self.losses[i - n : i]) / n for i in range(n, len(self.losses))]
        best = min(earlier, default=untrained)
        check_divergence(sum(recent) / len(recent), best, factor, iteration, untrained)


def check_divergence(
    loss: float, best: float, factor: float, iteration: int, first: float = math.nan
) -> None:
    """Non-finite, or over `factor` x the best epoch and over the first epoch's loss."""
    if not math.isfinite(loss) or (math.isfinite(best) and exploded(loss, best, first, factor)):
        than = f", best {best:.4g}" if math.isfinite(best) else ""
        raise DivergenceError(
            f"training diverged at iteration {iteration} (loss {loss:.4g}{than})",
            RECOVERY,
        )


def train(
    config: Config | str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Run (or resume) training as the config says into `run_dir`; returns a `TrainResult`
    (the final checkpoint, and the metrics of every epoch).

    Trains with [train] threads torch threads and gives the caller's count back at the end (a
    notebook's kernel keeps its own); the allocator keeps freed memory for reuse from then on
    (`retain_freed_memory`, process-wide and irreversible). `config`: a `load_config` result
    (with overrides; checked again here, as a notebook may have edited it) or the path of a
    config file."""
    resume, overwrite = flag("resume", resume), flag("overwrite", overwrite)
    progress = flag("progress", progress)
    config = load_config(config) if not isinstance(config, Config) else revalidated(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(config["train"]["threads"])
    try:
        return _train(config, Path(run_dir), resume, overwrite, progress)
    finally:
        torch.set_num_threads(threads)


HELD_RUN_ENV = "GEODNN_HELD_RUN"  # the run folder a `--workers N` launcher holds for its ranks


def holding_run(run_dir: Path) -> contextlib.ExitStack:
    """Hold `run_dir` for this command alone until the returned stack closes: two trainings
    into one folder mixed their files (an ADMM model under an Adam config.toml, a resume
    refused both ways) and one removed the other's temporary file mid-write (a traceback).
    The ranks of a launcher that holds it (`HELD_RUN_ENV`) do not take it again."""
    held = contextlib.ExitStack()
    run_dir = run_dir.resolve()
    if os.environ.get(HELD_RUN_ENV) == str(run_dir):
        return held
    made = [d for d in run_dir.parents if not d.exists()]  # the lock lies beside the folder
    with contextlib.suppress(OSError):
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    for folder in reversed(made):  # removed again, innermost first, if left empty
        held.callback(remove_if_empty, folder)
    refusal = partial(
        PipelineError,
        f"{run_dir}: another geodnn command is writing this run folder; wait for it to end, or "
        f"pick another {run_dir_option()}",
    )
    return held_or_refused(run_dir, refusal, exclusive=True, held=held)


def reading_stores(config: Config) -> contextlib.ExitStack:
    """Share each tile store of the config with other readers until the returned stack
    closes: `geodnn tile --overwrite` refuses to replace a store a training reads (it went on
    with the other scene's tiles, without a word)."""
    held = contextlib.ExitStack()
    for path in store_paths(config):
        if path.is_dir():  # else build_setup says what is wrong with it
            busy = f"{path}: `geodnn tile` is replacing this store; wait for it to end, then train"
            held_or_refused(path, partial(PipelineError, busy), held=held)
    return held


def _train(
    config: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool
) -> TrainResult:
    retain_freed_memory()  # every layer step reallocates MBs of tensors: reuse, don't refault
    held = holding_run(run_dir) if is_leader() else contextlib.ExitStack()
    with held, reading_stores(config):
        return _train_held(config, run_dir, resume, overwrite, progress)


def _train_held(
    config: Config, run_dir: Path, resume: bool, overwrite: bool, progress: bool
) -> TrainResult:
    """`_train` with the run folder held and its stores shared."""
    if is_leader():
        prepare_run_dir(config, run_dir, resume, overwrite)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    setup = build_setup(config, run_dir)
    solver, state = make_solver_for(setup, resume)
    records: list[EpochRecord] = []
    elapsed0 = 0.0
    if state is not None:
        records, elapsed0 = resume_from(setup, solver, state)
    run_epochs(setup, solver, records, elapsed0, progress and is_leader())
    final = run_dir / "model.pt"
    last = run_dir / "last.pt"  # a finished run's last.pt, a copy of model.pt, may be deleted
    if is_leader() and (last.exists() or not final.is_file()):
        with atomic_path(final) as tmp:
            shutil.copyfile(last, tmp)
    return TrainResult(run_dir, final, records, setup.class_names)


def resume_from(setup: TrainSetup, solver, state: dict) -> tuple[list[EpochRecord], float]:
    """Put a resumed run's state into `solver`; its metrics rows and training time so far.
    Only then the leader records the config the run goes on with: a run folder refused for a
    damaged file keeps the config.toml it was started with."""
    done = state["iteration"]
    check_not_past(setup.config, setup.run_dir, done)
    records = read_metrics(setup.run_dir / "metrics.csv", setup.class_names, done)
    solver.load_state_dict(state["solver_state"])
    if is_leader():  # once, not once per rank
        atomic_write_text(setup.run_dir / "config.toml", config_as_run(setup.config))
        if not (setup.run_dir / STORE_RECORD).is_file():  # from before the record, or lost
            log.warning("%s: no record of the run's tile store; recording this one", setup.run_dir)
            record_store(setup.config, setup.run_dir)
        log.info("resuming %s at iteration %d", setup.run_dir, solver.iteration)
    return records, state["elapsed_s"]


def foreground_iou(ious: list[float]) -> float:
    """The progress bar's IoU: the mean over the classes after 0 (background) that validation
    saw (NaN: absent from truth and prediction), which for a two-class map is the mapped
    class's own; NaN when it saw none of them."""
    seen = [v for v in (ious[1:] if len(ious) > 1 else ious) if not math.isnan(v)]
    return sum(seen) / len(seen) if seen else math.nan


def untrained(solver, losses: list[float]) -> float:
    """The untrained network's loss: the solver's first (its LossWatch keeps it in the solver
    state), else, for a state saved before it was kept, this epoch's first."""
    first = getattr(getattr(solver, "watch", None), "start", math.nan)
    return first if math.isfinite(first) else losses[0]


def epoch_loss(losses: list[float]) -> float:
    """Mean real-network loss of an epoch; NaN when no iteration reported one yet (a pipelined
    solver reports none until the first batch has reached the head)."""
    return sum(losses) / len(losses) if losses else math.nan


def run_epochs(
    setup: TrainSetup, solver, records: list[EpochRecord], elapsed0: float, progress: bool
) -> None:
    train_cfg = setup.config["train"]
    total, epoch = train_cfg["iterations"], train_cfg["epoch"]
    epoch_losses = EpochLosses.from_records(records, epoch)
    desc = f"train {setup.solver_name}"
    # `with`: the bar is closed on an error too, so the error's message gets its own line
    with progress_bar(total, desc, "it", progress, initial=solver.iteration) as bar:
        start = time.perf_counter() - elapsed0
        losses: list[float] = []
        # the bar's postfix: the epoch's mean loss so far, the last validation's foreground IoU
        shown: dict[str, str] = {}
        ended = _finished(solver) if solver.iteration < total else None
        if ended:  # a resumed run its stopping rule had ended
            log.info("not training on: %s (iteration %d)", ended, solver.iteration)
            total = solver.iteration
        while solver.iteration < total:
            stats = solver.step()
            raise_if_stopped()  # a Ctrl-C (or stop) Python swallowed in a finalizer still ends it
            if "loss" in stats:
                losses.append(float(stats["loss"]))
                if not math.isfinite(losses[-1]):
                    check_divergence(losses[-1], math.inf, 1.0, solver.iteration)
            bar.update(1)
            stop = _finished(solver)
            if stop:
                log.info("stopping at iteration %d: %s", solver.iteration, stop)
            if solver.iteration % epoch and solver.iteration < total and not stop:
                if losses or "loss" not in shown:  # a pipelined loss arrives a step late
                    shown["loss"] = f"{epoch_loss(losses):.3f}" if losses else "warming up"
                bar.set_postfix(shown, refresh=False)  # replaces the postfix: keep the IoU in
                continue
            stats = settle(solver, stats, losses)
            mean_loss = epoch_loss(losses)
            if losses:
                factor = train_cfg["divergence_factor"]
                epoch_losses.check(mean_loss, solver.iteration, factor, untrained(solver, losses))
            losses = []
            paused = time.perf_counter()
            record = end_epoch(setup, solver, records, mean_loss, paused - start, stats)
            start += time.perf_counter() - paused  # elapsed_s counts training, not validation
            if record is not None:
                shown.update(
                    loss=f"{mean_loss:.3f}", iou=score_text(foreground_iou(record.val_iou))
                )
                # the last epoch's line is printed by the bar's close (a log got it twice)
                bar.set_postfix(shown, refresh=solver.iteration < total and not stop)
            if stop:
                break


def _finished(solver) -> str | None:
    """Why the solver's stopping rule ends the run (max_iterations, patience), or None."""
    return solver.finished() if hasattr(solver, "finished") else None


def settle(solver, stats: dict, losses: list[float]) -> dict:
    """Before a checkpoint: the stats a solver still has in flight (N-rank ADMM reports each
    iteration's one step late); raises if that iteration diverged, so no checkpoint holds it."""
    settled = solver.settle() if hasattr(solver, "settle") else None
    if not settled:
        return stats
    if "loss" in settled:
        losses.append(float(settled["loss"]))
    return settled


def end_epoch(
    setup: TrainSetup,
    solver,
    records: list[EpochRecord],
    mean_loss: float,
    elapsed: float,
    stats: dict,
) -> EpochRecord | None:
    """Validate (every rank a share of the tiles), checkpoint and log on the leader, then save
    every rank's solver state. In this order a job stopped in between resumes from the older
    state and redoes the epoch, so no metrics row is lost; a model with non-finite weights or
    validation loss is never checkpointed."""
    ranks = None
    if distributed_world() > 1:
        solver.gather_model()  # collective: every rank calls it, rank 0 gets all weights
        ranks = solver.ctx
        share_module(ranks, solver.model, "the model for validation")
    check_finite_model(solver.model, solver.iteration)
    scale = None
    if setup.calibration_data is not None:
        limit = setup.config["data"]["calibrate_tiles"]
        scale = fit_decision(solver.model, setup.calibration_data, limit, ranks=ranks)
    record = epoch_record(setup, solver, mean_loss, elapsed, stats, scale, ranks)
    if not math.isfinite(record.val_loss):
        raise DivergenceError(
            f"training diverged at iteration {solver.iteration}: the validation loss is "
            f"{record.val_loss}",
            RECOVERY,
        )
    if is_leader():
        records.append(record)
        save_epoch(setup, solver, records, scale)
    save_solver_state(setup, solver, elapsed)
    return record if is_leader() else None


def check_finite_model(model: geodnn.ChainNet, iteration: int) -> None:
    """Refuse to checkpoint a model whose weights hold NaN or inf."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise DivergenceError(
            f"training diverged at iteration {iteration}: the model has non-finite weights",
            RECOVERY,
        )


def epoch_record(
    setup: TrainSetup,
    solver,
    train_loss: float,
    elapsed: float,
    stats: dict,
    class_scale: list[float] | None = None,
    ranks: RankContext | None = None,
) -> EpochRecord:
    """The metrics.csv row; validation scores the class map `geodnn predict` would write (with
    the checkpoint's decision threshold, also logged as decision_threshold)."""
    limit = setup.config["data"]["val_tiles"]
    weights = setup.class_weights
    val_loss, s = validate(solver.model, setup.val_data, weights, limit, class_scale, ranks=ranks)
    extra = {k: float(v) for k, v in stats.items() if k != "loss" and isinstance(v, int | float)}
    if class_scale is not None:
        extra["decision_threshold"] = class_scale[0]
    iou, f1 = (seen_only(values, s.seen) for values in (s.iou, s.f1))
    return EpochRecord(
        solver.iteration, elapsed, train_loss, val_loss, iou, f1, s.pixel_accuracy, extra
    )


def seen_only(values: list[float], seen: list[bool]) -> list[float]:
    """Per-class scores with NaN for a class absent from the validation truth and prediction:
    it has no IoU or F1, and a 0 would read as a class the model misses."""
    return [v if s else math.nan for v, s in zip(values, seen)]


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.path.stem}-{config.solver}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=JOBS["train"],
        description=__doc__,
    )
    p.add_argument("config", type=Path, help="TOML config (see pipelines/configs/)")
    p.add_argument("--solver", choices=SOLVERS, help="override [train] solver")
    p.add_argument(
        "--out",
        type=Path,
        help="run folder (default runs/<config>-<solver>): new, empty or an earlier run's",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (exactly, unless step sizes changed)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--iterations", type=integer, help="override [train] iterations")
    p.add_argument("--workers", type=integer, help="ranks, each owning a block of layers")
    p.add_argument("--compress-bits", type=integer, help="quantize boundary messages (e.g. 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)


def overrides_from(args: argparse.Namespace) -> dict:
    return {
        "train": {"solver": args.solver, "iterations": args.iterations},
        "parallel": {"workers": args.workers, "compress_bits": args.compress_bits},
    }


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides_from(args), OVERRIDE_FLAGS)
    run_dir = args.out or default_run_dir(config)
    check_parallel(config)
    if args.resume:
        check_resume_world(run_dir, world_size_for(config))
    check_writable_run_dir(Path(run_dir))
    if ranks_to_launch(config) and not is_rank():
        from .distributed import launch_training

        # the ranks would each refuse these, under torchrun's own traceback
        with holding_run(Path(run_dir)):  # for the ranks, told so by HELD_RUN_ENV
            check_run_dir(config, Path(run_dir), args.resume, args.overwrite)
            return launch_training(args, ranks_to_launch(config))
    try:
        result = train(
            config, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet
        )
    except DivergenceError as exc:  # every rank learns of it: rank 0 says it (and the rank
        if is_leader() or exc.local:  # whose own layer diverged, which only it can name)
            print(f"geodnn: error: {train_divergence(config, Path(run_dir), exc)}", file=sys.stderr)
        return 3
    if is_leader():
        last = result.records[-1] if result.records else None
        iou = f", validation IoU {iou_summary(result.class_names, last.val_iou)}" if last else ""
        print(f"trained {config.solver}: {result.checkpoint}{iou}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `torchrun ... -m pipelines.train CONFIG [options]` (one process per rank)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.train")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    sub.choices["train"].prog = parser.prog  # its usage without the 'train' this adds itself
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="geodnn: %(levelname)s: %(message)s")
    from .cli import one_line_warning, user_errors

    logging.captureWarnings(True)  # a rank warns in one line, as `geodnn` does
    warnings.formatwarning = one_line_warning

    rank = os.environ.get("RANK", "0")
    try:
        # torchrun forwards SIGTERM: unwind, no temporary file left; messages name flags
        with stop_signals_raise(), command_line():
            code = args.func(args)
    except user_errors() as exc:  # (a RankFailureError names its rank already)
        said = str(exc).removeprefix(f"rank {rank}: ")
        print(f"geodnn: error (rank {rank}): {said}", file=sys.stderr)
        code = 1 if isinstance(exc, RankFailureError) else 2  # a peer failed: not the user's
    except StopSignal as stop:  # as `geodnn` itself (pipelines/cli.py) ends on one
        if not launched_rank():  # under `--workers N` the launcher says what stopped the job
            name = signal.Signals(stop.signum).name
            print(f"geodnn: rank {rank} stopped by {name}", file=sys.stderr)
        code = 128 + stop.signum
    except KeyboardInterrupt:  # Ctrl-C to torchrun run by hand reaches every rank as SIGINT
        print(f"geodnn: rank {rank} interrupted", file=sys.stderr)
        code = 130
    except (OSError, MemoryError, RuntimeError) as exc:
        line = system_refusal(exc)
        if line is None:
            raise
        print(f"geodnn: error (rank {rank}): {line}", file=sys.stderr)
        code = 2

    report_exit_code(code)  # torchrun exits 1 whatever the code: `launch` reads this one
    return code


if __name__ == "__main__":
    sys.exit(main())
