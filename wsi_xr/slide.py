"""A slide as a lazy, chunked xarray object.

:func:`open_slide` gives one level as an ``xr.DataArray`` ``(y, x, c)`` backed by a Dask
array whose every block is one reader call; :func:`open_pyramid` gives every level as
an ``xr.DataTree``. Coordinates are level-0 pixel offsets of each pixel's top-left
corner, so arrays of different levels (and tile grids) align by label.
"""

from __future__ import annotations

import math
import os
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from xarray.backends import BackendArray

from wsi_xr import accessor as _accessor  # noqa: F401  (registers .wsi on what this module returns)
from wsi_xr._timing import stage
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import DAMAGED_POLICIES, GPU_BACKENDS, DecodedWindow, LevelInfo, OpenedSlide, SlideInfo, decide_backend, open_file, read_window

__all__ = [
    "ChunkSpec",
    "SlideBackendArray",
    "SlideSource",
    "default_chunk_size",
    "open_pyramid",
    "open_slide",
    "opened_slide_of",
    "pyramid_attrs",
    "slide_array",
    "slide_attrs",
    "slide_dataarray",
]

#: Chunk sides are multiples of this (the reference patch size).
CHUNK_MULTIPLE = 256
#: The default chunk side we aim for (see benchmarks/RESULTS.md).
TARGET_CHUNK = 2048
#: The largest chunk side accepted to keep chunk borders on TIFF tile borders (above it the
#: chunk is a multiple of the patch only).
MAX_ALIGNED_CHUNK = 4 * TARGET_CHUNK
#: The pipeline's chunk side on large levels (:func:`wsi_xr.pipeline.options.run_chunks`):
#: each chunk costs the pipeline a handful of Zarr chunk files written, read back and checked,
#: ~10 ms a chunk, so a 49152² slide ran 17% faster with 4096-px chunks than with 2048
#: (benchmarks/RESULTS.md, "Encoder on every CPU, small jobs, a peer pipeline").
LARGE_LEVEL_CHUNK = 4096
#: A level is large when it holds at least this many :data:`LARGE_LEVEL_CHUNK` chunks (from
#: 32768² on): enough chunks that no core idles long at the end of a run.
LARGE_LEVEL_CHUNKS = 64
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

    def __init__(self, opened: OpenedSlide, level: LevelInfo, device: str, damaged: str, wanted: np.ndarray | None = None) -> None:
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
                self.opened.key,
                self.level,
                y0,
                x0,
                y1 - y0,
                x1 - x0,
                device=self.device,
                damaged=self.damaged,
                damage=damage,
                wanted=self.wanted,
                info=self.opened.info,
            )
        if isinstance(pixels, DecodedWindow):  # damaged="report": the block carries where decoding failed
            return DecodedWindow(pixels.pixels[:, :, cs], pixels.failed, pixels.messages)
        return pixels[:, :, cs]


def _zeros(device: str, shape: tuple[int, ...]) -> Any:
    if device == "cuda":
        import cupy

        return cupy.zeros(shape, dtype=np.uint8)
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), shape)


class SlideBackendArray(BackendArray):
    """One level of a slide for xarray's lazy indexing (``engine="wsi_xr"``).

    Basic indexing (slices, with steps, and integers) reads the window that covers the
    selection, once, with the same reader as :func:`open_slide`'s blocks. xarray wraps it
    (``LazilyIndexedArray``, or a Dask array with ``encoding["preferred_chunks"]`` when
    opened with ``chunks=``). Holds the :class:`OpenedSlide` (a path and decisions, never a
    handle), so it pickles.
    """

    def __init__(self, opened: OpenedSlide, level: int) -> None:
        lv = opened.info.levels[level]
        self.reader = _LevelWindowReader(opened, lv, "cpu", "raise")
        self.shape = (lv.height, lv.width, 3)
        self.dtype = np.dtype(np.uint8)

    @property
    def opened(self) -> OpenedSlide:
        return self.reader.opened

    @property
    def level(self) -> int:
        return self.reader.level

    def __getitem__(self, key: Any) -> Any:
        from xarray.core import indexing

        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        windows: list[tuple[int, int]] = []
        picks: list[Any] = []
        for k, size in zip(key, self.shape):
            if isinstance(k, (int, np.integer)):
                i = int(k) + size if k < 0 else int(k)
                windows.append((i, i + 1))
                picks.append(0)
                continue
            positions = range(*k.indices(size))
            if len(positions) == 0:
                windows.append((0, 0))
                picks.append(slice(None))
                continue
            lo, hi = min(positions[0], positions[-1]), max(positions[0], positions[-1]) + 1
            windows.append((lo, hi))
            first, last = positions[0] - lo, positions[-1] - lo  # relative to the window
            picks.append(slice(first, last + 1 if k.indices(size)[2] > 0 else (last - 1 if last > 0 else None), k.indices(size)[2]))
        (y0, y1), (x0, x1) = windows[0], windows[1]
        if y1 <= y0 or x1 <= x0:
            pixels = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        else:
            pixels = np.asarray(self.reader[(slice(y0, y1), slice(x0, x1), slice(None))])
        return pixels[tuple(picks)]


