"""Gradient-free, layer-parallel training of a ChainNet: a pipelined local-solve ADMM over a
crop pool.

API notes for the runtime (geodnn.parallel) and the trainer; changes from the brief are listed.
- `layer_step(state, below, above, pool, data, iteration, settings) -> StepResult` is pure: it
  reads only its arguments, returns a NEW LayerState and never writes into the old one's tensors.
- Messages: `up` is the layer's real activation relu(W p + b) for slot (t - l) mod S
  (B, C_out, h, w); `down` is the input change dp it asks of its lower neighbour (B, C_in, h, w)
  for the slot its upper neighbour's request was about. Both carry (slot, generation). The stem
  sends no `down`, the head no `up`.
- CHANGE: LayerState stores each slot's real INPUT (not the upper layer's request): a request is
  used the iteration it arrives, on the stored input of its slot. The head updates on arrival.
- CHANGE: build the pool with `make_pool(settings, len(data), num_layers, seed)` (refresh_every
  0 = auto). `data` is read by the stem (images) and the head (labels) only.
- The stem's state carries the model's band normalization; the head reads settings.class_weights.
- `init_layer_states(model, settings, indices=None)`: `indices` builds only those layers' states
  (a rank's block).
- Beyond the Solver protocol, AdmmSolver.step() also returns max_layer_s (the ideal
  layer-parallel time of the iteration), sum_layer_s (sequential), head_loss (the head's loss on
  its pipelined input), max_rel_step and layers_updated; `layer_stats` holds each layer's stats.
  "loss" is the real network's plain-forward loss on the stem's batch of iteration t (monitor =
  true; with monitor = false it is head_loss and costs nothing extra). `finished()` applies the
  stopping rule (max_iterations, patience).

The schedule
------------
A pool of P = S x B crops sits in S slots. At iteration t every layer l, from the previous
iteration's messages only (Jacobi; all layers at once), does two halves:
- forward: takes the activation of slot (t - l) mod S that l - 1 computed at t - 1, stores it as
  the slot's input and sends relu(W p + b) up. The network that is fed forward is the REAL one
  (weights at most one iteration stale per layer, as in PipeDream); there is no relaxed copy of
  the activations, hence no relaxation gap (the failure of probe 1).
- backward: takes the request dq that l + 1 sent at t - 1 for some slot k, forms a target on the
  stored input p_k of that slot, solves its local subproblems, and sends its own request down.
The head does both halves on its fresh input. So requests travel down one layer per iteration,
2 (L - 1 - l) iterations from the head's forward to layer l. A slot's crops are replaced every R
stem visits (generation + 1); by default R is the smallest with S R >= refresh_margin x 2 L, and
(stagger_refresh) slot k changes k R iterations early, so the S changes are spread over the
cycle of S R iterations instead of falling in S consecutive ones. A request that arrives after
its slot changed is dropped (with the slot's dual): with margin 1 (the default) at depth 16 the
stem keeps ~10 % of its updates, the mid layers ~50 %, the top ones all; margin 2 lets the stem
keep about half, at the price of more work per iteration and each crop reused twice as long.
Measured (both scenes, 60 s per solver, one seed; IoU ratio ADMM / Adam): depth 16 0.66 -> 0.85
and 0.96 in two runs, but depth 8 0.62 -> 0.49 and depth 32 0.79 -> 0.61, a wash over the
depths, so the default stays 1; margin 0.5 (fresher crops, more drops) lost on both scenes
(depth 16, seed 0: IoU 0.094 / 0.126 against 0.133-0.158 / 0.173-0.181). With keep_retired each
layer keeps the previous generation of every slot (input and pre-activation) until the next
change, so no request is dropped and every layer updates every iteration. Measured (Vegas, depth
16, 32 px crops, 400 iterations, two seeds): training loss the same within 2 %, validation IoU
+0.01, 20 % more time per iteration, twice the stored memory; so it is off by default. Dropped
requests make a layer's work uneven (a full update ~5x its forward half); unstaggered, the drops
after the simultaneous changes leave the low layers nearly idle for several iterations in a row
while the top ones are not, which on N ranks (each a contiguous block) made the low blocks wait:
measured (depth 8, 2 ranks, 3 runs each) 2-rank speedup 1.33-1.55 unstaggered, 1.56-1.80
staggered. Requests reach the low layers scaled by request_gain^distance, so with the default
gain those layers take tiny steps either way.

Iterate averaging (average_decay > 0, e.g. 0.99; off by default): every layer keeps a
bias-corrected exponential moving average of its own weights over ~1 / (1 - decay) iterations, a
layer-local addition (no message), and that average is the network users get: write_back puts it
in the model (so the monitored loss, validation, checkpoints' model and predictions use it;
gather_model sends it), while the iteration goes on from the raw weights. ADMM's convergence
guarantees are stated for averaged (ergodic) iterates, and here the raw iterate's validation IoU
swings by up to +-0.1 between snapshots as the head's decision threshold moves. Measured (both
scenes, 60 s, one seed a run, IoU over the last quarter of the budget): the spread of the
averaged network's IoU over the six snapshots was 2-6x smaller than the raw iterate's in every
run (std 0.003-0.010 against 0.008-0.049); its mean moved by +0.006 on average over eight scene
x depth runs (-0.013 to +0.039), and in the shipped `geodnn run` (600 iterations, still
improving fast) the average, ~50 iterations behind, scored 0.206 road IoU against the raw
iterate's 0.230. So averaging buys steadiness for long runs, not a higher IoU, and is off by
default. Adam's weights averaged the same way also scored lower at this stage of training.

The local subproblems of one backward half (geodnn.solvers.subproblems), on slot input p:
1. z0 = W p + b, stored by the forward half with p (the weights of that moment: a conv saved).
2. Target z*. Head: per-pixel proximal step on class-weighted cross-entropy with the ignore
   index, argmin CE(z; y) + head_nu/2 ||z - z0||^2 (Newton). Hidden: want = relu(z0) + dq;
   q = (nu relu(z0) + u + rho want) / (nu + rho); then the closed-form ReLU z-step
   argmin (z - z0)^2 + relu_fit (q - relu(z))^2 (it can switch an off unit on).
   The q-step, the z-step and dz = z* - z0 run on the CPU as one compiled loop
   (geodnn.solvers.kernels, numba) that also sums the squares the step needs: ~10 memory-bound
   torch passes become one; measured at depth 16, batch 8: 0.122 -> 0.109 s per iteration.
3. W-step: ridge least squares dW = argmin mean||dW [x;1] - (z* - z0)||^2 + lam ||dW||^2 over the
   slot's patches; the patch Gram is an exponentially decayed running mean across iterations (a
   bounded mini-batch curvature estimate, subsampled by gram_stride), the step is capped to a
   relative trust region max_rel_step. Measured (benchmarks/admm_directions.py, depth 16, after
   150 iterations): this step points along the input-whitened gradient of the real network's
   loss on the same crops (-grad (G + lam I)^-1; cosine 0.96 at the head, 0.89-0.92 two to five
   layers below it, 0.6-0.7 in the lowest layers), so the stale pipelined schedule keeps good
   directions (a more damped direction, ridge 0.1-1 x the Gram's mean diagonal, rescaled to
   this step's size, lost on both scenes: the whitening helps); from four layers below the
   head the steps are 1.6-20x smaller than Adam's, the head's 17-35x larger (after 400
   iterations). With momentum m > 0 each W-step adds m x the
   layer's previous step (heavy ball; the velocity is layer state, no message). Measured (both
   scenes, 60 s, paired): mean IoU 0.168 -> 0.184 / 0.196 (momentum 0.5 / 0.6) with seed 0 and
   0.130 -> 0.139 / 0.141 with seed 1, but the IoU snapshots swing 2-3x more and the training
   loss of the last quarter rose (seed 1: 0.344 -> 0.426 / 0.411); 0.8 diverged. So it is off.
4. p-step: dp = argmin ||W dp - (z* - z0)||^2 + p_rho ||dp||^2 with the weights W of the previous
   iterate (Jacobi; p_after_w: the residual z* - W_new p - b_new of the new weights instead) by
   cg_steps CG iterations (conv2d and its adjoint conv_transpose2d), times p_damping: the request
   sent down. With request_gain > 0 it is rescaled to request_gain x the incoming request's rms:
   the ReLU mask and the q- and z-step gains shrink requests ~2-5x per layer otherwise, and layers
   far from the head would barely move (1.0 diverged at depth 16; 0.7 is the default). With one
   CG step and a gain, dp is just W^T r rescaled (one transposed convolution).
   step_scale < 1 makes each layer below the head fit only that share of its target change: every
   layer fits the whole request at once, so together they overshoot by up to the depth.
5. Dual (switch `dual`): u += rho (want - q).

Memory per layer (float32, resident), P = S B crops of h x w pixels, D = C_in k^2 + 1:
    stem and hidden   P h w (C_in + C_out) 4 bytes: input and pre-activation per slot, twice
                      with keep_retired (+ P h w C_out 4 bytes with the dual on)
    head              P h w C_in 4 bytes (it updates on arrival and keeps no retired copy)
    every layer       patch Gram D^2 4 bytes; weights and bias C_out D 4 bytes, once more for
                      the momentum's last step (momentum > 0) and once more for
                      the running average (average_decay > 0)
`layer_memory_formula` evaluates it (`layer_memory_for` with the switches read from the
settings) and `layer_state_bytes` measures a state. Transient per step:
one slot's output, target and request, about B h w (C_in + 3 C_out) 4 bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch.nn import functional as F

from ..data import Batches
from ..errors import DivergenceError, GeodnnError
from ..model import ChainNet, as_activation
from ..runtime import wait_for_device
from .base import LossWatch, check_class_weights, check_same_stream, settings_from_dict
from .pool import CropPool, auto_refresh
from .subproblems import (
    add_step,
    cg_p_step,
    head_prox,
    hidden_target_change,
    patch_cross,
    patch_gram,
    ridge_step,
    rms,
    weighted_cross_entropy,
)


@dataclass
class AdmmSettings:
    """Hyperparameters of the ADMM solver (the [admm] table of a training config)."""

    batch_size: int = 8  # B: crops per slot (mini-batch)
    slots: int = 8  # S: slots in the crop pool; each layer revisits a slot every S iterations
    refresh_every: int = 0  # stem visits of a slot before its crops change (0: auto)
    refresh_margin: float = 1.0  # auto refresh: S R >= refresh_margin x 2 L (head-stem trip)
    stagger_refresh: bool = True  # slots change crops at evenly spread times, not all at once
    head_nu: float = 2.0  # head prox weight: larger = smaller per-pixel logit steps
    head_nu_growth: float = 1.0  # continuation: head_nu is multiplied by this each iteration
    head_nu_max: float = 1e6  # upper bound of the continuation
    head_newton_steps: int = 4  # Newton iterations of the per-pixel head prox
    nu: float = 1.0  # hidden q-step: pull of q towards relu(z0)
    rho: float = 4.0  # hidden q-step: pull of q towards the requested output (and dual step)
    relu_fit: float = 9.0  # ReLU z-step: weight of relu(z) ~ q against z ~ z0
    dual: bool = False  # keep and update the dual u on each boundary (per slot)
    lam: float = 0.01  # ridge pull of the W-step towards the old weights
    gram_decay: float = 0.9  # running patch Gram: G <- decay G + (1 - decay) G_batch
    gram_stride: int = 6  # Gram from every gram_stride-th pixel row/column (cost / stride^2)
    max_rel_step: float = 0.05  # trust region: ||dW|| <= max_rel_step ||W|| (0 = no cap)
    momentum: float = 0.0  # > 0: heavy ball, each W-step adds this x the layer's previous step
    normalized_step: float = 0.0  # > 0: every W-step rescaled to this relative size (LARS-like)
    cg_steps: int = 1  # CG iterations of the p-step
    p_rho: float = 0.1  # Tikhonov weight of the p-step
    p_damping: float = 1.0  # factor on the input change sent down
    p_after_w: bool = False  # p-step on the residual left by the NEW weights (else: old, Jacobi)
    request_gain: float = 0.7  # > 0: the request sent down gets this x the incoming one's rms
    step_scale: float = 1.0  # below the head: each W-step fits this share of its target change
    keep_retired: bool = False  # keep each slot's previous generation too: no request dropped
    average_decay: float = 0.0  # > 0: EMA of each layer's weights is the network users get
    class_weights: list[float] | None = None  # per-class loss weights (None = equal)
    max_iterations: int = 0  # stopping rule: stop after this many iterations (0 = no limit)
    patience: int = 0  # stopping rule: stop after this many iterations without a new best loss
    divergence_factor: float = 20.0  # DivergenceError when loss > factor x best loss so far
    divergence_warmup: int = 10  # iterations before the loss-ratio check starts
    monitor: bool = True  # measure the real network's loss every step (one plain forward)

    @classmethod
    def from_dict(cls, values: dict) -> AdmmSettings:
        """Settings from a config table; unknown keys are an error that names them."""
        settings = settings_from_dict(cls, values, "admm")
        settings.check()
        return settings

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        counts = ("batch_size", "slots", "gram_stride", "cg_steps", "head_newton_steps")
        bad = [n for n in counts if int(getattr(self, n)) < 1]
        limits = ("refresh_every", "max_iterations", "patience", "divergence_warmup")
        bad += [n for n in limits if int(getattr(self, n)) < 0]
        positive = ("head_nu", "nu", "rho", "relu_fit", "refresh_margin", "step_scale")
        positive += ("head_nu_growth", "head_nu_max", "divergence_factor")
        bad += [n for n in positive if not getattr(self, n) > 0]
        nonnegative = ("lam", "p_rho", "request_gain", "p_damping", "max_rel_step")
        bad += [n for n in (*nonnegative, "normalized_step") if not getattr(self, n) >= 0]
        unit = ("gram_decay", "average_decay", "momentum")
        bad += [n for n in unit if not 0 <= getattr(self, n) < 1]
        if bad:
            raise GeodnnError(
                f"invalid [admm] setting(s) {', '.join(bad)}: counts >= 1, limits >= 0, "
                "penalties, scales and factors > 0, lam, p_rho, gains, damping and step sizes "
                ">= 0, 0 <= gram_decay, average_decay, momentum < 1"
            )

    def head_nu_at(self, iteration: int) -> float:
        """Continuation of the head prox weight (a pure function of the iteration)."""
        if self.head_nu_growth == 1.0:
            return self.head_nu
        grown = self.head_nu * math.exp(iteration * math.log(self.head_nu_growth))
        return float(min(grown, self.head_nu_max))


@dataclass
class Message:
    """A boundary tensor for one slot of the pool at one generation."""

    slot: int
    generation: int
    tensor: torch.Tensor

    def to_dict(self) -> dict:
        return {"slot": self.slot, "generation": self.generation, "tensor": self.tensor}

    @classmethod
    def from_dict(cls, d: dict | None) -> Message | None:
        return None if d is None else cls(int(d["slot"]), int(d["generation"]), d["tensor"])


@dataclass
class LayerState:
    """Everything layer `index` owns: weights, running Gram, per-slot inputs and duals."""

    index: int
    num_layers: int
    kernel_size: int
    dilation: int
    weight: torch.Tensor
    bias: torch.Tensor
    gram: torch.Tensor | None = None
    inputs: list = field(default_factory=list)  # per slot: real input (B, C_in, h, w) or None
    input_generation: list = field(default_factory=list)  # per slot: its generation or -1
    duals: list = field(default_factory=list)  # per slot: Tensor (B, C_out, h, w) or None
    pre_activations: list = field(default_factory=list)  # per slot: W p + b when p arrived
    # the previous generation of each slot, kept until the requests about it have come back
    retired_inputs: list = field(default_factory=list)
    retired_pre_activations: list = field(default_factory=list)
    retired_generation: list = field(default_factory=list)
    band_mean: torch.Tensor | None = None  # stem only: per-band normalization
    band_std: torch.Tensor | None = None
    updates: int = 0  # W-steps taken
    velocity: torch.Tensor | None = None  # the last W-step [dW, db] (C_out, D), for momentum
    # the running average of the weights (average_decay > 0) and the steps it has seen
    average_weight: torch.Tensor | None = None
    average_bias: torch.Tensor | None = None
    averaged: int = 0

    def output_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's weights in the network users get: the average when one is kept."""
        if self.average_weight is None:
            return self.weight, self.bias
        return self.average_weight, self.average_bias

    @property
    def is_stem(self) -> bool:
        return self.index == 0

    @property
    def is_head(self) -> bool:
        return self.index == self.num_layers - 1

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel_size - 1) // 2

    def state_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["inputs"] = list(self.inputs)
        d["input_generation"] = [int(g) for g in self.input_generation]
        d["duals"] = list(self.duals)
        d["pre_activations"] = list(self.pre_activations)
        d["retired_inputs"] = list(self.retired_inputs)
        d["retired_pre_activations"] = list(self.retired_pre_activations)
        d["retired_generation"] = [int(g) for g in self.retired_generation]
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> LayerState:
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        slots = len(values["inputs"])  # states written before these fields existed
        for name in ("pre_activations", "retired_inputs", "retired_pre_activations"):
            values.setdefault(name, [None] * slots)
        values.setdefault("retired_generation", [-1] * slots)
        return cls(**values)


