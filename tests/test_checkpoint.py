import zipfile

import numpy as np
import pytest
import torch

import geodnn


def test_roundtrip_keeps_weights_config_and_metadata(tmp_path):
    model = geodnn.build_model(bands=4, classes=3, depth=3, width=6, dilations=(1, 2), seed=7)
    model.set_normalization([1, 2, 3, 4], [5, 6, 7, 8])
    path = tmp_path / "model.pt"
    geodnn.save_checkpoint(
        model,
        path,
        class_names=["bg", "road", "roof"],
        class_colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]],
        note="x",
    )
    ckpt = geodnn.load_checkpoint(path)
    assert ckpt.config == model.config
    assert ckpt.class_names == ["bg", "road", "roof"]
    assert ckpt.class_colors[1] == (255, 0, 0)
    assert ckpt.metadata["note"] == "x"
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(ckpt.model(x), model.eval()(x))


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "m.pt"
    geodnn.save_checkpoint(geodnn.build_model(bands=1, classes=2, depth=1), path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "geodnn.checkpoint"


def test_defaults_for_names_and_colors(tmp_path):
    path = tmp_path / "m.pt"
    geodnn.save_checkpoint(geodnn.build_model(bands=1, classes=2, depth=1), path)
    ckpt = geodnn.load_checkpoint(path)
    assert ckpt.class_names == ["background", "class_1"]
    assert len(ckpt.class_colors) == 2


def test_missing_and_foreign_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(geodnn.CheckpointError, match="not found"):
        geodnn.load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(geodnn.CheckpointError, match="not a geodnn checkpoint .not a PyTorch"):
        geodnn.load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(geodnn.CheckpointError, match="not a geodnn checkpoint"):
        geodnn.load_checkpoint(other)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.pt"
    model = geodnn.build_model(bands=1, classes=2, depth=1)
    geodnn.save_checkpoint(model, path)
    geodnn.save_checkpoint(model, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    with pytest.raises(geodnn.CheckpointError, match="does not exist"):
        geodnn.save_checkpoint(model, tmp_path / "missing" / "m.pt")


def test_numpy_and_path_metadata_are_saved_plain(tmp_path):
    path = tmp_path / "m.pt"
    meta = {"threshold": np.float32(0.25), "counts": np.array([3, 4]), "scene": tmp_path / "s.tif"}
    geodnn.save_checkpoint(geodnn.build_model(1, 2, depth=1), path, **meta)
    loaded = geodnn.load_checkpoint(path).metadata
    assert loaded == {"threshold": 0.25, "counts": [3, 4], "scene": str(tmp_path / "s.tif")}
    with pytest.raises(geodnn.CheckpointError, match="metadata 'bad' holds a object"):
        geodnn.save_checkpoint(geodnn.build_model(1, 2, depth=1), path, bad=object())


def test_a_checkpoint_whose_model_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "m.pt"
    geodnn.save_checkpoint(geodnn.build_model(1, 2, depth=1), path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["norm"] = "batch"  # a key a newer geodnn might write
    torch.save(payload, path)
    with pytest.raises(geodnn.CheckpointError, match="does not fit this geodnn"):
        geodnn.load_checkpoint(path)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_state_dict_with_a_missing_or_extra_key_does_not_fit(tmp_path, change):
    """A weight left out (or one this model does not have) is refused, not loaded as the
    random or default value the model was built with."""
    path = tmp_path / "m.pt"
    geodnn.save_checkpoint(geodnn.build_model(1, 2, depth=2, width=4), path)
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    if change == "missing":
        del state[next(k for k in state if k.endswith("conv.weight"))]
    else:
        state["extra.weight"] = torch.zeros(1)
    torch.save(payload, path)
    with pytest.raises(geodnn.CheckpointError, match="does not fit this geodnn"):
        geodnn.load_checkpoint(path)


def test_a_geotiff_given_as_checkpoint_is_named_as_such(make_geotiff):
    scene = make_geotiff(np.zeros((1, 8, 8), dtype=np.uint8))
    with pytest.raises(geodnn.CheckpointError) as info:
        geodnn.load_checkpoint(scene)
    message = str(info.value)
    assert "not a geodnn checkpoint (a TIFF image, not a PyTorch file)" in message
    assert "`geodnn train` wrote" in message and "weights_only" not in message
    assert "\n" not in message and len(message) < 120 + len(str(scene))


class Foreign:
    """A class torch's weights_only loading refuses."""


def test_torch_files_with_refused_objects_and_damaged_files_are_short_errors(tmp_path):
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": Foreign()}, unsafe)
    with pytest.raises(geodnn.CheckpointError, match=r"objects \(.*Foreign\) that safe loading"):
        geodnn.load_checkpoint(unsafe)
    whole = tmp_path / "whole.pt"
    geodnn.save_checkpoint(geodnn.build_model(1, 2, depth=1), whole)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(whole.read_bytes()[:200])
    for path in (unsafe, damaged):
        with pytest.raises(geodnn.CheckpointError) as info:
            geodnn.load_checkpoint(path)
        message = str(info.value)
        assert "\n" not in message and len(message) < 200 + len(str(path))
        assert "PyTorch 2.6" not in message
    with pytest.raises(geodnn.CheckpointError, match="truncated or damaged checkpoint .*again"):
        geodnn.load_checkpoint(damaged)  # a copy cut short: no "[Errno 22] Invalid argument"
    other = tmp_path / "other.pt"  # a whole zip archive, not torch.save's
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(geodnn.CheckpointError, match="not a readable checkpoint"):
        geodnn.load_checkpoint(other)


def test_a_run_folder_or_its_resume_state_points_at_the_checkpoint_to_pass(tmp_path):
    model = geodnn.build_model(1, 2, depth=2, width=4)
    run = tmp_path / "run"
    run.mkdir()
    geodnn.save_checkpoint(model, run / "last.pt")  # a run still training: no model.pt yet
    for given, said in [
        (run, f"a run folder: the run has not finished; pass {run / 'last.pt'}"),
        (run / "model.pt", f"not found: the run has not finished; pass {run / 'last.pt'}"),
    ]:
        with pytest.raises(geodnn.CheckpointError, match=f"^{given}: {said}"):
            geodnn.load_checkpoint(given)
    geodnn.save_checkpoint(model, run / "model.pt")
    with pytest.raises(geodnn.CheckpointError, match=f"^{run}: a run folder; pass {run}/model.pt"):
        geodnn.load_checkpoint(run)
    (run / "last.pt").unlink()  # a finished run tidied: last.pt is a copy of model.pt
    with pytest.raises(geodnn.CheckpointError, match=f"not found; pass {run}/model.pt, the run"):
        geodnn.load_checkpoint(run / "last.pt")
    torch.save({"format": "state", "solver_state": {}}, run / "state.pt")
    with pytest.raises(geodnn.CheckpointError, match="saved state for --resume, not a model"):
        geodnn.load_checkpoint(run / "state.pt")


def test_class_names_and_colors_are_one_per_class(tmp_path):
    """One name for a 3-class model was saved and loaded; predicting polygons then ended in
    an IndexError after the whole prediction."""
    model = geodnn.build_model(bands=1, classes=3, depth=1, width=2)
    path = tmp_path / "m.pt"
    with pytest.raises(geodnn.CheckpointError, match="1 class names for a model of 3 classes"):
        geodnn.save_checkpoint(model, path, class_names=["only-one"])
    with pytest.raises(geodnn.CheckpointError, match="class_names must be a list"):
        geodnn.save_checkpoint(model, path, class_names="road")
    with pytest.raises(geodnn.CheckpointError, match="2 class colors for a model of 3"):
        geodnn.save_checkpoint(model, path, class_colors=[(0, 0, 0), (1, 1, 1)])
    assert not path.exists()
    geodnn.save_checkpoint(model, path, class_names=["a", "b", "c"])
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["class_names"] = ["a"]  # written by something else
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="m.pt: 1 class names for a model of 3 classes; using"):
        loaded = geodnn.load_checkpoint(path)  # the model is fine: its names fall back
    assert loaded.class_names == ["background", "class_1", "class_2"]
    geodnn.save_checkpoint(model, path, class_names=[])  # empty: the defaults, as loaded
    assert geodnn.load_checkpoint(path).class_names == ["background", "class_1", "class_2"]


@pytest.mark.parametrize(
    "device, said",
    [("gpu", "is not a device"), ("cuda:x", "is not a device"), ("mps", "geodnn runs on"),
     ("cuda:99", "PyTorch sees")],
)  # fmt: skip
def test_a_bad_map_location_is_named_not_the_file(tmp_path, device, said):
    path = tmp_path / "m.pt"
    geodnn.save_checkpoint(geodnn.build_model(bands=1, classes=2, depth=1, width=2), path)
    with pytest.raises(geodnn.CheckpointError, match=f"map_location '{device}'.? {said}"):
        geodnn.load_checkpoint(path, map_location=device)
