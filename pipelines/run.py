"""`geodnn run PIPELINE.toml`: tile, train, evaluate, predict and export in one go.

Everything lands in one run folder (default runs/<config name>): the tile store, one training run
per solver, evaluation.json, the map (class map and probabilities as COGs, polygons as a styled
GeoPackage), an overlay picture and report.md / report.html. The run is idempotent: a step whose
inputs (config tables, input files) are unchanged and whose outputs exist is skipped, so a rerun
finishes at once and an interrupted run picks up where it stopped (`--force` redoes everything,
removing only what runs wrote: a user's files in the run folder stay; an --out that holds files
but no run is refused). A step is also redone when a step before it was, in this or an earlier
(interrupted) run:
a solver whose folder holds a finished run of the same training config is kept, an unfinished one
resumes, and outputs the config no longer asks for (solvers dropped from `compare` included) are
removed. A solver that diverges stops the run (exit code 3): lower its step size in the config
and rerun, which resumes it from its last good checkpoint (changed step sizes, stopping rules
and divergence factors retrain nothing: a finished solver is kept). Each solver trains
in one process (admm or adam); the pipeline baseline and [parallel] workers > 1 need
`geodnn train --workers N`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import sys
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geodnn.errors import DivergenceError
from geodnn.runtime import raise_if_stopped
from tiles.labels import split_layer
from tiles.scratch import IN_USE_SUFFIX
from tiles.warn import warn_user

from .cli import JOBS
from .config import OVERRIDE_FLAGS, SOLVERS, Config, load_config
from .errors import DamagedRunError, PipelineError
from .io import atomic_write_text, remove_if_empty
from .options import integer

log = logging.getLogger(__name__)

STEPS = ("tile", "train", "evaluate", "predict", "report")
STEP_TABLES = {
    "tile": ("scene", "tile"),
    "train": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline", "parallel"),
    "evaluate": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline"),
    "predict": ("scene", "tile", "data", "model", "train", "admm", "adam", "pipeline", "predict"),
    "report": tuple(),
}
RUN_SOLVERS = ("admm", "adam")  # solvers `geodnn run` trains (each in one process)
CONFIG_RECORD = "config"  # steps.json: the config file the folder was last run with


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

    @property
    def map_files(self) -> tuple[Path, ...]:
        """Every file the predict step may write: class map, probabilities, polygons, style."""
        return self.classes, self.probabilities, self.polygons, self.polygons.with_suffix(".qml")


@dataclass
class Pipeline:
    """A config and its run folder, with the bookkeeping that makes reruns cheap."""

    config: Config
    folder: RunFolder
    options: tuple[str, ...] = ()  # command-line overrides a rerun must repeat: --iterations N
    ran: set[str] = field(default_factory=set)  # the steps this process ran

    @property
    def rerun(self) -> str:
        """The command that reruns this pipeline into the same folder."""
        root, path = str(self.folder.root), str(self.config.path)
        return shlex.join(["geodnn", "run", path, "--out", root, *self.options])

    @property
    def solvers(self) -> list[str]:
        """The main solver, then each `compare` solver once."""
        return list(dict.fromkeys([self.config.solver, *self.config["train"]["compare"]]))

    def map_outputs(self, enabled: bool = True) -> list[Path]:
        """The map files [predict] asks for (`enabled`), or those it does not ask for."""
        opts = self.config["predict"]
        asked = (True, opts["probabilities"], opts["vectors"], opts["vectors"])
        return [path for path, on in zip(self.folder.map_files, asked) if bool(on) == enabled]

    def input_path(self, key: str) -> Path:
        value = self.config["scene"][key]
        path = self.config.resolve(value)
        if path is None:
            raise PipelineError(f"{self.config.path}: [scene] {key} is not set; add it")
        return path

    def fingerprint(self, step: str) -> str:
        """Hash of what the step depends on: its config tables, the input files' stat (with
        the sidecars that hold their data) and the records of the steps before it, so a step
        redone upstream (say, by a rerun interrupted before the report) makes it stale too."""
        tables = {t: self.config[t] for t in STEP_TABLES[step]}
        files = data_files(self.input_path("image"))
        if self.config["scene"]["labels"]:  # the file of FILE|layername=
            files += data_files(split_layer(self.input_path("labels"))[0])
        stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
        done = self.done()
        upstream = {s: done.get(s) for s in STEPS[: STEPS.index(step)]}
        blob = json.dumps(
            {"tables": tables, "files": stats, "upstream": upstream}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def done(self) -> dict:
        if not self.folder.steps.is_file():
            return {}
        return json.loads(self.folder.steps.read_text())

    def check_same_config(self) -> None:
        """Warn when the folder's last run was another config's, whose outputs this run replaces
        where the two differ (two configs sharing one --out did so without a word); the folder
        then belongs to this config."""
        done, here = self.done(), str(self.config.path.resolve())
        last = done.get(CONFIG_RECORD)
        if last and last != here:
            log.warning(
                "%s: last run with %s; this run with %s redoes the steps whose settings or "
                "inputs differ, replacing their outputs",
                self.folder.root,
                last,
                self.config.path,
            )
            done[CONFIG_RECORD] = here
            self._save(done)

    def mark(self, step: str, outputs: list[Path], seconds: float) -> None:
        done = self.done()
        done[CONFIG_RECORD] = str(self.config.path.resolve())
        done[step] = {
            "fingerprint": self.fingerprint(step),
            "outputs": [str(p.relative_to(self.folder.root)) for p in outputs],
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._save(done)

    def _save(self, done: dict) -> None:
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
        raise_if_stopped()  # a step a swallowed Ctrl-C went on through is not marked done
        self.mark(step, outputs, time.perf_counter() - started)
        self.ran.add(step)
        return True


# files beside an input that hold its data: a Shapefile's attributes (edited alone by QGIS),
# index, CRS and encoding; a GeoTIFF's external mask. Not .aux.xml: GIS tools rewrite it with
# statistics when they merely open a file.
SIDECARS = {".shp": (".dbf", ".shx", ".prj", ".cpg")}
SCENE_SIDECARS = (".msk",)  # appended to the whole name: image.tif.msk


def data_files(path: Path) -> list[Path]:
    """`path` and the sidecar files that hold part of its data."""
    beside = [path.with_suffix(ext) for ext in SIDECARS.get(path.suffix.lower(), ())]
    beside += [path.with_name(path.name + ext) for ext in SCENE_SIDECARS]
    return [path, *beside]


def check_solvers(config: Config) -> None:
    """Refuse, before any work starts, a solver `geodnn run` cannot train (it would fail only
    after the solvers before it had trained) and [parallel] workers it would not start."""
    compare = config["train"]["compare"]  # a list of known names (pipelines.config)
    for key, name in [("solver", config.solver), *(("compare", s) for s in compare)]:
        if name == "pipeline":
            raise PipelineError(
                f"{config.path}: [train] {key}: 'pipeline' needs several workers, which `geodnn "
                f"run` does not start; use {' or '.join(RUN_SOLVERS)} here and train the pipeline "
                f"with `geodnn train CONFIG --solver pipeline --workers N`"
            )
        if name not in RUN_SOLVERS:
            raise PipelineError(
                f"{config.path}: [train] {key}: unknown solver '{name}'; use "
                f"{' or '.join(RUN_SOLVERS)}"
            )
    workers = config["parallel"]["workers"]
    if workers != 1:
        raise PipelineError(
            f"{config.path}: [parallel] workers = {workers}, but `geodnn run` trains each solver "
            "in one process; set workers = 1, or train on several with `geodnn train CONFIG "
            f"--workers {workers}`"
        )


def check_split(config: Config) -> None:
    """[tile] split, checked before any work, naming the config: `geodnn run` evaluates on the
    validation region, so a split that leaves none (fraction 1) fails only after tiling."""
    from tiles.errors import TilesError
    from tiles.split import parse_split

    tile = config["tile"]
    try:
        spec = parse_split(tile["split"], tile["gap"])
    except TilesError as exc:
        raise PipelineError(f"{config.path}: [tile] {exc}") from None
    if spec.fraction >= 1.0:
        raise PipelineError(
            f"{config.path}: [tile] split = '{tile['split']}' leaves no validation region, "
            "which geodnn run scores; use a fraction below 1 (e.g. columns:0.7)"
        )


def check_chunk(config: Config) -> None:
    """[predict] chunk against the configured model's receptive radius, before any work: a
    chunk that cannot hold it failed only at evaluation, after tiling and training."""
    from geodnn.model import ChainConfig

    try:
        radius = ChainConfig(bands=1, classes=2, **config["model"]).receptive_radius
    except (TypeError, ValueError):
        return  # the model's own check says what is wrong with [model], at training
    chunk = config["predict"]["chunk"]
    if chunk < radius:
        raise PipelineError(
            f"{config.path}: [predict] chunk = {chunk} cannot hold the model's receptive radius "
            f"of {radius} px (depth {config['model']['depth']}); set [predict] chunk to "
            f"{max(4 * radius, 512)} or so (at least {radius})"
        )


def step_tile(p: Pipeline) -> list[Path]:
    from .tile import build_store
    from .train import clear_run_dir

    scene, tile = p.config["scene"], p.config["tile"]
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
    for run_dir in p.folder.root.glob("train-*"):  # trained on the old store: never reuse them
        clear_run_dir(run_dir)
    return [p.folder.store]


def training_config(p: Pipeline, solver: str) -> Config:
    """The config of one solver's training run: the run's store, that solver, no compare list."""
    tables = {name: dict(values) for name, values in p.config.tables.items()}
    tables["data"]["store"] = str(p.folder.store)
    tables["train"]["solver"] = solver
    tables["train"]["compare"] = []  # the pipeline's list; one training run trains one solver
    return Config(path=p.config.path, tables=tables)


def training_tables(text: str, solver: str) -> dict | None:
    """The tables of a config.toml that shape `solver`'s model (not [predict], not the other
    solvers' tables), or None when the text is not TOML."""
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    keep = set(STEP_TABLES["train"]) - (set(SOLVERS) - {solver})
    return {name: values for name, values in tables.items() if name in keep}


