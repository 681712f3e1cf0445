"""Physical scale: read the pyramid level at or finer than a target resolution and resample
each tile to it on the fly, by area averaging.

Tiles then cover the same microns on every slide of a cohort (0.25 µm/px and 0.5 µm/px
scans alike). A tile of ``tile`` target pixels is ``level_tile = round(tile * target_mpp /
level_mpp)`` pixels of the level read (:class:`ReadScale`); each target pixel is the
area-weighted mean of the level pixels it covers (:func:`resample_tiles`, exact block means
when ``level_tile`` is a multiple of ``tile``), rounded to the nearest uint8.

Decode-once: the level is read in blocks on the file's tile borders, as without a target,
and Dask's rechunk regroups the decoded pixels into whole target tiles
(:func:`scaled_array`): no pixel of the read level is decoded twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import DecodedWindow, SlideInfo, unpack_window

__all__ = ["ReadScale", "area_weights", "check_target_mpp", "choose_scale", "magnification_mpp", "resample_tiles", "scaled_array"]

#: Microns per pixel of a "1x" objective: ``--magnification M`` means ``target_mpp = 10 / M``
#: (the usual convention: 40x = 0.25 µm/px, 20x = 0.5 µm/px).
MICRONS_AT_1X = 10.0


def magnification_mpp(magnification: float) -> float:
    """The target mpp of a magnification (:data:`MICRONS_AT_1X` / magnification)."""
    if isinstance(magnification, bool) or not isinstance(magnification, (int, float)) or not math.isfinite(magnification) or magnification <= 0:
        raise InvalidArgumentError(f"magnification={magnification!r}: give a positive objective power, e.g. 20 (= 0.5 µm/px) or 40 (= 0.25 µm/px).")
    return MICRONS_AT_1X / float(magnification)


def check_target_mpp(target_mpp: Any) -> float | None:
    """``target_mpp`` as a float (None stays None), or :class:`InvalidArgumentError`."""
    if target_mpp is None:
        return None
    if isinstance(target_mpp, bool) or not isinstance(target_mpp, (int, float)) or not math.isfinite(target_mpp) or target_mpp <= 0:
        raise InvalidArgumentError(f"target_mpp={target_mpp!r}: give the microns per pixel to work at, e.g. 0.5 (20x) or 0.25 (40x).")
    return float(target_mpp)


@dataclass(frozen=True)
class ReadScale:
    """How a target resolution is read: the level, and level pixels per tile.

    Attributes
    ----------
    target_mpp
        The resolution asked for (µm per target pixel).
    level
        The pyramid level read (the coarsest at or finer than the target).
    level_mpp
        µm per pixel of that level (the slide's mpp times the level's downsample).
    tile
        Tile side in target pixels.
    level_tile
        Tile side in level pixels: ``round(tile * target_mpp / level_mpp)`` (>= ``tile``).
    """

    target_mpp: float
    level: int
    level_mpp: float
    tile: int
    level_tile: int

    @property
    def factor(self) -> float:
        """Level pixels per target pixel (1.0: the level is read as it is)."""
        return self.level_tile / self.tile

    @property
    def tile_mpp(self) -> float:
        """The resolution the tiles really have: ``level_mpp * factor`` (within half a level
        pixel per tile of the target)."""
        return self.level_mpp * self.factor

    @property
    def resampled(self) -> bool:
        """Whether pixels are resampled (False: the level's own pixels are the target's)."""
        return self.level_tile != self.tile

    def attrs(self) -> dict[str, Any]:
        """Provenance for a mask's or store's attrs."""
        return {
            "target_mpp": self.target_mpp,
            "read_level": self.level,
            "read_level_mpp": self.level_mpp,
            "scale_factor": self.factor,
            "tile_mpp": self.tile_mpp,
            "level_tile": self.level_tile,
            "resampling": "area" if self.resampled else "none",
        }


#: A level counts as *at* the target when its mpp is at most this share coarser (a 20x scan at
#: 0.504 µm/px for 0.5, an Aperio level at 0.5054): it is read as it is, never upsampled.
AT_TARGET = 0.02


def choose_scale(info: SlideInfo, target_mpp: float, tile: int) -> ReadScale:
    """The level to read for ``target_mpp`` and its pixels per tile.

    The coarsest level at or finer than the target: its mpp at most :data:`AT_TARGET` (2%)
    above it. A tile is ``round(tile * target / level_mpp)`` level pixels, at least ``tile``
    (a level within half a pixel per tile of the target, or "at" it, is read as it is).
    Raises :class:`InvalidArgumentError` when the slide has no mpp (pass ``mpp=``) or the
    target is finer than level 0 (wsi_xr does not upsample).
    """
    target = check_target_mpp(target_mpp)
    assert target is not None
    if info.mpp is None:
        raise InvalidArgumentError(
            f"{info.path}: the file states no mpp, so target_mpp={target} cannot be placed; pass mpp= (--mpp) with the slide's microns per pixel."
        )
    best: ReadScale | None = None
    for lv in info.levels:
        level_mpp = info.mpp * lv.downsample
        if level_mpp > target * (1 + AT_TARGET):
            continue
        level_tile = max(tile, round(tile * target / level_mpp))
        if best is None or (level_tile, -level_mpp) < (best.level_tile, -best.level_mpp):
            best = ReadScale(target, lv.index, level_mpp, tile, level_tile)
    if best is None:
        raise InvalidArgumentError(
            f"{info.path}: target_mpp={target} is finer than level 0 ({info.mpp} µm/px, mpp from the {info.mpp_source}); "
            f"wsi_xr does not upsample: use target_mpp >= {round(info.mpp / (1 + AT_TARGET), 4)}."
        )
    return best


def area_weights(level_tile: int, tile: int) -> np.ndarray:
    """float32 ``(tile, level_tile)``: row ``i`` weighs the level pixels that target pixel ``i``
    covers by the overlap of their extents (each row sums to 1).

    Target pixel ``i`` covers ``[i * f, (i + 1) * f)`` in level pixels, ``f = level_tile / tile``.
    """
    f = level_tile / tile
    lo = np.arange(tile)[:, None] * f
    hi = lo + f
    left = np.arange(level_tile)[None, :]
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0.0, None)
    return (overlap / f).astype(np.float32)


def resample_tiles(pixels: Any, level_tile: int, tile: int) -> Any:
    """Area-average every ``level_tile`` square of ``pixels`` to a ``tile`` square.

    ``pixels``: ``(ny * level_tile, nx * level_tile, C)`` uint8 (NumPy or CuPy); returns
    ``(ny * tile, nx * tile, C)`` uint8, rounded to nearest (ties to even). Each tile is
    resampled from its own pixels only (the weights are the same for every tile).
    """
    if level_tile == tile:
        return pixels
    xp = _namespace(pixels)
    ny, nx = pixels.shape[0] // level_tile, pixels.shape[1] // level_tile
    channels = pixels.shape[2]
    w = xp.asarray(area_weights(level_tile, tile))
    # along y, then along x: two batched matrix products (BLAS), each tile from its own pixels
    rows = w @ pixels[: ny * level_tile, : nx * level_tile].astype(xp.float32).reshape(ny, level_tile, nx * level_tile * channels)
    out = w @ rows.reshape(ny * tile * nx, level_tile, channels)
    return xp.clip(xp.rint(out), 0, 255).astype(xp.uint8).reshape(ny * tile, nx * tile, channels)


def _namespace(pixels: Any) -> Any:
    if type(pixels).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _with_failed_channel(block: Any) -> Any:
    """A read block (pixels or a :class:`DecodedWindow`) as ``(h, w, 4)`` uint8: RGB, then 1
    where decoding failed (so Dask can regroup it like plain pixels)."""
    pixels, failed = unpack_window(block)
    xp = _namespace(pixels)
    out = xp.zeros(pixels.shape[:2] + (4,), dtype=xp.uint8)
    out[..., :3] = pixels
    for y, x, h, w in failed:
        out[y : y + h, x : x + w, 3] = 1
    return out


def _resample_block(block: Any, *, level_tile: int, tile: int) -> DecodedWindow:
    """A regrouped block of whole level tiles -> the target's pixels, with the tiles whose
    pixels' decoding failed as failed rectangles (target pixels)."""
    pixels = resample_tiles(block[..., :3], level_tile, tile)
    ny, nx = block.shape[0] // level_tile, block.shape[1] // level_tile
    flags = block[..., 3].reshape(ny, level_tile, nx, level_tile).max(axis=(1, 3))
    failed = tuple((int(i) * tile, int(j) * tile, tile, tile) for i, j in zip(*np.nonzero(_host(flags))))
    return DecodedWindow(pixels, failed, ())


