"""Seam-free streaming prediction: throughput against the bare model, memory against scene size.

(a) throughput_ratio: `geodnn predict`'s megapixels/s (read, Dask tasks, softmax, argmax, tiled
    deflate GeoTIFF written by the single writer) over the bare model's megapixels/s
    (`model.forward_valid` on the same chunks, held in memory, no I/O), same pixels, same torch
    threads. Target >= 0.8.
(b) peak_rss_ratio_16k_vs_2k: peak RSS of a fresh `predict_scene` process on synthetic 2k x 2k,
    8k x 8k and 16k x 16k scenes the benchmark writes (tiny model: the point is that memory does
    not grow with the scene). Target <= 1.25.
(c) max_abs_diff: chunked vs whole-image probabilities on the shared Atlanta scene (chunk 128).

    python benchmarks/predict.py            # full: depth-16 width-16 model, 3072^2 scene for (a)
    python benchmarks/predict.py --quick    # about a minute: depth-8 width-16, 1536^2 for (a)
Throughput is the best of 3 interleaved runs per side, since the machine may be
shared; the memory scenes (b) are the same in both modes.
The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (1)")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs, on both sides (the README's figures are on the CPU)",
    )
    return p.parse_args()


args = parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)  # every thread, Dask workers included
# GDAL's block cache is not set here: predict_scene bounds it per run, as users get it.

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import torch  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from geodnn import Checkpoint, build_model, save_checkpoint  # noqa: E402
from geodnn.runtime import retain_freed_memory, wait_for_device  # noqa: E402
from pipelines.predict import ModelPredictor, iter_predictions, predict_scene  # noqa: E402
from tiles.grid import ChunkGrid, read_chunk  # noqa: E402
from tiles.raster import read_window  # noqa: E402

torch.set_num_threads(args.threads)
retain_freed_memory()  # as `geodnn predict` does, for both sides (process-wide)


def write_synthetic(path: Path, size: int, seed: int = 0, block: int = 1024) -> Path:
    """A size x size uint8 scene (smooth structure plus noise), written window by window from
    one precomputed block, rolled differently per window so windows differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:block, 0:block]
    base = 120 + 60 * np.sin(x / 37.0) * np.cos(y / 53.0) + rng.normal(0, 12, (block, block))
    base = base.clip(0, 255).astype(np.uint8)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                   crs="EPSG:32616", transform=from_origin(500000, 4000000, 0.5, 0.5),
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   BIGTIFF="IF_SAFER")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                h, w = min(block, size - row), min(block, size - col)
                shift = tuple(int(v) for v in rng.integers(0, block, 2))
                tile = np.roll(base, shift, axis=(0, 1))[:h, :w]
                dst.write(tile[None], window=Window(col, row, w, h))
    return path


def throughput_model(quick: bool):
    depth, width = (8, 16) if quick else (16, 16)
    model = build_model(1, 2, depth=depth, width=width, seed=0)
    model.set_normalization([120.0], [45.0])
    return model, {"depth": depth, "width": width, "receptive_radius": model.receptive_radius}


def bare_forward_seconds(model, chunks: list[np.ndarray]) -> float:
    """model.forward_valid over the pipeline's chunks, already in memory (on a GPU: copied
    there, as the pipeline's are, and waited for)."""
    device = model.band_mean.device
    start = time.perf_counter()
    with torch.no_grad():
        for x in chunks:
            model.forward_valid(torch.from_numpy(x[None]).to(device))
    wait_for_device(device)
    return time.perf_counter() - start


def measure_throughput(tmp: Path, quick: bool, chunk: int) -> dict:
    """Best of `repeats` interleaved runs of each side (the machine may be shared)."""
    model, info = throughput_model(quick)
    size, repeats = (1536, 3) if quick else (3072, 3)
    scene = write_synthetic(tmp / "throughput.tif", size, seed=1)
    ckpt_path = tmp / "throughput.pt"
    save_checkpoint(model, ckpt_path)
    with rasterio.open(scene) as src:
        grid = ChunkGrid(src.height, src.width, chunk, model.receptive_radius)
        chunks = [read_chunk(src, c) for c in grid]
    warm = write_synthetic(tmp / "warm.tif", 96)  # imports, Dask start, allocator, kernels
    predict = {"chunk": chunk, "overwrite": True, "device": args.device}
    predict_scene(ckpt_path, warm, tmp / "warm_classes.tif", **predict)
    model.to(args.device)
    bare_forward_seconds(model, chunks[:1])
    bare, pipeline = [], []
    for _ in range(repeats):
        bare.append(bare_forward_seconds(model, chunks))
        start = time.perf_counter()
        predict_scene(ckpt_path, scene, tmp / "classes.tif", **predict)
        pipeline.append(time.perf_counter() - start)
    mpx = size * size / 1e6
    return {
        "model": info,
        "scene_pixels": size * size,
        "bare_forward_mpx_s": round(mpx / min(bare), 3),
        "pipeline_mpx_s": round(mpx / min(pipeline), 3),
        "throughput_ratio": round(min(bare) / min(pipeline), 3),
        "throughput_runs_s": {
            "bare": [round(t, 2) for t in bare],
            "pipeline": [round(t, 2) for t in pipeline],
        },
    }


