"""Streaming chunked prediction and stitching into georeferenced GeoTIFF/COG outputs.

The model is any callable `predict(batch)` taking float32 (n, bands, h+2r, w+2r) with NaN for
nodata and returning class probabilities float32 (n, classes, h, w). Chunks run as Dask tasks
(local in-process cluster, or an existing `distributed` scheduler); the calling process is the
single writer, consuming a bounded number of finished chunks and writing each through a windowed
write, so memory does not grow with the scene. Outputs are written to temporary files in the
target folder and renamed only when everything succeeded.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from .errors import OutputError, RasterInputError, TilesError
from .grid import DEFAULT_CHUNK, Chunk, ChunkGrid, core_is_empty, nodata_mask, read_chunk
from .progress import progress_bar
from .raster import SceneInfo, bounded_block_cache, io_error_reason, unreadable_window
from .scratch import hold_lock, is_orphan, release_lock, scratch_tag
from .warn import HeldLevel
from .wording import option

log = logging.getLogger(__name__)
Predictor = Callable[[np.ndarray], np.ndarray]

CLASS_NODATA = 255
FALLBACK_BLOCK = 256  # GeoTIFF tile size when no multiple of 16 divides the chunk
# Sidecars GDAL reads next to a GeoTIFF: PAM metadata, external overviews, external mask.
GEOTIFF_SIDECARS = (".aux.xml", ".ovr", ".msk")
SCHEDULER_TIMEOUT = "15s"
LOOPBACK = "127.0.0.1:0"  # a free port on this machine only


# ----------------------------------------------------------------------------------------------
# Chunk predictions as Dask tasks


@dataclass
class ChunkPrediction:
    """Prediction of one chunk's core: classes uint8 (h, w) with 255 for nodata, and optional
    probabilities float32 (classes, h, w) with NaN for nodata. `skipped` chunks were all nodata
    and were not run through the model (their probabilities are None)."""

    window: Window
    classes: np.ndarray
    probabilities: np.ndarray | None = None
    skipped: bool = False


def batch_chunks(grid: ChunkGrid, batch: int) -> Iterator[list[Chunk]]:
    """Consecutive row-major chunks grouped by equal core shape, at most `batch` per group."""
    group: list[Chunk] = []
    for chunk in grid:
        if group and (len(group) >= batch or chunk.shape != group[0].shape):
            yield group
            group = []
        group.append(chunk)
    if group:
        yield group


def _empty_prediction(chunk: Chunk) -> ChunkPrediction:
    classes = np.full(chunk.shape, CLASS_NODATA, dtype=np.uint8)
    return ChunkPrediction(chunk.window, classes, None, skipped=True)


def _finish(
    chunk: Chunk,
    padded: np.ndarray,
    probs: np.ndarray,
    keep: bool,
    class_scale: Sequence[float] | None = None,
) -> ChunkPrediction:
    mask = nodata_mask(padded, chunk)
    classes = decide(probs, class_scale)
    classes[mask] = CLASS_NODATA
    if not keep:
        return ChunkPrediction(chunk.window, classes)
    probs = np.array(probs, dtype=np.float32, copy=True)
    probs[:, mask] = np.nan
    return ChunkPrediction(chunk.window, classes, probs)


def decide(probs: np.ndarray, class_scale: Sequence[float] | None = None) -> np.ndarray:
    """Class map (uint8) of (classes, h, w) probabilities: the argmax, or with `class_scale`
    the argmax of each class's probability times its factor (a decision threshold fitted on
    training pixels, stored in the checkpoint). Ties go to the lower class, as in np.argmax
    (unlike np.argmax, a NaN score never wins; nodata pixels are masked afterwards anyway).

    One pass per class over contiguous planes: np.argmax over axis 0 strides across the planes
    and took 2.4-3.2 ms of a 512 x 512 chunk against 1.3 ms here."""
    factors = None if class_scale is None else np.asarray(class_scale, dtype=np.float32)

    def score(c: int) -> np.ndarray:
        return probs[c] if factors is None else probs[c] * factors[c]

    best = np.array(score(0), dtype=np.float32, copy=True)
    classes = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, probs.shape[0]):
        candidate = score(c)
        classes[candidate > best] = c
        np.maximum(best, candidate, out=best)
    return classes


def predict_chunks(
    scene: str,
    chunks: Sequence[Chunk],
    predict: Predictor,
    probabilities: bool = True,
    class_scale: Sequence[float] | None = None,
    client_pid: int | None = None,
) -> list[ChunkPrediction]:
    """The Dask task: read chunks with halos, skip all-nodata cores, run the rest as one batch
    (classes by `decide`). In the client's process (`client_pid`) the job bounds GDAL's cache
    for all its threads; a worker of another process bounds its own."""
    failure = None
    own = os.getpid() == client_pid
    try:
        with nullcontext() if own else bounded_block_cache(), rasterio.open(scene) as src:
            arrays = [read_chunk(src, chunk) for chunk in chunks]
    except RasterioIOError as exc:  # opening it (a read is read_window's error)
        failure = unreadable_window(scene, chunks[0].window, exc)
        if not own and not os.path.exists(scene):  # a cluster's worker without the file
            failure = RasterInputError(
                f"{scene}: not found on the Dask worker at {socket.gethostname()}; the scene "
                "must be readable at this path from every worker (a shared disk)"
            )
    if failure is not None:  # outside the handler, so that Dask can pickle it (read_window)
        raise failure
    live = [k for k, (c, a) in enumerate(zip(chunks, arrays)) if not core_is_empty(a, c)]
    results: list[ChunkPrediction | None] = [None] * len(chunks)
    if live:
        probs = predict(np.stack([arrays[k] for k in live]))
        for k, p in zip(live, probs):
            results[k] = _finish(chunks[k], arrays[k], p, probabilities, class_scale)
    return [r if r is not None else _empty_prediction(c) for r, c in zip(results, chunks)]


@contextmanager
def dask_client(scheduler: str | None = None, workers: int = 1):
    """A `distributed.Client`: connected to `scheduler` if given, else a local in-process one.
    Dask's own logs (worker start-up and shutdown chatter, each failed task) are quiet meanwhile,
    and the `distributed` logger is left as it was found (a notebook's own cluster logs on)."""
    from distributed import Client  # first: importing it sets its loggers' levels

    with _DASK_QUIET.held():
        client = _connect(Client, scheduler, workers)
        try:
            yield client
        finally:
            client.close()


# CRITICAL, not ERROR: a task's error reaches the caller as the exception itself, which Dask's
# "Compute Failed" report repeated for every task in flight
_DASK_QUIET = HeldLevel("distributed", logging.CRITICAL)


def _connect(Client, scheduler: str | None, workers: int):  # noqa: N803 (the class)
    if not scheduler:
        # None would still serve the scheduler's HTTP routes on 0.0.0.0:8787 (and warn when
        # that port is taken): both HTTP servers listen on a free loopback port instead
        return Client(
            processes=False,
            n_workers=1,
            threads_per_worker=workers,
            dashboard_address=LOOPBACK,
            worker_dashboard_address=LOOPBACK,
            set_as_default=False,
        )
    try:
        client = Client(scheduler, timeout=SCHEDULER_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:  # (TypeError: tls:// bare)
        raise TilesError(
            f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}); start "
            f"one with `dask scheduler` or drop {option('scheduler')} to run locally"
        ) from None
    try:
        client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT)
    except TimeoutError:
        client.close()
        raise TilesError(
            f"the Dask scheduler at {scheduler} has no workers; start one with `dask worker "
            f"{scheduler}` or drop {option('scheduler')} to run locally"
        ) from None
    return client


