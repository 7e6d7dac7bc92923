"""Layer-parallel ADMM vs the pipeline-parallel backprop baseline, on 1 and 2 ranks.

Same model, batch and crop stream for both (Vegas roads scene, left 70 % of columns, random
64x64 crops, width-16 chain). One compute thread per rank. Measured in ONE run:
- ADMM: time per iteration in steady state (after the pipeline fill, ~2L iterations, which runs
  once in this process and is handed to the ranks), 1 rank (one process) vs 2 ranks (balanced
  split from the measured per-layer costs; an equal-count split too), plain and 8-bit exchange,
  the stats all-reduce waited for one iteration late (the default) and at once,
  bytes per iteration, per-rank predicted vs measured compute, state bytes and peak RSS per rank.
- Two ceilings for 2 ranks with free communication: a conv loop in two processes, and the
  whole ADMM chain in two processes at once (this workload's own memory and cache sharing).
- Pipeline baseline: backprop + Adam, one process vs 2 ranks with GPipe and 1F1B.
- One process on both cores (two intra-op threads) for ADMM and Adam: what the cores give a
  model that fits one process without splitting it.
- A cost model from the measured per-layer times and message sizes, with a stated link
  bandwidth and latency, projecting speedup for N = 4..64 ranks and depth 32..256, beside the
  pipeline's bubble (K-1)/(M+K-1); also with 8-bit messages (their measured encode and decode
  time on the compute thread against a quarter of the bytes on the link).
- Full mode only: time to a target validation IoU, ADMM (2 ranks) vs GPipe (2 ranks).

    python benchmarks/scaling.py --quick    # about 1.5 minutes
    python benchmarks/scaling.py            # depth 16, longer timings, time-to-IoU race
    python benchmarks/scaling.py --race-only --depth 8 --race-s 75   # only the race
The last printed line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.distributed as dist

from geodnn.data import TensorBatches, class_weights
from geodnn.metrics import confusion_matrix
from geodnn.model import build_model
from geodnn.parallel.admm_rank import RankAdmmSolver
from geodnn.parallel.blocks import JacobiBlock
from geodnn.parallel.compress import CompressionSettings, ErrorFeedbackEncoder, decode
from geodnn.parallel.group import init_ranks, shutdown
from geodnn.parallel.launch import spawn
from geodnn.parallel.partition import LayerCost, Plan, balance, even_blocks
from geodnn.parallel.pipeline import PipelineSolver
from geodnn.runtime import retain_freed_memory
from geodnn.solvers.adam import AdamSettings, AdamSolver
from geodnn.solvers.admm import (
    AdmmSettings,
    LayerState,
    Message,
    init_layer_states,
    layer_memory_for,
    layer_step,
    make_pool,
)
from geodnn.solvers.base import LossWatch, settings_overrides

DATA = Path(__file__).resolve().parent.parent / "data" / "vegas-roads"
SEED = 0


# ----------------------------------------------------------------------------- data and model
def load_crops(crop: int, count: int, validation: bool, seed: int) -> TensorBatches:
    """Random crops of the Vegas scene: train = left 70 % of columns, validation = right 25 %."""
    with rasterio.open(DATA / "image.tif") as src:
        image = src.read(1).astype(np.float32)
    with rasterio.open(DATA / "roads.tif") as src:
        labels = (src.read(1) > 0).astype(np.int64)
    h, w = labels.shape
    lo, hi = (int(0.75 * w), w) if validation else (0, int(0.7 * w))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, h - crop + 1, count)
    cols = rng.integers(lo, hi - crop + 1, count)
    xs = np.stack([image[None, r : r + crop, c : c + crop] for r, c in zip(rows, cols)])
    ys = np.stack([labels[r : r + crop, c : c + crop] for r, c in zip(rows, cols)])
    return TensorBatches(torch.from_numpy(xs), torch.from_numpy(ys))


def make_model(depth: int, width: int, data: TensorBatches):
    model = build_model(1, 2, depth=depth, width=width, seed=SEED)
    model.set_normalization([float(data.images.mean())], [float(data.images.std())])
    return model


def settings_for(args, data) -> tuple[AdmmSettings, AdamSettings]:
    weights = class_weights(data.labels, 2).tolist()
    overrides = settings_overrides(args.admm, "admm")
    admm = AdmmSettings.from_dict(
        {
            "batch_size": args.batch,
            "slots": 4,  # the pool these figures have always used: S B = 64 crops stored
            "class_weights": weights,
            "monitor": False,
            **overrides,
        }
    )
    adam = AdamSettings.from_dict({"batch_size": args.batch, "class_weights": weights})
    return admm, adam


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would include the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def thread_cpu_s() -> dict[int, float] | None:
    """CPU seconds of each thread of this process (Linux /proc; None elsewhere): to tell the
    compute thread's time from what gloo's transport threads spend moving the messages."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    tick = float(os.sysconf("SC_CLK_TCK"))
    times = {}
    for task in tasks.iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        times[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return times


def split_thread_cpu(
    before: dict[int, float] | None, after: dict[int, float] | None, timed: int
) -> dict[str, float | None]:
    """Per-iteration CPU seconds of the calling (compute) thread and of all other threads."""
    if before is None or after is None:
        return {"compute_thread_cpu_s": None, "other_threads_cpu_s": None}
    main = threading.get_native_id()
    delta = {t: after[t] - before.get(t, 0.0) for t in after}
    other = sum(v for t, v in delta.items() if t != main)
    mine = delta.get(main, 0.0)
    return {"compute_thread_cpu_s": mine / timed, "other_threads_cpu_s": other / timed}


def _maybe_round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def join_ranks():
    """A benchmark rank: join the group and keep freed memory, as `geodnn train` does."""
    ctx = init_ranks(timeout_s=120, backend="gloo")  # the CPU, one thread per rank, on any host
    retain_freed_memory()
    return ctx


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


# ----------------------------------------------------------------------------- ADMM, one process
def admm_warm_state(model, data, settings: AdmmSettings, warmup: int) -> dict:
    """Step the whole chain in this process (exactly AdmmSolver's Jacobi schedule) through the
    pipeline fill; the state every timing below starts from."""
    pool = make_pool(settings, len(data), len(model.layers), SEED)
    states: list[LayerState] = init_layer_states(model, settings)
    clock = {"t": 0}

    def step(layer, below, above):
        result = layer_step(states[layer], below, above, pool, data, clock["t"], settings)
        states[layer] = result.state
        return result.up, result.down

    block = JacobiBlock(0, len(states), step)
    for t in range(warmup):
        clock["t"] = t
        block.iterate()
    return _whole_chain_state(states, block, warmup, settings)


def admm_single_process(model, data, settings: AdmmSettings, warm: dict, timed: int) -> dict:
    """One process, one thread: from the warm state, `timed` untimed then `timed` timed
    iterations (the same iterations the ranks time); seconds per iteration and per layer.

    The untimed cycle matters: until every slot's stored tensors were replaced once, each step
    still faults fresh pages in (states handed to a rank arrive in shared memory)."""
    pool = make_pool(settings, len(data), len(model.layers), SEED)
    states = [LayerState.from_state_dict(d) for d in warm["layers"]]
    clock = {"t": warm["iteration"]}

    def step(layer, below, above):
        result = layer_step(states[layer], below, above, pool, data, clock["t"], settings)
        states[layer] = result.state
        return result.up, result.down

    block = JacobiBlock(0, len(states), step)
    block.inbox.below = {int(k): Message.from_dict(v) for k, v in warm["below"].items()}
    block.inbox.above = {int(k): Message.from_dict(v) for k, v in warm["above"].items()}
    rows = []
    for _ in range(timed):  # one untimed cycle: every slot's tensors become this process's own
        block.iterate()
        clock["t"] += 1
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(timed):
        times = block.iterate()
        clock["t"] += 1
        rows.append([times.per_layer_s[i] for i in range(len(states))])
    seconds = (time.perf_counter() - tic) / timed
    cpu = (time.process_time() - cpu) / timed
    per_layer = np.mean(rows, axis=0).tolist()
    return {"iteration_s": seconds, "cpu_s": cpu, "per_layer_s": per_layer, "rows": rows}


def ideal_speedups(rows: list[list[float]], blocks: list) -> dict:
    """What the measured one-process layer times allow a block split at best: from the mean
    layer times, and in lockstep (each iteration lasts as long as its busiest rank then). A
    layer's work varies over the refresh cycle (it skips its update while its requests are
    stale), and the lower layers skip together, so the two differ."""
    times = np.asarray(rows)
    total = times.sum(axis=1).mean()
    per_rank = np.stack([times[:, a:b].sum(axis=1) for a, b in blocks], axis=1)
    return {
        "from_mean_layer_times": round(float(total / per_rank.mean(axis=0).max()), 3),
        "lockstep_per_iteration": round(float(total / per_rank.max(axis=1).mean()), 3),
    }


def _whole_chain_state(states, block, iteration: int, settings: AdmmSettings) -> dict:
    def msg(m):
        return None if m is None else m.to_dict()

    n = len(states)
    return {
        "solver": "admm-rank",
        "blocks": [[0, n]],
        "iteration": iteration,
        "settings": settings.to_dict(),
        "layers": [s.state_dict() for s in states],
        "below": {str(i): msg(block.inbox.below.get(i)) for i in range(n)},
        "above": {str(i): msg(block.inbox.above.get(i)) for i in range(n)},
        "exchange": {},
        "watch": LossWatch(settings.divergence_factor, settings.divergence_warmup).state_dict(),
    }


# ----------------------------------------------------------------------------- ADMM, N ranks
def _admm_ranks(depth, width, data, settings, state, variant: tuple, timed: int) -> dict:
    """One 2-rank variant (blocks, predicted seconds, bits, lagged stats) from the warm state:
    one untimed refresh cycle, as in one process, then `timed` timed iterations."""
    ctx = join_ranks()
    try:
        blocks, predicted, bits, lagged = variant
        plan = Plan([tuple(b) for b in blocks], predicted, [0.0] * len(blocks))
        compression = CompressionSettings(bits=bits) if bits else None
        solver = RankAdmmSolver(
            ctx, make_model(depth, width, data), data, settings, SEED, plan, compression,
            lagged_stats=lagged,
        )  # fmt: skip
        solver.load_state_dict(state)
        for _ in range(timed):
            solver.step()
        totals = {"wall": 0.0, "cpu": 0.0, "compute": 0.0, "wait": 0.0}
        sent0 = solver.exchange.stats.bytes_sent
        dist.barrier()
        threads = thread_cpu_s()
        for _ in range(timed):
            tic, cpu = time.perf_counter(), time.process_time()
            last = solver.step()
            totals["wall"] += time.perf_counter() - tic
            totals["cpu"] += time.process_time() - cpu
            totals["compute"] += last["compute_s"]
            totals["wait"] += last["wait_s"]
        last = solver.settle() or last  # the last iteration's (lagged) stats
        split = split_thread_cpu(threads, thread_cpu_s(), timed)
        dist.barrier()
        return {
            **split,
            "iteration_s": totals["wall"] / timed,
            "cpu_s": totals["cpu"] / timed,
            "compute_s": totals["compute"] / timed,
            "wait_s": totals["wait"] / timed,
            "bytes_sent": (solver.exchange.stats.bytes_sent - sent0) / timed,
            "state_bytes": solver.state_bytes(),
            "layers": [solver.start, solver.stop],
            "loss": last.get("loss"),
            "peak_rss_mib": peak_rss_mib(),
        }
    finally:
        shutdown()


def admm_variants(
    depth, width, data, settings, warm, plans: dict, cycle: int
) -> tuple[list[dict], list[float]]:
    """Each 2-rank variant in its own pair of processes, as the one-process baseline holds one
    solver (four solvers per process, taking turns, ran ~20 % slower per rank than one did:
    4x the stored tensors); the headline "balanced" runs first and last, the faster kept, as the
    baseline is timed before and after."""
    order = ["balanced", *[name for name in plans if name != "balanced"], "balanced"]
    ranks: list[dict] = [{}, {}]
    headline: list[float] = []  # both "balanced" runs, reported
    for name in order:
        run = spawn(
            _admm_ranks,
            2,
            args=(depth, width, data, settings, warm, plans[name], cycle),
            timeout_s=600,
        )
        slower = max(r["iteration_s"] for r in run)
        if name == "balanced":
            headline.append(slower)
        if name in ranks[0] and max(r[name]["iteration_s"] for r in ranks) <= slower:
            continue
        for mine, got in zip(ranks, run):
            mine[name] = got
            if name == "balanced":
                mine["peak_rss_mib"] = got["peak_rss_mib"]
    return ranks, headline


# ----------------------------------------------------------------------------- pipeline
def threaded_single_process(
    admm_run: Callable[[], dict], adam_run: Callable[[], dict], threads: int = 2
) -> dict:
    """Seconds per iteration of one process with `threads` intra-op threads (ADMM's layer steps
    and Adam's steps run as before): what the machine's cores give without splitting the
    model, the honest reference for a 2-rank speedup when the model fits one process."""
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"admm": admm_run()["iteration_s"], "adam": adam_run()["step_s"]}
    finally:
        torch.set_num_threads(kept)


