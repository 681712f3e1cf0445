"""The end-to-end job: slide(s) in, a Zarr store with the tile mask and latent cube out.

Each chunk of the slide is read **once**; the one read feeds the variance statistics
(and the pen-ink check) and the encoder. Results are written chunk by chunk into Zarr
regions, and a chunk is marked done only after its data are written, so a run killed at
any moment and started again computes only the missing chunks. The store is created
under a temporary name and renamed into place (so it is recognisable as wsi_xr's from
the moment it exists), and marked ``complete`` only after every chunk is done and the
mask is finalised.

With ``threshold="auto"`` the threshold is known only once every tile variance is
known; so each chunk encodes every *candidate* tile (one that passes the lowest
threshold "auto" can choose), and finalising blanks the latents of tiles below the
chosen threshold. No pixel is read twice.

A slide is opened once (:func:`wsi_xr.readers.open_file`): the probe, the backend
decision and the damage scan travel down as one :class:`~wsi_xr.readers.OpenedSlide`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from dask.base import tokenize

from wsi_xr._failpoints import failpoint
from wsi_xr._timing import stage
from wsi_xr.encode import Model, ModelRef, check_precision, check_torch_threads, encode_block, prepare_model
from wsi_xr.errors import InvalidArgumentError, SlideReadError, StoreError
from wsi_xr.readers import GPU_BACKENDS, OpenedSlide, open_file, unpack_window
from wsi_xr.slide import ChunkSpec, SlideSource, default_chunk_size, level_coords, slide_array
from wsi_xr.store import (
    SlideLayout,
    StoreLock,
    check_slide_target,
    chunks_done,
    consolidate,
    json_safe_attrs,
    open_or_create_slide_group,
    slide_groups,
    tile_rows,
    write_tile_parquet,
)
from wsi_xr.tissue.coarse import CoarseDecision, choose_coarse_level, coarse_decision, segments_for_patches
from wsi_xr.tissue.mask import (
    blocks_any,
    damaged_tile_grid,
    decode_failed_tiles,
    masked_statistics,
    patch_chunks,
    pen_attrs,
    pen_flags,
    two_stage_rule,
    validate_mask_arguments,
)
from wsi_xr.tissue.threshold import THRESHOLD_RANGE, auto_threshold

__all__ = [
    "RunOptions",
    "RunTarget",
    "check_run_target",
    "check_slide_options",
    "group_names",
    "process_slide",
    "process_slides",
    "to_dataframe",
    "validate_run_options",
    "write_parquet",
]

log = logging.getLogger("wsi_xr")

#: Version of the checks every read makes (1: tiles the decoder complained about are read
#: errors). A store started with fewer checks is not resumed: its chunks were not checked.
READ_CHECKS = 1

#: The lowest threshold "auto" can choose: tiles above it are encoded as candidates.
CANDIDATE_FLOOR = THRESHOLD_RANGE[0]


@dataclass(frozen=True)
class RunOptions:
    """The settings of a run that do not depend on the slide (checked before any work)."""

    tile: int = 64
    patch: int = 256
    threshold: float | str = "auto"
    coarse: str | int = "auto"
    chunks: ChunkSpec = None
    level: int = 0
    batch_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    reject_pen: bool = False
    torch_threads: int | str | None = None
    model: Model | None = None

    @property
    def ref(self) -> ModelRef | None:
        """The model's identity (weights hash, device, precision), once validated."""
        return None if self.model is None else self.model.ref


