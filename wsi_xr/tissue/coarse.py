"""Coarse skip: rule out level-0 chunks that cannot hold tissue, from a low-resolution level.

A pixel of a low-resolution level is *possibly tissue* when its colour differs from
the slide's background colour, or when its neighbourhood is not flat. A chunk is read
at full resolution only if a possibly-tissue coarse pixel falls within (or one coarse
pixel around) its footprint. The rule is deliberately generous: skipping must never
lose tissue, only save reads of empty glass.
"""

from __future__ import annotations

import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import SlideInfo, choose_backend, read_window, reader_key

#: Preferred downsample of the coarse level relative to the level being masked.
TARGET_COARSE_DOWNSAMPLE = 16.0
#: A coarse level must be at least this much smaller than the masked level.
MIN_COARSE_DOWNSAMPLE = 4.0
#: Colour distance (uint8 units, any channel) from background that marks possible tissue.
COLOUR_MARGIN = 8.0
#: Local standard deviation (uint8 units, 3x3 coarse pixels) that marks possible tissue.
TEXTURE_MARGIN = 2.5


def choose_coarse_level(info: SlideInfo, level: int, coarse: str | int) -> int | None:
    """The pyramid level used for the coarse pass, or None for no skipping.

    ``coarse`` is ``"none"``, ``"auto"`` (a level 4x or more smaller than ``level``,
    the one closest to 16x; None when the file has no such level) or a level index.
    """
    if coarse == "none":
        return None
    base = info.levels[level].downsample
    if coarse == "auto":
        candidates = [lv for lv in info.levels if lv.downsample / base >= MIN_COARSE_DOWNSAMPLE]
        if not candidates:
            return None
        best = min(candidates, key=lambda lv: abs(np.log2(lv.downsample / base / TARGET_COARSE_DOWNSAMPLE)))
        return best.index
    if isinstance(coarse, (int, np.integer)) and not isinstance(coarse, bool):
        if not level < coarse < len(info.levels):
            raise InvalidArgumentError(
                f"{info.path}: coarse={coarse} must be a level below the masked level {level} "
                f"(levels {level + 1}..{len(info.levels) - 1} exist), or 'auto' / 'none'."
            )
        return int(coarse)
    raise InvalidArgumentError(f"coarse={coarse!r}: use 'auto', 'none' or a pyramid level number.")


def _box3(values: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (edges repeated), in O(pixels)."""
    padded = np.pad(values, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]


def possible_tissue(thumbnail: np.ndarray) -> np.ndarray:
    """Bool ``(h, w)``: coarse pixels that may hold tissue (generous), dilated by one pixel."""
    pixels = thumbnail.astype(np.float32)
    brightness = pixels.mean(axis=2)
    bright = brightness >= np.quantile(brightness, 0.75)
    background = np.median(pixels[bright], axis=0)
    colour = np.abs(pixels - background).max(axis=2) > COLOUR_MARGIN
    mean = _box3(brightness) / 9.0
    variance = np.maximum(_box3(brightness * brightness) / 9.0 - mean * mean, 0.0)
    texture = variance > TEXTURE_MARGIN**2
    flagged = (colour | texture).astype(np.float32)
    return _box3(flagged) > 0


def blocks_with_possible_tissue(
    info: SlideInfo, level: int, coarse_level: int, chunks: tuple[tuple[int, ...], tuple[int, ...]], backend: str = "auto"
) -> np.ndarray:
    """Bool ``(n_block_y, n_block_x)``: the blocks of ``level`` worth reading.

    Reads the whole of ``coarse_level`` once (damaged tiles there count as tissue).
    """
    clv = info.levels[coarse_level]
    key = reader_key(info, choose_backend(info, backend))
    thumbnail = read_window(key, coarse_level, 0, 0, clv.height, clv.width, damaged="fill")
    flagged = possible_tissue(thumbnail)
    integral = np.pad(flagged.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    lv = info.levels[level]
    scale_y = lv.downsample_y / clv.downsample_y
    scale_x = lv.downsample_x / clv.downsample_x

    def coarse_range(start: int, stop: int, scale: float, limit: int) -> tuple[int, int]:
        return max(0, int(np.floor(start * scale)) - 1), min(limit, int(np.ceil(stop * scale)) + 1)

    ys = np.cumsum((0,) + chunks[0])
    xs = np.cumsum((0,) + chunks[1])
    keep = np.zeros((len(chunks[0]), len(chunks[1])), dtype=bool)
    for i in range(len(chunks[0])):
        y0, y1 = coarse_range(ys[i], ys[i + 1], scale_y, clv.height)
        for j in range(len(chunks[1])):
            x0, x1 = coarse_range(xs[j], xs[j + 1], scale_x, clv.width)
            keep[i, j] = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0] > 0
    return keep
