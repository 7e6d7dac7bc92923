"""`geodnn evaluate CHECKPOINT SCENE.tif --labels LABELS`: IoU per class, F1 and pixel accuracy.

The scene is predicted chunk by chunk with the same seam-free path as `geodnn predict`, and each
chunk is compared with the labels rasterized on that chunk's window, so memory stays bounded.
`--split columns:0.7 --region validation` scores only the validation region of a spatial split
(the region `geodnn tile` held out with the same options). The labels' classes are numbered as
the model's training labels were (by mask value or attribute value, recorded in the checkpoint),
so a file holding only some of the classes is scored on the right ones; a class absent from
both labels and prediction is reported as absent (null in --json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from affine import Affine
from rasterio.crs import CRS

from geodnn import Checkpoint
from geodnn.metrics import IGNORE_INDEX, SegmentationScores, confusion_matrix
from geodnn.runtime import retain_freed_memory
from tiles.errors import LabelError
from tiles.grid import DEFAULT_CHUNK
from tiles.labels import LabelSource, has_attribute, load_labels
from tiles.raster import (
    SceneInfo,
    grid_footprint,
    holding_block_cache,
    open_scene,
    shares_ground,
)
from tiles.split import (
    DEFAULT_GAP,
    DEFAULT_SPLIT,
    Region,
    parse_split,
    split_regions,
    warn_if_gap_below_radius,
)
from tiles.stitch import ChunkPrediction
from tiles.warn import warn_user
from tiles.wording import option

from .arguments import flag, text, whole
from .cli import JOBS
from .errors import PipelineError
from .options import non_negative_int, positive_int
from .predict import (
    ARGMAX_HELP,
    as_checkpoint,
    check_scene_bands,
    iter_predictions,
    resolution_note,
    value_range_note,
)

log = logging.getLogger(__name__)

REGIONS = ("all", "train", "validation")


@dataclass
class Evaluation:
    """Scores of a checkpoint on a labeled scene (or one region of it)."""

    scores: SegmentationScores
    class_names: list[str]
    region: str

    def to_dict(self) -> dict:
        return {"region": self.region, **self.scores.to_dict(self.class_names)}

    def table(self) -> str:
        s = self.scores
        lines = [f"{'class':16s} {'IoU':>7s} {'F1':>7s} {'labeled px':>12s} {'predicted px':>12s}"]
        for name, iou, f1, seen, labeled, predicted in zip(
            self.class_names, s.iou, s.f1, s.seen, s.labeled, s.predicted
        ):
            values = f"{iou:7.4f} {f1:7.4f}" if seen else f"{'absent':>7s} {'absent':>7s}"
            lines.append(f"{name:16s} {values} {labeled:12d} {predicted:12d}")
        lines.append(f"mean IoU {self.scores.mean_iou:.4f} over the classes present")
        lines.append(
            f"pixel accuracy {self.scores.pixel_accuracy:.4f} "
            f"over {self.scores.pixels} labeled pixels ({self.region})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """A notebook cell ending in an Evaluation shows the table, not one escaped line."""
        printer.text(self.table())


def region_box(shape: tuple[int, int], split: str | None, gap: int, region: str) -> Region | None:
    """The rectangle to score, or None for the whole scene."""
    if region == "all":
        return None
    if split is None:
        raise PipelineError(
            f"{option('region', region)} needs {option('split')} "
            f"(e.g. {option('split', 'columns:0.7')})"
        )
    spec = parse_split(split, gap)
    for box in split_regions(shape, spec):
        if box.name == region or (region == "validation" and box.name.startswith("val")):
            return box
    raise PipelineError(f"the split {split} has no {region} region; use {option('region', 'all')}")


HELD_OUT = "the training split's validation region"  # what a scored region should be


@dataclass(frozen=True)
class TrainingSplit:
    """The split of the tile store a checkpoint was trained on (its `training_split`
    metadata), on that store's scene."""

    split: str
    gap: int

    @classmethod
    def of(cls, ckpt: Checkpoint, info: SceneInfo) -> TrainingSplit | None:
        """The split of the store made from this scene, of the one (or the list, for a model
        trained on several stores) the checkpoint records; None for a checkpoint without the
        record, or a scene of another name or grid than every store's."""
        records = ckpt.metadata.get("training_split") or []
        for record in records if isinstance(records, list) else [records]:
            if cls._on_scene(record, info):
                return cls(str(record["split"]), int(record["gap"]))
        return None

    @staticmethod
    def _on_scene(record: dict, info: SceneInfo) -> bool:
        """Whether a store's split record is of this scene: its name, shape and grid."""
        if list(record["scene_shape"]) != [info.height, info.width]:
            return False
        if record.get("scene_name", info.path.name) != info.path.name:  # another date's scene
            return False
        return np.allclose(record["scene_transform"], tuple(info.transform)[:6], rtol=1e-9)

    def warn_if_scored(self, box: Region | None, info: SceneInfo, region: str) -> None:
        """Warn when the scored pixels include the region the model was trained on (unless
        that region is what was asked for)."""
        if region == "train":
            return
        trained = region_box(info.shape, self.split, self.gap, "train")
        scored = box or Region(trained.split, 0, info.height, 0, info.width)
        if not _overlap(scored, trained, 0):
            if _overlap(scored, trained, self.gap):
                warn_user(
                    f"{info.path}: the scored region includes pixels of the training split's "
                    f"guard band, within {self.gap} px of pixels the model was trained on (its "
                    f"split {self.split}, gap {self.gap}), so the scores lean optimistic; score "
                    f"with the training gap, {option('gap', self.gap)}, to keep to held-out pixels"
                )
            return
        if not self.has_validation(info):
            fix = "score a scene the model was not trained on"
        elif region == "all":
            fix = f"pass {option('region', 'validation')} to score {HELD_OUT}"
        else:
            fix = f"drop {option('split')} and {option('gap')} to score {HELD_OUT}"
        warn_user(
            f"{info.path}: the scored region includes pixels the model was trained on (its "
            f"split {self.split}, gap {self.gap}), so the scores are not held out; {fix}"
        )

    def has_validation(self, info: SceneInfo) -> bool:
        """Whether the training split leaves a validation region on the scene."""
        try:
            region_box(info.shape, self.split, self.gap, "validation")
        except PipelineError:  # e.g. columns:1, all training
            return False
        return True