def adam_single_process(model, data, settings: AdamSettings, timed: int) -> dict:
    """Seconds per Adam step of the whole model in one process (one thread)."""
    solver = AdamSolver(model, data, settings, SEED)
    solver.step()
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(timed):
        solver.step()
    return {
        "step_s": (time.perf_counter() - tic) / timed,
        "cpu_s": (time.process_time() - cpu) / timed,
    }


def _pipeline_ranks(depth, width, data, settings, microbatches, timed) -> dict:
    """GPipe and 1F1B solvers step in rotation (background load hits both alike)."""
    ctx = join_ranks()
    try:
        solvers = {}
        for schedule in ("gpipe", "1f1b"):
            model = make_model(depth, width, data)
            solvers[schedule] = PipelineSolver(
                ctx, model, data, settings, SEED, schedule, microbatches
            )
            solvers[schedule].step()
        totals = {k: [0.0, 0.0] for k in solvers}
        dist.barrier()
        for _ in range(timed):
            for schedule, solver in solvers.items():
                tic, cpu = time.perf_counter(), time.process_time()
                solver.step()
                totals[schedule][0] += time.perf_counter() - tic
                totals[schedule][1] += time.process_time() - cpu
        dist.barrier()
        out = {k: {"step_s": w / timed, "cpu_s": c / timed} for k, (w, c) in totals.items()}
        out["peak_rss_mib"] = peak_rss_mib()
        return out
    finally:
        shutdown()


