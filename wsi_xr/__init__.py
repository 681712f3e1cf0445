"""wsi_xr: whole-slide images as lazy, cuCIM-backed Dask/xarray arrays.

>>> import wsi_xr
>>> image = wsi_xr.open_slide("slide.svs")          # lazy (y, x, c) uint8 DataArray
>>> tiles = image.wsi.tiles(64)                      # (tile_y, tile_x, y_in_tile, x_in_tile, c)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from wsi_xr import accessor as _accessor  # noqa: F401  (registers the .wsi accessor)
from wsi_xr.errors import (
    InvalidArgumentError,
    SlideOpenError,
    SlideReadError,
    StoreError,
    UnsupportedFormatError,
    WeightsError,
    WsiXrError,
)
from wsi_xr.readers import probe
from wsi_xr.slide import open_pyramid, open_slide

try:
    __version__ = version("wsi_xr")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "InvalidArgumentError",
    "SlideOpenError",
    "SlideReadError",
    "StoreError",
    "UnsupportedFormatError",
    "WeightsError",
    "WsiXrError",
    "__version__",
    "open_pyramid",
    "open_slide",
    "probe",
]
