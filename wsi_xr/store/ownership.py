"""What wsi_xr wrote, and what it may replace: store markers, foreign content, atomic swaps.

wsi_xr's stores are Zarr v3 groups marked by their attributes (a run, a cohort, a mask),
holding only Zarr arrays (metadata and chunk keys) and, for a cohort, slide groups of the
same kind. Anything else in a folder is a user's, and is never replaced, even with
``--overwrite``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_xr._failpoints import failpoint
from wsi_xr.errors import StoreError
from wsi_xr.outputs import check_parent
from wsi_xr.store.attrs import decode_attrs

if TYPE_CHECKING:
    pass
from wsi_xr.store.lock import StoreLock

#: Version of the pipeline store layout. 1: wsi_xr 0.1.0 (``latent`` dimension, unindexed
#: chunk bookkeeping); 2: ``feature`` dimension, every dimension indexed.
LAYOUT_VERSION = 2


#: The attribute holding a run's fingerprint (the parameters that define its results).
RUN_ATTR = "wsi_xr_run"


#: The attribute marking the root group of a cohort store.
COHORT_ATTR = "wsi_xr_cohort"


#: The attribute marking a tissue-mask store (``wsi-xr mask``, :func:`write_zarr`).
MASK_ATTR = "wsi_xr_mask"


#: What a Zarr v3 array's folder holds: its metadata and its chunks.
_ARRAY_ENTRIES = {"zarr.json", "c"}


#: Hidden entries wsi_xr itself leaves inside a cohort store: half-built and replaced slide groups.
_OUR_TEMPORARY = re.compile(r"^\..+\.(creating|replaced|partial)-[0-9a-f]{8}$")


#: A file zarr was writing when its process was killed (it writes ``<name>.<uuid>.partial``, then renames).
_ZARR_PARTIAL = re.compile(r"^(\d+|zarr)\.[0-9a-f]{32}\.partial$")


def _zarr_attrs(folder: Path) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 group at ``folder`` (decoded: :func:`~wsi_xr.store.attrs.decode_attrs`,
    so a run fingerprint is a dict whichever release wrote it), or None when it is not one."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("node_type") != "group":
        return None
    try:
        return decode_attrs(doc.get("attributes") or {})
    except StoreError as err:
        raise StoreError(f"{meta}: {err}") from err


def _zarr_node(folder: Path) -> str | None:
    """``"array"`` or ``"group"`` for a Zarr v3 node folder, else None."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError):
        return None


def _holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(True for _ in folder.iterdir())


def _is_our_group(folder: Path, attrs: dict[str, Any] | None) -> bool:
    if attrs is None:
        return False
    if RUN_ATTR in attrs or COHORT_ATTR in attrs or MASK_ATTR in attrs:
        return True
    if {"tile", "patch", "threshold_method", "patches_total"} <= set(attrs):
        return True  # a mask store written before the marker (0.1.0, 0.2.0): the mask's own attributes
    if "slides" in attrs:  # a 0.1.0 cohort: slide groups with run fingerprints
        return any(RUN_ATTR in (_zarr_attrs(child) or {}) for child in folder.iterdir() if child.is_dir())
    return False


def _chunk_keys_only(folder: Path) -> str | None:
    """The first entry under an array's ``c/`` folder that is not a chunk key (digits) or zarr's own
    half-written chunk, or None."""
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if not name.isdigit() and not _ZARR_PARTIAL.match(name):
                return str(Path(root) / name)
    return None


def foreign_content(folder: Path) -> str | None:
    """What in ``folder`` wsi_xr did not write (a path, for the message), or None.

    wsi_xr's stores are Zarr v3 groups marked by their attributes (a run, a cohort, a
    mask), holding only Zarr arrays (metadata and chunk folders) and, for a cohort, slide
    groups of the same kind. Hidden entries beside a group are wsi_xr's temporaries. An
    empty folder holds nothing foreign.
    """
    if not folder.is_dir():
        return str(folder)
    if not _holds_anything(folder):
        return None
    attrs = _zarr_attrs(folder)
    if not _is_our_group(folder, attrs):
        first = sorted(p.name for p in folder.iterdir())[0]
        return f"{folder / first}" if attrs is None else f"{folder / 'zarr.json'}: a Zarr group that is not a wsi_xr store"
    for child in sorted(folder.iterdir()):
        if child.name == "zarr.json" or _ZARR_PARTIAL.match(child.name):
            continue
        if not child.is_dir():
            return str(child)
        if _OUR_TEMPORARY.match(child.name):
            inner = foreign_content(child) if _zarr_attrs(child) is not None else None
            if inner is not None:
                return inner
            continue  # wsi_xr's own half-built or replaced group
        meta = _zarr_node(child)
        if meta == "array":
            extra = sorted(name for name in set(p.name for p in child.iterdir()) - _ARRAY_ENTRIES if not _ZARR_PARTIAL.match(name))
            if extra:
                return str(child / extra[0])
            if (child / "c").is_dir():  # a 0-d array's one chunk is the file "c"
                stray = _chunk_keys_only(child / "c")
                if stray is not None:
                    return stray
        elif meta == "group":
            inner = foreign_content(child)
            if inner is not None:
                return inner
        else:
            return str(child)
    return None


def check_output(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Check an output Zarr store path: a new path, or (with ``overwrite``) a store wsi_xr wrote.

    A folder holding anything that wsi_xr did not write is refused even with ``overwrite``
    (:func:`foreign_content` names it); so is a file. The parent folder must be writable.
    """
    out = Path(path)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise StoreError(f"{out}: is a file, not a Zarr store folder; choose another output path.")
    if out.exists():
        foreign = foreign_content(out)
        if foreign is not None:
            raise StoreError(
                f"{out}: holds data that wsi_xr did not write ({foreign}); wsi_xr replaces only stores it wrote. Choose another output path."
            )
        if not overwrite:
            raise StoreError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it.")
        StoreLock(out).check()  # a run writing this store right now
    check_parent(out)
    return out


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.creating-{uuid.uuid4().hex[:8]}"


def swap_in(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` (atomic rename); a store already there is replaced.

    The old store is renamed aside first and deleted only once ``new`` is in place; if the
    second rename fails or is interrupted (Ctrl-C, SIGTERM), the old store is put back.
    """
    if not target.exists():
        os.rename(new, target)
        return
    trash = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(target: Path) -> None:
    """Delete half-built groups that a killed run left beside ``target`` (hold the lock first)."""
    for stale in target.parent.glob(f".{target.name}.creating-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_then_rename(target: Path, build: Any) -> None:
    """Build a Zarr group in a temporary folder with ``build(group)``, then rename it to ``target``.

    The rename is atomic: ``target`` either does not exist or is complete and carries
    its wsi_xr attributes, whatever moment the process is killed at.
    """
    import zarr

    temp = _temp_name(target)
    try:
        group = zarr.open_group(temp, mode="w", zarr_format=3)
        failpoint("create-begin")
        build(group)
        failpoint("create-rename")
        swap_in(temp, target)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