# ----------------------------------------------------------------------------- machine ceiling
def conv_loop(repeats: int) -> float:
    """Seconds for a fixed, perfectly parallel workload (no communication at all)."""
    torch.set_num_threads(1)
    x, w = torch.randn(16, 16, 64, 64), torch.randn(16, 16, 3, 3)
    torch.nn.functional.conv2d(x, w, padding=1)
    tic = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.conv2d(x, w, padding=1)
    return time.perf_counter() - tic


def _conv_ranks(repeats: int) -> float:
    join_ranks()
    try:
        conv_loop(3)
        dist.barrier()  # both ranks start together (not while the other still imports)
        seconds = conv_loop(repeats)
        dist.barrier()
        return seconds
    finally:
        shutdown()


def parallel_ceiling(repeats: int = 150) -> float:
    """Speedup 2 processes get on work that needs no communication, measured now: what this
    machine (cores shared with whatever else runs) allows any 2-rank method at best."""
    one = spawn(_conv_ranks, 1, args=(repeats,), timeout_s=120)[0]  # same kind of process
    two = max(spawn(_conv_ranks, 2, args=(repeats,), timeout_s=120))
    return 2 * one / two


def _chain_ranks(depth, width, data, settings: AdmmSettings, warm: dict, cycle: int) -> float:
    """The whole ADMM chain in this process, as the one-process baseline runs it, while the
    other process runs it too (no messages between them): seconds per iteration."""
    join_ranks()
    try:
        model = make_model(depth, width, data)
        dist.barrier()  # both start together
        return admm_single_process(model, data, settings, warm, cycle)["iteration_s"]
    finally:
        shutdown()


