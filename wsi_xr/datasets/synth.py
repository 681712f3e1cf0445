"""Synthetic H&E-like brightfield slides with known ground truth.

A synthetic slide is a pyramidal, tiled TIFF that looks like a scanned H&E section:
a near-white, slightly noisy and unevenly lit glass background, a few irregular pieces
of pink eosin-stained tissue with fibrous texture, and dark purple nuclei. Where the
tissue lies is known exactly, so tissue detection can be scored against
:func:`tissue_truth` (per pixel) and :func:`tile_truth` (per 64-pixel tile).

How it is built:

* **Shape.** The tissue outline is a smooth random field on a coarse grid of at most
  ~513 nodes along the long side (a sum of a few octaves of Catmull-Rom interpolated
  random lattices, pushed down near the slide border), thresholded at the quantile
  that gives the requested tissue fraction. A pixel is tissue when the bilinear
  interpolation of that grid at the pixel is above the threshold. The coarse grid is
  small whatever the slide size, and ground truth needs no rendering.
* **Pixels.** Level 0 is rendered in independent 256 x 256 blocks (whatever the TIFF
  tile size). A block's nuclei, dust specks and the offset of its window into a pool
  of sensor noise come from ``np.random.default_rng([seed, 0, by, bx, stream])``;
  fibre and blotch textures are periodic images made once per seed and sampled at
  global coordinates, and a block also draws the nuclei of its neighbours that reach
  into it, so there are no seams. Colour follows Beer-Lambert absorption of eosin and
  haematoxylin in front of a slightly uneven white light.
* **File.** Level 0 is written tile by tile from an iterator (never whole in memory);
  each lower level is a 2 x 2 box average of the level above, read back from the
  file just written a few tiles at a time and appended as a new top-level page.
  Output is byte-identical for identical arguments (on one machine: the coarse field
  uses BLAS matrix products and float32 maths that may differ in the last bit on
  another CPU).
* **Pen marks (opt-in).** ``pen_strokes=N`` adds N marker strokes (blue, green, red,
  black; on glass, over tissue, and crossing both) in front of the section, with
  ground truth from :func:`ink_truth` and :func:`ink_tile_fraction`
  (:mod:`wsi_xr.datasets.ink`). With the default ``pen_strokes=0`` nothing changes.

>>> spec = write_synthetic_slide("slide.tif", 4096, 4096, seed=1)   # doctest: +SKIP
>>> truth = tile_truth(spec)                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import tifffile

from wsi_xr.datasets.ink import INK_COLOURS, InkStroke, check_colours, ink_mask_region, ink_od_region, make_strokes
from wsi_xr.errors import InvalidArgumentError

_T = TypeVar("_T")
_R = TypeVar("_R")

__all__ = [
    "SynthSpec",
    "ink_strokes",
    "ink_tile_fraction",
    "ink_truth",
    "render_region",
    "tile_tissue_fraction",
    "tile_truth",
    "tissue_truth",
    "write_rescanned_slide",
    "write_synthetic_slide",
]

#: Side of the independently rendered level-0 blocks (independent of the TIFF tile size).
_BLOCK = 256
#: Upper bound on the number of coarse field nodes along the slide's long side.
_COARSE_NODES = 512
#: The most pixels :func:`tissue_truth` builds in memory.
_MAX_TRUTH_PIXELS = 1 << 28
#: Compression name -> tifffile compression argument.
_COMPRESSIONS = {"jpeg": "jpeg", "deflate": "adobe_deflate", "none": None}
#: Octaves of the tissue-shape field: (lattice cells along the long side, amplitude).
_SHAPE_OCTAVES = ((2.5, 1.0), (5.0, 0.45), (10.0, 0.12), (20.0, 0.04))
#: Octaves of the eosin-density and cellularity fields.
_STAIN_OCTAVES = ((4.0, 1.0), (12.0, 0.5))
#: Optical density (absorbance) per RGB channel of one unit of each stain.
_EOSIN_OD = np.array([0.10, 0.95, 0.28], dtype=np.float32)
_HAEMATOXYLIN_OD = np.array([0.62, 0.72, 0.30], dtype=np.float32)
#: Per-pixel sensor noise (standard deviation in 8-bit levels) on glass and on tissue.
_NOISE_GLASS = 2.2
_NOISE_TISSUE = 3.5
#: Periods of the texture images (pixels); multiples of the block so blocks never wrap.
_FIBRE_PERIOD = 1024
_BLOTCH_PERIOD = 768
#: Side of the pool of Gaussian noise from which each block takes a random window.
_NOISE_POOL = 1024
#: Blocks whose nuclei and specks a slide model keeps (3 block rows of a 65536-px slide).
_FEATURE_CACHE = 1024
#: Most pen strokes a slide may have.
_MAX_STROKES = 64
#: Threads rendering level-0 tiles ahead of the TIFF writer.
_RENDER_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a synthetic slide.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels (any positive size; need not be tile multiples).
    seed : int
        Non-negative seed; the same spec always gives the same pixels.
    tissue_fraction : float
        Requested fraction of the slide area covered by tissue, in ``[0, 1]``.
    tile_size : int
        TIFF tile side in pixels, a positive multiple of 16.
    levels : int or None
        Number of pyramid levels; ``None`` halves until a level fits in one tile.
    compression : {"jpeg", "deflate", "none"}
        Tile compression ("deflate" is Adobe Deflate, TIFF code 8).
    jpeg_quality : int
        JPEG quality, 1-100 (ignored for other compressions).
    mpp : float or None
        Microns per level-0 pixel written to the resolution tags; ``None`` writes none.
    pen_strokes : int
        Number of marker-pen strokes drawn on the slide (0 to 64; 0, the default,
        draws none and leaves every pixel as without the option).
    pen_colours : tuple of str or None
        Inks the strokes cycle through (names of
        :data:`wsi_xr.datasets.ink.INK_OD`); ``None``: the four tuning colours
        (blue, green, red, black).

    Raises
    ------
    InvalidArgumentError
        If a value is out of range.
    """

    width: int
    height: int
    seed: int = 0
    tissue_fraction: float = 0.3
    tile_size: int = 256
    levels: int | None = None
    compression: str = "jpeg"
    jpeg_quality: int = 90
    mpp: float | None = 0.5
    pen_strokes: int = 0
    pen_colours: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r}: give a positive integer number of pixels")
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidArgumentError(f"seed={self.seed!r}: give a non-negative integer")
        fraction = self.tissue_fraction
        if not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
            raise InvalidArgumentError(f"tissue_fraction={fraction!r}: give a number between 0 and 1")
        if not _is_int(self.tile_size) or self.tile_size < 16 or self.tile_size % 16:
            raise InvalidArgumentError(f"tile_size={self.tile_size!r}: TIFF tiles must be a positive multiple of 16 (e.g. 256)")
        if self.compression not in _COMPRESSIONS:
            raise InvalidArgumentError(f"compression={self.compression!r}: choose one of {sorted(_COMPRESSIONS)}")
        if not _is_int(self.jpeg_quality) or not 1 <= self.jpeg_quality <= 100:
            raise InvalidArgumentError(f"jpeg_quality={self.jpeg_quality!r}: give an integer from 1 to 100")
        if self.mpp is not None and (not isinstance(self.mpp, (int, float)) or not math.isfinite(self.mpp) or self.mpp <= 0):
            raise InvalidArgumentError(f"mpp={self.mpp!r}: give a positive number of microns per pixel, or None")
        if not _is_int(self.pen_strokes) or not 0 <= self.pen_strokes <= _MAX_STROKES:
            raise InvalidArgumentError(f"pen_strokes={self.pen_strokes!r}: give an integer from 0 (no ink) to {_MAX_STROKES}")
        if self.pen_colours is not None:
            object.__setattr__(self, "pen_colours", check_colours(self.pen_colours))  # a list becomes a hashable tuple
        most = _max_levels(self.width, self.height)
        if self.levels is not None and (not _is_int(self.levels) or not 1 <= self.levels <= most):
            raise InvalidArgumentError(
                f"levels={self.levels!r}: a {self.width}x{self.height} slide can have 1 to {most} levels (or None for automatic)"
            )

    @property
    def n_levels(self) -> int:
        """Number of pyramid levels the file has."""
        if self.levels is not None:
            return self.levels
        n, w, h = 1, self.width, self.height
        while max(w, h) > self.tile_size:
            w, h, n = (w + 1) // 2, (h + 1) // 2, n + 1
        return n

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(height, width)`` of a level: each level is the one above halved, rounded up."""
        if not _is_int(level) or not 0 <= level < self.n_levels:
            raise InvalidArgumentError(f"level={level!r}: this slide has levels 0 to {self.n_levels - 1}")
        w, h = self.width, self.height
        for _ in range(level):
            w, h = (w + 1) // 2, (h + 1) // 2
        return h, w


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _max_levels(width: int, height: int) -> int:
    """Levels until a 1 x 1 level is reached (halving with rounding up)."""
    n, w, h = 1, width, height
    while max(w, h) > 1:
        w, h, n = (w + 1) // 2, (h + 1) // 2, n + 1
    return n


# --------------------------------------------------------------------------------------
# The slide model: coarse fields, textures and colours, made once per spec.
# --------------------------------------------------------------------------------------


def _catmull_rom_matrix(coords: np.ndarray, n_lattice: int) -> np.ndarray:
    """Matrix ``M`` with ``M @ lattice`` = Catmull-Rom interpolation at ``coords``.

    ``coords`` are in lattice units and must satisfy ``1 <= coords < n_lattice - 2``.
    """
    i = np.floor(coords).astype(np.int64)
    s = coords - i
    s2, s3 = s * s, s * s * s
    weights = (
        (-s3 + 2 * s2 - s) / 2,
        (3 * s3 - 5 * s2 + 2) / 2,
        (-3 * s3 + 4 * s2 + s) / 2,
        (s3 - s2) / 2,
    )
    matrix = np.zeros((coords.size, n_lattice))
    rows = np.arange(coords.size)
    for k, w in enumerate(weights):
        matrix[rows, i - 1 + k] += w
    return matrix


def _smooth_field(
    rng: np.random.Generator,
    node_x: np.ndarray,
    node_y: np.ndarray,
    long_side: float,
    octaves: tuple[tuple[float, float], ...],
) -> np.ndarray:
    """Sum of smoothly interpolated random lattices, evaluated at the node positions."""
    field = np.zeros((node_y.size, node_x.size))
    for cells, amplitude in octaves:
        offset_x, offset_y = rng.random(2)
        lx = node_x / long_side * cells + offset_x + 1.0
        ly = node_y / long_side * cells + offset_y + 1.0
        nx = int(np.floor(lx.max())) + 3
        ny = int(np.floor(ly.max())) + 3
        lattice = rng.standard_normal((ny, nx))
        field += amplitude * (_catmull_rom_matrix(ly, ny) @ lattice @ _catmull_rom_matrix(lx, nx).T)
    return field


def _periodic_texture(rng: np.random.Generator, period: int, wavelength: float, angle: float, elongation: float) -> np.ndarray:
    """Seamlessly periodic band-pass noise, zero mean and unit variance (float32).

    ``wavelength`` is the typical feature size across (pixels); ``elongation`` > 1
    stretches features along ``angle`` (radians) into fibres.
    """
    noise = rng.standard_normal((period, period))
    ky = np.fft.fftfreq(period)[:, None]
    kx = np.fft.rfftfreq(period)[None, :]
    along = kx * math.cos(angle) + ky * math.sin(angle)
    across = -kx * math.sin(angle) + ky * math.cos(angle)
    f0 = 1.0 / wavelength
    radius = np.hypot(along * elongation, across)
    gain = np.exp(-0.5 * ((radius - f0) / (0.6 * f0)) ** 2)
    gain[0, 0] = 0.0
    texture = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=noise.shape)
    texture -= texture.mean()
    texture /= texture.std() + 1e-12
    return texture.astype(np.float32)


@dataclass(frozen=True)
class _Blobs:
    """Elliptical features: centres, semi-axes, orientation and strength (one array each)."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    strength: np.ndarray

    def select(self, keep: np.ndarray) -> _Blobs:
        """The blobs where ``keep`` is true."""
        return _Blobs(*(getattr(self, f.name)[keep] for f in fields(self)))


