"""Drawing tissue tiles from slides (for training, evaluation and figures), through the lazy mask.

The mask is computed once per slide; the chosen tiles are then read in one pass,
grouped by chunk (each chunk holding a chosen tile is decoded once), and kept in
memory, so training epochs never decode the slides again.

A level-0 rectangle (:class:`Region`) can restrict a slide to the tiles wholly
*inside* it (a held-out block to evaluate on) or to the tiles that stay clear of it by
a margin (the rest of the slide, to train on), so a held-out block of a slide never
touches training.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dask
import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.slide import open_slide
from wsi_xr.tissue import resolve_threshold, tissue_mask

__all__ = [
    "Region",
    "evaluate_slides",
    "parse_region",
    "parse_slide_region",
    "sample_tissue_tiles",
]

#: Tile side (pixels) sampled by default: the model's input.
TILE = 64
#: Default gap (level-0 pixels) kept between a held-out block and any training tile.
DEFAULT_MARGIN = 64


@dataclass(frozen=True)
class Region:
    """A level-0 rectangle: top-left ``(x, y)``, size ``width x height`` pixels."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidArgumentError(f"region {name}={value!r}: give an integer number of level-0 pixels")
        if self.x < 0 or self.y < 0 or self.width < 1 or self.height < 1:
            raise InvalidArgumentError(f"region {self.as_text()}: x and y must be >= 0 and width, height >= 1 (level-0 pixels)")

    def as_text(self) -> str:
        """``"X,Y,W,H"``, as :func:`parse_slide_region` reads it."""
        return f"{self.x},{self.y},{self.width},{self.height}"

    def inside(self, tx: np.ndarray, ty: np.ndarray, tile: int) -> np.ndarray:
        """Which tiles (level-0 origins ``tx``, ``ty``, side ``tile``) lie wholly inside the rectangle."""
        tx, ty = np.asarray(tx), np.asarray(ty)
        return (tx >= self.x) & (ty >= self.y) & (tx + tile <= self.x + self.width) & (ty + tile <= self.y + self.height)

    def clear_of(self, tx: np.ndarray, ty: np.ndarray, tile: int, margin: int) -> np.ndarray:
        """Which tiles stay at least ``margin`` pixels away from the rectangle (no pixel within it)."""
        tx, ty = np.asarray(tx), np.asarray(ty)
        x0, y0 = self.x - margin, self.y - margin
        x1, y1 = self.x + self.width + margin, self.y + self.height + margin
        overlaps = (tx < x1) & (tx + tile > x0) & (ty < y1) & (ty + tile > y0)
        return ~overlaps


