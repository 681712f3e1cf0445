"""Decoding windows of a level: what every Dask read task calls.

:func:`read_window` finds this process's reader for a :class:`ReaderKey` (a small LRU of
open handles), never hands a damaged TIFF tile to the decoder, and can decode only part
of a window: the TIFF tiles marked *wanted* (the coarse pass's "may hold tissue"), in
one reader call per rectangle of wanted tiles. Pixels it does not decode are zeros.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from wsi_xr._logging import third_party_logs
from wsi_xr.errors import InvalidArgumentError, SlideReadError, WsiXrError
from wsi_xr.readers.backends import reader_class
from wsi_xr.readers.base import DecoderComplaint, HandleCache, Reader, ReaderKey, decoded_pixels, record_read
from wsi_xr.readers.integrity import SegmentGrid, scan_level
from wsi_xr.readers.probe import LevelInfo, SlideInfo, probe

__all__ = [
    "DAMAGED_POLICIES",
    "DecodedWindow",
    "clear_caches",
    "damaged_segments",
    "get_reader",
    "handle_cache",
    "level_damage",
    "open_reader",
    "read_window",
    "trace_reads",
    "unpack_window",
    "window_rectangles",
]

#: Accepted values of ``damaged=``: raise on damaged tiles, fill them with zeros, or fill
#: them and report where the decoder failed (:class:`DecodedWindow`).
DAMAGED_POLICIES = ("raise", "fill", "report")


@dataclass(frozen=True)
class DecodedWindow:
    """A window read with ``damaged="report"``: its pixels and where decoding failed.

    ``failed`` holds ``(y, x, height, width)`` rectangles in the window's own pixels: file
    tiles that passed the structural scan, yet the decoder reported an error while decoding
    them (their pixels are zero here, never the wrong pixels it returned). ``messages`` are
    the decoder's words. Structurally damaged tiles are not listed: the caller has them from
    the damage grid.
    """

    pixels: Any
    failed: tuple[tuple[int, int, int, int], ...] = ()
    messages: tuple[str, ...] = ()


def unpack_window(block: Any) -> tuple[Any, tuple[tuple[int, int, int, int], ...]]:
    """``(pixels, failed rectangles)`` of a block read with ``damaged="report"`` (or of plain pixels)."""
    if isinstance(block, DecodedWindow):
        return block.pixels, block.failed
    return block, ()


#: Open readers of this process (one per file version and backend).
handle_cache = HandleCache()


def open_reader(key: ReaderKey, info: SlideInfo | None = None) -> Reader:
    """Open a reader for ``key``, from the caller's probe ``info`` when given (else probe here).

    Either way the file on disk must still be the one the key names (size and mtime).
    """
    if info is None or info.path != key.path:
        info = probe(key.path)
    else:
        import os

        stat = os.stat(key.path)
        info = info if (stat.st_size, stat.st_mtime_ns) == (info.file_size, info.mtime_ns) else probe(key.path)
    if (info.file_size, info.mtime_ns) != (key.file_size, key.mtime_ns):
        raise SlideReadError(
            f"{key.path}: the file changed on disk after it was opened (size or modification "
            "time differ). Open it again so that every read sees the same file."
        )
    return reader_class(key.backend)(info)  # type: ignore[call-arg]


def get_reader(key: ReaderKey, info: SlideInfo | None = None) -> Reader:
    """The cached reader for ``key`` in this process (opened from ``info`` when given: no new probe)."""
    try:
        return handle_cache.get(key, lambda k: open_reader(k, info))
    except WsiXrError:
        raise
    except Exception as err:  # e.g. cuCIM's ValueError "Cannot load ..." on a damaged IFD
        raise SlideReadError(
            f"{key.path}: {key.backend} cannot open the file ({type(err).__name__}: {err}). The file "
            "structure is probably damaged; copy the slide again from its source."
        ) from err


#: Segment side of the damage grid of a level whose file tile size is unknown.
DEFAULT_SEGMENT = 256


@third_party_logs()
def level_damage(info: SlideInfo, level: int) -> SegmentGrid:
    """The damage grid of one level: which of its file tiles must not be decoded.

    - Files tifffile reads (Aperio SVS, Philips TIFF, OME-TIFF including levels in
      SubIFDs, generic TIFF): every TIFF tile (or strip) is checked from the file
      structure (:func:`wsi_xr.readers.integrity.scan_level`): data present, inside the
      file, a well-formed JPEG stream.
    - Formats read by OpenSlide (MRXS, DICOM, NDPI, SCN, BIF, VMS, ...) have no
      structural scan here: the grid has the file's tile size (else
      :data:`DEFAULT_SEGMENT`) and flags nothing. Damage there shows when the pixels are
      decoded: OpenSlide fails and the read raises :class:`SlideReadError`. Tiles that a
      format may leave out (sparse MRXS/DICOM) come back as background, indistinguishable
      from unscanned glass.
    """
    lv = info.levels[level]
    if info.problem("tifffile") is None:
        return scan_level(info.path, level)
    seg_h = lv.tile_height if lv.tile_height > 0 else DEFAULT_SEGMENT
    seg_w = lv.tile_width if lv.tile_width > 0 else DEFAULT_SEGMENT
    damaged = np.zeros((-(-lv.height // seg_h), -(-lv.width // seg_w)), dtype=bool)
    return SegmentGrid(seg_h, seg_w, damaged, {})


#: Damage scans of this process, by file version and level: a bounded cache (least recently used dropped).
_grids: OrderedDict[tuple[str, int, int, int], SegmentGrid] = OrderedDict()
_grids_lock = threading.Lock()
GRID_CACHE_SIZE = 64


def damaged_segments(key: ReaderKey, level: int) -> SegmentGrid:
    """The tile-integrity grid of ``level``, scanned at most once per process and file version.

    Prefer :meth:`wsi_xr.readers.OpenedSlide.damage`, which scans once in the client and
    travels with the read tasks; this cache serves tasks that were not given a grid.
    """
    cache_key = (key.path, key.file_size, key.mtime_ns, level)
    with _grids_lock:
        grid = _grids.get(cache_key)
        if grid is not None:
            _grids.move_to_end(cache_key)
    if grid is None:
        grid = level_damage(probe(key.path), level)
        with _grids_lock:
            _grids[cache_key] = grid
            while len(_grids) > GRID_CACHE_SIZE:
                _grids.popitem(last=False)
    return grid


def clear_caches() -> None:
    """Close this process's readers and forget its damage scans (as in a fresh process)."""
    from wsi_xr.readers.integrity import clear_header_cache

    handle_cache.clear()
    with _grids_lock:
        _grids.clear()
    clear_header_cache()


