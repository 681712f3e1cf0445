"""Zarr output: the pipeline's store layout (created atomically, resumable), the mask
writer, Parquet export, the store lock, and the migration of 0.1.0 stores.

Layout of one slide (a group; a cohort has one per slide), see README "Output layout":
every dimension has a 1-D index variable of its own name (level-0 pixel origins for
``tile_*``, ``patch_*`` and ``chunk_*``; ``0..k-1`` for ``feature``), and no other
variable shares a name with a dimension, so ``sel`` works on every axis.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import xarray as xr

from wsi_xr._failpoints import failpoint
from wsi_xr.errors import StoreError
from wsi_xr.outputs import check_output_file, check_parent

if TYPE_CHECKING:
    import zarr


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


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array member ``name`` of ``group`` (Zarr types a member as an array or a group)."""
    return cast("zarr.Array", group[name])


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """All of the array member ``name`` of ``group``, read into memory."""
    return cast(np.ndarray, zarr_array(group, name)[...])


def json_safe_attrs(attrs: dict) -> dict:
    """Attrs that Zarr can store as JSON (None stays None, numpy scalars become Python)."""
    safe = {}
    for key, value in attrs.items():
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()
        safe[key] = value
    return safe


def write_zarr(ds: xr.Dataset, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``ds`` to a Zarr v3 store (compressed, consolidated), all or nothing.

    The store is written under a temporary name beside ``path`` and renamed into place
    only when complete, so an interrupted write never leaves a store that looks whole.
    """
    out = check_output(path, overwrite=overwrite)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    ds = ds.copy()
    ds.attrs = json_safe_attrs({**ds.attrs, MASK_ATTR: {"layout": LAYOUT_VERSION}})
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds.to_zarr(partial, mode="w-", zarr_format=3, consolidated=True)
        with StoreLock(out):  # never under a run that is writing this store
            if out.exists() and foreign_content(out) is not None:  # changed since the check
                raise StoreError(f"{out}: holds data that wsi_xr did not write ({foreign_content(out)}); nothing was replaced.")
            swap_in(partial, out)
    except OSError as err:
        raise StoreError(f"{out}: could not write the store ({err}); a store that was there is unchanged.") from err
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return out


def open_store(path: str | os.PathLike[str], group: str | None = None) -> xr.Dataset:
    """Open a store written by wsi_xr (one slide, or one ``group`` of a cohort)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such store. Check the path.")
    try:
        return xr.open_zarr(p, group=group, consolidated=None)
    except Exception as err:
        raise StoreError(f"{p}: not a readable wsi_xr Zarr store ({type(err).__name__}: {err}).") from err


# --------------------------------------------------------------------------------------
# The pipeline's store: chunk-by-chunk region writes with completion bookkeeping.
# --------------------------------------------------------------------------------------


def consolidate(store: str | os.PathLike[str]) -> None:
    """Consolidate a store's metadata (zarr warns that v3 has no spec for it yet)."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(store)


class StoreLock:
    """An exclusive lock on a store: a file beside it (``.NAME.lock``) holding the owner's PID and host.

    A second run finds the file and refuses while the owner lives; a lock left by a
    killed run (its PID is gone) is taken over.
    """

    def __init__(self, store: Path) -> None:
        self.path = store.parent / f".{store.name}.lock"
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the owner."""
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.exists() else ""
                pid_text, _, host = owner.partition(" ")
                if host == socket.gethostname() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
                    self.path.unlink(missing_ok=True)  # stale: its run was killed
                    continue
                raise StoreError(
                    f"{self.path.parent}: in use by another wsi_xr run (PID {pid_text or '?'} on {host or '?'}). "
                    f"Wait for it to finish, or delete {self.path} if that run is gone."
                ) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return
        raise StoreError(f"{self.path.parent}: could not take the lock {self.path}.")

    def check(self) -> None:
        """Raise :class:`StoreError` when a live run holds the lock (read-only: for checks before any work)."""
        import socket

        if not self.path.exists():
            return
        try:
            owner = self.path.read_text().strip()
        except OSError:
            return
        pid_text, _, host = owner.partition(" ")
        if host == socket.gethostname() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            return  # stale: taken over by acquire()
        raise StoreError(
            f"{self.path.parent}: in use by another wsi_xr run (PID {pid_text or '?'} on {host or '?'}). "
            f"Wait for it to finish, or delete {self.path} if that run is gone."
        )

    def release(self) -> None:
        """Give the lock back."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------
# The pipeline's store layout, created atomically so that a store is recognisable as
# wsi_xr's from the moment it exists.
# --------------------------------------------------------------------------------------

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


#: A file zarr was writing when its process was killed (it writes ``<name>.<uuid>.partial``, then renames).
_ZARR_PARTIAL = re.compile(r"^(\d+|zarr)\.[0-9a-f]{32}\.partial$")


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


def _zarr_node(folder: Path) -> str | None:
    """``"array"`` or ``"group"`` for a Zarr v3 node folder, else None."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class SlideLayout:
    """Shapes, chunking and index values of one slide's group in a pipeline store.

    Attributes
    ----------
    tile_y, tile_x, patch_y, patch_x, chunk_y, chunk_x
        Level-0 pixel origins: the index of each dimension.
    tile_chunks, patch_chunks
        ``(tiles_y, tiles_x)`` and ``(patches_y, patches_x)`` per Zarr chunk: one slide
        chunk's tiles and patches.
    n_features
        Length of the latent vector.
    tile_flags
        Extra bool ``(tile_y, tile_x)`` variables to create (e.g. ``"pen_mask"``).
    """

    tile_y: np.ndarray
    tile_x: np.ndarray
    patch_y: np.ndarray
    patch_x: np.ndarray
    chunk_y: np.ndarray
    chunk_x: np.ndarray
    tile_chunks: tuple[int, int]
    patch_chunks: tuple[int, int]
    n_features: int
    tile_flags: tuple[str, ...] = field(default=())


def _create_arrays(group: Any, layout: SlideLayout, read_error: np.ndarray) -> None:
    """Every array of one slide's group (fill values NaN / False)."""
    for name in ("tile_y", "tile_x", "patch_y", "patch_x", "chunk_y", "chunk_x"):
        group.create_array(name, data=np.asarray(getattr(layout, name), dtype=np.int64), dimension_names=(name,))
    group.create_array("feature", data=np.arange(layout.n_features, dtype=np.int64), dimension_names=("feature",))
    nty, ntx = len(layout.tile_y), len(layout.tile_x)
    tcy, tcx = max(1, layout.tile_chunks[0]), max(1, layout.tile_chunks[1])
    tiles2d = {"shape": (nty, ntx), "chunks": (tcy, tcx), "dimension_names": ("tile_y", "tile_x")}
    failpoint("create-array")
    group.create_array("tile_variance", dtype="float32", fill_value=np.nan, **tiles2d)
    group.create_array("tile_mask", dtype="bool", fill_value=False, **tiles2d)
    for name in layout.tile_flags:
        group.create_array(name, dtype="bool", fill_value=False, **tiles2d)
    errors = group.create_array("read_error", dtype="bool", fill_value=False, **tiles2d)
    errors[...] = read_error
    pcy, pcx = max(1, layout.patch_chunks[0]), max(1, layout.patch_chunks[1])
    patches2d = {"shape": (len(layout.patch_y), len(layout.patch_x)), "chunks": (pcy, pcx), "dimension_names": ("patch_y", "patch_x")}
    failpoint("create-array")
    group.create_array("patch_variance", dtype="float32", fill_value=np.nan, **patches2d)
    group.create_array("patch_mask", dtype="bool", fill_value=False, **patches2d)
    group.create_array(
        "latent",
        shape=(nty, ntx, layout.n_features),
        chunks=(tcy, tcx, layout.n_features),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("tile_y", "tile_x", "feature"),
    )
    failpoint("create-array")
    done = group.create_array(
        "chunk_done",
        shape=(len(layout.chunk_y), len(layout.chunk_x)),
        chunks=(1, 1),
        dtype="bool",
        fill_value=False,
        dimension_names=("chunk_y", "chunk_x"),
    )
    done.attrs["description"] = "bookkeeping: chunk (i, j) of the slide has been written"


def _zarr_attrs(folder: Path) -> dict[str, Any] | None:
    """The attributes of the Zarr v3 group at ``folder``, or None when it is not one."""
    meta = folder / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("node_type") != "group":
        return None
    return dict(doc.get("attributes") or {})


def _holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(True for _ in folder.iterdir())


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


def _fingerprint_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    a, b = json.loads(json.dumps(existing)), json.loads(json.dumps(wanted))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _old_layout_error(where: Path) -> StoreError:
    return StoreError(
        f"{where}: was written by wsi_xr 0.1.0 (store layout 1: a `latent` dimension, unindexed chunk "
        f"bookkeeping). Update it in place with `wsi-xr migrate {where}` (nothing is recomputed), "
        "or pass --overwrite to recompute it."
    )


def _foreign_data_error(where: Path, foreign: str) -> StoreError:
    return StoreError(f"{where}: holds data that wsi_xr did not write ({foreign}); wsi_xr replaces only stores it wrote. Choose another output path.")


def check_slide_target(store: Path, group_name: str | None, fingerprint: dict[str, Any], *, overwrite: bool) -> bool:
    """Raise :class:`StoreError` where a run may not write its slide's group; read-only and cheap.

    Refused: a file at the store path; a folder holding anything wsi_xr did not write
    (even with ``overwrite``); a group made from another slide or with other parameters,
    a 0.1.0 store, or another kind of wsi_xr store (unless ``overwrite``); for a cohort, a
    root that is not a cohort's. Returns True when an existing group of this very run will
    be resumed. :func:`open_or_create_slide_group` runs the same checks; the CLI runs them
    before it starts a cluster.
    """
    fingerprint = {**fingerprint, "layout": LAYOUT_VERSION}
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store}: exists and is not a Zarr store folder; choose another output path.")
    if group_name:
        _check_cohort_root(store)
        target = store / group_name
    else:
        target = store
    where = Path(f"{store}/{group_name}") if group_name else store
    foreign = foreign_content(target) if target.exists() else None
    if foreign is not None:  # never replaced, not even with overwrite
        raise _foreign_data_error(where, foreign)
    attrs = _zarr_attrs(target)
    existing = None if attrs is None else attrs.get(RUN_ATTR)
    if overwrite:
        return False
    if existing is not None:
        if "layout" not in existing:
            raise _old_layout_error(store)
        differ = _fingerprint_differences(existing, fingerprint)
        if differ == ["read_checks"]:
            raise StoreError(
                f"{where}: was started by an earlier wsi_xr (0.2.0) whose reads did not check for decoder errors, "
                "so its finished chunks may hold tiles scored and encoded from damaged data. Pass --overwrite "
                "(overwrite=True) to recompute it."
            )
        if differ:
            raise StoreError(
                f"{where}: was made from a different slide or with different parameters ({', '.join(differ)} "
                "differ). Pass --overwrite (overwrite=True) to replace it, or use another store."
            )
        return True
    if attrs is not None:  # another kind of wsi_xr store (a mask, a cohort)
        raise StoreError(f"{where}: holds another wsi_xr store (not this run's); pass --overwrite (overwrite=True) to replace it.")
    return False


