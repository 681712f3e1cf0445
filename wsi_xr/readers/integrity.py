"""Find damaged TIFF tiles from the file structure, without decoding pixels.

cuCIM does not raise on a damaged JPEG tile: it prints to stderr and returns zeros (or
another tile's pixels). So before pixels are trusted, every tile (or strip) of a level
is checked here: its bytes must exist inside the file and, for JPEG, form a
well-structured stream (SOI, valid header segments up to a start-of-scan, a frame
header, EOI at the end). This reads a few hundred bytes per tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tifffile

_JPEG = 7
_HEAD_BYTES = 4096


@dataclass(frozen=True)
class SegmentGrid:
    """The TIFF tiles (or strips) of one level and which of them are damaged.

    ``damaged[i, j]`` covers level pixels ``[i*seg_h : (i+1)*seg_h, j*seg_w : (j+1)*seg_w]``.
    """

    seg_h: int
    seg_w: int
    damaged: np.ndarray
    reasons: dict[tuple[int, int], str]

    def window(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """The damaged flags of the segments that the window touches (a 2-D view)."""
        i0, i1 = y // self.seg_h, -(-(y + height) // self.seg_h)
        j0, j1 = x // self.seg_w, -(-(x + width) // self.seg_w)
        return self.damaged[i0:i1, j0:j1]

    def pixel_mask(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Per-pixel damaged flags ``(height, width)`` of a window."""
        rows = (np.arange(y, y + height) // self.seg_h)[:, None]
        cols = (np.arange(x, x + width) // self.seg_w)[None, :]
        return self.damaged[rows, cols]


def scan_level(path: str, page_index_in_series: int) -> SegmentGrid:
    """Check every segment (tile or strip) of one level of ``path``'s first series."""
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[page_index_in_series].keyframe
        file_size = os.fstat(tf.filehandle.fileno()).st_size if hasattr(tf.filehandle, "fileno") else tf.filehandle.size
        if page.is_tiled:
            seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            seg_h, seg_w = int(page.rowsperstrip or page.imagelength), int(page.imagewidth)
        grid_h = -(-int(page.imagelength) // seg_h)
        grid_w = -(-int(page.imagewidth) // seg_w)
        offsets, counts = page.dataoffsets, page.databytecounts
        damaged = np.zeros((grid_h, grid_w), dtype=bool)
        reasons: dict[tuple[int, int], str] = {}
        tables = page.jpegtables or b""
        fh = tf.filehandle
        for index in range(grid_h * grid_w):
            cell = divmod(index, grid_w)
            if index >= len(offsets):
                reason: str | None = "no entry in the tile offset table"
            else:
                reason = _segment_problem(fh, int(offsets[index]), int(counts[index]), file_size, int(page.compression), tables)
            if reason is not None:
                damaged[cell] = True
                reasons[cell] = reason
    return SegmentGrid(seg_h, seg_w, damaged, reasons)


def _segment_problem(fh: tifffile.FileHandle, offset: int, count: int, file_size: int, compression: int, tables: bytes) -> str | None:
    if count <= 0 or offset <= 0:
        return "tile data missing (offset or byte count is 0)"
    if offset + count > file_size:
        return f"tile data runs past the end of the file ({offset}+{count} > {file_size} bytes)"
    if compression != _JPEG:
        return None
    fh.seek(offset)
    head = fh.read(min(count, _HEAD_BYTES))
    fh.seek(offset + count - 2)
    tail = fh.read(2)
    return jpeg_structure_problem(head, tail, tables)


def jpeg_structure_problem(head: bytes, tail: bytes, tables: bytes = b"") -> str | None:
    """Why a JPEG stream (its first bytes and last two) is malformed, or None if it is sound."""
    if head[:2] != b"\xff\xd8":
        return "JPEG data does not start with a start-of-image marker"
    if tail != b"\xff\xd9":
        return "JPEG data does not end with an end-of-image marker (truncated?)"
    has_frame = _has_marker(tables, frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC})
    i = 2
    while True:
        if i + 4 > len(head):
            return "JPEG header is longer than expected or cut short"
        if head[i] != 0xFF:
            return f"JPEG header broken: expected a marker at byte {i}"
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(head[i + 2 : i + 4], "big")
        if length < 2:
            return f"JPEG segment FF{marker:02X} has an impossible length {length}"
        if marker == 0xDB and (length - 2) % 65 and (length - 2) % 129:
            return f"JPEG quantisation table segment has a bogus length {length}"
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            has_frame = True
        if marker == 0xDA:
            return None if has_frame else "JPEG scan without a frame header"
        if marker == 0xD9:
            return "JPEG stream ends before any image data"
        i += 2 + length


def _has_marker(stream: bytes, markers: frozenset[int]) -> bool:
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        if stream[i + 1] in markers:
            return True
        i += 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
    return False
