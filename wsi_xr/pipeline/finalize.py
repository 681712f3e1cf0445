"""Finalising a slide's store: the threshold, the masks, blanking what is not tissue, provenance, ``complete``.

The threshold is chosen and the two-stage rule applied by the tissue core
(:func:`~wsi_xr.tissue.core.choose_threshold`, :func:`~wsi_xr.tissue.core.two_stage_rule`)
on the stored variances; the provenance attributes are the mask plan's
(:meth:`~wsi_xr.tissue.MaskPlan.attrs`) plus the run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from wsi_xr._failpoints import failpoint
from wsi_xr.encode import encoder_attrs
from wsi_xr.errors import StoreError
from wsi_xr.pipeline.chunks import RunPlan
from wsi_xr.pipeline.options import CANDIDATE_FLOOR, candidate_floor
from wsi_xr.pipeline.verify import Problem, check_written
from wsi_xr.readers.identity import content_fingerprint
from wsi_xr.store import read_array, zarr_array
from wsi_xr.store.attrs import update_attrs
from wsi_xr.tissue.core import blocks_any, choose_threshold, two_stage_rule

__all__ = ["finalize", "maybe_encoded", "tissue_fraction"]


def maybe_encoded(tile_var: np.ndarray, patch_of_tile: np.ndarray, excluded: np.ndarray, floor: float) -> np.ndarray:
    """Every tile the chunk tasks may have encoded, judged from the stored float32 variances.

    The tasks compared float64 variances with ``floor`` (``>``); rounding to float32 is
    monotonic, so a value above ``floor`` is stored as at least ``float32(floor)``: ``>=``
    that (a superset: tiles never encoded are NaN already, and blanking them is harmless).
    """
    below_floor32 = np.nextafter(np.float32(floor), np.float32(-np.inf))  # float32 compare: > this is >= float32(floor)
    return two_stage_rule(tile_var.astype(np.float32, copy=False), patch_of_tile.astype(np.float32, copy=False), excluded, below_floor32)


def tissue_fraction(subtile_variance: np.ndarray, threshold: float) -> np.ndarray:
    """float32 ``(tile_y, tile_x)``: the share of each tile's sub-tiles whose variance exceeds
    ``threshold`` (the run's, as for the mask); NaN where the tile was not read."""
    with np.errstate(invalid="ignore"):
        above = (subtile_variance > threshold).mean(axis=-1)
    return np.where(np.isnan(subtile_variance).any(axis=-1), np.nan, above).astype(np.float32)


def finalize(group: zarr.Group, plan: RunPlan, folder: Path) -> dict[str, Any]:
    """Choose the threshold, write the masks, blank non-tissue latents, record provenance,
    check what was written (``folder``: the group's), mark complete."""
    mask, options = plan.mask, plan.options
    tile_var = read_array(group, "tile_variance")
    patch_var = read_array(group, "patch_variance")
    # damaged tiles (from the scan, written when the store was created) and tiles whose
    # decoding failed (written by their chunk tasks)
    excluded = read_array(group, "read_error") | mask.excluded
    threshold, method = choose_threshold(tile_var, options.threshold)
    k = options.mask.tiles_per_patch
    nty, ntx = tile_var.shape
    patch_of_tile = np.repeat(np.repeat(patch_var, k, axis=0), k, axis=1)[:nty, :ntx]
    tile_mask = two_stage_rule(tile_var, patch_of_tile, excluded, threshold)
    # The tiles the chunk tasks may have encoded (a resumed store's earlier chunks too:
    # before 0.2.0 a whole-number threshold encoded from CANDIDATE_FLOOR up), less pen
    # ink, which is never encoded.
    floor = candidate_floor(options)
    if not isinstance(options.threshold, float):
        floor = min(floor, CANDIDATE_FLOOR)
    encoded = maybe_encoded(tile_var, patch_of_tile, excluded, floor)
    pen_tiles = 0
    if options.reject_pen:
        pen = read_array(group, "pen_mask")
        pen_tiles = int((tile_mask & pen).sum())
        tile_mask &= ~pen
        encoded &= ~pen
    with np.errstate(invalid="ignore"):
        patch_mask = patch_var > threshold
    zarr_array(group, "patch_mask")[...] = patch_mask
    zarr_array(group, "tile_mask")[...] = tile_mask
    if options.subtiles:
        zarr_array(group, "tissue_fraction")[...] = tissue_fraction(read_array(group, "subtile_variance"), threshold)
    failpoint("finalize-masks")
    # Only latent chunks holding an encoded tile that is not tissue change: read and
    # rewrite those alone (at 49152², 76 of 576 chunks), checking their tissue tiles'
    # latents on the way. Other chunks are trusted to their `chunk_done` flag (set only
    # after the chunk's latents were written); they are not read back.
    latent = zarr_array(group, "latent")
    tcy, tcx = latent.chunks[:2]  # one Zarr chunk per slide chunk: the plan's tile chunks
    to_blank = encoded & ~tile_mask
    for i, j in np.argwhere(blocks_any(to_blank, mask.tile_chunks)):
        ty, tx = int(i) * tcy, int(j) * tcx
        keep = tile_mask[ty : ty + tcy, tx : tx + tcx]
        block = cast(np.ndarray, latent[ty : ty + tcy, tx : tx + tcx, :])
        if np.isnan(block[keep]).any():  # a rerun finds this chunk (damaged_chunks) and recomputes it
            raise StoreError(
                f"{plan.opened.path}: latents missing for tissue tiles near tile ({ty}, {tx}) of the store; "
                "run the same command again: it recomputes the chunks whose latents are missing."
            )
        block[to_blank[ty : ty + tcy, tx : tx + tcx]] = np.nan
        latent[ty : ty + tcy, tx : tx + tcx, :] = block
    failpoint("finalize-latents")
    from wsi_xr import __version__

    attrs = {
        **mask.attrs(),
        "threshold": float(threshold),
        "threshold_method": method,
        **(encoder_attrs(options.model) if options.model is not None else {}),  # weights, weights_sha256, encoder_*
        "precision": options.precision,
        "pen_tiles": pen_tiles,
        "wsi_xr_version": __version__,
        "tissue_tiles": int(tile_mask.sum()),
        "read_errors": int(excluded.sum()),
    }
    update_attrs(group.attrs, attrs)  # netCDF-safe (wsi_xr.store.attrs): a store's Dataset writes with plain to_netcdf
    failpoint("finalize-attrs")
    # What this run wrote is checked before the store is called complete: every chunk of
    # every array stored, with bytes that match their checksum, and every chunk done.
    with_tissue = {(int(i), int(j)) for i, j in np.argwhere(blocks_any(tile_mask, mask.tile_chunks))}
    problems = check_written(folder, None, with_tissue)  # the folder names the group already
    if not read_array(group, "chunk_done").all():
        problems.append(Problem(None, "chunk_done", None, "chunks not done at finalising"))
    if content_fingerprint(plan.opened.info) != plan.fingerprint.get("content"):  # fresh, not the cached one
        raise StoreError(
            f"{plan.opened.path}: changed while it was being read (its content differs from the start of the run), so "
            f"{folder} may mix two versions of it and is not complete. Run the same command again with --overwrite "
            "(overwrite=True) to recompute it from the slide as it is now."
        )
    if problems:
        raise StoreError(
            f"{folder}: what was written does not read back correctly ({problems[0].line(folder)}"
            f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}); the store is not complete. "
            "Check the disk, then run the same command again: it recomputes the chunks that fail."
        )
    update_attrs(group.attrs, {"complete": True})  # last, and only once checked: a store is never complete with chunks missing
    failpoint("finalize-complete")
    return attrs
