"""Batched tile decoding: the TIFF tile batch (CPU) and the nvImageCodec GPU reader.

CPU tests prove :mod:`wsi_xr.readers.tiff_tiles`: the streams it builds, decoded with
imagecodecs and pasted where it says, equal tifffile's own decode of the same window
pixel for pixel (JPEG with and without JPEGTables, RGB- and YCbCr-coded, JPEG 2000,
edge and cut windows), and damaged tiles never enter a batch. They also check that the
GPU backend refuses clearly where it cannot run and that the CPU path imports no GPU
package. GPU tests (``-m gpu``) compare :class:`NvImageCodecReader` windows with the CPU
decode; they skip without CuPy, nvImageCodec or a GPU.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import wsi_xr
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.readers import nvimgcodec_backend, probe
from wsi_xr.readers.integrity import scan_level
from wsi_xr.readers.tiff_tiles import (
    ADOBE_RGB_SEGMENT,
    TiffTiles,
    assemble_jpeg,
    decode_tile_cpu,
    jpeg_table_segments,
    place_tiles,
)

from .conftest import data_file

#: Largest per-pixel difference allowed between nvImageCodec's and libjpeg-turbo's
#: decode of the same JPEG tile, and the largest mean difference over a window.
#: Provisional until measured on a GPU (IDCT and chroma upsampling differ by a few levels).
JPEG_MAX_DIFF = 10
JPEG_MEAN_DIFF = 0.5


def tifffile_window(path: Path | str, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """tifffile's own decode of a window: the reference."""
    with tifffile.TiffFile(path) as tf:
        arr = zarr.open_array(tf.series[0].aszarr(level=level), mode="r")
        return np.ascontiguousarray(np.asarray(arr[y : y + h, x : x + w])[..., :3])


