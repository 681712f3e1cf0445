"""Output paths: what wsi_xr may write, and what it may replace.

wsi_xr never loses a user's data: it replaces only what it wrote. A file output replaces
an existing file only when that file is of the kind wsi_xr writes there (a Parquet file by
a Parquet file, a PNG by a PNG...), and never a folder. Zarr stores are checked in
:mod:`wsi_xr.store` (``check_output``, ``foreign_content``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import cast

from wsi_xr.errors import StoreError

__all__ = ["FILE_SIGNATURES", "check_output_file", "check_parent", "looks_like"]


def check_parent(out: Path) -> None:
    """Raise :class:`StoreError` unless the folder that will hold ``out`` exists and is writable."""
    parent = out.resolve().parent
    if not parent.is_dir():
        raise StoreError(f"{out}: the folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"{out}: the folder {parent} is not writable; choose another output path.")
    try:  # os.access says yes to root everywhere, and to /proc: really try
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise StoreError(f"{out}: the folder {parent} is not writable ({err.strerror}); choose another output path.") from err


#: First bytes of the files wsi_xr writes, by kind.
FILE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "parquet": (b"PAR1",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "weights": (b"PK\x03\x04", b"\x80"),  # torch.save: a zip archive (or a legacy pickle)
    "json": (b"{",),
    "tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}
#: The Software text wsi_xr puts in its PNG figures.
PNG_SOFTWARE = "wsi_xr"


def looks_like(path: Path, kind: str) -> bool:
    """Whether the existing file ``path`` is a ``kind`` file that wsi_xr wrote.

    Recognised by content, never by name: a Parquet file of tile rows (wsi_xr's schema
    metadata, or the columns ``x, y, latent_0...`` of earlier versions), a PNG whose
    Software text is wsi_xr's (or matplotlib's, as 0.2.0 wrote), a weights file with wsi_xr's
    metadata block, an ``eval-vae`` or ``bench`` JSON report, a synthetic slide (its description says so).
    A real slide, a user's own model or figure or table is never replaced.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        raise StoreError(f"{path}: cannot read the existing file ({err.strerror or err}); choose another output path.") from err
    if kind == "json":
        head = head.lstrip()
    if not head.startswith(FILE_SIGNATURES[kind]):
        return False
    try:
        return _RECOGNISE[kind](path)
    except Exception:  # unreadable or not what it seemed: not ours
        return False


def _parquet_is_ours(path: Path) -> bool:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if schema.metadata and b"wsi_xr" in schema.metadata:
        return True
    names = [n for n in schema.names if n != "slide"]
    return names[:3] == ["x", "y", "latent_0"] and all(n.startswith("latent_") for n in names[2:])


def _png_is_ours(path: Path) -> bool:
    data = Path(path).read_bytes()[:65536]
    return b"Software\x00" + PNG_SOFTWARE.encode() in data or b"Software\x00Matplotlib" in data or b"Software\x00matplotlib" in data


def _weights_are_ours(path: Path) -> bool:
    from wsi_xr.models.weights import is_weights_file, read_metadata

    return is_weights_file(path) and bool(read_metadata(path))


def _json_is_ours(path: Path) -> bool:
    import json

    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        return False
    return {"weights", "overall"} <= set(doc) or {"slide", "results", "context"} <= set(doc)  # eval-vae, bench


def _tiff_is_ours(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return str(cast("tifffile.TiffPage", tif.pages[0]).description).startswith("wsi_xr synthetic slide")


_RECOGNISE = {"parquet": _parquet_is_ours, "png": _png_is_ours, "weights": _weights_are_ours, "json": _json_is_ours, "tiff": _tiff_is_ours}


def check_output_file(path: str | os.PathLike[str], kind: str) -> Path:
    """Check an output file path: new, or an existing ``kind`` file that wsi_xr wrote (:func:`looks_like`).

    A folder is never replaced by a file, and any other file (a document at the path of a
    figure, a real slide at the path of a synthetic one) is never overwritten. The parent
    folder must be writable.
    """
    out = Path(path)
    if out.is_dir():
        raise StoreError(f"{out}: is a folder; wsi_xr writes a {kind} file here and never replaces a folder. Give a file path.")
    if out.exists() and not looks_like(out, kind):
        raise StoreError(
            f"{out}: exists and is not a {kind} file that wsi_xr wrote; wsi_xr replaces only its own outputs. Choose another output path."
        )
    check_parent(out)
    return out
