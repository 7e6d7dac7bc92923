import ctypes
import errno
import glob
import json
import logging
import os
import sqlite3

import numpy as np
import pytest
import rasterio
from scipy.ndimage import uniform_filter

from tiles.errors import OutputError, RasterInputError, TilesError
from tiles.grid import ChunkGrid
from tiles.raster import open_scene
from tiles.stitch import (
    AtomicOutputs,
    PredictionWriter,
    batch_chunks,
    block_size,
    check_output,
    dask_client,
    decide,
    stream_predictions,
)

NAMES = ["background", "water", "trees"]
COLORS = [(0, 0, 0), (0, 0, 255), (0, 160, 0)]


def box_predictor(batch: np.ndarray) -> np.ndarray:
    """A numpy "model" with receptive radius 2: two 3x3 box means, then a 3-class softmax."""
    x = np.nan_to_num(batch[:, 0], nan=0.0)
    x = uniform_filter(uniform_filter(x, size=(1, 3, 3)), size=(1, 3, 3))[:, 2:-2, 2:-2]
    logits = np.stack([np.zeros_like(x), x / 100.0, np.sin(x / 50.0)], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def gdal_category_names(path) -> list[str]:
    """Category names of band 1 as GDAL itself reports them (through rasterio's libgdal)."""
    import rasterio as rio

    [libpath] = glob.glob(os.path.join(os.path.dirname(rio.__file__), "..", "rasterio.libs",
                                       "libgdal-*"))  # fmt: skip
    lib = ctypes.CDLL(libpath)
    lib.GDALAllRegister()
    lib.GDALOpen.restype = ctypes.c_void_p
    lib.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.GDALGetRasterBand.restype = ctypes.c_void_p
    lib.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.GDALGetMetadata.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    dataset = lib.GDALOpen(str(path).encode(), 0)
    assert dataset
    band = lib.GDALGetRasterBand(dataset, 1)
    lib.GDALGetMetadata(band, None)  # GTiff loads its PAM sidecar lazily
    names, items = [], lib.GDALGetRasterCategoryNames(band)
    while items and items[len(names)] is not None:
        names.append(items[len(names)].decode())
    lib.GDALClose(dataset)
    return names


def stitch(scene_path, out, probs=None, chunk=32, cog=False, batch=1):
    scene = open_scene(scene_path)
    with AtomicOutputs() as outputs:
        with PredictionWriter(scene, outputs, out, NAMES, COLORS, probs, chunk) as writer:
            for p in stream_predictions(scene_path, box_predictor, 2, chunk=chunk, batch=batch):
                writer.write(p)
            writer.finish(cog=cog)
        outputs.commit()


@pytest.mark.parametrize("chunk", [16, 24, 512])  # 24: writes straddle GeoTIFF blocks
def test_streamed_chunks_equal_the_whole_image(make_geotiff, tmp_path, chunk):
    scene = np.random.default_rng(0).integers(0, 1000, (1, 77, 90)).astype(np.float32)
    path = make_geotiff(scene)
    stitch(path, tmp_path / "c.tif", tmp_path / "p.tif", chunk=chunk, batch=4)
    expected = box_predictor(np.pad(scene, ((0, 0), (2, 2), (2, 2)), mode="reflect")[None])[0]
    with rasterio.open(tmp_path / "p.tif") as p, rasterio.open(tmp_path / "c.tif") as c:
        assert np.abs(p.read() - expected).max() <= 1e-6
        assert np.array_equal(c.read(1), expected.argmax(0))


@pytest.mark.parametrize("chunk, block", [(64, 64), (40, 256)])  # 40: compressed by a copy
def test_class_map_has_color_table_names_and_georeferencing(make_geotiff, tmp_path, chunk, block):
    path = make_geotiff(np.ones((1, 50, 60), dtype=np.uint16), crs="EPSG:4326")
    stitch(path, tmp_path / "c.tif", tmp_path / "p.tif", chunk=chunk)
    with rasterio.open(path) as src, rasterio.open(tmp_path / "c.tif") as c:
        assert c.crs == src.crs and c.transform == src.transform
        assert c.nodata == 255 and c.dtypes[0] == "uint8" and c.block_shapes[0] == (block, block)
        assert c.compression.value == "DEFLATE"
        cmap = c.colormap(1)
        assert [cmap[i][:3] for i in range(3)] == COLORS and cmap[255][3] == 0
        assert c.descriptions == ("class",) and json.loads(c.tags(1)["class_names"]) == NAMES
    with rasterio.open(tmp_path / "p.tif") as p:
        assert p.descriptions == tuple(NAMES) and np.isnan(p.nodata) and p.dtypes[0] == "float32"
        assert p.compression.value == "DEFLATE"
    assert gdal_category_names(tmp_path / "c.tif") == NAMES
    left = sorted(p.name for p in tmp_path.iterdir())  # no temporary or scratch file
    assert left == ["c.tif", "c.tif.aux.xml", "p.tif", path.name]


def test_nodata_pixels_stay_nodata(make_geotiff, tmp_path):
    scene = np.full((1, 40, 40), 7, dtype=np.int16)
    scene[0, :16, :16] = -1
    scene[0, 30, 5] = -1
    stitch(make_geotiff(scene, nodata=-1), tmp_path / "c.tif", tmp_path / "p.tif", chunk=16)
    with rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "p.tif") as p:
        classes, probs = c.read(1), p.read()
    nodata = scene[0] == -1
    assert (classes[nodata] == 255).all() and (classes[~nodata] != 255).all()
    assert np.isnan(probs[:, nodata]).all() and not np.isnan(probs[:, ~nodata]).any()


