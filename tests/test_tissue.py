"""Tissue mask: exact agreement with the notebook's two-stage loop, one decode per pixel,
coarse skip recall, automatic threshold accuracy, read errors, degenerate slides, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import xarray as xr
from cucim import CuImage

import wsi_xr
from wsi_xr.datasets.synth import SynthSpec, tile_truth, write_synthetic_slide
from wsi_xr.readers import read_stats, reset_read_stats
from wsi_xr.tissue import auto_threshold, block_statistics, tissue_mask


def notebook_mask(path: Path, threshold: float, tile: int = 64, patch: int = 256) -> np.ndarray:
    """The reference two-stage loop, with direct cuCIM reads (no wsi_xr code).

    Every patch is read and kept when var > t; every tile of a kept patch is read again
    and kept when its own var > t. Only full tiles count; a patch cut by the slide edge
    is read over its full tiles.
    """
    image = CuImage(str(path))
    width, height = image.resolutions["level_dimensions"][0]
    nty, ntx = height // tile, width // tile
    mask = np.zeros((nty, ntx), dtype=bool)
    for py in range(0, nty * tile, patch):
        for px in range(0, ntx * tile, patch):
            h, w = min(patch, nty * tile - py), min(patch, ntx * tile - px)
            region = np.asarray(image.read_region((px, py), (w, h)))[..., :3]
            if np.var(region.astype(np.float64)) <= threshold:
                continue
            for ty in range(py, py + h, tile):
                for tx in range(px, px + w, tile):
                    tile_pixels = np.asarray(image.read_region((tx, ty), (tile, tile)))[..., :3]
                    mask[ty // tile, tx // tile] = np.var(tile_pixels.astype(np.float64)) > threshold
    return mask


def test_kernel_matches_numpy_var() -> None:
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    block[:256, :256] = 200  # a flat patch: variance exactly 0
    tile_var, patch_var = block_statistics(block, 64, 256)
    assert tile_var.shape == (10, 14)
    expected = np.array([[np.var(block[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64].astype(np.float64)) for j in range(14)] for i in range(10)])
    np.testing.assert_allclose(tile_var, expected, rtol=1e-12)
    assert tile_var[0, 0] == 0.0 and patch_var[0, 0] == 0.0
    # patch (1, 2) covers pixels 256:512 x 512:768; the edge patch (2, 3) only its full tiles
    assert patch_var[4, 8] == pytest.approx(np.var(block[256:512, 512:768].astype(np.float64)), rel=1e-12)
    assert patch_var[9, 13] == pytest.approx(np.var(block[512:640, 768:896].astype(np.float64)), rel=1e-12)


def test_kernel_is_namespace_generic() -> None:
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(2)
    block = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    excluded = np.zeros((8, 12), dtype=bool)
    excluded[1, 2] = True
    numpy_result = block_statistics(block, 64, 256, excluded)
    strict_result = block_statistics(xps.asarray(block), 64, 256, xps.asarray(excluded))
    assert type(strict_result[0]).__module__.startswith("array_api_strict")
    for a, b in zip(numpy_result, strict_result):
        np.testing.assert_array_equal(a, np.from_dlpack(b))
    # the excluded tile leaves both its own statistic and its patch's
    assert np.isnan(numpy_result[0][1, 2])
    keep = np.ones((256, 256), dtype=bool)
    keep[64:128, 128:192] = False
    patch_pixels = block[:256, :256][keep]
    assert numpy_result[1][0, 0] == pytest.approx(np.var(patch_pixels.astype(np.float64)), rel=1e-12)
    # a partly read block: moments per run of read patches (narrow runs in one step)
    from wsi_xr.tissue.mask import masked_statistics

    read_patches = np.array([[True, False, True], [False, True, True]])
    numpy_part = masked_statistics(block, excluded, read_patches, tile=64, patch=256)
    strict_part = masked_statistics(xps.asarray(block), excluded, read_patches, tile=64, patch=256)
    read_tiles = np.repeat(np.repeat(read_patches, 4, axis=0), 4, axis=1)
    for a, b, full in zip(numpy_part, strict_part, numpy_result):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a[read_tiles], full[read_tiles])
        assert np.isnan(a[~read_tiles]).all()


@pytest.mark.parametrize("threshold", [50.0, 200.0, 1000.0])
def test_equals_notebook_on_cmu(cmu: Path, threshold: float) -> None:
    expected = notebook_mask(cmu, threshold)
    assert 0 < expected.sum() < expected.size
    for chunks in (512, 1024, 3840):  # 512/1024 are not multiples of the 240-px TIFF tiles
        mask = tissue_mask(wsi_xr.open_slide(cmu, chunks=chunks), threshold=threshold, coarse="none").compute()
        np.testing.assert_array_equal(mask.tile_mask.values, expected)


@pytest.mark.parametrize("chunks", [256, 768, (512, 1024)])
def test_equals_notebook_on_synthetic(synth_slide: Path, chunks: object) -> None:
    for threshold in (30.0, 150.0):
        expected = notebook_mask(synth_slide, threshold)
        mask = tissue_mask(wsi_xr.open_slide(synth_slide, chunks=chunks), threshold=threshold, coarse="none")
        np.testing.assert_array_equal(mask.tile_mask.values, expected)


def test_dataset_layout_and_laziness(synth_slide: Path) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=1024)
    reset_read_stats()
    mask = image.wsi.tissue_mask(threshold=100.0, coarse="none")
    assert read_stats().calls == 0, "building the mask must not read level-0 pixels"
    assert mask.tile_mask.dims == ("tile_y", "tile_x") and mask.tile_mask.dtype == bool
    assert mask.tile_variance.dtype == np.float32
    assert mask.patch_mask.dims == ("patch_y", "patch_x")
    assert mask.sizes["tile_y"] == 2600 // 64 and mask.sizes["tile_x"] == 3000 // 64
    assert mask.sizes["patch_y"] == -(-(2600 // 64) // 4) and mask.sizes["patch_x"] == -(-(3000 // 64) // 4)
    assert mask.tile_x.values[2] == 128 and mask.patch_y.values[1] == 256
    # outputs: one Dask chunk per row of image chunks (whole rows: few tasks), reading per chunk
    assert mask.tile_mask.data.chunks == ((16, 16, 8), (46,)) and mask.tile_variance.data.chunks == ((16, 16, 8), (46,))
    assert mask.patch_mask.data.chunks == ((4, 4, 2), (12,))
    assert mask.attrs["tile"] == 64 and mask.attrs["patch"] == 256 and mask.attrs["threshold"] == 100.0
    # the tile grid aligns by label with the image's own tile view
    tiles = image.wsi.tiles(64)
    assert (tiles.tile_y.values == mask.tile_y.values).all()
    some = tiles.isel(tile_y=20, tile_x=30).values.astype(np.float64)
    assert float(mask.tile_variance.isel(tile_y=20, tile_x=30)) == pytest.approx(np.var(some), rel=1e-6)


def test_each_pixel_decoded_once(synth_slide: Path) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=512)
    mask = tissue_mask(image, threshold="auto", coarse="none")
    reset_read_stats()
    with dask.config.set(scheduler="threads"):
        mask.compute()
    stats = read_stats()
    assert stats.pixels_requested == 3000 * 2600
    assert stats.calls == image.data.npartitions
    assert stats.pixels_decoded == stats.pixels_requested  # 512-px chunks on 256-px tiles


def _recall(full: np.ndarray, skipped: np.ndarray) -> float:
    return float((full & skipped).sum() / max(full.sum(), 1))


def _segments_of(calls: list[tuple[int, int, int, int, int]], level: int, seg: int) -> list[tuple[int, int]]:
    """The TIFF tiles (row, column) each traced decoder call of ``level`` touched, with repeats."""
    out = []
    for lv, y, x, h, w in calls:
        if lv == level:
            out += [(i, j) for i in range(y // seg, -(-(y + h) // seg)) for j in range(x // seg, -(-(x + w) // seg))]
    return out


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3, 0.6])
def test_coarse_skip_decodes_only_tiles_that_may_hold_tissue(fraction: float, tmp_path: Path) -> None:
    """Read counters prove it: TIFF tiles outside the coarse decision are never decoded,
    every decoded tile is decoded once, every read tile's statistics equal the
    full-resolution mask's, and >= 99.5% of full-resolution tissue tiles are kept."""
    from wsi_xr.readers import trace_reads
    from wsi_xr.tissue.coarse import coarse_decision

    path = tmp_path / f"sparse-{fraction}.tif"
    write_synthetic_slide(path, 4096, 4096, seed=int(fraction * 100) + 11, tissue_fraction=fraction)
    image = wsi_xr.open_slide(path, chunks=1024)
    with dask.config.set(scheduler="threads"):
        full = tissue_mask(image, threshold=100.0, coarse="none").compute()
        with trace_reads() as calls:
            skipped = tissue_mask(image, threshold=100.0, coarse="auto").compute()
    opened = wsi_xr.readers.open_file(path)
    decision = coarse_decision(opened, 0, "auto", patch_shape=(16, 16), patch=256)
    decoded = _segments_of(calls, 0, 256)
    assert len(decoded) == len(set(decoded)), "a TIFF tile was decoded twice"
    wanted = {tuple(ij) for ij in np.argwhere(decision.segments)}
    assert set(decoded) == wanted, "decoded TIFF tiles differ from the coarse decision"
    assert skipped.attrs["file_tiles_decoded"] == len(wanted) < skipped.attrs["file_tiles_total"]
    assert all(lv == decision.coarse_level for lv, *_ in calls if lv != 0)  # the rest is the coarse pass
    read = np.isfinite(skipped.tile_variance.values)
    np.testing.assert_array_equal(skipped.tile_variance.values[read], full.tile_variance.values[read])
    np.testing.assert_array_equal(skipped.tile_mask.values[read], full.tile_mask.values[read])
    assert not (skipped.tile_mask.values & ~full.tile_mask.values).any()  # skipping never adds tissue
    assert _recall(full.tile_mask.values, skipped.tile_mask.values) >= 0.995
    truth = tile_truth(SynthSpec(4096, 4096, seed=int(fraction * 100) + 11, tissue_fraction=fraction), 64, min_fraction=0.05)
    assert _recall(truth & full.tile_mask.values, skipped.tile_mask.values) >= 0.995
    if fraction <= 0.1:
        assert len(wanted) < 0.5 * decision.segments.size, f"decoded {len(wanted)} of {decision.segments.size} TIFF tiles"