def train_mode(config: Config, run_dir: Path) -> tuple[str, list[str]]:
    """'done' when `run_dir` holds a finished run of this training config, 'resume' when it holds
    an unfinished one, else 'new' (what is there is replaced); with the tuned settings.

    Settings `geodnn train --resume` may tune (RESUME_MAY_TUNE: step sizes, stopping rules,
    divergence factors; returned as "[table] key") do not make another run: an unfinished run
    resumes with them (so lowering [adam] lr after a divergence continues from the last good
    checkpoint), and a finished run is kept. They are the knobs of a recovery, some shared by all
    solvers ([train] divergence_factor): turning one to rescue a solver must not throw away
    another that trained well; to train a finished solver again with them, remove its
    train-SOLVER folder. Any other change retrains."""
    from .train import RESUME_MAY_TUNE, changed_settings, config_as_run, has_state

    saved = saved_training_tables(run_dir, config.solver)
    if saved is None:
        return "new", []
    changed = changed_settings(saved, training_tables(config_as_run(config), config.solver))
    if not changed <= RESUME_MAY_TUNE:
        return "new", []
    tuned = [f"[{t}] {k}" for t, k in sorted(changed)]
    if (run_dir / "model.pt").is_file():
        return "done", tuned
    return ("resume" if has_state(run_dir) else "new"), tuned


