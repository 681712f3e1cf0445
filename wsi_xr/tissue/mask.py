"""The two-stage variance tissue mask as a lazy xarray Dataset: a thin wrapper over the
plan (:mod:`wsi_xr.tissue.plan`) and the array-level core (:mod:`wsi_xr.tissue.core`).

Reference rule (the notebook): a ``patch`` x ``patch`` patch is foreground when the
population variance of its uint8 values exceeds ``t``; each ``tile`` x ``tile`` tile of
a foreground patch is kept when its own variance exceeds ``t``. Here both statistics
come from one read of each block (:func:`wsi_xr.tissue.kernels.block_statistics`).

Edges: the tile grid holds full tiles only (partial tiles at the right and bottom edges
are not tissue); a patch cut by the slide edge is scored over the pixels of its full
tiles. Damaged TIFF tiles (found from the file structure) are reported in
``read_error``; their pixels enter no statistic and they are never tissue.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from wsi_xr import accessor as _accessor  # noqa: F401  (registers .wsi on what this module returns)
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import open_file
from wsi_xr.resample import check_target_mpp, choose_scale
from wsi_xr.slide import opened_slide_of
from wsi_xr.tissue.core import (
    blocks_any,
    choose_threshold,
    chunk_statistics,
    damaged_tile_grid,
    decode_failed_tiles,
    masked_statistics,
    patch_chunks,
    pen_flags,
    two_stage_rule,
)
from wsi_xr.tissue.params import MAX_PATCH, MaskParams, validate_mask_arguments  # noqa: F401
from wsi_xr.tissue.plan import MaskPlan, plain_plan, plan_mask
from wsi_xr.tissue.threshold import auto_threshold

__all__ = [
    "MaskParams",
    "MaskPlan",
    "blocks_any",
    "damaged_tile_grid",
    "decode_failed_tiles",
    "mask_plan_of",
    "masked_statistics",
    "patch_chunks",
    "pen_attrs",
    "pen_flags",
    "plan_mask",
    "resolve_threshold",
    "tissue_mask",
    "two_stage_rule",
    "validate_mask_arguments",
]


def _block_statistics_task(block: Any, excluded: np.ndarray, read_patches: np.ndarray, *, tile: int, patch: int, reject_pen: bool) -> np.ndarray:
    """One block -> float64 ``(tiles_y, tiles_x, 4)``: tile variance, its patch's variance, pen (0/1), decode failed (0/1)."""
    stats = chunk_statistics(block, np.asarray(excluded)[..., 0], np.asarray(read_patches)[..., 0], tile=tile, patch=patch, reject_pen=reject_pen)
    return np.stack([stats.tile_variance, stats.patch_variance, stats.pen.astype(np.float64), stats.decode_failed.astype(np.float64)], axis=-1)


def pen_attrs() -> dict[str, Any]:
    """The pen rule's version and thresholds (``pen_rule``, ``pen_cool``, ...) for a mask's attrs."""
    from wsi_xr.tissue.pen import DEFAULT_PEN_RULE

    return DEFAULT_PEN_RULE.attrs()


# Statistics blocks (see _block_statistics_task): [..., 0] tile variance, [..., 1] its
# patch's variance, [..., 2] pen (0/1), [..., 3] decode failed (0/1).


def _tile_variance_block(stats: np.ndarray) -> np.ndarray:
    return stats[..., 0].astype(np.float32)


