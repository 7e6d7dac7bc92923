"""Multi-rank training: `geodnn train CONFIG --workers N` and `torchrun ... -m pipelines.train`.

The launcher (one process) starts N ranks under torchrun; each rank runs the ordinary training
loop of pipelines/train.py with a rank solver from geodnn.parallel: ADMM with a block of layers per
rank exchanging only boundary messages, or the backprop pipeline baseline (GPipe / 1F1B).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from geodnn.parallel import (
    CompressionSettings,
    PipelineSolver,
    RankAdmmSolver,
    init_ranks,
    launch,
    plan_blocks,
)
from geodnn.solvers.adam import AdamSettings
from geodnn.solvers.admm import AdmmSettings

from .config import load_config
from .errors import PipelineError

log = logging.getLogger(__name__)

PIPELINE_ONLY = ("schedule", "microbatches")


def make_rank_solver(setup, settings: dict):
    """This rank's solver for the run described by `setup` (a pipelines.train.TrainSetup)."""
    config = setup.config
    parallel, train = config["parallel"], config["train"]
    ctx = init_ranks(timeout_s=parallel["timeout_s"], threads=train["threads"])
    seed = train["seed"]
    if setup.solver_name == "admm":
        admm = AdmmSettings.from_dict(settings)
        plan = None
        if parallel["balance"] and ctx.world_size > 1:
            plan = plan_blocks(ctx, setup.model, setup.train_data, admm, seed)
            if ctx.rank == 0:
                log.info("layer blocks by measured cost:\n%s", plan.describe())
        bits = parallel["compress_bits"]
        compression = CompressionSettings(bits=bits) if bits else None
        return RankAdmmSolver(
            ctx,
            setup.model,
            setup.train_data,
            admm,
            seed,
            plan,
            compression,
            log_every=train["epoch"],
        )
    if setup.solver_name == "pipeline":
        options = {k: v for k, v in settings.items() if k not in PIPELINE_ONLY}
        table = config["pipeline"]
        return PipelineSolver(
            ctx,
            setup.model,
            setup.train_data,
            AdamSettings.from_dict(options),
            seed,
            schedule=table["schedule"],
            microbatches=table["microbatches"],
        )
    raise PipelineError(
        f"{config.path}: solver '{setup.solver_name}' runs in one process; use --solver admm "
        "(layer-parallel) or --solver pipeline (GPipe / 1F1B) with several workers"
    )


def forwarded_args(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `geodnn train` options every rank receives."""
    argv = [str(Path(args.config).resolve()), "--out", str(run_dir.resolve())]
    for flag, value in (
        ("--solver", args.solver),
        ("--iterations", args.iterations),
        ("--workers", args.workers),
        ("--compress-bits", args.compress_bits),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--resume"] if args.resume else []
    argv += ["--overwrite"] if args.overwrite else []
    return argv


def launch_training(args: argparse.Namespace, workers: int) -> int:
    """Start `workers` ranks of `python -m pipelines.train` under torchrun and wait for them."""
    from .train import default_run_dir, overrides_from

    config = load_config(args.config, overrides_from(args))
    run_dir = Path(args.out or default_run_dir(config))
    log.info("launching %d ranks (torchrun) for %s", workers, run_dir)
    return launch(forwarded_args(args, run_dir), workers, module="pipelines.train")