def windows_of(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The whole level, one window cutting tiles on all sides, the bottom-right corner."""
    out = [(0, 0, height, width), (height - 33, width - 45, 33, 45)]
    if height > tile + 20 and width > tile + 20:
        out.append((tile - 17, tile - 23, min(tile + 40, height - tile + 17), min(tile + 60, width - tile + 23)))
    return out


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic JPEG pyramid, 1000 x 700 (partial edge tiles on every level), YCbCr 4:2:0."""
    path = tmp_path_factory.mktemp("nvimg") / "synth-jpeg.tif"
    write_synthetic_slide(path, 1000, 700, seed=11, tissue_fraction=0.5)
    return path


@pytest.fixture(scope="module", params=["lossless", "lossy"])
def j2k_slide(request: pytest.FixtureRequest, jpeg_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic slide's level 0 as a JPEG 2000 tiled TIFF (compression 34712)."""
    pixels = tifffile_window(jpeg_slide, 0, 0, 0, 700, 1000)
    path = tmp_path_factory.mktemp("nvimg") / f"synth-j2k-{request.param}.tif"
    args = {} if request.param == "lossless" else {"level": 40}
    tifffile.imwrite(path, pixels, tile=(256, 256), compression="jpeg2000", compressionargs=args, photometric="rgb")
    return path


@pytest.fixture(scope="module")
def damaged_slide(jpeg_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[int, int]]:
    """A copy of the JPEG slide whose level-0 tile (1, 2) starts with garbage instead of SOI."""
    path = tmp_path_factory.mktemp("nvimg") / "damaged.tif"
    shutil.copyfile(jpeg_slide, path)
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        across = -(-int(page.imagewidth) // int(page.tilewidth))
        index = 1 * across + 2
        offset = int(page.dataoffsets[index])
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)
    return path, (1, 2)


# -- tile placement and stream assembly --------------------------------------------------


def test_layouts_say_codec_and_colour_space(jpeg_slide: Path, j2k_slide: Path, cmu: Path) -> None:
    with TiffTiles(jpeg_slide) as tiles:
        assert [(lv.codec, lv.colorspace, lv.seg_h) for lv in tiles.layouts] == [("jpeg", "ycbcr", 256)] * 3
        assert tiles.layouts[0].jpegtables is None
    with TiffTiles(j2k_slide) as tiles:
        assert (tiles.layouts[0].codec, tiles.layouts[0].compression) == ("jpeg2k", 34712)
    with TiffTiles(cmu) as tiles:  # Aperio: RGB-coded JPEG with JPEGTables, 240-px tiles
        lv = tiles.layouts[0]
        assert (lv.codec, lv.colorspace, lv.seg_h, lv.seg_w) == ("jpeg", "rgb", 240, 240)
        assert lv.jpegtables is not None and lv.reason is None


@pytest.mark.parametrize("window", [(0, 0, 700, 1000), (10, 20, 30, 40), (250, 250, 12, 12), (600, 900, 100, 100), (0, 255, 700, 2)])
def test_placements_tile_the_window_exactly(jpeg_slide: Path, window: tuple[int, int, int, int]) -> None:
    with TiffTiles(jpeg_slide) as tiles:
        layout = tiles.layouts[0]
        y, x, h, w = window
        covered = np.zeros((h, w), dtype=np.int32)
        for p in place_tiles(layout, *window):
            covered[p.dst] += 1
            assert p.src_y >= 0 and p.src_y + p.height <= layout.seg_h
            assert p.src_x >= 0 and p.src_x + p.width <= layout.seg_w
            assert (p.row * layout.seg_h + p.src_y, p.col * layout.seg_w + p.src_x) == (y + p.dst_y, x + p.dst_x)
            assert p.index == p.row * layout.grid_shape[1] + p.col
        assert (covered == 1).all()
        with pytest.raises(ValueError, match="outside level 0"):
            place_tiles(layout, 690, 0, 20, 10)


def _split_tables(stream: bytes) -> tuple[bytes, bytes]:
    """Split a complete JPEG into (JPEGTables, abbreviated tile), as a TIFF writer may."""
    i, tables, rest = 2, [], []
    while stream[i + 1] != 0xDA:
        end = i + 2 + int.from_bytes(stream[i + 2 : i + 4], "big")
        (tables if stream[i + 1] in (0xDB, 0xC4) else rest).append(stream[i:end])
        i = end
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest) + stream[i:]


def test_jpegtables_are_merged_into_a_standalone_stream() -> None:
    import imagecodecs

    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(150, 40, (64, 48, 3)), 0, 255).astype(np.uint8)
    full = imagecodecs.jpeg8_encode(image, level=85)
    tables, tile = _split_tables(full)
    assert b"\xff\xdb" not in tile[:200]  # the tile really is abbreviated
    merged = assemble_jpeg(tile, jpeg_table_segments(tables))
    assert merged[:2] == b"\xff\xd8" and merged.count(b"\xff\xd8") == 1 and merged[-2:] == b"\xff\xd9"
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(merged), imagecodecs.jpeg8_decode(full))
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(merged), imagecodecs.jpeg8_decode(tile, tables=tables))


def test_rgb_coded_stream_says_rgb_itself(cmu: Path) -> None:
    import imagecodecs

    with TiffTiles(cmu) as tiles:
        batch = tiles.batch(0, 0, 0, 240, 240)
    stream = batch.streams[0]
    assert stream.count(ADOBE_RGB_SEGMENT) == 1 and stream[2:4] == b"\xff\xee"
    told = decode_tile_cpu(stream, "jpeg", "rgb")  # colorspace passed, as tifffile does
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stream), told)  # the marker alone is enough
    unmarked = stream.replace(ADOBE_RGB_SEGMENT, b"", 1)
    assert np.abs(imagecodecs.jpeg8_decode(unmarked).astype(int) - told).mean() > 10  # libjpeg would guess YCbCr
    # a tile carrying its own APP14 keeps only ours
    own = b"\xff\xd8" + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01" + unmarked[2:]
    assert assemble_jpeg(own, b"", "rgb").count(b"Adobe") == 1


# -- batch decode on the CPU == tifffile ---------------------------------------------


