"""A slide's identity from its content, cheap enough to take at every run's start and end.

Path, size and modification time do not identify a slide: another slide of the same size
can be put in its place with its mtime set back, or a slide can be rewritten in place during
a run. :func:`content_fingerprint` hashes what the file's pixels are made of, without
decoding them:

- TIFF-based files (what tifffile reads): every page's tile (or strip) table, offsets and byte
  counts, and 32 bytes from the middle of every tile's compressed data (one ``pread`` a tile);
- other files (OpenSlide's formats): the size, the first and last MiB, and 64 blocks of
  4 KiB spread evenly through the file.

A different slide changes its tile tables almost surely (JPEG tiles of other pixels have other
byte counts), and a tile rewritten in place changes its bytes. What it cannot see: a change
confined to bytes that no sample covers in a file whose tile tables stayed the same.
"""

from __future__ import annotations

import hashlib
import os

from wsi_xr.readers.probe import SlideInfo

__all__ = ["content_fingerprint"]

#: Bytes hashed from the middle of each TIFF tile's data.
TILE_SAMPLE = 32
#: Blocks sampled from files that are not TIFF-based.
BLOCKS, BLOCK = 64, 4096


def _tiff_fingerprint(path: str, digest: hashlib._Hash) -> None:
    import numpy as np
    import tifffile

    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        fd = fh.fileno()
        for series in tif.series:
            for level in series.levels:
                for page in level.pages:
                    if page is None:
                        continue
                    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                    counts = np.asarray(page.databytecounts, dtype=np.int64)
                    digest.update(offsets.tobytes())
                    digest.update(counts.tobytes())
                    for offset, count in zip(offsets.tolist(), counts.tolist()):
                        if count > 0:
                            digest.update(os.pread(fd, min(TILE_SAMPLE, count), offset + max(0, count // 2 - TILE_SAMPLE // 2)))


def _sampled_fingerprint(path: str, size: int, digest: hashlib._Hash) -> None:
    with open(path, "rb") as fh:
        fd = fh.fileno()
        digest.update(os.pread(fd, 1 << 20, 0))
        digest.update(os.pread(fd, 1 << 20, max(0, size - (1 << 20))))
        for i in range(BLOCKS):
            digest.update(os.pread(fd, BLOCK, (size - BLOCK) * i // max(1, BLOCKS - 1) if size > BLOCK else 0))


def content_fingerprint(info: SlideInfo) -> str:
    """SHA-256 (hex) of the slide's content, as the module docstring says (reads no pixels)."""
    digest = hashlib.sha256()
    size = os.stat(info.path).st_size
    digest.update(str(size).encode())
    if info.problem("tifffile") is None:
        _tiff_fingerprint(info.path, digest)
    else:
        _sampled_fingerprint(info.path, size, digest)
    return digest.hexdigest()
