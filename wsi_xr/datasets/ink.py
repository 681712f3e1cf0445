"""Marker-pen ink strokes for synthetic slides (opt-in), with exact geometry for truth.

Pathologists mark slides with felt-tip markers on the coverslip: circles around a
region, lines along an edge, dots. In a scan the ink is a semi-transparent coloured
layer in front of the section, so it multiplies the light that the tissue lets through:
in optical density (absorbance) the ink's density simply adds to the stains'. This
module makes such strokes for :mod:`wsi_xr.datasets.synth` and evaluates them on any level-0
region:

* **Geometry.** A stroke is a smooth centre line (a polyline through points a few
  pixels apart: an elliptic arc, a gently bent line, or a dot) with a constant half
  width. A pixel is **ink** (ground truth) when its centre lies within the half width
  of the centre line. Rendering and truth use the same distance, so they agree exactly.
* **Colour.** Each stroke has one marker colour (:data:`INK_OD`), an absorbance per
  RGB channel at unit density, jittered per stroke (±6 % per channel, so the hue
  varies between strokes as between pens), times a per-stroke density from faint (0.4)
  to heavy (1.3). The tuning colours (:data:`TUNING_COLOURS`) are what scanners show of
  the usual markers: royal blue, a teal-leaning green, a *pinkish* red (blue is absorbed
  almost as much as green: ``OD_B / OD_G`` 0.73, the colour that makes red ink hard to
  tell from eosin) and a black that is a little bluish. :data:`HELD_OUT_COLOURS` (cyan,
  navy, orange, violet, pink) are for checking a rule on colours it was not tuned on.
* **What a scanner sees.** The ink lies on the coverslip, about 0.17 mm above the
  focal plane, so its border is out of focus: a soft edge of 3-14 px (per stroke)
  centred on the truth boundary. Within a stroke the density varies as real marker
  ink does: streaks along the stroke from the felt tip, slow fading along its length,
  blotchy drying (mottle of ±10 % over tens of pixels) and ink pooling at its edges.
  Where strokes cross, their densities add. JPEG's colour shift (2 x 2 chroma
  subsampling, which bleeds a saturated ink's colour a few pixels into its
  neighbours and desaturates thin strokes) comes from the slide writer's YCbCr JPEG.
* **Placement.** Strokes are drawn deterministically from the slide's seed; each is
  one of three kinds, in turn: on glass only, over tissue only, or crossing from glass
  onto tissue (found by rejection sampling against the slide's tissue field).

Stroke sizes are scaled to the slide (half widths of 1-3 % of its short side, at least
12 px) so that a 2-3k-px test slide holds several strokes and both whole-ink and
partly-inked 64-px tiles; real strokes at 0.5 um/px are far wider (0.5-2 mm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from wsi_xr.errors import InvalidArgumentError

__all__ = [
    "HELD_OUT_COLOURS",
    "INK_COLOURS",
    "INK_OD",
    "TUNING_COLOURS",
    "InkStroke",
    "check_colours",
    "ink_mask_region",
    "ink_od_region",
    "make_strokes",
]

#: Absorbance (natural-log optical density) per RGB channel of each marker ink at unit
#: density; the colour through glass lit at ~241 is given beside each. The first four
#: are the tuning colours, modelled on scanned markers; the rest are held out.
INK_OD: dict[str, tuple[float, float, float]] = {
    "blue": (1.35, 0.80, 0.20),  # (62, 108, 197) royal blue
    "green": (1.20, 0.45, 0.65),  # (73, 154, 126) teal-leaning green
    "red": (0.12, 1.10, 0.80),  # (214, 80, 108) pinkish red: OD_B / OD_G 0.73
    "black": (1.70, 1.55, 1.45),  # (44, 51, 56) bluish black
    "cyan": (1.30, 0.25, 0.35),  # (66, 188, 170)
    "navy": (1.55, 1.30, 0.60),  # (51, 66, 132)
    "orange": (0.05, 0.70, 1.50),  # (229, 120, 54)
    "violet": (0.80, 1.35, 0.45),  # (108, 62, 154): absorbs like haematoxylin + eosin
    "pink": (0.10, 0.95, 0.50),  # (218, 93, 146): absorbs like eosin
}
#: The colours a pen rule may be tuned on; strokes cycle through them by default.
TUNING_COLOURS: tuple[str, ...] = ("blue", "green", "red", "black")
#: Colours for checking a rule on inks it was not tuned on.
HELD_OUT_COLOURS: tuple[str, ...] = ("cyan", "navy", "orange", "violet", "pink")
#: Every colour, tuning colours first.
INK_COLOURS: tuple[str, ...] = tuple(INK_OD)
#: Stroke kinds, in the order strokes cycle through them.
_KINDS = ("glass", "tissue", "crossing")
#: Range of a stroke's soft border (pixels from 0 to full ink): out of focus on the coverslip.
_EDGE_RANGE = (3.0, 14.0)
#: Range of a stroke's mean density (faint to heavy).
_DENSITY_RANGE = (0.4, 1.3)
#: Distance between centre-line points (pixels).
_SPACING = 6.0
#: Rejection-sampling attempts per stroke before the last candidate is kept.
_TRIES = 300


def check_colours(colours: Sequence[str] | None) -> tuple[str, ...]:
    """The ink colours to draw: ``None`` gives :data:`TUNING_COLOURS`.

    Raises
    ------
    InvalidArgumentError
        If ``colours`` is empty, a bare string, or names a colour not in :data:`INK_OD`.
    """
    if colours is None:
        return TUNING_COLOURS
    if isinstance(colours, str) or not len(colours):
        raise InvalidArgumentError(f"pen colours {colours!r}: give a non-empty list of colours from {list(INK_COLOURS)}")
    unknown = [c for c in colours if c not in INK_OD]
    if unknown:
        raise InvalidArgumentError(f"pen colours {unknown}: not an ink; choose from {list(INK_COLOURS)}")
    return tuple(colours)


@dataclass(frozen=True, eq=False)
class InkStroke:
    """One marker stroke.

    Attributes
    ----------
    points : numpy.ndarray
        ``float64 (n, 2)`` centre line, level-0 ``(x, y)``; ``n >= 2``.
    half_width : float
        Pixels from the centre line to the stroke's edge (the truth boundary).
    od : numpy.ndarray
        ``float32 (3,)`` absorbance per RGB channel at the stroke's mean density.
    colour : str
        One of :data:`INK_COLOURS`.
    kind : str
        ``"glass"``, ``"tissue"`` or ``"crossing"``: where it was placed.
    edge : float
        Width of the soft (out-of-focus) border, pixels, centred on the truth boundary.
    streak_period, streak_phase, fade_period, fade_phase : float
        Parameters of the density variation (pixels, radians).
    mottle : numpy.ndarray
        ``float64 (3, 3)``: wavelength (px), direction (radians) and phase of three plane
        waves whose sum makes the blotchy drying pattern.
    """

    points: np.ndarray
    half_width: float
    od: np.ndarray
    colour: str
    kind: str
    edge: float
    streak_period: float
    streak_phase: float
    fade_period: float
    fade_phase: float
    mottle: np.ndarray

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of every pixel the stroke can touch."""
        reach = self.half_width + self.edge
        (x0, y0), (x1, y1) = self.points.min(axis=0), self.points.max(axis=0)
        return x0 - reach, y0 - reach, x1 + reach, y1 + reach