def saved_training_tables(run_dir: Path, solver: str) -> dict | None:
    """The training tables of the config.toml in `run_dir`; None when it is missing or
    unreadable (what is there is then replaced)."""
    saved = run_dir / "config.toml"
    if not saved.is_file():
        return None
    try:
        return training_tables(saved.read_text(), solver)
    except (OSError, UnicodeDecodeError):
        return None


def step_train(p: Pipeline) -> list[Path]:
    with warnings.catch_warnings():
        if "tile" in p.ran:  # the store's build warned of its classes without training pixels
            warnings.filterwarnings("ignore", message=r".*have no training pixels")
        outputs = [train_solver(p, solver) for solver in p.solvers]
    remove_dropped_solvers(p)
    return outputs


def train_solver(p: Pipeline, solver: str) -> Path:
    """Train `solver` in its folder, resume it there or keep its finished run (`train_mode`);
    returns its model.pt."""
    from .train import train

    config, run_dir = training_config(p, solver), p.folder.train_dir(solver)
    mode, tuned = train_mode(config, run_dir)
    if mode == "done" and tuned:
        log.warning(
            "train %s: %s holds a finished run, kept; changed settings (%s) apply to unfinished "
            "training only: remove the folder to train %s again with them",
            solver,
            run_dir,
            ", ".join(tuned),
            solver,
        )
    elif mode == "done":
        log.info("train %s: %s holds a finished run of this config, kept", solver, run_dir)
    else:
        try:
            train(config, run_dir, resume=mode == "resume", overwrite=mode == "new")
        except DivergenceError as exc:
            raise run_divergence(p, solver, exc) from exc
        except DamagedRunError as exc:  # `geodnn run` has no --overwrite: its own fix
            fix = f"restore the file, or remove {run_dir} to train {solver} again"
            raise DamagedRunError(exc.path, exc.what, fix) from exc
    return run_dir / "model.pt"


def run_divergence(p: Pipeline, solver: str, exc: DivergenceError) -> DivergenceError:
    """`geodnn train`'s divergence with the fix that works in `geodnn run`, which has no
    --resume: a rerun resumes the solver by itself (`train_mode`)."""
    from .train import STEP_SIZE_FIX, has_state

    run_dir = p.folder.train_dir(solver)
    then = "continues it from its last good checkpoint" if has_state(run_dir) else "starts it again"
    fix = f"{STEP_SIZE_FIX[solver]} in {p.config.path} and rerun `{p.rerun}`, which {then}"
    return DivergenceError(f"{run_dir}: {exc.diagnosis}", fix)


