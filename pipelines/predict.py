"""`geodnn predict CHECKPOINT SCENE.tif --out CLASSES.tif`: seam-free prediction of a whole scene.

The scene is cut into chunks with a halo equal to the model's receptive radius (reflect-padded at
the scene edges), so the class map equals whole-image prediction exactly, for any chunk size.
Chunks run as Dask tasks (local, or on `--scheduler ADDRESS`); this process writes each finished
chunk into the outputs with windowed writes, so memory does not grow with the scene. Outputs are
temporary files until everything succeeded, then renamed.

Python API:
- `predict_scene(checkpoint, scene, out, ...)`: the command as a function; returns a
  `PredictionSummary`.
- `iter_predictions(checkpoint, scene, ...)`: a generator of `tiles.stitch.ChunkPrediction`
  (window, classes uint8 with 255 = nodata, probabilities float32 or None), in completion order;
  e.g. `geodnn evaluate` builds a confusion matrix against labels from it.
- `ModelPredictor(model)`: the batched callable tiles runs per chunk.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from geodnn import ChainNet, Checkpoint, load_checkpoint
from geodnn.runtime import raise_if_stopped, retain_freed_memory
from tiles.errors import RasterInputError
from tiles.grid import DEFAULT_CHUNK, check_chunk_size
from tiles.raster import (
    SceneInfo,
    bounded_block_cache,
    ground_pixel_size,
    holding_block_cache,
    open_scene,
    sample_band_medians,
    untag_alpha,
    warn_if_no_crs,
)
from tiles.stitch import (
    AtomicOutputs,
    ChunkPrediction,
    PredictionWriter,
    block_size,
    check_output,
    stream_predictions,
)
from tiles.vectorize import (
    VectorOptions,
    check_replaceable,
    geographic_area_note,
    qml_path,
    vectorize_classes,
)
from tiles.warn import warn_user
from tiles.wording import option

from .arguments import flag, text, whole
from .cli import JOBS
from .datasets import RESOLUTION_TOLERANCE
from .device import DEVICES, prediction_device, resolve_device
from .errors import PipelineError
from .options import number, positive_int

log = logging.getLogger(__name__)


@dataclass
class ModelPredictor:
    """Batched chunk model: float32 (n, bands, h+2r, w+2r), NaN = nodata -> softmax probabilities
    float32 (n, classes, h, w). Picklable, so it ships to remote Dask workers."""

    model: ChainNet
    device: str = "cpu"  # 'auto' or 'cuda' unresolved when it runs on remote Dask workers

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        device = torch.device(resolve_device(self.device, "the device (on a Dask worker)"))
        with torch.no_grad(), full_float32(device):  # on a GPU, one thread at a time
            here = self.model.band_mean.device
            if here.type != device.type or (device.index is not None and here != device):
                self.model.to(device)  # moved where it runs (e.g. a Dask worker's GPU)
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            logits = self.model.forward_valid(x)
            # C-order for the stitcher (on the CPU the logits are channels_last)
            return torch.softmax(logits, dim=1).contiguous().cpu().numpy()


_GPU_CALLS = threading.Lock()


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """On a GPU, convolutions in full float32 rather than cuDNN's default TF32 (10-bit
    mantissa), which moved probabilities by ~1e-3 between a chunk and the whole scene and
    flipped 331 of 810k pixels (H200, benchmarks/predict.py); prediction is I/O-bound there, so
    it costs nothing seen. The flag is process-wide: set and restored under a lock, so the Dask
    threads' GPU calls take turns (they share the one device anyway)."""
    if device.type != "cuda":
        yield
        return
    with _GPU_CALLS:
        kept = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = kept


@dataclass
class PredictionSummary:
    """What a prediction run wrote and how long it took."""

    outputs: list[Path]
    chunks: int
    skipped: int
    seconds: float
    polygons: int | None = None
    warnings: list[str] = field(default_factory=list)


def as_checkpoint(checkpoint: str | os.PathLike | Checkpoint) -> Checkpoint:
    """A loaded Checkpoint as is, or the one a path names."""
    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)


def check_scene_bands(scene: SceneInfo, ckpt: Checkpoint) -> None:
    if scene.count != ckpt.config.bands and scene.count + scene.alpha_bands == ckpt.config.bands:
        raise RasterInputError(
            f"{scene.path}: has {scene.count} band(s) and an alpha band, which geodnn reads as "
            f"a mask; the model expects {ckpt.config.bands}: if that band holds data, reset "
            f"its colour interpretation (`{untag_alpha(scene.path)}`); if it is transparency, "
            "retrain the model on scenes read this way"
        )
    if scene.count != ckpt.config.bands:
        raise RasterInputError(
            f"{scene.path}: has {scene.count} band(s) but the model expects "
            f"{ckpt.config.bands}; pass a scene with the bands the model was trained on"
        )