def _resample(points: np.ndarray) -> np.ndarray:
    """The polyline through ``points`` re-sampled at about :data:`_SPACING` px."""
    steps = np.hypot(*np.diff(points, axis=0).T)
    length = np.concatenate([[0.0], np.cumsum(steps)])
    n = max(2, int(math.ceil(length[-1] / _SPACING)) + 1)
    at = np.linspace(0.0, length[-1], n)
    return np.stack([np.interp(at, length, points[:, 0]), np.interp(at, length, points[:, 1])], axis=1)


def _candidate(rng: np.random.Generator, width: int, height: int, scale: float) -> tuple[np.ndarray, float]:
    """A random centre line and half width anywhere on the slide."""
    half_width = max(12.0, scale * rng.uniform(0.01, 0.03))
    shape = rng.choice(3, p=(0.45, 0.4, 0.15))
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    if shape == 0:  # part of an ellipse: a region circled on the slide
        rx, ry = scale * rng.uniform(0.12, 0.35, 2)
        tilt, start = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
        t = start + np.linspace(0.0, rng.uniform(0.6, 1.6) * math.pi, 64)
        x, y = rx * np.cos(t), ry * np.sin(t)
        points = np.stack([cx + x * math.cos(tilt) - y * math.sin(tilt), cy + x * math.sin(tilt) + y * math.cos(tilt)], 1)
    elif shape == 1:  # a gently bent line (quadratic Bezier)
        length, angle = scale * rng.uniform(0.2, 0.6), rng.uniform(0, 2 * math.pi)
        ends = np.array([[math.cos(angle), math.sin(angle)]]) * np.array([[-0.5], [0.5]]) * length
        bend = np.array([-math.sin(angle), math.cos(angle)]) * length * rng.uniform(-0.3, 0.3)
        t = np.linspace(0.0, 1.0, 48)[:, None]
        points = np.array([cx, cy]) + (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * bend + t**2 * ends[1]
    else:  # a dot: a short dab of the tip
        half_width *= rng.uniform(1.2, 2.0)
        angle = rng.uniform(0, 2 * math.pi)
        step = half_width * rng.uniform(0.1, 0.6)
        points = np.array([[cx, cy], [cx + step * math.cos(angle), cy + step * math.sin(angle)]])
    return _resample(points), float(half_width)


def _where(points: np.ndarray, half_width: float, is_tissue: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Tissue (True) or glass (False) under a stroke: its centre line and two rings around it."""
    angles = np.linspace(0.0, 2 * math.pi, 8, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    offsets = np.concatenate([[[0.0, 0.0]], ring * half_width * 0.5, ring * half_width])
    probes = (points[:, None, :] + offsets[None]).reshape(-1, 2)
    return np.asarray(is_tissue(probes[:, 0], probes[:, 1]), dtype=bool)


def make_strokes(
    rng: np.random.Generator,
    width: int,
    height: int,
    count: int,
    is_tissue: Callable[[np.ndarray, np.ndarray], np.ndarray],
    colours: Sequence[str] | None = None,
) -> tuple[InkStroke, ...]:
    """``count`` strokes for a ``width`` x ``height`` slide, deterministically from ``rng``.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness.
    width, height : int
        Level-0 slide size.
    count : int
        Number of strokes.
    is_tissue : callable
        ``is_tissue(x, y)`` -> bool array: whether level-0 points lie on tissue.
    colours : sequence of str or None
        Inks to cycle through (names of :data:`INK_OD`); ``None``: :data:`TUNING_COLOURS`.

    Returns
    -------
    tuple of InkStroke
        Colours cycle through ``colours`` and kinds through glass / tissue /
        crossing, each from a random start. A stroke whose kind cannot be found in
        :data:`_TRIES` attempts (e.g. no tissue at all) keeps its last candidate.
    """
    palette = check_colours(colours)
    scale = float(min(width, height))
    colour_start, kind_start = (int(v) for v in rng.integers(0, 12, 2))
    strokes = []
    for i in range(count):
        colour = palette[(colour_start + i) % len(palette)]
        kind = _KINDS[(kind_start + i) % len(_KINDS)]
        for _ in range(_TRIES):
            points, half_width = _candidate(rng, width, height, scale)
            inside = (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
            if not inside.all():
                continue
            on = _where(points, half_width, is_tissue)
            if (kind == "glass" and not on.any()) or (kind == "tissue" and on.all()):
                break
            if kind == "crossing" and 0.25 <= on.mean() <= 0.75:
                break
        jitter = 1.0 + 0.06 * rng.standard_normal(3)
        density = rng.uniform(*_DENSITY_RANGE)
        od = (np.asarray(INK_OD[colour]) * jitter * density).astype(np.float32)
        strokes.append(
            InkStroke(
                points=points,
                half_width=half_width,
                od=od,
                colour=colour,
                kind=kind,
                edge=float(rng.uniform(*_EDGE_RANGE)),
                streak_period=float(rng.uniform(5.0, 9.0)),
                streak_phase=float(rng.uniform(0, 2 * math.pi)),
                fade_period=float(rng.uniform(300.0, 900.0)),
                fade_phase=float(rng.uniform(0, 2 * math.pi)),
                mottle=np.stack([rng.uniform(20.0, 80.0, 3), rng.uniform(0, math.pi, 3), rng.uniform(0, 2 * math.pi, 3)]),
            )
        )
    return tuple(strokes)


def _geometry(stroke: InkStroke, x0: int, y0: int, width: int, height: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """Distance to the centre line, signed offset across it and arc length along it.

    Computed only in the part of the region the stroke can reach: returns that
    window (row and column slices into the region) and three ``float32`` arrays of its
    shape, for the pixel centres; ``None`` when the stroke cannot touch the region.
    Pixels of the window farther than the stroke's reach may have distance ``inf``.
    """
    bx0, by0, bx1, by1 = stroke.bounds
    left, right = max(int(math.floor(bx0)), x0), min(int(math.ceil(bx1)) + 1, x0 + width)
    top, bottom = max(int(math.floor(by0)), y0), min(int(math.ceil(by1)) + 1, y0 + height)
    if left >= right or top >= bottom:
        return None
    region = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
    x0, y0, width, height = left, top, right - left, bottom - top
    reach = stroke.half_width + stroke.edge
    distance = np.full((height, width), np.inf, dtype=np.float32)
    across = np.zeros((height, width), dtype=np.float32)
    along = np.zeros((height, width), dtype=np.float32)
    points = stroke.points
    starts = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(points, axis=0).T))])
    low = np.minimum(points[:-1], points[1:]) - reach
    high = np.maximum(points[:-1], points[1:]) + reach
    near = (high[:, 0] >= x0) & (low[:, 0] <= x0 + width) & (high[:, 1] >= y0) & (low[:, 1] <= y0 + height)
    for i in np.flatnonzero(near):
        (ax, ay), (bx, by) = points[i], points[i + 1]
        # pixels this segment can reach (a box whatever the region), clipped to the window
        c0 = max(int(math.floor(min(ax, bx) - reach)) - x0, 0)
        c1 = min(int(math.ceil(max(ax, bx) + reach)) - x0 + 1, width)
        r0 = max(int(math.floor(min(ay, by) - reach)) - y0, 0)
        r1 = min(int(math.ceil(max(ay, by) + reach)) - y0 + 1, height)
        if c0 >= c1 or r0 >= r1:
            continue
        px = (np.arange(x0 + c0, x0 + c1, dtype=np.float32) + np.float32(0.5) - np.float32(ax))[None, :]
        py = (np.arange(y0 + r0, y0 + r1, dtype=np.float32) + np.float32(0.5) - np.float32(ay))[:, None]
        dx, dy = np.float32(bx - ax), np.float32(by - ay)
        length2 = max(float(dx * dx + dy * dy), 1e-12)
        t = np.clip((px * dx + py * dy) / np.float32(length2), 0.0, 1.0)
        ex, ey = px - t * dx, py - t * dy
        d = np.sqrt(ex * ex + ey * ey)
        window = distance[r0:r1, c0:c1]
        closer = d < window
        window[closer] = d[closer]
        side = (px * dy - py * dx) / np.float32(math.sqrt(length2))
        across[r0:r1, c0:c1][closer] = np.broadcast_to(side, d.shape)[closer]
        along[r0:r1, c0:c1][closer] = (np.float32(starts[i]) + t * np.float32(math.sqrt(length2)))[closer]
    return region, distance, across, along


def ink_mask_region(strokes: tuple[InkStroke, ...], x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Ground truth: bool ``(height, width)``, True where a pixel centre is inside a stroke."""
    mask = np.zeros((height, width), dtype=bool)
    for stroke in strokes:
        geometry = _geometry(stroke, x0, y0, width, height)
        if geometry is not None:
            window, distance = geometry[0], geometry[1]
            mask[window] |= distance <= np.float32(stroke.half_width)
    return mask


def ink_od_region(strokes: tuple[InkStroke, ...], x0: int, y0: int, width: int, height: int) -> np.ndarray | None:
    """Ink absorbance ``float32 (3, height, width)`` of a region, or ``None`` if it has none.

    The density of a stroke at a pixel is its soft coverage (0 to 1 across the stroke's
    out-of-focus border, centred on the truth boundary) times +-12 % streaks across the
    stroke (two incommensurate sines), ``1 - 0.1 (1 + sin)`` slow fading along it, a
    +-10 % mottle (three plane waves of 20-80 px in the slide's frame) and up to +30 %
    pooling at its edges; strokes add.
    """
    total: np.ndarray | None = None
    for stroke in strokes:
        geometry = _geometry(stroke, x0, y0, width, height)
        if geometry is None:
            continue
        window, distance, across, along = geometry
        hw = np.float32(stroke.half_width)
        coverage = np.clip((hw - distance) / np.float32(stroke.edge) + np.float32(0.5), 0.0, 1.0)
        if not coverage.any():
            continue
        phase = across * np.float32(2 * math.pi / stroke.streak_period) + np.float32(stroke.streak_phase)
        streaks = 1.0 + 0.07 * np.sin(phase) + 0.05 * np.sin(phase * np.float32(0.618) + np.float32(1.3))
        fade = 1.0 - 0.1 * (1.0 + np.sin(along * np.float32(2 * math.pi / stroke.fade_period) + np.float32(stroke.fade_phase)))
        pooling = 1.0 + 0.3 * np.minimum(np.abs(across) / hw, 1.0) ** 6
        rows, cols = window
        py = (np.arange(y0 + rows.start, y0 + rows.stop, dtype=np.float32) + np.float32(0.5))[:, None]
        px = (np.arange(x0 + cols.start, x0 + cols.stop, dtype=np.float32) + np.float32(0.5))[None, :]
        mottle = np.zeros_like(coverage)
        for wavelength, angle, wave_phase in stroke.mottle.T:
            k = np.float32(2 * math.pi / wavelength)
            mottle += np.sin(px * (k * np.float32(math.cos(angle))) + py * (k * np.float32(math.sin(angle))) + np.float32(wave_phase))
        blotches = 1.0 + np.float32(0.1 / 3) * mottle
        density = (coverage * streaks * fade * pooling * blotches).astype(np.float32)
        if total is None:
            total = np.zeros((3, height, width), dtype=np.float32)
        total[(slice(None), *window)] += stroke.od[:, None, None] * density[None]
    return total
