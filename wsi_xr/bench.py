"""Benchmarking chunkings: ``wsi-xr bench`` and its Python API.

For every combination of chunk size, backend and scheduler, :func:`run_benchmark`
measures in one process run (after a warm-up): wall time (median and spread over
repeats), megapixels/s, tissue tiles/s, the number of Dask tasks, peak memory (RSS of
this process and its Dask workers, sampled), and the **redundant-decode factor**:
pixels of the TIFF tiles the reader decoded ÷ pixels the result needed (counted by the
readers; > 1 means chunk borders cut TIFF tiles, so those tiles are decoded twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np

from wsi_xr.errors import InvalidArgumentError
from wsi_xr.readers import probe, read_stats, reset_read_stats
from wsi_xr.slide import open_slide

STAGES = ("read", "mask", "pipeline")
SCHEDULERS = ("threads", "processes", "distributed")

log = logging.getLogger("wsi_xr")


@dataclass
class BenchResult:
    """One measured combination."""

    stage: str
    chunk: int
    backend: str
    scheduler: str
    aligned: bool
    seconds_median: float
    seconds_min: float
    seconds_max: float
    repeats: int
    megapixels_per_s: float
    tissue_tiles: int
    tissue_tiles_per_s: float
    tasks: int
    peak_memory_mb: float
    pixels_needed: int
    pixels_decoded: int
    redundant_decode: float
    error: str | None = None


@dataclass
class BenchReport:
    """Every result plus the context needed to reproduce it."""

    slide: str
    width: int
    height: int
    tile_size: list[int]
    results: list[BenchResult] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({**asdict(self)}, indent=2)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@contextlib.contextmanager
def peak_rss(pids: Sequence[int]) -> Iterator[dict[str, float]]:
    """Sample the summed RSS of ``pids`` every 10 ms; yields a dict filled with ``peak_mb``."""
    result = {"peak_mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_mb"] = max(result["peak_mb"], sum(_rss_mb(p) for p in pids))
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], sum(_rss_mb(p) for p in pids))


def _read_collection(image: Any) -> Any:
    """Every block read, reduced to one byte per block (no big result to gather)."""
    return image.data.map_blocks(lambda b: np.asarray(b[:1, :1, :1]).copy(), chunks=(1, 1, 1), dtype=np.uint8)


@contextlib.contextmanager
def _scheduler(name: str) -> Iterator[Any]:
    cores = os.cpu_count() or 1
    if name == "threads":
        with dask.config.set(scheduler="threads", num_workers=cores):
            yield None
        return
    from distributed import Client, LocalCluster

    if name == "processes":
        cluster = LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=None)
    elif name == "distributed":
        cluster = LocalCluster(n_workers=1, threads_per_worker=cores, processes=True, dashboard_address=None)
    else:
        raise InvalidArgumentError(f"scheduler {name!r}: use one of {', '.join(SCHEDULERS)}.")
    with cluster, Client(cluster) as client:
        yield client


def _counters(client: Any, reset: bool = False) -> tuple[int, int]:
    if client is None:
        if reset:
            reset_read_stats()
            return 0, 0
        s = read_stats()
        return s.pixels_requested, s.pixels_decoded
    if reset:
        client.run(reset_read_stats)
        return 0, 0
    stats = client.run(lambda: read_stats().as_dict())
    return sum(v["pixels_requested"] for v in stats.values()), sum(v["pixels_decoded"] for v in stats.values())


def _one_run(stage: str, slide: str, chunk: int, backend: str, client: Any, weights: Any, store: Path) -> tuple[int, int]:
    """Run one stage once; returns (tasks, tissue tiles)."""
    if stage == "read":
        collection = _read_collection(open_slide(slide, chunks=chunk, backend=backend))
        tasks = len(collection.__dask_graph__())
        (collection.compute() if client is None else client.compute(collection).result())
        return tasks, 0
    if stage == "mask":
        from wsi_xr.tissue import tissue_mask

        mask = tissue_mask(open_slide(slide, chunks=chunk, backend=backend), threshold="auto", coarse="none")
        tasks = len(mask.__dask_graph__())
        computed = mask.compute() if client is None else client.compute(mask).result()
        return tasks, int(computed.tile_mask.sum())
    from wsi_xr.pipeline import process_slide

    ds = process_slide(
        slide,
        store,
        weights=weights,
        chunks=chunk,
        backend=backend,
        coarse="none",
        client=client,
        overwrite=True,
        progress=False,
        torch_threads="auto",
    )
    blocks = open_slide(slide, chunks=chunk).data.npartitions
    return 2 * blocks, int(ds.attrs["tissue_tiles"])  # one read + one fused chunk task per block


def run_benchmark(
    slide: str | os.PathLike[str],
    *,
    chunks: Sequence[int] = (512, 1024, 2048, 4096),
    stages: Sequence[str] = ("read",),
    backends: Sequence[str] = ("cucim",),
    schedulers: Sequence[str] = ("threads",),
    repeat: int = 3,
    weights: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    on_result: Callable[[BenchResult], None] | None = None,
) -> BenchReport:
    """Measure every combination; see the module docstring for what is recorded.

    ``on_result`` is called with each result as soon as it is measured (the CLI prints a
    table row); ``progress=True`` logs those rows (INFO, logger ``wsi_xr``) when no callback
    is given: the library prints nothing.
    """
    if on_result is None and progress:

        def on_result(result: BenchResult) -> None:
            log.info("%s", format_row(result))

    import tempfile

    for stage in stages:
        if stage not in STAGES:
            raise InvalidArgumentError(f"stage {stage!r}: use one of {', '.join(STAGES)}.")
    if repeat < 1:
        raise InvalidArgumentError(f"repeat={repeat}: must be >= 1.")
    info = probe(slide)
    tile_h, tile_w = info.tile_size
    report = BenchReport(str(slide), info.width, info.height, [tile_h, tile_w], context=_context())
    with contextlib.ExitStack() as cleanup:
        if workdir is None:  # a scratch folder that is gone afterwards
            workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="wsi_xr-bench-"))
        _run_cases(report, Path(workdir), slide, chunks, stages, backends, schedulers, repeat, weights, info, on_result)
    return report


def _run_cases(
    report: BenchReport,
    work: Path,
    slide: Any,
    chunks: Sequence[int],
    stages: Sequence[str],
    backends: Sequence[str],
    schedulers: Sequence[str],
    repeat: int,
    weights: Any,
    info: Any,
    on_result: Callable[[BenchResult], None] | None,
) -> None:
    for scheduler in schedulers:
        with _scheduler(scheduler) as client:
            pids = [os.getpid()]
            if client is not None:
                pids += list(client.run(os.getpid).values())
            for backend in backends:
                for stage in stages:
                    for chunk in chunks:
                        result = _measure(stage, str(slide), chunk, backend, scheduler, client, pids, repeat, weights, work / "bench.zarr", info)
                        report.results.append(result)
                        if on_result is not None:
                            on_result(result)


def _measure(
    stage: str, slide: str, chunk: int, backend: str, scheduler: str, client: Any, pids: list[int], repeat: int, weights: Any, store: Path, info: Any
) -> BenchResult:
    tile_h, tile_w = info.tile_size
    aligned = tile_h == 0 or (chunk % tile_h == 0 and chunk % tile_w == 0)
    needed = info.width * info.height
    base = BenchResult(stage, chunk, backend, scheduler, aligned, 0, 0, 0, repeat, 0, 0, 0, 0, 0, needed, 0, 0)
    if stage in ("mask", "pipeline") and chunk % 256:
        base.error = "chunk is not a multiple of the 256-px patch"
        return base
    try:
        _one_run(stage, slide, chunk, backend, client, weights, store)  # warm-up: caches, imports, model load
        times = []
        decoded = requested = 0
        with peak_rss(pids) as memory:
            for _ in range(repeat):
                _counters(client, reset=True)
                start = time.perf_counter()
                tasks, tissue = _one_run(stage, slide, chunk, backend, client, weights, store)
                times.append(time.perf_counter() - start)
                requested, decoded = _counters(client)
    except Exception as err:  # a failing combination is reported, not fatal
        base.error = f"{type(err).__name__}: {err}"
        return base
    median = statistics.median(times)
    base.seconds_median, base.seconds_min, base.seconds_max = median, min(times), max(times)
    base.megapixels_per_s = needed / 1e6 / median
    base.tissue_tiles, base.tissue_tiles_per_s = tissue, tissue / median
    base.tasks, base.peak_memory_mb = tasks, memory["peak_mb"]
    base.pixels_decoded = decoded
    base.redundant_decode = decoded / requested if requested else 0.0
    return base


def _context() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("wsi_xr", "cucim-cu13", "dask", "distributed", "numpy", "torch", "tifffile", "zarr", "xarray"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[package] = md.version(package)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


HEADER = f"{'stage':<9}{'sched':<12}{'backend':<9}{'chunk':>6} {'aligned':>7} {'median s':>9} {'spread':>13} {'MP/s':>8} {'tiles/s':>8} {'tasks':>6} {'peak MB':>8} {'redecode':>8}"


def format_row(r: BenchResult) -> str:
    """One table row."""
    if r.error:
        return f"{r.stage:<9}{r.scheduler:<12}{r.backend:<9}{r.chunk:>6} {r.aligned!s:>7}  skipped: {r.error}"
    spread = f"{r.seconds_min:.2f}-{r.seconds_max:.2f}"
    return (
        f"{r.stage:<9}{r.scheduler:<12}{r.backend:<9}{r.chunk:>6} {r.aligned!s:>7} {r.seconds_median:>9.3f} {spread:>13} "
        f"{r.megapixels_per_s:>8.1f} {r.tissue_tiles_per_s:>8.0f} {r.tasks:>6} {r.peak_memory_mb:>8.0f} {r.redundant_decode:>8.3f}"
    )


def plot_report(report: BenchReport, out: str | os.PathLike[str]) -> Path:
    """Throughput vs chunk size, one line per stage/backend/scheduler; misaligned chunks hollow."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    lines: dict[tuple[str, str, str], list[BenchResult]] = {}
    for r in report.results:
        if not r.error:
            lines.setdefault((r.stage, r.backend, r.scheduler), []).append(r)
    for (stage, backend, scheduler), rows in lines.items():
        rows.sort(key=lambda r: r.chunk)
        xs, ys = [r.chunk for r in rows], [r.megapixels_per_s for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{stage} / {backend} / {scheduler}")
        for r in rows:
            if not r.aligned:
                ax.plot([r.chunk], [r.megapixels_per_s], marker="o", markerfacecolor="white", color=line.get_color(), markersize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk side (px); hollow = not a multiple of the TIFF tile")
    ax.set_ylabel("megapixels / s (median)")
    ax.set_title(f"{Path(report.slide).name}: {report.width} x {report.height}, TIFF tile {report.tile_size[1]}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from wsi_xr.outputs import check_output_file
    from wsi_xr.plot import _software

    out = check_output_file(out, "png")
    fig.savefig(out, metadata={"Software": _software()})
    return out
