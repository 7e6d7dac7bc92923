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
@pytest.mark.timeout(300)
@pytest.mark.parametrize("solver", ["admm", "pipeline"])
def test_two_workers_resume_equals_an_uninterrupted_run(tmp_path, store, train_config, solver):
    extra = '[pipeline]\nschedule = "1f1b"\nmicrobatches = 2\n' if solver == "pipeline" else ""
    config = str(train_config(store, solver=solver, iterations=6, extra=extra).path)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(["train", config, "--out", str(straight), "--workers", "2"]) == 0
    assert main(["train", config, "--out", str(run), "--workers", "2", "--iterations", "3"]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"rank0-of-2-it3.pt", "rank1-of-2-it3.pt", "ranks-latest.txt", "model.pt"} <= names
    assert main(["train", config, "--out", str(run), "--workers", "2", "--resume"]) == 0
    assert [int(r["iteration"]) for r in read_rows(run / "metrics.csv")] == [3, 6]
    resumed = geodnn.load_checkpoint(run / "model.pt")
    assert resumed.metadata["iteration"] == 6
    reference = geodnn.load_checkpoint(straight / "model.pt").model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6)


def test_adam_refuses_several_workers(tmp_path, store, train_config, capsys):
    config = train_config(store, solver="adam")
    code = main(["train", str(config.path), "--out", str(tmp_path / "r"), "--workers", "2"])
    assert code != 0