def workload_ceiling(single_s: float, depth, width, data, settings, warm, cycle) -> dict:
    """What this machine allows 2 ranks on THIS workload: 2 x the one-process iteration over
    the iteration of one whole chain while a second one runs beside it. Two ranks with no
    communication cost at all, each doing half the work at that shared-machine pace, would
    reach it; the conv-loop ceiling above misses what the ADMM step shares (memory, caches)."""
    both = spawn(_chain_ranks, 2, args=(depth, width, data, settings, warm, cycle), timeout_s=600)
    return {"speedup": 2 * single_s / max(both), "chain_s_two_at_once": max(both)}


# ----------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class Codec:
    """8-bit boundary messages for the model: their size and the compute thread's cost of
    encoding one (with error feedback) and decoding one, measured on this machine."""

    message_bytes: float
    encode_s: float
    decode_s: float


def measure_codec(shape: tuple[int, ...], repeats: int = 20) -> Codec:
    """Median time to encode (8 bits, error feedback) and to decode one boundary message of
    `shape`, in the CPU's activation layout and wire order, one thread."""
    message = torch.relu(torch.randn(shape)).contiguous(memory_format=torch.channels_last)
    encoder = ErrorFeedbackEncoder(CompressionSettings(bits=8))
    times: dict[str, list[float]] = {"encode": [], "decode": []}
    for _ in range(repeats + 2):  # the first two compile / warm up; not counted
        start = time.perf_counter()
        buffer = encoder.encode(message, slot=0, generation=0, nhwc=True)
        middle = time.perf_counter()
        decode(buffer, message.shape, encoder.settings, nhwc=True)
        times["encode"].append(middle - start)
        times["decode"].append(time.perf_counter() - middle)
    encode_s, decode_s = (float(np.median(v[2:])) for v in times.values())
    return Codec(float(buffer.numel()), encode_s, decode_s)