CHILD = """
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from geodnn.runtime import retain_freed_memory
from pipelines.predict import predict_scene
retain_freed_memory()  # as `geodnn predict` does
start = time.perf_counter()
predict_scene(sys.argv[1], sys.argv[2], sys.argv[3], chunk=int(sys.argv[5]), overwrite=True,
              device=sys.argv[6])
import psutil
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over the fork)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
peak = int(hwm[0].split()[1]) / 1024 if hwm else usage
print(json.dumps({"peak_rss_mb": peak,
                  "end_rss_mb": psutil.Process().memory_info().rss / 2**20,
                  "seconds": time.perf_counter() - start}))
"""


def measure_memory(tmp: Path, chunk: int, threads: int) -> dict:
    model = build_model(1, 2, depth=0, width=2, seed=0)
    model.set_normalization([120.0], [45.0])
    ckpt = tmp / "tiny.pt"
    save_checkpoint(model, ckpt)
    result = {}
    for size in (2048, 8192, 16384):
        scene = write_synthetic(tmp / f"scene_{size}.tif", size, seed=size)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ckpt), str(scene), str(tmp / "rss.tif"),
             str(threads), str(chunk), args.device],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )  # fmt: skip
        child = json.loads(out.stdout.strip().splitlines()[-1])
        result[f"{size // 1024}k"] = {k: round(v, 1) for k, v in child.items()}
        scene.unlink()
    return result


def measure_seams() -> dict:
    model, _ = throughput_model(True)
    path = DATA / "atlanta-buildings" / "image.tif"
    with rasterio.open(path) as src:
        scene = read_window(src, Window(0, 0, src.width, src.height))
    model.set_normalization(np.nanmean(scene, axis=(1, 2)), np.nanstd(scene, axis=(1, 2)))
    r = model.receptive_radius
    padded = np.pad(scene, ((0, 0), (r, r), (r, r)), mode="reflect")
    whole = ModelPredictor(model, args.device)(padded[None])[0]
    valid = ~np.isnan(scene).all(axis=0)
    worst, mismatches = 0.0, 0
    for p in iter_predictions(Checkpoint(model), path, chunk=128, device=args.device):
        w = p.window
        rs, cs = slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width)
        ok = valid[rs, cs]
        if p.probabilities is None:
            continue
        worst = max(worst, float(np.abs(p.probabilities - whole[:, rs, cs])[:, ok].max()))
        mismatches += int((p.classes != whole[:, rs, cs].argmax(0))[ok].sum())
    return {"max_abs_diff": worst, "class_mismatches": mismatches}


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geodnn-bench-") as folder:
        tmp = Path(folder)
        throughput = measure_throughput(tmp, args.quick, args.chunk)
        print("throughput", json.dumps(throughput), flush=True)
        memory = measure_memory(tmp, args.chunk, args.threads)
        print("memory", json.dumps(memory), flush=True)
    seams = measure_seams()
    print("seams", json.dumps(seams), flush=True)
    summary = {
        "benchmark": "predict",
        "mode": "quick" if args.quick else "full",
        "threads": args.threads,
        "chunk": args.chunk,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        **throughput,
        "memory_model": {"depth": 0, "width": 2, "receptive_radius": 1},
        "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in memory.items()},
        "end_rss_mb": {k: v["end_rss_mb"] for k, v in memory.items()},
        "predict_seconds": {k: v["seconds"] for k, v in memory.items()},
        "peak_rss_ratio_16k_vs_2k": round(
            memory["16k"]["peak_rss_mb"] / memory["2k"]["peak_rss_mb"], 3
        ),
        **seams,
        "seam_scene": "atlanta-buildings 900x900, chunk 128",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
