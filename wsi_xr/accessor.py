"""The ``.wsi`` accessor on slide DataArrays (stateless: everything lives in coords/attrs)."""

from __future__ import annotations

from typing import Any

import xarray as xr

from wsi_xr.errors import InvalidArgumentError


@xr.register_dataarray_accessor("wsi")
class WsiAccessor:
    """Slide-aware operations on an image ``DataArray`` ``(y, x, c)`` from :func:`wsi_xr.open_slide`."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    @property
    def source(self) -> str | None:
        """The slide file this array reads from."""
        return self._obj.attrs.get("source")

    @property
    def mpp(self) -> float | None:
        """Microns per level-0 pixel (None when the file does not say)."""
        return self._obj.attrs.get("mpp")

    def tiles(self, size: int) -> xr.DataArray:
        """The image as a grid of ``size`` x ``size`` tiles.

        Returns dims ``(tile_y, tile_x, y_in_tile, x_in_tile, c)``; ``tile_y``/``tile_x``
        are the level-0 offsets of each tile's top-left pixel. Partial tiles at the right
        and bottom edges are dropped. A reshape, not a copy: with chunks that are
        multiples of ``size`` every block maps to whole tiles without rechunking.
        """
        image = self._obj
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidArgumentError(f"tile size {size!r} must be a positive integer.")
        if tuple(image.dims) != ("y", "x", "c"):
            raise InvalidArgumentError(f"tiles() needs dims ('y', 'x', 'c'), got {image.dims}.")
        ny, nx = image.sizes["y"] // size, image.sizes["x"] // size
        trimmed = image.isel(y=slice(0, ny * size), x=slice(0, nx * size))
        grid = trimmed.data.reshape(ny, size, nx, size, image.sizes["c"]).transpose(0, 2, 1, 3, 4)
        return xr.DataArray(
            grid,
            dims=("tile_y", "tile_x", "y_in_tile", "x_in_tile", "c"),
            coords={
                "tile_y": image["y"].values[: ny * size : size],
                "tile_x": image["x"].values[: nx * size : size],
                "c": image["c"].values,
            },
            name=image.name,
            attrs={**image.attrs, "tile": size},
        )

    def tissue_mask(self, **kwargs: Any) -> xr.Dataset:
        """:func:`wsi_xr.tissue_mask` of this image (same keyword arguments)."""
        from wsi_xr.tissue import tissue_mask

        return tissue_mask(self._obj, **kwargs)
