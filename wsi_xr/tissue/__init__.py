"""Tissue detection: block-wise two-stage variance, coarse skip, automatic threshold.

- :mod:`.params`: :class:`MaskParams`, the settings, their defaults and checks;
- :mod:`.plan`: :func:`plan_mask`, the one plan (chunks, coarse decision, damaged tiles, provenance);
- :mod:`.core`: the array-level core (a chunk's statistics, the two-stage rule, the threshold);
- :mod:`.mask`: :func:`tissue_mask`, the lazy xarray wrapper;
- :mod:`.kernels`, :mod:`.coarse`, :mod:`.pen`, :mod:`.threshold`: the kernels under them.
"""

from typing import TYPE_CHECKING

from wsi_xr._lazy import lazy_getattr

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from wsi_xr.tissue.core import ChunkStatistics, choose_threshold, chunk_statistics, two_stage_rule
    from wsi_xr.tissue.kernels import block_statistics, tile_moments
    from wsi_xr.tissue.mask import resolve_threshold, tissue_mask
    from wsi_xr.tissue.params import MaskParams, validate_mask_arguments
    from wsi_xr.tissue.plan import MaskPlan, plain_plan, plan_chunks, plan_mask
    from wsi_xr.tissue.threshold import DEFAULT_THRESHOLD, auto_threshold

# Loaded on first use: the CLI reads MaskParams' defaults without importing Dask.
_LAZY = {
    "ChunkStatistics": "core",
    "choose_threshold": "core",
    "chunk_statistics": "core",
    "two_stage_rule": "core",
    "block_statistics": "kernels",
    "tile_moments": "kernels",
    "resolve_threshold": "mask",
    "tissue_mask": "mask",
    "MaskParams": "params",
    "validate_mask_arguments": "params",
    "MaskPlan": "plan",
    "plain_plan": "plan",
    "plan_chunks": "plan",
    "plan_mask": "plan",
    "DEFAULT_THRESHOLD": "threshold",
    "auto_threshold": "threshold",
}


__getattr__ = lazy_getattr(__name__, {name: f"wsi_xr.tissue.{module}" for name, module in _LAZY.items()}, globals())

__all__ = [
    "DEFAULT_THRESHOLD",
    "ChunkStatistics",
    "MaskParams",
    "MaskPlan",
    "auto_threshold",
    "block_statistics",
    "choose_threshold",
    "chunk_statistics",
    "plain_plan",
    "plan_chunks",
    "plan_mask",
    "resolve_threshold",
    "tile_moments",
    "tissue_mask",
    "two_stage_rule",
    "validate_mask_arguments",
]
