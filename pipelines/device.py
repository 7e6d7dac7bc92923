"""Where a command's tensors live: 'auto' (the GPU when PyTorch sees one), 'cpu' or 'cuda'."""

from __future__ import annotations

import logging

import torch

from geodnn.parallel.group import gpu_per_rank, local_world_size
from tiles.wording import option

from .errors import PipelineError

DEVICES = ("auto", "cpu", "cuda")

log = logging.getLogger(__name__)


def resolve_device(device: str, source: str | None = None) -> str:
    """'auto' becomes 'cuda' or 'cpu'; an unknown name, or 'cuda' without a GPU, is an error
    naming `source` (the config key the value came from; else the option)."""
    source = source or option("device")
    check_device_name(device, source)
    if device == "auto":
        return auto_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{source} 'cuda': PyTorch sees no GPU here; use 'cpu' or 'auto'")
    return device


def auto_device() -> str:
    """What 'auto' means on this machine: the GPU when PyTorch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def prediction_device(device: str, scheduler: str | None) -> str:
    """Where `geodnn predict` runs its model. With `--scheduler` the model runs on that
    cluster's workers, whose GPUs this process cannot see: the name is only checked here and
    resolved by each worker (`ModelPredictor`); locally it is resolved now."""
    if scheduler:
        check_device_name(device, option("device"))
        return device
    return resolve_device(device)


def check_device_name(device: str, source: str) -> None:
    if device not in DEVICES:
        raise PipelineError(f"{source} {device!r} is unknown; use one of {', '.join(DEVICES)}")


def training_device(device: str, source: str) -> str:
    """Where this training process computes. Each rank on a machine needs a GPU of its own, so
    with fewer GPUs than ranks 'auto' is the CPU (gloo) and 'cuda' is an error; a single process
    takes the GPU whenever 'auto' sees one."""
    resolved = resolve_device(device, source)
    if resolved == "cpu" or gpu_per_rank():
        return resolved
    ranks, gpus = local_world_size(), torch.cuda.device_count()
    if device == "auto":
        log.warning("%d ranks on this machine, %d GPU(s): the ranks train on the CPU", ranks, gpus)
        return "cpu"
    raise PipelineError(
        f"{source} 'cuda': {ranks} ranks on this machine need a GPU each and PyTorch sees "
        f"{gpus}; run fewer workers per machine, or use 'cpu'"
    )
