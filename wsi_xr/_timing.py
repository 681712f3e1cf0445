"""Thread-seconds spent in each stage of the pipeline in this process (for benchmarks).

Each chunk task adds the wall time of its stages (``decode``, ``statistics``, ``encode``,
``write``); with several worker threads their sum exceeds the run's wall time by the
degree of overlap. Costs two ``perf_counter`` calls per stage and chunk.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

_seconds: defaultdict[str, float] = defaultdict(float)
_lock = threading.Lock()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the time spent in this block to ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        with _lock:
            _seconds[name] += elapsed


def stage_seconds() -> dict[str, float]:
    """A copy of the thread-seconds per stage since the last :func:`reset_stage_seconds`."""
    with _lock:
        return dict(_seconds)


def reset_stage_seconds() -> None:
    """Zero every stage's counter."""
    with _lock:
        _seconds.clear()