def remove_dropped_solvers(p: Pipeline) -> None:
    """Remove the train-SOLVER folders of solvers the config no longer trains (dropped from
    `compare`): only the files a training run writes, then the folder if nothing else is in it."""
    from .train import clear_run_dir

    for solver in RUN_SOLVERS:
        run_dir = p.folder.train_dir(solver)
        if solver in p.solvers or not run_dir.is_dir():
            continue
        clear_run_dir(run_dir)
        if remove_if_empty(run_dir):
            log.info("train %s: removed %s (the config no longer trains it)", solver, run_dir)
        else:
            log.warning(
                "%s: removed the training run (no longer asked for), kept your files", run_dir
            )


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
    for stale in p.map_outputs(enabled=False):  # an earlier run's, which this config turned off
        stale.unlink(missing_ok=True)
    return p.map_outputs()


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


def check_run_folder(folder: RunFolder) -> None:
    """Refuse an --out that holds files but no run: a run would overwrite and --force remove
    them (report.md, map/classes.tif, ... are common names)."""
    if folder.root.is_dir() and not folder.steps.is_file() and _holds_files(folder.root):
        raise PipelineError(
            f"{folder.root}: holds files but no geodnn run (no steps.json); pick an empty or "
            "new --out"
        )


def _holds_files(root: Path) -> bool:
    """Whether `root` holds anything but lock files its stores' readers left (no one's data:
    `tiles.scratch.using`)."""
    return any(not p.name.endswith(IN_USE_SUFFIX) for p in root.iterdir())


def clear_run_folder(folder: RunFolder) -> None:
    """Remove what an earlier `geodnn run` wrote, and only that: files a user put in the run's
    train-* or map folders stay (as when `compare` drops a solver)."""
    from tiles.store import replacing  # imported when needed, as .train is

    from .train import clear_run_dir

    for pattern in RUN_OUTPUTS:
        for path in folder.root.glob(pattern):
            if path.name.startswith("train-") and path.is_dir():
                clear_run_dir(path)
            elif path == folder.map_dir and path.is_dir():
                for output in folder.map_files:  # and GDAL's sidecar of each
                    output.unlink(missing_ok=True)
                    output.with_name(output.name + ".aux.xml").unlink(missing_ok=True)
            elif path == folder.store:  # unless a training reads it; its lock file goes too
                with replacing(path):
                    shutil.rmtree(path)
                continue
            else:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                continue
            if not remove_if_empty(path):
                log.warning("%s: removed the run's files, kept yours", path)


def run_pipeline(
    config: Config, run_dir: Path, force: bool = False, options: tuple[str, ...] = ()
) -> Pipeline:
    """Run every step that is not already up to date; return the finished pipeline. `options`:
    the command-line overrides in `config`, which the rerun an error suggests must repeat."""
    check_solvers(config)
    check_split(config)
    check_chunk(config)
    if config["data"]["store"]:
        warn_user(
            f"{config.path}: [data] store is not used by `geodnn run`, which tiles [scene] "
            "image into a store of its own; to train on existing stores use `geodnn train`"
        )
    run_dir = Path(run_dir).resolve()  # config paths resolve against the config's folder
    check_run_folder(RunFolder(run_dir))
    from .train import holding_run

    pipeline = Pipeline(config, RunFolder(run_dir), options)
    image = pipeline.input_path("image")  # set and there, before a run folder is made
    if not config["scene"]["labels"]:
        raise PipelineError(f"{config.path}: [scene] labels is not set; training needs labels")
    if not image.exists():
        raise PipelineError(f"{image}: scene not found; check [scene] image in {config.path}")
    with holding_run(run_dir):  # a second `geodnn run` here removed the first's temporaries
        if force and run_dir.exists():
            clear_run_folder(RunFolder(run_dir))
        run_dir.mkdir(parents=True, exist_ok=True)
        pipeline.check_same_config()
        ran = False
        for step in STEPS:
            ran = pipeline.run_step(step, lambda step=step: ACTIONS[step](pipeline), ran) or ran
    return pipeline


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=JOBS["run"], description=__doc__)
    p.add_argument("config", type=Path, help="pipeline TOML (see pipelines/configs/)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    p.add_argument("--force", action="store_true", help="redo every step from scratch")
    p.add_argument("--iterations", type=integer, help="override [train] iterations")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, {"train": {"iterations": args.iterations}}, OVERRIDE_FLAGS)
    run_dir = args.out or Path("runs") / config.path.stem
    options = ("--iterations", str(args.iterations)) if args.iterations is not None else ()
    try:
        pipeline = run_pipeline(config, run_dir, force=args.force, options=options)
    except DivergenceError as exc:  # exit code 3, as `geodnn train`
        print(f"geodnn: error: {exc}", file=sys.stderr)
        return 3
    print(f"done: {pipeline.folder.root / 'report.html'}")
    return 0
