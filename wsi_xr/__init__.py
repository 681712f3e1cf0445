"""wsi_xr: whole-slide images as lazy, cuCIM-backed Dask/xarray arrays.

>>> import wsi_xr
>>> image = wsi_xr.open_slide("slide.svs")          # lazy (y, x, c) uint8 DataArray
>>> tiles = image.wsi.tiles(64)                      # (tile_y, tile_x, y_in_tile, x_in_tile, c)
"""

from __future__ import annotations

import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import wrapt

from wsi_xr._lazy import lazy_getattr
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

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from wsi_xr.encode import encode
    from wsi_xr.models import VAE2, load_vae, save_vae, train_vae
    from wsi_xr.pipeline import process_slide, process_slides, to_dataframe, write_parquet
    from wsi_xr.pipeline.verify import verify_store
    from wsi_xr.readers import probe
    from wsi_xr.slide import open_pyramid, open_slide
    from wsi_xr.store import open_store
    from wsi_xr.tissue import tissue_mask

# Everything else is loaded on first use, so that ``import wsi_xr`` and ``wsi-xr --help`` cost
# a few milliseconds, not the second that xarray, Dask, cuCIM and torch take to import.
_LAZY = {
    "open_slide": "wsi_xr.slide",
    "open_pyramid": "wsi_xr.slide",
    "open_store": "wsi_xr.store",
    "probe": "wsi_xr.readers",
    "tissue_mask": "wsi_xr.tissue",
    "encode": "wsi_xr.encode",
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


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


class _Package(types.ModuleType):
    """The package module: importing the submodule ``wsi_xr.encode`` does not rebind the
    function ``wsi_xr.encode`` (Python sets a package attribute per imported submodule)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_accessor(_xarray: object) -> None:
    from wsi_xr import accessor  # noqa: F401  (registers .wsi on DataArray and Dataset)


# `.wsi` is there as soon as xarray is (now, if it is loaded already), without importing it here
wrapt.register_post_import_hook(_register_accessor, "xarray")

try:
    __version__ = version("wsi_xr")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "VAE2",
    "ClusterError",
    "InvalidArgumentError",
    "SlideOpenError",
    "SlideReadError",
    "StoreError",
    "UnsupportedFormatError",
    "WeightsError",
    "WsiXrError",
    "__version__",
    "encode",
    "load_vae",
    "open_pyramid",
    "open_slide",
    "open_store",
    "probe",
    "process_slide",
    "process_slides",
    "save_vae",
    "tissue_mask",
    "to_dataframe",
    "train_vae",
    "verify_store",
    "write_parquet",
]
