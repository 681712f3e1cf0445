"""One opened slide: the probe, the backend decision and the damage scans, made once.

Every step of a run (the lazy image, the coarse pass, the tissue mask, the pipeline,
``wsi-xr info``) takes an :class:`OpenedSlide` instead of a path, so a file is probed
once, its backend chosen once, and each level's tile table scanned for damage once, in
the client. It is small and picklable: read tasks carry it (by path, never a handle).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from wsi_xr.readers.backends import BackendChoice, decide_backend, reader_key
from wsi_xr.readers.base import ReaderKey
from wsi_xr.readers.identity import content_fingerprint
from wsi_xr.readers.integrity import SegmentGrid
from wsi_xr.readers.probe import SlideInfo, probe
from wsi_xr.readers.windows import level_damage

__all__ = ["OpenedSlide", "open_file"]


@dataclass(frozen=True)
class OpenedSlide:
    """A probed slide file with its reader chosen.

    Attributes
    ----------
    info
        What the probe learnt (levels, tile sizes, mpp, format).
    choice
        The backend that reads it and why (``choice.name``, ``choice.reason``).
    """

    info: SlideInfo
    choice: BackendChoice
    _damage: dict[int, SegmentGrid] = field(default_factory=dict, compare=False, repr=False, hash=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False, hash=False)
    _scanning: dict[int, threading.Lock] = field(default_factory=dict, compare=False, repr=False, hash=False)
    _content: list[str] = field(default_factory=list, compare=False, repr=False, hash=False)

    @property
    def path(self) -> str:
        """Absolute path of the file."""
        return self.info.path

    @property
    def backend(self) -> str:
        """The name of the backend that reads the file."""
        return self.choice.name

    @property
    def key(self) -> ReaderKey:
        """What a task needs to find this file's reader in its own process."""
        return reader_key(self.info, self.choice.name)

    def damage(self, level: int) -> SegmentGrid:
        """The damage grid of ``level``'s TIFF tiles, scanned on first use, then kept.

        Thread-safe: a level is scanned once even when several threads ask at once (the
        later ones wait for the first one's scan).
        """
        with self._lock:
            grid = self._damage.get(level)
            if grid is not None:
                return grid
            scanning = self._scanning.setdefault(level, threading.Lock())
        with scanning:
            with self._lock:
                grid = self._damage.get(level)
            if grid is None:
                grid = level_damage(self.info, level)
                with self._lock:
                    self._damage[level] = grid
        return grid

    def content(self) -> str:
        """The slide's content fingerprint (:func:`~wsi_xr.readers.identity.content_fingerprint`),
        taken on first use, then kept (take a fresh one with that function to see a change)."""
        with self._lock:
            if not self._content:
                self._content.append(content_fingerprint(self.info))
            return self._content[0]

    def __getstate__(self) -> dict[str, object]:
        with self._lock:
            return {"info": self.info, "choice": self.choice, "_damage": dict(self._damage), "_content": list(self._content)}

    def __setstate__(self, state: dict[str, object]) -> None:
        object.__setattr__(self, "info", state["info"])
        object.__setattr__(self, "choice", state["choice"])
        object.__setattr__(self, "_damage", state["_damage"])
        object.__setattr__(self, "_content", state.get("_content", []))
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_scanning", {})


def open_file(source: str | os.PathLike[str] | OpenedSlide, backend: str = "auto", *, mpp: float | None = None) -> OpenedSlide:
    """Probe a slide file and choose its backend, or pass an :class:`OpenedSlide` through.

    An already opened slide is returned as it is when ``backend`` is ``"auto"`` or its
    own backend (and no ``mpp`` is given); another backend is decided from its probe (the
    file is not probed again). ``mpp`` (µm per level-0 pixel) replaces the file's, for
    slides that lack it or state it wrongly: ``info.mpp_source`` becomes ``"user"``.
    """
    if isinstance(source, OpenedSlide):
        info = source.info.with_mpp(mpp)
        if backend in ("auto", source.backend) and info is source.info:
            return source
        choice = source.choice if backend in ("auto", source.backend) else decide_backend(info, backend)
        opened = OpenedSlide(info, choice)
        opened._damage.update(source._damage)  # the same file: its scans hold
        opened._content.extend(source._content)
        return opened
    info = probe(source).with_mpp(mpp)
    return OpenedSlide(info, decide_backend(info, backend))
