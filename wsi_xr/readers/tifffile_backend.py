"""tifffile reader: decodes any TIFF that tifffile/imagecodecs understand.

It is the fallback for files cuCIM cannot read safely (Deflate, LZW, JPEG 2000, YCbCr
JPEG under an RGB tag, ...) and the second opinion the tests compare cuCIM with. A
window decodes only the TIFF tiles (or strips) it touches, through tifffile's Zarr view.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tifffile
import zarr

from wsi_xr.readers.probe import SlideInfo


class TifffileReader:
    """Reads windows through ``tifffile.TiffFile.series[0].levels[level].aszarr()``."""

    name: ClassVar[str] = "tifffile"

    def __init__(self, info: SlideInfo) -> None:
        self.info = info
        self._file = tifffile.TiffFile(info.path)
        series = self._file.series[0]
        self._levels = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]

    def read(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Decode a window of ``level``; drops any alpha channel."""
        window = self._levels[level][y : y + height, x : x + width]
        return np.ascontiguousarray(np.asarray(window)[..., :3])

    def close(self) -> None:
        """Close the TIFF file handle."""
        self._file.close()