def test_coarse_pass_arithmetic_equals_its_plain_definitions() -> None:
    """The coarse pass's fast helpers against the plain NumPy they stand for: 3x3 sums and
    dilation with repeated edges (np.pad), the integral image (cumsum), the uint8 median
    (np.median), and the glass colour (median RGB of the brightest quarter)."""
    from wsi_xr.tissue import coarse

    rng = np.random.default_rng(7)
    for shape in [(1, 1), (1, 9), (7, 1), (2, 2), (33, 17), (64, 80)]:
        values = rng.integers(0, 766, shape).astype(np.float32)
        padded = np.pad(values.astype(np.int64), 1, mode="edge")
        box = sum(padded[dy : dy + shape[0], dx : dx + shape[1]] for dy in range(3) for dx in range(3))
        np.testing.assert_array_equal(coarse._box3(values), box)
        flags = rng.random(shape) < 0.1
        grown = np.pad(flags, 1)
        dilated = np.logical_or.reduce([grown[dy : dy + shape[0], dx : dx + shape[1]] for dy in range(3) for dx in range(3)])
        np.testing.assert_array_equal(coarse._dilate3(flags), dilated)
        integral = coarse._integral_image(flags)
        assert integral.shape == (shape[0] + 1, shape[1] + 1)
        np.testing.assert_array_equal(integral[1:, 1:], flags.astype(np.int64).cumsum(0).cumsum(1))
        assert not integral[0].any() and not integral[:, 0].any()
    for n in [1, 2, 3, 10, 1001]:
        values = rng.integers(0, 256, n, dtype=np.uint8)
        assert coarse._median_uint8(values) == np.median(values)
    for c in range(3):  # every uint8 value in one channel, the others at the glass colour
        thumbnail = np.full((256, 1, 3), 100, dtype=np.uint8)
        thumbnail[:, 0, c] = np.arange(256)
        for value in (241.0, 238.5, 3.5, 251.5, 263.5, 300.0, -8.5, -20.0):
            background = np.full(3, 100.0)
            background[c] = value
            far = np.abs(np.arange(256) - value) > coarse.COLOUR_MARGIN
            np.testing.assert_array_equal(coarse._off_glass(thumbnail, background)[:, 0], far, err_msg=f"channel {c}, glass {value}")
    for glass in ([241, 238, 244], [200, 200, 200]):
        pixels = np.clip(rng.normal(glass, 2.0, (300, 200, 3)), 0, 255).astype(np.uint8)
        pixels[:120] = rng.integers(60, 200, (120, 200, 3))  # tissue: darker than glass
        flat = pixels.reshape(-1, 3).astype(np.float64)
        bright = flat.mean(axis=1) >= np.quantile(flat.mean(axis=1), 0.75)
        np.testing.assert_array_equal(coarse._glass_colour(pixels), np.median(flat[bright], axis=0))


