"""Zarr output, one module a job.

- :mod:`.layout`: the pipeline's store layout (one group per slide, created atomically,
  resumed by fingerprint), cohorts, chunk bookkeeping;
- :mod:`.ownership`: what wsi_xr wrote and what it may replace (``--overwrite``), atomic swaps;
- :mod:`.lock`: the store lock;
- :mod:`.attrs`: attributes in a form netCDF can hold (dicts as JSON text, bools as 0/1), and back;
- :mod:`.masks`: tissue-mask stores (``wsi-xr mask``, :func:`write_zarr`), :func:`open_store` (Zarr or netCDF);
- :mod:`.migrate`: stores written by wsi_xr 0.1.0 and 0.2.0;
- :mod:`.tables`: tile rows and Parquet.
"""

from wsi_xr.store.attrs import ATTR_TYPES, decode_attrs, encode_attrs, normalise_attrs, update_attrs
from wsi_xr.store.layout import (
    SlideLayout,
    check_slide_target,
    chunks_done,
    consolidate,
    json_safe_attrs,
    open_or_create_slide_group,
    read_array,
    slide_groups,
    zarr_array,
)
from wsi_xr.store.lock import StoreLock
from wsi_xr.store.masks import open_store, output_groups, write_zarr
from wsi_xr.store.migrate import migrate_store
from wsi_xr.store.ownership import (
    COHORT_ATTR,
    LAYOUT_VERSION,
    MASK_ATTR,
    RUN_ATTR,
    check_output,
    foreign_content,
    remove_stale_temporaries,
    swap_in,
)
from wsi_xr.store.tables import tile_rows, write_tile_parquet

__all__ = [
    "ATTR_TYPES",
    "COHORT_ATTR",
    "LAYOUT_VERSION",
    "MASK_ATTR",
    "RUN_ATTR",
    "SlideLayout",
    "StoreLock",
    "check_output",
    "check_slide_target",
    "chunks_done",
    "consolidate",
    "decode_attrs",
    "encode_attrs",
    "foreign_content",
    "json_safe_attrs",
    "migrate_store",
    "normalise_attrs",
    "open_or_create_slide_group",
    "open_store",
    "output_groups",
    "read_array",
    "remove_stale_temporaries",
    "slide_groups",
    "swap_in",
    "tile_rows",
    "update_attrs",
    "write_tile_parquet",
    "write_zarr",
    "zarr_array",
]