@dataclass
class StepResult:
    """What one layer step returns: its new state and the messages for its neighbours."""

    state: LayerState
    up: Message | None
    down: Message | None
    stats: dict[str, float]


def init_layer_states(
    model: ChainNet, settings: AdmmSettings, indices: Iterable[int] | None = None
) -> list[LayerState]:
    """One LayerState per layer of `model` (or per layer in `indices`), weights copied."""
    layers = list(model.layers)
    states = []
    for i in range(len(layers)) if indices is None else indices:
        layer = layers[i]
        spec = layer.spec
        states.append(
            LayerState(
                index=i,
                num_layers=len(layers),
                kernel_size=spec.kernel_size,
                dilation=spec.dilation,
                weight=layer.conv.weight.detach().clone(),
                bias=layer.conv.bias.detach().clone(),
                inputs=[None] * settings.slots,
                input_generation=[-1] * settings.slots,
                duals=[None] * settings.slots,
                pre_activations=[None] * settings.slots,
                retired_inputs=[None] * settings.slots,
                retired_pre_activations=[None] * settings.slots,
                retired_generation=[-1] * settings.slots,
                band_mean=model.band_mean.detach().clone() if i == 0 else None,
                band_std=model.band_std.detach().clone() if i == 0 else None,
            )
        )
    return states


