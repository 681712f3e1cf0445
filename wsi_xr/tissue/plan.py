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
from wsi_xr.resample import ReadScale, scaled_array
from wsi_xr.slide import TARGET_CHUNK, ChunkSpec, default_chunk_size, level_coords, slide_array
from wsi_xr.tissue.coarse import CoarseDecision, choose_coarse_level, coarse_decision, segments_for_patches
from wsi_xr.tissue.core import blocks_any, damaged_tile_grid, patch_chunks
from wsi_xr.tissue.params import MaskParams

__all__ = ["MaskPlan", "plain_plan", "plan_chunks", "plan_mask", "target_chunks"]

Chunks = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class MaskPlan:
    """What a mask of one level will read and how it is cut (see :func:`plan_mask`).

    Attributes
    ----------
    params
        The mask's settings.
    shape
        ``(height, width)`` of the level in pixels (with a target mpp: of the resampled
        image, whole tiles only).
    chunks
        Pixel chunks along y and x (every one but the last a multiple of the patch;
        target pixels with a target mpp).
    excluded
        Bool ``(tile_y, tile_x)``: tiles touching a structurally damaged file tile.
    read_patches
        Bool ``(patch_y, patch_x)``: patches to read (the coarse pass's "may hold tissue").
    opened, level
        The slide and level (None for pixels wsi_xr did not open).
    decision
        The coarse pass's decision (None: every patch is read).
    scale
        With a target mpp: the level read and its pixels per tile
        (:class:`~wsi_xr.resample.ReadScale`); the pixels are resampled to the target.
    """

    params: MaskParams
    shape: tuple[int, int]
    chunks: Chunks
    excluded: np.ndarray
    read_patches: np.ndarray
    opened: OpenedSlide | None = None
    level: int | None = None
    decision: CoarseDecision | None = None
    scale: ReadScale | None = None

    @property
    def level_tile(self) -> int:
        """Tile side in pixels of the level read (``tile`` unless a target mpp resamples)."""
        return self.params.tile if self.scale is None else self.scale.level_tile

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
        level_patch = self.params.tiles_per_patch * self.level_tile
        if self.decision is not None or not patches.all():
            wanted = segments_for_patches(self.opened.damage(self.level), patches, level_patch)
        if self.scale is None:
            return slide_array(self.opened, self.level, (self.chunks[0][0], self.chunks[1][0]), device, damaged="report", wanted=wanted)
        read = slide_array(self.opened, self.level, None, device, damaged="report", wanted=wanted)  # on the file's tile borders
        return scaled_array(read, self.scale, self.chunks)

    def coords(self) -> dict[str, np.ndarray]:
        """Level-0 origins of the tiles and patches (and of the chunks)."""
        tile, patch = self.level_tile, self.params.tiles_per_patch * self.level_tile
        nty, ntx = self.tile_grid
        if self.opened is not None and self.level is not None:
            level = level_coords(self.opened.info, self.level)
            y, x = level["y"], level["x"]
        else:
            y, x = np.arange(self.shape[0]), np.arange(self.shape[1])
        chunk_starts = [np.cumsum((0,) + c[:-1]) // self.params.tile * tile for c in self.chunks]
        return {
            "tile_y": y[: nty * tile : tile],
            "tile_x": x[: ntx * tile : tile],
            "patch_y": y[: nty * tile : patch],
            "patch_x": x[: ntx * tile : patch],
            "chunk_y": y[chunk_starts[0]],
            "chunk_x": x[chunk_starts[1]],
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
                mpp_source=info.mpp_source,
                level=self.level,
                downsample=info.levels[self.level].downsample,
                backend=self.opened.backend,
                backend_reason=self.opened.choice.reason,
            )
        if self.scale is not None:
            attrs.update(self.scale.attrs())
        return attrs


def target_chunks(scale: ReadScale, level_shape: tuple[int, int], chunks: ChunkSpec, params: MaskParams) -> Chunks:
    """The target-pixel chunks of a resampled level: whole tiles only (partial edge tiles
    are not tissue). Default: whole patches, about :data:`~wsi_xr.slide.TARGET_CHUNK` level pixels."""
    height, width = (n // scale.level_tile * scale.tile for n in level_shape)
    if chunks is None:
        patches = max(1, round(TARGET_CHUNK / (params.patch * scale.factor)))
        chunks = params.patch * patches
    if isinstance(chunks, dict):
        spec: Any = (chunks.get("y", -1), chunks.get("x", -1))
    else:
        spec = chunks
    normalized = da.core.normalize_chunks(spec if isinstance(spec, tuple) else (spec, spec), (height, width))
    return normalized[0], normalized[1]


def plan_chunks(opened: OpenedSlide, level: int, chunks: ChunkSpec, params: MaskParams, scale: ReadScale | None = None) -> Chunks:
    """The checks of a mask plan that read nothing: the level and the coarse level exist, the
    chunking holds whole patches. Returns the pixel chunks (None: the default chunk, on the
    file's tile borders and a multiple of the patch). With ``scale`` (a target mpp) the
    level is ``scale.level`` and the chunks are in target pixels."""
    info = opened.info
    if scale is not None:
        lv = info.levels[scale.level]
        block_chunks = target_chunks(scale, (lv.height, lv.width), chunks, params)
        params.check_chunks(block_chunks, f"pass chunks as a multiple of {params.patch} target pixels.")
        choose_coarse_level(info, scale.level, params.coarse)
        return block_chunks
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


def plan_mask(opened: OpenedSlide, level: int, chunks: ChunkSpec, params: MaskParams, scale: ReadScale | None = None) -> MaskPlan:
    """Plan the mask of ``level``: check the chunking and the coarse level, run the coarse
    pass and the damage scan (the only reads: the coarse level and the file structure).

    ``chunks`` None means the default: on the file's tile borders, a multiple of the patch
    (:func:`wsi_xr.slide.default_chunk_size`). With ``scale``
    (:func:`wsi_xr.resample.choose_scale` of a target mpp) ``scale.level`` is read and
    resampled to the target; ``level`` is ignored and ``chunks`` are target pixels.
    """
    if scale is not None:
        level = scale.level
    block_chunks = plan_chunks(opened, level, chunks, params, scale)
    lv = opened.info.levels[level]
    level_tile = params.tile if scale is None else scale.level_tile
    nty, ntx = lv.height // level_tile, lv.width // level_tile
    k = params.tiles_per_patch
    patch_shape = (-(-nty // k), -(-ntx // k))
    decision = coarse_decision(opened, level, params.coarse, patch_shape=patch_shape, patch=k * level_tile)
    read_patches = decision.patches if decision is not None else np.ones(patch_shape, dtype=bool)
    excluded = damaged_tile_grid(opened.damage(level), level_tile, (nty, ntx))
    shape = (lv.height, lv.width) if scale is None else (nty * params.tile, ntx * params.tile)
    return MaskPlan(params, shape, block_chunks, excluded, read_patches, opened, int(level), decision, scale)


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
