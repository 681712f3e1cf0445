"""Which reader decodes a file, and why: the backend registry.

Each backend is a :class:`~wsi_xr.readers.base.Reader` class, imported only when a file
is opened with it (cuCIM's import costs ~0.5 s; GPU backends import CuPy). The probe
records in :attr:`SlideInfo.backend_problems` the backends that must not read a file
(cuCIM crashes on some valid TIFFs and mis-decodes others); ``"auto"`` takes the first
backend of :data:`AUTO_ORDER` that has no problem with the file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from wsi_xr.errors import InvalidArgumentError, UnsupportedFormatError
from wsi_xr.readers.base import Reader, ReaderKey
from wsi_xr.readers.probe import SlideInfo

__all__ = ["AUTO_ORDER", "BACKENDS", "GPU_BACKENDS", "BackendChoice", "choose_backend", "decide_backend", "reader_class", "reader_key"]

#: ``backend name -> "module:Class"`` of every reader wsi_xr has.
_READERS = {
    "cucim": "wsi_xr.readers.cucim_backend:CuCIMReader",
    "tifffile": "wsi_xr.readers.tifffile_backend:TifffileReader",
    "openslide": "wsi_xr.readers.openslide_backend:OpenSlideReader",
    # GPU decode into CuPy chunks; opt-in (never chosen by "auto") until a GPU benchmark
    # shows it beating the CPU decoders -- see README "GPU decoding"
    "nvimgcodec": "wsi_xr.readers.nvimgcodec_backend:NvImageCodecReader",
}

#: Backends that decode into GPU memory (they need ``device="cuda"``).
GPU_BACKENDS = frozenset({"nvimgcodec"})

#: Accepted values of every ``backend=`` argument.
BACKENDS = ("auto", *_READERS)

#: The order ``"auto"`` tries backends in: fastest exact decoder first. OpenSlide comes
#: last: it reads every vendor format, but through cairo (slower) and, on levels whose
#: downsample is not an integer, only from exactly placed locations (see its module).
AUTO_ORDER = ("cucim", "tifffile", "openslide")

#: One line per backend, said by ``wsi-xr info`` when ``auto`` picks it.
_WHY_CHOSEN = {
    "cucim": "cuCIM is safe for this file and the fastest exact CPU decoder here",
    "tifffile": "tifffile decodes this TIFF exactly",
    "openslide": "OpenSlide reads this format",
}


#: How messages name each backend.
_DISPLAY_NAMES = {"cucim": "cuCIM", "tifffile": "tifffile", "openslide": "OpenSlide", "nvimgcodec": "nvImageCodec"}


@dataclass(frozen=True)
class BackendChoice:
    """The backend that reads a file, and a sentence saying why."""

    name: str
    reason: str


def decide_backend(info: SlideInfo, backend: str = "auto") -> BackendChoice:
    """The backend that will read ``info``'s file, with the reason.

    ``"auto"`` takes the first backend of :data:`AUTO_ORDER` that the probe found no
    problem with. Asking for a backend that cannot read the file safely is an
    :class:`InvalidArgumentError` (never a crash), naming the problem.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.")
    if backend != "auto":
        problem = info.problem(backend)
        if problem is None and backend == "nvimgcodec":
            problem = _nvimgcodec_problem(info)
        if problem is not None:
            raise InvalidArgumentError(
                f"{info.path}: {_DISPLAY_NAMES.get(backend, backend)} cannot read this file safely ({problem}); "
                f"use backend='auto' or another backend (not {backend!r})."
            )
        return BackendChoice(backend, "asked for")
    skipped: list[str] = []
    for name in AUTO_ORDER:
        problem = info.problem(name)
        if problem is None:
            why = _WHY_CHOSEN.get(name, "")
            if skipped:
                why = "; ".join([why, *skipped] if why else skipped)
            return BackendChoice(name, why or "the first backend that reads this file")
        skipped.append(f"{name} avoided: {problem}")
    raise UnsupportedFormatError(
        f"{info.path}: no wsi_xr backend can read this file ({'; '.join(skipped)}). "
        "Convert it to a tiled pyramidal TIFF, e.g. with `vips tiffsave --tile --pyramid --compression jpeg`."
    )


def _nvimgcodec_problem(info: SlideInfo) -> str | None:
    from wsi_xr.readers.nvimgcodec_backend import nvimgcodec_available, nvimgcodec_file_problem

    ok, reason = nvimgcodec_available()
    return nvimgcodec_file_problem(info) if ok else reason


def choose_backend(info: SlideInfo, backend: str = "auto") -> str:
    """The name of the backend :func:`decide_backend` picks."""
    return decide_backend(info, backend).name


def reader_key(info: SlideInfo, backend: str) -> ReaderKey:
    """The picklable key that tasks carry instead of a reader."""
    return ReaderKey(info.path, info.file_size, info.mtime_ns, backend)


def reader_class(backend: str) -> type[Reader]:
    """The Reader class of ``backend`` (imported on first use)."""
    try:
        module, _, name = _READERS[backend].partition(":")
    except KeyError:
        raise InvalidArgumentError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}.") from None
    return getattr(importlib.import_module(module), name)