def make_pool(settings, size: int, num_layers: int, seed: int) -> CropPool:
    """The crop pool of a run: `size` data crops, settings' slots, batch size and refresh.

    Adam's settings have no refresh_margin: its auto refresh is ADMM's default, margin 1."""
    margin = getattr(settings, "refresh_margin", 1.0)
    refresh = settings.refresh_every or auto_refresh(settings.slots, num_layers, margin)
    stagger = settings.stagger_refresh
    return CropPool(size, settings.slots, settings.batch_size, refresh, seed, stagger)


def saved_pool(saved_settings: dict, pool: CropPool, num_layers: int) -> CropPool:
    """The pool a checkpointed run used: its slots and generations must go on unchanged even
    when the config's refresh settings differ (states saved before refresh_margin and
    stagger_refresh existed: margin 1, all slots refreshed together)."""
    defaults = {"refresh_margin": 1.0, "stagger_refresh": False}
    saved = AdmmSettings.from_dict({**defaults, **saved_settings})
    used = make_pool(saved, pool.size, num_layers, pool.seed)
    return replace(pool, refresh_every=used.refresh_every, stagger=used.stagger)


def write_back(states: list[LayerState], model: ChainNet) -> None:
    """Copy every state's output weights (the average when one is kept) into the network."""
    with torch.no_grad():
        for state in states:
            conv = model.layers[state.index].conv
            weight, bias = state.output_weights()
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)


