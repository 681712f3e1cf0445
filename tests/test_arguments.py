"""Every argument is checked before any work, with advice that fits the mistake.

On 75c0752: output-path and coarse-level errors came after the cluster had started; a
coarse level on a one-level slide said "(levels 1..0 exist)"; an unreachable scheduler
said "check the path, its permissions and free space"; ``plot`` on a cohort asked for
``--slide``; ``tile=1000000`` suggested ``patch=4000000``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import wsi_xr
from wsi_xr.tissue import validate_mask_arguments

CLI = [sys.executable, "-m", "wsi_xr.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)


def test_output_and_coarse_errors_come_before_the_cluster(cmu: Path, weights: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = {
        "holds data that wsi_xr did not write": ["run", cmu, foreign, "--weights", weights],
        "one level only": ["run", cmu, tmp_path / "a.zarr", "--coarse", "7", "--weights", weights],
        "is not a Zarr store folder": ["run", cmu, tmp_path / "notes" / "notes.txt", "--weights", weights],
    }
    for expected, args in cases.items():
        done = _run(*args)  # default: a LocalCluster, which must not start
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Dask dashboard" not in done.stderr, done.stderr
        assert "1..0" not in done.stderr
    assert not (tmp_path / "a.zarr").exists()


def test_a_coarse_level_says_which_levels_exist(synth_slide: Path) -> None:
    levels = len(wsi_xr.probe(synth_slide).levels)
    image = wsi_xr.open_slide(synth_slide)
    with pytest.raises(wsi_xr.InvalidArgumentError, match=f"one of levels 1..{levels - 1}"):
        wsi_xr.tissue_mask(image, coarse=levels + 3)
    top = wsi_xr.open_slide(synth_slide, level=levels - 1)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="smallest, so there is no coarser level"):
        wsi_xr.tissue_mask(top, coarse=levels + 3)


def test_unreachable_scheduler_names_the_address(cmu: Path, weights: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    done = _run("run", cmu, tmp_path / "o.zarr", "--weights", weights, "--scheduler", "tcp://127.0.0.1:9", env=env)
    assert done.returncode == 2
    assert "Dask scheduler at tcp://127.0.0.1:9" in done.stderr and "is running" in done.stderr, done.stderr
    assert "free space" not in done.stderr and "Traceback" not in done.stderr
    from wsi_xr.cluster import check_scheduler_address

    for address in ("tcp://10.0.0.5:8786", "10.0.0.5:8786", "ucx://node1:8786"):  # distributed's forms
        check_scheduler_address(address)
    bad = _run("run", cmu, tmp_path / "o.zarr", "--weights", weights, "--scheduler", "localhost")
    assert bad.returncode == 2 and "PROTOCOL://HOST:PORT" in bad.stderr, bad.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_plot_of_a_cohort_lists_its_groups(synth_slide: Path, cmu: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "cohort.zarr"
    wsi_xr.process_slides([synth_slide, cmu], store, weights=weights, progress=False)
    done = _run("plot", store, "--out", tmp_path / "p.png")
    assert done.returncode == 2
    assert "--group NAME" in done.stderr and synth_slide.stem in done.stderr and cmu.stem in done.stderr, done.stderr
    assert "--slide" not in done.stderr
    ok = _run("plot", store, "--group", cmu.stem, "--out", tmp_path / "p.png")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("tile", "patch", "advice", "not_advice"),
    [
        (1_000_000, 256, "larger than patch=256", "patch=4000000"),
        (64, 1_000_000, "at most 8192 px", "multiple of 1000000"),
        (64, 300, "use patch=256 or patch=320", None),
        (100, 8190, "use patch=8100", "8200"),
    ],
)
def test_tile_and_patch_advice_is_sensible(tile: int, patch: int, advice: str, not_advice: str | None) -> None:
    with pytest.raises(wsi_xr.InvalidArgumentError) as err:
        validate_mask_arguments(tile, patch, "auto")
    assert advice in str(err.value)
    if not_advice:
        assert not_advice not in str(err.value)
    assert "tile=64, patch=256" in str(err.value)  # the reference values


def test_the_default_chunk_holds_whole_patches(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    """patch=768 needs no --chunk: the default chunk becomes a multiple of it."""
    ds = wsi_xr.process_slide(synth_slide, tmp_path / "p768.zarr", weights=weights, patch=768, progress=False)
    assert ds.attrs["complete"] and all(c % 768 == 0 for c in ds.wsi.attrs["wsi_xr_run"]["chunks"][0][:-1])
