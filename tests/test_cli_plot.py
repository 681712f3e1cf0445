"""``wsi-xr plot --latent``: the latent map of a store (or a cohort's group, or a netCDF file written
from one), checked against the store's own latents; clear errors where there is no latent cube."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import xarray as xr

import wsi_xr
from wsi_xr.cli import EXIT_USER_ERROR, build_parser, main
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.pipeline import process_slide, process_slides
from wsi_xr.store import write_zarr


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("plot-slides")
    paths = [folder / "a.tif", folder / "b.tif"]
    for seed, path in enumerate(paths, 21):
        write_synthetic_slide(path, 512, 448, seed=seed, tissue_fraction=0.5)
    return paths


@pytest.fixture(scope="module")
def store(slides: list[Path], weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plot-stores") / "a.zarr"
    process_slide(slides[0], path, weights=weights, chunks=256, progress=False)
    return path


@pytest.fixture(scope="module")
def cohort(slides: list[Path], weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plot-stores") / "cohort.zarr"
    process_slides(slides, path, weights=weights, chunks=256, progress=False)
    return path


def _tile_colours(ds: xr.Dataset) -> np.ndarray:
    """The colour each tissue tile must have in the latent map, as 8-bit RGB: its latent's first three
    principal components over the slide's tissue tiles, each scaled from its 1st to its 99th percentile."""
    tissue = np.asarray(ds.tile_mask.values, dtype=bool)
    vectors = np.asarray(ds.latent.values)[tissue].astype(np.float64)
    centred = vectors - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ axes[:3].T
    low, high = np.percentile(scores, 1, axis=0), np.percentile(scores, 99, axis=0)
    return np.round(np.clip((scores - low) / (high - low), 0, 1) * 255)


def _share_drawn(png: Path, colours: np.ndarray) -> float:
    """The share of ``colours`` (8-bit RGB) found, within one step per channel, among the PNG's pixels."""
    drawn = np.unique(np.round(matplotlib.image.imread(png)[..., :3] * 255).reshape(-1, 3), axis=0)
    found = [bool((np.abs(drawn - colour).max(axis=1) <= 1).any()) for colour in colours]
    return sum(found) / len(found)


def _plot(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["plot", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_latent_map_of_a_store(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "latent.png"
    code, out, err = _plot(capsys, store, "--latent", "--out", png)
    assert code == 0 and f"wrote {png}" in out, err
    colours = _tile_colours(xr.open_zarr(store))
    assert len(colours) > 20
    assert _share_drawn(png, colours) > 0.9  # every tissue tile in its colour (a few may be hidden by rounding)
    overlay = tmp_path / "mask.png"
    assert _plot(capsys, store, "--out", overlay)[0] == 0  # without --latent: the tile mask, not the latent map
    assert _share_drawn(overlay, colours) < 0.2


def test_latent_map_of_a_cohort_needs_its_group(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "b.png"
    code, _, err = _plot(capsys, cohort, "--latent", "--out", png)
    assert code == EXIT_USER_ERROR and "--group NAME, one of: a, b" in err and not png.exists(), err
    code, _, err = _plot(capsys, cohort, "--latent", "--group", "b", "--out", png)
    assert code == 0, err
    assert _share_drawn(png, _tile_colours(xr.open_zarr(cohort, group="b"))) > 0.9
    assert _share_drawn(png, _tile_colours(xr.open_zarr(cohort, group="a"))) < 0.2  # not the other slide's


def test_a_mask_store_has_no_latent_map(slides: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mask = write_zarr(wsi_xr.tissue_mask(wsi_xr.open_slide(slides[0])).compute(), tmp_path / "mask.zarr")
    png = tmp_path / "m.png"
    code, _, err = _plot(capsys, mask, "--latent", "--out", png)
    assert code == EXIT_USER_ERROR and not png.exists()
    assert f"{mask}: has no latent cube" in err and "--latent needs a store written by `wsi-xr run`" in err, err
    assert _plot(capsys, mask, "--out", png)[0] == 0  # the tile mask it has


def test_latent_map_from_a_netcdf_file_and_without_the_slide(
    slides: list[Path], weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "gone.tif"
    shutil.copy(slides[1], moved)
    store = tmp_path / "gone.zarr"
    process_slide(moved, store, weights=weights, chunks=256, progress=False).to_netcdf(tmp_path / "gone.nc")
    moved.unlink()
    png = tmp_path / "gone.png"
    code, _, err = _plot(capsys, tmp_path / "gone.nc", "--latent", "--out", png)
    assert code == 0 and f"note: {moved}" in err and "--slide SLIDE" in err, err
    assert _share_drawn(png, _tile_colours(xr.open_zarr(store))) > 0.9
    code, _, err = _plot(capsys, tmp_path / "gone.nc", "--latent", "--slide", slides[1], "--out", png)  # the slide, found again
    assert code == 0 and "note:" not in err, err


def test_latent_option_says_what_it_draws() -> None:
    plot = build_parser()._subparsers._group_actions[0].choices["plot"]  # type: ignore[union-attr]
    latent = next(a for a in plot._actions if "--latent" in a.option_strings)
    assert latent.help and "principal components" in latent.help and "wsi-xr run" in latent.help
    assert "latent map" in (plot.description or "")


def test_a_file_that_is_no_store_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a store")
    code, _, err = _plot(capsys, notes, "--latent", "--out", tmp_path / "n.png")
    assert code == EXIT_USER_ERROR and err.count("\n") == 1, err
    assert err.startswith(f"wsi-xr plot: error: {notes}: a file, but neither a netCDF file nor a Zarr store"), err