MODEL_RESENDS = 32  # groups sent again after workers lost the model (`_stream`)


def stream_predictions(
    scene: str | os.PathLike,
    predict: Predictor,
    halo: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    batch: int = 1,
    probabilities: bool = True,
    scheduler: str | None = None,
    client=None,
    in_flight: int | None = None,
    progress: bool = False,
    class_scale: Sequence[float] | None = None,
    label: str = "predict",
) -> Iterator[ChunkPrediction]:
    """Yield the prediction of every chunk of `scene` (in completion order) as Dask tasks finish
    (`label`: the progress bar's, the command's name).

    At most `in_flight` tasks (default 3x the cluster's threads, at least 2) are pending, so
    memory stays bounded whatever the scene size. `client` reuses a `distributed.Client`;
    otherwise one is connected to `scheduler` or started locally. The scene path must be
    readable from the workers. `class_scale`: see `decide`.
    """
    scene = Path(scene).resolve()  # remote Dask workers do not share our working folder
    with rasterio.open(scene) as src:
        height, width = src.height, src.width
    grid = ChunkGrid(height, width, chunk, halo)
    with dask_client(scheduler) if client is None else nullcontext(client) as active:
        decision = {
            "probabilities": probabilities,
            "class_scale": class_scale,
            "client_pid": os.getpid(),
        }
        from distributed.comm.core import CommClosedError  # (loaded with the client)

        try:
            yield from _stream(
                str(scene), grid, predict, batch, decision, active, in_flight, progress, label
            )
        except (CancelledError, CommClosedError) as exc:  # a worker or the scheduler went away
            where = f"the Dask scheduler at {scheduler}" if scheduler else "the local Dask client"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TilesError(
                f"{scene}: {where} lost work in progress ({reason}); rerun when the cluster "
                "is whole (the scheduler went away, or workers kept dying)"
            ) from None