def space_note(info: SceneInfo, classes: int, probabilities, cog: bool, chunk: int) -> str | None:
    """Warn before the work when the probabilities may not fit their disk: float32, one band
    per class, compressed little (~0.85x), and written twice when copied at the end (--cog,
    or a chunk that no GeoTIFF tile size divides: `block_size`)."""
    if probabilities is None:
        return None
    copied = cog or block_size(chunk) is None
    need = 4 * classes * info.height * info.width * (2 if copied else 1)
    free = shutil.disk_usage(Path(probabilities).resolve().parent).free
    if free >= need:
        return None
    why = option("cog", True) if cog else option("chunk", chunk)
    copies = f", twice with {why}" if copied else ""
    message = (
        f"{probabilities}: the probabilities may need up to {_size(need)} of disk ({classes} "
        f"float32 bands{copies}) and {_size(free)} are free; free some space, write them to "
        "another disk, or leave them out"
    )
    warn_user(message)
    return message


def _size(count: int) -> str:
    return f"{count / 1e9:.3g} GB" if count >= 1e9 else f"{count / 1e6:.3g} MB"


def resolution_note(info: SceneInfo, ckpt: Checkpoint) -> str | None:
    """Warn when the scene's pixels are much larger or smaller on the ground than those the
    model was trained on (a convolution's filters are tied to a ground size); the message, or
    None (also when either size is unknown)."""
    trained = ckpt.metadata.get("pixel_size_m")  # a list for a model of several stores
    here = ground_pixel_size(info.crs, info.transform, info.width, info.height)
    if not trained or not here:
        return None
    # the nearest of the sizes trained on
    trained = float(min(np.atleast_1d(trained), key=lambda size: max(here / size, size / here)))
    if max(here / trained, trained / here) < RESOLUTION_TOLERANCE:
        return None
    t = info.transform  # a pixel's side in the scene's CRS units (rotated grids too)
    resolution = math.hypot(t.a, t.d) * trained / here
    command = shlex.join(
        ["rio", "warp", str(info.path), "resampled.tif", "--res", f"{resolution:.3g}"]
    )
    message = (
        f"{info.path}: its pixels are {here:.3g} m on the ground, the model was trained on "
        f"{trained:.3g} m pixels, so its map may be poor; resample the scene to {trained:.3g} m "
        f"(`{command}`) or train on this resolution"
    )
    warn_user(message)
    return message


# A band's median on the scene this many training standard deviations from its training mean
# is not the data the model learned from: another bit depth (8-bit renders of 16-bit products,
# x256), reflectance against digital numbers (x10000), another sensor.
RANGE_TOLERANCE = 10.0


def value_range_note(info: SceneInfo, ckpt: Checkpoint) -> str | None:
    """Warn when the scene's values lie far outside those the model was trained on (it then
    maps silently to one class); the message, or None (also for a model that records no
    training statistics, mean 0 and std 1)."""
    mean = ckpt.model.band_mean.detach().cpu().numpy().astype(np.float64)
    std = ckpt.model.band_std.detach().cpu().numpy().astype(np.float64)
    if np.all(mean == 0) and np.all(std == 1):
        return None
    medians = sample_band_medians(info.path)
    if len(medians) != len(mean):  # check_scene_bands refuses it first
        return None
    # a band constant in training (std clamped near 0) says nothing; NaN: all nodata sampled
    informative = std > 1e-3 * np.maximum(np.abs(mean), 1.0)
    with np.errstate(invalid="ignore"):
        distance = np.where(informative, np.abs(medians - mean) / std, np.nan)
    far = np.flatnonzero(distance > RANGE_TOLERANCE)
    if far.size == 0:
        return None
    b = int(far[np.argmax(distance[far])])
    message = (
        f"{info.path}: band {b + 1}'s values (median {medians[b]:.4g}) lie "
        f"{distance[b]:.0f} standard deviations from the model's training data (mean "
        f"{mean[b]:.4g}, std {std[b]:.4g}; {far.size} of {len(mean)} band(s) so far off), so "
        "its map may be poor; bring the scene to the training data's range (another bit depth "
        "or scale?) or train on data like it"
    )
    warn_user(message)
    return message


