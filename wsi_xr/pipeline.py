"""The end-to-end job: slide(s) in, a Zarr store with the tile mask and latent cube out.

Each chunk of the slide is read **once**; the one read feeds both the variance
statistics and the encoder. Results are written chunk by chunk into Zarr regions, and
a chunk is marked done only after its data are written, so a run killed at any moment
and started again computes only the missing chunks. The store is marked ``complete``
only after every chunk is done and the mask is finalised.

With ``threshold="auto"`` the threshold is known only once every tile variance is
known; so each chunk encodes every *candidate* tile (one that passes the lowest
threshold "auto" can choose), and finalising blanks the latents of tiles below the
chosen threshold. No pixel is read twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from wsi_xr.encode import ModelRef, encode_block, model_ref
from wsi_xr.errors import InvalidArgumentError, SlideReadError, StoreError
from wsi_xr.readers import SlideInfo, choose_backend, probe
from wsi_xr.slide import ChunkSpec, level_coords, slide_array
from wsi_xr.store import StoreLock, consolidate, json_safe_attrs
from wsi_xr.tissue.coarse import blocks_with_possible_tissue, choose_coarse_level
from wsi_xr.tissue.kernels import block_statistics, to_numpy
from wsi_xr.tissue.mask import damaged_tile_grid, damaged_file_tiles, two_stage_rule, validate_mask_arguments
from wsi_xr.tissue.threshold import THRESHOLD_RANGE, auto_threshold

__all__ = ["process_slide", "process_slides", "to_dataframe", "write_parquet"]

log = logging.getLogger("wsi_xr")

LATENT = 32
#: The lowest threshold "auto" can choose: tiles above it are encoded as candidates.
CANDIDATE_FLOOR = THRESHOLD_RANGE[0]


@dataclass
class RunPlan:
    """Everything decided in the client before any level-0 pixel is read."""

    info: SlideInfo
    level: int
    backend: str
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    tile: int
    patch: int
    threshold: float | str
    coarse: str | int
    coarse_level: int | None
    read: np.ndarray
    excluded: np.ndarray
    ref: ModelRef
    batch_size: int
    device: str
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def tile_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(c // self.tile for c in self.chunks[0]), tuple(c // self.tile for c in self.chunks[1])  # type: ignore[return-value]

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.excluded.shape  # type: ignore[return-value]

    @property
    def k(self) -> int:
        return self.patch // self.tile


def _plan(
    path: str | os.PathLike[str],
    *,
    weights: Any,
    tile: int,
    patch: int,
    threshold: float | str,
    coarse: str | int,
    chunks: ChunkSpec,
    level: int,
    backend: str,
    batch_size: int,
    device: str,
) -> RunPlan:
    validate_mask_arguments(tile, patch, threshold)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size={batch_size}: must be >= 1.")
    info = probe(path)
    if tile != 64:
        raise InvalidArgumentError(f"tile={tile}: the VAE encodes 64x64 tiles; use tile=64 for the pipeline.")
    array = slide_array(info, level, chunks, backend)
    block_chunks = array.chunks[:2]
    for axis in (0, 1):
        if any(c % patch for c in block_chunks[axis][:-1]):
            raise InvalidArgumentError(
                f"chunk size {block_chunks[axis][0]} is not a multiple of patch={patch}; pass --chunk with a multiple of {patch}."
            )
    name = choose_backend(info, backend)
    lv = info.levels[level]
    coarse_level = choose_coarse_level(info, level, coarse)
    read = (
        blocks_with_possible_tissue(info, level, coarse_level, block_chunks, name)
        if coarse_level is not None
        else np.ones((len(block_chunks[0]), len(block_chunks[1])), dtype=bool)
    )
    excluded = damaged_tile_grid(info, level, name, tile, (lv.height // tile, lv.width // tile))
    ref = model_ref(weights, device=device)
    plan = RunPlan(info, level, name, block_chunks, tile, patch, threshold, coarse, coarse_level, read, excluded, ref, batch_size, device)
    plan.fingerprint = {
        "source": info.path,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "level": level,
        "tile": tile,
        "patch": patch,
        "threshold_setting": threshold,
        "coarse": str(coarse),
        "chunks": [list(block_chunks[0]), list(block_chunks[1])],
        "weights_sha256": ref.sha256,
    }
    return plan


# ---------------------------------------------------------------------------- store


def _create_group(group: zarr.Group, plan: RunPlan) -> None:
    """Create every array of the output (fill values: NaN / False) and the bookkeeping."""
    nty, ntx = plan.tile_shape
    npy, npx = -(-nty // plan.k), -(-ntx // plan.k)
    tcy, tcx = plan.tile_chunks[0][0] or 1, plan.tile_chunks[1][0] or 1
    pcy, pcx = max(1, tcy // plan.k), max(1, tcx // plan.k)
    coords = level_coords(plan.info, plan.level)
    y, x = coords["y"], coords["x"]
    for name, values in (
        ("tile_y", y[: nty * plan.tile : plan.tile]),
        ("tile_x", x[: ntx * plan.tile : plan.tile]),
        ("patch_y", y[: nty * plan.tile : plan.patch]),
        ("patch_x", x[: ntx * plan.tile : plan.patch]),
        ("latent", np.arange(LATENT)),
    ):
        group.create_array(name, data=np.asarray(values, dtype=np.int64), dimension_names=(name,), overwrite=True)
    tiles2d = {"shape": (nty, ntx), "chunks": (tcy, tcx), "dimension_names": ("tile_y", "tile_x"), "overwrite": True}
    group.create_array("tile_variance", dtype="float32", fill_value=np.nan, **tiles2d)
    group.create_array("tile_mask", dtype="bool", fill_value=False, **tiles2d)
    errors = group.create_array("read_error", dtype="bool", fill_value=False, **tiles2d)
    errors[...] = plan.excluded
    patches2d = {"shape": (npy, npx), "chunks": (pcy, pcx), "dimension_names": ("patch_y", "patch_x"), "overwrite": True}
    group.create_array("patch_variance", dtype="float32", fill_value=np.nan, **patches2d)
    group.create_array("patch_mask", dtype="bool", fill_value=False, **patches2d)
    group.create_array(
        "latent", shape=(nty, ntx, LATENT), chunks=(tcy, tcx, LATENT), dtype="float32", fill_value=np.nan,
        dimension_names=("tile_y", "tile_x", "latent"), overwrite=True,
    )
    done = group.create_array(
        "chunk_done", shape=plan.read.shape, chunks=(1, 1), dtype="bool", fill_value=False,
        dimension_names=("chunk_y", "chunk_x"), overwrite=True,
    )
    done.attrs["description"] = "bookkeeping: chunk (i, j) of the slide has been written"
    group.attrs.update(json_safe_attrs({"wsi_xr_run": plan.fingerprint, "complete": False}))


def _open_or_create(store: Path, group_name: str | None, plan: RunPlan, overwrite: bool) -> zarr.Group:
    root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    group = root.require_group(group_name) if group_name else root
    existing = dict(group.attrs).get("wsi_xr_run")
    if existing is None:
        if any(True for _ in group.array_keys()) and not overwrite:
            raise StoreError(f"{store}: holds data that wsi_xr did not write; choose another path or pass --overwrite.")
        _create_group(group, plan)
    elif overwrite:
        _create_group(group, plan)
    elif json.loads(json.dumps(existing)) != json.loads(json.dumps(plan.fingerprint)):
        differ = sorted(k for k in set(existing) | set(plan.fingerprint) if existing.get(k) != plan.fingerprint.get(k))
        raise StoreError(
            f"{store}{'/' + group_name if group_name else ''}: was made from a different slide or with different "
            f"parameters ({', '.join(differ)} differ). Pass --overwrite (overwrite=True) to replace it, or use another store."
        )
    return group


# ----------------------------------------------------------------------------- tasks


def _chunk_task(
    pixels: Any,
    excluded: np.ndarray,
    read: np.ndarray,
    *,
    plan: RunPlan,
    store: str,
    group: str | None,
    block_info: dict | None = None,
) -> np.ndarray:
    """Statistics + encoding + region writes for one chunk; returns its candidate count."""
    assert block_info is not None
    i, j, _ = block_info[0]["chunk-location"]
    (y0, y1), (x0, x1), _ = block_info[0]["array-location"]
    ty0, tx0 = y0 // plan.tile, x0 // plan.tile
    nty, ntx = (y1 - y0) // plan.tile, (x1 - x0) // plan.tile
    root = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
    g = root[group] if group else root
    count = 0
    if bool(read.reshape(-1)[0]) and nty and ntx:
        excluded = np.asarray(excluded)[..., 0]
        from wsi_xr.tissue.kernels import array_namespace

        xp = array_namespace(pixels)
        tile_var, patch_tile = block_statistics(pixels, plan.tile, plan.patch, xp.asarray(excluded) if excluded.any() else None)
        tile_var, patch_tile = to_numpy(tile_var), to_numpy(patch_tile)
        floor = plan.threshold if isinstance(plan.threshold, float) else CANDIDATE_FLOOR
        candidates = two_stage_rule(tile_var, patch_tile, excluded, floor)
        latents = encode_block(pixels, candidates, plan.ref, tile=plan.tile, batch_size=plan.batch_size)
        k = plan.k
        g["tile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = tile_var.astype(np.float32)
        g["patch_variance"][ty0 // k : ty0 // k + patch_tile[::k, ::k].shape[0], tx0 // k : tx0 // k + patch_tile[::k, ::k].shape[1]] = patch_tile[::k, ::k].astype(np.float32)
        g["latent"][ty0 : ty0 + nty, tx0 : tx0 + ntx, :] = latents
        count = int(candidates.sum())
    g["chunk_done"][i, j] = True  # only after the data: a kill before this redoes the chunk
    return np.full((1, 1, 1), count, dtype=np.int64)


def _finalize(group: zarr.Group, plan: RunPlan) -> dict[str, Any]:
    """Choose the threshold, write the masks, blank non-tissue latents, mark complete."""
    tile_var = group["tile_variance"][...]
    patch_var = group["patch_variance"][...]
    excluded = group["read_error"][...]
    if plan.threshold == "auto":
        threshold, method = auto_threshold(tile_var)
    else:
        threshold, method = float(plan.threshold), "given"
    k = plan.k
    nty, ntx = tile_var.shape
    patch_of_tile = np.repeat(np.repeat(patch_var, k, axis=0), k, axis=1)[:nty, :ntx]
    tile_mask = two_stage_rule(tile_var, patch_of_tile, excluded, threshold)
    with np.errstate(invalid="ignore"):
        patch_mask = patch_var > threshold
    group["patch_mask"][...] = patch_mask
    group["tile_mask"][...] = tile_mask
    latent = group["latent"]
    tcy, tcx = latent.chunks[:2]
    for ty in range(0, nty, tcy):
        for tx in range(0, ntx, tcx):
            block = latent[ty : ty + tcy, tx : tx + tcx, :]
            keep = tile_mask[ty : ty + tcy, tx : tx + tcx]
            if np.isnan(block[keep]).any():
                raise StoreError(f"{plan.info.path}: latents missing for tissue tiles near tile ({ty}, {tx}); run again.")
            block[~keep] = np.nan
            latent[ty : ty + tcy, tx : tx + tcx, :] = block
    from wsi_xr import __version__

    info = plan.info
    attrs = {
        "source": info.path,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "vendor": info.vendor,
        "mpp": info.mpp,
        "level": plan.level,
        "downsample": info.levels[plan.level].downsample,
        "backend": plan.backend,
        "tile": plan.tile,
        "patch": plan.patch,
        "threshold": float(threshold),
        "threshold_method": method,
        "coarse": str(plan.coarse),
        "coarse_level": -1 if plan.coarse_level is None else plan.coarse_level,
        "chunks_total": int(plan.read.size),
        "chunks_read": int(plan.read.sum()),
        "weights": plan.ref.path,
        "weights_sha256": plan.ref.sha256,
        "wsi_xr_version": __version__,
        "tissue_tiles": int(tile_mask.sum()),
        "read_errors": int(excluded.sum()),
        "damaged_file_tiles": damaged_file_tiles(info, plan.level, plan.backend),
    }
    group.attrs.update(json_safe_attrs(attrs))
    group.attrs["complete"] = True  # last: a store is never complete with chunks missing
    return attrs


# ------------------------------------------------------------------------------ API


def process_slide(
    path: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    group: str | None = None,
    weights: Any = None,
    tile: int = 64,
    patch: int = 256,
    threshold: float | str = "auto",
    coarse: str | int = "auto",
    chunks: ChunkSpec = None,
    level: int = 0,
    backend: str = "auto",
    batch_size: int = 256,
    device: str = "cpu",
    client: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """Mask and encode one slide into ``store`` (or its ``group``); resume if interrupted.

    Returns the stored Dataset (opened lazily from the store): ``tile_mask``,
    ``tile_variance``, ``patch_mask``, ``patch_variance``, ``read_error``, ``latent``
    (NaN where not tissue), with provenance attrs. ``client`` is a
    ``distributed.Client`` (None: dask's threaded scheduler).
    """
    from wsi_xr.cluster import compute

    start = time.perf_counter()
    plan = _plan(path, weights=weights, tile=tile, patch=patch, threshold=threshold, coarse=coarse, chunks=chunks,
                 level=level, backend=backend, batch_size=batch_size, device=device)
    store_path = Path(store)
    if store_path.exists() and not store_path.is_dir():
        raise StoreError(f"{store_path}: exists and is not a Zarr store folder; choose another output path.")
    try:
        store_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{store_path}: cannot create the store ({err}); choose a writable path.") from err
    with StoreLock(store_path):
        try:
            g = _open_or_create(store_path, group, plan, overwrite)
            done = g["chunk_done"][...]
            todo = ~done
            if todo.any():
                pixels = slide_array(plan.info, plan.level, (plan.chunks[0][0], plan.chunks[1][0]), plan.backend,
                                     device, damaged="fill", skip=~(plan.read & todo))
                tile_chunks = plan.tile_chunks
                results = da.map_blocks(
                    _chunk_task,
                    pixels,
                    da.from_array(plan.excluded[..., None], chunks=tile_chunks + ((1,),)),
                    da.from_array((plan.read & todo)[..., None], chunks=(1, 1, 1)),
                    chunks=((1,) * len(tile_chunks[0]), (1,) * len(tile_chunks[1]), (1,)),
                    dtype=np.int64,
                    meta=np.empty((0, 0, 0), dtype=np.int64),
                    plan=plan,
                    store=str(store_path),
                    group=group,
                    name="wsi-process-chunk",
                )
                # chunks already done neither read nor encode: their tasks only confirm them
                try:
                    compute(results, client=client, progress=progress)
                except Exception as err:
                    if type(err).__name__ != "KilledWorker":
                        raise
                    # distributed retried the task on other workers and each one died:
                    # a crash in a decoder, contained to worker processes
                    raise SlideReadError(
                        f"{plan.info.path}: Dask workers died while reading it ({err}); the decoder probably "
                        "crashed on damaged data. Finished chunks are kept and the store is not marked "
                        "complete; run again to retry, or check the file."
                    ) from err
            attrs = _finalize(g, plan)
            consolidate(store_path)
        except OSError as err:
            raise StoreError(f"{store_path}: writing failed ({err}); the store is not marked complete. Free space or fix permissions, then run again.") from err
    log.info("%s: %d tissue tiles in %.1f s", Path(str(path)).name, attrs["tissue_tiles"], time.perf_counter() - start)
    return xr.open_zarr(store_path, group=group, consolidated=False)


def _group_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = Path(str(p)).stem or "slide"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def process_slides(paths: Sequence[str | os.PathLike[str]], store: str | os.PathLike[str], **kwargs: Any) -> xr.DataTree:
    """A cohort: each slide into its own group (named by file stem, made unique) of one store.

    Returns ``xr.open_datatree(store, engine="zarr")``.
    """
    if not paths:
        raise InvalidArgumentError("no slides given.")
    names = _group_names(paths)
    for path, name in zip(paths, names):
        process_slide(path, store, group=name, **kwargs)
    root = zarr.open_group(store, mode="a", zarr_format=3, use_consolidated=False)
    root.attrs["slides"] = {name: str(Path(str(p)).resolve()) for name, p in zip(names, paths)}
    consolidate(store)
    return xr.open_datatree(store, engine="zarr")


def to_dataframe(ds: xr.Dataset, slide: str | None = None) -> pd.DataFrame:
    """One row per tissue tile: ``x``, ``y`` (level-0 origin), ``latent_0`` … (+ ``slide``)."""
    mask = np.asarray(ds["tile_mask"].values, dtype=bool)
    rows, cols = np.nonzero(mask)
    frame = pd.DataFrame({"x": ds["tile_x"].values[cols].astype(np.int64), "y": ds["tile_y"].values[rows].astype(np.int64)})
    latents = np.asarray(ds["latent"].values)[rows, cols, :]
    for i in range(latents.shape[1]):
        frame[f"latent_{i}"] = latents[:, i].astype(np.float32)
    if slide is not None:
        frame.insert(0, "slide", slide)
    return frame


def write_parquet(store: str | os.PathLike[str], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Write the tissue-tile rows of a store (every group of a cohort) to Parquet."""
    root = zarr.open_group(store, mode="r", zarr_format=3)
    groups = list(root.group_keys())
    if groups:
        frames = [to_dataframe(xr.open_zarr(store, group=name, consolidated=False), slide=name) for name in groups]
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = to_dataframe(xr.open_zarr(store, consolidated=False))
    try:
        frame.to_parquet(out, index=False)
    except OSError as err:
        raise StoreError(f"{out}: cannot write the Parquet file ({err}).") from err
    return frame
