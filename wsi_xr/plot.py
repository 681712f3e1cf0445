"""Figures: slide thumbnail with the tissue mask overlaid, latent maps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from wsi_xr.outputs import check_output_file
from wsi_xr.readers import probe
from wsi_xr.slide import slide_dataarray

if TYPE_CHECKING:
    from wsi_xr.sampling import Region

#: Longest side of thumbnails, in pixels.
THUMBNAIL_SIDE = 1024
#: Overlay colours of :func:`plot_mask_overlay`: tissue, read error, pen mark.
TISSUE_COLOUR, READ_ERROR_COLOUR, PEN_COLOUR = "#1b9e77", "#d7191c", "#7570b3"
#: Tiles the coarse pass ruled out (never decoded).
SKIPPED_COLOUR = "#bdbdbd"


def _software() -> str:
    """The PNG Software text: marks the figure as wsi_xr's (so a rerun may replace it, and nothing else)."""
    from wsi_xr import __version__
    from wsi_xr.outputs import PNG_SOFTWARE

    return f"{PNG_SOFTWARE} {__version__}"


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


def overlay_classes(mask: xr.Dataset) -> np.ndarray:
    """Tile classes drawn by :func:`plot_mask_overlay`, float ``(tile_y, tile_x)``.

    1 = tissue (``tile_mask``), 2 = read error, 3 = pen mark (``pen_mask``, when the
    Dataset has one), 4 = not decoded (skipped by the coarse pass: NaN variance), NaN =
    nothing drawn. Read errors win over pen marks, pen marks over tissue (a pen tile is
    not tissue once pen rejection is on).
    """
    classes = np.where(np.asarray(mask.tile_mask.values, dtype=bool), 1.0, np.nan)
    if "tile_variance" in mask:
        classes[np.isnan(np.asarray(mask.tile_variance.values, dtype=np.float32))] = 4.0
    if "pen_mask" in mask:
        classes[np.asarray(mask.pen_mask.values, dtype=bool)] = 3.0
    classes[np.asarray(mask.read_error.values, dtype=bool)] = 2.0
    return classes