def iter_predictions(
    checkpoint: str | os.PathLike | Checkpoint,
    scene: str | os.PathLike,
    *,
    chunk: int = DEFAULT_CHUNK,
    batch: int = 1,
    probabilities: bool = True,
    scheduler: str | None = None,
    progress: bool = False,
    device: str = "auto",
    argmax: bool = False,
    label: str = "predict",
) -> Iterator[ChunkPrediction]:
    """Yield every chunk's prediction of `scene` (any order; together they cover each pixel
    once). Validates the scene, band count and chunk size first (one-line errors).

    Classes follow the checkpoint's decision rule (`decision_scale`); `argmax` ignores it."""
    ckpt = as_checkpoint(checkpoint)
    info = open_scene(scene)
    check_scene_bands(info, ckpt)
    halo = ckpt.model.receptive_radius
    check_chunk_size(chunk, halo)
    with bounded_block_cache():  # held while the chunks stream (a job's own, if it has one)
        yield from stream_predictions(
            info.path,
            # its own copy: moving it to the device must not move the caller's model
            ModelPredictor(copy.deepcopy(ckpt.model), prediction_device(device, scheduler)),
            halo,
            chunk=chunk,
            batch=batch,
            probabilities=probabilities,
            scheduler=scheduler,
            progress=progress,
            class_scale=None if argmax else decision_scale(ckpt),
            label=label,
        )


def decision_scale(ckpt: Checkpoint, source: object = "checkpoint") -> list[float] | None:
    """The per-class probability factors `geodnn train` fitted on training pixels (a 2-class
    decision threshold; `tiles.stitch.decide`), or None for the plain argmax (checkpoints
    trained without [data] calibrate_tiles). `source` names the checkpoint in the error."""
    scale = ckpt.metadata.get("class_scale")
    if scale is None:
        return None
    if len(scale) != ckpt.config.classes:
        raise PipelineError(
            f"{source}: class_scale has {len(scale)} factors for {ckpt.config.classes} "
            f"classes; pass {option('argmax', True)} or retrain with [data] calibrate_tiles"
        )
    return [float(v) for v in scale]


@holding_block_cache
def predict_scene(
    checkpoint: str | os.PathLike | Checkpoint,
    scene: str | os.PathLike,
    out: str | os.PathLike,
    *,
    probabilities: str | os.PathLike | None = None,
    vectors: str | os.PathLike | None = None,
    cog: bool = False,
    chunk: int = DEFAULT_CHUNK,
    batch: int = 1,
    scheduler: str | None = None,
    device: str = "auto",
    min_area: float = 0.0,
    simplify: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
    argmax: bool = False,
) -> PredictionSummary:
    """Predict `scene` into the class map `out` (+ probabilities, + GeoPackage polygons in
    the layer "classes", beside QGIS's "layer_styles": `gpd.read_file(vectors, layer="classes")`).

    Everything is validated before any file is created; outputs appear only if the whole run
    succeeds. An all-nodata scene gives an all-nodata map (and a warning); a scene without CRS
    gives outputs without CRS (and a warning); `PredictionSummary.warnings` lists these and
    the squared-degree areas of polygons in a geographic CRS.
    """
    started = time.perf_counter()
    chunk, batch = whole("chunk", chunk, 1), whole("batch", batch, 1)
    for name, value in (("cog", cog), ("overwrite", overwrite), ("argmax", argmax)):
        flag(name, value)
    progress = flag("progress", progress)
    scheduler = check_scheduler(scheduler)
    ckpt = as_checkpoint(checkpoint)
    if not argmax:  # a bad decision rule is refused before any output is opened
        source = "checkpoint" if isinstance(checkpoint, Checkpoint) else os.fspath(checkpoint)
        decision_scale(ckpt, source)
    info = open_scene(scene)
    check_scene_bands(info, ckpt)
    check_chunk_size(chunk, ckpt.model.receptive_radius)
    device = prediction_device(device, scheduler)
    targets = _check_outputs(info, out, probabilities, vectors, overwrite)
    found = (warn_if_no_crs(info), resolution_note(info, ckpt), value_range_note(info, ckpt))
    found += (space_note(info, len(ckpt.class_names), probabilities, cog, chunk),)
    notes = [n for n in found if n is not None]
    counts = {"chunks": 0, "skipped": 0}
    with AtomicOutputs() as outputs:
        with PredictionWriter(
            info,
            outputs,
            out,
            ckpt.class_names,
            ckpt.class_colors,
            probabilities_path=probabilities,
            chunk=chunk,
        ) as writer:
            for prediction in iter_predictions(
                ckpt,
                info.path,
                chunk=chunk,
                batch=batch,
                probabilities=probabilities is not None,
                scheduler=scheduler,
                device=device,
                progress=progress,
                argmax=argmax,
            ):
                writer.write(prediction)
                counts["chunks"] += 1
                counts["skipped"] += prediction.skipped
            writer.finish(cog=cog)
        if counts["skipped"] == counts["chunks"]:
            message = f"{info.path}: every pixel is nodata; the class map is all nodata (255)"
            warn_user(message)
            notes.append(message)
        summary = PredictionSummary(targets, counts["chunks"], counts["skipped"], 0.0)
        summary.warnings = notes
        if vectors is not None:
            notes += [n for n in [geographic_area_note(info.crs, vectors)] if n is not None]
            summary.polygons = vectorize_classes(
                writer.classes_tmp,
                vectors,
                ckpt.class_names,
                ckpt.class_colors,
                VectorOptions(min_area=min_area, simplify=simplify, window=chunk),
                overwrite=overwrite,
                outputs=outputs,
                progress=progress,
            )
        raise_if_stopped()  # a stop swallowed on the way must not replace earlier outputs
        outputs.commit()
    summary.seconds = time.perf_counter() - started
    return summary