def _assert_cpu_batch_equals_tifffile(path: Path, levels: list[int]) -> None:
    with TiffTiles(path) as tiles:
        for level in levels:
            layout = tiles.layouts[level]
            for window in windows_of(layout.height, layout.width, layout.seg_h):
                got, damaged = tiles.read_cpu(level, *window)
                assert not damaged
                np.testing.assert_array_equal(got, tifffile_window(path, level, *window), err_msg=f"level {level} {window}")


def test_cpu_batch_equals_tifffile_jpeg(jpeg_slide: Path) -> None:
    _assert_cpu_batch_equals_tifffile(jpeg_slide, [0, 1, 2])


def test_cpu_batch_equals_tifffile_jpeg2000(j2k_slide: Path) -> None:
    _assert_cpu_batch_equals_tifffile(j2k_slide, [0])


def test_cpu_batch_equals_tifffile_aperio(cmu: Path) -> None:
    _assert_cpu_batch_equals_tifffile(cmu, [0])


def test_unbatchable_levels_fall_back_to_tifffile(tmp_path: Path) -> None:
    deflate = data_file("bad/deflate-tiled.tiff")
    stripped = data_file("kidney-48-5.tif")
    for path, reason in ((deflate, "has no batch decoder"), (stripped, "stripped")):
        with TiffTiles(path) as tiles:
            layout = tiles.layouts[0]
            assert layout.codec is None and reason in (layout.reason or "")
            window = (3, 5, layout.height - 10, layout.width - 9)
            batch = tiles.batch(0, *window)
            assert not batch.streams and batch.fallback
            got, damaged = tiles.read_cpu(0, *window)
            assert not damaged
            np.testing.assert_array_equal(got, tifffile_window(path, 0, *window))


# -- damaged tiles ------------------------------------------------------------------------


def test_damaged_tiles_never_enter_the_batch(damaged_slide: tuple[Path, tuple[int, int]], jpeg_slide: Path) -> None:
    path, (row, col) = damaged_slide
    assert scan_level(str(path), 0).damaged[row, col]
    window = (200, 400, 400, 500)  # tiles rows 0-2, columns 1-3
    with TiffTiles(path) as tiles:
        batch = tiles.batch(0, *window)
        assert [(d.placement.row, d.placement.col) for d in batch.damaged] == [(row, col)]
        assert "start-of-image" in batch.damaged[0].reason
        assert (row, col) not in [(p.row, p.col) for p in batch.placements]
        assert len(batch.streams) == len(batch.placements) == 3 * 3 - 1
        got, damaged = tiles.read_cpu(0, *window)
    assert [(d.placement.row, d.placement.col) for d in damaged] == [(row, col)]
    expected = tifffile_window(jpeg_slide, 0, *window)  # the sound original
    hole = damaged[0].placement.dst
    assert not got[hole].any()
    expected[hole] = 0
    np.testing.assert_array_equal(got, expected)


def test_decode_grid_leaves_unwanted_tiles_out(jpeg_slide: Path) -> None:
    window = (100, 100, 500, 600)  # tile rows 0-2, columns 0-2
    wanted = np.array([[True, False, True], [False, True, False], [True, True, False]])
    with TiffTiles(jpeg_slide) as tiles:
        batch = tiles.batch(0, *window, decode=wanted)
        assert sorted((p.row, p.col) for p in batch.placements) == [tuple(c) for c in np.argwhere(wanted)]
        assert not batch.complete and len(batch.streams) == int(wanted.sum())
        got, _ = tiles.read_cpu(0, *window, decode=wanted)
    want = tifffile_window(jpeg_slide, 0, *window)
    for p in place_tiles(tiles.layouts[0], *window):
        if not wanted[p.row, p.col]:
            want[p.dst] = 0
    np.testing.assert_array_equal(got, want)


def test_file_problem_says_when_the_gpu_reader_is_pointless(jpeg_slide: Path, cmu: Path) -> None:
    assert nvimgcodec_backend.nvimgcodec_file_problem(probe(jpeg_slide)) is None
    assert nvimgcodec_backend.nvimgcodec_file_problem(probe(cmu)) is None
    for name in ("kidney-48-5.tif", "bad/deflate-tiled.tiff"):
        assert "no level is stored in JPEG" in (nvimgcodec_backend.nvimgcodec_file_problem(probe(data_file(name))) or "")


