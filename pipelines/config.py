"""Job configs: one TOML file describes a scene, its tiling, the model, training and prediction.

`geodnn train` reads [data], [model], [train] and the solver tables; `geodnn run` reads all of it.
Relative paths in a config are relative to the config file, so a config travels with its data.
Every key and its default is listed in `DEFAULTS` and documented in pipelines/configs/*.toml.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tiles.split import DEFAULT_GAP, DEFAULT_SPLIT, DEFAULT_TILE

from .device import DEVICES
from .errors import PipelineError

SOLVERS = ("admm", "adam", "pipeline")

DEFAULTS: dict[str, dict[str, Any]] = {
    # The scene to map and its labels (used by `geodnn run`, which builds the tile store itself).
    "scene": {"image": None, "labels": None, "class_attribute": None, "class_names": None},
    # How `geodnn run` tiles the scene (see `geodnn tile --help`).
    "tile": {"tile": DEFAULT_TILE, "split": DEFAULT_SPLIT, "gap": DEFAULT_GAP},
    # Training data: a tile store made by `geodnn tile` (or a list of them, one per scene, all
    # of one model's bands, classes and tile size), and the crop size drawn from its tiles.
    # calibrate_tiles: training tiles on which each checkpoint's 2-class decision threshold is
    # fitted (0, the default: the plain argmax); see pipelines/train.py `fit_decision`.
    "data": {"store": None, "crop": 64, "val_tiles": 64, "calibrate_tiles": 0},
    # The chain network (geodnn.build_model options).
    "model": {
        "depth": 16,
        "width": 16,
        "kernel_size": 3,
        "dilations": [1, 2, 4, 8],
        "init": "dirac",
    },
    # The training loop, common to every solver.
    "train": {
        "solver": "admm",  # admm | adam | pipeline
        "compare": [],  # `geodnn run` also trains these solvers, for the report's comparison
        "iterations": 1000,  # total solver iterations
        "epoch": 100,  # iterations between validation, checkpoint and a metrics.csv row
        "batch_size": 16,
        "seed": 0,
        "threads": 1,  # torch compute threads per process (on CPU)
        "device": "auto",  # auto (the GPU when PyTorch sees one) | cpu | cuda; ranks: nccl on GPUs
        "class_weight_power": 0.5,  # class weight = (pixel frequency) ** -power, mean 1
        # the largest class weight is at most this x the smallest (a class of a few pixels would
        # otherwise make the others' weights negligible); >= 1, set it high for no cap
        "class_weight_max_ratio": 10.0,
        # stop when the training loss (epochs pooled to >= 50 iterations) exceeds this x its
        # best and the untrained network's (the solver also watches every iteration's)
        "divergence_factor": 20.0,
    },
    # Solver settings, passed through to geodnn.solvers (documented there and in the configs).
    "admm": {},
    "adam": {"lr": 0.003},
    "pipeline": {"lr": 0.003, "schedule": "1f1b", "microbatches": 8},
    # Multi-worker training (torch.distributed; see README "Training on several workers").
    "parallel": {"workers": 1, "compress_bits": 0, "timeout_s": 120.0, "balance": True},
    # Prediction and export of `geodnn run`.
    "predict": {
        "chunk": 512,
        "batch": 4,
        "cog": True,
        "probabilities": True,
        "vectors": True,
        "min_area": 0.0,
        "simplify": 0.0,
    },
}


@dataclass
class Config:
    """A loaded config: its tables with defaults filled in, and the file it came from."""

    path: Path
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, table: str) -> dict[str, Any]:
        return self.tables[table]

    def resolve(self, value: str | None) -> Path | None:
        """A path from the config, made absolute relative to the config's folder."""
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    @property
    def solver(self) -> str:
        return self.tables["train"]["solver"]


