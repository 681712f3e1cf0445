"""xarray backend: ``xr.open_dataarray(path, engine="wsi_xr")`` and ``xr.open_datatree``.

Registered in ``pyproject.toml`` under ``[project.entry-points."xarray.backends"]``.
It returns the same lazy, chunked objects as :func:`wsi_xr.open_slide` and
:func:`wsi_xr.open_pyramid`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import xarray as xr
from xarray.backends import BackendEntrypoint

from wsi_xr.slide import ChunkSpec, open_pyramid, open_slide

_EXTENSIONS = (".svs", ".tif", ".tiff", ".ptif", ".btf")


class WsiXrBackendEntrypoint(BackendEntrypoint):
    """Open whole-slide images with wsi_xr's readers (cuCIM, tifffile fallback)."""

    description = "Whole-slide images (SVS, tiled TIFF) as lazy cuCIM-backed arrays"
    url = "https://github.com/wsi-xr/wsi_xr"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "level", "wsi_chunks", "backend")

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        try:
            return str(filename_or_obj).lower().endswith(_EXTENSIONS)
        except TypeError:
            return False

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        level: int = 0,
        wsi_chunks: ChunkSpec = None,
        backend: str = "auto",
    ) -> xr.Dataset:
        """One level as a Dataset with the single variable ``image``.

        ``wsi_chunks`` sets the read chunking (xarray's own ``chunks=`` rechunks after).
        """
        return open_slide(filename_or_obj, level=level, chunks=wsi_chunks, backend=backend).to_dataset()

    def open_datatree(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        wsi_chunks: ChunkSpec = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> xr.DataTree:
        """Every level: nodes ``level_0``, ``level_1``, ... each holding ``image``."""
        return open_pyramid(filename_or_obj, chunks=wsi_chunks, backend=backend)

    def open_groups_as_dict(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: str | Iterable[str] | None = None,
        wsi_chunks: ChunkSpec = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> dict[str, xr.Dataset]:
        tree = self.open_datatree(filename_or_obj, wsi_chunks=wsi_chunks, backend=backend)
        return {node.path: node.to_dataset() for node in tree.subtree}