def _stream(scene, grid, predict, batch, decision, client, in_flight, progress, label):
    """Keep `limit` chunk groups in flight; hand results over as they complete. `decision`:
    `predict_chunks`' keyword arguments (probabilities, class_scale, client_pid). The model is
    sent to the workers once; a group cancelled because a worker died with it (a restarted
    worker does not get it back) is sent again with the model, up to MODEL_RESENDS times."""
    from distributed import as_completed

    threads = max(1, sum(client.nthreads().values()))
    limit = in_flight or max(2, 3 * threads)
    [model] = client.scatter([predict], broadcast=True, hash=False)
    groups = batch_chunks(grid, max(1, batch))
    bar = progress_bar(len(grid), label, "chunk", progress)  # in a log file too
    pending = as_completed(loop=client.loop)
    futures: dict = {}  # in flight: future -> its chunk group
    resends = 0

    def submit(group: list[Chunk] | None = None) -> bool:
        group = group if group is not None else next(groups, None)
        if group is None:
            return False
        fut = client.submit(predict_chunks, scene, group, model, **decision, pure=False)
        futures[fut] = group
        pending.add(fut)
        return True

    def resend(group: list[Chunk]) -> bool:
        """Send `group` again (and the model, if it was lost); False when that cannot help:
        too many times already, or the scheduler is gone."""
        nonlocal model, resends
        if resends >= MODEL_RESENDS or client.status != "running":
            return False
        resends += 1
        if model.status != "finished":  # the model itself was lost: send it again
            [model] = client.scatter([predict], broadcast=True, hash=False)
        return submit(group)

    try:
        for _ in range(limit):
            if not submit():
                break
        for fut in pending:
            group = futures.pop(fut)
            try:
                results = fut.result()
            except CancelledError:
                if not resend(group):
                    raise
                continue
            submit()
            for result in results:
                bar.update(1)
                yield result
    finally:
        bar.close()
        for fut in futures:
            fut.cancel()


# ----------------------------------------------------------------------------------------------
# Atomic outputs


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output whose folder is missing, or that exists without `overwrite`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; pass a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass {option('overwrite', True)} to replace it")
    check_writable_folder(path)
    return path


def check_writable_folder(out: Path) -> None:
    """Refuse, before any work, an output whose folder takes no new file (read-only disk,
    permissions): outputs are written next to their final name. The probe is an unnamed
    temporary file (O_TMPFILE where the OS has it), so an interrupt leaves nothing behind."""
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot write in {out.parent} ({exc.strerror}); pick a writable folder"
        ) from None


