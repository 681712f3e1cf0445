"""cuCIM reader: ``CuImage.read_region`` releases the GIL and decodes fast.

Only files that :func:`wsi_xr.readers.probe.probe` marked ``cucim_safe`` may be opened
here; cuCIM crashes the process on some others.

GPU chunks are decoded on the CPU and copied to the device. Measured on an H100 host
(benchmarks/RESULTS.md): cuCIM's own GPU decode (``device="cuda"``) ran at 16 MP/s
against 1466 MP/s for CPU decode on 16 threads, returned JPEG pixels that differ from
the CPU decode by up to 24 levels, and aborted the process on uncompressed tiles
("Unsupported compression method").

Stripped (not tiled) levels are read one call at a time per file: two threads reading
windows of a stripped, uncompressed TIFF through one ``CuImage`` at once got wrong
pixels back (zeros, libtiff's "DumpModeDecode: Not enough data for scanline 0"),
without an error. Tiled levels are read concurrently.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from typing import Any, ClassVar

import numpy as np

from wsi_xr.readers.base import DecoderComplaint
from wsi_xr.readers.cstdio import c_output, decoder_error, fd_output_captured
from wsi_xr.readers.probe import SlideInfo

log = logging.getLogger("wsi_xr.thirdparty")

#: Whether this process has imported cuCIM and opened a first ``CuImage`` (see ``_open``).
_started = False
_start_lock = threading.Lock()


def _cufile_loaded() -> bool:
    """Whether ``libcufile`` is mapped into this process (a CUDA build of torch loads it); True when unknown."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "libcufile" in maps.read()
    except OSError:
        return True


def _open(path: str) -> Any:
    """``cucim.CuImage(path)``, with the process's first import and open kept quiet.

    With ``libcufile`` already loaded (a CUDA build of torch imported first), cuCIM's first
    import and open start cuFile and, with no GPU driver, print "cuFile initialization
    failed" partly past :func:`c_output` (through ``std::cout``) and write ``cufile.log``
    into the current directory: once per process. Only then, that first open runs inside
    :func:`fd_output_captured` (the noise is logged, ``wsi-xr -v``; anything else printed
    meanwhile is passed on) and, unless the user chose a place for it
    (``CUFILE_LOGFILE_PATH``), with cuFile's log in a temporary folder whose lines join the
    same log: no file is left behind, and the variable is removed again.
    """
    global _started
    if not _started:
        with _start_lock:
            if not _started:
                image = _first_open(path) if _cufile_loaded() else _open_plainly(path)
                _started = True
                return image
    return _open_plainly(path)


def _first_open(path: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="wsi_xr-cufile-") as folder:
        cufile_log = os.path.join(folder, "cufile.log")
        chosen = os.environ.get("CUFILE_LOGFILE_PATH")
        if chosen is None:
            os.environ["CUFILE_LOGFILE_PATH"] = cufile_log
        try:
            # c_output outside: its own log records are written after the descriptors are back
            with c_output(), fd_output_captured():
                from cucim import CuImage  # type: ignore[attr-defined]

                image = CuImage(path)
        finally:
            if chosen is None:
                os.environ.pop("CUFILE_LOGFILE_PATH", None)
        if os.path.exists(cufile_log):
            with open(cufile_log, encoding="utf-8", errors="replace") as written:
                for line in written.read().splitlines():
                    if line.strip():
                        log.info("cufile: %s", line.strip())
    return image


def _open_plainly(path: str) -> Any:
    # imported here: importing cucim costs ~0.5 s. cucim exports CuImage, but its stub
    # (__init__.pyi) builds __all__ at run time, so mypy does not see the export.
    with c_output():  # e.g. "[Warning] Loading image(...) with a slow-path": logged, not printed
        from cucim import CuImage  # type: ignore[attr-defined]

        return CuImage(path)


class CuCIMReader:
    """Reads windows with ``cucim.CuImage`` (CPU decode)."""

    name: ClassVar[str] = "cucim"

    def __init__(self, info: SlideInfo) -> None:
        if not info.cucim_safe:
            raise ValueError(f"{info.path}: not safe for cuCIM: {info.cucim_unsafe_reason}")
        self.info = info
        self._image: Any = _open(info.path)
        self._downsamples = tuple(float(d) for d in self._image.resolutions["level_downsamples"])
        self._stripped = frozenset(lv.index for lv in info.levels if not lv.tiled)
        self._strip_lock = threading.Lock()

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode a window of ``level`` into host memory."""
        # cuCIM takes the location in level-0 pixels and the size in level pixels; it
        # finds the level pixel as floor(location / downsample) with its own (mean)
        # downsample, so the smallest location that maps to (x, y) is ceil(x * ds).
        ds = self._downsamples[level]
        location = (math.ceil(x * ds), math.ceil(y * ds))
        with c_output() as captured:
            if level in self._stripped:
                with self._strip_lock:
                    pixels = np.array(self._image.read_region(location, (width, height), level=level))[..., :3]
            else:
                pixels = np.asarray(self._image.read_region(location, (width, height), level=level))[..., :3]
        if captured.text and decoder_error(captured.text):
            raise DecoderComplaint(captured.text, pixels, captured.alone)
        return pixels

    def decode_failures(self, level: int, windows: list[tuple[int, int, int, int]]) -> list[tuple[int, str]]:
        """Decode each window alone, with no other decode running: ``(index, message)`` of those the decoder complains about.

        Used to find which file tiles of a window made the decoder print an error (each
        window is one file tile); slow, and only run after a complaint.
        """
        failures = []
        ds = self._downsamples[level]
        for index, (y, x, height, width) in enumerate(windows):
            with c_output(exclusive=True) as captured:
                self._image.read_region((math.ceil(x * ds), math.ceil(y * ds)), (width, height), level=level)
            if captured.text and decoder_error(captured.text):
                failures.append((index, captured.text))
        return failures

    def close(self) -> None:
        """Drop the CuImage (cuCIM closes the file when it is collected)."""
        self._image = None
