"""The backprop baseline on N ranks: the same ChainNet, Adam, batches and loss, pipelined with
`torch.distributed.pipelining` (GPipe or 1F1B schedules).

Rank r runs stage r, a contiguous block of layers; the batch is cut into micro-batches. Known traps
avoided: stage shapes are passed by hand (automatic inference runs an extra forward on
uninitialized input), hand-passed activations have requires_grad=True, and every wait inherits the
process group's timeout. The loss is the mean of the micro-batch losses (class-weighted CE with the
ignore index), as the schedule scales gradients by 1/M.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..data import Batches
from ..errors import GeodnnError
from ..model import ChainNet, as_activation
from ..solvers.adam import AdamSettings, restore_optimizer
from ..solvers.admm import make_pool
from ..solvers.base import LossWatch
from ..solvers.subproblems import weighted_cross_entropy
from .group import (
    RankContext,
    is_link_failure,
    no_answer,
    post_or_fail,
    wait_or_fail,
)
from .partition import Blocks, even_blocks

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StageModule(nn.Module):
    """Layers [start, stop) of a ChainNet (shared with it), normalizing input on the first."""

    def __init__(self, model: ChainNet, start: int, stop: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.layers[start:stop])
        self.first = start == 0
        if self.first:
            self.register_buffer("band_mean", model.band_mean.detach().clone())
            self.register_buffer("band_std", model.band_std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = (x - self.band_mean.view(1, -1, 1, 1)) / self.band_std.view(1, -1, 1, 1)
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        x = as_activation(x)
        for layer in self.layers:
            x = layer(x, same=True)
        return x.contiguous()  # point-to-point sends take NCHW-contiguous tensors only


class PipelineSolver:
    """Backprop + Adam through a pipeline schedule; the Solver protocol on every rank.

    Batch t is the crop pool's stem batch of iteration t, as for `AdamSolver` and ADMM.
    `gather_model()` (collective) brings all stages' weights into rank 0's `model`.
    """

    def __init__(
        self,
        ctx: RankContext,
        model: ChainNet,
        data: Batches,
        settings: AdamSettings,
        seed: int,
        schedule: str = "gpipe",
        microbatches: int = 4,
        blocks: Blocks | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise GeodnnError(f"unknown pipeline schedule {schedule!r}; use 'gpipe' or '1f1b'")
        if settings.batch_size % microbatches:
            raise GeodnnError(
                f"batch_size {settings.batch_size} is not a multiple of microbatches "
                f"{microbatches}: change one of them"
            )
        self.ctx, self.model, self.data, self.settings = ctx, model, data, settings
        self.seed, self.iteration, self.microbatches = int(seed), 0, microbatches
        self.blocks = blocks or even_blocks(len(model.layers), ctx.world_size)
        self.start, self.stop = self.blocks[ctx.rank]
        self.pool = make_pool(settings, len(data), len(model.layers), self.seed)
        self.stage_module = StageModule(model, self.start, self.stop).to(ctx.device)
        self.stage = self._build_stage()
        cw = settings.class_weights
        self._weights = torch.tensor(cw, dtype=torch.float32, device=ctx.device) if cw else None
        self.schedule = SCHEDULES[schedule](
            self.stage, n_microbatches=microbatches, loss_fn=self._loss
        )
        self.optimizer = torch.optim.Adam(
            self.stage_module.parameters(),
            lr=settings.lr,
            betas=(settings.beta1, settings.beta2),
            weight_decay=settings.weight_decay,
        )
        self.watch = LossWatch.from_settings(settings)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy(logits, labels, self._weights)

    def _build_stage(self) -> PipelineStage:
        """Stage with hand-passed micro-batch shapes (no inference forward on garbage input)."""
        x, _ = self.data.get(self.pool.batch_at(0))
        mb = x.shape[0] // self.microbatches
        h, w = x.shape[-2:]
        specs = self.model.config.layer_specs()
        c_in = specs[self.start].in_channels
        c_out = specs[self.stop - 1].out_channels
        device = self.ctx.device
        first = self.start == 0
        example_in = torch.zeros(mb, c_in, h, w, device=device, requires_grad=not first)
        example_out = torch.zeros(mb, c_out, h, w, device=device, requires_grad=True)
        return PipelineStage(
            self.stage_module,
            stage_index=self.ctx.rank,
            num_stages=self.ctx.world_size,
            device=device,
            input_args=(example_in,),
            output_args=(example_out,),
        )

    def step(self) -> dict[str, float]:
        """One Adam step on the stem batch of this iteration, pipelined over the ranks."""
        x, y = self.data.get(self.pool.batch_at(self.iteration))
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        first, last = self.ctx.rank == 0, self.ctx.rank == self.ctx.world_size - 1
        self.stage_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        kwargs = {"target": y, "losses": losses} if last else {}
        self._run_schedule(args, kwargs)
        self.optimizer.step()
        shared = torch.zeros(1, dtype=torch.float64)
        if last:
            shared[0] = float(torch.stack([v.detach() for v in losses]).mean())
        shared = shared.to(self.ctx.device)
        wait_or_fail(dist.all_reduce(shared, async_op=True), self.ctx, None, "the loss all-reduce")
        loss = float(shared.cpu()[0])
        self.watch.update(loss, self.iteration, "pipeline Adam")
        self.iteration += 1
        return {"loss": loss}

    def _run_schedule(self, args: tuple, kwargs: dict) -> None:
        """The schedule's step; its exchange with a neighbour stage that died or hangs is a
        RankFailureError naming the neighbours (torch raises a bare RuntimeError)."""
        try:
            self.schedule.step(*args, **kwargs)
        except RuntimeError as exc:
            if not is_link_failure(exc):
                raise
            who = self.ctx.peers(self.ctx.below, self.ctx.above)
            what = f"the pipeline schedule's exchange of iteration {self.iteration}"
            raise no_answer(self.ctx, who, what, exc) from exc

    def finished(self) -> str | None:
        return self.watch.finished(self.iteration)

    def state_dict(self) -> dict:
        """This rank's stage weights, optimizer and counters (one file per rank)."""
        return {
            "solver": "pipeline-rank",
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "blocks": [list(b) for b in self.blocks],
            "iteration": self.iteration,
            "seed": self.seed,
            "stage": {k: v.detach().clone() for k, v in self.stage_module.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not live
            "watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        blocks = [tuple(b) for b in state.get("blocks", [])]
        if state.get("solver") != "pipeline-rank" or blocks != list(self.blocks):
            raise GeodnnError(
                "rank checkpoint does not match this pipeline run; resume with the same workers"
            )
        self.stage_module.load_state_dict(state["stage"])
        restore_optimizer(self.optimizer, state["optimizer"], self.settings)
        self.iteration = int(state["iteration"])
        self.watch.load_state_dict(state["watch"])

    def gather_model(self) -> ChainNet | None:
        """Collective: stage weights of every rank into rank 0's `model` (None elsewhere)."""
        params = [
            p for layer in self.stage_module.layers for p in (layer.conv.weight, layer.conv.bias)
        ]
        if self.ctx.rank != 0:
            works = [
                (
                    post_or_fail(
                        dist.isend, p.detach().contiguous(), 0, 700 + i, self.ctx, "weights"
                    ),
                    p,
                )
                for i, p in enumerate(params)
            ]
            for work, _ in works:
                wait_or_fail(work, self.ctx, 0, "the weight gather")
            return None
        for rank, (start, stop) in enumerate(self.blocks[1:], start=1):
            remote = [
                p
                for layer in self.model.layers[start:stop]
                for p in (layer.conv.weight, layer.conv.bias)
            ]
            for i, param in enumerate(remote):
                buffer = torch.empty_like(param.data, device=self.ctx.device)
                wait_or_fail(
                    post_or_fail(dist.irecv, buffer, rank, 700 + i, self.ctx, "weights"),
                    self.ctx,
                    rank,
                    "the stage weights",
                )
                with torch.no_grad():
                    param.copy_(buffer)
        return self.model
