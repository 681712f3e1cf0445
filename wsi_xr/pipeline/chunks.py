"""One slide's plan and its chunk tasks: statistics, encoding and region writes from one read.

Each chunk task calls the tissue core (:func:`wsi_xr.tissue.core.chunk_statistics`, the
same function the lazy :func:`wsi_xr.tissue_mask` maps over its blocks) and the encoder core
(:func:`wsi_xr.encode.encode_block`), then writes its Zarr regions and marks itself done.

Why the tasks write (rather than ``da.store`` / ``to_zarr(region=...)``): resume needs a
chunk's data and its ``chunk_done`` flag written by the same task, data first, so that a
kill at any moment leaves either a finished chunk or one that is redone; and with
``threshold="auto"`` the latents are written before the threshold is known (candidates
above the lowest threshold "auto" can choose), then blanked by finalising. A graph that
stores several arrays from one task is exactly this; ``da.store`` would store them as
separate tasks and lose the ordering.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

from wsi_xr._failpoints import failpoint
from wsi_xr._timing import stage
from wsi_xr.encode import ModelRef, encode_block
from wsi_xr.pipeline.options import RunOptions, candidate_floor, run_chunks, run_fingerprint
from wsi_xr.readers import OpenedSlide, unpack_window
from wsi_xr.store import SlideLayout, zarr_array
from wsi_xr.tissue.core import chunk_statistics, masked_statistics, two_stage_rule
from wsi_xr.tissue.plan import MaskPlan, plan_mask

if TYPE_CHECKING:
    from wsi_xr.models.encoders import EncoderRef

__all__ = ["ChunkJob", "RunPlan", "chunk_graph", "plan_run"]


@dataclass
class RunPlan:
    """A slide's mask plan (:class:`~wsi_xr.tissue.MaskPlan`), the run's options and its fingerprint."""

    mask: MaskPlan
    options: RunOptions
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def opened(self) -> OpenedSlide:
        assert self.mask.opened is not None
        return self.mask.opened

    @property
    def level(self) -> int:
        """The level read (the target mpp's choice, or the options' level)."""
        assert self.mask.level is not None
        return self.mask.level

    def layout(self) -> SlideLayout:
        """The store layout of this slide."""
        coords = self.mask.coords()
        tile_chunks, patch_chunks = self.mask.tile_chunks, self.mask.patch_chunks
        return SlideLayout(
            **coords,
            tile_chunks=(tile_chunks[0][0], tile_chunks[1][0]),
            patch_chunks=(patch_chunks[0][0], patch_chunks[1][0]),
            n_features=self.options.features,
            tile_flags=("pen_mask",) if self.options.reject_pen else (),
            n_subtiles=self.options.subtiles**2,
        )


def plan_run(opened: OpenedSlide, options: RunOptions) -> RunPlan:
    """The run's plan of one slide: :func:`~wsi_xr.tissue.plan_mask` and the fingerprint."""
    mask = plan_mask(opened, options.level, run_chunks(opened, options), options.mask, options.scale(opened))
    return RunPlan(mask, options, run_fingerprint(opened, options, mask.chunks))


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk task needs besides its pixels (small: it travels with each task)."""

    store: str
    group: str | None
    tile: int
    patch: int
    candidate_floor: float
    ref: ModelRef | EncoderRef
    batch_size: int | None
    reject_pen: bool
    torch_threads: int | str | None = None
    subtiles: int = 0
    #: A token of the run's fingerprint (slide, options, chunks), hence of the group's layout:
    #: tasks reuse arrays opened for the same store, group and layout (:func:`group_arrays`).
    layout: str = ""

    @classmethod
    def of(cls, store: str, group: str | None, options: RunOptions, fingerprint: dict[str, Any]) -> ChunkJob:
        assert options.ref is not None
        params = options.mask
        return cls(
            store,
            group,
            params.tile,
            params.patch,
            candidate_floor(options),
            options.ref,
            options.batch_size,
            options.reject_pen,
            options.torch_threads,
            options.subtiles,
            tokenize(fingerprint),
        )


class GroupArrays:
    """The arrays of one slide's group in a store, each opened on first use (``arrays["latent"]``).

    Opening reads and parses JSON metadata (the group's, the array's): ~4 ms of a chunk
    task's 10 ms of writes when each task opened them itself.
    """

    def __init__(self, store: str, group: str | None) -> None:
        self._store, self._group_name = store, group
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> zarr.Array:
        array = self._arrays.get(name)
        if array is None:
            with self._lock:
                if self._group is None:
                    root = zarr.open_group(self._store, mode="r+", zarr_format=3, use_consolidated=False)
                    self._group = cast(zarr.Group, root[self._group_name]) if self._group_name else root
                array = self._arrays.setdefault(name, zarr_array(self._group, name))
        return array


_OPENED: OrderedDict[tuple[str, str | None, str], GroupArrays] = OrderedDict()
_OPENED_LOCK = threading.Lock()
_OPENED_KEEP = 16  # groups of a cohort in flight at once, with room to spare


def group_arrays(job: ChunkJob) -> GroupArrays:
    """The job's group arrays, shared by the tasks of one run in this process (worker).

    Keyed by the store's path, the group and the layout token (:attr:`ChunkJob.layout`): a
    store rewritten with other chunks or another slide gets arrays opened afresh, never
    metadata of the store that was there before. Holds no files open.
    """
    key = (job.store, job.group, job.layout)
    with _OPENED_LOCK:
        arrays = _OPENED.get(key)
        if arrays is None:
            arrays = _OPENED[key] = GroupArrays(job.store, job.group)
            while len(_OPENED) > _OPENED_KEEP:
                _OPENED.popitem(last=False)
        else:
            _OPENED.move_to_end(key)
        return arrays


def _chunk_task(
    block: Any,
    excluded: np.ndarray,
    read_patches: np.ndarray,
    todo: np.ndarray,
    weights: bytes,
    *,
    job: ChunkJob,
    block_info: dict | None = None,
) -> np.ndarray:
    """Statistics + encoding + region writes for one chunk; returns its candidate count."""
    assert block_info is not None
    i, j, _ = block_info[0]["chunk-location"]
    if not bool(np.asarray(todo).reshape(-1)[0]):
        return np.zeros((1, 1, 1), dtype=np.int64)  # written by an earlier run
    (y0, y1), (x0, x1), _ = block_info[0]["array-location"]
    tile, k = job.tile, job.patch // job.tile
    ty0, tx0 = y0 // tile, x0 // tile
    nty, ntx = (y1 - y0) // tile, (x1 - x0) // tile
    arrays = group_arrays(job)
    count = 0
    read_patches = np.asarray(read_patches)[..., 0]
    if read_patches.any() and nty and ntx:
        excluded = np.asarray(excluded)[..., 0]
        stats = chunk_statistics(block, excluded, read_patches, tile=tile, patch=job.patch, reject_pen=job.reject_pen)
        if stats.decode_failed.any():  # tiles the decoder reported errors in: read errors, like damaged ones
            excluded = excluded | stats.decode_failed
            with stage("write"):
                arrays["read_error"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = excluded
        candidates = two_stage_rule(stats.tile_variance, stats.patch_variance, excluded, job.candidate_floor) & ~stats.pen
        with stage("encode"):
            pixels, _ = unpack_window(block)
            latents = encode_block(
                pixels, candidates, job.ref, tile=tile, batch_size=job.batch_size, weights=weights, torch_threads=job.torch_threads
            )
        subtile_var = None
        if job.subtiles:  # an encoder's tissue fraction: from the pixels in memory, timed as statistics
            with stage("statistics"):
                subtile_var = subtile_variances(pixels, excluded, read_patches, job)
        with stage("write"):
            if job.reject_pen:
                arrays["pen_mask"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = stats.pen
            patch_var = stats.patch_variance[::k, ::k].astype(np.float32)
            arrays["tile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = stats.tile_variance.astype(np.float32)
            arrays["patch_variance"][ty0 // k : ty0 // k + patch_var.shape[0], tx0 // k : tx0 // k + patch_var.shape[1]] = patch_var
            arrays["latent"][ty0 : ty0 + nty, tx0 : tx0 + ntx, :] = latents
            if subtile_var is not None:
                arrays["subtile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx, :] = subtile_var
        count = int(candidates.sum())
    elif nty and ntx:  # nothing to read here (coarse skip): the variances are stored as not read (NaN),
        with stage("write"):  # so every chunk marked done has its variance chunks (checked on rerun)
            npy, npx = -(-nty // k), -(-ntx // k)
            arrays["tile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = np.full((nty, ntx), np.nan, dtype=np.float32)
            arrays["patch_variance"][ty0 // k : ty0 // k + npy, tx0 // k : tx0 // k + npx] = np.full((npy, npx), np.nan, dtype=np.float32)
            if job.subtiles:
                arrays["subtile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx, :] = np.full((nty, ntx, job.subtiles**2), np.nan, dtype=np.float32)
    arrays["chunk_done"][i, j] = True  # only after the data: a kill before this redoes the chunk
    failpoint("chunk-done")
    return np.full((1, 1, 1), count, dtype=np.int64)


def subtile_variances(pixels: Any, excluded: np.ndarray, read_patches: np.ndarray, job: ChunkJob) -> np.ndarray:
    """float32 ``(tiles_y, tiles_x, subtiles**2)``: the variance of each sub-tile (side
    ``tile / subtiles``) of every tile, row-major inside the tile; NaN where not read or a read
    error. From the pixels already decoded (the tissue core's kernels, the tile as the patch)."""
    n, tile = job.subtiles, job.tile
    nty, ntx = excluded.shape
    k = job.patch // tile
    read_tiles = np.repeat(np.repeat(read_patches, k, axis=0), k, axis=1)[:nty, :ntx]
    sub_excluded = np.repeat(np.repeat(excluded, n, axis=0), n, axis=1)
    variance, _ = masked_statistics(pixels[: nty * tile, : ntx * tile], sub_excluded, read_tiles, tile=tile // n, patch=tile)
    return variance.reshape(nty, n, ntx, n).transpose(0, 2, 1, 3).reshape(nty, ntx, n * n).astype(np.float32)


def chunk_graph(plan: RunPlan, job: ChunkJob, done: np.ndarray, weights: Any) -> da.Array:
    """The lazy per-chunk tasks of one slide (chunks already done read nothing)."""
    mask = plan.mask
    todo = ~done
    todo_patches = mask.read_patches & np.repeat(np.repeat(todo, mask.patch_chunks[0], axis=0), mask.patch_chunks[1], axis=1)
    tile_chunks = mask.tile_chunks
    inputs = (
        mask.pixels(plan.options.device, todo_patches),
        da.from_array(mask.excluded[..., None], chunks=tile_chunks + ((1,),)),
        da.from_array(todo_patches[..., None], chunks=mask.patch_chunks + ((1,),)),
        da.from_array(todo[..., None], chunks=(1, 1, 1)),
    )
    # Named from a token of the inputs and the job (the store's absolute path and group,
    # the model's hash, every setting): two slides, stores or settings never share a key.
    token = tokenize(*(a.name for a in inputs), job)
    return da.map_blocks(
        _chunk_task,
        *inputs,
        weights,  # the weights' bytes: one key (Model.graph_input), sent once to each worker
        chunks=((1,) * len(tile_chunks[0]), (1,) * len(tile_chunks[1]), (1,)),
        dtype=np.int64,
        meta=np.empty((0, 0, 0), dtype=np.int64),
        job=job,
        name=f"wsi-process-chunk-{job.group + '-' if job.group else ''}{token}",  # the slide's group: readable on the dashboard
    )
