"""Synthetic slides: determinism, TIFF layout, cuCIM agreement, ground truth, memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_xr.datasets.ink import InkStroke, ink_mask_region, ink_od_region
from wsi_xr.datasets.synth import (
    SynthSpec,
    ink_strokes,
    ink_tile_fraction,
    ink_truth,
    render_region,
    tile_tissue_fraction,
    tile_truth,
    tissue_truth,
    write_synthetic_slide,
)
from wsi_xr.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def box_downsample(image: np.ndarray) -> np.ndarray:
    """Rounded 2 x 2 mean, an odd last row/column averaged with itself (edge repeat)."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint32)
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def tile_variances(band: np.ndarray, tile: int = 64) -> np.ndarray:
    """Population variance over all pixels and channels of each full ``tile`` square."""
    ny, nx = band.shape[0] // tile, band.shape[1] // tile
    cut = band[: ny * tile, : nx * tile].astype(np.int64).reshape(ny, tile, nx, tile * 3)
    n = tile * tile * 3
    mean = cut.sum(axis=(1, 3)) / n
    return (cut * cut).sum(axis=(1, 3)) / n - mean * mean


def best_threshold_accuracy(values: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy of the best rule ``values > t`` against ``truth``, over all thresholds t."""
    order = np.argsort(values.ravel(), kind="stable")
    labels = truth.ravel()[order]
    n = labels.size
    # Threshold after the k smallest values: those k are called background.
    background_below = np.concatenate([[0], np.cumsum(~labels)])
    tissue_above = labels.sum() - np.concatenate([[0], np.cumsum(labels)])
    return float((background_below + tissue_above).max() / n)


def mpp_of(page: tifffile.TiffPage) -> float | None:
    unit = page.tags["ResolutionUnit"].value
    num, den = page.tags["XResolution"].value
    per_unit = num / den
    if unit == tifffile.RESUNIT.CENTIMETER:
        return 1e4 / per_unit
    if unit == tifffile.RESUNIT.INCH:
        return 25400.0 / per_unit
    return None


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec]:
    """A 1000 x 700 JPEG slide: partial edge tiles, three levels (1000 -> 500 -> 250)."""
    path = tmp_path_factory.mktemp("synth") / "small.tif"
    spec = write_synthetic_slide(path, 1000, 700, seed=3, tissue_fraction=0.4)
    return path, spec


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSpec, int]:
    """A 16384 x 16384 slide written in a fresh interpreter that reports its peak RSS growth."""
    path = tmp_path_factory.mktemp("synth") / "large.tif"
    code = (
        "import resource, sys\n"
        "from wsi_xr.datasets.synth import write_synthetic_slide\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "write_synthetic_slide(sys.argv[1], 16384, 16384, seed=11, tissue_fraction=0.3)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth_kib = int(done.stdout.split()[-1])  # Linux reports ru_maxrss in KiB
    return path, SynthSpec(16384, 16384, seed=11, tissue_fraction=0.3), growth_kib


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    def digest(name: str, seed: int) -> str:
        path = tmp_path / name
        write_synthetic_slide(path, 700, 600, seed=seed)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    first, again, other = digest("a.tif", 5), digest("b.tif", 5), digest("c.tif", 6)
    assert first == again
    assert first != other


def test_render_region_is_seamless_and_deterministic() -> None:
    spec = SynthSpec(900, 800, seed=2, tissue_fraction=0.6)
    whole = render_region(spec, 0, 0, 900, 800)
    assert whole.dtype == np.uint8 and whole.shape == (800, 900, 3)
    # Any window (crossing the 256-px block grid) is the same pixels as the crop.
    np.testing.assert_array_equal(render_region(spec, 200, 130, 333, 401), whole[130:531, 200:533])
    np.testing.assert_array_equal(render_region(spec, 899, 799, 1, 1), whole[799:, 899:])
    assert not np.array_equal(render_region(SynthSpec(900, 800, seed=3), 0, 0, 900, 800), whole)


# ----------------------------------------------------------------------------- file layout


def test_pyramid_structure(small: tuple[Path, SynthSpec]) -> None:
    path, spec = small
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert [p.shape for p in pages] == [(700, 1000, 3), (350, 500, 3), (175, 250, 3)]
        assert spec.n_levels == 3 and [spec.level_shape(i) for i in range(3)] == [p.shape[:2] for p in pages]
        for level, page in enumerate(pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR  # tifffile's JPEG: YCbCr, subsampled
            assert "SubIFDs" not in page.tags  # levels are top-level pages, not SubIFDs
            assert page.subfiletype == (0 if level == 0 else 1)
            assert mpp_of(page) == pytest.approx(0.5 * 2**level)
        assert pages[0].description == "wsi_xr synthetic slide seed=3 tissue_fraction=0.4"
        assert "Aperio" not in pages[0].description


def test_options_levels_tiles_compression_mpp(tmp_path: Path) -> None:
    path = tmp_path / "deflate.tif"
    spec = write_synthetic_slide(path, 600, 300, seed=1, tile_size=128, compression="deflate", mpp=None)
    with tifffile.TiffFile(path) as tif:
        # Halved (rounding up) until a level fits in one 128-px tile.
        assert [p.shape[:2] for p in tif.pages] == [(300, 600), (150, 300), (75, 150), (38, 75)]
        page = tif.pages[0]
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert (page.tilelength, page.tilewidth) == (128, 128)
        assert mpp_of(page) is None
        # Lossless: the file holds exactly the rendered pixels, and each level is the
        # exact box average of the one above.
        level0 = page.asarray()
        np.testing.assert_array_equal(level0, render_region(spec, 0, 0, 600, 300))
        np.testing.assert_array_equal(tif.pages[1].asarray(), box_downsample(level0))
        for level in (2, 3):
            above = tif.pages[level - 1].asarray()
            np.testing.assert_array_equal(tif.pages[level].asarray(), box_downsample(above))

    one = tmp_path / "one.tif"
    write_synthetic_slide(one, 777, 515, levels=1, compression="none", tile_size=80, mpp=0.25)
    with tifffile.TiffFile(one) as tif:
        assert len(tif.pages) == 1
        assert tif.pages[0].compression == tifffile.COMPRESSION.NONE
        assert mpp_of(tif.pages[0]) == pytest.approx(0.25)
        np.testing.assert_array_equal(tif.pages[0].asarray(), render_region(SynthSpec(777, 515), 0, 0, 777, 515))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    bad = [
        {"width": 0},
        {"seed": -1},
        {"tissue_fraction": 1.5},
        {"tile_size": 100},
        {"compression": "lzw"},
        {"jpeg_quality": 0},
        {"mpp": -0.5},
        {"levels": 0},
        {"levels": 40},
        {"pen_strokes": -1},
        {"pen_strokes": 65},
        {"pen_strokes": 2.5},
        {"pen_strokes": True},
    ]
    for change in bad:
        args = {"width": 64, "height": 64} | change
        with pytest.raises(InvalidArgumentError):
            write_synthetic_slide(tmp_path / "x.tif", **args)
    spec = SynthSpec(100, 100)
    with pytest.raises(InvalidArgumentError):
        render_region(spec, 90, 0, 20, 10)
    with pytest.raises(InvalidArgumentError):
        tissue_truth(spec, level=5)


# ----------------------------------------------------------------------------- pixels


def test_cucim_reads_every_level_like_tifffile(small: tuple[Path, SynthSpec]) -> None:
    cucim = pytest.importorskip("cucim")
    path, spec = small
    slide = cucim.CuImage(str(path))
    assert slide.resolutions["level_count"] == spec.n_levels
    with tifffile.TiffFile(path) as tif:
        for level, page in enumerate(tif.pages):
            expected = page.asarray()
            h, w = expected.shape[:2]
            assert slide.resolutions["level_dimensions"][level] == (w, h)
            scale = 2**level  # 1000 x 700 halves exactly, so level-0 locations are exact
            assert slide.resolutions["level_downsamples"][level] == pytest.approx(scale)
            whole = np.asarray(slide.read_region((0, 0), (w, h), level=level))
            np.testing.assert_array_equal(whole[:, :, :3], expected)
            # A region hanging over the bottom-right corner: cuCIM pads beyond the edge.
            x, y = w - 70, h - 45
            part = np.asarray(slide.read_region((x * scale, y * scale), (128, 96), level=level))
            np.testing.assert_array_equal(part[:45, :70, :3], expected[y:, x:])


def test_level1_is_box_downsample_of_level0(small: tuple[Path, SynthSpec]) -> None:
    path, spec = small
    level0 = tifffile.imread(path, key=0)
    level1 = tifffile.imread(path, key=1)
    diff = np.abs(level1.astype(np.int16) - box_downsample(level0).astype(np.int16))
    assert diff.mean() < 3.0
    # And level 0 is the rendered image up to JPEG error.
    rendered = render_region(spec, 0, 0, spec.width, spec.height)
    assert np.abs(level0.astype(np.int16) - rendered.astype(np.int16)).mean() < 4.0


def test_looks_like_h_and_e(small: tuple[Path, SynthSpec]) -> None:
    path, spec = small
    image = tifffile.imread(path, key=0).astype(np.float32)
    mask = tissue_truth(spec)
    glass, tissue = image[~mask], image[mask]
    assert np.all(np.abs(glass.mean(axis=0) - 240) < 8)  # near-white, neutral glass
    r, g, b = tissue.mean(axis=0)
    assert g < r - 30 and g < b - 20  # eosin: pink/magenta
    # Dark purple nuclei: a few percent of tissue pixels are dark with blue > red.
    dark = tissue[tissue.mean(axis=1) < 140]
    assert 0.01 < dark.shape[0] / tissue.shape[0] < 0.3
    assert np.mean(dark[:, 2] > dark[:, 0]) > 0.9


# ----------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_tissue_fraction_close_to_request(fraction: float) -> None:
    spec = SynthSpec(2048, 2048, seed=4, tissue_fraction=fraction)
    mask = tissue_truth(spec)
    assert mask.shape == (2048, 2048) and mask.dtype == bool
    assert abs(mask.mean() - fraction) < 0.08
    # Irregular, not a rectangle: tissue fills well under its bounding box.
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert box.mean() < 0.9


def test_degenerate_fractions(tmp_path: Path) -> None:
    for fraction, tissue in ((0.0, False), (1.0, True)):
        spec = write_synthetic_slide(tmp_path / f"f{fraction}.tif", 640, 512, tissue_fraction=fraction, levels=1)
        assert np.all(tissue_truth(spec) == tissue)
        assert tile_truth(spec).shape == (8, 10) and np.all(tile_truth(spec) == tissue)
        variance = tile_variances(tifffile.imread(tmp_path / f"f{fraction}.tif"))
        if tissue:
            assert variance.min() > 150
        else:
            assert variance.max() < 40


def test_tile_truth_is_majority_of_pixel_truth(small: tuple[Path, SynthSpec]) -> None:
    _, spec = small
    mask = tissue_truth(spec)
    for tile in (64, 100):
        ny, nx = 700 // tile, 1000 // tile  # full tiles only
        fraction = mask[: ny * tile, : nx * tile].reshape(ny, tile, nx, tile).mean(axis=(1, 3))
        truth = tile_truth(spec, tile)
        assert truth.shape == (ny, nx) and truth.dtype == bool
        np.testing.assert_array_equal(truth, fraction >= 0.5)
        np.testing.assert_allclose(tile_tissue_fraction(spec, tile), fraction, atol=1e-6)
    assert tile_truth(spec).any() and not tile_truth(spec).all()
    fraction = tile_tissue_fraction(spec)
    for least in (0.05, 1.0):
        np.testing.assert_array_equal(tile_truth(spec, min_fraction=least), fraction >= least)
    with pytest.raises(InvalidArgumentError):
        tile_truth(spec, min_fraction=0.0)


def test_lower_level_truth(small: tuple[Path, SynthSpec]) -> None:
    _, spec = small
    level0 = tissue_truth(spec)
    level1 = tissue_truth(spec, level=1)
    assert level1.shape == (350, 500)
    expected = level0.reshape(350, 2, 500, 2).mean(axis=(1, 3)) >= 0.5
    np.testing.assert_array_equal(level1, expected)
    assert tissue_truth(spec, level=2).shape == (175, 250)


# ----------------------------------------------------------------------------- scale


def test_variance_separates_tissue_from_background(large: tuple[Path, SynthSpec, int]) -> None:
    """Per-64-px-tile variance of the written file separates ``tile_truth`` (>= 99%)."""
    zarr = pytest.importorskip("zarr")
    path, spec, _ = large
    store = tifffile.imread(path, key=0, aszarr=True)
    try:
        level0 = zarr.open(store, mode="r")
        variance = np.concatenate([tile_variances(level0[y : y + 256]) for y in range(0, spec.height, 256)])
    finally:
        store.close()
    fraction = tile_tissue_fraction(spec)
    truth = tile_truth(spec)
    assert variance.shape == truth.shape == (256, 256)
    background, tissue = variance[fraction == 0], variance[fraction == 1]
    assert background.size > 1000 and tissue.size > 1000
    assert background.max() < 40  # glass: noise, gradient, dust, JPEG
    assert tissue.min() > 150  # even pale eosin
    assert variance[truth].min() > 5 * background.max()  # every majority-tissue tile is clearly not glass
    assert best_threshold_accuracy(variance, truth) >= 0.99


def test_memory_stays_bounded(large: tuple[Path, SynthSpec, int]) -> None:
    """Writing 16384 x 16384 (805 MB of RGB) never holds more than a small part of it."""
    path, spec, growth_kib = large
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].shape == (16384, 16384, 3)
        assert len(tif.pages) == spec.n_levels == 7
    assert growth_kib / 1024 < 300, f"peak RSS grew by {growth_kib / 1024:.0f} MB"


# ----------------------------------------------------------------------------- pen marks


def test_pen_strokes_off_changes_nothing(tmp_path: Path) -> None:
    spec = SynthSpec(700, 600, seed=5)
    assert spec.pen_strokes == 0 and spec == SynthSpec(700, 600, seed=5, pen_strokes=0)
    write_synthetic_slide(tmp_path / "default.tif", 700, 600, seed=5)
    write_synthetic_slide(tmp_path / "off.tif", 700, 600, seed=5, pen_strokes=0)
    write_synthetic_slide(tmp_path / "on.tif", 700, 600, seed=5, pen_strokes=3)
    default = (tmp_path / "default.tif").read_bytes()
    assert (tmp_path / "off.tif").read_bytes() == default
    assert (tmp_path / "on.tif").read_bytes() != default
    assert ink_strokes(spec) == () and not ink_truth(spec).any() and not ink_tile_fraction(spec).any()
    with tifffile.TiffFile(tmp_path / "on.tif") as tif:
        assert tif.pages[0].description == "wsi_xr synthetic slide seed=5 tissue_fraction=0.3 pen_strokes=3"


def test_pen_strokes_darken_only_where_ink_is() -> None:
    spec = SynthSpec(1024, 768, seed=2, tissue_fraction=0.4, pen_strokes=8)
    plain = SynthSpec(1024, 768, seed=2, tissue_fraction=0.4)
    inked, clean = render_region(spec, 0, 0, 1024, 768), render_region(plain, 0, 0, 1024, 768)
    np.testing.assert_array_equal(render_region(spec, 300, 200, 400, 300), inked[200:500, 300:700])  # seamless
    truth = ink_truth(spec)
    assert 0.03 < truth.mean() < 0.6
    # Ink only absorbs: no pixel gets brighter, and pixels the ink cannot reach are unchanged.
    assert (inked <= clean).all()
    changed = (inked != clean).any(axis=2)
    assert changed[truth].mean() > 0.99
    untouched = ink_od_region(ink_strokes(spec), 0, 0, 1024, 768).max(axis=0) == 0
    assert untouched.mean() > 0.4 and not changed[untouched].any()
    assert not (truth & untouched).any()
    # A pixel inside a stroke is clearly darker (the ink is not faint).
    loss = clean.astype(np.int16).sum(axis=2) - inked.astype(np.int16).sum(axis=2)
    assert np.median(loss[truth]) > 100
    # Deterministic from the seed; another seed draws other strokes.
    again = SynthSpec(1024, 768, seed=2, tissue_fraction=0.4, pen_strokes=8)
    np.testing.assert_array_equal(ink_truth(again), truth)
    assert not np.array_equal(ink_truth(SynthSpec(1024, 768, seed=3, tissue_fraction=0.4, pen_strokes=8)), truth)


def test_ink_truth_colours_kinds_and_tiles() -> None:
    spec = SynthSpec(2048, 1536, seed=1, tissue_fraction=0.35, pen_strokes=6)
    strokes = ink_strokes(spec)
    assert len(strokes) == 6
    assert {s.colour for s in strokes} == {"blue", "green", "red", "black"}
    assert {s.kind for s in strokes} == {"glass", "tissue", "crossing"}
    tissue = tissue_truth(spec)
    for stroke in strokes:
        alone = ink_truth_of(spec, stroke)
        on_tissue = tissue[alone].mean()
        expected = {"glass": (0.0, 0.05), "tissue": (0.95, 1.0), "crossing": (0.1, 0.9)}[stroke.kind]
        assert expected[0] <= on_tissue <= expected[1], (stroke.colour, stroke.kind, on_tissue)
    # Tile fractions are the tile means of the pixel truth, per ink and together.
    truth = ink_truth(spec)
    fraction = ink_tile_fraction(spec, 64)
    assert fraction.shape == (24, 32) and fraction.dtype == np.float32
    np.testing.assert_allclose(fraction, truth.reshape(24, 64, 32, 64).mean(axis=(1, 3)), atol=1e-7)
    per_colour = [ink_tile_fraction(spec, 64, colour=c) for c in ("blue", "green", "red", "black")]
    assert all(p.any() for p in per_colour)
    assert (sum(per_colour) >= fraction - 1e-6).all() and all((p <= fraction + 1e-6).all() for p in per_colour)
    assert ink_truth(spec, level=1).shape == spec.level_shape(1)
    with pytest.raises(InvalidArgumentError, match="colour='purple'"):
        ink_tile_fraction(spec, colour="purple")
    with pytest.raises(InvalidArgumentError):
        ink_tile_fraction(spec, tile=0)


def ink_truth_of(spec: SynthSpec, stroke: InkStroke) -> np.ndarray:
    """Pixel truth of one stroke alone."""
    return ink_mask_region((stroke,), 0, 0, spec.width, spec.height)


def test_pen_colours_choose_the_inks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pen_colours`` picks the inks (held-out ones included); each renders as its absorbance says."""
    from wsi_xr.cli import main
    from wsi_xr.datasets.ink import INK_OD

    spec = SynthSpec(2048, 1536, seed=1, tissue_fraction=0.35, pen_strokes=10, pen_colours=["cyan", "orange"])  # type: ignore[arg-type]
    assert spec.pen_colours == ("cyan", "orange")  # a list is kept as a tuple: the spec stays hashable
    strokes = ink_strokes(spec)
    assert {s.colour for s in strokes} == {"cyan", "orange"}
    assert all(3.0 <= s.edge <= 14.0 for s in strokes)  # out-of-focus borders, per stroke
    pixels = render_region(spec, 0, 0, 2048, 1536).astype(np.float64)
    tissue = tissue_truth(spec)
    for colour in ("cyan", "orange"):
        only = ink_truth(spec, colour=colour) & ~tissue & ~ink_truth(spec, colour="orange" if colour == "cyan" else "cyan")
        assert only.sum() > 1000
        od = np.log(241.0 / np.median(pixels[only], axis=0))  # through glass lit at ~241
        # the channel order of the ink's absorbance is the rendered one
        np.testing.assert_array_equal(np.argsort(od), np.argsort(INK_OD[colour]))
    for bad in (("purple",), (), "cyan"):
        with pytest.raises(InvalidArgumentError, match="pen colours"):
            SynthSpec(64, 64, pen_strokes=1, pen_colours=bad)  # type: ignore[arg-type]
    out = tmp_path / "cli.tif"
    argv = ["synth", str(out), "--width", "512", "--height", "512", "--pen-strokes", "2", "--pen-colours", "navy, pink"]
    assert main([*argv, "--jpeg-quality", "70", "--quiet"]) == 0
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].description.endswith("pen_strokes=2 pen_colours=navy,pink")
    capsys.readouterr()