def layer_state_bytes(state: LayerState) -> int:
    """Resident bytes of a layer's state (weights, Gram, velocity, stored inputs and duals)."""
    tensors = [state.weight, state.bias, state.gram, state.velocity, *state.inputs, *state.duals]
    tensors += [state.average_weight, state.average_bias]
    tensors += state.pre_activations + state.retired_inputs + state.retired_pre_activations
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_memory_formula(
    c_in: int,
    c_out: int,
    kernel_size: int,
    crops: int,
    h: int,
    w: int,
    dual: bool,
    head: bool,
    retired: bool = False,
    averaged: bool = False,
    momentum: bool = False,
) -> int:
    """The documented resident memory of one layer in bytes (see the module docstring)."""
    d = c_in * kernel_size**2 + 1
    copies = 1 + int(averaged) + int(momentum)  # weights, their average, the last step
    weights = d * d * 4 + c_out * d * 4 * copies  # and the Gram
    if head:  # the head updates on arrival: its input of the current generation only
        return crops * h * w * 4 * c_in + weights
    # input and pre-activation, twice with the retired generation kept, plus the dual
    copies = 2 if retired else 1
    stored = crops * h * w * 4 * (copies * (c_in + c_out) + (c_out if dual else 0))
    return stored + weights


def layer_memory_for(settings: AdmmSettings, *layer: int, head: bool) -> int:
    """`layer_memory_formula` for `layer` = (c_in, c_out, kernel_size, crops, h, w) with every
    memory-relevant switch (dual, keep_retired, averaging, momentum) taken from `settings`, so
    that a caller cannot leave one out."""
    averaged, momentum = settings.average_decay > 0, settings.momentum > 0
    retired = settings.keep_retired
    return layer_memory_formula(*layer, settings.dual, head, retired, averaged, momentum)


