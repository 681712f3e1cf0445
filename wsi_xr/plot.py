"""Figures: slide thumbnail with the tissue mask overlaid, latent maps; :func:`imshow`, which draws
any slide image or tile/patch grid in level-0 pixels with y downward (``.wsi.plot``).

How wsi_xr draws (so that a slide and its overlays align): coordinates are the level-0
offsets of each pixel's, tile's or patch's top-left corner, so an element at ``c`` with
cell size ``s`` covers ``[c, c + s)`` and an array's extent runs from its first
coordinate to its last plus one cell, on pixel edges; y increases downward, as in the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.outputs import check_output_file
from wsi_xr.readers import probe
from wsi_xr.slide import slide_dataarray

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

    from wsi_xr.sampling import Region

#: Longest side of thumbnails, in pixels.
THUMBNAIL_SIDE = 1024
#: Overlay colours of :func:`plot_mask_overlay`: tissue, read error, pen mark.
TISSUE_COLOUR, READ_ERROR_COLOUR, PEN_COLOUR = "#1b9e77", "#d7191c", "#7570b3"
#: Tiles the coarse pass ruled out (never decoded).
SKIPPED_COLOUR = "#bdbdbd"


#: The grids :func:`imshow` draws: (y dim, x dim) and the attribute holding one cell's size in level-0 px.
GRIDS = {("y", "x"): "downsample", ("tile_y", "tile_x"): "tile", ("patch_y", "patch_x"): "patch"}
#: :func:`imshow` refuses arrays with more elements than this (a whole level-0 slide would be read into memory).
MAX_DRAWN_PIXELS = 4096 * 4096
#: Colour of True cells of a bool grid drawn by :func:`imshow` (False cells are transparent).
MASK_COLOUR = TISSUE_COLOUR


def grid_dims(da: xr.DataArray) -> tuple[str, str]:
    """The ``(y, x)`` dims of a slide image or grid: ``("y", "x")``, ``("tile_y", "tile_x")`` or ``("patch_y", "patch_x")``."""
    for pair in GRIDS:
        if set(pair) <= set(map(str, da.dims)):
            return pair
    raise InvalidArgumentError(
        f"{da.name or 'the array'} has dims {tuple(da.dims)}: wsi_xr draws slide images ('y', 'x'[, 'c']) and tile or patch "
        "grids ('tile_y', 'tile_x') / ('patch_y', 'patch_x'); select or rename to one of those."
    )


def cell_size(da: xr.DataArray, dim: str, attrs: Mapping[str, Any] | None = None) -> float:
    """Level-0 pixels one element of ``da`` covers along ``dim``: its coordinates' spacing (checked
    to be even), or for a single element the size ``attrs`` (default: ``da.attrs``) record
    (``downsample`` for pixels, ``tile``, ``patch``)."""
    coord = np.asarray(da[dim].values, dtype=np.float64)
    if coord.size >= 2:
        steps = np.diff(coord)
        # levels with a non-integer downsample (Aperio: 4.0005) have integer coordinates 1 px apart in their steps
        if (steps <= 0).any() or np.abs(steps - np.median(steps)).max() > 1.0:
            raise InvalidArgumentError(
                f"{dim}: coordinates are not evenly spaced and increasing; an image needs a regular grid (take a regular selection)."
            )
        return float((coord[-1] - coord[0]) / (coord.size - 1))
    meta = da.attrs if attrs is None else attrs
    pair = next(p for p in GRIDS if dim in p)
    size = meta.get(GRIDS[pair])
    if size is None:
        raise InvalidArgumentError(f"{dim}: one element, and no {GRIDS[pair]!r} attribute to tell its size; pass cell=SIZE (level-0 px).")
    return float(size)


def pixel_edge_extent(da: xr.DataArray, *, cell: float | None = None, attrs: Mapping[str, Any] | None = None) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of ``da`` on pixel edges, in level-0 px: matplotlib's ``extent`` for
    ``origin="upper"`` (``bottom > top``: y increases downward). Element ``c`` covers ``[c, c + size)``."""
    ydim, xdim = grid_dims(da)
    if da.sizes[ydim] == 0 or da.sizes[xdim] == 0:
        raise InvalidArgumentError(f"{da.name or 'the array'}: an empty {ydim} x {xdim} grid; nothing to draw.")
    sy = cell if cell is not None else cell_size(da, ydim, attrs)
    sx = cell if cell is not None else cell_size(da, xdim, attrs)
    y, x = da[ydim].values, da[xdim].values
    return float(x[0]), float(x[-1]) + sx, float(y[-1]) + sy, float(y[0])


