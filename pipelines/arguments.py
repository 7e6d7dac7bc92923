"""Checks of the Python API's arguments (a notebook's `build_store`, `predict_scene`, ...): a
value of the wrong type is one line naming the argument, not a TypeError from deep inside
rasterio, Dask or pathlib. The command line's options are checked by argparse
(`pipelines.options`) before they get here."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import PipelineError


def whole(name: str, value: Any, least: int) -> int:
    """`value` as a whole number of at least `least` (a bool or a float is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise PipelineError(f"{name}={value!r}: pass a whole number >= {least}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """`value` as True or False (numpy's too): "no" would be truthy."""
    if not isinstance(value, bool | np.bool_):
        raise PipelineError(f"{name}={value!r}: pass True or False")
    return bool(value)


def text(name: str, value: Any, example: str) -> str:
    """`value` as text, such as `example`."""
    if not isinstance(value, str):
        raise PipelineError(f"{name}={value!r}: pass text such as {example!r}")
    return value


def names(name: str, value: Any) -> list[str] | None:
    """`value` as a list of names, or None: a lone string would be read letter by letter."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise PipelineError(f"{name}={value!r}: pass a list of names, one per class")
    return [str(v) for v in value]
