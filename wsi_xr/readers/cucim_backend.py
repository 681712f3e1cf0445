"""cuCIM reader: ``CuImage.read_region`` releases the GIL and decodes fast.

Only files that :func:`wsi_xr.readers.probe.probe` marked ``cucim_safe`` may be opened
here; cuCIM crashes the process on some others.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from wsi_xr.readers.probe import SlideInfo


class CuCIMReader:
    """Reads windows with ``cucim.CuImage`` (CPU decode, or GPU with ``device="cuda"``)."""

    name: ClassVar[str] = "cucim"

    def __init__(self, info: SlideInfo) -> None:
        from cucim import CuImage  # imported here: importing cucim costs ~0.5 s

        if not info.cucim_safe:
            raise ValueError(f"{info.path}: not safe for cuCIM: {info.cucim_unsafe_reason}")
        self.info = info
        self._image = CuImage(info.path)
        self._downsamples = tuple(float(d) for d in self._image.resolutions["level_downsamples"])

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode a window of ``level`` into host memory."""
        region = self._read(level, y, x, height, width, device="cpu")
        return np.asarray(region)[..., :3]

    def read_device(self, level: int, y: int, x: int, height: int, width: int) -> Any:
        """Decode a window of ``level`` straight into GPU memory; returns a CuPy array."""
        import cupy

        region = self._read(level, y, x, height, width, device="cuda")
        return cupy.asarray(region)[..., :3]

    def _read(self, level: int, y: int, x: int, height: int, width: int, *, device: str) -> Any:
        # cuCIM takes the location in level-0 pixels and the size in level pixels; it
        # finds the level pixel as floor(location / downsample) with its own (mean)
        # downsample, so the smallest location that maps to (x, y) is ceil(x * ds).
        ds = self._downsamples[level]
        location = (math.ceil(x * ds), math.ceil(y * ds))
        return self._image.read_region(location, (width, height), level=level, device=device)

    def close(self) -> None:
        """Drop the CuImage (cuCIM closes the file when it is collected)."""
        self._image = None
