"""`geodnn run PIPELINE.toml`: tile, train, evaluate, predict and export in one go.

Everything lands in one run folder (default runs/<config name>): the tile store, one training run
per solver, evaluation.json, the map (class map and probabilities as COGs, polygons as a styled
GeoPackage), an overlay picture and report.md / report.html. The run is idempotent: a step whose
inputs (config tables, input files) are unchanged and whose outputs exist is skipped, so a rerun
finishes at once and an interrupted run picks up where it stopped (`--force` redoes everything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config
from .errors import PipelineError
from .io import atomic_write_text

log = logging.getLogger(__name__)

STEPS = ("tile", "train", "evaluate", "predict", "report")
STEP_TABLES = {
    "tile": ("scene", "tile"),
    "train": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline", "parallel"),
    "evaluate": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline"),
    "predict": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline", "predict"),
    "report": tuple(),
}


@dataclass
class RunFolder:
    """Paths inside one pipeline run folder."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "tiles.zarr"

    def train_dir(self, solver: str) -> Path:
        return self.root / f"train-{solver}"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def map_dir(self) -> Path:
        return self.root / "map"

    @property
    def classes(self) -> Path:
        return self.map_dir / "classes.tif"

    @property
    def probabilities(self) -> Path:
        return self.map_dir / "probabilities.tif"

    @property
    def polygons(self) -> Path:
        return self.map_dir / "polygons.gpkg"

    @property
    def steps(self) -> Path:
        return self.root / "steps.json"


