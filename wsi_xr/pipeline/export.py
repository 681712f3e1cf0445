"""Tile rows out of a store: a DataFrame per slide, a Parquet file for a store or cohort."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pandas as pd
import xarray as xr

from wsi_xr.store import slide_groups, tile_rows, write_tile_parquet

__all__ = ["to_dataframe", "write_parquet"]


def to_dataframe(ds: xr.Dataset, slide: str | None = None) -> pd.DataFrame:
    """One row per tissue tile: ``x``, ``y`` (level-0 origin), ``latent_0`` … (+ ``slide``)."""
    return tile_rows(ds, slide)


def write_parquet(store: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the tissue-tile rows of a store (every slide of a cohort) to one Parquet file.

    Streams one slide at a time (one Parquet row group per slide, with a ``slide`` column
    for cohorts), so memory does not grow with the number of slides. Returns the number
    of rows written.
    """
    groups = slide_groups(store)

    def frames() -> Iterator[pd.DataFrame]:
        if groups:
            for name in groups:
                yield tile_rows(xr.open_zarr(store, group=name, consolidated=False), slide=name)
        else:
            yield tile_rows(xr.open_zarr(store, consolidated=False))

    return write_tile_parquet(frames(), out)
