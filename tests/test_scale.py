"""Physical scale: mpp everywhere (file, user, missing) and a target resolution that makes
tiles cover the same microns on every slide, read once and area-averaged.

On 75c0752 ``open_slide(path, mpp=0.5)`` raised TypeError, there was no ``--mpp``, and a
0.25 µm/px and a 0.5 µm/px scan of one tissue gave tile grids 2x apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import xarray as xr

import wsi_xr
from tests.numerics import assert_mu_is_float32_exact
from wsi_xr.datasets.synth import write_rescanned_slide, write_synthetic_slide
from wsi_xr.errors import InvalidArgumentError
from wsi_xr.models import load_vae
from wsi_xr.readers import open_file, trace_reads
from wsi_xr.resample import area_weights, choose_scale, magnification_mpp, resample_tiles


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tissue: at 0.25 µm/px with a pyramid, at 0.25 µm/px without one (so the 0.5 target
    must be resampled), and rescanned at 0.5 µm/px (its own file, compressed again)."""
    folder = tmp_path_factory.mktemp("scans")
    paths = {"40x": folder / "40x.tif", "40x-flat": folder / "40x-flat.tif", "20x": folder / "20x.tif", "no-mpp": folder / "no-mpp.tif"}
    write_synthetic_slide(paths["40x"], 4096, 3072, seed=3, mpp=0.25)
    write_synthetic_slide(paths["40x-flat"], 4096, 3072, seed=3, mpp=0.25, levels=1)
    assert write_rescanned_slide(paths["40x"], paths["20x"]) == pytest.approx(0.5)
    write_synthetic_slide(paths["no-mpp"], 1024, 768, seed=4, mpp=None)
    return paths


def test_mpp_source_file_user_missing(scans: dict[str, Path]) -> None:
    assert wsi_xr.open_slide(scans["40x"]).attrs["mpp"] == pytest.approx(0.25)
    assert wsi_xr.open_slide(scans["40x"]).attrs["mpp_source"] == "file"
    image = wsi_xr.open_slide(scans["no-mpp"])
    assert image.attrs["mpp"] is None and image.attrs["mpp_source"] == "missing"
    image = wsi_xr.open_slide(scans["no-mpp"], mpp=0.5, level=1)
    assert image.attrs["mpp"] == 0.5 and image.attrs["mpp_source"] == "user" and image.attrs["level_mpp"] == 1.0
    wrong = wsi_xr.open_slide(scans["40x"], mpp=0.3)  # a file that states it wrongly
    assert wrong.attrs["mpp"] == 0.3 and wrong.attrs["mpp_source"] == "user"
    tree = wsi_xr.open_pyramid(scans["no-mpp"], mpp=0.5)
    assert tree.attrs["mpp"] == 0.5 and tree.attrs["mpp_source"] == "user"
    assert tree["level_1"]["image"].attrs["level_mpp"] == 1.0
    opened = xr.open_dataset(scans["no-mpp"], engine="wsi_xr", mpp=0.4)
    assert opened["image"].attrs["mpp"] == 0.4 and opened["image"].attrs["mpp_source"] == "user"
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(scans["no-mpp"]), mpp=0.5)
    assert mask.attrs["mpp"] == 0.5 and mask.attrs["mpp_source"] == "user"
    assert wsi_xr.tissue_mask(wsi_xr.open_slide(scans["no-mpp"])).attrs["mpp_source"] == "missing"
    for bad in (-1, 0, float("nan"), "0.5", True):
        with pytest.raises(InvalidArgumentError, match="no-mpp.tif: mpp="):
            wsi_xr.open_slide(scans["no-mpp"], mpp=bad)  # type: ignore[arg-type]


def test_target_errors_name_the_file_and_the_fix(scans: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgumentError, match=r"no-mpp.tif: the file states no mpp.*pass mpp="):
        wsi_xr.tissue_mask(wsi_xr.open_slide(scans["no-mpp"]), target_mpp=0.5)
    with pytest.raises(InvalidArgumentError, match=r"40x.tif: target_mpp=0.1 is finer than level 0.*does not upsample"):
        wsi_xr.tissue_mask(wsi_xr.open_slide(scans["40x"]), target_mpp=0.1)
    with pytest.raises(InvalidArgumentError, match="target_mpp needs an image straight from wsi_xr.open_slide"):
        wsi_xr.tissue_mask(wsi_xr.open_slide(scans["40x"]) + 0, target_mpp=0.5)
    with pytest.raises(InvalidArgumentError, match="target_mpp=-2"):
        wsi_xr.tissue_mask(wsi_xr.open_slide(scans["40x"]), target_mpp=-2)
    assert magnification_mpp(20) == 0.5 and magnification_mpp(40) == 0.25
    with pytest.raises(InvalidArgumentError, match="magnification=0"):
        magnification_mpp(0)