def open_or_create_slide_group(
    store: Path,
    group_name: str | None,
    layout: SlideLayout,
    fingerprint: dict[str, Any],
    read_error: np.ndarray,
    *,
    overwrite: bool,
) -> Any:
    """The slide's Zarr group in ``store`` (or its ``group_name``): resumed when it is this
    run's, created atomically when absent; hold the store's :class:`StoreLock` first.

    Refuses what :func:`check_slide_target` refuses.
    """
    import zarr

    if group_name:
        _ensure_cohort_root(store)
    target = store / group_name if group_name else store
    remove_stale_temporaries(target)
    if check_slide_target(store, group_name, fingerprint, overwrite=overwrite):
        return zarr.open_group(target, mode="r+", zarr_format=3, use_consolidated=False)
    fingerprint = {**fingerprint, "layout": LAYOUT_VERSION}

    def build(group: Any) -> None:
        # the fingerprint goes in first: a half-built group is never renamed into place anyway
        group.attrs.update(json_safe_attrs({RUN_ATTR: fingerprint, "complete": False}))
        failpoint("create-attrs")
        _create_arrays(group, layout, read_error)

    _build_then_rename(target, build)
    return zarr.open_group(target, mode="r+", zarr_format=3, use_consolidated=False)


def _check_cohort_root(store: Path) -> None:
    """Raise :class:`StoreError` unless ``store`` is absent, empty, or a cohort store of wsi_xr's."""
    attrs = _zarr_attrs(store)
    if attrs is not None:
        if COHORT_ATTR in attrs:
            return
        if RUN_ATTR in attrs:
            raise StoreError(f"{store}: holds one slide's results, not a cohort; write a cohort to another store.")
        if "slides" in attrs:  # a 0.1.0 cohort
            raise _old_layout_error(store)
    foreign = foreign_content(store) if store.exists() else None
    if foreign is not None:
        raise _foreign_data_error(store, foreign)
    if attrs is not None:
        raise StoreError(f"{store}: holds a tissue-mask store, not a cohort; write the cohort to another store.")


