"""A store you can trust after the run: every chunk checksummed, ``wsi-xr verify``, repair on rerun.

On 75c0752 (4096² slides, --chunk 1024): a deleted or flipped chunk was served silently by
``xr.open_zarr``; a rerun after a deleted latent or variance chunk exited 0 with NaN latents
in Parquet or a mask re-derived from damaged variances; truncated chunks gave raw numcodecs
tracebacks; a deleted latent chunk with tiles to blank failed "run again" forever.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import wsi_xr
from tests.numerics import assert_latents_agree, latent_tolerance
from wsi_xr.datasets.synth import write_synthetic_slide
from wsi_xr.pipeline.verify import verify_store

CLI = [sys.executable, "-m", "wsi_xr.cli"]
OPTIONS = {"chunks": 512, "progress": False, "torch_threads": "auto"}


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "s.tif"
    write_synthetic_slide(path, 2048, 2048, seed=13, tissue_fraction=0.4)
    return path


@pytest.fixture(scope="module")
def reference(slide: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, xr.Dataset, np.ndarray]:
    store = tmp_path_factory.mktemp("trust-ref") / "ref.zarr"
    ds = wsi_xr.process_slide(slide, store, weights=weights, **OPTIONS).compute()
    assert ds.attrs["complete"] and ds.attrs["tissue_tiles"] > 100
    return store, ds, latent_tolerance(slide, weights, ds.tile_mask.values)


def _chunk(store: Path, variable: str, *parts: int) -> Path:
    return store / variable / "c" / "/".join(map(str, parts))


def _tissue_chunk(ds: xr.Dataset) -> tuple[int, int]:
    """A 512-px chunk (8 x 8 tiles) holding tissue tiles."""
    counts = ds.tile_mask.values.reshape(4, 8, 4, 8).sum(axis=(1, 3))
    i, j = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return int(i), int(j)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


DAMAGE: dict[str, Callable[[Path, tuple[int, int]], tuple[str, Path]]] = {
    "latent flipped": lambda s, c: ("latent", _chunk(s, "latent", *c, 0)),
    "latent deleted": lambda s, c: ("latent", _chunk(s, "latent", *c, 0)),
    "tile_mask deleted": lambda s, c: ("tile_mask", _chunk(s, "tile_mask", *c)),
    "tile_variance deleted": lambda s, c: ("tile_variance", _chunk(s, "tile_variance", *c)),
    "tile_variance flipped": lambda s, c: ("tile_variance", _chunk(s, "tile_variance", *c)),
    "patch_variance flipped": lambda s, c: ("patch_variance", _chunk(s, "patch_variance", *c)),
    "chunk_done truncated": lambda s, c: ("chunk_done", _chunk(s, "chunk_done", *c)),
    "latent truncated": lambda s, c: ("latent", _chunk(s, "latent", *c, 0)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_found_and_repaired_by_a_rerun(damage: str, slide: Path, weights: Path, reference: tuple, tmp_path: Path) -> None:
    ref_store, ref, tolerance = reference
    store = tmp_path / "s.zarr"
    shutil.copytree(ref_store, store)
    variable, path = DAMAGE[damage](store, _tissue_chunk(ref))
    assert path.is_file(), path
    if damage.endswith("deleted"):
        path.unlink()
    elif damage.endswith("truncated"):
        _truncate(path)
    else:
        _flip(path)
    report = verify_store(store)
    assert not report.ok and any(variable in line and "chunk" in line for line in report.lines()), report.lines()
    if not damage.endswith("deleted"):  # a damaged chunk fails to read everywhere, plain xarray included
        with pytest.raises(Exception, match="checksum|decompress|Error|error"):
            xr.open_zarr(store, consolidated=False)[variable].values
    done = subprocess.run(CLI + ["verify", str(store)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and variable in done.stdout and "Traceback" not in done.stderr, done.stderr
    repaired = wsi_xr.process_slide(slide, store, weights=weights, **OPTIONS).compute()  # the same command again
    assert repaired.wsi.attrs["complete"] is True
    for name in ("tile_mask", "patch_mask", "read_error", "tile_variance", "patch_variance"):
        np.testing.assert_array_equal(repaired[name].values, ref[name].values, err_msg=name)
    assert_latents_agree(repaired.latent.values, ref.latent.values, tolerance, "latents after repair")
    assert verify_store(store).ok


def test_finalising_checks_the_bytes_it_wrote(reference: tuple, tmp_path: Path) -> None:
    """What finalising runs before ``complete``: stored bytes against their CRC32C, required chunks present."""
    from wsi_xr.pipeline.verify import check_written
    from wsi_xr.tissue.core import blocks_any

    ref_store, ref, _ = reference
    store = tmp_path / "s.zarr"
    shutil.copytree(ref_store, store)
    with_tissue = {(int(i), int(j)) for i, j in np.argwhere(blocks_any(ref.tile_mask.values, ((8,) * 4, (8,) * 4)))}
    assert check_written(store, None, with_tissue) == []
    i, j = _tissue_chunk(ref)
    _flip(_chunk(store, "latent", i, j, 0))
    _flip(_chunk(store, "tile_mask", i, j))
    found = {(p.variable, p.chunk, p.what.split(":")[0]) for p in check_written(store, None, with_tissue)}
    assert found == {("latent", (i, j, 0), "checksum does not match"), ("tile_mask", (i, j), "checksum does not match")}, found
    _chunk(store, "latent", i, j, 0).unlink()
    assert [(p.variable, p.what) for p in check_written(store, None, with_tissue) if p.variable == "latent"] == [("latent", "chunk missing")]
    # a latent chunk without tissue need not be stored: the chunk task writes none there
    assert check_written(store, None, with_tissue - {(i, j)}) == [p for p in check_written(store, None, with_tissue) if p.variable != "latent"]


def test_verify_checks_parquet_cohorts_and_says_sound(slide: Path, weights: Path, tmp_path: Path) -> None:
    second = tmp_path / "t.tif"
    write_synthetic_slide(second, 1024, 1024, seed=5)
    store = tmp_path / "cohort.zarr"
    wsi_xr.process_slides([slide, second], store, weights=weights, **OPTIONS)
    rows = tmp_path / "rows.parquet"
    wsi_xr.write_parquet(store, rows)
    ok = subprocess.run(CLI + ["verify", str(store), "--parquet", str(rows)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "sound (2 slide group(s)" in ok.stdout, ok.stdout + ok.stderr
    import pandas as pd

    frame = pd.read_parquet(rows)
    frame.iloc[3:].to_parquet(rows)  # three rows lost
    assert not verify_store(store, parquet=rows).ok
    _chunk(store / "t", "patch_mask", 0, 0).unlink()
    bad = subprocess.run(CLI + ["verify", str(store)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and f"{store}/t: patch_mask chunk 0.0: chunk missing" in bad.stdout, bad.stdout


def test_stores_without_checksums_are_reported(slide: Path, reference: tuple, tmp_path: Path) -> None:
    import json

    store = tmp_path / "old.zarr"
    shutil.copytree(reference[0], store)
    meta = store / "latent" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["codecs"] = [c for c in doc["codecs"] if c["name"] != "crc32c"]  # as 0.2.0 wrote it (data now unreadable: not read)
    meta.write_text(json.dumps(doc))
    lines = verify_store(store).lines()
    assert any("latent: written without checksums" in line for line in lines), lines


def _same_size_other_slide(slide: Path, folder: Path) -> Path:
    """Another synthetic slide padded to ``slide``'s size (trailing bytes: still a valid TIFF)."""
    other = folder / "other.tif"
    write_synthetic_slide(other, 2048, 2048, seed=99, tissue_fraction=0.15)
    size = slide.stat().st_size
    data = other.read_bytes()
    assert len(data) <= size, "the other slide must not be larger"
    other.write_bytes(data + b"\0" * (size - len(data)))
    return other


