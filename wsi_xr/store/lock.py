"""The store lock: an OS advisory lock on a file beside the store, held for the run's lifetime.

``fcntl.flock`` on ``.NAME.lock``: the operating system releases it when the owning process
ends, however it ends (SIGKILL included), so there is no stale lock to take over and no race
between processes taking one over. The file also holds the owner's PID and host, for the
message a second run gets. An empty or garbled file is just a file: whoever can lock it owns it.

Releasing deletes the file while still holding the lock; a process that opened the old file
meanwhile notices that the path now names another file (or none) and opens again, so two
processes never both believe they own the store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from wsi_xr.errors import StoreError

__all__ = ["StoreLock"]


class StoreLock:
    """An exclusive lock on a store (``with StoreLock(store): ...``), refused with a message naming the holder."""

    def __init__(self, store: Path) -> None:
        self.store = Path(store)
        self.path = self.store.parent / f".{self.store.name}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        pid, _, host = text.partition(" ")
        return f"PID {pid} on {host}" if pid.isdigit() and host else "a process that left no name"

    def _busy(self) -> StoreError:
        return StoreError(
            f"{self.store}: in use by another wsi_xr run ({self._holder()}, holding {self.path}). "
            "Wait for it to finish: the lock is released when that process ends, however it ends."
        )

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the store and the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StoreError(f"{self.store}: cannot create the lock file {self.path} ({err.strerror}); check the folder's permissions.") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                raise StoreError(f"{self.store}: cannot lock {self.path} ({err.strerror}); the file system may not support locks.") from err
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (and deleted) by its owner after we opened it: open the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
            self._fd = fd
            return

    def check(self) -> None:
        """Raise :class:`StoreError` when another process holds the lock (takes it for an instant, never keeps it)."""
        if self.held or not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._busy() from None
        finally:
            os.close(fd)  # closing releases the instant lock

    def release(self) -> None:
        """Give the lock back (the file is deleted while still locked, then closed)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
