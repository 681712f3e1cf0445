"""Figures: slide thumbnail with the tissue mask overlaid, latent maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from wsi_xr.readers import probe
from wsi_xr.slide import slide_dataarray

#: Longest side of thumbnails, in pixels.
THUMBNAIL_SIDE = 1024


def thumbnail(slide: str | os.PathLike[str], max_side: int = THUMBNAIL_SIDE) -> xr.DataArray:
    """A small RGB image of the slide with level-0 coordinates, read from the best level.

    Takes the smallest pyramid level that is still at least ``max_side`` on its long
    side, then subsamples it (damaged tiles show as black).
    """
    info = probe(slide)
    level = 0
    for lv in info.levels:
        if max(lv.width, lv.height) >= max_side:
            level = lv.index
    image = slide_dataarray(info, level, damaged="fill")
    step = max(1, int(np.ceil(max(image.sizes["y"], image.sizes["x"]) / max_side)))
    return image[::step, ::step].compute()


def plot_mask_overlay(mask: xr.Dataset, slide: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a PNG: the slide thumbnail, tissue tiles in green, read errors in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    thumb = thumbnail(slide)
    tile = int(mask.attrs.get("tile", 64))
    x_edges = np.append(mask.tile_x.values, mask.tile_x.values[-1] + tile) if mask.sizes["tile_x"] else np.array([0])
    y_edges = np.append(mask.tile_y.values, mask.tile_y.values[-1] + tile) if mask.sizes["tile_y"] else np.array([0])
    height = int(thumb.y[-1]) + 1
    width = int(thumb.x[-1]) + 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * height / max(width, 1) + 0.8), dpi=110)
    for ax in axes:
        ax.imshow(thumb.values, extent=(0, width, height, 0), interpolation="nearest")
        ax.set_xlabel("x (level-0 px)")
    axes[0].set_ylabel("y (level-0 px)")
    axes[0].set_title("slide")
    layer = np.where(mask.read_error.values, 2, np.where(mask.tile_mask.values, 1, 0)).astype(float)
    layer[layer == 0] = np.nan
    if layer.size:
        axes[1].pcolormesh(x_edges, y_edges, layer, cmap=ListedColormap(["#1b9e77", "#d7191c"]), vmin=1, vmax=2, alpha=0.45, shading="flat")
    kept = int(mask.tile_mask.sum())
    threshold = mask.attrs.get("threshold")
    axes[1].set_title(f"tissue tiles: {kept} of {mask.tile_mask.size}  (threshold {threshold if isinstance(threshold, str) else f'{threshold:.1f}'})")
    axes[1].legend(handles=[Patch(color="#1b9e77", alpha=0.6, label="tissue tile"), Patch(color="#d7191c", alpha=0.6, label="read error")], loc="lower right", fontsize=8)
    axes[1].set_xlim(0, width)
    axes[1].set_ylim(height, 0)
    fig.suptitle(Path(str(slide)).name)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