@dataclass
class Pipeline:
    """A config and its run folder, with the bookkeeping that makes reruns cheap."""

    config: Config
    folder: RunFolder

    @property
    def solvers(self) -> list[str]:
        main = self.config.solver
        return [main] + [s for s in self.config["train"]["compare"] if s != main]

    def input_path(self, key: str) -> Path:
        value = self.config["scene"][key]
        path = self.config.resolve(value)
        if path is None:
            raise PipelineError(f"{self.config.path}: [scene] {key} is not set; add it")
        return path

    def fingerprint(self, step: str) -> str:
        """Hash of what the step depends on: its config tables and the input files' stat."""
        tables = {t: self.config[t] for t in STEP_TABLES[step]}
        files = [self.input_path("image")]
        if self.config["scene"]["labels"]:
            files.append(self.input_path("labels"))
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
        blob = json.dumps({"tables": tables, "files": stats}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def done(self) -> dict:
        if not self.folder.steps.is_file():
            return {}
        return json.loads(self.folder.steps.read_text())

    def mark(self, step: str, outputs: list[Path], seconds: float) -> None:
        done = self.done()
        done[step] = {
            "fingerprint": self.fingerprint(step),
            "outputs": [str(p.relative_to(self.folder.root)) for p in outputs],
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.folder.steps, json.dumps(done, indent=2) + "\n")

    def is_current(self, step: str) -> bool:
        entry = self.done().get(step)
        if not entry or entry["fingerprint"] != self.fingerprint(step):
            return False
        return all((self.folder.root / p).exists() for p in entry["outputs"])

    def run_step(self, step: str, action: Callable[[], list[Path]], upstream_ran: bool) -> bool:
        """Run `step` unless it and everything before it are up to date; True if it ran."""
        if not upstream_ran and self.is_current(step):
            log.info("step %s: up to date, skipped (--force redoes it)", step)
            return False
        log.info("step %s: running", step)
        started = time.perf_counter()
        outputs = action()
        self.mark(step, outputs, time.perf_counter() - started)
        return True


def step_tile(p: Pipeline) -> list[Path]:
    from .tile import build_store

    scene, tile = p.config["scene"], p.config["tile"]
    if not scene["labels"]:
        raise PipelineError(f"{p.config.path}: [scene] labels is not set; training needs labels")
    build_store(
        p.input_path("image"),
        p.input_path("labels"),
        p.folder.store,
        tile=tile["tile"],
        split=tile["split"],
        gap=tile["gap"],
        class_attribute=scene["class_attribute"],
        class_names=scene["class_names"],
        overwrite=True,
        progress=True,
    )
    return [p.folder.store]


def training_config(p: Pipeline, solver: str) -> Config:
    tables = {name: dict(values) for name, values in p.config.tables.items()}
    tables["data"]["store"] = str(p.folder.store)
    tables["train"]["solver"] = solver
    return Config(path=p.config.path, tables=tables)


def step_train(p: Pipeline) -> list[Path]:
    from .train import has_state, train

    outputs = []
    for solver in p.solvers:
        run_dir = p.folder.train_dir(solver)
        resume = has_state(run_dir) and not (run_dir / "model.pt").is_file()
        result = train(training_config(p, solver), run_dir, resume=resume, overwrite=not resume)
        outputs.append(result.checkpoint)
    return outputs


def step_evaluate(p: Pipeline) -> list[Path]:
    from .evaluate import evaluate_scene

    tile = p.config["tile"]
    results = {}
    for solver in p.solvers:
        evaluation = evaluate_scene(
            p.folder.train_dir(solver) / "model.pt",
            p.input_path("image"),
            p.input_path("labels"),
            class_attribute=p.config["scene"]["class_attribute"],
            split=tile["split"],
            gap=tile["gap"],
            region="validation",
            chunk=p.config["predict"]["chunk"],
        )
        results[solver] = evaluation.to_dict()
    atomic_write_text(p.folder.evaluation, json.dumps(results, indent=2) + "\n")
    return [p.folder.evaluation]


def step_predict(p: Pipeline) -> list[Path]:
    from .predict import predict_scene

    opts = p.config["predict"]
    p.folder.map_dir.mkdir(parents=True, exist_ok=True)
    predict_scene(
        p.folder.train_dir(p.config.solver) / "model.pt",
        p.input_path("image"),
        p.folder.classes,
        probabilities=p.folder.probabilities if opts["probabilities"] else None,
        vectors=p.folder.polygons if opts["vectors"] else None,
        cog=opts["cog"],
        chunk=opts["chunk"],
        batch=opts["batch"],
        min_area=opts["min_area"],
        simplify=opts["simplify"],
        device=p.config["train"]["device"],
        overwrite=True,
        progress=True,
    )
    return [p for p in (p.folder.classes, p.folder.probabilities, p.folder.polygons) if p.exists()]


def step_report(p: Pipeline) -> list[Path]:
    from .report import write_report

    return write_report(p)


ACTIONS = {
    "tile": step_tile,
    "train": step_train,
    "evaluate": step_evaluate,
    "predict": step_predict,
    "report": step_report,
}


RUN_OUTPUTS = (
    "tiles.zarr",
    "train-*",
    "map",
    "evaluation.json",
    "overlay.png",
    "comparison.png",
    "report.md",
    "report.html",
    "steps.json",
)


def clear_run_folder(folder: RunFolder) -> None:
    """Remove what an earlier `geodnn run` wrote; refuse a folder that is not a run folder."""
    if not folder.steps.is_file() and any(folder.root.iterdir()):
        raise PipelineError(
            f"{folder.root}: not a geodnn run folder (no steps.json); --force only clears run "
            "folders: pick another --out"
        )
    for pattern in RUN_OUTPUTS:
        for path in folder.root.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_pipeline(config: Config, run_dir: Path, force: bool = False) -> Pipeline:
    """Run every step that is not already up to date; return the finished pipeline."""
    run_dir = Path(run_dir).resolve()  # config paths resolve against the config's folder
    if force and run_dir.exists():
        clear_run_folder(RunFolder(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(config, RunFolder(run_dir))
    pipeline.input_path("image")
    ran = False
    for step in STEPS:
        ran = pipeline.run_step(step, lambda step=step: ACTIONS[step](pipeline), ran) or ran
    return pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="tile, train, evaluate, predict and export in one go", description=__doc__
    )
    p.add_argument("config", type=Path, help="pipeline TOML (see pipelines/configs/)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    p.add_argument("--force", action="store_true", help="redo every step from scratch")
    p.add_argument("--iterations", type=int, help="override [train] iterations")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, {"train": {"iterations": args.iterations}})
    run_dir = args.out or Path("runs") / config.path.stem
    pipeline = run_pipeline(config, run_dir, force=args.force)
    print(f"done: {pipeline.folder.root / 'report.html'}")
    return 0
