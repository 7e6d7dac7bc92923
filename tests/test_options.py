"""Command-line option types: bad values are refused in words, through the one-line parser."""

import argparse

import pytest

from pipelines.options import integer, non_negative_int, number, positive_int


@pytest.mark.parametrize(
    "kind, text, said",
    [
        (integer, "two", "'two' is not a whole number"),
        (positive_int, "0", "'0' is not a whole number >= 1"),
        (positive_int, "1.5", "'1.5' is not a whole number >= 1"),
        (non_negative_int, "-1", "'-1' is not a whole number >= 0"),
        (number, "nan", "'nan' is not a finite number"),
        (number, "inf", "'inf' is not a finite number"),
    ],
)
def test_bad_values_are_refused_in_words(kind, text, said):
    with pytest.raises(argparse.ArgumentTypeError, match=said):
        kind(text)


def test_good_values_pass():
    assert (integer("-3"), positive_int("7"), non_negative_int("0")) == (-3, 7, 0)
    assert number("2.5e-3") == 0.0025


def test_the_cli_says_it_in_one_line(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "m.pt", "s.tif", "--out", "o.tif", "--min-area", "nan"])
    err = capsys.readouterr().err
    assert err == (
        "geodnn predict: error: argument --min-area: 'nan' is not a finite number; see "
        "`geodnn predict --help`\n"
    )
