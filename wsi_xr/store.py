"""Zarr output: write a mask/latent Dataset atomically, open it back."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import xarray as xr

from wsi_xr.errors import StoreError


def check_output(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; check the parent folder is writable."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise StoreError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it.")
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
    return out


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
    ds.attrs = json_safe_attrs(ds.attrs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            ds.to_zarr(partial, mode="w-", zarr_format=3, consolidated=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(partial, out)
    except OSError as err:
        raise StoreError(f"{out}: could not write the store ({err}); nothing was kept.") from err
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

    def release(self) -> None:
        """Give the lock back."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "StoreLock":
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
