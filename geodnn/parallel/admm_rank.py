"""The ADMM solver on N ranks: each rank owns a contiguous block of layers and their state only.

Every iteration every owned layer runs `layer_step` from the previous iteration's messages
(Jacobi), exactly as the single-process `AdmmSolver` does, so N ranks reproduce its weights. Only
the block's boundary messages cross ranks (see `blocks.JacobiBlock`). The stem's rank reads images
and the head's rank reads labels, each through the deterministic `CropPool`, without talking.
One small all-reduce per iteration shares the head's loss, a divergence flag and each rank's
compute time (for the predicted-vs-measured balance log). By default (`lagged_stats`) it is
waited for one iteration late: a blocking all-reduce would hold every rank to the slowest one at
the end of every iteration, while the boundary messages alone let a rank run up to about one
iteration ahead of its neighbours, which absorbs the load that alternates between iterations
(a layer whose request was dropped does only its cheap forward half). So step() returns the
stats of the iteration before (the first returns none), a divergence stops every rank one
iteration later (the failed rank sends empty messages meanwhile), and `settle()` waits for the
last iteration's stats; the trainer calls it before every checkpoint.

Memory: every rank builds the ChainNet from the config and seed (its weights are small, C_out x
(C_in k^2 + 1) floats a layer), but LayerStates, the part that grows with the crop pool (stored
inputs, Gram), exist only for the rank's own layers; other layers' weights in a rank's `model`
stay at their initial values until `gather_model()` collects them on rank 0.

The reported "loss" is the head's loss on the batch it just processed: the real network's loss on
that batch, with each lower layer's weights up to one iteration per layer older (the wavefront).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..data import Batches
from ..errors import DivergenceError, GeodnnError
from ..model import ChainNet, build_model
from ..runtime import wait_for_device
from ..solvers.admm import (
    AdmmSettings,
    LayerState,
    Message,
    init_layer_states,
    layer_memory_for,
    layer_state_bytes,
    layer_step,
    make_pool,
    saved_pool,
    write_back,
)
from ..solvers.base import LossWatch, check_class_weights, check_same_stream
from .blocks import BlockTimes, Inbox, JacobiBlock
from .compress import CompressionSettings
from .exchange import BoundaryExchange
from .group import RankContext, call_or_fail, post_or_fail, wait_or_fail
from .partition import LayerCost, Plan, balance, even_blocks

log = logging.getLogger(__name__)


@dataclass
class _StatsReduce:
    """An iteration's stats all-reduce in flight, with what its settling needs."""

    work: object
    shared: torch.Tensor
    times: BlockTimes
    iteration: int
    failure: DivergenceError | None


def _message_to_dict(message: Message | None) -> dict | None:
    return None if message is None else message.to_dict()


def _proxy_model(model: ChainNet) -> tuple[ChainNet, list[int]]:
    """A short chain with one layer of every distinct kind of `model` (stem, each hidden dilation,
    head) and, for each layer of `model`, the index of its representative."""
    config = model.config
    kinds = len(config.dilations)
    options = config.to_dict()
    options["depth"] = min(config.depth, kinds)
    proxy = build_model(**options, seed=0).to(model.band_mean.device)  # timed where it runs
    proxy.set_normalization(model.band_mean, model.band_std)
    layers = len(model.layers)
    mapping = [0] + [1 + i % kinds for i in range(config.depth)] + [len(proxy.layers) - 1]
    return proxy, mapping[:layers]


def profile_admm_layers(
    model: ChainNet, data: Batches, settings: AdmmSettings, seed: int, repeats: int = 3
) -> list[LayerCost]:
    """Per-layer step time on the real shapes and resident state bytes for the full crop pool.

    A layer's step cost depends only on its kind (channels, kernel, dilation; stem and head), so a
    short proxy chain with one layer of each kind runs the real Jacobi schedule until every layer
    does full steps, and each layer of `model` gets its representative's mean step time over a
    window of iterations (a layer's work varies with the requests that reach it).
    """
    proxy, mapping = _proxy_model(model)
    proxy_layers = len(proxy.layers)
    pool = make_pool(settings, len(data), len(model.layers), seed)
    states = init_layer_states(proxy, settings)
    x, _ = data.get(pool.indices(0, 0))
    _, _, h, w = x.shape

    def step(layer: int, below, above):
        result = layer_step(states[layer], below, above, pool, data, iteration, settings)
        wait_for_device(proxy.band_mean.device)
        states[layer] = result.state
        return result.up, result.down

    block = JacobiBlock(0, proxy_layers, step)
    warmup = 2 * proxy_layers + settings.slots
    window = max(repeats, 2 * settings.slots)
    samples: list[list[float]] = [[] for _ in range(proxy_layers)]
    for iteration in range(warmup + window):
        times = block.iterate()
        if iteration >= warmup:
            for layer, seconds in times.per_layer_s.items():
                samples[layer].append(seconds)
    mean = [sum(s) / len(s) for s in samples]
    costs = []
    for index, layer in enumerate(model.layers):
        spec = layer.spec
        head = index == len(model.layers) - 1
        memory = layer_memory_for(
            settings,
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            pool.crops,
            h,
            w,
            head=head,
        )
        costs.append(LayerCost(mean[mapping[index]], float(memory)))
    return costs


