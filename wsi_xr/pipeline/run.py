"""Running slides into a store: the checks before any work, the computation, finalising, cohorts.

:func:`process_slide` and :func:`process_slides` check everything first
(:func:`check_run_target`), plan each slide (:func:`~wsi_xr.pipeline.chunks.plan_run`), create or
resume its group (:mod:`wsi_xr.store`), compute every slide's chunk tasks together
(:func:`~wsi_xr.pipeline.chunks.chunk_graph`) and finalise each slide as its own chunks end
(:func:`~wsi_xr.pipeline.finalize.finalize`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from wsi_xr import accessor as _accessor  # noqa: F401  (registers .wsi on what this module returns)
from wsi_xr.errors import InvalidArgumentError, SlideReadError, StoreError
from wsi_xr.pipeline.chunks import ChunkJob, RunPlan, chunk_graph, plan_run
from wsi_xr.pipeline.finalize import finalize
from wsi_xr.pipeline.options import RunOptions, check_slide_options, run_fingerprint, validate_run_options
from wsi_xr.pipeline.verify import damaged_chunks
from wsi_xr.readers import OpenedSlide, open_file
from wsi_xr.slide import ChunkSpec, SlideSource
from wsi_xr.store import StoreLock, check_slide_target, chunks_done, consolidate, open_or_create_slide_group, read_array, zarr_array
from wsi_xr.store.attrs import update_attrs
from wsi_xr.tissue.params import MaskParams

__all__ = ["RunTarget", "check_run_target", "group_names", "process_slide", "process_slides"]

log = logging.getLogger("wsi_xr")


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
        raise StoreError(f"{store_path}: cannot write in the folder {parent} ({err.strerror or err}); choose a writable path.") from err
    return store_path


@dataclass
class _SlideRun:
    """One slide of a (cohort) run: its plan, its group and its pending chunk tasks."""

    plan: RunPlan
    group: zarr.Group
    group_name: str | None
    folder: Path
    tasks: da.Array | None
    start: float


def _prepare(
    source: SlideSource,
    store_path: Path,
    group_name: str | None,
    options: RunOptions,
    overwrite: bool,
    backend: str,
    client: Any = None,
) -> _SlideRun:
    start = time.perf_counter()
    opened = open_file(source, backend)
    plan = plan_run(opened, options)
    group, resumed = open_or_create_slide_group(store_path, group_name, plan.layout(), plan.fingerprint, plan.mask.excluded, overwrite=overwrite)
    folder = store_path / group_name if group_name else store_path
    if resumed:  # a store this process just built holds nothing to repair
        repair(group, folder, group_name, plan)
    done = read_array(group, "chunk_done")
    job = ChunkJob.of(str(store_path.resolve()), group_name, options, plan.fingerprint)
    assert options.model is not None
    tasks = chunk_graph(plan, job, done, options.model.graph_input(client)) if not done.all() else None
    return _SlideRun(plan, group, group_name, folder, tasks, start)


def repair(group: zarr.Group, folder: Path, group_name: str | None, plan: RunPlan) -> list[str]:
    """Before a (re)run computes anything: find the chunks whose stored data fail a check
    (:func:`~wsi_xr.pipeline.verify.damaged_chunks`) and mark them not done, so they are
    recomputed from the slide; nothing is ever derived from them. Their ``read_error`` is
    put back to the scan's (decode failures are found again), the coordinates are rewritten
    from the plan, and a complete store is complete no more until finalised and checked
    again. Returns the problems found (logged at INFO)."""
    redo, problems = damaged_chunks(folder, group_name)
    if not problems:
        return []
    layout = plan.layout()
    for name in ("tile_y", "tile_x", "patch_y", "patch_x", "chunk_y", "chunk_x"):
        zarr_array(group, name)[...] = getattr(layout, name)
    zarr_array(group, "feature")[...] = np.arange(layout.n_features)
    if redo:
        done = zarr_array(group, "chunk_done")
        errors = zarr_array(group, "read_error")
        tcy, tcx = layout.tile_chunks
        for i, j in sorted(redo):
            done[i, j] = False
            errors[i * tcy : (i + 1) * tcy, j * tcx : (j + 1) * tcx] = plan.mask.excluded[i * tcy : (i + 1) * tcy, j * tcx : (j + 1) * tcx]
    update_attrs(group.attrs, {"complete": False})  # netCDF-safe, as every attribute (wsi_xr.store.attrs)
    lines = [p.line(folder) for p in problems]
    for line in lines:
        log.info("repairing: %s", line)
    return lines


def _finish(run: _SlideRun) -> dict[str, Any]:
    attrs = finalize(run.group, run.plan, run.folder)
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

        show_progress(list(futures))  # the bar's line is left open: the CLI ends it (the library prints nothing)
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
    encoder: Any = None,
    encoder_spec: Any = None,
    tile: int | None = None,
    patch: int | None = None,
    threshold: float | str = MaskParams.threshold,
    coarse: str | int = MaskParams.coarse,
    chunks: ChunkSpec = None,
    level: int = 0,
    backend: str = "auto",
    batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    reject_pen: bool = MaskParams.reject_pen,
    torch_threads: int | str | None = None,
    mpp: float | None = None,
    target_mpp: float | None = None,
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
        shipped default. Workers receive the weights' bytes through the graph. With
        ``encoder``: that encoder's weights file (a timm model's, a module's state dict).
    encoder, encoder_spec
        Another encoder than the VAE (README "Any encoder"): a ``torch.nn.Module`` or a
        TorchScript file with its :class:`~wsi_xr.models.encoders.EncoderSpec` (tile side,
        mean/std, target mpp), a timm model name with local ``weights``, or a
        :class:`~wsi_xr.models.encoders.LoadedEncoder`. The tile grid is then the
        encoder's (``tile`` = its tile, ``patch`` 4 tiles unless given), the target mpp its
        spec's unless ``target_mpp`` is given, ``latent`` holds its features, and
        ``tissue_fraction (tile_y, tile_x)`` the share of each tile's 4 x 4 sub-tiles above
        the threshold. Provenance: ``encoder``, ``encoder_kind``, ``encoder_*`` spec attrs,
        ``weights_sha256``.
    tile, patch
        Tile and patch sides in pixels (default: the encoder's tile, 64 for the VAE, and 4 tiles).
    reject_pen
        Remove tiles covered by pen ink from ``tile_mask`` (adds ``pen_mask``).
    torch_threads
        Torch threads per encoding task: None (default: torch's own setting), an int, or
        ``"auto"`` (cores / concurrent Dask tasks: what ``wsi-xr run`` uses, measured
        fastest on a CPU). Set and put back per task; not part of the results.
    mpp
        Microns per level-0 pixel, replacing the file's (for slides that lack it or state
        it wrongly); recorded with ``mpp_source="user"``.
    target_mpp
        Work at this resolution (µm per pixel): tiles cover ``tile * target_mpp`` microns
        on every slide. The level at or finer than the target is read once and
        area-averaged to it (see :func:`wsi_xr.tissue_mask`); ``level`` must stay 0.
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
        weights,
        encoder=encoder,
        encoder_spec=encoder_spec,
        tile=tile,
        patch=patch,
        threshold=threshold,
        coarse=coarse,
        chunks=chunks,
        level=level,
        batch_size=batch_size,
        device=device,
        precision=precision,
        reject_pen=reject_pen,
        torch_threads=torch_threads,
        target_mpp=target_mpp,
    )
    opened = open_file(path, backend, mpp=mpp)
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
    mpp: float | None = None,
    client: Any = None,
    overwrite: bool = False,
    progress: bool = False,
    **settings: Any,
) -> xr.DataTree:
    """A cohort: each slide into its own group (named by file stem, made unique) of one store.

    Every slide's chunks are computed together, so a cluster stays busy across slides
    (many small slides do not run one after another); each slide is finalised as soon as
    its own chunks are done, and a killed run resumes per slide and per chunk. Takes the
    keyword arguments of :func:`process_slide` (``mpp`` applies to every slide). Returns
    ``xr.open_datatree(store)``.
    """
    if not paths:
        raise InvalidArgumentError("no slides given.")
    options = validate_run_options(weights, **settings)
    opened = [open_file(p, backend, mpp=mpp) for p in paths]  # every file checked before any work
    names = group_names(paths)
    store_path = check_run_target(store, list(zip(opened, names)), options, overwrite=overwrite).path
    with StoreLock(store_path):
        try:
            runs = [_prepare(o, store_path, name, options, overwrite, backend, client) for o, name in zip(opened, names)]
            _run_all(runs, client, progress)
            root = zarr.open_group(store_path, mode="r+", zarr_format=3, use_consolidated=False)
            update_attrs(root.attrs, {"slides": {name: o.path for name, o in zip(names, opened)}})  # JSON text: netCDF-safe
            consolidate(store_path)
        except OSError as err:
            raise StoreError(
                f"{store_path}: writing failed ({err}); unfinished slides are not marked complete. Free space or fix permissions, then run again."
            ) from err
    return xr.open_datatree(store_path, engine="zarr")
