import pytest

from tiles.errors import OutputError
from tiles.stitch import check_output
from tiles.wording import command_line, option


def test_python_callers_get_keywords_and_commands_get_flags():
    assert option("overwrite", True) == "overwrite=True"
    assert option("split", "rows:0.5") == "split='rows:0.5'"
    assert option("class-attribute") == "`class_attribute`"
    assert option("out", keyword="run_dir") == "`run_dir`"
    with command_line():
        assert option("overwrite", True) == "--overwrite"
        assert option("split", "rows:0.5") == "--split rows:0.5"
        assert option("class-attribute") == "--class-attribute"
        assert option("out", keyword="run_dir") == "--out"
    assert option("gap", 0) == "gap=0"


def test_the_command_line_wording_ends_with_its_command(tmp_path):
    """An error inside `geodnn` names the flag; the same error in the notebook afterwards (the
    command ended with that error) names the keyword."""
    existing = tmp_path / "map.tif"
    existing.write_bytes(b"")
    with pytest.raises(OutputError, match="pass --overwrite to"), command_line():
        check_output(existing, overwrite=False)
    with pytest.raises(OutputError, match="pass overwrite=True to"):
        check_output(existing, overwrite=False)


def test_scopes_left_in_any_order_across_threads_end_the_command_line_wording(
    another_thread_leaves_first,
):
    with another_thread_leaves_first(command_line):
        assert option("overwrite", True) == "--overwrite"
    assert option("overwrite", True) == "overwrite=True"