def project(
    t_hidden: float,
    t_ends: float,
    message_bytes: float,
    adam_layer_s: float,
    pipe_act_bytes: float,
    microbatches: int,
    bandwidth: float,
    latency: float,
    codec: Codec | None = None,
) -> list[dict]:
    """Per-iteration speedup over one rank for ADMM and GPipe at N ranks and depth D.

    ADMM: slowest block = ceil(D/N) hidden layers (+ stem or head), its two boundary messages
    (up and down, `message_bytes` each) overlap the interior layers; plus one small all-reduce
    (log2 N latencies). With `codec`, also with 8-bit messages: smaller, but each rank encodes
    two and decodes two on its compute thread. GPipe: (M+K-1) slots of T1/(K M) each, plus per
    slot one activation forward and one gradient backward of a micro-batch over the link.
    """
    rows = []
    for depth in (32, 64, 128, 256):
        t1_admm = depth * t_hidden + t_ends
        t1_adam = (depth + 2) * adam_layer_s
        for n in (4, 8, 16, 32, 64):
            if n > depth:
                continue
            per_rank = math.ceil(depth / n)
            compute = per_rank * t_hidden + t_ends / 2
            interior = max(per_rank - 2, 0) * t_hidden
            comm = 2 * (message_bytes / bandwidth + latency)
            admm_t = compute + max(0.0, comm - interior) + math.log2(n) * latency
            m, k = microbatches, n
            slot = t1_adam / (k * m) + 2 * (pipe_act_bytes / m / bandwidth + latency)
            pipe_t = (m + k - 1) * slot
            row = {
                "depth": depth,
                "ranks": n,
                "admm_speedup": round(t1_admm / admm_t, 2),
                "gpipe_speedup": round(t1_adam / pipe_t, 2),
                "gpipe_bubble": round((k - 1) / (m + k - 1), 3),
            }
            if codec is not None:
                coded = compute + 2 * (codec.encode_s + codec.decode_s)
                comm = 2 * (codec.message_bytes / bandwidth + latency)
                admm_8bit_t = coded + max(0.0, comm - interior) + math.log2(n) * latency
                row["admm_speedup_8bit"] = round(t1_admm / admm_8bit_t, 2)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- time to IoU
def _iou(model, val: TensorBatches) -> float:
    with torch.no_grad():
        pred = model(val.images).argmax(1)
    cm = confusion_matrix(pred, val.labels, 2)
    tp = float(cm[1, 1])
    denom = float(cm[1, :].sum() + cm[:, 1].sum()) - tp
    return tp / denom if denom > 0 else 0.0


