"""OpenSlide reader: every format OpenSlide knows (MRXS, DICOM, NDPI, SCN, BIF, VMS, ...).

``backend="auto"`` takes it only for files that cuCIM and tifffile cannot read exactly
(see :mod:`wsi_xr.readers.backends`); it can also be asked for by name for any file
OpenSlide reads with the same levels as the probe saw.

Three things make OpenSlide's ``read_region`` differ from a plain window read, and this
reader handles each:

- **Level-0 locations, level sizes.** ``read_region(location, level, size)`` takes the
  top-left corner in level-0 pixels and divides it by the level's (floating-point)
  downsample. When the quotient is not a whole level pixel, OpenSlide (through cairo)
  *resamples* the level by that fraction of a pixel: the pixels come out blended with
  their neighbours. A level pixel ``x`` is read exactly only from a location ``X`` with
  ``X / downsample`` within 1/1024 of ``x`` (cairo then snaps the offset to a whole pixel).
  For integer downsamples (MRXS, VMS and most pyramids) ``X = x * downsample`` always
  works. Otherwise the read starts at the nearest *anchor* at or before ``x`` that maps
  exactly (at most :data:`MAX_LOOKBACK` level pixels earlier) and the extra columns/rows
  are cropped; a window with no anchor that close raises :class:`SlideReadError` rather
  than returning resampled pixels.
- **Large regions.** OpenSlide splits regions over 4096 px itself and places the later
  pieces with a truncated (inexact) location, so windows are read in pieces of at most
  :data:`PIECE` level pixels, each placed exactly.
- **Alpha.** OpenSlide returns RGBA: areas with no scanned data (outside the scanned
  regions of MRXS or sparse DICOM slides, gaps between Leica/Ventana images) are
  transparent. wsi_xr returns RGB, so transparent pixels are filled with the slide's
  background colour (OpenSlide's ``openslide.background-color`` property, else white):
  brightfield background is bright, so unscanned glass is never mistaken for tissue and
  the tissue mask sees no variance there. Partly transparent pixels (edges of
  sub-pixel-positioned fields) are composited over that colour. Opaque pixels, i.e.
  everywhere the file has data, are returned unchanged.

Errors: OpenSlide latches errors: after one ``OpenSlideError`` the handle fails every later
call. Such a read raises :class:`~wsi_xr.errors.SlideReadError` naming the file and
window, marks the reader unusable and drops it from this process's handle cache, so the
next read reopens the file (and fails again, clearly, if the data really are damaged).
OpenSlide never returns zeros silently: ``openslide-python`` raises after every failed call.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from wsi_xr.errors import SlideOpenError, SlideReadError
from wsi_xr.readers.base import ReaderKey
from wsi_xr.readers.probe import SlideInfo

__all__ = ["MAX_LOOKBACK", "PIECE", "OpenSlideReader", "exact_location", "plan_axis"]

#: Longest side (level pixels) of one OpenSlide call; OpenSlide splits larger regions
#: itself and places the pieces after the first at inexact locations.
PIECE = 4096
#: How many level pixels before a window a read may start to find a location that maps
#: exactly onto a level pixel (levels whose OpenSlide downsample is not an integer).
MAX_LOOKBACK = 2048
#: Largest ``|X / downsample - x|`` (level pixels) that cairo snaps to a whole pixel
#: (it rounds offsets to 1/256 px; half of that, with a factor 2 of margin).
_SNAP = 1.0 / 1024.0


def exact_location(x: int, downsample: float) -> int | None:
    """The level-0 location that OpenSlide maps exactly onto level pixel ``x``, or None.

    OpenSlide computes the level position as ``X / downsample`` in double precision;
    it is exact when that lies within :data:`_SNAP` of ``x``.
    """
    location = int(round(x * downsample))
    if abs(location / downsample - x) < _SNAP:
        return location
    return None


def plan_axis(start: int, size: int, downsample: float) -> list[tuple[int, int, int]]:
    """Split ``[start, start + size)`` of one level axis into exactly placed OpenSlide reads.

    Returns ``(location, first, count)`` triples: read ``count`` level pixels from the
    level-0 ``location``, which maps exactly onto level pixel ``first`` (``first <=`` the
    part of the window the read is for; pixels before it are cropped). Together they
    cover the span in order.

    Raises
    ------
    ValueError
        No exactly mapped location lies within :data:`MAX_LOOKBACK` pixels before a
        piece's start (only on levels whose downsample is not an integer).
    """
    end = start + size
    cursor = start
    plan: list[tuple[int, int, int]] = []
    while cursor < end:
        location = exact_location(cursor, downsample)
        first = cursor
        if location is None:
            first, location = _anchor(cursor, downsample)
        count = min(first + PIECE, end) - first
        plan.append((location, first, count))
        cursor = first + count
    return plan


def _anchor(x: int, downsample: float) -> tuple[int, int]:
    """The nearest level pixel at or before ``x`` that OpenSlide places exactly, and its location."""
    candidates = np.arange(x, max(-1, x - MAX_LOOKBACK - 1), -1, dtype=np.int64)
    locations = np.rint(candidates * downsample)
    good = np.flatnonzero(np.abs(locations / downsample - candidates) < _SNAP)
    if good.size == 0:
        raise ValueError(f"no level-0 location within {MAX_LOOKBACK} px before level pixel {x} maps onto a whole pixel at downsample {downsample!r}")
    first = int(candidates[good[0]])
    return first, int(locations[good[0]])


def _background(properties: Any) -> np.ndarray:
    """The slide's background colour (``openslide.background-color``, hex RRGGBB), else white."""
    value = str(properties.get("openslide.background-color", "") or "")
    try:
        if len(value) == 6:
            return np.array([int(value[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint16)
    except ValueError:
        pass
    return np.array([255, 255, 255], dtype=np.uint16)


class OpenSlideReader:
    """Reads windows with ``openslide.OpenSlide.read_region``, pixel-exact in level pixels.

    Parameters
    ----------
    info
        The probe of the file. OpenSlide must see the same levels (sizes) as the probe.

    Raises
    ------
    SlideOpenError
        OpenSlide cannot open the file, or sees other levels than the probe.
    """

    name: ClassVar[str] = "openslide"

    def __init__(self, info: SlideInfo) -> None:
        import openslide  # imported here: only files read by OpenSlide need it

        self.info = info
        self._errors: tuple[type[BaseException], ...] = (openslide.OpenSlideError,)
        try:
            slide = openslide.OpenSlide(info.path)
        except openslide.OpenSlideError as err:
            raise SlideOpenError(
                f"{info.path}: OpenSlide cannot open the file ({err}). Check that it is complete "
                "(MRXS: the folder of .dat files beside the .mrxs; DICOM: every file of the series "
                "in one folder) or copy it again from its source."
            ) from err
        sizes = tuple((lv.width, lv.height) for lv in info.levels)
        if tuple(slide.level_dimensions) != sizes:
            raise SlideOpenError(
                f"{info.path}: OpenSlide sees levels {list(slide.level_dimensions)} but the probe found {list(sizes)}; read it with backend='auto'."
            )
        self._slide: Any = slide
        self._downsamples = tuple(float(d) for d in slide.level_downsamples)
        self._background = _background(slide.properties)
        #: False once OpenSlide has failed on this handle (its errors latch).
        self.usable = True

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode the window ``[y:y+height, x:x+width]`` of ``level`` as uint8 RGB."""
        slide = self._slide  # a local reference keeps the handle alive during the read
        if slide is None or not self.usable:
            raise SlideReadError(
                f"{self.info.path}: this OpenSlide handle failed earlier or was closed; open the slide again (wsi_xr reopens it on the next read)."
            )
        downsample = self._downsamples[level]
        try:
            rows = plan_axis(y, height, downsample)
            cols = plan_axis(x, width, downsample)
        except ValueError as err:
            raise SlideReadError(
                f"{self.info.path}: level {level} cannot be read pixel-exactly with OpenSlide at window "
                f"y={y} x={x} {height}x{width}: OpenSlide's downsample for it is {downsample!r}, not an "
                f"integer, so it resamples most windows by a fraction of a pixel ({err}). Read level 0 "
                "or a level with an integer downsample, or another backend if the file allows one."
            ) from err
        out = np.empty((height, width, 3), dtype=np.uint8)
        for location_y, first_y, count_y in rows:
            for location_x, first_x, count_x in cols:
                try:
                    region = slide.read_region((location_x, location_y), level, (count_x, count_y))
                except self._errors as err:
                    self._fail()
                    raise SlideReadError(
                        f"{self.info.path}: OpenSlide failed reading level {level} window y={y} x={x} "
                        f"{height}x{width} ({type(err).__name__}: {err}). The slide data there are "
                        "probably damaged or missing; copy the slide again from its source."
                    ) from err
                rgba = np.asarray(region)
                top, left = max(y, first_y), max(x, first_x)
                part = rgba[top - first_y :, left - first_x :]
                out[top - y : top - y + part.shape[0], left - x : left - x + part.shape[1]] = self._rgb(part)
        return out

    def _rgb(self, rgba: np.ndarray) -> np.ndarray:
        """RGB of OpenSlide's (un-premultiplied) RGBA: opaque pixels unchanged, others over the background."""
        alpha = rgba[..., 3]
        if (alpha == 255).all():
            return rgba[..., :3]
        a = alpha[..., None].astype(np.uint16)
        mixed = (rgba[..., :3].astype(np.uint16) * a + self._background * (255 - a) + 127) // 255
        return mixed.astype(np.uint8)

    def _fail(self) -> None:
        """Mark the handle unusable (OpenSlide errors latch) and drop it from the handle cache."""
        self.usable = False
        from wsi_xr.readers.windows import handle_cache  # here: windows imports the registry

        handle_cache.evict(ReaderKey(self.info.path, self.info.file_size, self.info.mtime_ns, self.name))

    def close(self) -> None:
        """Drop the handle; OpenSlide closes it once no read in flight still uses it."""
        self._slide = None