def _conv(p: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: LayerState):
    return as_activation(F.conv2d(p, weight, bias, padding=s.padding, dilation=s.dilation))


def _stem_input(state: LayerState, pool: CropPool, data: Batches, slot: int, gen: int):
    x, _ = data.get(pool.indices(slot, gen))
    x = x.to(state.weight.device, torch.float32)
    x = (x - state.band_mean.view(1, -1, 1, 1)) / state.band_std.view(1, -1, 1, 1)
    return as_activation(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))


def _hidden_change(z0, request, dual, settings: AdmmSettings):
    """ReLU layer: (dz = z* - z0, the new dual, rms of dz, rms of the request); the q-step
    towards the request, then the closed-form z-step (`hidden_target_change`, one fused pass on
    the CPU)."""
    nu, rho, fit = settings.nu, settings.rho, settings.relu_fit
    # q = (nu act + u + rho (act + request)) / (nu + rho) = act + (u + rho request) / (nu + rho)
    if dual is None:
        change = hidden_target_change(z0, request, rho / (nu + rho), fit)
        request_rms = change.request_rms
    else:
        change = hidden_target_change(z0, dual + rho * request, 1.0 / (nu + rho), fit)
        request_rms = rms(request)
    if not settings.dual:
        return change.dz, None, change.dz_rms, request_rms
    # u + rho (want - q) with want - q = (nu request - u) / (nu + rho)
    u = dual if dual is not None else torch.zeros_like(z0)
    return change.dz, u + rho * (nu * request - u) / (nu + rho), change.dz_rms, request_rms