def warn_if_another_store_trained_here(ckpt: Checkpoint, info: SceneInfo, box) -> None:
    """A model of several stores may have trained on this ground through another scene's
    store (overlapping scenes): warn that scores there are not held out (a helper's
    'held-out' roads IoU rose from 0.20 to 0.30 so)."""
    records = ckpt.metadata.get("training_split")
    if not isinstance(records, list) or info.crs is None:
        return
    box = box or Region(0, 0, info.height, 0, info.width)
    scored = grid_footprint(info.transform, (box.row0, box.row1), (box.col0, box.col1))
    for record in records:
        if TrainingSplit._on_scene(record, info) or not record.get("crs"):
            continue
        try:
            shape, gap = tuple(record["scene_shape"]), int(record["gap"])
            trained = region_box(shape, record["split"], gap, "train")
        except PipelineError:  # a split without a training region
            continue
        ground = grid_footprint(
            Affine(*record["scene_transform"]),
            (trained.row0, trained.row1),
            (trained.col0, trained.col1),
            CRS.from_wkt(record["crs"]),
            info.crs,
        )
        if shares_ground(scored, ground):
            warn_user(
                f"{info.path}: the scored region lies partly on ground the model trained on "
                f"through another of its stores ({record['scene_name']}), so the scores are not "
                "held out; score a region that no store trained on"
            )
            return


def _overlap(a: Region, b: Region, margin: int) -> bool:
    """Whether `a` shares pixels with `b` grown by `margin` pixels on every side."""
    rows = min(a.row1, b.row1 + margin) > max(a.row0, b.row0 - margin)
    return rows and min(a.col1, b.col1 + margin) > max(a.col0, b.col0 - margin)


def clip(labels: np.ndarray, window, box: Region | None) -> np.ndarray:
    """Mark label pixels outside `box` as ignored."""
    if box is None:
        return labels
    rows = np.arange(window.row_off, window.row_off + window.height)
    cols = np.arange(window.col_off, window.col_off + window.width)
    inside = ((rows >= box.row0) & (rows < box.row1))[:, None] & (
        (cols >= box.col0) & (cols < box.col1)
    )[None, :]
    return np.where(inside, labels, IGNORE_INDEX).astype(labels.dtype)