def _mask_rgba(values: np.ndarray, colour: str, alpha: float) -> np.ndarray:
    """A bool grid as RGBA: True cells ``colour`` at ``alpha``, False cells transparent."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros(values.shape + (4,))
    rgba[values] = to_rgba(colour, alpha)
    return rgba


def _nan_transparent(values: np.ndarray) -> np.ndarray:
    """A float RGB(A) image in [0, 1] as RGBA, transparent where any channel is NaN."""
    rgba = np.ones(values.shape[:2] + (4,))
    rgba[..., : values.shape[2]] = np.nan_to_num(values[..., :4])
    rgba[np.isnan(values).any(axis=-1), 3] = 0.0
    return rgba


def imshow(
    da: xr.DataArray,
    ax: Axes | None = None,
    *,
    cell: float | None = None,
    attrs: Mapping[str, Any] | None = None,
    colour: str = MASK_COLOUR,
    add_colorbar: bool | None = None,
    max_pixels: int | None = MAX_DRAWN_PIXELS,
    **kwargs: Any,
) -> AxesImage:
    """Draw a slide image ``(y, x, c)`` or a tile/patch grid in level-0 pixels, y downward, on pixel edges.

    What ``da.plot.imshow(yincrease=False)`` draws, but with each element covering
    ``[c, c + size)`` from its top-left coordinate ``c`` (xarray centres pixels on their
    coordinates, half a cell off), so an image and a tile mask drawn on one ``ax`` align.
    The axes get an equal aspect, y inverted, level-0 axis labels and limits that cover
    everything drawn on them.

    Parameters
    ----------
    da
        ``(y, x)`` or ``(y, x, c)`` (RGB/RGBA) pixels, or a ``(tile_y, tile_x)`` /
        ``(patch_y, patch_x)`` grid (optionally with a trailing RGB dim). Other dims: select
        first (``ds.latent.sel(feature=0)``).
    ax
        Axes to draw on; None: a new :class:`matplotlib.figure.Figure` (not pyplot's: show it
        with ``artist.figure`` in a notebook, or pass ``ax`` from ``plt.subplots()``).
    cell
        Level-0 px per element, when an axis has one element and ``attrs`` do not say.
    attrs
        Where to look up the cell size of a one-element axis (a Dataset's attrs).
    colour
        Colour of True cells of a bool grid (False cells are transparent), at ``alpha`` (default 0.5).
    add_colorbar
        None: a colour bar for numeric 2-D grids, none for masks and RGB.
    max_pixels
        Refuse arrays with more elements than this (None: no limit): a level-0 slide does not fit
        in memory; draw a coarser level (``wsi_xr.open_slide(path, level=N)``).
    **kwargs
        Passed to :meth:`matplotlib.axes.Axes.imshow` (``cmap``, ``vmin``, ``vmax``, ``alpha``...).

    Returns
    -------
    matplotlib.image.AxesImage
        Its ``get_extent()`` is :func:`pixel_edge_extent`; ``artist.axes`` and ``artist.figure`` hold it.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    for key in ("extent", "origin"):
        if key in kwargs:
            raise InvalidArgumentError(f"{key}= is set from the coordinates (pixel edges, y downward); leave it out.")
    ydim, xdim = grid_dims(da)
    others = [str(d) for d in da.dims if d not in (ydim, xdim)]
    if len(others) > 1 or (others and da.sizes[others[0]] not in (3, 4)):
        raise InvalidArgumentError(
            f"{da.name or 'the array'} has dims {tuple(da.dims)}: draw one 2-D slice (e.g. ds.latent.sel(feature=0)) "
            "or an RGB(A) image with a last dim of 3 or 4."
        )
    n = da.sizes[ydim] * da.sizes[xdim]
    if max_pixels is not None and n > max_pixels:
        raise InvalidArgumentError(
            f"{da.name or 'the array'}: {da.sizes[ydim]} x {da.sizes[xdim]} elements to draw (more than max_pixels={max_pixels}); "
            "draw a coarser pyramid level (wsi_xr.open_slide(path, level=N)) or a selection, or pass max_pixels=None."
        )
    da = da.transpose(ydim, xdim, *others)
    extent = pixel_edge_extent(da, cell=cell, attrs=attrs)
    if ax is None:
        width, height = extent[1] - extent[0], extent[2] - extent[3]
        ax = Figure(figsize=(6.4, min(12.0, max(2.0, 6.4 * height / max(width, 1e-9))))).add_subplot()
    had_data = ax.has_data()
    before = (ax.get_xlim(), ax.get_ylim())
    values = np.asarray(da.values)
    colour_mapped = False
    if values.dtype == bool:
        alpha = kwargs.pop("alpha", None)
        data = _mask_rgba(values, colour, 0.5 if alpha is None else float(alpha))
    elif others and values.dtype.kind == "f" and np.isnan(values).any():
        data = _nan_transparent(values)
    else:
        data, colour_mapped = values, not others
    kwargs.setdefault("interpolation", "nearest")
    artist = ax.imshow(data, origin="upper", extent=extent, **kwargs)
    left, right, bottom, top = extent
    if had_data:  # keep what was drawn before in view
        xs = (*before[0], left, right)
        ys = (*before[1], bottom, top)
        left, right, bottom, top = min(xs), max(xs), max(ys), min(ys)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)  # y downward: the larger level-0 y at the bottom
    ax.set_aspect("equal")
    if not ax.get_xlabel():
        ax.set_xlabel(f"{xdim} (level-0 px)")
    if not ax.get_ylabel():
        ax.set_ylabel(f"{ydim} (level-0 px)")
    if add_colorbar is None:
        add_colorbar = colour_mapped
    if add_colorbar and colour_mapped:
        fig = ax.get_figure()
        assert fig is not None
        fig.colorbar(artist, ax=ax, label=str(da.name) if da.name is not None else None)
    return artist


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


