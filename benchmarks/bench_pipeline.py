"""End-to-end pipeline: tissue tiles/s, where the time goes, encoder efficiency, memory.

    python -m benchmarks.bench_pipeline [--size 16384] [--large 32768] [--weights W]

In separate processes on the same synthetic slide: read all of level 0; the tissue
mask; the pipeline (mask + latents + Zarr writes, one decode per pixel); the encoder
alone on the same number of preloaded tiles. Shares of the pipeline time are derived
from these. The encoder's in-pipeline throughput is tissue tiles / (pipeline - mask -
writes). Peak RSS of the pipeline on the two slide sizes shows whether memory grows
with slide size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from benchmarks.common import isolated, markdown_table, save, self_peak_mb, synthetic_slide, timed

WORKERS = os.cpu_count() or 1


def _time(fn, repeat: int) -> float:
    return timed(fn, repeat)["median_s"]


def run_case(case: str, slide: str, weights: str | None, repeat: int) -> dict:
    import dask

    import wsi_xr

    with dask.config.set(scheduler="threads", num_workers=WORKERS):
        if case == "read":
            data = wsi_xr.open_slide(slide, chunks=2048).data
            seconds = _time(lambda: data.map_blocks(lambda b: b[:1, :1, :1].copy(), chunks=(1, 1, 1), dtype=np.uint8).compute(), repeat)
            return {"seconds": seconds}
        if case == "mask":
            seconds = _time(lambda: wsi_xr.tissue_mask(wsi_xr.open_slide(slide, chunks=2048), coarse="none").compute(), repeat)
            return {"seconds": seconds}
        if case == "pipeline":
            store = Path(tempfile.mkdtemp()) / "p.zarr"
            seconds = _time(
                lambda: wsi_xr.process_slide(
                    slide, store, weights=weights, chunks=2048, coarse="none", overwrite=True, progress=False, torch_threads="auto"
                ),
                repeat,
            )
            ds = xr.open_zarr(store)
            start = time.perf_counter()
            copy = Path(tempfile.mkdtemp()) / "copy.zarr"
            ds.compute().to_zarr(copy, zarr_format=3)
            write = time.perf_counter() - start
            return {"seconds": seconds, "tissue_tiles": int(ds.attrs["tissue_tiles"]), "write_seconds": write}
        if case == "encoder":
            import torch

            from wsi_xr.models import encode_tiles, load_vae

            n = int(os.environ["BENCH_TILES"])
            tiles = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
            best = {}
            for threads in (1, WORKERS):
                torch.set_num_threads(threads)
                model = load_vae(weights)
                best[threads] = n / _time(lambda: encode_tiles(model, tiles, batch_size=256), repeat)
            return {"tiles_per_s": max(best.values()), "by_threads": best}
    raise SystemExit(f"unknown case {case}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default=None)
    parser.add_argument("--slide", default=None)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--large", type=int, default=32768)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    extra = ["--weights", args.weights] if args.weights else []
    if args.case:
        print(json.dumps({**run_case(args.case, args.slide, args.weights, args.repeat), "peak_rss_mb": self_peak_mb()}))
        return
    slide = str(synthetic_slide(args.size, 0.3))
    common = ["--slide", slide, "--repeat", str(args.repeat), *extra]
    read = isolated("benchmarks.bench_pipeline", "read", *common)
    mask = isolated("benchmarks.bench_pipeline", "mask", *common)
    pipe = isolated("benchmarks.bench_pipeline", "pipeline", *common)
    os.environ["BENCH_TILES"] = str(min(pipe["tissue_tiles"], 20000))
    encoder = isolated("benchmarks.bench_pipeline", "encoder", *common)
    encode_in_pipeline = max(pipe["seconds"] - mask["seconds"] - pipe["write_seconds"], 1e-9)
    in_pipeline_rate = pipe["tissue_tiles"] / encode_in_pipeline
    shares = {
        "decode": read["seconds"] / pipe["seconds"],
        "statistics": (mask["seconds"] - read["seconds"]) / pipe["seconds"],
        "encoder": encode_in_pipeline / pipe["seconds"],
        "writing": pipe["write_seconds"] / pipe["seconds"],
    }
    large = str(synthetic_slide(args.large, 0.3))
    pipe_large = isolated("benchmarks.bench_pipeline", "pipeline", "--slide", large, "--repeat", "1", *extra)
    rows = [
        {"what": f"pipeline {args.size}^2", "value": pipe["seconds"], "unit": "s"},
        {"what": "tissue tiles", "value": pipe["tissue_tiles"], "unit": "tiles"},
        {"what": "tissue tiles / s (end to end)", "value": pipe["tissue_tiles"] / pipe["seconds"], "unit": "tiles/s"},
        *({"what": f"share: {k}", "value": v, "unit": "of pipeline time"} for k, v in shares.items()),
        {"what": "encoder in pipeline", "value": in_pipeline_rate, "unit": "tiles/s"},
        {"what": "encoder alone, preloaded tiles (best threads)", "value": encoder["tiles_per_s"], "unit": "tiles/s"},
        {"what": "in-pipeline / model-only (target >= 0.8)", "value": in_pipeline_rate / encoder["tiles_per_s"], "unit": "ratio"},
        {"what": f"peak RSS pipeline {args.size}^2", "value": pipe["peak_rss_mb"], "unit": "MB"},
        {"what": f"peak RSS pipeline {args.large}^2", "value": pipe_large["peak_rss_mb"], "unit": "MB"},
        {"what": "peak RSS large / small (target <= 1.3)", "value": pipe_large["peak_rss_mb"] / pipe["peak_rss_mb"], "unit": "ratio"},
        {"what": f"pipeline {args.large}^2", "value": pipe_large["seconds"], "unit": "s"},
    ]
    table = (
        markdown_table(rows, ["what", "value", "unit"])
        + f"\n\n{WORKERS} threads (dask threaded scheduler), chunks 2048, coarse skip off, synthetic slides with 30% tissue."
    )
    save("pipeline", {"read": read, "mask": mask, "pipeline": pipe, "encoder": encoder, "pipeline_large": pipe_large, "shares": shares}, table)


if __name__ == "__main__":
    main()
