"""Third-party log messages inside wsi_xr calls become wsi_xr log records.

tifffile logs what it finds odd in a file (a damaged tag, an unusual layout) as
warnings; wsi_xr reports the problems that matter itself (as one error, or in
``read_error``). Inside wsi_xr's own calls those messages are re-logged at INFO under
the ``wsi_xr.thirdparty`` logger (shown by ``wsi-xr -v``, or by a caller that configures
logging), instead of reaching the user's terminal as stray warnings. The same libraries
used directly by the caller, outside wsi_xr, log exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

#: Loggers of libraries whose messages wsi_xr wraps.
THIRD_PARTY_LOGGERS = ("tifffile", "imagecodecs")

_local = threading.local()
_installed = False
_install_lock = threading.Lock()
log = logging.getLogger("wsi_xr.thirdparty")


class _InsideWsiXr(logging.Filter):
    """Re-log a record at INFO under ``wsi_xr.thirdparty`` when raised inside a wsi_xr call."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_local, "depth", 0) == 0:
            return True
        log.info("%s %s: %s", record.name, record.levelname.lower(), record.getMessage())
        return False


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        for name in THIRD_PARTY_LOGGERS:
            logging.getLogger(name).addFilter(_InsideWsiXr())
        _installed = True


@contextlib.contextmanager
def third_party_logs() -> Iterator[None]:
    """Within this block (this thread), third-party log records become wsi_xr INFO records."""
    _install()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
