"""Tissue-mask stores: :func:`write_zarr` (all or nothing) and :func:`open_store`."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import xarray as xr

from wsi_xr.errors import StoreError

if TYPE_CHECKING:
    pass
from wsi_xr.store.layout import checksummed, json_safe_attrs
from wsi_xr.store.lock import StoreLock
from wsi_xr.store.ownership import LAYOUT_VERSION, MASK_ATTR, check_output, foreign_content, swap_in


def write_zarr(ds: xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``ds`` to a Zarr v3 store (compressed, consolidated), all or nothing.

    The store is written under a temporary name beside ``path`` and renamed into place
    only when complete, so an interrupted write never leaves a store that looks whole.
    """
    out = check_output(path, overwrite=overwrite)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    ds = ds.copy()
    ds.attrs = json_safe_attrs({**ds.attrs, MASK_ATTR: {"layout": LAYOUT_VERSION}})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            codecs = {"compressors": checksummed()["compressors"]}  # each chunk checksummed, as the pipeline's
            encoding = {name: dict(codecs) for name in [*ds.data_vars, *ds.coords]}
            ds.to_zarr(partial, mode="w-", zarr_format=3, consolidated=True, encoding=encoding, write_empty_chunks=True)
        with StoreLock(out):  # never under a run that is writing this store
            if out.exists() and foreign_content(out) is not None:  # changed since the check
                raise StoreError(f"{out}: holds data that wsi_xr did not write ({foreign_content(out)}); nothing was replaced.")
            swap_in(partial, out)
    except OSError as err:
        raise StoreError(f"{out}: could not write the store ({err}); a store that was there is unchanged.") from err
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return out


def open_store(path: str | os.PathLike[str], group: str | None = None) -> xr.Dataset:
    """Open a store written by wsi_xr (one slide, or one ``group`` of a cohort)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such store. Check the path.")
    try:
        return xr.open_zarr(p, group=group, consolidated=None)
    except Exception as err:
        raise StoreError(f"{p}: not a readable wsi_xr Zarr store ({type(err).__name__}: {err}).") from err
