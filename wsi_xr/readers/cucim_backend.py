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

import math
import threading
from typing import ClassVar

import numpy as np

from wsi_xr.readers.base import DecoderComplaint
from wsi_xr.readers.cstdio import c_output, decoder_error
from wsi_xr.readers.probe import SlideInfo


class CuCIMReader:
    """Reads windows with ``cucim.CuImage`` (CPU decode)."""

    name: ClassVar[str] = "cucim"

    def __init__(self, info: SlideInfo) -> None:
        # imported here: importing cucim costs ~0.5 s. cucim exports CuImage, but its stub
        # (__init__.pyi) builds __all__ at run time, so mypy does not see the export.
        from cucim import CuImage  # type: ignore[attr-defined]

        if not info.cucim_safe:
            raise ValueError(f"{info.path}: not safe for cuCIM: {info.cucim_unsafe_reason}")
        self.info = info
        with c_output():  # e.g. "[Warning] Loading image(...) with a slow-path": logged, not printed
            self._image = CuImage(info.path)
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