def _race(kind, depth, width, data, val, settings, budget_s, every, target) -> dict:
    """2 ranks train for `budget_s`; rank 0 snapshots weights every `every` iterations and
    evaluates them afterwards (evaluation time not counted)."""
    ctx = join_ranks()
    try:
        model = make_model(depth, width, data)
        if kind == "admm":
            solver = RankAdmmSolver(ctx, model, data, settings, SEED)
        else:
            solver = PipelineSolver(ctx, model, data, settings, SEED, "gpipe", 8)
        snapshots, elapsed = [], 0.0
        while True:
            tic = time.perf_counter()
            solver.step()
            elapsed += time.perf_counter() - tic
            go = torch.tensor([1.0 if elapsed < budget_s else 0.0])
            dist.broadcast(go, src=0)
            if solver.iteration % every == 0 or not go.item():
                gathered = solver.gather_model()
                if gathered is not None:
                    weights = {k: v.clone() for k, v in gathered.state_dict().items()}
                    snapshots.append((elapsed, solver.iteration, weights))
            if not go.item():
                break
        if ctx.rank != 0:
            return {}
        curve = []
        for seconds, iteration, weights in snapshots:
            model.load_state_dict(weights)
            curve.append([round(seconds, 1), iteration, round(_iou(model, val), 4)])
        hit = next((c for c in curve if c[2] >= target), None)
        return {"curve": curve, "time_to_target_s": hit[0] if hit else None}
    finally:
        shutdown()


