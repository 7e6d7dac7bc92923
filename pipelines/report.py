"""The run report: metrics table, training curves, a prediction overlay and links to outputs.

Written as report.md (reads well in a repository) and report.html (opens in a browser), with
pictures as PNG files beside them. Reads rasters decimated, so it stays cheap for large scenes.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from rasterio.coords import BoundingBox
from rasterio.enums import Resampling

from tiles.raster import data_bands

from .io import atomic_write_text, save_figure

if TYPE_CHECKING:
    from .run import Pipeline

OVERVIEW_PIXELS = 1024


def display_bands(count: int) -> list[int]:
    """Bands shown for a scene of `count` bands: 1-3 as RGB, else band 1 in grey (two bands,
    e.g. SAR VV/VH, make no RGB picture)."""
    return [1, 2, 3] if count >= 3 else [1]


def read_overview(path: Path, bands: list[int] | None = None) -> tuple[np.ndarray, BoundingBox]:
    """A decimated read (longest side <= OVERVIEW_PIXELS) of `bands` (default: the displayed
    ones) and the raster's bounds, which the decimation keeps."""
    with rasterio.open(path) as src:
        scale = max(src.width, src.height) / OVERVIEW_PIXELS
        shape = (
            max(1, round(src.height / max(scale, 1))),
            max(1, round(src.width / max(scale, 1))),
        )
        bands = bands or display_bands(len(data_bands(src)))
        data = src.read(
            bands, out_shape=(len(bands), *shape), resampling=Resampling.nearest, masked=True
        )
        return data, src.bounds


