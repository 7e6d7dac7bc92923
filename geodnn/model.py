"""A very deep fully-convolutional network as an explicit chain of conv layers.

The chain form (stem, D hidden layers, 1x1 head) is what layer-partitioned solvers need: every layer
is a separate module with its own weights, so a worker can own any contiguous block of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

MAX_DEPTH = 1024
MAX_CLASSES = 255  # ids 0..254: 255 is the ignore index of labels and class maps
INITS = ("dirac", "kaiming")


def _whole(value: Any, low: int, high: int | None = None) -> bool:
    """`value` is a whole number (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        return False
    return low <= value and (high is None or value <= high)


def _odd(value: Any) -> bool:
    return _whole(value, 1) and value % 2 == 1


def _dilations(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) > 0 and all(_whole(d, 1) for d in value)


# The rules of every ChainConfig option: (test, what a valid value is). One source of truth for
# ChainConfig itself and for job configs, which check their [model] table before any work.
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bands": (lambda v: _whole(v, 1), "must be a whole number >= 1"),
    "classes": (
        lambda v: _whole(v, 2, MAX_CLASSES),
        f"must be 2 to {MAX_CLASSES} (255 marks ignored pixels)",
    ),
    "depth": (lambda v: _whole(v, 0, MAX_DEPTH), f"must be a whole number 0 to {MAX_DEPTH}"),
    "width": (lambda v: _whole(v, 1), "must be a whole number >= 1"),
    "kernel_size": (_odd, "must be odd and >= 1, e.g. 3 (the centre pixel is the output)"),
    "stem_kernel_size": (_odd, "must be odd and >= 1, e.g. 3 (the centre pixel is the output)"),
    "dilations": (_dilations, "must be a non-empty list of whole numbers >= 1, e.g. [1, 2, 4, 8]"),
    "init": (lambda v: isinstance(v, str) and v in INITS, "must be 'dirac' or 'kaiming'"),
}


def option_problems(options: Mapping[str, Any]) -> list[str]:
    """One 'key = value must be ...' line per bad model option (options without a rule pass)."""
    return [
        f"{key} = {value!r} {OPTION_RULES[key][1]}"
        for key, value in options.items()
        if key in OPTION_RULES and not OPTION_RULES[key][0](value)
    ]


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one conv layer of the chain."""

    in_channels: int
    out_channels: int
    kernel_size: int
    dilation: int
    activation: bool

    @property
    def radius(self) -> int:
        """Pixels of context this layer needs on each side of an output pixel."""
        return self.dilation * (self.kernel_size - 1) // 2


@dataclass(frozen=True)
class ChainConfig:
    """Architecture of a chain network; everything needed to rebuild it from a checkpoint."""

    bands: int
    classes: int
    depth: int = 16
    width: int = 16
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    stem_kernel_size: int = 3
    init: str = "dirac"

    def __post_init__(self) -> None:
        problems = option_problems(asdict(self))
        if problems:
            raise ValueError(f"invalid model option(s): {'; '.join(problems)}")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

    def layer_specs(self) -> list[LayerSpec]:
        """Stem, `depth` hidden layers (dilations cycled), then a 1x1 head without activation."""
        specs = [LayerSpec(self.bands, self.width, self.stem_kernel_size, 1, True)]
        for i in range(self.depth):
            dilation = self.dilations[i % len(self.dilations)]
            specs.append(LayerSpec(self.width, self.width, self.kernel_size, dilation, True))
        specs.append(LayerSpec(self.width, self.classes, 1, 1, False))
        return specs

    @property
    def receptive_radius(self) -> int:
        """Halo in pixels that makes chunked prediction equal whole-image prediction."""
        return sum(spec.radius for spec in self.layer_specs())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d


def activation_format(device: torch.device | str) -> torch.memory_format:
    """Memory layout of 4-D activations: channels_last (NHWC) on the CPU, where oneDNN runs these
    convolutions 1.6-4x faster than on NCHW (16 x 16 x 64 x 64 measured); NCHW elsewhere."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def as_activation(x: torch.Tensor) -> torch.Tensor:
    """`x` in its device's activation layout (`x` itself when it already is, or not 4-D).

    Needed after a conv whose input is ambiguous (one band: NCHW and NHWC strides coincide),
    whose output would otherwise fall back to NCHW for the rest of the chain."""
    return x.contiguous(memory_format=activation_format(x.device)) if x.dim() == 4 else x