def test_all_nodata_chunks_are_not_predicted(make_geotiff):
    scene = np.full((1, 64, 64), 3, dtype=np.uint8)
    scene[0, 32:, :] = 0
    seen = []

    def counting(batch):
        seen.append(len(batch))
        return box_predictor(batch)

    results = list(stream_predictions(make_geotiff(scene, nodata=0), counting, 2, chunk=32))
    assert sum(seen) == 2 and sum(r.skipped for r in results) == 2
    assert all((r.classes == 255).all() for r in results if r.skipped)


def test_cog_output_is_tiled_with_overviews(make_geotiff, tmp_path):
    scene = np.random.default_rng(1).integers(0, 1000, (1, 600, 700)).astype(np.uint16)
    stitch(make_geotiff(scene), tmp_path / "c.tif", tmp_path / "p.tif", chunk=256, cog=True)
    for name in ("c.tif", "p.tif"):
        with rasterio.open(tmp_path / name) as dst:
            assert dst.block_shapes[0] == (256, 256) and dst.overviews(1)
            assert dst.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert gdal_category_names(tmp_path / "c.tif") == NAMES
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_batches_group_equal_shapes_only():
    grid = ChunkGrid(50, 50, 20, halo=2)
    groups = list(batch_chunks(grid, 4))
    assert [c.index for g in groups for c in g] == [c.index for c in grid]
    assert all(len({c.shape for c in g}) == 1 and len(g) <= 4 for g in groups)


def test_batches_are_filled_to_exactly_the_batch_size():
    """The model never gets more than `batch` chunks at once (GPU memory follows --batch)."""
    groups = list(batch_chunks(ChunkGrid(100, 100, 20, halo=2), 2))  # 25 chunks of one shape
    assert [len(g) for g in groups] == [2] * 12 + [1]


def test_block_size_divides_the_chunk():
    assert block_size(512) == 512 and block_size(1024) == 512 and block_size(768) == 384
    assert block_size(80) == 80 and block_size(64) == 64
    assert block_size(100) is None and block_size(1000) is None  # no multiple of 16 divides
    assert block_size(32) is None and block_size(16 * 37) is None  # only tiles under 64 would


