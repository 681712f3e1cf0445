"""The one plan of a tissue mask: everything decided before any level pixel is read.

:func:`plan_mask` takes an opened slide, a level, a chunking and :class:`MaskParams` and
returns a :class:`MaskPlan`: the chunks, the coarse decision (which patches to read, which
file tiles to decode), the damaged tiles, and the provenance attributes. :func:`wsi_xr.tissue_mask`
and :func:`wsi_xr.process_slide` both start from it; :func:`plain_plan` is the same for
pixels that wsi_xr did not open (nothing to skip, no damage known).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from wsi_xr.readers import OpenedSlide
from wsi_xr.slide import ChunkSpec, default_chunk_size, level_coords, slide_array
from wsi_xr.tissue.coarse import CoarseDecision, choose_coarse_level, coarse_decision, segments_for_patches
from wsi_xr.tissue.core import blocks_any, damaged_tile_grid, patch_chunks
from wsi_xr.tissue.params import MaskParams

__all__ = ["MaskPlan", "plain_plan", "plan_chunks", "plan_mask"]

Chunks = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class MaskPlan:
    """What a mask of one level will read and how it is cut (see :func:`plan_mask`).

    Attributes
    ----------
    params
        The mask's settings.
    shape
        ``(height, width)`` of the level in pixels.
    chunks
        Pixel chunks along y and x (every one but the last a multiple of the patch).
    excluded
        Bool ``(tile_y, tile_x)``: tiles touching a structurally damaged file tile.
    read_patches
        Bool ``(patch_y, patch_x)``: patches to read (the coarse pass's "may hold tissue").
    opened, level
        The slide and level (None for pixels wsi_xr did not open).
    decision
        The coarse pass's decision (None: every patch is read).
    """

    params: MaskParams
    shape: tuple[int, int]
    chunks: Chunks
    excluded: np.ndarray
    read_patches: np.ndarray
    opened: OpenedSlide | None = None
    level: int | None = None
    decision: CoarseDecision | None = None

    @property
    def tile_grid(self) -> tuple[int, int]:
        """``(tile_y, tile_x)`` counts: whole tiles only."""
        tile = self.params.tile
        return self.shape[0] // tile, self.shape[1] // tile

    @property
    def tile_chunks(self) -> Chunks:
        tile = self.params.tile
        return tuple(c // tile for c in self.chunks[0]), tuple(c // tile for c in self.chunks[1])

    @property
    def patch_chunks(self) -> Chunks:
        k = self.params.tiles_per_patch
        ty, tx = self.tile_chunks
        return patch_chunks(ty, k), patch_chunks(tx, k)

    def chunks_read(self) -> np.ndarray:
        """Bool per chunk: whether any of its patches is read."""
        return blocks_any(self.read_patches, self.patch_chunks)

    def pixels(self, device: str = "cpu", read_patches: np.ndarray | None = None) -> da.Array:
        """The level's blocks for the statistics, read with ``damaged="report"``: only the file
        tiles under ``read_patches`` (default: the plan's) are decoded."""
        assert self.opened is not None and self.level is not None, "pixels() needs a plan of an opened slide"
        patches = self.read_patches if read_patches is None else read_patches
        wanted = None
        if self.decision is not None or not patches.all():
            wanted = segments_for_patches(self.opened.damage(self.level), patches, self.params.patch)
        return slide_array(self.opened, self.level, (self.chunks[0][0], self.chunks[1][0]), device, damaged="report", wanted=wanted)

    def coords(self) -> dict[str, np.ndarray]:
        """Level-0 origins of the tiles and patches (and of the chunks)."""
        tile, patch = self.params.tile, self.params.patch
        nty, ntx = self.tile_grid
        if self.opened is not None and self.level is not None:
            level = level_coords(self.opened.info, self.level)
            y, x = level["y"], level["x"]
        else:
            y, x = np.arange(self.shape[0]), np.arange(self.shape[1])
        return {
            "tile_y": y[: nty * tile : tile],
            "tile_x": x[: ntx * tile : tile],
            "patch_y": y[: nty * tile : patch],
            "patch_x": x[: ntx * tile : patch],
            "chunk_y": y[np.cumsum((0,) + self.chunks[0][:-1])],
            "chunk_x": x[np.cumsum((0,) + self.chunks[1][:-1])],
        }

    def attrs(self) -> dict[str, Any]:
        """Provenance: the settings, what the coarse pass decided and what will be decoded, and
        the slide's identity (for an opened slide)."""
        reads = self.chunks_read()
        attrs: dict[str, Any] = {
            **self.params.attrs(),
            "coarse_level": -1 if self.decision is None else self.decision.coarse_level,
            "chunks_total": int(reads.size),
            "chunks_read": int(reads.sum()),
            "patches_total": int(self.read_patches.size),
            "patches_read": int(self.read_patches.sum()),
            "file_tiles_total": 0,
            "file_tiles_decoded": 0,
            "damaged_file_tiles": 0,
        }
        if self.opened is not None and self.level is not None:
            info, damage = self.opened.info, self.opened.damage(self.level)
            decoded = ~damage.damaged if self.decision is None else self.decision.segments & ~damage.damaged
            attrs.update(
                file_tiles_total=int(damage.damaged.size),
                file_tiles_decoded=int(decoded.sum()),
                damaged_file_tiles=int(damage.damaged.sum()),
                source=info.path,
                file_size=info.file_size,
                mtime_ns=info.mtime_ns,
                vendor=info.vendor,
                format=info.format,
                mpp=info.mpp,
                level=self.level,
                downsample=info.levels[self.level].downsample,
                backend=self.opened.backend,
                backend_reason=self.opened.choice.reason,
            )
        return attrs


def plan_chunks(opened: OpenedSlide, level: int, chunks: ChunkSpec, params: MaskParams) -> Chunks:
    """The checks of a mask plan that read nothing: the level and the coarse level exist, the
    chunking holds whole patches. Returns the pixel chunks (None: the default chunk, on the
    file's tile borders and a multiple of the patch)."""
    info = opened.info
    levels = len(info.levels)
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level < levels:
        from wsi_xr.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{info.path}: level={level} does not exist; the slide has levels 0..{levels - 1}.")
    lv = info.levels[level]
    suggestion = default_chunk_size(lv, multiple=params.patch)
    block_chunks = slide_array(opened, level, suggestion if chunks is None else chunks).chunks[:2]  # checks the spec; reads nothing
    params.check_chunks(block_chunks, f"open the slide with (or pass --chunk) a multiple of {params.patch}, e.g. {suggestion}.")
    choose_coarse_level(info, level, params.coarse)  # a coarse level that exists, before any read
    return block_chunks[0], block_chunks[1]


def plan_mask(opened: OpenedSlide, level: int, chunks: ChunkSpec, params: MaskParams) -> MaskPlan:
    """Plan the mask of ``level``: check the chunking and the coarse level, run the coarse
    pass and the damage scan (the only reads: the coarse level and the file structure).

    ``chunks`` None means the default: on the file's tile borders, a multiple of the patch
    (:func:`wsi_xr.slide.default_chunk_size`).
    """
    block_chunks = plan_chunks(opened, level, chunks, params)
    lv = opened.info.levels[level]
    nty, ntx = lv.height // params.tile, lv.width // params.tile
    k = params.tiles_per_patch
    patch_shape = (-(-nty // k), -(-ntx // k))
    decision = coarse_decision(opened, level, params.coarse, patch_shape=patch_shape, patch=params.patch)
    read_patches = decision.patches if decision is not None else np.ones(patch_shape, dtype=bool)
    excluded = damaged_tile_grid(opened.damage(level), params.tile, (nty, ntx))
    return MaskPlan(params, (lv.height, lv.width), block_chunks, excluded, read_patches, opened, int(level), decision)


def plain_plan(shape: tuple[int, int], chunks: Chunks, params: MaskParams) -> MaskPlan:
    """The plan for pixels wsi_xr did not open (a modified array): every patch read, no damage known."""
    if params.coarse not in ("auto", "none"):
        from wsi_xr.errors import InvalidArgumentError

        raise InvalidArgumentError(f"coarse={params.coarse!r} needs an image straight from wsi_xr.open_slide (this one was modified).")
    params.check_chunks(
        chunks, f"rechunk the image to a multiple of patch={params.patch} (e.g. .chunk({{'y': {params.patch * 8}, 'x': {params.patch * 8}}}))."
    )
    nty, ntx = shape[0] // params.tile, shape[1] // params.tile
    k = params.tiles_per_patch
    patch_shape = (-(-nty // k), -(-ntx // k))
    return MaskPlan(params, shape, chunks, np.zeros((nty, ntx), dtype=bool), np.ones(patch_shape, dtype=bool))
