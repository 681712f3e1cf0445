"""Readers: the safe probe, backend choice, pixel agreement of cuCIM and tifffile, bad files."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile

import wsi_xr
from wsi_xr.readers import choose_backend, probe, read_window, reader_key
from wsi_xr.readers.integrity import jpeg_structure_problem, scan_level

from .conftest import DATA, data_file


def test_probe_aperio(cmu: Path) -> None:
    info = probe(cmu)
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (2220, 2967)
    assert info.mpp == pytest.approx(0.499)
    assert info.tile_size == (240, 240)
    assert info.levels[0].compression_name == "jpeg"
    assert info.cucim_safe and choose_backend(info) == "cucim"


def test_probe_stripped_and_tiny() -> None:
    kidney = probe(data_file("kidney-48-5.tif"))
    assert (kidney.width, kidney.height) == (1493, 901)
    assert not kidney.levels[0].tiled and kidney.tile_size == (0, 0)
    tiny = probe(data_file("tiny-16px.svs"))
    assert (tiny.width, tiny.height) == (16, 16)


def test_deflate_never_reaches_cucim() -> None:
    path = data_file("bad/deflate-tiled.tiff")
    info = probe(path)
    assert not info.cucim_safe and "deflate" in (info.cucim_unsafe_reason or "")
    assert choose_backend(info) == "tifffile"
    with pytest.raises(wsi_xr.InvalidArgumentError, match="deflate-tiled.tiff"):
        choose_backend(info, "cucim")
    assert len(info.levels) == 4


def _random_windows(rng: np.random.Generator, height: int, width: int, n: int) -> list[tuple[int, int, int, int]]:
    windows = [(height - 37, width - 53, 37, 53), (0, 0, min(height, 300), min(width, 300))]
    for _ in range(n):
        h, w = int(rng.integers(1, min(height, 700) + 1)), int(rng.integers(1, min(width, 700) + 1))
        windows.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return windows


@pytest.mark.parametrize("name", ["cmu", "synth_slide"])
def test_cucim_equals_tifffile_every_level(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name)
    info = probe(path)
    rng = np.random.default_rng(0)
    with tifffile.TiffFile(path) as tf:
        for level in info.levels:
            truth = tf.series[0].levels[level.index].asarray()  # a second, independent decode
            for y, x, h, w in _random_windows(rng, level.height, level.width, 12):
                a = read_window(reader_key(info, "cucim"), level.index, y, x, h, w)
                b = read_window(reader_key(info, "tifffile"), level.index, y, x, h, w)
                np.testing.assert_array_equal(a, truth[y : y + h, x : x + w, :3])
                np.testing.assert_array_equal(b, truth[y : y + h, x : x + w, :3])


@pytest.mark.parametrize("name", ["kidney-48-5.tif", "tiny-16px.svs"])
def test_small_real_files_open_correctly(name: str) -> None:
    path = data_file(name)
    image = wsi_xr.open_slide(path)
    truth = tifffile.imread(path)[..., :3]
    assert image.shape == truth.shape and image.dtype == np.uint8
    np.testing.assert_array_equal(image.values, truth)


def test_stripped_file_read_by_two_threads_at_once_is_exact() -> None:
    """cuCIM gave zeros for a stripped TIFF read from two threads at once (no error): the
    reader serialises such levels, so every threaded read equals tifffile's."""
    path = data_file("kidney-48-5.tif")
    truth = tifffile.imread(path)[..., :3]
    assert wsi_xr.open_slide(path).attrs["backend"] == "cucim"
    with dask.config.set(scheduler="threads", num_workers=4):
        for _ in range(8):  # the race showed in about half of the runs before
            np.testing.assert_array_equal(wsi_xr.open_slide(path, chunks=256).values, truth)