def _unwrap_source(value: Any, depth: int = 8) -> tuple[OpenedSlide, int] | None:
    """The opened slide and level behind a value of a Dask graph, through xarray's wrappers, if any."""
    for _ in range(depth):
        if isinstance(value, _LevelWindowReader):
            return (value.opened, value.level) if value.wanted is None and value.damaged in ("raise", "fill") else None
        if isinstance(value, SlideBackendArray):
            return value.opened, value.level
        key = getattr(value, "key", None)  # xarray's LazilyIndexedArray: only an unindexed one
        if key is not None and not all(isinstance(k, slice) and k == slice(None) for k in getattr(key, "tuple", ())):
            return None
        value = getattr(value, "array", None)
        if value is None:
            return None
    return None


def _level_shape(opened: OpenedSlide, level: int) -> tuple[int, int, int]:
    lv = opened.info.levels[level]
    return (lv.height, lv.width, 3)


def opened_slide_of(image: xr.DataArray) -> OpenedSlide | None:
    """The :class:`OpenedSlide` an unmodified slide array reads from, else None.

    Found in the array itself, not in any table: its Dask graph holds the reader (which
    holds the opened slide), for :func:`open_slide`'s arrays and for
    ``xr.open_dataarray(path, engine="wsi_xr", chunks=...)`` alike. "Unmodified" means
    the graph is the read and nothing else (any selection or arithmetic adds a layer) and
    the level is the one the attributes name. Lets :func:`wsi_xr.tissue_mask` reuse the
    probe, backend decision and damage scans, and read only what it needs.
    """
    data = image.data
    if not isinstance(data, da.Array):
        return None
    layers = data.dask.layers
    if len(layers) != 2 or data.name not in layers:
        return None
    for name, layer in layers.items():
        if name == data.name:
            continue
        for value in layer.values():
            found = _unwrap_source(value)
            if found is not None and found[1] == image.attrs.get("level") and tuple(data.shape) == _level_shape(found[0], found[1]):
                return found[0]
    return None


