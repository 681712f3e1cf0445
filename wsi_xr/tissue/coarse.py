"""Coarse skip: decide from a low-resolution level which patches may hold tissue.

A pixel of a low-resolution level is *possibly tissue* when its colour differs from
the slide's background colour, or when its neighbourhood is not flat. A ``patch`` x
``patch`` patch of the masked level is read at full resolution only if a possibly-tissue
coarse pixel falls within (or one coarse pixel around) its footprint; the file's TIFF
tiles are then decoded only where such a patch lies (:class:`CoarseDecision`). The rule
is deliberately generous: skipping must never lose tissue, only save decoding glass.

Whole patches are read or not, so every statistic of a read patch (and of its tiles)
equals the full-resolution mask's. The coarse level is read in blocks with bounded
memory when it is large.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import OpenedSlide, SegmentGrid, SlideInfo, read_window

__all__ = [
    "CoarseDecision",
    "choose_coarse_level",
    "coarse_decision",
    "possible_tissue",
    "segments_for_patches",
]

#: Preferred downsample of the coarse level relative to the level being masked.
TARGET_COARSE_DOWNSAMPLE = 16.0
#: A coarse level must be at least this much smaller than the masked level.
MIN_COARSE_DOWNSAMPLE = 4.0
#: Colour distance (uint8 units, any channel) from background that marks possible tissue.
COLOUR_MARGIN = 8.0
#: Local standard deviation (uint8 units, 3x3 coarse pixels) that marks possible tissue.
TEXTURE_MARGIN = 2.5
#: A coarse level with more pixels than this is read in blocks (two passes), not in one call.
ONE_CALL_PIXELS = 32 * 1024 * 1024
#: Side of the blocks a large coarse level is read in (coarse pixels).
BLOCK_SIDE = 4096
#: Samples (coarse pixels) used to estimate the glass colour.
BACKGROUND_SAMPLES = 262_144
#: Pixels around a block that its flags depend on (3x3 texture, then a 3x3 dilation).
_HALO = 2


@dataclass(frozen=True)
class CoarseDecision:
    """Which parts of a level the coarse pass says are worth decoding.

    Attributes
    ----------
    coarse_level
        The pyramid level the decision was made on.
    patches
        Bool ``(patch_y, patch_x)`` over the masked level's patch grid: patches that may
        hold tissue. Only these are scored; the others come out as not read.
    segments
        Bool over the level's TIFF tile (segment) grid: the tiles to decode (every tile
        that a wanted patch touches).
    """

    coarse_level: int
    patches: np.ndarray
    segments: np.ndarray


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
            last = len(info.levels) - 1
            if level == last:
                where = (
                    "the slide has one level only" if last == 0 else f"level {level} is the slide's smallest"
                ) + ", so there is no coarser level to skip from; use coarse='none' (or 'auto', which skips nothing here)."
            else:
                coarser = f"level {last}" if level + 1 == last else f"one of levels {level + 1}..{last}"
                where = f"use {coarser} (coarser than the masked level {level}), or 'auto' / 'none'."
            raise InvalidArgumentError(f"{info.path}: coarse={coarse}: {where}")
        return int(coarse)
    raise InvalidArgumentError(f"coarse={coarse!r}: use 'auto', 'none' or a pyramid level number.")


def _box3(values: np.ndarray) -> np.ndarray:
    """Sum over each pixel's 3x3 neighbourhood (edges repeated), in O(pixels).

    Exact for float32 values that are integers whose sums stay below 2**24.
    """
    rows = values.copy()
    rows[1:] += values[:-1]
    rows[:-1] += values[1:]
    rows[0] += values[0]  # the edge row counts again in place of the missing neighbour
    rows[-1] += values[-1]
    out = rows.copy()
    out[:, 1:] += rows[:, :-1]
    out[:, :-1] += rows[:, 1:]
    out[:, 0] += rows[:, 0]
    out[:, -1] += rows[:, -1]
    return out


def _dilate3(flags: np.ndarray) -> np.ndarray:
    """Bool: set where any pixel of the 3x3 neighbourhood is set."""
    rows = flags.copy()
    rows[1:] |= flags[:-1]
    rows[:-1] |= flags[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _sample_step(height: int, width: int) -> int:
    """Take every n-th pixel along each axis so that about :data:`BACKGROUND_SAMPLES` remain."""
    return max(1, int(np.ceil(np.sqrt(height * width / BACKGROUND_SAMPLES))))


def _median_uint8(values: np.ndarray) -> float:
    """``np.median`` of uint8 values, from their histogram (exact, no sort)."""
    ends = np.cumsum(np.bincount(values, minlength=256))
    n = values.size
    lower, upper = np.searchsorted(ends, [(n - 1) // 2, n // 2], side="right")
    return (float(lower) + float(upper)) / 2


def _glass_colour(samples: np.ndarray) -> np.ndarray:
    flat = samples.reshape(-1, 3)
    # 3 x the channel mean, exact in integers (the same pixels pass as with the mean)
    brightness = flat[:, 0].astype(np.int32) + flat[:, 1] + flat[:, 2]
    bright = flat[brightness >= np.quantile(brightness, 0.75)]
    return np.array([_median_uint8(bright[:, c]) for c in range(3)], dtype=np.float32)


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """The glass colour: the median RGB of the brightest quarter of ``pixels`` (``(h, w, 3)``).

    Estimated from every n-th pixel along each axis (about :data:`BACKGROUND_SAMPLES`).
    """
    step = _sample_step(pixels.shape[0], pixels.shape[1])
    return _glass_colour(pixels[::step, ::step])


def possible_tissue(thumbnail: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Bool ``(h, w)``: coarse pixels that may hold tissue (generous), dilated by one pixel.

    A pixel is flagged when any channel is more than :data:`COLOUR_MARGIN` from the glass
    colour ``background`` (default: estimated from ``thumbnail``), or when the standard
    deviation of the brightness (channel mean) over its 3x3 neighbourhood exceeds
    :data:`TEXTURE_MARGIN`. Exact arithmetic: integer comparisons, and sums of integers
    held in float32 (all below 2**24).
    """
    if background is None:
        background = background_colour(thumbnail)
    return _dilate3(_off_glass(thumbnail, background) | _textured(thumbnail))


