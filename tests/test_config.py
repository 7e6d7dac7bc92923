from pathlib import Path

import pytest

from geodnn.solvers.adam import AdamSettings
from geodnn.solvers.admm import AdmmSettings
from pipelines.config import DEFAULTS, load_config
from pipelines.distributed import PIPELINE_ONLY
from pipelines.errors import PipelineError


def write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_defaults_fill_missing_tables_and_paths_resolve_next_to_config(tmp_path):
    config = load_config(
        write(tmp_path, '[data]\nstore = "tiles.zarr"\n[train]\nsolver = "adam"\n')
    )
    assert config.solver == "adam"
    assert config["model"]["depth"] == DEFAULTS["model"]["depth"]
    assert config.resolve(config["data"]["store"]) == (tmp_path / "tiles.zarr").resolve()


def test_overrides_apply_and_none_keeps_the_file_value(tmp_path):
    path = write(tmp_path, "[train]\niterations = 50\n")
    config = load_config(path, {"train": {"iterations": None, "solver": "adam"}})
    assert config["train"]["iterations"] == 50 and config.solver == "adam"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[trian]\nx = 1\n", "unknown table"),
        ("[train]\nsolvr = 'adam'\n", "unknown key"),
        ("[train]\nsolver = 'sgd'\n", "is unknown; use one of"),
        ("[train]\niterations = 0\n", "iterations must be"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_file_and_the_fix(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config(tmp_path):
    with pytest.raises(PipelineError, match="config not found"):
        load_config(tmp_path / "nope.toml")


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "pipelines" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_load_and_point_at_shipped_data(path):
    config = load_config(path)
    AdmmSettings.from_dict(config["admm"])
    AdamSettings.from_dict(config["adam"])
    pipeline = {k: v for k, v in config["pipeline"].items() if k not in PIPELINE_ONLY}
    AdamSettings.from_dict(pipeline)
    for key in ("image", "labels"):
        value = config["scene"][key]
        if value is not None:
            assert config.resolve(value).is_file(), f"{path.name}: {key} {value} missing"