def test_jpeg_structure_check() -> None:
    frame = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    scan = b"\xff\xda\x00\x0c\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00"
    tables = b"\xff\xd8\xff\xdb\x00\x43\x00" + bytes(64) + b"\xff\xc4\x00\x13\x00" + bytes(16) + b"\xff\xc4\x00\x13\x10" + bytes(16) + b"\xff\xd9"
    assert jpeg_structure_problem(b"\xff\xd8" + frame + scan, b"\xff\xd9", tables) is None
    assert "start-of-image" in jpeg_structure_problem(b"\x00\x00", b"\xff\xd9")
    assert "end-of-image" in jpeg_structure_problem(b"\xff\xd8\xff\xda\x00\x02", b"\x00\x00")
    assert "bogus length" in jpeg_structure_problem(b"\xff\xd8\xff\xdb\x00\x0c" + bytes(12), b"\xff\xd9")


def test_damaged_tile_is_found_and_never_decoded() -> None:
    path = data_file("bad/corrupt-jpeg-tile.svs")
    grid = scan_level(str(path), 0)
    assert grid.damaged.tolist() == [[True]]
    image = wsi_xr.open_slide(path)
    with pytest.raises(wsi_xr.SlideReadError, match="corrupt-jpeg-tile.svs.*damaged"):
        image.values
    filled = wsi_xr.open_slide(path, damaged="fill").values
    assert filled.shape == (16, 16, 3) and not filled.any()
    # the sound copy of the same slide has no damaged tiles
    assert not scan_level(str(data_file("tiny-16px.svs")), 0).damaged.any()


