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


#: First bytes of the files wsi_xr writes, by kind: an existing file is replaced only when it is of that kind.
FILE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "parquet": (b"PAR1",),
    "png": (b"\x89PNG\r\n\x1a\n",),
    "weights": (b"PK\x03\x04", b"\x80"),  # torch.save: a zip archive (or a legacy pickle)
    "json": (b"{", b"["),
    "tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}


def looks_like(path: Path, kind: str) -> bool:
    """Whether the existing file ``path`` is a ``kind`` file by its first bytes (a weights file: by its layout too)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as err:
        raise StoreError(f"{path}: cannot read the existing file ({err.strerror or err}); choose another output path.") from err
    if kind == "json":
        head = head.lstrip()
    if not head.startswith(FILE_SIGNATURES[kind]):
        return False
    if kind == "weights":
        from wsi_xr.models.weights import is_weights_file

        return is_weights_file(path)
    return True


def check_output_file(path: str | os.PathLike[str], kind: str) -> Path:
    """Check an output file path: new, or an existing file of ``kind`` (see :data:`FILE_SIGNATURES`).

    A folder is never replaced by a file, and a file of another kind (a document at the
    path of a figure, say) is never overwritten. The parent folder must be writable.
    """
    out = Path(path)
    if out.is_dir():
        raise StoreError(f"{out}: is a folder; wsi_xr writes a {kind} file here and never replaces a folder. Give a file path.")
    if out.exists() and not looks_like(out, kind):
        raise StoreError(
            f"{out}: exists and is not a {kind} file; wsi_xr replaces only files of the kind it writes. "
            "Choose another output path."
        )
    check_parent(out)
    return out
