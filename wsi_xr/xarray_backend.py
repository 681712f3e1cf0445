"""xarray backend: ``xr.open_dataset(path, engine="wsi_xr")``, ``open_dataarray``, ``open_datatree``.

Registered in ``pyproject.toml`` under ``[project.entry-points."xarray.backends"]``, and
written the way xarray intends (as rioxarray's is):

- the level's pixels are a :class:`~wsi_xr.slide.SlideBackendArray` behind xarray's
  ``LazilyIndexedArray``: without ``chunks=``, a selection reads only the window it covers,
  when its values are asked for; with ``chunks={}`` xarray makes a Dask array chunked as
  ``encoding["preferred_chunks"]`` says (:func:`wsi_xr.slide.default_chunk_size`: multiples
  of 256 on the file's TIFF tile borders, the chunks of :func:`wsi_xr.open_slide`), and
  with ``chunks={"y": ..., "x": ...}`` as asked;
- ``drop_variables=["image"]`` leaves only the coordinates;
- ``guess_can_open`` knows every format the probe reads (TIFF-based, OpenSlide's, DICOM folders).

:func:`wsi_xr.open_slide` is the same level as a Dask array right away (always chunked);
both carry the same coordinates and attributes, and :func:`wsi_xr.tissue_mask` finds the
opened slide in either (its Dask graph holds the reader), so both give the same mask from
the same reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint
from xarray.core import indexing

from wsi_xr import accessor as _accessor  # noqa: F401  (xarray loads this entry point when it opens anything: .wsi is then registered)

# wsi_xr's readers and slide arrays are imported when a slide is opened, not when xarray lists
# its backends (it imports every backend's entry point for any open_dataset/open_zarr).

#: File name endings the probe reads: TIFF-based (cuCIM, tifffile) and OpenSlide's formats.
EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ptif",
    ".btf",
    ".qptiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
    ".dcm",
)


def _names(drop_variables: str | Iterable[str] | None) -> set[str]:
    if drop_variables is None:
        return set()
    return {drop_variables} if isinstance(drop_variables, str) else set(drop_variables)


def _level_dataset(opened: Any, level: int, drop: set[str]) -> xr.Dataset:
    """One level as a Dataset: ``image (y, x, c)`` read lazily, level-0 coordinates, the slide's attrs."""
    from wsi_xr.slide import SlideBackendArray, default_chunk_size, level_coords, slide_attrs

    lv = opened.info.levels[level]
    side = default_chunk_size(lv)
    variables = {}
    if "image" not in drop:
        data = indexing.LazilyIndexedArray(SlideBackendArray(opened, level))
        image = xr.Variable(("y", "x", "c"), data, attrs=slide_attrs(opened, level, damaged="raise"))
        image.encoding = {"preferred_chunks": {"y": side, "x": side, "c": 3}, "source": opened.info.path}
        variables["image"] = image
    coords = {name: values for name, values in level_coords(opened.info, level).items() if name not in drop}
    return xr.Dataset(variables, coords=coords)


class WsiXrBackendEntrypoint(BackendEntrypoint):
    """Open whole-slide images with wsi_xr's readers (cuCIM, tifffile, OpenSlide; chosen by the probe)."""

    description = "Whole-slide images (SVS, tiled TIFF, NDPI, MRXS, DICOM, ...) as lazy arrays with level-0 coordinates"
    url = "https://github.com/wsi-xr/wsi_xr"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "level", "backend", "mpp")

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        try:
            path = Path(os.fspath(filename_or_obj))
        except TypeError:
            return False
        if path.is_dir():  # a DICOM slide is a folder of .dcm files
            return any(child.suffix.lower() == ".dcm" for child in path.iterdir())
        return path.name.lower().endswith(EXTENSIONS)

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        level: int = 0,
        backend: str = "auto",
        mpp: float | None = None,
    ) -> xr.Dataset:
        """One level as a Dataset with the variable ``image`` (unless dropped); ``mpp`` replaces the file's."""
        from wsi_xr.errors import InvalidArgumentError
        from wsi_xr.readers import open_file

        opened = open_file(filename_or_obj, backend, mpp=mpp)
        levels = len(opened.info.levels)
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < levels:
            raise InvalidArgumentError(f"{opened.info.path}: level={level} does not exist; the slide has levels 0..{levels - 1}.")
        return _level_dataset(opened, level, _names(drop_variables))

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        backend: str = "auto",
        mpp: float | None = None,
        **kwargs: Any,
    ) -> dict[str, xr.Dataset]:
        """Every level as a group ``level_0``, ``level_1``, ...; the root holds the slide's metadata."""
        from wsi_xr.readers import open_file
        from wsi_xr.slide import pyramid_attrs

        opened = open_file(filename_or_obj, backend, mpp=mpp)
        info = opened.info
        drop = _names(drop_variables)
        groups = {"/": xr.Dataset(attrs=pyramid_attrs(info))}
        for lv in info.levels:
            groups[f"/level_{lv.index}"] = _level_dataset(opened, lv.index, drop)
        return groups

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        backend: str = "auto",
        mpp: float | None = None,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Every level: nodes ``level_0``, ``level_1``, ... each holding ``image``."""
        return xr.DataTree.from_dict(self.open_groups_as_dict(filename_or_obj, drop_variables=drop_variables, backend=backend, mpp=mpp))