def test_unaligned_chunk_output_stays_compact(make_geotiff, tmp_path, caplog):
    """Chunk writes straddling deflate blocks made GDAL append re-compressed blocks (~4x)."""
    y, x = np.mgrid[0:300, 0:340]
    scene = (60 * np.sin(x / 23.0) + 50 * np.cos(y / 17.0) + 120)[None].astype(np.float32)
    path = make_geotiff(scene)
    for chunk in (96, 100):
        with caplog.at_level(logging.WARNING):
            stitch(path, tmp_path / f"c{chunk}.tif", tmp_path / f"p{chunk}.tif", chunk=chunk)
    # the block cache is 64 MB, not the 64 bytes an integer GDAL_CACHEMAX once set
    assert not [r for r in caplog.records if "block cache size" in r.getMessage()]
    for name in ("c", "p"):
        aligned, odd = tmp_path / f"{name}96.tif", tmp_path / f"{name}100.tif"
        assert odd.stat().st_size <= 1.25 * aligned.stat().st_size  # was 1.5x-3.5x
        with rasterio.open(aligned) as a, rasterio.open(odd) as b:
            assert b.compression.value == "DEFLATE"
            np.testing.assert_allclose(b.read(), a.read(), rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_removes_stale_overviews_and_mask(make_geotiff, tmp_path):
    """External overviews (.ovr) and masks (.msk) of an earlier map would show the old map."""
    from rasterio.enums import Resampling

    out = tmp_path / "c.tif"
    stitch(make_geotiff(np.full((1, 64, 64), 900, dtype=np.float32)), out, chunk=64)
    options = dict(TIFF_USE_OVR=True, GDAL_TIFF_INTERNAL_MASK=False)
    with rasterio.Env(**options), rasterio.open(out, "r+") as dst:
        old = np.unique(dst.read(1))
        dst.build_overviews([2, 4], Resampling.nearest)
        dst.write_mask(np.zeros((64, 64), dtype=np.uint8))
    assert (tmp_path / "c.tif.ovr").exists() and (tmp_path / "c.tif.msk").exists()
    stitch(make_geotiff(np.zeros((1, 64, 64), dtype=np.float32)), out, chunk=64)
    assert not (tmp_path / "c.tif.ovr").exists() and not (tmp_path / "c.tif.msk").exists()
    with rasterio.open(out) as dst:
        new = np.unique(dst.read(1))
        assert not np.array_equal(new, old)
        assert np.array_equal(np.unique(dst.read(1, out_shape=(16, 16))), new)
        assert dst.read_masks(1).all()


def test_atomic_outputs_commit_or_leave_nothing(tmp_path):
    final = tmp_path / "a.tif"
    with AtomicOutputs() as outputs:
        outputs.reserve(final).write_bytes(b"partial")
        assert final.exists() is False
    assert list(tmp_path.iterdir()) == []
    with AtomicOutputs() as outputs:
        outputs.reserve(final).write_bytes(b"done")
        outputs.commit()
    assert final.read_bytes() == b"done" and len(list(tmp_path.iterdir())) == 1


def test_atomic_outputs_flush_the_files_before_the_renames(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # Linux: the fd's path
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with AtomicOutputs() as outputs:
        for name in ("a.tif", "b.gpkg"):
            outputs.reserve(tmp_path / name).write_bytes(b"done")
        temps = [str(t) for t in outputs.pending.values()]
        outputs.commit()
    assert events == [("fsync", t) for t in temps] + [
        ("replace", str(tmp_path / "a.tif")),
        ("replace", str(tmp_path / "b.gpkg")),
        ("fsync", str(tmp_path)),
    ]


def test_cog_of_small_chunks_has_128_px_tiles_without_a_gdal_warning(
    make_geotiff, tmp_path, caplog
):
    scene = np.random.default_rng(2).integers(0, 1000, (1, 200, 300)).astype(np.uint16)
    with caplog.at_level(logging.WARNING):
        stitch(make_geotiff(scene), tmp_path / "c.tif", None, chunk=96, cog=True)
    with rasterio.open(tmp_path / "c.tif") as dst:
        assert dst.block_shapes[0] == (128, 128)
    assert not [r for r in caplog.records if "BLOCKSIZE" in r.getMessage()]


def test_check_output_errors_name_the_fix(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(OutputError, match="overwrite=True"):
        check_output(tmp_path / "x.tif", overwrite=False)
    with pytest.raises(OutputError, match="does not exist"):
        check_output(tmp_path / "no" / "x.tif", overwrite=True)
    assert check_output(tmp_path / "x.tif", overwrite=True) == tmp_path / "x.tif"


def test_check_output_refuses_a_folder_even_with_overwrite(tmp_path):
    """Refused before any work: otherwise the whole prediction runs, then cannot replace it."""
    (tmp_path / "out.tif").mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="out.tif: is a folder; pass a file name"):
            check_output(tmp_path / "out.tif", overwrite=overwrite)


def test_check_output_refuses_a_folder_that_cannot_be_written(tmp_path, monkeypatch):
    """Checked up front: prediction used to run to its end, then fail on its first write."""

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tiles.stitch.tempfile.TemporaryFile", read_only)
    with pytest.raises(OutputError, match=r"x.tif: cannot write in .* \(Read-only file system\)"):
        check_output(tmp_path / "x.tif", overwrite=False)


def test_unreadable_chunk_is_a_raster_input_error(make_geotiff, tmp_path):
    from tiles.stitch import predict_chunks

    path = make_geotiff(np.ones((1, 300, 300), dtype=np.float32))
    [chunk] = list(ChunkGrid(300, 300, 512, 2))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RasterInputError, match="damaged or unreadable at rows 0-300") as info:
        predict_chunks(str(path), [chunk], box_predictor)
    assert "\n" not in str(info.value)


def test_a_worker_of_another_process_bounds_gdal_s_cache_itself(make_geotiff, monkeypatch):
    """In the client's process the job holds the bound for every thread (threads entering and
    leaving it on their own lifted it under each other); a remote worker has no job."""
    import tiles.stitch
    from tiles.raster import GDAL_CACHE_BYTES
    from tiles.stitch import predict_chunks

    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    seen, real = [], tiles.stitch.read_chunk

    def spy(src, chunk):
        seen.append(rasterio.env.getenv().get("GDAL_CACHEMAX"))
        return real(src, chunk)

    monkeypatch.setattr(tiles.stitch, "read_chunk", spy)
    path = make_geotiff(np.ones((1, 40, 40), dtype=np.float32))
    [chunk] = list(ChunkGrid(40, 40, 64, 2))
    predict_chunks(str(path), [chunk], box_predictor, client_pid=os.getpid() + 1)
    predict_chunks(str(path), [chunk], box_predictor, client_pid=os.getpid())
    assert seen == [GDAL_CACHE_BYTES, None]


def test_class_scale_moves_the_decision_and_keeps_the_probabilities(make_geotiff):
    scene = np.random.default_rng(1).integers(0, 200, (1, 40, 50)).astype(np.float32)
    path = make_geotiff(scene)
    plain = list(stream_predictions(path, box_predictor, 2, chunk=32))
    scaled = list(stream_predictions(path, box_predictor, 2, chunk=32, class_scale=[2.0, 0.5, 1.0]))
    by_window = {str(p.window): p for p in plain}
    moved = 0
    for p in scaled:
        q = by_window[str(p.window)]
        np.testing.assert_array_equal(p.probabilities, q.probabilities)
        np.testing.assert_array_equal(p.classes, decide(q.probabilities, [2.0, 0.5, 1.0]))
        moved += int((p.classes != q.classes).sum())
    assert moved > 0  # the scale changed some decisions


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_decide_is_the_argmax_of_the_scaled_probabilities(classes):
    rng = np.random.default_rng(classes)
    probs = rng.random((classes, 31, 17)).astype(np.float32)
    probs[:, :5] = np.round(probs[:, :5], 1)  # ties: the lower class wins, as in np.argmax
    scale = rng.uniform(0.5, 2.0, classes).astype(np.float32)
    np.testing.assert_array_equal(decide(probs), probs.argmax(0))
    expected = (probs * scale.reshape(-1, 1, 1)).argmax(0)
    np.testing.assert_array_equal(decide(probs, list(scale)), expected)
    assert decide(probs).dtype == np.uint8


def test_the_local_dask_client_listens_on_loopback_only():
    import psutil

    from tiles.stitch import dask_client

    def listening() -> set[tuple[str, int]]:
        sockets = psutil.Process().net_connections(kind="tcp")
        return {(c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN}

    before = listening()
    with dask_client():
        opened = listening() - before
    assert opened and all(ip in ("127.0.0.1", "::1") for ip, _ in opened)  # before: 0.0.0.0:8787


def test_the_local_client_leaves_the_distributed_logger_as_it_was():
    """Quiet while geodnn's own client runs; a notebook's own cluster logs on afterwards."""
    logger = logging.getLogger("distributed")
    kept = logger.level
    logger.setLevel(logging.INFO)
    try:
        with dask_client():
            assert logger.level == logging.CRITICAL
        assert logger.level == logging.INFO
        first, second = dask_client(), dask_client()  # overlapping, the first closed first
        first.__enter__(), second.__enter__()
        first.__exit__(None, None, None)
        assert logger.level == logging.CRITICAL  # the second still runs
        second.__exit__(None, None, None)
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(kept)


def test_geodnn_s_clients_leave_dask_s_default_scheduler_as_it_was(make_geotiff):
    """Dask's Client sets itself up as the process's scheduler; geodnn's own (local, or one
    that failed to connect) must not: a notebook's next `.compute()` hung on the failed one,
    or raised for want of a client after two overlapping ones (stop 27's test-order failure)."""
    import dask
    import dask.array as da
    from distributed import Client, default_client

    before = dask.config.get("scheduler", None)
    with pytest.raises(TilesError), dask_client("tls://127.0.0.1:1"):
        pass
    first, second = dask_client(), dask_client()
    first.__enter__(), second.__enter__()
    first.__exit__(None, None, None), second.__exit__(None, None, None)
    assert dask.config.get("scheduler", None) == before
    assert int(da.ones(4, chunks=2).sum().compute()) == 4  # the user's own scheduler
    path = make_geotiff(np.random.default_rng(4).uniform(0, 9, (1, 40, 40)).astype(np.float32))

    def by_window(**kwargs) -> dict:
        found = stream_predictions(path, box_predictor, 2, chunk=16, **kwargs)
        return {(p.window.row_off, p.window.col_off): p.classes for p in found}

    expected = by_window()
    with Client(processes=False, n_workers=1, set_as_default=False) as client:  # not default
        with pytest.raises(ValueError):
            default_client()
        got = by_window(client=client)
    assert got.keys() == expected.keys() and len(got) == 9
    assert all(np.array_equal(got[k], expected[k]) for k in got)


def test_a_rerun_removes_what_a_killed_run_left_beside_its_outputs(tmp_path, monkeypatch):
    """kill -9 during predict stranded hidden temporaries (GBs of probabilities) that no rerun
    removed; a run writing the same output removes those no live process holds the lock of
    (without a lock file: those of dead processes on this host)."""
    import socket
    import subprocess
    import sys

    from tiles.scratch import hold_lock, release_lock
    from tiles.stitch import temp_path

    monkeypatch.setattr("tiles.scratch.LOCK_GRACE_S", 0.0)  # (aged lock files)
    ended = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(ended, capture_output=True, text=True, check=True).stdout.strip()
    final = tmp_path / "probs.tif"
    ours = temp_path(final)
    assert ours.name.startswith(f".probs.tmp-{socket.gethostname()}-{os.getpid()}-")
    killed = ours.with_name(ours.name.replace(f"-{os.getpid()}-", f"-{gone}-"))
    sidecars = [killed.with_name(killed.name + s) for s in (".ovr.tmp", ".aux.xml", ".lock")]
    alive = ours  # another run of this process (say a notebook's) still writing
    elsewhere = tmp_path / f".probs.tmp-other-host-{gone}-0badc0de.tif"  # a shared disk's
    unrelated = [tmp_path / ".probs.notes.txt", tmp_path / f".probsx.tmp-x-{gone}-0badc0de.tif"]
    # another output of the same stem (probs.gpkg beside probs.tif), written by a live run in
    # another container: its lock is not looked up under the .tif's name
    unrelated.append(killed.with_name(killed.name.removesuffix(".tif") + ".gpkg"))
    for path in (killed, *sidecars, alive, elsewhere, *unrelated):
        path.write_bytes(b"left")
    # a run in another container of the same host name (its own PIDs): its lock says it lives
    other = tmp_path / f".probs.tmp-{socket.gethostname()}-{gone}-0000beef.tif"
    other.write_bytes(b"live")
    other_lock = hold_lock(other)
    with AtomicOutputs() as outputs:
        new = outputs.reserve(final)
        assert new.with_name(new.name + ".lock").is_file()  # held while it is written
    release_lock(other_lock)
    assert not killed.exists() and not any(s.exists() for s in sidecars)
    assert alive.exists() and elsewhere.exists() and all(p.exists() for p in unrelated)
    assert other.exists()
    assert not new.with_name(new.name + ".lock").exists()  # released and removed at the end


def test_a_failed_write_is_one_line_naming_the_output_and_a_full_disk_says_so(
    tmp_path, monkeypatch
):
    """A full disk during predict gave rasterio's 'Write failed' traceback (exit 1): GDAL
    prints 'No space left on device' itself, so the space left tells a full disk."""
    import shutil

    from rasterio._err import CPLE_AppDefinedError
    from rasterio.errors import RasterioIOError

    from tiles.stitch import writing

    final = tmp_path / "probs.tif"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    full = r"^\S+probs.tif: the disk is full \(1 MB free\); free"
    with pytest.raises(OutputError, match=full), writing(final):
        raise RasterioIOError("Write failed. See previous exception for details.")
    with pytest.raises(OutputError, match="probs.tif: the disk is full"), writing(final):
        raise CPLE_AppDefinedError(1, 1, "TIFFAppendToStrip:Write error at scanline 512")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**40))
    failed = r"writing failed \(TIFFAppendToStrip:Write error at scanline 7\); check the disk"
    with pytest.raises(OutputError, match=failed), writing(final):
        try:
            raise CPLE_AppDefinedError(1, 1, "TIFFAppendToStrip:Write error at scanline 7")
        except CPLE_AppDefinedError as gdal:
            raise RasterioIOError("Write failed. See previous exception.") from gdal
    with pytest.raises(ValueError), writing(final):  # anything else is not a write failure
        raise ValueError("a bug")
    with pytest.raises(OutputError, match="disk is full"), writing(final, (sqlite3.Error,)):
        raise sqlite3.OperationalError("database or disk is full")  # the polygons' style
    monkeypatch.setattr(shutil, "disk_usage", lambda path: os.stat("/gone"))  # unmounted
    with (
        pytest.raises(
            OutputError, match=r"writing failed \(Write failed\); check the disk it is on$"
        ),
        writing(final),
    ):
        raise RasterioIOError("Write failed")
    # a store's chunk writes: the OSError says it (and the space left is after the clean-up)
    store = tmp_path / "tiles.zarr"
    said = r"tiles.zarr: the disk is full \(No space left"
    with pytest.raises(OutputError, match=said), writing(store, errors=()):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="Permission denied"), writing(store, errors=()):
        raise OSError(errno.EACCES, "Permission denied")  # the CLI's own line says it


