"""Slide formats beyond plain TIFF: OME-TIFF (SubIFD pyramids), OpenSlide formats (NDPI,
DICOM WSI), the OpenSlide backend's exactness on every level, ``auto`` choices and their
reasons, damaged data per format, and clear errors.

Every file here is generated from a synthetic slide (nothing is downloaded); the real
Aperio file from ``WSI_XR_TESTDATA`` is used where present. Pixel checks compare two
independent readers on random windows including the right/bottom edges of every level.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import tifffile

import wsi_xr
from wsi_xr.readers import decide_backend, handle_cache, level_damage, probe, read_window, reader_key
from wsi_xr.readers.openslide_backend import PIECE, OpenSlideReader, exact_location, plan_axis

openslide = pytest.importorskip("openslide")


# ----------------------------------------------------------------------------- test files


def _levels_of(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [level.asarray()[..., :3] for level in tf.series[0].levels]


def write_ome_tiff(levels: list[np.ndarray], path: Path, mpp: float = 0.5) -> None:
    """An OME-TIFF with JPEG 256-px tiles and its pyramid in SubIFDs of the first page."""
    options = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            levels[0],
            subifds=len(levels) - 1,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **options,
        )
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **options)


def write_noise_tiff(path: Path) -> None:
    """Uncompressed tiled TIFF of random pixels whose level 1 has a non-integer downsample.

    Level 0 is 4501 x 651 (so level-0 windows wider than OpenSlide's 4096-px pieces exist),
    level 1 is 2250 x 325: OpenSlide's downsample for it is 2.0018..., so most level-1
    pixels cannot be placed exactly from their own level-0 location. Random pixels make
    any resampling visible.
    """
    rng = np.random.default_rng(42)
    level0 = rng.integers(0, 256, (651, 4501, 3), dtype=np.uint8)
    level1 = rng.integers(0, 256, (325, 2250, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, tile=(256, 256), photometric="rgb", compression=None, metadata=None)
        tw.write(level1, tile=(256, 256), photometric="rgb", compression=None, subfiletype=1, metadata=None)


def _jpeg_restart_tiles(pixels: np.ndarray) -> tuple[bytes, list[int]]:
    """A 4:4:4 JPEG with a restart marker every 16 MCUs (128 x 8 px), and where each interval starts."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, subsampling=0, restart_marker_blocks=16)
    jpeg = buf.getvalue()
    i = 2
    while True:  # skip the header segments up to and including start-of-scan
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == 0xDA:
            break
    starts, j = [i], i
    while (j := jpeg.find(b"\xff", j)) >= 0 and j + 1 < len(jpeg):
        if 0xD0 <= jpeg[j + 1] <= 0xD7:
            starts.append(j + 2)
        j += 2
    return jpeg, starts


def write_ndpi(levels: list[np.ndarray], path: Path, mpp: float = 0.5) -> None:
    """A minimal Hamamatsu NDPI: one JPEG strip per level with restart-marker tiles.

    NDPI is a TIFF with 64-bit offset extensions: each IFD's 12-byte entries are followed
    by an 8-byte next-IFD offset and the high 32 bits of every entry (all zero here).
    Tags: Make, the NDPI format flag (65420), source lens (65421), focal plane (65424) and
    the restart intervals' offsets (McuStarts, 65426). The JPEG colour is YCbCr and the
    TIFF says so (photometric 6).
    """
    out = bytearray(b"II*\x00" + bytes(8))
    link = 4
    kinds = {2: "s", 3: "H", 4: "I", 5: "I", 9: "i", 11: "f"}
    for index, pixels in enumerate(levels):
        h, w = pixels.shape[:2]
        jpeg, starts = _jpeg_restart_tiles(np.ascontiguousarray(pixels))
        strip = len(out)
        out += jpeg
        per_cm = int(round(1e4 / (mpp * 2**index)))
        tags = {
            256: (4, [w]), 257: (4, [h]), 258: (3, [8, 8, 8]), 259: (3, [7]), 262: (3, [6]), 271: (2, b"Hamamatsu\x00"),
            273: (4, [strip]), 277: (3, [3]), 278: (4, [h]), 279: (4, [len(jpeg)]), 282: (5, [per_cm, 1]),
            283: (5, [per_cm, 1]), 296: (3, [3]), 65420: (4, [1]), 65421: (11, [20.0 / 2**index]),
            65424: (9, [0]), 65426: (4, starts),
        }  # fmt: skip
        entries = []
        for code in sorted(tags):
            kind, values = tags[code]
            raw = values if kind == 2 else struct.pack(f"<{len(values)}{kinds[kind]}", *values)
            count = len(raw) if kind == 2 else len(values) // 2 if kind == 5 else len(values)
            if len(raw) <= 4:
                field = raw.ljust(4, b"\0")
            else:
                out += b"\0" * (len(out) % 2)
                field = struct.pack("<I", len(out))
                out += raw
            entries.append(struct.pack("<HHI", code, kind, count) + field)
        out += b"\0" * (len(out) % 2)
        out[link : link + 8] = struct.pack("<Q", len(out))
        out += struct.pack("<H", len(entries)) + b"".join(entries)
        link = len(out)
        out += bytes(8) + bytes(4 * len(entries))
    path.write_bytes(bytes(out))


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048 x 1536 synthetic slide (JPEG 256-px tiles, generic pyramidal TIFF)."""
    from wsi_xr.datasets.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("formats") / "synth-2048x1536.tif"
    write_synthetic_slide(path, 2048, 1536, seed=21)
    return path


@pytest.fixture(scope="module")
def ome(synth_small: Path) -> Path:
    path = synth_small.with_name("slide.ome.tif")
    write_ome_tiff(_levels_of(synth_small), path)
    return path


@pytest.fixture(scope="module")
def noise(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("formats") / "noise.tif"
    write_noise_tiff(path)
    return path


@pytest.fixture(scope="module")
def ndpi(synth_small: Path) -> Path:
    levels = [lv for lv in _levels_of(synth_small) if lv.shape[1] % 128 == 0 and lv.shape[0] % 8 == 0]
    path = synth_small.with_name("slide.ndpi")
    write_ndpi(levels, path)
    return path


@pytest.fixture(scope="module")
def dicom(synth_small: Path) -> Path:
    """A DICOM WSI series (one file per level) written by wsidicomizer from the synthetic slide."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason="wsidicomizer (test extra) writes the DICOM test slide")
    folder = synth_small.parent / "dicom"
    folder.mkdir(exist_ok=True)
    wsidicomizer.WsiDicomizer.convert(
        synth_small, folder, tile_size=256, include_label=False, include_overview=False, include_thumbnail=False, workers=1
    )
    return folder


def _windows(rng: np.random.Generator, height: int, width: int, n: int) -> list[tuple[int, int, int, int]]:
    """Random windows plus the whole level and its bottom-right corner."""
    windows = [(0, 0, height, width), (height - min(height, 37), width - min(width, 53), min(height, 37), min(width, 53))]
    for _ in range(n):
        h, w = int(rng.integers(1, min(height, 600) + 1)), int(rng.integers(1, min(width, 600) + 1))
        windows.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return windows


def _assert_openslide_matches(path: Path, truth_of_level, n: int = 10, seed: int = 0) -> None:
    """OpenSlide windows (through read_window) equal ``truth_of_level(i)`` on every level."""
    info = probe(path)
    key = reader_key(info, "openslide")
    rng = np.random.default_rng(seed)
    for lv in info.levels:
        truth = truth_of_level(lv.index)
        assert truth.shape[:2] == (lv.height, lv.width)
        for y, x, h, w in _windows(rng, lv.height, lv.width, n):
            got = read_window(key, lv.index, y, x, h, w)
            np.testing.assert_array_equal(got, truth[y : y + h, x : x + w], err_msg=f"level {lv.index} window {(y, x, h, w)}")


# ----------------------------------------------------------------------------- placement


def test_plan_axis_places_every_piece_exactly() -> None:
    rng = np.random.default_rng(3)
    for downsample in (1.0, 2.0, 4.0, 15.954183526954706, 2.0006668890371357, 8.001, 32.01):
        for _ in range(40):
            start, size = int(rng.integers(0, 20000)), int(rng.integers(1, 9000))
            plan = plan_axis(start, size, downsample)
            cursor = start
            for location, first, count in plan:
                assert abs(location / downsample - first) < 1 / 1024  # cairo snaps this to a whole pixel
                assert first <= cursor < first + count and count <= PIECE
                cursor = first + count
            assert cursor == start + size
    assert exact_location(7, 2.0) == 14 and exact_location(10, 2.0006668890371357) is None
    # a downsample this close to an integer has no exact location within MAX_LOOKBACK of some pixels
    with pytest.raises(ValueError, match="no level-0 location"):
        plan_axis(2538, 100, 4.000345)


# ----------------------------------------------------------------------------- OME-TIFF


def test_ome_subifd_pyramid_auto_avoids_cucim_and_reads_every_level(ome: Path) -> None:
    info = probe(ome)
    assert info.format == "ome-tiff" and info.vendor == "ome" and info.mpp == pytest.approx(0.5)
    assert len(info.levels) >= 3 and [lv.tile_width for lv in info.levels] == [256] * len(info.levels)
    assert "SubIFD" in (info.problem("cucim") or "")
    assert "level" in (info.problem("openslide") or "")  # OpenSlide sees only level 0
    choice = decide_backend(info)
    assert choice.name == "tifffile" and "cucim avoided" in choice.reason and "SubIFD" in choice.reason
    with pytest.raises(wsi_xr.InvalidArgumentError, match="SubIFD"):
        decide_backend(info, "cucim")
    with tifffile.TiffFile(ome) as tf:
        for lv in info.levels[1:]:
            image = wsi_xr.open_slide(ome, level=lv.index, chunks=512)
            assert image.attrs["backend"] == "tifffile"
            truth = tf.series[0].levels[lv.index].asarray()  # whole-page decode, not the windowed path
            np.testing.assert_array_equal(image.values, truth)
            assert int(image.x[1]) == round(lv.downsample_x)


def test_ome_damaged_tile_in_a_subifd_level_is_flagged(ome: Path, tmp_path: Path) -> None:
    bad = tmp_path / "damaged.ome.tif"
    shutil.copy(ome, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.series[0].levels[1].keyframe
        offset, count = page.dataoffsets[2], page.databytecounts[2]  # level 1, tile row 0, column 2
        page0 = tf.series[0].levels[0].keyframe
        offset0 = page0.dataoffsets[1]  # level 0, tile row 0, column 1
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
        fh.seek(offset0)
        fh.write(b"\x00" * 64)
    info = probe(bad)
    grid = level_damage(info, 1)
    assert grid.damaged[0, 2] and grid.damaged.sum() == 1
    with pytest.raises(wsi_xr.SlideReadError, match="damaged.ome.tif.*damaged tile"):
        wsi_xr.open_slide(bad, level=1).compute()
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(bad, damaged="fill", chunks=1024), coarse="none").compute()
    errors = mask.read_error.values
    assert errors[:4, 4:8].all() and errors.sum() == 16  # the 256-px TIFF tile = 4 x 4 tiles of 64 px


# ----------------------------------------------------------------------------- OpenSlide exactness


def test_openslide_equals_tifffile_on_every_level_of_a_generic_tiff(synth_small: Path) -> None:
    info = probe(synth_small)
    assert info.problem("openslide") is None and decide_backend(info).name == "cucim"
    levels = _levels_of(synth_small)
    _assert_openslide_matches(synth_small, lambda i: levels[i], n=8)


def test_openslide_exact_at_non_integer_downsample_and_wide_windows(noise: Path) -> None:
    info = probe(noise)
    slide = openslide.OpenSlide(str(noise))
    downsample = slide.level_downsamples[1]
    assert downsample != int(downsample)
    levels = _levels_of(noise)
    _assert_openslide_matches(noise, lambda i: levels[i], n=12, seed=5)
    key = reader_key(info, "openslide")
    np.testing.assert_array_equal(read_window(key, 0, 0, 0, 651, 4501), levels[0])  # two OpenSlide pieces wide
    # the test can fail: OpenSlide placed naively (location = round(x * downsample)) resamples
    x = next(x for x in range(1, 2000) if abs(round(x * downsample) / downsample - x) > 0.2)
    naive = np.asarray(slide.read_region((round(x * downsample), 0), 1, (64, 8)))[..., :3]
    assert not np.array_equal(naive, levels[1][:8, x : x + 64])


def test_openslide_reads_the_real_aperio_file_like_tifffile(cmu: Path) -> None:
    levels = _levels_of(cmu)
    _assert_openslide_matches(cmu, lambda i: levels[i], n=6)
    assert decide_backend(probe(cmu)).name == "cucim"


def test_openslide_opaque_pixels_unchanged_transparent_over_background() -> None:
    reader = OpenSlideReader.__new__(OpenSlideReader)  # the compositing step alone
    reader._background = np.array([255, 255, 255], dtype=np.uint16)
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    out = reader._rgb(rgba)
    assert out.dtype == np.uint8 and out.tolist() == [[[10, 20, 30], [255, 255, 255], [227, 177, 127]]]


# ----------------------------------------------------------------------------- NDPI


def test_ndpi_read_by_openslide_exact_against_tifffile_and_jpeg_scaling(ndpi: Path) -> None:
    from PIL import Image

    info = probe(ndpi)
    assert info.format == "ndpi" and info.vendor == "hamamatsu" and info.mpp == pytest.approx(0.5)
    assert (info.levels[0].tile_width, info.levels[0].tile_height) == (128, 8)
    choice = decide_backend(info)
    assert choice.name == "openslide" and "NDPI" in choice.reason
    stored = _levels_of(ndpi)  # tifffile decodes the restart-interval tiles (photometric YCbCr)
    smallest = stored[-1]

    def truth(i: int) -> np.ndarray:
        lv = info.levels[i]
        for pixels in stored:
            if pixels.shape[:2] == (lv.height, lv.width):
                return pixels
        # OpenSlide adds levels decoded at 1/2, 1/4, 1/8 JPEG scale from the smallest stored one
        with tifffile.TiffFile(ndpi) as tf:
            page = tf.pages[len(stored) - 1]
            tf.filehandle.seek(page.tags["StripOffsets"].value[0])
            jpeg = tf.filehandle.read(page.tags["StripByteCounts"].value[0])
        image = Image.open(io.BytesIO(jpeg))
        image.draft("RGB", (lv.width, lv.height))
        assert image.size == (lv.width, lv.height), f"level {i} is not a JPEG scale of {smallest.shape}"
        return np.asarray(image.convert("RGB"))

    _assert_openslide_matches(ndpi, truth, n=6)
    assert len(info.levels) > len(stored)
    assert level_damage(info, 0).damaged.shape == (1536 // 8, 2048 // 128) and not level_damage(info, 0).damaged.any()


def test_ndpi_damage_raises_slide_read_error_and_reopens(ndpi: Path, tmp_path: Path) -> None:
    bad = tmp_path / "damaged.ndpi"
    shutil.copy(ndpi, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        start = page.tags["StripOffsets"].value[0]
        mcu = page.tags[65426].value
    with open(bad, "r+b") as fh:  # entropy data of one restart interval: the structure stays valid
        fh.seek(start + mcu[100] + 10)
        fh.write(b"\xff\xd9" * 20)
    info = probe(bad)
    key = reader_key(info, "openslide")
    row, col = divmod(100, 2048 // 128)
    with pytest.raises(wsi_xr.SlideReadError, match="damaged.ndpi.*OpenSlide failed"):
        read_window(key, 0, row * 8, col * 128, 8, 128)
    assert not handle_cache.evict(key)  # the latched handle is already gone from the cache
    good = read_window(key, 0, 600, 0, 64, 64)  # a fresh handle reads intact data
    np.testing.assert_array_equal(good, _levels_of(ndpi)[0][600:664, :64])
    with pytest.raises(wsi_xr.SlideReadError, match="damaged.ndpi"):
        wsi_xr.open_slide(bad, chunks=512).compute()


# ----------------------------------------------------------------------------- DICOM


def test_dicom_folder_or_file_read_by_openslide_exact_against_wsidicom(dicom: Path) -> None:
    from wsidicom import WsiDicom

    info = probe(dicom)
    assert Path(info.path).parent == dicom.resolve() and probe(info.path).levels == info.levels
    assert info.format == "dicom" and info.vendor == "dicom" and info.mpp == pytest.approx(0.5)
    assert info.levels[0].tile_width == 256 and info.levels[0].compression_name == "unknown"
    assert "not a TIFF" in (info.problem("cucim") or "") and "not a TIFF" in (info.problem("tifffile") or "")
    choice = decide_backend(info)
    assert choice.name == "openslide" and "OpenSlide reads this format" in choice.reason
    with pytest.raises(wsi_xr.InvalidArgumentError, match="not a TIFF"):
        decide_backend(info, "tifffile")
    with WsiDicom.open(dicom) as wsi:  # an independent DICOM reader (pydicom + Pillow)

        def truth(i: int) -> np.ndarray:
            lv = info.levels[i]
            return np.asarray(wsi.read_region((0, 0), i, (lv.width, lv.height)).convert("RGB"))

        _assert_openslide_matches(dicom, truth, n=6)
    image = wsi_xr.open_slide(dicom, level=1)
    assert image.attrs["backend"] == "openslide" and image.shape == (info.levels[1].height, info.levels[1].width, 3)
    assert not level_damage(info, 0).damaged.any() and level_damage(info, 0).damaged.shape == (6, 8)


def test_dicom_damaged_frame_raises_slide_read_error(dicom: Path, tmp_path: Path) -> None:
    import pydicom

    bad = tmp_path / "dicom-bad"
    shutil.copytree(dicom, bad)
    level0 = max(bad.iterdir(), key=lambda p: p.stat().st_size)
    ds = pydicom.dcmread(level0)
    frames = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
    first = next(iter(frames))
    data = level0.read_bytes()
    at = data.index(first[:64])  # the first frame's bytes in the file
    data = data[: at + 400] + b"\xff\xd9" * 50 + data[at + 500 :]
    level0.write_bytes(data)
    with pytest.raises(wsi_xr.SlideReadError, match="dicom-bad.*OpenSlide failed"):
        wsi_xr.open_slide(bad, chunks=512).compute()


# ----------------------------------------------------------------------------- errors and info


def test_unreadable_inputs_give_clear_errors(tmp_path: Path, ndpi: Path) -> None:
    text = tmp_path / "notes.mrxs"
    text.write_text("[GENERAL]\nSLIDE_ID=1\n")
    with pytest.raises(wsi_xr.SlideOpenError, match="notes.mrxs.*OpenSlide does not recognise"):
        probe(text)
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(wsi_xr.SlideOpenError, match="empty-folder.*DICOM"):
        wsi_xr.open_slide(empty)
    broken = tmp_path / "broken.ndpi"  # an NDPI whose level-0 JPEG lost its header
    data = bytearray(ndpi.read_bytes())
    with tifffile.TiffFile(ndpi) as tf:
        start = tf.pages[0].tags["StripOffsets"].value[0]
    data[start : start + 64] = bytes(64)
    broken.write_bytes(bytes(data))
    with pytest.raises(wsi_xr.SlideOpenError, match="broken.ndpi.*hamamatsu.*cannot open"):
        probe(broken)
    stripped = tmp_path / "stripped.tif"  # OpenSlide reads tiled TIFFs only
    tifffile.imwrite(stripped, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="stripped.tif.*OpenSlide cannot read.*tiled"):
        decide_backend(probe(stripped), "openslide")


def test_info_prints_format_and_backend_reason(ome: Path, ndpi: Path) -> None:
    from wsi_xr.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["info", str(ome)]) == 0
    text = out.getvalue()
    assert "format      ome-tiff" in text and "backend     tifffile (tifffile decodes this TIFF exactly; cucim avoided" in text
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["info", str(ndpi), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert report["format"] == "ndpi" and report["backend"] == "openslide"
    assert report["backend_reason"].startswith("OpenSlide reads this format")
    assert report["levels"][0]["tile_width"] == 128 and math.isclose(report["mpp"], 0.5)