def _jpeg_tiled_tiff(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 768x1024 JPEG TIFF of 256-px tiles whose tiles share one header; its offsets and counts."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffFile(path) as tf:
        return np.array(tf.pages[0].dataoffsets), np.array(tf.pages[0].databytecounts)


def test_scan_checks_every_header_that_differs_from_the_last_sound_one(tmp_path: Path) -> None:
    """The scan reuses the verdict of a header equal byte for byte to the last one; a tile
    whose header differs (bad sampling factors, a bad table id) is still parsed and flagged,
    and so is a tile with the same header but no end-of-image marker."""
    path = tmp_path / "tiles.tif"
    offsets, counts = _jpeg_tiled_tiff(path)
    data = bytearray(path.read_bytes())

    def sof_at(k: int) -> int:
        head = bytes(data[offsets[k] : offsets[k] + 4096])
        return offsets[k] + head.index(b"\xff\xc0")

    data[sof_at(5) + 11] = 0x33  # SOF0: first component 3x3 sampling, which TurboJPEG cannot decode
    data[sof_at(9) + 12] = 0x07  # SOF0: first component's quantisation table id 7
    data[offsets[10] + counts[10] - 1] = 0x00  # same header, EOI gone
    path.write_bytes(bytes(data))
    grid = scan_level(str(path), 0)
    flagged = {divmod(int(i), 4) for i in np.flatnonzero(grid.damaged)}
    assert flagged == {divmod(5, 4), divmod(9, 4), divmod(10, 4)}
    assert "sampling" in grid.reasons[divmod(5, 4)]
    assert "table" in grid.reasons[divmod(9, 4)]
    assert "end-of-image" in grid.reasons[divmod(10, 4)]
    # the first tile damaged too: every tile is still judged on its own
    data[sof_at(0) + 11] = 0x33
    path.write_bytes(bytes(data))
    again = scan_level(str(path), 0)
    assert {divmod(int(i), 4) for i in np.flatnonzero(again.damaged)} == flagged | {(0, 0)}


def test_scan_reads_the_same_bytes_by_pread_and_by_seek(tmp_path: Path) -> None:
    """The scan's reader gives the same bytes on a file on disk (pread) and on a file object."""
    from wsi_xr.readers.integrity import _reader

    path = tmp_path / "tiles.tif"
    offsets, counts = _jpeg_tiled_tiff(path, seed=1)
    raw = path.read_bytes()
    expected = [raw[o : o + c] for o, c in zip(offsets, counts)]
    with tifffile.TiffFile(path) as tf:
        read = _reader(tf.filehandle)
        via_pread = [read(int(o), int(c)) for o, c in zip(offsets, counts)]
    with tifffile.FileHandle(io.BytesIO(raw)) as in_memory:
        read = _reader(in_memory)
        via_seek = [read(int(o), int(c)) for o, c in zip(offsets, counts)]
    assert via_pread == via_seek == expected


def test_a_broken_header_does_not_condemn_the_sound_tiles_after_it(tmp_path: Path) -> None:
    """A scan header whose length field is 0 ends the header walk early; the sound tiles
    that follow (whose bytes start the same way) must still be found sound."""
    path = tmp_path / "tiles.tif"
    offsets, _ = _jpeg_tiled_tiff(path, seed=2)
    data = bytearray(path.read_bytes())
    for k in (3, 7):
        sos = offsets[k] + bytes(data[offsets[k] : offsets[k] + 4096]).index(b"\xff\xda")
        data[sos + 2 : sos + 4] = b"\x00\x00"
    path.write_bytes(bytes(data))
    grid = scan_level(str(path), 0)
    assert {divmod(int(i), 4) for i in np.flatnonzero(grid.damaged)} == {divmod(3, 4), divmod(7, 4)}


_OPEN_IN_SUBPROCESS = """
import json, sys
import numpy as np
import wsi_xr
path = sys.argv[1]
try:
    image = wsi_xr.open_slide(path)
    pixels = image.values
except wsi_xr.WsiXrError as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
else:
    np.save(sys.argv[2], pixels)
    print(json.dumps({"backend": image.attrs["backend"], "shape": list(pixels.shape)}))
"""


@pytest.mark.parametrize("name", ["broken.svs", "corrupt-jpeg-tile.svs", "deflate-tiled.tiff", "unknown-compression.tiff", "missing.svs"])
def test_bad_files_error_or_read_correctly_without_crash(name: str, tmp_path: Path) -> None:
    bad = DATA / "bad"
    if not bad.exists():
        pytest.skip(f"{bad} not found (set WSI_XR_TESTDATA)")
    path = bad / name
    out = tmp_path / "pixels.npy"
    run = subprocess.run([sys.executable, "-c", _OPEN_IN_SUBPROCESS, str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"subprocess died (signal or crash): rc={run.returncode}\n{run.stderr[-2000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if name == "deflate-tiled.tiff":
        assert result["backend"] == "tifffile"
        np.testing.assert_array_equal(np.load(out), tifffile.imread(path)[..., :3])
    else:
        assert "error" in result, f"{name} should not read: {result}"
        assert name in result["message"]


def test_read_window_rejects_out_of_bounds(cmu: Path) -> None:
    info = probe(cmu)
    with pytest.raises(wsi_xr.InvalidArgumentError, match="outside level 0"):
        read_window(reader_key(info, "cucim"), 0, 2900, 0, 100, 100)


def test_third_party_warnings_become_wsi_xr_log_records(tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """tifffile's warnings about a damaged (unneeded) tag, raised inside wsi_xr, are wsi_xr
    INFO records (shown with -v), not stray lines on the terminal; outside wsi_xr,
    tifffile logs as before."""
    import logging
    import struct

    import tifffile

    path = tmp_path / "odd-tag.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="jpeg", photometric="rgb", software="s" * 60)
    with tifffile.TiffFile(path) as tf:
        entry = tf.pages[0].tags["Software"].offset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, entry + 8, len(data) + 1000)  # the Software text now lies past the end
    path.write_bytes(data)
    with caplog.at_level(logging.INFO, logger="wsi_xr"):
        info = probe(path)
        np.asarray(wsi_xr.open_slide(path).values)
    assert info.width == 512
    assert "invalid value offset" not in capfd.readouterr().err
    assert any(r.name == "wsi_xr.thirdparty" and "invalid value offset" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        tifffile.TiffFile(path).pages[0].tags  # the user's own tifffile call: unchanged
    assert any(r.name == "tifffile" for r in caplog.records)