def test_level_choice_reads_the_coarsest_level_at_or_finer_than_the_target(scans: dict[str, Path]) -> None:
    info = open_file(scans["40x"]).info  # levels at 0.25, 0.5, 1, 2 ... µm/px
    assert (choose_scale(info, 0.5, 64).level, choose_scale(info, 0.5, 64).level_tile) == (1, 64)
    assert (choose_scale(info, 0.75, 64).level, choose_scale(info, 0.75, 64).level_tile) == (1, 96)
    assert (choose_scale(info, 0.25, 64).level, choose_scale(info, 0.25, 64).level_tile) == (0, 64)
    # a 0.2527 µm/px scan (Aperio 40x) for 0.5: its level 1 (0.5054) is "at" the target (within 2%), read as it is
    scale = choose_scale(info.with_mpp(0.2527), 0.5, 64)
    assert (scale.level, scale.level_tile, scale.resampled) == (1, 64, False) and scale.tile_mpp == pytest.approx(0.5054)
    # a 0.26 µm/px scan: level 1 (0.52) is 4% coarser, so level 0 is area-averaged, 123 px per tile
    scale = choose_scale(info.with_mpp(0.26), 0.5, 64)
    assert (scale.level, scale.level_tile) == (0, 123) and scale.tile_mpp == pytest.approx(0.26 * 123 / 64)
    # finer by less than half a pixel per tile: read as it is (0.499 for 0.5); 0.24: level 1 at 0.48, 67 px
    assert not choose_scale(info.with_mpp(0.4990 / 2), 0.5, 64).resampled
    assert (choose_scale(info.with_mpp(0.24), 0.5, 64).level, choose_scale(info.with_mpp(0.24), 0.5, 64).level_tile) == (1, 67)
    # a 20x scan at 0.504 µm/px for a 0.5 target is read as it is, not refused (224-px tiles too)
    assert (choose_scale(info.with_mpp(0.504), 0.5, 224).level, choose_scale(info.with_mpp(0.504), 0.5, 224).level_tile) == (0, 224)


@pytest.mark.parametrize(("level_tile", "tile"), [(128, 64), (127, 64), (96, 64), (145, 64), (64, 64), (5, 3)])
def test_area_average_equals_its_definition(level_tile: int, tile: int) -> None:
    """Every target pixel is the mean of the level pixels under it, weighted by area: the
    same as splitting each level pixel into tile x tile equal parts and averaging blocks of
    level_tile x level_tile parts (computed here in float64), rounded to nearest."""
    rng = np.random.default_rng(level_tile)
    pixels = rng.integers(0, 256, (2 * level_tile, 3 * level_tile, 3), dtype=np.uint8)
    # the split is separable: along y, then along x (one axis at a time keeps it to ~200 MB;
    # both at once was 12 GB for 145 -> 64)
    rows = np.repeat(pixels.astype(np.float64), tile, axis=0).reshape(2 * tile, level_tile, 3 * level_tile, 3).mean(axis=1)
    expected = np.repeat(rows, tile, axis=1).reshape(2 * tile, 3 * tile, level_tile, 3).mean(axis=2)
    out = resample_tiles(pixels, level_tile, tile)
    assert out.shape == (2 * tile, 3 * tile, 3) and out.dtype == np.uint8
    # float32 weights: within rounding of the exact mean (|error| <= 0.5 + 1e-3 grey levels)
    assert np.abs(out - expected).max() <= 0.5 + 1e-3
    np.testing.assert_allclose(area_weights(level_tile, tile).sum(axis=1), 1.0, rtol=1e-6)
    constant = np.full((level_tile, level_tile, 3), 77, dtype=np.uint8)
    assert (resample_tiles(constant, level_tile, tile) == 77).all()


def test_same_tissue_at_40x_and_20x_gives_the_same_grid_and_mask(scans: dict[str, Path]) -> None:
    """The issue's test: one tissue at 0.25 and 0.5 µm/px, masked at a 0.5 (and 0.75) µm
    target: the same tile grid, masks agreeing on >= 99% of tiles; coordinates stay level-0
    pixels of each file (2x apart), and the attrs say what was read."""
    for target in (0.5, 0.75):
        for threshold in (20.0, "auto"):
            masks = {
                name: wsi_xr.tissue_mask(wsi_xr.open_slide(scans[name]), target_mpp=target, threshold=threshold).compute()
                for name in ("40x", "40x-flat", "20x")
            }
            reference = masks["20x"].tile_mask.values
            for name, mask in masks.items():
                assert mask.tile_mask.shape == reference.shape, (name, target)
                agreement = float((mask.tile_mask.values == reference).mean())
                assert agreement >= 0.99, f"{name} at {target} µm/px, threshold {threshold}: {agreement:.4f}"
                assert mask.attrs["target_mpp"] == target
            assert reference.sum() > 0.1 * reference.size  # there is tissue to agree on
    flat, twenty = masks["40x-flat"], masks["20x"]
    assert (flat.attrs["read_level"], flat.attrs["scale_factor"], flat.attrs["resampling"]) == (0, 3.0, "area")
    assert (twenty.attrs["read_level"], twenty.attrs["scale_factor"]) == (0, 1.5)
    np.testing.assert_array_equal(flat.tile_y.values, 2 * twenty.tile_y.values)  # level-0 pixels of each file
    np.testing.assert_array_equal(flat.tile_x.values, 192 * np.arange(flat.sizes["tile_x"]))