class ConvLayer(nn.Module):
    """One link of the chain: a conv, then ReLU unless it is the head."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.conv = nn.Conv2d(
            spec.in_channels, spec.out_channels, spec.kernel_size, dilation=spec.dilation
        )

    def preactivation(self, x: torch.Tensor, same: bool = True) -> torch.Tensor:
        """W * x + b; `same` zero-pads to keep the size, otherwise a valid (shrinking) conv."""
        padding = self.spec.radius if same else 0
        z = F.conv2d(
            x, self.conv.weight, self.conv.bias, padding=padding, dilation=self.spec.dilation
        )
        return as_activation(z)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z) if self.spec.activation else z

    def forward(self, x: torch.Tensor, same: bool = True) -> torch.Tensor:
        return self.activate(self.preactivation(x, same))


class ChainNet(nn.Module):
    """Fully-convolutional chain network with built-in per-band normalization.

    Input is float imagery (bands, H, W) in the scene's units, NaN where there is no data; the
    network normalizes each band and reads missing pixels as the band mean (0 after normalization).
    """

    def __init__(self, config: ChainConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ConvLayer(spec) for spec in config.layer_specs())
        self.register_buffer("band_mean", torch.zeros(config.bands))
        self.register_buffer("band_std", torch.ones(config.bands))

    @property
    def receptive_radius(self) -> int:
        return self.config.receptive_radius

    def set_normalization(self, mean, std) -> None:
        """Store per-band statistics (from the training region) used by `normalize`."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() != self.config.bands or std.numel() != self.config.bands:
            raise ValueError(f"normalization needs {self.config.bands} values per statistic")
        self.band_mean.copy_(mean)
        self.band_std.copy_(torch.clamp(std, min=1e-6))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-band standardization; NaN (nodata) becomes 0, the normalized band mean."""
        shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
        x = x.to(self.band_mean.dtype)  # any input dtype (float64 from numpy included)
        x = (x - self.band_mean.view(shape)) / self.band_std.view(shape)
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the same size as the input (zero padding inside each layer)."""
        x = self.normalize(x)
        for layer in self.layers:
            x = layer(x, same=True)
        return x

    def forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the centre of `x`: output is smaller by `receptive_radius` on every side.

        Used for tiled prediction: a chunk read with a halo of `receptive_radius` gives exactly the
        pixels the whole (reflect-padded) scene would give, so chunking leaves no seams.
        """
        x = self.normalize(x)
        for layer in self.layers:
            x = layer(x, same=False)
        return x


def _init_layer(layer: ConvLayer, scheme: str, generator: torch.Generator) -> None:
    weight, bias = layer.conv.weight, layer.conv.bias
    with torch.no_grad():
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        std = (2.0 / fan_in) ** 0.5
        if scheme == "dirac" and weight.shape[0] == weight.shape[1] and layer.spec.activation:
            # Near-identity hidden layers keep very deep chains trainable from the start.
            weight.normal_(0.0, 0.1 * std, generator=generator)
            centre = weight.shape[2] // 2
            idx = torch.arange(weight.shape[0])
            weight[idx, idx, centre, centre] += 1.0
        else:
            weight.normal_(0.0, std, generator=generator)
        bias.zero_()


def build_model(
    bands: int, classes: int, depth: int = 16, width: int = 16, *, seed: int = 0, **options
) -> ChainNet:
    """Build a chain network; `options` are the other `ChainConfig` fields (kernel_size, ...)."""
    config = ChainConfig(bands=bands, classes=classes, depth=depth, width=width, **options)
    model = ChainNet(config)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        _init_layer(layer, config.init, generator)
    return model