@dataclass(frozen=True)
class _Textures:
    """Per-seed periodic images sampled at global pixel positions (about 23 MB)."""

    fibres: tuple[np.ndarray, np.ndarray]  # two fibre textures, float32 (P, P)
    blotch: np.ndarray  # isotropic blotches, float32 (P', P')
    noise: np.ndarray  # float32 (3, _NOISE_POOL, _NOISE_POOL) standard normal pool


@lru_cache(maxsize=2)
def _textures(seed: int) -> _Textures:
    rng = np.random.default_rng([seed, 4])
    angle = rng.uniform(0, math.pi)
    return _Textures(
        fibres=(
            _periodic_texture(rng, _FIBRE_PERIOD, 14.0, angle, 4.0),
            _periodic_texture(rng, _FIBRE_PERIOD, 10.0, angle + 1.1, 3.0),
        ),
        blotch=_periodic_texture(rng, _BLOTCH_PERIOD, 60.0, 0.0, 1.0),
        noise=rng.standard_normal((3, _NOISE_POOL, _NOISE_POOL), dtype=np.float32),
    )


@dataclass(frozen=True, eq=False)
class _Model:
    """The per-slide state shared by all blocks (small whatever the slide size)."""

    spec: SynthSpec
    step: float  # level-0 pixels between coarse nodes
    shape_field: np.ndarray  # float32 (ny, nx) tissue-shape field
    stain_field: np.ndarray  # float32 (ny, nx) eosin density, about N(0, 1)
    cell_field: np.ndarray  # float32 (ny, nx) cellularity, about N(0, 1)
    threshold: float  # tissue where shape field > threshold
    textures: _Textures
    white: np.ndarray  # float32 (3,) light through clean glass
    gradient: tuple[float, float, float]  # illumination: x slope, y slope, vignette
    eosin_scale: float
    strokes: tuple[InkStroke, ...] = ()  # marker-pen ink (empty unless spec.pen_strokes)
    # Nuclei and specks of recently used blocks (each block needs its neighbours').
    features: dict[tuple[int, int], tuple[_Blobs, _Blobs]] = field(default_factory=dict)


