"""Find damaged TIFF tiles from the file structure, without decoding pixels.

cuCIM does not raise on a damaged JPEG tile: it prints to stderr and returns zeros (or
another tile's pixels). So before pixels are trusted, every tile (or strip) of a level
is checked here: its bytes must exist inside the file and, for JPEG, form a
well-structured stream (SOI, valid header segments up to a start-of-scan, a frame
header, EOI at the end). This reads a few hundred bytes per tile.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
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

    def window_slices(self, y: int, x: int, height: int, width: int) -> tuple[slice, slice]:
        """The rows and columns of segments that the window touches."""
        i0, i1 = y // self.seg_h, -(-(y + height) // self.seg_h)
        j0, j1 = x // self.seg_w, -(-(x + width) // self.seg_w)
        return slice(i0, i1), slice(j0, j1)

    def window(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """The damaged flags of the segments that the window touches (a 2-D view)."""
        return self.damaged[self.window_slices(y, x, height, width)]

    def window_any(self, flags: np.ndarray, y: int, x: int, height: int, width: int) -> bool:
        """Whether any segment the window touches is set in ``flags`` (a grid of this shape)."""
        return bool(flags[self.window_slices(y, x, height, width)].any())

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
        compression = int(page.compression)
        tables = page.jpegtables or b""
        tables_problem = jpeg_tables_problem(tables) if tables and compression == _JPEG else None
        size = (seg_h, seg_w) if page.is_tiled else None
        read = _reader(tf.filehandle)
        known = _KnownHeader(tables, size)
        for index in range(grid_h * grid_w):
            cell = divmod(index, grid_w)
            if index >= len(offsets):
                reason: str | None = "no entry in the tile offset table"
            elif tables_problem is not None:
                reason = f"{tables_problem} (the JPEG tables every tile of this level needs)"
            else:
                reason = _segment_problem(read, int(offsets[index]), int(counts[index]), file_size, compression, known)
            if reason is not None:
                damaged[cell] = True
                reasons[cell] = reason
    return SegmentGrid(seg_h, seg_w, damaged, reasons)


def _reader(fh: tifffile.FileHandle) -> Callable[[int, int], bytes]:
    """``read(offset, count)`` on the open file: ``os.pread`` on its descriptor when it is a
    whole file on disk (one system call, no seek), else seek and read (file objects, or a
    TIFF embedded at an offset in another file). Read errors raise ``OSError``; no memory
    map, which would turn an I/O error or a file truncated meanwhile into SIGBUS."""
    try:
        descriptor = fh.fileno() if hasattr(os, "pread") and not getattr(fh, "_offset", 0) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        descriptor = None
    if descriptor is not None:
        return lambda offset, count: os.pread(descriptor, count, offset)

    def read(offset: int, count: int) -> bytes:
        fh.seek(offset)
        return fh.read(count)

    return read


class _KnownHeader:
    """The last sound JPEG header (SOI up to the end of SOS) checked in a level.

    The tiles of a level nearly always share one header byte for byte; a tile whose first
    bytes equal it and that ends with EOI has the same header (the marker walk reads only
    those bytes), so it is sound too: one comparison instead of a parse.
    """

    def __init__(self, tables: bytes, size: tuple[int, int] | None) -> None:
        self.tables, self.size = tables, size
        self.header = b""

    def problem_of(self, head: bytes, tail: bytes) -> str | None:
        if self.header and head.startswith(self.header) and tail == b"\xff\xd9":
            return None
        problem = jpeg_structure_problem(head, tail, self.tables, self.size)
        if problem is None:  # only a sound header: a broken one may end early (e.g. a
            # scan header of length 0), and a sound tile would start with its bytes too
            end = _header_end(head)
            if end is not None:
                self.header = head[:end]
        return problem


def _segment_problem(read: Callable[[int, int], bytes], offset: int, count: int, file_size: int, compression: int, known: _KnownHeader) -> str | None:
    if count <= 0 or offset <= 0:
        return "tile data missing (offset or byte count is 0)"
    if offset + count > file_size:
        return f"tile data runs past the end of the file ({offset}+{count} > {file_size} bytes)"
    if compression != _JPEG:
        return None
    head = read(offset, min(count, _HEAD_BYTES))
    tail = head[count - 2 : count] if count <= _HEAD_BYTES else read(offset + count - 2, 2)
    return known.problem_of(head, tail)


#: Markers a TIFF JPEG tile may hold before its scan: SOF0-2, DHT, DQT, DRI, APPn, COM.
_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
_HEADER_MARKERS = _FRAME_MARKERS | {0xC4, 0xDB, 0xDD, 0xFE} | frozenset(range(0xE0, 0xF0))
#: Markers a JPEGTables stream may hold (tables, application data, comments).
_TABLES_MARKERS = frozenset({0xC4, 0xDB, 0xFE}) | frozenset(range(0xE0, 0xF0))
#: Luma sampling factors (H, V) of the 3-component layouts TurboJPEG (cuCIM's JPEG
#: decoder) decodes, chroma being 1x1: 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, 4:4:1.
_TURBOJPEG_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (2, 2), (1, 2), (4, 1), (1, 4)})


class _Tables:
    """Quantisation and Huffman tables defined so far (by JPEGTables or the tile itself)."""

    def __init__(self) -> None:
        self.quant: set[int] = set()
        self.huffman: set[tuple[int, int]] = set()  # (class 0 DC / 1 AC, id)

    def copy(self) -> _Tables:
        other = _Tables()
        other.quant, other.huffman = set(self.quant), set(self.huffman)
        return other


def jpeg_structure_problem(head: bytes, tail: bytes, tables: bytes = b"", size: tuple[int, int] | None = None) -> str | None:
    """Why a JPEG stream (its first bytes and last two) is malformed, or None if it is sound.

    Checks what a decoder checks before it decodes a pixel: the markers (only those a
    baseline/progressive TIFF tile uses), every header segment's layout (DQT, DHT, SOF,
    SOS, DRI contents fill their declared lengths), the frame (8-bit, 1/3/4 components
    with sampling factors TurboJPEG decodes, quantisation tables that exist), the scan
    (components of the frame, Huffman tables that exist, spectral selection that fits
    the frame type), a JFIF marker of version 1, and, when ``size`` ``(height, width)``
    is given, that the frame has the TIFF tile's size. Decoders given such damage print
    an error and return zeros or garbage instead of raising, so it must be caught here.
    Damage inside the entropy-coded data cannot be seen without decoding it (JPEG has
    no checksum).
    """
    if head[:2] != b"\xff\xd8":
        return "JPEG data does not start with a start-of-image marker"
    if tail != b"\xff\xd9":
        return "JPEG data does not end with an end-of-image marker (truncated?)"
    end = _header_end(head)
    if end is None:  # broken: the full check says where
        return _header_problem(head, tables, size)
    # the tiles of a slide mostly share one header (same tables): check each kind once
    return _cached_header_problem(head[:end], tables, size)


def _header_end(head: bytes) -> int | None:
    """Where the start-of-scan segment of a JPEG stream ends, or None if it is not found."""
    i = 2
    while i + 4 <= len(head) and head[i] == 0xFF:
        marker = head[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:
            return None
        i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return i if i <= len(head) else None
    return None


def _header_problem(head: bytes, tables: bytes, size: tuple[int, int] | None) -> str | None:
    """The checks of :func:`jpeg_structure_problem` from the first marker after SOI on."""
    defined = _tables_defined(tables).copy()
    frame: tuple[int, list[tuple[int, int, int, int]]] | None = None  # (marker, [(id, h, v, tq)])
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
        if marker == 0xD9:
            return "JPEG stream ends before any image data"
        if marker != 0xDA and marker not in _HEADER_MARKERS:
            return f"JPEG header holds an unexpected marker FF{marker:02X} at byte {i}"
        body = head[i + 4 : i + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD, 0xE0):
            if len(body) < length - 2:
                return "JPEG header is longer than expected or cut short"
            problem = _segment_layout_problem(marker, body, length, defined)
            if problem:
                return problem
        if marker in _FRAME_MARKERS:
            if frame is not None:
                return "JPEG stream holds two frame headers"
            components = [(body[6 + 3 * c], body[7 + 3 * c] >> 4, body[7 + 3 * c] & 0x0F, body[8 + 3 * c]) for c in range(body[5])]
            frame = (marker, components)
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            if size is not None and (height, width) != size:
                return f"JPEG frame is {width}x{height} px but the TIFF tile is {size[1]}x{size[0]}"
            problem = _frame_problem(frame[1])
            if problem:
                return problem
        if marker == 0xDA:
            if frame is None:
                return "JPEG scan without a frame header"
            return _scan_problem(frame, body, defined)
        i += 2 + length


_cached_header_problem = functools.lru_cache(maxsize=256)(_header_problem)


def clear_header_cache() -> None:
    """Forget the JPEG header kinds already checked (as in a fresh process)."""
    _cached_header_problem.cache_clear()


def _frame_problem(components: list[tuple[int, int, int, int]]) -> str | None:
    ids = [c[0] for c in components]
    if len(set(ids)) != len(ids):
        return f"JPEG frame header repeats a component id ({ids})"
    for cid, h, v, tq in components:
        if not (1 <= h <= 4 and 1 <= v <= 4) or tq > 3:
            return f"JPEG frame component {cid} has bogus sampling factors {h}x{v} or table {tq}"
    if len(components) == 3:
        luma, chroma = components[0][1:3], [c[1:3] for c in components[1:]]
        if luma not in _TURBOJPEG_LUMA_SAMPLING or any(hv != (1, 1) for hv in chroma):
            return f"JPEG frame has a sampling layout cuCIM's decoder cannot decode ({[c[1:3] for c in components]})"
    return None


def _scan_problem(frame: tuple[int, list[tuple[int, int, int, int]]], body: bytes, defined: _Tables) -> str | None:
    marker, components = frame
    count = body[0]
    start, end, approximation = body[1 + 2 * count], body[2 + 2 * count], body[3 + 2 * count]
    progressive = marker == 0xC2
    if not progressive and (start, end, approximation) != (0, 63, 0):
        return f"JPEG sequential scan has spectral selection {start}..{end} / {approximation:#04x} (want 0..63 / 0)"
    if progressive and ((start == 0 and end != 0) or end > 63 or start > end or (start > 0 and count != 1)):
        return f"JPEG progressive scan has impossible spectral selection {start}..{end}"
    needs_dc = start == 0 and not (progressive and approximation >> 4)  # DC refinement scans use no table
    needs_ac = not progressive or start > 0
    by_id = {c[0]: c for c in components}
    named = [body[1 + 2 * k] for k in range(count)]
    if len(set(named)) != count:
        return f"JPEG scan names a component twice ({named})"
    for k in range(count):
        cid, tables = body[1 + 2 * k], body[2 + 2 * k]
        if cid not in by_id:
            return f"JPEG scan names component {cid}, which the frame does not have"
        if by_id[cid][3] not in defined.quant:
            return f"JPEG quantisation table {by_id[cid][3]} is used but not defined"
        if needs_dc and (0, tables >> 4) not in defined.huffman:
            return f"JPEG Huffman table DC{tables >> 4} is used but not defined"
        if needs_ac and (1, tables & 0x0F) not in defined.huffman:
            return f"JPEG Huffman table AC{tables & 0x0F} is used but not defined"
    return None


@functools.lru_cache(maxsize=64)
def _tables_defined(tables: bytes) -> _Tables:
    """The tables a JPEGTables stream defines (none when it is empty or malformed)."""
    defined = _Tables()
    if tables[:2] != b"\xff\xd8":
        return defined
    i = 2
    while i + 4 <= len(tables) and tables[i] == 0xFF and tables[i + 1] != 0xD9:
        length = int.from_bytes(tables[i + 2 : i + 4], "big")
        if length < 2:
            break
        _segment_layout_problem(tables[i + 1], tables[i + 4 : i + 2 + length], length, defined)
        i += 2 + length
    return defined


def _huffman_code_problem(counts: bytes, symbols: bytes, table_class: int) -> str | None:
    """What libjpeg refuses in a Huffman table ("Bogus Huffman table definition")."""
    code, longest = 0, max((n for n, c in enumerate(counts, 1) if c), default=0)
    for bits in range(1, longest + 1):
        code += counts[bits - 1]
        if code >= 1 << bits:  # more codes of this length than fit (or an all-ones code)
            return f"JPEG Huffman table has too many codes of length {bits}"
        code <<= 1
    if table_class == 0 and any(symbol > 15 for symbol in symbols):
        return "JPEG DC Huffman table holds a symbol above 15"
    return None


def jpeg_tables_problem(tables: bytes) -> str | None:
    """Why a TIFF JPEGTables stream (SOI, DQT/DHT segments, EOI) is malformed, or None."""
    if tables[:2] != b"\xff\xd8":
        return "JPEGTables do not start with a start-of-image marker"
    i = 2
    while i + 2 <= len(tables):
        if tables[i] != 0xFF:
            return f"JPEGTables broken: expected a marker at byte {i}"
        marker = tables[i + 1]
        if marker == 0xD9:
            return None if i + 2 == len(tables) else "JPEGTables hold data after their end-of-image marker"
        if marker not in _TABLES_MARKERS:
            return f"JPEGTables hold an unexpected marker FF{marker:02X} at byte {i}"
        length = int.from_bytes(tables[i + 2 : i + 4], "big")
        body = tables[i + 4 : i + 2 + length]
        if length < 2 or len(body) != length - 2:
            return f"JPEGTables segment FF{marker:02X} at byte {i} runs past the end of the tables"
        problem = _segment_layout_problem(marker, body, length, _Tables())
        if problem:
            return "JPEGTables: " + problem
        i += 2 + length
    return "JPEGTables do not end with an end-of-image marker"


def _segment_layout_problem(marker: int, body: bytes, length: int, defined: _Tables) -> str | None:
    """Whether a header segment's contents fill its declared length exactly; records tables."""
    if marker == 0xDB:
        i = 0
        while i < len(body):
            precision, table = body[i] >> 4, body[i] & 0x0F
            if precision > 1 or table > 3:
                return f"JPEG quantisation table segment has a bogus length {length} or table id"
            defined.quant.add(table)
            i += 1 + 64 * (precision + 1)
        if i != len(body):
            return f"JPEG quantisation table segment has a bogus length {length}"
    elif marker == 0xC4:
        i = 0
        while i < len(body):
            table_class, table = body[i] >> 4, body[i] & 0x0F
            counts = body[i + 1 : i + 17]
            if table_class > 1 or table > 3 or len(counts) < 16 or sum(counts) > 256:
                return f"JPEG Huffman table segment is malformed (length {length})"
            problem = _huffman_code_problem(counts, body[i + 17 : i + 17 + sum(counts)], table_class)
            if problem:
                return problem
            defined.huffman.add((table_class, table))
            i += 17 + sum(counts)
        if i != len(body):
            return f"JPEG Huffman table segment has a bogus length {length}"
    elif marker in _FRAME_MARKERS:
        components = body[5] if len(body) > 5 else 0
        if components not in (1, 3, 4) or length != 8 + 3 * components or body[0] != 8:
            return f"JPEG frame header is malformed (length {length}, {components} components)"
    elif marker == 0xDA:
        components = body[0] if body else 0
        if not 1 <= components <= 4 or length != 6 + 2 * components:
            return f"JPEG scan header is malformed (length {length}, {components} components)"
    elif marker == 0xDD and length != 4:
        return f"JPEG restart interval segment has a bogus length {length}"
    elif marker == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 7 and body[5] != 1:
        return f"JPEG JFIF marker has version {body[5]}.{body[6]:02d} (decoders refuse all but 1.x)"
    return None