_trace: list[tuple[int, int, int, int, int]] | None = None
_trace_lock = threading.Lock()


@contextlib.contextmanager
def trace_reads() -> Iterator[list[tuple[int, int, int, int, int]]]:
    """Record every decoder call of this process as ``(level, y, x, height, width)``.

    For tests and benchmarks that must prove which pixels were decoded, and how often.
    """
    global _trace
    with _trace_lock:
        _trace = []
        calls = _trace
    try:
        yield calls
    finally:
        with _trace_lock:
            _trace = None


def _decode(reader: Reader, lv: LevelInfo, y: int, x: int, height: int, width: int) -> np.ndarray:
    pixels = reader.read(lv.index, y, x, height, width)
    record_read(height * width, decoded_pixels(y, x, height, width, lv.tile_height, lv.tile_width, lv.height, lv.width))
    with _trace_lock:
        if _trace is not None:
            _trace.append((lv.index, y, x, height, width))
    return pixels


def window_rectangles(decode: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Cover the True cells of a 2-D bool grid with rectangles ``(row, col, rows, cols)``.

    Runs of True along each row are merged with identical runs of the rows below, so a
    block of wanted tiles is one rectangle (one reader call) and a ragged outline a few.
    """
    rectangles: list[tuple[int, int, int, int]] = []
    open_runs: dict[tuple[int, int], int] = {}  # (col, cols) -> first row
    for row in range(decode.shape[0] + 1):
        runs: set[tuple[int, int]] = set()
        if row < decode.shape[0]:
            line = np.concatenate(([False], decode[row], [False]))
            edges = np.flatnonzero(line[1:] != line[:-1])
            runs = {(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])}
        for run in [r for r in open_runs if r not in runs]:
            first = open_runs.pop(run)
            rectangles.append((first, run[0], row - first, run[1]))
        for run in runs:
            open_runs.setdefault(run, row)
    return sorted(rectangles)


def _read_batched(reader: Any, key: ReaderKey, lv: LevelInfo, y: int, x: int, height: int, width: int, decode: np.ndarray) -> Any:
    """Decode every wanted, sound TIFF tile of a window in one batched call (GPU backends)."""
    try:
        pixels, failed = reader.read_with_damage(lv.index, y, x, height, width, decode)
    except WsiXrError:
        raise
    except Exception as err:
        raise SlideReadError(
            f"{key.path}: could not decode level {lv.index} window y={y} x={x} {height}x{width} with {key.backend} ({type(err).__name__}: {err})."
        ) from err
    if failed:  # sound by the structural scan, yet no decoder could decode it: never score zeros
        raise SlideReadError(
            f"{key.path}: level {lv.index} window y={y} x={x} {height}x{width}: {len(failed)} TIFF tile(s) could "
            f"not be decoded ({failed[0].reason}). Try backend='cucim' or 'tifffile', or re-export the slide."
        )
    record_read(height * width, decoded_pixels(y, x, height, width, lv.tile_height, lv.tile_width, lv.height, lv.width))
    return pixels


@third_party_logs()  # tifffile's warnings inside become wsi_xr INFO records
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
    damage: SegmentGrid | None = None,
    wanted: np.ndarray | None = None,
    info: SlideInfo | None = None,
) -> Any:
    """Decode ``[y:y+height, x:x+width]`` of ``level`` as uint8 RGB; counts the reads.

    Parameters
    ----------
    key
        Which file and backend (see :func:`wsi_xr.readers.reader_key`).
    device
        ``"cuda"`` returns a CuPy array (decoded on the CPU, copied to the GPU once).
    damaged
        Damaged TIFF tiles never reach the decoder: ``"raise"`` fails with
        :class:`SlideReadError` naming them; ``"fill"`` leaves their pixels zero (the
        caller flags them, as the tissue mask does in ``read_error``); ``"report"`` fills
        them too and returns a :class:`DecodedWindow` saying which tiles the decoder
        reported errors in. A tile that passes the structural scan but makes the decoder
        report an error (damaged entropy-coded data, which cuCIM prints about instead of
        raising) is treated the same way: never returned with the pixels the decoder made up.
    damage
        The level's damage grid, when the caller already has it (no scan here);
        otherwise this process's cached scan.
    wanted
        Optional bool grid over the level's TIFF tiles (the shape of ``damage.damaged``):
        only wanted tiles are decoded, the rest of the window stays zero.
    info
        The file's probe, when the caller has it (an :class:`OpenedSlide` does): the
        reader is opened from it, without probing the file again.
    """
    if damaged not in DAMAGED_POLICIES:
        raise InvalidArgumentError(f"damaged={damaged!r}: use one of {DAMAGED_POLICIES}.")
    reader = get_reader(key, info)
    lv: LevelInfo = reader.info.levels[level]  # type: ignore[attr-defined]
    if y < 0 or x < 0 or height <= 0 or width <= 0 or y + height > lv.height or x + width > lv.width:
        raise InvalidArgumentError(f"{key.path}: window y={y} x={x} {height}x{width} is outside level {level} ({lv.height}x{lv.width}).")
    grid = damage if damage is not None else damaged_segments(key, level)
    bad = grid.window(y, x, height, width)
    if bad.any() and damaged == "raise":
        bad_rows, bad_cols = np.nonzero(bad)
        first = (int(bad_rows[0]) + y // grid.seg_h, int(bad_cols[0]) + x // grid.seg_w)
        raise SlideReadError(
            f"{key.path}: level {level} has {int(bad.sum())} damaged tile(s) in window y={y} x={x} "
            f"{height}x{width} (first: tile row {first[0]}, column {first[1]}: {grid.reasons.get(first, 'damaged')}). "
            "Their pixels cannot be trusted; wsi_xr.tissue_mask and `wsi-xr run` report such "
            "tiles in `read_error`, or re-export the slide from its source."
        )
    decode = ~bad
    if wanted is not None:
        i0, j0 = y // grid.seg_h, x // grid.seg_w
        decode = decode & wanted[i0 : i0 + bad.shape[0], j0 : j0 + bad.shape[1]]
    if hasattr(reader, "read_with_damage"):  # a batched GPU decoder: one call for the whole grid
        cast(Any, reader).use_damage(level, grid)  # the client's scan: the reader does not scan again
        return _read_batched(reader, key, lv, y, x, height, width, decode)
    failures: list[tuple[int, int, int, int, str]] = []  # level pixels (y, x, h, w) and the decoder's message
    try:
        if decode.all():
            pixels = _decode_checked(reader, key, lv, grid, y, x, height, width, failures)
        else:
            pixels = np.zeros((height, width, 3), dtype=np.uint8)
            i0, j0 = y // grid.seg_h, x // grid.seg_w
            for row, col, rows, cols in window_rectangles(decode):
                top, left = max(y, (i0 + row) * grid.seg_h), max(x, (j0 + col) * grid.seg_w)
                bottom = min(y + height, (i0 + row + rows) * grid.seg_h)
                right = min(x + width, (j0 + col + cols) * grid.seg_w)
                part = _decode_checked(reader, key, lv, grid, top, left, bottom - top, right - left, failures)
                pixels[top - y : bottom - y, left - x : right - x] = part
    except WsiXrError:
        raise
    except Exception as err:
        raise SlideReadError(
            f"{key.path}: could not decode level {level} window y={y} x={x} {height}x{width} with {key.backend} ({type(err).__name__}: {err})."
        ) from err
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8:
        raise SlideReadError(
            f"{key.path}: {key.backend} returned {pixels.shape} {pixels.dtype} for a {height}x{width} window of level {level}; expected uint8 RGB."
        )
    if failures and damaged == "raise":
        fy, fx, _, _, message = failures[0]
        raise SlideReadError(
            f"{key.path}: level {level}: the decoder reported errors in {len(failures)} tile(s) of window y={y} x={x} "
            f"{height}x{width} (first: the file tile at y={fy} x={fx}: {message.splitlines()[-1].strip()!r}). Their "
            "pixels cannot be trusted; wsi_xr.tissue_mask and `wsi-xr run` report such tiles in `read_error`, or "
            "re-export the slide from its source."
        )
    if device == "cuda" and isinstance(pixels, np.ndarray):  # CPU decode, then one host-to-device copy
        import cupy

        pixels = cupy.asarray(pixels)
    if damaged == "report":
        failed = tuple((fy - y, fx - x, fh, fw) for fy, fx, fh, fw, _ in failures)
        return DecodedWindow(pixels, failed, tuple(message for *_, message in failures))
    return pixels


def _decode_checked(
    reader: Reader,
    key: ReaderKey,
    lv: LevelInfo,
    grid: SegmentGrid,
    y: int,
    x: int,
    height: int,
    width: int,
    failures: list[tuple[int, int, int, int, str]],
) -> np.ndarray:
    """Decode a window; where the decoder complains, find the file tiles it complains about and zero them.

    Each file tile of the window is decoded again, alone, with no other decode running
    (:meth:`CuCIMReader.decode_failures`); those that make the decoder report an error are
    added to ``failures`` (level pixels, clipped to the window) and zeroed. A complaint
    that no single tile reproduces is this window's if no other decode ran beside it: then
    the window cannot be trusted as a whole (:class:`SlideReadError`); otherwise it came
    from another thread's window, which finds it itself.
    """
    try:
        return _decode(reader, lv, y, x, height, width)
    except DecoderComplaint as complaint:
        pixels = np.array(complaint.pixels, copy=True)
        tiles = []
        for row in range(y // grid.seg_h, -(-(y + height) // grid.seg_h)):
            for col in range(x // grid.seg_w, -(-(x + width) // grid.seg_w)):
                top, left = row * grid.seg_h, col * grid.seg_w
                tiles.append((top, left, min(grid.seg_h, lv.height - top), min(grid.seg_w, lv.width - left)))
        found = reader.decode_failures(lv.index, tiles)  # type: ignore[attr-defined]
        if not found and complaint.alone:
            raise SlideReadError(
                f"{key.path}: the decoder reported an error while decoding level {lv.index} window y={y} x={x} "
                f"{height}x{width} ({complaint.message.splitlines()[-1].strip()!r}), but no single tile of it does; "
                "its pixels cannot be trusted. Re-export the slide from its source."
            ) from None
        for index, message in found:
            top, left, tile_h, tile_w = tiles[index]
            t0, l0 = max(top, y), max(left, x)
            t1, l1 = min(top + tile_h, y + height), min(left + tile_w, x + width)
            pixels[t0 - y : t1 - y, l0 - x : l1 - x] = 0
            failures.append((t0, l0, t1 - t0, l1 - l0, message))
        return pixels
