"""`geodnn train --workers N`: torchrun ranks driven through the ordinary training loop."""

import csv

import pytest
import torch

import geodnn
from pipelines.cli import main


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("solver", ["admm", "pipeline"])
def test_two_workers_write_a_complete_run_and_resume(tmp_path, store, train_config, solver):
    extra = '[pipeline]\nschedule = "1f1b"\nmicrobatches = 2\n' if solver == "pipeline" else ""
    config = train_config(store, solver=solver, iterations=6, extra=extra)
    run = tmp_path / "run"
    args = ["train", str(config.path), "--out", str(run), "--workers", "2", "--iterations", "3"]
    assert main(args) == 0
    assert {"state-rank0.pt", "state-rank1.pt", "last.pt", "model.pt"} <= {
        p.name for p in run.iterdir()
    }
    assert main(["train", str(config.path), "--out", str(run), "--workers", "2", "--resume"]) == 0
    assert [int(r["iteration"]) for r in read_rows(run / "metrics.csv")] == [3, 6]
    model = geodnn.load_checkpoint(run / "model.pt").model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert geodnn.load_checkpoint(run / "model.pt").metadata["iteration"] == 6


def test_adam_refuses_several_workers(tmp_path, store, train_config, capsys):
    config = train_config(store, solver="adam")
    code = main(["train", str(config.path), "--out", str(tmp_path / "r"), "--workers", "2"])
    assert code != 0
