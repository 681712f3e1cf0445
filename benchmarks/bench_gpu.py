"""The GPU path at the GPU's speed: each stage's own limit, then the pipeline, in one run.

    python -m benchmarks.bench_gpu --size 32768 [--size 49152] [--chunk 2048] [--repeat 1]
        [--backends auto,nvimgcodec] [--precisions fp32,bf16] [--report]

On synthetic slides (30% tissue, generated once into benchmarks/.cache) and on this
machine, in this process, it measures:

- **CPU decode**: cuCIM ``read_region`` of ``chunk``-sized windows over all of level 0,
  from one thread per host core (one ``CuImage`` each);
- **GPU decode**: :class:`wsi_xr.readers.nvimgcodec_backend.NvImageCodecReader`, one
  batched nvImageCodec call per window, from ``--decode-threads`` threads;
- **statistics**: ``wsi_xr.tissue.block_statistics`` on a device-resident CuPy chunk,
  as many times as the slide has chunks;
- **encoder**: the VAE encoder on device-resident tiles, fp32 (TF32 allowed, torch's
  default for cuDNN convolutions) and bf16 autocast, batch 1024-8192;
- **Zarr writing**: the output arrays of the slide (latents, masks) written with Dask;

then the end-to-end pipeline (``wsi_xr.process_slide(device="cuda")``) for each backend
and precision. Every stage limit is also expressed in MP/s of slide area (the encoder's
tiles/s through the slide's measured tissue tiles per megapixel), so the table shows the
slowest necessary stage of each pipeline configuration and the ratio end-to-end / that
limit. ``--report`` adds a Dask performance report (a timeline of the tasks) of one more
pipeline run; for the GPU's own timeline run the script under Nsight Systems:
``nsys profile -t cuda,nvtx,osrt python -m benchmarks.bench_gpu --size 32768``.

Results go to benchmarks/results/gpu-SIZE.json and .md. Without CuPy or a CUDA GPU the
script stops at once, saying so.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, markdown_table, save, synthetic_slide, timed

#: Tissue fraction of the benchmark slides (the issue's measurement plan).
TISSUE_FRACTION = 0.3
#: Encoder batch sizes and precisions of the encoder stage.
ENCODER_BATCHES = (1024, 2048, 4096, 8192)
PRECISIONS = ("fp32", "bf16")
#: Tile side of the pipeline (the VAE's input).
TILE = 64


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, action="append", help="slide side in pixels (repeatable; default 32768)")
    parser.add_argument("--chunk", type=int, default=2048, help="Dask chunk / decode window side (default 2048)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per figure, after one warm-up (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="host threads (default: all cores)")
    parser.add_argument("--decode-threads", type=int, default=4, help="threads calling the GPU decoder (default 4)")
    parser.add_argument("--backends", default="auto,nvimgcodec", help="pipeline backends, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16", help="pipeline precisions, comma-separated")
    parser.add_argument("--coarse", default="none", help="process_slide coarse= (default none: every chunk decoded)")
    parser.add_argument("--report", action="store_true", help="write a Dask performance report of one pipeline run")
    parser.add_argument("--out", default=None, help="result name (default gpu-SIZE)")
    return parser


def require_gpu() -> str:
    """The GPU's name; stop with a clear message when CuPy or a CUDA GPU is missing."""
    try:
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
        if count < 1:
            raise RuntimeError("0 CUDA devices")
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as err:
        raise SystemExit(
            f"bench_gpu needs CuPy and a CUDA GPU, and found none here ({type(err).__name__}: {err}). "
            "Run it on a GPU machine after `pip install -e '.[gpu]'`."
        ) from None