def test_a_different_slide_with_the_same_size_and_mtime_is_refused(slide: Path, weights: Path, tmp_path: Path) -> None:
    import os

    work = tmp_path / "s.tif"
    shutil.copy(slide, work)
    store = tmp_path / "s.zarr"
    wsi_xr.process_slide(work, store, weights=weights, **OPTIONS)
    stat = work.stat()
    other = _same_size_other_slide(work, tmp_path)
    shutil.copy(other, work)
    os.utime(work, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, size and mtime: only the content differs
    assert work.stat().st_size == stat.st_size and work.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(wsi_xr.StoreError, match="its content differs"):
        wsi_xr.process_slide(work, store, weights=weights, **OPTIONS)


def test_a_slide_rewritten_during_the_run_leaves_the_store_incomplete(slide: Path, weights: Path, tmp_path: Path) -> None:
    import os

    from dask.callbacks import Callback

    work = tmp_path / "s.tif"
    shutil.copy(slide, work)
    other = _same_size_other_slide(work, tmp_path)
    stat = work.stat()

    def rewrite(*_: object) -> None:  # after the chunks were computed, before finalising
        shutil.copy(other, work)
        os.utime(work, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    store = tmp_path / "s.zarr"
    with Callback(finish=rewrite), pytest.raises(wsi_xr.StoreError, match="changed while it was being read"):
        wsi_xr.process_slide(work, store, weights=weights, **OPTIONS)
    assert xr.open_zarr(store, consolidated=False).wsi.attrs["complete"] is False


def test_identity_fingerprint_is_cheap_and_tells_slides_apart(slide: Path, tmp_path: Path) -> None:
    from wsi_xr.readers import probe
    from wsi_xr.readers.identity import content_fingerprint

    other = _same_size_other_slide(slide, tmp_path)
    assert content_fingerprint(probe(slide)) != content_fingerprint(probe(other))
    assert content_fingerprint(probe(slide)) == content_fingerprint(probe(slide))
    copy = tmp_path / "copy.tif"
    shutil.copy(slide, copy)
    assert content_fingerprint(probe(copy)) == content_fingerprint(probe(slide))  # content, not name
