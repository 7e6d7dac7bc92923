import json

import pytest
import rasterio
from rasterio.windows import Window

from pipelines.cli import main


@pytest.fixture(scope="module")
def pipeline_config(data_dir, tmp_path_factory):
    """A pipeline config on a 320x320 crop of the Atlanta buildings scene, Adam, few iterations."""
    root = tmp_path_factory.mktemp("atlanta")
    with rasterio.open(data_dir / "atlanta-buildings" / "image.tif") as src:
        window = Window(300, 300, 320, 320)
        profile = src.profile | {
            "width": 320,
            "height": 320,
            "transform": src.window_transform(window),
        }
        with rasterio.open(root / "image.tif", "w", **profile) as dst:
            dst.write(src.read(window=window))
    labels = data_dir / "atlanta-buildings" / "buildings.geojson"
    config = root / "atlanta.toml"
    config.write_text(
        f'[scene]\nimage = "image.tif"\nlabels = "{labels}"\n'
        "[tile]\ntile = 64\ngap = 16\n[data]\ncrop = 32\nval_tiles = 4\n"
        "[model]\ndepth = 2\nwidth = 4\ndilations = [1, 2]\n"
        '[train]\nsolver = "adam"\niterations = 4\nepoch = 2\nbatch_size = 4\n'
        "[predict]\nchunk = 128\n"
    )
    return config


def steps(run_dir):
    return json.loads((run_dir / "steps.json").read_text())


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_reruns_are_idempotent(pipeline_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as users type it
    run_dir = tmp_path / "run"
    assert main(["run", str(pipeline_config), "--out", "run"]) == 0
    expected = [
        "tiles.zarr",
        "train-adam/model.pt",
        "train-adam/metrics.csv",
        "train-adam/curves.png",
        "evaluation.json",
        "map/classes.tif",
        "map/probabilities.tif",
        "map/polygons.gpkg",
        "map/polygons.qml",
        "overlay.png",
        "comparison.png",
        "report.md",
        "report.html",
    ]
    for name in expected:
        assert (run_dir / name).exists(), name
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["adam"]["region"] == "validation"
    report = (run_dir / "report.md").read_text()
    assert "IoU buildings" in report and "map/polygons.gpkg" in report
    first = steps(run_dir)

    assert main(["run", str(pipeline_config), "--out", str(run_dir)]) == 0
    assert steps(run_dir) == first  # nothing redone

    text = pipeline_config.read_text().replace("chunk = 128", "chunk = 96")
    pipeline_config.write_text(text)
    assert main(["run", str(pipeline_config), "--out", str(run_dir)]) == 0
    again = steps(run_dir)
    assert again["train"] == first["train"] and again["tile"] == first["tile"]
    assert again["predict"]["fingerprint"] != first["predict"]["fingerprint"]

    sentinel = run_dir / "map" / "classes.tif"
    sentinel.write_bytes(b"stale")
    keep = run_dir / "notes.txt"
    keep.write_text("the user's own file")
    assert main(["run", str(pipeline_config), "--out", str(run_dir), "--force"]) == 0
    with rasterio.open(sentinel) as src:  # redone, not the stale bytes
        assert src.count == 1
    assert keep.read_text() == "the user's own file"


def test_force_refuses_a_folder_that_is_not_a_run(pipeline_config, tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    assert main(["run", str(pipeline_config), "--out", str(tmp_path), "--force"]) == 2
    assert "not a geodnn run folder" in capsys.readouterr().err
    assert (tmp_path / "thesis.tex").exists()


def test_missing_labels_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[scene]\nimage = "nope.tif"\n')
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "labels is not set" in capsys.readouterr().err
