"""Self-describing checkpoints: one file with the model config, weights and scene metadata.

Files hold only tensors and plain Python values so they load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .errors import CheckpointError
from .model import ChainConfig, ChainNet

FORMAT = "geodnn.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model plus what a map needs (class names, colors, extras)."""

    model: ChainNet
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ChainConfig:
        return self.model.config

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.get("class_names")
        return list(names) if names else default_class_names(self.config.classes)

    @property
    def class_colors(self) -> list[tuple[int, int, int]]:
        colors = self.metadata.get("class_colors")
        if colors:
            return [tuple(int(v) for v in c[:3]) for c in colors]
        return default_class_colors(self.config.classes)


def default_class_names(classes: int) -> list[str]:
    return ["background"] + [f"class_{i}" for i in range(1, classes)]


def default_class_colors(classes: int) -> list[tuple[int, int, int]]:
    """A grey ramp, black to white: only for checkpoints saved without colors (training stores
    the tile store's palette in every checkpoint)."""
    steps = max(classes - 1, 1)
    return [(round(255 * i / steps),) * 3 for i in range(classes)]


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist; create it first")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_checkpoint(model: ChainNet, path: str | os.PathLike, **metadata: Any) -> None:
    """Save `model` with metadata (class_names, class_colors, anything plain) to one file.

    Metadata is made plain first (numpy values to Python ones, paths to text), so the file
    loads with `weights_only=True`; a value that cannot be is refused, naming its key, as
    are class names or colors that are not one per class of the model."""
    problem = per_class_problem(metadata, model.config.classes)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; pass one per class")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": {key: plain_value(value, key, path) for key, value in metadata.items()},
    }
    atomic_torch_save(payload, path)


PER_CLASS = ("class_names", "class_colors")  # metadata lists with one entry per class


def per_class_problem(metadata: dict[str, Any], classes: int) -> str | None:
    """What is wrong with class names or colors that are not a list of one per class (empty:
    the defaults), or None: a map or polygon layer would fail on them after the whole
    prediction."""
    for key in PER_CLASS:
        value = metadata.get(key)
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
            return f"{key} must be a list, not {value!r}"
        if len(value) != classes:
            return f"{len(value)} {key.replace('_', ' ')} for a model of {classes} classes"
    return None


def plain_value(value: Any, key: str, path: str | os.PathLike) -> Any:
    """`value` as what `weights_only` loading accepts: numbers, text, bools, None, tensors and
    lists, tuples, sets and dicts of them."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, list | tuple | set):
        return type(value)(plain_value(v, key, path) for v in value)
    if isinstance(value, dict):
        return {str(k): plain_value(v, key, path) for k, v in value.items()}
    raise CheckpointError(
        f"{path}: metadata {key!r} holds a {type(value).__name__}, which a checkpoint cannot "
        "keep; pass numbers, text, lists or dicts"
    )


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PICKLE_MAGIC = tuple(b"\x80" + bytes([protocol]) for protocol in range(2, 6))


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive


def check_torch_header(path: Path) -> bytes:
    """Refuse a file that is no torch.save output at all (neither a zip nor a pickle), so a
    GeoTIFF passed as the checkpoint is named for what it is, not as a torch load failure.
    Returns the header it read (ZIP_MAGIC for a zip)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    if head.startswith(ZIP_MAGIC) or head[:2] in PICKLE_MAGIC:
        return head
    what = "an empty file, " if not head else "a TIFF image, " if head in TIFF_MAGIC else ""
    raise CheckpointError(
        f"{path}: not a geodnn checkpoint ({what}not a PyTorch file); "
        "pass the .pt file that `geodnn train` wrote"
    )


def cut_short(path: Path) -> bool:
    """Whether `path` is a torch.save zip archive without its end (the central directory): a
    copy or a write cut short. Refuses a file that is no torch.save output at all."""
    return check_torch_header(path) == ZIP_MAGIC and not zipfile.is_zipfile(path)


def read_torch_file(path: Path, map_location: str | torch.device) -> Any:
    """`torch.load(weights_only=True)` of `path`, its failures as one short line each."""
    if cut_short(path):
        raise CheckpointError(
            f"{path}: a truncated or damaged checkpoint (its zip archive has no end: a copy or "
            "a write cut short); copy it again, or pass the .pt file that `geodnn train` wrote"
        )
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: noise for a user
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: not a geodnn checkpoint: it holds Python objects ({refused[1]}) that "
                "safe loading (weights_only) refuses; re-save the model with geodnn"
            ) from None
        raise CheckpointError(
            f"{path}: not a geodnn checkpoint (not a torch.save file); "
            "pass the .pt file that `geodnn train` wrote"
        ) from None
    except Exception as exc:  # torch raises many types for damaged zips and pickles
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({first_sentence(exc)}); "
            "pass the .pt file that `geodnn train` wrote"
        ) from None


def _not_found(path: Path) -> str:
    """Why `path` is no checkpoint, pointing at the one a run folder does hold: model.pt is
    written when training ends, last.pt after every epoch."""
    folder, name = (path, None) if path.is_dir() else (path.parent, path.name)
    last = folder / "last.pt"
    if name is None and (folder / "model.pt").is_file():
        return f"a run folder; pass {folder / 'model.pt'}"
    if name == "last.pt" and (folder / "model.pt").is_file():
        return f"not found; pass {folder / 'model.pt'}, the run's final checkpoint"
    if name in (None, "model.pt") and last.is_file():
        what = "a run folder" if name is None else "not found"
        return f"{what}: the run has not finished; pass {last}, its latest epoch's checkpoint"
    return "checkpoint not found; pass the .pt file written by training"


def first_sentence(exc: Exception) -> str:
    """The gist of a torch error: its first sentence without C++ source locations, capped."""
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", str(exc).strip())
    return re.split(r"(?<=\.) |\n", text)[0][:120] if text else type(exc).__name__


def _check_map_location(map_location: str | torch.device) -> None:
    """A device the checkpoint can load onto here, or one line naming the argument (torch's
    own error would be reported as a damaged file)."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise CheckpointError(
            f"map_location {map_location!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"map_location {map_location!r}: geodnn runs on 'cpu' or 'cuda'")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise CheckpointError(
            f"map_location {map_location!r}: PyTorch sees {gpus} GPU(s) here; use 'cpu'"
            + (" or 'cuda'" if gpus else "")
        )


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint` (safe: `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {_not_found(path)}")
    _check_map_location(map_location)
    payload = read_torch_file(path, map_location)
    if isinstance(payload, dict) and "solver_state" in payload:
        raise CheckpointError(
            f"{path}: the run's saved state for --resume, not a model checkpoint; pass model.pt "
            "(or last.pt of a run still training) from the same folder"
        )
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a geodnn checkpoint; use a file from `geodnn train`")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload.get('version')} is not supported "
            f"(this geodnn reads version {VERSION}); re-train or upgrade geodnn"
        )
    try:
        model = ChainNet(ChainConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: the model in this checkpoint does not fit this geodnn ({reason[:200]}); "
            "re-train, or load it with the geodnn version that wrote it"
        ) from None
    metadata = dict(payload.get("metadata") or {})
    problem = per_class_problem(metadata, model.config.classes)
    if problem is not None:  # written by other code: the model itself is fine
        warnings.warn(f"{path}: {problem}; using the default names and colors", stacklevel=2)
        for key in PER_CLASS:
            metadata.pop(key, None)
    model.to(map_location).eval()
    return Checkpoint(model=model, metadata=metadata)