def _ensure_cohort_root(store: Path) -> None:
    """Create the root group of a cohort store (atomically), or check that it is wsi_xr's."""
    _check_cohort_root(store)
    attrs = _zarr_attrs(store)
    if attrs is not None:
        return  # a cohort root already
    remove_stale_temporaries(store)

    def build(group: Any) -> None:
        group.attrs[COHORT_ATTR] = {"layout": LAYOUT_VERSION}

    _build_then_rename(store, build)


def chunks_done(store: str | os.PathLike[str], group: str | None = None) -> int:
    """How many chunks of a slide's group are marked done (0 when the group does not exist yet)."""
    import zarr

    target = Path(store) / group if group else Path(store)
    attrs = _zarr_attrs(target)
    if attrs is None or RUN_ATTR not in attrs:
        return 0
    try:
        done = read_array(zarr.open_group(target, mode="r", zarr_format=3, use_consolidated=False), "chunk_done")
    except (KeyError, OSError, ValueError):
        return 0
    return int(np.count_nonzero(done))


def slide_groups(store: str | os.PathLike[str]) -> list[str]:
    """Names of the slide groups of a cohort store (empty for a one-slide store)."""
    import zarr

    root = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    return sorted(name for name in root.group_keys() if not name.startswith("."))


# --------------------------------------------------------------------------------------
# Migration of stores written by wsi_xr 0.1.0
# --------------------------------------------------------------------------------------


