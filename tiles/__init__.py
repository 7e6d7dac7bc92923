"""tiles: lazy GeoTIFF reading, tile grids with halos, label rasterization, the Zarr tile store,
streaming stitching and vectorizing. Imports nothing from `geodnn`; `pipelines` joins the two."""

from .errors import LabelError, OutputError, RasterInputError, StoreError, TilesError

__all__ = ["LabelError", "OutputError", "RasterInputError", "StoreError", "TilesError"]
