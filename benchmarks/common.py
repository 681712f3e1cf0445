"""Shared helpers of the benchmark scripts: cached synthetic slides, isolated runs, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("WSI_XR_BENCH_CACHE", HERE / ".cache"))
RESULTS = HERE / "results"


def synthetic_slide(size: int, tissue_fraction: float = 0.3, seed: int = 0) -> Path:
    """A synthetic slide, generated once and kept in benchmarks/.cache (git-ignored)."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"synth-{size}-f{tissue_fraction:g}-s{seed}.tif"
    if not path.exists():
        tmp = path.with_suffix(".partial.tif")
        write_synthetic_slide(tmp, size, size, seed=seed, tissue_fraction=tissue_fraction)
        os.replace(tmp, path)
    return path


def timed(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median/min/max wall time of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1]}


def isolated(module: str, case: str, *args: str) -> dict[str, Any]:
    """Run ``python -m MODULE --case CASE ARGS`` in a fresh process and return its JSON.

    Each case reports its own ``peak_rss_mb`` (:func:`self_peak_mb` in that process: the
    largest resident set of it or of any child it waited for), measured from a clean start.
    """
    run = subprocess.run([sys.executable, "-m", module, "--case", case, *args], capture_output=True, text=True, cwd=HERE.parent)
    if run.returncode != 0:
        raise RuntimeError(f"{module} --case {case} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def self_peak_mb() -> float:
    """Peak RSS of this process and the children it waited for, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats with 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, payload: dict[str, Any], table: str) -> None:
    """Write results/NAME.json and results/NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)
