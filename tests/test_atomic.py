import os
import stat
from pathlib import Path

import pytest

from geodnn.atomic import atomic_path, atomic_write_text


def test_text_lands_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_data_and_the_folder_entry_are_flushed_to_disk(tmp_path, monkeypatch):
    """Renaming is atomic for a crash, not for a power loss: the file's data must be on disk
    before the rename and the folder's new entry after it."""
    import geodnn.atomic as atomic

    flushed = []
    real = atomic.fsync_path

    def recording(path, directory=False):
        flushed.append((Path(path).name, directory, (tmp_path / "out.txt").exists()))
        real(path, directory)

    monkeypatch.setattr(atomic, "fsync_path", recording)
    atomic.atomic_write_text(tmp_path / "out.txt", "x")
    (file_name, file_is_dir, renamed_before), folder = flushed
    assert file_name.startswith(".out.txt.") and not file_is_dir and not renamed_before
    assert folder == (tmp_path.name, True, True)