def run_race(args, depth, data, admm_settings, adam_settings) -> dict:
    """Time to the target validation IoU: 2-rank ADMM vs 2-rank GPipe, same budget."""
    val = load_crops(args.crop, 48, validation=True, seed=2)
    race = {}
    for kind, settings in (("admm", admm_settings), ("gpipe", adam_settings)):
        result = spawn(
            _race,
            2,
            args=(kind, depth, args.width, data, val, settings, args.race_s, 20, args.target_iou),
            timeout_s=args.race_s * 3 + 300,
        )
        race[kind] = result[0]
    return {"target": args.target_iou, "budget_s": args.race_s, "depth": depth, **race}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute")
    parser.add_argument("--depth", type=int, help="hidden layers (quick 8, full 16)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8, help="pipeline micro-batches M")
    parser.add_argument("--bandwidth-gbit", type=float, default=10.0, help="link for the model")
    parser.add_argument("--latency-us", type=float, default=50.0, help="per message, the model")
    parser.add_argument("--target-iou", type=float, default=0.05, help="full mode race target")
    parser.add_argument("--race-s", type=float, default=240.0, help="full mode race budget")
    parser.add_argument("--race-only", action="store_true", help="only the time-to-IoU race")
    parser.add_argument(
        "--admm",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override [admm] settings, e.g. --admm keep_retired=true",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    retained = retain_freed_memory()  # as `geodnn train` does (GEODNN_RETAIN_FREED_MEMORY=0: off)
    depth = args.depth or (8 if args.quick else 16)
    if args.race_only:
        data = load_crops(args.crop, 128, validation=False, seed=1)
        admm_settings, adam_settings = settings_for(args, data)
        summary = {"benchmark": "scaling", "mode": "race-only"}
        summary["time_to_iou"] = run_race(args, depth, data, admm_settings, adam_settings)
        print(json.dumps(summary))
        return 0
    timed = 5 if args.quick else 10
    started = time.perf_counter()
    load_at_start = [round(v, 2) for v in os.getloadavg()]

    data = load_crops(args.crop, 128, validation=False, seed=1)
    admm_settings, adam_settings = settings_for(args, data)
    layers = depth + 2
    warmup = 2 * layers + admm_settings.slots

    ceiling_before = parallel_ceiling()
    # ADMM: warm state once; one process timed before and after the ranks (best of the two)
    warm = admm_warm_state(make_model(depth, args.width, data), data, admm_settings, warmup)
    # a layer's work varies over the crop pool's refresh cycle: time whole cycles
    pool = make_pool(admm_settings, len(data), layers, SEED)
    cycle = pool.slots * pool.refresh_every

    def single_run() -> dict:
        model = make_model(depth, args.width, data)
        return admm_single_process(model, data, admm_settings, warm, cycle)

    first = single_run()
    costs = [LayerCost(s) for s in first["per_layer_s"]]
    plan = balance(costs, 2)
    even = even_blocks(layers, 2)
    even_pred = [sum(first["per_layer_s"][a:b]) for a, b in even]
    plans = {
        "balanced": (plan.blocks, plan.predicted_s, None, True),
        "balanced_8bit": (plan.blocks, plan.predicted_s, 8, True),
        "even": (even, even_pred, None, True),
        "balanced_blocking_stats": (plan.blocks, plan.predicted_s, None, False),
    }
    ranks, headline = admm_variants(depth, args.width, data, admm_settings, warm, plans, cycle)
    second = single_run()
    single = min(first, second, key=lambda r: r["iteration_s"])
    chains = (depth, args.width, data, admm_settings, warm, cycle)
    workload = workload_ceiling(single["iteration_s"], *chains)

    def adam_run() -> dict:
        model = make_model(depth, args.width, data)
        return adam_single_process(model, data, adam_settings, timed)

    adam_first = adam_run()
    pipe = spawn(
        _pipeline_ranks,
        2,
        args=(depth, args.width, data, adam_settings, args.microbatches, timed),
        timeout_s=600,
    )
    adam = min(adam_first, adam_run(), key=lambda r: r["step_s"])
    adam_1 = adam["step_s"]
    threads = threaded_single_process(single_run, adam_run)

    ceiling = (ceiling_before + parallel_ceiling()) / 2
    admm_2 = {k: max(r[k]["iteration_s"] for r in ranks) for k in plans}
    pipe_2 = {k: max(r[k]["step_s"] for r in pipe) for k in ("gpipe", "1f1b")}
    pipe_cpu = {k: max(r[k]["cpu_s"] for r in pipe) for k in ("gpipe", "1f1b")}
    admm_cpu = {k: max(r[k]["cpu_s"] for r in ranks) for k in plans}
    hidden = single["per_layer_s"][1:-1]
    t_hidden = sum(hidden) / len(hidden)
    t_ends = single["per_layer_s"][0] + single["per_layer_s"][-1]
    message_bytes = ranks[0]["balanced"]["bytes_sent"]  # rank 0 sends one message (up)
    act_bytes = args.batch * args.width * args.crop**2 * 4
    codec = measure_codec((args.batch, args.width, args.crop, args.crop))
    projection = project(
        t_hidden,
        t_ends,
        message_bytes,
        adam_1 / layers,
        act_bytes,
        args.microbatches,
        args.bandwidth_gbit * 1e9 / 8,
        args.latency_us * 1e-6,
        codec,
    )
    crops = admm_settings.slots * admm_settings.batch_size
    width, crop = args.width, args.crop
    hidden_bytes = layer_memory_for(admm_settings, width, width, 3, crops, crop, crop, head=False)
    memory_vs_depth = [
        {
            "depth": d,
            "state_mib_per_rank_1": round(d * hidden_bytes / 2**20, 1),
            "state_mib_per_rank_2": round(math.ceil(d / 2) * hidden_bytes / 2**20, 1),
            "state_mib_per_rank_8": round(math.ceil(d / 8) * hidden_bytes / 2**20, 1),
        }
        for d in (8, 16, 32, 64, 128, 256)
    ]
    best_pipe = min(pipe_2.values())
    summary = {
        "benchmark": "scaling",
        "mode": "quick" if args.quick else "full",
        "machine_cores": os.cpu_count(),
        "depth": depth,
        "width": args.width,
        "batch": args.batch,
        "crop": args.crop,
        "microbatches": args.microbatches,
        "admm_overrides": args.admm,
        "timing": f"ADMM: mean over one refresh cycle ({cycle} iterations) after one untimed "
        "cycle, from one warm state, each 2-rank variant in its own processes (balanced first "
        "and last, best kept), 1 rank best of before/after; Adam/pipeline: "
        f"mean of {timed} steps, schedules in rotation, 1 process best of before/after",
        "load_average_at_start": load_at_start,
        "allocator_retains_freed_memory": retained,
        "admm_iteration_s_1": round(single["iteration_s"], 4),
        "admm_iteration_s_2": {k: round(v, 4) for k, v in admm_2.items()},
        "admm_speedup_2": round(single["iteration_s"] / admm_2["balanced"], 3),
        "admm_speedup_2_first_last_run": [round(single["iteration_s"] / t, 3) for t in headline],
        "admm_speedup_2_even_split": round(single["iteration_s"] / admm_2["even"], 3),
        "admm_speedup_2_8bit": round(single["iteration_s"] / admm_2["balanced_8bit"], 3),
        "admm_speedup_2_blocking_stats": round(
            single["iteration_s"] / admm_2["balanced_blocking_stats"], 3
        ),
        "adam_step_s_1": round(adam_1, 4),
        # one process on both cores (intra-op threads), against one thread
        "threads_speedup_2": {
            "admm": round(single["iteration_s"] / threads["admm"], 3),
            "adam": round(adam_1 / threads["adam"], 3),
        },
        "pipeline_step_s_2": {k: round(v, 4) for k, v in pipe_2.items()},
        "pipeline_speedup_2": round(adam_1 / best_pipe, 3),
        "pipeline_speedup_2_gpipe": round(adam_1 / pipe_2["gpipe"], 3),
        "pipeline_speedup_2_1f1b": round(adam_1 / pipe_2["1f1b"], 3),
        "parallel_ceiling_2": round(ceiling, 3),
        "parallel_ceiling_note": "2-process speedup of a communication-free conv loop, measured "
        "before and after (mean): the most any 2-rank method can show on this machine now",
        "admm_efficiency_vs_ceiling": round(
            single["iteration_s"] / admm_2["balanced"] / ceiling, 3
        ),
        "pipeline_efficiency_vs_ceiling": round(adam_1 / best_pipe / ceiling, 3),
        "admm_workload_ceiling_2": round(workload["speedup"], 3),
        "admm_workload_ceiling_note": "2 x the one-process ADMM iteration / the iteration of "
        f"one whole chain while another runs beside it ({workload['chain_s_two_at_once']:.4f} s):"
        " the 2-rank speedup if exchanging messages cost nothing",
        "admm_efficiency_vs_workload_ceiling": round(
            single["iteration_s"] / admm_2["balanced"] / workload["speedup"], 3
        ),
        "cpu_time_speedup_2": {
            "note": "CPU seconds of one process / largest per-rank CPU seconds per iteration: "
            "what 2 uncontended cores would give if communication stayed hidden",
            "admm": round(single["cpu_s"] / admm_cpu["balanced"], 3),
            "admm_even_split": round(single["cpu_s"] / admm_cpu["even"], 3),
            "gpipe": round(adam["cpu_s"] / pipe_cpu["gpipe"], 3),
            "1f1b": round(adam["cpu_s"] / pipe_cpu["1f1b"], 3),
        },
        "admm_iteration_over_adam_step_2ranks": round(admm_2["balanced"] / best_pipe, 3),
        "admm_ideal_speedup_2": ideal_speedups(single["rows"], plan.blocks),
        "balance": {
            "blocks": plan.blocks,
            "predicted_s": [round(s, 4) for s in plan.predicted_s],
            "measured_compute_s": [round(r["balanced"]["compute_s"], 4) for r in ranks],
            "even_blocks": even,
            "even_measured_compute_s": [round(r["even"]["compute_s"], 4) for r in ranks],
        },
        "cpu_s_per_iteration_per_rank": {  # /proc clock ticks (10 ms) over the timed iterations
            "compute_thread": [_maybe_round(r["balanced"]["compute_thread_cpu_s"]) for r in ranks],
            "other_threads": [_maybe_round(r["balanced"]["other_threads_cpu_s"]) for r in ranks],
            "one_process": round(single["cpu_s"], 4),
        },
        "bytes_per_iteration_rank0": {
            "plain": ranks[0]["balanced"]["bytes_sent"],
            "int8": ranks[0]["balanced_8bit"]["bytes_sent"],
            "ratio": round(
                ranks[0]["balanced"]["bytes_sent"] / ranks[0]["balanced_8bit"]["bytes_sent"], 2
            ),
        },
        "head_loss_after_timed_iterations": {
            "plain": ranks[-1]["balanced"]["loss"],
            "int8": ranks[-1]["balanced_8bit"]["loss"],
        },
        "state_bytes_per_rank": [r["balanced"]["state_bytes"] for r in ranks],
        "peak_rss_mib_per_rank": {
            "admm": [round(r["peak_rss_mib"], 1) for r in ranks],
            "pipeline": [round(r["peak_rss_mib"], 1) for r in pipe],
        },
        "memory_vs_depth_formula": memory_vs_depth,
        "cost_model": {
            "bandwidth_gbit": args.bandwidth_gbit,
            "latency_us": args.latency_us,
            "hidden_layer_step_s": round(t_hidden, 4),
            "message_bytes": message_bytes,
            "message_bytes_8bit": codec.message_bytes,
            "encode_decode_s_8bit": [round(codec.encode_s, 5), round(codec.decode_s, 5)],
            "adam_layer_s": round(adam_1 / layers, 5),
            "projection": projection,
        },
    }
    if not args.quick:
        summary["time_to_iou"] = run_race(args, depth, data, admm_settings, adam_settings)
    else:
        summary["time_to_iou"] = "not measured in quick mode (run without --quick)"
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