def _off_glass(thumbnail: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels with a channel more than :data:`COLOUR_MARGIN` from ``background``."""
    colour = np.zeros(thumbnail.shape[:2], dtype=bool)
    glass = np.asarray(background)
    for c in range(3):
        channel = thumbnail[..., c]
        # v < bg - margin  <=>  v < ceil(bg - margin) for integer v (and > likewise with
        # floor): uint8 comparisons, with the bounds in the background's own precision
        low, high = np.ceil(glass[c] - COLOUR_MARGIN), np.floor(glass[c] + COLOUR_MARGIN)
        if np.isnan(low):
            continue  # no colour is "far" from an unknown glass colour
        if low > 255 or high < 0:
            colour[:] = True
            break
        if low > 0:
            colour |= channel < np.uint8(low)
        if high < 255:
            colour |= channel > np.uint8(high)
    return colour


def _textured(thumbnail: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood's brightness has a std above :data:`TEXTURE_MARGIN`."""
    # 3 x the channel mean: integers, so every sum below is exact in float32 (< 2**24)
    brightness = thumbnail[..., 0].astype(np.float32) + thumbnail[..., 1] + thumbnail[..., 2]
    total = _box3(brightness)
    total_sq = _box3(brightness * brightness)
    # variance of the mean over 9 pixels: (sum(b^2)/9 - (sum(b)/9)^2) / 9, with b = 3 x mean
    variance = (total_sq / 9.0 - (total / 9.0) ** 2) / 9.0
    return variance > TEXTURE_MARGIN**2


def _patch_ranges(n_patches: int, patch: int, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Coarse pixel range ``[start, stop)`` of each patch, one coarse pixel wider each side."""
    starts = np.arange(n_patches) * patch
    lo = np.maximum(0, np.floor(starts * scale).astype(np.int64) - 1)
    hi = np.minimum(limit, np.ceil((starts + patch) * scale).astype(np.int64) + 1)
    return lo, hi


def _integral_image(flags: np.ndarray) -> np.ndarray:
    """Padded prefix sums of a 2-D bool array: ``out[y, x] == flags[:y, :x].sum()`` (int64)."""
    height, width = flags.shape
    out = np.zeros((height + 1, width + 1), dtype=np.int64)
    np.cumsum(flags, axis=1, dtype=np.int64, out=out[1:, 1:])
    for y in range(1, height + 1):  # one vector add per row: numpy's cumsum down axis 0 is ~10x slower
        np.add(out[y], out[y - 1], out=out[y])
    return out


def _mark_patches(
    flagged: np.ndarray, top: int, left: int, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray], out: np.ndarray
) -> None:
    """OR into ``out`` the patches whose coarse range meets a flagged pixel of this block.

    ``flagged`` covers coarse pixels ``[top:top+h, left:left+w]``.
    """
    h, w = flagged.shape
    integral = _integral_image(flagged)
    (r0, r1), (c0, c1) = rows, cols
    pr = np.flatnonzero((r1 > top) & (r0 < top + h))
    pc = np.flatnonzero((c1 > left) & (c0 < left + w))
    if pr.size == 0 or pc.size == 0:
        return
    y0, y1 = np.clip(r0[pr] - top, 0, h)[:, None], np.clip(r1[pr] - top, 0, h)[:, None]
    x0, x1 = np.clip(c0[pc] - left, 0, w)[None, :], np.clip(c1[pc] - left, 0, w)[None, :]
    hits = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0] > 0
    out[np.ix_(pr, pc)] |= hits


def _wanted_patches(opened: OpenedSlide, level: int, coarse_level: int, patch_shape: tuple[int, int], patch: int) -> np.ndarray:
    info = opened.info
    clv, lv = info.levels[coarse_level], info.levels[level]
    rows = _patch_ranges(patch_shape[0], patch, lv.downsample_y / clv.downsample_y, clv.height)
    cols = _patch_ranges(patch_shape[1], patch, lv.downsample_x / clv.downsample_x, clv.width)
    wanted = np.zeros(patch_shape, dtype=bool)
    damage = opened.damage(coarse_level)  # damaged coarse tiles read as zeros: far from glass, so "tissue"

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        return read_window(opened.key, coarse_level, y, x, h, w, damaged="fill", damage=damage, info=opened.info)

    if clv.height * clv.width <= ONE_CALL_PIXELS:
        _mark_patches(possible_tissue(read(0, 0, clv.height, clv.width)), 0, 0, rows, cols, wanted)
        return wanted
    blocks = [(y, x) for y in range(0, clv.height, BLOCK_SIDE) for x in range(0, clv.width, BLOCK_SIDE)]
    step = _sample_step(clv.height, clv.width)
    samples = []
    for y, x in blocks:  # pass 1: the same subsample as one read would take, for the glass colour
        h, w = min(BLOCK_SIDE, clv.height - y), min(BLOCK_SIDE, clv.width - x)
        samples.append(read(y, x, h, w)[(-y) % step :: step, (-x) % step :: step].reshape(-1, 3))
    background = _glass_colour(np.concatenate(samples))
    for y, x in blocks:  # pass 2: flags per block, with a halo so they equal the whole-level ones
        top, left = max(0, y - _HALO), max(0, x - _HALO)
        bottom, right = min(clv.height, y + BLOCK_SIDE + _HALO), min(clv.width, x + BLOCK_SIDE + _HALO)
        flagged = possible_tissue(read(top, left, bottom - top, right - left), background)
        inner = flagged[y - top : min(clv.height, y + BLOCK_SIDE) - top, x - left : min(clv.width, x + BLOCK_SIDE) - left]
        _mark_patches(inner, y, x, rows, cols, wanted)
    return wanted


def segments_for_patches(grid: SegmentGrid, patches: np.ndarray, patch: int) -> np.ndarray:
    """Bool over ``grid``'s segments: those that a set patch of ``patches`` touches."""
    n_seg_y, n_seg_x = grid.damaged.shape
    integral = _integral_image(patches)

    def ranges(n_seg: int, seg: int, n_patches: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.arange(n_seg) * seg
        return np.minimum(starts // patch, n_patches), np.minimum(-(-(starts + seg) // patch), n_patches)

    y0, y1 = ranges(n_seg_y, grid.seg_h, patches.shape[0])
    x0, x1 = ranges(n_seg_x, grid.seg_w, patches.shape[1])
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0] > 0


def coarse_decision(opened: OpenedSlide, level: int, coarse: str | int, *, patch_shape: tuple[int, int], patch: int) -> CoarseDecision | None:
    """Decide, from a coarse level, which patches of ``level`` to read (None: read all).

    Parameters
    ----------
    opened
        The slide.
    level
        The level being masked.
    coarse
        ``"auto"``, ``"none"`` or a level index (see :func:`choose_coarse_level`).
    patch_shape
        ``(patch_y, patch_x)``: the size of the level's patch grid.
    patch
        Patch side in pixels.
    """
    coarse_level = choose_coarse_level(opened.info, level, coarse)
    if coarse_level is None:
        return None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-xr-scan") as pool:
        # the level's integrity scan (Python, file structure) runs beside the coarse pass
        # (decode and NumPy, which release the GIL); both are needed before any task runs
        level_damage = pool.submit(opened.damage, level)
        patches = _wanted_patches(opened, level, coarse_level, patch_shape, patch)
        segments = segments_for_patches(level_damage.result(), patches, patch)
    return CoarseDecision(coarse_level, patches, segments)
