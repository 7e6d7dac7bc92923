"""Errors raised by tiles; each message names the file and says how to fix it."""


class TilesError(Exception):
    """Base class of user-facing errors of the raster and vector package."""


class RasterInputError(TilesError):
    """An input raster is missing, unreadable or does not fit the job."""


class LabelError(TilesError):
    """Labels are missing, empty, unprojected or do not overlap the scene."""


class OutputError(TilesError):
    """An output cannot be written (missing folder, exists without overwrite)."""


class StoreError(TilesError):
    """A tile store is missing or of another format version."""
