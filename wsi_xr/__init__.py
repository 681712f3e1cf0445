"""wsi_xr: whole-slide images as lazy, cuCIM-backed Dask/xarray arrays.

>>> import wsi_xr
>>> image = wsi_xr.open_slide("slide.svs")          # lazy (y, x, c) uint8 DataArray
>>> tiles = image.wsi.tiles(64)                      # (tile_y, tile_x, y_in_tile, x_in_tile, c)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from wsi_xr import accessor as _accessor  # noqa: F401  (registers the .wsi accessor)
from wsi_xr.encode import encode  # eager: binds wsi_xr.encode to the function, not the submodule
from wsi_xr.errors import (
    ClusterError,
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
from wsi_xr.tissue import tissue_mask

# Names whose modules import torch are loaded on first use (``import wsi_xr`` stays fast).
_LAZY = {
    "process_slide": "wsi_xr.pipeline",
    "process_slides": "wsi_xr.pipeline",
    "to_dataframe": "wsi_xr.pipeline",
    "write_parquet": "wsi_xr.pipeline",
    "verify_store": "wsi_xr.pipeline.verify",
    "load_vae": "wsi_xr.models",
    "save_vae": "wsi_xr.models",
    "train_vae": "wsi_xr.models",
    "VAE2": "wsi_xr.models",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wsi_xr' has no attribute {name!r}")


try:
    __version__ = version("wsi_xr")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ClusterError",
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
    "tissue_mask",
    "encode",
    *_LAZY,
]