def merge_defaults(raw: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    check_known(raw, path)
    tables = copy.deepcopy(DEFAULTS)
    for name, values in raw.items():
        tables[name].update(values)
    return tables


def check_known(tables: dict[str, Any], path: Path) -> None:
    """Refuse unknown tables and keys (a typo would be ignored, its default used); the solver
    tables' keys are checked against the solvers' settings (`check_solver_tables`)."""
    unknown = sorted(set(tables) - set(DEFAULTS))
    if unknown:
        raise PipelineError(
            f"{path}: unknown table(s) [{', '.join(unknown)}]; valid tables: {', '.join(DEFAULTS)}"
        )
    for name, values in tables.items():
        if not isinstance(values, dict):
            raise PipelineError(f"{path}: '{name}' must be a table ([{name}])")
        if name not in ("admm", "adam", "pipeline"):
            bad = sorted(set(values) - set(DEFAULTS[name]))
            if bad:
                raise PipelineError(
                    f"{path}: unknown key(s) {', '.join(bad)} in [{name}]; "
                    f"valid keys: {', '.join(DEFAULTS[name])}"
                )


# whole numbers with a lower bound (the others of type int are >= 0); floats likewise
AT_LEAST_ONE = {
    ("tile", "tile"), ("data", "crop"), ("train", "iterations"), ("train", "epoch"),
    ("train", "batch_size"), ("train", "threads"), ("train", "class_weight_max_ratio"),
    ("parallel", "workers"),
    ("predict", "chunk"), ("predict", "batch"), ("model", "width"), ("model", "kernel_size"),
    ("pipeline", "microbatches"),
}  # fmt: skip
POSITIVE = {("train", "divergence_factor"), ("parallel", "timeout_s")}


KIND_NAMES = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": "text",
    "list": "a list",
}


def _kind(value: Any) -> str:
    """The config type of a value: bool, int, float (an int is one too), str or list."""
    for kind in (bool, int, float, str, list):
        if isinstance(value, kind):
            return kind.__name__
    return type(value).__name__


INT64_MAX = 2**63 - 1  # TOML's integers are 64-bit; Python's TOML reader takes larger ones


def _is_list_of_text(value: Any) -> bool:
    """A non-empty list of non-blank text (a blank path would name the config's folder)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, str) and v.strip() for v in value)
    )


def check_value(table: str, key: str, value: Any, default: Any, path: Path) -> None:
    """One key of a non-solver table against its default's type and its bounds."""
    if (table, key) == ("data", "store"):  # one store, or a list of them (one per scene)
        if not (value is None or isinstance(value, str) or _is_list_of_text(value)):
            raise PipelineError(
                f"{path}: [data] store must be a path or a list of paths, not {value!r} (e.g. "
                'store = "scene.zarr" or store = ["a.zarr", "b.zarr"])'
            )
        return
    if default is None:
        expected = "list" if key == "class_names" else "str"
        if value is not None and _kind(value) != expected:
            raise PipelineError(
                f"{path}: [{table}] {key} must be {KIND_NAMES[expected]}, not {value!r}"
            )
        return
    expected, got = _kind(default), _kind(value)
    if got != expected and not (expected == "float" and got == "int"):
        example = {"bool": "true", "int": "3", "float": "0.5", "str": '"text"', "list": "[]"}
        if expected in ("int", "float"):  # its default: a value the bounds accept
            example[expected] = repr(default)
        raise PipelineError(
            f"{path}: [{table}] {key} must be {KIND_NAMES[expected]}, not {value!r} (e.g. "
            f"{key} = {example[expected]}; no quotes around numbers)"
        )
    if expected in ("int", "float"):
        if not math.isfinite(value):  # nan passes every comparison below
            raise PipelineError(f"{path}: [{table}] {key} must be a finite number, not {value}")
        low = 1 if (table, key) in AT_LEAST_ONE else 0
        if expected == "int" and value > INT64_MAX:  # e.g. a seed: torch's would overflow
            raise PipelineError(f"{path}: [{table}] {key} must be at most {INT64_MAX}, not {value}")
        bad = value <= 0 if (table, key) in POSITIVE else value < low
        if bad:
            bound = "> 0" if (table, key) in POSITIVE else f">= {low}"
            raise PipelineError(f"{path}: [{table}] {key} must be {bound}, not {value}")


