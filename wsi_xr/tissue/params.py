"""The mask's parameters: one frozen object that holds the defaults and checks itself.

:class:`MaskParams` is the only place the tissue mask's defaults and argument checks live:
:func:`wsi_xr.tissue_mask`, :func:`wsi_xr.process_slide` and the CLI take their defaults
from it and validate through it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_xr.errors import InvalidArgumentError

__all__ = ["MAX_PATCH", "MaskParams", "validate_mask_arguments"]

#: The largest patch side: a patch is scored whole inside one chunk, so it bounds the chunk (and memory).
MAX_PATCH = 8192


def validate_mask_arguments(tile: int, patch: int, threshold: float | str) -> None:
    """Raise :class:`InvalidArgumentError` for impossible tile/patch/threshold values."""
    for name, value in (("tile", tile), ("patch", patch)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise InvalidArgumentError(f"{name}={value!r}: must be a positive integer number of pixels.")
    reference = "the reference rule uses tile=64, patch=256"
    if patch > MAX_PATCH:
        raise InvalidArgumentError(f"patch={patch} px: at most {MAX_PATCH} px (a patch is scored whole inside one chunk); {reference}.")
    if tile > patch:
        raise InvalidArgumentError(
            f"tile={tile} is larger than patch={patch}: tiles are the parts of a patch; use a tile that divides the patch ({reference})."
        )
    if patch % tile:
        lower, upper = (patch // tile) * tile, (patch // tile + 1) * tile
        choices = f"patch={lower} or patch={upper}" if upper <= MAX_PATCH else f"patch={lower}"
        raise InvalidArgumentError(f"patch={patch} is not a multiple of tile={tile}; use {choices} ({reference}).")
    if isinstance(threshold, str):
        if threshold != "auto":
            raise InvalidArgumentError(f"threshold={threshold!r}: give a number (variance, uint8 units) or 'auto'.")
    elif not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not np.isfinite(threshold) or threshold < 0:
        raise InvalidArgumentError(f"threshold={threshold!r}: must be a finite variance >= 0, or 'auto'.")


@dataclass(frozen=True)
class MaskParams:
    """The tissue mask's settings, checked on creation (:class:`InvalidArgumentError`).

    Attributes
    ----------
    tile, patch
        Tile and patch sides in pixels (the reference rule: 64 and 256); ``patch`` is a
        multiple of ``tile``, at most :data:`MAX_PATCH`.
    threshold
        Variance threshold (uint8 units) or ``"auto"``.
    coarse
        ``"auto"``, ``"none"`` or a pyramid level for the coarse skip.
    reject_pen
        Remove tiles covered by pen ink.
    """

    tile: int = 64
    patch: int = 256
    threshold: float | str = "auto"
    coarse: str | int = "auto"
    reject_pen: bool = False

    def __post_init__(self) -> None:
        validate_mask_arguments(self.tile, self.patch, self.threshold)
        if self.coarse not in ("auto", "none") and not (isinstance(self.coarse, (int, np.integer)) and not isinstance(self.coarse, bool)):
            raise InvalidArgumentError(f"coarse={self.coarse!r}: use 'auto', 'none' or a pyramid level number.")
        if not isinstance(self.reject_pen, bool):
            raise InvalidArgumentError(f"reject_pen={self.reject_pen!r}: use True or False.")

    @property
    def tiles_per_patch(self) -> int:
        """Tiles along one side of a patch."""
        return self.patch // self.tile

    def check_chunks(self, chunks: tuple[tuple[int, ...], ...], fix: str) -> None:
        """Raise :class:`InvalidArgumentError` unless every chunk but the last along y and x holds whole patches.

        ``fix`` says what the caller can do (it ends the message).
        """
        for axis, name in ((0, "y"), (1, "x")):
            bad = [c for c in chunks[axis][:-1] if c % self.patch]
            if bad:
                raise InvalidArgumentError(f"chunks along {name} ({bad[0]} px) are not multiples of patch={self.patch}; {fix}")

    def attrs(self) -> dict[str, Any]:
        """The settings as provenance attributes (with the pen rule's thresholds when it is on)."""
        attrs: dict[str, Any] = {"tile": self.tile, "patch": self.patch, "coarse": str(self.coarse), "reject_pen": self.reject_pen}
        if self.reject_pen:
            from wsi_xr.tissue.pen import DEFAULT_PEN_RULE

            attrs.update(DEFAULT_PEN_RULE.attrs())
        return attrs
