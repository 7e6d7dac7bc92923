"""`geodnn tile SCENE.tif --labels LABELS --out STORE.zarr`: build the training tile store.

Thin job over `tiles.store.build_store`: parses the split, shows a progress bar over tiles and
reports what was written. See tiles/store.py for the store layout and tiles/split.py for the split.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from tiles.progress import progress_bar
from tiles.raster import bounded_block_cache
from tiles.split import DEFAULT_GAP, DEFAULT_SPLIT, DEFAULT_TILE, parse_split
from tiles.stitch import writing
from tiles.store import TileStore
from tiles.store import build_store as _build_store

from .arguments import flag, names, text, whole
from .cli import JOBS
from .options import non_negative_int, positive_int

log = logging.getLogger(__name__)


def build_store(
    scene: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    tile: int = DEFAULT_TILE,
    split: str = DEFAULT_SPLIT,
    gap: int = DEFAULT_GAP,
    class_attribute: str | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Build the tile store of `scene` and `labels` at `out`; return its absolute path.

    `split` is `columns:F` or `rows:F` (training = the first fraction F), `gap` the guard band in
    pixels between the regions (>= the model's receptive radius keeps halos apart).
    """
    tile, gap = whole("tile", tile, 1), whole("gap", gap, 0)
    spec = parse_split(text("split", split, "columns:0.7"), gap)
    class_names = names("class_names", class_names)
    overwrite, progress = flag("overwrite", overwrite), flag("progress", progress)
    bars: list[tqdm] = []

    def start(total: int) -> None:
        bars.append(progress_bar(total, "tiles", "tile", progress))  # in a log file too

    try:
        with bounded_block_cache(), writing(Path(out), errors=()):  # (a full disk: one line)
            return _build_store(
                scene,
                labels,
                out,
                tile=tile,
                split=spec,
                class_attribute=class_attribute,
                class_names=class_names,
                overwrite=overwrite,
                progress=lambda n: bars[0].update(n),
                on_start=start,
            )
    finally:
        for bar in bars:
            bar.close()


def run(args: argparse.Namespace) -> int:
    out = build_store(
        args.scene,
        args.labels,
        args.out,
        tile=args.tile,
        split=args.split,
        gap=args.gap,
        class_attribute=args.class_attribute,
        class_names=args.class_names,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    store = TileStore.open(out)
    per_split = store.attrs["tiles_per_split"]
    counts = ", ".join(
        f"{name} {n}" for name, n in zip(store.class_names, store.class_pixel_counts.tolist())
    )
    log.info(
        "wrote %s: %d band(s), %d train + %d validation tiles of %d px; training pixels per "
        "class: %s",
        out,
        store.bands,
        per_split["train"],
        per_split["validation"],
        store.tile_size,
        counts,
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tile",
        help=JOBS["tile"],
        description="Cut a GeoTIFF scene and its labels into a Zarr tile store with a spatial "
        "train/validation split and per-band statistics of the training region.",
    )
    parser.add_argument("scene", help="the GeoTIFF scene")
    parser.add_argument(
        "--labels",
        required=True,
        help="vector labels (GeoJSON, GeoPackage, Shapefile; any CRS; one layer of a multi-layer "
        "file as FILE|layername=LAYER) or a class mask GeoTIFF",
    )
    parser.add_argument("--out", required=True, help="the store to write (e.g. STORE.zarr)")
    tile, split, gap = DEFAULT_TILE, DEFAULT_SPLIT, DEFAULT_GAP
    parser.add_argument("--tile", type=positive_int, default=tile, help=f"tile size in px ({tile})")
    parser.add_argument(
        "--split",
        default=split,
        help=f"columns:F or rows:F: the first fraction F trains, the rest validates ({split})",
    )
    parser.add_argument(
        "--gap",
        type=non_negative_int,
        default=gap,
        help=f"guard band in px between the regions ({gap}); use >= the model's receptive "
        "radius (61 for the default depth 16; geodnn train warns when it is narrower)",
    )
    parser.add_argument(
        "--class-attribute",
        default=None,
        help="vector attribute holding the class (default: every feature is one class)",
    )
    parser.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="a name for each class id, background first (default: the attribute's values, "
        "'value N' for a mask's, or the label file's name for one class); they name the "
        "classes in metrics, maps and polygons",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