def _host(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


def scaled_array(read: da.Array, scale: ReadScale, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> da.Array:
    """The target-resolution blocks of a level read with ``damaged="report"``.

    Parameters
    ----------
    read
        The level's blocks (:func:`wsi_xr.slide.slide_array` of ``scale.level``, on the
        file's tile borders).
    scale
        The read scale (:func:`choose_scale`).
    chunks
        The target chunks along y and x (target pixels, multiples of ``scale.tile``; they
        cover whole tiles only).

    Returns a Dask array of target shape whose blocks are :class:`DecodedWindow` objects
    (pixels and the failed tiles), for map_blocks consumers that unpack them, like the
    tissue mask's and the pipeline's tasks. The level is regrouped by Dask (rechunk), not
    read again.
    """
    f_tile, t = scale.level_tile, scale.tile
    height, width = sum(chunks[0]), sum(chunks[1])
    ny, nx = height // t, width // t
    meta = read._meta
    flagged = da.map_blocks(
        _with_failed_channel,
        read,
        chunks=read.chunks[:2] + ((4,),),
        dtype=np.uint8,
        meta=meta,
        name=f"wsi-read-flags-{tokenize(read.name)}",
    )
    level_chunks = tuple(c // t * f_tile for c in chunks[0]), tuple(c // t * f_tile for c in chunks[1])
    whole = flagged[: ny * f_tile, : nx * f_tile].rechunk(level_chunks + ((4,),))
    return da.map_blocks(
        _resample_block,
        whole,
        chunks=chunks + ((3,),),
        dtype=np.uint8,
        meta=meta,
        level_tile=f_tile,
        tile=t,
        name=f"wsi-resample-{tokenize(whole.name, scale)}",
    )
