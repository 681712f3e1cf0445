"""Slide readers: a safe probe, a cuCIM backend, a tifffile fallback, one interface.

Use :func:`probe` to learn about a file, :func:`choose_backend` to pick a reader, and
:func:`read_window` (what every Dask task calls) to decode a window through this
process's handle cache.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from wsi_xr.errors import InvalidArgumentError, SlideReadError, WsiXrError
from wsi_xr.readers.base import (
    HandleCache,
    Reader,
    ReaderKey,
    ReadStats,
    decoded_pixels,
    read_stats,
    record_read,
    reset_read_stats,
)
from wsi_xr.readers.integrity import SegmentGrid, scan_level
from wsi_xr.readers.probe import LevelInfo, SlideInfo, check_path, probe

__all__ = [
    "BACKENDS",
    "DAMAGED_POLICIES",
    "LevelInfo",
    "ReadStats",
    "Reader",
    "ReaderKey",
    "SlideInfo",
    "SegmentGrid",
    "check_path",
    "damaged_segments",
    "choose_backend",
    "handle_cache",
    "open_reader",
    "probe",
    "read_stats",
    "read_window",
    "reader_key",
    "reset_read_stats",
]

#: Accepted values of every ``backend=`` argument.
BACKENDS = ("auto", "cucim", "tifffile")

#: Open readers of this process (one per file version and backend).
handle_cache = HandleCache()


def choose_backend(info: SlideInfo, backend: str = "auto") -> str:
    """The backend that will read ``info``'s file.

    ``"auto"`` takes cuCIM when the probe found the file safe for it, else tifffile.
    Asking for ``"cucim"`` on a file cuCIM cannot read safely is an error, not a crash.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "cucim" if info.cucim_safe else "tifffile"
    if backend == "cucim" and not info.cucim_safe:
        raise InvalidArgumentError(
            f"{info.path}: cuCIM cannot read this file safely ({info.cucim_unsafe_reason}); "
            "use backend='auto' or 'tifffile'."
        )
    return backend


def reader_key(info: SlideInfo, backend: str) -> ReaderKey:
    """The picklable key that tasks carry instead of a reader."""
    return ReaderKey(info.path, info.file_size, info.mtime_ns, backend)


def open_reader(key: ReaderKey) -> Reader:
    """Open a reader for ``key`` (probing the file again in this process)."""
    info = probe(key.path)
    if (info.file_size, info.mtime_ns) != (key.file_size, key.mtime_ns):
        raise SlideReadError(
            f"{key.path}: the file changed on disk after it was opened (size or modification "
            "time differ). Open it again so that every read sees the same file."
        )
    if key.backend == "cucim":
        from wsi_xr.readers.cucim_backend import CuCIMReader

        return CuCIMReader(info)
    from wsi_xr.readers.tifffile_backend import TifffileReader

    return TifffileReader(info)


def get_reader(key: ReaderKey) -> Reader:
    """The cached reader for ``key`` in this process."""
    return handle_cache.get(key, open_reader)


_grids: dict[tuple[ReaderKey, int], SegmentGrid] = {}
_grids_lock = threading.Lock()

#: Accepted values of ``damaged=``: raise on damaged tiles, or fill them with zeros.
DAMAGED_POLICIES = ("raise", "fill")


def damaged_segments(key: ReaderKey, level: int) -> SegmentGrid:
    """The tile-integrity grid of ``level`` (scanned once per process and file version)."""
    with _grids_lock:
        grid = _grids.get((key, level))
    if grid is None:
        grid = scan_level(key.path, level)
        with _grids_lock:
            _grids[(key, level)] = grid
    return grid