@dataclass
class AtomicOutputs:
    """Temporary files in each output's folder, renamed onto the outputs only by `commit`.

    Used as a context manager: leaving it without `commit` (an error) removes every temporary
    file, so no partial output is ever left behind. Each temporary file's lock (`hold_lock`) is
    held until then: a run killed outright cannot remove its files, and the next run writing
    the same output removes them (`remove_orphan_temps`).
    """

    pending: dict[Path, Path] = field(default_factory=dict)
    scratch: list[Path] = field(default_factory=list)
    locks: list[IO[str]] = field(default_factory=list)

    def reserve(self, final: str | os.PathLike) -> Path:
        """A fresh temporary path next to `final`, with the same suffix (drivers key on it)."""
        final = Path(final)
        if final not in self.pending:  # (a swap's new copy: the run's own files are alive)
            remove_orphan_temps(final)
        self.pending[final] = temp_path(final)
        lock = hold_lock(self.pending[final])
        self.locks += [lock] if lock is not None else []
        return self.pending[final]

    def swap(self, final: Path) -> tuple[Path, Path]:
        """Give `final` a new temporary file; returns (old, new). The old one becomes scratch,
        removed at the end (e.g. the tiled GeoTIFF a COG is made from)."""
        old = self.pending[final]
        self.scratch.append(old)
        return old, self.reserve(final)

    def commit(self) -> None:
        """Rename every temporary file onto its output. A GeoTIFF's stale sidecars (see
        `GEOTIFF_SIDECARS`) are removed: they would describe the old raster, e.g. QGIS would draw
        the old map from an old `.ovr` when zoomed out."""
        for tmp in self.pending.values():
            _fsync(tmp)  # the data is on disk before any name points at it
        for final, tmp in self.pending.items():
            os.replace(tmp, final)
            if final.suffix.lower() in (".tif", ".tiff"):
                for suffix in GEOTIFF_SIDECARS:
                    sidecar = final.with_name(final.name + suffix)
                    if sidecar not in self.pending:
                        _remove(sidecar)
        for folder in {final.parent for final in self.pending}:
            _fsync(folder, folder=True)  # and so are the renames
        self.pending.clear()
        self.abort()

    def abort(self) -> None:
        """Remove every temporary and scratch file (after `commit`, only scratch is left), then
        their locks."""
        for tmp in [*self.pending.values(), *self.scratch]:
            _remove(tmp)
            _remove(tmp.with_name(tmp.name + ".aux.xml"))
        for lock in self.locks:
            release_lock(lock)
        self.pending.clear()
        self.scratch.clear()
        self.locks.clear()

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def temp_path(final: Path) -> Path:
    """An unused hidden name in `final`'s folder ending like `final` (drivers key on it),
    tagged with machine and process, `.NAME.tmp-HOST-PID-HEX.tif` (`scratch_tag`)."""
    return final.parent / f".{final.stem}.tmp-{scratch_tag()}{final.suffix}"


def remove_orphan_temps(final: Path) -> int:
    """Remove the temporary files that runs killed while writing `final` left beside it, with
    GDAL's sidecars of them (.ovr.tmp, .aux.xml) and their locks: those whose lock no process
    holds (`scratch.is_orphan`). A kill -9, an out-of-memory kill or a pre-empted node
    otherwise strands them (GBs of probabilities) where `ls` does not show them. Returns how
    many temporary files were removed."""
    # the temporary file (its suffix is `final`'s: not another output's of the same stem, such
    # as roads.gpkg's beside roads.tif), then what GDAL or the lock added to its name
    stem, suffix = re.escape(final.stem), re.escape(final.suffix)
    name = re.compile(rf"(\.{stem}\.tmp-(.+)-(\d+)-[0-9a-f]{{8}}{suffix})(\..*)?")
    found: dict[tuple[str, str, str], list[Path]] = {}  # (temp, host, pid) -> its files
    for path in final.parent.glob(f".{glob.escape(final.stem)}.tmp-*"):
        match = name.fullmatch(path.name)
        if match and path.is_file():
            found.setdefault(match.group(1, 2, 3), []).append(path)
    orphans = [key for key in found if is_orphan(final.parent / key[0], key[1], key[2])]
    for key in orphans:
        for path in found[key]:
            _remove(path)
    if orphans:
        log.info("%s: removed %d temporary file(s) a killed run left", final, len(orphans))
    return len(orphans)


def _fsync(path: Path, folder: bool = False) -> None:
    """Flush a file's data (or a folder's entries, where the OS can open folders) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


# ----------------------------------------------------------------------------------------------
# GeoTIFF writers


def block_size(chunk: int) -> int | None:
    """Largest GeoTIFF tile size (a multiple of 16, as TIFF requires, 64..512) dividing the
    chunk, so each chunk write fills whole blocks; None when there is none. Smaller tiles are
    not used: they compress poorly (32-pixel tiles make a class map ~1.7x larger)."""
    for size in range(512, 63, -16):
        if chunk % size == 0:
            return size
    return None


def _profile(scene: SceneInfo, count: int, dtype: str, nodata, block: int, compress: bool) -> dict:
    """Creation profile of a tiled GeoTIFF on the scene's grid, deflate-compressed or not."""
    profile = dict(
        driver="GTiff",
        width=scene.width,
        height=scene.height,
        count=count,
        dtype=dtype,
        nodata=nodata,
        transform=scene.transform,
        tiled=True,
        blockxsize=block,
        blockysize=block,
        BIGTIFF="IF_SAFER",
    )
    if compress:
        profile["compress"] = "deflate"
        if dtype == "float32":  # the floating-point predictor: probabilities ~15 % smaller
            profile["predictor"] = 3
    if scene.crs is not None:
        profile["crs"] = scene.crs
    return profile


