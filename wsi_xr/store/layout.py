"""The pipeline's store layout: one group per slide, created atomically, resumed by fingerprint.

Layout of one slide (a group; a cohort has one per slide), see README "Output layout":
every dimension has a 1-D index variable of its own name (level-0 pixel origins for
``tile_*``, ``patch_*`` and ``chunk_*``; ``0..k-1`` for ``feature``), and no other
variable shares a name with a dimension, so ``sel`` works on every axis.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from wsi_xr._failpoints import failpoint
from wsi_xr.errors import StoreError
from wsi_xr.store.attrs import normalise_attrs, update_attrs

if TYPE_CHECKING:
    import zarr
from wsi_xr.store.ownership import (
    COHORT_ATTR,
    LAYOUT_VERSION,
    RUN_ATTR,
    _build_then_rename,
    _zarr_attrs,
    foreign_content,
    remove_stale_temporaries,
)


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array member ``name`` of ``group``, writing every chunk even when it holds only the
    fill value (so a chunk file that is missing was lost, never just empty: see :func:`checksummed`)."""
    return cast("zarr.Array", group[name]).with_config({"write_empty_chunks": True})


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """All of the array member ``name`` of ``group``, read into memory."""
    return cast(np.ndarray, zarr_array(group, name)[...])


def json_safe_attrs(attrs: dict) -> dict:
    """Attrs that Zarr can store as JSON (None stays None, numpy scalars become Python).

    Not netCDF-safe: wsi_xr writes its stores' attributes with
    :func:`~wsi_xr.store.attrs.update_attrs` / :func:`~wsi_xr.store.attrs.encode_attrs`.
    """
    safe = {}
    for key, value in attrs.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        safe[key] = value
    return safe


def consolidate(store: str | os.PathLike[str]) -> None:
    """Consolidate a store's metadata (zarr warns that v3 has no spec for it yet)."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)


@dataclass(frozen=True)
class SlideLayout:
    """Shapes, chunking and index values of one slide's group in a pipeline store.

    Attributes
    ----------
    tile_y, tile_x, patch_y, patch_x, chunk_y, chunk_x
        Level-0 pixel origins: the index of each dimension.
    tile_chunks, patch_chunks
        ``(tiles_y, tiles_x)`` and ``(patches_y, patches_x)`` per Zarr chunk: one slide
        chunk's tiles and patches.
    n_features
        Length of the latent vector.
    tile_flags
        Extra bool ``(tile_y, tile_x)`` variables to create (e.g. ``"pen_mask"``).
    n_subtiles
        Sub-tiles per tile for ``tissue_fraction`` (0: none).
    """

    tile_y: np.ndarray
    tile_x: np.ndarray
    patch_y: np.ndarray
    patch_x: np.ndarray
    chunk_y: np.ndarray
    chunk_x: np.ndarray
    tile_chunks: tuple[int, int]
    patch_chunks: tuple[int, int]
    n_features: int
    tile_flags: tuple[str, ...] = field(default=())
    #: Sub-tiles per tile (an encoder's tiles larger than the VAE's: 16, a 4 x 4 grid):
    #: ``subtile_variance (tile_y, tile_x, subtile)`` and ``tissue_fraction (tile_y, tile_x)``
    #: are created when > 0.
    n_subtiles: int = 0


def checksummed() -> dict[str, Any]:
    """``create_array`` settings of every array wsi_xr writes: zstd, then a CRC32C of each
    compressed chunk (zarr v3's ``crc32c`` codec), and every chunk written even when it
    holds only the fill value. So a flipped or truncated chunk fails to read (in wsi_xr,
    xarray or zarr alike) instead of giving wrong numbers, and a deleted one is a missing
    file that :func:`wsi_xr.verify_store` reports (plain readers see the fill value)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()], "config": {"write_empty_chunks": True}}


