import sys

from tiles.progress import progress_bar


def test_in_a_log_file_each_redraw_is_a_line_and_a_message_starts_its_own(capsys, monkeypatch):
    """Not a terminal (capsys): a message written between two redraws used to follow the bar's
    text on the same line ('... 0/5 [00:00<?, ?it/s]geodnn: INFO: ...')."""
    with progress_bar(5, "train", "it", True) as bar:
        bar.update(1)
        bar.refresh()
        print("geodnn: INFO: work balance", file=sys.stderr)
        bar.update(4)
    err = capsys.readouterr().err
    lines = err.split("\n")[:-1]
    assert "\r" not in err and "geodnn: INFO: work balance" in lines  # a whole line
    assert all(line.startswith(("train:", "geodnn:")) for line in lines), lines
    assert lines[-1].startswith("train: 100%")


def test_a_disabled_bar_writes_nothing(capsys):
    with progress_bar(3, "predict", "chunk", False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
