"""Never lose a user's data: ``--overwrite`` (``overwrite=True``) replaces only what wsi_xr
wrote; file outputs replace only a file of their own kind, never a folder.

On 75c0752 ``wsi-xr run SLIDE junk2 --overwrite`` deleted ``junk2/thesis.docx`` without a
word, and so did ``wsi-xr mask``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import wsi_xr
from wsi_xr.pipeline import process_slide, write_parquet
from wsi_xr.store import write_zarr

CLI = [sys.executable, "-m", "wsi_xr.cli"]
THESIS = b"PK\x03\x04 a thesis, three years of work"


def _users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.docx").write_bytes(THESIS)
    return path


def _intact(folder: Path) -> None:
    assert (folder / "thesis.docx").read_bytes() == THESIS, "the user's file was lost"


@pytest.mark.parametrize("command", ["run", "mask"])
def test_overwrite_never_replaces_a_folder_wsi_xr_did_not_write(command: str, synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    junk = _users_folder(tmp_path / "junk2")
    extra = ["--weights", str(weights)] if command == "run" else []
    for flags in ([], ["--overwrite"]):
        done = subprocess.run(
            CLI + [command, str(synth_slide), str(junk), "--scheduler", "threads", "--quiet", *extra, *flags],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 2, done.stderr
        assert "did not write" in done.stderr and "thesis.docx" in done.stderr
        assert "--overwrite" not in done.stderr, "the message must not suggest the flag that would be refused too"
        _intact(junk)


def test_overwrite_replaces_a_wsi_xr_store_but_not_one_a_user_added_to(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "out.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=50, progress=False)
    with pytest.raises(wsi_xr.StoreError, match="different parameters"):
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=60, progress=False)
    ds = process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=60, overwrite=True, progress=False)
    assert ds.attrs["threshold"] == 60 and ds.attrs["complete"]  # replaced: it was wsi_xr's
    (store / "notes.txt").write_text("my notes")
    with pytest.raises(wsi_xr.StoreError, match="notes.txt") as refused:
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=70, overwrite=True, progress=False)
    assert "--overwrite" not in str(refused.value) and "overwrite=True" not in str(refused.value)
    assert (store / "notes.txt").read_text() == "my notes" and xr.open_zarr(store, consolidated=False).attrs["threshold"] == 60
    (store / "notes.txt").unlink()
    (store / "latent" / "readme.md").write_text("inside an array folder")
    with pytest.raises(wsi_xr.StoreError, match="readme.md"):
        process_slide(synth_slide, store, weights=weights, chunks=1024, threshold=70, overwrite=True, progress=False)


def test_cohort_and_mask_writers_refuse_foreign_data(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    folder = _users_folder(tmp_path / "cohort.zarr")
    with pytest.raises(wsi_xr.StoreError, match="thesis.docx"):
        wsi_xr.process_slides([synth_slide, synth_slide], folder, weights=weights, overwrite=True, progress=False)
    _intact(folder)
    mask = wsi_xr.tissue_mask(wsi_xr.open_slide(synth_slide), threshold=50).compute()
    with pytest.raises(wsi_xr.StoreError, match="thesis.docx"):
        write_zarr(mask, folder, overwrite=True)
    _intact(folder)
    store = write_zarr(mask, tmp_path / "mask.zarr")
    with pytest.raises(wsi_xr.StoreError, match="already exists"):
        write_zarr(mask, store)
    write_zarr(mask, store, overwrite=True)  # a mask store wsi_xr wrote: replaced
    assert xr.open_zarr(store).attrs["wsi_xr_mask"]["layout"] >= 2
    other_zarr = tmp_path / "someone-elses.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(other_zarr, zarr_format=3)
    with pytest.raises(wsi_xr.StoreError, match="not a wsi_xr store"):
        write_zarr(mask, other_zarr, overwrite=True)
    assert xr.open_zarr(other_zarr).a.values.tolist() == [0, 1, 2]


def test_parquet_replaces_a_parquet_file_never_a_folder_or_another_file(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, progress=False)
    folder = _users_folder(tmp_path / "rows.parquet")
    with pytest.raises(wsi_xr.StoreError, match="is a folder"):
        write_parquet(store, folder)
    _intact(folder)
    document = tmp_path / "report.parquet"
    document.write_bytes(THESIS)
    with pytest.raises(wsi_xr.StoreError, match="not a parquet file"):
        write_parquet(store, document)
    assert document.read_bytes() == THESIS
    target = tmp_path / "tiles.parquet"
    first = write_parquet(store, target)
    assert write_parquet(store, target) == first > 0  # a Parquet file: replaced


def test_parquet_folder_is_refused_before_any_work(synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    """75c0752 found out only after the whole pipeline had run."""
    folder = _users_folder(tmp_path / "rows.parquet")
    store = tmp_path / "never.zarr"
    start = time.perf_counter()
    done = subprocess.run(
        CLI + ["run", str(synth_slide), str(store), "--weights", str(weights), "--parquet", str(folder), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and "is a folder" in done.stderr, done.stderr
    assert not store.exists() and "Dask dashboard" not in done.stderr
    _intact(folder)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    "command",
    [
        ["plot", "{store}", "--out", "{target}"],
        ["synth", "{target}", "--width", "300", "--height", "300", "--overwrite"],
        ["train", "{slide}", "--out", "{target}", "--epochs", "1", "--max-tiles", "8"],
    ],
    ids=["plot", "synth", "train"],
)
def test_file_outputs_never_replace_another_kind_of_file(command: list[str], synth_slide: Path, weights: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    process_slide(synth_slide, store, weights=weights, chunks=1024, progress=False)
    target = tmp_path / "thesis.docx"
    target.write_bytes(THESIS)
    args = [part.format(store=store, target=target, slide=synth_slide) for part in command]
    done = subprocess.run(CLI + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not a" in done.stderr, done.stderr
    assert target.read_bytes() == THESIS
