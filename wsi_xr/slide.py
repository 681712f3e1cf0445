"""A slide as a lazy, chunked xarray object.

:func:`open_slide` gives one level as an ``xr.DataArray`` ``(y, x, c)`` backed by a Dask
array whose every block is one reader call; :func:`open_pyramid` gives every level as
an ``xr.DataTree``. Coordinates are level-0 pixel offsets of each pixel's top-left
corner, so arrays of different levels (and tile grids) align by label.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from wsi_xr._timing import stage
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import DAMAGED_POLICIES, GPU_BACKENDS, DecodedWindow, LevelInfo, OpenedSlide, SlideInfo, decide_backend, open_file, read_window

__all__ = [
    "ChunkSpec",
    "SlideSource",
    "default_chunk_size",
    "open_pyramid",
    "open_slide",
    "opened_slide_of",
    "slide_array",
    "slide_dataarray",
]

#: Chunk sides are multiples of this (the reference patch size).
CHUNK_MULTIPLE = 256
#: The default chunk side we aim for (see benchmarks/RESULTS.md).
TARGET_CHUNK = 2048
#: ``chunks=`` may be an int (square), a ``(y, x)`` pair, or a ``{"y": .., "x": ..}`` mapping.
ChunkSpec = int | tuple[int, int] | dict[str, int] | None
#: Where a slide comes from: a path, or a file already opened with :func:`wsi_xr.readers.open_file`.
SlideSource = str | os.PathLike[str] | OpenedSlide


class _LevelWindowReader:
    """An array-like over one level whose ``[y-slice, x-slice, c-slice]`` is one reader call.

    Dask's ``from_array`` calls ``__getitem__`` once per block. It holds the
    :class:`OpenedSlide` (a path, the backend decision, the damage scans: never an open
    handle), so it pickles to any worker, and the graph stores it once, not per task.
    ``wanted`` (bool over the level's TIFF tiles) limits decoding to those tiles.
    """

    def __init__(
        self, opened: OpenedSlide, level: LevelInfo, device: str, damaged: str, wanted: np.ndarray | None = None
    ) -> None:
        self.opened = opened
        self.level = level.index
        self.shape = (level.height, level.width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.device = device
        self.damaged = damaged
        self.wanted = wanted

    def __getitem__(self, index: tuple[slice, slice, slice]) -> Any:
        ys, xs, cs = index
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        damage = self.opened.damage(self.level)
        if self.wanted is not None and not damage.window_any(self.wanted, y0, x0, y1 - y0, x1 - x0):
            # nothing to decode in this block: a zero-cost read-only view of zeros
            return _zeros(self.device, (y1 - y0, x1 - x0, self.shape[2]))[:, :, cs]
        with stage("decode"):
            pixels = read_window(
                self.opened.key, self.level, y0, x0, y1 - y0, x1 - x0,
                device=self.device, damaged=self.damaged, damage=damage, wanted=self.wanted, info=self.opened.info,
            )
        if isinstance(pixels, DecodedWindow):  # damaged="report": the block carries where decoding failed
            return DecodedWindow(pixels.pixels[:, :, cs], pixels.failed, pixels.messages)
        return pixels[:, :, cs]


def _zeros(device: str, shape: tuple[int, ...]) -> Any:
    if device == "cuda":
        import cupy

        return cupy.zeros(shape, dtype=np.uint8)
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), shape)


#: The :class:`OpenedSlide` behind each lazy image this process built, by Dask name.
_opened_by_name: "OrderedDict[str, OpenedSlide]" = OrderedDict()
_OPENED_CAPACITY = 256


def _remember(name: str, opened: OpenedSlide) -> None:
    _opened_by_name[name] = opened
    _opened_by_name.move_to_end(name)
    while len(_opened_by_name) > _OPENED_CAPACITY:
        _opened_by_name.popitem(last=False)


def opened_slide_of(image: xr.DataArray) -> OpenedSlide | None:
    """The :class:`OpenedSlide` an unmodified :func:`open_slide` array reads from, else None.

    Lets :func:`wsi_xr.tissue_mask` reuse the probe, backend decision and damage scans
    instead of re-deciding them.
    """
    data = image.data
    if not isinstance(data, da.Array):
        return None
    return _opened_by_name.get(data.name)


def default_chunk_size(level: LevelInfo, multiple: int = CHUNK_MULTIPLE) -> int:
    """Smallest multiple of lcm(TIFF tile, 256, ``multiple``) that is at least :data:`TARGET_CHUNK`.

    Every chunk border then falls on a TIFF tile border, so no tile is decoded twice;
    ``multiple`` (a patch side) makes every chunk hold whole patches.
    """
    base = math.lcm(CHUNK_MULTIPLE, multiple)
    if level.tiled and level.tile_width == level.tile_height:
        base = math.lcm(level.tile_width, base)
    return base * max(1, -(-TARGET_CHUNK // base))


def _chunk_sides(chunks: ChunkSpec, level: LevelInfo) -> tuple[int, int]:
    if chunks is None:
        side = default_chunk_size(level)
        return side, side
    if isinstance(chunks, dict):
        sides: tuple[Any, Any] = (chunks.get("y", -1), chunks.get("x", -1))
    elif isinstance(chunks, (int, np.integer)):
        sides = (int(chunks), int(chunks))
    elif isinstance(chunks, (tuple, list)) and len(chunks) == 2:
        sides = (chunks[0], chunks[1])
    else:
        raise InvalidArgumentError(f"chunks={chunks!r}: give an int, a (y, x) pair, or {{'y': .., 'x': ..}}.")
    out = []
    for side, size in zip(sides, (level.height, level.width)):
        if side == -1:
            side = size
        if not isinstance(side, (int, np.integer)) or isinstance(side, bool) or side <= 0:
            raise InvalidArgumentError(f"chunks={chunks!r}: chunk sides must be positive integers (or -1 for whole).")
        out.append(int(side))
    return out[0], out[1]


def level_coords(info: SlideInfo, level: int) -> dict[str, np.ndarray]:
    """Integer level-0 pixel offsets of the rows and columns of ``level``."""
    lv = info.levels[level]
    return {
        "y": np.round(np.arange(lv.height) * lv.downsample_y).astype(np.int64),
        "x": np.round(np.arange(lv.width) * lv.downsample_x).astype(np.int64),
        "c": np.array(["R", "G", "B"]),
    }


def slide_array(
    opened: OpenedSlide,
    level: int = 0,
    chunks: ChunkSpec = None,
    device: str = "cpu",
    damaged: str = "raise",
    wanted: np.ndarray | None = None,
) -> da.Array:
    """The lazy Dask array ``(y, x, 3)`` uint8 of one level of an opened slide.

    Building it reads no pixels. Each block is one reader call (or, with ``wanted``, one
    call per rectangle of wanted TIFF tiles); edge blocks are exact. With
    ``damaged="report"`` each block is a :class:`~wsi_xr.readers.DecodedWindow` (pixels and
    the tiles whose decoding failed), for map_blocks functions that unpack it
    (:func:`~wsi_xr.readers.unpack_window`), as the tissue mask and the pipeline do. ``wanted`` (bool
    over the level's TIFF tile grid, see :meth:`OpenedSlide.damage`) marks the tiles to
    decode: the others come back as zeros (the tissue mask passes the coarse pass's
    "may hold tissue" here, and never scores the zeros).
    """
    info = opened.info
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level < len(info.levels):
        raise InvalidArgumentError(
            f"{info.path}: level={level} does not exist; the slide has levels 0..{len(info.levels) - 1}."
        )
    if device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device={device!r}: use 'cpu' or 'cuda'.")
    if damaged not in DAMAGED_POLICIES:
        raise InvalidArgumentError(f"damaged={damaged!r}: use one of {DAMAGED_POLICIES}.")
    if opened.backend in GPU_BACKENDS and device != "cuda":
        raise InvalidArgumentError(
            f"{info.path}: backend {opened.backend!r} decodes into GPU memory; use device='cuda' with it, "
            "or backend='auto' for CPU chunks."
        )
    lv = info.levels[level]
    cy, cx = _chunk_sides(chunks, lv)
    if device == "cuda":
        import cupy

        meta = cupy.empty((0, 0, 0), dtype=np.uint8)
    else:
        meta = np.empty((0, 0, 0), dtype=np.uint8)
    block_chunks = da.core.normalize_chunks((cy, cx, 3), (lv.height, lv.width, 3))
    token = tokenize(info.path, info.file_size, info.mtime_ns, opened.backend, level, block_chunks, device, damaged, wanted)
    name = f"wsi-read-{token}"
    array = da.from_array(
        _LevelWindowReader(opened, lv, device, damaged, wanted),
        chunks=block_chunks,
        name=name,
        meta=meta,
        asarray=False,
        fancy=False,
    )
    _remember(name, opened)
    return array


def open_slide(
    path: SlideSource,
    level: int = 0,
    chunks: ChunkSpec = None,
    backend: str = "auto",
    *,
    device: str = "cpu",
    damaged: str = "raise",
) -> xr.DataArray:
    """Open one level of a slide as a lazy ``xr.DataArray`` ``(y, x, c)`` of uint8 RGB.

    Parameters
    ----------
    path
        A slide file (see README "Slide formats"), or an :class:`~wsi_xr.readers.OpenedSlide`
        from :func:`wsi_xr.readers.open_file` (probed and decided once, reused here).
    level
        Pyramid level; 0 is full resolution.
    chunks
        Block size in pixels: an int, a ``(y, x)`` pair or ``{"y": .., "x": ..}``.
        Default: a multiple of 256 aligned to the file's TIFF tiles (~2048 px).
    backend
        ``"auto"`` (cuCIM when the file is safe for it, else tifffile), ``"cucim"`` or
        ``"tifffile"``.
    device
        ``"cuda"`` makes every block a CuPy array in GPU memory (decoded on the CPU and
        copied: faster and exact, see the cuCIM backend notes; needs CuPy).
    damaged
        What a block touching a damaged TIFF tile does: ``"raise"`` a
        :class:`~wsi_xr.SlideReadError` (default), or ``"fill"`` those pixels with zeros
        (for callers that track damage themselves, like :func:`wsi_xr.tissue_mask`).

    Returns
    -------
    xr.DataArray
        Named ``image``; coordinates ``y``/``x`` are level-0 pixel offsets, ``c`` is
        ``["R", "G", "B"]``; attrs hold ``mpp``, ``level``, ``downsample``, ``backend``,
        ``vendor``, ``source`` and the file's tile size and compression.

    Raises
    ------
    WsiXrError
        The file is missing or unreadable, or an argument is invalid.
    """
    return slide_dataarray(open_file(path, backend), level, chunks, device=device, damaged=damaged)


def open_pyramid(
    path: SlideSource, chunks: ChunkSpec = None, backend: str = "auto", *, device: str = "cpu"
) -> xr.DataTree:
    """Open every level of a slide as an ``xr.DataTree``: nodes ``level_0``, ``level_1``, ...

    Each node holds the level's :func:`open_slide` array as variable ``image``; the root
    holds the slide's metadata as attrs. Nothing is read.
    """
    opened = open_file(path, backend)
    info = opened.info
    nodes: dict[str, xr.Dataset] = {
        "/": xr.Dataset(
            attrs={"source": info.path, "vendor": info.vendor, "mpp": info.mpp, "levels": len(info.levels)}
        )
    }
    for lv in info.levels:
        nodes[f"level_{lv.index}"] = slide_dataarray(opened, lv.index, chunks, device=device).to_dataset()
    return xr.DataTree.from_dict(nodes)


def slide_dataarray(
    source: OpenedSlide | SlideInfo,
    level: int = 0,
    chunks: ChunkSpec = None,
    backend: str = "auto",
    device: str = "cpu",
    damaged: str = "raise",
) -> xr.DataArray:
    """:func:`open_slide` for an already opened (or probed) file (see there for the parameters)."""
    if damaged == "report":
        raise InvalidArgumentError(
            "damaged='report' makes blocks that carry decode failures, for graph builders (wsi_xr.slide.slide_array); "
            "an image array takes damaged='raise' or 'fill'."
        )
    opened = source if isinstance(source, OpenedSlide) else OpenedSlide(source, decide_backend(source, backend))
    if backend not in ("auto", opened.backend):
        opened = open_file(opened, backend)
    info = opened.info
    data = slide_array(opened, level, chunks, device, damaged)  # validates level and device
    lv = info.levels[level]
    return xr.DataArray(
        data,
        dims=("y", "x", "c"),
        coords=level_coords(info, level),
        name="image",
        attrs={
            "source": info.path,
            "vendor": info.vendor,
            "format": info.format,
            "backend": opened.backend,
            "level": level,
            "downsample": lv.downsample,
            "mpp": info.mpp,
            "level_mpp": None if info.mpp is None else info.mpp * lv.downsample,
            "tile_size": [lv.tile_height, lv.tile_width],
            "compression": lv.compression_name,
            "file_size": info.file_size,
            "mtime_ns": info.mtime_ns,
            "damaged": damaged,
        },
    )
