"""Cost of the tile-integrity check as a share of the tissue-mask time.

    python -m benchmarks.bench_integrity [--size 8192] [--repeat 5]

Before any pixel is trusted, :func:`wsi_xr.readers.integrity.scan_level` reads the
first bytes of every TIFF tile of the level and checks the JPEG structure. This script
times, on a synthetic ``SIZE x SIZE`` slide and on CMU-1-small-region:

- ``scan``: ``scan_level(path, 0)`` alone;
- ``mask``: ``tissue_mask(open_slide(path), threshold=60.0, coarse="none").compute()``
  from a cold process state (reader handles and the integrity cache cleared first, so
  the scan it does is included, as in a user's first call);

and reports ``scan / mask``. Medians of ``--repeat`` runs after one warm-up (the file
is in the OS page cache: this measures the CPU cost of the check, not disk latency).
Prints a table and writes JSON to ``benchmarks/results/integrity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THRESHOLD = 60.0


def _slide(size: int, folder: Path) -> Path:
    from wsi_xr.datasets.synth import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"integrity-synth-{size}.tif"
    if not path.exists():
        tmp = path.with_suffix(".partial.tif")
        write_synthetic_slide(tmp, size, size, seed=0, progress=False)
        os.replace(tmp, path)
    return path


def _median_time(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up (imports, page cache)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(path: Path, repeat: int) -> dict[str, object]:
    import dask

    import wsi_xr
    from wsi_xr import readers
    from wsi_xr.readers import integrity
    from wsi_xr.readers.integrity import scan_level

    def scan() -> None:
        integrity.clear_header_cache()  # as in a fresh process
        scan_level(str(path), 0)

    def mask() -> None:
        readers.clear_caches()  # as in a fresh process: the first call pays the scan
        with dask.config.set(scheduler="threads"):
            wsi_xr.tissue_mask(wsi_xr.open_slide(path), threshold=THRESHOLD, coarse="none").compute()

    info = wsi_xr.probe(path)
    grid = scan_level(str(path), 0)
    scan_s, scan_all = _median_time(scan, repeat)
    mask_s, mask_all = _median_time(mask, repeat)
    return {
        "slide": path.name,
        "width": info.width,
        "height": info.height,
        "tiff_tiles": int(grid.damaged.size),
        "scan_s": scan_s,
        "mask_s": mask_s,
        "scan_per_tile_us": scan_s / grid.damaged.size * 1e6,
        "scan_share_of_mask": scan_s / mask_s,
        "scan_runs_s": scan_all,
        "mask_runs_s": mask_all,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="side of the synthetic slide (default 8192)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cmu", default=str(HERE.parent.parent / "shared" / "data" / "cmu-1-small-region.svs"))
    parser.add_argument("--cache", default=str(HERE / ".cache"), help="where the synthetic slide is kept")
    parser.add_argument("--out", default=str(HERE / "results" / "integrity.json"))
    args = parser.parse_args(argv)

    slides = [_slide(args.size, Path(args.cache))]
    if Path(args.cmu).exists():
        slides.append(Path(args.cmu))
    else:
        print(f"CMU slide not found at {args.cmu}; measuring the synthetic slide only", file=sys.stderr)
    rows = [measure(path, args.repeat) for path in slides]
    print(f"{'slide':<34} {'size':>11} {'tiles':>6} {'scan s':>8} {'mask s':>8} {'us/tile':>8} {'scan/mask':>9}")
    for r in rows:
        print(
            f"{r['slide']:<34} {r['width']:>5}x{r['height']:<5} {r['tiff_tiles']:>6} {r['scan_s']:>8.4f} "
            f"{r['mask_s']:>8.3f} {r['scan_per_tile_us']:>8.1f} {r['scan_share_of_mask']:>9.2%}"
        )
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "threshold": THRESHOLD,
        "repeat": args.repeat,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