def windows(height: int, width: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` windows of side ``chunk`` covering a level (smaller at the edges)."""
    return [(y, x, min(chunk, height - y), min(chunk, width - x)) for y in range(0, height, chunk) for x in range(0, width, chunk)]


def megapixels(size: int) -> float:
    """Slide area of a ``size`` x ``size`` slide in megapixels."""
    return size * size / 1e6


def stage_row(stage: str, setting: str, seconds: float, slide_mp: float, tiles_per_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """One stage-limit row: the time to do the slide's worth of this stage, as MP/s of slide area."""
    row = {"stage": stage, "setting": setting, "seconds": seconds, "mp_per_s": slide_mp / seconds if seconds > 0 else math.inf}
    if tiles_per_s is not None:
        row["tiles_per_s"] = tiles_per_s
    row.update(extra)
    return row


def bottleneck(limits: dict[str, float]) -> tuple[str, float]:
    """The slowest of the necessary stages ``{name: MP/s}``: its name and limit."""
    name = min(limits, key=lambda k: limits[k])
    return name, limits[name]


def summarize(stages: list[dict[str, Any]], runs: list[dict[str, Any]], slide_mp: float, tissue_tiles: int | None) -> list[dict[str, Any]]:
    """Add to every pipeline run its necessary stage limits, the bottleneck and the ratio.

    The necessary stages of a run are: the decode it used (GPU decode for backend
    ``nvimgcodec``, CPU decode otherwise), statistics, the best encoder batch at its
    precision, and Zarr writing. Encoder tiles/s become slide MP/s through the slide's
    tissue tiles per megapixel.
    """
    per_mp = (tissue_tiles / slide_mp) if tissue_tiles else None

    def best(stage: str, setting_prefix: str = "") -> float | None:
        rates = [r["mp_per_s"] for r in stages if r["stage"] == stage and str(r["setting"]).startswith(setting_prefix) and "error" not in r]
        return max(rates) if rates else None

    out = []
    for run in runs:
        if "error" in run:
            out.append(run)
            continue
        limits: dict[str, float] = {}
        decode = best("gpu decode") if run["backend"] == "nvimgcodec" else best("cpu decode")
        if decode is not None:
            limits["gpu decode" if run["backend"] == "nvimgcodec" else "cpu decode"] = decode
        for stage in ("statistics", "zarr write"):
            rate = best(stage)
            if rate is not None:
                limits[stage] = rate
        encoder = [r["tiles_per_s"] for r in stages if r["stage"] == "encoder" and r["setting"].startswith(run["precision"]) and "error" not in r]
        if encoder and per_mp:
            limits[f"encoder {run['precision']}"] = max(encoder) / per_mp
        row = dict(run)
        if limits:
            name, limit = bottleneck(limits)
            row.update(bottleneck=name, bottleneck_mp_per_s=limit, ratio=run["mp_per_s"] / limit)
        row["limits"] = limits
        out.append(row)
    return out


def format_tables(result: dict[str, Any]) -> str:
    """The Markdown tables of one slide's result (stages, then pipeline runs)."""
    head = (
        f"GPU benchmark, {result['size']}² synthetic slide ({result['megapixels']:.0f} MP, "
        f"{TISSUE_FRACTION:.0%} tissue), chunk {result['chunk']}, {result['threads']} host threads, {result['gpu']}"
    )
    stages = markdown_table(result["stages"], ["stage", "setting", "seconds", "mp_per_s", "tiles_per_s", "error"])
    runs = markdown_table(
        result["pipeline"],
        ["backend", "precision", "seconds", "mp_per_s", "tissue_tiles_per_s", "bottleneck", "bottleneck_mp_per_s", "ratio", "error"],
    )
    return f"{head}\n\nStage limits (MP/s of slide area):\n\n{stages}\n\nEnd to end:\n\n{runs}"


# -- the stages (need a GPU) ---------------------------------------------------------------


def _guarded(stage: str, setting: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage; a failure becomes a row with its error instead of ending the run."""
    try:
        return fn()
    except Exception as err:
        print(f"{stage} ({setting}) failed: {type(err).__name__}: {err}", file=sys.stderr)
        return {"stage": stage, "setting": setting, "error": f"{type(err).__name__}: {err}"}


def cpu_decode(slide: Path, size: int, chunk: int, threads: int, repeat: int) -> dict[str, Any]:
    """cuCIM read_region of every window of level 0, one CuImage per thread."""
    from cucim import CuImage

    parts = windows(size, size, chunk)
    local: dict[int, Any] = {}

    def read(window: tuple[int, int, int, int]) -> None:
        import threading

        image = local.setdefault(threading.get_ident(), CuImage(str(slide)))
        y, x, h, w = window
        image.read_region((x, y), (w, h), level=0)

    def run() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, parts))

    seconds = timed(run, repeat)["median_s"]
    return stage_row("cpu decode", f"cuCIM, {threads} threads", seconds, megapixels(size))


def gpu_decode(slide: Path, size: int, chunk: int, threads: int, repeat: int) -> dict[str, Any]:
    """NvImageCodecReader over every window of level 0 (one batched call per window)."""
    import cupy

    from wsi_xr.readers import probe
    from wsi_xr.readers.nvimgcodec_backend import NvImageCodecReader

    reader = NvImageCodecReader(probe(slide))
    parts = windows(size, size, chunk)

    def run() -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: reader.read(0, *w).shape, parts))
        cupy.cuda.runtime.deviceSynchronize()

    seconds = timed(run, repeat)["median_s"]
    row = stage_row("gpu decode", f"nvImageCodec, {threads} threads", seconds, megapixels(size))
    row.update(agreement=reader.report, counters=dict(reader.counters))
    reader.close()
    return row


def statistics(size: int, chunk: int, repeat: int) -> dict[str, Any]:
    """block_statistics on one device-resident chunk, once per chunk of the slide."""
    import cupy

    from wsi_xr.tissue import block_statistics

    block = cupy.random.randint(0, 256, (chunk, chunk, 3), dtype=cupy.uint8)
    n = len(windows(size, size, chunk))

    def run() -> None:
        for _ in range(n):
            block_statistics(block, TILE, 4 * TILE)
        cupy.cuda.runtime.deviceSynchronize()

    seconds = timed(run, repeat)["median_s"]
    return stage_row("statistics", f"CuPy, {n} chunks of {chunk}²", seconds, megapixels(size))


def encoder(repeat: int) -> list[dict[str, Any]]:
    """Encoder tiles/s on device-resident tiles, per precision and batch size."""
    import torch

    from wsi_xr.models import encode_tiles, load_vae

    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = load_vae(None, device="cuda")
    tiles = torch.randint(0, 256, (2 * max(ENCODER_BATCHES), TILE, TILE, 3), dtype=torch.uint8, device="cuda")
    supports_precision = "precision" in inspect.signature(encode_tiles).parameters
    rows = []
    for precision in PRECISIONS:
        if precision != "fp32" and not supports_precision:
            rows.append({"stage": "encoder", "setting": precision, "error": "encode_tiles has no precision= here"})
            continue
        for batch in ENCODER_BATCHES:
            kwargs = {"precision": precision} if supports_precision else {}

            def run() -> None:
                encode_tiles(model, tiles, batch_size=batch, **kwargs)
                torch.cuda.synchronize()

            seconds = timed(run, repeat)["median_s"]
            label = "fp32/TF32" if precision == "fp32" else precision
            rows.append({"stage": "encoder", "setting": f"{label}, batch {batch}", "seconds": seconds, "tiles_per_s": len(tiles) / seconds})
    return rows


def zarr_write(size: int, chunk: int, repeat: int, threads: int) -> dict[str, Any]:
    """Write the slide's output arrays (latent cube, masks, variances) to a fresh Zarr store."""
    import dask
    import dask.array as da
    import numpy as np
    import xarray as xr

    n = size // TILE
    step = chunk // TILE
    latent = da.random.default_rng(0).random((n, n, 32), chunks=(step, step, 32)).astype(np.float32)
    ds = xr.Dataset(
        {
            "latent": (("tile_y", "tile_x", "feature"), latent),
            "tile_variance": (("tile_y", "tile_x"), latent[..., 0]),
            "tile_mask": (("tile_y", "tile_x"), latent[..., 0] > 0.7),
        }
    )
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-zarr-"))

    def run() -> None:
        with dask.config.set(scheduler="threads", num_workers=threads):
            ds.to_zarr(root / f"w{time.perf_counter_ns()}.zarr", mode="w", zarr_format=3, consolidated=False)

    seconds = timed(run, repeat)["median_s"]
    return stage_row("zarr write", f"{n}x{n}x32 float32 + masks", seconds, megapixels(size))


def pipeline(slide: Path, size: int, args: argparse.Namespace, backend: str, precision: str, report: Path | None = None) -> dict[str, Any]:
    """process_slide(device="cuda") end to end; MP/s and tissue tiles/s."""
    import dask
    import xarray as xr

    import wsi_xr

    kwargs: dict[str, Any] = {"chunks": args.chunk, "device": "cuda", "coarse": args.coarse, "backend": backend, "overwrite": True, "progress": False}
    if "precision" in inspect.signature(wsi_xr.process_slide).parameters:
        kwargs["precision"] = precision
    elif precision != "fp32":
        raise RuntimeError("process_slide has no precision= here")
    store = Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "p.zarr"
    if report is not None:
        from distributed import Client, performance_report

        with Client(processes=False, n_workers=1, threads_per_worker=args.threads) as client, performance_report(filename=str(report)):
            wsi_xr.process_slide(slide, store, client=client, **kwargs)
        return {"report": str(report)}
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        seconds = timed(lambda: wsi_xr.process_slide(slide, store, **kwargs), args.repeat)["median_s"]
    tissue = int(xr.open_zarr(store).attrs["tissue_tiles"])
    return {
        "backend": backend,
        "precision": precision,
        "seconds": seconds,
        "mp_per_s": megapixels(size) / seconds,
        "tissue_tiles": tissue,
        "tissue_tiles_per_s": tissue / seconds,
    }


def bench_slide(size: int, args: argparse.Namespace, gpu: str) -> dict[str, Any]:
    """Every stage limit and every pipeline configuration on one slide."""
    slide = synthetic_slide(size, TISSUE_FRACTION)
    mp = megapixels(size)
    print(f"== {slide} ({mp:.0f} MP)", flush=True)
    stages = [
        _guarded("cpu decode", "cuCIM", lambda: cpu_decode(slide, size, args.chunk, args.threads, args.repeat)),
        _guarded("gpu decode", "nvImageCodec", lambda: gpu_decode(slide, size, args.chunk, args.decode_threads, args.repeat)),
        _guarded("statistics", "CuPy", lambda: statistics(size, args.chunk, args.repeat)),
    ]
    try:
        stages += encoder(args.repeat)
    except Exception as err:
        stages.append({"stage": "encoder", "setting": "all", "error": f"{type(err).__name__}: {err}"})
    stages.append(_guarded("zarr write", "xarray", lambda: zarr_write(size, args.chunk, args.repeat, args.threads)))
    runs = []
    for backend in [b for b in args.backends.split(",") if b]:
        for precision in [p for p in args.precisions.split(",") if p]:
            try:
                runs.append(pipeline(slide, size, args, backend, precision))
            except Exception as err:
                runs.append({"backend": backend, "precision": precision, "error": f"{type(err).__name__}: {err}"})
            print(runs[-1], flush=True)
    tissue = next((r["tissue_tiles"] for r in runs if "tissue_tiles" in r), None)
    for row in stages:  # encoder rows in slide MP/s too, once the tissue density is known
        if row["stage"] == "encoder" and "tiles_per_s" in row and tissue:
            row["mp_per_s"] = row["tiles_per_s"] / (tissue / mp)
    result: dict[str, Any] = {
        "slide": str(slide),
        "size": size,
        "megapixels": mp,
        "chunk": args.chunk,
        "threads": args.threads,
        "gpu": gpu,
        "stages": stages,
        "pipeline": summarize(stages, runs, mp, tissue),
    }
    if args.report:
        first = next((r for r in runs if "error" not in r), None)
        if first is not None:
            path = RESULTS / f"gpu-{size}-dask-report.html"
            RESULTS.mkdir(parents=True, exist_ok=True)
            result["dask_report"] = pipeline(slide, size, args, first["backend"], first["precision"], report=path)["report"]
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark for every ``--size``; save JSON and Markdown per size."""
    args = build_parser().parse_args(argv)
    gpu = require_gpu()
    for size in args.size or [32768]:
        result = bench_slide(size, args, gpu)
        save(args.out or f"gpu-{size}", result, format_tables(result))


if __name__ == "__main__":
    main()