FULL_DISK_BYTES = 64 * 2**20  # free space under this after a failed write: the disk is full


# what rasterio raises when GDAL cannot write: "Write failed" from a dataset, GDAL's own error
# from a copy (rasterio.shutil.copy; its class lives in rasterio._err only)
GDAL_WRITE_ERRORS = (RasterioIOError, CPLE_BaseError)


@contextmanager
def writing(final: Path, errors: tuple[type[Exception], ...] = GDAL_WRITE_ERRORS) -> Iterator[None]:
    """A write to `final` (or its temporary file) that fails with one of `errors` (GDAL's through
    rasterio, or pyogrio's) or with a full disk's OSError becomes one line naming `final`.
    Rasterio raises only "Write failed" (GDAL prints the reason, "No space left on device",
    itself), so a full disk is told by the space left."""
    try:
        yield
    except Exception as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not (full or isinstance(exc, errors)):
            raise
        free = _free_bytes(final.parent)
        if full or (free is not None and free < FULL_DISK_BYTES):
            said = exc.strerror if full else f"{free / 2**20:.0f} MB free"  # (after a clean-up)
            raise OutputError(
                f"{final}: the disk is full ({said}); free some space or write the outputs to "
                "another disk"
            ) from None
        left = "" if free is None else f" ({free / 2**20:.0f} MB free)"
        raise OutputError(
            f"{final}: writing failed ({io_error_reason(exc)}); check the disk it is on{left}"
        ) from None