def check_types(tables: dict[str, dict[str, Any]], path: Path) -> None:
    """Every key of the tables with fixed keys has its default's type (a quoted number, or a
    bool where a count is expected, would otherwise fail later with a traceback)."""
    for table, values in tables.items():
        if table in SOLVERS:
            continue
        for key, value in values.items():
            check_value(table, key, value, DEFAULTS[table][key], path)
    compare = tables["train"]["compare"]
    if not all(isinstance(s, str) and s in SOLVERS for s in compare):
        raise PipelineError(
            f"{path}: [train] compare = {compare!r} must list solver names from {SOLVERS}, "
            'e.g. compare = ["adam"]'
        )


def check_solver_tables(tables: dict[str, dict[str, Any]], path: Path) -> None:
    """The solver tables hold only their solver's settings (checked here, so the error names
    the config file)."""
    from geodnn.errors import GeodnnError
    from geodnn.solvers import AdamSettings, AdmmSettings

    known_keys = {
        "admm": AdmmSettings.__dataclass_fields__,
        "adam": AdamSettings.__dataclass_fields__,
        "pipeline": {*AdamSettings.__dataclass_fields__, "schedule", "microbatches"},
    }
    for table, known in known_keys.items():
        unknown = sorted(set(tables[table]) - set(known) - {"class_weights"})
        unknown += ["class_weights"] if "class_weights" in tables[table] else []
        if unknown:
            raise PipelineError(
                f"{path}: unknown key(s) {', '.join(unknown)} in [{table}]; valid keys: "
                f"{', '.join(sorted(set(known) - {'class_weights'}))} (class weights come from "
                "[train] class_weight_power)"
            )
        fields = AdamSettings.__dataclass_fields__ if table == "pipeline" else known
        for key, value in tables[table].items():
            default = DEFAULTS[table][key] if key not in fields else fields[key].default
            check_value(table, key, value, default, path)
    settings = {"admm": AdmmSettings.from_dict, "adam": AdamSettings.from_dict}
    settings["pipeline"] = partial(AdamSettings.from_dict, table="pipeline")  # Adam's settings
    for table, read in settings.items():  # the solvers' own bounds, reported with the file
        values = {k: v for k, v in tables[table].items() if k not in ("schedule", "microbatches")}
        try:
            read(values)
        except GeodnnError as exc:
            raise PipelineError(f"{path}: {exc}") from None


# geodnn.parallel.pipeline.SCHEDULES' names (not imported: that loads torch.distributed.pipelining)
PIPELINE_SCHEDULES = ("gpipe", "1f1b")


def check_pipeline_table(tables: dict[str, dict[str, Any]], path: Path) -> None:
    """[pipeline] schedule, checked at load so that the error names the file once, before
    torchrun starts ranks that would each refuse it; refused in a run of another solver too (a
    typo is a typo). microbatches >= 1 is checked with the types (AT_LEAST_ONE)."""
    schedule = tables["pipeline"]["schedule"]
    if schedule not in PIPELINE_SCHEDULES:
        raise PipelineError(
            f"{path}: [pipeline] schedule = {schedule!r} is unknown; use "
            f"{' or '.join(repr(s) for s in PIPELINE_SCHEDULES)}"
        )


def check_pipeline_batch(tables: dict[str, dict[str, Any]], path: Path) -> None:
    """A pipeline run cuts each batch ([pipeline] batch_size, else [train] batch_size) into
    [pipeline] microbatches equal parts: refuse a count that does not divide it. Checked before
    `geodnn train` starts ranks (pipelines.train.check_parallel), not at load: `geodnn run`
    refuses the pipeline solver itself, with its own fix."""
    table = tables["pipeline"]
    batch, parts = table.get("batch_size", tables["train"]["batch_size"]), table["microbatches"]
    if tables["train"]["solver"] == "pipeline" and batch % parts:
        where = "[pipeline]" if "batch_size" in table else "[train]"
        raise PipelineError(
            f"{path}: [pipeline] microbatches = {parts} does not divide the batch of {batch} "
            f"({where} batch_size); use a divisor of {batch}, e.g. microbatches = "
            f"{largest_divisor(batch, parts)}"
        )


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (1 at least)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def check_model_table(model: dict[str, Any], path: Path) -> None:
    """[model] against the network's own rules (geodnn.model.OPTION_RULES), so a bad value fails
    at load time, naming the file, before `geodnn run` tiles or `geodnn train` writes anything."""
    from geodnn.model import option_problems

    problems = option_problems(model)
    if problems:
        raise PipelineError(f"{path}: [model] {'; '.join(problems)}")