def _create_arrays(group: Any, layout: SlideLayout, read_error: np.ndarray) -> None:
    """Every array of one slide's group (fill values NaN / False), each chunk checksummed."""
    for name in ("tile_y", "tile_x", "patch_y", "patch_x", "chunk_y", "chunk_x"):
        group.create_array(**checksummed(), name=name, data=np.asarray(getattr(layout, name), dtype=np.int64), dimension_names=(name,))
    group.create_array(**checksummed(), name="feature", data=np.arange(layout.n_features, dtype=np.int64), dimension_names=("feature",))
    nty, ntx = len(layout.tile_y), len(layout.tile_x)
    tcy, tcx = max(1, layout.tile_chunks[0]), max(1, layout.tile_chunks[1])
    tiles2d = {"shape": (nty, ntx), "chunks": (tcy, tcx), "dimension_names": ("tile_y", "tile_x")}
    failpoint("create-array")
    group.create_array(**checksummed(), name="tile_variance", dtype="float32", fill_value=np.nan, **tiles2d)
    group.create_array(**checksummed(), name="tile_mask", dtype="bool", fill_value=False, **tiles2d)
    for name in layout.tile_flags:
        group.create_array(**checksummed(), name=name, dtype="bool", fill_value=False, **tiles2d)
    errors = group.create_array(**checksummed(), name="read_error", dtype="bool", fill_value=False, **tiles2d)
    errors[...] = read_error
    pcy, pcx = max(1, layout.patch_chunks[0]), max(1, layout.patch_chunks[1])
    patches2d = {"shape": (len(layout.patch_y), len(layout.patch_x)), "chunks": (pcy, pcx), "dimension_names": ("patch_y", "patch_x")}
    failpoint("create-array")
    group.create_array(**checksummed(), name="patch_variance", dtype="float32", fill_value=np.nan, **patches2d)
    group.create_array(**checksummed(), name="patch_mask", dtype="bool", fill_value=False, **patches2d)
    group.create_array(
        **checksummed(),
        name="latent",
        shape=(nty, ntx, layout.n_features),
        chunks=(tcy, tcx, layout.n_features),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("tile_y", "tile_x", "feature"),
    )
    if layout.n_subtiles:
        n = layout.n_subtiles
        group.create_array(**checksummed(), name="subtile", data=np.arange(n, dtype=np.int64), dimension_names=("subtile",))
        group.create_array(
            **checksummed(),
            name="subtile_variance",
            shape=(nty, ntx, n),
            chunks=(tcy, tcx, n),
            dtype="float32",
            fill_value=np.nan,
            dimension_names=("tile_y", "tile_x", "subtile"),
        )
        group.create_array(**checksummed(), name="tissue_fraction", dtype="float32", fill_value=np.nan, **tiles2d)
    failpoint("create-array")
    done = group.create_array(
        **checksummed(),
        name="chunk_done",
        shape=(len(layout.chunk_y), len(layout.chunk_x)),
        chunks=(1, 1),
        dtype="bool",
        fill_value=False,
        dimension_names=("chunk_y", "chunk_x"),
    )
    done[...] = False  # every chunk stored from the start: a missing one was lost
    done.attrs["description"] = "bookkeeping: chunk (i, j) of the slide has been written"


def _fingerprint_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    a, b = json.loads(json.dumps(existing)), json.loads(json.dumps(wanted))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _old_layout_error(where: Path) -> StoreError:
    return StoreError(
        f"{where}: was written by wsi_xr 0.1.0 (store layout 1: a `latent` dimension, unindexed chunk "
        f"bookkeeping). Update it in place with `wsi-xr migrate {where}` (nothing is recomputed), "
        "or pass --overwrite to recompute it."
    )


def _foreign_data_error(where: Path, foreign: str) -> StoreError:
    return StoreError(f"{where}: holds data that wsi_xr did not write ({foreign}); wsi_xr replaces only stores it wrote. Choose another output path.")


def check_slide_target(store: Path, group_name: str | None, fingerprint: dict[str, Any], *, overwrite: bool) -> bool:
    """Raise :class:`StoreError` where a run may not write its slide's group; read-only and cheap.

    Refused: a file at the store path; a folder holding anything wsi_xr did not write
    (even with ``overwrite``); a group made from another slide or with other parameters,
    a 0.1.0 store, or another kind of wsi_xr store (unless ``overwrite``); for a cohort, a
    root that is not a cohort's. Returns True when an existing group of this very run will
    be resumed. :func:`open_or_create_slide_group` runs the same checks; the CLI runs them
    before it starts a cluster.
    """
    fingerprint = {**fingerprint, "layout": LAYOUT_VERSION}
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a Zarr store folder; choose another output path.")
    if group_name:
        _check_cohort_root(store)
        target = store / group_name
    else:
        target = store
    where = Path(f"{store}/{group_name}") if group_name else store
    foreign = foreign_content(target) if target.exists() else None
    if foreign is not None:  # never replaced, not even with overwrite
        raise _foreign_data_error(where, foreign)
    attrs = _zarr_attrs(target)
    existing = None if attrs is None else attrs.get(RUN_ATTR)
    if overwrite:
        return False
    if existing is not None:
        if "layout" not in existing:
            raise _old_layout_error(store)
        differ = _fingerprint_differences(existing, fingerprint)
        if differ == ["content"]:
            raise StoreError(
                f"{where}: was made from another slide than {fingerprint.get('source')}: its content differs, though its "
                "path, size and modification time are the same. Pass --overwrite (overwrite=True) to recompute the store "
                "from this slide, or use another store."
            )
        if "read_checks" in differ:
            raise StoreError(
                f"{where}: was started by an earlier wsi_xr (0.2.0) whose reads did not check for decoder errors, "
                "so its finished chunks may hold tiles scored and encoded from damaged data. Pass --overwrite "
                "(overwrite=True) to recompute it."
            )
        if differ == ["chunks"]:  # e.g. started by a wsi_xr that read large slides in 2048-px chunks
            side = existing["chunks"][0][0] if existing.get("chunks") and existing["chunks"][0] else None
            raise StoreError(
                f"{where}: was started with other chunks ({side}-px) than this run's; pass --chunk {side} "
                f"(chunks={side}) to resume it, or --overwrite (overwrite=True) to recompute it."
            )
        if differ:
            raise StoreError(
                f"{where}: was made from a different slide or with different parameters ({', '.join(differ)} "
                "differ). Pass --overwrite (overwrite=True) to replace it, or use another store."
            )
        return True
    if attrs is not None:  # another kind of wsi_xr store (a mask, a cohort)
        raise StoreError(f"{where}: holds another wsi_xr store (not this run's); pass --overwrite (overwrite=True) to replace it.")
    return False


