"""Read throughput: all of level 0 through ``open_slide`` at several chunkings vs raw cuCIM.

    python -m benchmarks.bench_read [--size 16384] [--repeat 3]

Raw cuCIM reads the same area in large regions (4096 x 4096) with the same number of
threads, each calling ``read_region`` (it releases the GIL). Ratios are within one run.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np

from benchmarks.common import markdown_table, save, synthetic_slide, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from cucim import CuImage

    import wsi_xr

    slide = synthetic_slide(args.size)
    megapixels = args.size * args.size / 1e6

    def raw_cucim() -> None:
        image = CuImage(str(slide))
        step = 4096
        regions = [(x, y, min(step, args.size - x), min(step, args.size - y)) for y in range(0, args.size, step) for x in range(0, args.size, step)]

        def read(r: tuple[int, int, int, int]) -> None:
            np.asarray(image.read_region((r[0], r[1]), (r[2], r[3])))

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(read, regions))

    rows = []
    raw = timed(raw_cucim, args.repeat)
    rows.append({"reader": "raw cuCIM read_region 4096^2", "chunk": "-", **raw, "MP/s": megapixels / raw["median_s"], "vs raw": 1.0})
    for chunk in (512, 1024, 2048, 4096):
        image = wsi_xr.open_slide(slide, chunks=chunk)
        everything = image.data.map_blocks(lambda b: b[:1, :1, :1].copy(), chunks=(1, 1, 1), dtype=np.uint8)

        def read_all() -> None:
            with dask.config.set(scheduler="threads", num_workers=args.threads):
                everything.compute()

        t = timed(read_all, args.repeat)
        rows.append(
            {"reader": "wsi_xr.open_slide", "chunk": chunk, **t, "MP/s": megapixels / t["median_s"], "vs raw": raw["median_s"] / t["median_s"]}
        )
    best = max(r["vs raw"] for r in rows[1:])
    table = markdown_table(rows, ["reader", "chunk", "median_s", "min_s", "max_s", "MP/s", "vs raw"])
    table += f"\n\nSlide {args.size} x {args.size} synthetic JPEG (256-px tiles), {args.threads} threads. Best chunking reaches {best:.2f}x raw cuCIM throughput (target >= 0.85)."
    save("read", {"size": args.size, "threads": args.threads, "rows": rows, "best_vs_raw": best}, table)


if __name__ == "__main__":
    main()
