"""Choosing where training and prediction compute: names, GPUs per rank, config errors.

The GPU itself is exercised by tests/test_cuda.py (skipped where PyTorch sees no GPU)."""

from __future__ import annotations

import pytest
import torch

from pipelines.config import load_config
from pipelines.device import prediction_device, resolve_device, training_device
from pipelines.errors import PipelineError
from pipelines.train import train


@pytest.fixture
def gpus(monkeypatch):
    """Pretend PyTorch sees `n` GPUs (only the counts are faked, no tensor goes there)."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)

    return make


def test_prediction_on_a_cluster_leaves_the_device_to_its_workers(gpus):
    gpus(0)
    assert prediction_device("cuda", "tcp://gpu-node:8786") == "cuda"
    assert prediction_device("auto", "tcp://gpu-node:8786") == "auto"
    assert prediction_device("auto", None) == "cpu"
    with pytest.raises(PipelineError, match="PyTorch sees no GPU here"):
        prediction_device("cuda", None)
    with pytest.raises(PipelineError, match="^`device` 'gpu' is unknown"):
        prediction_device("gpu", "tcp://gpu-node:8786")


def test_unknown_device_names_its_source():
    with pytest.raises(PipelineError, match=r"job.toml: \[train\] device 'gpu' is unknown"):
        resolve_device("gpu", "job.toml: [train] device")


def test_auto_is_the_gpu_when_there_is_one(gpus):
    gpus(0)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(PipelineError, match="^`device` 'cuda': PyTorch sees no GPU"):
        resolve_device("cuda")
    gpus(1)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"


def test_each_rank_on_a_machine_needs_its_own_gpu(gpus, monkeypatch):
    gpus(1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert training_device("auto", "x") == "cuda"  # one process, one GPU
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert training_device("auto", "x") == "cpu"  # two ranks here, one GPU: gloo on the CPU
    with pytest.raises(PipelineError, match="2 ranks on this machine need a GPU each"):
        training_device("cuda", "job.toml: [train] device")
    gpus(2)
    assert training_device("auto", "x") == "cuda"
    gpus(0)
    assert training_device("auto", "x") == "cpu"


def test_config_rejects_an_unknown_device(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[train]\ndevice = "gpu"\n')
    with pytest.raises(PipelineError, match=r"job.toml: \[train\] device = 'gpu' is unknown"):
        load_config(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_training_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path, store, train_config):
    config = train_config(store, extra='device = "cuda"\n')
    with pytest.raises(PipelineError, match=r"\[train\] device 'cuda': PyTorch sees no GPU"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_ranks_take_nccl_only_with_a_gpu_each(gpus, monkeypatch):
    from geodnn.parallel.group import default_backend

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    gpus(1)
    assert default_backend() == "nccl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert default_backend() == "gloo"  # two ranks cannot share the one GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per machine, on two machines
    assert default_backend() == "nccl"
    gpus(0)
    assert default_backend() == "gloo"