def stretch(image: np.ma.MaskedArray) -> np.ndarray:
    """Per-band 2-98 % stretch to 0..1 for display; nodata shows black. (H, W) for grey (band 1
    of a 1- or 2-band image), (H, W, 3) RGB from the first three bands of more."""
    image = image[:3] if image.shape[0] >= 3 else image[:1]
    out = np.zeros(image.shape, dtype=np.float32)
    for b, band in enumerate(image):
        values = band.compressed()
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, [2, 98])
        out[b] = np.clip((band.filled(lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    return out[0] if out.shape[0] == 1 else np.moveaxis(out, 0, -1)


def overlay_png(p: Pipeline, path: Path) -> Path:
    """Scene with the predicted classes on top, and the validation region outlined."""
    from matplotlib.colors import ListedColormap

    from geodnn import load_checkpoint

    image, bounds = read_overview(p.input_path("image"))
    classes, _ = read_overview(p.folder.classes, [1])
    ckpt = load_checkpoint(p.folder.train_dir(p.config.solver) / "model.pt")
    colors = np.array(ckpt.class_colors, dtype=float) / 255
    extent = (bounds.left, bounds.right, bounds.bottom, bounds.top)
    from matplotlib.figure import Figure  # here: a command's start and --help skip matplotlib

    fig = Figure(figsize=(12, 6), layout="constrained")
    ax_img, ax_map = fig.subplots(1, 2)
    shown = stretch(image)
    for ax in (ax_img, ax_map):
        ax.imshow(shown, cmap="gray", extent=extent)
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.tick_params(labelsize=7)
    positive = np.ma.masked_where((classes[0] == 0) | np.ma.getmaskarray(classes[0]), classes[0])
    ax_map.imshow(
        positive,
        cmap=ListedColormap(colors),
        vmin=0,
        vmax=len(colors) - 1,
        extent=extent,
        alpha=0.6,
        interpolation="nearest",
    )
    outline_validation(ax_map, p)
    add_class_legend(ax_map, ckpt.class_names[1:], colors[1:])
    ax_img.set_title("scene")
    ax_map.set_title(f"predicted ({p.config.solver}); dashed: validation region")
    save_figure(fig, path, dpi=110)
    return path


def add_class_legend(ax, names: list[str], colors: np.ndarray) -> None:
    """Which colour is which mapped class (background is left transparent)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, alpha=0.6, label=n) for n, c in zip(names, colors)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def outline_validation(ax, p: Pipeline) -> None:
    """Dashed outline of the held-out region (nothing when the split keeps no validation)."""
    from .errors import PipelineError
    from .evaluate import region_box

    tile = p.config["tile"]
    with rasterio.open(p.input_path("image")) as src:
        shape, transform = (src.height, src.width), src.transform
    try:
        box = region_box(shape, tile["split"], tile["gap"], "validation")
    except PipelineError:
        return
    x0, y0 = rasterio.transform.xy(transform, box.row0, box.col0, offset="ul")
    x1, y1 = rasterio.transform.xy(transform, box.row1, box.col1, offset="ul")
    ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], "--", color="white", linewidth=1.5)


def read_curve(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def mapped_iou(row: dict[str, float], names: list[str]) -> float:
    """A metrics.csv row's IoU of the mapped classes (the one after background, or the mean of
    those validation saw), as the training progress bar shows it."""
    from .train import foreground_iou

    return foreground_iou([row.get(f"val_iou_{n}", math.nan) for n in names])


def comparison_png(curves: dict[str, list[dict]], path: Path, names: list[str]) -> Path:
    """Validation IoU of the mapped class (of several, their mean) per solver, against
    iterations and against time."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_it, ax_t = fig.subplots(1, 2)
    for solver, rows in curves.items():
        iou = [mapped_iou(r, names) for r in rows]
        ax_it.plot([r["iteration"] for r in rows], iou, marker=".", label=solver)
        ax_t.plot([r["elapsed_s"] for r in rows], iou, marker=".", label=solver)
    label = names[1] if len(names) == 2 else f"mean of {len(names) - 1} classes"
    ax_it.set(xlabel="iteration", ylabel=f"validation IoU ({label})", title="per iteration")
    ax_t.set(xlabel="seconds", ylabel=f"validation IoU ({label})", title="per wall-clock time")
    for ax in (ax_it, ax_t):
        ax.legend()
        ax.set_ylim(0, 1)
    save_figure(fig, path)
    return path


def score_text(value: float | None) -> str:
    """A score for a person; a class absent from labels and prediction (None in
    `SegmentationScores.to_dict`, NaN in metrics.csv) reads "absent"."""
    return "absent" if value is None or math.isnan(value) else f"{value:.3f}"


def metrics_rows(curves: dict[str, list[dict]], evaluation: dict) -> list[list[str]]:
    rows = []
    for solver, curve in curves.items():
        last = curve[-1] if curve else {}
        scores = evaluation[solver]
        rows.append(
            [solver]
            + [score_text(v) for v in scores["iou"].values()]
            + [score_text(v) for v in list(scores["f1"].values())[1:]]
            + [
                f"{scores['pixel_accuracy']:.3f}",
                f"{int(last.get('iteration', 0))}",
                f"{last.get('elapsed_s', 0):.0f}",
                f"{last.get('train_loss', float('nan')):.3f}",
            ]
        )
    return rows


def write_report(p: Pipeline) -> list[Path]:
    """report.md, report.html and their pictures; links only the outputs this config wrote."""
    root = p.folder.root
    evaluation = json.loads(p.folder.evaluation.read_text())
    names = list(evaluation[p.config.solver]["iou"])
    overlay = overlay_png(p, root / "overlay.png")
    curves = {s: read_curve(p.folder.train_dir(s) / "metrics.csv") for s in p.solvers}
    comparison = comparison_png(curves, root / "comparison.png", names)
    header = (
        ["solver"]
        + [f"IoU {n}" for n in names]
        + [f"F1 {n}" for n in names[1:]]
        + ["pixel accuracy", "iterations", "train seconds", "train loss"]
    )
    rows = metrics_rows(curves, evaluation)
    links = p.map_outputs() + [p.folder.train_dir(s) / "model.pt" for s in p.solvers]
    curve_pngs = [p.folder.train_dir(s) / "curves.png" for s in p.solvers]
    rel = [str(q.relative_to(root)) for q in links]
    md = markdown(
        p,
        header,
        rows,
        overlay.name,
        comparison.name,
        [str(c.relative_to(root)) for c in curve_pngs],
        rel,
    )
    atomic_write_text(root / "report.md", md)
    atomic_write_text(
        root / "report.html",
        to_html(p, header, rows, overlay.name, comparison.name, curve_pngs, rel, root),
    )
    return [root / "report.md", root / "report.html", overlay, comparison]


def markdown(
    p: Pipeline, header, rows, overlay: str, comparison: str, curves: list[str], links: list[str]
) -> str:
    lines = [
        f"# geodnn run: {p.config.path.stem}",
        "",
        f"Scene `{p.input_path('image')}`; labels `{p.input_path('labels')}`; spatial split "
        f"`{p.config['tile']['split']}` with a {p.config['tile']['gap']} px guard band. Scores are "
        "on the validation region only (held out from training, halos included).",
        "",
        "## Validation metrics",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "## Prediction",
        "",
        f"![prediction overlay]({overlay})",
        "",
        "## Training curves",
        "",
        f"![validation IoU per solver]({comparison})",
        "",
        *(f"![{c}]({c})" for c in curves),
        "",
        "## Outputs",
        "",
        *(f"- [{q}]({q})" for q in links),
        "",
    ]
    return "\n".join(lines)


def to_html(p: Pipeline, header, rows, overlay, comparison, curves, links, root: Path) -> str:
    esc = html.escape
    table = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n"
    table += "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    imgs = "".join(f'<img src="{esc(str(c.relative_to(root)))}" width="700">' for c in curves)
    items = "".join(f'<li><a href="{esc(q)}">{esc(q)}</a></li>' for q in links)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>geodnn run: {esc(p.config.path.stem)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
</style></head><body>
<h1>geodnn run: {esc(p.config.path.stem)}</h1>
<p>Scene <code>{esc(str(p.input_path("image")))}</code>; split
<code>{esc(p.config["tile"]["split"])}</code>, guard band {p.config["tile"]["gap"]} px.
Scores are on the held-out validation region.</p>
<h2>Validation metrics</h2><table>{table}</table>
<h2>Prediction</h2><img src="{esc(overlay)}" width="1100">
<h2>Training curves</h2><img src="{esc(comparison)}" width="900"><br>{imgs}
<h2>Outputs</h2><ul>{items}</ul>
</body></html>
"""
