"""Tissue mask: the notebook approach vs wsi_xr (full and coarse skip) vs raw decode.

    python -m benchmarks.bench_mask [--size 16384] [--repeat 3]

(a) the reference notebook re-implemented faithfully: 256-px patch coordinate lists ->
    ``client.map`` on a LocalCluster, each task opening a ``CuImage`` and reading its
    patch, ``as_completed``; then every 64-px tile of a kept patch read again the same way;
(b) ``wsi_xr.tissue_mask(coarse="none")``; (c) with coarse skip; (d) raw decode of level
0 (cuCIM 4096^2 region reads, no statistics). Same number of workers everywhere; each
case runs in its own process (peak RSS is that process tree's). Also (c) on slides of
10%, 30% and 60% tissue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.common import isolated, markdown_table, save, self_peak_mb, synthetic_slide, timed

THRESHOLD = 60.0
WORKERS = os.cpu_count() or 1


def _patch_var(args: tuple[str, int, int, int]) -> tuple[int, int, float]:
    from cucim import CuImage

    path, x, y, size = args
    region = np.asarray(CuImage(path).read_region((x, y), (size, size)))[..., :3]
    return x, y, float(region.var())


def case_notebook(slide: str, size: int) -> dict:
    from distributed import Client, LocalCluster, as_completed

    with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        client.submit(_patch_var, (slide, 0, 0, 64)).result()  # workers up and warm
        start = time.perf_counter()
        coords = [(slide, x, y, 256) for y in range(0, size, 256) for x in range(0, size, 256)]
        kept = []
        for future in as_completed(client.map(_patch_var, coords, pure=False)):
            x, y, var = future.result()
            if var > THRESHOLD:
                kept.append((x, y))
        tiles = [(slide, x + dx, y + dy, 64) for x, y in kept for dy in range(0, 256, 64) for dx in range(0, 256, 64)]
        tissue = 0
        for future in as_completed(client.map(_patch_var, tiles, pure=False)):
            tissue += future.result()[2] > THRESHOLD
        return {"seconds": time.perf_counter() - start, "tissue_tiles": int(tissue)}


def case_wsi_xr(slide: str, coarse: str, repeat: int) -> dict:
    import dask

    import wsi_xr

    def once() -> int:
        mask = wsi_xr.tissue_mask(wsi_xr.open_slide(slide, chunks=2048), threshold=THRESHOLD, coarse=coarse)
        with dask.config.set(scheduler="threads", num_workers=WORKERS):
            computed = mask.compute()
        return int(computed.tile_mask.sum())

    return {"seconds": timed(once, repeat)["median_s"], "tissue_tiles": once()}


def case_raw(slide: str, size: int, repeat: int) -> dict:
    from cucim import CuImage

    image = CuImage(slide)
    step = 4096
    regions = [(x, y) for y in range(0, size, step) for x in range(0, size, step)]

    def once() -> None:
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda r: np.asarray(image.read_region(r, (min(step, size - r[0]), min(step, size - r[1])))), regions))

    return {"seconds": timed(once, repeat)["median_s"], "tissue_tiles": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default=None)
    parser.add_argument("--slide", default=None)
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.case:
        if args.case == "notebook":
            out = case_notebook(args.slide, args.size)
        elif args.case == "raw":
            out = case_raw(args.slide, args.size, args.repeat)
        else:
            out = case_wsi_xr(args.slide, args.case, args.repeat)
        print(json.dumps({**out, "peak_rss_mb": self_peak_mb()}))
        return

    slide = str(synthetic_slide(args.size, 0.3))
    common = ["--slide", slide, "--size", str(args.size), "--repeat", str(args.repeat)]
    rows = []
    for label, case in (
        ("(a) notebook: client.map, per-task CuImage, tile re-reads", "notebook"),
        ("(b) wsi_xr coarse=none", "none"),
        ("(c) wsi_xr coarse=auto", "auto"),
        ("(d) raw decode (cuCIM regions)", "raw"),
    ):
        result = isolated("benchmarks.bench_mask", case, *common)
        rows.append({"case": label, **result})
        print(rows[-1], file=sys.stderr)
    by = {r["case"][:3]: r for r in rows}
    speedup = by["(a)"]["seconds"] / by["(b)"]["seconds"]
    vs_raw = by["(b)"]["seconds"] / by["(d)"]["seconds"]
    fractions = []
    for fraction in (0.1, 0.3, 0.6):
        path = str(synthetic_slide(args.size, fraction))
        for coarse in ("none", "auto"):
            result = isolated("benchmarks.bench_mask", coarse, "--slide", path, "--size", str(args.size), "--repeat", str(args.repeat))
            fractions.append({"tissue fraction": fraction, "coarse": coarse, **result})
    table = markdown_table(rows, ["case", "seconds", "tissue_tiles", "peak_rss_mb"])
    table += f"\n\n(b) is {speedup:.1f}x faster than (a) (target >= 10); (b) takes {vs_raw:.2f}x the raw decode time (target <= 1.25).\n\n"
    table += markdown_table(fractions, ["tissue fraction", "coarse", "seconds", "tissue_tiles", "peak_rss_mb"])
    table += f"\n\nSlide {args.size} x {args.size} synthetic, threshold {THRESHOLD}, {WORKERS} workers, chunks 2048."
    save(
        "mask",
        {"size": args.size, "workers": WORKERS, "rows": rows, "fractions": fractions, "speedup_vs_notebook": speedup, "vs_raw_decode": vs_raw},
        table,
    )


if __name__ == "__main__":
    main()