def test_resampling_decodes_every_tiff_tile_once(scans: dict[str, Path]) -> None:
    image = wsi_xr.open_slide(scans["40x-flat"])
    mask = wsi_xr.tissue_mask(image, target_mpp=0.5, threshold=20.0, coarse="none")
    with dask.config.set(scheduler="threads"), trace_reads() as calls:
        mask.compute()
    tiles = [(y // 256 + i, x // 256 + j) for level, y, x, h, w in calls for i in range(-(-h // 256)) for j in range(-(-w // 256)) if level == 0]
    assert len(tiles) == len(set(tiles)) == 12 * 16, "every TIFF tile decoded exactly once"


def test_pipeline_at_a_target_resolution(scans: dict[str, Path], weights: Path, tmp_path: Path) -> None:
    """process_slide(target_mpp=): the mask equals tissue_mask's at the target, the latents are
    the encoder's on the area-averaged tiles (from an independent tifffile read), the store
    records the scale, resumes, and refuses another target without overwrite."""
    store = tmp_path / "s.zarr"
    ds = wsi_xr.process_slide(scans["40x-flat"], store, weights=weights, target_mpp=0.5).compute()
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(scans["40x-flat"]), target_mpp=0.5, threshold=ds.attrs["threshold"]).compute()
    np.testing.assert_array_equal(ds.tile_mask.values, mask.tile_mask.values)
    assert ds.attrs["complete"] and ds.attrs["target_mpp"] == 0.5 and ds.attrs["scale_factor"] == 2.0 and ds.attrs["read_level"] == 0
    run = ds.attrs["wsi_xr_run"]
    assert (json.loads(run) if isinstance(run, str) else run)["target_mpp"] == 0.5  # the fingerprint: a store at another target is not resumed
    pixels = tifffile.imread(scans["40x-flat"], level=0)
    rows, cols = np.nonzero(ds.tile_mask.values)
    assert len(rows) > 50
    tiles = np.stack([resample_tiles(pixels[y : y + 128, x : x + 128], 128, 64) for y, x in zip(ds.tile_y.values[rows], ds.tile_x.values[cols])])
    assert_mu_is_float32_exact(ds.latent.values[rows, cols], tiles, load_vae(weights), "latents at 0.5 µm/px")
    again = wsi_xr.process_slide(scans["40x-flat"], store, weights=weights, target_mpp=0.5)
    assert again.attrs["complete"]
    with pytest.raises(wsi_xr.StoreError, match="overwrite"):
        wsi_xr.process_slide(scans["40x-flat"], store, weights=weights, target_mpp=1.0)
    with pytest.raises(InvalidArgumentError, match="level=1 and target_mpp=0.5"):
        wsi_xr.process_slide(scans["40x-flat"], tmp_path / "t.zarr", weights=weights, target_mpp=0.5, level=1)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsi_xr.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_says_once_when_a_slide_has_no_mpp_and_takes_mpp_and_magnification(scans: dict[str, Path], tmp_path: Path) -> None:
    result = _cli("run", str(scans["no-mpp"]), "a.zarr", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("no mpp in no-mpp.tif") == 1
    assert xr.open_zarr(tmp_path / "a.zarr").attrs["mpp_source"] == "missing"
    result = _cli("run", str(scans["no-mpp"]), "b.zarr", "--quiet", "--target-mpp", "1", cwd=tmp_path)
    assert result.returncode == 2 and "no-mpp.tif: the file states no mpp" in result.stderr and "--mpp" in result.stderr
    assert not (tmp_path / "b.zarr").exists()  # checked before any work
    result = _cli("run", str(scans["no-mpp"]), "b.zarr", "--quiet", "--mpp", "0.25", "--magnification", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no mpp" not in result.stdout + result.stderr
    stored = xr.open_zarr(tmp_path / "b.zarr")
    assert (stored.attrs["mpp"], stored.attrs["mpp_source"], stored.attrs["target_mpp"]) == (0.25, "user", 0.5)
    assert (stored.attrs["read_level"], stored.attrs["scale_factor"]) == (1, 1.0)  # the pyramid's 0.5 µm/px level, as it is
    assert stored.sizes["tile_y"] == 768 // 128 and stored.sizes["tile_x"] == 1024 // 128
    result = _cli("mask", str(scans["20x"]), "m.zarr", "--quiet", "--target-mpp", "0.5", "--magnification", "20", cwd=tmp_path)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