def _rewrite_json(path: Path, change: Any) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    tmp = path.with_name(path.name + ".migrating")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def _migrate_group(folder: Path) -> bool:
    """Bring one slide group from layout 1 to 2 in place; False when there is nothing to do."""
    import zarr

    attrs = _zarr_attrs(folder)
    if attrs is None or RUN_ATTR not in attrs or "layout" in attrs[RUN_ATTR]:
        return False
    latent_meta = folder / "latent" / "zarr.json"

    def rename_dimension(doc: dict[str, Any]) -> None:
        doc["dimension_names"] = ["tile_y", "tile_x", "feature"]

    _rewrite_json(latent_meta, rename_dimension)
    group = zarr.open_group(folder, mode="r+", zarr_format=3, use_consolidated=False)
    n_features = zarr_array(group, "latent").shape[2]
    if "feature" not in group:
        group.create_array("feature", data=np.arange(n_features, dtype=np.int64), dimension_names=("feature",))
    run = dict(attrs[RUN_ATTR])
    chunks = run.get("chunks")
    for name, axis in (("chunk_y", 0), ("chunk_x", 1)):
        if name not in group and chunks:
            origins = np.cumsum([0] + list(chunks[axis][:-1])) * float(cast(float, group.attrs.get("downsample", 1.0)))
            group.create_array(name, data=np.round(origins).astype(np.int64), dimension_names=(name,))
    run["layout"] = LAYOUT_VERSION
    group.attrs[RUN_ATTR] = run
    return True


