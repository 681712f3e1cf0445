"""Drawing tissue tiles from slides (for training and figures), through the lazy mask.

The mask is computed once per slide; the chosen tiles are then read in one pass,
grouped by chunk (each chunk holding a chosen tile is decoded once), and kept in
memory, so training epochs never decode the slides again.
"""

from __future__ import annotations

import os
from typing import Sequence

import dask
import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.slide import open_slide
from wsi_xr.tissue import resolve_threshold, tissue_mask


def sample_tissue_tiles(
    slides: Sequence[str | os.PathLike[str]],
    *,
    max_tiles: int | None = None,
    seed: int = 0,
    tile: int = 64,
    threshold: float | str = "auto",
) -> tuple[np.ndarray, list[dict[str, object]]]:
    """Tissue tiles ``(N, tile, tile, 3)`` uint8 from ``slides``, and where each came from.

    ``max_tiles`` caps the total (drawn at random with ``seed``, spread over the
    slides in proportion to their tissue); None takes every tissue tile.
    """
    if not slides:
        raise InvalidArgumentError("no slides given to sample tiles from.")
    if max_tiles is not None and max_tiles < 1:
        raise InvalidArgumentError(f"max_tiles={max_tiles}: must be >= 1.")
    rng = np.random.default_rng(seed)
    found = []
    for path in slides:
        image = open_slide(path)
        with dask.config.set(scheduler="threads"):
            mask = resolve_threshold(tissue_mask(image, tile=tile, threshold=threshold).compute())
        rows, cols = np.nonzero(mask.tile_mask.values)
        found.append((path, image, mask, rows, cols))
    total = sum(len(rows) for *_, rows, _ in found)
    if total == 0:
        raise InvalidArgumentError(f"no tissue tiles found in {', '.join(str(s) for s in slides)}.")
    take_all = max_tiles is None or max_tiles >= total
    tiles, origins = [], []
    for path, image, mask, rows, cols in found:
        n = len(rows) if take_all else int(round(max_tiles * len(rows) / total))
        if n == 0:
            continue
        pick = np.sort(rng.choice(len(rows), size=n, replace=False)) if n < len(rows) else np.arange(len(rows))
        grid = image.wsi.tiles(tile)
        chosen = grid.isel(tile_y=("t", rows[pick]), tile_x=("t", cols[pick]))  # vectorised: one read per chunk
        with dask.config.set(scheduler="threads"):
            tiles.append(chosen.transpose("t", "y_in_tile", "x_in_tile", "c").values)
        origins.extend(
            {"slide": str(path), "x": int(mask.tile_x.values[c]), "y": int(mask.tile_y.values[r])}
            for r, c in zip(rows[pick], cols[pick])
        )
    return np.concatenate(tiles), origins
