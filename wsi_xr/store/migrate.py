"""Migration of stores written by wsi_xr 0.1.0 (store layout 1) and 0.2.0 (attributes netCDF cannot hold) to the current layout, in place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from wsi_xr.errors import StoreError

if TYPE_CHECKING:
    pass
from wsi_xr.store.attrs import normalise_attrs, update_attrs
from wsi_xr.store.layout import consolidate, zarr_array
from wsi_xr.store.lock import StoreLock
from wsi_xr.store.ownership import COHORT_ATTR, LAYOUT_VERSION, RUN_ATTR, _is_our_group, _zarr_attrs


def _rewrite_json(path: Path, change: Any) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    tmp = path.with_name(path.name + ".migrating")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _encode_attributes(folder: Path) -> bool:
    """Rewrite the attributes of the wsi_xr group at ``folder`` in netCDF-safe form (what 0.1.0 and
    0.2.0 wrote holds dicts and bools: :mod:`wsi_xr.store.attrs`); False when there is nothing to do."""
    import zarr

    if not _is_our_group(folder, _zarr_attrs(folder)):
        return False  # a user's group: its attributes are never touched
    return normalise_attrs(zarr.open_group(folder, mode="r+", zarr_format=3, use_consolidated=False).attrs)


def _migrate_group(folder: Path) -> bool:
    """Bring one slide group to the current layout and attribute encoding in place; False when there
    is nothing to do."""
    attrs = _zarr_attrs(folder)
    if attrs is None or RUN_ATTR not in attrs:
        return False
    if "layout" in attrs[RUN_ATTR]:
        return _encode_attributes(folder)
    _migrate_layout_1(folder, attrs)
    return True


def _migrate_layout_1(folder: Path, attrs: dict[str, Any]) -> None:
    """Bring one slide group from layout 1 to 2 in place (and its attributes to netCDF-safe form)."""
    import zarr

    latent_meta = folder / "latent" / "zarr.json"

    def rename_dimension(doc: dict[str, Any]) -> None:
        doc["dimension_names"] = ["tile_y", "tile_x", "feature"]

    _rewrite_json(latent_meta, rename_dimension)
    group = zarr.open_group(folder, mode="r+", zarr_format=3, use_consolidated=False)
    n_features = zarr_array(group, "latent").shape[2]
    if "feature" not in group:
        group.create_array("feature", data=np.arange(n_features, dtype=np.int64), dimension_names=("feature",))
    run = dict(attrs[RUN_ATTR])
    chunks = run.get("chunks")
    for name, axis in (("chunk_y", 0), ("chunk_x", 1)):
        if name not in group and chunks:
            origins = np.cumsum([0] + list(chunks[axis][:-1])) * float(cast(float, group.attrs.get("downsample", 1.0)))
            group.create_array(name, data=np.round(origins).astype(np.int64), dimension_names=(name,))
    run["layout"] = LAYOUT_VERSION
    update_attrs(group.attrs, {RUN_ATTR: run})  # every attribute re-encoded, not only this one


def migrate_store(path: str | os.PathLike[str]) -> list[str]:
    """Update a store written by wsi_xr 0.1.0 or 0.2.0 to the current layout, in place.

    For 0.1.0 (layout 1): renames the ``latent`` dimension of the latent cube to ``feature``
    (metadata only, no data rewritten), adds the ``feature`` and ``chunk_y``/``chunk_x``
    index variables and records the layout version. For both: rewrites the attributes in
    netCDF-safe form (dicts as JSON text, bools as 0/1, None left out: :mod:`wsi_xr.store.attrs`),
    so ``xr.open_zarr(store).to_netcdf(path)`` works. Then re-consolidates the metadata.
    Returns the groups changed ("/" for the root: a one-slide store, or a cohort's root
    attributes). Running it twice changes nothing.
    """
    store = Path(path)
    if _zarr_attrs(store) is None:
        raise StoreError(f"{store}: not a Zarr store written by wsi_xr; check the path.")
    changed = []
    with StoreLock(store):
        root_changed = _migrate_group(store)
        for child in sorted(store.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and _migrate_group(child):
                changed.append(child.name)
        root_attrs = _zarr_attrs(store) or {}
        if changed and RUN_ATTR not in root_attrs and COHORT_ATTR not in root_attrs:
            import zarr

            update_attrs(zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False).attrs, {COHORT_ATTR: {"layout": LAYOUT_VERSION}})
            root_changed = True
        elif RUN_ATTR not in root_attrs:
            root_changed = _encode_attributes(store) or root_changed  # a cohort's root: its marker and `slides`
        if root_changed:
            changed.insert(0, "/")
        if changed:
            consolidate(store)
    return changed