@lru_cache(maxsize=4)
def _model(spec: SynthSpec) -> _Model:
    width, height, seed = spec.width, spec.height, spec.seed
    long_side = float(max(width, height))
    step = max(1.0, long_side / _COARSE_NODES)
    nx = int(math.floor((width - 1) / step)) + 2
    ny = int(math.floor((height - 1) / step)) + 2
    node_x = np.arange(nx) * step
    node_y = np.arange(ny) * step

    shape = _smooth_field(np.random.default_rng([seed, 1]), node_x, node_y, long_side, _SHAPE_OCTAVES)

    # Push the field down gently towards the border: tissue seldom touches the slide edge.
    def border(pos: np.ndarray, size: int) -> np.ndarray:
        distance = np.minimum(pos, size - 1 - pos) / max(size - 1, 1)
        return np.clip(1.0 - distance / 0.2, 0.0, 1.0) ** 2

    shape -= 1.2 * (border(node_y, height)[:, None] + border(node_x, width)[None, :])
    shape = shape.astype(np.float32)

    fraction = float(spec.tissue_fraction)
    if fraction <= 0.0:
        threshold = math.inf
    elif fraction >= 1.0:
        threshold = -math.inf
    else:
        inside = shape[node_y <= height - 1][:, node_x <= width - 1]
        # Rounded to float32 so every comparison with the float32 field agrees.
        threshold = float(np.float32(np.quantile(inside, 1.0 - fraction)))

    stain = _smooth_field(np.random.default_rng([seed, 2]), node_x, node_y, long_side, _STAIN_OCTAVES)
    cells = _smooth_field(np.random.default_rng([seed, 3]), node_x, node_y, long_side, _STAIN_OCTAVES)
    norm = math.sqrt(sum(a * a for _, a in _STAIN_OCTAVES)) * 0.6

    rng = np.random.default_rng([seed, 5])
    white = np.array([241.0, 239.0, 242.0]) + rng.uniform(-1.0, 1.0, 3)
    gradient = (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02)), float(rng.uniform(0.01, 0.03)))
    strokes: tuple[InkStroke, ...] = ()
    if spec.pen_strokes:

        def on_tissue(px: np.ndarray, py: np.ndarray) -> np.ndarray:
            return _points(shape, step, px, py) > threshold

        strokes = make_strokes(np.random.default_rng([seed, 6]), width, height, spec.pen_strokes, on_tissue, spec.pen_colours)
    return _Model(
        spec=spec,
        step=step,
        shape_field=shape,
        stain_field=(stain / norm).astype(np.float32),
        cell_field=(cells / norm).astype(np.float32),
        threshold=threshold,
        textures=_textures(seed),
        white=white.astype(np.float32),
        gradient=gradient,
        eosin_scale=float(rng.uniform(0.9, 1.15)),
        strokes=strokes,
    )


# --------------------------------------------------------------------------------------
# Field evaluation (shared by rendering and ground truth, so both agree exactly).
# --------------------------------------------------------------------------------------


