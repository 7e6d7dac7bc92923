"""geodnn: very deep fully-convolutional chain networks and their gradient-free, layer-parallel
training. Imports nothing from `tiles`; `pipelines` joins the two."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import CheckpointError, DivergenceError, GeodnnError
from .model import ChainConfig, ChainNet, ConvLayer, LayerSpec, build_model

try:  # the distribution's version (pyproject.toml), as `geodnn --version` says
    __version__ = version("geodnn")
except PackageNotFoundError:  # a source tree on the path, not installed
    __version__ = "0+unknown"

__all__ = [
    "ChainConfig",
    "ChainNet",
    "Checkpoint",
    "CheckpointError",
    "ConvLayer",
    "DivergenceError",
    "GeodnnError",
    "LayerSpec",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