def read_window(
    key: ReaderKey,
    level: int,
    y: int,
    x: int,
    height: int,
    width: int,
    *,
    device: str = "cpu",
    damaged: str = "raise",
) -> Any:
    """Decode ``[y:y+height, x:x+width]`` of ``level`` as uint8 RGB; counts the read.

    Damaged TIFF tiles (see :mod:`wsi_xr.readers.integrity`) never reach the decoder:
    with ``damaged="raise"`` the read fails with :class:`SlideReadError` naming them;
    with ``damaged="fill"`` their pixels are zeros and the caller is expected to flag
    them (the tissue mask reports them in ``read_error``).
    ``device="cuda"`` returns a CuPy array (decoded on the CPU, copied to the GPU).
    """
    if damaged not in DAMAGED_POLICIES:
        raise InvalidArgumentError(f"damaged={damaged!r}: use one of {DAMAGED_POLICIES}.")
    try:
        reader = get_reader(key)
    except WsiXrError:
        raise
    except Exception as err:  # e.g. cuCIM's ValueError "Cannot load ..." on a damaged IFD
        raise SlideReadError(
            f"{key.path}: {key.backend} cannot open the file ({type(err).__name__}: {err}). The TIFF "
            "structure is probably damaged; copy the slide again from its source."
        ) from err
    lv: LevelInfo = reader.info.levels[level]  # type: ignore[attr-defined]
    if y < 0 or x < 0 or height <= 0 or width <= 0 or y + height > lv.height or x + width > lv.width:
        raise InvalidArgumentError(
            f"{key.path}: window y={y} x={x} {height}x{width} is outside level {level} "
            f"({lv.height}x{lv.width})."
        )
    grid = damaged_segments(key, level)
    bad = grid.window(y, x, height, width)
    try:
        if bad.any():
            if damaged == "raise":
                rows, cols = np.nonzero(bad)
                first = (int(rows[0]) + y // grid.seg_h, int(cols[0]) + x // grid.seg_w)
                raise SlideReadError(
                    f"{key.path}: level {level} has {int(bad.sum())} damaged tile(s) in window y={y} x={x} "
                    f"{height}x{width} (first: tile row {first[0]}, column {first[1]}: {grid.reasons[first]}). "
                    "Their pixels cannot be trusted; wsi_xr.tissue_mask and `wsi-xr run` report such "
                    "tiles in `read_error`, or re-export the slide from its source."
                )
            pixels = _read_around_damage(reader, grid, level, y, x, height, width)
            if device == "cuda":
                import cupy

                pixels = cupy.asarray(pixels)
        elif device == "cuda":  # CPU decode, then one host-to-device copy (see cucim_backend)
            import cupy

            pixels = cupy.asarray(reader.read(level, y, x, height, width))
        else:
            pixels = reader.read(level, y, x, height, width)
    except SlideReadError:
        raise
    except Exception as err:
        raise SlideReadError(
            f"{key.path}: could not decode level {level} window y={y} x={x} {height}x{width} "
            f"with {key.backend} ({type(err).__name__}: {err})."
        ) from err
    record_read(height * width, decoded_pixels(y, x, height, width, lv.tile_height, lv.tile_width, lv.height, lv.width))
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8:
        raise SlideReadError(
            f"{key.path}: {key.backend} returned {pixels.shape} {pixels.dtype} for a "
            f"{height}x{width} window of level {level}; expected uint8 RGB."
        )
    return pixels


def _read_around_damage(reader: Reader, grid: SegmentGrid, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
    """Decode only the sound segments of a window; damaged ones stay zero."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    i0, j0 = y // grid.seg_h, x // grid.seg_w
    for (di, dj), is_bad in np.ndenumerate(grid.window(y, x, height, width)):
        if is_bad:
            continue
        top, left = max(y, (i0 + di) * grid.seg_h), max(x, (j0 + dj) * grid.seg_w)
        bottom = min(y + height, (i0 + di + 1) * grid.seg_h)
        right = min(x + width, (j0 + dj + 1) * grid.seg_w)
        out[top - y : bottom - y, left - x : right - x] = reader.read(level, top, left, bottom - top, right - left)
    return out
