"""The ``.wsi`` accessors on slide DataArrays and mask/pipeline Datasets (stateless: everything lives in coords/attrs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import xarray as xr

from wsi_xr.errors import InvalidArgumentError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage


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

    @property
    def attrs(self) -> dict[str, Any]:
        """The attributes with their original types (:func:`wsi_xr.store.decode_attrs`)."""
        from wsi_xr.store.attrs import decode_attrs

        return decode_attrs(self._obj.attrs)

    def plot(self, ax: Axes | None = None, **kwargs: Any) -> AxesImage:
        """Draw this image ``(y, x, c)`` (or a ``(tile_y, tile_x)`` grid) in level-0 pixels, y downward,
        each pixel covering ``[c, c + size)`` from its top-left coordinate: overlays drawn with
        ``ds.wsi.plot(ax=...)`` align with it. Keyword arguments: :func:`wsi_xr.plot.imshow`.

        >>> artist = image.wsi.plot()                 # a new Figure: artist.figure
        >>> ds.wsi.plot("tile_mask", ax=artist.axes)  # tissue tiles over the slide
        """
        from wsi_xr.plot import imshow

        return imshow(self._obj, ax, **kwargs)

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


def tissue_tiles(ds: xr.Dataset, variables: Any = None) -> xr.Dataset:
    """The tissue tiles of a mask or pipeline Dataset, one per position of a new ``tile`` dimension.

    Parameters
    ----------
    ds
        A Dataset with ``tile_mask (tile_y, tile_x)`` (from :func:`wsi_xr.tissue_mask`,
        :func:`wsi_xr.process_slide`, or ``xr.open_zarr`` of a store).
    variables
        Names of the ``(tile_y, tile_x, ...)`` variables to keep (default: all of them, e.g.
        ``latent``, ``tile_variance``, ``read_error``).

    Returns
    -------
    xr.Dataset
        Dims ``("tile", ...)``: the tiles where ``tile_mask`` is True in row-major order, with
        coordinates ``tile_y``/``tile_x`` (level-0 origin of each tile, what ``read_region``
        takes). Only ``tile_mask`` is computed here; a lazy variable (a Zarr-backed latent
        cube) stays lazy and is read chunk by chunk. A slide without tissue tiles gives a
        ``tile`` dimension of length 0.
    """
    import numpy as np

    if "tile_mask" not in ds:
        raise InvalidArgumentError("tissue_tiles needs a Dataset with a tile_mask variable (from tissue_mask or a wsi_xr store).")
    if variables is None:
        variables = [name for name in ds.data_vars if {"tile_y", "tile_x"} <= set(ds[name].dims) and name != "tile_mask"]
    elif isinstance(variables, str):
        variables = [variables]
    missing = [name for name in variables if name not in ds]
    if missing:
        raise InvalidArgumentError(f"tissue_tiles: no variable {missing[0]!r} in the Dataset; it has {sorted(cast('Iterable[str]', ds.data_vars))}.")
    rows, cols = np.nonzero(np.asarray(ds["tile_mask"].values, dtype=bool))
    selected = ds[list(variables)].drop_vars([c for c in ds.coords if c not in ("tile_y", "tile_x", "feature")], errors="ignore")
    if rows.size:  # pointwise selection: lazy variables are read chunk by chunk, never whole
        out = selected.isel(tile_y=xr.DataArray(rows, dims="tile"), tile_x=xr.DataArray(cols, dims="tile"))
    else:  # dask cannot index zero points; build the empty result directly
        empty = {}
        for name in variables:
            other = [d for d in selected[name].dims if d not in ("tile_y", "tile_x")]
            shape = (0, *(selected.sizes[d] for d in other))
            empty[name] = (("tile", *other), np.empty(shape, dtype=selected[name].dtype), selected[name].attrs)
        coords: dict[str, Any] = {
            "tile_y": ("tile", np.empty(0, dtype=ds["tile_y"].dtype)),
            "tile_x": ("tile", np.empty(0, dtype=ds["tile_x"].dtype)),
        }
        if "feature" in selected.coords:
            coords["feature"] = selected["feature"].values
        out = xr.Dataset(empty, coords=coords)
    out.attrs = dict(ds.attrs)
    return out.transpose("tile", ...)


@xr.register_dataset_accessor("wsi")
class WsiDatasetAccessor:
    """Slide-aware operations on a mask or pipeline ``Dataset`` (stateless)."""

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def tissue_tiles(self, variables: Any = None) -> xr.Dataset:
        """:func:`tissue_tiles` of this Dataset: one entry per tissue tile along ``tile``.

        >>> tissue = ds.wsi.tissue_tiles()          # latent (tile, feature), tile_y/tile_x per tile
        """
        return tissue_tiles(self._obj, variables)

    @property
    def attrs(self) -> dict[str, Any]:
        """The attributes with their original types: a store's (or a netCDF file's written from one)
        run fingerprint as a dict, ``complete`` as a bool, ``mpp`` None where the file did not say
        (:func:`wsi_xr.store.decode_attrs`). ``ds.attrs`` itself holds them as stored, so that
        ``ds.to_netcdf(path)`` works."""
        from wsi_xr.store.attrs import decode_attrs

        return decode_attrs(self._obj.attrs)

    def plot(self, variable: str = "tile_mask", ax: Axes | None = None, **kwargs: Any) -> AxesImage:
        """Draw one ``(tile_y, tile_x)`` or ``(patch_y, patch_x)`` variable in level-0 pixels, y downward,
        on tile edges (a tile at ``c`` covers ``[c, c + tile)``), so it lies over a slide drawn with
        ``image.wsi.plot()`` exactly. A bool variable draws its True tiles in one colour
        (``colour=``, ``alpha=``) and leaves the rest transparent. Keyword arguments:
        :func:`wsi_xr.plot.imshow`.

        >>> artist = image.wsi.plot()
        >>> ds.wsi.plot("tile_mask", ax=artist.axes, alpha=0.4)
        """
        from wsi_xr.plot import imshow

        if variable not in self._obj.data_vars:
            raise InvalidArgumentError(f"no variable {variable!r} to plot; the Dataset has {sorted(map(str, self._obj.data_vars))}.")
        return imshow(self._obj[variable], ax, attrs=self.attrs, **kwargs)