def plan_blocks(
    ctx: RankContext,
    model: ChainNet,
    data: Batches,
    settings: AdmmSettings,
    seed: int,
    memory_limit: float | None = None,
) -> Plan:
    """Rank 0 profiles the layers and balances them; every rank receives the same plan."""
    payload: list = [None]
    if ctx.rank == 0:
        try:
            costs = profile_admm_layers(model, data, settings, seed)
            plan = balance(costs, ctx.world_size, memory_limit)
            payload = [(plan.blocks, plan.predicted_s, plan.predicted_bytes)]
        except GeodnnError as exc:  # tell the others, or they wait for the plan until timeout
            payload = [str(exc)]
    call_or_fail(ctx, "the layer plan", dist.broadcast_object_list, payload, src=0)
    if isinstance(payload[0], str):
        raise GeodnnError(payload[0])
    blocks, predicted_s, predicted_bytes = payload[0]
    return Plan([tuple(b) for b in blocks], list(predicted_s), list(predicted_bytes))


class RankAdmmSolver:
    """One rank's share of an N-rank ADMM run; the Solver protocol on every rank.

    `model` is the full ChainNet built identically on every rank (same config and seed); this
    rank updates only the layers of its block, and `gather_model()` (collective) brings every
    rank's current weights into rank 0's `model` for saving and evaluation.
    """

    def __init__(
        self,
        ctx: RankContext,
        model: ChainNet,
        data: Batches,
        settings: AdmmSettings,
        seed: int,
        plan: Plan | None = None,
        compression: CompressionSettings | None = None,
        log_every: int = 0,
        lagged_stats: bool = True,
    ) -> None:
        layers = len(model.layers)
        if plan is None:
            plan = Plan.unpredicted(even_blocks(layers, ctx.world_size))
        if len(plan.blocks) != ctx.world_size:
            raise GeodnnError(f"plan has {len(plan.blocks)} blocks for {ctx.world_size} ranks")
        check_class_weights(settings, model, "admm")
        model.to(ctx.device)  # the states are copied from its weights, on this rank's device
        self.ctx, self.model, self.data, self.settings = ctx, model, data, settings
        self.seed, self.plan, self.log_every = int(seed), plan, log_every
        self.start, self.stop = plan.blocks[ctx.rank]
        self.pool = make_pool(settings, len(data), len(model.layers), self.seed)
        self.states: dict[int, LayerState] = {
            s.index: s for s in init_layer_states(model, settings)[self.start : self.stop]
        }
        self.exchange = BoundaryExchange(ctx, compression, make_message=Message)
        self.block = JacobiBlock(self.start, self.stop, self._step_layer, self.exchange)
        self.iteration = 0
        self.watch = LossWatch.from_settings(settings)
        self._layer_stats: dict[int, dict[str, float]] = {}
        self._measured_s = [0.0] * ctx.world_size
        self._measured_n = 0
        self._failure: DivergenceError | None = None
        self.lagged_stats = lagged_stats
        self._pending: _StatsReduce | None = None

    @property
    def owns_head(self) -> bool:
        return self.stop == len(self.model.layers)

    def _step_layer(self, layer: int, below: Message | None, above: Message | None):
        """One layer's update; after a divergence on this rank the rest of the iteration sends
        empty messages, so the neighbours finish it and learn of the failure from the
        all-reduce instead of waiting for messages that would never come."""
        if self._failure is not None:
            return None, None
        state, t = self.states[layer], self.iteration
        try:
            result = layer_step(state, below, above, self.pool, self.data, t, self.settings)
        except DivergenceError as exc:
            self._failure = exc
            return None, None
        wait_for_device(self.ctx.device)  # its queued GPU kernels are the layer's time too
        self.states[layer] = result.state
        self._layer_stats[layer] = result.stats
        return result.up, result.down

    def step(self) -> dict[str, float]:
        """One Jacobi iteration of this rank's block and its stats all-reduce; returns the stats
        of this iteration, or with `lagged_stats` those of the one before (see the module)."""
        self._layer_stats = {}
        times = self.block.iterate()
        write_back(list(self.states.values()), self.model)
        reduce = self._post_stats(times)
        self.iteration += 1
        if not self.lagged_stats:
            return self._settle(reduce)
        previous, self._pending = self._pending, reduce
        return self._partial_stats(times) if previous is None else self._settle(previous)

    def settle(self) -> dict[str, float] | None:
        """Collective: wait for the stats all-reduce still in flight (with `lagged_stats`) and
        return its stats; raises DivergenceError if any rank diverged. Call on every rank before
        a checkpoint, so that no checkpoint holds an iteration that diverged."""
        pending, self._pending = self._pending, None
        return None if pending is None else self._settle(pending)

    def _post_stats(self, times: BlockTimes) -> _StatsReduce:
        head = self._layer_stats.get(len(self.model.layers) - 1, {}).get("head_loss")
        n, rank = self.ctx.world_size, self.ctx.rank
        # [loss, has loss, failure, compute s per rank, max relative step per rank, W-steps]
        shared = torch.zeros(4 + 2 * n, dtype=torch.float64)
        if head is not None:
            shared[0], shared[1] = head, 1.0
        shared[2] = 1.0 if self._failure is not None else 0.0
        shared[3 + rank] = times.compute_s
        rel = [s["rel_step"] for s in self._layer_stats.values() if "rel_step" in s]
        shared[3 + n + rank] = max(rel, default=0.0)
        shared[3 + 2 * n] = len(rel)
        shared = shared.to(self.ctx.device)
        work = dist.all_reduce(shared, async_op=True)
        return _StatsReduce(work, shared, times, self.iteration, self._failure)

    def _settle(self, reduce: _StatsReduce) -> dict[str, float]:
        what = f"the stats all-reduce of iteration {reduce.iteration}"
        wait_or_fail(reduce.work, self.ctx, None, what)
        shared = reduce.shared.cpu()
        if reduce.failure is not None:  # this rank's layer: only this rank can say which
            failure = reduce.failure
            raise DivergenceError(failure.diagnosis, failure.fix, local=True) from failure
        if shared[2] > 0:
            raise DivergenceError(
                f"ADMM diverged on another rank at iteration {reduce.iteration}",
                "raise [admm] lam or head_nu, or lower max_rel_step, and resume from the last "
                "checkpoint",
            )
        stats = self._stats(reduce.times, shared)
        if "loss" in stats:
            self.watch.update(stats["loss"], reduce.iteration, "ADMM")
        self._log_balance(shared[3 : 3 + self.ctx.world_size].tolist(), reduce.iteration + 1)
        return stats

    def _partial_stats(self, times: BlockTimes) -> dict[str, float]:
        """This rank's own figures of an iteration whose shared stats are still in flight."""
        return {
            "compute_s": times.compute_s,
            "wait_s": times.wait_s,
            "max_layer_s": max(times.per_layer_s.values()),
            "bytes_sent": float(times.bytes_sent),  # this iteration's
        }

    def _stats(self, times, shared: torch.Tensor) -> dict[str, float]:
        """The iteration's stats over the whole chain, as the single-process solver reports
        them (max_layer_s, compute_s and wait_s stay this rank's)."""
        n = self.ctx.world_size
        stats = self._partial_stats(times)
        stats["slowest_rank_s"] = float(shared[3 : 3 + n].max())
        stats["max_rel_step"] = float(shared[3 + n : 3 + 2 * n].max())
        stats["layers_updated"] = float(shared[3 + 2 * n])
        if shared[1] > 0:
            stats["loss"] = stats["head_loss"] = float(shared[0])
        return stats

    def _log_balance(self, compute_s: list[float], iteration: int) -> None:
        self._measured_s = [a + b for a, b in zip(self._measured_s, compute_s)]
        self._measured_n += 1
        if self.log_every and self.ctx.rank == 0 and iteration % self.log_every == 0:
            mean = [s / self._measured_n for s in self._measured_s]
            log.info("work balance, iteration %d:\n%s", iteration, self.plan.describe(mean))

    def measured_rank_seconds(self) -> list[float]:
        """Mean compute seconds per iteration of every rank so far."""
        return [s / max(self._measured_n, 1) for s in self._measured_s]

    def finished(self) -> str | None:
        return self.watch.finished(self.iteration)

    def state_bytes(self) -> int:
        """Resident bytes of this rank's layer states (the memory that grows with the pool)."""
        return sum(layer_state_bytes(s) for s in self.states.values())

    def state_dict(self) -> dict:
        """This rank's state only: its layers, the messages waiting for them, feedback residuals."""
        inbox = self.block.inbox
        return {
            "solver": "admm-rank",
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "blocks": [list(b) for b in self.plan.blocks],
            "iteration": self.iteration,
            "seed": self.seed,
            "settings": self.settings.to_dict(),
            "layers": [self.states[i].state_dict() for i in sorted(self.states)],
            "below": {str(k): _message_to_dict(v) for k, v in inbox.below.items()},
            "above": {str(k): _message_to_dict(v) for k, v in inbox.above.items()},
            "exchange": self.exchange.state_dict(),
            "watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a rank checkpoint of this run, or re-shard: any "admm-rank" state that
        holds this rank's layers (e.g. `single_process_state` of an AdmmSolver, or a merged one)
        is accepted; compression residuals carry over only when the blocks are the same."""
        if state.get("solver") != "admm-rank":
            raise GeodnnError(
                "checkpoint is not an N-rank ADMM state; convert a single-process ADMM state "
                "with geodnn.parallel.single_process_state, or resume with the same solver"
            )
        check_same_stream(state, self.settings, self.seed, "admm", ("batch_size", "slots"))
        layers = {int(d["index"]): d for d in state["layers"]}
        missing = [i for i in range(self.start, self.stop) if i not in layers]
        if missing:
            raise GeodnnError(
                f"checkpoint lacks layers {missing} of rank {self.ctx.rank}; resume with the same "
                "workers, or from a merged state"
            )
        mine = range(self.start, self.stop)
        self.iteration = int(state["iteration"])
        self.pool = saved_pool(state["settings"], self.pool, len(self.model.layers))
        self.states = {i: LayerState.from_state_dict(layers[i]) for i in mine}
        below, above = state["below"], state["above"]
        self.block.inbox = Inbox(
            below={i: Message.from_dict(below.get(str(i))) for i in mine},
            above={i: Message.from_dict(above.get(str(i))) for i in mine},
        )
        same_blocks = [tuple(b) for b in state.get("blocks", [])] == list(self.plan.blocks)
        if same_blocks:
            self.exchange.load_state_dict(state["exchange"])
        self.watch.load_state_dict(state["watch"])
        write_back(list(self.states.values()), self.model)

    def gather_model(self) -> ChainNet | None:
        """Collective: every rank sends its layers' weights to rank 0; rank 0 returns the model.
        NCCL ignores tags: rank 0 receives in the order each rank sends (by layer, weight before
        bias), which is what matches the messages there."""
        if self.ctx.rank != 0:
            works = []
            for i in range(self.start, self.stop):
                for tensor in self.states[i].output_weights():
                    t = tensor.contiguous().to(self.ctx.device)
                    works.append((post_or_fail(dist.isend, t, 0, 900 + i, self.ctx, "weights"), t))
            for work, _ in works:
                wait_or_fail(work, self.ctx, 0, "the weight gather")
            return None
        for rank, (start, stop) in enumerate(self.plan.blocks[1:], start=1):
            for i in range(start, stop):
                conv = self.model.layers[i].conv
                for param in (conv.weight, conv.bias):
                    buffer = torch.empty_like(param.data, device=self.ctx.device)
                    work = post_or_fail(dist.irecv, buffer, rank, 900 + i, self.ctx, "weights")
                    wait_or_fail(work, self.ctx, rank, f"the weights of layer {i}")
                    with torch.no_grad():
                        param.copy_(buffer)
        return self.model


def single_process_state(state: dict) -> dict:
    """An AdmmSolver state_dict as a whole-chain "admm-rank" state (one block), loadable by
    every rank of an N-rank run (each takes its own layers and their pending messages)."""
    layers = state["layers"]
    n = len(layers)
    ups, downs = state["ups"], state["downs"]
    return {
        "solver": "admm-rank",
        "rank": 0,
        "world_size": 1,
        "blocks": [[0, n]],
        "iteration": int(state["iteration"]),
        "seed": int(state["seed"]),
        "settings": state["settings"],
        "layers": layers,
        "below": {str(i): ups[i - 1] if i > 0 else None for i in range(n)},
        "above": {str(i): downs[i + 1] if i + 1 < n else None for i in range(n)},
        "exchange": {},
        "watch": state["watch"],
    }


def reference_weights(
    model: ChainNet, data: Batches, settings: AdmmSettings, seed: int, iterations: int
) -> list[torch.Tensor]:
    """Weights after `iterations` of the single-process AdmmSolver (the equivalence reference)."""
    from ..solvers.admm import AdmmSolver

    solver = AdmmSolver(model, data, replace(settings, monitor=False), seed)
    for _ in range(iterations):
        solver.step()
    return [p.detach().clone() for p in model.parameters()]


__all__ = [
    "RankAdmmSolver",
    "plan_blocks",
    "profile_admm_layers",
    "reference_weights",
    "single_process_state",
]