# -- the GPU backend on a machine that cannot run it -------------------------------------


def test_backend_refuses_clearly_when_unavailable(jpeg_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = probe(jpeg_slide)
    why = "CuPy cannot be imported (ModuleNotFoundError: No module named 'cupy'); pip install -e '.[gpu]'"
    monkeypatch.setattr(nvimgcodec_backend, "_availability", lambda: (False, why))
    assert nvimgcodec_backend.nvimgcodec_available() == (False, why)
    with pytest.raises(wsi_xr.InvalidArgumentError) as err:
        nvimgcodec_backend.NvImageCodecReader(info)
    message = str(err.value)
    assert str(jpeg_slide) in message and "nvimgcodec" in message and "pip install -e '.[gpu]'" in message
    assert isinstance(err.value, wsi_xr.WsiXrError)


def test_backend_refuses_on_this_machine_without_a_gpu(jpeg_slide: Path) -> None:
    ok, reason = nvimgcodec_backend.nvimgcodec_available()
    if ok:
        pytest.skip("a GPU with nvImageCodec is available here; the GPU tests cover this machine")
    assert reason  # says why: no CuPy, no GPU, no nvImageCodec or no nvJPEG
    with pytest.raises(wsi_xr.InvalidArgumentError, match=r"synth-jpeg\.tif.*'nvimgcodec' cannot run here"):
        nvimgcodec_backend.NvImageCodecReader(probe(jpeg_slide))


class _FakeNvImageCodec:
    """Stands in for ``nvidia.nvimgcodec`` on a CPU machine: decodes with imagecodecs.

    ``honours_adobe=False`` mimics a decoder that converts every 3-component JPEG from
    YCbCr (ignoring the Adobe RGB marker); ``fail`` lists positions in a batch of several
    streams it returns ``None`` for; ``drop`` returns a shorter list (as nvImageCodec
    versions did that dropped failed images).
    """

    class ColorSpec:
        SRGB, SYCC = "srgb", "sycc"

    class BackendKind:
        GPU_ONLY = HYBRID_CPU_GPU = HW_GPU_ONLY = "gpu"

    class SampleFormat:
        P_YCC = "p_ycc"

    def __init__(self, honours_adobe: bool = True, fail: tuple[int, ...] = (), drop: bool = False) -> None:
        self.honours_adobe, self.fail, self.drop = honours_adobe, fail, drop
        self.calls: list[int] = []
        fake = self

        class Decoder:
            def __init__(self, **kwargs: object) -> None:
                self.kwargs = kwargs

            def decode(self, streams: list[bytes], params: dict, cuda_stream: int = 0) -> list[object]:
                fake.calls.append(len(streams))
                failed = fake.fail if len(streams) > 1 else ()  # the one-tile agreement check gets its image
                out = [None if i in failed else fake._decode(s, params) for i, s in enumerate(streams)]
                return out[:-1] if fake.drop else out

        self.Decoder = Decoder
        self.CodeStream = bytes
        self.DecodeParams = lambda **kw: kw
        self.Backend = lambda kind: kind

    def _decode(self, stream: bytes, params: dict) -> np.ndarray:
        import imagecodecs

        if stream[:2] == b"\xff\x4f":
            return imagecodecs.jpeg2k_decode(stream)
        rgb = ADOBE_RGB_SEGMENT in stream
        if params["color_spec"] == "sycc":  # raw components, planar
            return np.ascontiguousarray(
                imagecodecs.jpeg8_decode(stream, colorspace="RGB" if rgb else None, outcolorspace="RGB" if rgb else "YCbCr").transpose(2, 0, 1)
            )
        if rgb and not self.honours_adobe:
            return imagecodecs.jpeg8_decode(stream, colorspace="YCbCr", outcolorspace="RGB")
        return imagecodecs.jpeg8_decode(stream)


class _Device:
    def __init__(self, device_id: int) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


#: NumPy dressed as the little of CuPy that the reader uses.
_FAKE_CUPY = type(
    "FakeCuPy",
    (),
    {
        "uint8": np.uint8,
        "zeros": staticmethod(np.zeros),
        "asarray": staticmethod(np.asarray),
        "asnumpy": staticmethod(np.asarray),
        "cuda": type("cuda", (), {"Device": _Device, "get_current_stream": staticmethod(lambda: type("s", (), {"ptr": 0})())}),
    },
)


def _fake_reader(path: Path, monkeypatch: pytest.MonkeyPatch, **fake: object) -> tuple[object, _FakeNvImageCodec]:
    nv = _FakeNvImageCodec(**fake)  # type: ignore[arg-type]
    monkeypatch.setattr(nvimgcodec_backend, "_availability", lambda: (True, ""))
    monkeypatch.setattr(nvimgcodec_backend, "_gpu_modules", lambda: (_FAKE_CUPY, nv))
    return nvimgcodec_backend.NvImageCodecReader(probe(path)), nv


def test_reader_logic_with_a_fake_decoder(jpeg_slide: Path, cmu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's batching, pasting, agreement check and fallbacks, without a GPU."""
    for path, levels in ((jpeg_slide, [0, 1, 2]), (cmu, [0])):
        reader, nv = _fake_reader(path, monkeypatch)
        reads = 0
        for level in levels:
            layout = reader._tiles.layouts[level]  # type: ignore[attr-defined]
            for window in windows_of(layout.height, layout.width, layout.seg_h):
                reads += 1
                got, damaged = reader.read_with_damage(level, *window)  # type: ignore[attr-defined]
                assert not damaged
                np.testing.assert_array_equal(got, tifffile_window(path, level, *window))
        assert reader.report[0]["mode"] == "srgb" and reader.report[0]["max_diff"] == 0  # type: ignore[attr-defined]
        assert reader.counters["cpu_tiles"] == 0 and reader.counters["gpu_tiles"] > 0  # type: ignore[attr-defined]
        assert len(nv.calls) == len(levels) + reads  # one agreement check per level, one call per window
        reader.close()  # type: ignore[attr-defined]


def test_reader_picks_planar_when_the_decoder_ignores_the_rgb_marker(cmu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader, _ = _fake_reader(cmu, monkeypatch, honours_adobe=False)
    got = reader.read(0, 100, 200, 500, 600)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, tifffile_window(cmu, 0, 100, 200, 500, 600))
    tried = reader.report[0]["tried"]  # type: ignore[attr-defined]
    assert tried["srgb"]["mean_diff"] > 10 and reader.report[0]["mode"] == "planar"  # type: ignore[attr-defined]


def test_reader_decodes_on_the_cpu_what_the_gpu_refuses(jpeg_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    window = (10, 20, 600, 900)
    reader, _ = _fake_reader(jpeg_slide, monkeypatch, fail=(0, 4))
    np.testing.assert_array_equal(reader.read(0, *window), tifffile_window(jpeg_slide, 0, *window))  # type: ignore[attr-defined]
    assert reader.counters["cpu_tiles"] == 2  # type: ignore[attr-defined]
    reader, _ = _fake_reader(jpeg_slide, monkeypatch, drop=True)  # no usable answer: the level goes to the CPU
    with pytest.warns(RuntimeWarning, match="does not agree"):
        got = reader.read(0, *window)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, tifffile_window(jpeg_slide, 0, *window))
    assert reader.counters["gpu_tiles"] == 0 and reader.counters["cpu_tiles"] == 12  # type: ignore[attr-defined]


def test_reader_leaves_damaged_tiles_zero_and_lists_them(
    damaged_slide: tuple[Path, tuple[int, int]], jpeg_slide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cell = damaged_slide
    reader, nv = _fake_reader(path, monkeypatch)
    reader.use_damage(0, scan_level(str(path), 0))  # type: ignore[attr-defined]  # a grid scanned by the caller
    window = (200, 400, 400, 500)
    got, damaged = reader.read_with_damage(0, *window)  # type: ignore[attr-defined]
    assert [(d.placement.row, d.placement.col) for d in damaged] == [cell]
    assert nv.calls[-1] == 8  # the damaged tile never reached the decoder
    want = tifffile_window(jpeg_slide, 0, *window)
    want[damaged[0].placement.dst] = 0
    np.testing.assert_array_equal(got, want)
    # with a decode grid: one batched call for the wanted tiles only
    wanted = np.ones((3, 3), dtype=bool)
    wanted[0, :] = False
    got, damaged = reader.read_with_damage(0, *window, decode=wanted)  # type: ignore[attr-defined]
    assert nv.calls[-1] == 5 and len(damaged) == 1
    want[: 256 - window[0]] = 0
    np.testing.assert_array_equal(got, want)


def test_reader_disables_a_level_that_disagrees(jpeg_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader, nv = _fake_reader(jpeg_slide, monkeypatch)
    nv._decode = lambda stream, params: np.zeros((256, 256, 3), np.uint8)  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="does not agree"):
        got = reader.read(0, 0, 0, 300, 300)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, tifffile_window(jpeg_slide, 0, 0, 0, 300, 300))
    assert reader.report[0]["mode"] is None and reader.counters["cpu_tiles"] == 4  # type: ignore[attr-defined]


def test_real_nvimgcodec_accepts_our_parameters_and_streams(cmu: Path, j2k_slide: Path) -> None:
    """Without a GPU, nvImageCodec still parses streams and builds decode parameters."""
    nv = pytest.importorskip("nvidia.nvimgcodec")
    reader = object.__new__(nvimgcodec_backend.NvImageCodecReader)
    reader._nv = nv  # type: ignore[attr-defined]
    for mode in ("srgb", "planar"):
        assert isinstance(reader._params(mode), nv.DecodeParams)  # type: ignore[attr-defined]
    for path, codec, side in ((cmu, "jpeg", 240), (j2k_slide, "jpeg2k", 256)):
        with TiffTiles(path) as tiles:
            streams = tiles.batch(0, 0, 0, 2 * side, 2 * side).streams
        parsed = [nv.CodeStream(s) for s in streams]
        assert [(c.codec_name, c.height, c.width) for c in parsed] == [(codec, side, side)] * 4


def test_cpu_path_imports_no_gpu_package() -> None:
    root = Path(__file__).resolve().parents[1] / "wsi_xr" / "readers"
    for name in ("tiff_tiles.py", "nvimgcodec_backend.py"):
        tree = ast.parse((root / name).read_text())
        for node in tree.body:  # module level only: imports inside functions are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("cupy", "nvidia") for n in names), f"{name} imports {names} at module level"
    code = (
        "import sys; import wsi_xr.readers.tiff_tiles, wsi_xr.readers.nvimgcodec_backend; "
        "print(any(m.startswith('nvidia.nvimgcodec') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- GPU: nvImageCodec windows vs the CPU decode -------------------------------------------


@pytest.fixture(scope="module")
def gpu() -> None:
    """Skip unless CuPy, nvImageCodec (with nvJPEG) and a CUDA GPU are all here."""
    pytest.importorskip("cupy")
    pytest.importorskip("nvidia.nvimgcodec")
    ok, reason = nvimgcodec_backend.nvimgcodec_available()
    if not ok:
        pytest.skip(f"nvImageCodec backend unavailable: {reason}")


def _compare_gpu_cpu(path: Path, levels: list[int], exact: bool) -> dict[str, float]:
    import cupy

    reader = nvimgcodec_backend.NvImageCodecReader(probe(path))
    worst = {"max": 0.0, "mean": 0.0}
    try:
        with TiffTiles(path) as tiles:
            for level in levels:
                layout = tiles.layouts[level]
                for window in windows_of(layout.height, layout.width, layout.seg_h):
                    got, damaged = reader.read_with_damage(level, *window)
                    assert isinstance(got, cupy.ndarray) and got.dtype == cupy.uint8 and got.shape == (window[2], window[3], 3)
                    assert not damaged
                    want, _ = tiles.read_cpu(level, *window)
                    diff = np.abs(cupy.asnumpy(got).astype(np.int16) - want)
                    if exact:
                        np.testing.assert_array_equal(cupy.asnumpy(got), want, err_msg=f"level {level} {window}")
                    worst = {"max": max(worst["max"], float(diff.max())), "mean": max(worst["mean"], float(diff.mean()))}
        print(f"{path.name}: GPU vs CPU max diff {worst['max']:.0f}, mean {worst['mean']:.3f}; report {reader.report}; {reader.counters}")
        assert reader.counters["gpu_tiles"] > 0 and reader.counters["cpu_tiles"] == 0
    finally:
        reader.close()
    return worst


@pytest.mark.gpu
def test_gpu_jpeg_windows_match_cpu(gpu: None, jpeg_slide: Path) -> None:
    worst = _compare_gpu_cpu(jpeg_slide, [0, 1, 2], exact=False)
    assert worst["max"] <= JPEG_MAX_DIFF and worst["mean"] <= JPEG_MEAN_DIFF


@pytest.mark.gpu
def test_gpu_jpeg2000_windows_equal_cpu(gpu: None, j2k_slide: Path) -> None:
    _compare_gpu_cpu(j2k_slide, [0], exact=True)


@pytest.mark.gpu
def test_gpu_aperio_rgb_jpeg_with_tables(gpu: None, cmu: Path) -> None:
    worst = _compare_gpu_cpu(cmu, [0], exact=False)
    assert worst["max"] <= JPEG_MAX_DIFF and worst["mean"] <= JPEG_MEAN_DIFF


@pytest.mark.gpu
def test_gpu_damaged_tile_flagged_not_decoded(gpu: None, damaged_slide: tuple[Path, tuple[int, int]], jpeg_slide: Path) -> None:
    import cupy

    path, cell = damaged_slide
    reader = nvimgcodec_backend.NvImageCodecReader(probe(path))
    try:
        window = (200, 400, 400, 500)
        got, damaged = reader.read_with_damage(0, *window)
        assert [(d.placement.row, d.placement.col) for d in damaged] == [cell]
        host = cupy.asnumpy(got)
        assert not host[damaged[0].placement.dst].any()
        want = tifffile_window(jpeg_slide, 0, *window)
        want[damaged[0].placement.dst] = 0
        assert np.abs(host.astype(np.int16) - want).max() <= JPEG_MAX_DIFF
        assert reader.counters["damaged_tiles"] == 1
    finally:
        reader.close()


@pytest.mark.gpu
def test_gpu_unbatchable_level_falls_back_exactly(gpu: None) -> None:
    import cupy

    path = data_file("bad/deflate-tiled.tiff")
    reader = nvimgcodec_backend.NvImageCodecReader(probe(path))
    try:
        got = reader.read(0, 3, 5, 200, 250)
        np.testing.assert_array_equal(cupy.asnumpy(got), tifffile_window(path, 0, 3, 5, 200, 250))
        assert reader.counters["gpu_tiles"] == 0 and reader.counters["fallback_tiles"] > 0
    finally:
        reader.close()


# -- benchmarks/bench_gpu.py: what runs without a GPU --------------------------------------


def test_bench_gpu_cpu_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import bench_gpu, common

    args = bench_gpu.build_parser().parse_args(["--size", "32768", "--size", "49152", "--backends", "auto,nvimgcodec"])
    assert args.size == [32768, 49152] and args.chunk == 2048 and args.precisions == "fp32,bf16"
    assert bench_gpu.windows(2000, 3000, 1024)[-1] == (1024, 2048, 976, 952) and len(bench_gpu.windows(2048, 2048, 1024)) == 4
    monkeypatch.setattr(common, "CACHE", tmp_path)
    assert common.synthetic_slide(512, bench_gpu.TISSUE_FRACTION).exists()
    write = bench_gpu.zarr_write(1024, 512, 1, 2)
    assert write["stage"] == "zarr write" and write["mp_per_s"] > 0
    mp = bench_gpu.megapixels(32768)
    stages = [
        bench_gpu.stage_row("cpu decode", "cuCIM", 1.0, mp),
        bench_gpu.stage_row("gpu decode", "nvImageCodec", 0.5, mp),
        bench_gpu.stage_row("statistics", "CuPy", 0.1, mp),
        {"stage": "encoder", "setting": "fp32/TF32, batch 4096", "seconds": 1.0, "tiles_per_s": 50_000.0},
        {"stage": "encoder", "setting": "bf16, batch 4096", "seconds": 1.0, "tiles_per_s": 900_000.0},
        bench_gpu.stage_row("zarr write", "xarray", 0.2, mp),
    ]
    runs = [
        {"backend": "auto", "precision": "fp32", "seconds": 4.0, "mp_per_s": mp / 4, "tissue_tiles": 80_000, "tissue_tiles_per_s": 20_000.0},
        {"backend": "nvimgcodec", "precision": "bf16", "seconds": 1.0, "mp_per_s": mp, "tissue_tiles": 80_000, "tissue_tiles_per_s": 80_000.0},
        {"backend": "nvimgcodec", "precision": "fp32", "error": "InvalidArgumentError: not registered"},
    ]
    rows = bench_gpu.summarize(stages, runs, mp, 80_000)
    assert rows[0]["bottleneck"] == "encoder fp32" and rows[0]["ratio"] == pytest.approx((mp / 4) / (50_000 / (80_000 / mp)))
    assert rows[1]["bottleneck"] == "gpu decode" and rows[1]["ratio"] == pytest.approx(0.5)
    assert "error" in rows[2] and "ratio" not in rows[2]
    result = {"size": 32768, "megapixels": mp, "chunk": 2048, "threads": 16, "gpu": "test GPU", "stages": stages, "pipeline": rows}
    table = bench_gpu.format_tables(result)
    assert "| nvimgcodec | bf16 |" in table and "gpu decode" in table and "not registered" in table


def test_bench_gpu_stops_clearly_without_a_gpu() -> None:
    if nvimgcodec_backend.nvimgcodec_available()[0]:
        pytest.skip("a GPU is available here")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--size", "32768"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert run.returncode != 0 and "bench_gpu needs CuPy and a CUDA GPU" in run.stderr


def test_auto_never_picks_nvimgcodec(jpeg_slide: Path, j2k_slide: Path, cmu: Path) -> None:
    from wsi_xr.readers import decide_backend

    for path in (jpeg_slide, j2k_slide, cmu):
        assert decide_backend(probe(path)).name != "nvimgcodec"
    ok, reason = nvimgcodec_backend.nvimgcodec_available()
    if ok:
        pytest.skip("this machine has a GPU with nvImageCodec: the refusal below cannot be seen here")
    with pytest.raises(wsi_xr.InvalidArgumentError, match="nvimgcodec") as err:
        wsi_xr.open_slide(jpeg_slide, backend="nvimgcodec", device="cuda")
    assert str(jpeg_slide) in str(err.value) and reason.split(" (")[0] in str(err.value)


@pytest.mark.gpu
def test_gpu_pipeline_store_equals_cpu_store(gpu: None, j2k_slide: Path, jpeg_slide: Path, tmp_path: Path) -> None:
    """JPEG 2000 decodes exactly on the GPU: the whole store equals the CPU run's (latents
    within TF32 tolerance). JPEG may differ by a few levels: masks agree on nearly every tile."""
    from wsi_xr.pipeline import process_slide

    for path, exact in ((j2k_slide, True), (jpeg_slide, False)):
        cpu = process_slide(path, tmp_path / f"{path.stem}-cpu.zarr", chunks=512, threshold=100.0, progress=False).compute()
        gpu_store = process_slide(
            path, tmp_path / f"{path.stem}-gpu.zarr", chunks=512, threshold=100.0, device="cuda", backend="nvimgcodec", progress=False
        ).compute()
        both = cpu.tile_mask.values & gpu_store.tile_mask.values
        if exact:
            np.testing.assert_array_equal(cpu.tile_mask.values, gpu_store.tile_mask.values)
        else:
            assert (cpu.tile_mask.values == gpu_store.tile_mask.values).mean() >= 0.99
        np.testing.assert_allclose(gpu_store.latent.values[both], cpu.latent.values[both], atol=0.05)