def migrate_store(path: str | os.PathLike[str]) -> list[str]:
    """Update a store written by wsi_xr 0.1.0 to the current layout, in place.

    Renames the ``latent`` dimension of the latent cube to ``feature`` (metadata only,
    no data rewritten), adds the ``feature`` and ``chunk_y``/``chunk_x`` index
    variables, records the layout version, and re-consolidates the metadata. Returns the
    groups changed ("/" for a one-slide store). Running it twice changes nothing.
    """
    store = Path(path)
    if _zarr_attrs(store) is None:
        raise StoreError(f"{store}: not a Zarr store written by wsi_xr; check the path.")
    changed = []
    with StoreLock(store):
        if _migrate_group(store):
            changed.append("/")
        for child in sorted(store.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and _migrate_group(child):
                changed.append(child.name)
        root_attrs = _zarr_attrs(store) or {}
        if changed and RUN_ATTR not in root_attrs and COHORT_ATTR not in root_attrs:
            import zarr

            zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False).attrs[COHORT_ATTR] = {"layout": LAYOUT_VERSION}
        if changed:
            consolidate(store)
    return changed


# --------------------------------------------------------------------------------------
# Parquet: one row per tissue tile, streamed one slide (one row group) at a time
# --------------------------------------------------------------------------------------


def tile_rows(ds: xr.Dataset, slide: str | None = None) -> Any:
    """One row per tissue tile of a slide Dataset: ``x``, ``y``, ``latent_0`` ... (+ ``slide``).

    Returns a pandas DataFrame (one slide's rows: bounded by the slide, not the cohort); a
    slide without a whole tile gives no rows (and the same columns).
    """
    import pandas as pd

    from wsi_xr.accessor import tissue_tiles

    tissue = tissue_tiles(ds, ["latent"])
    frame = pd.DataFrame({"x": tissue["tile_x"].values.astype(np.int64), "y": tissue["tile_y"].values.astype(np.int64)})
    latents = np.asarray(tissue["latent"].values)
    for i in range(latents.shape[1]):
        frame[f"latent_{i}"] = latents[:, i].astype(np.float32)
    if slide is not None:
        frame.insert(0, "slide", slide)
    return frame


def _parquet_marker() -> bytes:
    """The Parquet schema metadata that marks a file as wsi_xr's tile rows."""
    from wsi_xr import __version__

    return json.dumps({"version": __version__, "rows": "one per tissue tile"}).encode()


def write_tile_parquet(frames: Iterator[Any], out: str | os.PathLike[str]) -> int:
    """Stream DataFrames (same columns) into one Parquet file, one row group each.

    Memory holds one frame at a time, never the whole cohort. Written to a temporary
    name and renamed into place when complete. Returns the number of rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = check_output_file(out, "parquet")
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    rows = 0
    writer = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"wsi_xr": _parquet_marker()})
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            rows += len(frame)
        if writer is None:
            raise StoreError(f"{target}: no slides to write.")
        writer.close()
        writer = None
        os.replace(partial, target)
    except OSError as err:
        raise StoreError(f"{target}: cannot write the Parquet file ({err}).") from err
    finally:
        if writer is not None:
            writer.close()
        if partial.exists():
            partial.unlink()
    return rows
