"""Slide readers: a safe probe, the backends, one opened-slide object, window decoding.

- :func:`probe` inspects a file without decoding pixels (:mod:`.probe`);
- :func:`decide_backend` picks the reader and says why (:mod:`.backends`);
- :func:`open_file` does both once and returns an :class:`OpenedSlide` that every later
  step takes (:mod:`.opened`);
- :func:`read_window` is what every Dask read task calls (:mod:`.windows`);
- :mod:`.integrity` finds damaged TIFF tiles from the file structure.
"""

from __future__ import annotations

from wsi_xr.readers.backends import AUTO_ORDER, BACKENDS, GPU_BACKENDS, BackendChoice, choose_backend, decide_backend, reader_key
from wsi_xr.readers.base import HandleCache, Reader, ReaderKey, ReadStats, decoded_pixels, read_stats, record_read, reset_read_stats
from wsi_xr.readers.integrity import SegmentGrid, scan_level
from wsi_xr.readers.opened import OpenedSlide, open_file
from wsi_xr.readers.probe import LevelInfo, SlideInfo, check_path, probe
from wsi_xr.readers.windows import (
    DAMAGED_POLICIES,
    DecodedWindow,
    clear_caches,
    damaged_segments,
    get_reader,
    handle_cache,
    level_damage,
    open_reader,
    read_window,
    trace_reads,
    unpack_window,
    window_rectangles,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "DAMAGED_POLICIES",
    "GPU_BACKENDS",
    "BackendChoice",
    "DecodedWindow",
    "HandleCache",
    "LevelInfo",
    "OpenedSlide",
    "ReadStats",
    "Reader",
    "ReaderKey",
    "SegmentGrid",
    "SlideInfo",
    "check_path",
    "choose_backend",
    "clear_caches",
    "damaged_segments",
    "decide_backend",
    "decoded_pixels",
    "get_reader",
    "handle_cache",
    "level_damage",
    "open_file",
    "open_reader",
    "probe",
    "read_stats",
    "read_window",
    "reader_key",
    "record_read",
    "reset_read_stats",
    "scan_level",
    "trace_reads",
    "unpack_window",
    "window_rectangles",
]
