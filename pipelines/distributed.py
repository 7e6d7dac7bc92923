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
    Plan,
    RankAdmmSolver,
    init_ranks,
    launch,
    load_rank_checkpoint,
    plan_blocks,
)
from geodnn.solvers.adam import AdamSettings
from geodnn.solvers.admm import AdmmSettings

from .config import OVERRIDE_FLAGS, load_config
from .errors import PipelineError

log = logging.getLogger(__name__)

PIPELINE_ONLY = ("schedule", "microbatches")


def make_rank_solver(setup, settings: dict, resume: bool = False) -> tuple[object, dict | None]:
    """This rank's solver for the run described by `setup` (a pipelines.train.TrainSetup), and,
    with `resume`, this rank's state from the last checkpoint every rank completed."""
    config = setup.config
    parallel, train = config["parallel"], config["train"]
    backend = "nccl" if setup.device == "cuda" else "gloo"
    ctx = init_ranks(timeout_s=parallel["timeout_s"], backend=backend, threads=train["threads"])
    setup.model.to(ctx.device)  # the rank's layer states and messages live there
    state = load_rank_checkpoint(setup.run_dir, ctx) if resume else None
    blocks = state["solver_state"]["blocks"] if state else None
    seed = train["seed"]
    if setup.solver_name == "admm":
        return admm_rank_solver(ctx, setup, AdmmSettings.from_dict(settings), seed, blocks), state
    if setup.solver_name == "pipeline":
        options = {k: v for k, v in settings.items() if k not in PIPELINE_ONLY}
        table = config["pipeline"]
        solver = PipelineSolver(
            ctx,
            setup.model,
            setup.train_data,
            AdamSettings.from_dict(options, table="pipeline"),
            seed,
            schedule=table["schedule"],
            microbatches=table["microbatches"],
            blocks=[tuple(b) for b in blocks] if blocks else None,
        )
        if ctx.rank == 0:
            log.info(
                "pipeline: %s schedule, %d micro-batches; layers per rank %s",
                table["schedule"],
                table["microbatches"],
                ", ".join(f"{a}-{b - 1}" for a, b in solver.blocks),
            )
        return solver, state
    # `pipelines.train.check_parallel` refuses other solvers before any rank gets here
    raise PipelineError(f"{config.path}: solver '{setup.solver_name}' has no multi-rank form")


def admm_rank_solver(ctx, setup, admm: AdmmSettings, seed: int, blocks) -> RankAdmmSolver:
    """ADMM on this rank; layer blocks from a checkpoint (resume), by measured cost, or even."""
    parallel = setup.config["parallel"]
    plan = None
    if blocks:
        plan = Plan.unpredicted([tuple(b) for b in blocks])  # the checkpoint's split
    elif parallel["balance"] and ctx.world_size > 1:
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
        log_every=setup.config["train"]["epoch"],
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
    argv += ["--quiet"] if args.quiet else []
    return argv


def launch_training(args: argparse.Namespace, workers: int) -> int:
    """Start `workers` ranks of `python -m pipelines.train` under torchrun and wait for them."""
    from .train import HELD_RUN_ENV, default_run_dir, overrides_from

    config = load_config(args.config, overrides_from(args), OVERRIDE_FLAGS)
    run_dir = Path(args.out or default_run_dir(config))
    log.info("launching %d rank%s (torchrun) for %s", workers, "s"[: workers > 1], run_dir)
    held = {HELD_RUN_ENV: str(run_dir.resolve())}  # this process holds the run folder for them
    return launch(forwarded_args(args, run_dir), workers, module="pipelines.train", env=held)