@holding_block_cache
def evaluate_scene(
    checkpoint: str | os.PathLike | Checkpoint,
    scene: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    class_attribute: str | None = None,
    split: str | None = None,
    gap: int | None = None,
    region: str = "all",
    chunk: int = DEFAULT_CHUNK,
    progress: bool = False,
    argmax: bool = False,
) -> Evaluation:
    """Confusion matrix of the checkpoint's class map against the labels, streamed by chunk
    (the map `geodnn predict` writes: the checkpoint's decision rule unless `argmax`).

    On the scene the checkpoint was trained on, `split` and `gap` default to its training
    split's, and scoring pixels it was trained on is warned of (`TrainingSplit`)."""
    if region not in REGIONS:
        raise PipelineError(f"region {region!r} is unknown; use one of {', '.join(REGIONS)}")
    chunk, argmax = whole("chunk", chunk, 1), flag("argmax", argmax)
    progress = flag("progress", progress)
    gap = None if gap is None else whole("gap", gap, 0)
    split = None if split is None else text("split", split, "columns:0.7")
    ckpt = as_checkpoint(checkpoint)
    info = open_scene(scene)
    check_scene_bands(info, ckpt)  # before the notes, which read its bands against the model's
    resolution_note(info, ckpt)
    value_range_note(info, ckpt)
    if class_attribute is None:
        class_attribute = trained_attribute(ckpt, labels)
    source = load_labels(labels, info, class_attribute=class_attribute)
    classes = ckpt.config.classes
    if source.classes > classes:
        raise PipelineError(
            f"{labels}: has {source.classes} classes but the model predicts {classes}; "
            "pass labels with the classes the model was trained on (or "
            f"{option('class-attribute')})"
        )
    trained = ckpt.metadata.get("class_values")
    if trained is not None and len(trained) == classes:
        try:
            _match_trained_classes(source, trained, ckpt.class_names, class_attribute)
        except LabelError as exc:
            raise LabelError(f"{exc}{attribute_hint(ckpt, class_attribute)}") from None
    elif class_attribute is not None and source.class_names != ckpt.class_names[: source.classes]:
        # names from a class attribute must match; a single positive class is named after its
        # file ("buildings.geojson"), which says nothing about the model's name for it
        warn_user(
            f"{labels}: classes {source.class_names} do not match the model's "
            f"{ckpt.class_names}; scores compare ids, check {option('class-attribute')}"
        )
    trained = TrainingSplit.of(ckpt, info)
    if trained is not None and region != "all":
        split = split or trained.split
        gap = trained.gap if gap is None else gap
    if split is None and region != "all":
        raise PipelineError(
            f"{option('region', region)} needs {option('split')} and {option('gap')} as the "
            f"store was tiled (geodnn tile's defaults: {option('split', DEFAULT_SPLIT)} "
            f"{option('gap', DEFAULT_GAP)}): the checkpoint records no training split on "
            f"{info.path.name} "
            "(trained on another scene, or before geodnn recorded it)"
        )
    try:
        box = region_box(info.shape, split, DEFAULT_GAP if gap is None else gap, region)
    except PipelineError as exc:
        if trained is not None and split == trained.split and not trained.has_validation(info):
            raise PipelineError(
                f"{info.path}: the model trained on all of this scene (its split {split} leaves "
                "no validation region), so none of it is held out; score a scene the model was "
                "not trained on"
            ) from None
        raise PipelineError(f"{info.path}: {exc}") from None
    if trained is not None:
        trained.warn_if_scored(box, info, region)
        if region == "validation":
            radius = ckpt.config.receptive_radius
            warn_if_gap_below_radius(info.path, DEFAULT_GAP if gap is None else gap, radius)
    if region != "train":
        warn_if_another_store_trained_here(ckpt, info, box)
    predictions = iter_predictions(
        ckpt,
        info.path,
        chunk=chunk,
        probabilities=False,
        progress=progress,
        argmax=argmax,
        label="evaluate",
    )
    confusion, labeled = _confusion(predictions, source, box, classes)
    if int(confusion.sum()) == 0 and labeled:  # the labels are there, the imagery is not
        raise PipelineError(
            f"{info.path}: no valid pixel (every band nodata, NaN or inf) under the {labeled} "
            f"labeled pixels of the scored region ({region}); check the scene and its nodata"
        )
    if int(confusion.sum()) == 0:  # scores of nothing would read as zeros
        raise PipelineError(
            f"{labels}: no labeled pixel of {info.path.name} falls in the scored region "
            f"({region}); pass labels that cover it, or another {option('split')} / "
            f"{option('region')}"
        )
    return Evaluation(SegmentationScores(confusion), ckpt.class_names, region)


