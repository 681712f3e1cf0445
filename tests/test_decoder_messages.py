"""What cuCIM prints goes to logging, and a tile the decoder complained about is never served.

On 75c0752 cuCIM printed straight to the process's stdout/stderr (``[Warning] Loading image
... with a slow-path`` for a stripped TIFF; ``ERROR in line 205 while decompressing JPEG
image`` for a tile with flipped entropy-coded bytes), and that tile's wrong pixels were
scored and encoded with ``read_error`` False.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import xarray as xr

import wsi_xr
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.readers import clear_caches

CLI = [sys.executable, "-m", "wsi_xr.cli"]
#: The damaged file tile: row 1, column 1 of the 256-px tile grid (level-0 pixels 256-511).
DAMAGED_TILE = 9


def _flip_entropy_bytes(clean: Path, damaged: Path, index: int) -> None:
    """Copy ``clean`` with 40 bytes of one tile's entropy-coded data (after its SOS header) flipped."""
    data = bytearray(clean.read_bytes())
    with tifffile.TiffFile(clean) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    segment = bytes(data[offset : offset + count])
    sos = segment.find(b"\xff\xda")
    start = offset + sos + 2 + int.from_bytes(segment[sos + 2 : sos + 4], "big")
    for i in range(start + 100, start + 140):
        data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("flip")
    clean, damaged = folder / "clean.tif", folder / "flipped.tif"
    write_synthetic_slide(clean, 2048, 2048, seed=1, tissue_fraction=0.6)
    _flip_entropy_bytes(clean, damaged, DAMAGED_TILE)
    return clean, damaged


def _expected_read_error() -> np.ndarray:
    truth = np.zeros((32, 32), dtype=bool)
    truth[4:8, 4:8] = True  # the 64-px tiles of the 256-px file tile at y=256..511, x=256..511
    return truth


