"""Named kill points, for tests that prove a run resumes from any moment it is killed at.

``WSI_XR_KILL_AT="name"`` (or ``"name#n"``: at the n-th time that point is passed in this
process; several separated by commas) makes the process SIGKILL itself there. Unset, a
failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_passed: Counter[str] = Counter()
_lock = threading.Lock()


def failpoint(name: str) -> None:
    """Kill this process here if ``WSI_XR_KILL_AT`` names this point (and count)."""
    spec = os.environ.get("WSI_XR_KILL_AT")
    if not spec:
        return
    with _lock:
        _passed[name] += 1
        count = _passed[name]
    for entry in spec.split(","):
        point, _, nth = entry.strip().partition("#")
        if point == name and (not nth or int(nth) == count):
            os.kill(os.getpid(), signal.SIGKILL)
