"""The `geodnn` command itself: start-up, and errors no job reports itself."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli
from pipelines.cli import main


def test_importing_the_command_loads_neither_pytorch_nor_gdal():
    """What loads them runs inside `main`, where Ctrl-C is answered in one line."""
    code = "import sys, pipelines.cli; print(sorted({'torch', 'rasterio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ctrl_c_while_the_jobs_load_is_one_line(monkeypatch, capsys):
    def interrupted(*jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["tile", "--help"]) == 130
    assert capsys.readouterr().err == "geodnn: interrupted\n"


@pytest.mark.parametrize(
    "error, said",
    [
        (
            PermissionError(13, "Permission denied", "/data/scenes/out.zarr"),
            "/data/scenes/out.zarr: Permission denied; check its folder's permissions",
        ),
        (
            NotADirectoryError(20, "Not a directory", "notes.txt/out.zarr"),
            "notes.txt/out.zarr: Not a directory; a folder on its path is a file: pick another "
            "path",
        ),
    ],
)
def test_a_file_the_system_refuses_is_one_line(error, said, monkeypatch, capsys, make_geotiff):
    def refused(*args, **kwargs):
        raise error

    monkeypatch.setattr("pipelines.tile.build_store", refused)
    scene = make_geotiff(np.ones((1, 8, 8), dtype=np.uint8))
    assert main(["tile", str(scene), "--labels", str(scene), "--out", "x.zarr"]) == 2
    assert capsys.readouterr().err == f"geodnn: error: {said}\n"


def test_other_os_errors_keep_their_traceback(monkeypatch, make_geotiff):
    """A read error or a lost connection is no permissions or disk space matter."""

    def lost(*args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr("pipelines.tile.build_store", lost)
    scene = make_geotiff(np.ones((1, 8, 8), dtype=np.uint8))
    with pytest.raises(ConnectionResetError):
        main(["tile", str(scene), "--labels", str(scene), "--out", "x.zarr"])


def test_a_failed_allocation_is_one_line_and_says_how_to_ask_for_less(monkeypatch, capsys):
    import torch

    def too_big(args):
        torch.empty(2**62, dtype=torch.uint8)  # PyTorch's CPU allocator refuses it

    monkeypatch.setattr("pipelines.train.run_command", too_big)
    assert main(["train", "job.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geodnn: error: out of memory (4.61e+09 GB asked for); ask for less")
    assert "[train] batch_size" in err and err.count("\n") == 1


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("pipelines.train.run_command", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "job.toml"])


def test_outputs_in_a_folder_that_cannot_be_written_are_refused_first(
    monkeypatch, capsys, data_dir, tmp_path
):
    """Before any work (tiling, prediction), not with a traceback at the end."""
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise PermissionError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    scene, labels = data_dir / "vegas-roads" / "image.tif", data_dir / "vegas-roads" / "roads.tif"
    out = tmp_path / "v.zarr"
    assert main(["tile", str(scene), "--labels", str(labels), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"{out}: cannot write in {tmp_path} (Read-only file system); pick a writable folder\n"
    )
    assert "tiles:" not in err  # refused before the build


def test_version_names_the_installed_release():
    import importlib.metadata

    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"geodnn {importlib.metadata.version('geodnn')}"


def test_help_loads_only_the_job_it_is_about():
    """`geodnn --help` imported every job (PyTorch, GDAL, geopandas): 6-15 s on a busy box."""
    code = (
        "import sys\n"
        "from pipelines.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'rasterio', 'geopandas') if m in sys.modules))"
    )
    top = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert top.stdout.splitlines()[-1] == "[]" and "evaluate     score a checkpoint" in top.stdout
    tile = subprocess.run(
        [sys.executable, "-c", code, "-v", "tile", "--help"], capture_output=True, text=True
    )
    assert "--split" in tile.stdout and "'torch'" not in tile.stdout.splitlines()[-1]


def test_commands_start_without_the_pipeline_engine_or_matplotlib():
    """Importing every job loaded torch.distributed.pipelining (with sympy) and matplotlib,
    1.5 s of each `--help` and start; they load when the pipeline solver or a plot needs them."""
    code = (
        "import sys\n"
        "import pipelines.train, pipelines.run, pipelines.predict, pipelines.evaluate\n"
        "heavy = ('torch.distributed.pipelining', 'sympy', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from geodnn.parallel import PipelineSolver\n"
        "print(PipelineSolver.__name__, 'torch.distributed.pipelining' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == ["[]", "PipelineSolver True"]


def test_the_package_knows_its_version():
    import geodnn

    assert geodnn.__version__ == importlib.metadata.version("geodnn")