def validate_run_options(weights: Any = None, **settings: Any) -> RunOptions:
    """Check every slide-independent argument of a run, load-test the weights, return them.

    Cheap (no pixels are read): the CLI calls it before starting a cluster.
    """
    options = RunOptions(**settings)
    validate_mask_arguments(options.tile, options.patch, options.threshold)
    if options.tile != 64:
        raise InvalidArgumentError(f"tile={options.tile}: the VAE encodes 64x64 tiles; use tile=64 for the pipeline.")
    if options.batch_size is not None and (not isinstance(options.batch_size, int) or options.batch_size < 1):
        raise InvalidArgumentError(f"batch_size={options.batch_size}: must be an integer >= 1 (or None: the measured default).")
    if options.device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device={options.device!r}: use 'cpu' or 'cuda'.")
    if options.coarse not in ("auto", "none") and not (isinstance(options.coarse, int) and not isinstance(options.coarse, bool)):
        raise InvalidArgumentError(f"coarse={options.coarse!r}: use 'auto', 'none' or a pyramid level number.")
    sides = options.chunks.values() if isinstance(options.chunks, dict) else (
        options.chunks if isinstance(options.chunks, (tuple, list)) else [] if options.chunks is None else [options.chunks]
    )
    for side in sides:
        if not isinstance(side, int) or isinstance(side, bool) or (side != -1 and (side <= 0 or side % options.patch)):
            raise InvalidArgumentError(
                f"chunks={options.chunks!r}: chunk sides must be positive multiples of patch={options.patch} "
                f"(e.g. {options.patch * 8}), or -1 for a whole axis."
            )
    if not isinstance(options.reject_pen, bool):
        raise InvalidArgumentError(f"reject_pen={options.reject_pen!r}: use True or False.")
    check_precision(options.precision, options.device)
    check_torch_threads(options.torch_threads)
    model = prepare_model(weights, device=options.device, precision=options.precision)
    return RunOptions(**{**options.__dict__, "model": model})