def _head_target(state, z0, pool, data, slot, gen, iteration, settings, stats):
    """Head: per-pixel proximal cross-entropy step towards the slot's labels."""
    _, labels = data.get(pool.indices(slot, gen))
    labels = labels.to(z0.device)
    cw = settings.class_weights
    weights = torch.tensor(cw, dtype=z0.dtype, device=z0.device) if cw else None
    stats["head_loss"] = float(weighted_cross_entropy(z0, labels, weights))
    nu = settings.head_nu_at(iteration)
    return head_prox(z0, labels, weights, nu, settings.head_newton_steps)


@dataclass
class _Fit:
    """A layer's fitted parameters as one step changes them: weights, the running patch Gram and
    the last W-step (the momentum's velocity)."""

    weight: torch.Tensor
    bias: torch.Tensor
    gram: torch.Tensor | None
    velocity: torch.Tensor | None

    @classmethod
    def of(cls, state: LayerState) -> _Fit:
        return cls(state.weight, state.bias, state.gram, state.velocity)


def _local_update(state, p, z0, dz, settings: AdmmSettings, fit: _Fit, stats):
    """W-step (ridge on patches, running Gram, momentum) and p-step (CG) for one slot, towards
    the target z0 + dz: the updated fit and the request for the layer below (None at the stem)."""
    g_batch = patch_gram(p, state.kernel_size, state.dilation, state.padding, settings.gram_stride)
    decay = settings.gram_decay
    gram = g_batch if fit.gram is None else decay * fit.gram + (1 - decay) * g_batch
    cross = patch_cross(p, dz, fit.weight.shape, state.dilation, state.padding)
    if not state.is_head and settings.step_scale != 1.0:
        cross = cross * settings.step_scale
    cap, normalized = settings.max_rel_step, settings.normalized_step
    try:
        step, rel = ridge_step(fit.weight, fit.bias, gram, cross, settings.lam, cap, normalized)
    except torch.linalg.LinAlgError:  # a singular Gram with lam = 0
        step, rel = torch.full_like(cross, math.nan), math.nan
    stats["rel_step"] = rel  # the ridge step's, before the cap and the momentum
    velocity = None
    if settings.momentum > 0:  # heavy ball: see the module notes (W-step)
        if fit.velocity is not None:
            step = step.add(fit.velocity, alpha=settings.momentum)
        velocity = step
    weight, bias = add_step(fit.weight, fit.bias, step)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise DivergenceError(
            f"ADMM diverged: layer {state.index} got non-finite weights",
            "raise [admm] lam or head_nu, or lower max_rel_step or momentum, and resume from the "
            "last checkpoint",
        )
    dp = None
    if not state.is_stem:
        dp = _request_down(state, p, z0, dz, settings, fit.weight, weight, bias)
    return _Fit(weight, bias, gram, velocity), dp


def _request_down(state, p, z0, dz, settings: AdmmSettings, old_weight, weight, bias):
    """p-step: the input change asked of the layer below, from the previous weights (Jacobi)
    or, with p_after_w, from the residual the new ones leave."""
    if settings.p_after_w:
        residual, op = (z0 + dz).sub_(_conv(p, weight, bias, state)), weight
    else:
        residual, op = dz, old_weight
    if settings.cg_steps == 1 and settings.request_gain > 0 and not state.is_head:
        # one CG step from 0 is a multiple of W^T r, and the gain rescales it anyway
        dp = F.conv_transpose2d(residual, op, padding=state.padding, dilation=state.dilation)
    else:
        steps = settings.cg_steps
        dp = cg_p_step(residual, op, state.dilation, state.padding, settings.p_rho, steps)
    if settings.p_damping != 1.0:
        dp.mul_(settings.p_damping)  # dp is this step's own new tensor
    return dp