def test_flipped_entropy_bytes_are_a_read_error_not_wrong_pixels(
    flipped: tuple[Path, Path], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    clean, damaged = flipped
    clear_caches()
    caplog.set_level(logging.INFO, logger="wsi_xr.thirdparty")
    with pytest.raises(wsi_xr.SlideReadError, match="y=256 x=256.*Corrupt JPEG data"):
        wsi_xr.open_slide(damaged).values  # never the pixels the decoder made up
    with dask.config.set(scheduler="threads", num_workers=4):  # windows decoded side by side
        mask = wsi_xr.tissue_mask(wsi_xr.open_slide(damaged, chunks=512), threshold=50).compute()
    reference = wsi_xr.tissue_mask(wsi_xr.open_slide(clean, chunks=512), threshold=50).compute()
    truth = _expected_read_error()
    np.testing.assert_array_equal(mask.read_error.values, truth)
    assert not mask.tile_mask.values[truth].any() and np.isnan(mask.tile_variance.values[truth]).all()
    untouched = np.ones_like(truth)
    untouched[4:8, 4:8] = False  # the damaged file tile is exactly one 256-px patch
    np.testing.assert_array_equal(mask.tile_mask.values[untouched], reference.tile_mask.values[untouched])
    np.testing.assert_array_equal(mask.tile_variance.values[untouched], reference.tile_variance.values[untouched])
    assert reference.tile_mask.values[truth].sum() > 8  # the damaged tile holds tissue: it would have been scored
    out, err = capfd.readouterr()
    assert "ERROR in line" not in out + err and "Corrupt JPEG" not in out + err  # nothing printed
    logged = [r.getMessage() for r in caplog.records if r.name == "wsi_xr.thirdparty"]
    assert any("Corrupt JPEG data" in m for m in logged)


def test_pipeline_never_encodes_a_tile_the_decoder_complained_about(flipped: tuple[Path, Path], weights: Path, tmp_path: Path) -> None:
    clean, damaged = flipped
    ds = wsi_xr.process_slide(damaged, tmp_path / "f.zarr", weights=weights, chunks=512, threshold=50, progress=False)
    truth = _expected_read_error()
    np.testing.assert_array_equal(ds.read_error.values, truth)
    assert ds.attrs["read_errors"] == int(truth.sum()) and ds.attrs["damaged_file_tiles"] == 0  # found by decoding
    assert not ds.tile_mask.values[truth].any() and np.isnan(ds.latent.values[truth]).all()
    reference = wsi_xr.process_slide(clean, tmp_path / "c.zarr", weights=weights, chunks=512, threshold=50, progress=False)
    untouched = ~truth
    np.testing.assert_array_equal(ds.tile_mask.values[untouched], reference.tile_mask.values[untouched])
    stored = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert stored.wsi.attrs["complete"] is True and int(stored.read_error.sum()) == int(truth.sum())


def test_cufile_start_up_noise_after_torch_is_logged_not_printed(tmp_path: Path) -> None:
    """With torch (a CUDA build, which loads libcufile) imported first, cuCIM's first import and
    open print "cuFile initialization failed" past the C stream variables (std::cout) and write
    cufile.log into the current folder: wsi_xr reads print nothing, leave no file and no
    environment variable behind, and the text is a log record."""
    slide = tmp_path / "s.tif"
    write_synthetic_slide(slide, 512, 512, seed=2)
    script = (
        "import logging, sys, torch, wsi_xr\n"
        "logging.basicConfig(level=logging.INFO, stream=open(sys.argv[2], 'w'))\n"
        "image = wsi_xr.open_slide(sys.argv[1])\n"
        "assert image.attrs['backend'] == 'cucim', image.attrs['backend']\n"
        "assert image.values.std() > 0\n"
        "import os; assert 'CUFILE_LOGFILE_PATH' not in os.environ\n"
    )
    log = tmp_path / "log.txt"
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"}  # as a user's shell has it
    run = subprocess.run([sys.executable, "-c", script, str(slide), str(log)], capture_output=True, text=True, timeout=300, cwd=work, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)
    assert list(work.iterdir()) == []  # no cufile.log
    logged = log.read_text()
    if "cuFile" in logged:  # only where this torch build carries libcufile
        assert "wsi_xr.thirdparty:cucim: cuFile initialization failed" in logged


def test_fd_capture_passes_other_output_on_and_restores_descriptors(tmp_path: Path) -> None:
    """fd_output_captured: cuFile's lines become log records, any other line written to the
    descriptors meanwhile reaches them afterwards, and the descriptors come back after an
    exception; with stdout closed it captures nothing and still runs the block."""
    script = (
        "import logging, os, sys\n"
        "from wsi_xr.readers.cstdio import fd_output_captured\n"
        "logging.basicConfig(level=logging.INFO, stream=open(sys.argv[1], 'w'), format='%(name)s|%(message)s')\n"
        "try:\n"
        "    with fd_output_captured():\n"
        "        os.write(1, b' cuFile initialization failed\\n')\n"
        "        os.write(2, b'another thread says hello\\n')\n"
        "        raise KeyError('inside')\n"
        "except KeyError:\n"
        "    pass\n"
        "os.write(2, b'after\\n')\n"
        "print('printed', flush=True)\n"
    )
    log = tmp_path / "log.txt"
    run = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "printed\n"
    assert run.stderr == "another thread says hello\nafter\n"
    assert log.read_text() == "wsi_xr.thirdparty|cucim: cuFile initialization failed\n"
    closed = subprocess.run(
        [sys.executable, "-c", "from wsi_xr.readers.cstdio import fd_output_captured\nwith fd_output_captured():\n    x = 1\n"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 0, closed.stderr


def test_cucim_warnings_go_to_logging_not_the_terminal(tmp_path: Path) -> None:
    """kidney-48-5.tif (stripped): cuCIM's slow-path warning appears with -v only, as a log record."""
    from tests.conftest import data_file

    kidney = data_file("kidney-48-5.tif")
    quiet = subprocess.run(CLI + ["mask", str(kidney), str(tmp_path / "k.zarr")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "[Warning]" not in quiet.stdout + quiet.stderr and "slow-path" not in quiet.stdout + quiet.stderr
    verbose = subprocess.run(CLI + ["-v", "mask", str(kidney), str(tmp_path / "v.zarr")], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0 and "cucim: [Warning] Loading image" in verbose.stderr, verbose.stderr


def test_capture_leaves_python_output_and_c_output_outside_reads_alone(flipped: tuple[Path, Path], capfd: pytest.CaptureFixture[str]) -> None:
    """Only the C streams are redirected, only while wsi_xr is in cuCIM: Python prints from
    other threads still reach stdout, and C code printing afterwards prints as before."""
    clean, _ = flipped
    clear_caches()
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            print("python-side progress", flush=True)
            stop.wait(0.001)

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        with dask.config.set(scheduler="threads"):
            wsi_xr.open_slide(clean, chunks=512).data.sum().compute()
    finally:
        stop.set()
        thread.join()
    libc = ctypes.CDLL(None)
    libc.printf(b"c-side line\n")
    libc.fflush(None)
    out, _ = capfd.readouterr()
    assert "python-side progress" in out and "c-side line" in out


def test_a_notice_naming_a_path_is_not_a_decoder_error(tmp_path: Path) -> None:
    """cuCIM's slow-path warning names the file; a path with "failed" in it is not a failure."""
    folder = tmp_path / "failed_scans"
    folder.mkdir()
    slide = folder / "invalid-error.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (700, 900, 3), dtype=np.uint8)
    tifffile.imwrite(slide, pixels, photometric="rgb")  # stripped, uncompressed: cuCIM's slow path
    clear_caches()
    image = wsi_xr.open_slide(slide, backend="cucim")
    with dask.config.set(scheduler="sync"):  # one read at a time: every complaint would be "alone"
        np.testing.assert_array_equal(image.values, pixels)
        mask = wsi_xr.tissue_mask(wsi_xr.open_slide(slide, backend="cucim"), threshold=50).compute()
    assert not mask.read_error.values.any()


def test_cufile_start_up_lines_are_not_decoder_errors() -> None:
    """cuFile starts in a thread of its own and may print into a read's capture (seen: CMU-1's
    first window called unreadable in a forked worker); its lines are no decoder's complaint,
    while a real complaint next to them still is."""
    from wsi_xr.readers.cstdio import decoder_error

    cufile = "dlopen error libcuda.so.1: cannot open shared object file: No such file or directory\n missing cuda symbols while dynamic loading\n cuFile initialization failed\n"
    assert not decoder_error(cufile)
    assert decoder_error(cufile + "ERROR in line 205 while decompressing JPEG image: Corrupt JPEG data: premature end of data segment\n")


def test_a_store_started_without_decoder_checks_is_not_resumed(flipped: tuple[Path, Path], weights: Path, tmp_path: Path) -> None:
    """A half-done 0.2.0 store: its finished chunks were scored without the decoder check."""
    import json

    clean, _ = flipped
    store = tmp_path / "old.zarr"
    wsi_xr.process_slide(clean, store, weights=weights, chunks=512, progress=False)
    meta = json.loads((store / "zarr.json").read_text())
    run = json.loads(meta["attributes"]["wsi_xr_run"])  # JSON text, since attributes are netCDF-safe
    del run["read_checks"]  # what 0.2.0 wrote
    meta["attributes"]["wsi_xr_run"] = run  # as 0.2.0 wrote it: the dict itself
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(wsi_xr.StoreError, match="did not check for decoder errors"):
        wsi_xr.process_slide(clean, store, weights=weights, chunks=512, progress=False)
    redone = wsi_xr.process_slide(clean, store, weights=weights, chunks=512, overwrite=True, progress=False)
    assert redone.wsi.attrs["wsi_xr_run"]["read_checks"] >= 1
