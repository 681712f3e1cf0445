"""The two-stage variance tissue mask, blockwise on the image's Dask array.

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

import numbers
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from wsi_xr._timing import stage
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import SegmentGrid, unpack_window, window_rectangles
from wsi_xr.slide import opened_slide_of, slide_array
from wsi_xr.tissue.coarse import coarse_decision
from wsi_xr.tissue.kernels import array_namespace, block_statistics, statistics_from_moments, tile_moments, to_numpy
from wsi_xr.tissue.threshold import auto_threshold

__all__ = [
    "blocks_any",
    "damaged_tile_grid",
    "decode_failed_tiles",
    "masked_statistics",
    "patch_chunks",
    "pen_attrs",
    "pen_flags",
    "resolve_threshold",
    "tissue_mask",
    "two_stage_rule",
    "validate_mask_arguments",
]


#: The largest patch side: a patch is scored whole inside one chunk, so it bounds the chunk (and memory).
MAX_PATCH = 8192


def validate_mask_arguments(tile: int, patch: int, threshold: float | str) -> None:
    """Raise :class:`InvalidArgumentError` for impossible tile/patch/threshold values."""
    for name, value in (("tile", tile), ("patch", patch)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise InvalidArgumentError(f"{name}={value!r}: must be a positive integer number of pixels.")
    reference = "the reference rule uses tile=64, patch=256"
    if patch > MAX_PATCH:
        raise InvalidArgumentError(
            f"patch={patch} px: at most {MAX_PATCH} px (a patch is scored whole inside one chunk); {reference}."
        )
    if tile > patch:
        raise InvalidArgumentError(
            f"tile={tile} is larger than patch={patch}: tiles are the parts of a patch; use a tile that divides "
            f"the patch ({reference})."
        )
    if patch % tile:
        lower, upper = (patch // tile) * tile, (patch // tile + 1) * tile
        choices = f"patch={lower} or patch={upper}" if upper <= MAX_PATCH else f"patch={lower}"
        raise InvalidArgumentError(f"patch={patch} is not a multiple of tile={tile}; use {choices} ({reference}).")
    if isinstance(threshold, str):
        if threshold != "auto":
            raise InvalidArgumentError(f"threshold={threshold!r}: give a number (variance, uint8 units) or 'auto'.")
    elif not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not np.isfinite(threshold) or threshold < 0:
        raise InvalidArgumentError(f"threshold={threshold!r}: must be a finite variance >= 0, or 'auto'.")


def masked_statistics(
    pixels: Any, excluded: np.ndarray, read_patches: np.ndarray | None, *, tile: int, patch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tile variances and each tile's patch variance of one block, on the host, NaN where not read.

    Parameters
    ----------
    pixels
        ``(h, w, 3)`` uint8 block (NumPy or CuPy); starts on a patch border.
    excluded
        Bool ``(h // tile, w // tile)``: damaged tiles (they enter no statistic).
    read_patches
        Bool ``(ceil(h // tile / k), ...)``: the patches that were decoded (None: all).
        Only bands of patch rows holding a read patch are computed; unread patches (and
        their tiles) are NaN.

    Returns
    -------
    (tile_variance, patch_variance_of_tile)
        float64 NumPy arrays ``(h // tile, w // tile)``.
    """
    nty, ntx = pixels.shape[0] // tile, pixels.shape[1] // tile
    if nty == 0 or ntx == 0 or (read_patches is not None and not read_patches.any()):
        return np.full((nty, ntx), np.nan), np.full((nty, ntx), np.nan)
    xp = array_namespace(pixels)
    k = patch // tile
    if read_patches is None or read_patches.all():
        tv, pv = block_statistics(pixels, tile, patch, xp.asarray(excluded) if excluded.any() else None)
        return to_numpy(tv), to_numpy(pv)
    # Moments of the read patches only, one call per rectangle of read patches (as the
    # reader decodes them); then the variances of the whole block at once (unread tiles
    # count for nothing).
    s1 = xp.zeros((nty, ntx), dtype=xp.int64)
    s2 = xp.zeros((nty, ntx), dtype=xp.int64)
    for row, col, rows, cols in window_rectangles(read_patches):
        t0, t1 = row * k, min(nty, (row + rows) * k)
        c0, c1 = col * k, min(ntx, (col + cols) * k)
        s1[t0:t1, c0:c1], s2[t0:t1, c0:c1] = tile_moments(pixels[t0 * tile : t1 * tile, c0 * tile : c1 * tile, :], tile)
    read_tiles = np.repeat(np.repeat(read_patches, k, axis=0), k, axis=1)[:nty, :ntx]
    tv, pv = statistics_from_moments(s1, s2, xp.asarray(read_tiles & ~excluded), tile * tile * pixels.shape[2], k)
    return to_numpy(tv), to_numpy(pv)