#: ``X,Y,W,H``: four integers, spaces allowed around them.
_RECTANGLE = re.compile(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*")


def parse_slide_region(text: str) -> tuple[str, Region]:
    """``"SLIDE=X,Y,W,H"`` -> ``(SLIDE, Region)``; SLIDE is a path or a file name.

    Raises
    ------
    InvalidArgumentError
        When the text is not of that form.
    """
    match = re.fullmatch(r"\s*(.+?)\s*=(.*)", str(text))
    numbers = _RECTANGLE.fullmatch(match.group(2)) if match else None
    if not match or not numbers:
        raise InvalidArgumentError(
            f"region {text!r}: write SLIDE=X,Y,W,H (the slide's path or file name, then the level-0 "
            "top-left corner and size in pixels), e.g. cmu-1-small-region.svs=0,1984,2220,983"
        )
    return match.group(1), Region(*(int(v) for v in numbers.groups()))


def parse_region(text: str) -> Region:
    """``"X,Y,W,H"`` (level-0 pixels) -> :class:`Region`.

    Raises
    ------
    InvalidArgumentError
        When the text is not of that form.
    """
    numbers = _RECTANGLE.fullmatch(str(text))
    if not numbers:
        raise InvalidArgumentError(f"region {text!r}: write X,Y,W,H (the level-0 top-left corner and size in pixels), e.g. 0,2048,2220,919")
    return Region(*(int(v) for v in numbers.groups()))


def _region_for(path: str | os.PathLike[str], regions: Mapping[str, Region] | None) -> Region | None:
    """The region keyed by ``path`` itself, its resolved path, or its file name."""
    if not regions:
        return None
    p = Path(os.fspath(path))
    for key, region in regions.items():
        k = Path(os.fspath(key))
        if os.fspath(key) == os.fspath(path) or k.name == os.fspath(key) == p.name:
            return region
        if k.expanduser().resolve() == p.expanduser().resolve():
            return region
    return None


def _check_regions_used(slides: Sequence[Any], regions: Mapping[str, Region] | None, what: str) -> None:
    for key, region in (regions or {}).items():
        if not any(_region_for(s, {key: region}) is not None for s in slides):
            names = ", ".join(Path(os.fspath(s)).name for s in slides)
            raise InvalidArgumentError(f"{what} region for {key!r} matches none of the slides ({names}); key it by a slide's path or file name")


def sample_tissue_tiles(
    slides: Sequence[str | os.PathLike[str]],
    *,
    max_tiles: int | None = None,
    seed: int = 0,
    tile: int = TILE,
    threshold: float | str = "auto",
    inside: Mapping[str, Region] | None = None,
    outside: Mapping[str, Region] | None = None,
    margin: int = DEFAULT_MARGIN,
    stride: int | None = None,
) -> tuple[np.ndarray, list[dict[str, object]]]:
    """Tissue tiles ``(N, tile, tile, 3)`` uint8 from ``slides``, and where each came from.

    Parameters
    ----------
    slides
        Slide paths.
    max_tiles
        Caps the total (drawn at random with ``seed``, spread over the slides in
        proportion to their tissue); None takes every tissue tile.
    seed
        Seed of that random draw.
    tile, threshold
        Tile side and tissue threshold (see :func:`wsi_xr.tissue_mask`).
    inside
        ``{slide path or file name: Region}``: from those slides keep only the tissue
        tiles wholly inside the region (a held-out block, to evaluate on).
    outside
        ``{slide path or file name: Region}``: from those slides keep only the tissue
        tiles with no pixel within ``margin`` pixels of the region (the rest, to train on).
    margin
        Gap in level-0 pixels between an ``outside`` region and the tiles kept.
    stride
        ``None`` (or ``tile``): the tissue tiles of the ``tile`` grid. A divisor of
        ``tile`` below it: also the shifted copies of every tissue tile, its window moved
        right and down by every multiple of ``stride`` below ``tile`` (``(tile / stride)**2``
        windows per tissue tile, e.g. 16 for ``stride=16``; at least ``tile / 8``, i.e. at
        most 64 windows a tile). Windows reaching past the last whole grid tile, or into a
        tile with a read error, are dropped. Shifted windows overlap the next grid tiles, so they show
        tissue at positions the grid never does (translation augmentation for training,
        cut from the decoded pixels of the grid tiles, no extra reads). Regions apply to
        each window's own position.

    Returns
    -------
    tiles, origins
        The tiles, and per tile ``{"slide": path, "x": level-0 x, "y": level-0 y}``.

    Raises
    ------
    InvalidArgumentError
        No slides, a region that matches none of them, or no tissue tile left.
    """
    if not slides:
        raise InvalidArgumentError("no slides given to sample tiles from.")
    if max_tiles is not None and max_tiles < 1:
        raise InvalidArgumentError(f"max_tiles={max_tiles}: must be >= 1.")
    if isinstance(margin, bool) or int(margin) != margin or margin < 0:
        raise InvalidArgumentError(f"margin={margin!r}: give a number of level-0 pixels >= 0")
    stride = tile if stride is None else stride
    if isinstance(stride, bool) or int(stride) != stride or not tile // 8 <= stride <= tile or tile % stride:
        raise InvalidArgumentError(
            f"stride={stride!r}: give a divisor of the tile side {tile} of at least {max(1, tile // 8)} "
            f"(e.g. {tile // 4}: 16 windows a tile), or None"
        )
    _check_regions_used(slides, inside, "inside")
    _check_regions_used(slides, outside, "outside")
    rng = np.random.default_rng(seed)
    found = []
    for path in slides:
        image = open_slide(path)
        with dask.config.set(scheduler="threads"):
            mask = resolve_threshold(tissue_mask(image, tile=tile, threshold=threshold).compute())
        rows, cols = np.nonzero(mask.tile_mask.values)
        windows = _shifted_windows(rows, cols, mask.read_error.values, int(stride), tile)
        ty = mask.tile_y.values[windows.row] + windows.dy
        tx = mask.tile_x.values[windows.col] + windows.dx
        keep = np.ones(ty.size, dtype=bool)
        region_in, region_out = _region_for(path, inside), _region_for(path, outside)
        if region_in is not None:
            keep &= region_in.inside(tx, ty, tile)
        if region_out is not None:
            keep &= region_out.clear_of(tx, ty, tile, int(margin))
        found.append((path, image, _take(windows, keep), tx[keep], ty[keep]))
    total = sum(len(w) for _, _, w, _, _ in found)
    if total == 0:
        raise InvalidArgumentError(
            f"no tissue tiles found in {', '.join(str(s) for s in slides)}"
            + (" within the given regions; check the region rectangles" if inside or outside else ".")
        )
    take_all = max_tiles is None or max_tiles >= total
    tiles: list[np.ndarray] = []
    origins: list[dict[str, object]] = []
    for path, image, windows, tx, ty in found:
        n = len(windows) if take_all or max_tiles is None else int(round(max_tiles * len(windows) / total))
        if n == 0:
            continue
        pick = np.sort(rng.choice(len(windows), size=n, replace=False)) if n < len(windows) else np.arange(len(windows))
        tiles.append(_read_windows(image, _take(windows, pick), tile))
        origins.extend({"slide": str(path), "x": int(x), "y": int(y)} for x, y in zip(tx[pick], ty[pick]))
    return np.concatenate(tiles), origins


def _shifted_windows(rows: np.ndarray, cols: np.ndarray, read_error: np.ndarray, stride: int, tile: int) -> np.recarray:
    """Every ``(row, col, dy, dx)``: grid tile ``(row, col)`` moved by ``dy, dx`` multiples of ``stride`` below ``tile``.

    Windows reaching past the last whole grid tile (no tile below / right to cut from) or
    into a tile flagged in ``read_error`` (the tile grid's read errors) are dropped;
    ``stride == tile`` gives the grid tiles themselves.
    """
    shifts = np.arange(0, tile, stride)
    dy, dx = (a.ravel() for a in np.meshgrid(shifts, shifts, indexing="ij"))
    r, d = np.repeat(rows, dy.size), np.tile(np.arange(dy.size), rows.size)
    c = np.repeat(cols, dy.size)
    out = np.rec.fromarrays([r, c, dy[d], dx[d]], formats=None, names="row,col,dy,dx")
    below, right = out.dy > 0, out.dx > 0
    n_rows, n_cols = read_error.shape
    keep = (~below | (out.row + 1 < n_rows)) & (~right | (out.col + 1 < n_cols))
    for need, down, across in ((below, 1, 0), (right, 0, 1), (below & right, 1, 1)):
        check = keep & need
        keep[check] &= ~read_error[out.row[check] + down, out.col[check] + across]
    return _take(out, keep)


def _take(windows: np.recarray, which: np.ndarray) -> np.recarray:
    """``windows[which]`` (a record array still; NumPy's stubs type it as a plain array)."""
    return cast(np.recarray, windows[which])


def _read_windows(image: Any, windows: np.recarray, tile: int) -> np.ndarray:
    """uint8 ``(n, tile, tile, 3)`` pixels of the (shifted) windows, cut from their grid tiles read once each."""
    below, right = windows.dy > 0, windows.dx > 0
    need_r = np.concatenate([windows.row, windows.row[below] + 1, windows.row[right], windows.row[below & right] + 1])
    need_c = np.concatenate([windows.col, windows.col[below], windows.col[right] + 1, windows.col[below & right] + 1])
    need = np.unique(np.stack([need_r, need_c], axis=1), axis=0)
    grid = image.wsi.tiles(tile)
    chosen = grid.isel(tile_y=("t", need[:, 0]), tile_x=("t", need[:, 1]))  # vectorised: one read per chunk
    with dask.config.set(scheduler="threads"):
        pixels = chosen.transpose("t", "y_in_tile", "x_in_tile", "c").values
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(need)}
    out = np.empty((len(windows), tile, tile, pixels.shape[-1]), dtype=pixels.dtype)
    block = np.zeros((2 * tile, 2 * tile, pixels.shape[-1]), dtype=pixels.dtype)
    sources, owner = np.unique(np.stack([windows.row, windows.col], axis=1), axis=0, return_inverse=True)
    order = np.argsort(owner.ravel(), kind="stable")
    bounds = np.searchsorted(owner.ravel()[order], np.arange(len(sources) + 1))
    for s, (r, c) in enumerate(sources):  # one 2x2-tile block per source tile, all its windows cut from it
        for a in (0, 1):
            for b in (0, 1):
                index = where.get((int(r) + a, int(c) + b))
                if index is not None:  # a missing neighbour is never inside one of this source's windows
                    block[a * tile : (a + 1) * tile, b * tile : (b + 1) * tile] = pixels[index]
        for i in order[bounds[s] : bounds[s + 1]]:
            dy, dx = int(windows.dy[i]), int(windows.dx[i])
            out[i] = block[dy : dy + tile, dx : dx + tile]
    return out


