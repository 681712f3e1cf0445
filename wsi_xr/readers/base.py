"""The reader interface, the per-process handle cache and read accounting.

A reader decodes one rectangular window of one level into an ``(h, w, 3)`` uint8
array. Dask tasks never carry reader objects: they carry a :class:`ReaderKey` (path,
file size, mtime, backend) and look the handle up in this process's cache, so graphs
pickle and run on any cluster, and a file that changes on disk gets a fresh handle.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np


@dataclass(frozen=True)
class ReaderKey:
    """Everything a task needs to find (or open) a reader in the current process."""

    path: str
    file_size: int
    mtime_ns: int
    backend: str


class DecoderComplaint(Exception):
    """The decoder reported a problem (by printing, not raising) while it decoded a window.

    Raised by a reader's ``read`` with the ``pixels`` it got (some may be wrong), the
    decoder's ``message``, and whether the message is surely this call's (``alone``: no
    other decode ran at the same time). Never leaves wsi_xr: :func:`wsi_xr.readers.read_window`
    finds the tiles that fail when decoded one at a time.
    """

    def __init__(self, message: str, pixels: np.ndarray, alone: bool) -> None:
        super().__init__(message)
        self.message = message
        self.pixels = pixels
        self.alone = alone


class Reader(Protocol):
    """One open slide file, able to decode windows of any level."""

    name: ClassVar[str]

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode the window ``[y:y+height, x:x+width]`` of ``level`` (level pixels).

        The window lies inside the level. Returns uint8 ``(height, width, 3)``.
        """
        ...

    def close(self) -> None:
        """Release the file handle."""
        ...


class HandleCache:
    """A small, thread-safe LRU of open readers for this process, keyed by :class:`ReaderKey`."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[ReaderKey, Reader] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0

    def get(self, key: ReaderKey, open_reader: Callable[[ReaderKey], Reader]) -> Reader:
        """Return the cached reader for ``key``, opening it with ``open_reader`` if needed.

        A cached reader whose ``usable`` attribute is False (an OpenSlide handle after an
        error: its errors latch) is dropped and the file opened again.
        """
        with self._lock:
            reader = self._items.get(key)
            if reader is not None and getattr(reader, "usable", True) is False:
                del self._items[key]
                reader = None
            if reader is not None:
                self._items.move_to_end(key)
                return reader
            reader = open_reader(key)
            self.opened += 1
            self._items[key] = reader
            while len(self._items) > self.capacity:
                _, old = self._items.popitem(last=False)
                old.close()
            return reader

    def evict(self, key: ReaderKey) -> bool:
        """Forget the reader of ``key`` (the next :meth:`get` opens the file again).

        The reader is not closed here: another thread may be reading with it. Readers
        release their handle when the last reference goes. Returns whether it was cached.
        """
        with self._lock:
            return self._items.pop(key, None) is not None

    def clear(self) -> None:
        """Close every cached reader."""
        with self._lock:
            for reader in self._items.values():
                reader.close()
            self._items.clear()


@dataclass
class ReadStats:
    """Counters of reader activity in this process (for tests and benchmarks).

    ``pixels_requested`` counts the pixels of the windows asked for;
    ``pixels_decoded`` counts the pixels of every TIFF tile those windows touch (a
    tile shared by two windows counts twice), so ``decoded / requested`` is the
    redundant-decode factor.
    """

    calls: int = 0
    pixels_requested: int = 0
    pixels_decoded: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        return {"calls": self.calls, "pixels_requested": self.pixels_requested, "pixels_decoded": self.pixels_decoded}


_stats = ReadStats()
_stats_lock = threading.Lock()


def record_read(pixels_requested: int, pixels_decoded: int) -> None:
    """Add one reader call to this process's :class:`ReadStats`."""
    with _stats_lock:
        _stats.calls += 1
        _stats.pixels_requested += pixels_requested
        _stats.pixels_decoded += pixels_decoded


def read_stats() -> ReadStats:
    """A snapshot of this process's read counters."""
    with _stats_lock:
        return ReadStats(_stats.calls, _stats.pixels_requested, _stats.pixels_decoded)


def reset_read_stats() -> None:
    """Zero this process's read counters."""
    with _stats_lock:
        _stats.calls = _stats.pixels_requested = _stats.pixels_decoded = 0


def decoded_pixels(y: int, x: int, height: int, width: int, tile_h: int, tile_w: int, level_h: int, level_w: int) -> int:
    """Pixels of the file tiles that the window touches, clipped to the level.

    For a stripped level (tile size 0) the window itself is counted.
    """
    if tile_h <= 0 or tile_w <= 0:
        return height * width

    def span(start: int, size: int, tile: int, limit: int) -> int:
        first = (start // tile) * tile
        last = min(-(-(start + size) // tile) * tile, limit)
        return last - first

    return span(y, height, tile_h, level_h) * span(x, width, tile_w, level_w)