def check_scheduler(scheduler) -> str | None:
    """A Dask scheduler's address, or None (run locally). An empty one (an unset $DASK_ADDR)
    ran locally without a word; a notebook's Client gave Dask's TypeError."""
    if scheduler is None:
        return None
    if hasattr(scheduler, "scheduler_info"):  # a distributed.Client
        raise PipelineError(
            f"{option('scheduler')} takes the scheduler's address: pass "
            "client.scheduler.address, not the Client"
        )
    scheduler = text("scheduler", scheduler, "tcp://HOST:8786")
    if not scheduler.strip():
        raise PipelineError(
            f"{option('scheduler')} is empty; pass the scheduler's address (tcp://HOST:8786), "
            "or leave it out to run locally"
        )
    return scheduler


def _check_outputs(info: SceneInfo, out, probabilities, vectors, overwrite: bool) -> list[Path]:
    paths = [Path(p) for p in (out, probabilities, vectors) if p is not None]
    if vectors is not None:  # before "pass --overwrite", which would not do here
        check_replaceable(vectors)
    for path in paths:
        check_output(path, overwrite)
        if path.resolve() == info.path.resolve():
            raise PipelineError(f"{path}: is the input scene; pick another output name")
    for raster in (p for p in (out, probabilities) if p is not None):
        if Path(raster).suffix.lower() not in (".tif", ".tiff"):
            raise PipelineError(
                f"{raster}: rasters are written as GeoTIFF (COG); give it a .tif name (convert "
                "with `rio convert` or `gdal_translate` if you need another format)"
            )
    if vectors is not None:
        if Path(vectors).suffix.lower() != ".gpkg":
            raise PipelineError(
                f"{vectors}: polygons are written as a GeoPackage; give {option('vectors')} a "
                ".gpkg name (convert with `ogr2ogr` if you need another format)"
            )
        check_output(qml_path(vectors), overwrite)
    if len({p.resolve() for p in paths}) != len(paths):
        raise PipelineError(f"{out}: outputs must be different files; give each its own name")
    return paths


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `geodnn predict`."""
    p = subparsers.add_parser(
        "predict",
        help=JOBS["predict"],
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("checkpoint", help="model checkpoint (.pt) from `geodnn train`")
    p.add_argument("scene", help="GeoTIFF scene to predict (any size, CRS, band dtype)")
    p.add_argument("--out", required=True, help="class map GeoTIFF to write (uint8, 255=nodata)")
    p.add_argument("--probabilities", help="also write class probabilities (float32 GeoTIFF)")
    p.add_argument("--vectors", help="also write class polygons to this GeoPackage (+ .qml)")
    p.add_argument("--cog", action="store_true", help="write Cloud-Optimized GeoTIFFs")
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=DEFAULT_CHUNK,
        help="chunk size in pixels (default 512)",
    )
    p.add_argument(
        "--batch", type=positive_int, default=1, help="chunks per model call (default 1)"
    )
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: local)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs (auto: GPU if any; with --scheduler, resolved on each worker)",
    )
    p.add_argument(
        "--min-area", type=number, default=0.0, help="drop smaller polygons (CRS units squared)"
    )
    p.add_argument(
        "--simplify",
        type=number,
        default=0.0,
        help="simplify tolerance (CRS units; polygon by polygon, so neighbours may then overlap)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (not a GeoPackage that holds other layers)",
    )
    p.add_argument("--argmax", action="store_true", help=ARGMAX_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


ARGMAX_HELP = (
    "classes by the plain argmax of the probabilities, ignoring a decision threshold that "
    "`geodnn train` fitted on training tiles ([data] calibrate_tiles > 0)"
)


def run(args: argparse.Namespace) -> int:
    retain_freed_memory()  # each chunk reallocates MBs of activations: reuse, don't refault
    summary = predict_scene(
        args.checkpoint,
        args.scene,
        args.out,
        probabilities=args.probabilities,
        vectors=args.vectors,
        cog=args.cog,
        chunk=args.chunk,
        batch=args.batch,
        scheduler=args.scheduler,
        device=args.device,
        min_area=args.min_area,
        simplify=args.simplify,
        overwrite=args.overwrite,
        progress=not args.quiet,
        argmax=args.argmax,
    )
    log.info(
        "wrote %s (%d chunks, %d all-nodata skipped, %.1f s)",
        ", ".join(str(p) for p in summary.outputs),
        summary.chunks,
        summary.skipped,
        summary.seconds,
    )
    return 0