def trained_attribute(ckpt: Checkpoint, labels: str | os.PathLike) -> str | None:
    """The class attribute the model's store was tiled with, where these labels have it: what
    to score by when none is given (the model's classes are that attribute's values)."""
    attribute = ckpt.metadata.get("class_attribute")
    if attribute is None or not has_attribute(labels, attribute):
        return None
    log.info(
        "%s: classes from attribute '%s', as the model was trained (%s)",
        labels,
        attribute,
        option("class-attribute", attribute),
    )
    return attribute


def attribute_hint(ckpt: Checkpoint, given: str | None) -> str:
    """What to add to a class mismatch when the model's classes came from an attribute that
    was not used here."""
    attribute = ckpt.metadata.get("class_attribute")
    if attribute is None or given == attribute:
        return ""
    return f"; the model's classes are the values of attribute '{attribute}'"


def _confusion(
    predictions: Iterable[ChunkPrediction], source: LabelSource, box: Region | None, classes: int
) -> tuple[torch.Tensor, int]:
    """The confusion matrix of the chunks' classes against the labels in `box`, and the
    labeled pixels there (whether the scene has data under them or not)."""
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    labeled = 0
    for chunk_pred in predictions:
        truth = clip(source.rasterize(chunk_pred.window), chunk_pred.window, box)
        labeled += int((truth != IGNORE_INDEX).sum())
        truth = np.where(chunk_pred.classes == IGNORE_INDEX, IGNORE_INDEX, truth)
        confusion += confusion_matrix(
            torch.from_numpy(chunk_pred.classes.astype(np.int64)),
            torch.from_numpy(truth.astype(np.int64)),
            classes,
        )
    return confusion, labeled


def _match_trained_classes(source, trained: list, names: list[str], attribute) -> None:
    """Number the labels' classes as the model's training labels were (by value); a single
    positive class is matched whatever its value, with a warning when an attribute named it
    otherwise."""
    single = source.classes == 2 and len(trained) == 2
    if single and attribute is not None and source.class_values[1] != trained[1]:
        warn_user(
            f"{source.path}: class {source.class_values[1]!r} of "
            f"{option('class-attribute', attribute)} is scored as the model's {names[1]!r} "
            f"(trained on value {trained[1]!r})"
        )
    source.match_classes(trained, names)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help=JOBS["evaluate"],
        description=__doc__,
    )
    p.add_argument("checkpoint", type=Path, help="model checkpoint (.pt) from `geodnn train`")
    p.add_argument("scene", type=Path, help="GeoTIFF scene")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="vector labels (FILE|layername=LAYER for one layer of a file) or a raster mask",
    )
    p.add_argument(
        "--class-attribute",
        help="attribute holding the class of each feature (default: the one the model's store "
        "was tiled with, where the labels have it)",
    )
    p.add_argument(
        "--split",
        help="spatial split used for tiling, e.g. columns:0.7 (default on the training scene: "
        "the checkpoint's)",
    )
    p.add_argument(
        "--gap",
        type=non_negative_int,
        help=f"guard band of the split, in pixels (default: the checkpoint's, else {DEFAULT_GAP})",
    )
    p.add_argument("--region", choices=REGIONS, default="all", help="which part to score")
    p.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK, help="chunk size in pixels")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--argmax", action="store_true", help=ARGMAX_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    retain_freed_memory()  # as `geodnn predict`: each chunk reallocates MBs of activations
    result = evaluate_scene(
        args.checkpoint,
        args.scene,
        args.labels,
        class_attribute=args.class_attribute,
        split=args.split,
        gap=args.gap,
        region=args.region,
        chunk=args.chunk,
        progress=not (args.json or args.quiet),
        argmax=args.argmax,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