def default_chunk_size(level: LevelInfo, multiple: int = CHUNK_MULTIPLE, target: int = TARGET_CHUNK) -> int:
    """Smallest multiple of lcm(TIFF tile, 256, ``multiple``) that is at least ``target``
    (default :data:`TARGET_CHUNK`).

    Every chunk border then falls on a TIFF tile border, so no tile is decoded twice;
    ``multiple`` (a patch side) makes every chunk hold whole patches. When that lcm passes
    :data:`MAX_ALIGNED_CHUNK` (an encoder's 896-px patch on 240-px TIFF tiles: 26880), the
    chunk is a multiple of lcm(256, ``multiple``) only.
    """
    base = math.lcm(CHUNK_MULTIPLE, multiple)
    if level.tiled and level.tile_width == level.tile_height:
        aligned = math.lcm(level.tile_width, base)
        # an encoder's patch (896 = 4 x 224) and Aperio's 240-px tiles meet only every 26880 px:
        # a chunk that large is gigabytes, so such chunks hold whole patches and the TIFF tiles
        # on their borders are decoded twice (see README "Any encoder")
        if aligned <= MAX_ALIGNED_CHUNK:
            base = aligned
    return base * max(1, -(-target // base))


def large_level_chunk(level: LevelInfo, multiple: int = CHUNK_MULTIPLE) -> int | None:
    """The pipeline's chunk side for a large level (:data:`LARGE_LEVEL_CHUNKS` chunks of
    :data:`LARGE_LEVEL_CHUNK` px or more): the smallest multiple of the same alignment as
    :func:`default_chunk_size` that is at least :data:`LARGE_LEVEL_CHUNK`. None for smaller
    levels, and where that alignment would make chunks over 1.5x :data:`LARGE_LEVEL_CHUNK`
    (240-px Aperio tiles: 7680): their default (3840) is large already."""
    if level.height * level.width < LARGE_LEVEL_CHUNKS * LARGE_LEVEL_CHUNK**2:
        return None
    side = default_chunk_size(level, multiple, target=LARGE_LEVEL_CHUNK)
    return side if side <= LARGE_LEVEL_CHUNK * 3 // 2 else None


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
        raise InvalidArgumentError(f"{info.path}: level={level} does not exist; the slide has levels 0..{len(info.levels) - 1}.")
    if device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device={device!r}: use 'cpu' or 'cuda'.")
    if damaged not in DAMAGED_POLICIES:
        raise InvalidArgumentError(f"damaged={damaged!r}: use one of {DAMAGED_POLICIES}.")
    if opened.backend in GPU_BACKENDS and device != "cuda":
        raise InvalidArgumentError(
            f"{info.path}: backend {opened.backend!r} decodes into GPU memory; use device='cuda' with it, or backend='auto' for CPU chunks."
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
    return array


def open_slide(
    path: SlideSource,
    level: int = 0,
    chunks: ChunkSpec = None,
    backend: str = "auto",
    *,
    device: str = "cpu",
    damaged: str = "raise",
    mpp: float | None = None,
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
    mpp
        Microns per level-0 pixel, for a file that lacks it or states it wrongly (None:
        the file's). ``attrs["mpp_source"]`` says which: ``"file"``, ``"user"`` or
        ``"missing"``.

    Returns
    -------
    xr.DataArray
        Named ``image``; coordinates ``y``/``x`` are level-0 pixel offsets, ``c`` is
        ``["R", "G", "B"]``; attrs hold ``mpp``, ``mpp_source``, ``level_mpp``, ``level``,
        ``downsample``, ``backend``, ``vendor``, ``source`` and the file's tile size and
        compression.

    Raises
    ------
    WsiXrError
        The file is missing or unreadable, or an argument is invalid.
    """
    return slide_dataarray(open_file(path, backend, mpp=mpp), level, chunks, device=device, damaged=damaged)


def open_pyramid(path: SlideSource, chunks: ChunkSpec = None, backend: str = "auto", *, device: str = "cpu", mpp: float | None = None) -> xr.DataTree:
    """Open every level of a slide as an ``xr.DataTree``: nodes ``level_0``, ``level_1``, ...

    Each node holds the level's :func:`open_slide` array as variable ``image``; the root
    holds the slide's metadata as attrs. Nothing is read. ``mpp`` as in :func:`open_slide`.
    """
    opened = open_file(path, backend, mpp=mpp)
    info = opened.info
    nodes: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=pyramid_attrs(info))}
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
    data = slide_array(opened, level, chunks, device, damaged)  # validates level and device
    array = xr.DataArray(data, dims=("y", "x", "c"), coords=level_coords(opened.info, level), name="image")
    array.attrs = slide_attrs(opened, level, damaged=damaged)
    array.encoding["source"] = opened.info.path
    return array


def pyramid_attrs(info: SlideInfo) -> dict[str, Any]:
    """The attributes of a pyramid's root (the same for :func:`open_pyramid` and ``engine="wsi_xr"``)."""
    return {"source": info.path, "vendor": info.vendor, "mpp": info.mpp, "mpp_source": info.mpp_source, "levels": len(info.levels)}


def slide_attrs(opened: OpenedSlide, level: int, *, damaged: str = "raise") -> dict[str, Any]:
    """The attributes of one level's image array (the same for :func:`open_slide` and ``engine="wsi_xr"``)."""
    info = opened.info
    lv = info.levels[level]
    return {
        "source": info.path,
        "vendor": info.vendor,
        "format": info.format,
        "backend": opened.backend,
        "level": level,
        "downsample": lv.downsample,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "level_mpp": None if info.mpp is None else info.mpp * lv.downsample,
        "tile_size": [lv.tile_height, lv.tile_width],
        "compression": lv.compression_name,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "damaged": damaged,
    }