@dataclass
class _Retired:
    """A step's copy of the retired-generation lists (the old state is never written)."""

    inputs: list
    pre_activations: list
    generation: list

    @classmethod
    def of(cls, state: LayerState) -> _Retired:
        return cls(
            list(state.retired_inputs),
            list(state.retired_pre_activations),
            list(state.retired_generation),
        )

    def keep(self, slot: int, p, z0, generation: int) -> None:
        self.inputs[slot], self.pre_activations[slot] = p, z0
        self.generation[slot] = generation


def _stored(state: LayerState, above: Message, retired: _Retired):
    """(input, pre-activation, is current) of the slot and generation a request is about, or
    None when neither the current nor the retired generation matches (the request is dropped)."""
    k, g = above.slot, above.generation
    if state.input_generation[k] == g:
        return state.inputs[k], state.pre_activations[k], True
    if retired.generation[k] == g and retired.inputs[k] is not None:
        return retired.inputs[k], retired.pre_activations[k], False
    return None


def average_step_decay(decay: float, count: int) -> float:
    """The weight on the old average when value count + 1 joins a bias-corrected exponential
    moving average (as Adam corrects its moments): the average stays sum_i d^(n-i) w_i /
    sum_i d^(n-i), so it spans ~1 / (1 - decay) steps from the first on and holds nothing of
    what came before it (0 for the first value)."""
    return decay * (1 - decay**count) / (1 - decay ** (count + 1))


def _averaged(state: LayerState, weight, bias, decay: float):
    """(weight, bias, count) of the layer's running average after this step (see
    `average_step_decay`), or (None, None, 0) with averaging off."""
    if decay <= 0:
        return None, None, 0
    n = state.averaged  # 0 until the first average (and in states saved without one)
    if n == 0:
        return weight, bias, 1
    d = average_step_decay(decay, n)
    w = torch.lerp(weight, state.average_weight, d)
    return w, torch.lerp(bias, state.average_bias, d), n + 1


@torch.no_grad()
def layer_step(
    state: LayerState,
    below: Message | None,
    above: Message | None,
    pool: CropPool,
    data: Batches | None,
    iteration: int,
    settings: AdmmSettings,
) -> StepResult:
    """One update of one layer from its neighbours' messages of the previous iteration.

    Backward half: the request `above` (for the slot l + 1 just updated) is turned into a target
    on this layer's stored input for that slot: W-step, then the request `down` for l - 1.
    Forward half: the fresh input for slot (t - l) mod S is stored and relu(W p + b) is sent up.
    The head does both halves on its fresh input (it reads the slot's labels).
    """
    inputs, gens, duals = list(state.inputs), list(state.input_generation), list(state.duals)
    pre = list(state.pre_activations)
    retired = _Retired.of(state)
    fit, updates = _Fit.of(state), state.updates
    stats: dict[str, float] = {}
    down = None
    stored = None if state.is_head or above is None else _stored(state, above, retired)
    if stored is not None:
        k = above.slot
        p, z0, current = stored  # z0 from the weights of the forward half (saves a conv)
        if z0 is None:  # a state saved before pre-activations were stored
            z0 = _conv(p, fit.weight, fit.bias, state)
        dual = duals[k] if current else None
        dz, dual, stats["dz_rms"], request_rms = _hidden_change(z0, above.tensor, dual, settings)
        if current:
            duals[k] = dual
        fit, dp = _local_update(state, p, z0, dz, settings, fit, stats)
        updates += 1
        if dp is not None and settings.request_gain > 0:
            dp.mul_(settings.request_gain * request_rms / max(rms(dp), 1e-30))
        down = None if dp is None else Message(k, above.generation, dp)

    slot = pool.slot_at(iteration, state.index)
    gen = pool.generation(iteration, state.index)
    up = None
    if gen >= 0 and (state.is_stem or below is not None):
        if state.is_stem:
            p = _stem_input(state, pool, data, slot, gen)
        else:
            if below.slot != slot or below.generation != gen:
                raise RuntimeError(
                    f"layer {state.index} at iteration {iteration} expected slot {slot} "
                    f"generation {gen} from below, got slot {below.slot} generation "
                    f"{below.generation}"
                )
            p = below.tensor
        if gens[slot] != gen:
            if settings.keep_retired and not state.is_head:
                retired.keep(slot, inputs[slot], pre[slot], gens[slot])
            duals[slot] = None
        inputs[slot], gens[slot] = p, gen
        z0 = _conv(p, fit.weight, fit.bias, state)
        if state.is_head:
            z_star = _head_target(state, z0, pool, data, slot, gen, iteration, settings, stats)
            dz = z_star - z0
            stats["dz_rms"] = rms(dz)
            fit, dp = _local_update(state, p, z0, dz, settings, fit, stats)
            updates += 1
            down = Message(slot, gen, dp)
        else:
            pre[slot] = z0
            up = Message(slot, gen, torch.relu(z0))
    average = _averaged(state, fit.weight, fit.bias, settings.average_decay)
    new_state = replace(
        state,
        weight=fit.weight,
        bias=fit.bias,
        gram=fit.gram,
        velocity=fit.velocity,
        updates=updates,
        average_weight=average[0],
        average_bias=average[1],
        averaged=average[2],
        inputs=inputs,
        input_generation=gens,
        duals=duals,
        pre_activations=pre,
        retired_inputs=retired.inputs,
        retired_pre_activations=retired.pre_activations,
        retired_generation=retired.generation,
    )
    return StepResult(new_state, up, down, stats)