def _unique_names(slides: Sequence[str | os.PathLike[str]]) -> list[str]:
    """File names, with the parent folder added where two slides share a name."""
    names = [Path(os.fspath(s)).name for s in slides]
    return [str(Path(os.fspath(s)).parent.name + "/" + n) if names.count(n) > 1 else n for s, n in zip(slides, names)]


def evaluate_slides(
    weights: Any,
    slides: Sequence[str | os.PathLike[str]],
    *,
    train_slides: Sequence[str | os.PathLike[str]] = (),
    regions: Mapping[str, Region] | None = None,
    margin: int = DEFAULT_MARGIN,
    max_tiles: int | None = None,
    max_train_tiles: int | None = None,
    seed: int = 0,
    n_components: int = 32,
    dihedral: bool = True,
    sides: Sequence[int] = (1, 3, 6),
    threshold: float | str = "auto",
    device: str = "cpu",
    train_stride: int | None = None,
) -> Any:
    """Reconstruction MSE of a VAE, PCA and downsampling on the tissue tiles of ``slides``.

    Parameters
    ----------
    weights
        A weights file for :func:`wsi_xr.models.load_vae` (None: the shipped default),
        an already loaded :class:`~wsi_xr.models.VAE2`, or ``False`` for no VAE column.
    slides
        Evaluation slides; one row of the report each.
    train_slides
        Slides whose tissue tiles the PCA is fitted on (nothing else ever is). Empty: no
        PCA column.
    regions
        ``{slide path or file name: Region}``: evaluate that slide on the tissue tiles
        wholly inside the region only, and (when it is also a training slide) fit the
        PCA on its tiles clear of the region by ``margin`` pixels only.
    margin
        Gap in level-0 pixels between a held-out region and any training tile.
    max_tiles, max_train_tiles
        Caps on the evaluation tiles per slide and on the PCA training tiles in all.
    seed
        Seed of those random draws.
    n_components, dihedral
        PCA size; whether its fit includes the 8 flips / rotations of every tile.
    sides
        Downsampling sides ``k``.
    threshold
        Tissue threshold for both tile sets.
    device
        Torch device for the VAE.
    train_stride
        Fit the PCA also on the shifted copies of the training tiles (``stride`` of
        :func:`sample_tissue_tiles`), the tile set ``wsi-xr train --stride`` trains on.

    Returns
    -------
    wsi_xr.models.evaluate.EvalReport
        Rows named by the slides' file names (with ``[X,Y,W,H]`` for a region).

    Raises
    ------
    InvalidArgumentError
        A slide that is both evaluated and trained on without a region (the PCA would
        see evaluation tiles), a region matching no slide, or no tissue.
    """
    from wsi_xr.models import load_vae
    from wsi_xr.models.evaluate import evaluate_tiles
    from wsi_xr.models.vae import VAE2

    if not slides:
        raise InvalidArgumentError("no evaluation slides given; pass at least one SLIDE")
    _check_regions_used(slides, regions, "evaluation")
    train_resolved = {Path(os.fspath(s)).expanduser().resolve() for s in train_slides}
    for s in slides:
        if Path(os.fspath(s)).expanduser().resolve() in train_resolved and _region_for(s, regions) is None:
            raise InvalidArgumentError(
                f"{s} is both an evaluation and a training slide with no region: the PCA would be fitted on "
                "the tiles it is judged on; hold out a block with a region (SLIDE=X,Y,W,H) or drop it from "
                "the training slides"
            )
    eval_sets: dict[str, np.ndarray] = {}
    for s, name in zip(slides, _unique_names(slides)):
        region = _region_for(s, regions)
        tiles, _ = sample_tissue_tiles(
            [s],
            max_tiles=max_tiles,
            seed=seed,
            threshold=threshold,
            inside={os.fspath(s): region} if region is not None else None,
        )
        eval_sets[name + (f" [{region.as_text()}]" if region is not None else "")] = tiles
    train_tiles = None
    if train_slides:
        outside = {os.fspath(s): r for s in train_slides if (r := _region_for(s, regions)) is not None}
        train_tiles, _ = sample_tissue_tiles(
            list(train_slides),
            max_tiles=max_train_tiles,
            seed=seed,
            threshold=threshold,
            outside=outside or None,
            margin=margin,
            stride=train_stride,
        )
    if weights is False:
        model = None
    elif isinstance(weights, VAE2):
        model = weights
    else:
        model = load_vae(weights, device=device)
    report = evaluate_tiles(model, eval_sets, train_tiles=train_tiles, n_components=n_components, dihedral=dihedral, sides=sides)
    report.settings.update(
        {
            "eval_slides": [os.fspath(s) for s in slides],
            "train_slides": [os.fspath(s) for s in train_slides],
            "regions": {str(k): v.as_text() for k, v in (regions or {}).items()},
            "margin": int(margin),
            "threshold": threshold,
            "train_tiles": 0 if train_tiles is None else int(train_tiles.shape[0]),
            "train_stride": int(train_stride or TILE),
            "seed": int(seed),
        }
    )
    return report
