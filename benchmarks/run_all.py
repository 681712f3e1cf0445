"""Run the whole benchmark suite; write results/*.json, results/*.md and results/SUMMARY.md.

    python -m benchmarks.run_all [--quick]

--quick uses 4096^2 slides (a smoke run in a minute or two); the figures in
RESULTS.md come from the full run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import HERE, RESULTS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size, large = ("4096", "8192") if args.quick else ("16384", "32768")
    scale = ["--sizes", "2048,4096", "--fractions", "0.1,0.3", "--cohort", "2", "--tiles", "2000"] if args.quick else []
    steps = [
        ("read", [sys.executable, "-m", "benchmarks.bench_read", "--size", size]),
        ("mask", [sys.executable, "-m", "benchmarks.bench_mask", "--size", size]),
        ("encoder", [sys.executable, "-m", "benchmarks.bench_encoder", "--out", str(RESULTS / "encoder.json")]),
        ("pipeline", [sys.executable, "-m", "benchmarks.bench_pipeline", "--size", size, "--large", large]),
        (
            "chunking",
            [
                sys.executable,
                "-m",
                "wsi_xr.cli",
                "bench",
                "--size",
                size,
                "--chunks",
                "512,1000,1024,2048,4096",
                "--stage",
                "read,mask",
                "--backend",
                "cucim,tifffile",
                "--scheduler",
                "threads,processes",
                "--out",
                str(RESULTS / "chunking.json"),
                "--plot",
                str(RESULTS / "chunking.png"),
            ],
        ),
        ("scale", [sys.executable, "-m", "benchmarks.bench_scale", *scale]),
        ("precision", [sys.executable, "-m", "benchmarks.bench_precision"]),
    ]
    summary = [f"# Benchmark summary ({time.strftime('%Y-%m-%d %H:%M')}, {'quick' if args.quick else 'full'})\n"]
    for name, command in steps:
        print(f"== {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=HERE.parent)
        summary.append(f"## {name} ({time.perf_counter() - started:.0f} s)\n")
        md = RESULTS / f"{name}.md"
        if md.exists():
            summary.append(md.read_text())
    (RESULTS / "SUMMARY.md").write_text("\n".join(summary))
    print(f"wrote {RESULTS / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
