"""Tissue-mask stores: :func:`write_zarr` (all or nothing); :func:`open_store` opens any wsi_xr output (Zarr or netCDF)."""

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
from wsi_xr.store.attrs import encode_attrs
from wsi_xr.store.layout import checksummed
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
    ds.attrs = encode_attrs({**ds.attrs, MASK_ATTR: {"layout": LAYOUT_VERSION}})  # netCDF-safe: see wsi_xr.store.attrs
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
    """Open wsi_xr output lazily: a Zarr store it wrote (one slide, or one ``group`` of a cohort), or
    a netCDF file written from one (``ds.to_netcdf(path)``; a cohort's ``tree.to_netcdf(path)``).

    The attributes are left as stored, so the Dataset can be written again with plain
    ``ds.to_netcdf()``; ``ds.wsi.attrs`` gives them with their original types (dicts, bools,
    None: :func:`~wsi_xr.store.attrs.decode_attrs`), the same from the store and from the file.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such store or netCDF file. Check the path.")
    if p.is_file():
        return _open_netcdf(p, group)
    try:
        return xr.open_zarr(p, group=group, consolidated=None)
    except Exception as err:
        raise StoreError(f"{p}: not a readable wsi_xr Zarr store ({_first_line(err)}).") from err


#: The first bytes of the netCDF files xarray writes: netCDF-4 (HDF5) and netCDF-3 (classic, 64-bit offset).
_NETCDF_MAGIC = (b"\x89HDF\r\n\x1a\n", b"CDF\x01", b"CDF\x02")


def _check_netcdf(path: Path) -> None:
    """Raise :class:`StoreError` unless the file at ``path`` starts as a netCDF file does."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head.startswith(_NETCDF_MAGIC):
        raise StoreError(
            f"{path}: a file, but neither a netCDF file nor a Zarr store (a folder); pass a store written by wsi_xr or a netCDF file written from one."
        )


def _first_line(err: Exception) -> str:
    """An exception as one line, for a one-line error message (xarray's may run over several)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _open_netcdf(path: Path, group: str | None) -> xr.Dataset:
    _check_netcdf(path)
    try:
        return xr.open_dataset(path, group=group, chunks={})
    except Exception as err:
        where = f" (group {group!r})" if group else ""
        raise StoreError(
            f"{path}: cannot be read as netCDF{where} ({_first_line(err)}); check the file "
            "(a netCDF-4 file needs the netCDF4 package, a dependency of wsi_xr) and the group name."
        ) from err


def output_groups(path: str | os.PathLike[str]) -> list[str]:
    """Names of the slide groups of a cohort's output (a Zarr store, or a netCDF file written from
    one with ``tree.to_netcdf``); empty for one slide's."""
    p = Path(path)
    if p.is_dir():
        from wsi_xr.store.layout import slide_groups

        return slide_groups(p) if (p / "zarr.json").is_file() else []
    if not p.is_file():
        return []
    _check_netcdf(p)
    try:
        tree = xr.open_datatree(p)
    except Exception as err:
        raise StoreError(f"{p}: cannot be read as netCDF ({_first_line(err)}); check the file.") from err
    with tree:
        return sorted(str(name) for name in tree.children)
