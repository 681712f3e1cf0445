"""The layers of the README's "Architecture": a slide's path through ``process_slide`` goes down
the layers and comes back up by returning, not by lower layers calling up into higher ones.

Traced with ``sys.setprofile`` in every thread: for each call of a wsi_xr function, the nearest
wsi_xr frame below it (third-party frames such as Dask's scheduler are looked through) must not
be in a lower layer. On 75c0752 the pipeline module was re-entered from below seven times.
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import dask

import wsi_xr
from wsi_xr.datasets.synth import write_synthetic_slide

#: readers -> slide -> plan/core (tissue, encode, models, store) -> wrappers (accessor) -> pipeline -> CLI
LAYERS = {
    "wsi_xr.readers": 0,
    "wsi_xr.slide": 1,
    "wsi_xr.resample": 1,
    "wsi_xr.tissue": 2,
    "wsi_xr.encode": 2,
    "wsi_xr.models": 2,
    "wsi_xr.store": 2,
    "wsi_xr.accessor": 3,
    "wsi_xr.pipeline": 4,
    "wsi_xr.cli": 5,
}


def _layer(module: str) -> int | None:
    for prefix, number in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return number
    return None


def test_process_slide_never_calls_up_the_layers(tmp_path: Path) -> None:
    up_calls: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[tuple[int, int]] = collections.Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = _layer(frame.f_globals.get("__name__", ""))
        if callee is None:
            return
        caller_frame = frame.f_back
        while caller_frame is not None:
            module = caller_frame.f_globals.get("__name__", "")
            caller = _layer(module)
            if caller is not None:
                seen[(caller, callee)] += 1
                if callee > caller:
                    up_calls[f"{module}.{caller_frame.f_code.co_name} -> {frame.f_globals['__name__']}.{frame.f_code.co_name}"] += 1
                return
            caller_frame = caller_frame.f_back

    slide = tmp_path / "s.tif"
    write_synthetic_slide(slide, 1024, 1024, seed=3)
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        with dask.config.set(scheduler="threads"):
            wsi_xr.process_slide(slide, tmp_path / "s.zarr", chunks=512)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert seen[(4, 2)] and seen[(2, 0)], f"the trace saw no calls down the layers: {dict(seen)}"  # the tracer works
    assert not up_calls, f"calls up the layers: {dict(up_calls)}"