class AdmmSolver:
    """Single-process driver: every iteration all layers step from the previous iteration's
    messages (Jacobi), then the messages are delivered. The N-rank runtime must match it."""

    def __init__(self, model: ChainNet, data: Batches, settings: AdmmSettings, seed: int) -> None:
        check_class_weights(settings, model, "admm")
        self.model = model
        self.data = data
        self.settings = settings
        self.seed = int(seed)
        self.pool = make_pool(settings, len(data), len(model.layers), self.seed)
        self.states = init_layer_states(model, settings)
        n = len(self.states)
        self.ups: list[Message | None] = [None] * n  # ups[l]: sent by l to l + 1
        self.downs: list[Message | None] = [None] * n  # downs[l]: sent by l to l - 1
        self.iteration = 0
        self.layer_stats: list[dict[str, float]] = []  # per-layer stats of the last step
        self.watch = LossWatch.from_settings(settings)
        cw = settings.class_weights
        self._weights = torch.tensor(cw, dtype=torch.float32) if cw else None

    def step(self) -> dict[str, float]:
        t, n = self.iteration, len(self.states)
        results, times = [], []
        for i, state in enumerate(self.states):
            below = self.ups[i - 1] if i > 0 else None
            above = self.downs[i + 1] if i + 1 < n else None
            start = time.perf_counter()
            results.append(layer_step(state, below, above, self.pool, self.data, t, self.settings))
            wait_for_device(state.weight.device)  # a layer's queued GPU kernels are its time too
            times.append(time.perf_counter() - start)
        self.states = [r.state for r in results]
        self.ups = [r.up for r in results]
        self.downs = [r.down for r in results]
        self.layer_stats = [r.stats for r in results]
        write_back(self.states, self.model)
        stats = {"max_layer_s": max(times), "sum_layer_s": sum(times)}
        rel = [r.stats["rel_step"] for r in results if "rel_step" in r.stats]
        stats["max_rel_step"] = max(rel) if rel else 0.0
        stats["layers_updated"] = float(len(rel))
        head = results[-1].stats.get("head_loss")
        if head is not None:
            stats["head_loss"] = head
        if self.settings.monitor:
            stats["loss"] = self.batch_loss(t)
        elif head is not None:
            stats["loss"] = head
        if "loss" in stats:
            self.watch.update(stats["loss"], t, "ADMM")
        self.iteration = t + 1
        return stats

    @torch.no_grad()
    def batch_loss(self, iteration: int) -> float:
        """The real network's (plain forward) loss on the stem's batch of `iteration`."""
        x, y = self.data.get(self.pool.batch_at(iteration))
        device = self.model.band_mean.device
        weights = None if self._weights is None else self._weights.to(device)
        return float(weighted_cross_entropy(self.model(x.to(device)), y.to(device), weights))

    def finished(self) -> str | None:
        return self.watch.finished(self.iteration)

    def state_dict(self) -> dict:
        return {
            "solver": "admm",
            "iteration": self.iteration,
            "seed": self.seed,
            "settings": self.settings.to_dict(),
            "layers": [s.state_dict() for s in self.states],
            "ups": [m.to_dict() if m else None for m in self.ups],
            "downs": [m.to_dict() if m else None for m in self.downs],
            "watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("solver") != "admm" or len(state["layers"]) != len(self.states):
            raise GeodnnError(
                "checkpoint solver state does not match this ADMM model; resume with the same "
                "solver and model, or start a new run folder"
            )
        check_same_stream(state, self.settings, self.seed, "admm", ("batch_size", "slots"))
        self.iteration = int(state["iteration"])
        self.pool = saved_pool(state["settings"], self.pool, len(self.states))
        self.states = [LayerState.from_state_dict(d) for d in state["layers"]]
        self.ups = [Message.from_dict(d) for d in state["ups"]]
        self.downs = [Message.from_dict(d) for d in state["downs"]]
        self.watch.load_state_dict(state["watch"])
        write_back(self.states, self.model)
