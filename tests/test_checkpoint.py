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
    with pytest.raises(geodnn.CheckpointError, match="not a readable"):
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
    import numpy as np

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