def plot_mask_overlay(mask: xr.Dataset, slide: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a PNG: the slide thumbnail, tissue tiles in green, read errors in red.

    When ``mask`` has a ``pen_mask (tile_y, tile_x)`` variable (pen-mark rejection),
    its tiles are drawn in a third colour (purple) with their own legend entry.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched
    from matplotlib.patches import Patch

    thumb = thumbnail(slide)
    tile = int(mask.attrs.get("tile", 64))
    x_edges = np.append(mask.tile_x.values, mask.tile_x.values[-1] + tile) if mask.sizes["tile_x"] else np.array([0])
    y_edges = np.append(mask.tile_y.values, mask.tile_y.values[-1] + tile) if mask.sizes["tile_y"] else np.array([0])
    height = int(thumb.y[-1]) + 1
    width = int(thumb.x[-1]) + 1
    fig = Figure(figsize=(12, 6 * height / max(width, 1) + 0.8), dpi=110)
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(thumb.values, extent=(0, width, height, 0), interpolation="nearest")
        ax.set_xlabel("x (level-0 px)")
    axes[0].set_ylabel("y (level-0 px)")
    axes[0].set_title("slide")
    layer = overlay_classes(mask)
    if layer.size:
        colours = ListedColormap([TISSUE_COLOUR, READ_ERROR_COLOUR, PEN_COLOUR, SKIPPED_COLOUR])
        axes[1].pcolormesh(x_edges, y_edges, layer, cmap=colours, vmin=0.5, vmax=4.5, alpha=0.45, shading="flat")
    kept = int(mask.tile_mask.sum())
    threshold = mask.attrs.get("threshold")
    title = f"tissue tiles: {kept} of {mask.tile_mask.size}  (threshold {threshold if isinstance(threshold, str) else f'{threshold:.1f}'})"
    handles = [Patch(color=TISSUE_COLOUR, alpha=0.6, label="tissue tile"), Patch(color=READ_ERROR_COLOUR, alpha=0.6, label="read error")]
    skipped = int((layer == 4.0).sum())
    if skipped:
        handles.append(Patch(color=SKIPPED_COLOUR, alpha=0.6, label=f"not decoded: coarse skip ({skipped} tiles)"))
    if "pen_mask" in mask:
        pen = int(mask.pen_mask.sum())
        title += f", pen: {pen}"
        handles.append(Patch(color=PEN_COLOUR, alpha=0.6, label=f"pen mark ({pen} tiles)"))
    axes[1].set_title(title)
    axes[1].legend(handles=handles, loc="lower right", fontsize=8)
    axes[1].set_xlim(0, width)
    axes[1].set_ylim(height, 0)
    fig.suptitle(Path(str(slide)).name)
    fig.tight_layout()
    out = check_output_file(out, "png")  # a PNG replaces a PNG, never a folder or another file
    fig.savefig(out, metadata={"Software": _software()})
    return out


def latent_rgb(latent: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """The first three principal components of the tissue tiles' latents as RGB in [0, 1].

    Returns ``(tile_y, tile_x, 3)`` float with NaN where not tissue.
    """
    rgb = np.full(tissue.shape + (3,), np.nan)
    vectors = latent[tissue].astype(np.float64)
    if len(vectors) < 2:
        return rgb
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ components[:3].T
    if scores.shape[1] < 3:
        scores = np.pad(scores, ((0, 0), (0, 3 - scores.shape[1])))
    low, high = np.percentile(scores, 1, axis=0), np.percentile(scores, 99, axis=0)
    rgb[tissue] = np.clip((scores - low) / np.maximum(high - low, 1e-12), 0, 1)
    return rgb


def plot_latent_map(ds: xr.Dataset, out: str | os.PathLike[str], slide: str | os.PathLike[str] | None = None) -> Path:
    """Write a PNG: the latent cube's first 3 principal components as RGB on the tile grid."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    tissue = np.asarray(ds.tile_mask.values, dtype=bool)
    rgb = latent_rgb(np.asarray(ds.latent.values), tissue)
    shown = np.where(np.isnan(rgb), 1.0, rgb)
    tile = int(ds.attrs.get("tile", 64))
    width = int(ds.tile_x.values[-1]) + tile if ds.sizes["tile_x"] else 1
    height = int(ds.tile_y.values[-1]) + tile if ds.sizes["tile_y"] else 1
    panels = 2 if slide is not None else 1
    fig = Figure(figsize=(6 * panels, 6 * height / max(width, 1) + 0.8), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)
    if slide is not None:
        thumb = thumbnail(slide)
        axes[0, 0].imshow(thumb.values, extent=(0, int(thumb.x[-1]) + 1, int(thumb.y[-1]) + 1, 0))
        axes[0, 0].set_title("slide")
    axes[0, -1].imshow(shown, extent=(0, width, height, 0), interpolation="nearest")
    axes[0, -1].set_title(f"latent map: PCs 1-3 of {int(tissue.sum())} tissue tiles as RGB")
    for ax in axes[0]:
        ax.set_xlabel("x (level-0 px)")
    fig.tight_layout()
    out = check_output_file(out, "png")  # a PNG replaces a PNG, never a folder or another file
    fig.savefig(out, metadata={"Software": _software()})
    return out


def plot_reconstructions(
    weights: str | os.PathLike[str] | None,
    slide: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    n: int = 10,
    seed: int = 0,
    region: Region | None = None,
) -> Path:
    """Write a PNG: ``n`` real tissue tiles (top row), their VAE reconstructions from ``mu``,
    and, for comparison, their 3x3x3 downsampling (27 numbers per tile, as the VAE's 32).

    ``region`` (a :class:`wsi_xr.sampling.Region`) draws the tiles from inside that level-0
    block only (e.g. a block the weights were never trained on).
    """
    import torch
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    from wsi_xr.models import load_vae, tiles_to_tensor
    from wsi_xr.models.evaluate import downsample_reconstruct
    from wsi_xr.sampling import sample_tissue_tiles

    model = load_vae(weights)
    inside = None if region is None else {os.fspath(slide): region}
    tiles, origins = sample_tissue_tiles([slide], max_tiles=n, seed=seed, inside=inside)
    with torch.inference_mode():
        _, mu, _ = model.encode(tiles_to_tensor(tiles))
        recon = model.decode(mu).permute(0, 2, 3, 1).numpy()
    down = downsample_reconstruct(tiles, 3)
    rows = [("tile", tiles), ("VAE (32)", np.clip(recon, 0, 1)), ("down 3x3x3 (27)", down)]
    fig = Figure(figsize=(1.3 * len(tiles), 1.45 * len(rows) + 0.3), dpi=110)
    axes = fig.subplots(len(rows), len(tiles), squeeze=False)
    for i in range(len(tiles)):
        for r, (_, images) in enumerate(rows):
            axes[r, i].imshow(images[i])
            axes[r, i].axis("off")
        axes[0, i].set_title(f"{origins[i]['x']},{origins[i]['y']}", fontsize=6)
    for r, (label, _) in enumerate(rows):
        axes[r, 0].text(-8, 32, label, rotation=90, va="center", ha="right", fontsize=7)
    fig.suptitle(
        f"{Path(str(slide)).name}: tissue tiles and reconstructions from the 32 latents ({Path(str(weights)).name if weights else 'default weights'})",
        fontsize=8,
    )
    fig.tight_layout()
    out = check_output_file(out, "png")  # a PNG replaces a PNG, never a folder or another file
    fig.savefig(out, metadata={"Software": _software()})
    return out