def test_coarse_level_read_in_blocks_gives_the_same_decision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large coarse level is read in blocks (bounded memory) with the same result as one read."""
    from wsi_xr.readers import trace_reads
    from wsi_xr.tissue import coarse

    path = tmp_path / "blocks.tif"
    write_synthetic_slide(path, 8192, 6144, seed=13, tissue_fraction=0.3)
    opened = wsi_xr.readers.open_file(path)
    one = coarse.coarse_decision(opened, 0, "auto", patch_shape=(24, 32), patch=256)
    monkeypatch.setattr(coarse, "ONE_CALL_PIXELS", 1000)
    monkeypatch.setattr(coarse, "BLOCK_SIDE", 100)
    with trace_reads() as calls:
        blocked = coarse.coarse_decision(opened, 0, "auto", patch_shape=(24, 32), patch=256)
    assert max(h * w for _, _, _, h, w in calls) <= 104 * 104  # a block and its halo, never the level
    np.testing.assert_array_equal(blocked.patches, one.patches)
    np.testing.assert_array_equal(blocked.segments, one.segments)


def _pyramid_copy(src: Path, dst: Path) -> None:
    """The real slide re-written as a 3-level pyramid (tifffile JPEG, 256-px tiles)."""
    level0 = tifffile.imread(src)
    with tifffile.TiffWriter(dst) as tw:
        image = level0
        for index in range(3):
            tw.write(image, tile=(256, 256), compression="jpeg", compressionargs={"level": 95}, photometric="rgb", subfiletype=1 if index else 0)
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


def test_coarse_skip_recall_on_real_slide(cmu: Path, tmp_path: Path) -> None:
    pyramid = tmp_path / "cmu-pyramid.tif"
    _pyramid_copy(cmu, pyramid)
    image = wsi_xr.open_slide(pyramid, chunks=256)
    full = tissue_mask(image, threshold="auto", coarse="none").compute()
    skipped = tissue_mask(image, threshold=float(full.threshold), coarse=2).compute()
    assert skipped.attrs["file_tiles_decoded"] < skipped.attrs["file_tiles_total"]
    assert _recall(full.tile_mask.values, skipped.tile_mask.values) >= 0.995


def test_auto_threshold_matches_ground_truth(tmp_path: Path) -> None:
    for seed, fraction in ((5, 0.3), (6, 0.6), (8, 0.1)):
        path = tmp_path / f"truth-{seed}.tif"
        spec = write_synthetic_slide(path, 4096, 4096, seed=seed, tissue_fraction=fraction)
        mask = tissue_mask(wsi_xr.open_slide(path), threshold="auto", coarse="none").compute()
        # A tile is tissue when >= 5% of it is tissue: a variance detector sees any tissue
        # edge in a tile (a 10%-tissue tile already has a variance of hundreds).
        truth = tile_truth(spec, 64, min_fraction=0.05)
        accuracy = float((mask.tile_mask.values == truth).mean())
        assert accuracy >= 0.98, f"seed {seed}: accuracy {accuracy:.3f} at threshold {float(mask.threshold):.1f}"


def test_auto_threshold_one_mode_falls_back() -> None:
    rng = np.random.default_rng(0)
    assert auto_threshold(rng.uniform(2, 12, 5000))[1] == "default"  # all background
    assert auto_threshold(10 ** rng.uniform(2.4, 3.6, 5000))[1] == "default"  # all tissue
    both = np.concatenate([rng.uniform(2, 12, 3000), 10 ** rng.uniform(2.5, 3.5, 2000)])
    value, method = auto_threshold(both)
    assert method == "otsu" and 12 < value < 316


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_degenerate_slides(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / f"flat-{fraction}.tif"
    spec = write_synthetic_slide(path, 1024, 1024, seed=2, tissue_fraction=fraction)
    mask = tissue_mask(wsi_xr.open_slide(path), threshold="auto").compute()
    truth = tile_truth(spec, 64, min_fraction=0.05)
    assert float((mask.tile_mask.values == truth).mean()) >= 0.98


def test_tiny_slide_has_no_tiles() -> None:
    from .conftest import data_file

    mask = tissue_mask(wsi_xr.open_slide(data_file("tiny-16px.svs"))).compute()
    assert mask.tile_mask.shape == (0, 0) and mask.patch_mask.shape == (0, 0)


def _damage_tile(path: Path, index: int) -> None:
    """Break the JPEG header of TIFF tile ``index`` of level 0, like bad/corrupt-jpeg-tile.svs."""
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[0].dataoffsets[index]
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xdb\x00\x0c")  # a quantisation-table segment with a bogus length


def test_damaged_tiles_are_read_errors_not_tissue(tmp_path: Path) -> None:
    path = tmp_path / "damaged.tif"
    write_synthetic_slide(path, 2048, 2048, seed=4, tissue_fraction=1.0)
    clean = tissue_mask(wsi_xr.open_slide(path), threshold=100.0, coarse="none").compute()
    _damage_tile(path, 9)  # TIFF tile row 1, column 1 -> 64-px tiles 4..7 x 4..7
    mask = tissue_mask(wsi_xr.open_slide(path), threshold=100.0, coarse="none").compute()
    expected = np.zeros_like(clean.tile_mask.values)
    expected[4:8, 4:8] = True
    np.testing.assert_array_equal(mask.read_error.values, expected)
    assert not mask.tile_mask.values[expected].any()
    assert np.isnan(mask.tile_variance.values[expected]).all()
    np.testing.assert_array_equal(mask.tile_mask.values[~expected], clean.tile_mask.values[~expected])
    with pytest.raises(wsi_xr.SlideReadError, match="damaged"):
        wsi_xr.open_slide(path)[256:512, 256:512].values


def test_invalid_mask_arguments(synth_slide: Path) -> None:
    image = wsi_xr.open_slide(synth_slide, chunks=512)
    for kwargs in ({"tile": 0}, {"patch": 100}, {"threshold": -1.0}, {"threshold": "otsu"}, {"coarse": "sometimes"}):
        with pytest.raises(wsi_xr.InvalidArgumentError):
            tissue_mask(image, **kwargs)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="multiples of patch"):
        tissue_mask(wsi_xr.open_slide(synth_slide, chunks=1000))


def test_cli_mask_and_plot(synth_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "mask.zarr"
    cli = [sys.executable, "-m", "wsi_xr.cli"]
    run = subprocess.run(cli + ["mask", str(synth_slide), str(out), "--chunk", "1024", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "tiles kept" in run.stdout and "threshold" in run.stdout
    stored = xr.open_zarr(out)
    assert stored.attrs["threshold"] > 0 and stored.tile_mask.dtype == bool
    direct = tissue_mask(wsi_xr.open_slide(synth_slide, chunks=1024), threshold=stored.attrs["threshold"]).compute()
    np.testing.assert_array_equal(stored.tile_mask.values, direct.tile_mask.values)
    again = subprocess.run(cli + ["mask", str(synth_slide), str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    png = tmp_path / "overlay.png"
    drawn = subprocess.run(cli + ["plot", str(out), "--out", str(png)], capture_output=True, text=True)
    assert drawn.returncode == 0, drawn.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("tile", "patch"), [(224, 896), (256, 2048), (2048, 4096)])
def test_large_tiles_and_patches_have_exact_variances(tile: int, patch: int) -> None:
    """Before 0.3.0 a tile's sum of squares was summed in uint32 (wrong above 147-px tiles) and
    count * sum of squares in int64 (wrong above ~1990-px patches): silently wrong variances.
    Saturated noise (values 0 and 255) is the worst case for both sums."""
    from wsi_xr.tissue.kernels import block_statistics

    rng = np.random.default_rng(tile)
    block = (rng.integers(0, 2, (patch, patch, 3)) * 255).astype(np.uint8)
    tile_var, patch_var = block_statistics(block, tile, patch)
    assert tile_var[0, 0] == pytest.approx(block[:tile, :tile].astype(np.float64).var(), rel=1e-12)
    assert tile_var[-1, -1] == pytest.approx(block[-tile:, -tile:].astype(np.float64).var(), rel=1e-12)
    assert patch_var[0, 0] == pytest.approx(block.astype(np.float64).var(), rel=1e-12)