def test_a_cluster_that_loses_work_or_cannot_see_the_scene_is_one_line(
    make_geotiff, tmp_path, monkeypatch
):
    """A worker dying with the model, or the scheduler going away, ended predict with Dask's
    traceback (exit 1); a scene the workers cannot see was called damaged; a tls:// address
    without TLS set up was a TypeError traceback."""
    from distributed.client import FutureCancelledError

    import tiles.stitch
    from tiles.stitch import predict_chunks

    def lost(*args, **kwargs):
        raise FutureCancelledError("chunk-1", "scheduler-connection-lost")
        yield

    monkeypatch.setattr(tiles.stitch, "_stream", lost)
    path = make_geotiff(np.ones((1, 40, 40), dtype=np.float32))
    with pytest.raises(TilesError, match=r"the local Dask client lost work in progress \(.*"):
        list(stream_predictions(path, box_predictor, 2, chunk=32))
    gone = str(tmp_path / "only-on-the-client.tif")
    [chunk] = list(ChunkGrid(40, 40, 64, 2))
    with pytest.raises(RasterInputError, match="not found on the Dask worker at .*every worker"):
        predict_chunks(gone, [chunk], box_predictor, client_pid=os.getpid() + 1)
    tls = r"cannot reach the Dask scheduler at tls://.*TypeError"
    with pytest.raises(TilesError, match=tls), dask_client("tls://127.0.0.1:1"):
        pass


def test_groups_cancelled_with_a_lost_model_are_sent_again(make_geotiff):
    """A worker that died held the model scattered to it: its groups were cancelled and the
    run ended (exit 1, then a one-line error); now they go again with the model re-sent."""
    from distributed import Future

    scene = np.random.default_rng(3).integers(0, 200, (1, 70, 90)).astype(np.float32)
    path = make_geotiff(scene)
    expected = {
        (p.window.row_off, p.window.col_off): p.classes
        for p in stream_predictions(path, box_predictor, 2, chunk=16)
    }
    with dask_client() as client:
        scattered, scatter = [], client.scatter
        client.scatter = lambda *a, **k: scattered.append(1) or scatter(*a, **k)
        got, lost = {}, False
        for prediction in stream_predictions(path, box_predictor, 2, chunk=16, client=client):
            if not lost:  # as if the worker holding the model died
                [model] = [k for k in client.futures if not str(k).startswith("predict_chunks")]
                client.cancel([Future(model, client=client)])
                lost = True
            got[(prediction.window.row_off, prediction.window.col_off)] = prediction.classes
    assert len(scattered) == 2  # the model went again, once
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