def open_or_create_slide_group(
    store: Path,
    group_name: str | None,
    layout: SlideLayout,
    fingerprint: dict[str, Any],
    read_error: np.ndarray,
    *,
    overwrite: bool,
) -> tuple[Any, bool]:
    """The slide's Zarr group in ``store`` (or its ``group_name``), and whether it was resumed:
    resumed when it is this run's, created atomically when absent; hold the store's
    :class:`StoreLock` first.

    Refuses what :func:`check_slide_target` refuses.
    """
    import zarr

    if group_name:
        _ensure_cohort_root(store)
    target = store / group_name if group_name else store
    remove_stale_temporaries(target)
    if check_slide_target(store, group_name, fingerprint, overwrite=overwrite):
        group = zarr.open_group(target, mode="r+", zarr_format=3, use_consolidated=False)
        normalise_attrs(group.attrs)  # a group an earlier release began holds dicts and bools: netCDF-safe from now on
        return group, True
    fingerprint = {**fingerprint, "layout": LAYOUT_VERSION}

    def build(group: Any) -> None:
        # the fingerprint goes in first: a half-built group is never renamed into place anyway
        update_attrs(group.attrs, {RUN_ATTR: fingerprint, "complete": False})
        failpoint("create-attrs")
        _create_arrays(group, layout, read_error)

    _build_then_rename(target, build)
    return zarr.open_group(target, mode="r+", zarr_format=3, use_consolidated=False), False


def _check_cohort_root(store: Path) -> None:
    """Raise :class:`StoreError` unless ``store`` is absent, empty, or a cohort store of wsi_xr's."""
    attrs = _zarr_attrs(store)
    if attrs is not None:
        if COHORT_ATTR in attrs:
            return
        if RUN_ATTR in attrs:
            raise StoreError(f"{store}: holds one slide's results, not a cohort; write a cohort to another store.")
        if "slides" in attrs:  # a 0.1.0 cohort
            raise _old_layout_error(store)
    foreign = foreign_content(store) if store.exists() else None
    if foreign is not None:
        raise _foreign_data_error(store, foreign)
    if attrs is not None:
        raise StoreError(f"{store}: holds a tissue-mask store, not a cohort; write the cohort to another store.")


def _ensure_cohort_root(store: Path) -> None:
    """Create the root group of a cohort store (atomically), or check that it is wsi_xr's."""
    _check_cohort_root(store)
    attrs = _zarr_attrs(store)
    if attrs is not None:
        return  # a cohort root already
    remove_stale_temporaries(store)

    def build(group: Any) -> None:
        update_attrs(group.attrs, {COHORT_ATTR: {"layout": LAYOUT_VERSION}})

    _build_then_rename(store, build)


def chunks_done(store: str | os.PathLike[str], group: str | None = None) -> int:
    """How many chunks of a slide's group are marked done (0 when the group does not exist yet)."""
    import zarr

    target = Path(store) / group if group else Path(store)
    attrs = _zarr_attrs(target)
    if attrs is None or RUN_ATTR not in attrs:
        return 0
    try:
        done = read_array(zarr.open_group(target, mode="r", zarr_format=3, use_consolidated=False), "chunk_done")
    except (KeyError, OSError, ValueError):
        return 0
    return int(np.count_nonzero(done))


def slide_groups(store: str | os.PathLike[str]) -> list[str]:
    """Names of the slide groups of a cohort store (empty for a one-slide store)."""
    import zarr

    root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    return sorted(name for name in root.group_keys() if not name.startswith("."))
