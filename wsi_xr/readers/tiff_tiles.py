"""The TIFF tiles under a window, as a batch a batched decoder can take.

A GPU decoder (nvImageCodec) decodes many complete image streams in one call. A slide
stores a level as TIFF tiles; this module finds the tiles that a window
``[y:y+height, x:x+width]`` of a level touches (tifffile's ``dataoffsets`` and
``databytecounts`` of the level's key page), reads their bytes and turns each into a
stream that decodes on its own, and says where each decoded tile lands in the window.
It imports no GPU package: it runs, and is tested, on any machine.

What a stream is, per compression (TIFF tag 259):

* **JPEG (7).** A TIFF JPEG tile may be *abbreviated*: its quantisation and Huffman
  tables are stored once per page in the JPEGTables tag (Aperio does this). The batch
  holds complete streams: the tables' segments (their own SOI and EOI dropped) are
  inserted right after the tile's SOI; tables the tile defines itself come later in the
  stream and so still win, as in libjpeg's reading of tables-then-tile.
  The colour space the JPEG data are coded in follows tifffile's rule
  (``tifffile.jpeg_decode_colorspace``): a YCbCr photometric tag, or an RGB tag with a
  JFIF marker in the first tile, means YCbCr data (the usual case; tifffile's own JPEG
  writer tags YCbCr and writes JFIF tiles); an RGB tag without JFIF means the
  components *are* R, G, B and must not be colour-converted (Aperio: component ids
  0, 1, 2, no JFIF or Adobe marker, 4:4:4). libjpeg would guess YCbCr for such a
  stream, so tifffile passes ``colorspace=RGB`` to ``imagecodecs.jpeg8_decode``. To make
  the stream say so itself, :func:`assemble_jpeg` inserts an Adobe APP14 segment with
  transform 0 ("RGB, no transform"), the marker libjpeg-turbo honours (and removes any
  other APP14 of the tile, which tifffile ignores for such pages). The batch also
  carries the colour space (``TileBatch.colorspace``, ``"rgb"`` or ``"ycbcr"``) for
  decoders that take it as a parameter.
* **JPEG 2000 (Aperio 33003/33004/33005, generic 34712).** The tile's bytes are a raw
  J2K codestream (``FF4F FF51``); tifffile decodes them with ``imagecodecs.jpeg2k_decode``
  and so does the CPU path here. Any colour transform is the codestream's own (MCT).
* Anything else (Deflate, LZW, uncompressed, ...), stripped levels, separate colour
  planes, extra samples: the batch decoder cannot take them; they are listed in
  ``TileBatch.fallback`` and decoded with tifffile.

Damaged tiles (found by :func:`wsi_xr.readers.integrity.scan_level` from the file
structure) never enter a batch: they are listed in ``TileBatch.damaged`` with the reason,
and the caller leaves their pixels at zero and flags them.

>>> tiles = TiffTiles("slide.svs")                          # doctest: +SKIP
>>> batch = tiles.batch(0, 1000, 2000, 512, 512)            # doctest: +SKIP
>>> window, damaged = tiles.read_cpu(0, 1000, 2000, 512, 512)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from wsi_xr.readers.integrity import SegmentGrid, scan_level

__all__ = [
    "ADOBE_RGB_SEGMENT",
    "JPEG",
    "JPEG2000_COMPRESSIONS",
    "DamagedTile",
    "LevelLayout",
    "TiffTiles",
    "TileBatch",
    "TilePlacement",
    "assemble_jpeg",
    "decode_tile_cpu",
    "jpeg_table_segments",
    "level_layouts",
    "paste",
    "place_tiles",
]

#: TIFF compression code of (new-style) JPEG.
JPEG = 7
#: TIFF compression codes whose tiles are raw JPEG 2000 codestreams.
JPEG2000_COMPRESSIONS = frozenset({33003, 33004, 33005, 34712})
#: An Adobe APP14 segment saying "3 components, no colour transform" (RGB-coded JPEG):
#: marker FFEE, length 14, "Adobe", version 100, flags0 0, flags1 0, transform 0.
ADOBE_RGB_SEGMENT = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"

_SOI = b"\xff\xd8"
_APP14 = 0xEE
_SOS = 0xDA
_EOI = 0xD9


@dataclass(frozen=True)
class LevelLayout:
    """How one level of a slide is stored, and whether a batch decoder can take its tiles.

    ``seg_h``/``seg_w`` is the size of a storage segment: the TIFF tile, or for a
    stripped level ``rows-per-strip x image width``. ``codec`` is ``"jpeg"``,
    ``"jpeg2k"`` or ``None`` (then ``reason`` says why the level is not batchable).
    ``colorspace`` is the colour space the JPEG data are coded in (``"rgb"`` or
    ``"ycbcr"``), ``None`` for other codecs.
    """

    level: int
    height: int
    width: int
    seg_h: int
    seg_w: int
    tiled: bool
    compression: int
    photometric: int
    codec: str | None
    colorspace: str | None
    reason: str | None
    offsets: np.ndarray
    counts: np.ndarray
    jpegtables: bytes | None

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Segments down and across the level."""
        return -(-self.height // self.seg_h), -(-self.width // self.seg_w)


@dataclass(frozen=True)
class TilePlacement:
    """Where one stored tile (or strip) lands in a window.

    The decoded tile's pixels ``[src_y:src_y+height, src_x:src_x+width]`` go to the
    window's ``[dst_y:dst_y+height, dst_x:dst_x+width]``. ``index`` is the segment's
    position in the page's offset table (row-major), ``row``/``col`` its grid position.
    """

    row: int
    col: int
    index: int
    src_y: int
    src_x: int
    dst_y: int
    dst_x: int
    height: int
    width: int

    @property
    def src(self) -> tuple[slice, slice]:
        """Slices into the decoded tile."""
        return slice(self.src_y, self.src_y + self.height), slice(self.src_x, self.src_x + self.width)

    @property
    def dst(self) -> tuple[slice, slice]:
        """Slices into the output window."""
        return slice(self.dst_y, self.dst_y + self.height), slice(self.dst_x, self.dst_x + self.width)


@dataclass(frozen=True)
class DamagedTile:
    """A tile of the window that was not decoded, and why (its pixels stay zero)."""

    placement: TilePlacement
    reason: str


@dataclass
class TileBatch:
    """The tiles under one window, ready for a batched decoder.

    ``streams[i]`` is the complete, self-contained encoded tile for ``placements[i]``.
    ``fallback`` are sound tiles a batch decoder cannot take (decode them with
    tifffile); ``damaged`` are tiles that must not be decoded at all.
    """

    level: int
    window: tuple[int, int, int, int]
    codec: str | None
    colorspace: str | None
    tile_shape: tuple[int, int]
    placements: list[TilePlacement] = field(default_factory=list)
    streams: list[bytes] = field(default_factory=list)
    fallback: list[TilePlacement] = field(default_factory=list)
    damaged: list[DamagedTile] = field(default_factory=list)
    #: False when a ``decode`` grid left some tiles of the window out.
    complete: bool = True


def _codec_of(page: tifffile.TiffPage) -> tuple[str | None, str | None, str | None]:
    """(codec, JPEG colour space, reason when not batchable) of a level's key page."""
    code = int(page.compression)
    if not page.is_tiled:
        return None, None, "stripped level (no TIFF tiles)"
    if int(page.planarconfig) != 1:
        return None, None, "separate colour planes"
    if int(page.imagedepth or 1) != 1:
        return None, None, "volumetric tiles"
    if int(page.samplesperpixel) != 3 or page.extrasamples:
        return None, None, f"{page.samplesperpixel} samples per pixel (batch decoding takes RGB only)"
    if code == JPEG:
        photometric = int(page.photometric)
        if photometric == 6:  # YCbCr
            return "jpeg", "ycbcr", None
        if photometric == 2:  # RGB: the data are RGB unless the tiles say JFIF (tifffile's rule)
            return "jpeg", "ycbcr" if page.is_jfif else "rgb", None
        return None, None, f"JPEG under photometric {photometric}"
    if code in JPEG2000_COMPRESSIONS:
        return "jpeg2k", None, None
    return None, None, f"compression {code} has no batch decoder"


def level_layouts(tf: tifffile.TiffFile) -> tuple[LevelLayout, ...]:
    """The :class:`LevelLayout` of every level of ``tf``'s first series."""
    layouts = []
    for index, level in enumerate(tf.series[0].levels):
        page = level.keyframe
        h, w = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            seg_h, seg_w = int(page.rowsperstrip or h), w
        codec, colorspace, reason = _codec_of(page)
        layouts.append(
            LevelLayout(
                level=index,
                height=h,
                width=w,
                seg_h=seg_h,
                seg_w=seg_w,
                tiled=bool(page.is_tiled),
                compression=int(page.compression),
                photometric=int(page.photometric),
                codec=codec,
                colorspace=colorspace,
                reason=reason,
                offsets=np.asarray(page.dataoffsets, dtype=np.int64),
                counts=np.asarray(page.databytecounts, dtype=np.int64),
                jpegtables=bytes(page.jpegtables) if page.jpegtables else None,
            )
        )
    return tuple(layouts)


def place_tiles(layout: LevelLayout, y: int, x: int, height: int, width: int) -> list[TilePlacement]:
    """The segments a window touches and where each lands in it (row-major order).

    The window must lie inside the level; edge tiles that stick out of the level (TIFF
    tiles are padded to full size) and tiles cut by the window borders are cropped.
    """
    if y < 0 or x < 0 or height <= 0 or width <= 0 or y + height > layout.height or x + width > layout.width:
        raise ValueError(f"window y={y} x={x} {height}x{width} is outside level {layout.level} ({layout.height}x{layout.width})")
    th, tw = layout.seg_h, layout.seg_w
    across = layout.grid_shape[1]
    placements = []
    for row in range(y // th, (y + height - 1) // th + 1):
        top, bottom = max(y, row * th), min(y + height, (row + 1) * th)
        for col in range(x // tw, (x + width - 1) // tw + 1):
            left, right = max(x, col * tw), min(x + width, (col + 1) * tw)
            placements.append(
                TilePlacement(
                    row=row,
                    col=col,
                    index=row * across + col,
                    src_y=top - row * th,
                    src_x=left - col * tw,
                    dst_y=top - y,
                    dst_x=left - x,
                    height=bottom - top,
                    width=right - left,
                )
            )
    return placements


def _segments(stream: bytes, start: int) -> list[tuple[int, int, int]]:
    """(marker, begin, end) of the marker segments from ``start`` up to SOS or EOI (exclusive)."""
    out = []
    i = start
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (_SOS, _EOI):
            break
        end = i + 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
        out.append((marker, i, end))
        i = end
    return out


def jpeg_table_segments(tables: bytes | None) -> bytes:
    """The DQT/DHT/... segments of a JPEGTables stream, without its SOI and EOI."""
    if not tables:
        return b""
    if tables[:2] != _SOI:
        raise ValueError("JPEGTables do not start with a start-of-image marker")
    return b"".join(tables[begin:end] for _, begin, end in _segments(tables, 2))


def assemble_jpeg(tile: bytes, table_segments: bytes = b"", colorspace: str = "ycbcr") -> bytes:
    """A complete JPEG stream from a TIFF tile and its page's table segments.

    Parameters
    ----------
    tile : bytes
        The tile's bytes (SOI ... EOI), possibly abbreviated (without tables).
    table_segments : bytes
        :func:`jpeg_table_segments` of the page's JPEGTables (empty when there are none).
    colorspace : {"ycbcr", "rgb"}
        The colour space the data are coded in. ``"rgb"`` adds an Adobe APP14 segment
        with transform 0 (and drops the tile's own APP14 segments) so that decoders do
        not apply a YCbCr-to-RGB conversion.

    Returns
    -------
    bytes
        SOI, [Adobe RGB marker], the tables, then the tile's own segments and data.
    """
    if tile[:2] != _SOI:
        raise ValueError("JPEG tile does not start with a start-of-image marker")
    if colorspace == "rgb":
        body = tile[2:]
        header = _segments(tile, 2)
        if any(marker == _APP14 for marker, _, _ in header):
            kept = b"".join(tile[b:e] for marker, b, e in header if marker != _APP14)
            body = kept + tile[header[-1][2] :]
        return b"".join((_SOI, ADOBE_RGB_SEGMENT, table_segments, body))
    if colorspace != "ycbcr":
        raise ValueError(f"colorspace={colorspace!r}: use 'ycbcr' or 'rgb'")
    if not table_segments:
        return tile
    return b"".join((_SOI, table_segments, tile[2:]))


def decode_tile_cpu(stream: bytes, codec: str, colorspace: str | None = None) -> np.ndarray:
    """Decode one batch stream on the CPU with imagecodecs, as tifffile would.

    JPEG: ``imagecodecs.jpeg8_decode`` with ``colorspace="RGB"`` for RGB-coded data (the
    stream's Adobe marker says the same) and RGB output; JPEG 2000:
    ``imagecodecs.jpeg2k_decode``. Returns the whole tile, uint8 ``(h, w, 3)``.
    """
    import imagecodecs

    if codec == "jpeg":
        return imagecodecs.jpeg8_decode(stream, colorspace="RGB" if colorspace == "rgb" else None, outcolorspace="RGB")
    if codec == "jpeg2k":
        return imagecodecs.jpeg2k_decode(stream)
    raise ValueError(f"codec={codec!r}: use 'jpeg' or 'jpeg2k'")


def paste(out: Any, placement: TilePlacement, tile: Any) -> None:
    """Copy the part of a decoded ``tile`` that ``placement`` needs into the window ``out``.

    Works on NumPy and CuPy arrays alike (both must live on the same device). Extra
    channels of the tile (alpha) are dropped.
    """
    th, tw = placement.src_y + placement.height, placement.src_x + placement.width
    if tile.ndim != 3 or tile.shape[0] < th or tile.shape[1] < tw or tile.shape[2] < 3:
        raise ValueError(f"decoded tile has shape {tuple(tile.shape)}; the window needs at least ({th}, {tw}, 3)")
    rows, cols = placement.src
    out[placement.dst] = tile[rows, cols, :3]


class TiffTiles:
    """The tile layout of one slide file, and thread-safe reads of its tile bytes.

    Opens the file once with tifffile to learn every level's layout, then reads tile
    bytes with ``os.pread`` (no shared file position, so Dask threads may call
    :meth:`batch` at once). The damage scan of a level runs once, on first use.

    Parameters
    ----------
    path : str or os.PathLike
        The slide file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with tifffile.TiffFile(self.path) as tf:
            self.layouts = level_layouts(tf)
        self._tables = [jpeg_table_segments(lv.jpegtables) if lv.codec == "jpeg" else b"" for lv in self.layouts]
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._grids: dict[int, SegmentGrid] = {}
        self._tifffile: tifffile.TiffFile | None = None
        self._zarr: list[Any] | None = None

    def damage(self, level: int) -> SegmentGrid:
        """The integrity grid of ``level`` (scanned once, from the file structure)."""
        with self._lock:
            grid = self._grids.get(level)
        if grid is None:
            grid = scan_level(self.path, level)
            with self._lock:
                self._grids.setdefault(level, grid)
        return grid

    def set_damage(self, level: int, grid: SegmentGrid) -> None:
        """Use an integrity grid scanned elsewhere (e.g. the reader registry's cache)."""
        with self._lock:
            self._grids[level] = grid

    def _read(self, offset: int, count: int) -> bytes:
        if self._fd is None:
            raise ValueError(f"{self.path}: TiffTiles is closed")
        data = os.pread(self._fd, count, offset)
        while len(data) < count:  # pread may return less; a short read at EOF stays short
            more = os.pread(self._fd, count - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def batch(self, level: int, y: int, x: int, height: int, width: int, decode: np.ndarray | None = None) -> TileBatch:
        """The tiles under a window, split into batch streams, fallback and damaged tiles.

        ``decode``, when given, is a bool grid over the segments the window touches
        (rows ``y // seg_h ...``, columns ``x // seg_w ...``, the shape of
        ``SegmentGrid.window``): tiles marked False are left out altogether (not read,
        not decoded; their pixels stay zero), e.g. tiles a coarse pass found empty.
        """
        layout = self.layouts[level]
        grid = self.damage(level)
        row0, col0 = y // layout.seg_h, x // layout.seg_w
        out = TileBatch(
            level=level,
            window=(y, x, height, width),
            codec=layout.codec,
            colorspace=layout.colorspace,
            tile_shape=(layout.seg_h, layout.seg_w),
        )
        for p in place_tiles(layout, y, x, height, width):
            if decode is not None and not decode[p.row - row0, p.col - col0]:
                out.complete = False
                continue
            cell = (p.row, p.col)
            if cell[0] < grid.damaged.shape[0] and cell[1] < grid.damaged.shape[1] and grid.damaged[cell]:
                out.damaged.append(DamagedTile(p, grid.reasons.get(cell, "damaged tile")))
                continue
            if layout.codec is None:
                out.fallback.append(p)
                continue
            count = int(layout.counts[p.index])
            data = self._read(int(layout.offsets[p.index]), count)
            if len(data) != count:
                out.damaged.append(DamagedTile(p, f"tile data cut short ({len(data)} of {count} bytes readable)"))
                continue
            if layout.codec == "jpeg":
                try:
                    data = assemble_jpeg(data, self._tables[level], layout.colorspace or "ycbcr")
                except ValueError as err:
                    out.damaged.append(DamagedTile(p, str(err)))
                    continue
            out.placements.append(p)
            out.streams.append(data)
        return out

    def _zarr_level(self, level: int) -> Any:
        with self._lock:
            if self._zarr is None:
                import zarr

                self._tifffile = tifffile.TiffFile(self.path)
                series = self._tifffile.series[0]
                self._zarr = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
            return self._zarr[level]

    def read_fallback(self, batch: TileBatch) -> np.ndarray | None:
        """Decode the batch's fallback tiles with tifffile into a host window.

        Returns ``None`` when there are none. When every tile of the window is a sound
        fallback tile (a stripped or Deflate level, say), the window is read in one
        tifffile call; otherwise tile by tile, so that no damaged tile is ever decoded.
        Pixels of tiles that are not fallback tiles are zero.
        """
        if not batch.fallback:
            return None
        y, x, height, width = batch.window
        arr = self._zarr_level(batch.level)
        if not batch.placements and not batch.damaged and batch.complete:
            return np.ascontiguousarray(np.asarray(arr[y : y + height, x : x + width])[..., :3])
        out = np.zeros((height, width, 3), dtype=np.uint8)
        for p in batch.fallback:
            top, left = y + p.dst_y, x + p.dst_x
            out[p.dst] = np.asarray(arr[top : top + p.height, left : left + p.width])[..., :3]
        return out

    def read_cpu(self, level: int, y: int, x: int, height: int, width: int, decode: np.ndarray | None = None) -> tuple[np.ndarray, list[DamagedTile]]:
        """Decode a window on the CPU from the batch streams (imagecodecs) and tifffile.

        The reference for a batched GPU decode: the same streams, decoded with the
        decoders tifffile uses. Damaged tiles (and streams the decoder rejects) stay
        zero and are returned with their reasons; ``decode`` is as in :meth:`batch`.
        """
        batch = self.batch(level, y, x, height, width, decode)
        out = np.zeros((height, width, 3), dtype=np.uint8)
        damaged = list(batch.damaged)
        for p, stream in zip(batch.placements, batch.streams):
            try:
                paste(out, p, decode_tile_cpu(stream, batch.codec or "", batch.colorspace))
            except Exception as err:  # imagecodecs raises its own error types on bad data
                damaged.append(DamagedTile(p, f"decoder failed ({type(err).__name__}: {err})"))
        host = self.read_fallback(batch)
        for p in batch.fallback:
            out[p.dst] = host[p.dst]  # type: ignore[index]
        return out, damaged

    def close(self) -> None:
        """Close the file descriptor and any tifffile handle."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._tifffile is not None:
                self._tifffile.close()
                self._tifffile = None
                self._zarr = None

    def __enter__(self) -> TiffTiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
