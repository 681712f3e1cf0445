"""Tissue detection: block-wise two-stage variance, coarse skip, automatic threshold."""

from wsi_xr.tissue.kernels import block_statistics, tile_moments
from wsi_xr.tissue.mask import resolve_threshold, tissue_mask, validate_mask_arguments
from wsi_xr.tissue.threshold import DEFAULT_THRESHOLD, auto_threshold

__all__ = [
    "DEFAULT_THRESHOLD",
    "auto_threshold",
    "block_statistics",
    "tile_moments",
    "resolve_threshold",
    "tissue_mask",
    "validate_mask_arguments",
]
