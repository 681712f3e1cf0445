"""The one exception family of wsi_xr.

Every error a user can cause (a bad file, a bad argument, a store in the wrong state)
is a :class:`WsiXrError`. Messages name the file or value and say what to do.
"""

from __future__ import annotations


class WsiXrError(Exception):
    """Base class of every error wsi_xr raises on purpose."""


class SlideOpenError(WsiXrError):
    """The file is missing, not a file, or not a readable whole-slide image."""


class UnsupportedFormatError(SlideOpenError):
    """The file is a TIFF, but in a layout or compression no reader can decode."""


class SlideReadError(WsiXrError):
    """Pixels of an opened slide could not be decoded."""


class InvalidArgumentError(WsiXrError, ValueError):
    """An argument is out of range or inconsistent with another one."""


class WeightsError(WsiXrError):
    """A model weights file is missing, corrupt, or made for another model."""


class StoreError(WsiXrError):
    """An output store exists, is locked, belongs to another run, or cannot be written."""


class ClusterError(WsiXrError):
    """A Dask cluster could not be reached or started."""