def validate(tables: dict[str, dict[str, Any]], path: Path) -> None:
    check_known(tables, path)
    check_types(tables, path)
    check_model_table(tables["model"], path)
    check_solver_tables(tables, path)
    train = tables["train"]
    if train["solver"] not in SOLVERS:
        raise PipelineError(
            f"{path}: [train] solver = '{train['solver']}' is unknown; use one of {SOLVERS}"
        )
    for key in ("iterations", "epoch", "batch_size", "threads"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise PipelineError(f"{path}: [train] {key} must be a whole number >= 1")
    if train["device"] not in DEVICES:
        raise PipelineError(
            f"{path}: [train] device = '{train['device']}' is unknown; use one of {DEVICES}"
        )
    if tables["parallel"]["workers"] < 1:
        raise PipelineError(f"{path}: [parallel] workers must be >= 1")
    check_pipeline_table(tables, path)


# The command-line options (`geodnn train`, `geodnn run`) that override config values, for
# the messages that blame them.
OVERRIDE_FLAGS = {
    ("train", "solver"): "--solver",
    ("train", "iterations"): "--iterations",
    ("parallel", "workers"): "--workers",
    ("parallel", "compress_bits"): "--compress-bits",
}


def load_config(
    path: str | Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    flags: dict[tuple[str, str], str] | None = None,
) -> Config:
    """Read a TOML config, fill defaults, apply `overrides` (table -> key -> value, None = not
    given) and validate. When that fails and the file alone passes, the overrides are blamed:
    by their command-line options when `flags` maps them ((table, key) -> "--option"; the
    commands pass OVERRIDE_FLAGS), else as given; a file value an override replaces is never
    refused."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise PipelineError(f"{path}: config not found; pass a TOML file (see pipelines/configs/)")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    tables = merge_defaults(raw, path)
    for table, values in (overrides or {}).items():
        if not isinstance(values, dict):
            raise PipelineError(
                f"overrides[{table!r}] = {values!r}: pass a table of keys, e.g. "
                "{'train': {'iterations': 100}}"
            )
    given = {
        (table, key): value
        for table, values in (overrides or {}).items()
        for key, value in values.items()
        if value is not None
    }
    merged = copy.deepcopy(tables)
    for (table, key), value in given.items():
        merged.setdefault(table, {})[key] = value
    try:
        validate(merged, path)
    except PipelineError as exc:
        if not given:
            raise
        validate(tables, path)  # the file's own error, when it has one
        said = str(exc).removeprefix(f"{path}: ")
        raise PipelineError(f"{_options(given, flags)}: {said}") from None
    return Config(path=path, tables=one_store_as_text(merged))


def revalidated(config: Config) -> Config:
    """`config` checked again: a notebook may have edited its tables after `load_config` (a
    typo in a key would be ignored, a value of the wrong type fail deep in training)."""
    try:
        validate(config.tables, config.path)
    except PipelineError as exc:
        said = str(exc).removeprefix(f"{config.path}: ")
        raise PipelineError(f"{config.path}, as edited after load_config: {said}") from None
    one_store_as_text(config.tables)
    return config


def one_store_as_text(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A one-store list, store = ["a.zarr"], as the store itself, so that a resume compares it
    equal to store = "a.zarr"; the tables, changed in place."""
    store = tables["data"]["store"]
    if isinstance(store, list) and len(store) == 1:
        tables["data"]["store"] = store[0]
    return tables


def _options(given: dict[tuple[str, str], Any], flags: dict[tuple[str, str], str] | None) -> str:
    """The overrides as the user gave them: 'command line --iterations 0' (a key without a
    flag: its table), or "overrides [train] iterations = 0" from Python."""
    if flags is None:
        return "overrides " + ", ".join(f"[{t}] {k} = {v!r}" for (t, k), v in given.items())
    options = " ".join(f"{flags.get(key, '[{}] {}'.format(*key))} {v}" for key, v in given.items())
    return f"command line {options}"