def _axis_weights(start: int, count: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Left node index and float32 weight of the right node for pixels start..start+count-1."""
    pos = np.arange(start, start + count, dtype=np.float64) / step
    index = np.floor(pos).astype(np.intp)
    return index, (pos - index).astype(np.float32)


def _bilinear(grid: np.ndarray, iy: np.ndarray, ty: np.ndarray, ix: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``grid`` on the outer product of row and column weights."""
    r0, r1 = int(iy[0]), int(iy[-1]) + 2
    rows = grid[r0:r1]
    left = rows[:, ix]
    right = rows[:, ix + 1]
    across = left + (right - left) * tx  # (rows, width)
    top = across[iy - r0]
    bottom = across[iy - r0 + 1]
    return top + (bottom - top) * ty[:, None]


def _shape_region(model: _Model, x: int, y: int, width: int, height: int) -> np.ndarray:
    """The tissue-shape field (float32) for a level-0 region."""
    iy, ty = _axis_weights(y, height, model.step)
    ix, tx = _axis_weights(x, width, model.step)
    return _bilinear(model.shape_field, iy, ty, ix, tx)


def _mask_region(model: _Model, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Ground-truth tissue mask (bool) for a level-0 region."""
    return _shape_region(model, x, y, width, height) > model.threshold


def _points(grid: np.ndarray, step: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``grid`` at scattered level-0 points (clipped to the grid)."""
    fx = np.clip(px / step, 0, grid.shape[1] - 1.001)
    fy = np.clip(py / step, 0, grid.shape[0] - 1.001)
    ix, iy = np.floor(fx).astype(np.intp), np.floor(fy).astype(np.intp)
    tx, ty = fx - ix, fy - iy
    top = grid[iy, ix] * (1 - tx) + grid[iy, ix + 1] * tx
    bottom = grid[iy + 1, ix] * (1 - tx) + grid[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


# --------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------


def _random_blobs(
    rng: np.random.Generator,
    bx: int,
    by: int,
    mean_count: float,
    radius: tuple[float, float],
    aspect: tuple[float, float],
    strength: tuple[float, float],
) -> _Blobs:
    """A Poisson number of random ellipses centred in block (bx, by)."""
    n = int(rng.poisson(mean_count))
    x = bx * _BLOCK + rng.random(n) * _BLOCK
    y = by * _BLOCK + rng.random(n) * _BLOCK
    a = rng.uniform(*radius, n)
    b = a * rng.uniform(*aspect, n)
    theta = rng.uniform(0, math.pi, n)
    return _Blobs(x, y, a, b, np.cos(theta), np.sin(theta), rng.uniform(*strength, n))


def _block_features(model: _Model, bx: int, by: int) -> tuple[_Blobs, _Blobs]:
    """Nuclei (inside tissue) and dust specks (anywhere) centred in block (bx, by).

    Strengths are optical densities: haematoxylin for nuclei, grey for specks.
    """
    found = model.features.get((bx, by))
    if found is not None:
        return found
    rng = np.random.default_rng([model.spec.seed, 0, by, bx, 1])
    nuclei = _random_blobs(rng, bx, by, 90.0, (3.5, 7.0), (0.5, 1.0), (0.8, 1.6))
    specks = _random_blobs(rng, bx, by, 0.12, (1.0, 2.5), (0.6, 1.0), (0.04, 0.10))
    # Nuclei only inside tissue, denser where the cellularity field is high.
    density = np.clip(0.5 + 0.2 * _points(model.cell_field, model.step, nuclei.x, nuclei.y), 0.25, 0.8)
    inside = _points(model.shape_field, model.step, nuclei.x, nuclei.y) > model.threshold
    found = (nuclei.select(inside & (rng.random(nuclei.x.size) < density)), specks)
    if len(model.features) >= _FEATURE_CACHE:
        model.features.clear()
    model.features[(bx, by)] = found
    return found


def _draw_blobs(target: np.ndarray, x0: int, y0: int, blobs: _Blobs) -> None:
    """Raise ``target`` (float32, in place) to each blob's soft-edged ellipse profile.

    ``target`` covers level-0 pixels ``x0..x0+w-1`` by ``y0..y0+h-1``; blobs may lie
    partly outside it. Profiles are computed for all blobs at once in fixed windows.
    """
    h, w = target.shape
    if blobs.x.size == 0:
        return
    half = int(math.ceil(float(blobs.a.max()))) + 1
    size = 2 * half + 1
    left = np.floor(blobs.x).astype(np.intp) - half
    top = np.floor(blobs.y).astype(np.intp) - half
    near = (left < x0 + w) & (left + size > x0) & (top < y0 + h) & (top + size > y0)
    if not near.any():
        return
    left, top = left[near], top[near]
    offsets = np.arange(size, dtype=np.float32) + np.float32(0.5)
    dx = (left - blobs.x[near]).astype(np.float32)[:, None] + offsets  # (n, size)
    dy = (top - blobs.y[near]).astype(np.float32)[:, None] + offsets
    cos = blobs.cos[near].astype(np.float32)[:, None, None]
    sin = blobs.sin[near].astype(np.float32)[:, None, None]
    u = (dx[:, None, :] * cos + dy[:, :, None] * sin) / blobs.a[near].astype(np.float32)[:, None, None]
    v = (dy[:, :, None] * cos - dx[:, None, :] * sin) / blobs.b[near].astype(np.float32)[:, None, None]
    profile = np.clip((1.0 - (u * u + v * v)) * 4.0, 0.0, 1.0)
    profile *= blobs.strength[near].astype(np.float32)[:, None, None]
    for i in range(left.size):
        c0, r0 = int(left[i]) - x0, int(top[i]) - y0
        a0, b0 = max(c0, 0), max(r0, 0)
        a1, b1 = min(c0 + size, w), min(r0 + size, h)
        window = target[b0:b1, a0:a1]
        np.maximum(window, profile[i, b0 - r0 : b1 - r0, a0 - c0 : a1 - c0], out=window)


def _sample(texture: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Window of a periodic texture at global pixel ``x, y`` (must not wrap: blocks align)."""
    period = texture.shape[-1]
    x, y = x % period, y % period
    return texture[..., y : y + height, x : x + width]


def _render_block(model: _Model, bx: int, by: int) -> np.ndarray:
    """Level-0 uint8 RGB pixels of one 256 x 256 block (clipped at the slide edge)."""
    spec = model.spec
    x0, y0 = bx * _BLOCK, by * _BLOCK
    w, h = min(_BLOCK, spec.width - x0), min(_BLOCK, spec.height - y0)

    iy, ty = _axis_weights(y0, h, model.step)
    ix, tx = _axis_weights(x0, w, model.step)
    tissue = _bilinear(model.shape_field, iy, ty, ix, tx) > model.threshold

    # Light through clean glass: a gentle linear gradient, vignette and faint mottling.
    gx, gy, vignette = model.gradient
    u = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) / spec.width - 0.5
    v = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) / spec.height - 0.5
    light = (1.0 + gy * v - vignette * v * v)[:, None] + (gx * u - vignette * u * u)[None, :]
    mottle = _sample(model.textures.blotch, x0 // 4, y0 // 4, _BLOCK // 4, _BLOCK // 4)
    light += 0.004 * np.repeat(np.repeat(mottle, 4, axis=0), 4, axis=1)[:h, :w]
    light = light.astype(np.float32)

    # Sensor noise: a window of the slide's Gaussian pool at a per-block random offset.
    rng = np.random.default_rng([spec.seed, 0, by, bx, 0])
    ox, oy = (int(v) for v in rng.integers(0, _NOISE_POOL - _BLOCK + 1, 2))
    noise = model.textures.noise[:, oy : oy + h, ox : ox + w]

    # Absorbance (optical density): dust everywhere, eosin and haematoxylin on tissue.
    neighbours = [_block_features(model, bx + i, by + j) for j in (-1, 0, 1) for i in (-1, 0, 1) if bx + i >= 0 and by + j >= 0]
    dust = np.zeros((h, w), dtype=np.float32)
    for _, specks in neighbours:
        _draw_blobs(dust, x0, y0, specks)
    sigma: np.ndarray | float = _NOISE_GLASS
    eosin = haem = None
    if tissue.any():
        on = tissue.astype(np.float32)
        fibre_a = _sample(model.textures.fibres[0], x0, y0, w, h)
        fibre_b = _sample(model.textures.fibres[1], x0, y0, w, h)
        blotch = _sample(model.textures.blotch, x0, y0, w, h)
        mix = 0.5 + 0.5 * np.tanh(2.0 * blotch)
        fibre = np.tanh(1.2 * (fibre_b + (fibre_a - fibre_b) * mix))
        stain = _bilinear(model.stain_field, iy, ty, ix, tx)
        eosin = model.eosin_scale * (0.42 + 0.10 * np.tanh(stain))
        eosin = np.clip(eosin * (1.0 + 0.33 * fibre + 0.12 * blotch), 0.2, 1.3) * on
        haem = np.zeros((h, w), dtype=np.float32)
        for nuclei, _ in neighbours:
            _draw_blobs(haem, x0, y0, nuclei)
        haem *= 0.85 + 0.15 * fibre_b  # chromatin texture
        haem += 0.08 + 0.02 * blotch
        haem *= on
        sigma = _NOISE_GLASS + (_NOISE_TISSUE - _NOISE_GLASS) * on

    # Marker ink lies in front of the section: its absorbance adds to the stains'.
    ink = ink_od_region(model.strokes, x0, y0, w, h) if model.strokes else None

    out = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        od = dust.copy()
        if eosin is not None and haem is not None:
            od += eosin * _EOSIN_OD[c]
            od += haem * _HAEMATOXYLIN_OD[c]
        if ink is not None:
            od += ink[c]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= light
        od *= model.white[c]
        od += noise[c] * sigma
        od += 0.5
        np.clip(od, 0.0, 255.0, out=od)
        out[:, :, c] = od
    return out


def _render(model: _Model, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Level-0 pixels of any region inside the slide, assembled from blocks."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    for by in range(y // _BLOCK, (y + height - 1) // _BLOCK + 1):
        for bx in range(x // _BLOCK, (x + width - 1) // _BLOCK + 1):
            block = _render_block(model, bx, by)
            bx0, by0 = bx * _BLOCK, by * _BLOCK
            c0, c1 = max(x, bx0), min(x + width, bx0 + block.shape[1])
            r0, r1 = max(y, by0), min(y + height, by0 + block.shape[0])
            out[r0 - y : r1 - y, c0 - x : c1 - x] = block[r0 - by0 : r1 - by0, c0 - bx0 : c1 - bx0]
    return out


def render_region(spec: SynthSpec, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Level-0 pixels of a region as the generator makes them, before compression.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    x, y : int
        Level-0 top-left corner of the region.
    width, height : int
        Region size; the region must lie inside the slide.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``(height, width, 3)``.

    Raises
    ------
    InvalidArgumentError
        If the region is empty or reaches outside the slide.
    """
    integers = all(_is_int(v) for v in (x, y, width, height))
    inside = integers and x >= 0 and y >= 0 and width >= 1 and height >= 1
    if not inside or x + width > spec.width or y + height > spec.height:
        raise InvalidArgumentError(
            f"region x={x!r} y={y!r} width={width!r} height={height!r} is not a non-empty region inside the {spec.width}x{spec.height} slide"
        )
    return _render(_model(spec), int(x), int(y), int(width), int(height))


# --------------------------------------------------------------------------------------
# Ground truth.
# --------------------------------------------------------------------------------------


def tissue_truth(spec: SynthSpec, *, level: int = 0) -> np.ndarray:
    """Ground-truth per-pixel tissue mask of one level.

    Level 0 is exact (the same field evaluation that decides the colour of each pixel).
    A lower-level pixel is tissue when at least half of the level-0 pixels it averages
    are tissue (fractions are box-averaged level by level, as the pixels are).
    Builds the whole mask in memory: meant for small slides and tests.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    level : int
        Pyramid level.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of the level's ``(height, width)``.

    Raises
    ------
    InvalidArgumentError
        If the level does not exist or the slide is too large to hold as one mask.
    """
    shape = spec.level_shape(level)
    if spec.width * spec.height > _MAX_TRUTH_PIXELS:
        raise InvalidArgumentError(f"tissue_truth builds the whole {spec.width}x{spec.height} mask in memory; use tile_truth for slides this large")
    model = _model(spec)
    band = max(1, (1 << 22) // spec.width)
    mask = np.empty((spec.height, spec.width), dtype=bool)
    for y in range(0, spec.height, band):
        rows = min(band, spec.height - y)
        mask[y : y + rows] = _mask_region(model, 0, y, spec.width, rows)
    if level == 0:
        return mask
    fraction = mask.astype(np.float32)
    for _ in range(level):
        fraction = _box_mean(fraction)
    assert fraction.shape == shape
    return fraction >= 0.5


def _box_mean(a: np.ndarray) -> np.ndarray:
    """2 x 2 mean of a float array, odd edges averaged with themselves."""
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * np.float32(0.25)


def _tile_node_range(n_tiles: int, tile: int, step: float, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last coarse node (inclusive) that influence each tile along one axis."""
    start = np.arange(n_tiles) * tile
    first = np.floor(start / step).astype(np.intp)
    last = np.minimum(np.floor((start + tile - 1) / step).astype(np.intp) + 1, n_nodes - 1)
    return first, last


def tile_tissue_fraction(spec: SynthSpec, tile: int = 64) -> np.ndarray:
    """Exact fraction of tissue pixels in each full level-0 tile.

    Computed from the coarse field, without rendering: a tile whose influencing
    nodes are all above (or all below) the threshold is all tissue (or none), and only
    tiles on a tissue edge are evaluated pixel by pixel. Memory is proportional to the
    tile grid, so this works for any slide size.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    tile : int
        Tile side in level-0 pixels.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``(height // tile, width // tile)``; partial edge tiles are
        not included.

    Raises
    ------
    InvalidArgumentError
        If ``tile`` is not a positive integer.
    """
    if not _is_int(tile) or tile < 1:
        raise InvalidArgumentError(f"tile={tile!r}: give a positive tile size in pixels")
    tile = int(tile)
    model = _model(spec)
    n_ty, n_tx = spec.height // tile, spec.width // tile
    out = np.zeros((n_ty, n_tx), dtype=np.float32)
    if n_ty == 0 or n_tx == 0 or spec.tissue_fraction <= 0:
        return out
    if spec.tissue_fraction >= 1:
        out[:] = 1.0
        return out
    grid = model.shape_field
    fx, lx = _tile_node_range(n_tx, tile, model.step, grid.shape[1])
    fy, ly = _tile_node_range(n_ty, tile, model.step, grid.shape[0])
    col_min = np.stack([grid[:, a : b + 1].min(axis=1) for a, b in zip(fx, lx)], axis=1)
    col_max = np.stack([grid[:, a : b + 1].max(axis=1) for a, b in zip(fx, lx)], axis=1)
    tile_min = np.stack([col_min[a : b + 1].min(axis=0) for a, b in zip(fy, ly)])
    tile_max = np.stack([col_max[a : b + 1].max(axis=0) for a, b in zip(fy, ly)])
    margin = 1e-5 * (1.0 + abs(model.threshold))
    out[tile_min > model.threshold + margin] = 1.0
    uncertain = (tile_min <= model.threshold + margin) & (tile_max >= model.threshold - margin)
    band = max(1, (1 << 22) // tile)  # rows evaluated at once, so huge tiles stay cheap
    for ty, tx in zip(*np.nonzero(uncertain)):
        x, y = int(tx) * tile, int(ty) * tile
        count = sum(np.count_nonzero(_mask_region(model, x, y + dy, tile, min(band, tile - dy))) for dy in range(0, tile, band))
        out[ty, tx] = count / (tile * tile)
    return out


def tile_truth(spec: SynthSpec, tile: int = 64, *, min_fraction: float = 0.5) -> np.ndarray:
    """Ground-truth tissue label of each full level-0 tile.

    A tile is tissue when at least ``min_fraction`` (by default half) of its pixels are
    tissue. Only full tiles are scored (``height // tile`` x ``width // tile``);
    partial edge tiles are left out. Computed from the coarse field without rendering
    pixels (see :func:`tile_tissue_fraction`), so it is cheap even for 65536 x 65536.

    Tiles on a tissue edge are ambiguous for detectors: a tile with only 5-50% tissue
    already has a much larger pixel variance than glass, so a variance threshold calls
    it tissue while the majority rule does not. Scoring such a detector with a small
    ``min_fraction`` (e.g. 0.05) measures it against "any visible tissue" instead.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    tile : int
        Tile side in level-0 pixels.
    min_fraction : float
        Smallest tissue fraction, in ``(0, 1]``, that makes a tile tissue.

    Returns
    -------
    numpy.ndarray
        ``bool`` array ``(height // tile, width // tile)``.

    Raises
    ------
    InvalidArgumentError
        If ``tile`` or ``min_fraction`` is out of range.
    """
    if not isinstance(min_fraction, (int, float)) or not 0.0 < float(min_fraction) <= 1.0:
        raise InvalidArgumentError(f"min_fraction={min_fraction!r}: give a fraction in (0, 1]")
    return tile_tissue_fraction(spec, tile) >= np.float32(min_fraction)


def ink_strokes(spec: SynthSpec) -> tuple[InkStroke, ...]:
    """The marker-pen strokes of a slide (empty unless ``spec.pen_strokes``).

    Each :class:`~wsi_xr.datasets.ink.InkStroke` says its ``colour`` (one of
    ``spec.pen_colours``, by default blue, green, red, black), its ``kind`` (drawn on glass, over tissue, or crossing both) and geometry.
    """
    return _model(spec).strokes


def _selected_strokes(spec: SynthSpec, colour: str | None) -> tuple[InkStroke, ...]:
    if colour is not None and colour not in INK_COLOURS:
        raise InvalidArgumentError(f"colour={colour!r}: choose one of {list(INK_COLOURS)}, or None for all inks")
    return tuple(s for s in ink_strokes(spec) if colour is None or s.colour == colour)


def ink_truth(spec: SynthSpec, *, level: int = 0, colour: str | None = None) -> np.ndarray:
    """Ground-truth per-pixel ink mask of one level (all False without pen strokes).

    A level-0 pixel is ink when its centre lies inside a stroke (within the stroke's
    half width of its centre line: the middle of the stroke's soft border). A
    lower-level pixel is ink when at least half of the level-0 pixels it averages are.
    Builds the whole mask in memory: meant for small slides and tests.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    level : int
        Pyramid level.
    colour : str or None
        Only strokes of this ink (``"blue"``, ``"green"``, ``"red"``, ``"black"``).

    Returns
    -------
    numpy.ndarray
        ``bool`` array of the level's ``(height, width)``.

    Raises
    ------
    InvalidArgumentError
        If the level or colour does not exist, or the slide is too large for one mask.
    """
    shape = spec.level_shape(level)
    if spec.width * spec.height > _MAX_TRUTH_PIXELS:
        raise InvalidArgumentError(
            f"ink_truth builds the whole {spec.width}x{spec.height} mask in memory; use ink_tile_fraction for slides this large"
        )
    strokes = _selected_strokes(spec, colour)
    mask = ink_mask_region(strokes, 0, 0, spec.width, spec.height)
    if level == 0:
        return mask
    fraction = mask.astype(np.float32)
    for _ in range(level):
        fraction = _box_mean(fraction)
    assert fraction.shape == shape
    return fraction >= 0.5


def ink_tile_fraction(spec: SynthSpec, tile: int = 64, *, colour: str | None = None) -> np.ndarray:
    """Exact fraction of ink pixels (see :func:`ink_truth`) in each full level-0 tile.

    Only regions that a stroke can reach are evaluated, so the cost grows with the
    inked area, not the slide. With :func:`tile_tissue_fraction` this separates
    ink-only tiles (ink, no tissue), clean tissue tiles (tissue, no ink) and inked
    tissue.

    Parameters
    ----------
    spec : SynthSpec
        The slide.
    tile : int
        Tile side in level-0 pixels.
    colour : str or None
        Only strokes of this ink (``"blue"``, ``"green"``, ``"red"``, ``"black"``).

    Returns
    -------
    numpy.ndarray
        ``float32 (height // tile, width // tile)``; partial edge tiles left out.

    Raises
    ------
    InvalidArgumentError
        If ``tile`` is not a positive integer or ``colour`` is not an ink.
    """
    if not _is_int(tile) or tile < 1:
        raise InvalidArgumentError(f"tile={tile!r}: give a positive tile size in pixels")
    tile = int(tile)
    strokes = _selected_strokes(spec, colour)
    n_ty, n_tx = spec.height // tile, spec.width // tile
    out = np.zeros((n_ty, n_tx), dtype=np.float32)
    per = max(1, _BLOCK // tile)  # tiles per side of one evaluated region
    for ty in range(0, n_ty, per):
        for tx in range(0, n_tx, per):
            rows, cols = min(per, n_ty - ty), min(per, n_tx - tx)
            mask = ink_mask_region(strokes, tx * tile, ty * tile, cols * tile, rows * tile)
            if mask.any():
                counts = mask.reshape(rows, tile, cols, tile).sum(axis=(1, 3))
                out[ty : ty + rows, tx : tx + cols] = counts / np.float32(tile * tile)
    return out


# --------------------------------------------------------------------------------------
# Writing the TIFF.
# --------------------------------------------------------------------------------------


def _pad_tile(tile: np.ndarray, size: int) -> np.ndarray:
    """Pad an edge tile to ``size`` x ``size`` by repeating its last row/column.

    (tifffile would pad with zeros, and JPEG would smear the black into the image.)
    """
    h, w = tile.shape[:2]
    if h == size and w == size:
        return np.ascontiguousarray(tile)
    return np.pad(tile, ((0, size - h), (0, size - w), (0, 0)), mode="edge")


def _ordered_map(func: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(func, items)`` computed by a few threads, in order, a bounded number ahead."""
    if workers <= 1:
        yield from map(func, items)
        return
    with ThreadPoolExecutor(workers) as executor:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(executor.submit(func, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _level0_tiles(model: _Model, size: int) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order, rendered by a few threads a few tiles ahead.

    Tiles that are whole blocks (or several) are rendered one by one; other tile sizes
    render one full-width band of tile rows at a time (memory: one band).
    """
    spec = model.spec
    rows = range(0, spec.height, size)
    columns = range(0, spec.width, size)
    if size % _BLOCK == 0:

        def tile(origin: tuple[int, int]) -> np.ndarray:
            x, y = origin
            region = _render(model, x, y, min(size, spec.width - x), min(size, spec.height - y))
            return _pad_tile(region, size)

        yield from _ordered_map(tile, ((x, y) for y in rows for x in columns), _RENDER_THREADS)
    else:

        def band(y: int) -> np.ndarray:
            return _render(model, 0, y, spec.width, min(size, spec.height - y))

        for pixels in _ordered_map(band, rows, min(_RENDER_THREADS, 2)):
            for x in columns:
                yield _pad_tile(pixels[:, x : x + size], size)


def _box_downsample(a: np.ndarray) -> np.ndarray:
    """2 x 2 rounded mean of a uint8 image; an odd last row/column is averaged with itself."""
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    total = a[0::2, 0::2].astype(np.uint16)
    total += a[1::2, 0::2]
    total += a[0::2, 1::2]
    total += a[1::2, 1::2]
    total += 2
    return (total >> 2).astype(np.uint8)


def _downsampled_tiles(page: tifffile.TiffPage, size: int) -> Iterator[np.ndarray]:
    """Tiles of the level below ``page`` (its 2 x 2 box average), in row-major order.

    Each output tile is made from the (up to) four source tiles it covers, read and
    decoded on its own, so memory stays at a few tiles per thread whatever the width.
    """
    src_h, src_w = page.imagelength, page.imagewidth
    n_tx = -(-src_w // size)
    n_ty = -(-src_h // size)
    out_tx = -(-((src_w + 1) // 2) // size)
    out_ty = -(-((src_h + 1) // 2) // size)
    handle = page.parent.filehandle
    lock = threading.Lock()
    decode = page.decode
    extra = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression == 7 else {}
    offsets, counts = page.dataoffsets, page.databytecounts

    def source(ty: int, tx: int) -> np.ndarray:
        index = ty * n_tx + tx
        with lock:
            handle.seek(offsets[index])
            data = handle.read(counts[index])
        decoded, _, shape = decode(data, index, **extra)
        assert decoded is not None  # every tile of a level this module wrote has data
        tile = np.reshape(decoded, shape)[0]
        return tile[: min(size, src_h - ty * size), : min(size, src_w - tx * size), :3]

    def make(origin: tuple[int, int]) -> np.ndarray:
        oy, ox = origin
        rows = [np.concatenate([source(ty, tx) for tx in (2 * ox, 2 * ox + 1) if tx < n_tx], axis=1) for ty in (2 * oy, 2 * oy + 1) if ty < n_ty]
        return _pad_tile(_box_downsample(np.concatenate(rows, axis=0)), size)

    origins = ((oy, ox) for oy in range(out_ty) for ox in range(out_tx))
    yield from _ordered_map(make, origins, _RENDER_THREADS)


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    seed: int = 0,
    tissue_fraction: float = 0.3,
    tile_size: int = 256,
    levels: int | None = None,
    compression: str = "jpeg",
    jpeg_quality: int = 90,
    mpp: float | None = 0.5,
    pen_strokes: int = 0,
    pen_colours: tuple[str, ...] | None = None,
    progress: bool = False,
) -> SynthSpec:
    """Write a synthetic H&E-like pyramidal tiled TIFF.

    Each level is a top-level page (not a SubIFD) with ``tile_size`` tiles; level
    ``L`` is a 2 x 2 box average of level ``L - 1`` as stored. JPEG tiles are YCbCr
    with 2 x 2 chroma subsampling (tifffile's encoder), which cuCIM and tifffile decode
    identically. Memory stays at a few tiles per thread (one band of tile rows for a
    tile size that is not a multiple of 256) plus ~60 MB of per-slide state, whatever
    the slide size. The same arguments always give a byte-identical file.

    A 4096 x 4096 slide takes about a second, 16384 x 16384 about 10 s, on two cores.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (overwritten).
    width, height : int
        Level-0 size in pixels.
    seed : int
        Non-negative random seed.
    tissue_fraction : float
        Approximate fraction of the slide covered by tissue (0 and 1 allowed).
    tile_size : int
        TIFF tile side, a multiple of 16.
    levels : int or None
        Number of levels; ``None`` halves until a level fits in one tile.
    compression : {"jpeg", "deflate", "none"}
        Tile compression.
    jpeg_quality : int
        JPEG quality 1-100.
    mpp : float or None
        Microns per level-0 pixel for the resolution tags (centimetre unit; lower
        levels scaled by their nominal downsample ``2**L``). ``None`` writes none.
    pen_strokes : int
        Marker-pen strokes to draw (0-64; default 0: none, and the file is exactly
        as without the option). Their truth: :func:`ink_truth`, :func:`ink_tile_fraction`.
    pen_colours : tuple of str or None
        Inks the strokes cycle through; ``None``: blue, green, red and black (see
        :mod:`wsi_xr.datasets.ink` for the held-out colours).
    progress : bool
        Show a progress bar per level (tqdm).

    Returns
    -------
    SynthSpec
        The spec, from which :func:`tissue_truth`, :func:`tile_truth` and
        :func:`render_region` recompute the ground truth.

    Raises
    ------
    InvalidArgumentError
        If an argument is out of range.
    """
    from wsi_xr.outputs import check_output_file

    check_output_file(path, "tiff")  # a TIFF replaces a TIFF, never a folder or another file
    spec = SynthSpec(
        width=width,
        height=height,
        seed=seed,
        tissue_fraction=tissue_fraction,
        tile_size=tile_size,
        levels=levels,
        compression=compression,
        jpeg_quality=jpeg_quality,
        mpp=mpp,
        pen_strokes=pen_strokes,
        pen_colours=pen_colours,
    )
    path = os.fspath(path)
    model = _model(spec)
    size = spec.tile_size
    codec = _COMPRESSIONS[spec.compression]
    options: dict[str, Any] = {
        "photometric": "rgb",
        "tile": (size, size),
        "dtype": np.uint8,
        "metadata": None,
        "compression": codec,
        # Encode a few tiles per pass (tifffile's default buffers up to 512 MB of tiles).
        "maxworkers": 2,
        "buffersize": 2 * _RENDER_THREADS * size * size * 3,
    }
    if codec == "jpeg":
        options["compressionargs"] = {"level": spec.jpeg_quality}
    # Classic TIFF offsets stop at 4 GiB; switch to BigTIFF when the pixels could pass it.
    raw_bytes = sum(math.prod(spec.level_shape(i)) * 3 for i in range(spec.n_levels))
    bigtiff = raw_bytes > 2**32 - 2**26

    def resolution(level: int) -> dict[str, Any]:
        if spec.mpp is None:
            return {}
        per_cm = 1e4 / (spec.mpp * 2**level)
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    def counted(tiles: Iterator[np.ndarray], level: int) -> Iterator[np.ndarray]:
        """The tiles, ticking a progress bar as each is handed to the writer."""
        from tqdm.auto import tqdm

        h, w = spec.level_shape(level)
        with tqdm(total=-(-h // size) * -(-w // size), desc=f"level {level}", unit="tile") as ticks:
            for tile in tiles:
                ticks.update(1)
                yield tile

    def write(writer: tifffile.TiffWriter, tiles: Iterator[np.ndarray], level: int, **tags: Any) -> None:
        source = counted(tiles, level) if progress else tiles
        try:
            writer.write(source, shape=(*spec.level_shape(level), 3), **resolution(level), **options, **tags)
        finally:
            # tifffile takes exactly the tiles it needs; stop the render threads now.
            source.close()  # type: ignore[attr-defined]
            tiles.close()  # type: ignore[attr-defined]

    description = f"wsi_xr synthetic slide seed={spec.seed} tissue_fraction={float(spec.tissue_fraction):g}"
    if spec.pen_strokes:
        description += f" pen_strokes={spec.pen_strokes}"
        if spec.pen_colours is not None:
            description += f" pen_colours={','.join(spec.pen_colours)}"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
        write(writer, _level0_tiles(model, size), 0, description=description)
    for level in range(1, spec.n_levels):
        with tifffile.TiffFile(path) as reader, tifffile.TiffWriter(path, append=True) as writer:
            write(writer, _downsampled_tiles(cast(tifffile.TiffPage, reader.pages[level - 1]), size), level, subfiletype=1)
    return spec


def write_rescanned_slide(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    level: int = 1,
    tile_size: int = 256,
    compression: str = "jpeg",
    jpeg_quality: int = 90,
) -> float | None:
    """Write the same tissue as a coarser scan: ``source``'s ``level`` as level 0 of a new slide.

    A synthetic slide's level ``L`` is the 2 x 2 box average of level ``L - 1`` as stored,
    so level 1 of a 0.25 µm/px slide is what a 0.5 µm/px (20x) scanner would record of the
    same tissue, and it is compressed again here, as a scanner's own tiles are. The new
    file's mpp is the source's times ``2**level``; its pyramid halves as
    :func:`write_synthetic_slide`'s does. Returns the new mpp (None when the source has none).
    For tests of physical scale (same tissue at 40x and 20x).
    """
    from wsi_xr.outputs import check_output_file

    check_output_file(path, "tiff")
    with tifffile.TiffFile(source) as reader:
        pages = [p for p in reader.pages if isinstance(p, tifffile.TiffPage)]
        if not 0 < level < len(pages):
            raise InvalidArgumentError(f"{source}: level={level!r}: the slide has levels 0 to {len(pages) - 1}; give one of 1..{len(pages) - 1}.")
        pixels = pages[level].asarray()
        tag = pages[0].tags.get("XResolution")
        mpp = None
        if tag is not None and pages[0].tags.get("ResolutionUnit") is not None and int(pages[0].tags["ResolutionUnit"].value) == 3:
            numerator, denominator = tag.value
            mpp = 1e4 * denominator / numerator * 2**level
    codec = _COMPRESSIONS[compression]
    options: dict[str, Any] = {"photometric": "rgb", "tile": (tile_size, tile_size), "dtype": np.uint8, "metadata": None, "compression": codec}
    if codec == "jpeg":
        options["compressionargs"] = {"level": jpeg_quality}

    def resolution(down: int) -> dict[str, Any]:
        if mpp is None:
            return {}
        per_cm = 1e4 / (mpp * down)
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    path = os.fspath(path)
    with tifffile.TiffWriter(path) as writer:
        writer.write(pixels, description=f"wsi_xr rescan of {Path(source).name} level {level}", **resolution(1), **options)
    h, w = pixels.shape[:2]
    n = 1
    while max(h, w) > tile_size:
        h, w = (h + 1) // 2, (w + 1) // 2
        with tifffile.TiffFile(path) as reader, tifffile.TiffWriter(path, append=True) as writer:
            tiles = _downsampled_tiles(cast(tifffile.TiffPage, reader.pages[n - 1]), tile_size)
            try:
                writer.write(tiles, shape=(h, w, 3), subfiletype=1, **resolution(2**n), **options)
            finally:
                tiles.close()  # type: ignore[attr-defined]
        n += 1
    return mpp
