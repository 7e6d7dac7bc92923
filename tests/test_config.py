from pathlib import Path

import pytest

from geodnn.solvers.adam import AdamSettings
from geodnn.solvers.admm import AdmmSettings
from pipelines.cli import main
from pipelines.config import AT_LEAST_ONE, DEFAULTS, load_config
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


def test_a_bad_value_from_the_command_line_is_blamed_on_its_option(tmp_path):
    path = write(tmp_path, "[train]\niterations = 50\n")
    flags = {("train", "iterations"): "--iterations"}
    with pytest.raises(PipelineError) as info:
        load_config(path, {"train": {"iterations": 0, "solver": None}}, flags)
    said = str(info.value)
    assert said == "command line --iterations 0: [train] iterations must be >= 1, not 0"
    with pytest.raises(PipelineError) as info:  # from Python: the overrides as given
        load_config(path, {"train": {"iterations": 0}})
    assert str(info.value) == "overrides [train] iterations = 0: " + said.split(": ", 1)[1]
    with pytest.raises(PipelineError, match=r"^command line \[train\] iterations 0: "):
        load_config(path, {"train": {"iterations": 0}}, flags={})  # no flag known: the key
    bad = write(tmp_path, "[train]\niterations = 0\nsolver = 'pipline'\n")
    config = load_config(bad, {"train": {"iterations": 10, "solver": "adam"}}, flags)
    assert (config["train"]["iterations"], config.solver) == (10, "adam")  # overridden: unused
    with pytest.raises(PipelineError, match=f"^{bad}: "):  # the file's own error
        load_config(bad, {"train": {"iterations": 0}}, flags)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[trian]\nx = 1\n", "unknown table"),
        ("[train]\nsolvr = 'adam'\n", "unknown key"),
        ("[train]\nsolver = 'sgd'\n", "is unknown; use one of"),
        ("[train]\niterations = 0\n", "iterations must be"),
        ("[train]\nseed = 99999999999999999999\n", r"seed must be at most 9223372036854775807"),
        # just past TOML's 64-bit integers: torch and NumPy would overflow on it later
        ("[train]\nseed = 9223372036854775808\n", r"seed must be at most 9223372036854775807"),
        ("[train\n", "not valid TOML"),
        ("[data]\nval_tiles = '4'\n", "val_tiles must be a whole number, not '4'"),
        ("[train]\niterations = true\n", "iterations must be a whole number, not True"),
        ("[train]\nclass_weight_power = '0.5'\n", "no quotes around numbers"),
        # the example is the default, which the bounds accept (0.5 is refused here)
        ("[train]\nclass_weight_max_ratio = '10'\n", r"e.g. class_weight_max_ratio = 10.0;"),
        ("[train]\ndivergence_factor = 0\n", "divergence_factor must be > 0, not 0"),
        ("[data]\ncalibrate_tiles = -1\n", "calibrate_tiles must be >= 0, not -1"),
        ("[train]\ncompare = ['sgd']\n", "compare = .'sgd'. must list solver names"),
        ("[scene]\nclass_names = 'roads'\n", "class_names must be a list"),
        ("[model]\ndilations = 2\n", "dilations must be a list"),
        ("[predict]\ncog = 1\n", "cog must be true or false, not 1"),
        ("[adam]\nlrr = 0.1\n", "unknown key.s. lrr in .adam."),
        ("[adam]\nlr = '0.1'\n", "lr must be a number, not '0.1'"),
        ("[admm]\nslots = 2.5\n", "slots must be a whole number, not 2.5"),
        ("[pipeline]\nschedule = 1\n", "schedule must be text, not 1"),
        ("[adam]\nbeta1 = 1.5\n", "invalid .adam. setting.s. beta1"),
        ("[pipeline]\nbatch_size = 0\n", r"invalid \[pipeline\] setting\(s\) batch_size"),
        ("[admm]\ngram_decay = 1.5\n", "invalid .admm. setting.s. gram_decay"),
        ("[admm]\nclass_weights = [1, 2]\n", "class weights come from .train."),
    ],
)
def test_bad_configs_name_the_file_and_the_fix(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


# counts that must be >= 1, listed here too: a key dropped from AT_LEAST_ONE stays tested
COUNTS = {
    ("tile", "tile"), ("data", "crop"), ("train", "iterations"), ("train", "epoch"),
    ("train", "batch_size"), ("train", "threads"), ("train", "class_weight_max_ratio"),
    ("parallel", "workers"), ("predict", "chunk"), ("predict", "batch"), ("model", "width"),
    ("model", "kernel_size"), ("pipeline", "microbatches"),
}  # fmt: skip


@pytest.mark.parametrize("table, key", sorted(COUNTS | AT_LEAST_ONE))
def test_a_zero_count_is_refused_at_load_naming_its_table_and_key(tmp_path, table, key):
    """A zero crop, tile, chunk or width would fail later (after tiling a whole scene, say),
    naming a store instead of the config: refused at load with the bound."""
    path = write(tmp_path, f"[{table}]\n{key} = 0\n")
    with pytest.raises(PipelineError, match=rf"\[{table}\] {key} must be >= 1, not 0") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


BAD_MODEL = {
    "dilations = []": "dilations",
    "dilations = [1, 0]": "dilations",
    "dilations = [1.5]": "dilations",
    'init = "xavier"': "init",
    "kernel_size = 4": "kernel_size",
    "depth = 5000": "depth",
}


@pytest.mark.parametrize("line", BAD_MODEL)
def test_bad_model_values_fail_at_load_naming_the_file_and_key(tmp_path, line):
    path = write(tmp_path, f"[model]\n{line}\n")
    with pytest.raises(PipelineError, match=rf"\[model\] {BAD_MODEL[line]} = .* must be") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("job", ["train", "run"])
@pytest.mark.parametrize("line", BAD_MODEL)
def test_bad_model_values_exit_2_in_one_line_before_any_work(tmp_path, capsys, job, line):
    path = write(tmp_path, f'[data]\nstore = "tiles.zarr"\n[model]\n{line}\n')
    out = tmp_path / "out"
    assert main([job, str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and f"[model] {BAD_MODEL[line]} = " in err
    assert not out.exists()


def test_good_model_table_loads(tmp_path):
    text = '[model]\ndepth = 4\nwidth = 8\nkernel_size = 5\ndilations = [1, 3]\ninit = "kaiming"\n'
    config = load_config(write(tmp_path, text))
    assert config["model"]["dilations"] == [1, 3] and config["model"]["init"] == "kaiming"


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


@pytest.mark.parametrize(
    "text, match",
    [
        ('[pipeline]\nschedule = "zigzag"\n', r"\[pipeline\] schedule = 'zigzag' is unknown"),
        ('[pipeline]\nschedule = "interleaved"\n', r"\[pipeline\] schedule = 'interleaved'"),
        ('[train]\nsolver = "admm"\n[pipeline]\nschedule = "zigzag"\n', r"'gpipe' or '1f1b'"),
        ("[pipeline]\nmicrobatches = 0\n", r"\[pipeline\] microbatches must be >= 1, not 0"),
    ],
)
def test_bad_pipeline_values_fail_at_load_in_any_run(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pipeline_schedules_known_at_load_are_the_solver_s():
    from geodnn.parallel.pipeline import SCHEDULES
    from pipelines.config import PIPELINE_SCHEDULES

    assert set(PIPELINE_SCHEDULES) == set(SCHEDULES)


@pytest.mark.parametrize(
    "text, match",
    [
        ("[train]\nbatch_size = 16\n[pipeline]\nmicrobatches = 3\n", r"16 \(\[train\] batch_size"),
        ("[pipeline]\nbatch_size = 6\nmicrobatches = 4\n", r"6 \(\[pipeline\] batch_size"),
    ],
)
def test_pipeline_microbatches_must_divide_the_pipeline_s_batch(tmp_path, text, match):
    from pipelines.config import check_pipeline_batch

    path = write(tmp_path, text)
    config = load_config(path, {"train": {"solver": "pipeline"}})
    with pytest.raises(PipelineError, match=rf"\[pipeline\] microbatches = \d does not .*{match}"):
        check_pipeline_batch(config.tables, path)
    check_pipeline_batch(load_config(path).tables, path)  # an admm run does not cut batches


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "table, key", [("train", "divergence_factor"), ("parallel", "timeout_s"), ("admm", "rho")]
)
def test_non_finite_numbers_are_refused(tmp_path, table, key, value):
    """nan passes every bound check (all its comparisons are false): refused by name."""
    path = tmp_path / "job.toml"
    path.write_text(f"[{table}]\n{key} = {value}\n")
    with pytest.raises(PipelineError, match=rf"\[{table}\] {key} must be a finite number"):
        load_config(path)


def _documented_defaults() -> dict[str, dict]:
    from dataclasses import fields

    solver = {f.name: f.default for f in fields(AdmmSettings)}
    adam = {f.name: f.default for f in fields(AdamSettings)}
    return {
        **DEFAULTS,
        "admm": solver,
        "adam": adam | DEFAULTS["adam"],
        "pipeline": adam | DEFAULTS["pipeline"],
    }


@pytest.mark.parametrize("name", ["vegas-roads", "atlanta-buildings", "vegas-train"])
def test_shipped_configs_say_where_a_value_is_not_the_default(name):
    """Users copy these files and drop keys: a value that is not geodnn's default says so."""
    import tomllib

    path = Path(__file__).parent.parent / "pipelines" / "configs" / f"{name}.toml"
    raw, defaults, table = tomllib.loads(path.read_text()), _documented_defaults(), None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
        key = line.split("=")[0].strip()
        if "=" not in line or line.startswith("#") or defaults[table].get(key) is None:
            continue  # a comment, or a key without a default (paths, class names)
        if raw[table][key] != defaults[table][key]:
            assert "default" in line.partition("#")[2], f"{name}.toml [{table}] {key}"


def test_overrides_and_edits_from_python_are_checked_by_name(tmp_path):
    """A notebook's typo in an override key was a bare KeyError; an edit of a loaded config
    (a key misspelt, a number as text) was ignored or failed deep in training."""
    from pipelines.train import train

    path = write(tmp_path, "[train]\niterations = 20\n")
    with pytest.raises(PipelineError, match=r"^overrides \[train\] iteratons = 5: unknown key"):
        load_config(path, {"train": {"iteratons": 5}})
    with pytest.raises(PipelineError, match=r"^overrides\['iterations'\] = 5: pass a table"):
        load_config(path, {"iterations": 5})
    with pytest.raises(PipelineError, match=r"^overrides \[trian\] x = 1: .*unknown table"):
        load_config(path, {"trian": {"x": 1}})
    for key, value, said in [
        ("iteratons", 10, "unknown key.s. iteratons in .train."),
        ("iterations", "30", "iterations must be a whole number"),
    ]:
        config = load_config(path)
        config["train"][key] = value
        with pytest.raises(PipelineError, match=f"as edited after load_config: .*{said}"):
            train(config, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_one_store_list_is_that_store_also_when_a_notebook_edits_it(tmp_path):
    from pipelines.config import revalidated

    path = tmp_path / "job.toml"
    path.write_text('[data]\nstore = ["a.zarr"]\n')
    assert load_config(path)["data"]["store"] == "a.zarr"
    config = load_config(path)
    config.tables["data"]["store"] = ["b.zarr"]  # as a notebook edits it
    assert revalidated(config)["data"]["store"] == "b.zarr"
    config.tables["data"]["store"] = ["b.zarr", "c.zarr"]
    assert revalidated(config)["data"]["store"] == ["b.zarr", "c.zarr"]