def _tile_edges(ds: xr.Dataset, dim: str) -> np.ndarray:
    """The level-0 edges of a tile grid along ``dim``: each tile's origin, then the last one's end."""
    origins = np.asarray(ds[dim].values, dtype=np.float64)
    if origins.size == 0:
        return np.array([0.0])
    return np.append(origins, origins[-1] + cell_size(ds["tile_mask"], dim, ds.attrs))


def plot_mask_overlay(mask: xr.Dataset, slide: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a PNG: the slide thumbnail, tissue tiles in green, read errors in red.

    When ``mask`` has a ``pen_mask (tile_y, tile_x)`` variable (pen-mark rejection),
    its tiles are drawn in a third colour (purple) with their own legend entry.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched
    from matplotlib.patches import Patch

    thumb = thumbnail(slide)
    x_edges, y_edges = _tile_edges(mask, "tile_x"), _tile_edges(mask, "tile_y")
    left, right, bottom, top = pixel_edge_extent(thumb)  # each thumbnail pixel covers [c, c + its size): aligned with the tiles
    width, height = right - left, bottom - top
    fig = Figure(figsize=(12, 6 * height / max(width, 1) + 0.8), dpi=110)
    axes = fig.subplots(1, 2)
    for ax in axes:
        imshow(thumb, ax, max_pixels=None)
        ax.set_xlabel("x (level-0 px)")
        ax.set_ylabel("")
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
    axes[1].set_xlim(left, right)
    axes[1].set_ylim(bottom, top)
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
    width = float(_tile_edges(ds, "tile_x")[-1]) or 1.0
    height = float(_tile_edges(ds, "tile_y")[-1]) or 1.0
    panels = 2 if slide is not None else 1
    fig = Figure(figsize=(6 * panels, 6 * height / max(width, 1) + 0.8), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)
    if slide is not None:
        imshow(thumbnail(slide), axes[0, 0], max_pixels=None)  # pixel edges, as the tiles: the two panels align
        axes[0, 0].set_title("slide")
    axes[0, -1].imshow(shown, extent=(0, width, height, 0), interpolation="nearest")  # tiles on their edges: [c, c + tile)
    axes[0, -1].set_title(f"latent map: PCs 1-3 of {int(tissue.sum())} tissue tiles as RGB")
    for ax in axes[0]:
        ax.set_xlabel("x (level-0 px)")
        ax.set_ylabel("")
    axes[0, 0].set_ylabel("y (level-0 px)")
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