@dataclass
class RunPlan:
    """Everything decided in the client before any level-0 pixel is read."""

    opened: OpenedSlide
    options: RunOptions
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    decision: CoarseDecision | None
    read_patches: np.ndarray
    excluded: np.ndarray
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> int:
        return self.options.level

    @property
    def tile(self) -> int:
        return self.options.tile

    @property
    def k(self) -> int:
        return self.options.patch // self.options.tile

    @property
    def tile_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(c // self.tile for c in self.chunks[0]), tuple(c // self.tile for c in self.chunks[1])  # type: ignore[return-value]

    @property
    def patch_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ty, tx = self.tile_chunks
        return patch_chunks(ty, self.k), patch_chunks(tx, self.k)

    def layout(self) -> SlideLayout:
        """The store layout of this slide."""
        from wsi_xr.models import LATENT_SIZE

        nty, ntx = self.excluded.shape
        coords = level_coords(self.opened.info, self.level)
        y, x = coords["y"], coords["x"]
        tile, patch = self.options.tile, self.options.patch
        return SlideLayout(
            tile_y=y[: nty * tile : tile],
            tile_x=x[: ntx * tile : tile],
            patch_y=y[: nty * tile : patch],
            patch_x=x[: ntx * tile : patch],
            chunk_y=y[np.cumsum((0,) + self.chunks[0][:-1])],
            chunk_x=x[np.cumsum((0,) + self.chunks[1][:-1])],
            tile_chunks=(self.tile_chunks[0][0], self.tile_chunks[1][0]),
            patch_chunks=(self.patch_chunks[0][0], self.patch_chunks[1][0]),
            n_features=LATENT_SIZE,
            tile_flags=("pen_mask",) if self.options.reject_pen else (),
        )


def check_slide_options(opened: OpenedSlide, options: RunOptions) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The checks of a run's options that need the slide (cheap: no pixels are read).

    Returns the slide's chunking (level pixels per chunk along y and x).
    """
    info = opened.info
    if not isinstance(options.level, int) or isinstance(options.level, bool) or not 0 <= options.level < len(info.levels):
        raise InvalidArgumentError(
            f"{info.path}: level={options.level} does not exist; the slide has levels 0..{len(info.levels) - 1}."
        )
    if options.device == "cpu" and opened.backend in GPU_BACKENDS:
        raise InvalidArgumentError(f"{info.path}: backend {opened.backend!r} needs device='cuda'.")
    choose_coarse_level(info, options.level, options.coarse)  # a coarse level that exists
    chunks = options.chunks
    if chunks is None:  # the default chunk, holding whole patches
        chunks = default_chunk_size(info.levels[options.level], multiple=options.patch)
    array = slide_array(opened, options.level, chunks, options.device)  # validates level and chunks; reads nothing
    block_chunks = array.chunks[:2]
    for axis in (0, 1):
        if any(c % options.patch for c in block_chunks[axis][:-1]):
            raise InvalidArgumentError(
                f"chunk size {block_chunks[axis][0]} is not a multiple of patch={options.patch}; "
                f"pass --chunk with a multiple of {options.patch} (e.g. {default_chunk_size(info.levels[options.level], options.patch)})."
            )
    return block_chunks  # type: ignore[return-value]


def run_fingerprint(opened: OpenedSlide, options: RunOptions, chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[str, Any]:
    """The parameters that define a run's results: a store made with others is not resumed."""
    info = opened.info
    assert options.ref is not None
    return {
        "source": info.path,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "level": options.level,
        "tile": options.tile,
        "patch": options.patch,
        "threshold_setting": options.threshold,
        "coarse": str(options.coarse),
        "chunks": [list(chunks[0]), list(chunks[1])],
        "weights_sha256": options.ref.sha256,
        "precision": options.precision,
        "reject_pen": options.reject_pen,
        "read_checks": READ_CHECKS,
    }


def _plan(opened: OpenedSlide, options: RunOptions) -> RunPlan:
    block_chunks = check_slide_options(opened, options)
    info = opened.info
    tile, patch = options.tile, options.patch
    lv = info.levels[options.level]
    nty, ntx = lv.height // tile, lv.width // tile
    npy, npx = -(-nty // (patch // tile)), -(-ntx // (patch // tile))
    decision = coarse_decision(opened, options.level, options.coarse, patch_shape=(npy, npx), patch=patch)
    read_patches = decision.patches if decision is not None else np.ones((npy, npx), dtype=bool)
    excluded = damaged_tile_grid(opened.damage(options.level), tile, (nty, ntx))
    plan = RunPlan(opened, options, block_chunks, decision, read_patches, excluded)
    plan.fingerprint = run_fingerprint(opened, options, block_chunks)
    return plan


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk task needs besides its pixels (small: it travels with each task)."""

    store: str
    group: str | None
    tile: int
    patch: int
    candidate_floor: float
    ref: ModelRef
    batch_size: int | None
    reject_pen: bool
    torch_threads: int | str | None = None


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
    root = zarr.open_group(job.store, mode="r+", zarr_format=3, use_consolidated=False)
    g = root[job.group] if job.group else root
    count = 0
    read_patches = np.asarray(read_patches)[..., 0]
    pixels, failed = unpack_window(block)
    if read_patches.any() and nty and ntx:
        excluded = np.asarray(excluded)[..., 0]
        decode_failed = decode_failed_tiles(failed, tile, excluded.shape)
        if decode_failed.any():  # tiles the decoder reported errors in: read errors, like damaged ones
            excluded = excluded | decode_failed
            with stage("write"):
                g["read_error"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = excluded
        with stage("statistics"):
            tile_var, patch_tile = masked_statistics(pixels, excluded, read_patches, tile=tile, patch=job.patch)
            candidates = two_stage_rule(tile_var, patch_tile, excluded, job.candidate_floor)
            pen = pen_flags(pixels, tile, tile_var) & ~excluded if job.reject_pen else None
        if pen is not None:
            candidates &= ~pen
        with stage("encode"):
            latents = encode_block(
                pixels, candidates, job.ref, tile=tile, batch_size=job.batch_size, weights=weights, torch_threads=job.torch_threads
            )
        with stage("write"):
            if pen is not None:
                g["pen_mask"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = pen
            patch_var = patch_tile[::k, ::k].astype(np.float32)
            g["tile_variance"][ty0 : ty0 + nty, tx0 : tx0 + ntx] = tile_var.astype(np.float32)
            g["patch_variance"][ty0 // k : ty0 // k + patch_var.shape[0], tx0 // k : tx0 // k + patch_var.shape[1]] = patch_var
            g["latent"][ty0 : ty0 + nty, tx0 : tx0 + ntx, :] = latents
        count = int(candidates.sum())
    g["chunk_done"][i, j] = True  # only after the data: a kill before this redoes the chunk
    failpoint("chunk-done")
    return np.full((1, 1, 1), count, dtype=np.int64)


def _chunk_graph(plan: RunPlan, job: ChunkJob, done: np.ndarray, weights: Any) -> da.Array:
    """The lazy per-chunk tasks of one slide (chunks already done read nothing)."""
    todo = ~done
    todo_patches = plan.read_patches & np.repeat(np.repeat(todo, plan.patch_chunks[0], axis=0), plan.patch_chunks[1], axis=1)
    wanted = None
    if plan.decision is not None or not todo.all():
        wanted = segments_for_patches(plan.opened.damage(plan.level), todo_patches, plan.options.patch)
    pixels = slide_array(
        plan.opened, plan.level, (plan.chunks[0][0], plan.chunks[1][0]), plan.options.device, damaged="report", wanted=wanted
    )
    tile_chunks = plan.tile_chunks
    inputs = (
        pixels,
        da.from_array(plan.excluded[..., None], chunks=tile_chunks + ((1,),)),
        da.from_array(todo_patches[..., None], chunks=plan.patch_chunks + ((1,),)),
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


def _candidate_floor(options: RunOptions) -> float:
    """The threshold the chunk tasks encode above: a given one, or the lowest "auto" can choose."""
    return CANDIDATE_FLOOR if options.threshold == "auto" else float(options.threshold)


def _maybe_encoded(tile_var: np.ndarray, patch_of_tile: np.ndarray, excluded: np.ndarray, floor: float) -> np.ndarray:
    """Every tile the chunk tasks may have encoded, judged from the stored float32 variances.

    The tasks compared float64 variances with ``floor`` (``>``); rounding to float32 is
    monotonic, so a value above ``floor`` is stored as at least ``float32(floor)``: ``>=``
    that (a superset: tiles never encoded are NaN already, and blanking them is harmless).
    """
    below_floor32 = np.nextafter(np.float32(floor), np.float32(-np.inf))  # float32 compare: > this is >= float32(floor)
    return two_stage_rule(tile_var.astype(np.float32, copy=False), patch_of_tile.astype(np.float32, copy=False), excluded, below_floor32)


def _finalize(group: zarr.Group, plan: RunPlan) -> dict[str, Any]:
    """Choose the threshold, write the masks, blank non-tissue latents, mark complete."""
    tile_var = group["tile_variance"][...]
    patch_var = group["patch_variance"][...]
    # damaged tiles (from the scan, written when the store was created) and tiles whose
    # decoding failed (written by their chunk tasks)
    excluded = group["read_error"][...] | plan.excluded
    options = plan.options
    if options.threshold == "auto":
        threshold, method = auto_threshold(tile_var)
    else:
        threshold, method = float(options.threshold), "given"
    k = plan.k
    nty, ntx = tile_var.shape
    patch_of_tile = np.repeat(np.repeat(patch_var, k, axis=0), k, axis=1)[:nty, :ntx]
    tile_mask = two_stage_rule(tile_var, patch_of_tile, excluded, threshold)
    # The tiles the chunk tasks may have encoded (a resumed store's earlier chunks too:
    # before 0.2.0 a whole-number threshold encoded from CANDIDATE_FLOOR up), less pen
    # ink, which is never encoded.
    floor = _candidate_floor(options)
    if not isinstance(options.threshold, float):
        floor = min(floor, CANDIDATE_FLOOR)
    encoded = _maybe_encoded(tile_var, patch_of_tile, excluded, floor)
    pen_tiles = 0
    if options.reject_pen:
        pen = group["pen_mask"][...]
        pen_tiles = int((tile_mask & pen).sum())
        tile_mask &= ~pen
        encoded &= ~pen
    with np.errstate(invalid="ignore"):
        patch_mask = patch_var > threshold
    group["patch_mask"][...] = patch_mask
    group["tile_mask"][...] = tile_mask
    failpoint("finalize-masks")
    # Only latent chunks holding an encoded tile that is not tissue change: read and
    # rewrite those alone (at 49152², 76 of 576 chunks), checking their tissue tiles'
    # latents on the way. Other chunks are trusted to their `chunk_done` flag (set only
    # after the chunk's latents were written); they are not read back.
    latent = group["latent"]
    tcy, tcx = latent.chunks[:2]  # one Zarr chunk per slide chunk: plan.tile_chunks
    to_blank = encoded & ~tile_mask
    for i, j in np.argwhere(blocks_any(to_blank, plan.tile_chunks)):
        ty, tx = int(i) * tcy, int(j) * tcx
        keep = tile_mask[ty : ty + tcy, tx : tx + tcx]
        block = latent[ty : ty + tcy, tx : tx + tcx, :]
        if np.isnan(block[keep]).any():
            raise StoreError(f"{plan.opened.path}: latents missing for tissue tiles near tile ({ty}, {tx}); run again.")
        block[to_blank[ty : ty + tcy, tx : tx + tcx]] = np.nan
        latent[ty : ty + tcy, tx : tx + tcx, :] = block
    failpoint("finalize-latents")
    from wsi_xr import __version__

    info = plan.opened.info
    damage = plan.opened.damage(plan.level)
    attrs = {
        "source": info.path,
        "file_size": info.file_size,
        "mtime_ns": info.mtime_ns,
        "vendor": info.vendor,
        "format": info.format,
        "mpp": info.mpp,
        "level": plan.level,
        "downsample": info.levels[plan.level].downsample,
        "backend": plan.opened.backend,
        "backend_reason": plan.opened.choice.reason,
        "tile": options.tile,
        "patch": options.patch,
        "threshold": float(threshold),
        "threshold_method": method,
        "coarse": str(options.coarse),
        "coarse_level": -1 if plan.decision is None else plan.decision.coarse_level,
        "chunks_total": int(group["chunk_done"].size),
        "chunks_read": int(blocks_any(plan.read_patches, plan.patch_chunks).sum()),
        "patches_total": int(plan.read_patches.size),
        "patches_read": int(plan.read_patches.sum()),
        "file_tiles_total": int(damage.damaged.size),
        "file_tiles_decoded": int(((plan.decision.segments if plan.decision is not None else True) & ~damage.damaged).sum()),
        "weights": options.ref.path if options.ref else None,
        "weights_sha256": options.ref.sha256 if options.ref else None,
        "precision": options.precision,
        "reject_pen": options.reject_pen,
        "pen_tiles": pen_tiles,
        "wsi_xr_version": __version__,
        "tissue_tiles": int(tile_mask.sum()),
        "read_errors": int(excluded.sum()),
        "damaged_file_tiles": int(damage.damaged.sum()),
    }
    if options.reject_pen:
        attrs.update(pen_attrs())
    group.attrs.update(json_safe_attrs(attrs))
    failpoint("finalize-attrs")
    group.attrs["complete"] = True  # last: a store is never complete with chunks missing
    failpoint("finalize-complete")
    return attrs


# ------------------------------------------------------------------------------ API


@dataclass(frozen=True)
class RunTarget:
    """What :func:`check_run_target` found: the store's path and how far an earlier run got."""

    path: Path
    groups: tuple[str | None, ...]
    chunks_total: int
    chunks_resumed: int

    def chunks_done(self) -> int:
        """Chunks marked done in the store now (read from its ``chunk_done`` arrays)."""
        return sum(chunks_done(self.path, group) for group in self.groups)


def check_run_target(
    store: str | os.PathLike[str], slides: Sequence[tuple[OpenedSlide, str | None]], options: RunOptions, *, overwrite: bool
) -> RunTarget:
    """Every check of a run's output before any work: no pixels read, nothing written but missing parent folders.

    ``slides`` pairs each opened slide with its group (None: a one-slide store). Checks the
    slide options (level, coarse level, chunks), the store path (writable, not a file), its
    contents (:func:`wsi_xr.store.check_slide_target`: foreign data, another run's store)
    and its lock. :func:`process_slide(s) <process_slide>` call it; the CLI calls it before
    it starts a cluster.
    """
    store_path = _store_path(store)
    total = resumed = 0
    for opened, group in slides:
        chunks = check_slide_options(opened, options)
        total += len(chunks[0]) * len(chunks[1])
        if check_slide_target(store_path, group, run_fingerprint(opened, options, chunks), overwrite=overwrite):
            resumed += chunks_done(store_path, group)
    StoreLock(store_path).check()
    return RunTarget(store_path, tuple(group for _, group in slides), total, resumed)


def _store_path(store: str | os.PathLike[str]) -> Path:
    store_path = Path(store)
    if store_path.exists() and not store_path.is_dir():
        raise StoreError(f"{store_path}: exists and is not a Zarr store folder; choose another output path.")
    parent = store_path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):  # os.access says yes to root everywhere: really try
            pass
    except OSError as err:
        raise StoreError(
            f"{store_path}: cannot write in the folder {parent} ({err.strerror or err}); choose a writable path."
        ) from err
    return store_path


@dataclass
class _SlideRun:
    """One slide of a (cohort) run: its plan, its group and its pending chunk tasks."""

    plan: RunPlan
    group: zarr.Group
    group_name: str | None
    tasks: da.Array | None
    start: float


def _prepare(
    source: SlideSource, store_path: Path, group_name: str | None, options: RunOptions, overwrite: bool, backend: str,
    client: Any = None,
) -> _SlideRun:
    start = time.perf_counter()
    opened = open_file(source, backend)
    plan = _plan(opened, options)
    group = open_or_create_slide_group(store_path, group_name, plan.layout(), plan.fingerprint, plan.excluded, overwrite=overwrite)
    done = group["chunk_done"][...]
    assert options.ref is not None
    job = ChunkJob(
        str(store_path.resolve()), group_name, options.tile, options.patch,
        _candidate_floor(options),
        options.ref, options.batch_size, options.reject_pen, options.torch_threads,
    )
    assert options.model is not None
    tasks = _chunk_graph(plan, job, done, options.model.graph_input(client)) if not done.all() else None
    return _SlideRun(plan, group, group_name, tasks, start)


def _finish(run: _SlideRun) -> dict[str, Any]:
    attrs = _finalize(run.group, run.plan)
    log.info("%s: %d tissue tiles in %.1f s", Path(run.plan.opened.path).name, attrs["tissue_tiles"], time.perf_counter() - run.start)
    return attrs


def _killed_worker(err: Exception, path: str) -> Exception:
    if type(err).__name__ != "KilledWorker":
        return err
    # distributed retried the task on other workers and each one died: a crash in a
    # decoder, contained to worker processes
    return SlideReadError(
        f"{path}: Dask workers died while reading it ({err}); the decoder probably crashed on damaged "
        "data. Finished chunks are kept and the store is not marked complete; run again to retry, or check the file."
    )


def _run_all(runs: list[_SlideRun], client: Any, progress: bool) -> None:
    """Compute every slide's chunks together (slides in flight at once); finalise each as it ends."""
    from wsi_xr.cluster import compute

    pending = [r for r in runs if r.tasks is not None]
    if client is None or not pending:
        if pending:
            try:
                compute(*[r.tasks for r in pending], client=None, progress=progress)
            except Exception as err:
                raise _killed_worker(err, pending[0].plan.opened.path) from err
        for run in runs:
            _finish(run)
        return
    from distributed import as_completed

    futures = {client.compute(r.tasks): r for r in pending}
    if progress:
        from distributed import progress as show_progress

        show_progress(list(futures))
        print()
    for run in runs:
        if run.tasks is None:
            _finish(run)
    for future in as_completed(list(futures)):
        run = futures[future]
        try:
            future.result()
        except Exception as err:
            raise _killed_worker(err, run.plan.opened.path) from err
        _finish(run)


def process_slide(
    path: SlideSource,
    store: str | os.PathLike[str],
    *,
    group: str | None = None,
    weights: Any = None,
    tile: int = 64,
    patch: int = 256,
    threshold: float | str = "auto",
    coarse: str | int = "auto",
    chunks: ChunkSpec = None,
    level: int = 0,
    backend: str = "auto",
    batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    reject_pen: bool = False,
    torch_threads: int | str | None = None,
    client: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> xr.Dataset:
    """Mask and encode one slide into ``store`` (or its ``group``); resume if interrupted.

    Parameters
    ----------
    path
        The slide file, or an :class:`~wsi_xr.readers.OpenedSlide` (opened once, reused).
    batch_size
        Encoder batch; None: the measured best for the device and precision
        (:func:`wsi_xr.models.default_batch_size`; on a CPU 64 fp32, 128 bf16).
    precision
        ``"fp32"`` (exact, default) or ``"bf16"`` (autocast: faster where the CPU/GPU
        supports bfloat16; recorded in attrs; error documented in the README).
    weights
        A weights file, a :class:`~wsi_xr.models.VAE2`, a :class:`~wsi_xr.encode.Model`
        (:func:`~wsi_xr.encode.prepare_model`: checked once, reused), or None for the
        shipped default. Workers receive the weights' bytes through the graph.
    reject_pen
        Remove tiles covered by pen ink from ``tile_mask`` (adds ``pen_mask``).
    torch_threads
        Torch threads per encoding task: None (default: torch's own setting), an int, or
        ``"auto"`` (cores / concurrent Dask tasks: what ``wsi-xr run`` uses, measured
        fastest on a CPU). Set and put back per task; not part of the results.
    client
        A ``distributed.Client`` (None: dask's threaded scheduler).
    progress
        Show a progress bar (off by default: a library call is silent).

    Returns the stored Dataset (opened lazily from the store): ``tile_mask``,
    ``tile_variance``, ``patch_mask``, ``patch_variance``, ``read_error``, ``latent
    (tile_y, tile_x, feature)`` (NaN where not tissue), ``chunk_done``, with provenance
    attrs.
    """
    options = validate_run_options(
        weights, tile=tile, patch=patch, threshold=threshold, coarse=coarse, chunks=chunks, level=level,
        batch_size=batch_size, device=device, precision=precision, reject_pen=reject_pen, torch_threads=torch_threads,
    )
    opened = open_file(path, backend)
    store_path = check_run_target(store, [(opened, group)], options, overwrite=overwrite).path
    with StoreLock(store_path):
        try:
            run = _prepare(opened, store_path, group, options, overwrite, backend, client)
            _run_all([run], client, progress)
            consolidate(store_path)
        except OSError as err:
            raise StoreError(
                f"{store_path}: writing failed ({err}); the store is not marked complete. Free space or fix permissions, then run again."
            ) from err
    return xr.open_zarr(store_path, group=group, consolidated=False)


def group_names(paths: Sequence[SlideSource]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = Path(p.path if isinstance(p, OpenedSlide) else str(p)).stem or "slide"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def process_slides(
    paths: Sequence[SlideSource],
    store: str | os.PathLike[str],
    *,
    weights: Any = None,
    backend: str = "auto",
    client: Any = None,
    overwrite: bool = False,
    progress: bool = False,
    **settings: Any,
) -> xr.DataTree:
    """A cohort: each slide into its own group (named by file stem, made unique) of one store.

    Every slide's chunks are computed together, so a cluster stays busy across slides
    (many small slides do not run one after another); each slide is finalised as soon as
    its own chunks are done, and a killed run resumes per slide and per chunk. Takes the
    keyword arguments of :func:`process_slide`. Returns ``xr.open_datatree(store)``.
    """
    if not paths:
        raise InvalidArgumentError("no slides given.")
    options = validate_run_options(weights, **settings)
    opened = [open_file(p, backend) for p in paths]  # every file checked before any work
    names = group_names(paths)
    store_path = check_run_target(store, list(zip(opened, names)), options, overwrite=overwrite).path
    with StoreLock(store_path):
        try:
            runs = [_prepare(o, store_path, name, options, overwrite, backend, client) for o, name in zip(opened, names)]
            _run_all(runs, client, progress)
            root = zarr.open_group(store_path, mode="r+", zarr_format=3, use_consolidated=False)
            root.attrs["slides"] = {name: o.path for name, o in zip(names, opened)}
            consolidate(store_path)
        except OSError as err:
            raise StoreError(
                f"{store_path}: writing failed ({err}); unfinished slides are not marked complete. Free space or fix permissions, then run again."
            ) from err
    return xr.open_datatree(store_path, engine="zarr")


def to_dataframe(ds: xr.Dataset, slide: str | None = None) -> pd.DataFrame:
    """One row per tissue tile: ``x``, ``y`` (level-0 origin), ``latent_0`` … (+ ``slide``)."""
    return tile_rows(ds, slide)


def write_parquet(store: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the tissue-tile rows of a store (every slide of a cohort) to one Parquet file.

    Streams one slide at a time (one Parquet row group per slide, with a ``slide`` column
    for cohorts), so memory does not grow with the number of slides. Returns the number
    of rows written.
    """
    groups = slide_groups(store)

    def frames() -> Iterator[pd.DataFrame]:
        if groups:
            for name in groups:
                yield tile_rows(xr.open_zarr(store, group=name, consolidated=False), slide=name)
        else:
            yield tile_rows(xr.open_zarr(store, consolidated=False))

    return write_tile_parquet(frames(), out)
