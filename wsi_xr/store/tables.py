"""Tile rows: one row per tissue tile, and Parquet written one slide (one row group) at a time."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from wsi_xr.errors import StoreError
from wsi_xr.outputs import check_output_file

if TYPE_CHECKING:
    pass


def tile_rows(ds: xr.Dataset, slide: str | None = None) -> Any:
    """One row per tissue tile of a slide Dataset: ``x``, ``y`` (``tissue_fraction`` for an
    encoder's store), ``latent_0`` ... (+ ``slide``).

    Returns a pandas DataFrame (one slide's rows: bounded by the slide, not the cohort); a
    slide without a whole tile gives no rows (and the same columns).
    """
    import pandas as pd

    from wsi_xr.accessor import tissue_tiles

    extra = ["tissue_fraction"] if "tissue_fraction" in ds else []  # an encoder's store: the share of tissue per tile
    tissue = tissue_tiles(ds, ["latent", *extra])
    frame = pd.DataFrame({"x": tissue["tile_x"].values.astype(np.int64), "y": tissue["tile_y"].values.astype(np.int64)})
    for name in extra:
        frame[name] = np.asarray(tissue[name].values, dtype=np.float32)
    latents = np.asarray(tissue["latent"].values)
    for i in range(latents.shape[1]):
        frame[f"latent_{i}"] = latents[:, i].astype(np.float32)
    if slide is not None:
        frame.insert(0, "slide", slide)
    return frame


def _parquet_marker() -> bytes:
    """The Parquet schema metadata that marks a file as wsi_xr's tile rows."""
    from wsi_xr import __version__

    return json.dumps({"version": __version__, "rows": "one per tissue tile"}).encode()


def write_tile_parquet(frames: Iterator[Any], out: str | os.PathLike[str]) -> int:
    """Stream DataFrames (same columns) into one Parquet file, one row group each.

    Memory holds one frame at a time, never the whole cohort. Written to a temporary
    name and renamed into place when complete. Returns the number of rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = check_output_file(out, "parquet")
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    rows = 0
    writer = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"wsi_xr": _parquet_marker()})
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            rows += len(frame)
        if writer is None:
            raise StoreError(f"{target}: no slides to write.")
        writer.close()
        writer = None
        os.replace(partial, target)
    except OSError as err:
        raise StoreError(f"{target}: cannot write the Parquet file ({err}).") from err
    finally:
        if writer is not None:
            writer.close()
        if partial.exists():
            partial.unlink()
    return rows
