"""``wsi-xr bench``: runs in seconds, writes every field, counts redundant decodes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from wsi_xr.bench import BenchResult, run_benchmark
from wsi_xr.datasets.synth import write_synthetic_slide


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "bench-2048.tif"
    write_synthetic_slide(path, 2048, 2048, seed=9)
    return path


def test_cli_bench_writes_json_and_png(small_slide: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi_xr.cli",
            "bench",
            str(small_slide),
            "--chunks",
            "512,1000,1024",
            "--stage",
            "read,mask",
            "--repeat",
            "1",
            "--out",
            str(out),
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["width"] == 2048 and report["tile_size"] == [256, 256]
    assert {"date", "versions", "cpu_count"} <= set(report["context"])
    names = {f.name for f in fields(BenchResult)}
    assert len(report["results"]) == 6
    for row in report["results"]:
        assert set(row) == names
    measured = [r for r in report["results"] if r["error"] is None]
    assert all(r["seconds_median"] > 0 and r["megapixels_per_s"] > 0 and r["tasks"] > 0 and r["peak_memory_mb"] > 0 for r in measured)
    # the 1000-px mask is refused (not a multiple of the patch), the rest measured
    assert [r["chunk"] for r in report["results"] if r["error"]] == [1000]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "redecode" in run.stdout


def test_redundant_decode_is_counted(small_slide: Path) -> None:
    report = run_benchmark(small_slide, chunks=(256, 512, 1000, 640), stages=("read",), repeat=1, progress=False)
    by_chunk = {r.chunk: r for r in report.results}
    assert by_chunk[256].redundant_decode == 1.0 and by_chunk[512].redundant_decode == 1.0
    assert by_chunk[256].aligned and not by_chunk[1000].aligned and not by_chunk[640].aligned
    # 1000-px chunks cut the 256-px TIFF tiles: those along the cuts are decoded twice
    assert by_chunk[1000].redundant_decode > 1.0
    # exactly: the chunks [0,1000) [1000,2000) [2000,2048) decode the tile spans 0-1024,
    # 768-2048 and 1792-2048 along each axis: 2560 px of 2048
    assert by_chunk[1000].redundant_decode == pytest.approx(2560**2 / 2048**2, rel=1e-12)
    assert by_chunk[640].redundant_decode == pytest.approx((768 + 768 + 768 + 256) ** 2 / 2048**2, rel=1e-12)
    assert by_chunk[1000].pixels_decoded > by_chunk[512].pixels_decoded