def pen_flags(pixels: Any, tile: int, tile_variance: np.ndarray) -> np.ndarray:
    """Bool ``(tiles_y, tiles_x)`` on the host: tiles covered by pen ink, where the block was read.

    From the same decoded pixels as the variance (no extra read); NumPy or CuPy blocks.
    """
    from wsi_xr.tissue.pen import pen_tiles

    return to_numpy(pen_tiles(pixels, tile)).astype(bool) & np.isfinite(tile_variance)


def decode_failed_tiles(failed: tuple[tuple[int, int, int, int], ...], tile: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool ``shape`` tile grid of a block: tiles with a pixel in one of the ``failed`` rectangles (block pixels)."""
    out = np.zeros(shape, dtype=bool)
    for y, x, h, w in failed:
        out[y // tile : -(-(y + h) // tile), x // tile : -(-(x + w) // tile)] = True
    return out


def _block_statistics_task(
    block: Any, excluded: np.ndarray, read_patches: np.ndarray, *, tile: int, patch: int, reject_pen: bool
) -> np.ndarray:
    """One block -> float64 ``(tiles_y, tiles_x, 4)``: tile variance, its patch's variance, pen (0/1), decode failed (0/1).

    ``block`` is read with ``damaged="report"``: tiles the decoder reported errors in are
    excluded like structurally damaged ones (no statistic, never tissue) and flagged.
    """
    pixels, failed = unpack_window(block)
    excluded = np.asarray(excluded)[..., 0]
    decode_failed = decode_failed_tiles(failed, tile, excluded.shape)
    with stage("statistics"):
        tile_var, patch_var = masked_statistics(pixels, excluded | decode_failed, np.asarray(read_patches)[..., 0], tile=tile, patch=patch)
        pen = pen_flags(pixels, tile, tile_var) if reject_pen and tile_var.size else np.zeros(tile_var.shape, dtype=bool)
    return np.stack([tile_var, patch_var, pen.astype(np.float64), decode_failed.astype(np.float64)], axis=-1)


def pen_attrs() -> dict[str, Any]:
    """The pen rule's version and thresholds (``pen_rule``, ``pen_cool``, ...) for a mask's attrs."""
    from wsi_xr.tissue.pen import DEFAULT_PEN_RULE

    return DEFAULT_PEN_RULE.attrs()


def two_stage_rule(tile_variance: Any, patch_variance_of_tile: Any, excluded: Any, threshold: Any) -> Any:
    """The reference rule: a tile is tissue when its variance and its patch's exceed ``t``.

    Works on NumPy and Dask arrays alike; NaN (unread, damaged) never passes, and
    ``excluded`` (read errors) tiles are never tissue.
    """
    with np.errstate(invalid="ignore"):
        return (tile_variance > threshold) & (patch_variance_of_tile > threshold) & ~excluded


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
    return np.asarray(auto_threshold(stats[..., 0])[0])


def damaged_tile_grid(grid: SegmentGrid, tile: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool tile grid ``shape``: tiles with any pixel in a damaged TIFF tile of ``grid``."""
    nty, ntx = shape
    if not grid.damaged.any():
        return np.zeros((nty, ntx), dtype=bool)
    pixel_bad = grid.pixel_mask(0, 0, nty * tile, ntx * tile)
    return pixel_bad.reshape(nty, tile, ntx, tile).any(axis=(1, 3))


def blocks_any(flags: np.ndarray, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    """Bool per block: whether any of ``flags`` is set inside it (``chunks`` splits ``flags``)."""
    ys, xs = np.cumsum((0,) + chunks[0]), np.cumsum((0,) + chunks[1])
    out = np.zeros((len(chunks[0]), len(chunks[1])), dtype=bool)
    for i in range(len(chunks[0])):
        for j in range(len(chunks[1])):
            out[i, j] = flags[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].any()
    return out


def patch_chunks(tile_chunks: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Patch counts per block along one axis, from the blocks' full-tile counts."""
    return tuple(-(-n // k) for n in tile_chunks)


def tissue_mask(
    image: xr.DataArray,
    *,
    tile: int = 64,
    patch: int = 256,
    threshold: float | str = "auto",
    coarse: str | int = "auto",
    reject_pen: bool = False,
) -> xr.Dataset:
    """Two-stage variance tissue mask of a slide image, lazily and blockwise.

    Parameters
    ----------
    image
        ``(y, x, c)`` uint8 DataArray, normally from :func:`wsi_xr.open_slide`; its chunks
        must be multiples of ``patch`` (except the last one along each axis).
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
    validate_mask_arguments(tile, patch, threshold)
    if not isinstance(reject_pen, bool):
        raise InvalidArgumentError(f"reject_pen={reject_pen!r}: use True or False.")
    if tuple(image.dims) != ("y", "x", "c"):
        raise InvalidArgumentError(f"tissue_mask needs an image with dims ('y', 'x', 'c'), got {image.dims}.")
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=(patch * 8, patch * 8, -1))
    for axis, name in ((0, "y"), (1, "x")):
        bad = [c for c in data.chunks[axis][:-1] if c % patch]
        if bad:
            raise InvalidArgumentError(
                f"image chunks along {name} ({bad[0]} px) are not multiples of patch={patch}; "
                f"open the slide with chunks={max(patch, (data.chunks[axis][0] // patch) * patch) or patch} "
                "(or another multiple of the patch size)."
            )
    nty, ntx = image.sizes["y"] // tile, image.sizes["x"] // tile
    k = patch // tile
    npy, npx = -(-nty // k), -(-ntx // k)
    tile_chunks = (tuple(c // tile for c in data.chunks[0]), tuple(c // tile for c in data.chunks[1]))

    excluded = np.zeros((nty, ntx), dtype=bool)
    read_patches = np.ones((npy, npx), dtype=bool)
    coarse_level: int | None = None
    damaged_count = 0
    segments_total = segments_decoded = 0
    opened = opened_slide_of(image)
    if opened is not None:
        level = int(image.attrs["level"])
        device = "cuda" if type(data._meta).__module__.startswith("cupy") else "cpu"
        decision = coarse_decision(opened, level, coarse, patch_shape=(npy, npx), patch=patch)
        grid = opened.damage(level)  # scanned during the coarse decision, if there was one
        excluded = damaged_tile_grid(grid, tile, (nty, ntx))
        damaged_count = int(grid.damaged.sum())
        wanted = None
        if decision is not None:
            coarse_level, read_patches, wanted = decision.coarse_level, decision.patches, decision.segments
        segments_total = int(grid.damaged.size)
        segments_decoded = int((~grid.damaged if wanted is None else wanted & ~grid.damaged).sum())
        data = slide_array(opened, level, (data.chunks[0][0], data.chunks[1][0]), device, damaged="report", wanted=wanted)
    elif coarse not in ("auto", "none"):
        raise InvalidArgumentError(
            f"coarse={coarse!r} needs an image straight from wsi_xr.open_slide (this one was modified)."
        )
    pchunks = (patch_chunks(tile_chunks[0], k), patch_chunks(tile_chunks[1], k))
    chunk_reads = blocks_any(read_patches, pchunks)

    excluded_input = da.from_array(excluded[..., None], chunks=tile_chunks + ((1,),))
    read_patches_input = da.from_array(read_patches[..., None], chunks=pchunks + ((1,),))
    # Named from a token of everything that decides the statistics (the pixels' layer name
    # already holds the file version, level, chunks and wanted tiles): two masks never share
    # a key, so any of them can be computed together in one dask.compute.
    token = tokenize(data.name, excluded_input.name, read_patches_input.name, tile, patch, bool(reject_pen),
                     pen_attrs() if reject_pen else None)
    stats = da.map_blocks(
        _block_statistics_task,
        data,
        excluded_input,
        read_patches_input,
        chunks=tile_chunks + ((4,),),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        tile=tile,
        patch=patch,
        reject_pen=bool(reject_pen),
        name=f"wsi-tile-stats-{token}",
    )
    excluded_blocks = da.from_array(excluded, chunks=tile_chunks)  # chunked like the statistics: no rechunk

    def per_row(function: Any, *args: Any, dtype: Any, rows: tuple[int, ...], width: int, **kwargs: Any) -> da.Array:
        """An output variable with one task (and chunk) per row of statistics blocks.

        Each task gets its row of blocks concatenated. Reading stays per block; the
        small outputs are grouped by rows because every Dask task costs ~0.2 ms here:
        one per block and variable was a quarter of a 10%-tissue mask's time.
        """
        return da.blockwise(
            function, "ia", stats, "ijk", *args, dtype=dtype, concatenate=True,
            new_axes={"a": width}, adjust_chunks={"i": rows}, **kwargs,
        )

    if threshold == "auto":
        # A dask-array reduction (not dask.delayed) so that computing it together with
        # the mask shares the one read of every block.
        value: Any = da.blockwise(_auto_threshold_block, "", stats, "ijk", dtype=np.float64, concatenate=True)
        method: Any = "auto"
        threshold_arg: tuple[Any, Any] = (value, ())
    else:
        value = float(threshold)
        method = "given"
        threshold_arg = (value, None)
    tiles = {"rows": tile_chunks[0], "width": ntx}
    read_error = per_row(_read_error_block, excluded_blocks, "ij", dtype=bool, **tiles)
    tile_mask = per_row(_tile_mask_block, excluded_blocks, "ij", *threshold_arg, dtype=bool, reject_pen=bool(reject_pen), **tiles)
    variables: dict[str, Any] = {}
    if reject_pen:
        variables["pen_mask"] = (("tile_y", "tile_x"), per_row(_pen_mask_block, excluded_blocks, "ij", dtype=bool, **tiles))
    patch_mask = per_row(_patch_mask_block, *threshold_arg, dtype=bool, rows=pchunks[0], width=npx, k=k)
    tile_variance = per_row(_tile_variance_block, dtype=np.float32, **tiles)
    y, x = image["y"].values, image["x"].values
    coords = {
        "tile_y": y[: nty * tile : tile],
        "tile_x": x[: ntx * tile : tile],
        "patch_y": y[: nty * tile : patch],
        "patch_x": x[: ntx * tile : patch],
    }
    attrs = {
        "tile": tile,
        "patch": patch,
        "threshold": value if isinstance(value, float) else "auto",
        "threshold_method": method,
        "coarse": str(coarse),
        "coarse_level": -1 if coarse_level is None else coarse_level,
        "chunks_total": int(chunk_reads.size),
        "chunks_read": int(chunk_reads.sum()),
        "patches_total": int(read_patches.size),
        "patches_read": int(read_patches.sum()),
        "file_tiles_total": segments_total,
        "file_tiles_decoded": segments_decoded,
        "damaged_file_tiles": damaged_count,
        "reject_pen": bool(reject_pen),
        **(pen_attrs() if reject_pen else {}),
        **{key: image.attrs[key] for key in ("source", "level", "downsample", "mpp", "backend") if key in image.attrs},
    }
    return xr.Dataset(
        {
            "tile_mask": (("tile_y", "tile_x"), tile_mask),
            **variables,
            "tile_variance": (("tile_y", "tile_x"), tile_variance),
            "patch_mask": (("patch_y", "patch_x"), patch_mask),
            "read_error": (("tile_y", "tile_x"), read_error),
            "threshold": ((), value),
        },
        coords=coords,
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
