"""The store lock: a file beside the store holding the owner's PID and host."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_xr.errors import StoreError

if TYPE_CHECKING:
    pass


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