def _read_error_block(stats: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Structurally damaged tiles (from the scan) and tiles whose decoding failed."""
    return excluded | (stats[..., 3] > 0)


def _pen_mask_block(stats: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    return (stats[..., 2] > 0) & ~_read_error_block(stats, excluded)


def _tile_mask_block(stats: np.ndarray, excluded: np.ndarray, threshold: Any, *, reject_pen: bool) -> np.ndarray:
    """The two-stage rule on one statistics block (and pen removal when asked)."""
    keep = two_stage_rule(stats[..., 0], stats[..., 1], _read_error_block(stats, excluded), float(threshold))
    return keep & ~_pen_mask_block(stats, excluded) if reject_pen else keep


def _patch_mask_block(stats: np.ndarray, threshold: Any, *, k: int) -> np.ndarray:
    """Patches whose variance exceeds the threshold (each patch's first tile holds it)."""
    with np.errstate(invalid="ignore"):
        return stats[::k, ::k, 1] > float(threshold)


def _auto_threshold_block(stats: np.ndarray) -> np.ndarray:
    """The automatic threshold from all tile variances (a 0-d array)."""
    return np.asarray(choose_threshold(stats[..., 0], "auto")[0])


def mask_plan_of(image: xr.DataArray, params: MaskParams, *, target_mpp: float | None = None, mpp: float | None = None) -> tuple[MaskPlan, Any]:
    """The plan of ``image``'s mask and the blocks to compute it from.

    For an unmodified slide array (:func:`wsi_xr.slide.opened_slide_of` finds the slide
    in its graph) :func:`plan_mask` at the image's own chunks, and the plan's blocks (read
    with the coarse skip, reporting decode failures); for other pixels :func:`plain_plan`
    and the pixels themselves. With ``target_mpp`` the slide's level at or finer than the
    target is read and resampled (:mod:`wsi_xr.resample`); ``mpp`` replaces the file's.
    """
    if tuple(image.dims) != ("y", "x", "c"):
        raise InvalidArgumentError(f"tissue_mask needs an image with dims ('y', 'x', 'c'), got {image.dims}.")
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(params.patch * 8, params.patch * 8, -1))
    opened = opened_slide_of(image)
    target = check_target_mpp(target_mpp)
    if opened is None:
        if target is not None:
            raise InvalidArgumentError(
                "target_mpp needs an image straight from wsi_xr.open_slide (this one was modified): open the slide and pass that."
            )
        return plain_plan((image.sizes["y"], image.sizes["x"]), (data.chunks[0], data.chunks[1]), params), data
    opened = open_file(opened, mpp=mpp)
    device = "cuda" if type(data._meta).__module__.startswith("cupy") else "cpu"
    if target is not None:
        plan = plan_mask(opened, 0, None, params, choose_scale(opened.info, target, params.tile))
    else:
        plan = plan_mask(opened, int(image.attrs["level"]), (data.chunks[0][0], data.chunks[1][0]), params)
    return plan, plan.pixels(device)


def tissue_mask(
    image: xr.DataArray,
    *,
    tile: int = MaskParams.tile,
    patch: int = MaskParams.patch,
    threshold: float | str = MaskParams.threshold,
    coarse: str | int = MaskParams.coarse,
    reject_pen: bool = MaskParams.reject_pen,
    target_mpp: float | None = None,
    mpp: float | None = None,
) -> xr.Dataset:
    """Two-stage variance tissue mask of a slide image, lazily and blockwise.

    A thin wrapper: the settings are a :class:`MaskParams`, the reads a :class:`MaskPlan`,
    and each block goes through :func:`wsi_xr.tissue.core.chunk_statistics`, as in the
    pipeline.

    Parameters
    ----------
    image
        ``(y, x, c)`` uint8 DataArray, normally from :func:`wsi_xr.open_slide` or
        ``xr.open_dataarray(path, engine="wsi_xr", chunks={})``; its chunks must be
        multiples of ``patch`` (except the last one along each axis).
    tile, patch
        Tile and patch sides in pixels (the reference: 64 and 256).
    threshold
        Variance threshold in reference units (uint8 values), or ``"auto"``: Otsu on
        the log of the tile variances, with a fallback for one-mode slides
        (:func:`wsi_xr.tissue.threshold.auto_threshold`).
    coarse
        ``"auto"``: use a lower pyramid level to skip patches without tissue: only the
        file's TIFF tiles under a patch that may hold tissue are decoded (no skip when
        the file has no pyramid); ``"none"``; or the level number to use.
    reject_pen
        Also find tiles covered by pen ink (marker strokes, from the same decoded pixels)
        and remove them from ``tile_mask``; adds ``pen_mask`` and records the rule's
        thresholds in ``attrs`` (``pen_rule``, ``pen_*``). The variance threshold is
        chosen as without it. Off by default: the default is the exact reference rule.
    target_mpp
        Work at this resolution (µm per pixel): tiles and patches are ``tile`` and
        ``patch`` pixels at ``target_mpp``, so they cover the same microns on every slide.
        The level at or finer than the target is read (once) and area-averaged to it
        (:mod:`wsi_xr.resample`); coordinates stay level-0 pixels; ``attrs`` record the
        level read, ``scale_factor`` and the target. Needs an image straight from
        :func:`wsi_xr.open_slide` (any level: the target chooses) and a slide mpp.
    mpp
        Microns per level-0 pixel, replacing the file's (for slides that lack it or
        state it wrongly); ``attrs["mpp_source"]`` says ``"user"``.

    Returns
    -------
    xr.Dataset
        ``tile_mask``, ``tile_variance`` (float32, NaN where not read), ``read_error``
        on ``(tile_y, tile_x)``; ``patch_mask`` on ``(patch_y, patch_x)``; the 0-d
        ``threshold`` used. Coordinates are level-0 offsets of tile/patch corners.
        Lazy: only the coarse level (and the TIFF structure) are read here; level-0
        pixels are read on compute, each once. With ``threshold="auto"`` the
        chosen number is the ``threshold`` variable (computed with the mask) and
        ``attrs["threshold"]`` says ``"auto"`` until a writer fills it in.
    """
    params = MaskParams(tile, patch, threshold, coarse, reject_pen)
    plan, data = mask_plan_of(image, params, target_mpp=target_mpp, mpp=mpp)
    nty, ntx = plan.tile_grid
    tile_chunks, pchunks = plan.tile_chunks, plan.patch_chunks
    excluded_input = da.from_array(plan.excluded[..., None], chunks=tile_chunks + ((1,),))
    read_patches_input = da.from_array(plan.read_patches[..., None], chunks=pchunks + ((1,),))
    # Named from a token of everything that decides the statistics (the pixels' layer name
    # already holds the file version, level, chunks and wanted tiles): two masks never share
    # a key, so any of them can be computed together in one dask.compute.
    token = tokenize(data.name, excluded_input.name, read_patches_input.name, params, pen_attrs() if reject_pen else None)
    stats = da.map_blocks(
        _block_statistics_task,
        data,
        excluded_input,
        read_patches_input,
        chunks=tile_chunks + ((4,),),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        tile=params.tile,
        patch=params.patch,
        reject_pen=params.reject_pen,
        name=f"wsi-tile-stats-{token}",
    )
    excluded_blocks = da.from_array(plan.excluded, chunks=tile_chunks)  # chunked like the statistics: no rechunk

    def per_row(function: Any, *args: Any, dtype: Any, rows: tuple[int, ...], width: int, **kwargs: Any) -> da.Array:
        """An output variable with one task (and chunk) per row of statistics blocks.

        Each task gets its row of blocks concatenated. Reading stays per block; the
        small outputs are grouped by rows because every Dask task costs ~0.2 ms here:
        one per block and variable was a quarter of a 10%-tissue mask's time.
        """
        return da.blockwise(
            function,
            "ia",
            stats,
            "ijk",
            *args,
            dtype=dtype,
            concatenate=True,
            new_axes={"a": width},
            adjust_chunks={"i": rows},
            **kwargs,
        )

    if params.threshold == "auto":
        # A dask-array reduction (not dask.delayed) so that computing it together with
        # the mask shares the one read of every block.
        value: Any = da.blockwise(_auto_threshold_block, "", stats, "ijk", dtype=np.float64, concatenate=True)
        method: Any = "auto"
        threshold_arg: tuple[Any, Any] = (value, ())
    else:
        value = float(params.threshold)
        method = "given"
        threshold_arg = (value, None)
    tiles: dict[str, Any] = {"rows": tile_chunks[0], "width": ntx}
    read_error = per_row(_read_error_block, excluded_blocks, "ij", dtype=bool, **tiles)
    tile_mask = per_row(_tile_mask_block, excluded_blocks, "ij", *threshold_arg, dtype=bool, reject_pen=params.reject_pen, **tiles)
    variables: dict[str, Any] = {}
    if params.reject_pen:
        variables["pen_mask"] = (("tile_y", "tile_x"), per_row(_pen_mask_block, excluded_blocks, "ij", dtype=bool, **tiles))
    patch_mask = per_row(_patch_mask_block, *threshold_arg, dtype=bool, rows=pchunks[0], width=plan.read_patches.shape[1], k=params.tiles_per_patch)
    tile_variance = per_row(_tile_variance_block, dtype=np.float32, **tiles)
    coords = plan.coords()
    if plan.opened is None:  # pixels wsi_xr did not open: the image's own coordinates
        y, x = image["y"].values, image["x"].values
        coords = {
            "tile_y": y[: nty * tile : tile],
            "tile_x": x[: ntx * tile : tile],
            "patch_y": y[: nty * tile : patch],
            "patch_x": x[: ntx * tile : patch],
        }
    attrs = {
        **plan.attrs(),
        "threshold": value if isinstance(value, float) else "auto",
        "threshold_method": method,
        **{
            key: image.attrs[key]
            for key in ("source", "level", "downsample", "mpp", "mpp_source", "backend")
            if key in image.attrs and plan.opened is None
        },
    }
    if plan.opened is None and mpp is not None:
        attrs.update(mpp=check_target_mpp(mpp), mpp_source="user")
    return xr.Dataset(
        {
            "tile_mask": (("tile_y", "tile_x"), tile_mask),
            **variables,
            "tile_variance": (("tile_y", "tile_x"), tile_variance),
            "patch_mask": (("patch_y", "patch_x"), patch_mask),
            "read_error": (("tile_y", "tile_x"), read_error),
            "threshold": ((), value),
        },
        coords={name: coords[name] for name in ("tile_y", "tile_x", "patch_y", "patch_x")},
        attrs=attrs,
    )


def resolve_threshold(mask: xr.Dataset) -> xr.Dataset:
    """After computing an ``"auto"`` mask, record the number used in ``attrs``.

    Sets ``attrs["threshold"]`` to the value of the ``threshold`` variable and
    ``attrs["threshold_method"]`` to ``"otsu"`` or ``"default"``. Returns a new Dataset.
    """
    out = mask.copy()
    if out.attrs.get("threshold") == "auto":
        value = float(out["threshold"].values)
        out.attrs["threshold"] = value
        out.attrs["threshold_method"] = auto_threshold(out["tile_variance"].values)[1]
    return out
