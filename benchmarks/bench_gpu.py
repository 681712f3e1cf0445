"""GPU figures: read, mask and pipeline on CuPy chunks vs the CPU path, in one run.

    python benchmarks/bench_gpu.py SLIDE [--out results/gpu.json]

Needs CuPy and a CUDA GPU. Every figure is the median of --repeat runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import cupy
    import torch
    from cucim import CuImage

    import wsi_xr
    from wsi_xr.models import VAE2, encode_tiles, save_vae
    from wsi_xr.pipeline import process_slide
    from wsi_xr.tissue import tissue_mask

    parser = argparse.ArgumentParser()
    parser.add_argument("slide")
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args()
    info = wsi_xr.probe(args.slide)
    megapixels = info.width * info.height / 1e6
    threads = os.cpu_count() or 1
    rows: dict[str, float] = {}

    def read(device: str) -> None:
        image = wsi_xr.open_slide(args.slide, chunks=args.chunk, device=device)
        image.data.map_blocks(lambda b: b[:1, :1, :1].copy(), chunks=(1, 1, 1), dtype=np.uint8).compute()
        if device == "cuda":
            cupy.cuda.runtime.deviceSynchronize()

    def raw_cucim(device: str) -> None:
        img = CuImage(args.slide)
        step = 4096
        for y in range(0, info.height, step):
            for x in range(0, info.width, step):
                region = img.read_region((x, y), (min(step, info.width - x), min(step, info.height - y)), device=device)
                del region
        if device == "cuda":
            cupy.cuda.runtime.deviceSynchronize()

    def mask(device: str) -> None:
        tissue_mask(wsi_xr.open_slide(args.slide, chunks=args.chunk, device=device), threshold="auto", coarse="none").compute()

    with dask.config.set(scheduler="threads", num_workers=threads):
        for device in ("cpu", "cuda"):
            rows[f"read_{device}_s"] = timed(lambda: read(device), args.repeat)
            rows[f"raw_cucim_{device}_s"] = timed(lambda: raw_cucim(device), args.repeat)
            rows[f"mask_{device}_s"] = timed(lambda: mask(device), args.repeat)

        torch.manual_seed(0)
        weights = Path(tempfile.mkdtemp()) / "w.pt"
        save_vae(VAE2().eval(), weights)
        model = wsi_xr.load_vae(weights, device="cuda")
        tiles = torch.randint(0, 256, (8192, 64, 64, 3), dtype=torch.uint8, device="cuda")
        for batch in (256, 1024, 4096):
            seconds = timed(lambda: (encode_tiles(model, tiles, batch_size=batch), torch.cuda.synchronize()), args.repeat)
            rows[f"encoder_model_only_gpu_batch{batch}_tiles_per_s"] = len(tiles) / seconds
        store = Path(tempfile.mkdtemp()) / "p.zarr"
        for device in ("cpu", "cuda"):
            seconds = timed(lambda: process_slide(args.slide, store, weights=weights, chunks=args.chunk, device=device, coarse="none", overwrite=True, progress=False), args.repeat)
            ds = process_slide(args.slide, store, weights=weights, chunks=args.chunk, device=device, coarse="none", progress=False)
            rows[f"pipeline_{device}_s"] = seconds
            rows[f"pipeline_{device}_tissue_tiles_per_s"] = ds.attrs["tissue_tiles"] / seconds
    result = {
        "slide": args.slide,
        "megapixels": megapixels,
        "chunk": args.chunk,
        "dask_threads": threads,
        "gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "figures": rows,
        "megapixels_per_s": {k.replace("_s", "_mp_per_s"): megapixels / v for k, v in rows.items() if k.endswith("_s") and "per_s" not in k},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