def _free_bytes(folder: Path) -> int | None:
    """Free space of `folder`'s disk; None when it cannot be had (the folder is gone)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def category_names_xml(names: Sequence[str]) -> str:
    """A GDAL PAM sidecar (.aux.xml) naming the categories of band 1 (GeoTIFF has no tag)."""
    items = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    return (
        '<PAMDataset>\n  <PAMRasterBand band="1">\n'
        f"    <CategoryNames>{items}</CategoryNames>\n"
        "  </PAMRasterBand>\n</PAMDataset>\n"
    )


class PredictionWriter:
    """Single writer of the class map (and optional probabilities) through windowed writes.

    Class map: uint8, nodata 255, tiled, deflate, color table, class names (band tag
    `class_names`, GDAL category names in the .aux.xml sidecar). Probabilities: float32, one
    band per class named after it, nodata NaN. Both carry exactly the scene's CRS and transform.

    Chunk writes must fill whole deflate blocks: GDAL re-compresses a block written in parts and
    appends it again, growing the file (~4x). So the tile size divides the chunk; when no
    multiple of 16 does, the files are written uncompressed (blocks rewritten in place) and
    compressed by a streamed copy in `finish` (temporary disk space: the uncompressed size).
    """

    def __init__(
        self,
        scene: SceneInfo,
        outputs: AtomicOutputs,
        classes_path: str | os.PathLike,
        class_names: Sequence[str],
        class_colors: Sequence[tuple[int, int, int]],
        probabilities_path: str | os.PathLike | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if len(class_names) > CLASS_NODATA:
            raise OutputError(f"{classes_path}: {len(class_names)} classes do not fit uint8")
        self.scene, self.outputs = scene, outputs
        self.names, self.colors = list(class_names), list(class_colors)
        aligned = block_size(chunk)
        self.compressed = aligned is not None  # else compressed by a copy in `finish`
        self.block = aligned or FALLBACK_BLOCK
        self.classes_path = Path(classes_path)
        self.probabilities_path = Path(probabilities_path) if probabilities_path else None
        self.classes_tmp = outputs.reserve(self.classes_path)
        self.probabilities_tmp = (
            outputs.reserve(self.probabilities_path) if self.probabilities_path else None
        )
        self._env = bounded_block_cache()
        self._env.__enter__()
        self._classes = self._probs = None
        try:
            self._classes = self._open_classes()
            self._probs = self._open_probabilities() if self.probabilities_tmp else None
        except Exception:
            self.close()
            raise

    def _open_classes(self):
        profile = _profile(self.scene, 1, "uint8", CLASS_NODATA, self.block, self.compressed)
        dst = rasterio.open(self.classes_tmp, "w", **profile)
        colormap = {i: (*self.colors[i % len(self.colors)], 255) for i in range(len(self.names))}
        colormap[CLASS_NODATA] = (0, 0, 0, 0)
        dst.write_colormap(1, colormap)
        dst.set_band_description(1, "class")
        names = json.dumps(list(self.names))  # JSON: a class name may contain a comma
        dst.update_tags(1, class_names=names)
        dst.update_tags(class_names=names)
        return dst

    def _open_probabilities(self):
        count, nan = len(self.names), float("nan")
        profile = _profile(self.scene, count, "float32", nan, self.block, self.compressed)
        dst = rasterio.open(self.probabilities_tmp, "w", **profile)
        for band, name in enumerate(self.names, start=1):
            dst.set_band_description(band, name)
        return dst

    def write(self, prediction: ChunkPrediction) -> None:
        """Write one chunk's core at its window (skipped chunks write nodata)."""
        window = prediction.window
        with writing(self.classes_path):
            self._classes.write(prediction.classes, 1, window=window)
        if self._probs is None:
            return
        probs = prediction.probabilities
        if probs is None:
            h, w = int(window.height), int(window.width)
            probs = np.full((len(self.names), h, w), np.nan, dtype=np.float32)
        with writing(self.probabilities_path):
            self._probs.write(probs, window=window)

    def close(self) -> None:
        """Close the datasets (safe to call twice, also after an error)."""
        for dst in (self._classes, self._probs):
            if dst is not None and not dst.closed:
                dst.close()
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def finish(self, cog: bool = False) -> None:
        """Close, convert to COG or compress if asked or needed, and write the class map's
        category-name sidecar."""
        opened = ((self.classes_path, self._classes), (self.probabilities_path, self._probs))
        for final, dst in opened:
            if dst is not None and not dst.closed:
                with writing(final):  # GDAL flushes its last blocks on closing
                    dst.close()
        self.close()
        if cog or not self.compressed:
            self._copy_outputs(cog)
        aux = self.classes_path.with_name(self.classes_path.name + ".aux.xml")
        self.outputs.reserve(aux).write_text(category_names_xml(self.names))

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _copy_outputs(self, cog: bool) -> None:
        """Copy the finished tiled GeoTIFFs to new temporary files: Cloud-Optimized GeoTIFFs
        with overviews (`cog`), else deflate-compressed tiled GeoTIFFs."""
        targets = [(self.classes_path, "NEAREST", False)]
        if self.probabilities_path is not None:
            targets.append((self.probabilities_path, "AVERAGE", True))
        for final, resampling, floating in targets:
            tiled, copy = self.outputs.swap(final)
            what = "Cloud-Optimized GeoTIFF with overviews" if cog else "compressed GeoTIFF"
            log.info("writing %s as a %s (one GDAL copy, no progress bar)", final, what)
            with writing(final):
                if cog:
                    convert_to_cog(tiled, copy, resampling, self.block, floating)
                else:
                    compress_geotiff(tiled, copy, self.block, floating)
        self.classes_tmp = self.outputs.pending[self.classes_path]
        if self.probabilities_path is not None:
            self.probabilities_tmp = self.outputs.pending[self.probabilities_path]


def compress_geotiff(src: Path, dst: Path, block: int, floating: bool = False) -> None:
    """Copy a finished GeoTIFF to a tiled, deflate-compressed one (`floating`: float data,
    with the floating-point predictor)."""
    tiles = {"TILED": "YES", "BLOCKXSIZE": block, "BLOCKYSIZE": block}
    _gdal_copy(src, dst, driver="GTiff", **tiles, **({"PREDICTOR": 3} if floating else {}))


def convert_to_cog(
    src: Path, dst: Path, resampling: str, block: int = 512, floating: bool = False
) -> None:
    """Copy a finished GeoTIFF to a COG with internal overviews (GDAL's COG driver; `floating`:
    with its predictor, which is the floating-point one for float data)."""
    # GDAL's COG driver wants tiles of >= 128 px (it warns, naming only the value, otherwise)
    creation = {"BLOCKSIZE": max(block, 128), "OVERVIEW_RESAMPLING": resampling}
    _gdal_copy(src, dst, driver="COG", **creation, **({"PREDICTOR": "YES"} if floating else {}))


def _gdal_copy(src: Path, dst: Path, **creation) -> None:
    """A deflate-compressed GDAL copy with a bounded block cache (GDAL copies block by block,
    so memory does not grow with the scene)."""
    with bounded_block_cache():
        rasterio.shutil.copy(src, dst, COMPRESS="DEFLATE", BIGTIFF="IF_SAFER", **creation)
