"""The tissue mask's array-level core: NumPy/CuPy in, NumPy out, no xarray, no Dask.

What one chunk's pixels become (:func:`chunk_statistics`), the two-stage rule
(:func:`two_stage_rule`), the threshold choice (:func:`choose_threshold`) and the grids the
plan needs. :func:`wsi_xr.tissue_mask` (a Dask graph over these) and the pipeline's chunk
task and finalising (:mod:`wsi_xr.pipeline`) call the same functions: there is no second
implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from wsi_xr._timing import stage
from wsi_xr.readers import SegmentGrid, unpack_window, window_rectangles
from wsi_xr.tissue.kernels import array_namespace, block_statistics, statistics_from_moments, tile_moments, to_numpy
from wsi_xr.tissue.threshold import auto_threshold

__all__ = [
    "ChunkStatistics",
    "blocks_any",
    "choose_threshold",
    "chunk_statistics",
    "damaged_tile_grid",
    "decode_failed_tiles",
    "masked_statistics",
    "patch_chunks",
    "pen_flags",
    "two_stage_rule",
]


def masked_statistics(pixels: Any, excluded: np.ndarray, read_patches: np.ndarray | None, *, tile: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
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


def two_stage_rule(tile_variance: Any, patch_variance_of_tile: Any, excluded: Any, threshold: Any) -> Any:
    """The reference rule: a tile is tissue when its variance and its patch's exceed ``t``.

    Works on NumPy and Dask arrays alike; NaN (unread, damaged) never passes, and
    ``excluded`` (read errors) tiles are never tissue.
    """
    with np.errstate(invalid="ignore"):
        return (tile_variance > threshold) & (patch_variance_of_tile > threshold) & ~excluded


def damaged_tile_grid(grid: SegmentGrid, tile: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool tile grid ``shape``: tiles with any pixel in a damaged TIFF tile of ``grid``."""
    nty, ntx = shape
    if not grid.damaged.any():
        return np.zeros((nty, ntx), dtype=bool)
    pixel_bad = grid.pixel_mask(0, 0, nty * tile, ntx * tile)
    return cast(np.ndarray, pixel_bad.reshape(nty, tile, ntx, tile).any(axis=(1, 3)))


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


@dataclass(frozen=True)
class ChunkStatistics:
    """What one chunk's pixels give, on the host, ``(tiles_y, tiles_x)`` each.

    ``tile_variance`` and ``patch_variance`` (the variance of each tile's patch) are float64,
    NaN where not read or where the tile is a read error; ``pen`` marks tiles covered by ink
    (all False unless asked); ``decode_failed`` marks tiles the decoder reported errors in
    (read errors found while decoding, beside the structurally damaged ones).
    """

    tile_variance: np.ndarray
    patch_variance: np.ndarray
    pen: np.ndarray
    decode_failed: np.ndarray


def chunk_statistics(
    block: Any, excluded: np.ndarray, read_patches: np.ndarray | None, *, tile: int, patch: int, reject_pen: bool
) -> ChunkStatistics:
    """The statistics of one chunk, from one read.

    Parameters
    ----------
    block
        The chunk's pixels (NumPy or CuPy ``(h, w, 3)`` uint8), or a
        :class:`~wsi_xr.readers.DecodedWindow` (read with ``damaged="report"``): tiles the
        decoder reported errors in are excluded like damaged ones.
    excluded
        Bool ``(h // tile, w // tile)``: structurally damaged tiles.
    read_patches
        Bool over the chunk's patches: those decoded (None: all).
    """
    pixels, failed = unpack_window(block)
    decode_failed = decode_failed_tiles(failed, tile, excluded.shape)
    with stage("statistics"):
        tile_variance, patch_variance = masked_statistics(pixels, excluded | decode_failed, read_patches, tile=tile, patch=patch)
        if reject_pen and tile_variance.size:
            pen = pen_flags(pixels, tile, tile_variance)
        else:
            pen = np.zeros(tile_variance.shape, dtype=bool)
    return ChunkStatistics(tile_variance, patch_variance, pen, decode_failed)


def choose_threshold(tile_variance: np.ndarray, setting: float | str) -> tuple[float, str]:
    """The threshold to use and how it was chosen: a given number (``"given"``), or for
    ``"auto"`` Otsu on the tile variances (``"otsu"``, or ``"default"`` for one mode)."""
    if setting == "auto":
        value, method = auto_threshold(tile_variance)
        return float(value), method
    return float(setting), "given"
